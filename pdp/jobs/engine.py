"""The shuffle: sort buffers that spill sorted runs to disk, and the k-way merge that groups them.

Records are pairs of bytes ``(kb, vb)``: ``kb`` is the key in the order-preserving encoding
of :mod:`pdp.jobs.keys`, ``vb`` the value in msgpack (or, for a job with ``SORT_VALUES``, in
the order-preserving encoding too). Records sort by ``(kb, vb)``: keys in their stated
order and, within a key, values in a deterministic order (their natural order with
``SORT_VALUES``), so a job's output does not depend on how its input was split.

A **run** is a sorted sequence of records on disk::

    u64 (little-endian) body length | msgpack [kb, vb] | msgpack [kb, vb] | ...

The final step's reduce outputs carry a third field, the output line its job's output
protocol wrote (``[kb, vb, line]``), so that merging them into the result runs no job code.

A map output file (:mod:`pdp.jobs.mapoutput`) holds one run per reduce partition; a reducer
fetches its partition from every map (the fetched slices are concatenated runs, each
still self-delimiting) and merges them.

:class:`Sorter` is Hadoop's map-side sort buffer (``io.sort.mb``): pairs accumulate in
memory, grouped by key; when the buffer's estimated size passes its limit they are
combined (the job's combiner, if any), partitioned, sorted and spilled as runs; at the end
the spills are merged (combining again) into the output. Memory stays within about the
limit however much a task emits; :func:`merge_runs` merges any number of runs with a
bounded number open at once.
"""

from __future__ import annotations

import heapq
import os
import struct
import tempfile
from collections.abc import Callable, Iterable, Iterator
from itertools import groupby
from operator import itemgetter
from typing import Any, BinaryIO

import msgpack

from pdp.jobs import mapoutput
from pdp.jobs.keys import STR_TAG, decode_key, encode_key

Record = tuple[bytes, bytes]
Pairs = Iterable[tuple[Any, Any]]
Combine = Callable[[Any, Iterator[Any]], Pairs]
BLOCK = 1 << 16
MERGE_FACTOR = 64  # runs merged at once; more are merged in passes
_LEN = struct.Struct("<Q")
_SMALL = (int, float, bool, type(None))
_packb = msgpack.Packer(use_bin_type=True).pack


def encode_str_key(key: str) -> bytes:
    """The ordered encoding of a str key (the hot case, without the general codec's dispatch)."""
    if "\x00" in key:
        return encode_key(key)
    return STR_TAG + key.encode("utf-8") + b"\x00"


def value_coder(sort_values: bool) -> tuple[Callable[[Any], bytes], Callable[[bytes], Any]]:
    """(encode, decode) of values: msgpack, or the ordered encoding for SORT_VALUES."""
    if sort_values:
        return encode_key, decode_key
    return _packb, _unpack


def _unpack(data: bytes) -> Any:
    return msgpack.unpackb(data, raw=False, strict_map_key=False)


# -- runs on disk ------------------------------------------------------------------------------


def write_run(f: BinaryIO, records: Iterable[tuple[bytes, ...]]) -> int:
    """Write a run of (already sorted) records at the file's position; returns its record count.
    The file must be seekable (the body length is patched in at the end)."""
    start = f.tell()
    f.write(b"\0" * 8)
    if type(records) is list:  # all in memory: msgpack packs the list in C; its items are the run's body
        body = _packb(records)
        f.write(body[_array_header_size(body[0]):])
        end = f.tell()
        f.seek(start)
        f.write(_LEN.pack(end - start - 8))
        f.seek(end)
        return len(records)
    count, pack, pending, size = 0, _packb, [], 0
    for record in records:
        item = pack(record)
        pending.append(item)
        size += len(item)
        count += 1
        if size >= BLOCK:
            f.write(b"".join(pending))
            pending, size = [], 0
    f.write(b"".join(pending))
    end = f.tell()
    f.seek(start)
    f.write(_LEN.pack(end - start - 8))
    f.seek(end)
    return count


def _array_header_size(first: int) -> int:
    """Bytes of a msgpack array header, from its first byte (fixarray, array 16, array 32)."""
    return 1 if first & 0xF0 == 0x90 else 3 if first == 0xDC else 5


def read_run(path: str, offset: int = 0) -> Iterator[Any]:
    """The records ``(kb, vb)`` of the run at ``offset`` of ``path``, read in blocks."""
    with open(path, "rb") as f:
        f.seek(offset)
        head = f.read(8)
        if len(head) != 8:
            raise ValueError(f"{path}: no run at offset {offset}")
        (left,) = _LEN.unpack(head)
        unpacker = msgpack.Unpacker(raw=False, use_list=False, max_buffer_size=0)
        while left > 0:
            data = f.read(min(BLOCK, left))
            if not data:
                raise ValueError(f"{path}: run at offset {offset} is truncated")
            left -= len(data)
            unpacker.feed(data)
            yield from unpacker


def run_offsets(path: str) -> list[int]:
    """The offsets of the runs in a file of concatenated runs."""
    offsets, pos, size = [], 0, os.path.getsize(path)
    with open(path, "rb") as f:
        while pos < size:
            f.seek(pos)
            head = f.read(8)
            if len(head) != 8:
                raise ValueError(f"{path}: truncated run header at offset {pos}")
            offsets.append(pos)
            pos += 8 + _LEN.unpack(head)[0]
    if pos != size:
        raise ValueError(f"{path}: the last run overruns the file")
    return offsets


def source_runs(sources: list[tuple[str, int]]) -> list[tuple[str, int]]:
    """(file, offset) of every run in reduce sources: ``(map output, r)`` is partition r of a
    map output file, ``(file, -1)`` a file of fetched, concatenated partitions."""
    runs = []
    for path, r in sources:
        if r >= 0:
            runs.append((path, mapoutput.offset(path, r)))
        else:
            runs.extend((path, off) for off in run_offsets(path))
    return runs


def merge_runs(runs: list[tuple[str, int]], tmpdir: str) -> Iterator[Any]:
    """All records of the runs, in order; at most MERGE_FACTOR runs are open at once (more
    are first merged in passes into temporary runs in ``tmpdir``)."""
    temps: list[str] = []
    try:
        while len(runs) > MERGE_FACTOR:
            merged = []
            for k in range(0, len(runs), MERGE_FACTOR):
                group = runs[k:k + MERGE_FACTOR]
                fd, tmp = tempfile.mkstemp(dir=tmpdir, prefix="merge-")
                temps.append(tmp)
                with os.fdopen(fd, "wb") as f:
                    write_run(f, _merged(group))  # type: ignore[arg-type]
                merged.append((tmp, 0))
            runs = merged
        yield from _merged(runs)
    finally:
        for tmp in temps:
            os.unlink(tmp)


def _merged(runs: list[tuple[str, int]]) -> Iterator[Any]:
    if len(runs) == 1:
        return read_run(*runs[0])
    return heapq.merge(*(read_run(path, off) for path, off in runs))


def groups(records: Iterator[Record], decode_value: Callable[[bytes], Any]
           ) -> Iterator[tuple[Any, Iterator[Any]]]:
    """``(key, values)`` per key of sorted records, the values streamed (never all in memory)."""
    for kb, group in groupby(records, key=itemgetter(0)):
        yield decode_key(kb), (decode_value(r[1]) for r in group)


# -- the sort buffer ---------------------------------------------------------------------------


def _vsize(value: Any) -> int:
    """A rough size in memory of a buffered value (for the spill threshold)."""
    kind = type(value)
    if kind in _SMALL:
        return 16
    if kind is str or kind is bytes:
        return 40 + len(value)
    return 64 + len(_packb(value))


class Sorter:
    """Pairs in, sorted runs out: a bounded sort buffer that spills to ``tmpdir``.

    ``partition(kb, n)`` picks each record's run among ``n``; ``combine`` (the job's
    combiner) runs on each key's buffered values before they are spilled and again while
    spills merge; ``limit`` is the buffer's size in (estimated) bytes."""

    def __init__(self, n: int, limit: int, tmpdir: str, *, partition: Callable[[bytes, int], int] | None = None,
                 combine: Combine | None = None, sort_values: bool = False) -> None:
        self.n, self.limit, self.tmpdir = n, max(1, limit), tmpdir
        self.partition = partition if partition is not None and n > 1 else (lambda kb, n: 0)
        self.combine = combine
        self.encode_value, self.decode_value = value_coder(sort_values)
        self._str: dict[str, list[Any]] = {}  # str keys as they are (the common case: no encoding per record)
        self._enc: dict[bytes, list[Any]] = {}  # other keys, encoded
        self._size = 0
        self.spills: list[tuple[str, list[int]]] = []  # (file, offset of each partition's run)
        self.records_in = 0

    def add(self, key: Any, value: Any) -> None:
        """Buffer one pair (spilling when the buffer is full)."""
        if type(key) is str:
            buf: dict[Any, list[Any]] = self._str
        else:
            key, buf = encode_key(key), self._enc
        values = buf.get(key)
        if values is None:
            buf[key] = [value]
            self._size += 80 + len(key)
        else:
            values.append(value)
        self._size += _vsize(value)
        if self._size > self.limit:
            self.spill()

    def add_all(self, pairs: Pairs) -> None:
        add = self.add
        count = 0
        for key, value in pairs:
            add(key, value)
            count += 1
        self.records_in += count

    def _drain(self) -> list[list[Record]]:
        """The buffer's records, combined, partitioned and sorted; the buffer is emptied."""
        parts: list[list[Record]] = [[] for _ in range(self.n)]
        enc, part, n = self.encode_value, self.partition, self.n
        known: dict[bytes, int] = {}
        str_buf, enc_buf = self._str, self._enc
        self._str, self._enc, self._size = {}, {}, 0
        keyed: Iterator[tuple[Any, bytes, list[Any]]] = _chain_keys(str_buf, enc_buf)
        for key, kb, values in keyed:
            if self.combine is not None:
                for k2, v2 in self.combine(key, iter(values)) or ():
                    kb2 = encode_str_key(k2) if type(k2) is str else encode_key(k2)
                    r = known.get(kb2)
                    if r is None:
                        r = known[kb2] = part(kb2, n)
                    parts[r].append((kb2, enc(v2)))
            else:
                r = part(kb, n)
                parts[r].extend((kb, enc(v)) for v in values)
        for records in parts:
            records.sort()
        return parts

    def spill(self) -> None:
        """Write the buffer as one sorted run per partition to a spill file."""
        parts = self._drain()
        fd, path = tempfile.mkstemp(dir=self.tmpdir, prefix="spill-")
        offsets = []
        with os.fdopen(fd, "wb") as f:
            for records in parts:
                offsets.append(f.tell())
                write_run(f, records)
        self.spills.append((path, offsets))

    def partitions(self) -> Iterator[Iterator[Record]]:
        """Each partition's records in order (merging the spills, combining again)."""
        last = self._drain() if (self._str or self._enc) else [[] for _ in range(self.n)]
        for r in range(self.n):
            runs = [(path, offsets[r]) for path, offsets in self.spills]
            if not runs:
                yield iter(last[r])
                continue
            merged = heapq.merge(merge_runs(runs, self.tmpdir), last[r]) if last[r] else merge_runs(runs, self.tmpdir)
            yield self._recombine(merged) if self.combine is not None else merged

    def _recombine(self, records: Iterable[Any]) -> Iterator[Record]:
        """Combine equal keys once more while spills merge. A combiner is an optimisation that
        may run any number of times (as in Hadoop): where it yields another key than it was
        given, the records stay as they were, which keeps the merged run in order."""
        assert self.combine is not None
        for kb, group in groupby(records, key=itemgetter(0)):
            found = list(group)
            if len(found) == 1:
                yield found[0]
                continue
            out = [(encode_str_key(k2) if type(k2) is str else encode_key(k2), self.encode_value(v2))
                   for k2, v2 in self.combine(decode_key(kb), (self.decode_value(r[1]) for r in found)) or ()]
            if all(o[0] == kb for o in out):
                out.sort()
                yield from out
            else:
                yield from found

    def close(self) -> None:
        for path, _ in self.spills:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        self.spills = []

    def write_map_output(self, out_path: str) -> int:
        """Write every partition into one map output file; returns the records written."""
        try:
            return mapoutput.write_runs(out_path, self.n, self.partitions(), write_run)
        finally:
            self.close()

    def write_single_run(self, out_path: str, transform: Callable[[Iterator[Record]], Iterable[Any]] | None = None
                         ) -> int:
        """Write partition 0 as one run file (a reduce output), its records passed through
        ``transform`` if given; returns the records written."""
        assert self.n == 1
        from pdp.fsutil import atomic_writer

        try:
            records = next(iter(self.partitions()))
            with atomic_writer(out_path, durable=False) as f:
                return write_run(f, transform(records) if transform is not None else records)
        finally:
            self.close()


def _chain_keys(str_buf: dict[str, list[Any]], enc_buf: dict[bytes, list[Any]]
                ) -> Iterator[tuple[Any, bytes, list[Any]]]:
    """(key as the job sees it, encoded key, values) of every buffered key, emptying the
    buffers as it goes (so the buffered values and their records are not both held whole)."""
    while str_buf:
        key, values = str_buf.popitem()
        yield key, encode_str_key(key), values
    while enc_buf:
        kb, values = enc_buf.popitem()
        yield decode_key(kb), kb, values
