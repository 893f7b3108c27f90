"""The pdp wire format and connection handshake, sans-IO.

This module owns two things and nothing else (no sockets, no asyncio, no clocks):

* **Frames.** Every message on a pdp connection is one frame: an 8-byte prefix
  ``struct ">II"`` = (header_len, payload_len), then ``header_len`` bytes of a
  msgpack map with str keys that always holds a str field ``"t"`` (the message
  type), then ``payload_len`` raw bytes. Bulk data travels in the payload, never
  inside msgpack. :func:`encode_frame` builds a frame, :func:`decode_header`
  strictly parses a header, and :class:`FrameDecoder` turns an arbitrary byte
  stream into :class:`Frame` objects, enforcing the size limits from the prefix
  alone.

* **The handshake.** Every connection (node<->node and client<->node) starts with a
  mutual challenge-response proving both sides hold the party secret without
  sending it: ``hello`` (dialer) -> ``challenge`` (listener, with its proof) ->
  ``auth`` (dialer's proof) -> ``welcome`` or ``error``. Each proof is an
  HMAC-SHA256 over both sides' fresh 32-byte nonces, so a recorded proof is useless
  on another connection. Both sides then derive a per-connection ``session_key``.
  :class:`DialerHandshake` and :class:`ListenerHandshake` are small state machines
  that take and return frame headers; the caller moves them over the transport.

Anything a peer sends that breaks these rules raises :class:`~pdp.errors.ProtocolError`
(or :class:`~pdp.errors.AuthError` for a failed proof); callers drop the connection.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import struct
from typing import Any, NamedTuple

import msgpack
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from pdp.errors import AuthError, ProtocolError

__all__ = [
    "MAX_HEADER",
    "MAX_PAYLOAD",
    "PROTOCOL_VERSION",
    "NONCE_LEN",
    "MAX_NAME_LEN",
    "ROLES",
    "Frame",
    "FrameDecoder",
    "encode_frame",
    "decode_header",
    "DialerHandshake",
    "ListenerHandshake",
    "error_header",
    "new_key",
    "derive",
]

MAX_HEADER = 64 * 1024
MAX_PAYLOAD = 8 * 1024 * 1024

_PREFIX = struct.Struct(">II")
PREFIX_LEN = _PREFIX.size  # 8
TAG = 16  # AES-GCM tag on each sealed header and payload
_NONCE = struct.Struct(">4xQ")  # 96-bit nonce: 4 zero bytes, then the frame counter

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


class Sealer:
    """AEAD (AES-256-GCM) for one direction of a connection, after the handshake.

    Every frame's header and payload are sealed separately, each under the next value of
    a 64-bit counter (the nonce) with the frame's 8-byte prefix as associated data, so a
    frame that is altered, replayed, reordered or dropped fails to open and the
    connection is dropped. The two directions use different keys (:func:`session_keys`).
    """

    def __init__(self, key: bytes) -> None:
        self._aead = AESGCM(key)
        self._counter = 0

    def _nonce(self) -> bytes:
        nonce = _NONCE.pack(self._counter)
        self._counter += 1
        return nonce

    def seal(self, data: bytes | bytearray | memoryview, aad: bytes) -> bytes:
        return self._aead.encrypt(self._nonce(), data, aad)

    def open(self, data: bytes | bytearray, aad: bytes) -> bytes:
        try:
            return self._aead.decrypt(self._nonce(), data, aad)
        except InvalidTag:
            raise ProtocolError("a frame failed authentication (altered, replayed or out of order)") from None


def session_keys(session_key: bytes, dialer: bool) -> tuple[Sealer, Sealer]:
    """(sealer for what this side sends, opener for what it receives)."""
    d2l, l2d = derive(session_key, "dialer->listener"), derive(session_key, "listener->dialer")
    return (Sealer(d2l), Sealer(l2d)) if dialer else (Sealer(l2d), Sealer(d2l))


def encode_frame(
    header: dict, payload: bytes | bytearray | memoryview = b"", sealer: Sealer | None = None
) -> list[bytes | bytearray | memoryview]:
    """Encode one frame as a list of buffers for ``transport.writelines``.

    Returns ``[prefix + packed header, payload]``; the payload is left out when empty
    and is passed through without copying (unless ``sealer`` encrypts it). Raises
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
    if sealer is None:
        first = _PREFIX.pack(len(packed), plen) + packed
        return [first, payload] if plen else [first]
    prefix = _PREFIX.pack(len(packed) + TAG, plen + TAG if plen else 0)
    first = prefix + sealer.seal(packed, prefix)
    return [first, sealer.seal(payload, prefix)] if plen else [first]


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
        self.opener: Sealer | None = None  # set after the handshake: frames are sealed from then on
        self.fed = 0  # bytes received in all
        self._aad = b""
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
                self._aad = _PREFIX.pack(hlen, plen)

            if self._header is None:
                need = self._hlen - len(self._hbuf)
                take = min(need, n - off)
                if take:
                    self._hbuf += mv[off : off + take]
                    off += take
                if len(self._hbuf) < self._hlen:
                    break
                raw = self._hbuf if self.opener is None else self.opener.open(self._hbuf, self._aad)
                self._header = decode_header(raw, max_size=self.max_header)
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
            if self.opener is not None and payload:
                payload = self.opener.open(payload, self._aad)
            frames.append(Frame(self._header, payload))
            self._reset_frame()
        return frames

    def _check_prefix(self, hlen: int, plen: int) -> None:
        tag = TAG if self.opener is not None else 0
        if hlen <= tag:
            raise ProtocolError("frame has an empty header (every frame needs a header map)")
        if hlen > self.max_header + tag:
            raise ProtocolError(f"frame header of {hlen} bytes exceeds the {self.max_header}-byte limit")
        if plen > self.max_payload + tag:
            raise ProtocolError(f"frame payload of {plen} bytes exceeds the {self.max_payload}-byte limit")
        if tag and 0 < plen <= tag:
            raise ProtocolError("sealed frame payload shorter than its tag")

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


# -- handshake ----------------------------------------------------------------------

PROTOCOL_VERSION = 1
NONCE_LEN = 32
KEY_LEN = 32
MAX_NAME_LEN = 128
ROLES = ("node", "client")

_LABEL_LISTENER = b"pdp-v1 listener"
_LABEL_DIALER = b"pdp-v1 dialer"
_LABEL_SESSION = b"pdp-v1 session"
_LABEL_DERIVE = b"pdp-v1 derive "
_MAX_REMOTE_MESSAGE = 300  # characters of a peer's error message we repeat


def new_key() -> bytes:
    """A fresh party secret: 32 random bytes."""
    return secrets.token_bytes(KEY_LEN)


def derive(key: bytes, purpose: str) -> bytes:
    """A 32-byte sub-key for ``purpose`` (e.g. the Raft password): HMAC-SHA256(key, label + purpose)."""
    return _mac(_check_key(key), _LABEL_DERIVE + purpose.encode("utf-8"))


def error_header(code: str, message: str) -> dict:
    """The header of an ``error`` frame: ``{"t": "error", "code": code, "message": message}``."""
    return {"t": "error", "code": code, "message": message}


def _mac(key: bytes, msg: bytes) -> bytes:
    return hmac.new(key, msg, hashlib.sha256).digest()


def _check_key(key: bytes) -> bytes:
    if not isinstance(key, (bytes, bytearray)):
        raise TypeError(f"the party secret must be bytes, not {type(key).__name__}")
    if len(key) < 16:
        raise ValueError(f"the party secret is only {len(key)} bytes; it must be at least 16 (pdp makes 32)")
    return bytes(key)


def _check_own_name(name: str) -> str:
    if not _valid_name(name):
        raise ValueError(f"invalid local name {_short(name)}: need 1-{MAX_NAME_LEN} printable characters")
    return name


def _valid_name(name: Any) -> bool:
    return isinstance(name, str) and 0 < len(name) <= MAX_NAME_LEN and name.isprintable()


def _expect(hdr: Any, t: str, step: str, peer: str = "the node") -> dict:
    """Check that ``hdr`` is a header dict of type ``t``; an ``error`` frame becomes an exception."""
    if not isinstance(hdr, dict):
        raise ProtocolError(f"handshake: expected a {t!r} header, got a {type(hdr).__name__}")
    got = hdr.get("t")
    if got == "error" and t != "error":
        _raise_remote_error(hdr, step, peer)
    if got != t:
        raise ProtocolError(f"handshake: expected a {t!r} frame, got {_short(got)}")
    return hdr


def _raise_remote_error(hdr: dict, step: str, peer: str) -> None:
    code = hdr.get("code")
    message = hdr.get("message")
    if not isinstance(message, str) or not message:
        message = "(no reason given)"
    elif len(message) > _MAX_REMOTE_MESSAGE:
        message = message[:_MAX_REMOTE_MESSAGE] + "..."
    text = f"refused by {peer}: {message}"
    if code == "auth":
        raise AuthError(text)
    raise ProtocolError(f"{text} (code {_short(code)}, during {step})")


def _field(hdr: dict, name: str, kind: type, what: str) -> Any:
    value = hdr.get(name)
    # bool is an int subclass; never accept True for a number field.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        if name not in hdr:
            raise ProtocolError(f"handshake {what}: missing field {name!r}")
        raise ProtocolError(
            f"handshake {what}: field {name!r} must be {kind.__name__}, not {type(value).__name__}"
        )
    return value


def _version(hdr: dict, what: str) -> None:
    v = _field(hdr, "v", int, what)
    if v != PROTOCOL_VERSION:
        raise ProtocolError(
            f"handshake {what}: peer speaks pdp protocol version {_short(v)}, this side speaks "
            f"{PROTOCOL_VERSION}; run the same pdp version on every machine"
        )


def _peer_name(hdr: dict, what: str) -> str:
    name = _field(hdr, "name", str, what)
    if not _valid_name(name):
        raise ProtocolError(f"handshake {what}: name {_short(name)} is not 1-{MAX_NAME_LEN} printable characters")
    return name


def _nonce(hdr: dict, what: str) -> bytes:
    nonce = _field(hdr, "nonce", bytes, what)
    if len(nonce) != NONCE_LEN:
        raise ProtocolError(f"handshake {what}: nonce is {len(nonce)} bytes, expected {NONCE_LEN}")
    return nonce


def _proof(hdr: dict, what: str) -> bytes:
    proof = _field(hdr, "proof", bytes, what)
    if len(proof) != hashlib.sha256().digest_size:
        raise ProtocolError(f"handshake {what}: proof is {len(proof)} bytes, expected 32")
    return proof


class _Handshake:
    """Shared state: a one-way state machine that is dead after any failure."""

    def __init__(self, key: bytes, name: str) -> None:
        self._key = _check_key(key)
        self.name = _check_own_name(name)
        self._state = "start"
        self._peer_name: str | None = None
        self._session_key: bytes | None = None

    @property
    def done(self) -> bool:
        """True once both sides have proved the secret."""
        return self._state == "done"

    @property
    def peer_name(self) -> str:
        """The other side's name (valid after success)."""
        self._require_done()
        assert self._peer_name is not None
        return self._peer_name

    @property
    def session_key(self) -> bytes:
        """HMAC-SHA256(key, "pdp-v1 session" + dialer_nonce + listener_nonce) (valid after success)."""
        self._require_done()
        assert self._session_key is not None
        return self._session_key

    def _require_done(self) -> None:
        if self._state != "done":
            raise RuntimeError("the handshake has not completed")

    def _step(self, expected: str, what: str) -> None:
        if self._state == "failed":
            raise ProtocolError("handshake: already failed; drop the connection")
        if self._state != expected:
            raise ProtocolError(f"handshake: unexpected {what} (state {self._state!r})")

    def _run(self, fn: Any, *args: Any) -> Any:
        try:
            return fn(*args)
        except (ProtocolError, AuthError):
            self._state = "failed"
            raise


class DialerHandshake(_Handshake):
    """The side that opened the connection: ``hello()``, ``on_challenge()``, ``on_welcome()``."""

    def __init__(self, key: bytes, name: str, role: str) -> None:
        super().__init__(key, name)
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, not {role!r}")
        self.role = role
        self._nonce = b""
        self._peer_nonce = b""

    def hello(self) -> dict:
        """The first header to send."""
        self._step("start", "hello()")
        self._nonce = secrets.token_bytes(NONCE_LEN)
        self._state = "hello_sent"
        return {"t": "hello", "v": PROTOCOL_VERSION, "role": self.role, "name": self.name, "nonce": self._nonce}

    def on_challenge(self, hdr: dict) -> dict:
        """Check the listener's proof; return the ``auth`` header to send."""
        self._step("hello_sent", "challenge")
        return self._run(self._on_challenge, hdr)

    def _on_challenge(self, hdr: dict) -> dict:
        what = "challenge"
        _expect(hdr, "challenge", what)
        _version(hdr, what)
        name = _peer_name(hdr, what)
        nonce = _nonce(hdr, what)
        proof = _proof(hdr, what)
        transcript = self._nonce + nonce
        if not hmac.compare_digest(proof, _mac(self._key, _LABEL_LISTENER + transcript)):
            raise AuthError(
                "the node did not prove the party secret: its key differs from yours "
                "(check --key-file / PDP_KEY_FILE)"
            )
        self._peer_name = name
        self._peer_nonce = nonce
        self._state = "auth_sent"
        return {"t": "auth", "proof": _mac(self._key, _LABEL_DIALER + transcript)}

    def on_welcome(self, hdr: dict) -> None:
        """Accept the listener's ``welcome`` (or raise AuthError/ProtocolError for its ``error``)."""
        self._step("auth_sent", "welcome")
        self._run(self._on_welcome, hdr)

    def _on_welcome(self, hdr: dict) -> None:
        _expect(hdr, "welcome", "welcome")
        name = _peer_name(hdr, "welcome")
        if name != self._peer_name:
            raise ProtocolError(
                f"handshake welcome: node called itself {_short(self._peer_name)} and then {_short(name)}"
            )
        self._session_key = _mac(self._key, _LABEL_SESSION + self._nonce + self._peer_nonce)
        self._state = "done"


class ListenerHandshake(_Handshake):
    """The side that accepted the connection: ``on_hello()``, ``on_auth()``.

    On AuthError from ``on_auth`` send ``error_header("auth", str(err))`` and close.
    """

    def __init__(self, key: bytes, name: str) -> None:
        super().__init__(key, name)
        self._nonce = b""
        self._peer_nonce = b""
        self._peer_role: str | None = None
        self._claimed_name: str | None = None

    @property
    def peer_role(self) -> str:
        """``"node"`` or ``"client"`` (valid after success)."""
        self._require_done()
        assert self._peer_role is not None
        return self._peer_role

    def on_hello(self, hdr: dict) -> dict:
        """Validate the dialer's ``hello``; return the ``challenge`` header to send."""
        self._step("start", "hello")
        return self._run(self._on_hello, hdr)

    def _on_hello(self, hdr: dict) -> dict:
        what = "hello"
        _expect(hdr, "hello", what, peer="the dialing peer")
        _version(hdr, what)
        role = _field(hdr, "role", str, what)
        if role not in ROLES:
            raise ProtocolError(f"handshake hello: role {_short(role)} is not one of {ROLES}")
        name = _peer_name(hdr, what)
        peer_nonce = _nonce(hdr, what)
        self._nonce = secrets.token_bytes(NONCE_LEN)
        self._peer_nonce = peer_nonce
        self._peer_role = role
        self._claimed_name = name
        self._state = "challenge_sent"
        proof = _mac(self._key, _LABEL_LISTENER + peer_nonce + self._nonce)
        return {"t": "challenge", "v": PROTOCOL_VERSION, "name": self.name, "nonce": self._nonce, "proof": proof}

    def on_auth(self, hdr: dict) -> dict:
        """Check the dialer's proof; return the ``welcome`` header to send."""
        self._step("challenge_sent", "auth")
        return self._run(self._on_auth, hdr)

    def _on_auth(self, hdr: dict) -> dict:
        _expect(hdr, "auth", "auth", peer="the dialing peer")
        proof = _proof(hdr, "auth")
        transcript = self._peer_nonce + self._nonce
        if not hmac.compare_digest(proof, _mac(self._key, _LABEL_DIALER + transcript)):
            raise AuthError("wrong party secret")
        self._peer_name = self._claimed_name
        self._session_key = _mac(self._key, _LABEL_SESSION + transcript)
        self._state = "done"
        return {"t": "welcome", "name": self.name}
