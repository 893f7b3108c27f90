"""pysyncobj's network side without pickle: a msgpack codec, a log-entry screen and a Transport.

pysyncobj's own TCPTransport pickles every message and unpickles whatever a peer sends (with
a password, whatever anyone holding the party key sends): remote code execution. Here Raft
messages travel over pdp's own mutually authenticated connections (the *bridge*, run by the
asyncio side), encoded with msgpack, and nothing from the network reaches pickle unscreened:

- :func:`encode_message` / :func:`decode_message`: the messages pdp allows (``request_vote``,
  ``response_vote``, ``append_entries`` with entries or with a snapshot chunk,
  ``next_node_idx``, ``timeout_now``), validated strictly. ``apply_command`` and
  ``apply_command_response`` are refused (proposals reach the master over an RPC, never
  through Raft) and so are ``append_entries`` ``transmission`` chunks (pdp sets
  ``appendEntriesBatchSizeBytes`` to :data:`APPEND_BATCH_BYTES`, above the largest command
  allowed, so pysyncobj never splits an entry).
- :func:`screen_command`: a log entry's command is one type byte and a pickle, which
  pysyncobj unpickles when it applies the entry. The screen interprets the pickle's opcodes
  (``pickletools.genops``) itself, without unpickling: only plain values, in exactly the
  shapes pdp writes, pass (see the function). Every entry of a received ``append_entries``
  is screened before pysyncobj sees the message.
- :func:`plain_command` / :func:`pack_command`: the proposer's side of the same rules, so a
  command every follower would refuse (forever) never enters the log. Commands hold only
  dicts with str keys, lists, str, int (64-bit), float, bool and None: **no bytes** (pickle
  protocol 2 writes bytes as a ``_codecs.encode`` call, which the screen refuses), tuples
  become lists, nothing is shared.
- :class:`RaftTransport`, built by :func:`make_transport_class`: the pysyncobj Transport
  over a :class:`Bridge`. pysyncobj calls it on its tick thread; the bridge calls
  :meth:`~RaftTransport.deliver`, :meth:`~RaftTransport.link_up` and
  :meth:`~RaftTransport.link_down` from the asyncio thread. Those only queue the event and
  wake pysyncobj's poller (a PipeNotifier); the tick thread drains the queue, decodes and
  screens each message and runs pysyncobj's callbacks, as pysyncobj requires (guide §3).

Decoding and screening happen on the tick thread, not the event loop: screening a batch
entry is pure-Python work (a few ms for 200 commands) that would delay heartbeats and the
data plane on the event loop; the voter set that decides whom to listen to lives on the
tick thread; and the tick thread is where the message is consumed anyway.
"""

from __future__ import annotations

import logging
import os
import pickle  # dumps only, of our own plain commands (what pysyncobj logs); received bytes never reach pickle: the screen reads them
import pickletools  # screen: genops reads the opcodes of received entries without running them
import threading
from collections.abc import Callable, Iterable
from typing import Any, Protocol

import msgpack
from pysyncobj.node import Node
from pysyncobj.pipe_notifier import PipeNotifier
from pysyncobj.transport import Transport

from pdp.errors import ProtocolError

log = logging.getLogger("pdp.raft.raftnet")

MAX_COMMAND_BYTES = 1 << 20  # one log entry's command (type byte + pickle)
APPEND_BATCH_BYTES = 2 << 20  # appendEntriesBatchSizeBytes: > MAX_COMMAND_BYTES, so no 'transmission'
SNAPSHOT_CHUNK_BYTES = 1 << 16  # logCompactionBatchSize: one 'serialized' chunk of a dump file
MAX_MESSAGE_BYTES = 8 << 20  # an encoded message (entries up to ~APPEND_BATCH + one command + framing)
MAX_QUEUED_BYTES = 64 << 20  # deliveries waiting for the tick thread; beyond this they are dropped
MAX_DEPTH = 32  # nesting of an entry's command values
BATCH_LEVELS = 2  # a group-committed batch wraps commands in {"cmds": [...]}: two more levels
RAFT_INT_MAX = 2**63 - 1  # terms and log indexes
INT_MIN, INT_MAX = -(2**63), 2**64 - 1  # what msgpack can carry (dump files are msgpack)
RO_PREFIX = "ro:"  # node ids the bridge gives read-only followers ("ro:<name>")

# pysyncobj's _COMMAND_TYPE (syncobj.py): the first byte of every log entry's command.
REGULAR, NO_OP, MEMBERSHIP, VERSION = 0, 1, 2, 3
# pdp replicates one method (consensus._Replica.apply); pysyncobj numbers it 0 (Consensus checks).
FUNC_IDS = frozenset({0})
_TCPNODE_GLOBAL = "pysyncobj.node TCPNode"  # the one class a membership entry may name

_RAFT_TYPES = ("request_vote", "response_vote", "append_entries", "next_node_idx", "timeout_now")
_FIELDS: dict[str, dict[str, str]] = {  # message type -> field -> kind (append_entries: see _check_append)
    "request_vote": {"term": "uint", "last_log_index": "uint", "last_log_term": "uint"},
    "response_vote": {"term": "uint"},
    "next_node_idx": {"next_node_idx": "uint", "reset": "bool", "success": "bool"},
    "timeout_now": {"term": "uint"},
}
_APPEND_KEYS = frozenset({"type", "term", "commit_index", "entries", "prevLogIdx", "prevLogTerm"})
_SNAPSHOT_KEYS = frozenset({"type", "term", "commit_index", "serialized"})


# -- values -------------------------------------------------------------------------------


def _is_uint(value: Any) -> bool:
    """A Raft term or index: an int (not a bool) in 0 .. 2**63-1."""
    return type(value) is int and 0 <= value <= RAFT_INT_MAX


def _check_kind(value: Any, kind: str, where: str) -> None:
    """``kind``: "uint" (a Raft int), "uint?" (one or None) or "bool"."""
    if kind == "bool":
        ok = type(value) is bool
    else:
        ok = _is_uint(value) or (kind == "uint?" and value is None)
    if not ok:
        raise ProtocolError(f"{where} must be {kind}, not {type(value).__name__}")


def check_plain(value: Any, depth: int = 0) -> None:
    """A command's values: dicts with str keys, lists, str (valid UTF-8), int (64-bit), float,
    bool and None; a tree no deeper than MAX_DEPTH. ProtocolError otherwise."""
    if depth > MAX_DEPTH:
        raise ProtocolError(f"values nested deeper than {MAX_DEPTH}")
    kind = type(value)
    if kind is dict:
        for key, item in value.items():
            if type(key) is not str:
                raise ProtocolError(f"dict key {key!r} is not a str")
            _check_str(key)
            check_plain(item, depth + 1)
    elif kind is list:
        for item in value:
            check_plain(item, depth + 1)
    elif kind is str:
        _check_str(value)
    elif kind is int:
        if not INT_MIN <= value <= INT_MAX:
            raise ProtocolError("int outside the 64-bit range")
    elif kind in (bytes, bytearray):
        raise ProtocolError("bytes in a command (pickle would write a _codecs.encode call): encode them, e.g. as hex")
    elif kind not in (float, bool, type(None)):
        raise ProtocolError(f"a {kind.__name__} value (only dict, list, str, int, float, bool, None)")


def _check_str(text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ProtocolError("a str that is not valid UTF-8 (lone surrogate)") from None


# -- the proposer's side ------------------------------------------------------------------


def plain_command(cmd: Any) -> dict[str, Any]:
    """``cmd`` as the tree every replica (and every snapshot) will hold; ProtocolError if it
    cannot travel through Raft (bytes, non-str keys, sets, huge ints, ...).

    A msgpack round trip turns tuples into lists and unshares repeated objects, so a replica
    restored from a (msgpack) snapshot holds exactly what one that applied the log holds.
    Nesting is checked with BATCH_LEVELS to spare, so the command also passes in a batch."""
    if type(cmd) is not dict:
        raise ProtocolError(f"a command is a dict, not a {type(cmd).__name__}")
    try:
        plain = msgpack.unpackb(msgpack.packb(cmd, use_bin_type=True), raw=False, strict_map_key=False)
    except (TypeError, ValueError, OverflowError, UnicodeError) as exc:
        raise ProtocolError(f"not plain data: {exc}") from None
    check_plain(plain, BATCH_LEVELS)
    return dict(plain)


def pack_command(plain: dict[str, Any], func_id: int = 0, screen: bool = True) -> bytes:
    """The log entry's command for ``plain``, exactly as pysyncobj's @replicated writes it:
    type byte REGULAR + ``pickle.dumps((func_id, (plain,)), 2)``. Refuses (ProtocolError) one
    larger than MAX_COMMAND_BYTES; with ``screen`` also runs the followers' screen on it."""
    data = bytes([REGULAR]) + pickle.dumps((func_id, (plain,)), 2)
    if len(data) > MAX_COMMAND_BYTES:
        raise ProtocolError(f"command of {len(data)} bytes exceeds {MAX_COMMAND_BYTES}")
    if screen:
        screen_command(data, frozenset({func_id}))
    return data


# -- screening log entries ----------------------------------------------------------------


class _NodeClass:
    """Stands for GLOBAL 'pysyncobj.node TCPNode' while a membership entry is screened."""


class _NodeStub:
    """Stands for the TCPNode a membership entry builds (NEWOBJ, then BUILD with its dict)."""

    def __init__(self) -> None:
        self.state: dict[str, Any] | None = None


_NODE_CLASS = _NodeClass()
_SCALARS = (str, int, float, bool, type(None))


class _Screen:
    """A stack machine for the few pickle opcodes plain values need (protocol 2).

    It builds the values itself from ``pickletools.genops`` (never calling pickle), refusing
    every other opcode: no GLOBAL (but the one TCPNode of a membership entry), REDUCE,
    BUILD (but on that TCPNode), INST, OBJ, NEWOBJ(_EX), EXT*, PERSID, BINPERSID, bytes,
    text-mode opcodes. A GET may fetch only a scalar, so the result is a tree, never
    shared or cyclic. Anything pickle itself would choke on (stack underflow, an unhashable
    key, an odd SETITEMS, a missing memo) is refused too: an entry that raised while
    pysyncobj applies it would wedge the log.
    """

    def __init__(self, allow_node: bool) -> None:
        self.allow_node = allow_node
        self.stack: list[Any] = []
        self.marks: list[int] = []
        self.memo: dict[int, Any] = {}

    def run(self, payload: bytes) -> Any:
        try:
            for opcode, arg, pos in pickletools.genops(payload):  # screen: network bytes, read never run
                if (pos == 0) != (opcode.name == "PROTO") or (pos == 0 and arg != 2):
                    raise ProtocolError("not a protocol-2 pickle")
                if pos == 0:
                    continue
                if opcode.name == "STOP":
                    return self.stop(pos, len(payload))
                handler = _OPS.get(opcode.name)
                if handler is None:
                    raise ProtocolError(f"pickle opcode {opcode.name} is not allowed")
                handler(self, arg)
        except ProtocolError:
            raise
        except Exception as exc:  # genops on malformed data, IndexError/KeyError/TypeError below
            raise ProtocolError(f"malformed pickle: {type(exc).__name__}: {exc}") from None
        raise ProtocolError("pickle without STOP")

    def stop(self, pos: int | None, size: int) -> Any:
        if pos != size - 1 or self.marks or len(self.stack) != 1:
            raise ProtocolError("pickle with trailing data or an unbalanced stack")
        return self.stack[0]

    def pop_mark(self) -> list[Any]:
        at = self.marks.pop()
        items = self.stack[at:]
        del self.stack[at:]
        return items

    def pop(self, count: int) -> list[Any]:
        if count > len(self.stack) - (self.marks[-1] if self.marks else 0):
            raise ProtocolError("pickle stack underflow")
        items = self.stack[len(self.stack) - count:]
        del self.stack[len(self.stack) - count:]
        return items

    def top(self) -> Any:
        """The top of the stack; pickle sees nothing below the last MARK."""
        if len(self.stack) <= (self.marks[-1] if self.marks else 0):
            raise ProtocolError("pickle stack underflow")
        return self.stack[-1]

    def target(self, kind: type) -> Any:
        if type(self.top()) is not kind:
            raise ProtocolError(f"pickle adds items to something that is not a {kind.__name__}")
        return self.stack[-1]

    def push(self, value: Any) -> None:
        self.stack.append(value)

    def dict_(self) -> None:
        items = self.pop_mark()
        self.stack.append({})
        self.setitems(items)

    def append(self) -> None:
        (value,) = self.pop(1)
        self.target(list).append(value)

    def appends(self) -> None:
        items = self.pop_mark()
        self.target(list).extend(items)

    def setitems(self, items: list[Any]) -> None:
        if len(items) % 2:
            raise ProtocolError("odd number of items for SETITEMS")
        target = self.target(dict)
        for k in range(0, len(items), 2):
            target[items[k]] = items[k + 1]  # TypeError on an unhashable key: refused

    def get(self, key: int) -> None:
        value = self.memo[key]
        if type(value) not in _SCALARS:
            raise ProtocolError("pickle shares a container (GET of a dict, list or tuple)")
        self.stack.append(value)

    def put(self, key: int) -> None:
        self.memo[key] = self.top()

    def global_(self, name: str) -> None:
        if not (self.allow_node and name == _TCPNODE_GLOBAL):
            raise ProtocolError(f"pickle names {name!r} (GLOBAL)")
        self.stack.append(_NODE_CLASS)

    def newobj(self) -> None:
        cls, args = self.pop(2)
        if cls is not _NODE_CLASS or args != ():
            raise ProtocolError("NEWOBJ of anything but TCPNode()")
        self.stack.append(_NodeStub())

    def build(self) -> None:
        (state,) = self.pop(1)
        node = self.target(_NodeStub)
        if node.state is not None or type(state) is not dict:
            raise ProtocolError("BUILD of anything but one TCPNode's dict")
        node.state = state


_Handler = Callable[[_Screen, Any], None]
_OPS: dict[str, _Handler] = {
    "MARK": lambda s, a: s.marks.append(len(s.stack)),
    "EMPTY_DICT": lambda s, a: s.push({}),
    "EMPTY_LIST": lambda s, a: s.push([]),
    "EMPTY_TUPLE": lambda s, a: s.push(()),
    "TUPLE": lambda s, a: s.push(tuple(s.pop_mark())),
    "TUPLE1": lambda s, a: s.push(tuple(s.pop(1))),
    "TUPLE2": lambda s, a: s.push(tuple(s.pop(2))),
    "TUPLE3": lambda s, a: s.push(tuple(s.pop(3))),
    "LIST": lambda s, a: s.push(s.pop_mark()),
    "DICT": lambda s, a: s.dict_(),
    "APPEND": lambda s, a: s.append(),
    "APPENDS": lambda s, a: s.appends(),
    "SETITEM": lambda s, a: s.setitems(s.pop(2)),
    "SETITEMS": lambda s, a: s.setitems(s.pop_mark()),
    "BINUNICODE": lambda s, a: s.push(a),
    "BININT": lambda s, a: s.push(a),
    "BININT1": lambda s, a: s.push(a),
    "BININT2": lambda s, a: s.push(a),
    "LONG1": lambda s, a: s.push(a),
    "BINFLOAT": lambda s, a: s.push(a),
    "NONE": lambda s, a: s.push(None),
    "NEWTRUE": lambda s, a: s.push(True),
    "NEWFALSE": lambda s, a: s.push(False),
    "BINPUT": lambda s, a: s.put(a),
    "LONG_BINPUT": lambda s, a: s.put(a),
    "BINGET": lambda s, a: s.get(a),
    "LONG_BINGET": lambda s, a: s.get(a),
    "GLOBAL": lambda s, a: s.global_(a),
    "NEWOBJ": lambda s, a: s.newobj(),
    "BUILD": lambda s, a: s.build(),
}


def screen_command(command: bytes, func_ids: frozenset[int] = FUNC_IDS) -> None:
    """Refuse (ProtocolError) a log entry's command unless it is one pdp writes.

    - REGULAR (0): ``(func_id, (cmd,))`` with ``func_id`` in ``func_ids`` and ``cmd`` a tree
      of plain values (:func:`check_plain`): what ``Consensus.propose`` writes.
    - NO_OP (1): the single type byte.
    - MEMBERSHIP (2): ``['add' | 'rem', node_id, TCPNode(node_id)]``, the TCPNode as
      protocol 2 pickles it (GLOBAL, EMPTY_TUPLE, NEWOBJ, BUILD of its four attributes).
    - VERSION (3): the int 0 (pdp's only code version; a higher one would wedge the log).
    """
    if type(command) is not bytes or not command:
        raise ProtocolError("empty log entry command")
    if len(command) > MAX_COMMAND_BYTES:
        raise ProtocolError(f"log entry command of {len(command)} bytes exceeds {MAX_COMMAND_BYTES}")
    kind, payload = command[0], command[1:]
    if kind == NO_OP:
        if payload:
            raise ProtocolError("NO_OP entry with a payload")
    elif kind == REGULAR:
        _check_regular(_Screen(allow_node=False).run(payload), func_ids)
    elif kind == MEMBERSHIP:
        _check_membership(_Screen(allow_node=True).run(payload))
    elif kind == VERSION:
        if _Screen(allow_node=False).run(payload) != 0:
            raise ProtocolError("VERSION entry other than version 0")
    else:
        raise ProtocolError(f"unknown log entry type {kind}")


def _check_regular(value: Any, func_ids: frozenset[int]) -> None:
    if type(value) is not tuple or len(value) != 2 or type(value[0]) is not int or value[0] not in func_ids:
        raise ProtocolError("REGULAR entry is not (known method id, (command,))")
    args = value[1]
    if type(args) is not tuple or len(args) != 1 or type(args[0]) is not dict:
        raise ProtocolError("REGULAR entry's arguments are not (command dict,)")
    check_plain(args[0])


def _check_membership(value: Any) -> None:
    if type(value) is not list or len(value) != 3 or value[0] not in ("add", "rem") or type(value[0]) is not str:
        raise ProtocolError("MEMBERSHIP entry is not ['add' | 'rem', node id, node]")
    node_id, node = value[1], value[2]
    host, port = check_node_id(node_id)
    expected = {"_id": node_id, "_TCPNode__address": node_id, "_TCPNode__host": host, "_TCPNode__port": port}
    if type(node) is not _NodeStub or node.state != expected or type(node.state["_TCPNode__port"]) is not int:
        raise ProtocolError("MEMBERSHIP entry's node is not TCPNode(node id)")


def check_node_id(node_id: Any) -> tuple[str, int]:
    """A voter's id "host:port" (its data address) as (host, port); ProtocolError otherwise."""
    if type(node_id) is not str or not 3 <= len(node_id) <= 300 or node_id.startswith(RO_PREFIX):
        raise ProtocolError(f"bad voter id {node_id!r}")
    host, _, port = node_id.rpartition(":")
    if not host or not port.isdigit() or port != str(int(port)) or not 0 < int(port) < 65536 \
            or any(c.isspace() for c in host):
        raise ProtocolError(f"bad voter id {node_id!r} (host:port)")
    return host, int(port)


# -- messages -----------------------------------------------------------------------------


def encode_message(msg: dict[str, Any]) -> bytes:
    """msgpack bytes of one pysyncobj message pdp allows (ProtocolError otherwise).

    The structure is checked as on decoding, but entries are not screened: they come from
    this member's own log (every receiver screens them)."""
    _validate(msg, screen=False)
    data: bytes = msgpack.packb(msg, use_bin_type=True)
    if len(data) > MAX_MESSAGE_BYTES:
        raise ProtocolError(f"message of {len(data)} bytes exceeds {MAX_MESSAGE_BYTES}")
    return data


def decode_message(data: bytes) -> dict[str, Any]:
    """The message in ``data``, entries and snapshot chunks as the tuples pysyncobj expects;
    ProtocolError unless it is exactly one message pdp allows, every entry screened."""
    if not isinstance(data, bytes) or len(data) > MAX_MESSAGE_BYTES:
        raise ProtocolError("message too large or not bytes")
    try:
        msg = msgpack.unpackb(data, raw=False, strict_map_key=True, ext_hook=_no_ext, timestamp=0)
    except Exception as exc:  # msgpack raises ValueError subclasses, TypeError, ...
        raise ProtocolError(f"not a msgpack message: {type(exc).__name__}: {exc}") from None
    return _validate(msg, screen=True)


def _no_ext(code: int, data: bytes) -> Any:
    raise ValueError(f"msgpack ExtType {code}")


def _validate(msg: Any, screen: bool) -> dict[str, Any]:
    if type(msg) is not dict:
        raise ProtocolError("a message is a map")
    kind = msg.get("type")
    if kind in ("apply_command", "apply_command_response"):
        raise ProtocolError(f"{kind} is refused (proposals go to the master over RPC, never through Raft)")
    if kind not in _RAFT_TYPES:
        raise ProtocolError(f"unknown message type {kind!r}")
    if kind == "append_entries":
        return _check_append(msg, screen)
    fields = _FIELDS[kind]
    if set(msg) != {"type", *fields}:
        raise ProtocolError(f"{kind} with fields {sorted(map(str, msg))}")
    for name, field_kind in fields.items():
        _check_kind(msg[name], field_kind, f"{kind}.{name}")
    return msg


def _check_append(msg: dict[str, Any], screen: bool) -> dict[str, Any]:
    if "transmission" in msg or "data" in msg:
        raise ProtocolError("append_entries transmission chunks are refused (no entry is that large)")
    keys = set(msg)
    if keys not in (_APPEND_KEYS, _SNAPSHOT_KEYS):
        raise ProtocolError(f"append_entries with fields {sorted(map(str, keys))}")
    _check_kind(msg["term"], "uint", "append_entries.term")
    _check_kind(msg["commit_index"], "uint", "append_entries.commit_index")
    if keys == _SNAPSHOT_KEYS:
        return {**msg, "serialized": _check_chunk(msg["serialized"])}
    _check_kind(msg["prevLogIdx"], "uint?", "append_entries.prevLogIdx")
    _check_kind(msg["prevLogTerm"], "uint?", "append_entries.prevLogTerm")
    return {**msg, "entries": _check_entries(msg["entries"], msg["prevLogIdx"], msg["term"], screen)}


def _check_chunk(chunk: Any) -> tuple[bytes, bool, bool] | None:
    """A snapshot chunk: None (no dump ready yet) or (bytes, isFirst, isLast)."""
    if chunk is None:
        return None
    if type(chunk) not in (list, tuple) or len(chunk) != 3 or type(chunk[0]) is not bytes \
            or type(chunk[1]) is not bool or type(chunk[2]) is not bool:
        raise ProtocolError("append_entries.serialized is not (bytes, bool, bool)")
    return chunk[0], chunk[1], chunk[2]


def _check_entries(entries: Any, prev_idx: int | None, term: int, screen: bool) -> list[tuple[bytes, int, int]]:
    """Entries (command, idx, term): consecutive after ``prev_idx``, terms up to the leader's."""
    if type(entries) is not list:
        raise ProtocolError("append_entries.entries is not a list")
    out = []
    for k, entry in enumerate(entries):
        if type(entry) not in (list, tuple) or len(entry) != 3 or type(entry[0]) is not bytes \
                or not _is_uint(entry[1]) or not _is_uint(entry[2]):
            raise ProtocolError("append_entries entry is not (bytes, idx, term)")
        command, idx, entry_term = entry
        if prev_idx is None or idx != prev_idx + 1 + k or entry_term > term:
            raise ProtocolError("append_entries entries out of sequence")
        if screen:
            screen_command(command)
        out.append((command, idx, entry_term))
    return out


# -- the transport ------------------------------------------------------------------------


class Bridge(Protocol):
    """What a :class:`RaftTransport` needs from the asyncio side (implemented there).

    The bridge owns pdp's authenticated connections. It identifies every peer it has
    authenticated by a node id: a voter by its data address "host:port" (the address the
    voter advertises, spelled the same everywhere), a read-only follower by
    "ro:<member name>". It must never hand the transport an id it did not authenticate.

    Called by the transport (from pysyncobj's tick thread, and from the thread that builds
    the SyncObj); every method must be thread-safe and must not block:

    - ``attach(transport)``: a transport starts; from now on report this member's links to
      it (``link_up`` for every link already up).
    - ``detach(transport)``: it is destroyed; forget it and its wants.
    - ``want(node_id)``: ``node_id`` is a voter: keep a link to it (dial it, redial with
      backoff; both voters of a pair dial, the bridge keeps one link). A read-only follower
      wants every voter and dials them; voters never dial read-only followers. The initial
      voters are wanted from the transport's constructor, before ``attach``.
    - ``unwant(node_id)``: no longer a voter: the bridge may close the link.
    - ``post(node_id, data) -> bool``: queue ``data`` (one encoded message, at most
      MAX_MESSAGE_BYTES) on the link to ``node_id``, in order; False if there is no link.

    And it calls the transport, from any thread (they only queue and wake pysyncobj):
    ``deliver(node_id, data)`` for every message received, in order;
    ``link_up(node_id, readonly)`` when a link is up (``readonly`` for a follower that
    connected as "ro:<name>"); ``link_down(node_id)`` when it is gone. A link_up for a link
    already up is taken as a new link (the peer may have restarted).
    """

    def attach(self, transport: RaftTransport) -> None: ...

    def detach(self, transport: RaftTransport) -> None: ...

    def want(self, node_id: str) -> None: ...

    def unwant(self, node_id: str) -> None: ...

    def post(self, node_id: str, data: bytes) -> bool: ...


Event = tuple[str, str, Any]  # (kind, node id, data | readonly flag | reason)
OnRefused = Callable[[str, str], None]


class RaftTransport(Transport):  # type: ignore[misc]  # pysyncobj is untyped
    """pysyncobj's Transport over a :class:`Bridge`; see the module docstring.

    Everything but :meth:`deliver`, :meth:`link_up` and :meth:`link_down` runs on
    pysyncobj's tick thread (or, for ``addNode`` in ``__init__``, on the thread building the
    SyncObj before the tick thread starts); its node tables are touched only there.
    """

    def __init__(self, syncObj: Any, selfNode: Any, otherNodes: Iterable[Any], *,  # noqa: N803 (pysyncobj's names)
                 bridge: Bridge, on_refused: OnRefused | None = None,
                 before_send: Callable[[], None] | None = None) -> None:
        super().__init__(syncObj, selfNode, otherNodes)
        self._bridge, self._on_refused, self._before_send = bridge, on_refused, before_send
        self.self_id: str | None = None if selfNode is None else str(selfNode.id)
        self._voters: dict[str, Any] = {}  # node id -> pysyncobj's TCPNode
        self._readonly: dict[str, Node] = {}  # linked read-only followers (voters only)
        self._linked: set[str] = set()  # ids whose link is up, as the tick thread has seen it
        self._snapshot_open: set[str] = set()  # senders whose snapshot stream began on this link
        self._logged: set[tuple[str, str]] = set()
        self.refused = 0  # messages dropped (counted on the tick thread)
        self._lock = threading.Lock()  # guards the fields below (shared with the bridge's thread)
        self._events: list[Event] = []
        self._queued_bytes = 0
        self._wake_pending = False
        self._closed = False
        self._poller = syncObj._poller  # created by SyncObj before its transport
        self._notifier = PipeNotifier(self._poller, self._drain)  # wakes the tick thread's poll
        for node in otherNodes:
            self.addNode(node)
        bridge.attach(self)

    # -- called by the bridge (any thread) ------------------------------------------------

    def deliver(self, node_id: str, data: bytes) -> None:
        """A message from ``node_id``; decoded and screened later on the tick thread."""
        size = len(data)
        if size > MAX_MESSAGE_BYTES:
            self._push(("refuse", node_id, f"message of {size} bytes exceeds {MAX_MESSAGE_BYTES}"), 0)
        else:
            self._push(("msg", node_id, bytes(data)), size)

    def link_up(self, node_id: str, readonly: bool = False) -> None:
        self._push(("up", node_id, bool(readonly)), 0)

    def link_down(self, node_id: str) -> None:
        self._push(("down", node_id, None), 0)

    def _push(self, event: Event, size: int) -> None:
        with self._lock:
            if self._closed:
                return
            if size and self._queued_bytes + size > MAX_QUEUED_BYTES:
                event, size = ("refuse", event[1], "the Raft thread is behind (queue full)"), 0
            self._events.append(event)
            self._queued_bytes += size
            wake, self._wake_pending = not self._wake_pending, True
            if wake:  # under the lock: destroy() closes the pipe under it too
                self._notifier.notify()

    # -- the tick thread ------------------------------------------------------------------

    def _drain(self) -> None:
        """PipeNotifier's callback, inside the tick thread's poll: handle every queued event."""
        with self._lock:
            events, self._events = self._events, []
            self._queued_bytes, self._wake_pending = 0, False
        for kind, node_id, data in events:
            try:
                _HANDLERS[kind](self, node_id, data)
            except Exception:  # a pysyncobj callback raised: log it, go on with the others
                log.exception("raft event %s from %s failed", kind, node_id)

    def _on_msg(self, node_id: str, data: bytes) -> None:
        node, readonly = self._sender(node_id)
        if node is None:
            self._refused(node_id, "not a voter nor a linked read-only follower")
            return
        try:
            msg = decode_message(data)
        except ProtocolError as exc:
            self._refused(node_id, str(exc))
            return
        if readonly and msg["type"] != "next_node_idx":
            self._refused(node_id, f"{msg['type']} from a read-only follower")
        elif not self._snapshot_in_order(node_id, msg):
            self._refused(node_id, "snapshot chunk without the start of its stream on this link")
        else:
            self._onMessageReceived(node, msg)

    def _sender(self, node_id: str) -> tuple[Any, bool]:
        if node_id in self._voters:
            return self._voters[node_id], False
        return self._readonly.get(node_id), True

    def _snapshot_in_order(self, node_id: str, msg: dict[str, Any]) -> bool:
        """pysyncobj appends snapshot chunks blindly; a stream must start on this link."""
        chunk = msg.get("serialized")
        if chunk is None:
            return True
        if chunk[1]:
            self._snapshot_open.add(node_id)
        elif node_id not in self._snapshot_open:
            return False
        if chunk[2]:
            self._snapshot_open.discard(node_id)
        return True

    def _on_up(self, node_id: str, readonly: bool) -> None:
        if node_id.startswith(RO_PREFIX) != readonly or (readonly and self.self_id is None):
            self._refused(node_id, "link of the wrong kind (read-only ids start with 'ro:'; workers take none)")
            return
        self._on_down(node_id, None)  # a new link replaces an old one
        self._linked.add(node_id)
        if readonly:
            node = self._readonly[node_id] = Node(node_id)
            self._onReadonlyNodeConnected(node)
        elif node_id in self._voters:
            self._onNodeConnected(self._voters[node_id])

    def _on_down(self, node_id: str, _data: Any) -> None:
        self._snapshot_open.discard(node_id)
        if node_id not in self._linked:
            return
        self._linked.discard(node_id)
        if node_id in self._readonly:
            self._onReadonlyNodeDisconnected(self._readonly.pop(node_id))
        elif node_id in self._voters:
            self._onNodeDisconnected(self._voters[node_id])

    def _name(self) -> str:
        return self.self_id or "this read-only follower"

    def _refused(self, node_id: str, reason: str) -> None:
        self.refused += 1
        key = (node_id, reason[:80])
        if key not in self._logged and len(self._logged) < 1000:
            self._logged.add(key)
            log.warning("dropped a Raft message from %s to %s: %s", node_id, self._name(), reason)
        else:
            log.debug("dropped a Raft message from %s to %s: %s", node_id, self._name(), reason)
        if self._on_refused is not None:
            try:
                self._on_refused(node_id, reason)
            except Exception:  # pragma: no cover - never raise into pysyncobj
                log.exception("on_refused failed")

    # -- pysyncobj's Transport API (tick thread) ------------------------------------------

    def send(self, node: Any, message: Any) -> bool:
        """Encode and post; False when there is no link (pysyncobj retries by itself)."""
        node_id = str(node.id)
        if node_id not in self._linked:
            return False
        try:
            data = encode_message(message)
        except ProtocolError as exc:
            log.warning("not sending a Raft message to %s: %s", node_id, exc)
            return False
        if self._before_send is not None:
            try:
                self._before_send()
            except Exception:
                log.exception("before_send failed: not sending to %s", node_id)
                return False
        return bool(self._bridge.post(node_id, data))

    def addNode(self, node: Any) -> None:  # noqa: N802 (pysyncobj's name)
        node_id = str(node.id)
        self._voters[node_id] = node
        self._bridge.want(node_id)
        if node_id in self._linked:
            self._onNodeConnected(node)

    def dropNode(self, node: Any) -> None:  # noqa: N802
        node_id = str(node.id)
        if self._voters.pop(node_id, None) is None:
            return
        self._bridge.unwant(node_id)
        if node_id in self._linked:
            self._onNodeDisconnected(node)

    @property
    def ready(self) -> bool:
        return True

    def tryGetReady(self) -> None:  # noqa: N802
        """Always ready: the bridge listens on pdp's own port."""

    def waitReady(self) -> None:  # noqa: N802
        """Always ready."""

    def destroy(self) -> None:
        """pysyncobj's _doDestroy (tick thread): stop taking events, close the wake-up pipe."""
        with self._lock:
            if self._closed:
                return
            self._closed, self._events = True, []
            close_notifier(self._notifier, self._poller)
        self._bridge.detach(self)
        for name in ("MessageReceived", "NodeConnected", "NodeDisconnected", "ReadonlyNodeConnected",
                     "ReadonlyNodeDisconnected"):
            setattr(self, f"_on{name}Callback", None)

    def voter_ids(self) -> list[str]:
        """The voters this transport serves (tick thread's view)."""
        return sorted(self._voters)


_HANDLERS: dict[str, Callable[[RaftTransport, str, Any], None]] = {
    "msg": RaftTransport._on_msg,
    "up": RaftTransport._on_up,
    "down": RaftTransport._on_down,
    "refuse": RaftTransport._refused,
}


def close_notifier(notifier: PipeNotifier, poller: Any) -> None:
    """PipeNotifier has no close(): unsubscribe and close its pipe (pysyncobj internals).
    Only once nothing polls or notifies it any more."""
    read_fd, write_fd = notifier._PipeNotifier__pipeR, notifier._PipeNotifier__pipeW
    poller.unsubscribe(read_fd)
    for fd in (read_fd, write_fd):
        try:
            os.close(fd)
        except OSError:  # pragma: no cover
            pass


def make_transport_class(bridge: Bridge, on_refused: OnRefused | None = None,
                         before_send: Callable[[], None] | None = None) -> type[RaftTransport]:
    """A Transport class for ``SyncObj(..., transportClass=...)`` bound to ``bridge``.

    ``on_refused(node_id, reason)`` runs on the tick thread for every dropped message (the
    bridge may close a misbehaving link). ``before_send()`` runs on the tick thread before
    every message leaves (a durable journal fsyncs there, so no acknowledgement leaves
    before the entries it acknowledges are on disk); if it raises, the message is not sent.
    """

    class BoundRaftTransport(RaftTransport):
        def __init__(self, syncObj: Any, selfNode: Any, otherNodes: Iterable[Any]) -> None:  # noqa: N803
            super().__init__(syncObj, selfNode, otherNodes, bridge=bridge, on_refused=on_refused,
                             before_send=before_send)

    return BoundRaftTransport
