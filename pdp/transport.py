"""Authenticated, multiplexed msgpack-framed TCP connections on asyncio.

A :class:`Connection` carries many concurrent *streams*: every frame header holds ``s``, the
stream id chosen by the dialer. A request is a stream whose first frame names a handler
(``t``); the two sides then exchange frames on it (a reply, or ``data`` frames and an
``end``). Errors come back as ``{"t": "error", "code", "message"}`` and surface as
:class:`~pdp.errors.RemoteError`. The handshake (mutual challenge–response over the party
secret) runs before anything else; a peer that breaks the protocol is dropped, the node
goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from pdp import wire
from pdp.errors import AuthError, PdpError, ProtocolError, RemoteError

log = logging.getLogger("pdp.transport")

READ_SIZE = 256 * 1024
HANDSHAKE_TIMEOUT = 10.0
IDLE_TIMEOUT = 300.0  # a connection with no traffic and no open stream this long is closed
STREAM_QUEUE = 16
Handler = Callable[["Stream", dict[str, Any], bytes], Awaitable[None]]


class ConnectionLost(PdpError):
    """The peer went away (or broke the protocol) while a stream was open."""


class Stream:
    """One exchange of frames on a connection."""

    def __init__(self, conn: Connection, sid: int) -> None:
        self.conn = conn
        self.sid = sid
        self.queue: asyncio.Queue[wire.Frame | None] = asyncio.Queue(STREAM_QUEUE)

    async def send(self, header: dict[str, Any], payload: bytes | memoryview = b"") -> None:
        await self.conn.send({**header, "s": self.sid}, payload)

    async def error(self, code: str, message: str) -> None:
        await self.send(wire.error_header(code, message))

    async def recv(self, timeout: float | None = 30.0) -> wire.Frame:
        """The next frame; RemoteError for an error frame, ConnectionLost if the peer left."""
        try:
            frame = await asyncio.wait_for(self.queue.get(), timeout)
        except asyncio.TimeoutError:
            self.conn.close()  # never reuse a connection after a timeout
            raise ConnectionLost(f"{self.conn.peer}: no answer within {timeout:g} s") from None
        if frame is None:
            raise ConnectionLost(f"{self.conn.peer}: connection lost")
        if frame.header["t"] == "error":
            raise RemoteError(str(frame.header.get("message", "error")))
        return frame

    def close(self) -> None:
        self.conn.streams.pop(self.sid, None)


class Connection:
    """A live, authenticated connection: reads in a background task, dispatches by stream."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        decoder: wire.FrameDecoder,
        peer: str,
        handlers: dict[str, Handler] | None = None,
    ) -> None:
        self.reader, self.writer, self.decoder = reader, writer, decoder
        self.peer = peer
        self.peer_name = ""
        self.peer_role = ""
        self.handlers = handlers  # None on the dialing side: it only opens streams
        self.streams: dict[int, Stream] = {}
        self.next_sid = 1
        self.closed = False
        self.tasks: set[asyncio.Task[None]] = set()
        self.reader_task: asyncio.Task[None] | None = None
        self.sealer: wire.Sealer | None = None

    def secure(self, session_key: bytes, dialer: bool, pending: list[wire.Frame]) -> None:
        """From now on every frame is sealed (AES-GCM with keys from the handshake)."""
        if pending or self.decoder.buffered:
            raise ProtocolError("the peer sent frames before the handshake finished")
        self.sealer, self.decoder.opener = wire.session_keys(session_key, dialer)

    def start(self, pending: list[wire.Frame]) -> None:
        self.reader_task = asyncio.create_task(self._read_loop(pending))

    async def send(self, header: dict[str, Any], payload: bytes | memoryview = b"") -> None:
        if self.closed or self.writer.is_closing():
            self.close()
            raise ConnectionLost(f"{self.peer}: connection closed")
        try:
            self.writer.writelines(wire.encode_frame(header, payload, self.sealer))
            await self.writer.drain()
        except (ConnectionError, OSError, RuntimeError) as exc:  # uvloop: RuntimeError on a closed transport
            self.close()
            raise ConnectionLost(f"{self.peer}: {exc or 'connection lost'}") from None

    def open_stream(self) -> Stream:
        stream = Stream(self, self.next_sid)
        self.streams[stream.sid] = stream
        self.next_sid += 1
        return stream

    async def request(
        self, header: dict[str, Any], payload: bytes = b"", timeout: float = 30.0
    ) -> wire.Frame:
        """Send one frame on a new stream and wait for the first reply frame."""
        stream = self.open_stream()
        try:
            await stream.send(header, payload)
            return await stream.recv(timeout)
        finally:
            stream.close()

    async def _read_loop(self, pending: list[wire.Frame]) -> None:
        try:
            for frame in pending:
                await self._dispatch(frame)
            while True:
                try:
                    data = await asyncio.wait_for(self.reader.read(READ_SIZE), IDLE_TIMEOUT)
                except asyncio.TimeoutError:
                    if self.streams:
                        continue  # quiet, but something is in progress (a long wait)
                    log.info("closing %s: idle for %g s", self.peer, IDLE_TIMEOUT)
                    break
                if not data:
                    break
                for frame in self.decoder.feed(data):
                    await self._dispatch(frame)
        except ProtocolError as exc:
            log.warning("dropping %s: %s", self.peer, exc)
        except (ConnectionError, OSError) as exc:
            log.debug("connection to %s failed: %s", self.peer, exc)
        finally:
            self.close()

    async def _dispatch(self, frame: wire.Frame) -> None:
        sid = frame.header.get("s")
        if not isinstance(sid, int):
            raise ProtocolError("frame without a stream id")
        stream = self.streams.get(sid)
        if stream is not None:
            await stream.queue.put(frame)
            return
        if self.handlers is None:
            return  # a late frame for a stream we gave up on
        stream = Stream(self, sid)
        self.streams[sid] = stream
        task = asyncio.create_task(self._serve(stream, frame))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _serve(self, stream: Stream, frame: wire.Frame) -> None:
        kind = frame.header["t"]
        handler = (self.handlers or {}).get(kind)
        try:
            if handler is None:
                raise ProtocolError(f"unknown request type {kind!r}")
            await handler(stream, frame.header, frame.payload)
        except ConnectionLost as exc:
            if not self.closed:  # lost on another connection the handler used: tell our peer
                with contextlib.suppress(ConnectionLost, ConnectionError):
                    await stream.error(type(exc).__name__, str(exc))
        except PdpError as exc:
            with contextlib.suppress(ConnectionLost, ConnectionError):
                await stream.error(type(exc).__name__, str(exc))
        except Exception as exc:
            log.exception("handler %s failed for %s", kind, self.peer)
            with contextlib.suppress(ConnectionLost, ConnectionError):
                await stream.error("internal", f"internal error in {kind}: {type(exc).__name__}: {exc}")
        finally:
            stream.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for stream in list(self.streams.values()):
            with contextlib.suppress(asyncio.QueueFull):
                stream.queue.put_nowait(None)
        self.writer.close()
        for task in list(self.tasks):
            task.cancel()


async def _next_frame(
    reader: asyncio.StreamReader, decoder: wire.FrameDecoder, pending: list[wire.Frame]
) -> wire.Frame:
    while not pending:
        data = await reader.read(READ_SIZE)
        if not data:
            raise ConnectionLost("the peer closed the connection during the handshake")
        pending.extend(decoder.feed(data))
    return pending.pop(0)


def _send_now(writer: asyncio.StreamWriter, header: dict[str, Any]) -> None:
    writer.writelines(wire.encode_frame(header))


async def dial(addr: str, key: bytes, name: str, role: str, timeout: float = HANDSHAKE_TIMEOUT) -> Connection:
    """Connect to ``addr`` ("host:port") and prove the party secret both ways."""
    host, port = split_addr(addr)
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    except (OSError, asyncio.TimeoutError) as exc:
        raise ConnectionLost(f"cannot reach a pdp node at {addr}: {exc or 'timed out'}") from None
    decoder, pending = wire.FrameDecoder(), list[wire.Frame]()
    try:
        shake = wire.DialerHandshake(key, name, role)
        _send_now(writer, shake.hello())
        challenge = await asyncio.wait_for(_next_frame(reader, decoder, pending), timeout)
        if challenge.header["t"] == "error":
            shake.on_welcome(challenge.header)  # raises AuthError with the node's reason
        try:
            _send_now(writer, shake.on_challenge(challenge.header))
        except AuthError:  # tell the node too, so both logs name the reason
            _send_now(writer, wire.error_header("auth", "wrong party secret: the dialer could not verify this node's proof"))
            with contextlib.suppress(Exception):
                await writer.drain()
            raise
        welcome = await asyncio.wait_for(_next_frame(reader, decoder, pending), timeout)
        if welcome.header["t"] == "error" and welcome.header.get("code") == "not_invited":
            raise AuthError(f"refused by the node: {str(welcome.header.get('message', ''))[:300]}")
        shake.on_welcome(welcome.header)
    except asyncio.TimeoutError:
        writer.close()
        raise ConnectionLost(f"{addr}: no handshake answer within {timeout:g} s (is it a pdp node?)") from None
    except (AuthError, ProtocolError, ConnectionLost, OSError) as exc:
        writer.close()
        if isinstance(exc, AuthError):
            raise AuthError(f"{addr}: {exc}") from None
        raise ConnectionLost(f"{addr}: handshake failed: {exc}") from None
    conn = Connection(reader, writer, decoder, addr)
    conn.peer_name = shake.peer_name
    try:
        conn.secure(shake.session_key, dialer=True, pending=pending)
    except ProtocolError as exc:
        writer.close()
        raise ConnectionLost(f"{addr}: {exc}") from None
    conn.start([])
    return conn


async def accept(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    key: bytes,
    name: str,
    handlers: dict[str, Handler],
    admit: Callable[[str, str], str | None] = lambda name, role: None,
    timeout: float = HANDSHAKE_TIMEOUT,
) -> Connection | None:
    """Run the listener's side of the handshake; None (and a log line) if the peer fails it.

    ``admit(name, role)`` returns None to let a peer that proved the secret in, or the
    reason it may not come in (a node that is not invited)."""
    peer = "%s:%s" % writer.get_extra_info("peername")[:2]
    # a stranger gets no room: handshake frames are small and carry no payload
    decoder, pending = wire.FrameDecoder(max_header=4096, max_payload=0), list[wire.Frame]()
    shake = wire.ListenerHandshake(key, name)
    try:
        hello = await asyncio.wait_for(_next_frame(reader, decoder, pending), timeout)
        _send_now(writer, shake.on_hello(hello.header))
        auth = await asyncio.wait_for(_next_frame(reader, decoder, pending), timeout)
        if auth.header["t"] == "error":
            raise AuthError(str(auth.header.get("message", "the dialer gave up"))[:300])
        welcome = shake.on_auth(auth.header)
        refusal = admit(shake.peer_name, shake.peer_role)
        if refusal is not None:
            log.warning("refused %s (%s): %s", peer, shake.peer_name, refusal)
            _send_now(writer, wire.error_header("not_invited", refusal))
            await writer.drain()
            writer.close()
            return None
        _send_now(writer, welcome)
        await writer.drain()
    except AuthError as exc:
        log.warning("refused %s: %s", peer, exc)
        with contextlib.suppress(Exception):
            _send_now(writer, wire.error_header("auth", f"refused by the node: {exc}"))
            await writer.drain()
        writer.close()
        return None
    except (ProtocolError, ConnectionLost, asyncio.TimeoutError, OSError) as exc:
        quiet = isinstance(exc, ConnectionLost) and not decoder.fed
        # a connect-and-close (the master probing whether a silent member's process is alive) is no news
        (log.debug if quiet else log.warning)("dropped %s during the handshake: %s", peer, exc or "timed out")
        writer.close()
        return None
    decoder.max_header, decoder.max_payload = wire.MAX_HEADER, wire.MAX_PAYLOAD
    conn = Connection(reader, writer, decoder, peer, handlers)
    conn.peer_name, conn.peer_role = shake.peer_name, shake.peer_role
    try:
        conn.secure(shake.session_key, dialer=False, pending=pending)
    except ProtocolError as exc:
        log.warning("dropped %s: %s", peer, exc)
        writer.close()
        return None
    conn.start([])
    return conn


def split_addr(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise PdpError(f"bad address {addr!r}: expected HOST:PORT")
    return host.strip("[]"), int(port)


def raft_addr_of(data_addr: str) -> str:
    """A member's Raft address: its data port + 1 (the documented convention)."""
    host, port = split_addr(data_addr)
    return f"{host}:{port + 1}"


class Peers:
    """Reusable outbound connections, one per address; a closed one is dialed again."""

    def __init__(self, key: bytes, name: str, role: str = "node") -> None:
        self.key, self.name, self.role = key, name, role
        self._conns: dict[str, Connection] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    async def get(self, addr: str, timeout: float = HANDSHAKE_TIMEOUT) -> Connection:
        conn = self._conns.get(addr)
        if conn is not None and not conn.closed:
            return conn
        lock = self._locks.setdefault(addr, asyncio.Lock())
        async with lock:
            conn = self._conns.get(addr)
            if conn is None or conn.closed:
                conn = await dial(addr, self.key, self.name, self.role, timeout)
                self._conns[addr] = conn
            return conn

    async def request(self, addr: str, header: dict[str, Any], payload: bytes = b"", timeout: float = 30.0) -> wire.Frame:
        conn = await self.get(addr)
        return await conn.request(header, payload, timeout)

    def close(self) -> None:
        for conn in self._conns.values():
            conn.close()
        self._conns.clear()
