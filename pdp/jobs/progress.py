"""Task progress across the pool boundary: the task process writes a number to a small file,
the worker's heartbeat reads it (a file, because a pool call cannot carry a shared counter).

The same file carries a stop request the other way: when the worker creates ``<file>.stop``
(the job was cancelled, or another attempt of the task won), the next progress report in
the task process raises :class:`TaskAborted` and the task ends early."""

from __future__ import annotations

import os
import struct

_FMT = ">q"


class TaskAborted(Exception):
    """Raised inside a task whose worker asked it to stop."""


def report(path: str | None, value: int) -> None:
    """Called in the task process: record ``value`` (e.g. bytes processed so far)."""
    if path is None:
        return
    if os.path.exists(path + ".stop"):
        raise TaskAborted(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.pwrite(fd, struct.pack(_FMT, value), 0)
    finally:
        os.close(fd)


def request_stop(path: str) -> None:
    """Called by the worker: ask the task reporting to ``path`` to stop."""
    with open(path + ".stop", "w"):
        pass


def clear(path: str) -> None:
    """Called by the worker before a task starts with ``path``: no progress, no stop request,
    no status message (see :meth:`pdp.jobs.api.Reporter.set_status`)."""
    for name in (path, path + ".stop", path + ".status"):
        try:
            os.unlink(name)
        except FileNotFoundError:
            pass


def read(path: str) -> int:
    """Called by the worker: the last recorded value, 0 if none yet."""
    try:
        with open(path, "rb") as f:
            data = f.read(8)
    except FileNotFoundError:
        return 0
    return struct.unpack(_FMT, data)[0] if len(data) == 8 else 0
