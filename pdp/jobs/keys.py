"""An order-preserving, decodable binary encoding of MapReduce keys.

``encode_key(v)`` turns a key into bytes such that comparing two encodings as bytes
(``bytes.__lt__``: lexicographic, a proper prefix first) gives the order stated below, and
``decode_key`` gives the value back. Sorting, merging and partition boundaries can then work
on raw bytes without decoding (like FoundationDB's tuple layer or Hadoop's raw comparators).

The order
---------
Across types, by type: ``None < False < True < int < float < str < bytes < list < dict``
(so ``True``, ``1`` and ``1.0`` are three different keys). Within a type:

* ``int``: numerically, any size.
* ``float``: numerically, ``-inf < ... < -0.0 < 0.0 < ... < inf < nan``. ``-0.0`` sorts just
  before ``0.0`` and every NaN is one key, after ``inf``.
* ``str``: by code point (UTF-8 byte order is code point order).
* ``bytes``: lexicographically, a proper prefix first.
* ``list`` and ``tuple`` (one type; both decode to ``list``, like JSON): lexicographically
  element by element, a proper prefix first (``[] < [None] < [None, None] < [False]``).
* ``dict``: lexicographically over its ``(key, value)`` items *in insertion order* (so
  ``{1: 2, 3: 4}`` and ``{3: 4, 1: 2}`` are different keys), fewer items first when one
  item list is a prefix of the other.

Two keys have the same encoding exactly when they are equal in this order. Subclasses of
the supported types (an ``IntEnum``, a ``namedtuple``, an ``OrderedDict``) encode as their
base type; anything else (``set``, ``bytearray``, objects) raises ``TypeError``. Containers
nest at most :data:`MAX_DEPTH` deep (``ValueError`` beyond, which also catches cycles).

The format
----------
Every value starts with a one-byte tag; no tag is ``0x00`` (the terminator of str, bytes,
list and dict) or ``0xff`` (the escape byte after an embedded ``0x00``)::

    0x01        None
    0x02        False
    0x03        True
    0x0b        int < -(2**64 - 1): ~k, ~n (k bytes), ~magnitude (n bytes)
    0x0c..0x13  int, negative, magnitude of 8..1 bytes: ~magnitude (big-endian)
    0x14        0
    0x15..0x1c  int, positive, of 1..8 bytes: big-endian value
    0x1d        int > 2**64 - 1: k, n (k bytes), value (n bytes, big-endian)
    0x21        float: 8 bytes, IEEE-754 binary64 big-endian, sign bit flipped for
                positives, all bits flipped for negatives; NaN is always 0x7ff8000000000000
    0x30        str: UTF-8 with each 0x00 written 0x00 0xff, then 0x00
    0x31        bytes: the bytes escaped the same way, then 0x00
    0x40        list or tuple: the encoded elements, then 0x00
    0x50        dict: encoded key, encoded value, ... in insertion order, then 0x00

``~`` is the byte-wise complement. A big int's magnitude takes n bytes, with n written in k
bytes, both without leading zero bytes (k < 256). Complementing every field of a negative
int makes larger magnitudes sort lower. The encoding is canonical: ``decode_key`` accepts
only what ``encode_key`` writes (no leading zero bytes, no other NaN, no repeated dict key),
so ``encode_key(decode_key(b)) == b`` whenever ``decode_key(b)`` returns.

Why the order holds inside containers: each element's encoding ends where the decoder says
it does, and after a str or bytes terminator the next byte is a tag or ``0x00``, never
``0xff``, so ``"a"`` (``30 61 00``) followed by anything sorts before ``"a\\x00"``
(``30 61 00 ff 00``).
"""

from __future__ import annotations

import struct
from math import isnan
from typing import Any

__all__ = ["BYTES_TAG", "MAX_DEPTH", "STR_TAG", "KeyCodecError", "decode_key", "decode_prefix", "encode_key"]

MAX_DEPTH = 64  # containers nest at most this deep

_NONE = 0x01
_FALSE = 0x02
_TRUE = 0x03
_NEG_BIG = 0x0B
_ZERO = 0x14  # ints: _ZERO - n for a negative of n <= 8 bytes, _ZERO + n for a positive
_POS_BIG = 0x1D
_FLOAT = 0x21
_STR = 0x30
_BYTES = 0x31
_LIST = 0x40
_DICT = 0x50
_END = 0x00
_ESC = 0xFF

STR_TAG = bytes([_STR])  # the one-byte tag of str
BYTES_TAG = bytes([_BYTES])  # the one-byte tag of bytes

_NUL = b"\x00"
_NUL_ESC = b"\x00\xff"
_NONE_B = bytes([_NONE])
_FALSE_B = bytes([_FALSE])
_TRUE_B = bytes([_TRUE])
_FLOAT_B = bytes([_FLOAT])
_LIST_B = bytes([_LIST])
_DICT_B = bytes([_DICT])
_POS_TAGS = [bytes([_ZERO + n]) for n in range(9)]  # [0] is the tag of 0
_NEG_TAGS = [bytes([_ZERO - n]) for n in range(9)]
_INVERT = bytes(range(255, -1, -1))  # bytes.translate table: complement every byte
_SIGN = 1 << 63
_ALL64 = (1 << 64) - 1
_ABS = _SIGN - 1
_INF = 0x7FF0000000000000
_CANON_NAN = 0x7FF8000000000000
_NAN_CODE = _CANON_NAN ^ _SIGN  # the encoded bits of every NaN

_PACK_D = struct.Struct(">d").pack
_UNPACK_D = struct.Struct(">d").unpack
_PACK_Q = struct.Struct(">Q").pack
_UNPACK_Q = struct.Struct(">Q").unpack_from

# The encodings of the ints most keys are (counts, small ids): a list lookup beats to_bytes.
_SMALL_MIN, _SMALL_MAX = -256, 4096


class KeyCodecError(ValueError):
    """Bytes that are not exactly one encoded key (truncated, a bad tag, trailing bytes...)."""


def _encode_str(s: str) -> bytes:
    try:
        b = s.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(
            f"cannot encode str key: {s[e.start:e.end]!r} at index {e.start} is a lone surrogate "
            "(not encodable as UTF-8)"
        ) from None
    if "\x00" in s:
        b = b.replace(_NUL, _NUL_ESC)
    return STR_TAG + b + _NUL


def _encode_int(v: int) -> bytes:
    if v > 0:
        n = (v.bit_length() + 7) >> 3
        if n <= 8:
            return _POS_TAGS[n] + v.to_bytes(n, "big")
        nb = n.to_bytes((n.bit_length() + 7) >> 3, "big")
        if len(nb) > 255:  # pragma: no cover - an int of more than 2**2040 bytes
            raise ValueError("int key too large to encode")
        return bytes([_POS_BIG, len(nb)]) + nb + v.to_bytes(n, "big")
    if v < 0:
        m = -v
        n = (m.bit_length() + 7) >> 3
        if n <= 8:
            return _NEG_TAGS[n] + ((1 << (n << 3)) - 1 - m).to_bytes(n, "big")
        nb = n.to_bytes((n.bit_length() + 7) >> 3, "big")
        if len(nb) > 255:  # pragma: no cover
            raise ValueError("int key too large to encode")
        return bytes([_NEG_BIG, 255 - len(nb)]) + (nb + m.to_bytes(n, "big")).translate(_INVERT)
    return _POS_TAGS[0]


def _encode_float(v: float) -> bytes:
    bits = _UNPACK_Q(_PACK_D(v))[0]
    if (bits & _ABS) > _INF:  # NaN
        return _FLOAT_B + _PACK_Q(_NAN_CODE)
    return _FLOAT_B + _PACK_Q(bits ^ _ALL64 if bits & _SIGN else bits ^ _SIGN)


_SMALL_INTS = [_encode_int(i) for i in range(_SMALL_MIN, _SMALL_MAX)]


def _encode_into(v: Any, out: bytearray, depth: int) -> None:
    t = type(v)
    if t is str:
        out += _encode_str(v)
    elif t is int:
        out += _SMALL_INTS[v - _SMALL_MIN] if _SMALL_MIN <= v < _SMALL_MAX else _encode_int(v)
    elif t is list or t is tuple:
        if depth >= MAX_DEPTH:
            raise ValueError(f"key nests deeper than {MAX_DEPTH} containers")
        out.append(_LIST)
        for x in v:
            _encode_into(x, out, depth + 1)
        out.append(_END)
    elif t is dict:
        if depth >= MAX_DEPTH:
            raise ValueError(f"key nests deeper than {MAX_DEPTH} containers")
        out.append(_DICT)
        for k, x in v.items():
            _encode_into(k, out, depth + 1)
            _encode_into(x, out, depth + 1)
        out.append(_END)
    elif t is float:
        out += _encode_float(v)
    elif t is bytes:
        out.append(_BYTES)
        out += v.replace(_NUL, _NUL_ESC)
        out.append(_END)
    elif v is None:
        out.append(_NONE)
    elif t is bool:
        out.append(_TRUE if v else _FALSE)
    else:
        _encode_into(_base_value(v), out, depth)


def _base_value(v: Any) -> Any:
    """``v`` as its supported base type (for subclasses), or TypeError."""
    if isinstance(v, int):  # bool cannot be subclassed, so this is a true int subclass
        return int.__int__(v)
    if isinstance(v, float):
        return float.__float__(v)
    if isinstance(v, str):
        return str.__str__(v)
    if isinstance(v, bytes):
        return bytes.__getitem__(v, slice(None))
    if isinstance(v, (list, tuple)):
        return list(v)
    if isinstance(v, dict):
        return dict(v.items())  # the subclass's order (an OrderedDict keeps its own)
    raise TypeError(
        f"cannot encode a key of type {type(v).__name__!r} (supported: None, bool, int, float, "
        "str, bytes, list, tuple, dict)"
    )


def encode_key(value: Any) -> bytes:
    """The order-preserving encoding of ``value`` (see the module docstring for the order).

    Raises TypeError for an unsupported type, ValueError for a str with a lone surrogate or
    containers nested deeper than :data:`MAX_DEPTH`.
    """
    t = type(value)
    if t is str:  # the common key: a word
        if "\x00" in value:
            return _encode_str(value)
        try:
            return STR_TAG + value.encode("utf-8") + _NUL
        except UnicodeEncodeError:
            return _encode_str(value)  # raises the clear ValueError
    if t is int:
        if _SMALL_MIN <= value < _SMALL_MAX:
            return _SMALL_INTS[value - _SMALL_MIN]
        return _encode_int(value)
    if t is float:
        return _encode_float(value)
    if t is bytes:
        return BYTES_TAG + value.replace(_NUL, _NUL_ESC) + _NUL
    if value is None:
        return _NONE_B
    if t is bool:
        return _TRUE_B if value else _FALSE_B
    out = bytearray()
    _encode_into(value, out, 0)
    return bytes(out)


def _escaped_end(data: bytes | bytearray, pos: int) -> tuple[int, bool]:
    """The index of the terminator of the escaped string starting at ``pos``, and whether
    the string holds an escaped 0x00."""
    escaped = False
    n = len(data)
    while True:
        i = data.find(0, pos)
        if i < 0:
            raise KeyCodecError("truncated key: unterminated str or bytes")
        if i + 1 < n and data[i + 1] == _ESC:
            escaped = True
            pos = i + 2
            continue
        return i, escaped


def _hashable(v: Any) -> Any:
    """A decoded dict key made hashable: lists (encoded tuples) become tuples."""
    if type(v) is list:
        return tuple(_hashable(x) for x in v)
    if type(v) is dict:
        raise KeyCodecError("malformed key: a dict used as a dict key")
    return v


def _decode(data: bytes | bytearray, pos: int, depth: int) -> tuple[Any, int]:
    n = len(data)
    if pos >= n:
        raise KeyCodecError("truncated key: expected a tag")
    tag = data[pos]
    pos += 1
    if tag == _STR:
        end, escaped = _escaped_end(data, pos)
        raw = data[pos:end]
        if escaped:
            raw = raw.replace(_NUL_ESC, _NUL)
        try:
            return raw.decode("utf-8"), end + 1
        except UnicodeDecodeError as e:
            raise KeyCodecError(f"malformed key: str is not valid UTF-8 ({e.reason})") from None
    if _NEG_BIG < tag < _POS_BIG:
        if tag == _ZERO:
            return 0, pos
        size = tag - _ZERO if tag > _ZERO else _ZERO - tag
        end = pos + size
        if end > n:
            raise KeyCodecError("truncated key: int")
        first = data[pos]
        if tag > _ZERO:
            if first == 0:
                raise KeyCodecError("malformed key: int with a leading zero byte")
            return int.from_bytes(data[pos:end], "big"), end
        if first == 0xFF:
            raise KeyCodecError("malformed key: negative int with a leading zero byte")
        return int.from_bytes(data[pos:end], "big") - (1 << (size << 3)) + 1, end
    if tag == _LIST or tag == _DICT:
        if depth >= MAX_DEPTH:
            raise KeyCodecError(f"malformed key: nests deeper than {MAX_DEPTH} containers")
        items: list[Any] = []
        while True:
            if pos >= n:
                raise KeyCodecError("truncated key: unterminated list or dict")
            if data[pos] == _END:
                pos += 1
                break
            x, pos = _decode(data, pos, depth + 1)
            items.append(x)
        if tag == _LIST:
            return items, pos
        if len(items) & 1:
            raise KeyCodecError("malformed key: dict with a key but no value")
        d: dict[Any, Any] = {}
        for i in range(0, len(items), 2):
            try:
                k = _hashable(items[i])
                d[k] = items[i + 1]
            except TypeError:
                raise KeyCodecError("malformed key: unhashable dict key") from None
            if len(d) != i // 2 + 1:
                raise KeyCodecError(f"malformed key: dict key {k!r} repeated")
        return d, pos
    if tag == _FLOAT:
        end = pos + 8
        if end > n:
            raise KeyCodecError("truncated key: float")
        code = _UNPACK_Q(data, pos)[0]
        v = _UNPACK_D(_PACK_Q(code ^ _SIGN if code & _SIGN else code ^ _ALL64))[0]
        if code != _NAN_CODE and isnan(v):
            raise KeyCodecError("malformed key: non-canonical NaN")
        return v, end
    if tag == _BYTES:
        end, escaped = _escaped_end(data, pos)
        raw = data[pos:end]
        if escaped:
            raw = raw.replace(_NUL_ESC, _NUL)
        return bytes(raw), end + 1
    if tag == _NONE:
        return None, pos
    if tag == _FALSE:
        return False, pos
    if tag == _TRUE:
        return True, pos
    if tag == _POS_BIG or tag == _NEG_BIG:
        return _decode_big(data, pos, tag == _NEG_BIG)
    raise KeyCodecError(f"malformed key: unknown tag 0x{tag:02x} at byte {pos - 1}")


def _decode_big(data: bytes | bytearray, pos: int, negative: bool) -> tuple[int, int]:
    n = len(data)
    if pos >= n:
        raise KeyCodecError("truncated key: big int")
    k = 255 - data[pos] if negative else data[pos]
    pos += 1
    if k == 0 or pos + k > n:
        raise KeyCodecError("malformed key: big int length" if k == 0 else "truncated key: big int")
    lb = data[pos:pos + k]
    if negative:
        lb = lb.translate(_INVERT)
    if lb[0] == 0:
        raise KeyCodecError("malformed key: big int length with a leading zero byte")
    size = int.from_bytes(lb, "big")
    pos += k
    if size <= 8:
        raise KeyCodecError("malformed key: big int tag on an int of at most 8 bytes")
    end = pos + size
    if end > n:
        raise KeyCodecError("truncated key: big int")
    mag = data[pos:end]
    if negative:
        mag = mag.translate(_INVERT)
    if mag[0] == 0:
        raise KeyCodecError("malformed key: big int with a leading zero byte")
    m = int.from_bytes(mag, "big")
    return (-m if negative else m), end


def _as_buffer(data: bytes | bytearray | memoryview) -> bytes | bytearray:
    if type(data) is bytes or type(data) is bytearray:
        return data
    if isinstance(data, (bytes, bytearray, memoryview)):
        return bytes(data)
    raise TypeError(f"keys decode from bytes, not {type(data).__name__!r}")


def decode_prefix(data: bytes | bytearray | memoryview, pos: int = 0) -> tuple[Any, int]:
    """Decode the one key starting at ``data[pos]``; return it and the index just after it.

    Raises KeyCodecError if no well-formed key starts there.
    """
    buf = _as_buffer(data)
    if not 0 <= pos <= len(buf):
        raise KeyCodecError(f"position {pos} outside the {len(buf)} bytes")
    return _decode(buf, pos, 0)


def decode_key(data: bytes | bytearray | memoryview) -> Any:
    """Decode ``data``, which must be exactly one encoded key (KeyCodecError otherwise)."""
    buf = data if type(data) is bytes else _as_buffer(data)
    n = len(buf)
    if n > 1 and buf[0] == _STR and buf[-1] == _END:  # the common key: a str without 0x00
        try:
            s = buf[1:-1].decode("utf-8")
        except UnicodeDecodeError:
            pass  # an escaped 0x00 (0xff is not UTF-8) or malformed: the general path tells
        else:
            if "\x00" not in s:
                return s
    value, end = _decode(buf, 0, 0)
    if end != n:
        raise KeyCodecError(f"trailing bytes: the key ends at byte {end} of {n}")
    return value
