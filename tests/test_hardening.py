"""A live node under hostile input: fuzzed frames and handshakes, replays, floods, Raft garbage.

Each hostile connection must be dropped and logged exactly once, and the party must keep
serving (status from every member, and a real job afterwards, exact against the oracle).
"""

from __future__ import annotations

import asyncio
import os
import struct
from pathlib import Path

import msgpack
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pdp import wire
from pdp.client import Client
from pdp.jobs.wordcount import oracle
from pdp.local import LocalParty

PREFIX = struct.Struct(">II")


def _frame(header: object, payload: bytes = b"") -> bytes:
    packed = msgpack.packb(header, use_bin_type=True)
    return PREFIX.pack(len(packed), len(payload)) + packed + payload


hostile = st.one_of(
    st.binary(min_size=1, max_size=300),
    st.builds(lambda h, p: PREFIX.pack(h, p), st.integers(65537, 2**32 - 1), st.integers(0, 2**32 - 1)),
    st.builds(lambda p: PREFIX.pack(20, p) + b"x" * 20, st.integers(1, 2**20)),  # payload before auth
    st.builds(lambda h: _frame(h), st.dictionaries(st.sampled_from(["t", "v", "role", "name", "nonce", "s"]),
                                                   st.one_of(st.text(max_size=40), st.integers(-2**63, 2**64 - 1), st.binary(max_size=40),
                                                             st.none()), max_size=6)),
    st.builds(lambda n: _frame({"t": "hello", "v": 1, "role": "node", "name": "x", "nonce": n}),
              st.binary(max_size=64)),
    st.builds(lambda cut: _frame({"t": "hello", "v": 1, "role": "client", "name": "fz", "nonce": b"n" * 32})[:cut],
              st.integers(1, 40)),
    st.just(_frame({"t": "status", "s": 1})),  # a request without a handshake
    st.builds(lambda code, data: bytes([0x81, 0xa1, 0x74, 0xc7, len(data), code & 0xFF]) + data,
              st.integers(-128, 127), st.binary(max_size=20)).map(lambda h: PREFIX.pack(len(h), 0) + h),  # ExtType
)


async def _attack(addr: str, data: bytes) -> int:
    host, port = addr.rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    local_port = writer.get_extra_info("sockname")[1]
    writer.write(data)
    await writer.drain()
    writer.write_eof()
    try:
        await asyncio.wait_for(reader.read(), 15)
    finally:
        writer.close()
    return int(local_port)


def _log(party: LocalParty, i: int) -> str:
    return (party.root / f"{party.names[i]}.log").read_text(errors="replace")


def test_fuzzed_frames_and_handshakes(party: LocalParty) -> None:
    ports: list[int] = []

    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
    @given(hostile)
    def attack(data: bytes) -> None:
        ports.append(asyncio.run(_attack(party.addr(0), data)))

    attack()
    asyncio.run(asyncio.sleep(0.5))
    log = _log(party, 0)
    for port in ports:
        lines = [line for line in log.splitlines() if f"127.0.0.1:{port}" in line]
        assert len(lines) == 1, (port, lines)
    assert "Traceback" not in log
    views = [asyncio.run(party.status(i)) for i in range(party.n)]
    assert len({v["leader"] for v in views}) == 1


def test_replayed_handshake_is_refused(party: LocalParty) -> None:
    async def replay() -> str:
        host, port = party.addr(1).rsplit(":", 1)
        # a genuine handshake, recorded
        shake = wire.DialerHandshake(party.key, "recorder", "client")
        reader, writer = await asyncio.open_connection(host, int(port))
        dec = wire.FrameDecoder()
        hello = shake.hello()
        writer.writelines(wire.encode_frame(hello))
        challenge = await _next(reader, dec)
        auth = shake.on_challenge(challenge.header)
        writer.writelines(wire.encode_frame(auth))
        shake.on_welcome((await _next(reader, dec)).header)
        writer.close()
        # the attacker replays the recorded hello and auth on a new connection
        reader, writer = await asyncio.open_connection(host, int(port))
        dec = wire.FrameDecoder()
        writer.writelines(wire.encode_frame(hello))
        await _next(reader, dec)  # a fresh challenge the attacker cannot answer
        writer.writelines(wire.encode_frame(auth))
        answer = await _next(reader, dec)
        writer.close()
        return str(answer.header.get("message", answer.header["t"]))

    assert "wrong party secret" in asyncio.run(replay())
    assert "refused" in _log(party, 1)


async def _next(reader: asyncio.StreamReader, decoder: wire.FrameDecoder) -> wire.Frame:
    while True:
        frames = decoder.feed(await asyncio.wait_for(reader.read(65536), 10))
        if frames:
            return frames[0]


def test_connection_flood_from_one_host_is_capped(party: LocalParty) -> None:
    async def flood() -> tuple[int, bool]:
        host, port = party.addr(2).rsplit(":", 1)
        conns = [await asyncio.open_connection(host, int(port)) for _ in range(80)]
        await asyncio.sleep(0.5)
        closed = 0
        for reader, _ in conns:
            try:
                if await asyncio.wait_for(reader.read(1), 0.05) == b"":
                    closed += 1
            except asyncio.TimeoutError:
                pass
        for _, writer in conns:
            writer.close()
        await asyncio.sleep(0.5)
        async with Client(party.addr(2), party.key) as c:  # served again once the flood is gone
            ok = (await c.call("status"))["node"] == party.names[2]
        return closed, ok

    closed, ok = asyncio.run(flood())
    assert closed >= 80 - 64 and ok
    assert "already 64 open from there" in _log(party, 2)


def test_garbage_on_the_raft_port_does_not_stop_the_party(party: LocalParty, corpus: list[Path],
                                                          tmp_path: Path) -> None:
    async def garbage() -> None:
        for i in range(party.n):
            host, port = party.addr(i).rsplit(":", 1)
            for _ in range(5):
                _, writer = await asyncio.open_connection(host, int(port) + 1)
                writer.write(os.urandom(4096))
                await writer.drain()
                writer.close()

    asyncio.run(garbage())

    async def job() -> None:
        async with Client(party.addr(0), party.key) as c:
            await c.submit("wordcount", corpus[:2], "after-raft-garbage", chunk_size=256 * 1024)
            await c.wait("after-raft-garbage")
            await c.fetch_result("after-raft-garbage", tmp_path / "out.tsv")

    asyncio.run(asyncio.wait_for(job(), 60))
    assert (tmp_path / "out.tsv").read_bytes() == oracle([str(p) for p in corpus[:2]])
