"""The only pysyncobj importer: the replicated :class:`~pdp.state.State` behind a Raft group.

pysyncobj runs its own tick thread (transport, elections, applying entries, callbacks). This
module bridges it to asyncio: :meth:`Consensus.propose` returns an awaitable bounded by a
timeout, readers take :meth:`Consensus.reading` (a lock shared with the apply path), and
every applied entry or role change wakes the event loop through ``on_change``.

Settings follow the measured facts in the project guide: unbatched appends (0.3 ms commits
instead of ~100 ms), short election and fallback timeouts, a fast reconnect, journal *and*
dump file together, and always a password (without one pysyncobj unpickles anything).
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

from pdp.errors import PdpError
from pdp.state import State

log = logging.getLogger("pdp.consensus")

_FAIL_NAMES = {v: k for k, v in vars(FAIL_REASON).items() if not k.startswith("_")}
TRUNCATION_MARK = "truncating already-applied log entries"
MAX_BATCH = 200  # commands in one group-committed Raft entry


class ConsensusError(PdpError):
    """A command's outcome is not known to be applied (no leader, leader changed, timeout)."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"the party could not commit the change ({reason}); is a majority of core members up?")
        self.reason = reason


@dataclass(frozen=True)
class RaftTuning:
    append_period: float = 0.05
    election_min: float = 0.4
    election_max: float = 0.9
    fallback: float = 1.5
    connection_timeout: float = 2.0
    retry: float = 0.5


class _Replica(SyncObjConsumer):
    """The SyncObjConsumer holding the State; only ``state`` is dumped to disk."""

    def __init__(self, on_apply: Callable[[], None]) -> None:
        # Attributes set before SyncObjConsumer.__init__ are excluded from its dumps.
        self.lock = threading.Lock()
        self.on_apply = on_apply
        super().__init__()
        self.state = State()

    @replicated
    def apply(self, cmd: dict[str, Any]) -> dict[str, Any]:
        with self.lock:
            result = self.state.apply(cmd)
        _safe(self.on_apply)
        return result

    def _deserialize(self, data: dict[str, Any]) -> None:
        with self.lock:
            super()._deserialize(data)
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


class _DivergenceWatch:
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

    def __getitem__(self, item: Any) -> Any:
        return self._journal[item]

    def __len__(self) -> int:
        return len(self._journal)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._journal, name)


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


class Consensus:
    """A Raft member. Construct on the main thread, inside the running event loop."""

    def __init__(
        self,
        self_addr: str | None,
        peers: list[str],
        password: str,
        data_dir: Path,
        bind_host: str,
        on_change: Callable[[], None],
        tuning: RaftTuning = RaftTuning(),
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._on_change = on_change
        self.truncations = _TruncationCounter()
        logging.getLogger("pysyncobj").addHandler(self.truncations)
        self.replica = _Replica(self._notify)  # before the SyncObj (guide: restart trap)
        data_dir.mkdir(parents=True, exist_ok=True)
        voter = self_addr is not None  # a worker follows the log read-only, in memory (no files)
        conf = SyncObjConf(
            password=password,
            journalFile=str(data_dir / "raft.journal") if voter else None,
            fullDumpFile=str(data_dir / "raft.dump") if voter else None,
            appendEntriesUseBatch=False,
            appendEntriesPeriod=tuning.append_period,
            raftMinTimeout=tuning.election_min,
            raftMaxTimeout=tuning.election_max,
            leaderFallbackTimeout=tuning.fallback,
            connectionTimeout=tuning.connection_timeout,
            connectionRetryTime=tuning.retry,
            dynamicMembershipChange=True,
            onStateChanged=lambda old, new: self._notify(),
        )
        if self_addr is not None:  # a voter listens; a worker without a seat only follows the log
            conf.bindAddress = f"{bind_host}:{self_addr.rsplit(':', 1)[1]}"
        self.self_addr = self_addr
        self._sync = SyncObj(self_addr, [p for p in peers if p != self_addr], conf, consumers=[self.replica])
        self._queued: list[tuple[dict[str, Any], asyncio.Future[dict[str, Any]]]] = []
        self._tick_jobs: queue.SimpleQueue[Callable[[], Any]] = queue.SimpleQueue()
        self._sync.addOnTickCallback(self._run_tick_jobs)
        _keep_next_index_monotonic(self._sync)
        journal = self._sync._SyncObj__raftLog  # type: ignore[attr-defined]
        self.divergence = _DivergenceWatch(journal, lambda: int(self._sync.raftLastApplied))
        self._sync._SyncObj__raftLog = self.divergence  # type: ignore[attr-defined]

    def _notify(self) -> None:
        if not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._on_change)

    # -- writes -----------------------------------------------------------------------

    async def propose(self, cmd: dict[str, Any], timeout: float = 5.0) -> dict[str, Any]:
        """Commit ``cmd`` and return its result; ConsensusError if the outcome is not known.

        Group commit: commands proposed in the same turn of the event loop travel in one
        Raft entry (a ``batch``), each getting its own result back."""
        fut: asyncio.Future[dict[str, Any]] = self._loop.create_future()
        if not self._queued:
            self._loop.call_soon(self._flush)
        self._queued.append((cmd, fut))
        try:
            return await asyncio.wait_for(asyncio.shield(fut), timeout)
        except asyncio.TimeoutError:
            raise ConsensusError(f"no commit within {timeout:g} s") from None

    def _flush(self) -> None:
        queued, self._queued = self._queued, []
        if len(queued) == 1:
            cmd, fut = queued[0]
            self.replica.apply(cmd, callback=lambda result, err: self._loop.call_soon_threadsafe(
                _settle, fut, result, err))
            return
        for start in range(0, len(queued), MAX_BATCH):
            group = queued[start:start + MAX_BATCH]

            def done(result: Any, err: int, group: list[tuple[dict[str, Any], asyncio.Future[Any]]] = group) -> None:
                self._loop.call_soon_threadsafe(_settle_group, group, result, err)

            self.replica.apply({"op": "batch", "cmds": [cmd for cmd, _ in group]}, callback=done)

    # -- reads ------------------------------------------------------------------------

    @contextmanager
    def reading(self) -> Iterator[State]:
        """Hold the apply lock while reading the state (keep it short)."""
        with self.replica.lock:
            yield self.replica.state

    def is_leader(self) -> bool:
        return bool(self._sync._isLeader())

    def term(self) -> int:
        return int(self._sync.raftCurrentTerm)

    async def change_membership(self, action: str, raft_addr: str, timeout: float = 10.0) -> None:
        """Add or remove one voter (pysyncobj dynamic membership); call on the leader, one at a time."""
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
        }

    def close(self) -> None:
        logging.getLogger("pysyncobj").removeHandler(self.truncations)
        self._sync.destroy()

    async def aclose(self) -> None:
        """Destroy and wait until pysyncobj's thread and sockets are gone (before a role change)."""
        logging.getLogger("pysyncobj").removeHandler(self.truncations)
        await asyncio.to_thread(self._sync.destroy_synchronous)


def _settle_group(group: list[tuple[dict[str, Any], asyncio.Future[Any]]], result: Any, err: int) -> None:
    results = result.get("results") if err == FAIL_REASON.SUCCESS and isinstance(result, dict) else None
    if err == FAIL_REASON.SUCCESS and (not isinstance(results, list) or len(results) != len(group)):
        err, results = FAIL_REASON.REQUEST_DENIED, None  # pragma: no cover - a batch always answers each
    for k, (_, fut) in enumerate(group):
        _settle(fut, results[k] if results is not None else None, err)


def _settle(fut: asyncio.Future[dict[str, Any]], result: Any, err: int) -> None:
    if fut.done():
        return
    if err == FAIL_REASON.SUCCESS:
        fut.set_result(result)
    else:
        fut.set_exception(ConsensusError(_FAIL_NAMES.get(err, str(err)).lower()))
