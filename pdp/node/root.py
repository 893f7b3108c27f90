"""The composition root: one ``pdp node`` process, the same on every machine.

Wires the pieces together — the Raft group (:mod:`pdp.raft.consensus`), the data-plane server
and outbound connections (:mod:`pdp.net.transport`), the spool, the task pool — and runs the
three roles every node has: gateway for clients (:mod:`pdp.node.gateway`), worker
(:mod:`pdp.node.worker`), and, while it leads the Raft group, master (:mod:`pdp.node.master`).

Who may call what is decided here for every connection: the peer's proven certificate is
looked up in the replicated identities (:meth:`Node.resolve`, :mod:`pdp.core.authz`); the
listener's trust store is rebuilt when they change, and connections of revoked identities
are closed at once. Raft travels over the same port (:mod:`pdp.raft.raftlink`); proposals from
members that do not lead reach the master over a ``propose`` request it authorizes.

It also owns what outlives single requests: the owner's limits around every task call
(:func:`pdp.node.limits.run_limited`), reloading the config file on SIGHUP or ``pdp reload``,
and the spool janitor that deletes the files of jobs that have ended.
"""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import functools
import logging
import multiprocessing
import os
import shutil
import signal
import ssl
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace as dataclasses_replace
from pathlib import Path
from typing import Any

import msgpack

from pdp.core import authz
from pdp.net import tls
from pdp.jobs import mapoutput
from pdp.config import NodeConfig, changed_settings
from pdp.raft.consensus import Consensus, ConsensusError
from pdp.errors import AuthError, NotMaster, PdpError
from pdp.fsutil import sums_path, check_range, check_sha256
from pdp.node import sdnotify
from pdp.node.limits import format_size, run_limited
from pdp.core.state import ACTIVE
from pdp.core.split import aligned_bounds
from pdp.node.spool import Spool
from pdp.net.streams import recv_file, recv_parts, send_file, send_parts
from pdp.identity import load_node_identity, token_hash, verify
from pdp.partyfile import PartyFile
from pdp.raft.raftlink import RaftLink
from pdp.net.transport import ANONYMOUS, Connection, Handler, Peer, Peers, Stream, accept, split_addr

log = logging.getLogger("pdp.node")

MAX_CONNECTIONS_PER_HOST = 64
MAX_CONNECTIONS = 1024  # open connections in all
# what a member that does not lead may ask the master to commit (orders come from the master alone)
FORWARDABLE = frozenset({"member", "submit", "cancel", "token", "withdraw", "join", "revoke", "rekey", "leave",
                         "add_holder"})
OWN_NAME_OPS = frozenset({"member", "leave"})  # ... of these only about the asking member itself
# ... and these only with the signature of who asked (a relaying member cannot forge them): op -> request
SIGNED_OPS = {"token": "invite", "withdraw": "withdraw", "revoke": "uninvite", "rekey": "rekey"}
MAX_FILES_PER_FETCH = 1024
MAX_INPUT = 1 << 40  # bytes of one input copy a member stores (the state's cap too)
MAX_RESULT = 1 << 40
JANITOR_EVERY = 10.0  # seconds between sweeps of the spool for files of ended jobs


def new_pool(workers: int) -> ProcessPoolExecutor:
    """The task pool: spawned processes (never forked from a threaded node) that exit when
    their node dies, even by SIGKILL (no orphaned task processes left holding memory).
    numpy's BLAS in them keeps to one thread: the pool already has a process per slot, and
    each BLAS thread would reserve its own buffers under the owner's ``memory`` limit."""
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, "1")  # (spawned processes inherit the environment)
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


def job_files(job: Any) -> list[str]:
    """The spool input ids a job may have left on a member: its inputs, its code bundle and
    the outputs of its steps but the last (stored as inputs of the next step)."""
    ids = [i["file_id"] for i in job.inputs]
    if job.code:
        ids.append(job.code["file_id"])
    ids += [f"{job.id}-s{k}-{r}" for k in range(job.steps - 1) for r in range(job.n_reduce)]
    return ids


def unpack_bundle(bundle: Path, folder: Path) -> None:
    """Unpack a job's code bundle (see :func:`pdp.jobs.bundle.read_bundle`) into ``folder``."""
    from pdp.jobs.bundle import read_bundle

    files = read_bundle(bundle.read_bytes())
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    (folder / ".ready").write_bytes(b"")


def _warm() -> int:
    import pdp.jobs.builtin  # noqa: F401  (import cost paid before the first task)
    import pdp.jobs.runtime  # noqa: F401

    return os.getpid()


class Changes:
    """Wakes waiters whenever the replicated state (or the Raft role) changes.

    ``seen`` counts the changes so far: a loop that notes it before its work and waits with
    ``since`` set to it misses no change that happened meanwhile."""

    def __init__(self) -> None:
        self._event = asyncio.Event()
        self.seen = 0

    def notify(self) -> None:
        self.seen += 1
        self._event.set()
        self._event = asyncio.Event()

    async def wait(self, timeout: float, since: int | None = None) -> None:
        """Until the next change (at once if there were changes after number ``since``), or
        ``timeout`` seconds."""
        if since is not None and since != self.seen:
            return
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._event.wait(), timeout)


class Node:
    def __init__(self, config: NodeConfig, reload: Callable[[], NodeConfig] | None = None) -> None:
        self.config = config
        self._load_config = reload
        self.name = config.name
        config.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.ident = load_node_identity(config.data_dir, config.name, create=False)
        self.party = PartyFile.load(config.data_dir)
        self.spool = Spool(config.data_dir / "spool")
        self._code_locks: dict[str, asyncio.Lock] = {}
        self.changes = Changes()
        self.peers = Peers(self.ident, self.pins)
        self.trusted = frozenset(self.party.known)  # fingerprints in the current TLS trust store
        self.tls_ctx = tls.server_context(self.ident, [r["cert"] for r in self.party.known.values()])
        self.handshakes = tls.HandshakeWatch()
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
        self.found_peers: list[str] = []  # members' addresses found by mDNS (``discover``)

    # -- lifecycle --------------------------------------------------------------------

    async def run(self) -> int:
        from pdp.node.gateway import Gateway
        from pdp.node.master import Master
        from pdp.node.worker import Worker

        cfg = self.config
        self.pool = new_pool(cfg.cpus)
        self.master, self.worker, self.gateway = Master(self), Worker(self), Gateway(self)
        self.handlers["party_info"] = self._party_info
        self.voter, core = await self._find_role()
        self.raft = RaftLink(self.peers, self.raft_id, self.name, self.voter)
        self.raft.on_shunned = self._shunned
        self.peers.oneway = self.raft.on_frame
        host, port = split_addr(cfg.listen)
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(_quiet_tls_errors)
        try:
            server = await asyncio.start_server(self._on_connect, host, port, ssl_handshake_timeout=10.0,
                                                ssl=tls.listening_context(self.ident, lambda: self.tls_ctx,
                                                                          self.handshakes))
        except OSError as exc:
            log.error("cannot listen on %s: %s", cfg.listen, exc)
            _stop_pool(self.pool)
            return 1
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)
        loop.add_signal_handler(signal.SIGHUP, self._reload_on_signal)
        (cfg.data_dir / "raft").mkdir(parents=True, exist_ok=True)
        os.chmod(cfg.data_dir / "raft", 0o700)  # the journal holds the party's state and invitations
        self.consensus = Consensus(cfg.raft_addr if self.voter else None, core, self.raft, cfg.data_dir / "raft",
                                   self._on_change)
        self.handlers.update({"fetch_range": self._fetch_range, "fetch_file": self._fetch_file,
                              "fetch_parts": self._fetch_parts,
                              "store_file": self._store_file, "store_input": self._store_input,
                              "become": self._become, "reload": self._reload, "propose": self._propose})
        for part in (self.master, self.worker, self.gateway):
            clash = set(part.handlers()) & set(self.handlers)
            assert not clash, f"request types handled twice: {clash}"
            self.handlers.update(part.handlers())
        missing = set(self.handlers) - set(authz.REQUIRED)
        assert not missing, f"request types without an authorization rule: {missing}"
        log.info("node %s (id %s) listening on %s (advertised %s), %s, core %s, %d task slot(s)", self.name,
                 self.ident.display, cfg.listen, cfg.advertise_addr,
                 "Raft voter" if self.voter else "worker (no Raft seat)", ", ".join(core), cfg.cpus)
        self.tasks = [
            asyncio.create_task(self._register()),
            asyncio.create_task(self.master.run()),
            *self.worker.start(),
            asyncio.create_task(self._janitor()),
            asyncio.create_task(sdnotify.keep_alive(self.registered)),  # systemd's watchdog
            loop.run_in_executor(self.pool, _warm),  # type: ignore[list-item]
        ]
        dashboard = await self._start_dashboard()
        announcer = await self._announce()
        try:
            await self.stopping.wait()
        finally:
            log.info("node %s shutting down", self.name)
            sdnotify.stopping(f"node {self.name} shutting down")
            server.close()
            for task in self.tasks:
                task.cancel()
            self.worker.stop()
            for conn in list(self.connections):
                conn.close()
            self.peers.close()
            self.raft.close()
            if dashboard is not None:
                await dashboard.stop()
            if announcer is not None:
                await announcer.close()
            _stop_pool(self.pool)
            if self.consensus is not None:
                self.consensus.close()
        return self.exit_code

    async def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.handshakes.finished()
        host = str((writer.get_extra_info("peername") or ("?",))[0])
        if self.per_host.get(host, 0) >= MAX_CONNECTIONS_PER_HOST or sum(self.per_host.values()) >= MAX_CONNECTIONS:
            log.warning("refused a connection from %s: too many open (%d from there, %d in all)", host,
                        self.per_host.get(host, 0), sum(self.per_host.values()))
            writer.close()
            return
        self.per_host[host] = self.per_host.get(host, 0) + 1
        conn = None
        try:
            conn = await accept(reader, writer, self.name, self.resolve, self.handlers, self.authorize,
                                self.raft.on_frame)
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

    async def _announce(self) -> Any:
        """This node's mDNS announcement with ``discover`` (None without, or when it cannot be
        made: the node runs on, dialable at its configured address)."""
        from zeroconf import Error as ZeroconfError

        from pdp.net.discovery import Announcer

        if not self.config.discover:
            return None
        announcer = Announcer(self.name, self.ident.fp, self.config.advertise_addr)
        try:
            return announcer if await announcer.start() else None
        except (OSError, ZeroconfError) as exc:
            log.warning("discovery: cannot announce this node on the LAN: %s", exc)
            await announcer.close()
            return None

    async def _start_dashboard(self) -> Any:
        """The web dashboard and /metrics on ``dashboard`` (None if off or its port is taken:
        the node runs on without it)."""
        from pdp.config import dashboard_address, dashboard_is_private
        from pdp.node.dashboard import Dashboard, node_services

        where = dashboard_address(self.config.dashboard)  # validated with the config: never raises here
        if where is None:
            return None
        dashboard = Dashboard(node_services(self))
        ssl_ctx = None
        if not dashboard_is_private(where[0]):  # beyond loopback: HTTPS, a party identity's certificate required
            ssl_ctx = tls.listening_context(self.ident, lambda: self.tls_ctx)
            dashboard.allowed = lambda fp: (self.identities().get(fp) or {}).get("name")
        try:
            await dashboard.start(*where, ssl_ctx)
        except OSError as exc:
            log.warning("no dashboard: cannot listen on %s (%s); set dashboard = \"HOST:PORT\" or off",
                        self.config.dashboard, exc)
            return None
        return dashboard

    async def _find_role(self) -> tuple[bool, list[str]]:
        """(voter?, the core's Raft ids): from a member that answers (the core may have
        changed while this node was away), else from this node's party file."""
        if self.config.discover:
            self.found_peers = await self._discover_peers()
        info = await self._ask_party() if self.config.peers or self.found_peers else None
        if info is not None:
            self.party.voter, self.party.core = self.config.raft_addr in info["core"], sorted(info["core"])
            self.party.save()
        return self.party.voter, sorted(self.party.core)

    async def _discover_peers(self, seconds: float = 3.0) -> list[str]:
        """Addresses of the party's other nodes announced on the LAN (only fingerprints
        this node's party file knows: a stranger's announcement is not even dialed)."""
        from zeroconf import Error as ZeroconfError

        from pdp.net.discovery import browse

        want = {fp for fp, r in self.party.known.items() if r.get("kind") == "node" and fp != self.ident.fp}
        try:
            found = await browse(seconds, want) if want else []
        except (OSError, ZeroconfError) as exc:
            log.warning("discovery: cannot browse the LAN (%s); using the configured peers only", exc)
            return []
        addrs = [a for f in found for a in f.addrs if a != self.config.advertise_addr]
        log.info("discovery: found %d member(s) on the LAN%s", len(found), f": {', '.join(addrs)}" if addrs else "")
        return addrs

    async def _ask_party(self, patience: float = 10.0) -> dict[str, Any] | None:
        """What a peer knows of the party: None if none answers with a master."""
        deadline = time.monotonic() + patience
        while True:
            answers = []
            for addr in dict.fromkeys([*self.config.peers, *self.found_peers]):
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
                return None  # nobody up, or everyone new: the party file knows
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
        """The master changed this member's Raft seat: follow the log as a voter or a worker
        (only the master of the current term may ask: :mod:`pdp.core.authz`)."""
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
        self.voter = self.raft.voter = voter
        self.peers.close_purpose("raft")  # redialed as a voter's links, or as a follower's
        self.party.voter, self.party.core = voter, core
        self.party.save()
        self.consensus = Consensus(cfg.raft_addr if voter else None, core, self.raft, cfg.data_dir / "raft",
                                   self._on_change)
        log.warning("%s is now %s; core %s", self.name, "a Raft voter" if voter else "a worker (no Raft seat)",
                    ", ".join(core))
        self.registered.clear()
        self.tasks.append(asyncio.create_task(self._register()))

    # -- who is who -------------------------------------------------------------------------

    def identities(self) -> dict[str, dict[str, Any]]:
        """The party's identities: the replicated list once it has any, else the party file's.
        The records are the state's own: read them, never change them."""
        c = self.consensus
        if c is not None:
            with c.reading() as state:
                if state.identities:
                    return dict(state.identities)
        return self.party.known

    def resolve(self, fp: str | None) -> Peer | str:
        """Who the proven certificate ``fp`` is, or why it may not come in."""
        if fp is None:
            return ANONYMOUS
        record = self.identities().get(fp)
        if record is None:
            return "this identity is not a member of the party (never joined, or revoked)"
        return Peer(fp, str(record["name"]), str(record["kind"]), bool(record.get("admin")))

    def authorize(self, conn: Connection, kind: str) -> None:
        if conn.who.fp is not None and conn.who.fp not in self.trusted:
            conn.close()  # revoked while connected
            raise authz.Forbidden("this identity was revoked")
        authz.check(conn.who, kind, is_master=conn.who.name == self.master_addr_name())

    def pins(self, addr: str) -> set[str]:
        """The fingerprint(s) the member node at ``addr`` must prove (any member node's if
        the address is not one this node knows)."""
        ids = self.identities()
        nodes = {fp for fp, r in ids.items() if r["kind"] == "node"}
        c = self.consensus
        name = next((r["name"] for r in ids.values() if r.get("addr") == addr and r["kind"] == "node"), None)
        if c is not None:
            with c.reading() as state:
                name = next((m.name for m in state.members.values() if m.data_addr == addr), name)
        own = {fp for fp in nodes if ids[fp]["name"] == name} if name else set()
        return own or nodes

    def raft_id(self, name: str) -> str | None:
        """A member node's Raft id (its data address), from its proven name."""
        c = self.consensus
        if c is not None:
            with c.reading() as state:
                member = state.members.get(name)
                if member is not None:
                    return member.data_addr
        return next((r.get("addr") or None for r in self.identities().values()
                     if r["name"] == name and r["kind"] == "node" and r.get("addr")), None)

    def _shunned(self, why: str) -> None:
        if not self.stopping.is_set():
            log.error("this node's identity was revoked: every core member refuses it (%s); stopping", why)
            self.exit_code = 1
            self.stopping.set()

    def _on_change(self) -> None:
        self.changes.notify()
        self._enforce_identities()

    def _enforce_identities(self) -> None:
        """Follow the replicated identities: a new trust store when they change, and the
        connections of revoked ones closed at once (this node stops if it was revoked)."""
        ids = self.identities()
        fps = frozenset(ids)
        if fps == self.trusted:
            return
        gone = self.trusted - fps
        self.trusted = fps
        self.tls_ctx = tls.server_context(self.ident, [r["cert"] for r in ids.values()])
        if not gone:
            return
        for conn in list(self.connections):
            if conn.who.fp in gone:
                log.warning("disconnected %s: its identity was revoked", conn.who.label)
                conn.close()
        self.peers.drop(set(gone))
        if self.ident.fp in gone and self.registered.is_set():
            log.error("this node's identity was revoked from the party; stopping")
            self.exit_code = 1
            self.stopping.set()

    async def _register(self) -> None:
        """Record this member (name, addresses, slots) in the replicated state."""
        cfg = self.config
        cmd = {"op": "member", "name": self.name, "data_addr": cfg.advertise_addr,
               "raft_addr": cfg.raft_addr if self.voter else "", "voter": self.voter, "cpus": cfg.cpus,
               "allow_code": cfg.allow_code}
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
            sdnotify.ready(f"member {self.name} joined the party")  # Type=notify: started
            return

    # -- shared helpers -----------------------------------------------------------------

    async def propose(self, cmd: dict[str, Any], timeout: float = 5.0) -> dict[str, Any]:
        """Commit ``cmd``: here if this node leads, else through the master (``propose``)."""
        c = self.consensus
        assert c is not None
        if c.is_leader() or str(cmd.get("op")) not in FORWARDABLE:
            return await c.propose(_sealed_join(cmd), timeout)
        master = self.master_addr()
        if master is None or master[0] == self.name:
            raise ConsensusError("no master yet")
        try:
            frame = await self.peers.request(master[1], {"t": "propose"}, msgpack.packb(cmd), timeout=timeout)
        except (PdpError, OSError) as exc:
            raise ConsensusError(f"the master did not answer: {exc}") from None
        return dict(msgpack.unpackb(frame.payload))

    async def _propose(self, stream: Stream, hdr: dict[str, Any], payload: bytes) -> None:
        """A member asks the master to commit a command it may propose (never an order)."""
        c = self.consensus
        if c is None or not self.master.is_master():
            raise NotMaster(f"{self.name} is not the master")
        cmd = msgpack.unpackb(payload)
        op = cmd.get("op") if isinstance(cmd, dict) else None
        if op not in FORWARDABLE:
            raise authz.Forbidden(f"forbidden: a member may not propose {op!r}")
        if op in OWN_NAME_OPS and cmd.get("name") != stream.conn.who.name:
            raise authz.Forbidden(f"forbidden: {stream.conn.who.name} may not propose {op!r} for {cmd.get('name')!r}")
        if op in SIGNED_OPS:
            self._check_signed(cmd)
        res = await c.propose(_sealed_join(cmd), timeout=5.0)
        await stream.send({"t": "proposed"}, msgpack.packb(res))

    def _check_signed(self, cmd: dict[str, Any]) -> None:
        """A relayed identity change carries the signature of who asked for it: an admin (or,
        for a new key, the identity itself), over the same request."""
        auth: dict[str, Any] = cmd["auth"] if isinstance(cmd.get("auth"), dict) else {}
        record = self.identities().get(str(auth.get("fp")))
        if record is None:
            raise authz.Forbidden(f"forbidden: {cmd['op']!r} is not signed by an identity of the party")
        try:
            body = verify(auth, record["cert"], time.time())
        except PdpError as exc:
            raise authz.Forbidden(f"forbidden: {exc}") from None
        if body.get("t") != SIGNED_OPS[cmd["op"]]:
            raise authz.Forbidden(f"forbidden: the signature is for {body.get('t')!r}, not {cmd['op']!r}")
        if cmd["op"] == "rekey":
            if auth["fp"] != cmd.get("old_fp") or record["name"] != cmd.get("name") \
                    or body.get("cert_fp") != cmd.get("fp"):
                raise authz.Forbidden("forbidden: only an identity itself may replace its key")
            return
        if not record.get("admin") or body.get("name") != cmd.get("name"):
            raise authz.Forbidden("forbidden: not signed by an admin for this name")
        if cmd["op"] == "token" and ("user" if body.get("user") else "node") != cmd.get("kind"):
            raise authz.Forbidden("forbidden: the signed invitation is for another kind")

    def whoami(self, stream: Stream) -> dict[str, Any]:
        who = stream.conn.who
        return {"name": who.name, "kind": who.kind, "admin": who.admin, "fp": who.fp}

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
                ended = {j.id: (j.state, job_files(j))
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
                sums_path(path).unlink(missing_ok=True)  # its block checksums go with it
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
        size, start = path.stat().st_size, int(hdr["start"])
        with open(path, "rb") as f:
            a, b = aligned_bounds(f, start, int(hdr["end"]), size)
        # the bytes read to find the line starts must be intact too (send_file checks [a, b))
        if not check_range(path, max(0, start - 1), a + 1):
            log.warning("input %s has no block checksums here: sent unchecked", hdr["file"])
        await stream.send({"t": "range", "a": a, "b": b})
        await send_file(stream, path, a, b)

    async def _fetch_file(self, stream: Stream, hdr: dict[str, Any], _: bytes) -> None:
        path = self.spool.file(str(hdr["job"]), str(hdr["name"]))
        if not path.exists():
            raise PdpError(f"{self.name} has no {hdr['name']} for job {hdr['job']}")
        if hdr["name"] == "result":  # check the copy against the log before a byte leaves
            assert self.consensus is not None
            with self.consensus.reading() as state:
                job = state.jobs.get(str(hdr["job"]))
                digest = str(job.result.get("sha256", "")) if job is not None else ""
            if digest:
                await asyncio.to_thread(check_sha256, path, digest, f"{self.name}'s copy of the result of {hdr['job']}")
        await send_file(stream, path)

    async def _fetch_parts(self, stream: Stream, hdr: dict[str, Any], _: bytes) -> None:
        """Send one reduce partition of several map outputs on one stream (for a reducer)."""
        maps = [int(m) for m in hdr["maps"]][:MAX_FILES_PER_FETCH]
        job_id, r = str(hdr["job"]), int(hdr["partition"])
        await send_parts(stream, [(m, functools.partial(mapoutput.read_part, str(self.spool.file(job_id, f"map-{m}")),
                                                        r)) for m in maps])

    async def _store_file(self, stream: Stream, hdr: dict[str, Any], _: bytes) -> None:
        """Keep a copy of a job file another member sends (a result's second copy, checked
        against the SHA-256 the sender recorded: nothing damaged is stored)."""
        digest, job_id = str(hdr.get("sha256") or ""), str(hdr["job"])
        if hdr["name"] != "result" or not digest:
            raise PdpError("only a job's result is stored this way, with its sha256")
        assert self.consensus is not None
        with self.consensus.reading() as state:
            job = state.jobs.get(job_id)
            if job is None or job.state not in ACTIVE:
                raise PdpError(f"no running job {job_id}: its result is not stored here")
        size = await recv_file(stream, self.spool.file(job_id, "result"), sha256=digest, limit=MAX_RESULT)
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
        declared = int(hdr["size"])
        if not 0 <= declared <= MAX_INPUT:
            raise PdpError(f"an input of {declared} bytes is not stored")
        full = self.spool_full(declared)
        if full:
            raise PdpError(full)
        size = await recv_file(stream, self.spool.input(str(hdr["file"])), timeout=60.0, sums=True, limit=declared)
        await stream.send({"t": "stored", "size": size})

    # -- users' job code ---------------------------------------------------------------------

    async def job_code(self, job_id: str, code: dict[str, Any] | None = None) -> Path:
        """The directory holding a user job's code and FILES, fetched from a holder of its
        bundle and unpacked the first time (only called where ``allow_code`` is on, or by the
        master to write the result with the job's output protocol)."""
        folder = self.spool.file(job_id, "code")
        lock = self._code_locks.setdefault(job_id, asyncio.Lock())
        async with lock:
            if (folder / ".ready").exists():
                return folder
            if code is None:
                assert self.consensus is not None
                with self.consensus.reading() as state:
                    job = state.jobs.get(job_id)
                    if job is None or not job.code:
                        raise PdpError(f"job {job_id} has no code")
                    code = {"file": job.code["file_id"], "size": job.code["size"],
                            "holders": [(h, state.members[h].data_addr) for h in job.code["holders"]
                                        if h in state.members]}
            local = self.spool.input(str(code["file"]))
            if not local.exists():
                local = self.spool.file(job_id, "code.bundle")
                await self._fetch_whole(str(code["file"]), int(code["size"]), code["holders"], local)
            await asyncio.to_thread(unpack_bundle, local, folder)
        return folder

    async def _fetch_whole(self, file_id: str, size: int, holders: list[Any], dest: Path) -> None:
        errors = []
        for holder, addr in holders:
            try:
                conn = await self.peers.get(addr)
                stream = conn.open_stream()
                try:
                    await stream.send({"t": "fetch_range", "file": file_id, "start": 0, "end": size})
                    await stream.recv(30.0)
                    await recv_file(stream, dest, durable=False)
                    return
                finally:
                    stream.close()
            except (PdpError, OSError) as exc:
                errors.append(f"{holder}: {exc}")
        raise PdpError(f"no holder of {file_id} answered ({'; '.join(errors) or 'none known'})")

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


def _sealed_join(cmd: dict[str, Any]) -> dict[str, Any]:
    """A join travels with its secret to the master, which keeps only the secret's hash (so a
    member that reads the pending invitations' hashes in the log still cannot redeem them)."""
    if cmd.get("op") != "join":
        return cmd
    secret = cmd.get("secret")
    sealed = {k: v for k, v in cmd.items() if k != "secret"}
    sealed["token_hash"] = token_hash(secret) if isinstance(secret, str) else ""
    return sealed


def _quiet_tls_errors(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """A TLS handshake refused (an unknown certificate, a port scan) is one log line, not a traceback."""
    exc = context.get("exception")
    if isinstance(exc, (ssl.SSLError, ConnectionError, OSError)):
        peer = context.get("transport")
        where = getattr(peer, "get_extra_info", lambda _k: None)("peername") if peer is not None else None
        log.warning("refused a TLS connection%s: %s", f" from {where[0]}:{where[1]}" if where else "",
                    getattr(exc, "reason", None) or exc)
        return
    loop.default_exception_handler(context)


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
