"""Mutually authenticated (TLS 1.3), multiplexed msgpack-framed connections on asyncio.

A :class:`Connection` carries many concurrent *streams*: every frame header holds ``s``, the
stream id chosen by the dialer. A request is a stream whose first frame names a handler
(``t``); the two sides then exchange frames on it (a reply, or ``data`` frames and an
``end``). Errors come back as ``{"t": "error", "code", "message"}`` and surface as
:class:`~pdp.errors.RemoteError`. Frames without a stream id (``raft``) are one-way
messages handed to ``oneway`` at once (Raft traffic between members).

Who the other end is comes from TLS only (:mod:`pdp.net.tls`): the dialer pins the listener's
certificate fingerprint, the listener looks the dialer's proven fingerprint up in the
party's identities (:class:`Peer`). After TLS one ``hello``/``welcome`` exchange tells a
refused dialer why. Every request is checked by ``authorize(conn, kind)`` before its
handler runs; a peer that breaks the protocol is dropped, the node goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

from pdp.net import tls, wire
from pdp.errors import AuthError, PdpError, ProtocolError, RemoteError
from pdp.identity import Identity, display_id

log = logging.getLogger("pdp.net.transport")

READ_SIZE = 256 * 1024
HANDSHAKE_TIMEOUT = 10.0
IDLE_TIMEOUT = 300.0  # a connection with no traffic and no open stream this long is closed
STREAM_QUEUE = 16
MAX_STREAMS = 256  # open requests one peer may have on one connection
STREAM_STALL = 10.0  # a stream whose frames are not read this long is cut off (the connection goes on)
ONEWAY_BUFFER = 4 * 1024 * 1024  # a one-way message is dropped while this much waits unsent (Raft resends)
PROTOCOL_VERSION = 2
Handler = Callable[["Stream", dict[str, Any], bytes], Awaitable[None]]
OneWay = Callable[["Connection", dict[str, Any], bytes], None]


@dataclass(frozen=True)
class Peer:
    """The other end of a connection, as proven by its certificate (never as it claims)."""

    fp: str | None  # certificate fingerprint; None: anonymous (may only redeem a join token)
    name: str
    kind: str  # "node" | "user" | "anonymous"
    admin: bool = False

    @property
    def label(self) -> str:
        return f"{self.kind} {self.name}" + (f" ({display_id(self.fp)[:15]}...)" if self.fp else "")


ANONYMOUS = Peer(None, "anonymous", "anonymous")


class Forbidden(PdpError):
    """The peer's identity may not make this request."""

    code = "forbidden"


class ConnectionLost(PdpError):
    """The peer went away (or broke the protocol) while a stream was open."""

    code = "connection_lost"


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
            raise RemoteError(str(frame.header.get("message", "error")), str(frame.header.get("code", "error")))
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
        who: Peer = ANONYMOUS,
        authorize: Callable[[Connection, str], None] | None = None,
        oneway: OneWay | None = None,
    ) -> None:
        self.reader, self.writer, self.decoder = reader, writer, decoder
        self.peer = peer  # "host:port" (for logs)
        self.who = who
        self.handlers = handlers  # None on the dialing side: it only opens streams
        self.authorize = authorize
        self.oneway = oneway
        self.streams: dict[int, Stream] = {}
        self.next_sid = 1
        self.closed = False
        self.tasks: set[asyncio.Task[None]] = set()
        self.reader_task: asyncio.Task[None] | None = None
        self.on_close: list[Callable[[Connection], None]] = []
        self.gone: set[int] = set()  # streams cut off for not being read

    @property
    def peer_name(self) -> str:
        return self.who.name

    def start(self, pending: list[wire.Frame]) -> None:
        self.reader_task = asyncio.create_task(self._read_loop(pending))

    async def send(self, header: dict[str, Any], payload: bytes | memoryview = b"") -> None:
        if self.closed or self.writer.is_closing():
            self.close()
            raise ConnectionLost(f"{self.peer}: connection closed")
        try:
            self.writer.writelines(wire.encode_frame(header, payload))
            await self.writer.drain()
        except (ConnectionError, OSError, RuntimeError) as exc:  # uvloop: RuntimeError on a closed transport
            self.close()
            raise ConnectionLost(f"{self.peer}: {exc or 'connection lost'}") from None

    def send_nowait(self, header: dict[str, Any], payload: bytes = b"") -> bool:
        """Queue a one-way frame without waiting; False (dropped) if the connection is gone
        or the peer has not read the last ONEWAY_BUFFER bytes (it cannot pin our memory)."""
        transport = self.writer.transport
        if self.closed or transport.is_closing() or transport.get_write_buffer_size() > ONEWAY_BUFFER:
            return False
        try:
            self.writer.writelines(wire.encode_frame(header, payload))
        except (ConnectionError, OSError, RuntimeError):
            self.close()
            return False
        return True

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
        if sid is None and self.oneway is not None:
            self.oneway(self, frame.header, frame.payload)
            return
        if not isinstance(sid, int):
            raise ProtocolError("frame without a stream id")
        if sid in self.gone:
            return  # the rest of a stream that was cut off for not being read
        stream = self.streams.get(sid)
        if stream is not None:
            if stream.queue.full():
                await self._wait_for_room(stream, frame)
            else:
                stream.queue.put_nowait(frame)
            return
        if self.handlers is None:
            return  # a late frame for a stream we gave up on
        if len(self.streams) >= MAX_STREAMS:
            raise ProtocolError(f"more than {MAX_STREAMS} requests open at once")
        stream = Stream(self, sid)
        self.streams[sid] = stream
        task = asyncio.create_task(self._serve(stream, frame))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _wait_for_room(self, stream: Stream, frame: wire.Frame) -> None:
        """A stream whose reader lags holds up the connection (TCP pushes back on the peer),
        but not for long: after STREAM_STALL seconds that stream alone is cut off."""
        try:
            await asyncio.wait_for(stream.queue.put(frame), STREAM_STALL)
        except asyncio.TimeoutError:
            log.warning("%s: stream %d was not read for %g s; dropped it", self.peer, stream.sid, STREAM_STALL)
            self.streams.pop(stream.sid, None)
            self.gone.add(stream.sid)
            with contextlib.suppress(asyncio.QueueEmpty):
                stream.queue.get_nowait()
            stream.queue.put_nowait(None)  # its reader sees the connection as lost

    async def _serve(self, stream: Stream, frame: wire.Frame) -> None:
        kind = frame.header["t"]
        handler = (self.handlers or {}).get(kind)
        try:
            if handler is None:
                raise ProtocolError(f"unknown request type {kind!r}")
            if self.authorize is not None:
                self.authorize(self, kind)
            await handler(stream, frame.header, frame.payload)
        except ConnectionLost as exc:
            if not self.closed:  # lost on another connection the handler used: tell our peer
                with contextlib.suppress(ConnectionLost, ConnectionError):
                    await stream.error(exc.code, str(exc))
        except PdpError as exc:
            with contextlib.suppress(ConnectionLost, ConnectionError):
                await stream.error(exc.code, str(exc))
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
        for callback in self.on_close:
            with contextlib.suppress(Exception):
                callback(self)


async def _next_frame(
    reader: asyncio.StreamReader, decoder: wire.FrameDecoder, pending: list[wire.Frame]
) -> wire.Frame:
    while not pending:
        data = await reader.read(READ_SIZE)
        if not data:
            raise ConnectionLost("the peer closed the connection")
        pending.extend(decoder.feed(data))
    return pending.pop(0)


def _send_now(writer: asyncio.StreamWriter, header: dict[str, Any]) -> None:
    writer.writelines(wire.encode_frame(header))


_CONTEXTS: dict[str | None, ssl.SSLContext] = {}


def _client_context(ident: Identity | None) -> ssl.SSLContext:
    key = ident.fp if ident is not None else None
    ctx = _CONTEXTS.get(key)
    if ctx is None:
        ctx = _CONTEXTS[key] = tls.client_context(ident)
    return ctx


async def dial(addr: str, ident: Identity | None, expect: str | Iterable[str],
               timeout: float = HANDSHAKE_TIMEOUT, oneway: OneWay | None = None) -> Connection:
    """Connect to ``addr`` over mutual TLS as ``ident`` (None: anonymous, for a join token),
    refusing a listener whose certificate fingerprint is not ``expect`` (or one of them)."""
    host, port = split_addr(addr)
    mine = f" (your id {display_id(ident.fp)[:15]}...)" if ident is not None else ""
    refused = AuthError(f"the node at {addr} closed the connection: it does not know this identity{mine} - not a "
                        "member of this party, or revoked (`pdp id` shows it; ask an admin)")
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(
            host, port, ssl=_client_context(ident), server_hostname=tls.SNI, ssl_handshake_timeout=timeout), timeout)
    except ssl.SSLError as exc:
        if "alert" in str(exc):  # TLS 1.3: the listener's refusal of our certificate
            raise refused from None
        raise ConnectionLost(f"cannot reach a pdp node at {addr}: TLS failed: {exc}") from None
    except (OSError, asyncio.TimeoutError) as exc:
        raise ConnectionLost(f"cannot reach a pdp node at {addr}: {exc or 'timed out'}") from None
    decoder, pending = wire.FrameDecoder(max_header=4096, max_payload=0), list[wire.Frame]()
    try:
        fp = tls.check_pin(addr, tls.peer_fingerprint(writer.get_extra_info("ssl_object")), expect)
        _send_now(writer, {"t": "hello", "v": PROTOCOL_VERSION})
        welcome = await asyncio.wait_for(_next_frame(reader, decoder, pending), timeout)
        hdr = welcome.header
        if hdr["t"] == "error":
            raise AuthError(f"refused by the node at {addr}: {str(hdr.get('message', ''))[:300]}")
        if hdr["t"] != "welcome" or hdr.get("v") != PROTOCOL_VERSION:
            raise ProtocolError(f"{addr} answered {hdr['t']!r} (version {hdr.get('v')!r}); run the same pdp "
                                f"version (protocol {PROTOCOL_VERSION}) on every machine")
    except asyncio.TimeoutError:
        writer.close()
        raise ConnectionLost(f"{addr}: no answer within {timeout:g} s (is it a pdp node?)") from None
    except (ConnectionLost, ConnectionResetError):
        writer.close()
        raise refused from None
    except ssl.SSLError as exc:
        writer.close()
        if "alert" in str(exc):
            raise refused from None
        raise ConnectionLost(f"{addr}: TLS failed: {exc}") from None
    except (AuthError, ProtocolError, OSError) as exc:
        writer.close()
        if isinstance(exc, AuthError):
            raise
        raise ConnectionLost(f"{addr}: handshake failed: {exc}") from None
    decoder.max_header, decoder.max_payload = wire.MAX_HEADER, wire.MAX_PAYLOAD
    conn = Connection(reader, writer, decoder, addr, who=Peer(fp, str(hdr.get("name", "")), "node"), oneway=oneway)
    conn.start(pending)
    return conn


Resolve = Callable[[str | None], "Peer | str"]


async def accept(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    name: str,
    resolve: Resolve,
    handlers: dict[str, Handler],
    authorize: Callable[[Connection, str], None],
    oneway: OneWay | None = None,
    timeout: float = HANDSHAKE_TIMEOUT,
) -> Connection | None:
    """The listener's side after TLS: look the proven certificate up (``resolve`` returns the
    :class:`Peer`, or why it is refused), answer the hello; None (and a log line) if refused."""
    peer = "%s:%s" % writer.get_extra_info("peername")[:2]
    fp = tls.peer_fingerprint(writer.get_extra_info("ssl_object"))
    decoder, pending = wire.FrameDecoder(max_header=4096, max_payload=0), list[wire.Frame]()
    try:
        hello = await asyncio.wait_for(_next_frame(reader, decoder, pending), timeout)
        if hello.header["t"] != "hello" or hello.header.get("v") != PROTOCOL_VERSION:
            raise ProtocolError(f"expected hello version {PROTOCOL_VERSION}, got {hello.header['t']!r} "
                                f"version {hello.header.get('v')!r}")
        who = resolve(fp)
        if isinstance(who, str):
            log.warning("refused %s (id %s): %s", peer, display_id(fp) if fp else "none", who)
            _send_now(writer, wire.error_header("auth", who))
            await writer.drain()
            writer.close()
            return None
        _send_now(writer, {"t": "welcome", "v": PROTOCOL_VERSION, "name": name, "you": who.name})
        await writer.drain()
    except (ProtocolError, ConnectionLost, asyncio.TimeoutError, OSError, ssl.SSLError) as exc:
        quiet = isinstance(exc, ConnectionLost) and not decoder.fed
        # a connect-and-close (the master probing whether a silent member's process is alive) is no news
        (log.debug if quiet else log.warning)("dropped %s during the handshake: %s", peer, exc or "timed out")
        writer.close()
        return None
    decoder.max_header, decoder.max_payload = wire.MAX_HEADER, wire.MAX_PAYLOAD
    conn = Connection(reader, writer, decoder, peer, handlers, who=who, authorize=authorize, oneway=oneway)
    conn.start(pending)
    return conn


def split_addr(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise PdpError(f"bad address {addr!r}: expected HOST:PORT")
    return host.strip("[]"), int(port)


def raft_addr_of(data_addr: str) -> str:
    """A member's Raft node id: its data address (Raft shares the one port)."""
    split_addr(data_addr)
    return data_addr


class Peers:
    """Reusable outbound connections, one per (address, purpose); a closed one is dialed again.

    ``pins(addr)`` names the fingerprint(s) the member at ``addr`` must prove."""

    def __init__(self, ident: Identity, pins: Callable[[str], str | set[str]],
                 oneway: OneWay | None = None) -> None:
        self.ident, self.pins, self.oneway = ident, pins, oneway
        self._conns: dict[tuple[str, str], Connection] = {}
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}

    async def get(self, addr: str, timeout: float = HANDSHAKE_TIMEOUT, purpose: str = "data") -> Connection:
        key = (addr, purpose)
        conn = self._conns.get(key)
        if conn is not None and not conn.closed:
            return conn
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            conn = self._conns.get(key)
            if conn is None or conn.closed:
                conn = await dial(addr, self.ident, self.pins(addr), timeout, oneway=self.oneway)
                self._conns[key] = conn
            return conn

    def live(self, addr: str, purpose: str = "data") -> Connection | None:
        conn = self._conns.get((addr, purpose))
        return conn if conn is not None and not conn.closed else None

    async def request(self, addr: str, header: dict[str, Any], payload: bytes = b"", timeout: float = 30.0) -> wire.Frame:
        conn = await self.get(addr)
        return await conn.request(header, payload, timeout)

    def close_purpose(self, purpose: str) -> None:
        for (addr, p), conn in list(self._conns.items()):
            if p == purpose:
                conn.close()
                del self._conns[(addr, p)]

    def drop(self, fps: set[str]) -> None:
        """Close connections to members whose identity was revoked."""
        for conn in list(self._conns.values()):
            if conn.who.fp in fps:
                conn.close()

    def close(self) -> None:
        for conn in self._conns.values():
            conn.close()
        self._conns.clear()
