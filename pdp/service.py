"""``pdp service install|uninstall|status``: a node as a systemd or launchd service.

Three layers, each testable alone:

* **Rendering** (pure): a :class:`Spec` (where, as whom, which interpreter and node config)
  becomes unit text (:func:`render_unit`), a sysusers.d entry (:func:`render_sysusers`) or
  plist text (:func:`render_plist`, parsed by :func:`plist_dict`). The templates are
  ``systemd/pdp-node.service.in`` and ``launchd/org.pdp.node.plist.in`` of the repository;
  identical copies ship inside the package as ``pdp/templates/`` (package data, so a
  non-editable install has them too), and ``tests/test_service.py`` keeps the two equal.
* **Planning**: :func:`plan_install` and :func:`plan_uninstall` compare what should be on
  disk with what is, and return the ordered :class:`Step` s that make it so (files to write
  or remove, commands to run, notes). Each file pdp writes ends with a stamp, the SHA-256
  of the lines above it: a file whose stamp does not match was changed by hand, and is
  never overwritten (or removed) without ``--force``. A second install finds every file
  unchanged and writes nothing.
* **Execution**: :func:`execute` carries out a plan live, or only prints it (``--dry-run``:
  every file's exact content and every command), or writes the files under a staging root
  and runs nothing (``--root DIR``). Commands go through an injectable :data:`Runner`.

The owner's limits map onto the unit: ``cpus`` -> ``CPUQuota=`` (cpus x 100 %), ``nice``
-> ``Nice=``, ``memory`` (per task) -> ``MemoryMax=`` by :func:`memory_max`.
"""

from __future__ import annotations

import getpass
import hashlib
import importlib.resources
import os
import plistlib
import re
import shlex
import stat
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union
from xml.sax.saxutils import escape as xml_escape

import typer
from rich.console import Console
from rich.markup import escape

import pdp
from pdp.config import NodeConfig, default_config_file, load_config
from pdp.errors import PdpError
from pdp.node.limits import MiB

Manager = Literal["systemd", "launchd"]
Scope = Literal["user", "system"]

DEFAULT_NAME = "pdp-node"
UNIT_TEMPLATE = "pdp-node.service.in"
PLIST_TEMPLATE = "org.pdp.node.plist.in"
WATCHDOG_SEC = 60  # the node pings every 30 s; a loop stuck for a minute gets it restarted
SYSTEM_USER = "pdp"
SYSTEM_STATE = Path("/var/lib")
HOMES = (Path("/home"), Path("/root"), Path("/run/user"))  # what ProtectHome= hides
TMPS = (Path("/tmp"), Path("/var/tmp"))  # what PrivateTmp= replaces
# MemoryMax= = cpus x (memory + SLOT_HEADROOM) + NODE_HEADROOM. ``memory`` caps one task's
# heap (RLIMIT_DATA); the cgroup also counts what that leaves out (the task interpreter's
# libraries, stacks, file-backed maps), hence a per-slot allowance, and the node process
# itself (Raft, connections, merge buffers: about 300 MB at the peak of a big sort).
SLOT_HEADROOM = 64 * MiB
NODE_HEADROOM = 512 * MiB
_NAME = re.compile(r"[a-z0-9]+(?:-[a-z0-9]+)*")
_PLACEHOLDER = re.compile(r"@([A-Z_]+)@")
_STAMP = re.compile(r"(?:# |<!-- )pdp-sha256: ([0-9a-f]{64})\b.*\n?\Z")


class ServiceError(PdpError):
    """A service cannot be installed, removed or queried as asked; the message says why."""

    code = "service"


# -- what and where ------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """Which service manager, for whom, and where its files go.

    Paths are as the live system sees them; ``root`` (a staging dir) prefixes them on disk
    (:meth:`on_disk`). ``name`` names the service: ``pdp-node`` by default, another name for
    a second node on one machine."""

    manager: Manager
    scope: Scope
    name: str = DEFAULT_NAME
    root: Path = Path("/")
    user: str = field(default_factory=getpass.getuser)
    uid: int = field(default_factory=lambda: getattr(os, "getuid", lambda: 0)())  # no uid on Windows
    home: Path = field(default_factory=Path.home)
    config_home: Path | None = None  # $XDG_CONFIG_HOME; None: ~/.config

    @property
    def unit(self) -> str:
        return f"{self.name}.service"

    @property
    def label(self) -> str:
        return "org.pdp." + (self.name[4:] if self.name.startswith("pdp-") else self.name)

    @property
    def state_dir(self) -> Path:
        """Where a system service keeps its data (``StateDirectory=``)."""
        return SYSTEM_STATE / ("pdp" if self.name == DEFAULT_NAME else self.name)

    @property
    def service_file(self) -> Path:
        if self.manager == "launchd":
            return self.home / "Library" / "LaunchAgents" / f"{self.label}.plist"
        if self.scope == "system":
            return Path("/etc/systemd/system") / self.unit
        return (self.config_home or self.home / ".config") / "systemd" / "user" / self.unit

    @property
    def sysusers_file(self) -> Path:
        return Path("/etc/sysusers.d") / f"{SYSTEM_USER}.conf"

    @property
    def log_dir(self) -> Path:
        return self.home / "Library" / "Logs" / "pdp"

    @property
    def log_file(self) -> Path:
        return self.log_dir / f"{self.name}.log"

    @property
    def stderr_log(self) -> Path:
        return self.log_dir / f"{self.name}.stderr.log"

    @property
    def systemctl(self) -> list[str]:
        return ["systemctl", "--user"] if self.scope == "user" else ["systemctl"]

    @property
    def launchd_domain(self) -> str:
        return f"gui/{self.uid}"

    def on_disk(self, path: Path) -> Path:
        return self.root / path.relative_to("/") if self.root != Path("/") else path


def make_target(manager: Manager, scope: Scope, name: str = DEFAULT_NAME, root: Path | None = None) -> Target:
    """The target for this user and environment; checks the name and the combination."""
    if not _NAME.fullmatch(name) or len(name) > 64:
        raise ServiceError(f"service name {name!r}: use lowercase letters, digits and single dashes (e.g. pdp-node)")
    if manager == "launchd" and scope == "system":
        raise ServiceError("a system-wide launchd daemon is not supported: use --user (a LaunchAgent that runs "
                           "while you are logged in)")
    xdg = os.environ.get("XDG_CONFIG_HOME")
    return Target(manager, scope, name, (root or Path("/")).absolute(),
                  config_home=Path(xdg) if xdg and Path(xdg).is_absolute() else None)


@dataclass(frozen=True)
class Spec:
    """Everything a rendering needs: the target, the node's config and the interpreter."""

    target: Target
    config_path: Path
    node: NodeConfig
    python: Path = field(default_factory=lambda: Path(sys.executable).absolute())
    package_dir: Path = field(default_factory=lambda: Path(pdp.__file__).absolute().parent)

    @property
    def data_dir(self) -> Path:
        """The data dir the service uses: the config's, or ``/var/lib/pdp`` for a system service."""
        return self.target.state_dir if self.target.scope == "system" else self.node.data_dir

    def node_args(self) -> list[str]:
        """The service's command line: this interpreter's pdp (never a PATH lookup)."""
        args = [str(self.python), "-m", "pdp", "node", "--config", str(self.config_path)]
        if self.target.scope == "system":
            args += ["--data-dir", str(self.target.state_dir)]
        if self.target.manager == "launchd":
            args += ["--log-file", str(self.target.log_file)]
        return args


def load_spec(target: Target, config: Path | None) -> Spec:
    """The spec for ``config`` (default: as ``pdp node`` finds it: $PDP_CONFIG, else the
    per-user ``pdp.toml``)."""
    path = (config or default_config_file()).expanduser().absolute()
    if not path.is_file():
        hint = "name it with --config FILE" if config else "`pdp party init` or `pdp join TOKEN` writes one"
        raise ServiceError(f"no node config at {path}: {hint}")
    if sys.executable in ("", None):
        raise ServiceError("cannot tell which Python runs pdp (sys.executable is empty)")
    return Spec(target, path, load_config(path, {}))


# -- the owner's limits ----------------------------------------------------------------------


def cpu_quota(node: NodeConfig) -> str:
    """``CPUQuota=``: one CPU per task slot."""
    return f"{node.cpus * 100}%"


def memory_max(node: NodeConfig) -> int | None:
    """``MemoryMax=`` in bytes, or None when the config sets no memory limit: every slot's
    task limit plus :data:`SLOT_HEADROOM`, plus :data:`NODE_HEADROOM` for the node itself."""
    if not node.memory:
        return None
    return node.cpus * (node.memory + SLOT_HEADROOM) + NODE_HEADROOM


# -- rendering ---------------------------------------------------------------------------------


def template(name: str) -> str:
    """A template's text, from the package (``pdp/templates/``, a copy of the repository's)."""
    return importlib.resources.files("pdp").joinpath("templates", name).read_text(encoding="utf-8")


def fill(text: str, values: Mapping[str, str]) -> str:
    """Replace each ``@NAME@``; a line holding only a placeholder whose value is "" goes."""
    kept = [line for line in text.splitlines(keepends=True)
            if not ((m := _PLACEHOLDER.fullmatch(line.strip())) and values.get(m.group(1), None) == "")]
    text = "".join(kept)
    missing = sorted(set(_PLACEHOLDER.findall(text)) - set(values))
    if missing:
        raise ServiceError(f"the template has placeholders without a value: {', '.join(missing)}")
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], text)


def systemd_quote(arg: str, exec_line: bool = False) -> str:
    """One word of a unit setting: ``%`` escaped (specifiers), ``$`` too on Exec lines
    (variables), and double quotes around anything with spaces, quotes or backslashes."""
    if any(c in arg for c in "\n\r\0"):
        raise ServiceError(f"{arg!r}: a path with a line break cannot go into a unit file")
    arg = arg.replace("%", "%%")
    if exec_line:
        arg = arg.replace("$", "$$")
    if arg and not re.search(r"[\s\"'\\;]", arg):
        return arg
    return '"' + arg.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _comment(path: Path) -> str:
    """A path for a comment line (no quoting, but no line break either)."""
    systemd_quote(str(path))
    return str(path)


def _under(path: Path, bases: Sequence[Path]) -> bool:
    candidates = {path, path.resolve()} if path.is_absolute() else {path}
    return any(p == b or b in p.parents for p in candidates for b in bases)


def _read_paths(spec: Spec) -> list[Path]:
    """What the service reads: the interpreter, pdp's code, the config, and the data dir."""
    return [spec.python, spec.package_dir, spec.config_path, spec.data_dir]


def protect_home(spec: Spec) -> str:
    """``yes`` (home dirs hidden) unless the service needs something under them; then
    ``read-only``, with the data dir writable again through ``ReadWritePaths=``."""
    return "read-only" if any(_under(p, HOMES) for p in _read_paths(spec)) else "yes"


def private_tmp(spec: Spec) -> str:
    """``yes`` unless the service's files live under /tmp or /var/tmp (a private /tmp hides them)."""
    return "no" if any(_under(p, TMPS) for p in _read_paths(spec)) else "yes"


def unit_values(spec: Spec) -> dict[str, str]:
    t, node = spec.target, spec.node
    mem = memory_max(node)
    system = t.scope == "system"
    account = (f"User={SYSTEM_USER}\nGroup={SYSTEM_USER}\nStateDirectory={t.state_dir.name}\n"
               "StateDirectoryMode=0700") if system else ""
    return {
        "UNIT": t.unit, "NAME": t.name, "SCOPE": t.scope, "SYSTEMCTL": " ".join(t.systemctl),
        "NODE_NAME": node.name.replace("%", "%%"), "CONFIG": _comment(spec.config_path),
        # a user manager has no network-online.target: a user service just retries
        "UNIT_ORDER": "Wants=network-online.target\nAfter=network-online.target" if system else "",
        "EXEC_START": " ".join(systemd_quote(a, exec_line=True) for a in spec.node_args()),
        "WATCHDOG_SEC": f"{WATCHDOG_SEC}s",
        "ACCOUNT": account,
        "CPU_QUOTA": cpu_quota(node),
        "MEMORY_MAX": f"MemoryMax={-(-mem // MiB)}M" if mem else "# no MemoryMax=: the config sets no memory limit",
        "NICE": str(node.nice),
        "PROTECT_HOME": protect_home(spec),
        # ProtectSystem=strict makes everything read-only; the data dir is the one place the
        # node writes ("-": a missing one is the node's error to report, not a mount failure)
        "WRITABLE": "" if system else "ReadWritePaths=" + systemd_quote("-" + str(spec.data_dir)),
        "PRIVATE_TMP": private_tmp(spec),
        "WANTED_BY": "multi-user.target" if system else "default.target",
    }


def render_unit(spec: Spec) -> str:
    """The systemd unit's text (stamped)."""
    return stamp(fill(template(UNIT_TEMPLATE), unit_values(spec)), "# ", "")


def render_sysusers() -> str:
    """The sysusers.d entry that makes the system service's account (``systemd-sysusers``)."""
    return stamp(f"# the account pdp's system services run as (`pdp service install --system`)\n"
                 f'u {SYSTEM_USER} - "pdp party member" {SYSTEM_STATE / "pdp"}\n', "# ", "")


def render_plist(spec: Spec) -> str:
    """The launchd agent's plist text (stamped)."""
    t = spec.target
    args = "\n".join(f"    <string>{xml_escape(a)}</string>" for a in spec.node_args())
    values = {"LABEL": t.label, "USER": t.user.replace("--", "-"), "PROGRAM_ARGUMENTS": args,
              "NICE": str(spec.node.nice), "STDERR_LOG": xml_escape(str(t.stderr_log))}
    return stamp(fill(template(PLIST_TEMPLATE), values), "<!-- ", " -->")


def plist_dict(text: str) -> dict[str, Any]:
    """A plist's text as the dict launchd reads."""
    try:
        value = plistlib.loads(text.encode("utf-8"))
    except Exception as exc:  # plistlib raises ExpatError, ValueError, InvalidFileException...
        raise ServiceError(f"not a valid plist: {exc}") from None
    if not isinstance(value, dict):
        raise ServiceError("not a valid launchd plist: the top level is not a dict")
    return value


def stamp(text: str, before: str, after: str) -> str:
    """``text`` with a last line recording its SHA-256 (how pdp tells its files from edited ones)."""
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
    return f"{text}{before}pdp-sha256: {digest} (written by `pdp service install`){after}\n"


def is_pristine(text: str) -> bool:
    """Whether ``text`` is a file as pdp wrote it: its stamp matches the lines above it."""
    match = _STAMP.search(text)
    if match is None:
        return False
    return hashlib.sha256(text[:match.start()].encode("utf-8")).hexdigest() == match.group(1)


def desired_files(spec: Spec) -> list[tuple[Path, str, int]]:
    """(path, content, mode) of every file an install writes."""
    t = spec.target
    if t.manager == "launchd":
        return [(t.service_file, render_plist(spec), 0o644)]
    files = [(t.service_file, render_unit(spec), 0o644)]
    if t.scope == "system":
        files.insert(0, (t.sysusers_file, render_sysusers(), 0o644))
    return files


# -- plans ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Write:
    path: Path  # on disk
    content: str
    mode: int
    why: str  # "new file", "update", "replace your edited copy (--force)"


@dataclass(frozen=True)
class Remove:
    path: Path
    why: str = ""


@dataclass(frozen=True)
class MakeDir:
    path: Path


@dataclass(frozen=True)
class Run:
    argv: tuple[str, ...]


@dataclass(frozen=True)
class Note:
    text: str


Step = Union[Write, Remove, MakeDir, Run, Note]


@dataclass
class Plan:
    steps: list[Step] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # fatal for a live run; warnings otherwise

    @property
    def writes(self) -> bool:
        return any(isinstance(s, (Write, Remove)) for s in self.steps)


Probe = Callable[[Sequence[str]], bool]  # a read-only query: did the command succeed?


def probe_command(argv: Sequence[str]) -> bool:
    try:
        return subprocess.run(list(argv), capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def no_probe(argv: Sequence[str]) -> bool:
    """For a staging root: nothing on this machine is asked, nothing counts as running."""
    return False


def file_step(path: Path, content: str, mode: int, force: bool) -> Step:
    """What to do about one file: unchanged, new, an update of pdp's own, or (with
    ``force``) a replacement of an edited one. An edited one without ``force`` is an error."""
    try:
        current = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return Write(path, content, mode, "new file")
    except (OSError, UnicodeDecodeError) as exc:
        raise ServiceError(f"cannot read {path}: {exc}") from None
    if current == content:
        return Note(f"unchanged: {path}")
    if is_pristine(current):
        return Write(path, content, mode, "update")
    if force:
        return Write(path, content, mode, "replace your edited copy (--force)")
    raise ServiceError(f"{path} was changed by hand since pdp wrote it, so it is not overwritten. "
                       "`pdp service install --dry-run` shows what pdp would write; --force replaces your copy"
                       + (" (a drop-in, `systemctl edit`, keeps changes across installs)"
                          if path.suffix == ".service" else ""))


def plan_install(spec: Spec, force: bool = False, probe: Probe = probe_command) -> Plan:
    """The steps that install (or update) the service, and the problems found on the way."""
    t = spec.target
    plan = Plan(problems=_install_problems(spec))
    if t.manager == "launchd" and not t.on_disk(t.log_dir).is_dir():
        plan.steps.append(MakeDir(t.on_disk(t.log_dir)))
    for path, content, mode in desired_files(spec):
        plan.steps.append(file_step(t.on_disk(path), content, mode, force))
    changed = plan.writes
    if t.manager == "launchd":
        plan.steps += _launchd_start(t, changed, probe)
    else:
        plan.steps += _systemd_start(spec, changed, probe)
    if not changed:
        plan.steps.insert(0, Note("nothing to write: every file is up to date"))
    plan.steps += [Note(n) for n in _after_install_notes(spec)]
    return plan


def _systemd_start(spec: Spec, changed: bool, probe: Probe) -> list[Step]:
    t = spec.target
    steps: list[Step] = []
    if t.scope == "system":
        if changed or not _user_exists(SYSTEM_USER):
            steps.append(Run(("systemd-sysusers", str(t.sysusers_file))))
        if not _readable_by_service(spec.config_path):
            steps += [Run(("chgrp", SYSTEM_USER, str(spec.config_path))), Run(("chmod", "g+r", str(spec.config_path)))]
    ctl = tuple(t.systemctl)
    if changed:
        return steps + [Run((*ctl, "daemon-reload")), Run((*ctl, "enable", t.unit)),
                        Run((*ctl, "restart", "--no-block", t.unit))]
    if probe([*ctl, "is-enabled", "--quiet", t.unit]) and probe([*ctl, "is-active", "--quiet", t.unit]):
        return steps + [Note(f"{t.unit} is enabled and running: nothing to do")]
    return steps + [Run((*ctl, "enable", "--now", "--no-block", t.unit))]


def _launchd_start(t: Target, changed: bool, probe: Probe) -> list[Step]:
    service = f"{t.launchd_domain}/{t.label}"
    loaded = probe(["launchctl", "print", service])
    if loaded and not changed:
        return [Note(f"{t.label} is loaded: nothing to do")]
    steps: list[Step] = [Run(("launchctl", "bootout", service))] if loaded else []
    return steps + [Run(("launchctl", "enable", service)),
                    Run(("launchctl", "bootstrap", t.launchd_domain, str(t.service_file)))]


def _install_problems(spec: Spec) -> list[str]:
    t, problems = spec.target, []
    if not spec.data_dir.is_absolute():
        problems.append(f"data_dir in {spec.config_path} is relative ({spec.data_dir}): a service needs an "
                        "absolute path")
    elif not (spec.data_dir / "node.pem").exists():
        how = (f"as root: `pdp join TOKEN --data-dir {t.state_dir} --config {spec.config_path}`"
               if t.scope == "system" else "`pdp party init` or `pdp join TOKEN`")
        problems.append(f"no node identity in {spec.data_dir} yet, so the service would fail; make it first, {how}")
    if t.scope == "system":
        problems += _system_problems(spec)
    return problems


def _system_problems(spec: Spec) -> list[str]:
    """What keeps the ``pdp`` account from reaching the config and the code it runs."""
    problems = []
    if _under(spec.config_path, HOMES):
        problems.append(f"the system service runs as user {SYSTEM_USER}, which cannot read {spec.config_path} in a "
                        f"home directory: copy it out (`mkdir -p /etc/pdp && cp {spec.config_path} /etc/pdp/`) "
                        "and pass --config /etc/pdp/pdp.toml")
    for what, path in (("the config", spec.config_path), ("Python", spec.python), ("pdp", spec.package_dir)):
        closed = _closed_dir(path)
        if closed is not None:
            problems.append(f"user {SYSTEM_USER} cannot reach {what} at {path}: {closed} is closed to other "
                            "users (for a system service install pdp outside home directories, e.g. in a venv "
                            "under /opt/pdp)")
    return problems


def _closed_dir(path: Path) -> Path | None:
    """The first directory on the way to ``path`` (or to what its symlinks point at) that
    other users cannot enter, if any."""
    for target in (path, path.resolve()):
        for d in reversed(target.parents):
            if d.is_dir() and not d.stat().st_mode & stat.S_IXOTH:
                return d
    return None


def _user_exists(name: str) -> bool:
    import pwd  # Unix only, like the service managers (pdp itself also runs elsewhere)

    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def _readable_by_service(path: Path) -> bool:
    """Whether the ``pdp`` account can read ``path`` (by its mode bits; it may not exist yet)."""
    import grp
    import pwd

    st = path.stat()
    if st.st_mode & stat.S_IROTH:
        return True
    try:
        owner = pwd.getpwuid(st.st_uid).pw_name
    except KeyError:
        owner = ""
    try:
        group = grp.getgrgid(st.st_gid).gr_name
    except KeyError:
        group = ""
    return (owner == SYSTEM_USER and bool(st.st_mode & stat.S_IRUSR)) or \
        (group == SYSTEM_USER and bool(st.st_mode & stat.S_IRGRP))


def _after_install_notes(spec: Spec) -> list[str]:
    t = spec.target
    if t.manager == "launchd":
        return [f"{t.label} starts when you log in; logs: {t.log_file} (rotated), crashes: {t.stderr_log}",
                "check it with `pdp service status`"]
    notes = []
    if t.scope == "system" and spec.node.data_dir != spec.data_dir:
        notes.append(f"the system service keeps its data in {spec.data_dir} (StateDirectory=); the config's "
                     f"data_dir {spec.node.data_dir} is overridden with --data-dir")
    if t.scope == "user":
        if (Path("/var/lib/systemd/linger") / t.user).exists():
            notes.append(f"lingering is on for {t.user}: {t.unit} starts at boot, without a login")
        else:
            notes.append(f"{t.unit} starts when {t.user} logs in and stops after the last session ends; "
                         f"`loginctl enable-linger {t.user}` starts it at boot instead, without a login")
    journal = "journalctl --user" if t.scope == "user" else "journalctl"
    notes.append(f"it reports ready once it has joined the party: `pdp service status`; "
                 f"logs: `{journal} -u {t.unit}`")
    return notes


def plan_uninstall(target: Target, force: bool = False) -> Plan:
    """The steps that stop the service and remove pdp's files (an edited one only with
    ``force``); the node's data and a system service's account stay."""
    t, plan = target, Plan()
    path = t.on_disk(t.service_file)
    if not path.exists():
        plan.steps.append(Note(f"{t.name} is not installed (no {path}): nothing to do"))
        return plan
    if t.manager == "launchd":
        plan.steps.append(Run(("launchctl", "bootout", f"{t.launchd_domain}/{t.label}")))
    else:
        plan.steps.append(Run((*t.systemctl, "disable", "--now", t.unit)))
    try:
        pristine = is_pristine(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError):
        pristine = False
    if pristine or force:
        plan.steps.append(Remove(path, "" if pristine else "your edited copy, as --force asks"))
    else:
        plan.steps.append(Note(f"kept {path}: it was changed by hand (the service is stopped and disabled; "
                               "--force removes the file too)"))
    if t.manager == "systemd":
        plan.steps.append(Run((*t.systemctl, "daemon-reload")))
    plan.steps += [Note(n) for n in _after_uninstall_notes(t)]
    return plan


def _after_uninstall_notes(t: Target) -> list[str]:
    if t.manager == "launchd":
        return [f"kept the logs in {t.log_dir}"]
    if t.scope == "system":
        return [f"kept the {SYSTEM_USER} account and {t.state_dir} (the node's identity, journal and spool); "
                f"`userdel {SYSTEM_USER}` and `rm -r {t.state_dir}` remove them"]
    return ["kept the node's data dir (its identity, journal and spool)"]


# -- execution -------------------------------------------------------------------------------------


Runner = Callable[[Sequence[str]], subprocess.CompletedProcess[str]]
Mode = Literal["live", "dry-run", "files-only"]


def run_command(argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
    """The default :data:`Runner`: run ``argv``, capture its output."""
    try:
        return subprocess.run(list(argv), capture_output=True, text=True, timeout=120)
    except FileNotFoundError:
        raise ServiceError(f"`{argv[0]}` is not installed on this machine (needed for `{shlex.join(argv)}`)") \
            from None
    except subprocess.TimeoutExpired:
        raise ServiceError(f"`{shlex.join(argv)}` did not finish in 120 s") from None


def execute(plan: Plan, mode: Mode, out: Callable[[str], None], runner: Runner = run_command) -> None:
    """Carry out ``plan`` (``live``), print it (``dry-run``), or write its files and run
    nothing (``files-only``, for a staging root). Problems stop a live run before any step."""
    if plan.problems and mode == "live":
        raise ServiceError("; ".join(plan.problems))
    for problem in plan.problems:
        out(f"warning: {problem}")
    for step in plan.steps:
        _execute_step(step, mode, out, runner)


def _execute_step(step: Step, mode: Mode, out: Callable[[str], None], runner: Runner) -> None:
    dry = mode == "dry-run"
    if isinstance(step, Note):
        out(step.text)
    elif isinstance(step, MakeDir):
        out(f"would create directory {step.path}" if dry else f"created directory {step.path}")
        if not dry:
            step.path.mkdir(parents=True, exist_ok=True, mode=0o700)
    elif isinstance(step, Write):
        if dry:
            out(f"would write {step.path} ({step.why}, mode {step.mode:04o}):\n{step.content}(end of {step.path})")
        else:
            _write(step)
            out(f"wrote {step.path} ({step.why})")
    elif isinstance(step, Remove):
        out(f"would remove {step.path}" if dry else f"removed {step.path}" + (f" ({step.why})" if step.why else ""))
        if not dry:
            step.path.unlink(missing_ok=True)
    elif mode == "live":
        out(f"running: {shlex.join(step.argv)}")
        _check(step.argv, runner(step.argv))
    else:
        out(("would run: " if dry else "not run (--root): ") + shlex.join(step.argv))


def _write(step: Write) -> None:
    from pdp.fsutil import atomic_write

    step.path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(step.path, step.content.encode("utf-8"), mode=step.mode)


def _check(argv: Sequence[str], res: subprocess.CompletedProcess[str]) -> None:
    if res.returncode == 0:
        return
    detail = (res.stderr or res.stdout or "").strip()
    hint = ""
    if "Failed to connect to bus" in detail or "$DBUS_SESSION_BUS_ADDRESS" in detail:
        hint = (" (no systemd user manager is reachable: a login session starts one, `su` and `sudo` do not; "
                "for a machine's service use --system)")
    raise ServiceError(f"`{shlex.join(argv)}` failed (exit {res.returncode}): {detail or 'no output'}{hint}")


# -- status ------------------------------------------------------------------------------------------


SYSTEMD_PROPERTIES = ("LoadState", "ActiveState", "SubState", "UnitFileState", "MainPID", "NRestarts", "StatusText")


def file_state(target: Target, spec: Spec | None) -> str:
    """The service file's state in words: not installed, up to date, outdated, or edited."""
    path = target.on_disk(target.service_file)
    try:
        current = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return "not installed"
    except (OSError, UnicodeDecodeError) as exc:
        return f"unreadable ({exc})"
    if not is_pristine(current):
        return "changed by hand (kept by `pdp service install` unless --force)"
    if spec is None:
        return "as pdp wrote it"
    wanted = dict((p, c) for p, c, _ in desired_files(spec))[target.service_file]
    return "as pdp wrote it, up to date" if current == wanted else \
        "as pdp wrote it, but the config or pdp changed since: `pdp service install` updates it"


def service_status(target: Target, spec: Spec | None, runner: Runner = run_command) -> tuple[list[str], bool]:
    """Lines describing the installed service, and whether it is running."""
    lines = [f"file     {target.on_disk(target.service_file)}: {file_state(target, spec)}"]
    if target.root != Path("/"):
        return lines + ["service  not asked (--root: a staging dir)"], False
    if lines[0].endswith(": not installed"):
        return lines, False
    if target.manager == "launchd":
        more, running = _launchd_status(target, runner)
    else:
        more, running = _systemd_status(target, runner)
    return lines + more, running


def _systemd_status(t: Target, runner: Runner) -> tuple[list[str], bool]:
    argv = [*t.systemctl, "show", t.unit, "--property=" + ",".join(SYSTEMD_PROPERTIES)]
    try:
        res = runner(argv)
    except ServiceError as exc:
        return [f"service  unknown: {exc}"], False
    if res.returncode != 0:
        return [f"service  unknown: `{shlex.join(argv)}` failed: {(res.stderr or '').strip()}"], False
    props = {k: v for k, _, v in (line.partition("=") for line in res.stdout.splitlines())}
    if props.get("LoadState") == "not-found":
        return ["service  not loaded by systemd"], False
    active = props.get("ActiveState", "?")
    lines = [f"service  {active} ({props.get('SubState', '?')}), {props.get('UnitFileState') or 'not enabled'}"
             + (f", pid {props['MainPID']}" if props.get("MainPID", "0") != "0" else "")
             + f", restarts {props.get('NRestarts', '0')}"]
    if props.get("StatusText"):
        lines.append(f"node     {props['StatusText']}")
    journal = "journalctl --user" if t.scope == "user" else "journalctl"
    return lines + [f"logs     {journal} -u {t.unit}"], active == "active"


def _launchd_status(t: Target, runner: Runner) -> tuple[list[str], bool]:
    try:
        res = runner(["launchctl", "print", f"{t.launchd_domain}/{t.label}"])
    except ServiceError as exc:
        return [f"service  unknown: {exc}"], False
    if res.returncode != 0:
        return [f"service  not loaded ({t.label})"], False
    fields = {m.group(1): m.group(2) for m in re.finditer(r"^\s*([a-z][a-z ]*?) = (.*)$", res.stdout, re.MULTILINE)}
    state = fields.get("state", "?")
    lines = [f"service  {state}" + (f", pid {fields['pid']}" if "pid" in fields else "")
             + (f", last exit code {fields['last exit code']}" if "last exit code" in fields else ""),
             f"logs     {t.log_file}"]
    return lines, state == "running"


# -- the command line ------------------------------------------------------------------------------


service_app = typer.Typer(no_args_is_help=True, help="Run this machine's node as a service (systemd or launchd).")
_err = Console(stderr=True)

UserOpt = typer.Option(True, "--user/--system", help="a service of your user (default) or of the machine, "
                                                    "running as a dedicated pdp user (systemd only)")
ManagerOpt = typer.Option(None, help="systemd or launchd (default: launchd on macOS, systemd elsewhere)")
NameOpt = typer.Option(DEFAULT_NAME, help="the service's name (another one lets a machine run a second node)")
RootOpt = typer.Option(None, help="a staging dir: write the files under it and run no commands "
                                  "(for packaging and tests)")
DryOpt = typer.Option(False, "--dry-run", help="print every file it would write and every command it would run; "
                                               "change nothing")


def _target(user: bool, manager: Optional[str], name: str, root: Optional[Path], offline: bool) -> Target:
    """The target for the options, checked against this machine (``offline``: nothing is
    run here, so another platform's manager is fine)."""
    native: Manager = "launchd" if sys.platform == "darwin" else "systemd"
    chosen = manager or native
    if chosen not in ("systemd", "launchd"):
        raise ServiceError(f"--manager {chosen!r}: use systemd or launchd")
    if chosen != native or sys.platform not in ("linux", "darwin"):
        if not offline:
            where = {"systemd": "Linux", "launchd": "macOS"}[chosen]
            raise ServiceError(f"{chosen} is {where}'s service manager, and this machine runs {sys.platform}: "
                               "--dry-run shows what would be installed, --root DIR writes the files under DIR")
    scope: Scope = "user" if user else "system"
    return make_target("systemd" if chosen == "systemd" else "launchd", scope, name, root)


def _need_root(target: Target, mode: Mode, command: str) -> None:
    if target.scope == "system" and mode == "live" and os.geteuid() != 0:
        raise ServiceError(f"--system writes {target.service_file} and makes the {SYSTEM_USER} account: run it as "
                           f"root (`sudo {shlex.quote(sys.executable)} -m pdp service {command} --system ...`), or "
                           "see what it would do with --dry-run")


def _mode(dry_run: bool, root: Optional[Path]) -> Mode:
    return "dry-run" if dry_run else "files-only" if root is not None else "live"


def _fail(exc: PdpError) -> typer.Exit:
    _err.print(f"[red]error:[/red] {escape(str(exc))}", highlight=False, soft_wrap=True)
    return typer.Exit(1)


@service_app.command("install")
def install_cmd(
    user: bool = UserOpt,
    config: Optional[Path] = typer.Option(None, help="the node config the service runs with (default: $PDP_CONFIG, "
                                                     "else pdp.toml in the per-user config dir)"),
    dry_run: bool = DryOpt,
    force: bool = typer.Option(False, "--force", help="replace a service file that was changed by hand"),
    manager: Optional[str] = ManagerOpt,
    name: str = NameOpt,
    root: Optional[Path] = RootOpt,
) -> None:
    """Install this machine's node as a service and start it. Run again, it changes only what
    is out of date (and nothing if nothing is)."""
    mode = _mode(dry_run, root)
    try:
        target = _target(user, manager, name, root, offline=mode != "live")
        _need_root(target, mode, "install")
        plan = plan_install(load_spec(target, config), force, no_probe if root is not None else probe_command)
        execute(plan, mode, typer.echo)
    except PdpError as exc:
        raise _fail(exc) from None


@service_app.command("uninstall")
def uninstall_cmd(
    user: bool = UserOpt,
    dry_run: bool = DryOpt,
    force: bool = typer.Option(False, "--force", help="remove a service file that was changed by hand too"),
    manager: Optional[str] = ManagerOpt,
    name: str = NameOpt,
    root: Optional[Path] = RootOpt,
) -> None:
    """Stop the service and remove its files (the node's data stays)."""
    mode = _mode(dry_run, root)
    try:
        target = _target(user, manager, name, root, offline=mode != "live")
        _need_root(target, mode, "uninstall")
        execute(plan_uninstall(target, force), mode, typer.echo)
    except PdpError as exc:
        raise _fail(exc) from None


@service_app.command("status")
def status_cmd(
    user: bool = UserOpt,
    config: Optional[Path] = typer.Option(None, help="the node config to compare the installed file with "
                                                     "(default: as install finds it)"),
    manager: Optional[str] = ManagerOpt,
    name: str = NameOpt,
    root: Optional[Path] = RootOpt,
) -> None:
    """Is the service installed, up to date and running? Exit code 0 if it runs, 3 if not."""
    try:
        target = _target(user, manager, name, root, offline=root is not None)
        try:
            spec: Spec | None = load_spec(target, config)
        except PdpError:
            spec = None  # the file's state is still known, only not whether it is up to date
        lines, running = service_status(target, spec)
    except PdpError as exc:
        raise _fail(exc) from None
    typer.echo("\n".join(lines))
    raise typer.Exit(0 if running else 3)
