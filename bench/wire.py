"""Wire cost: 1 MiB frames between two processes on loopback, and the handshake.

Runs a receiving node-like process (a real pdp listener: TLS 1.3, pinned identities, the
frame decoder) and, in the same process tree, a plain uvloop TCP sink as the baseline.
Prints GB/s of each and their ratio, and the median time of a full pdp dial (TCP + TLS 1.3
handshake with both certificates + hello/welcome), which is what every new connection pays.

    python bench/wire.py --mb 2000 --dials 100
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import statistics
import time
from typing import Any

import uvloop

from pdp.net import tls
from pdp.identity import new_identity
from pdp.net.transport import ANONYMOUS, Connection, Peer, Stream, accept, dial

BLOCK = 1 << 20


def _sink_plain(port_q: Any, total: int) -> None:
    async def main() -> None:
        done = asyncio.Event()

        async def on(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            got = 0
            while got < total:
                data = await reader.read(1 << 20)
                if not data:
                    break
                got += len(data)
            writer.write(b"k")
            await writer.drain()
            writer.close()
            done.set()

        server = await asyncio.start_server(on, "127.0.0.1", 0)
        port_q.put(server.sockets[0].getsockname()[1])
        await done.wait()

    uvloop.run(main())


def _sink_pdp(port_q: Any, server_pem: tuple[str, str], client_cert: str, total: int) -> None:
    from pdp.identity import Identity

    ident = Identity("sink", "node", *server_pem)

    async def main() -> None:
        done = asyncio.Event()

        async def data(stream: Stream, hdr: dict[str, Any], payload: bytes) -> None:
            got = len(payload)
            while got < total:
                frame = await stream.recv(60)
                got += len(frame.payload)
            await stream.send({"t": "ok"})
            done.set()

        ctx = tls.server_context(ident, [client_cert])
        who = Peer(None, "bench", "node")

        async def on(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            conn = await accept(reader, writer, "sink", lambda fp: who if fp else ANONYMOUS, {"data": data},
                                lambda c, k: None)
            if conn is not None and conn.reader_task is not None:
                await conn.reader_task

        server = await asyncio.start_server(on, "127.0.0.1", 0, ssl=ctx)
        port_q.put(server.sockets[0].getsockname()[1])
        await asyncio.wait_for(done.wait(), 600)
        await asyncio.sleep(0.2)

    uvloop.run(main())


async def _plain(port: int, total: int) -> float:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    block = os.urandom(BLOCK)
    t = time.perf_counter()
    for _ in range(total // BLOCK):
        writer.write(block)
        await writer.drain()
    await reader.read(1)
    elapsed = time.perf_counter() - t
    writer.close()
    return total / elapsed / 1e9


async def _pdp(port: int, client: Any, server_fp: str, total: int) -> float:
    conn: Connection = await dial(f"127.0.0.1:{port}", client, server_fp)
    stream = conn.open_stream()
    block = os.urandom(BLOCK)
    t = time.perf_counter()
    for k in range(total // BLOCK):
        await stream.send({"t": "data"}, block)
    await stream.recv(120)
    elapsed = time.perf_counter() - t
    conn.close()
    return total / elapsed / 1e9


async def _dials(port: int, client: Any, server_fp: str, n: int) -> list[float]:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        conn = await dial(f"127.0.0.1:{port}", client, server_fp)
        times.append(time.perf_counter() - t)
        conn.close()
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=int, default=1000, help="MiB to send per run")
    ap.add_argument("--dials", type=int, default=100, help="handshakes to time")
    args = ap.parse_args()
    total = args.mb * BLOCK
    server, client = new_identity("sink", "node"), new_identity("bench", "node")
    ctx = multiprocessing.get_context("spawn")

    q = ctx.Queue()
    p = ctx.Process(target=_sink_plain, args=(q, total))
    p.start()
    plain = uvloop.run(_plain(q.get(), total))
    p.join()

    q = ctx.Queue()
    p = ctx.Process(target=_sink_pdp, args=(q, (server.key_pem, server.cert_pem), client.cert_pem, total))
    p.start()
    port = q.get()
    secured = uvloop.run(_pdp(port, client, server.fp, total))
    p.join()

    # handshakes against a listener that stays up (a fresh sink with a huge total)
    q = ctx.Queue()
    p = ctx.Process(target=_sink_pdp, args=(q, (server.key_pem, server.cert_pem), client.cert_pem, 1 << 60))
    p.start()
    times = uvloop.run(_dials(q.get(), client, server.fp, args.dials))
    p.terminate()
    p.join()
    med = statistics.median(times) * 1000
    print(f"plain uvloop TCP, 1 MiB writes : {plain:.2f} GB/s")
    print(f"pdp frames over mutual TLS 1.3 : {secured:.2f} GB/s  ({secured / plain:.2f} of plain)")
    print(f"pdp dial (TCP + TLS 1.3 + hello): median {med:.2f} ms, p90 "
          f"{sorted(times)[int(0.9 * len(times))] * 1000:.2f} ms over {len(times)}")


if __name__ == "__main__":
    main()
