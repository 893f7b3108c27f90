"""Node settings: a frozen dataclass built from a TOML file and command-line flags.

Flags override the file; ``validate`` names the rule a setting breaks. Also owns the party
secret file (32 random bytes, hex, mode 0600) and the per-user default locations.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import stat
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import platformdirs

from pdp import wire
from pdp.errors import ConfigError

DEFAULT_PORT = 7700


def default_key_file() -> Path:
    env = os.environ.get("PDP_KEY_FILE")
    return Path(env) if env else Path(platformdirs.user_config_dir("pdp")) / "party.key"


def default_data_dir() -> Path:
    return Path(platformdirs.user_data_dir("pdp"))


@dataclass(frozen=True)
class NodeConfig:
    name: str = field(default_factory=socket.gethostname)
    listen: str = f"0.0.0.0:{DEFAULT_PORT}"
    advertise: str = ""  # default: the listen address (127.0.0.1 if it listens on 0.0.0.0)
    raft_port: int = 0  # default: data port + 1
    peers: tuple[str, ...] = ()  # data-plane addresses of the other core members
    data_dir: Path = field(default_factory=default_data_dir)
    key_file: Path = field(default_factory=default_key_file)
    cpus: int = field(default_factory=lambda: os.cpu_count() or 1)  # size of the task pool
    chunk_mb: float = 8.0  # map chunk size for jobs submitted through this node
    reduces: int = 0  # reduce tasks per job submitted here; 0 = one per task slot in the party, at most 16
    heartbeat: float = 0.5  # seconds between a worker's heartbeats to the master
    dead_after: float = 2.5  # a member silent this long is lost: its tasks run elsewhere
    stall_after: float = 30.0  # a task without progress this long runs again elsewhere
    max_failures: int = 10  # a task that fails this often fails its job

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
        """The Raft address peers dial: the advertised host, the Raft port."""
        return f"{self.advertise_addr.rsplit(':', 1)[0]}:{self.raft_port or self.data_port + 1}"

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
        if self.raft_port and not 0 < self.raft_port < 65536:
            raise ConfigError(f"raft_port = {self.raft_port}: not a TCP port")
        return self


def _check_addr(label: str, addr: str) -> None:
    host, _, port = addr.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65535:
        raise ConfigError(f"{label} address {addr!r}: expected HOST:PORT with a port below 65535 (the Raft port is PORT+1)")


_FIELDS = {f.name: f for f in dataclasses.fields(NodeConfig)}


def load_config(path: Path | None, overrides: dict[str, Any]) -> NodeConfig:
    """Read ``path`` (TOML, optional), apply non-None ``overrides``, validate."""
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
    unknown = sorted(set(values) - set(_FIELDS))
    if unknown:
        raise ConfigError(f"unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(_FIELDS))}")
    for key in ("data_dir", "key_file"):
        if key in values:
            values[key] = Path(values[key]).expanduser()
    if "peers" in values:
        values["peers"] = tuple(values["peers"])
    try:
        return NodeConfig(**values).validate()
    except TypeError as exc:
        raise ConfigError(f"bad setting: {exc}") from None


# -- the party secret -------------------------------------------------------------------


def write_key(path: Path, key: bytes | None = None, force: bool = False) -> bytes:
    """Create a party secret file (mode 0600); refuse to overwrite one unless ``force``."""
    key = key or wire.new_key()
    if path.exists() and not force:
        raise ConfigError(f"{path} already exists; pass --force to replace the party secret")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key.hex() + "\n")
    os.chmod(path, 0o600)
    return key


def load_key(path: Path) -> bytes:
    """Read the party secret, with a message that says how to get one."""
    try:
        text = path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        raise ConfigError(
            f"no party secret at {path}: run `pdp party init` to start a party, or copy the party's "
            "key file here (or pass --key-file / set PDP_KEY_FILE)"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read the party secret {path}: {exc}") from None
    try:
        key = bytes.fromhex(text)
    except ValueError:
        raise ConfigError(f"{path} is not a pdp key file (expected 64 hex digits)") from None
    if len(key) < 16:
        raise ConfigError(f"{path} holds a {len(key)}-byte key; a party secret has 32 bytes")
    if os.name == "posix" and path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(f"{path} is readable by other users; run: chmod 600 {path}")
    return key
