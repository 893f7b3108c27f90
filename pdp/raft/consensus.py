"""The only pysyncobj importer: the replicated :class:`~pdp.core.state.State` behind a Raft group.

pysyncobj runs its own tick thread (transport, elections, applying entries, callbacks). This
module bridges it to asyncio: :meth:`Consensus.propose` returns an awaitable bounded by a
timeout, readers take :meth:`Consensus.reading` (a lock shared with the apply path), and
every applied entry or role change wakes the event loop through ``on_change``.

Raft messages travel over pdp's own authenticated connections (a :class:`~pdp.raft.raftnet.Bridge`
run by the asyncio side) as msgpack, through :mod:`pdp.raft.raftnet`'s Transport, which screens
every received log entry; dump files and snapshots are msgpack (:mod:`pdp.core.statecodec`).
Nothing from the network reaches pickle unscreened. A voter's Raft id is its data address
"host:port": one port for everything.

Settings follow the measured facts in the project guide: unbatched appends (0.3 ms commits
instead of ~100 ms), short election and fallback timeouts, journal *and* dump file together
on voters, a dump file on read-only followers too (without one pysyncobj would unpickle
snapshots in memory).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pysyncobj import FAIL_REASON, SyncObj, SyncObjConf, SyncObjConsumer, replicated

from pdp.raft import raftnet
from pdp.raft.durable import DurableJournal, JournalProxy, install_durable_dumps, make_durable
from pdp.errors import ConfigError, PdpError, ProtocolError
from pdp.raft.raftnet import Bridge
from pdp.core.state import State
from pdp.core.statecodec import StateDump, is_pdp_dump

log = logging.getLogger("pdp.raft.consensus")

_FAIL_NAMES = {v: k for k, v in vars(FAIL_REASON).items() if not k.startswith("_")}
TRUNCATION_MARK = "truncating already-applied log entries"
MAX_BATCH = 200  # commands in one group-committed Raft entry


class ConsensusError(PdpError):
    """A command's outcome is not known to be applied (no leader, leader changed, timeout)."""

    code = "no_commit"

    def __init__(self, reason: str) -> None:
        super().__init__(f"the party could not commit the change ({reason}); is a majority of core members up?")
        self.reason = reason


class CommandRefused(PdpError):
    """A command cannot go through Raft at all (a bug in the caller: retrying cannot help)."""

    code = "refused"

    def __init__(self, reason: str) -> None:
        super().__init__(f"this command cannot go through Raft ({reason}); a command holds only dicts with str "
                         f"keys, lists, str, int, float, bool and None (no bytes), at most "
                         f"{raftnet.MAX_COMMAND_BYTES} bytes pickled")
        self.reason = reason


@dataclass(frozen=True)
class RaftTuning:
    append_period: float = 0.05
    election_min: float = 0.4
    election_max: float = 0.9
    fallback: float = 1.5
    connection_timeout: float = 2.0
    retry: float = 0.5
    compaction_entries: int = 5000  # log compaction (a dump) after this many entries ...
    compaction_time: float = 300.0  # ... or seconds (tests make both small)
    snapshot_chunk: int = raftnet.SNAPSHOT_CHUNK_BYTES  # bytes per 'serialized' chunk of a snapshot


class _Replica(SyncObjConsumer):
    """The SyncObjConsumer holding the State; :class:`StateDump` writes and restores it."""

    def __init__(self, on_apply: Callable[[], None]) -> None:
        self.lock = threading.Lock()
        self.on_apply = on_apply
        self.entry_term: Callable[[], int | None] = lambda: None
        super().__init__()
        self.state = State()

    @replicated
    def apply(self, cmd: dict[str, Any]) -> dict[str, Any]:
        term = self.entry_term()  # the Raft term of the entry being applied: orders must carry it
        with self.lock:
            result = self.state.apply(cmd, term)
        _safe(self.on_apply)
        return result

    def restore(self, state: State) -> None:
        """A dump was loaded (restart or snapshot from the leader), on the tick thread."""
        with self.lock:
            self.state = state
        _safe(self.on_apply)


def _safe(fn: Callable[[], None]) -> None:
    """Run a notification from the tick thread; it must never raise into pysyncobj."""
    try:
        fn()
    except Exception:  # pragma: no cover - defensive
        log.exception("notification failed")


class _TruncationCounter(logging.Handler):
    """Counts pysyncobj's "truncating already-applied log entries" criticals (guide §3)."""

    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        if TRUNCATION_MARK in str(record.msg):
            self.count += 1


class _DivergenceWatch(JournalProxy):
    """Wraps pysyncobj's journal to tell a harmless truncation from a real divergence.

    pysyncobj's follower deletes every entry after ``prevLogIdx`` whenever the leader
    resends from further back (a late ack, a restarted member), then appends the leader's
    entries, and logs CRITICAL if applied entries were among the deleted ones. Raft says
    committed entries never change, so when the re-appended entry at the same index has
    the same term and command nothing diverged; only a different one is a real divergence.
    """

    def __init__(self, journal: Any, last_applied: Callable[[], int]) -> None:
        self._journal = journal
        self._last_applied = last_applied
        self._deleted: dict[int, tuple[Any, int]] = {}
        self.diverged = 0

    def deleteEntriesFrom(self, position: int) -> None:  # noqa: N802 (pysyncobj's name)
        applied = self._last_applied()
        for command, idx, term in self._journal[position:]:
            if idx <= applied:
                self._deleted[idx] = (command, term)
        self._journal.deleteEntriesFrom(position)

    def add(self, command: Any, idx: int, term: int) -> None:
        before = self._deleted.pop(idx, None)
        if before is not None and before != (command, term):
            self.diverged += 1
            log.critical("raft log entry %d was applied here and then replaced by a different one: this member's "
                         "state diverged; stop it, delete its data dir's raft/ and restart it", idx)
        self._journal.add(command, idx, term)

    def clear(self) -> None:
        self._deleted.clear()
        self._journal.clear()


def _keep_next_index_monotonic(sync: SyncObj) -> None:
    """Stop a late acknowledgement from moving the leader's next index backwards.

    pysyncobj 0.3.17's leader sets ``nextIndex = ack + 1`` on every successful ack, also
    when it has already sent further (it advances ``nextIndex`` as it sends). A late ack
    then makes it resend entries the follower holds, and the follower truncates applied
    entries to re-append them (the CRITICAL "truncating already-applied log entries" of
    guide §3). Here a success ack may only move it forward; a follower that really lacks
    entries answers ``reset``, which still moves it back.
    """
    transport = sync._SyncObj__transport  # type: ignore[attr-defined]
    handler = transport._onMessageReceivedCallback

    def on_message(node: Any, message: Any) -> None:
        if isinstance(message, dict) and message.get("type") == "next_node_idx" and message.get("success") \
                and not message.get("reset"):
            next_index = sync._SyncObj__raftNextIndex  # type: ignore[attr-defined]
            before = next_index.get(node)
            handler(node, message)
            after = next_index.get(node)
            if before is not None and after is not None and after < before:
                next_index[node] = before
        else:
            handler(node, message)

    transport.setOnMessageReceivedCallback(on_message)


Queued = tuple[dict[str, Any], bytes, asyncio.Future[dict[str, Any]]]  # (plain command, its entry, future)


class Consensus:
    """A Raft member. Construct on the main thread, inside the running event loop.

    ``self_addr`` is this voter's data address "host:port" (its Raft id), None for a
    read-only follower (a worker); ``peers`` are the voters' addresses; ``bridge`` carries
    the Raft messages (see :class:`pdp.raft.raftnet.Bridge`). ``before_send`` runs on the tick
    thread before any Raft message leaves; ``on_refused(node_id, reason)`` for every
    message dropped by the screen.
    """

    def __init__(
        self,
        self_addr: str | None,
        peers: list[str],
        bridge: Bridge,
        data_dir: Path,
        on_change: Callable[[], None],
        tuning: RaftTuning = RaftTuning(),
        before_send: Callable[[], None] | None = None,
        on_refused: Callable[[str, str], None] | None = None,
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._on_change = on_change
        self.replica = _Replica(self._notify)  # before the SyncObj (guide: restart trap)
        self.self_addr = self_addr
        self.dump = StateDump(lambda: self.replica.state, self.replica.restore)
        conf = self._conf(data_dir, tuning)
        self.truncations = _TruncationCounter()
        logging.getLogger("pysyncobj").addHandler(self.truncations)
        self.durable: DurableJournal | None = None

        def flush_first() -> None:  # on the tick thread, before any Raft message leaves (acks, votes)
            if self.durable is None:
                raise ConsensusError("the journal is not durable yet")
            self.durable.flush()
            if before_send is not None:
                before_send()

        transport_class = raftnet.make_transport_class(bridge, on_refused=on_refused, before_send=flush_first)
        install_durable_dumps()
        self._sync = SyncObj(self_addr, [p for p in peers if p != self_addr], conf, consumers=[self.replica],
                             transportClass=transport_class)
        self.transport: raftnet.RaftTransport = self._sync._SyncObj__transport  # type: ignore[attr-defined]
        self._func_id = self._apply_id()
        self._queued: list[Queued] = []
        self._tick_jobs: queue.SimpleQueue[Callable[[], Any]] = queue.SimpleQueue()
        self._sync.addOnTickCallback(self._run_tick_jobs)
        _keep_next_index_monotonic(self._sync)
        journal = self._sync._SyncObj__raftLog  # type: ignore[attr-defined]
        self.durable = make_durable(journal, dump_file=conf.fullDumpFile)
        self._sync.addOnTickCallback(self.durable.flush)  # a core of one sends no acks: flush every tick too
        self.replica.entry_term = self._entry_term
        self.divergence = _DivergenceWatch(self.durable, lambda: int(self._sync.raftLastApplied))
        self._sync._SyncObj__raftLog = self.divergence  # type: ignore[attr-defined]

    def _conf(self, data_dir: Path, tuning: RaftTuning) -> SyncObjConf:
        data_dir.mkdir(parents=True, exist_ok=True)
        voter = self.self_addr is not None
        dump = data_dir / "raft.dump"
        if not voter:  # a worker's log is in memory: it starts from the leader's state every time
            dump.unlink(missing_ok=True)
        elif dump.exists() and not is_pdp_dump(dump):
            raise ConfigError(f"{dump} was written by an older pdp (pickle), which this one will not read; "
                              f"delete {data_dir} to let this member start afresh from the others")
        return SyncObjConf(
            journalFile=str(data_dir / "raft.journal") if voter else None,
            fullDumpFile=str(dump),  # also on workers: without one, snapshots take pysyncobj's pickle path
            serializer=self.dump.serializer,
            deserializer=self.dump.deserializer,
            appendEntriesUseBatch=False,
            appendEntriesBatchSizeBytes=raftnet.APPEND_BATCH_BYTES,  # no entry is this big: no 'transmission'
            logCompactionMinEntries=tuning.compaction_entries,
            logCompactionMinTime=tuning.compaction_time,
            logCompactionBatchSize=tuning.snapshot_chunk,
            appendEntriesPeriod=tuning.append_period,
            raftMinTimeout=tuning.election_min,
            raftMaxTimeout=tuning.election_max,
            leaderFallbackTimeout=tuning.fallback,
            connectionTimeout=tuning.connection_timeout,
            connectionRetryTime=tuning.retry,
            dynamicMembershipChange=True,
            onStateChanged=lambda old, new: self._notify(),
        )

    def _apply_id(self) -> int:
        """pysyncobj's id of _Replica.apply: the only method the followers' screen accepts."""
        ids = self._sync._idToMethod  # type: ignore[attr-defined]
        if set(ids) != set(raftnet.FUNC_IDS):  # pragma: no cover - a second @replicated method
            raise RuntimeError(f"pysyncobj method ids {sorted(ids)}, the screen allows {sorted(raftnet.FUNC_IDS)}")
        return next(iter(raftnet.FUNC_IDS))

    def _entry_term(self) -> int | None:
        """On the tick thread, inside pysyncobj's apply loop: the term of the entry it applies
        (it applies entry raftLastApplied + 1, then counts it)."""
        log_ = self._sync._SyncObj__raftLog  # type: ignore[attr-defined]
        idx = int(self._sync.raftLastApplied) + 1
        try:
            entry = log_[idx - int(log_[0][1])]
        except (IndexError, TypeError, ValueError):
            return None
        return int(entry[2]) if int(entry[1]) == idx else None

    def _notify(self) -> None:
        if not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._on_change)

    # -- writes -----------------------------------------------------------------------

    async def propose(self, cmd: dict[str, Any], timeout: float = 5.0) -> dict[str, Any]:
        """Commit ``cmd`` on this member, the leader, and return its result.

        CommandRefused (at once) if ``cmd`` cannot go through Raft (bytes, non-str keys, too
        big: every follower would refuse its entry forever); ConsensusError if the outcome is
        not known (not the leader, leadership lost, timeout). Group commit: commands
        proposed in the same turn of the event loop travel in one Raft entry (a ``batch``),
        each getting its own result back."""
        try:
            plain = raftnet.plain_command(cmd)
            entry = raftnet.pack_command(plain, self._func_id)
        except ProtocolError as exc:
            raise CommandRefused(str(exc)) from None
        if not self.is_leader():  # a follower would forward it as 'apply_command', which is refused
            raise ConsensusError("this member is not the Raft leader")
        fut: asyncio.Future[dict[str, Any]] = self._loop.create_future()
        if not self._queued:
            self._loop.call_soon(self._flush)
        self._queued.append((plain, entry, fut))
        try:
            return await asyncio.wait_for(asyncio.shield(fut), timeout)
        except asyncio.TimeoutError:
            raise ConsensusError(f"no commit within {timeout:g} s") from None

    def _flush(self) -> None:
        queued, self._queued = self._queued, []
        for group in _groups(queued):
            self._submit_group(group)

    def _submit_group(self, group: list[Queued]) -> None:
        loop = self._loop
        if len(group) == 1:
            fut = group[0][2]
            self._submit(group[0][1], lambda result, err: loop.call_soon_threadsafe(_settle, fut, result, err))
            return
        try:  # its parts passed the screen, so the batch of them does; only its size is checked
            entry = raftnet.pack_command({"op": "batch", "cmds": [plain for plain, _, _ in group]}, self._func_id,
                                         screen=False)
        except ProtocolError:  # over the size cap after all: one entry each
            for item in group:
                self._submit_group([item])
            return
        self._submit(entry, lambda result, err: loop.call_soon_threadsafe(_settle_group, group, result, err))

    def _submit(self, entry: bytes, callback: Callable[[Any, int], object]) -> None:
        """Queue a screened entry for the tick thread (what @replicated does after pickling)."""
        self._sync._applyCommand(entry, callback)  # type: ignore[attr-defined]

    # -- reads ------------------------------------------------------------------------

    @contextmanager
    def reading(self) -> Iterator[State]:
        """Hold the apply lock while reading the state (keep it short)."""
        with self.replica.lock:
            yield self.replica.state

    def is_leader(self) -> bool:
        return bool(self._sync._isLeader())

    def leader_id(self) -> str | None:
        """The Raft leader's id ("host:port") as this member last heard, or None."""
        leader = self._sync._getLeader()
        return None if leader is None else str(leader.id)

    def term(self) -> int:
        return int(self._sync.raftCurrentTerm)

    async def change_membership(self, action: str, raft_addr: str, timeout: float = 10.0) -> None:
        """Add or remove one voter (pysyncobj dynamic membership); call on the leader, one at a time.

        ``raft_addr`` is the voter's id, its data address "host:port"."""
        try:
            raftnet.check_node_id(raft_addr)
        except ProtocolError as exc:
            raise CommandRefused(str(exc)) from None
        fut: asyncio.Future[dict[str, Any]] = self._loop.create_future()

        def done(result: Any, err: int) -> None:
            self._loop.call_soon_threadsafe(_settle, fut, {"ok": True}, err)

        if action == "add":
            self._sync.addNodeToCluster(raft_addr, callback=done)
        else:
            self._sync.removeNodeFromCluster(raft_addr, callback=done)
        try:
            await asyncio.wait_for(fut, timeout)
        except asyncio.TimeoutError:
            raise ConsensusError(f"the membership change was not committed within {timeout:g} s") from None

    async def transfer_leadership(self, timeout: float = 10.0) -> None:
        """Hand leadership to the most caught-up voter (run on the tick thread) and wait for it."""
        deadline = time.monotonic() + timeout
        while self.is_leader():
            if time.monotonic() > deadline:
                raise ConsensusError("leadership could not be handed over (no caught-up voter?)")
            # denied while no follower holds every entry: asked again until it moves
            self._tick_jobs.put(self._sync.transferLeadership)
            await asyncio.sleep(0.1)

    def _run_tick_jobs(self) -> None:
        """On pysyncobj's tick thread (which holds its callback lock: never add/remove here)."""
        while True:
            try:
                job = self._tick_jobs.get_nowait()
            except queue.Empty:
                return
            try:
                job()
            except Exception:  # pragma: no cover - never raise into pysyncobj
                log.exception("tick job failed")

    def voters(self) -> list[str]:
        """The Raft addresses of the current voters (pysyncobj's view, after membership changes)."""
        sync = self._sync
        own = [] if sync.selfNode is None else [str(sync.selfNode.address)]
        return sorted(own + [str(n.address) for n in sync.otherNodes])

    def raft_status(self) -> dict[str, Any]:
        status = self._sync.getStatus()
        return {
            "term": int(status["raft_term"]),
            "leader_raft": None if status["leader"] is None else str(status["leader"].address),
            "has_quorum": bool(status["has_quorum"]),
            "commit_idx": int(status["commit_idx"]),
            "last_applied": int(status["last_applied"]),
            "log_len": int(status["log_len"]),
            "truncations": self.truncations.count,  # pysyncobj's CRITICAL lines (harmless when re-appended equal)
            "diverged": self.divergence.diverged,  # applied entries replaced by different ones: must stay 0
            "refused": self.transport.refused,  # Raft messages dropped by the screen (should stay 0)
        }

    def close(self) -> None:
        logging.getLogger("pysyncobj").removeHandler(self.truncations)
        self._sync.destroy()

    async def aclose(self) -> None:
        """Destroy and wait until pysyncobj's thread and sockets are gone (before a role change)."""
        logging.getLogger("pysyncobj").removeHandler(self.truncations)
        await asyncio.to_thread(self._sync.destroy_synchronous)
        notifier = getattr(self._sync, "_SyncObj__pipeNotifier", None)  # pysyncobj never closes its pipe
        if notifier is not None:
            raftnet.close_notifier(notifier, self._sync._poller)


def _groups(queued: list[Queued]) -> Iterator[list[Queued]]:
    """Consecutive groups of at most MAX_BATCH commands whose entries fit in one entry."""
    group: list[Queued] = []
    size = 0
    for item in queued:
        if group and (len(group) == MAX_BATCH or size + len(item[1]) > raftnet.MAX_COMMAND_BYTES - 1024):
            yield group
            group, size = [], 0
        group.append(item)
        size += len(item[1])
    if group:
        yield group


def _settle_group(group: list[Queued], result: Any, err: int) -> None:
    results = result.get("results") if err == FAIL_REASON.SUCCESS and isinstance(result, dict) else None
    if err == FAIL_REASON.SUCCESS and (not isinstance(results, list) or len(results) != len(group)):
        err, results = FAIL_REASON.REQUEST_DENIED, None  # pragma: no cover - a batch always answers each
    for k, (_, _, fut) in enumerate(group):
        _settle(fut, results[k] if results is not None else None, err)


def _settle(fut: asyncio.Future[dict[str, Any]], result: Any, err: int) -> None:
    if fut.done():
        return
    if err == FAIL_REASON.SUCCESS:
        fut.set_result(result)
    else:
        fut.set_exception(ConsensusError(_FAIL_NAMES.get(err, str(err)).lower()))
