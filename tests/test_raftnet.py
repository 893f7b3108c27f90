"""Tests for pdp.raft.raftnet: the msgpack codec, the log-entry screen and the Transport.

The cluster tests run real pysyncobj instances (through :class:`pdp.raft.consensus.Consensus`) in
one process, wired by :class:`Hub`, an in-memory bridge: ``post`` queues the bytes and one
"network" thread hands them to the receiving transport's ``deliver``, as the asyncio side
would. The attacks are delivered the same way, as an authenticated peer would send them.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import pickle
import queue
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import msgpack
import pytest
from pysyncobj.node import TCPNode

from pdp.raft import raftnet
from pdp.raft.consensus import CommandRefused, Consensus, ConsensusError, RaftTuning
from pdp.errors import ProtocolError
from pdp.raft.raftnet import (MAX_COMMAND_BYTES, MEMBERSHIP, NO_OP, REGULAR, VERSION, RaftTransport, decode_message,
                         encode_message, pack_command, plain_command, screen_command)
from pdp.core.statecodec import state_to_plain

# -- the in-memory bridge -----------------------------------------------------------------


class Hub:
    """An in-memory network of bridges. A link between two ids is up while both transports
    are attached, one of them wants the other and the pair is not cut; link events and
    messages go through one delivery thread, in order."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.transports: dict[str, RaftTransport] = {}
        self.wants: dict[str, set[str]] = {}
        self.cut: set[frozenset[str]] = set()
        self.up: set[frozenset[str]] = set()
        self.snapshot_chunks: dict[str, int] = {}  # receiver -> 'serialized' chunks with data
        self.delivered = 0
        self.queue: queue.SimpleQueue[tuple[str, str, str, Any] | None] = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def endpoint(self, node_id: str) -> Endpoint:
        return Endpoint(self, node_id)

    def _links(self) -> set[frozenset[str]]:
        return {frozenset((a, b)) for a, wanted in self.wants.items() for b in wanted
                if a in self.transports and b in self.transports and frozenset((a, b)) not in self.cut}

    def recompute(self) -> None:
        with self.lock:
            links = self._links()
            for pair in links - self.up:
                a, b = sorted(pair)
                self.queue.put(("up", a, b, None))
                self.queue.put(("up", b, a, None))
            for pair in self.up - links:
                a, b = sorted(pair)
                self.queue.put(("down", a, b, None))
                self.queue.put(("down", b, a, None))
            self.up = links

    def post(self, src: str, dst: str, data: bytes) -> bool:
        with self.lock:
            if frozenset((src, dst)) not in self.up:
                return False
            self.queue.put(("msg", dst, src, data))
            return True

    def set_cut(self, a: str, b: str, cut: bool) -> None:
        with self.lock:
            (self.cut.add if cut else self.cut.discard)(frozenset((a, b)))
        self.recompute()

    def isolate(self, node_id: str, cut: bool = True) -> None:
        for other in list(self.wants):
            if other != node_id:
                self.set_cut(node_id, other, cut)

    def _run(self) -> None:
        while (item := self.queue.get()) is not None:
            kind, at, peer, data = item
            with self.lock:
                transport = self.transports.get(at)
            if transport is None:
                continue
            if kind == "msg":
                self._count(at, data)
                transport.deliver(peer, data)
            elif kind == "up":
                transport.link_up(peer, readonly=peer.startswith("ro:"))
            else:
                transport.link_down(peer)

    def _count(self, at: str, data: bytes) -> None:
        self.delivered += 1
        msg = msgpack.unpackb(data)
        if isinstance(msg, dict) and msg.get("serialized"):
            self.snapshot_chunks[at] = self.snapshot_chunks.get(at, 0) + 1

    def stop(self) -> None:
        self.queue.put(None)
        self.thread.join(5)


class Endpoint:
    """One member's bridge (implements pdp.raft.raftnet.Bridge)."""

    def __init__(self, hub: Hub, node_id: str) -> None:
        self.hub, self.node_id = hub, node_id
        with hub.lock:
            hub.wants.setdefault(node_id, set())

    def attach(self, transport: RaftTransport) -> None:
        with self.hub.lock:
            self.hub.transports[self.node_id] = transport
        self.hub.recompute()

    def detach(self, transport: RaftTransport) -> None:
        with self.hub.lock:
            if self.hub.transports.get(self.node_id) is transport:
                del self.hub.transports[self.node_id]
            self.hub.wants[self.node_id] = set()
        self.hub.recompute()

    def want(self, node_id: str) -> None:
        with self.hub.lock:
            self.hub.wants[self.node_id].add(node_id)
        self.hub.recompute()

    def unwant(self, node_id: str) -> None:
        with self.hub.lock:
            self.hub.wants[self.node_id].discard(node_id)
        self.hub.recompute()

    def post(self, node_id: str, data: bytes) -> bool:
        return self.hub.post(self.node_id, node_id, data)


# -- a cluster of Consensus members -------------------------------------------------------

FAST = RaftTuning(election_min=0.3, election_max=0.6, fallback=1.0, connection_timeout=1.0)
VOTERS = ["127.0.0.1:7101", "127.0.0.1:7102", "127.0.0.1:7103"]


class Cluster:
    def __init__(self, tmp: Path, tuning: RaftTuning = FAST, workers: tuple[str, ...] = ()) -> None:
        self.hub = Hub()
        self.tmp, self.tuning = tmp, tuning
        self.members: dict[str, Consensus] = {}
        for node_id in VOTERS:
            self.start(node_id)
        for name in workers:
            self.start(f"ro:{name}")

    def start(self, node_id: str) -> Consensus:
        voter = not node_id.startswith("ro:")
        member = Consensus(node_id if voter else None, VOTERS, self.hub.endpoint(node_id),
                           self.tmp / node_id.replace(":", "_"), lambda: None, self.tuning)
        self.members[node_id] = member
        return member

    async def stop(self, node_id: str) -> None:
        await self.members.pop(node_id).aclose()

    async def close(self) -> None:
        for node_id in list(self.members):
            await self.stop(node_id)
        self.hub.stop()

    async def leader(self, timeout: float = 15.0, among: list[str] | None = None) -> Consensus:
        async def found() -> Consensus | None:
            leaders = [m for k, m in self.members.items() if m.is_leader() and (among is None or k in among)]
            return leaders[0] if len(leaders) == 1 else None
        return await wait_for(found, timeout, "a single leader")

    async def commit(self, cmd: dict[str, Any], timeout: float = 15.0) -> dict[str, Any]:
        """Propose on whoever leads, again if leadership moved (commands here are idempotent)."""
        deadline = time.monotonic() + timeout
        while True:
            leader = await self.leader(max(0.1, deadline - time.monotonic()))
            try:
                return await leader.propose(cmd)
            except ConsensusError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.05)

    def state(self, node_id: str) -> dict[str, Any]:
        with self.members[node_id].reading() as state:
            return state_to_plain(state)

    async def converged(self, node_ids: list[str] | None = None, timeout: float = 15.0) -> dict[str, Any]:
        ids = node_ids or list(self.members)

        async def same() -> dict[str, Any] | None:
            states = [self.state(k) for k in ids]
            return states[0] if all(s == states[0] for s in states) else None
        return await wait_for(same, timeout, f"equal states on {ids}")


async def wait_for(probe: Callable[[], Awaitable[Any]], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = await probe()
        if value is not None and value is not False:
            return value
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def run(scenario: Callable[[Cluster], Awaitable[None]], tmp: Path, **kwargs: Any) -> None:
    async def main() -> None:
        cluster = Cluster(tmp, **kwargs)
        try:
            await scenario(cluster)
        finally:
            await cluster.close()
    asyncio.run(main())


def member_cmd(name: str, k: int = 0) -> dict[str, Any]:
    return {"op": "member", "name": name, "data_addr": f"{name}:7001", "raft_addr": f"{name}:7001", "cpus": k,
            "now": float(k)}


def sid(member: Consensus) -> str:
    """A voter's id."""
    assert member.self_addr is not None
    return member.self_addr


def journal(member: Consensus) -> list[tuple[bytes, int, int]]:
    """The member's Raft log (test-only peek at pysyncobj's journal)."""
    log_ = member._sync._SyncObj__raftLog  # type: ignore[attr-defined]
    return [log_[k] for k in range(len(log_))]


def send_as(cluster: Cluster, sender: str, target: str, msg: Any) -> None:
    """Deliver ``msg`` (a dict packed with msgpack, or raw bytes) to ``target`` as from ``sender``."""
    data = msg if isinstance(msg, bytes) else msgpack.packb(msg, use_bin_type=True)
    cluster.members[target].transport.deliver(sender, data)


# -- the codec ----------------------------------------------------------------------------

ENTRY = pack_command({"op": "member", "name": "n1"})
GOOD_MESSAGES: list[dict[str, Any]] = [
    {"type": "request_vote", "term": 3, "last_log_index": 10, "last_log_term": 2},
    {"type": "response_vote", "term": 3},
    {"type": "append_entries", "term": 3, "commit_index": 9, "prevLogIdx": 10, "prevLogTerm": 2,
     "entries": [(ENTRY, 11, 3), (bytes([NO_OP]), 12, 3)]},
    {"type": "append_entries", "term": 3, "commit_index": 9, "prevLogIdx": 10, "prevLogTerm": 2, "entries": []},
    {"type": "append_entries", "term": 3, "commit_index": 9, "serialized": (b"chunk", True, False)},
    {"type": "append_entries", "term": 3, "commit_index": 9, "serialized": (b"", False, True)},
    {"type": "append_entries", "term": 3, "commit_index": 9, "serialized": None},
    {"type": "next_node_idx", "next_node_idx": 12, "reset": False, "success": True},
    {"type": "timeout_now", "term": 4},
]


@pytest.mark.parametrize("msg", GOOD_MESSAGES, ids=lambda m: f"{m['type']}-{sorted(m)[1]}")
def test_codec_round_trip(msg: dict[str, Any]) -> None:
    out = decode_message(encode_message(msg))
    assert out == msg
    for entry in out.get("entries", []):
        assert type(entry) is tuple  # pysyncobj compares entries with tuples
    if out.get("serialized") is not None:
        assert type(out["serialized"]) is tuple


class Evil:
    """Unpickling this runs a shell command (the attack pysyncobj's own transport allows)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> Any:
        return os.system, (f"touch {self.marker}",)


def _evil(marker: Path = Path("/tmp/pdp-raftnet-pwned")) -> bytes:
    return bytes([REGULAR]) + pickle.dumps((0, (Evil(marker),)), 2)


def _append(entries: list[Any], **extra: Any) -> dict[str, Any]:
    return {"type": "append_entries", "term": 3, "commit_index": 9, "prevLogIdx": 10, "prevLogTerm": 2,
            "entries": entries, **extra}


BAD_MESSAGES: list[tuple[str, Any]] = [
    ("garbage", b"\xc1\x00garbage"),
    ("not a map", [1, 2]),
    ("unknown type", {"type": "status"}),
    ("apply_command", {"type": "apply_command", "command": ENTRY, "request_id": 1}),
    ("apply_command_response", {"type": "apply_command_response", "request_id": 1, "log_idx": 3, "log_term": 1}),
    ("transmission", {"type": "append_entries", "transmission": "start", "data": b"x", "term": 3,
                      "commit_index": 1, "prevLogIdx": 1, "prevLogTerm": 1}),
    ("extra field", {"type": "response_vote", "term": 3, "x": 1}),
    ("missing field", {"type": "request_vote", "term": 3, "last_log_index": 1}),
    ("bool as int", {"type": "response_vote", "term": True}),
    ("negative", {"type": "response_vote", "term": -1}),
    ("huge int", {"type": "response_vote", "term": 2**63}),
    ("float", {"type": "response_vote", "term": 1.0}),
    ("int as bool", {"type": "next_node_idx", "next_node_idx": 1, "reset": 0, "success": 1}),
    ("ext type", {"type": "response_vote", "term": msgpack.ExtType(5, b"x")}),
    ("evil entry", _append([[_evil(), 11, 3]])),
    ("entry of wrong shape", _append([[ENTRY, 11]])),
    ("entry index gap", _append([[ENTRY, 12, 3]])),
    ("entry from the future", _append([[ENTRY, 11, 4]])),
    ("entries without prevLogIdx", _append([[ENTRY, 11, 3]], prevLogIdx=None)),
    ("str entry", _append([["text", 11, 3]])),
    ("snapshot False", {"type": "append_entries", "term": 3, "commit_index": 9, "serialized": False}),
    ("snapshot of wrong shape", {"type": "append_entries", "term": 3, "commit_index": 9, "serialized": [b"x", 1, 0]}),
    ("both", {**_append([]), "serialized": None}),
]


@pytest.mark.parametrize("msg", [m for _, m in BAD_MESSAGES], ids=[k for k, _ in BAD_MESSAGES])
def test_decode_refuses(msg: Any) -> None:
    data = msg if isinstance(msg, bytes) else msgpack.packb(msg, use_bin_type=True)
    with pytest.raises(ProtocolError):
        decode_message(data)


def test_decode_refuses_trailing_data_and_oversize() -> None:
    good = encode_message(GOOD_MESSAGES[1])
    with pytest.raises(ProtocolError):
        decode_message(good + good)
    with pytest.raises(ProtocolError):
        decode_message(b"\x00" * (raftnet.MAX_MESSAGE_BYTES + 1))


def test_encode_refuses_what_is_never_sent() -> None:
    for msg in ({"type": "apply_command", "command": ENTRY}, {"type": "status"},
                {"type": "append_entries", "transmission": "start", "data": b"x", "term": 1, "commit_index": 1,
                 "prevLogIdx": 1, "prevLogTerm": 1}):
        with pytest.raises(ProtocolError):
            encode_message(msg)


# -- the screen ---------------------------------------------------------------------------


def test_screen_accepts_what_pysyncobj_writes() -> None:
    import pysyncobj.pickle as psy_pickle  # pysyncobj's own dumps (protocol 2)

    cmd = {"op": "batch", "cmds": [{"op": "x", "n": -5, "big": 2**62, "f": 1.5, "b": True, "none": None,
                                    "l": [1, "a", [], {}], "s": "héllo ✓"}]}
    entry = pack_command(plain_command(cmd))
    assert entry == bytes([REGULAR]) + psy_pickle.dumps((0, (cmd,)))  # exactly what @replicated writes
    screen_command(entry)
    node = TCPNode("10.1.2.3:7700")
    for action in ("add", "rem"):
        screen_command(bytes([MEMBERSHIP]) + psy_pickle.dumps([action, node.id, node]))
    screen_command(bytes([NO_OP]))
    screen_command(bytes([VERSION]) + psy_pickle.dumps(0))


def _regular(value: Any, protocol: int = 2) -> bytes:
    return bytes([REGULAR]) + pickle.dumps(value, protocol)


class NotTCPNode(TCPNode):
    pass


NODE = TCPNode("10.1.2.3:7700")
BAD_COMMANDS: list[tuple[str, bytes]] = [
    ("os.system", _evil()),
    ("os.system membership", bytes([MEMBERSHIP]) + pickle.dumps(["add", NODE.id, Evil(Path("/tmp/x"))], 2)),
    ("os.system version", bytes([VERSION]) + pickle.dumps(Evil(Path("/tmp/x")), 2)),
    ("bytes inside", _regular((0, ({"a": b"x"},)))),
    ("set inside", _regular((0, ({"a": {1}},)))),
    ("tuple inside", _regular((0, ({"a": (1, 2)},)))),
    ("int key", _regular((0, ({1: "a"},)))),
    ("huge int", _regular((0, ({"a": 2**70},)))),
    ("lone surrogate", _regular((0, ({"a": "\ud800"},)))),
    ("shared list", _regular((0, ({"a": (shared := [1]), "b": shared},)))),
    ("unknown method id", _regular((7, ({"op": "x"},)))),
    ("kwargs", _regular((0, ({"op": "x"},), {"x": 1}))),
    ("two args", _regular((0, ({"op": "x"}, {})))),
    ("not a dict", _regular((0, ("x",)))),
    ("bare id", _regular(0)),
    ("protocol 4", _regular((0, ({"op": "x"},)), 4)),
    ("protocol 0", _regular((0, ({"op": "x"},)), 0)),
    ("trailing data", _regular((0, ({"op": "x"},))) + b"N."),
    ("truncated", _regular((0, ({"op": "x"},)))[:-3]),
    ("unhashable key", bytes([REGULAR]) + b"\x80\x02K\x00}(]]u\x85\x86."),
    ("odd setitems", bytes([REGULAR]) + b"\x80\x02K\x00}(X\x01\x00\x00\x00au\x85\x86."),
    ("append below mark", bytes([REGULAR]) + b"\x80\x02K\x00](Na\x85\x86."),
    ("setitem below mark", bytes([REGULAR]) + b"\x80\x02K\x00}(NNs\x85\x86."),
    ("get of a missing memo", bytes([REGULAR]) + b"\x80\x02K\x00h\x05\x85\x86."),
    ("no-op with payload", bytes([NO_OP]) + b"x"),
    ("version 1", bytes([VERSION]) + pickle.dumps(1, 2)),
    ("unknown type", bytes([9]) + pickle.dumps(0, 2)),
    ("empty", b""),
    ("membership of a subclass", bytes([MEMBERSHIP]) + pickle.dumps(["add", "a:1", NotTCPNode("a:1")], 2)),
    ("membership id mismatch", bytes([MEMBERSHIP]) + pickle.dumps(["add", "b:1", TCPNode("a:1")], 2)),
    ("membership bad action", bytes([MEMBERSHIP]) + pickle.dumps(["own", NODE.id, NODE], 2)),
    ("membership read-only id", bytes([MEMBERSHIP]) + pickle.dumps(["add", "ro:x:1", TCPNode("ro:x:1")], 2)),
    ("membership extra attribute", bytes([MEMBERSHIP]) + pickle.dumps(["add", "a:1", TCPNode("a:1", x=1)], 2)),
    ("node in a regular entry", _regular((0, ({"n": NODE},)))),
    ("too big", _regular((0, ({"a": "x" * MAX_COMMAND_BYTES},)))),
]


@pytest.mark.parametrize("command", [c for _, c in BAD_COMMANDS], ids=[k for k, _ in BAD_COMMANDS])
def test_screen_refuses(command: bytes) -> None:
    with pytest.raises(ProtocolError):
        screen_command(command)


def test_screen_refusals_are_what_pickle_would_also_refuse_or_run() -> None:
    """The hand-made malformed pickles above really are malformed for pickle too."""
    for name in ("unhashable key", "odd setitems", "append below mark", "setitem below mark", "get of a missing memo"):
        with pytest.raises(Exception):
            pickle.loads(dict(BAD_COMMANDS)[name][1:])


def test_plain_command_normalizes_and_refuses() -> None:
    assert plain_command({"op": "x", "t": (1, (2, 3))}) == {"op": "x", "t": [1, [2, 3]]}
    shared = [1]
    out = plain_command({"a": shared, "b": shared})
    assert out == {"a": [1], "b": [1]} and out["a"] is not out["b"]
    for bad in ({"a": b"x"}, {1: "a"}, {"a": {1, 2}}, {"a": 2**64}, {"a": "\ud800"}, ["op"], {"a": object()}):
        with pytest.raises(ProtocolError):
            pack_command(plain_command(bad))
    with pytest.raises(ProtocolError, match="exceeds"):
        pack_command(plain_command({"a": "x" * MAX_COMMAND_BYTES}))
    with pytest.raises(ProtocolError, match="nested"):
        plain_command(_nested(raftnet.MAX_DEPTH - raftnet.BATCH_LEVELS + 1))


def _nested(depth: int) -> dict[str, Any]:
    """A command whose values nest ``depth`` levels below it."""
    value: dict[str, Any] = {}
    for _ in range(depth - 1):
        value = {"a": value}
    return {"op": "x", "a": value}


def test_deepest_command_also_passes_in_a_batch() -> None:
    deepest = plain_command(_nested(raftnet.MAX_DEPTH - raftnet.BATCH_LEVELS))
    pack_command(deepest)
    pack_command({"op": "batch", "cmds": [deepest, plain_command({"op": "y"})]})  # screened as followers do


def test_screen_speed() -> None:
    """A full batch entry (200 small commands) screens in a few ms (printed with -s)."""
    batch = {"op": "batch", "cmds": [{"op": "assign", "job": "wordcount-20261128-043012-88a388", "phase": "map",
                                      "index": k, "node": "n1", "term": 3, "lease_until": 123.5}
                                     for k in range(200)]}
    entry = pack_command(plain_command(batch))
    start = time.perf_counter()
    for _ in range(10):
        screen_command(entry)
    per = (time.perf_counter() - start) / 10
    print(f"screen: {len(entry)} B batch entry in {per * 1000:.2f} ms")
    assert per < 0.5


# -- clusters -----------------------------------------------------------------------------


def test_three_voters_elect_a_leader_and_commit(tmp_path: Path) -> None:
    async def scenario(c: Cluster) -> None:
        leader = await c.leader()
        for k in range(20):
            assert await c.commit(member_cmd(f"n{k}", k)) == {"ok": True}
        state = await c.converged()
        assert sorted(state["members"]) == sorted(f"n{k}" for k in range(20))
        leader = await c.leader()
        assert {m.leader_id() for m in c.members.values()} == {leader.self_addr}
        assert all(m.raft_status()["refused"] == 0 for m in c.members.values())
        assert all(m.raft_status()["diverged"] == 0 for m in c.members.values())
    run(scenario, tmp_path)


def test_commit_rate_through_the_bridge(tmp_path: Path) -> None:
    """Printed with -s: sequential commits, and many in flight (group commit)."""
    async def scenario(c: Cluster) -> None:
        leader = await c.leader()
        n = 300
        start = time.perf_counter()
        for k in range(n):
            await leader.propose(member_cmd(f"s{k}", k))
        seq = n / (time.perf_counter() - start)
        start = time.perf_counter()
        m = 3000
        results = await asyncio.gather(*(leader.propose(member_cmd(f"p{k}", k), timeout=30) for k in range(m)))
        par = m / (time.perf_counter() - start)
        assert all(r == {"ok": True} for r in results)
        await c.converged(timeout=30)
        print(f"commits/s through the in-memory bridge: {seq:.0f} one at a time, {par:.0f} with {m} in flight")
        assert all(mem.raft_status()["truncations"] == 0 for mem in c.members.values())
    run(scenario, tmp_path)


def test_propose_refuses_commands_that_cannot_travel(tmp_path: Path) -> None:
    async def scenario(c: Cluster) -> None:
        leader = await c.leader()
        before = leader.raft_status()["log_len"]
        bads: list[Any] = [{"op": "member", "blob": b"x"}, {"op": "member", 3: "x"},
                           {"op": "x", "a": "y" * MAX_COMMAND_BYTES}, {"op": "x", "s": {1}}]
        for bad in bads:
            with pytest.raises(CommandRefused, match="cannot go through Raft"):
                await leader.propose(bad)
        assert leader.raft_status()["log_len"] == before
        follower = next(m for m in c.members.values() if m is not leader)
        with pytest.raises(ConsensusError, match="not the Raft leader"):
            await follower.propose(member_cmd("x"))
        with pytest.raises(CommandRefused):
            await leader.change_membership("add", "no-port")
    run(scenario, tmp_path)


def test_unlinked_and_killed_followers_catch_up(tmp_path: Path) -> None:
    async def scenario(c: Cluster) -> None:
        leader = await c.leader()
        cut, killed = [k for k in c.members if c.members[k] is not leader]
        c.hub.isolate(cut)
        await c.stop(killed)  # the leader alone is no majority: restart it on its data dir
        c.start(killed)
        pair = [sid(leader), killed]
        await c.leader(among=pair)
        for k in range(30):
            await c.commit(member_cmd(f"n{k}", k))
        await c.converged(pair)
        c.hub.isolate(cut, cut=False)
        state = await c.converged()
        assert len(state["members"]) == 30
    run(scenario, tmp_path)


def test_read_only_follower_follows_the_log(tmp_path: Path) -> None:
    async def scenario(c: Cluster) -> None:
        leader = await c.leader()
        for k in range(10):
            await c.commit(member_cmd(f"n{k}", k))
        state = await c.converged()
        worker = c.members["ro:w1"]
        assert worker.self_addr is None and not worker.is_leader()
        assert worker.leader_id() == leader.self_addr
        assert len(state["members"]) == 10
        assert (tmp_path / "ro_w1" / "raft.journal").exists() is False  # a worker's log is in memory
    run(scenario, tmp_path, workers=("w1",))


SNAP = RaftTuning(election_min=0.3, election_max=0.6, fallback=1.0, connection_timeout=1.0,
                  compaction_entries=20, snapshot_chunk=512)


def test_snapshot_reaches_lagging_follower_and_worker(tmp_path: Path) -> None:
    async def scenario(c: Cluster) -> None:
        leader = await c.leader()
        lagging = next(k for k in VOTERS if c.members[k] is not leader)
        c.hub.isolate(lagging)
        c.hub.isolate("ro:w1")
        for k in range(120):
            await c.commit(member_cmd(f"n{k}", k))
        leader = await c.leader()
        first_idx = await wait_for(lambda: _compacted(leader), 15, "log compaction on the leader")
        assert journal(c.members[lagging])[-1][1] < first_idx  # only a snapshot can catch it up
        c.hub.isolate(lagging, cut=False)
        c.hub.isolate("ro:w1", cut=False)
        state = await c.converged()
        assert len(state["members"]) == 120
        assert c.hub.snapshot_chunks.get(lagging, 0) > 1  # the dump went in several 'serialized' chunks
        assert c.hub.snapshot_chunks.get("ro:w1", 0) > 1
        await c.commit(member_cmd("after", 1))  # and the log goes on from the snapshot
        state = await c.converged()
        assert "after" in state["members"]
        assert all(m.raft_status()["refused"] == 0 for m in c.members.values())
    run(scenario, tmp_path, tuning=SNAP, workers=("w1",))


async def _compacted(member: Consensus) -> int | None:
    first = journal(member)[0][1]
    return first if first > 50 else None


def test_voter_restarts_from_its_dump_and_journal(tmp_path: Path) -> None:
    async def scenario(c: Cluster) -> None:
        leader = await c.leader()
        for k in range(60):
            await c.commit(member_cmd(f"n{k}", k))
        before = await c.converged()
        victim = next(k for k in VOTERS if c.members[k] is not leader)
        await wait_for(lambda: _compacted_any(c.members[victim]), 15, "a dump on the follower")
        await c.stop(victim)
        restarted = c.start(victim)
        await wait_for(lambda: _has(restarted, before), 15, "the restarted member's state")
    run(scenario, tmp_path, tuning=SNAP)


async def _compacted_any(member: Consensus) -> bool:
    return journal(member)[0][1] > 1


async def _has(member: Consensus, plain: dict[str, Any]) -> bool:
    with member.reading() as state:
        return state_to_plain(state) == plain


async def _change(c: Cluster, action: str, addr: str) -> None:
    """A membership change, asked again while pysyncobj denies it because the previous one is
    still being applied (it allows one at a time; under load that takes a moment)."""
    for attempt in range(20):
        leader = await c.leader(among=VOTERS)
        try:
            await leader.change_membership(action, addr)
            return
        except ConsensusError as exc:
            if "request_denied" not in str(exc) or attempt == 19:
                raise
            await asyncio.sleep(0.25)


def test_membership_change_passes_the_screen(tmp_path: Path) -> None:
    """Real MEMBERSHIP entries (pickled TCPNode) reach every follower and the worker."""
    async def scenario(c: Cluster) -> None:
        new = "127.0.0.1:7104"
        await _change(c, "add", new)
        member = Consensus(new, VOTERS + [new], c.hub.endpoint(new), c.tmp / "new", lambda: None, c.tuning)
        c.members[new] = member
        await c.commit(member_cmd("n1"))
        await c.converged()
        assert all(m.voters() == sorted(VOTERS + [new]) for k, m in c.members.items() if not k.startswith("ro:"))
        assert all(m.raft_status()["refused"] == 0 for m in c.members.values())
        await _change(c, "rem", new)
        await c.commit(member_cmd("n2"))
        await c.converged([k for k in c.members if k != new])  # the removed member never hears of it
        leader = await c.leader(among=VOTERS)
        assert leader.voters() == VOTERS
        refused = {k: m.raft_status()["refused"] for k, m in c.members.items() if k != new}
        await asyncio.sleep(1.5)  # the removed member stands for election: nobody listens any more
        assert all(m.voters() == VOTERS for k, m in c.members.items() if k not in (new, "ro:w1"))
        assert all(c.members[k].raft_status()["refused"] >= n for k, n in refused.items())
    run(scenario, tmp_path, workers=("w1",))


# -- attacks ------------------------------------------------------------------------------


def _evil_entries(marker: Path) -> list[tuple[str, bytes]]:
    node = TCPNode("127.0.0.1:7109")
    return [
        ("regular", bytes([REGULAR]) + pickle.dumps((0, (Evil(marker),)), 2)),
        ("membership", bytes([MEMBERSHIP]) + pickle.dumps(["add", node.id, Evil(marker)], 2)),
        ("version", bytes([VERSION]) + pickle.dumps(Evil(marker), 2)),
        ("no-op", bytes([NO_OP]) + pickle.dumps(Evil(marker), 2)),
    ]


def test_malicious_entries_never_run(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A peer holding the party's credentials sends append_entries whose entry unpickles to
    os.system: the follower refuses the message, runs nothing, and its log is unchanged."""
    caplog.set_level(logging.WARNING)
    marker = tmp_path / "pwned"

    async def scenario(c: Cluster) -> None:
        leader = await c.leader()
        await c.commit(member_cmd("n0"))
        await c.converged()
        fid = next(k for k in VOTERS if c.members[k] is not leader)
        follower = c.members[fid]
        before, state_before = journal(follower), c.state(fid)
        _, last_idx, last_term = before[-1]
        for name, entry in _evil_entries(marker):
            msg = {"type": "append_entries", "term": follower.term(), "commit_index": last_idx,
                   "prevLogIdx": last_idx, "prevLogTerm": last_term, "entries": [[entry, last_idx + 1, last_term]]}
            with pytest.raises(ProtocolError):
                decode_message(msgpack.packb(msg))
            refused = follower.raft_status()["refused"]
            send_as(c, sid(leader), fid, msg)
            await wait_for(functools.partial(_more, follower, refused), 5, f"the {name} entry refused")
        await asyncio.sleep(0.3)
        assert not marker.exists()
        assert journal(follower) == before and c.state(fid) == state_before
        await c.commit(member_cmd("n1"))  # the party goes on
        assert "n1" in (await c.converged())["members"]
    run(scenario, tmp_path)
    assert not marker.exists()
    assert not [r for r in caplog.records if "failed _onTick" in r.getMessage()]


async def _more(member: Consensus, refused: int) -> bool:
    return member.raft_status()["refused"] > refused


def test_malicious_snapshot_never_runs(tmp_path: Path) -> None:
    """A snapshot chunk holding pysyncobj's own gzip+pickle dump format is never unpickled."""
    import gzip
    marker = tmp_path / "pwned"

    async def scenario(c: Cluster) -> None:
        leader = await c.leader()
        await c.commit(member_cmd("n0"))
        await c.converged()
        fid = next(k for k in VOTERS if c.members[k] is not leader)
        follower = c.members[fid]
        before, state_before = journal(follower), c.state(fid)
        payload = gzip.compress(pickle.dumps((None, (b"x", 1, 1), (b"x", 1, 1), set(), Evil(marker))))
        for chunk in ([payload, True, True], [pickle.dumps(Evil(marker)), True, True]):
            send_as(c, sid(leader), fid, {"type": "append_entries", "term": follower.term(),
                                                "commit_index": before[-1][1], "serialized": chunk})
        await asyncio.sleep(0.5)
        assert not marker.exists()
        assert journal(follower) == before and c.state(fid) == state_before
        await c.commit(member_cmd("n1"))
        assert "n1" in (await c.converged())["members"]
    run(scenario, tmp_path)


def test_hostile_messages_are_dropped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    marker = tmp_path / "pwned"

    async def scenario(c: Cluster) -> None:
        leader = await c.leader()
        await c.commit(member_cmd("n0"))
        await c.converged()
        lid, term = sid(leader), leader.term()
        fid = next(k for k in VOTERS if k != lid)
        heartbeat = {"type": "append_entries", "term": leader.term(), "commit_index": 1, "prevLogIdx": 1,
                     "prevLogTerm": 0, "entries": []}
        attacks: list[tuple[str, str, Any]] = [
            (fid, lid, os.urandom(200)),
            (fid, lid, b""),
            (lid, fid, {"type": "apply_command", "command": bytes([REGULAR]) + pickle.dumps(Evil(marker), 2)}),
            (fid, lid, {"type": "apply_command", "command": pack_command({"op": "member"}), "request_id": 7}),
            ("10.9.9.9:7700", fid, heartbeat),  # not a voter
            ("ro:w2", lid, {"type": "next_node_idx", "next_node_idx": 1, "reset": True, "success": False}),  # no link
            ("ro:w1", lid, {**heartbeat, "term": leader.term() + 5}),  # a worker acting as a leader
            ("ro:w1", lid, {"type": "request_vote", "term": 99, "last_log_index": 99, "last_log_term": 99}),
            (lid, fid, {"type": "append_entries", "transmission": "start", "data": pickle.dumps(Evil(marker)),
                        "term": leader.term(), "commit_index": 1, "prevLogIdx": 1, "prevLogTerm": 0}),
        ]
        for sender, target, msg in attacks:
            refused = c.members[target].raft_status()["refused"]
            send_as(c, sender, target, msg)
            await wait_for(functools.partial(_more, c.members[target], refused), 5, f"{msg!r:.60} dropped")
        c.members[fid].transport.deliver(lid, b"x" * (raftnet.MAX_MESSAGE_BYTES + 1))
        await asyncio.sleep(0.3)
        assert leader.is_leader() and leader.term() == term  # the forged votes and appends moved nothing
        await c.commit(member_cmd("n1"))
        assert "n1" in (await c.converged())["members"]
    run(scenario, tmp_path, workers=("w1",))
    assert not marker.exists()
    assert not [r for r in caplog.records if "failed _onTick" in r.getMessage()]
    dropped = [r.getMessage() for r in caplog.records if "dropped a Raft message" in r.getMessage()]
    assert any("not a voter" in m for m in dropped) and any("read-only" in m for m in dropped)
    assert any("apply_command" in m for m in dropped) and any("transmission" in m for m in dropped)


def test_old_pickle_dump_is_refused_and_a_worker_starts_clean(tmp_path: Path) -> None:
    import gzip

    from pdp.errors import ConfigError

    async def main() -> None:
        hub = Hub()
        try:
            voter_dir, worker_dir = tmp_path / "v", tmp_path / "w"
            for d in (voter_dir, worker_dir):
                d.mkdir()
                (d / "raft.dump").write_bytes(gzip.compress(pickle.dumps({"old": 1})))
            with pytest.raises(ConfigError, match="older pdp"):
                Consensus(VOTERS[0], VOTERS, hub.endpoint(VOTERS[0]), voter_dir, lambda: None, FAST)
            worker = Consensus(None, VOTERS, hub.endpoint("ro:w"), worker_dir, lambda: None, FAST)
            assert not (worker_dir / "raft.dump").exists()  # its log is in memory: it starts from the leader's
            await worker.aclose()
        finally:
            hub.stop()
    asyncio.run(main())
