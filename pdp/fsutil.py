"""Atomic file writes: write to a temp file beside the target, fsync, rename."""

from __future__ import annotations

import hashlib
import os
import tempfile
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
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


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
