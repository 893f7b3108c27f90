"""The composition root: one ``pdp node`` process, the same on every machine.

Wires the pieces together — the Raft group (:mod:`pdp.consensus`), the data-plane server
and outbound connections (:mod:`pdp.transport`), the spool, the task pool — and runs the
three roles every node has: gateway for clients (:mod:`pdp.gateway`), worker
(:mod:`pdp.worker`), and, while it leads the Raft group, master (:mod:`pdp.master`).

It also owns what outlives single requests: the owner's limits around every task call
(:func:`pdp.limits.run_limited`), reloading the config file on SIGHUP or ``pdp reload``,
and the spool janitor that deletes the files of jobs that have ended.
"""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import functools
import json
import logging
import multiprocessing
import os
import shutil
import signal
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace as dataclasses_replace
from pathlib import Path
from typing import Any

from pdp import mapoutput, wire
from pdp.config import NodeConfig, changed_settings, load_key
from pdp.consensus import Consensus, ConsensusError
from pdp.errors import AuthError, PdpError
from pdp.fsutil import atomic_write
from pdp.limits import format_size, run_limited
from pdp.state import ACTIVE
from pdp.split import aligned_bounds
from pdp.spool import Spool
from pdp.streams import recv_file, recv_parts, send_file, send_parts
from pdp.transport import Connection, Handler, Peers, Stream, accept, raft_addr_of, split_addr

log = logging.getLogger("pdp.node")

MAX_CONNECTIONS_PER_HOST = 64
MAX_FILES_PER_FETCH = 1024
JANITOR_EVERY = 10.0  # seconds between sweeps of the spool for files of ended jobs


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
        self._event = asyncio.Event()

    def notify(self) -> None:
        self._event.set()
        self._event = asyncio.Event()

    async def wait(self, timeout: float) -> None:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._event.wait(), timeout)


class Node:
    def __init__(self, config: NodeConfig, reload: Callable[[], NodeConfig] | None = None) -> None:
        self.config = config
        self._load_config = reload
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
        self.voter = True
        self.registered = asyncio.Event()
        self.seen_members: set[str] = set()  # names once admitted: only those can be cut off

    # -- lifecycle --------------------------------------------------------------------

    async def run(self) -> int:
        from pdp.gateway import Gateway
        from pdp.master import Master
        from pdp.worker import Worker

        cfg = self.config
        self.pool = new_pool(cfg.cpus)
        self.master, self.worker, self.gateway = Master(self), Worker(self), Gateway(self)
        self.handlers["party_info"] = self._party_info
        host, port = split_addr(cfg.listen)
        server = await asyncio.start_server(self._on_connect, host, port)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)
        loop.add_signal_handler(signal.SIGHUP, self._reload_on_signal)
        try:
            self.voter, core = await self._find_role()
        except PdpError as exc:
            log.error("cannot join the party: %s", exc)
            server.close()
            _stop_pool(self.pool)
            return 1
        (cfg.data_dir / "raft").mkdir(parents=True, exist_ok=True)
        os.chmod(cfg.data_dir / "raft", 0o700)  # the journal holds the party's state and invitations
        self.consensus = Consensus(
            cfg.raft_addr if self.voter else None, core, wire.derive(self.key, "raft").hex(), cfg.data_dir / "raft",
            cfg.listen.rsplit(":", 1)[0], self._on_change,
        )
        self.handlers.update({"fetch_range": self._fetch_range, "fetch_file": self._fetch_file,
                              "fetch_parts": self._fetch_parts,
                              "store_file": self._store_file, "store_input": self._store_input,
                              "become": self._become, "reload": self._reload})
        for part in (self.master, self.worker, self.gateway):
            clash = set(part.handlers()) & set(self.handlers)
            assert not clash, f"request types handled twice: {clash}"
            self.handlers.update(part.handlers())
        log.info("node %s listening on %s (advertised %s), %s, core %s, %d task slot(s)", self.name, cfg.listen,
                 cfg.advertise_addr, f"Raft voter at {cfg.raft_addr}" if self.voter else "worker (no Raft seat)",
                 ", ".join(core), cfg.cpus)
        self.tasks = [
            asyncio.create_task(self._register()),
            asyncio.create_task(self.master.run()),
            *self.worker.start(),
            asyncio.create_task(self._janitor()),
            loop.run_in_executor(self.pool, _warm),  # type: ignore[list-item]
        ]
        try:
            await self.stopping.wait()
        finally:
            log.info("node %s shutting down", self.name)
            server.close()
            for task in self.tasks:
                task.cancel()
            self.worker.stop()
            for conn in list(self.connections):
                conn.close()
            self.peers.close()
            _stop_pool(self.pool)
            if self.consensus is not None:
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
            conn = await accept(reader, writer, self.key, self.name, self.handlers, self._admit)
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

    async def _find_role(self) -> tuple[bool, list[str]]:
        """(voter?, the core's Raft addresses): from a running party if a peer answers,
        else from this node's last run, else a new party of this node and its peers."""
        cfg = self.config
        saved_file = cfg.data_dir / "party.json"
        saved = json.loads(saved_file.read_text()) if saved_file.exists() else None
        info = await self._ask_party()
        if info is not None:
            voter, core = cfg.raft_addr in info["core"], sorted(info["core"])
        elif saved is not None:
            voter, core = bool(saved["voter"]), sorted(saved["core"])
        else:
            voter, core = True, sorted({cfg.raft_addr} | {raft_addr_of(p) for p in cfg.peers})
        cfg.data_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(saved_file, json.dumps({"voter": voter, "core": core}).encode(), mode=0o600)
        return voter, core

    async def _ask_party(self, patience: float = 30.0) -> dict[str, Any] | None:
        """What a peer knows of the party: None if no peer runs one yet (a new party)."""
        deadline = time.monotonic() + patience
        while True:
            answers = []
            for addr in self.config.peers:
                try:
                    frame = await self.peers.request(addr, {"t": "party_info"}, timeout=3.0)
                    answers.append(frame.header)
                except AuthError:
                    raise
                except (PdpError, OSError) as exc:
                    log.debug("peer %s: %s", addr, exc)
            led = [a for a in answers if a.get("master") and a.get("core")]
            if led:
                return led[0]
            if not any(a.get("members") for a in answers) or time.monotonic() > deadline:
                return None  # nobody up, or everyone new: found the party
            await asyncio.sleep(0.5)  # a party exists but is electing: wait for its master

    async def _party_info(self, stream: Stream, hdr: dict[str, Any], _: bytes) -> None:
        c = self.consensus
        if c is None:
            await stream.send({"t": "party", "master": "", "core": [], "members": 0})
            return
        with c.reading() as state:
            master, members = state.master["name"], len(state.members)
        await stream.send({"t": "party", "master": master, "core": c.voters(), "members": members})

    async def _become(self, stream: Stream, hdr: dict[str, Any], _: bytes) -> None:
        """The master changed this member's Raft seat: follow the log as a voter or a worker."""
        if stream.conn.peer_name != self.master_addr_name():
            raise PdpError("only the master changes the core")
        await self.switch_role(bool(hdr["voter"]), sorted(str(a) for a in hdr["core"]))
        await stream.send({"t": "ok"})

    def master_addr_name(self) -> str:
        found = self.master_addr()
        return found[0] if found else ""

    async def switch_role(self, voter: bool, core: list[str]) -> None:
        """Replace the Raft member with a voter or a read-only follower (state comes from the log)."""
        cfg, old = self.config, self.consensus
        if old is None or voter == self.voter:
            return
        self.consensus = None
        await old.aclose()
        if not voter:  # a former voter's journal no longer matches the core: start clean
            for f in ("raft.journal", "raft.journal.meta", "raft.dump"):
                (cfg.data_dir / "raft" / f).unlink(missing_ok=True)
        self.voter = voter
        atomic_write(cfg.data_dir / "party.json", json.dumps({"voter": voter, "core": core}).encode(), mode=0o600)
        self.consensus = Consensus(cfg.raft_addr if voter else None, core, wire.derive(self.key, "raft").hex(),
                                   cfg.data_dir / "raft", cfg.listen.rsplit(":", 1)[0], self._on_change)
        log.warning("%s is now %s; core %s", self.name, "a Raft voter" if voter else "a worker (no Raft seat)",
                    ", ".join(core))
        self.registered.clear()
        self.tasks.append(asyncio.create_task(self._register()))

    def _admit(self, name: str, role: str) -> str | None:
        """Only invited nodes talk to members (clients need just the secret)."""
        c = self.consensus
        if role != "node" or c is None:
            return None
        with c.reading() as state:
            if state.admitted(name):
                return None
        return f"{name} is not invited to this party: a member must first run `pdp invite {name}`"

    def _on_change(self) -> None:
        self.changes.notify()
        self._enforce_invitations()

    def _enforce_invitations(self) -> None:
        """Cut off members whose invitation was withdrawn; stop if it was this one's."""
        c = self.consensus
        if c is None:
            return
        with c.reading() as state:
            self.seen_members |= set(state.invited) | set(state.members)
            withdrawn = {name for name in self.seen_members if not state.admitted(name)}
        for conn in list(self.connections):
            if conn.peer_role == "node" and conn.peer_name in withdrawn:
                log.warning("disconnected %s: its invitation was withdrawn", conn.peer_name)
                conn.close()
        if self.registered.is_set() and not self.voter and self.name in withdrawn:
            log.error("this node's invitation to the party was withdrawn; stopping")
            self.exit_code = 1
            self.stopping.set()

    async def _register(self) -> None:
        """Record this member (name, addresses, slots) in the replicated state."""
        cfg = self.config
        cmd = {"op": "member", "name": self.name, "data_addr": cfg.advertise_addr,
               "raft_addr": cfg.raft_addr if self.voter else "", "voter": self.voter, "cpus": cfg.cpus}
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
            log.info("member %s joined the party%s", self.name, "" if self.voter else " as a worker")
            self.registered.set()
            return

    # -- shared helpers -----------------------------------------------------------------

    async def propose(self, cmd: dict[str, Any], timeout: float = 5.0) -> dict[str, Any]:
        assert self.consensus is not None
        return await self.consensus.propose(cmd, timeout)

    def master_addr(self) -> tuple[str, str] | None:
        """(name, data address) of the current master, if one has committed its term."""
        if self.consensus is None:
            return None
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
        """Run a task function in the pool, under the owner's memory limit and niceness."""
        assert self.pool is not None
        cfg = self.config
        return await asyncio.get_running_loop().run_in_executor(self.pool, run_limited, cfg.memory, cfg.nice, fn,
                                                                *args)

    # -- the owner changes the config -----------------------------------------------------

    def reload(self) -> tuple[list[str], list[str]]:
        """Read the config file again and apply what can change live; returns (applied, need a restart)."""
        if self._load_config is None:
            return [], []
        try:
            new = self._load_config()
        except PdpError as exc:
            log.error("config not reloaded, keeping the running settings: %s", exc)
            raise
        live, restart = changed_settings(self.config, new)
        if restart:
            log.warning("changed setting(s) %s take effect after a restart of the node", ", ".join(restart))
            new = dataclasses_replace(new, **{k: getattr(self.config, k) for k in restart})
        old, self.config = self.config, new
        if new.cpus != old.cpus or new.nice < old.nice:  # a pool of the new size (and lower niceness)
            retired, self.pool = self.pool, new_pool(new.cpus)
            if retired is not None:
                retired.shutdown(wait=False)  # its running tasks finish first
            self.worker.resize()
        log.warning("config reloaded: %s", ", ".join(f"{k} = {getattr(new, k)!r}" for k in live) or "no changes")
        return live, restart

    def _reload_on_signal(self) -> None:
        with contextlib.suppress(PdpError):  # already logged; the node keeps its settings
            self.reload()

    async def _reload(self, stream: Stream, hdr: dict[str, Any], _: bytes) -> None:
        if self._load_config is None:
            raise PdpError(f"{self.name} was not started from a config file it can read again")
        live, restart = self.reload()
        await stream.send({"t": "reloaded", "applied": live, "restart": restart})

    # -- the spool janitor ----------------------------------------------------------------

    async def _janitor(self) -> None:
        """Delete the spool files of jobs that ended: everything but a done job's result."""
        cleaned: set[str] = set()
        while True:
            await asyncio.sleep(JANITOR_EVERY)
            if self.consensus is None:
                continue
            with self.consensus.reading() as state:
                ended = {j.id: (j.state, [i["file_id"] for i in j.inputs])
                         for j in state.jobs.values() if j.state not in ACTIVE and j.id not in cleaned}
            if ended:
                freed = await asyncio.to_thread(self._sweep, ended)
                cleaned |= set(ended)
                if freed:
                    log.info("spool: deleted %d file(s) of %d ended job(s)", freed, len(ended))

    def _sweep(self, ended: dict[str, tuple[str, list[str]]]) -> int:
        freed = 0
        for job_id, (state, inputs) in ended.items():
            for file_id in inputs:
                path = self.spool.input(file_id)
                if path.exists():
                    path.unlink(missing_ok=True)
                    freed += 1
            folder = self.spool.root / "jobs" / job_id
            if not folder.is_dir():
                continue
            for path in folder.iterdir():
                if state != "done" or path.name != "result":
                    if path.is_dir():
                        shutil.rmtree(path, ignore_errors=True)
                    else:
                        path.unlink(missing_ok=True)
                    freed += 1
            if state != "done":
                with contextlib.suppress(OSError):
                    folder.rmdir()
        return freed

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

    async def _fetch_parts(self, stream: Stream, hdr: dict[str, Any], _: bytes) -> None:
        """Send one reduce partition of several map outputs on one stream (for a reducer)."""
        maps = [int(m) for m in hdr["maps"]][:MAX_FILES_PER_FETCH]
        job_id, r = str(hdr["job"]), int(hdr["partition"])
        await send_parts(stream, [(m, functools.partial(mapoutput.read, str(self.spool.file(job_id, f"map-{m}")), r))
                                  for m in maps])

    async def _store_file(self, stream: Stream, hdr: dict[str, Any], _: bytes) -> None:
        """Keep a copy of a job file another member sends (a result's second copy)."""
        size = await recv_file(stream, self.spool.file(str(hdr["job"]), str(hdr["name"])))
        await stream.send({"t": "stored", "size": size})

    def spool_full(self, adding: int) -> str:
        """Why the spool cannot take ``adding`` more bytes under the owner's ``disk`` limit ("" if it can)."""
        limit = self.config.disk
        if not limit:
            return ""
        used = self.worker.sampler.spool_bytes(self.spool.root, fresh=True)  # inputs arrive fast: count now
        if used + adding <= limit:
            return ""
        return (f"{self.name}'s spool is full for this: it uses {format_size(used)} of disk = {format_size(limit)} "
                f"and {format_size(adding)} more were asked")

    async def _store_input(self, stream: Stream, hdr: dict[str, Any], _: bytes) -> None:
        """Keep the second copy of a job input, streamed by the gateway while it receives it."""
        full = self.spool_full(int(hdr.get("size", 0)))
        if full:
            raise PdpError(full)
        size = await recv_file(stream, self.spool.input(str(hdr["file"])), timeout=60.0)
        await stream.send({"t": "stored", "size": size})

    # -- outbound file transfers ------------------------------------------------------------

    async def fetch_file(self, addr: str, job_id: str, name: str, dest: Path, timeout: float = 30.0) -> int:
        """Copy spool file ``name`` of ``job_id`` from the member at ``addr`` into ``dest``."""
        conn = await self.peers.get(addr)
        stream = conn.open_stream()
        try:
            await stream.send({"t": "fetch_file", "job": job_id, "name": name})
            return await recv_file(stream, dest, timeout, durable=False)  # a reduce output: recomputable
        finally:
            stream.close()

    async def fetch_parts(self, addr: str, job_id: str, maps: list[int], r: int, dest: Path,
                          timeout: float = 30.0) -> list[int]:
        """Fetch partition ``r`` of the outputs of ``maps`` from the member at ``addr``,
        concatenated into ``dest``, in one request; returns the maps it did not have."""
        conn = await self.peers.get(addr)
        stream = conn.open_stream()
        try:
            await stream.send({"t": "fetch_parts", "job": job_id, "maps": maps, "partition": r})
            return await recv_parts(stream, dest, set(maps), timeout)
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


def run_node(config: NodeConfig, reload: Callable[[], NodeConfig] | None = None) -> int:
    """Run a node until SIGTERM/SIGINT (on uvloop where installed); returns the exit code.
    ``reload`` reads the settings again (on SIGHUP or ``pdp reload``)."""
    faulthandler.register(signal.SIGUSR1)  # `kill -USR1 PID` prints every thread's stack to the log
    node = Node(config, reload)
    try:
        import uvloop
    except ImportError:  # pragma: no cover - platforms without uvloop
        return asyncio.run(node.run())
    return uvloop.run(node.run())
