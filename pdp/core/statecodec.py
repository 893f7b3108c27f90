"""The replicated State as plain msgpack values, and pysyncobj dump files without pickle.

:func:`state_to_plain` / :func:`state_from_plain` turn a :class:`pdp.core.state.State` into dicts,
lists and scalars and back, exactly (``Task.runs``, whose keys are ints, travels as a list of
``[attempt, node]`` pairs). :func:`state_from_plain` checks every field's type against the
dataclasses' annotations and raises ProtocolError on anything else: a dump file may have
come from another member (a snapshot transmission).

:class:`StateDump` provides the ``serializer`` / ``deserializer`` of ``SyncObjConf``. With a
custom serializer pysyncobj passes ``(last applied entry, the entry before it, the cluster:
a set of TCPNode, plus None on a read-only follower)`` and dumps none of its consumers, so
the serializer writes the replica's State itself. The file::

    MAGIC (8 bytes) | SHA-256 of the body (32 bytes) | body: msgpack map
        {"format": 1, "state": <plain state>, "last": [command, idx, term],
         "prev": [command, idx, term], "cluster": [voter ids]}

The leader sends this file as the 'serialized' chunks of a snapshot transmission; the
follower's pysyncobj writes the chunks to its own dump file and calls the deserializer,
which checks the hash and every field, screens both entries' commands
(:func:`pdp.raft.raftnet.screen_command`), restores the State into the replica and returns the
tuple pysyncobj expects. No pickle anywhere. pysyncobj uses its in-memory gzip+pickle path
when ``fullDumpFile`` is None, so every member (read-only followers too) needs a dump file.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import typing
from collections.abc import Callable
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any

import msgpack
from pysyncobj.node import TCPNode

from pdp.errors import ProtocolError
from pdp.raft.raftnet import check_node_id, check_plain, screen_command
from pdp.core.state import Job, Member, Record, State, Task

log = logging.getLogger("pdp.core.statecodec")

MAGIC = b"PDPSNAP\x01"
FORMAT = 1
Entry = tuple[bytes, int, int]  # a pysyncobj log entry: (command, idx, term)

# The types of State's attributes that are not plain values (State is a plain class, not a
# dataclass); every other attribute of a fresh State() is carried as plain values, so one
# added to State later travels too.
_TYPED: dict[str, Any] = {
    "members": dict[str, Member],
    "jobs": dict[str, Job],
    "records": dict[str, Record],
    "next_seq": int,
    "applied": int,
    "clock": float,
}
_SINCE = frozenset({"events", "clock"})  # State fields newer than the first dump format: may be absent
_PAIRS = {(Task, "runs"), (Task, "given_up")}  # dict[int, str] fields, kept as [[key, value], ...] (msgpack maps want str keys)


# -- State <-> plain ----------------------------------------------------------------------


@functools.cache
def _state_fields() -> dict[str, Any]:
    """State's attributes (those of a fresh State) -> their type (Any: plain values)."""
    return {name: _TYPED.get(name, Any) for name in vars(State())}


def state_to_plain(state: State) -> dict[str, Any]:
    """A deep, plain copy of ``state`` (dicts, lists, scalars) that msgpack packs as is."""
    return {name: _encode(getattr(state, name)) for name in _state_fields()}


_SCALAR_TYPES = frozenset({str, int, float, bool, type(None)})


def _encode(value: Any) -> Any:
    kind = type(value)
    if kind in _SCALAR_TYPES:
        return value
    if kind is dict:
        return {k: _encode(v) for k, v in value.items()}
    if kind is list:
        return [_encode(v) for v in value]
    if is_dataclass(kind):
        return _dataclass_encoder(kind)(value)
    return value  # msgpack refuses anything else when the dump is packed


@functools.cache
def _dataclass_encoder(cls: type) -> Callable[[Any], dict[str, Any]]:
    names = tuple(f.name for f in fields(cls))
    pairs = frozenset(name for name in names if (cls, name) in _PAIRS)

    def encode(obj: Any) -> dict[str, Any]:
        out = {}
        for name in names:
            value = getattr(obj, name)
            out[name] = value if type(value) in _SCALAR_TYPES else _encode(value)
        for name in pairs:
            out[name] = [[k, v] for k, v in getattr(obj, name).items()]
        return out
    return encode


def state_from_plain(d: Any) -> State:
    """The State ``d`` describes (as :func:`state_to_plain` wrote it); ProtocolError if any
    field is missing, unknown or of the wrong type. ``d`` must not be used afterwards (the
    State takes over its plain containers)."""
    names = _state_fields()
    if type(d) is not dict or not set(names) - _SINCE <= set(d) <= set(names):
        raise ProtocolError("a state is a map of exactly its fields")
    state = State()
    for name, hint in names.items():
        if name not in d:  # a dump written before the field existed: its default
            continue
        value = _field(name, _decoder(hint), d[name])
        if type(value) is not type(getattr(state, name)):  # e.g. a dict stays a dict
            raise ProtocolError(f"{name}: a {type(getattr(state, name)).__name__} expected")
        setattr(state, name, value)
    return state


Decoder = Callable[[Any], Any]


def _field(name: str, decode: Decoder, value: Any) -> Any:
    try:
        return decode(value)
    except ProtocolError as exc:
        raise ProtocolError(f"{name}: {exc}") from None


@functools.cache
def _decoder(hint: Any) -> Decoder:
    """A function checking a value against the annotation ``hint`` (ProtocolError if not)."""
    if hint is Any:
        return _plain
    if hint is float:
        return _number
    if hint in (int, str, bool):
        return functools.partial(_exact, hint)
    if is_dataclass(hint):
        return _dataclass_decoder(hint)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is list:
        item = _decoder(args[0])
        return lambda v: [item(x) for x in _of(list, v)]
    if origin is dict:
        key, val = _decoder(args[0]), _decoder(args[1])
        return lambda v: {key(k): val(x) for k, x in _of(dict, v).items()}
    raise TypeError(f"no decoder for {hint}")  # pragma: no cover - a new kind of field in State


def _plain(value: Any) -> Any:
    check_plain(value)
    return value


def _number(value: Any) -> Any:
    if type(value) not in (int, float):  # a float field may hold an int: kept as it was
        raise ProtocolError(f"a number expected, not {type(value).__name__}")
    return value


def _exact(kind: type, value: Any) -> Any:
    if type(value) is not kind:
        raise ProtocolError(f"a {kind.__name__} expected, not {type(value).__name__}")
    return value


def _of(kind: type, value: Any) -> Any:
    if type(value) is not kind:
        raise ProtocolError(f"a {kind.__name__} expected, not {type(value).__name__}")
    return value


def _dataclass_decoder(cls: Any) -> Decoder:
    """Decodes one dataclass; scalar fields are checked inline (a state has many tasks)."""
    hints = typing.get_type_hints(cls)
    exact: dict[str, Any] = {}  # field -> its exact type (or the two of a float field)
    nested: dict[str, Decoder] = {}
    for f in fields(cls):
        hint = hints[f.name]
        if (cls, f.name) in _PAIRS:
            nested[f.name] = _pairs_decoder(hint)
        elif hint in (int, str, bool):
            exact[f.name] = (hint,)
        elif hint is float:
            exact[f.name] = (int, float)  # a float field may hold an int: kept as it was
        else:
            nested[f.name] = _decoder(hint)
    names = exact.keys() | nested.keys()

    def decode(value: Any) -> Any:
        if type(value) is not dict or not value.keys() <= names:
            raise ProtocolError(f"a {cls.__name__} map (of its fields) expected")
        kwargs = {}
        for name, item in value.items():
            kinds = exact.get(name)
            if kinds is None:
                item = _field(name, nested[name], item)
            elif type(item) not in kinds:
                raise ProtocolError(f"{cls.__name__}.{name}: a {kinds[-1].__name__} expected, "
                                    f"not {type(item).__name__}")
            kwargs[name] = item
        try:  # a missing field takes its default; a missing required one is a TypeError
            return cls(**kwargs)
        except TypeError as exc:
            raise ProtocolError(f"{cls.__name__}: {exc}") from None
    return decode


def _pairs_decoder(hint: Any) -> Decoder:
    """dict[K, V] written as [[key, value], ...]."""
    key, val = (_decoder(arg) for arg in typing.get_args(hint))

    def decode(value: Any) -> dict[Any, Any]:
        if type(value) is not list or not all(type(p) is list and len(p) == 2 for p in value):
            raise ProtocolError("a list of [key, value] pairs expected")
        return {key(k): val(v) for k, v in value}
    return decode


# -- dump files ---------------------------------------------------------------------------


def write_dump(path: str | Path, state: State, last: Entry, prev: Entry, cluster: list[str]) -> None:
    """Write (and fsync) a dump file; pysyncobj renames it into place afterwards."""
    body = msgpack.packb({"format": FORMAT, "state": state_to_plain(state), "last": list(last),
                          "prev": list(prev), "cluster": sorted(cluster)}, use_bin_type=True)
    with open(path, "wb") as f:
        f.write(MAGIC + hashlib.sha256(body).digest() + body)
        f.flush()
        os.fsync(f.fileno())


def read_dump(path: str | Path) -> tuple[State, Entry, Entry, list[str]]:
    """(state, last entry, previous entry, voter ids) of a dump file; ProtocolError unless it
    is an intact pdp dump whose every field checks out and whose commands pass the screen."""
    data = Path(path).read_bytes()
    if not data.startswith(MAGIC):
        raise ProtocolError(f"{path} is not a pdp dump (an older pickle dump? delete the member's raft/ dir)")
    digest, body = data[len(MAGIC):len(MAGIC) + 32], data[len(MAGIC) + 32:]
    if hashlib.sha256(body).digest() != digest:
        raise ProtocolError(f"{path} is damaged (hash mismatch)")
    try:
        d = msgpack.unpackb(body, raw=False, strict_map_key=True, ext_hook=_no_ext)
    except Exception as exc:
        raise ProtocolError(f"{path}: not msgpack: {exc}") from None
    if type(d) is not dict or set(d) != {"format", "state", "last", "prev", "cluster"} or d["format"] != FORMAT:
        raise ProtocolError(f"{path}: not a format-{FORMAT} pdp dump")
    last, prev = _entry(d["last"]), _entry(d["prev"])
    if last[1] != prev[1] + 1:
        raise ProtocolError(f"{path}: entries {prev[1]} and {last[1]} are not consecutive")
    return state_from_plain(d["state"]), last, prev, _cluster(d["cluster"])


def _no_ext(code: int, data: bytes) -> Any:
    raise ValueError(f"msgpack ExtType {code}")


def _entry(value: Any) -> Entry:
    if type(value) is not list or len(value) != 3 or type(value[0]) is not bytes \
            or not all(type(v) is int and v >= 0 for v in value[1:]):
        raise ProtocolError("a dump entry is [command, idx, term]")
    screen_command(value[0])
    return value[0], value[1], value[2]


def _cluster(value: Any) -> list[str]:
    if type(value) is not list or len(set(map(str, value))) != len(value):
        raise ProtocolError("a dump's cluster is a list of distinct voter ids")
    for node_id in value:
        check_node_id(node_id)
    return list(value)


def is_pdp_dump(path: str | Path) -> bool:
    """Does ``path`` start like a pdp dump (not, e.g., an older pysyncobj gzip+pickle one)?"""
    with open(path, "rb") as f:
        return f.read(len(MAGIC)) == MAGIC


class StateDump:
    """``SyncObjConf(serializer=dump.serializer, deserializer=dump.deserializer)`` for a replica.

    Both run on pysyncobj's tick thread, which is also the only thread that changes the
    State, so ``get_state`` needs no lock; ``set_state`` swaps the replica's State (under the
    replica's lock) and notifies.
    """

    def __init__(self, get_state: Callable[[], State], set_state: Callable[[State], None]) -> None:
        self._get_state, self._set_state = get_state, set_state

    def serializer(self, file_name: str, data: tuple[Entry, Entry, Any]) -> None:
        last, prev, cluster = data
        voters = [str(node.id) for node in cluster if node is not None]  # None: a read-only self
        try:
            write_dump(file_name, self._get_state(), last, prev, voters)
        except Exception:  # pysyncobj only logs "Failed to store full dump": say why
            log.exception("cannot write the Raft dump file %s", file_name)
            raise

    def deserializer(self, file_name: str) -> tuple[Entry, Entry, set[TCPNode]]:
        state, last, prev, voters = read_dump(file_name)  # everything checked before any change
        self._set_state(state)
        return last, prev, {TCPNode(node_id) for node_id in voters}
