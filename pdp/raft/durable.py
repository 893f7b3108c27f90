"""Raft state that survives a power cut: term, vote and log entries on disk before any
message that reflects them leaves this member.

pysyncobj 0.3.17's ``FileJournal`` writes log entries into an ``mmap`` it never flushes, and
its ``MetaStorer`` (``currentTerm``, ``votedForNodeId``, ``raftCommitIndex``) writes a temp
file and renames it without any fsync. Both survive a killed process (the page cache
stays), not a machine that loses power: a follower could acknowledge an entry, lose it,
and let a committed entry vanish; a voter could forget its vote and vote twice in a term.

:func:`make_durable` wraps the journal a ``SyncObj`` created. The wrapper records what is
dirty (``add``, ``deleteEntriesFrom``, ``deleteEntriesTo``, ``clear`` dirty the log;
``setCurrentTerm`` the meta file; ``setRaftCommitIndex`` the commit index) and
:meth:`DurableJournal.flush` makes it durable: ``msync`` of the journal's mmap, ``fsync``
of the journal file, and of the directory when the meta file was replaced. The meta file
itself is written temp-fsync-rename, so it is never found torn; it is written at once by
``setCurrentTerm`` (as pysyncobj does) and the commit index is saved by pysyncobj's own
one-second timer (it is not needed for safety: a lower one after a restart only delays
applying entries). A clean flush costs one attribute test, so calling it before every
message is cheap. Log compaction (``deleteEntriesTo``) and snapshot installs (``clear``)
first fsync the dump file they rely on; :func:`install_durable_dumps` also makes
pysyncobj's dump writes themselves durable (fsync, rename, fsync the directory).

Plugging it in (``pdp/raft/consensus.py``, ``Consensus.__init__``): hand the transport a hook
that flushes the journal, and wrap the journal right after the ``SyncObj`` is built, under
the ``_DivergenceWatch``::

    transport_class = raftnet.make_transport_class(bridge, on_refused=on_refused,
                                                   before_send=lambda: self.durable.flush())
    self._sync = SyncObj(...)                                  # as now
    install_durable_dumps()
    self.durable = make_durable(self._sync._SyncObj__raftLog, dump_file=conf.fullDumpFile)
    self.divergence = _DivergenceWatch(self.durable, ...)      # instead of the bare journal

Until ``self.durable`` is set the hook raises, and the transport then drops the message
(``before_send failed: not sending``): nothing leaves before the journal is durable. Chain
the caller's own ``before_send`` after the flush if one is given.

Everything runs on pysyncobj's tick thread (the journal is only touched there). A leader
needs no extra call: it sends ``append_entries`` right after adding an entry, and an entry
commits only after some follower acknowledged it, so the leader's copy is flushed first.
A group of one sends nothing: call ``flush`` from an ``addOnTickCallback`` there too.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

from pysyncobj.journal import FileJournal, MetaStorer
from pysyncobj.pickle import dumps

from pdp.fsutil import fsync_dir, fsync_fd, fsync_file

__all__ = ["DurableJournal", "DurableMetaStorer", "install_durable_dumps", "make_durable"]


class DurableMetaStorer(MetaStorer):
    """pysyncobj's meta file writer, fsyncing the temp file before the rename (never torn)."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.renamed = False  # the directory needs an fsync to make the last rename durable

    def storeMeta(self, meta: dict[str, Any]) -> None:  # noqa: N802 (pysyncobj's name)
        path = self.getPath()
        with open(path + ".tmp", "wb") as f:
            f.write(dumps(meta))
            f.flush()
            fsync_fd(f.fileno())
        os.replace(path + ".tmp", path)
        self.renamed = True


class JournalProxy:
    """Stands in for a wrapped pysyncobj journal (``self._journal``): what a subclass does not
    override is the wrapped journal's."""

    _journal: Any

    def __getitem__(self, item: Any) -> Any:
        return self._journal[item]

    def __len__(self) -> int:
        return len(self._journal)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._journal, name)


class DurableJournal(JournalProxy):
    """A pysyncobj journal whose writes become durable on :meth:`flush` (see the module doc).

    Every other attribute is the wrapped journal's, so it stands in for it anywhere."""

    def __init__(self, journal: Any, dump_file: str | None = None) -> None:
        self._journal = journal
        self._dump_file = dump_file
        inner = _file_journal(journal)
        self._inner = inner
        self._meta: DurableMetaStorer | None = None
        if inner is not None:
            self._meta = DurableMetaStorer(inner._FileJournal__metaStorer.getPath())
            inner._FileJournal__metaStorer = self._meta
        self.log_dirty = inner is not None  # the journal file may be new: its entry too
        self._dir_synced = False
        self.commit_dirty = False
        self.flushes = 0  # flushes that wrote something (for tests and status)

    # -- writes that dirty the log ------------------------------------------------------

    def add(self, command: Any, idx: int, term: int) -> None:
        self._journal.add(command, idx, term)
        self.log_dirty = True

    def deleteEntriesFrom(self, entryFrom: int) -> None:  # noqa: N802,N803 (pysyncobj's names)
        self._journal.deleteEntriesFrom(entryFrom)
        self.log_dirty = True

    def deleteEntriesTo(self, entryTo: int) -> None:  # noqa: N802,N803
        self._sync_dump()  # compaction drops entries only the dump holds from now on
        self._journal.deleteEntriesTo(entryTo)
        self.log_dirty = True

    def clear(self) -> None:
        self._sync_dump()  # a snapshot install: the dump replaces the whole log
        self._journal.clear()
        self.log_dirty = True

    # -- meta ---------------------------------------------------------------------------

    def setCurrentTerm(self, term: int, votedForNodeId: Any) -> None:  # noqa: N802,N803
        self._journal.setCurrentTerm(term, votedForNodeId)  # stored at once, fsynced (DurableMetaStorer)

    def setRaftCommitIndex(self, raftCommitIndex: int) -> None:  # noqa: N802,N803
        self._journal.setRaftCommitIndex(raftCommitIndex)
        self.commit_dirty = True

    def onOneSecondTimer(self) -> None:  # noqa: N802
        self._journal.onOneSecondTimer()  # saves the commit index if it changed
        self.commit_dirty = False

    # -- durability ---------------------------------------------------------------------

    @property
    def dirty(self) -> bool:
        """Something that must be on disk before the next message is not yet."""
        return self.log_dirty or (self._meta is not None and self._meta.renamed)

    def flush(self) -> None:
        """Make the log and the meta file durable (msync + fsync; the directory after a new
        file or a rename). Cheap when nothing changed; call it before sending any message."""
        if not self.dirty:
            return
        if self._inner is None:  # an in-memory journal: nothing to flush
            self.log_dirty = False
            return
        rfile = self._inner._FileJournal__journalFile  # looked up each time: a resize may re-open it
        sync_dir = not self._dir_synced
        if self.log_dirty:
            rfile._ResizableFile__mm.flush()  # msync: the mmap's dirty pages
            fsync_fd(rfile._ResizableFile__f.fileno())  # and the file's size and metadata
            self.log_dirty = False
        if self._meta is not None and self._meta.renamed:
            self._meta.renamed = False
            sync_dir = True
        if sync_dir:
            fsync_dir(Path(rfile._ResizableFile__fileName).parent)
            self._dir_synced = True
        self.flushes += 1

    def _sync_dump(self) -> None:
        if self._dump_file and os.path.exists(self._dump_file):
            fsync_file(self._dump_file)
            fsync_dir(Path(self._dump_file).parent)

    def _destroy(self) -> None:
        self.flush()
        self._journal._destroy()



def make_durable(journal: Any, dump_file: str | None = None) -> DurableJournal:
    """Wrap a SyncObj's journal (``sync._SyncObj__raftLog``: a pysyncobj ``FileJournal``, or
    a wrapper of one that keeps it in ``_journal`` such as consensus's ``_DivergenceWatch``;
    a ``MemoryJournal`` gets a wrapper whose flush does nothing) so that :meth:`flush`
    makes it durable. Calls go to ``journal`` itself. ``dump_file``: the SyncObj's
    ``fullDumpFile``, fsynced before the log is compacted against it. Wrapping twice
    returns the same wrapper."""
    if isinstance(journal, DurableJournal):
        return journal
    return DurableJournal(journal, dump_file)


def _file_journal(journal: Any) -> FileJournal | None:
    """The pysyncobj FileJournal inside ``journal`` (following ``_journal`` attributes)."""
    for _ in range(8):
        if isinstance(journal, FileJournal):
            return journal
        journal = vars(journal).get("_journal") if hasattr(journal, "__dict__") else None
        if journal is None:
            return None
    return None


_dumps_lock = threading.Lock()


def durable_replace(src: str, dst: str) -> None:
    """Rename ``src`` onto ``dst`` durably: fsync ``src``, rename, fsync the directory."""
    fsync_file(src)
    os.replace(src, dst)
    fsync_dir(Path(dst).parent or ".")


def install_durable_dumps() -> None:
    """Make pysyncobj write its dump files (log compaction, received snapshots) durably.

    pysyncobj's serializer renames a freshly written dump over the old one without an
    fsync; after a power cut the new name could hold no data while the log has already
    been compacted against it. This replaces the serializer module's rename (inherited
    by the forked child that writes dumps). Idempotent; affects every SyncObj in the process."""
    from pysyncobj import serializer

    with _dumps_lock:
        if serializer.atomicReplace is not durable_replace:
            serializer.atomicReplace = durable_replace
