"""Tests for pdp.wire: framing, strict header decoding and the handshake (all sans-IO, fast)."""

from __future__ import annotations

import hashlib
import hmac
import struct
import tracemalloc

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pdp.errors import AuthError, PdpError, ProtocolError
from pdp.wire import (
    MAX_HEADER,
    MAX_PAYLOAD,
    DialerHandshake,
    Frame,
    FrameDecoder,
    ListenerHandshake,
    decode_header,
    derive,
    encode_frame,
    error_header,
    new_key,
)


def wire_bytes(header: dict, payload: bytes = b"") -> bytes:
    return b"".join(bytes(part) for part in encode_frame(header, payload))


def raw_frame(header_bytes: bytes, payload: bytes = b"") -> bytes:
    return struct.pack(">II", len(header_bytes), len(payload)) + header_bytes + payload


# -- frames ---------------------------------------------------------------------------


@pytest.mark.parametrize("payload", [b"", b"x", bytes(range(256)) * 40])
def test_round_trip(payload: bytes) -> None:
    header = {"t": "put", "id": 7, "blob": b"\x00\xff", "names": ["a", "b"], "nested": {"k": None}}
    parts = encode_frame(header, payload)
    assert len(parts) == (2 if payload else 1)
    frames = FrameDecoder().feed(b"".join(bytes(p) for p in parts))
    assert frames == [Frame(header, payload)]
    assert isinstance(frames[0].payload, bytes)


def test_payload_is_passed_through_raw() -> None:
    payload = bytearray(b"raw bulk data")
    parts = encode_frame({"t": "chunk"}, memoryview(payload))
    assert parts[1].obj is payload  # not copied, not wrapped in msgpack
    hlen, plen = struct.unpack(">II", parts[0][:8])
    assert plen == len(payload) and hlen == len(parts[0]) - 8
    assert FrameDecoder().feed(b"".join(bytes(p) for p in parts)) == [Frame({"t": "chunk"}, bytes(payload))]


def test_encode_rejects_oversized_and_bad_headers() -> None:
    with pytest.raises(ProtocolError, match="exceeds"):
        encode_frame({"t": "x", "pad": b"\x00" * MAX_HEADER})
    with pytest.raises(ProtocolError, match="payload of 8388609 bytes exceeds the 8388608-byte limit"):
        encode_frame({"t": "x"}, memoryview(bytearray(MAX_PAYLOAD + 1)))
    encode_frame({"t": "x"}, bytes(MAX_PAYLOAD))  # exactly at the limit is fine
    with pytest.raises(ProtocolError, match="'t'"):
        encode_frame({"type": "x"})


FRAMES = [
    ({"t": "hello", "n": 1}, b""),
    ({"t": "data", "seq": 2}, b"payload bytes" * 10),
    ({"t": "empty"}, b""),
    ({"t": "bin", "b": b"\x00" * 100}, bytes(range(256))),
]
STREAM = b"".join(wire_bytes(h, p) for h, p in FRAMES)


def test_one_byte_at_a_time() -> None:
    dec = FrameDecoder()
    out: list[Frame] = []
    for i in range(len(STREAM)):
        out += dec.feed(STREAM[i : i + 1])
    assert out == [Frame(h, p) for h, p in FRAMES]
    assert dec.buffered == 0


def test_many_frames_in_one_feed_and_buffered() -> None:
    dec = FrameDecoder()
    assert dec.feed(STREAM + STREAM[:5]) == [Frame(h, p) for h, p in FRAMES]
    assert dec.buffered == 5
    assert dec.feed(b"") == []
    assert dec.feed(STREAM[5:]) == [Frame(h, p) for h, p in FRAMES]
    assert dec.buffered == 0


@settings(max_examples=200, deadline=None)
@given(cuts=st.lists(st.integers(min_value=0, max_value=len(STREAM)), max_size=30), as_bytearray=st.booleans())
def test_random_splits(cuts: list[int], as_bytearray: bool) -> None:
    bounds = [0, *sorted(cuts), len(STREAM)]
    dec = FrameDecoder()
    out: list[Frame] = []
    for a, b in zip(bounds, bounds[1:]):
        piece = STREAM[a:b]
        out += dec.feed(bytearray(piece) if as_bytearray else piece)
    assert out == [Frame(h, p) for h, p in FRAMES]


def test_mutating_a_fed_bytearray_does_not_change_frames() -> None:
    data = bytearray(wire_bytes({"t": "x"}, b"A" * 1000))
    dec = FrameDecoder()
    assert dec.feed(data[:-10]) == []
    chunk = bytearray(data[-10:])
    frames = dec.feed(chunk)
    chunk[:] = b"B" * 10
    assert frames[0].payload == b"A" * 1000


@pytest.mark.parametrize("as_bytearray", [False, True])
def test_large_payload_is_not_copied_quadratically(as_bytearray: bool) -> None:
    payload = bytes(range(256)) * 4096  # 1 MiB
    data = wire_bytes({"t": "blob"}, payload)
    step = 64 * 1024
    chunks = [data[i : i + step] for i in range(0, len(data), step)]
    if as_bytearray:
        chunks = [bytearray(c) for c in chunks]
    dec = FrameDecoder()
    tracemalloc.start()
    try:
        out: list[Frame] = []
        for c in chunks:
            out += dec.feed(c)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert out == [Frame({"t": "blob"}, payload)]
    # At most a couple of payload-sized copies may exist at once.
    assert peak < 2.5 * len(payload)


def test_oversized_header_rejected_from_prefix_alone() -> None:
    dec = FrameDecoder()
    with pytest.raises(ProtocolError, match="frame header of 99999999 bytes exceeds the 65536-byte limit"):
        dec.feed(struct.pack(">II", 99_999_999, 0))
    assert dec.buffered == 0


def test_oversized_payload_rejected_from_prefix_alone() -> None:
    dec = FrameDecoder()
    with pytest.raises(ProtocolError, match=f"payload of {MAX_PAYLOAD + 1} bytes exceeds"):
        dec.feed(struct.pack(">II", 10, MAX_PAYLOAD + 1))


def test_custom_limits_and_byte_wise_prefix() -> None:
    dec = FrameDecoder(max_header=100, max_payload=10)
    prefix = struct.pack(">II", 5, 11)
    for b in prefix[:-1]:
        assert dec.feed(bytes([b])) == []
    with pytest.raises(ProtocolError, match="11 bytes exceeds the 10-byte limit"):
        dec.feed(prefix[-1:])


def test_empty_header_rejected() -> None:
    with pytest.raises(ProtocolError, match="empty header"):
        FrameDecoder().feed(struct.pack(">II", 0, 0))


class _Dummy:
    pass


MALFORMED = {
    "not msgpack": (b"\xc1", "not valid msgpack"),
    "truncated msgpack": (b"\x82\xa1t", "not valid msgpack"),
    "non-map": (msgpack.packb(["t", "x"]), "must be a msgpack map"),
    "ExtType": (msgpack.packb({"t": "x", "e": msgpack.ExtType(5, b"zz")}), "ExtType is not allowed"),
    "Timestamp": (msgpack.packb({"t": "x", "when": msgpack.Timestamp(1, 2)}), "ExtType is not allowed"),
    "missing t": (msgpack.packb({"type": "x"}), "no 't'"),
    "non-str t": (msgpack.packb({"t": 5}), "'t' must be a str"),
    "int key": (msgpack.packb({"t": "x", 1: 2}), "keys must be str"),
    "nested int key": (msgpack.packb({"t": "x", "m": {1: 2}}), "keys must be str"),
    "bytes key": (msgpack.packb({"t": "x", b"k": 2}, use_bin_type=True), "keys must be str"),
    "trailing bytes": (msgpack.packb({"t": "x"}) + b"\x00", "trailing bytes"),
    "bad utf-8": (b"\x81\xa1t\xa2\xff\xfe", "UTF-8"),
    "too deep": (b"\x91" * 5000 + b"\x00", "msgpack|nested"),
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_headers(name: str) -> None:
    data, message = MALFORMED[name]
    with pytest.raises(ProtocolError, match=message):
        decode_header(data)
    dec = FrameDecoder()
    with pytest.raises(ProtocolError, match=message):
        dec.feed(raw_frame(data, b"payload"))


def test_decode_header_size_limit() -> None:
    with pytest.raises(ProtocolError, match="exceeds"):
        decode_header(b"\x00" * (MAX_HEADER + 1))


def test_error_messages_do_not_echo_huge_data() -> None:
    huge = msgpack.packb({"t": "x" * 60000}) + b"junk"
    with pytest.raises(ProtocolError) as exc:
        decode_header(huge)
    assert len(str(exc.value)) < 200


def test_decoder_stays_dead() -> None:
    dec = FrameDecoder()
    good = wire_bytes({"t": "ok"})
    assert dec.feed(good) == [Frame({"t": "ok"}, b"")]
    with pytest.raises(ProtocolError) as first:
        dec.feed(raw_frame(b"\xc1"))
    assert dec.dead
    for data in (good, b"", good + good):
        with pytest.raises(ProtocolError) as again:
            dec.feed(data)
        assert again.value is first.value


@settings(max_examples=500, deadline=None)
@given(data=st.binary(max_size=300), cuts=st.lists(st.integers(min_value=0, max_value=300), max_size=5))
def test_garbage_yields_frames_or_protocol_error(data: bytes, cuts: list[int]) -> None:
    dec = FrameDecoder(max_header=200, max_payload=200)
    bounds = [0, *sorted(c for c in cuts if c <= len(data)), len(data)]
    try:
        for a, b in zip(bounds, bounds[1:]):
            for frame in dec.feed(data[a:b]):
                assert isinstance(frame.header, dict) and isinstance(frame.header["t"], str)
                assert isinstance(frame.payload, bytes)
    except ProtocolError:
        assert dec.dead


@settings(max_examples=300, deadline=None)
@given(body=st.binary(min_size=1, max_size=200), payload=st.binary(max_size=20))
def test_garbage_header_with_valid_prefix(body: bytes, payload: bytes) -> None:
    try:
        frames = FrameDecoder().feed(raw_frame(body, payload))
    except ProtocolError:
        return
    assert frames[0].payload == payload and isinstance(frames[0].header["t"], str)


# -- handshake ------------------------------------------------------------------------


def via_wire(header: dict) -> dict:
    """Send a header through encode/decode, as the transport would."""
    (frame,) = FrameDecoder().feed(wire_bytes(header))
    return frame.header


def run_handshake(dkey: bytes, lkey: bytes, role: str = "node"):
    dialer = DialerHandshake(dkey, "alice", role)
    listener = ListenerHandshake(lkey, "bob")
    challenge = via_wire(listener.on_hello(via_wire(dialer.hello())))
    auth = via_wire(dialer.on_challenge(challenge))
    welcome = via_wire(listener.on_auth(auth))
    dialer.on_welcome(welcome)
    return dialer, listener


@pytest.mark.parametrize("role", ["node", "client"])
def test_handshake_success(role: str) -> None:
    key = new_key()
    dialer, listener = run_handshake(key, key, role)
    assert dialer.done and listener.done
    assert dialer.peer_name == "bob"
    assert listener.peer_name == "alice" and listener.peer_role == role
    assert dialer.session_key == listener.session_key
    assert len(dialer.session_key) == 32 and dialer.session_key != key


def test_session_keys_differ_per_connection() -> None:
    key = new_key()
    a, _ = run_handshake(key, key)
    b, _ = run_handshake(key, key)
    assert a.session_key != b.session_key


def test_session_key_formula() -> None:
    key = new_key()
    dialer = DialerHandshake(key, "alice", "node")
    listener = ListenerHandshake(key, "bob")
    hello = dialer.hello()
    challenge = listener.on_hello(hello)
    listener.on_auth(dialer.on_challenge(challenge))
    expected = hmac.new(key, b"pdp-v1 session" + hello["nonce"] + challenge["nonce"], hashlib.sha256).digest()
    assert listener.session_key == expected
    assert challenge["proof"] == hmac.new(
        key, b"pdp-v1 listener" + hello["nonce"] + challenge["nonce"], hashlib.sha256
    ).digest()


def test_secret_is_never_sent() -> None:
    key = new_key()
    dialer = DialerHandshake(key, "alice", "node")
    listener = ListenerHandshake(key, "bob")
    sent = [dialer.hello()]
    sent.append(listener.on_hello(sent[-1]))
    sent.append(dialer.on_challenge(sent[-1]))
    sent.append(listener.on_auth(sent[-1]))
    assert all(key not in wire_bytes(h) for h in sent)


def test_wrong_key_detected_by_dialer() -> None:
    dialer = DialerHandshake(new_key(), "alice", "node")
    listener = ListenerHandshake(new_key(), "bob")
    with pytest.raises(AuthError, match="its key differs from yours"):
        dialer.on_challenge(via_wire(listener.on_hello(via_wire(dialer.hello()))))
    with pytest.raises(ProtocolError, match="already failed"):
        dialer.on_welcome({"t": "welcome", "name": "bob"})
    with pytest.raises(RuntimeError):
        dialer.session_key


def test_wrong_key_detected_by_listener() -> None:
    # A dialer that skips verifying the listener (e.g. an attacker) still cannot get in.
    listener = ListenerHandshake(new_key(), "bob")
    listener.on_hello(DialerHandshake(new_key(), "eve", "node").hello())
    forged = {"t": "auth", "proof": hmac.new(new_key(), b"x", hashlib.sha256).digest()}
    with pytest.raises(AuthError, match="wrong party secret") as exc:
        listener.on_auth(forged)
    assert not listener.done
    # The listener tells the dialer, which reports the node's reason.
    err = via_wire(error_header("auth", str(exc.value)))
    assert err == {"t": "error", "code": "auth", "message": "wrong party secret"}
    key = new_key()
    dialer = DialerHandshake(key, "alice", "node")
    honest = ListenerHandshake(key, "bob")
    dialer.on_challenge(honest.on_hello(dialer.hello()))
    with pytest.raises(AuthError, match="refused by the node: wrong party secret"):
        dialer.on_welcome(err)


def test_error_frame_instead_of_challenge() -> None:
    dialer = DialerHandshake(new_key(), "alice", "node")
    dialer.hello()
    with pytest.raises(ProtocolError, match="refused by the node: unsupported version"):
        dialer.on_challenge(error_header("protocol", "unsupported version"))


def test_replayed_auth_is_refused() -> None:
    key = new_key()
    # Record a genuine exchange.
    dialer = DialerHandshake(key, "alice", "node")
    first = ListenerHandshake(key, "bob")
    hello = via_wire(dialer.hello())
    recorded_auth = via_wire(dialer.on_challenge(via_wire(first.on_hello(hello))))
    first.on_auth(recorded_auth)
    # An eavesdropper replays the same hello and auth to a new listener.
    second = ListenerHandshake(key, "bob")
    second.on_hello(hello)
    with pytest.raises(AuthError, match="wrong party secret"):
        second.on_auth(recorded_auth)


def test_replayed_challenge_is_refused() -> None:
    key = new_key()
    d1 = DialerHandshake(key, "alice", "node")
    recorded = ListenerHandshake(key, "bob").on_hello(d1.hello())
    d2 = DialerHandshake(key, "alice", "node")
    d2.hello()
    with pytest.raises(AuthError):
        d2.on_challenge(recorded)


def test_out_of_order_calls() -> None:
    key = new_key()
    listener = ListenerHandshake(key, "bob")
    with pytest.raises(ProtocolError):
        listener.on_auth({"t": "auth", "proof": b"\x00" * 32})
    dialer = DialerHandshake(key, "alice", "node")
    with pytest.raises(ProtocolError):
        dialer.on_challenge({"t": "challenge"})
    hello = dialer.hello()
    listener.on_hello(hello)
    with pytest.raises(ProtocolError):
        listener.on_hello(hello)


def good_hello() -> dict:
    return {"t": "hello", "v": 1, "role": "node", "name": "alice", "nonce": b"\x01" * 32}


BAD_HELLOS = {
    "short nonce": {"nonce": b"\x01" * 31},
    "long nonce": {"nonce": b"\x01" * 33},
    "str nonce": {"nonce": "x" * 32},
    "missing nonce": {"nonce": None},
    "v 2": {"v": 2},
    "v str": {"v": "1"},
    "v bool": {"v": True},
    "v float": {"v": 1.0},
    "missing v": {"v": None},
    "bad role": {"role": "admin"},
    "role bytes": {"role": b"node"},
    "name int": {"name": 5},
    "empty name": {"name": ""},
    "long name": {"name": "n" * 1000},
    "control chars in name": {"name": "a\nb"},
    "wrong t": {"t": "auth"},
}


@pytest.mark.parametrize("case", sorted(BAD_HELLOS))
def test_malformed_hello(case: str) -> None:
    hello = good_hello()
    for k, v in BAD_HELLOS[case].items():
        if v is None:
            del hello[k]
        else:
            hello[k] = v
    with pytest.raises(ProtocolError):
        ListenerHandshake(new_key(), "bob").on_hello(hello)


def fresh_challenge(key: bytes) -> tuple[DialerHandshake, dict]:
    dialer = DialerHandshake(key, "alice", "node")
    challenge = ListenerHandshake(key, "bob").on_hello(dialer.hello())
    return dialer, challenge


@pytest.mark.parametrize(
    "field,value",
    [("nonce", b"\x00" * 16), ("nonce", "n"), ("proof", b"\x00" * 31), ("proof", "p"), ("v", 0), ("name", 3), ("t", None)],
)
def test_malformed_challenge(field: str, value: object) -> None:
    dialer, challenge = fresh_challenge(new_key())
    challenge[field] = value
    with pytest.raises((ProtocolError, AuthError)):
        dialer.on_challenge(challenge)


@pytest.mark.parametrize("auth", [{"t": "auth"}, {"t": "auth", "proof": "x"}, {"t": "auth", "proof": b"x"}, [1], None])
def test_malformed_auth(auth: object) -> None:
    key = new_key()
    listener = ListenerHandshake(key, "bob")
    listener.on_hello(DialerHandshake(key, "alice", "node").hello())
    with pytest.raises(ProtocolError):
        listener.on_auth(auth)  # type: ignore[arg-type]


def test_welcome_name_must_match_challenge() -> None:
    key = new_key()
    dialer, challenge = fresh_challenge(key)
    dialer.on_challenge(challenge)
    with pytest.raises(ProtocolError, match="called itself"):
        dialer.on_welcome({"t": "welcome", "name": "mallory"})


_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=True),
    st.text(max_size=40),
    st.binary(max_size=40),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)
_headers = st.dictionaries(
    st.sampled_from(["t", "v", "role", "name", "nonce", "proof", "code", "message", "extra"]), _values, max_size=8
) | st.fixed_dictionaries(
    {"t": st.sampled_from(["hello", "challenge", "auth", "welcome", "error"])},
    optional={
        "v": st.sampled_from([1, 2, True, "1"]),
        "role": st.sampled_from(["node", "client", "x", 1]),
        "name": st.sampled_from(["bob", "", 7, "x" * 500]),
        "nonce": st.binary(min_size=30, max_size=34),
        "proof": st.binary(min_size=31, max_size=33),
        "code": _values,
        "message": _values,
    },
)


@settings(max_examples=300, deadline=None)
@given(hdr=_headers)
def test_handshake_fuzz_only_raises_pdp_errors(hdr: dict) -> None:
    key = new_key()
    steps = []
    listener = ListenerHandshake(key, "bob")
    steps.append(lambda: listener.on_hello(hdr))
    l2 = ListenerHandshake(key, "bob")
    l2.on_hello(good_hello())
    steps.append(lambda: l2.on_auth(hdr))
    dialer, challenge = fresh_challenge(key)
    steps.append(lambda: dialer.on_challenge(hdr))
    d2, challenge2 = fresh_challenge(key)
    d2.on_challenge(challenge2)
    steps.append(lambda: d2.on_welcome(hdr))
    for step in steps:
        try:
            step()
        except (ProtocolError, AuthError) as exc:
            assert isinstance(exc, PdpError) and len(str(exc)) < 500


def test_derive_and_new_key() -> None:
    key = new_key()
    assert len(key) == 32 and new_key() != key
    raft = derive(key, "raft")
    assert raft == hmac.new(key, b"pdp-v1 derive raft", hashlib.sha256).digest()
    assert derive(key, "raft") == raft and derive(key, "other") != raft and derive(new_key(), "raft") != raft


def test_bad_local_arguments() -> None:
    with pytest.raises(ValueError):
        DialerHandshake(new_key(), "alice", "admin")
    with pytest.raises(ValueError):
        ListenerHandshake(b"short", "bob")
    with pytest.raises(TypeError):
        ListenerHandshake("not bytes", "bob")  # type: ignore[arg-type]
