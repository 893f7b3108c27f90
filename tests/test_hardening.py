"""A live node under hostile input from an authenticated peer: fuzzed frames inside TLS,
connection floods, garbage on the one port.

Each hostile connection must be dropped and logged exactly once, and the party must keep
serving (status from every member, and a real job afterwards, exact against the oracle).
The attacks without an identity are in tests/test_trust.py.
"""

from __future__ import annotations

import asyncio
import os
import struct
from pathlib import Path

import msgpack
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pdp.client import Client
from pdp.jobs.builtin.wordcount import oracle
from pdp.errors import AuthError
from pdp.local import LocalParty
from pdp.net.transport import ConnectionLost, dial

PREFIX = struct.Struct(">II")


def _frame(header: object, payload: bytes = b"") -> bytes:
    packed = msgpack.packb(header, use_bin_type=True)
    return PREFIX.pack(len(packed), len(payload)) + packed + payload


hostile = st.one_of(
    st.binary(min_size=1, max_size=300),
    st.builds(lambda h, p: PREFIX.pack(h, p), st.integers(65537, 2**32 - 1), st.integers(0, 2**32 - 1)),
    st.builds(lambda p: PREFIX.pack(20, p) + b"x" * 20, st.integers(2**23 + 1, 2**32 - 1)),  # payload over the cap
    st.builds(lambda h: _frame(h), st.dictionaries(st.sampled_from(["t", "v", "role", "name", "nonce"]),
                                                   st.one_of(st.text(max_size=40), st.integers(-2**63, 2**64 - 1), st.binary(max_size=40),
                                                             st.none()), max_size=6)),  # no stream id
    st.builds(lambda t: _frame({"t": "raft"}, t), st.binary(max_size=64)),  # Raft from a user
    st.builds(lambda cut: _frame({"t": "hello", "v": 2})[:cut] + b"\xff" * 8, st.integers(1, 12)),
    st.builds(lambda code, data: bytes([0x81, 0xa1, 0x74, 0xc7, len(data), code & 0xFF]) + data,
              st.integers(-128, 127), st.binary(max_size=20)).map(lambda h: PREFIX.pack(len(h), 0) + h),  # ExtType
)


async def _attack(party: LocalParty, data: bytes) -> tuple[int, bool]:
    """Hostile bytes on a connection that passed TLS as the admin: (its local port, whether
    the node dropped it; an incomplete frame just waits for more, so we hang up then)."""
    conn = await dial(party.addr(0), party.key.identity, party.key.pins)
    local_port = conn.writer.get_extra_info("sockname")[1]
    conn.writer.write(data)
    await conn.writer.drain()
    try:
        await asyncio.wait_for(asyncio.shield(conn.reader_task), 0.5)  # type: ignore[arg-type]
        dropped = True
    except asyncio.TimeoutError:
        dropped = False
    finally:
        conn.close()
    return int(local_port), dropped


def _log(party: LocalParty, i: int) -> str:
    return (party.root / f"{party.names[i]}.log").read_text(errors="replace")


def test_fuzzed_frames_and_handshakes(party: LocalParty) -> None:
    ports: list[tuple[int, bool]] = []

    @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
    @given(hostile)
    def attack(data: bytes) -> None:
        ports.append(asyncio.run(_attack(party, data)))

    attack()
    asyncio.run(asyncio.sleep(0.5))
    log = _log(party, 0)
    assert sum(dropped for _, dropped in ports) >= len(ports) // 2
    for port, dropped in ports:
        lines = [line for line in log.splitlines() if f"127.0.0.1:{port}" in line]
        assert len(lines) == int(dropped), (port, lines)
    assert "Traceback" not in log
    views = [asyncio.run(party.status(i)) for i in range(party.n)]
    assert len({v["leader"] for v in views}) == 1


def test_connection_flood_from_one_host_is_capped(party: LocalParty) -> None:
    async def flood() -> tuple[int, bool]:
        conns, closed = [], 0
        for _ in range(80):
            try:
                conns.append(await dial(party.addr(2), party.key.identity, party.key.pins))
            except (AuthError, ConnectionLost):
                closed += 1  # refused: too many open from this host
        for conn in conns:
            conn.close()
        await asyncio.sleep(0.5)
        async with Client(party.addr(2), party.key) as c:  # served again once the flood is gone
            ok = (await c.call("status"))["node"] == party.names[2]
        return closed, ok

    closed, ok = asyncio.run(flood())
    assert closed >= 80 - 64 and ok
    assert "too many open (64 from there" in _log(party, 2)


def test_garbage_on_the_one_port_does_not_stop_the_party(party: LocalParty, corpus: list[Path],
                                                          tmp_path: Path) -> None:
    async def garbage() -> None:
        for i in range(party.n):
            host, port = party.addr(i).rsplit(":", 1)
            for _ in range(5):
                _, writer = await asyncio.open_connection(host, int(port))
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
