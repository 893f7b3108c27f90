"""Partial statistics on the wire: nested dicts and lists of numbers, strings, bytes and
numpy arrays, to msgpack and back (an array travels as ``{"__nd__": [dtype, shape, bytes]}``,
little-endian, never pickled)."""

from __future__ import annotations

from typing import Any

import msgpack
import numpy as np

_DTYPES = {"<f8", "<i8", "<u8", "<f4", "<i4", "|b1", "|u1"}


def _default(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        arr = np.ascontiguousarray(obj)
        if arr.dtype.byteorder == ">":
            arr = arr.astype(arr.dtype.newbyteorder("<"))
        if arr.dtype.str not in _DTYPES:
            raise TypeError(f"cannot send an array of {arr.dtype}")
        return {"__nd__": [arr.dtype.str, list(arr.shape), arr.tobytes()]}
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"cannot send a {type(obj).__name__}")


def _hook(obj: dict[str, Any]) -> Any:
    nd = obj.get("__nd__")
    if nd is None or len(obj) != 1:
        return obj
    dtype, shape, data = nd
    if dtype not in _DTYPES or not isinstance(data, bytes):
        raise ValueError(f"bad array dtype {dtype!r}")
    arr = np.frombuffer(data, dtype=np.dtype(dtype))
    return arr.reshape([int(n) for n in shape]).copy()


def pack(value: Any) -> bytes:
    return msgpack.packb(value, default=_default, use_bin_type=True)


def unpack(data: bytes) -> Any:
    return msgpack.unpackb(data, object_hook=_hook, raw=False, strict_map_key=False)
