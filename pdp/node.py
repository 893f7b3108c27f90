"""The composition root: one ``pdp node`` process, the same on every machine.

Wires the pieces together — the Raft group (:mod:`pdp.consensus`), the data-plane server
and outbound connections (:mod:`pdp.transport`), the spool, the task pool — and runs the
three roles every node has: gateway for clients (:mod:`pdp.gateway`), worker
(:mod:`pdp.worker`), and, while it leads the Raft group, master (:mod:`pdp.master`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import signal
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from pdp import wire
from pdp.config import NodeConfig, load_key
from pdp.consensus import Consensus, ConsensusError
from pdp.errors import PdpError
from pdp.split import aligned_bounds
from pdp.spool import Spool
from pdp.streams import recv_file, send_file
from pdp.transport import Connection, Handler, Peers, Stream, accept, split_addr

log = logging.getLogger("pdp.node")

MAX_CONNECTIONS_PER_HOST = 64


def raft_addr_of(data_addr: str) -> str:
    """A core member's Raft address: its data port + 1 (documented convention)."""
    host, port = split_addr(data_addr)
    return f"{host}:{port + 1}"


def new_pool(workers: int) -> ProcessPoolExecutor:
    """The task pool: spawned processes (never forked from a threaded node) that exit when
    their node dies, even by SIGKILL (no orphaned task processes left holding memory)."""
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_die_with_parent, initargs=(os.getpid(),))


def _die_with_parent(parent: int) -> None:
    """In a task process: exit as soon as the node that started it is gone."""
    import threading

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(0)

    threading.Thread(target=watch, name="pdp-parent-watch", daemon=True).start()


def _warm() -> int:
    import pdp.jobs.wordcount  # noqa: F401  (import cost paid before the first task)

    return os.getpid()


class Changes:
    """Wakes waiters whenever the replicated state (or the Raft role) changes."""

    def __init__(self) -> None:
        self.version = 0
        self._event = asyncio.Event()

    def notify(self) -> None:
        self.version += 1
        self._event.set()
        self._event = asyncio.Event()

    async def wait(self, timeout: float) -> None:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._event.wait(), timeout)


class Node:
    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        self.name = config.name
        self.key = load_key(config.key_file)
        self.spool = Spool(config.data_dir / "spool")
        self.changes = Changes()
        self.peers = Peers(self.key, self.name)
        self.connections: set[Connection] = set()
        self.per_host: dict[str, int] = {}  # open data-plane connections (and handshakes) per peer host
        self.handlers: dict[str, Handler] = {}
        self.pool: ProcessPoolExecutor | None = None
        self.consensus: Consensus | None = None
        self.stopping = asyncio.Event()
        self.tasks: list[asyncio.Task[Any]] = []
        self.exit_code = 0

    # -- lifecycle --------------------------------------------------------------------

    async def run(self) -> int:
        from pdp.gateway import Gateway
        from pdp.master import Master
        from pdp.worker import Worker

        cfg = self.config
        self.pool = new_pool(cfg.cpus)
        peers = sorted({raft_addr_of(p) for p in cfg.peers} - {cfg.raft_addr})
        self.consensus = Consensus(
            cfg.raft_addr, peers, wire.derive(self.key, "raft").hex(), cfg.data_dir / "raft",
            cfg.listen.rsplit(":", 1)[0], self.changes.notify,
        )
        self.master, self.worker, self.gateway = Master(self), Worker(self), Gateway(self)
        self.handlers.update({"fetch_range": self._fetch_range, "fetch_file": self._fetch_file,
                              "store_file": self._store_file, "store_input": self._store_input})
        for part in (self.master, self.worker, self.gateway):
            self.handlers.update(part.handlers())
        host, port = split_addr(cfg.listen)
        server = await asyncio.start_server(self._on_connect, host, port)
        log.info("node %s listening on %s (advertised %s), raft %s, peers %s, %d task slot(s)",
                 self.name, cfg.listen, cfg.advertise_addr, cfg.raft_addr, ", ".join(peers) or "none", cfg.cpus)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)
        self.tasks = [
            asyncio.create_task(self._register()),
            asyncio.create_task(self.master.run()),
            *self.worker.start(),
            loop.run_in_executor(self.pool, _warm),  # type: ignore[list-item]
        ]
        try:
            await self.stopping.wait()
        finally:
            log.info("node %s shutting down", self.name)
            server.close()
            for task in self.tasks:
                task.cancel()
            for conn in list(self.connections):
                conn.close()
            self.peers.close()
            _stop_pool(self.pool)
            self.consensus.close()
        return self.exit_code

    async def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        host = str((writer.get_extra_info("peername") or ("?",))[0])
        if self.per_host.get(host, 0) >= MAX_CONNECTIONS_PER_HOST:
            log.warning("refused a connection from %s: already %d open from there", host, MAX_CONNECTIONS_PER_HOST)
            writer.close()
            return
        self.per_host[host] = self.per_host.get(host, 0) + 1
        conn = None
        try:
            conn = await accept(reader, writer, self.key, self.name, self.handlers)
            if conn is None or conn.reader_task is None:
                return
            self.connections.add(conn)
            await asyncio.shield(conn.reader_task)
        except asyncio.CancelledError:
            pass
        finally:
            if conn is not None:
                self.connections.discard(conn)
            self.per_host[host] -= 1
            if not self.per_host[host]:
                del self.per_host[host]

    async def _register(self) -> None:
        """Record this member (name, addresses, slots) in the replicated state."""
        cfg = self.config
        cmd = {"op": "member", "name": self.name, "data_addr": cfg.advertise_addr, "raft_addr": cfg.raft_addr,
               "cpus": cfg.cpus}
        while True:
            try:
                res = await self.propose({**cmd, "now": time.time()}, timeout=3.0)
            except ConsensusError:
                await asyncio.sleep(0.5)
                continue
            if not res.get("ok"):
                log.error("cannot join the party: %s", res.get("error"))
                self.exit_code = 1
                self.stopping.set()
                return
            log.info("member %s joined the party", self.name)
            return

    # -- shared helpers -----------------------------------------------------------------

    async def propose(self, cmd: dict[str, Any], timeout: float = 5.0) -> dict[str, Any]:
        assert self.consensus is not None
        return await self.consensus.propose(cmd, timeout)

    def master_addr(self) -> tuple[str, str] | None:
        """(name, data address) of the current master, if one has committed its term."""
        assert self.consensus is not None
        with self.consensus.reading() as state:
            master = dict(state.master)
        return (master["name"], master["data_addr"]) if master["name"] else None

    def member_addr(self, name: str) -> str:
        assert self.consensus is not None
        with self.consensus.reading() as state:
            member = state.members.get(name)
        if member is None:
            raise PdpError(f"unknown member {name!r}")
        return member.data_addr

    async def restart_pool(self, broken: ProcessPoolExecutor | None) -> None:
        """Replace a broken pool (a task process died) with a fresh one, once."""
        if broken is None or broken is not self.pool:
            return  # another slot already replaced it
        self.pool = new_pool(self.config.cpus)
        log.warning("task pool restarted after a task process died")
        await asyncio.to_thread(broken.shutdown, wait=True, cancel_futures=True)

    async def run_in_pool(self, fn: Any, *args: Any) -> Any:
        assert self.pool is not None
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    # -- data-plane handlers: serve spool bytes to peers --------------------------------

    async def _fetch_range(self, stream: Stream, hdr: dict[str, Any], _: bytes) -> None:
        """Send the line-aligned part of input bytes [start, end) that a map task owns."""
        path = self.spool.input(str(hdr["file"]))
        if not path.exists():
            raise PdpError(f"{self.name} does not hold input {hdr['file']}")
        size = path.stat().st_size
        with open(path, "rb") as f:
            a, b = aligned_bounds(f, int(hdr["start"]), int(hdr["end"]), size)
        await stream.send({"t": "range", "a": a, "b": b})
        await send_file(stream, path, a, b)

    async def _fetch_file(self, stream: Stream, hdr: dict[str, Any], _: bytes) -> None:
        path = self.spool.file(str(hdr["job"]), str(hdr["name"]))
        if not path.exists():
            raise PdpError(f"{self.name} has no {hdr['name']} for job {hdr['job']}")
        await send_file(stream, path)

    async def _store_file(self, stream: Stream, hdr: dict[str, Any], _: bytes) -> None:
        """Keep a copy of a job file another member sends (a result's second copy)."""
        size = await recv_file(stream, self.spool.file(str(hdr["job"]), str(hdr["name"])))
        await stream.send({"t": "stored", "size": size})

    async def _store_input(self, stream: Stream, hdr: dict[str, Any], _: bytes) -> None:
        """Keep the second copy of a job input, streamed by the gateway while it receives it."""
        size = await recv_file(stream, self.spool.input(str(hdr["file"])), timeout=60.0)
        await stream.send({"t": "stored", "size": size})

    # -- outbound file transfers ------------------------------------------------------------

    async def fetch_file(self, addr: str, job_id: str, name: str, dest: Path, timeout: float = 30.0) -> int:
        """Copy spool file ``name`` of ``job_id`` from the member at ``addr`` into ``dest``."""
        conn = await self.peers.get(addr)
        stream = conn.open_stream()
        try:
            await stream.send({"t": "fetch_file", "job": job_id, "name": name})
            return await recv_file(stream, dest, timeout)
        finally:
            stream.close()

    async def push_file(self, addr: str, header: dict[str, Any], path: Path, timeout: float = 30.0) -> int:
        """Send ``path`` to the member at ``addr`` under a store request; wait for its receipt."""
        conn = await self.peers.get(addr)
        stream = conn.open_stream()
        try:
            await stream.send(header)
            await send_file(stream, path)
            reply = await stream.recv(timeout)
            return int(reply.header.get("size", 0))
        finally:
            stream.close()


def _stop_pool(pool: ProcessPoolExecutor) -> None:
    """Stop the task processes now (a running task is abandoned: its lease runs out and
    another member runs it) and join the pool, so nothing is left half-closed at exit."""
    for proc in list((getattr(pool, "_processes", None) or {}).values()):
        proc.terminate()
    pool.shutdown(wait=True, cancel_futures=True)


def run_node(config: NodeConfig) -> int:
    """Run a node until SIGTERM/SIGINT (on uvloop where installed); returns the exit code."""
    node = Node(config)
    try:
        import uvloop
    except ImportError:  # pragma: no cover - platforms without uvloop
        return asyncio.run(node.run())
    return uvloop.run(node.run())
