"""Connection-level limits on real sockets (no TLS here: the limits sit above it): a stream
whose handler does not read is cut off alone, and the connection's other requests go on."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from pdp.net import transport, wire
from pdp.net.transport import Connection, Peer, Stream


async def _pair(handlers: dict[str, Any]) -> tuple[Connection, asyncio.AbstractServer]:
    served: list[Connection] = []

    async def on(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = Connection(reader, writer, wire.FrameDecoder(), "client", handlers, who=Peer("x", "t", "node"))
        served.append(conn)
        conn.start([])

    server = await asyncio.start_server(on, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    client = Connection(reader, writer, wire.FrameDecoder(), "server")
    client.start([])
    return client, server


def test_a_stream_that_is_not_read_is_cut_off_and_others_go_on(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(transport, "STREAM_STALL", 0.5)
    async def never_reads(stream: Stream, hdr: dict[str, Any], _: bytes) -> None:
        await asyncio.sleep(30)

    async def echo(stream: Stream, hdr: dict[str, Any], _: bytes) -> None:
        await stream.send({"t": "echo", "n": hdr["n"]})

    async def scenario() -> tuple[int, bool]:
        client, server = await _pair({"hog": never_reads, "echo": echo})
        hog = client.open_stream()
        for _ in range(transport.STREAM_QUEUE + 8):  # more than the stream's queue holds
            await hog.send({"t": "hog"}, b"x" * 1024)
        reply = await client.request({"t": "echo", "n": 7}, timeout=5.0)  # after the cut, served at once
        await asyncio.sleep(0.2)
        alive = not client.closed
        client.close()
        server.close()
        return int(reply.header["n"]), alive

    n, alive = asyncio.run(scenario())
    assert n == 7 and alive


def test_errors_cross_the_wire_as_stable_codes() -> None:
    """A handler's error reaches the caller as RemoteError with the error's code; callers
    decide by code (pdp.errors.TRANSIENT), not by the message text, which may be reworded."""
    from pdp.raft.consensus import ConsensusError
    from pdp.errors import TRANSIENT, InputError, NotMaster, RemoteError

    raised: dict[str, Exception] = {"master": NotMaster("n1 is not the master (reworded at will)"),
                                    "commit": ConsensusError("leader changed"), "input": InputError("bad path"),
                                    "bug": ZeroDivisionError("boom")}

    async def fail(stream: Stream, hdr: dict[str, Any], _: bytes) -> None:
        raise raised[hdr["which"]]

    async def scenario() -> dict[str, tuple[str, str]]:
        client, server = await _pair({"fail": fail})
        codes = {}
        for which in raised:
            with pytest.raises(RemoteError) as info:
                await client.request({"t": "fail", "which": which}, timeout=5.0)
            codes[which] = (info.value.code, str(info.value))
        client.close()
        server.close()
        return codes

    codes = asyncio.run(scenario())
    assert {k: v[0] for k, v in codes.items()} == {"master": "not_master", "commit": "no_commit", "input": "input",
                                                   "bug": "internal"}
    assert "bad path" in codes["input"][1] and "boom" in codes["bug"][1]
    assert {"not_master", "no_commit"} <= TRANSIENT and "input" not in TRANSIENT and "internal" not in TRANSIENT
