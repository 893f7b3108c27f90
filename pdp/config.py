"""Node settings: a frozen dataclass built from a TOML file and command-line flags.

Flags override the file; ``validate`` names the rule a setting breaks; ``changed_settings``
tells a reload which changes apply live and which need a restart. Also owns the per-user
default locations (``pdp node`` with no ``--config`` reads :func:`default_config_file`).
The owner's limits (memory, disk, nice, hours, ...) are parsed and applied by
:mod:`pdp.node.limits`; identities live in :mod:`pdp.identity`.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import socket
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import platformdirs

from pdp.errors import ConfigError
from pdp.node.limits import MiB, format_size, parse_hours, parse_size

DEFAULT_PORT = 7700
MIN_MEMORY = 32 * MiB
ON_PAUSE = ("finish", "hand_back")
# Settings a running node cannot change: a reload reports them and keeps the old values.
RESTART_ONLY = frozenset({"name", "listen", "advertise", "peers", "data_dir", "allow_code", "dashboard", "discover"})
GONE = {"key_file": "nodes have their own identity now (<data_dir>/node.pem, see `pdp id`): delete key_file",
        "raft_port": "Raft shares the one data port now: delete raft_port"}


def default_config_file() -> Path:
    env = os.environ.get("PDP_CONFIG")
    return Path(env) if env else Path(platformdirs.user_config_dir("pdp")) / "pdp.toml"


def default_data_dir() -> Path:
    return Path(platformdirs.user_data_dir("pdp"))


@dataclass(frozen=True)
class NodeConfig:
    name: str = field(default_factory=socket.gethostname)
    listen: str = f"0.0.0.0:{DEFAULT_PORT}"
    advertise: str = ""  # default: the listen address (127.0.0.1 if it listens on 0.0.0.0)
    peers: tuple[str, ...] = ()  # addresses of members to ask about the party when its cached view is gone
    data_dir: Path = field(default_factory=default_data_dir)
    cpus: int = field(default_factory=lambda: os.cpu_count() or 1)  # size of the task pool
    chunk_mb: float = 8.0  # map chunk size for jobs submitted through this node
    reduces: int = 0  # reduce tasks per job submitted here; 0 = one per task slot in the party, at most 16
    heartbeat: float = 0.5  # seconds between a worker's heartbeats to the master
    dead_after: float = 2.5  # a member silent this long is lost: its tasks run elsewhere
    stall_after: float = 30.0  # a task without progress this long runs again elsewhere
    max_failures: int = 10  # a task that fails this often fails its job
    # The owner's limits (pdp.node.limits): the machine's owner comes first.
    memory: int = 0  # per-task memory limit in bytes; 0 = no limit
    disk: int = 0  # most bytes the spool may use before the node pauses; 0 = no limit
    nice: int = 10  # niceness of the task processes, 0-19
    hours: tuple[str, ...] = ()  # when the node takes work, e.g. "mon-fri 18:00-08:00"; () = always
    max_load: float = 0.0  # pause while the owner's CPU use (fraction of all CPUs) is above this; 0 = never
    pause_on_battery: bool = True
    on_pause: str = "finish"  # "finish": running tasks finish; "hand_back": they run elsewhere at once
    backup_tasks: bool = True  # master: near a phase's end, a straggler gets a backup copy on a faster member
    allow_code: bool = False  # run users' job code (job files) here; built-in jobs always run
    dashboard: str = "127.0.0.1:7780"  # the web dashboard and /metrics (HOST:PORT, or "off"); HTTPS beyond loopback
    discover: bool = False  # announce this node on the LAN by mDNS and find members there (pdp.net.discovery)
    sort_mb: float = 0.0  # a task's sort buffer in MiB; 0 = 32, or a quarter of ``memory`` if that is less

    @property
    def sort_buffer_mb(self) -> float:
        if self.sort_mb:
            return self.sort_mb
        return min(32.0, self.memory / 4 / MiB) if self.memory else 32.0

    @property
    def data_port(self) -> int:
        return int(self.listen.rsplit(":", 1)[1])

    @property
    def advertise_addr(self) -> str:
        if self.advertise:
            return self.advertise
        host = self.listen.rsplit(":", 1)[0]
        return f"{'127.0.0.1' if host in ('0.0.0.0', '', '::') else host}:{self.data_port}"

    @property
    def raft_addr(self) -> str:
        """This node's Raft id: its advertised address (Raft shares the one port)."""
        return self.advertise_addr

    def validate(self) -> NodeConfig:
        for label, addr in [("listen", self.listen), ("advertise", self.advertise or self.listen), *(("peer", p) for p in self.peers)]:
            _check_addr(label, addr)
        if not self.name or len(self.name) > 64 or any(c.isspace() for c in self.name):
            raise ConfigError(f"name {self.name!r}: must be 1-64 characters without spaces")
        if not 1 <= self.cpus <= 1024:
            raise ConfigError(f"cpus = {self.cpus}: must be between 1 and 1024")
        if not 0.0625 <= self.chunk_mb <= 1024:
            raise ConfigError(f"chunk_mb = {self.chunk_mb}: must be between 0.0625 and 1024")
        if not 0 <= self.reduces <= 64:
            raise ConfigError(f"reduces = {self.reduces}: must be between 0 (one per task slot, at most 16) and 64")
        if not 0.05 <= self.heartbeat <= 60:
            raise ConfigError(f"heartbeat = {self.heartbeat}: must be between 0.05 and 60 seconds")
        if not 2 * self.heartbeat <= self.dead_after <= 600:
            raise ConfigError(f"dead_after = {self.dead_after}: must be at least twice heartbeat ({self.heartbeat}) "
                              "and at most 600 seconds")
        if not self.dead_after <= self.stall_after <= 86400:
            raise ConfigError(f"stall_after = {self.stall_after}: must be between dead_after and 86400 seconds")
        if not 1 <= self.max_failures <= 1000:
            raise ConfigError(f"max_failures = {self.max_failures}: must be between 1 and 1000")
        self._validate_limits()
        return self

    def _validate_limits(self) -> None:
        for key in ("memory", "disk", "nice"):
            if not _is_int(getattr(self, key)):
                raise ConfigError(f"{key} = {getattr(self, key)!r}: must be a whole number")
        if self.memory < 0 or 0 < self.memory < MIN_MEMORY:
            raise ConfigError(f"memory = {format_size(self.memory)}: must be 0 (no limit) or at least "
                              f"{format_size(MIN_MEMORY)}, since the task process's own interpreter counts toward it")
        if self.disk < 0:
            raise ConfigError(f"disk = {self.disk}: must be 0 (no limit) or a size such as \"20G\"")
        if not 0 <= self.nice <= 19:
            raise ConfigError(f"nice = {self.nice}: must be between 0 (normal priority) and 19 (lowest)")
        if not isinstance(self.hours, tuple):
            raise ConfigError(f"hours = {self.hours!r}: must be a list of rules such as [\"mon-fri 18:00-08:00\"]")
        parse_hours(self.hours)
        if isinstance(self.max_load, bool) or not isinstance(self.max_load, (int, float)) \
                or not 0 <= self.max_load <= 1:
            raise ConfigError(f"max_load = {self.max_load!r}: must be a fraction of all CPUs between 0 "
                              "(never pause for load) and 1")
        if isinstance(self.sort_mb, bool) or not isinstance(self.sort_mb, (int, float)) or not 0 <= self.sort_mb <= 65536:
            raise ConfigError(f"sort_mb = {self.sort_mb!r}: must be a number of MiB (0: 32, or a quarter of memory)")
        if self.memory and self.sort_mb * MiB > self.memory / 2:
            raise ConfigError(f"sort_mb = {self.sort_mb}: must be at most half of memory ({format_size(self.memory)})")
        dashboard_address(self.dashboard)
        for key in ("pause_on_battery", "backup_tasks", "allow_code", "discover"):
            if not isinstance(getattr(self, key), bool):
                raise ConfigError(f"{key} = {getattr(self, key)!r}: must be true or false")
        if self.on_pause not in ON_PAUSE:
            raise ConfigError(f"on_pause = {self.on_pause!r}: must be \"finish\" (running tasks finish, no new "
                              "ones start) or \"hand_back\" (running tasks go to other members at once)")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_addr(label: str, addr: str) -> None:
    host, _, port = addr.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{label} address {addr!r}: expected HOST:PORT")


_FIELDS = {f.name: f for f in dataclasses.fields(NodeConfig)}


def dashboard_address(addr: Any) -> tuple[str, int] | None:
    """(host, port) the dashboard listens on, or None for ``off``; ConfigError for a bad one.
    Beyond loopback it is HTTPS that asks every client for a party identity's certificate
    (:func:`dashboard_is_private`)."""
    if not isinstance(addr, str):
        raise ConfigError(f"dashboard = {addr!r}: give HOST:PORT or off")
    if addr.strip().lower() == "off":
        return None
    host, sep, port = addr.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"dashboard = {addr!r}: give HOST:PORT (for example 127.0.0.1:7780) or off")
    return host, int(port)


def dashboard_is_private(host: str) -> bool:
    """Whether a dashboard on ``host`` is reachable from this machine only (plain HTTP, no
    credential); anything else is served over mutual TLS to the party's identities."""
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def load_config(path: Path | None, overrides: dict[str, Any]) -> NodeConfig:
    """Read ``path`` (TOML, optional), apply non-None ``overrides``, validate.

    Overrides are written as in the file: ``memory``/``disk`` as MiB or a size string
    ("2G"), ``hours`` as a list of rules (or one rule as a string).
    """
    values: dict[str, Any] = {}
    if path is not None:
        try:
            values = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
        values = values.get("node", values)
    values.update({k: v for k, v in overrides.items() if v is not None and v != ()})
    gone = sorted(set(values) & set(GONE))
    if gone:
        raise ConfigError("; ".join(f"setting {k}: {GONE[k]}" for k in gone))
    unknown = sorted(set(values) - set(_FIELDS))
    if unknown:
        raise ConfigError(f"unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(_FIELDS))}")
    if "data_dir" in values:
        values["data_dir"] = Path(values["data_dir"]).expanduser()
    if "peers" in values:
        values["peers"] = tuple(values["peers"])
    _convert_limits(values)
    try:
        return NodeConfig(**values).validate()
    except TypeError as exc:
        raise ConfigError(f"bad setting: {exc}") from None


def _convert_limits(values: dict[str, Any]) -> None:
    """TOML forms of the owner's limits -> NodeConfig values (sizes in bytes, tuples, floats)."""
    for key in ("memory", "disk"):
        if key in values:
            try:
                values[key] = parse_size(values[key])
            except ConfigError as exc:
                raise ConfigError(f"{key} = {exc}") from None
    if "hours" in values:
        hours = values["hours"]
        if isinstance(hours, str | list):
            values["hours"] = (hours,) if isinstance(hours, str) else tuple(hours)
    if _is_int(values.get("max_load")):
        values["max_load"] = float(values["max_load"])


def changed_settings(old: NodeConfig, new: NodeConfig) -> tuple[list[str], list[str]]:
    """The settings that differ: (those a running node applies live, those that need a restart)."""
    changed = [f.name for f in dataclasses.fields(NodeConfig) if getattr(old, f.name) != getattr(new, f.name)]
    return [k for k in changed if k not in RESTART_ONLY], [k for k in changed if k in RESTART_ONLY]
