"""Map output files: one file per map task holding all its reduce partitions.

Creating a file costs far more than writing a few KiB here (about 0.6 ms on the test VM),
so a map writes one file, not one per partition (Hadoop's map output file with an index)::

    b"PDM2" | n (u32) | n + 1 offsets (u64, from the file's start) | n CRC-32s (u32)
            | partition 0 | ... | n - 1

Each partition's CRC-32 (zlib) is computed when the map writes it. A member serving a
partition sends the stored CRC with it (:func:`read_part`); the receiver checks the bytes
against it, and a local reader checks them on reading (:func:`read`), so a flipped bit on
disk fails that map output (it runs again) instead of changing a count.

A reducer takes its partition's slice from every map output; slices fetched from other
members are concatenated into one file per request (checked as they arrived). The reduce
functions read *sources*: ``(path, r)`` is partition ``r`` of a map output file,
``(path, -1)`` a file of concatenated partitions.
"""

from __future__ import annotations

import contextlib
import os
import struct
import tempfile
import zlib
from collections.abc import Callable, Iterable
from typing import Any, BinaryIO

from pdp.errors import PdpError
from pdp.fsutil import FILE_MODE, Damaged, atomic_writer

MAGIC = b"PDM2"
MAX_PARTITIONS = 1 << 16
Source = tuple[str, int]


def write(path: str, parts: list[bytes]) -> None:
    """Write the partitions of one map task with their CRCs (atomically; not fsynced: it
    can be recomputed)."""
    n = len(parts)
    offsets, pos = [], 8 + 12 * n + 8
    for part in parts:
        offsets.append(pos)
        pos += len(part)
    offsets.append(pos)
    crcs = [zlib.crc32(part) for part in parts]
    with atomic_writer(path, durable=False) as f:
        f.write(MAGIC + struct.pack(f"<I{n + 1}Q{n}I", n, *offsets, *crcs))
        for part in parts:
            f.write(part)


def write_runs(path: str, n: int, parts: Iterable[Any], write_run: Callable[[BinaryIO, Any], int]) -> int:
    """Write a map output file of ``n`` streamed partitions: ``write_run(f, records)`` writes
    each at the file's position and returns its record count. The CRCs are computed from
    the file afterwards (it is in the page cache) and the index is written last. Returns
    the records written."""
    count, offsets = 0, []
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=".map-")
    try:
        with os.fdopen(fd, "w+b") as f:
            f.write(b"\0" * (8 + 12 * n + 8))
            for records in parts:
                offsets.append(f.tell())
                count += write_run(f, records)
            offsets.append(f.tell())
            if len(offsets) != n + 1:
                raise ValueError(f"{len(offsets) - 1} partitions written, {n} announced")
            f.flush()
            crcs = [_crc_range(f.fileno(), offsets[r], offsets[r + 1]) for r in range(n)]
            f.seek(0)
            f.write(MAGIC + struct.pack(f"<I{n + 1}Q{n}I", n, *offsets, *crcs))
            os.fchmod(f.fileno(), FILE_MODE)
        os.replace(tmp, path)  # not fsynced: a map output can be recomputed
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return count


def _crc_range(fd: int, start: int, end: int) -> int:
    crc = 0
    while start < end:
        block = os.pread(fd, min(1 << 20, end - start), start)
        if not block:
            raise PdpError("a map output file is truncated")
        crc, start = zlib.crc32(block, crc), start + len(block)
    return crc


def offset(path: str, r: int) -> int:
    """Where partition ``r`` of a map output file starts."""
    with open(path, "rb") as f:
        return _slice(f, path, r)[0]


def _slice(f: BinaryIO, path: str, r: int) -> tuple[int, int, int]:
    """(start, end, stored CRC) of partition ``r``."""
    head = f.read(8)
    if len(head) != 8 or head[:4] != MAGIC:
        raise PdpError(f"{path} is not a map output file")
    (n,) = struct.unpack("<I", head[4:])
    if not 0 <= r < n or n > MAX_PARTITIONS:
        raise PdpError(f"{path} has {n} partitions, not {r + 1}")
    f.seek(8 + 8 * r)
    start, end = struct.unpack("<2Q", f.read(16))
    f.seek(8 + 8 * (n + 1) + 4 * r)
    (crc,) = struct.unpack("<I", f.read(4))
    if not 8 + 12 * n + 8 <= start <= end:
        raise Damaged(f"{path}: the index of partition {r} is damaged")
    return start, end, crc


def size(path: str, r: int) -> int:
    """Bytes of partition ``r`` of a map output file."""
    with open(path, "rb") as f:
        start, end, _ = _slice(f, path, r)
    return end - start


def read_part(path: str, r: int) -> tuple[bytes, int]:
    """Partition ``r`` of a map output file and the CRC stored for it (not checked here:
    the receiver checks it, end to end)."""
    with open(path, "rb") as f:
        start, end, crc = _slice(f, path, r)
        f.seek(start)
        data = f.read(end - start)
    if len(data) != end - start:
        raise PdpError(f"{path} is truncated")
    return data, crc


def read(path: str, r: int) -> bytes:
    """Partition ``r`` of a map output file, checked against its CRC (:class:`Damaged` if
    it does not match); ``r == -1``: the whole file (concatenated partitions, checked when
    they were fetched)."""
    if r < 0:
        with open(path, "rb") as f:
            return f.read()
    data, crc = read_part(path, r)
    if zlib.crc32(data) != crc:
        raise Damaged(f"{path}: partition {r} is damaged (CRC mismatch)")
    return data


def check(path: str, r: int) -> None:
    """Raise :class:`Damaged` (or PdpError, FileNotFoundError) unless partition ``r`` of
    the map output file is intact (read in blocks, never whole)."""
    with open(path, "rb") as f:
        start, end, crc = _slice(f, path, r)
        if os.fstat(f.fileno()).st_size < end:
            raise PdpError(f"{path} is truncated")
        if _crc_range(f.fileno(), start, end) != crc:
            raise Damaged(f"{path}: partition {r} is damaged (CRC mismatch)")


def damaged(outputs: list[tuple[int, str]], r: int) -> list[int]:
    """The maps (of ``(map index, map output file)``) whose partition ``r`` is damaged or
    unreadable here."""
    bad = []
    for m, path in outputs:
        try:
            check(path, r)
        except (OSError, PdpError):
            bad.append(m)
    return bad
