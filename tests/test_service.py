"""`pdp service`: the rendered systemd unit (checked by systemd-analyze verify) and launchd
plist (parsed by plistlib), install/uninstall against a staging root through the CLI
(idempotent, edits kept without --force, --dry-run exact and harmless), sd_notify over a
real AF_UNIX socket, a real node telling its service manager it joined, and its rotated
log file. Where a systemd user manager runs, a real user unit is installed and seen ready."""

from __future__ import annotations

import asyncio
import os
import plistlib
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pdp.cli import app
from pdp.config import NodeConfig
from pdp.identity import load_node_identity
from pdp.local import LocalParty, free_port_pair
from pdp.node import sdnotify
from pdp.node.limits import MiB
from pdp.service import (
    NODE_HEADROOM, SLOT_HEADROOM, Note, Run, ServiceError, Spec, Target, execute, is_pristine, make_target,
    memory_max, plan_install, plan_uninstall, plist_dict, render_plist, render_unit, stamp,
)

REPO = Path(__file__).resolve().parents[1]
PYTHON = Path(sys.executable).absolute()
needs_analyze = pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")


# -- helpers -------------------------------------------------------------------------------------


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A home of our own: the CLI's per-user paths (unit dir, LaunchAgents) land under it."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    monkeypatch.delenv("PDP_CONFIG", raising=False)
    return home


def write_node(where: Path, name: str = "n1", data_dir: Path | None = None, **settings: object) -> Path:
    """A node's config file and identity (what `pdp party init` leaves); returns the config."""
    data_dir = data_dir or where / "data"
    load_node_identity(data_dir, name)
    lines = ["[node]", f'name = "{name}"', 'listen = "127.0.0.1:17001"', f'data_dir = "{data_dir}"',
             *(f"{k} = {v!r}" if not isinstance(v, str) else f'{k} = "{v}"' for k, v in settings.items())]
    config = where / "node.toml"
    config.write_text("\n".join(lines) + "\n")
    return config


def spec(scope: str = "user", manager: str = "systemd", data_dir: Path = Path("/srv/pdp/data"),
         config: Path = Path("/etc/pdp/pdp.toml"), python: Path = Path("/opt/pdp/bin/python"),
         package_dir: Path = Path("/opt/pdp/lib"),
         **node: object) -> Spec:
    target = Target(manager, scope, user="ann", uid=1000, home=Path("/home/ann"))  # type: ignore[arg-type]
    return Spec(target, config, NodeConfig(name="n1", data_dir=data_dir, **node).validate(),  # type: ignore[arg-type]
                python=python, package_dir=package_dir)


def directives(unit: str) -> dict[str, list[str]]:
    """``Section.Key`` -> values, in order (comments and blank lines skipped)."""
    found: dict[str, list[str]] = {}
    section = ""
    for line in unit.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        found.setdefault(f"{section}.{key}", []).append(value)
    return found


def verify(unit_text: str, scope: str, tmp: Path) -> subprocess.CompletedProcess[str]:
    """``systemd-analyze [--user] verify`` of the unit text, as a file of a temp dir."""
    folder = tmp / f"verify-{scope}"
    folder.mkdir()
    path = folder / "pdp-node.service"
    path.write_text(unit_text)
    runtime = tmp / f"runtime-{scope}"
    runtime.mkdir(mode=0o700)
    env = {**os.environ, "XDG_RUNTIME_DIR": str(runtime), "SYSTEMD_LOG_COLOR": "0"}
    args = ["systemd-analyze", *(["--user"] if scope == "user" else []), "verify", "--man=no", str(path)]
    return subprocess.run(args, capture_output=True, text=True, env=env, timeout=60)


def invoke(*args: str) -> tuple[int, str, str]:
    """`pdp service ARGS` in-process; systemd unless the test names a manager (macOS too)."""
    res = CliRunner().invoke(app, ["service", *args, *([] if "--manager" in args else ["--manager", "systemd"])])
    return res.exit_code, res.stdout, res.stderr


def snapshot(root: Path) -> dict[str, tuple[int, int, bytes]]:
    """Every file under ``root``: (inode, mtime_ns, bytes), to see that nothing was touched."""
    return {str(p): (p.stat().st_ino, p.stat().st_mtime_ns, p.read_bytes()) for p in root.rglob("*") if p.is_file()}


class Recorder:
    """A :data:`pdp.service.Runner` that records the commands and says they succeeded."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, ...]] = []

    def __call__(self, argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
        self.calls.append(tuple(argv))
        return subprocess.CompletedProcess(list(argv), 0, "", "")


# -- templates ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("repo_copy, package_copy", [
    ("systemd/pdp-node.service.in", "pdp/templates/pdp-node.service.in"),
    ("launchd/org.pdp.node.plist.in", "pdp/templates/org.pdp.node.plist.in"),
])
def test_templates_in_the_package_are_the_repositorys(repo_copy: str, package_copy: str) -> None:
    assert (REPO / package_copy).read_text() == (REPO / repo_copy).read_text(), \
        f"copy {repo_copy} to {package_copy} (the package ships the copy)"


# -- the systemd unit ----------------------------------------------------------------------------------


@needs_analyze
@pytest.mark.parametrize("scope", ["user", "system"])
def test_rendered_unit_passes_systemd_analyze_verify(scope: str, tmp_path: Path) -> None:
    res = verify(render_unit(spec(scope, python=PYTHON, memory=512 * MiB, cpus=2)), scope, tmp_path)
    assert res.returncode == 0 and not res.stderr.strip() and not res.stdout.strip(), res.stderr + res.stdout


@needs_analyze
def test_unit_with_awkward_paths_passes_verify(tmp_path: Path) -> None:
    """Spaces, quotes, % (a specifier) and $ (a variable) in paths are escaped, not interpreted."""
    odd = tmp_path / 'my "pdp" 100% $HOME'
    unit = render_unit(spec(config=odd / "node.toml", data_dir=odd / "data", python=PYTHON))
    quoted = str(odd / "node.toml").replace('"', '\\"').replace("%", "%%").replace("$", "$$")
    assert f'--config "{quoted}"' in unit
    assert 'ReadWritePaths="-' + str(odd / "data").replace('"', '\\"').replace("%", "%%") + '"' in unit
    res = verify(unit, "user", tmp_path)
    assert res.returncode == 0 and not res.stderr.strip(), res.stderr


def test_unit_has_every_required_directive() -> None:
    d = directives(render_unit(spec(memory=1024 * MiB, cpus=2, nice=12)))
    expected = {
        "Service.Type": ["notify"], "Service.Restart": ["on-failure"], "Service.WatchdogSec": ["60s"],
        "Service.NoNewPrivileges": ["yes"], "Service.ProtectSystem": ["strict"], "Service.PrivateTmp": ["yes"],
        "Service.RestrictAddressFamilies": ["AF_UNIX AF_INET AF_INET6 AF_NETLINK"],
        "Service.SystemCallFilter": ["@system-service"], "Service.UMask": ["0077"],
        "Service.CPUQuota": ["200%"], "Service.Nice": ["12"], "Service.ProtectHome": ["yes"],
    }
    for key, value in expected.items():
        assert d.get(key) == value, key
    assert d["Service.ExecStart"] == ["/opt/pdp/bin/python -m pdp node --config /etc/pdp/pdp.toml"]
    assert d["Service.MemoryMax"] == [f"{2 * (1024 + 64) + 512}M"]


def test_user_and_system_units_differ_where_they_should() -> None:
    user, system = directives(render_unit(spec("user"))), directives(render_unit(spec("system")))
    assert user["Install.WantedBy"] == ["default.target"] and system["Install.WantedBy"] == ["multi-user.target"]
    assert system["Service.User"] == ["pdp"] and system["Service.Group"] == ["pdp"]
    assert system["Service.StateDirectory"] == ["pdp"] and "Service.User" not in user
    assert "Service.StateDirectory" not in user
    assert system["Service.ExecStart"][0].endswith("--data-dir /var/lib/pdp")
    assert user["Service.ReadWritePaths"] == ["-/srv/pdp/data"] and "Service.ReadWritePaths" not in system
    assert system["Unit.After"] == ["network-online.target"] and "Unit.After" not in user


def test_limits_map_from_the_config() -> None:
    node = NodeConfig(name="n", cpus=3, memory=1 << 30, nice=15).validate()
    assert memory_max(node) == 3 * ((1 << 30) + SLOT_HEADROOM) + NODE_HEADROOM
    d = directives(render_unit(spec(cpus=3, memory=1 << 30, nice=15)))
    assert d["Service.CPUQuota"] == ["300%"] and d["Service.Nice"] == ["15"]
    assert d["Service.MemoryMax"] == [f"{3 * (1024 + 64) + 512}M"]
    unlimited = render_unit(spec(cpus=1, memory=0))
    assert "Service.MemoryMax" not in directives(unlimited) and "no MemoryMax=" in unlimited


def test_sandbox_follows_where_the_files_are() -> None:
    in_home = directives(render_unit(spec(data_dir=Path("/home/ann/.local/share/pdp"))))
    assert in_home["Service.ProtectHome"] == ["read-only"]
    assert in_home["Service.ReadWritePaths"] == ["-/home/ann/.local/share/pdp"]
    venv_in_home = directives(render_unit(spec(python=Path("/home/ann/venv/bin/python"))))
    assert venv_in_home["Service.ProtectHome"] == ["read-only"]
    in_tmp = directives(render_unit(spec(data_dir=Path("/tmp/party/n1"))))
    assert in_tmp["Service.PrivateTmp"] == ["no"]  # a private /tmp would hide the data dir
    elsewhere = directives(render_unit(spec()))
    assert elsewhere["Service.ProtectHome"] == ["yes"] and elsewhere["Service.PrivateTmp"] == ["yes"]


def test_stamp_tells_pdps_files_from_edited_ones() -> None:
    text = stamp("[Unit]\nDescription=x\n", "# ", "")
    assert is_pristine(text)
    assert not is_pristine(text.replace("x", "y"))
    assert not is_pristine("[Unit]\nDescription=x\n")
    assert is_pristine(stamp("<plist/>\n", "<!-- ", " -->"))


# -- the launchd plist ----------------------------------------------------------------------------------


def test_plist_parses_and_has_the_keys() -> None:
    s = spec(manager="launchd", nice=7)
    text = render_plist(s)
    plist = plist_dict(text)
    assert plistlib.loads(text.encode()) == plist
    assert plist["Label"] == "org.pdp.node"
    assert plist["ProgramArguments"] == ["/opt/pdp/bin/python", "-m", "pdp", "node", "--config", "/etc/pdp/pdp.toml",
                                         "--log-file", "/home/ann/Library/Logs/pdp/pdp-node.log"]
    assert plist["RunAtLoad"] is True and plist["KeepAlive"] == {"SuccessfulExit": False}
    assert plist["ProcessType"] == "Background" and plist["LowPriorityIO"] is True and plist["Nice"] == 7
    assert plist["StandardErrorPath"] == "/home/ann/Library/Logs/pdp/pdp-node.stderr.log"
    assert is_pristine(text)


def test_plist_escapes_xml_in_paths() -> None:
    plist = plist_dict(render_plist(spec(manager="launchd", config=Path("/etc/a&b <c>/pdp.toml"))))
    assert "/etc/a&b <c>/pdp.toml" in plist["ProgramArguments"]


# -- install / uninstall through the CLI, into a staging root -------------------------------------------


def test_dry_run_prints_exactly_what_it_would_write_and_run(tmp_path: Path, home: Path) -> None:
    config = write_node(tmp_path)
    root = tmp_path / "root"
    root.mkdir()
    env = {**os.environ, "HOME": str(home)}
    env.pop("XDG_CONFIG_HOME", None)
    res = subprocess.run([sys.executable, "-m", "pdp", "service", "install", "--dry-run", "--root", str(root),
                          "--manager", "systemd", "--config", str(config)],
                         capture_output=True, text=True, env=env, timeout=60)
    assert res.returncode == 0, res.stderr
    target = make_target("systemd", "user", root=root)
    path = target.on_disk(target.service_file)
    from pdp.config import load_config
    unit = render_unit(Spec(target, config, load_config(config, {})))
    assert f"would write {path} (new file, mode 0644):\n{unit}(end of {path})\n" in res.stdout
    runs = [line for line in res.stdout.splitlines() if line.startswith("would run: ")]
    assert runs == ["would run: systemctl --user daemon-reload", "would run: systemctl --user enable pdp-node.service",
                    "would run: systemctl --user restart --no-block pdp-node.service"]
    assert list(root.iterdir()) == []  # nothing written


def test_install_is_idempotent(tmp_path: Path, home: Path) -> None:
    config = write_node(tmp_path, cpus=2)
    root = tmp_path / "root"
    code, out, err = invoke("install", "--root", str(root), "--config", str(config))
    assert code == 0, err
    target = make_target("systemd", "user", root=root)
    path = target.on_disk(target.service_file)
    assert f"wrote {path} (new file)" in out and "not run (--root): systemctl --user daemon-reload" in out
    assert is_pristine(path.read_text()) and oct(path.stat().st_mode & 0o777) == "0o644"
    before = snapshot(root)
    code, out, err = invoke("install", "--root", str(root), "--config", str(config))
    assert code == 0, err
    assert "nothing to write: every file is up to date" in out and f"unchanged: {path}" in out
    assert "wrote" not in out and "daemon-reload" not in out
    assert snapshot(root) == before


def user_unit_installed(tmp_path: Path, **node: object) -> tuple[Path, Path, Path]:
    """(node config, staging root, the unit file) after a first `install --root` of a user unit."""
    config = write_node(tmp_path, **node)
    root = tmp_path / "root"
    code, _, err = invoke("install", "--root", str(root), "--config", str(config))
    assert code == 0, err
    target = make_target("systemd", "user", root=root)
    return config, root, target.on_disk(target.service_file)


def test_a_changed_config_updates_pdps_own_unit(tmp_path: Path, home: Path) -> None:
    config, root, path = user_unit_installed(tmp_path, cpus=2)
    config.write_text(config.read_text().replace("cpus = 2", "cpus = 3"))
    code, out, _ = invoke("install", "--root", str(root), "--config", str(config))
    assert code == 0 and f"wrote {path} (update)" in out
    assert "CPUQuota=300%" in path.read_text()


def test_an_edited_unit_is_kept_without_force(tmp_path: Path, home: Path) -> None:
    config, root, path = user_unit_installed(tmp_path)
    edited = path.read_text().replace("RestartSec=5s", "RestartSec=30s")
    path.write_text(edited)
    code, out, err = invoke("install", "--root", str(root), "--config", str(config))
    assert code == 1 and "changed by hand" in err and "--force" in err
    assert path.read_text() == edited
    code, out, err = invoke("status", "--root", str(root), "--config", str(config))
    assert code == 3 and "changed by hand" in out
    code, out, err = invoke("install", "--root", str(root), "--config", str(config), "--force")
    assert code == 0, err
    assert "replace your edited copy (--force)" in out and "RestartSec=5s" in path.read_text()


def test_uninstall_is_idempotent_and_keeps_edits_without_force(tmp_path: Path, home: Path) -> None:
    config, root, path = user_unit_installed(tmp_path)
    code, out, _ = invoke("uninstall", "--root", str(root), "--dry-run")
    assert code == 0 and f"would remove {path}" in out and path.exists()
    code, out, _ = invoke("uninstall", "--root", str(root))
    assert code == 0 and f"removed {path}" in out and not path.exists()
    assert "not run (--root): systemctl --user disable --now pdp-node.service" in out
    code, out, _ = invoke("uninstall", "--root", str(root))
    assert code == 0 and "is not installed" in out and "nothing to do" in out
    assert invoke("install", "--root", str(root), "--config", str(config))[0] == 0
    path.write_text(path.read_text() + "Environment=MINE=1\n")
    code, out, _ = invoke("uninstall", "--root", str(root))
    assert code == 0 and f"kept {path}" in out and path.exists()
    code, out, _ = invoke("uninstall", "--root", str(root), "--force")
    assert code == 0 and not path.exists()


def test_system_install_into_a_staging_root(tmp_path: Path, home: Path) -> None:
    config = write_node(tmp_path)
    root = tmp_path / "root"
    code, out, err = invoke("install", "--system", "--root", str(root), "--config", str(config))
    assert code == 0, err
    unit = (root / "etc/systemd/system/pdp-node.service").read_text()
    assert "User=pdp" in unit and "StateDirectory=pdp" in unit
    assert 'u pdp - "pdp party member" /var/lib/pdp' in (root / "etc/sysusers.d/pdp.conf").read_text()
    assert "not run (--root): systemd-sysusers /etc/sysusers.d/pdp.conf" in out
    assert "warning: no node identity in /var/lib/pdp" in out  # the staging root cannot have it yet
    code, out, _ = invoke("uninstall", "--system", "--root", str(root))
    assert code == 0 and "kept the pdp account and /var/lib/pdp" in out


def test_launchd_install_into_a_staging_root(tmp_path: Path, home: Path) -> None:
    config = write_node(tmp_path, nice=5)
    root = tmp_path / "root"
    code, out, err = invoke("install", "--manager", "launchd", "--root", str(root), "--config", str(config))
    assert code == 0, err
    target = make_target("launchd", "user", root=root)
    plist = plist_dict(target.on_disk(target.service_file).read_text())
    assert plist["Nice"] == 5 and "--log-file" in plist["ProgramArguments"]
    assert target.on_disk(target.log_dir).is_dir()
    assert f"not run (--root): launchctl bootstrap gui/{os.getuid()} {target.service_file}" in out
    code, out, _ = invoke("install", "--manager", "launchd", "--root", str(root), "--config", str(config))
    assert code == 0 and "nothing to write" in out


@pytest.mark.skipif(sys.platform == "darwin", reason="launchd is this machine's manager")
def test_launchd_elsewhere_only_with_dry_run(tmp_path: Path, home: Path) -> None:
    config = write_node(tmp_path)
    code, _, err = invoke("install", "--manager", "launchd", "--config", str(config))
    assert code == 1 and "launchd is macOS's service manager" in err and "--dry-run" in err
    code, out, _ = invoke("install", "--manager", "launchd", "--config", str(config), "--dry-run")
    assert code == 0 and "would run: launchctl bootstrap" in out
    assert not (home / "Library").exists()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a system unit is installed live on Linux only")
def test_system_without_root_says_so(tmp_path: Path, home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = write_node(tmp_path)
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    code, _, err = invoke("install", "--system", "--config", str(config))
    assert code == 1 and "run it as root" in err and "--dry-run" in err


def test_missing_config_and_identity_are_clear_errors(tmp_path: Path, home: Path) -> None:
    code, _, err = invoke("install", "--dry-run", "--config", str(tmp_path / "nope.toml"))
    assert code == 1 and "no node config at" in err
    config = write_node(tmp_path)
    (tmp_path / "data" / "node.pem").unlink()
    root = tmp_path / "root"
    code, out, _ = invoke("install", "--dry-run", "--root", str(root), "--config", str(config))
    assert code == 0 and "warning: no node identity in" in out
    target = make_target("systemd", "user", root=root)
    from pdp.config import load_config
    plan = plan_install(Spec(target, config, load_config(config, {})))
    with pytest.raises(ServiceError, match="no node identity"):
        execute(plan, "live", lambda _: None, Recorder())
    assert not root.exists()


def test_live_plans_run_the_right_commands(tmp_path: Path) -> None:
    """The live runner's view: new unit -> reload, enable, restart; up to date and running ->
    nothing; up to date but stopped -> enable --now; uninstall -> disable, remove, reload."""
    data = tmp_path / "data"
    load_node_identity(data, "n1")
    target = Target("systemd", "user", root=tmp_path / "root", user="ann", uid=1000, home=Path("/home/ann"))
    s = Spec(target, tmp_path / "n1.toml", NodeConfig(name="n1", data_dir=data).validate())
    out: list[str] = []
    runner = Recorder()
    execute(plan_install(s, probe=lambda argv: True), "live", out.append, runner)
    assert runner.calls == [("systemctl", "--user", "daemon-reload"), ("systemctl", "--user", "enable", "pdp-node.service"),
                            ("systemctl", "--user", "restart", "--no-block", "pdp-node.service")]
    runner.calls.clear()
    plan = plan_install(s, probe=lambda argv: True)
    execute(plan, "live", out.append, runner)
    assert runner.calls == [] and Note("pdp-node.service is enabled and running: nothing to do") in plan.steps
    execute(plan_install(s, probe=lambda argv: False), "live", out.append, runner)
    assert runner.calls == [("systemctl", "--user", "enable", "--now", "--no-block", "pdp-node.service")]
    runner.calls.clear()
    execute(plan_uninstall(target), "live", out.append, runner)
    assert runner.calls == [("systemctl", "--user", "disable", "--now", "pdp-node.service"),
                            ("systemctl", "--user", "daemon-reload")]
    assert not target.on_disk(target.service_file).exists()


def test_launchd_live_plan_reloads_a_changed_agent(tmp_path: Path) -> None:
    target = Target("launchd", "user", root=tmp_path / "root", user="ann", uid=501, home=Path("/Users/ann"))
    s = Spec(target, tmp_path / "n1.toml", NodeConfig(name="n1", data_dir=tmp_path / "data", nice=3).validate())
    plan = plan_install(s, probe=lambda argv: True)  # an older agent is loaded
    assert [st.argv for st in plan.steps if isinstance(st, Run)] == [
        ("launchctl", "bootout", "gui/501/org.pdp.node"), ("launchctl", "enable", "gui/501/org.pdp.node"),
        ("launchctl", "bootstrap", "gui/501", "/Users/ann/Library/LaunchAgents/org.pdp.node.plist")]


# -- sd_notify -------------------------------------------------------------------------------------------


@pytest.fixture
def notify_socket(monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """A bound AF_UNIX datagram socket named in $NOTIFY_SOCKET (a short path: sun_path is small)."""
    folder = tempfile.mkdtemp(prefix="pdp-sd-", dir="/tmp")
    path = os.path.join(folder, "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(5)
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    yield sock
    sock.close()
    shutil.rmtree(folder)


def test_sdnotify_sends_the_datagrams(notify_socket: socket.socket) -> None:
    assert sdnotify.ready("member n1 joined\nthe party")
    assert notify_socket.recv(4096) == b"READY=1\nSTATUS=member n1 joined the party"
    assert sdnotify.watchdog() and notify_socket.recv(4096) == b"WATCHDOG=1"
    assert sdnotify.status("busy") and notify_socket.recv(4096) == b"STATUS=busy"
    assert sdnotify.extend_timeout(1.5) and notify_socket.recv(4096) == b"EXTEND_TIMEOUT_USEC=1500000"
    assert sdnotify.stopping() and notify_socket.recv(4096) == b"STOPPING=1"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="abstract sockets are Linux's")
def test_sdnotify_abstract_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"pdp-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert sdnotify.ready()
        assert sock.recv(4096) == b"READY=1"


def test_sdnotify_is_a_noop_without_a_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert not sdnotify.ready() and not sdnotify.watchdog() and not sdnotify.stopping()
    asyncio.run(asyncio.wait_for(sdnotify.keep_alive(asyncio.Event()), 1))  # returns at once
    monkeypatch.setenv("NOTIFY_SOCKET", "/nonexistent/notify")
    assert not sdnotify.ready()  # a socket nobody listens on: logged, never raised


def test_watchdog_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    monkeypatch.setenv("WATCHDOG_USEC", "60000000")
    assert sdnotify.watchdog_interval() == 30.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert sdnotify.watchdog_interval() == 30.0
    monkeypatch.setenv("WATCHDOG_PID", "1")  # someone else's watchdog
    assert sdnotify.watchdog_interval() is None
    monkeypatch.delenv("WATCHDOG_PID")
    monkeypatch.delenv("WATCHDOG_USEC")
    assert sdnotify.watchdog_interval() is None


def test_keep_alive_extends_the_start_then_pings_the_watchdog(notify_socket: socket.socket,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "100000")  # ping every 0.05 s
    monkeypatch.delenv("WATCHDOG_PID", raising=False)

    async def run() -> None:
        joined = asyncio.Event()
        task = asyncio.create_task(sdnotify.keep_alive(joined))
        await asyncio.sleep(0.12)
        joined.set()
        await asyncio.sleep(0.12)
        task.cancel()

    asyncio.run(run())
    notify_socket.settimeout(0.2)
    got = []
    with pytest.raises(socket.timeout):
        while True:
            got.append(notify_socket.recv(4096))
    assert got[0] == b"STATUS=joining the party"
    assert got[1] == b"EXTEND_TIMEOUT_USEC=150000" and got[-1] == b"WATCHDOG=1"
    first_ping = got.index(b"WATCHDOG=1")
    assert set(got[1:first_ping]) == {b"EXTEND_TIMEOUT_USEC=150000"} and set(got[first_ping:]) == {b"WATCHDOG=1"}


# -- a real node ----------------------------------------------------------------------------------------


def test_node_tells_its_service_manager_and_logs_to_a_rotated_file(tmp_path: Path, notify_socket: socket.socket) -> None:
    """`pdp node` under $NOTIFY_SOCKET: READY=1 once joined, watchdog pings, STOPPING=1 on
    SIGTERM; with --log-file its records go to the file, which rotates at 10 MiB."""
    log = tmp_path / "logs" / "node.log"
    log.parent.mkdir()
    log.write_bytes(b"x" * (10 * MiB - 10) + b"\n")  # the first record rolls it over
    party = LocalParty(tmp_path / "party", n=1, extra=("--log-file", str(log)),
                       env={"NOTIFY_SOCKET": os.environ["NOTIFY_SOCKET"], "WATCHDOG_USEC": "400000"})
    got: list[bytes] = []
    try:
        party.start()
        asyncio.run(party.wait_ready(60))
        deadline = time.monotonic() + 30
        while got.count(b"WATCHDOG=1") < 2 and time.monotonic() < deadline:
            got.append(notify_socket.recv(4096))
        party.signal(0, signal.SIGTERM)
        while time.monotonic() < deadline and not any(m.startswith(b"STOPPING=1") for m in got):
            got.append(notify_socket.recv(4096))
    finally:
        party.stop()
    assert b"READY=1\nSTATUS=member node1 joined the party" in got
    ready = got.index(b"READY=1\nSTATUS=member node1 joined the party")
    assert all(m.startswith(b"EXTEND_TIMEOUT_USEC=") or m.startswith(b"STATUS=") for m in got[:ready])
    assert b"WATCHDOG=1" in got[ready:] and got[-1] == b"STOPPING=1\nSTATUS=node node1 shutting down"
    assert Path(f"{log}.1").read_bytes().startswith(b"xxxx")  # rotated
    text = log.read_text()
    assert "member node1 joined the party" in text and "node node1 shutting down" in text
    assert "joined the party" not in (party.root / "node1.log").read_text()  # not on stderr


# -- a real systemd user manager --------------------------------------------------------------------------


def _no_user_manager() -> str:
    """Why a real user unit cannot be tried here ("" if it can)."""
    if not Path("/run/systemd/system").is_dir():
        return f"systemd is not running on this machine (PID 1 is {Path('/proc/1/comm').read_text().strip()!r})" \
            if Path("/proc/1/comm").exists() else "systemd is not running on this machine"
    res = subprocess.run(["systemctl", "--user", "show-environment"], capture_output=True, text=True, timeout=30)
    if res.returncode != 0:
        return f"no systemd user manager is reachable (`systemctl --user`: {res.stderr.strip()})"
    return ""


@pytest.mark.skipif(bool(_no_user_manager()), reason=_no_user_manager() or "-")
def test_user_unit_runs_and_reports_ready(tmp_path: Path) -> None:
    name = f"pdp-test-{uuid.uuid4().hex[:8]}"
    port = free_port_pair()
    party = tmp_path / "party"
    init = subprocess.run([sys.executable, "-m", "pdp", "party", "init", "--dir", str(party), "--name", "svc",
                           "--listen", f"127.0.0.1:{port}", "--key-file", str(party / "admin.cred")],
                          capture_output=True, text=True, timeout=60)
    assert init.returncode == 0, init.stderr
    config = party / "svc.toml"
    cli = [sys.executable, "-m", "pdp", "service"]
    try:
        res = subprocess.run([*cli, "install", "--name", name, "--config", str(config)], capture_output=True,
                             text=True, timeout=120)
        assert res.returncode == 0, res.stdout + res.stderr
        deadline, props = time.monotonic() + 90, ""
        while time.monotonic() < deadline:
            props = subprocess.run(["systemctl", "--user", "show", f"{name}.service", "--property=ActiveState,StatusText"],
                                   capture_output=True, text=True, timeout=30).stdout
            if "ActiveState=active" in props and "joined the party" in props:
                break
            assert "ActiveState=failed" not in props, props
            time.sleep(0.5)
        assert "ActiveState=active" in props and "joined the party" in props, props
        status = subprocess.run([*cli, "status", "--name", name, "--config", str(config)], capture_output=True,
                                text=True, timeout=60)
        assert status.returncode == 0 and "joined the party" in status.stdout, status.stdout
    finally:
        subprocess.run([*cli, "uninstall", "--name", name], capture_output=True, timeout=120)
        subprocess.run(["systemctl", "--user", "reset-failed", f"{name}.service"], capture_output=True, timeout=30)
