"""Moving files over a stream: ``data`` frames of at most 1 MiB, then an ``end`` frame."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from pdp.errors import PdpError, ProtocolError
from pdp.fsutil import atomic_writer
from pdp.transport import Stream

BLOCK = 1024 * 1024


async def send_file(stream: Stream, path: Path, start: int = 0, end: int | None = None) -> int:
    """Send bytes [start, end) of ``path``; returns the count sent."""
    sent = 0
    with open(path, "rb") as f:
        f.seek(start)
        remaining = (end if end is not None else path.stat().st_size) - start
        while remaining > 0:
            block = f.read(min(BLOCK, remaining))
            if not block:
                break
            await stream.send({"t": "data"}, block)
            sent += len(block)
            remaining -= len(block)
    await stream.send({"t": "end", "size": sent})
    return sent


async def recv_file(stream: Stream, path: Path, timeout: float = 30.0, durable: bool = True) -> int:
    """Receive ``data`` frames into ``path`` (atomically) until ``end``; returns the size.
    ``durable=False`` for intermediate files the party can recompute (no fsync)."""
    size = 0
    with atomic_writer(path, durable=durable) as f:
        while True:
            frame = await stream.recv(timeout)
            kind = frame.header["t"]
            if kind == "data":
                f.write(frame.payload)
                size += len(frame.payload)
            elif kind == "end":
                if frame.header.get("size") != size:
                    raise ProtocolError(f"stream ended after {size} bytes, sender says {frame.header.get('size')}")
                return size
            else:
                raise ProtocolError(f"unexpected {kind!r} frame in a file stream")


async def relay(source: Stream, sink: Stream, timeout: float = 30.0) -> int:
    """Forward a file stream from ``source`` to ``sink`` unchanged; returns the size."""
    size = 0
    while True:
        frame = await source.recv(timeout)
        await sink.send(frame.header, frame.payload)
        if frame.header["t"] == "end":
            return size
        size += len(frame.payload)


async def send_parts(stream: Stream, parts: list[tuple[int, Callable[[], bytes]]]) -> None:
    """Send several map outputs' slices on one stream: each as ``data`` frames then ``eop``
    with its map index (or ``missing``), and a final ``end``."""
    for m, read in parts:
        try:
            data = read()
        except (FileNotFoundError, PdpError):
            await stream.send({"t": "missing", "map": m})
            continue
        for k in range(0, len(data), BLOCK):
            await stream.send({"t": "data"}, data[k:k + BLOCK])
        await stream.send({"t": "eop", "map": m, "size": len(data)})
    await stream.send({"t": "end"})


async def recv_parts(stream: Stream, dest: Path, maps: set[int], timeout: float = 30.0) -> list[int]:
    """Receive what :func:`send_parts` sends, concatenated into ``dest`` (an intermediate file:
    no fsync); returns the maps the sender did not have."""
    missing: list[int] = []
    size = 0
    with atomic_writer(dest, durable=False) as f:
        while True:
            frame = await stream.recv(timeout)
            kind = frame.header["t"]
            if kind == "data":
                f.write(frame.payload)
                size += len(frame.payload)
            elif kind in ("eop", "missing"):
                m = int(frame.header["map"])
                if m not in maps:
                    raise ProtocolError(f"the sender sent map {m}, which was not asked for")
                if kind == "missing":
                    missing.append(m)
                elif frame.header.get("size") != size:
                    raise ProtocolError(f"map {m}: got {size} bytes, the sender says {frame.header.get('size')}")
                size = 0
            elif kind == "end":
                return missing
            else:
                raise ProtocolError(f"unexpected {kind!r} frame in a file stream")
