"""Atomic file writes: write to a temp file beside the target, fsync, rename."""

from __future__ import annotations

import hashlib
import itertools
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO


@contextmanager
def atomic_writer(path: str | os.PathLike[str], mode: int = 0o644, durable: bool = True) -> Iterator[BinaryIO]:
    """Yield a binary file; on clean exit it is fsynced (unless not ``durable``) and renamed
    onto ``path``.

    On an exception the temp file is removed and ``path`` is untouched, so a reader
    never sees a partial file. Intermediate files that the party can recompute (map and
    reduce outputs) skip the fsync: after a power cut they are redone, like Raft's own
    state, which pysyncobj does not fsync either.
    """
    target = Path(path)
    fd, tmp = _create_temp(target)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            if durable:
                os.fsync(f.fileno())
            os.fchmod(f.fileno(), mode)
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


_serial = itertools.count()


def _create_temp(target: Path) -> tuple[int, str]:
    """A new temp file beside ``target``, named by process and a counter (cheaper than
    mkstemp's random names, which cost a noticeable share of a small map task)."""
    while True:
        tmp = str(target.parent / f".{target.name}.{os.getpid()}.{next(_serial)}.tmp")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), tmp
        except FileExistsError:  # left by an earlier process with the same pid
            continue


def atomic_write(path: str | os.PathLike[str], data: bytes | Iterable[bytes], mode: int = 0o644,
                 durable: bool = True) -> None:
    """Write ``data`` (bytes or an iterable of bytes) to ``path`` atomically."""
    with atomic_writer(path, mode, durable) as f:
        if isinstance(data, (bytes, bytearray, memoryview)):
            f.write(data)
        else:
            for part in data:
                f.write(part)


def sha256_file(path: str | Path) -> str:
    """The SHA-256 of a file's bytes, hex."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()
