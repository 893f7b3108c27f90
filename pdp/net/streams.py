"""Moving files over a stream: ``data`` frames of at most 1 MiB, then an ``end`` frame.

Every ``data`` frame carries ``crc``, the CRC-32 of its payload, and the receiver checks
it before writing a byte (:class:`~pdp.fsutil.Damaged` on a mismatch, so the caller
fetches from another holder). A file with a sidecar of block checksums
(:mod:`pdp.fsutil`, every stored input has one) is checked block by block as it is read
for sending: a copy damaged on disk fails the request before its bad bytes leave.
Map output slices (:func:`send_parts`) carry the CRC stored in the map output file in
their ``eop`` frame; a slice that does not match counts as missing for that fetch (the
map runs again). The frame format's caps are unchanged: 1 MiB payloads, small headers.
"""

from __future__ import annotations

import hashlib
import logging
import os
import zlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO

from pdp.errors import PdpError, ProtocolError
from pdp.fsutil import BlockSums, Damaged, atomic_writer, load_sums, sums_path, verified_blocks, write_sums
from pdp.net.transport import Stream

log = logging.getLogger("pdp.net.streams")

BLOCK = 1024 * 1024


def peer_of(stream: Stream) -> str:
    """The name of the member at the other end of ``stream`` (its address if unnamed)."""
    conn: Any = stream.conn
    return str(getattr(conn, "peer_name", "") or getattr(conn, "peer", "?"))


def data_header(payload: bytes | memoryview) -> dict[str, Any]:
    """The header of a ``data`` frame carrying ``payload``."""
    return {"t": "data", "crc": zlib.crc32(payload)}


def check_data(frame_header: dict[str, Any], payload: bytes | memoryview, what: str) -> None:
    """Raise unless ``payload`` matches the CRC its ``data`` frame carries."""
    crc = frame_header.get("crc")
    if not isinstance(crc, int):
        raise ProtocolError(f"{what}: a data frame without its crc")
    if zlib.crc32(payload) != crc:
        raise Damaged(f"{what}: a data frame arrived damaged (CRC mismatch)")


async def send_file(stream: Stream, path: Path, start: int = 0, end: int | None = None) -> int:
    """Send bytes [start, end) of ``path``; returns the count sent. With a sidecar of block
    checksums, every block read is checked first (:class:`Damaged` before a bad byte goes)."""
    sent = 0
    with open(path, "rb") as f:
        for block in _blocks(f, path, start, end):
            await stream.send(data_header(block), block)
            sent += len(block)
    await stream.send({"t": "end", "size": sent})
    return sent


def _blocks(f: BinaryIO, path: Path, start: int, end: int | None) -> Iterator[bytes]:
    """Bytes [start, end) of the open file, checked against its sidecar if it has one."""
    sums, size = load_sums(path), os.fstat(f.fileno()).st_size
    stop = size if end is None else min(end, size)
    if sums is None:
        return _plain_blocks(f, start, stop)
    if sums[1] != size:
        raise Damaged(f"{path.name} is damaged: {size} bytes, its checksums say {sums[1]}")
    return verified_blocks(f, sums[0], size, start, stop, path.name, BLOCK)


def _plain_blocks(f: BinaryIO, start: int, end: int) -> Iterator[bytes]:
    f.seek(start)
    remaining = end - start
    while remaining > 0:
        block = f.read(min(BLOCK, remaining))
        if not block:
            return
        remaining -= len(block)
        yield block


async def recv_file(stream: Stream, path: Path, timeout: float = 30.0, durable: bool = True, sums: bool = False,
                    sha256: str | None = None, limit: int | None = None) -> int:
    """Receive ``data`` frames into ``path`` (atomically) until ``end``; returns the size.

    Each frame is checked against its CRC. ``durable=False`` for intermediate files the
    party can recompute (no fsync); ``sums`` also stores a sidecar of block checksums
    (written before the file is renamed into place); ``sha256`` (hex) must match the whole
    file or nothing is stored. A mismatch raises :class:`Damaged` naming the sender; more than
    ``limit`` bytes (the size the sender declared) raises ProtocolError and stores nothing."""
    what = f"{path.name} from {peer_of(stream)}"
    blocks, digest = BlockSums() if sums else None, hashlib.sha256() if sha256 else None
    wrote_sums = False
    try:
        with atomic_writer(path, durable=durable) as f:
            size = await _receive(stream, f, timeout, what, blocks, digest, limit)
            if digest is not None and digest.hexdigest() != sha256:
                raise Damaged(f"{what} arrived damaged: its SHA-256 is not the recorded one")
            if blocks is not None:
                write_sums(path, blocks.finish(), size)
                wrote_sums = True
    except BaseException:
        if wrote_sums:  # its file did not make it: a sidecar alone would only mislead
            sums_path(path).unlink(missing_ok=True)
        raise
    return size


async def _receive(stream: Stream, f: Any, timeout: float, what: str, blocks: BlockSums | None,
                   digest: Any, limit: int | None = None) -> int:
    size = 0
    while True:
        frame = await stream.recv(timeout)
        kind = frame.header["t"]
        if kind == "data":
            check_data(frame.header, frame.payload, what)
            size += len(frame.payload)
            if limit is not None and size > limit:
                raise ProtocolError(f"{what}: more than the {limit} bytes declared")
            f.write(frame.payload)
            if blocks is not None:
                blocks.update(frame.payload)
            if digest is not None:
                digest.update(frame.payload)
        elif kind == "end":
            if frame.header.get("size") != size:
                raise ProtocolError(f"stream ended after {size} bytes, sender says {frame.header.get('size')}")
            return size
        else:
            raise ProtocolError(f"unexpected {kind!r} frame in a file stream")


async def relay(source: Stream, sink: Stream, timeout: float = 30.0) -> int:
    """Forward a file stream from ``source`` to ``sink``, each frame checked against its CRC
    before it goes on (:class:`Damaged` otherwise); returns the size."""
    size, what = 0, f"a file from {peer_of(source)}"
    while True:
        frame = await source.recv(timeout)
        if frame.header["t"] == "data":
            check_data(frame.header, frame.payload, what)
        await sink.send(frame.header, frame.payload)
        if frame.header["t"] == "end":
            return size
        size += len(frame.payload)


async def send_parts(stream: Stream, parts: Sequence[tuple[int, Callable[[], tuple[bytes, int]]]]) -> None:
    """Send several map outputs' slices on one stream: each as ``data`` frames then ``eop``
    with its map index and stored CRC (or ``missing``), and a final ``end``. ``parts``:
    (map index, a function returning the slice and its stored CRC)."""
    for m, read in parts:
        try:
            data, crc = read()
        except (FileNotFoundError, PdpError):
            await stream.send({"t": "missing", "map": m})
            continue
        for k in range(0, len(data), BLOCK):
            piece = data[k:k + BLOCK]
            await stream.send(data_header(piece), piece)
        await stream.send({"t": "eop", "map": m, "size": len(data), "crc": crc})
    await stream.send({"t": "end"})


async def recv_parts(stream: Stream, dest: Path, maps: set[int], timeout: float = 30.0) -> list[int]:
    """Receive what :func:`send_parts` sends, concatenated into ``dest`` (an intermediate file:
    no fsync); returns the maps the sender did not have *or sent damaged* (those slices are
    left out of ``dest`` and logged with the sender's name)."""
    missing: list[int] = []
    holder = peer_of(stream)
    with atomic_writer(dest, durable=False) as f:
        size, crc, begin = 0, 0, 0
        while True:
            frame = await stream.recv(timeout)
            kind = frame.header["t"]
            if kind == "data":
                check_data(frame.header, frame.payload, f"map output slices from {holder}")
                f.write(frame.payload)
                size += len(frame.payload)
                crc = zlib.crc32(frame.payload, crc)
            elif kind in ("eop", "missing"):
                m = _part_end(frame.header, maps, size, crc, holder)
                if m is not None:
                    missing.append(m)
                    f.seek(begin)
                    f.truncate()
                size, crc, begin = 0, 0, f.tell()
            elif kind == "end":
                return missing
            else:
                raise ProtocolError(f"unexpected {kind!r} frame in a file stream")


def _part_end(header: dict[str, Any], maps: set[int], size: int, crc: int, holder: str) -> int | None:
    """Check the end of one map's slice; returns the map if it is missing or damaged."""
    m = int(header["map"])
    if m not in maps:
        raise ProtocolError(f"the sender sent map {m}, which was not asked for")
    if header["t"] == "missing":
        return m
    if header.get("size") != size:
        raise ProtocolError(f"map {m}: got {size} bytes, the sender says {header.get('size')}")
    if header.get("crc") != crc:
        log.warning("map %d's output on %s is damaged (CRC mismatch): it counts as missing and runs again",
                    m, holder)
        return m
    return None
