"""Tests for pdp.net.wire: framing and strict header decoding (sans-IO, fast). The handshake is TLS: tests/test_trust.py."""

from __future__ import annotations

import struct
import tracemalloc

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pdp.errors import ProtocolError
from pdp.net.wire import MAX_HEADER, MAX_PAYLOAD, Frame, FrameDecoder, decode_header, encode_frame


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
