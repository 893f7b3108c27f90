"""Checksums on everything that moves between members: a flipped bit fails that copy.

Unit tests drive pdp.jobs.mapoutput, pdp.fsutil's block sums and pdp.net.streams over an in-memory
stream pair; the party test flips a bit in a map output on a member's disk mid-job and
checks that the job's output is still the oracle's, byte for byte.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import os
import struct
import time
import zlib
from pathlib import Path
from typing import Any

import pytest

from pdp.jobs import mapoutput
from pdp.errors import PdpError, ProtocolError, RemoteError
from pdp.fsutil import (SUM_BLOCK, BlockSums, Damaged, check_range, read_sums, sums_path, verified_blocks,
                        write_sums)
from pdp.net.streams import BLOCK, data_header, recv_file, recv_parts, relay, send_file, send_parts
from pdp.net.wire import Frame


def flip(path: Path, offset: int, bit: int = 0) -> None:
    """Flip one bit of a file in place."""
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ (1 << bit)]))


class _Conn:
    def __init__(self, name: str) -> None:
        self.peer_name, self.peer = name, f"{name}:7700"


class FakeStream:
    """One end of an in-memory stream pair (what streams.py needs of transport.Stream)."""

    def __init__(self, peer: str) -> None:
        self.conn = _Conn(peer)
        self.queue: asyncio.Queue[Frame] = asyncio.Queue()
        self.other: FakeStream | None = None
        self.sent: list[Frame] = []

    async def send(self, header: dict[str, Any], payload: bytes | memoryview = b"") -> None:
        frame = Frame(dict(header), bytes(payload))
        self.sent.append(frame)
        assert self.other is not None
        await self.other.queue.put(frame)

    async def recv(self, timeout: float | None = 30.0) -> Frame:
        frame = await asyncio.wait_for(self.queue.get(), timeout)
        if frame.header["t"] == "error":
            raise RemoteError(frame.header["message"])
        return frame


def pair(a: str = "sender", b: str = "receiver") -> tuple[Any, Any]:
    """(the sender's end, the receiver's end); each end's peer is the other's name (typed
    Any: they stand in for transport.Stream)."""
    x, y = FakeStream(b), FakeStream(a)
    x.other, y.other = y, x
    return x, y


def stored_input(tmp_path: Path, data: bytes, name: str = "input") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    sums = BlockSums()
    for k in range(0, len(data), 12345):  # writes of any size give the same sums
        sums.update(data[k:k + 12345])
    write_sums(path, sums.finish(), len(data))
    return path


# -- map outputs --------------------------------------------------------------------------------


def test_map_output_crc_per_partition(tmp_path: Path) -> None:
    out = str(tmp_path / "map-0")
    parts = [b"alpha" * 100, b"", b"gamma" * 7]
    mapoutput.write(out, parts)
    for r, part in enumerate(parts):
        assert mapoutput.read(out, r) == part
        assert mapoutput.read_part(out, r) == (part, zlib.crc32(part))
        assert mapoutput.size(out, r) == len(part)
    start = 8 + 12 * 3 + 8
    flip(Path(out), start + 10)  # one bit inside partition 0
    with pytest.raises(Damaged, match="partition 0 is damaged"):
        mapoutput.read(out, 0)
    assert mapoutput.read(out, 2) == parts[2]  # the others are intact
    data, crc = mapoutput.read_part(out, 0)  # the server sends what is there, with the stored CRC
    assert zlib.crc32(data) != crc
    assert mapoutput.damaged([(0, out), (1, str(tmp_path / "gone"))], 0) == [0, 1]
    assert mapoutput.damaged([(0, out)], 2) == []


def test_map_output_damaged_index(tmp_path: Path) -> None:
    out = tmp_path / "map-0"
    mapoutput.write(str(out), [b"abc", b"defg"])
    flip(out, 8 + 8 * 1 + 2, bit=7)  # the offset where partition 1 starts, moved far away
    with pytest.raises(PdpError):
        mapoutput.read(str(out), 0)
    out.write_bytes(b"PDPM" + out.read_bytes()[4:])  # the old format (no CRCs) is refused
    with pytest.raises(PdpError, match="not a map output file"):
        mapoutput.read(str(out), 0)


def test_map_output_write_cost(tmp_path: Path) -> None:
    """Computing the CRCs adds little to writing a map output (the kernel's own cost is far larger)."""
    parts = [os.urandom(64 * 1024) for _ in range(8)]
    t0 = time.perf_counter()
    for k in range(20):
        mapoutput.write(str(tmp_path / f"m{k}"), parts)
    per_write = (time.perf_counter() - t0) / 20
    crc = min(_timed(lambda: [zlib.crc32(p) for p in parts]) for _ in range(5))
    assert crc < max(per_write, 1e-3)  # CRC-32 of 512 KiB: well under a millisecond


def _timed(fn: Any) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def test_parts_damaged_in_transit_or_on_disk_count_as_missing(tmp_path: Path,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    outs = []
    for m in range(3):
        out = tmp_path / f"map-{m}"
        mapoutput.write(str(out), [b"p0-%d " % m * 50, b"p1-%d " % m * 4000])
        outs.append(out)
    part1 = 8 + 12 * 2 + 8 + len(b"p0-0 " * 50)
    flip(outs[1], part1 + 3)  # map 1's partition 1 on the holder's disk

    async def go() -> tuple[list[int], bytes]:
        tx, rx = pair("holder-b", "reducer")
        held = [*outs, tmp_path / "map-7"]  # map 7: not held
        parts = [(m if m < 3 else 7, functools.partial(mapoutput.read_part, str(out), 1)) for m, out in enumerate(held)]
        dest = tmp_path / "in-1-0"
        sending = asyncio.create_task(send_parts(tx, parts))
        missing = await recv_parts(rx, dest, {0, 1, 2, 7})
        await sending
        return missing, dest.read_bytes()

    with caplog.at_level(logging.WARNING, logger="pdp.net.streams"):
        missing, got = asyncio.run(go())
    assert sorted(missing) == [1, 7]
    assert got == b"p1-0 " * 4000 + b"p1-2 " * 4000  # the damaged slice is left out
    assert "map 1's output on holder-b is damaged" in caplog.text


def test_parts_frame_damaged_on_the_way(tmp_path: Path) -> None:
    async def go() -> None:
        tx, rx = pair()
        await tx.send({**data_header(b"hello"), "crc": zlib.crc32(b"hellO")}, b"hello")
        with pytest.raises(Damaged, match="damaged"):
            await recv_parts(rx, tmp_path / "dest", {0})

    asyncio.run(go())
    assert not (tmp_path / "dest").exists()


# -- block sums -----------------------------------------------------------------------------------


def test_block_sums_and_verified_ranges(tmp_path: Path) -> None:
    data = os.urandom(5 * SUM_BLOCK + 777)
    path = stored_input(tmp_path, data)
    sums, size = read_sums(path)  # type: ignore[misc]
    assert size == len(data) and len(sums) == 6
    assert sums == [zlib.crc32(data[k:k + SUM_BLOCK]) for k in range(0, len(data), SUM_BLOCK)]
    with open(path, "rb") as f:
        for a, b in [(0, len(data)), (1, 2), (SUM_BLOCK - 1, 3 * SUM_BLOCK + 5), (len(data) - 1, len(data)), (9, 9)]:
            pieces = list(verified_blocks(f, sums, size, a, b, "input", chunk=2 * SUM_BLOCK))
            assert b"".join(pieces) == data[a:b] and all(0 < len(p) <= 2 * SUM_BLOCK for p in pieces)
    flip(path, 3 * SUM_BLOCK + 100)
    assert check_range(path, 0, 3 * SUM_BLOCK)  # blocks before the damage are fine
    with pytest.raises(Damaged, match=f"bytes {3 * SUM_BLOCK}-{4 * SUM_BLOCK} do not match"):
        check_range(path, 4 * SUM_BLOCK - 10, 4 * SUM_BLOCK)
    assert check_range(tmp_path / "nosums", 0, 1) is False


def test_damaged_sidecar_means_unchecked_not_damaged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A sidecar is not fsynced (a power cut may tear it): a damaged one says nothing about its file."""
    path = stored_input(tmp_path, b"x" * 1000)
    flip(sums_path(path), 21)
    with pytest.raises(Damaged, match="checksums"):
        read_sums(path)
    with caplog.at_level(logging.WARNING, logger="pdp.fsutil"):
        assert check_range(path, 0, 1000) is False
        transfer(path, tmp_path / "copy")
    assert (tmp_path / "copy").read_bytes() == b"x" * 1000
    assert "using input unchecked" in caplog.text


# -- whole files: inputs, chunks, results ---------------------------------------------------------


def transfer(src: Path, dest: Path, start: int = 0, end: int | None = None, **recv: Any) -> tuple[int, list[Frame]]:
    async def serve(tx: Any) -> None:
        try:
            await send_file(tx, src, start, end)
        except PdpError as exc:  # what transport does when a handler raises
            await tx.send({"t": "error", "code": "error", "message": str(exc)})
            raise

    async def go() -> tuple[int, list[Frame]]:
        tx, rx = pair("holder-a", "worker")
        sent, got = await asyncio.gather(serve(tx), recv_file(rx, dest, **recv), return_exceptions=True)
        for outcome in (sent, got):
            if isinstance(outcome, BaseException):
                raise outcome
        assert isinstance(got, int)
        return got, tx.sent

    return asyncio.run(go())


def test_file_frames_carry_crcs_and_sidecars_travel(tmp_path: Path) -> None:
    data = os.urandom(2 * BLOCK + 5000)
    src = stored_input(tmp_path, data, "src")
    size, frames = transfer(src, tmp_path / "copy", sums=True)
    assert size == len(data) and (tmp_path / "copy").read_bytes() == data
    assert all(f.header["crc"] == zlib.crc32(f.payload) and len(f.payload) <= BLOCK
               for f in frames if f.header["t"] == "data")
    assert read_sums(tmp_path / "copy") == read_sums(src)  # the mirror's own sidecar, from what it received
    size, _ = transfer(src, tmp_path / "range", 1000, BLOCK + 3)
    assert (tmp_path / "range").read_bytes() == data[1000:BLOCK + 3]


def test_damaged_copy_on_disk_is_not_sent(tmp_path: Path) -> None:
    data = os.urandom(3 * BLOCK)
    src = stored_input(tmp_path, data, "src")
    flip(src, 2 * BLOCK + 17)
    with pytest.raises(Damaged, match="src is damaged"):
        transfer(src, tmp_path / "copy")
    assert not (tmp_path / "copy").exists()
    _, frames = transfer(src, tmp_path / "head", 0, BLOCK)  # a range before the damage is fine
    assert (tmp_path / "head").read_bytes() == data[:BLOCK]
    with open(src, "ab") as f:
        f.write(b"more")  # a size that is not the recorded one
    with pytest.raises(Damaged, match="checksums say"):
        transfer(src, tmp_path / "copy")


def test_frame_damaged_on_the_way_is_refused(tmp_path: Path) -> None:
    async def go(header: dict[str, Any], **recv: Any) -> None:
        tx, rx = pair()
        await tx.send(header, b"payload")
        await tx.send({"t": "end", "size": 7})
        await recv_file(rx, tmp_path / "dest", sums=True, **recv)

    with pytest.raises(Damaged, match="dest from sender: a data frame arrived damaged"):
        asyncio.run(go({"t": "data", "crc": zlib.crc32(b"paylobd")}))
    with pytest.raises(ProtocolError, match="without its crc"):
        asyncio.run(go({"t": "data"}))
    assert not (tmp_path / "dest").exists() and not sums_path(tmp_path / "dest").exists()
    asyncio.run(go(data_header(b"payload")))
    assert (tmp_path / "dest").read_bytes() == b"payload"


def test_result_copy_checked_against_its_sha256(tmp_path: Path) -> None:
    src = tmp_path / "result"
    src.write_bytes(b"word\t1\n" * 1000)
    good = hashlib.sha256(src.read_bytes()).hexdigest()
    transfer(src, tmp_path / "copy", sha256=good)
    assert (tmp_path / "copy").read_bytes() == src.read_bytes()
    with pytest.raises(Damaged, match="SHA-256"):
        transfer(src, tmp_path / "bad", sha256="0" * 64)
    assert not (tmp_path / "bad").exists()


def test_relay_stops_at_a_damaged_frame() -> None:
    async def go() -> list[Frame]:
        src_tx, src_rx = pair("holder", "gateway")
        out_tx, out_rx = pair("gateway", "client")
        await src_tx.send(data_header(b"good"), b"good")
        await src_tx.send({"t": "data", "crc": 1}, b"evil")
        with pytest.raises(Damaged):
            await relay(src_rx, out_tx)
        return out_tx.sent

    forwarded = asyncio.run(go())
    assert [f.payload for f in forwarded] == [b"good"]  # the damaged frame never reached the client


# -- a real party ---------------------------------------------------------------------------------


def _map_outputs(party: Any, job_id: str) -> list[tuple[int, Path]]:
    found = []
    for i, name in enumerate(party.names):
        folder = party.root / name / "spool" / "jobs" / job_id
        found += [(i, p) for p in folder.glob("map-*")] if folder.is_dir() else []
    return found


def _flip_in_partition(path: Path) -> int:
    """Flip a bit in the largest partition of a map output file; returns the partition."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<I", raw[4:8])
    offsets = struct.unpack(f"<{n + 1}Q", raw[8:8 + 8 * (n + 1)])
    r = max(range(n), key=lambda k: offsets[k + 1] - offsets[k])
    flip(path, (offsets[r] + offsets[r + 1]) // 2, bit=3)
    return r


def test_party_flipped_bit_in_a_map_output(make_party: Any, corpus: list[Path], tmp_path: Path) -> None:
    """A map output damaged on its holder's disk after the map finished: the reducer sees the
    CRC mismatch, the map runs again, and the result is still exactly the oracle's."""
    from pdp.client import Client, Failover
    from pdp.jobs.builtin.wordcount import oracle

    party = make_party("sleep=0.8")
    inputs = corpus[:3]
    job_id = "flip-map"

    async def submit() -> None:
        async with Client(party.addr(0), party.key) as c:
            await c.submit("chaos", inputs, job_id, chunk_size=256 * 1024, reduces=3)

    asyncio.run(submit())
    deadline, damaged = time.monotonic() + 60, None
    while damaged is None:  # the first map output to appear; the other maps still sleep
        assert time.monotonic() < deadline, "no map output appeared"
        outputs = _map_outputs(party, job_id)
        if outputs:
            damaged = outputs[0]
            _flip_in_partition(damaged[1])
        else:
            time.sleep(0.01)

    async def finish() -> dict[str, Any]:
        f = Failover([party.addr(i) for i in range(party.n)], party.key, patience=120)
        summary = await f.run(lambda c: c.wait(job_id), "wait")
        await f.run(lambda c: c.fetch_result(job_id, tmp_path / "out.tsv"), "fetch")
        return summary

    summary = asyncio.run(finish())
    assert (tmp_path / "out.tsv").read_bytes() == oracle([str(p) for p in inputs])
    holder = party.names[damaged[0]]
    assert any(f"map output unreachable on {holder}" in why for why in summary["reruns"]), summary["reruns"]
    logs = "".join((party.root / f"{name}.log").read_text() for name in party.names)
    assert "damaged" in logs


def _wait_done(party: Any, job_id: str, out: Path, via: int | None = None) -> dict[str, Any]:
    from pdp.client import Client, Failover

    async def go() -> dict[str, Any]:
        f = Failover([party.addr(i) for i in range(party.n)], party.key, patience=120)
        summary = await f.run(lambda c: c.wait(job_id), "wait")
        if via is None:
            await f.run(lambda c: c.fetch_result(job_id, out), "fetch")
        else:
            async with Client(party.addr(via), party.key) as c:
                await c.fetch_result(job_id, out)
        return summary

    return asyncio.run(go())


def test_party_damaged_input_copy_and_result_copy(make_party: Any, corpus: list[Path], tmp_path: Path) -> None:
    """An input copy damaged on the gateway (before its maps run: a job ahead keeps the
    slots busy) is read from the mirror instead; a result copy damaged on one holder is
    served from the other, through a holder and through a member holding none."""
    from pdp.client import Client
    from pdp.jobs.builtin.wordcount import oracle

    party = make_party("sleep=0.3")
    ahead, target = corpus[:3], [max(corpus, key=lambda p: p.stat().st_size)]

    async def submit() -> None:
        async with Client(party.addr(0), party.key) as c:
            await c.submit("chaos", ahead, "busy", chunk_size=64 * 1024, reduces=2)
            await c.submit("chaos", target, "flip-input", chunk_size=128 * 1024, reduces=2)

    asyncio.run(submit())
    stored = party.root / party.names[0] / "spool" / "inputs" / "flip-input-0"
    for offset in range(100, stored.stat().st_size, 64 * 1024):  # the gateway's copy: every map that reads
        flip(stored, offset, bit=5)  # it (there, or fetched from there) must notice and use the mirror's
    summary = _wait_done(party, "flip-input", tmp_path / "out.tsv")
    assert (tmp_path / "out.tsv").read_bytes() == oracle([str(p) for p in target])
    logs = "".join((party.root / f"{name}.log").read_text() for name in party.names)
    assert "flip-input-0 is damaged" in logs

    holders = list(summary["result"]["holders"])
    assert len(holders) == 2
    first = party.names.index(holders[0])
    flip(party.root / holders[0] / "spool" / "jobs" / "flip-input" / "result", 10)
    others = [i for i in range(party.n) if party.names[i] not in holders]
    for via in [first, *others]:
        _wait_done(party, "flip-input", tmp_path / f"via{via}.tsv", via=via)
        assert (tmp_path / f"via{via}.tsv").read_bytes() == oracle([str(p) for p in target])
    logs = "".join((party.root / f"{name}.log").read_text() for name in party.names)
    assert f"{holders[0]}'s copy is damaged" in logs and "relaying another copy" in logs
    if others:
        assert f"the result copy on {holders[0]} failed" in logs and "is damaged: SHA-256" in logs
