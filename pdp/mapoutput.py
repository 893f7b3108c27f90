"""Map output files: one file per map task holding all its reduce partitions.

Creating a file costs far more than writing a few KiB here (about 0.6 ms on the test VM),
so a map writes one file, not one per partition (Hadoop's map output file with an index)::

    b"PDPM" | n (u32) | n + 1 offsets (u64, from the file's start) | partition 0 | ... | n - 1

A reducer takes its partition's slice from every map output; slices fetched from other
members are concatenated into one file per request. The reduce functions read
*sources*: ``(path, r)`` is partition ``r`` of a map output file, ``(path, -1)`` a file of
concatenated partitions.
"""

from __future__ import annotations

import struct
from typing import BinaryIO

from pdp.errors import PdpError
from pdp.fsutil import atomic_writer

MAGIC = b"PDPM"
Source = tuple[str, int]


def write(path: str, parts: list[bytes]) -> None:
    """Write the partitions of one map task (atomically; not fsynced: it can be recomputed)."""
    n = len(parts)
    offsets, pos = [], 8 + 8 * (n + 1)
    for part in parts:
        offsets.append(pos)
        pos += len(part)
    offsets.append(pos)
    with atomic_writer(path, durable=False) as f:
        f.write(MAGIC + struct.pack(f"<I{n + 1}Q", n, *offsets))
        for part in parts:
            f.write(part)


def _slice(f: BinaryIO, path: str, r: int) -> tuple[int, int]:
    head = f.read(8)
    if len(head) != 8 or head[:4] != MAGIC:
        raise PdpError(f"{path} is not a map output file")
    (n,) = struct.unpack("<I", head[4:])
    if not 0 <= r < n:
        raise PdpError(f"{path} has {n} partitions, not {r + 1}")
    f.seek(8 + 8 * r)
    start, end = struct.unpack("<2Q", f.read(16))
    return start, end


def size(path: str, r: int) -> int:
    """Bytes of partition ``r`` of a map output file."""
    with open(path, "rb") as f:
        start, end = _slice(f, path, r)
    return end - start


def read(path: str, r: int) -> bytes:
    """Partition ``r`` of a map output file; ``r == -1``: the whole file (concatenated partitions)."""
    with open(path, "rb") as f:
        if r < 0:
            return f.read()
        start, end = _slice(f, path, r)
        f.seek(start)
        data = f.read(end - start)
    if len(data) != end - start:
        raise PdpError(f"{path} is truncated")
    return data
