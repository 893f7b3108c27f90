"""A party of real ``pdp node`` processes on 127.0.0.1, for the demo, the tests and benchmarks.

The party is founded as a script would (the README's "a local party" commands do the
same through the CLI): every founding node gets its own identity and data dir under
``root``, the first admin's credential is ``root/admin.cred`` (more users with ``users``),
every node its config ``root/<name>.toml`` and its log ``root/<name>.log``. Ports are
picked free (one port per node: data and Raft share it); teardown is by PID.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from pdp.client import Client
from pdp.errors import PdpError
from pdp.identity import Credential, load_credential, load_node_identity, new_credential
from pdp.partyfile import FILE, PartyFile, found, record


def free_port_pair() -> int:
    """A port P such that P and P+1 are both free on 127.0.0.1 right now (one would do:
    pdp listens on P alone; the spare keeps neighbouring parties' ports apart).

    Taken below the kernel's ephemeral range: a port from that range can meanwhile become
    the source port of some outgoing connection (a Raft link between the other nodes, say)
    and the node that was to listen on it could never bind it."""
    low, high = _ephemeral_range()
    candidates = range(10000, low - 1) if low > 12000 else range(high + 1, 65534)
    for _ in range(500):
        port = random.choice(candidates)
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 1))
        except OSError:
            continue
        return port
    raise PdpError("no free pair of TCP ports on 127.0.0.1")


def free_ports(k: int) -> list[int]:
    """``k`` distinct ports free on 127.0.0.1 right now, from the same range (and for the same
    reason) as :func:`free_port_pair`."""
    ports: set[int] = set()
    while len(ports) < k:
        ports.add(free_port_pair())
    return sorted(ports)


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 49152, 65535  # the IANA range (macOS and others)


class LocalParty:
    def __init__(
        self,
        root: Path,
        n: int = 3,
        cpus: int = 1,
        extra: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
        settings: dict[str, Any] | None = None,
        node_settings: dict[int, dict[str, Any]] | None = None,
        users: tuple[str, ...] = (),
    ) -> None:
        self.root = root
        self.n = n
        self.cpus = cpus
        self.extra = extra
        self.env = {**os.environ, **(env or {})}
        self.settings = settings or {}
        self.node_settings = node_settings or {}  # node index -> settings of that node only
        self.key_file = root / "admin.cred"
        self.users = users
        self.names = [f"node{i + 1}" for i in range(n)]
        self.ports: list[int] = []
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    @property
    def key(self) -> Credential:
        """The admin's credential (what `pdp party init` makes for the founder)."""
        return load_credential(self.key_file)

    def cred(self, user: str) -> Credential:
        """The credential of ``user`` (one of ``users``, or "admin")."""
        return load_credential(self.root / f"{user}.cred")

    def found(self) -> None:
        """Identities, party files and credentials of a new party of the first ``n`` nodes."""
        nodes = [(load_node_identity(self.root / name, name), self.root / name, self.addr(i))
                 for i, name in enumerate(self.names[:self.n])]
        admin = found(nodes, "admin", self.key_file)
        extra = [new_credential(self.root / f"{u}.cred", u, admin.pins, addrs=admin.addrs) for u in self.users]
        for _, data_dir, _ in nodes:
            pf = PartyFile.load(data_dir)
            pf.known.update({c.identity.fp: record(c.identity) for c in extra})
            pf.save()

    def addr(self, i: int) -> str:
        return f"127.0.0.1:{self.ports[i]}"

    def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        while len(self.ports) < self.n:
            port = free_port_pair()
            if all(abs(port - p) > 1 for p in self.ports):
                self.ports.append(port)
        if not self.key_file.exists():
            self.found()
        for i in range(self.n):
            self.start_node(i)

    def add_node(self, name: str, peers: list[int], token: str | None = None) -> int:
        """Start one more node that names only ``peers`` (indexes); returns its index.

        With ``token`` (from `pdp invite NAME`) it joins first (`pdp join TOKEN`), as a new
        machine would. Without, it is a stranger: its own new identity and a copy of a
        member's party file (everything a member knows, but no invitation)."""
        port = free_port_pair()
        while any(abs(port - p) <= 1 for p in self.ports):
            port = free_port_pair()
        self.ports.append(port)
        self.names.append(name)
        i = len(self.names) - 1
        data_dir = self.root / name
        if token is not None:
            res = subprocess.run([sys.executable, "-m", "pdp", "join", token, "--data-dir", str(data_dir),
                                  "--listen", self.addr(i), "--config", str(self.config_path(i))],
                                 capture_output=True, text=True, env=self.env, timeout=60)
            if res.returncode != 0:
                raise PdpError(f"pdp join failed: {res.stderr.strip()}")
        else:
            load_node_identity(data_dir, name)
            pf = PartyFile.load(self.root / self.names[peers[0]])
            PartyFile(data_dir / FILE, False, pf.core, pf.known).save()
        self.start_node(i, peers)
        return i

    def start_node(self, i: int, peers: list[int] | None = None) -> None:
        name = self.names[i]
        peers = [j for j in range(self.n) if j != i] if peers is None else peers
        settings = {"cpus": self.cpus, "dashboard": "off", **self.settings, **self.node_settings.get(i, {})}
        self.write_config(i, settings)
        args = [sys.executable, "-m", "pdp", "node", "--name", name, "--listen", self.addr(i),
                "--data-dir", str(self.root / name),
                "--config", str(self.config_path(i)), *[a for j in peers for a in ("--peer", self.addr(j))],
                *self.extra]
        log = open(self.root / f"{name}.log", "ab")
        self.procs[name] = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            env=self.env)
        log.close()

    def config_path(self, i: int) -> Path:
        return self.root / f"{self.names[i]}.toml"

    def write_config(self, i: int, settings: dict[str, Any]) -> None:
        """Write node i's settings file (the node reads it at start and on SIGHUP)."""
        lines = ["[node]", *(f"{k} = {_toml(v)}" for k, v in settings.items())]
        self.config_path(i).write_text("\n".join(lines) + "\n")

    def pid(self, i: int) -> int:
        return self.procs[self.names[i]].pid

    def alive(self, i: int) -> bool:
        proc = self.procs.get(self.names[i])
        return proc is not None and proc.poll() is None

    def kill(self, i: int) -> None:
        """SIGKILL node i and reap it."""
        proc = self.procs[self.names[i]]
        if proc.poll() is None:
            proc.kill()
        proc.wait()

    def signal(self, i: int, sig: int) -> None:
        proc = self.procs.get(self.names[i])
        if proc is not None and proc.poll() is None:
            os.kill(proc.pid, sig)

    async def status(self, i: int) -> dict[str, Any]:
        async with Client(self.addr(i), self.key) as c:
            return await c.call("status")

    async def wait_ready(self, timeout: float = 30.0) -> dict[str, Any]:
        """Until every node names the same leader and sees every member; returns a status."""
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            self._check_alive()
            try:
                views = [await self.status(i) for i in range(self.n)]
                leaders = {v["leader"] for v in views}
                beating = all(m["heartbeat_age"] is not None for v in views for m in v["members"])
                if len(leaders) == 1 and None not in leaders and beating and all(len(v["members"]) >= self.n for v in views):
                    return views[0]
                last = [(v["node"], v["leader"], len(v["members"])) for v in views]
            except (PdpError, OSError) as exc:
                last = exc
            await asyncio.sleep(0.1)
        raise PdpError(f"the local party did not become ready in {timeout:g} s (last view: {last}); logs in {self.root}")

    def _check_alive(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None and proc.returncode != -signal.SIGKILL:
                tail = (self.root / f"{name}.log").read_text(errors="replace")[-2000:]
                raise PdpError(f"{name} exited with code {proc.returncode}:\n{tail}")

    def stop(self, timeout: float = 10.0) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for proc in self.procs.values():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def __enter__(self) -> LocalParty:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _toml(value: Any) -> str:
    """A TOML literal for the simple values node settings take."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(value)
