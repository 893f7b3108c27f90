"""pdp.jobs.keys: round trip, byte order equals a reference order, canonical and strict decoding."""

from __future__ import annotations

import collections
import enum
import functools
import math
import struct
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from pdp.jobs.keys import (
    MAX_DEPTH,
    STR_TAG,
    KeyCodecError,
    decode_key,
    decode_prefix,
    encode_key,
)

# --- the reference order, written from the spec, independent of the encoding -------------


def rank(v: Any) -> int:
    if v is None:
        return 0
    if v is False:
        return 1
    if v is True:
        return 2
    for r, t in ((3, int), (4, float), (5, str), (6, bytes), (7, (list, tuple)), (8, dict)):
        if isinstance(v, t):
            return r
    raise AssertionError(f"not a key: {v!r}")


def _cmp(a: Any, b: Any) -> int:
    return (a > b) - (a < b)


def _float_key(x: float) -> tuple:
    return (1,) if math.isnan(x) else (0, x, math.copysign(1.0, x))


def _seq_cmp(xs: list, ys: list) -> int:
    for x, y in zip(xs, ys):
        c = ref_cmp(x, y)
        if c:
            return c
    return _cmp(len(xs), len(ys))


def ref_cmp(a: Any, b: Any) -> int:
    """-1, 0, 1: compare by type rank, then by value (recursively for containers)."""
    ra, rb = rank(a), rank(b)
    if ra != rb:
        return _cmp(ra, rb)
    if ra <= 2:
        return 0  # None, False, True: one value per rank
    if ra == 4:
        return _cmp(_float_key(a), _float_key(b))
    if ra == 7:
        return _seq_cmp(list(a), list(b))
    if ra == 8:
        return _seq_cmp([x for kv in a.items() for x in kv], [x for kv in b.items() for x in kv])
    return _cmp(a, b)  # ints, str (code points), bytes


def same(a: Any, b: Any) -> bool:
    """Structural equality that tells -0.0 from 0.0, treats NaN as itself, and lists as tuples."""
    if isinstance(a, float) and isinstance(b, float):
        return (math.isnan(a) and math.isnan(b)) or (a == b and math.copysign(1, a) == math.copysign(1, b))
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a.items(), b.items()))
    return type(a) is type(b) and a == b


# --- strategies -----------------------------------------------------------------------------

EDGE_INTS = [0, 1, -1, 255, 256, -255, -256, -257, 2**63, 2**64 - 1, 2**64, 2**64 + 1,
             -(2**64 - 1), -(2**64), -(2**64) - 1, 2**200, -(2**200), 2**2048, -(2**2048)]
ints = st.integers() | st.sampled_from(EDGE_INTS) | st.integers(-(2**300), 2**300) | st.integers(-300, 300)
floats = st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from(
    [0.0, -0.0, math.inf, -math.inf, math.nan, 5e-324, -5e-324, 1.0, -1.0])
# A small alphabet makes shared prefixes (and hence interesting comparisons) likely.
texts = st.text(alphabet=st.sampled_from("\x00\x01a\x7f\x80\xffé\u07ff\u0800\uffff\U00010000\U0010ffff"),
                max_size=6) | st.text(max_size=20)
blobs = st.binary(max_size=6).map(lambda b: b.translate(bytes.maketrans(b"\x02\x03", b"\x00\xff"))) | st.binary()
scalars = st.none() | st.booleans() | ints | floats | texts | blobs
hashables = st.recursive(scalars, lambda c: st.lists(c, max_size=3).map(tuple), max_leaves=6)
values = st.recursive(
    scalars,
    lambda c: st.lists(c, max_size=4) | st.lists(c, max_size=4).map(tuple)
    | st.dictionaries(hashables, c, max_size=3),
    max_leaves=12,
)


# --- round trip -------------------------------------------------------------------------------


@given(values)
@example(-0.0)
@example(math.nan)
@example([math.nan, -0.0, {math.nan: 1}])
@example({(1, (2, "x")): {b"": []}})
@example(2**200)
@example(-(2**200))
def test_round_trip(v: Any) -> None:
    e = encode_key(v)
    assert isinstance(e, bytes)
    d = decode_key(e)
    assert same(d, v)
    assert encode_key(d) == e
    got, end = decode_prefix(e)
    assert end == len(e) and same(got, v)


@given(values)
def test_decodes_lists_not_tuples(v: Any) -> None:
    def no_tuples(x: Any) -> bool:
        if isinstance(x, tuple):
            return False
        if isinstance(x, list):
            return all(no_tuples(y) for y in x)
        if isinstance(x, dict):
            return all(no_tuples(y) for y in x.values())  # keys are tuples: they must hash
        return True

    assert no_tuples(decode_key(encode_key(v)))


def test_dict_keeps_insertion_order_and_tuple_keys() -> None:
    d = {"b": 1, (1, 2): 2, "a": 3}
    back = decode_key(encode_key(d))
    assert list(back.items()) == [("b", 1), ((1, 2), 2), ("a", 3)]
    assert encode_key({"a": 1, "b": 2}) != encode_key({"b": 2, "a": 1})


# --- order -------------------------------------------------------------------------------------


def _check_order(a: Any, b: Any) -> None:
    ea, eb = encode_key(a), encode_key(b)
    assert _cmp(ea, eb) == ref_cmp(a, b), (a, b, ea.hex(), eb.hex())


@given(values, values)
@settings(max_examples=400)
def test_order_matches_reference(a: Any, b: Any) -> None:
    _check_order(a, b)


@given(st.lists(scalars, max_size=3), st.lists(scalars, max_size=3))
@settings(max_examples=300)
def test_order_of_flat_lists(a: list, b: list) -> None:
    _check_order(a, b)
    _check_order(a, a + b)  # a prefix first
    _check_order([a], [a + b])


@given(scalars, scalars)
@settings(max_examples=400)
def test_order_of_scalars(a: Any, b: Any) -> None:
    _check_order(a, b)


@given(st.lists(values, max_size=12))
def test_sorting_encodings_sorts_keys(vs: list) -> None:
    by_bytes = sorted(vs, key=encode_key)
    by_ref = sorted(vs, key=functools.cmp_to_key(ref_cmp))
    assert [encode_key(v) for v in by_bytes] == [encode_key(v) for v in by_ref]


def test_stated_order() -> None:
    chain: list[Any] = [None, False, True, -(2**200), -(2**64), -(2**64 - 1), -257, -256, -1, 0, 1, 255, 256,
             2**64 - 1, 2**64, 2**200, -math.inf, -1e300, -5e-324, -0.0, 0.0, 5e-324, 1.0, math.inf,
             math.nan, "", "\x00", "\x00\x00", "\x01", "a", "a\x00", "a\x00b", "ab", "\uffff",
             "\U00010000", b"", b"\x00", b"\x00\x00", b"\x00\xff", b"\x01", b"\xff", [], [None],
             [None, None], [False], [0], ["a"], ["a", 1], ["a\x00"], [[]], {}, {None: None},
             {0: 1}, {0: 1, 1: 2}, {0: 2}, {"a": 0}]
    encs = [encode_key(v) for v in chain]
    assert encs == sorted(encs)
    assert len(set(encs)) == len(encs)
    assert sorted(encs) == [encode_key(v) for v in sorted(chain, key=functools.cmp_to_key(ref_cmp))]


def test_bool_int_float_are_distinct() -> None:
    assert len({encode_key(True), encode_key(1), encode_key(1.0)}) == 3
    assert len({encode_key(False), encode_key(0), encode_key(0.0), encode_key(-0.0)}) == 4
    assert type(decode_key(encode_key(True))) is bool
    assert type(decode_key(encode_key(1))) is int
    assert type(decode_key(encode_key(1.0))) is float


# --- decode_prefix over concatenations -------------------------------------------------------


@given(st.lists(values, max_size=6))
def test_decode_prefix_walks_a_concatenation(vs: list) -> None:
    encs = [encode_key(v) for v in vs]
    data = b"".join(encs)
    pos = 0
    for v, e in zip(vs, encs):
        got, nxt = decode_prefix(data, pos)
        assert nxt == pos + len(e)
        assert same(got, v)
        pos = nxt
    assert pos == len(data)
    for buf in (bytearray(data), memoryview(data)):
        pos = 0
        for v in vs:
            got, pos = decode_prefix(buf, pos)
            assert same(got, v) and type(got) is type(decode_key(encode_key(v)))


def test_decode_prefix_bounds() -> None:
    data = encode_key("word") + encode_key(7)
    assert decode_prefix(data) == ("word", 6)
    assert decode_prefix(data, 6) == (7, 8)
    for pos in (8, 9, -1):
        with pytest.raises(KeyCodecError):
            decode_prefix(data, pos)


# --- malformed input ---------------------------------------------------------------------------


@given(values)
def test_truncations_raise_or_are_another_valid_key(v: Any) -> None:
    e = encode_key(v)
    for i in range(len(e)):
        try:
            d = decode_key(e[:i])
        except KeyCodecError:
            continue
        # Only a cut right after a str/bytes terminator that an escape followed can be a key.
        assert e[i:i + 1] == b"\xff" and encode_key(d) == e[:i]


@given(st.lists(scalars.filter(lambda x: not isinstance(x, (str, bytes))), max_size=4))
def test_truncations_raise_without_strings(v: list) -> None:
    e = encode_key(v)
    for i in range(len(e)):
        with pytest.raises(KeyCodecError):
            decode_key(e[:i])


@given(values, st.binary(min_size=1, max_size=3))
def test_trailing_bytes_raise(v: Any, extra: bytes) -> None:
    with pytest.raises(KeyCodecError):
        decode_key(encode_key(v) + extra)


def _mutate(e: bytes, how: int, at: int, byte: int) -> bytes:
    at %= len(e) + 1
    if how == 0:
        return e[:at] + bytes([byte]) + e[at:]
    if how == 1:
        return e[:at] + e[at + 1:]
    return e[:at] + bytes([byte]) + e[at + 1:]


@given(values, st.integers(0, 2), st.integers(0, 10**6), st.integers(0, 255))
@settings(max_examples=500)
def test_decoding_is_canonical(v: Any, how: int, at: int, byte: int) -> None:
    """Whatever decode_key accepts re-encodes to the very same bytes; the rest raises KeyCodecError."""
    data = _mutate(encode_key(v), how, at, byte)
    try:
        d = decode_key(data)
    except KeyCodecError:
        return
    assert encode_key(d) == data


@given(st.binary(max_size=24))
def test_random_bytes(data: bytes) -> None:
    try:
        d = decode_key(data)
    except KeyCodecError:
        return
    assert encode_key(d) == data


@pytest.mark.parametrize("data", [
    b"", b"\x00", b"\xff", b"\x04", b"\x20", b"\x22", b"\x32", b"\x41", b"\x51", b"\xfe",  # bad tags
    b"\x15", b"\x16\x01", b"\x0c\x00", b"\x21\x00", b"\x30abc", b"\x31ab", b"\x40", b"\x40\x01",
    b"\x50\x01", b"\x1d", b"\x1d\x01", b"\x1d\x01\x09\x01", b"\x0b", b"\x0b\xfe\xf6",  # truncated
    b"\x15\x00", b"\x16\x00\x01", b"\x13\xff", b"\x12\xff\x00",  # leading zero bytes
    b"\x1d\x01\x08" + b"\x01" * 8, b"\x1d\x02\x00\x09" + b"\x01" * 9, b"\x1d\x00",
    b"\x1d\x01\x09\x00" + b"\x01" * 8, b"\x0b\xff", b"\x0b\xfe\xf7" + b"\xfe" * 8,
    b"\x21\xff\xf8\x00\x00\x00\x00\x00\x01", b"\x21\x00\x07\xff\xff\xff\xff\xff\xff",  # other NaNs
    b"\x30\xff\x00", b"\x30\xc3\x00", b"\x30\xed\xa0\x80\x00", b"\x30\xc0\x80\x00",  # bad UTF-8
    b"\x50\x01\x00", b"\x50\x15\x01\x15\x02\x15\x01\x15\x03\x00",  # odd dict, repeated key
    b"\x50\x15\x01\x01\x03\x01\x00", b"\x50\x21\x80" + b"\x00" * 7 + b"\x01\x21\x7f" + b"\xff" * 7 + b"\x01\x00",
    b"\x50\x50\x00\x01\x00", b"\x50\x40\x50\x00\x00\x01\x00",  # dict as a dict key
    b"\x01\x01", b"\x30a\x00\x01", b"\x30a\x00\x30b\x00", b"\x30a\x00\xff",  # trailing, dangling escape
    b"\x31a\x00\xfe\x00", b"\x40\x31a\x00\xfe\x00\x00",  # only 0x00 0xff is an escape
])
def test_malformed_raises(data: bytes) -> None:
    with pytest.raises(KeyCodecError):
        decode_key(data)
    assert issubclass(KeyCodecError, ValueError)


def test_nesting_limit() -> None:
    v: list = []
    for _ in range(MAX_DEPTH - 1):
        v = [v]
    assert decode_key(encode_key(v)) == v  # MAX_DEPTH levels
    with pytest.raises(ValueError, match="deeper"):
        encode_key([v])
    with pytest.raises(ValueError, match="deeper"):
        encode_key({"k": v})
    with pytest.raises(KeyCodecError, match="deeper"):
        decode_key(b"\x40" * (MAX_DEPTH + 1) + b"\x00" * (MAX_DEPTH + 1))
    cycle: list = []
    cycle.append(cycle)
    with pytest.raises(ValueError, match="deeper"):
        encode_key(cycle)


# --- exact encodings and edge cases -----------------------------------------------------------


@given(st.text())
@example("a\x00b")
@example("\x00")
@example("")
def test_exact_str_encoding(s: str) -> None:
    assert encode_key(s) == STR_TAG + s.encode("utf-8").replace(b"\x00", b"\x00\xff") + b"\x00"
    assert decode_key(STR_TAG + s.encode("utf-8").replace(b"\x00", b"\x00\xff") + b"\x00") == s


def test_tags() -> None:
    assert len(STR_TAG) == 1 and STR_TAG not in (b"\x00", b"\xff")
    samples: list[Any] = [None, False, True, -(2**200), -1, 0, 1, 2**200, 1.5, "s", b"b", [], {}]
    tags = [encode_key(v)[0] for v in samples]
    assert all(0 < t < 0xFF for t in tags)
    assert tags == sorted(tags)
    assert encode_key(b"a\x00b") == encode_key(b"")[:1] + b"a\x00\xffb\x00"
    assert encode_key([1, "a"]) == b"\x40" + encode_key(1) + encode_key("a") + b"\x00"


def test_edge_cases() -> None:
    z = decode_key(encode_key(-0.0))
    assert z == 0.0 and math.copysign(1, z) == -1
    assert encode_key(-0.0) < encode_key(0.0)
    nans = [math.nan, -math.nan, struct.unpack(">d", bytes.fromhex("7ff0000000000001"))[0],
            struct.unpack(">d", bytes.fromhex("fff8000000000123"))[0]]
    assert len({encode_key(n) for n in nans}) == 1
    assert math.isnan(decode_key(encode_key(math.nan)))
    assert encode_key(math.inf) < encode_key(math.nan)
    for n in (2**200, -(2**200), 2**64, -(2**64), 10**5000, -(10**5000)):
        assert decode_key(encode_key(n)) == n
    assert encode_key(-(2**200)) < encode_key(-(2**64)) < encode_key(-1) < encode_key(2**64) < encode_key(2**200)
    assert decode_key(encode_key("a\x00\x00b")) == "a\x00\x00b"
    assert encode_key("a") < encode_key("a\x00") < encode_key("a\x00b") < encode_key("a\x01")
    assert encode_key([]) == b"\x40\x00"
    assert encode_key([]) < encode_key([None]) < encode_key([None, None]) < encode_key([False])
    assert decode_key(encode_key([None])) == [None] and decode_key(encode_key([])) == []
    assert encode_key(()) == encode_key([]) and decode_key(encode_key((1, (2,)))) == [1, [2]]
    assert encode_key(["a"]) < encode_key(["a", None]) < encode_key(["a\x00"])


def test_unsupported_types() -> None:
    for bad in ({1, 2}, frozenset(), object(), bytearray(b"x"), 1j, [1, {2}], {"k": object()}):
        with pytest.raises(TypeError, match=r"type '(set|frozenset|object|bytearray|complex)'"):
            encode_key(bad)
    with pytest.raises(ValueError, match="surrogate"):
        encode_key("a\ud800b")
    with pytest.raises(ValueError, match="surrogate"):
        encode_key(["\udfff"])
    with pytest.raises(TypeError):
        decode_key("not bytes")  # type: ignore[arg-type]


def test_subclasses_encode_as_their_base() -> None:
    class Color(enum.IntEnum):
        RED = 3

    Point = collections.namedtuple("Point", "x y")

    class S(str):
        pass

    od = collections.OrderedDict([("a", 1), ("b", 2)])
    od.move_to_end("a")
    assert encode_key(Color.RED) == encode_key(3)
    assert encode_key(Point(1, 2)) == encode_key([1, 2])
    assert encode_key(S("x")) == encode_key("x")
    assert encode_key(od) == encode_key({"b": 2, "a": 1})
    assert encode_key(collections.Counter(w=2)) == encode_key({"w": 2})
