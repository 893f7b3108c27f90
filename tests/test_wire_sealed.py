"""Sealed frames (AES-GCM after the handshake): round trips, tampering, replay, reordering."""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pdp import wire
from pdp.errors import ProtocolError

SESSION = os.urandom(32)


def _pair() -> tuple[wire.Sealer, wire.FrameDecoder]:
    sealer, _ = wire.session_keys(SESSION, dialer=True)
    decoder = wire.FrameDecoder()
    _, decoder.opener = wire.session_keys(SESSION, dialer=False)
    return sealer, decoder


def _bytes(parts: list) -> bytes:
    return b"".join(bytes(p) for p in parts)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.dictionaries(st.text(max_size=5).filter(lambda k: k != "t"),
                                          st.integers(-2**63, 2**64 - 1), max_size=3), st.binary(max_size=300)),
                min_size=1, max_size=6), st.integers(1, 64))
def test_sealed_frames_round_trip_in_any_split(frames: list, step: int) -> None:
    sealer, decoder = _pair()
    stream = b"".join(_bytes(wire.encode_frame({"t": "x", **h}, p, sealer)) for h, p in frames)
    got = []
    for i in range(0, len(stream), step):
        got.extend(decoder.feed(stream[i:i + step]))
    assert [(f.header, f.payload) for f in got] == [({"t": "x", **h}, p) for h, p in frames]


def test_payload_is_not_in_clear() -> None:
    sealer, _ = _pair()
    secret = b"the quick brown fox " * 10
    assert secret not in _bytes(wire.encode_frame({"t": "data"}, secret, sealer))


@pytest.mark.parametrize("where", [0, 9, -1])
def test_a_flipped_bit_drops_the_connection(where: int) -> None:
    sealer, decoder = _pair()
    raw = bytearray(_bytes(wire.encode_frame({"t": "data", "n": 1}, b"payload bytes", sealer)))
    raw[where] ^= 0x01
    with pytest.raises(ProtocolError):
        decoder.feed(bytes(raw))
    assert decoder.dead


def test_replayed_and_reordered_frames_fail() -> None:
    sealer, decoder = _pair()
    one = _bytes(wire.encode_frame({"t": "a"}, b"1", sealer))
    two = _bytes(wire.encode_frame({"t": "b"}, b"2", sealer))
    assert [f.header["t"] for f in decoder.feed(one)] == ["a"]
    with pytest.raises(ProtocolError, match="authentication"):
        decoder.feed(one)  # replay
    sealer, decoder = _pair()
    one = _bytes(wire.encode_frame({"t": "a"}, b"1", sealer))
    two = _bytes(wire.encode_frame({"t": "b"}, b"2", sealer))
    with pytest.raises(ProtocolError):
        decoder.feed(two + one)  # reordered


def test_the_other_direction_key_does_not_open() -> None:
    sealer, _ = wire.session_keys(SESSION, dialer=True)
    decoder = wire.FrameDecoder()
    decoder.opener = wire.session_keys(SESSION, dialer=True)[1]  # the dialer's receiving key
    with pytest.raises(ProtocolError):
        decoder.feed(_bytes(wire.encode_frame({"t": "a"}, b"", sealer)))


def test_an_unsealed_frame_after_the_handshake_is_refused() -> None:
    _, decoder = _pair()
    with pytest.raises(ProtocolError):
        decoder.feed(_bytes(wire.encode_frame({"t": "a"}, b"clear")))
