"""Task progress across the pool boundary: the task process writes a number to a small file,
the worker's heartbeat reads it (a file, because a pool call cannot carry a shared counter)."""

from __future__ import annotations

import os
import struct

_FMT = ">q"


def report(path: str | None, value: int) -> None:
    """Called in the task process: record ``value`` (e.g. bytes processed so far)."""
    if path is None:
        return
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.pwrite(fd, struct.pack(_FMT, value), 0)
    finally:
        os.close(fd)


def read(path: str) -> int:
    """Called by the worker: the last recorded value, 0 if none yet."""
    try:
        with open(path, "rb") as f:
            data = f.read(8)
    except FileNotFoundError:
        return 0
    return struct.unpack(_FMT, data)[0] if len(data) == 8 else 0
