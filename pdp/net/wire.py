"""The pdp wire format, sans-IO: frames (no sockets, no asyncio, no clocks).

Every message on a pdp connection is one frame: an 8-byte prefix ``struct ">II"`` =
(header_len, payload_len), then ``header_len`` bytes of a msgpack map with str keys that
always holds a str field ``"t"`` (the message type), then ``payload_len`` raw bytes. Bulk
data travels in the payload, never inside msgpack. :func:`encode_frame` builds a frame,
:func:`decode_header` strictly parses a header, and :class:`FrameDecoder` turns an
arbitrary byte stream into :class:`Frame` objects, enforcing the size limits from the
prefix alone. Frames travel inside TLS 1.3 (:mod:`pdp.net.tls`), which authenticates and
encrypts them; anything a peer sends that breaks these rules raises
:class:`~pdp.errors.ProtocolError` and the connection is dropped.
"""

from __future__ import annotations

import struct
from typing import Any, NamedTuple

import msgpack

from pdp.errors import ProtocolError

__all__ = ["MAX_HEADER", "MAX_PAYLOAD", "Frame", "FrameDecoder", "encode_frame", "decode_header", "error_header"]

MAX_HEADER = 64 * 1024
MAX_PAYLOAD = 8 * 1024 * 1024

_PREFIX = struct.Struct(">II")
PREFIX_LEN = _PREFIX.size  # 8

# -- frames -------------------------------------------------------------------------


class Frame(NamedTuple):
    """One decoded frame: the header map and the raw payload (``b""`` if none)."""

    header: dict
    payload: bytes


def _short(value: Any, limit: int = 40) -> str:
    """A repr of ``value`` cut to ``limit`` characters, safe to put in an error message."""
    text = repr(value)
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return text


def encode_frame(header: dict, payload: bytes | bytearray | memoryview = b"") -> list[bytes | bytearray | memoryview]:
    """Encode one frame as a list of buffers for ``transport.writelines``.

    Returns ``[prefix + packed header, payload]``; the payload is left out when empty
    and is passed through without copying. Raises
    ProtocolError if the header has no str ``"t"``, or the header or payload exceeds
    MAX_HEADER / MAX_PAYLOAD. A header value msgpack cannot encode is a programming error
    and raises TypeError.
    """
    if not isinstance(header, dict):
        raise ProtocolError(f"a frame header must be a dict, not {type(header).__name__}")
    if not isinstance(header.get("t"), str):
        raise ProtocolError("a frame header needs a str field 't' (the message type)")
    packed = msgpack.packb(header, use_bin_type=True)
    if len(packed) > MAX_HEADER:
        raise ProtocolError(
            f"frame header {header['t']!r} of {len(packed)} bytes exceeds the {MAX_HEADER}-byte limit"
        )
    plen = memoryview(payload).nbytes
    if plen > MAX_PAYLOAD:
        raise ProtocolError(f"frame payload of {plen} bytes exceeds the {MAX_PAYLOAD}-byte limit")
    first = _PREFIX.pack(len(packed), plen) + packed
    return [first, payload] if plen else [first]


def error_header(code: str, message: str) -> dict:
    """The header of an ``error`` frame: ``{"t": "error", "code": code, "message": message}``."""
    return {"t": "error", "code": code, "message": message}


def _ext_refused(code: int, data: bytes) -> Any:
    raise ProtocolError("msgpack ExtType is not allowed")


def decode_header(data: bytes | bytearray | memoryview, *, max_size: int = MAX_HEADER) -> dict:
    """Strictly decode a frame header: exactly one msgpack map with str keys and a str ``"t"``.

    Rejected with ProtocolError: more than ``max_size`` bytes, anything that is not
    valid msgpack, trailing bytes after the map, a non-map, a non-str key, any
    ExtType (including msgpack's built-in Timestamp), and a missing or non-str ``"t"``.
    """
    size = memoryview(data).nbytes
    if size > max_size:
        raise ProtocolError(f"frame header of {size} bytes exceeds the {max_size}-byte limit")
    try:
        obj = msgpack.unpackb(data, raw=False, strict_map_key=True, ext_hook=_ext_refused)
    except ProtocolError:
        raise
    except msgpack.ExtraData:
        raise ProtocolError("frame header has trailing bytes after the msgpack map") from None
    except msgpack.StackError:
        raise ProtocolError("frame header is nested too deeply") from None
    except msgpack.FormatError:
        raise ProtocolError("frame header is not valid msgpack (reserved type byte)") from None
    except UnicodeDecodeError:
        raise ProtocolError("frame header holds a string that is not valid UTF-8") from None
    except Exception as exc:  # msgpack reports the rest as ValueError/TypeError/...
        if "not allowed for map key" in str(exc):
            raise ProtocolError("frame header map keys must be str") from None
        raise ProtocolError(f"frame header is not valid msgpack ({_short(str(exc), 80)})") from None
    if not isinstance(obj, dict):
        raise ProtocolError(f"frame header must be a msgpack map, not {type(obj).__name__}")
    for key in obj:
        if not isinstance(key, str):
            raise ProtocolError(f"frame header keys must be str, found a {type(key).__name__} key")
    _refuse_timestamps(obj)
    t = obj.get("t")
    if t is None:
        raise ProtocolError("frame header has no 't' (message type) field")
    if not isinstance(t, str):
        raise ProtocolError(f"frame header field 't' must be a str, not {type(t).__name__}")
    return obj


def _refuse_timestamps(obj: Any) -> None:
    """msgpack decodes ext type -1 to Timestamp without calling ext_hook; refuse it anywhere."""
    stack = [obj]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, msgpack.Timestamp):
            raise ProtocolError("msgpack ExtType is not allowed")


class FrameDecoder:
    """Incremental frame decoder: feed it bytes as they arrive, get whole frames back.

    The size limits are checked as soon as a frame's 8-byte prefix is known, before
    any of its body is buffered. Payload bytes are kept as the pieces they arrived in
    (views on immutable ``bytes`` input, copies otherwise) and joined once when the
    frame is complete, so a large payload is copied about once or twice in total and
    memory grows only with bytes actually received. A decoder whose peer has not yet
    authenticated may be built with a small ``max_payload``.

    After any ProtocolError the decoder is dead: every later ``feed`` raises the same
    error (frames completed earlier in the failing ``feed`` call are discarded, since
    the connection is to be dropped anyway).
    """

    def __init__(self, max_header: int = MAX_HEADER, max_payload: int = MAX_PAYLOAD) -> None:
        self.max_header = max_header
        self.max_payload = max_payload
        self.fed = 0  # bytes received in all
        self._error: ProtocolError | None = None
        self._prefix = bytearray()  # partial prefix (< 8 bytes)
        self._hlen: int | None = None  # set while reading a frame's body
        self._plen = 0
        self._hbuf = bytearray()  # header bytes received so far
        self._header: dict | None = None  # decoded header, once all its bytes are in
        self._pieces: list[bytes | memoryview] = []
        self._got = 0  # payload bytes received so far

    @property
    def buffered(self) -> int:
        """Bytes received and held for the frame in progress."""
        return len(self._prefix) + len(self._hbuf) + self._got

    @property
    def dead(self) -> bool:
        """True once the stream broke the protocol; the connection should be dropped."""
        return self._error is not None

    def feed(self, data: bytes | bytearray | memoryview) -> list[Frame]:
        """Take the next bytes of the stream; return the frames they complete (maybe none)."""
        if self._error is not None:
            raise self._error
        self.fed += len(data)
        try:
            return self._feed(data)
        except ProtocolError as exc:
            self._error = exc
            self._reset_frame()
            raise

    def _feed(self, data: bytes | bytearray | memoryview) -> list[Frame]:
        mv = memoryview(data)
        if mv.ndim != 1 or mv.itemsize != 1:
            mv = mv.cast("B")
        immutable = isinstance(data, bytes)
        n = len(mv)
        off = 0
        frames: list[Frame] = []
        while True:
            if self._hlen is None:
                # Reading the 8-byte prefix.
                if not self._prefix and n - off >= PREFIX_LEN:
                    hlen, plen = _PREFIX.unpack_from(mv, off)
                    off += PREFIX_LEN
                else:
                    take = min(PREFIX_LEN - len(self._prefix), n - off)
                    if take <= 0:
                        break
                    self._prefix += mv[off : off + take]
                    off += take
                    if len(self._prefix) < PREFIX_LEN:
                        break
                    hlen, plen = _PREFIX.unpack(self._prefix)
                    self._prefix.clear()
                self._check_prefix(hlen, plen)
                self._hlen, self._plen = hlen, plen

            if self._header is None:
                need = self._hlen - len(self._hbuf)
                take = min(need, n - off)
                if take:
                    self._hbuf += mv[off : off + take]
                    off += take
                if len(self._hbuf) < self._hlen:
                    break
                self._header = decode_header(self._hbuf, max_size=self.max_header)
                self._hbuf = bytearray()

            need = self._plen - self._got
            take = min(need, n - off)
            if take:
                piece = mv[off : off + take]
                # Keep a view when it is safe (immutable input) and worth it (it is most
                # of the chunk, so we do not pin a big buffer for a small piece).
                self._pieces.append(piece if immutable and 2 * take >= n else bytes(piece))
                self._got += take
                off += take
            if self._got < self._plen:
                break
            payload = self._join_payload()
            frames.append(Frame(self._header, payload))
            self._reset_frame()
        return frames

    def _check_prefix(self, hlen: int, plen: int) -> None:
        if hlen == 0:
            raise ProtocolError("frame has an empty header (every frame needs a header map)")
        if hlen > self.max_header:
            raise ProtocolError(f"frame header of {hlen} bytes exceeds the {self.max_header}-byte limit")
        if plen > self.max_payload:
            raise ProtocolError(f"frame payload of {plen} bytes exceeds the {self.max_payload}-byte limit")

    def _join_payload(self) -> bytes:
        pieces = self._pieces
        if not pieces:
            return b""
        if len(pieces) == 1:
            return bytes(pieces[0])
        return b"".join(pieces)

    def _reset_frame(self) -> None:
        self._hlen = None
        self._plen = 0
        self._hbuf = bytearray()
        self._header = None
        self._pieces = []
        self._got = 0
