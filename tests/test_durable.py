"""pdp.raft.durable on real pysyncobj journals, and pdp.fsutil's durable writes.

"On disk" is checked the only way a test can: the fsyncs are counted (``os.fsync`` patched,
each call resolved to the file it flushed) and the bytes are read back fresh from the
file, by path, with pysyncobj's own record format.
"""

from __future__ import annotations

import os
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pysyncobj import SyncObj, SyncObjConf, SyncObjConsumer, replicated
from pysyncobj import serializer as psy_serializer
from pysyncobj.journal import FIRST_RECORD_OFFSET, LAST_RECORD_OFFSET_OFFSET, FileJournal, MemoryJournal
from pysyncobj.pickle import loads
from pysyncobj.transport import TCPTransport

from pdp import fsutil
from pdp.raft.durable import DurableJournal, JournalProxy, durable_replace, install_durable_dumps, make_durable
from pdp.local import free_ports


class FsyncLog:
    """Every os.fsync call, as the path of the file or directory it flushed."""

    def __init__(self) -> None:
        self.paths: list[str] = []
        self.lock = threading.Lock()

    def __call__(self, fd: int) -> None:
        with self.lock:
            self.paths.append(os.path.realpath(os.readlink(f"/proc/self/fd/{fd}")))
        _real_fsync(fd)

    def count(self, path: str | Path) -> int:
        want = os.path.realpath(path)
        with self.lock:
            return sum(p == want for p in self.paths)

    def clear(self) -> None:
        with self.lock:
            self.paths.clear()


_real_fsync = os.fsync


@pytest.fixture
def fsyncs(monkeypatch: pytest.MonkeyPatch) -> Iterator[FsyncLog]:
    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("needs /proc to name the fsynced files")
    log = FsyncLog()
    monkeypatch.setattr(os, "fsync", log)
    yield log


def on_disk_entries(path: Path) -> list[tuple[bytes, int, int]]:
    """The journal's records read fresh from the file (pysyncobj's format), not via its mmap."""
    raw = path.read_bytes()
    (last,) = struct.unpack("<I", raw[LAST_RECORD_OFFSET_OFFSET:LAST_RECORD_OFFSET_OFFSET + 4])
    out, pos = [], FIRST_RECORD_OFFSET
    while pos < last:
        (size,) = struct.unpack("<I", raw[pos:pos + 4])
        rec = raw[pos + 4:pos + 4 + size]
        idx, term = struct.unpack("<QQ", rec[:16])
        out.append((bytes(rec[16:]), idx, term))
        pos += size + 8
    return out


def on_disk_meta(path: Path) -> dict[str, Any]:
    return dict(loads(Path(str(path) + ".meta").read_bytes()))


@pytest.fixture
def journal(tmp_path: Path) -> Iterator[tuple[DurableJournal, Path]]:
    path = tmp_path / "raft" / "raft.journal"
    path.parent.mkdir()
    j = make_durable(FileJournal(str(path)), dump_file=str(tmp_path / "raft" / "raft.dump"))
    yield j, path
    j._destroy()


def test_add_then_flush_puts_entries_on_disk(journal: tuple[DurableJournal, Path], fsyncs: FsyncLog) -> None:
    j, path = journal
    j.flush()  # a new journal file: its directory entry first
    assert fsyncs.count(path) == 1 and fsyncs.count(path.parent) == 1
    fsyncs.clear()
    for idx in range(1, 6):
        j.add(b"cmd%d" % idx, idx, 1)
    assert j.dirty and fsyncs.count(path) == 0  # nothing fsynced before the flush
    j.flush()
    assert not j.dirty
    assert fsyncs.count(path) == 1
    assert on_disk_entries(path) == [(b"cmd%d" % i, i, 1) for i in range(1, 6)]
    assert len(j) == 5 and j[-1] == (b"cmd5", 5, 1)  # still reads as the journal


def test_clean_flush_costs_no_fsync(journal: tuple[DurableJournal, Path], fsyncs: FsyncLog) -> None:
    j, _ = journal
    j.add(b"x", 1, 1)
    j.flush()
    fsyncs.clear()
    for _ in range(100):
        j.flush()
    assert fsyncs.paths == []


def test_term_and_vote_durable_before_a_message(journal: tuple[DurableJournal, Path], fsyncs: FsyncLog) -> None:
    j, path = journal
    j.flush()
    fsyncs.clear()
    j.setCurrentTerm(7, "10.0.0.2:7701")
    meta = Path(str(path) + ".meta")
    assert fsyncs.paths == [os.path.realpath(str(meta) + ".tmp")]  # the temp file, before its rename
    assert on_disk_meta(path) == {"currentTerm": 7, "votedForNodeId": "10.0.0.2:7701"}
    assert j.dirty  # the rename is not durable until its directory is fsynced
    j.flush()  # what the transport's before_send hook does before the vote leaves
    assert fsyncs.count(path.parent) == 1 and not j.dirty
    again = FileJournal(str(path))  # a restart reads them back
    assert (again.getCurrentTerm(), again.getVotedForNodeId()) == (7, "10.0.0.2:7701")
    again._destroy()


def test_commit_index_is_recorded_and_saved_by_the_timer(journal: tuple[DurableJournal, Path],
                                                         fsyncs: FsyncLog) -> None:
    j, path = journal
    j.add(b"a", 1, 1)
    j.setRaftCommitIndex(1)
    assert j.commit_dirty
    j.onOneSecondTimer()  # pysyncobj's own timer stores it, now fsynced
    assert not j.commit_dirty and on_disk_meta(path)["raftCommitIndex"] == 1
    assert len(fsyncs.paths) == 1


def test_truncation_is_durable(journal: tuple[DurableJournal, Path], fsyncs: FsyncLog) -> None:
    j, path = journal
    for idx in range(1, 11):
        j.add(b"e%d" % idx, idx, 2)
    j.flush()
    j.deleteEntriesFrom(4)
    j.add(b"new", 5, 3)
    j.flush()
    assert on_disk_entries(path) == [(b"e1", 1, 2), (b"e2", 2, 2), (b"e3", 3, 2), (b"e4", 4, 2), (b"new", 5, 3)]


def test_compaction_fsyncs_the_dump_first(journal: tuple[DurableJournal, Path], fsyncs: FsyncLog) -> None:
    j, path = journal
    dump = path.parent / "raft.dump"
    dump.write_bytes(b"snapshot")
    for idx in range(1, 6):
        j.add(b"e", idx, 1)
    j.flush()
    fsyncs.clear()
    j.deleteEntriesTo(3)
    assert fsyncs.paths[:2] == [os.path.realpath(dump), os.path.realpath(path.parent)]
    j.flush()
    assert [e[1] for e in on_disk_entries(path)] == [4, 5]


def test_journal_grows_past_its_first_mapping(journal: tuple[DurableJournal, Path]) -> None:
    j, path = journal
    big = os.urandom(3000)  # the file starts at 1 KiB: it is resized and re-mapped
    for idx in range(1, 21):
        j.add(big, idx, 1)
        j.flush()
    assert [e[1] for e in on_disk_entries(path)] == list(range(1, 21))


def test_memory_journal_flush_does_nothing(fsyncs: FsyncLog) -> None:
    j = make_durable(MemoryJournal())
    j.add(b"a", 1, 1)
    j.setCurrentTerm(2, None)
    j.flush()
    assert fsyncs.paths == [] and len(j) == 1 and j.getCurrentTerm() == 2
    assert make_durable(j) is j


def test_durable_dump_replace(tmp_path: Path, fsyncs: FsyncLog, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(psy_serializer, "atomicReplace", psy_serializer.atomicReplace)  # undone after the test
    install_durable_dumps()
    install_durable_dumps()
    assert psy_serializer.atomicReplace is durable_replace
    src, dst = tmp_path / "d.tmp", tmp_path / "d"
    src.write_bytes(b"state")
    psy_serializer.atomicReplace(str(src), str(dst))
    assert dst.read_bytes() == b"state" and not src.exists()
    assert fsyncs.paths == [os.path.realpath(src), os.path.realpath(tmp_path)]  # the data before the rename


# -- fsutil -------------------------------------------------------------------------------------


def test_atomic_write_fsyncs_file_then_directory(tmp_path: Path, fsyncs: FsyncLog) -> None:
    target = tmp_path / "out"
    fsutil.atomic_write(target, b"data")
    assert target.read_bytes() == b"data"
    assert len(fsyncs.paths) == 2 and fsyncs.paths[1] == os.path.realpath(tmp_path)
    assert target.stat().st_mode & 0o777 == 0o600
    fsyncs.clear()
    fsutil.atomic_write(target, b"again", durable=False)
    assert fsyncs.paths == []
    fsutil.atomic_write(target, b"shared", mode=0o644)
    assert target.stat().st_mode & 0o777 == 0o644
    fsyncs.clear()
    fsutil.atomic_write(target, b"later", sync_dir=False)  # a sidecar: the next rename's fsync covers it
    assert len(fsyncs.paths) == 1 and fsyncs.count(tmp_path) == 0  # the data only, not the directory


def test_atomic_writer_leaves_nothing_on_error(tmp_path: Path) -> None:
    target = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with fsutil.atomic_writer(target) as f:
            f.write(b"half")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_make_dir_modes_and_fsyncs(tmp_path: Path, fsyncs: FsyncLog) -> None:
    old = os.umask(0o022)
    try:
        made = fsutil.make_dir(tmp_path / "a" / "b")
    finally:
        os.umask(old)
    assert made.is_dir()
    assert (tmp_path / "a").stat().st_mode & 0o777 == 0o700
    assert (tmp_path / "a" / "b").stat().st_mode & 0o777 == 0o700
    assert fsyncs.count(tmp_path) == 1 and fsyncs.count(tmp_path / "a") == 1
    fsyncs.clear()
    fsutil.make_dir(tmp_path / "a" / "b")  # exists: nothing to do
    assert fsyncs.paths == []


# -- a real 3-node group: no acknowledgement before its entries are on disk ----------------------


class _Hooked(TCPTransport):
    before_send: Any = None

    def send(self, node: Any, message: Any) -> bool:
        if self.before_send is not None:
            self.before_send(message)
        return bool(super().send(node, message))


class _Counter(SyncObjConsumer):
    def __init__(self) -> None:
        super().__init__()
        self.n = 0

    @replicated
    def add(self) -> int:
        self.n += 1
        return self.n


def test_three_nodes_ack_only_what_is_on_disk(tmp_path: Path) -> None:
    """Every success ack a follower sends names entries already in its journal *file*."""
    addrs = [f"127.0.0.1:{p}" for p in free_ports(3)]
    nodes, problems, acks = [], [], [0]
    for i, addr in enumerate(addrs):
        conf = SyncObjConf(password="test", journalFile=str(tmp_path / f"j{i}"), fullDumpFile=str(tmp_path / f"d{i}"),
                           appendEntriesUseBatch=False, raftMinTimeout=0.4, raftMaxTimeout=0.9,
                           connectionRetryTime=0.5)
        counter = _Counter()
        sync = SyncObj(addr, [a for a in addrs if a != addr], conf, consumers=[counter], transportClass=_Hooked)
        journal = make_durable(sync._SyncObj__raftLog, dump_file=conf.fullDumpFile)
        sync._SyncObj__raftLog = journal
        path = Path(conf.journalFile)

        def hook(message: Any, journal: DurableJournal = journal, path: Path = path) -> None:
            journal.flush()
            if isinstance(message, dict) and message.get("type") == "next_node_idx" and message.get("success"):
                acks[0] += 1
                on_disk = {e[1] for e in on_disk_entries(path)}
                if message["next_node_idx"] - 1 not in on_disk:
                    problems.append(message)

        sync._SyncObj__transport.before_send = hook
        nodes.append((sync, counter))
    try:
        deadline = time.monotonic() + 20
        while not any(s._isLeader() for s, _ in nodes):
            assert time.monotonic() < deadline, "no leader"
            time.sleep(0.05)
        sync, counter = next((s, c) for s, c in nodes if s._isLeader())
        for _ in range(30):
            assert counter.add(sync=True, timeout=10) is not None
        assert acks[0] >= 30 and problems == []
    finally:
        for s, _ in nodes:
            s.destroy()


class _Watch(JournalProxy):
    """Like consensus's _DivergenceWatch: a wrapper keeping the journal in ``_journal``."""

    def __init__(self, journal: Any) -> None:
        self._journal = journal
        self.added = 0

    def add(self, command: Any, idx: int, term: int) -> None:
        self.added += 1
        self._journal.add(command, idx, term)


def test_wraps_a_wrapper_either_way(tmp_path: Path, fsyncs: FsyncLog) -> None:
    path = tmp_path / "raft.journal"
    watch = _Watch(FileJournal(str(path)))
    outer = make_durable(watch)  # durable around the watch: calls still go through the watch
    outer.add(b"a", 1, 1)
    outer.flush()
    assert watch.added == 1 and on_disk_entries(path) == [(b"a", 1, 1)] and fsyncs.count(path) == 1
    inner = _Watch(make_durable(FileJournal(str(tmp_path / "other.journal"))))  # the watch around it
    inner.add(b"b", 1, 1)
    inner.flush()  # reaches DurableJournal.flush through the watch's __getattr__
    assert on_disk_entries(tmp_path / "other.journal") == [(b"b", 1, 1)]
    outer._destroy()
    inner._destroy()
