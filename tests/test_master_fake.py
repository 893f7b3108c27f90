"""The master's fault handling in-process, over a fake network and a fake clock.

A real :class:`pdp.node.master.Master` runs against :class:`FakeNode` — the narrow
``MasterServices`` it is typed against, with the real replicated :class:`State` behind a
log that applies each command at once — and workers are scripted calls of its handlers.
The network between them can drop a report, deliver it late, cut a member off (connection
attempts time out) or lose its process (connections refused). Each test runs in
milliseconds what tests/test_chaos.py shows with real processes in tens of seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from pdp.config import NodeConfig
from pdp.core.state import State
from pdp.node import master as master_mod
from pdp.node.master import Master
from pdp.node.root import Changes

TERM, HB, DEAD = 2, 0.5, 2.5


class Clock:
    """Both of the master's clocks (monotonic and wall), moved only by the test."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now

    def time(self) -> float:
        return self.now


class FakeConsensus:
    """A one-member log: every proposal is applied at once, in order."""

    def __init__(self, state: State, term: int) -> None:
        self.state, self._term = state, term

    def is_leader(self) -> bool:
        return True

    def term(self) -> int:
        return self._term

    @contextlib.contextmanager
    def reading(self) -> Iterator[State]:
        yield self.state

    def voters(self) -> list[str]:
        return ["m1"]


class FakeChanges:
    seen = 0

    async def wait(self, timeout: float, since: int | None = None) -> None:
        await asyncio.sleep(0)


class FakeNode:
    """MasterServices over the fake log; the network is the ``refused``/``cut`` sets."""

    def __init__(self, state: State, term: int, tmp: Path) -> None:
        self.name = "m1"
        self.config = NodeConfig(name="m1", data_dir=tmp, heartbeat=HB, dead_after=DEAD, stall_after=30.0)
        self.consensus = FakeConsensus(state, term)
        self.changes = FakeChanges()
        self.peers = self.spool = self.party = None
        self.refused: set[str] = set()  # members whose process is gone
        self.log: list[dict[str, Any]] = []

    async def propose(self, cmd: dict[str, Any], timeout: float = 5.0) -> dict[str, Any]:
        self.log.append(cmd)
        return self.consensus.state.apply(cmd)


class Stream:
    """A worker's request stream: who it provably is, and what the master answered."""

    def __init__(self, name: str) -> None:
        self.conn = SimpleNamespace(who=SimpleNamespace(name=name))
        self.sent: list[dict[str, Any]] = []

    async def send(self, header: dict[str, Any], payload: bytes = b"") -> None:
        self.sent.append(header)


def party(tmp_path: Path, clock: Clock, monkeypatch: pytest.MonkeyPatch, term: int = TERM,
          state: State | None = None) -> tuple[Master, FakeNode]:
    monkeypatch.setattr(master_mod, "time", clock)
    if state is None:
        state = State()
        for name in ("m1", "w1", "w2"):
            state.apply({"op": "member", "name": name, "data_addr": f"{name}:7001", "raft_addr": f"{name}:7002",
                         "cpus": 1, "now": 1.0})
        state.apply({"op": "submit", "id": "j", "kind": "wordcount", "n_reduce": 1, "chunk_size": 4, "now": clock.now,
                     "inputs": [{"name": "in.txt", "size": 8, "file_id": "f0", "holders": ["m1", "w1"]}],
                     "form": {"source": "test", "submitter": "me"}})
    assert state.apply({"op": "master", "term": term, "name": "m1", "data_addr": "m1:7001"})["ok"]
    node = FakeNode(state, term, tmp_path)
    m = Master(node)  # type: ignore[arg-type]  # FakeNode is the part of MasterServices it uses
    m.term, m.leases = term, m._new_leases(term)

    async def refused(name: str, addr: str, now: float) -> bool:
        return name in node.refused  # a cut-off member's connection attempts just time out
    monkeypatch.setattr(m, "_refused", refused)
    return m, node


def call(m: Master, kind: str, who: str, **hdr: Any) -> dict[str, Any]:
    stream = Stream(who)
    asyncio.run(m.handlers()[kind](stream, hdr, b""))  # type: ignore[arg-type]
    return stream.sent[-1]


def take(m: Master, who: str) -> dict[str, Any]:
    reply = call(m, "get_task", who, wait=0, max=1)
    assert reply["t"] == "tasks", reply
    return reply["tasks"][0]


def beat(m: Master, who: str, *tasks: dict[str, Any], progress: float = 1.0) -> dict[str, Any]:
    listed = [{"job": t["job"], "phase": t["phase"], "index": t["index"], "attempt": t["attempt"],
               "progress": progress} for t in tasks]
    return call(m, "heartbeat", who, tasks=listed, slots=1)


def done(m: Master, who: str, t: dict[str, Any]) -> dict[str, Any]:
    return call(m, "task_done", who, job=t["job"], phase=t["phase"], index=t["index"], attempt=t["attempt"],
                stats={"counters": {"g": {"n": 1}}})


def reap(m: Master) -> None:
    asyncio.run(m._reap())


def test_a_dropped_report_is_rerun_elsewhere_and_its_late_delivery_counts_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock()
    m, node = party(tmp_path, clock, monkeypatch)
    clock.now += DEAD + HB + 0.1  # past the new master's grace
    first = take(m, "w1")
    beat(m, "w1", first)
    clock.now += HB  # w1 finished; its task_done is dropped by the network; it lists the task no more
    for _ in range(6):
        beat(m, "w1")
        beat(m, "w2")
        clock.now += HB
        reap(m)
    job = node.consensus.state.jobs["j"]
    assert job.maps[0].state == "pending", "the lease of an attempt nobody runs ran out"
    assert any(c["op"] == "release" and c["reason"] == "lost on w1" for c in node.log)
    second = take(m, "w2")
    assert (second["index"], second["attempt"]) == (first["index"], first["attempt"] + 1)
    assert done(m, "w2", second)["accepted"] is True
    late = done(m, "w1", first)  # the dropped report, delivered after all
    assert late["accepted"] is False and "not running on w1" in late["why"]
    assert job.maps[0].node == "w2" and job.maps[0].attempt == second["attempt"]
    assert job.counters() == {"g": {"n": 1}}, "counted once"


def test_a_cut_off_member_is_lost_after_dead_after_and_a_gone_process_at_once(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock()
    state = State()
    for name in ("m1", "w1", "w2"):
        state.apply({"op": "member", "name": name, "data_addr": f"{name}:7001", "raft_addr": f"{name}:7002",
                     "cpus": 1, "now": 1.0})
    state.apply({"op": "submit", "id": "j", "kind": "wordcount", "n_reduce": 1, "chunk_size": 4, "now": clock.now,
                 "inputs": [{"name": "in.txt", "size": 8, "file_id": "f0", "holders": ["m1"]}],
                 "form": {"source": "test", "submitter": "me"}})
    m, node = party(tmp_path, clock, monkeypatch, state=state)
    clock.now += DEAD + HB + 0.1
    a, b = take(m, "w1"), take(m, "w2")
    beat(m, "w1", a)
    beat(m, "w2", b)
    node.refused.add("w2")  # w2's process dies; w1 is cut off (no packets either way)
    clock.now += 2 * HB + 0.1
    reap(m)
    lost = [c["node"] for c in node.log if c["op"] == "lost"]
    assert lost == ["w2"], "a refused connection: lost at the first probe"
    assert m.health("w1", clock.now)[0] == "suspected"
    clock.now = clock.now - 2 * HB - 0.1 + DEAD - 0.05
    reap(m)
    assert [c["node"] for c in node.log if c["op"] == "lost"] == ["w2"], "not before dead_after"
    clock.now += 0.1
    reap(m)
    assert [c["node"] for c in node.log if c["op"] == "lost"] == ["w2", "w1"]
    job = node.consensus.state.jobs["j"]
    assert [t.state for t in job.maps] == ["pending", "pending"]
    assert beat(m, "w1")["t"] == "ok" and m.health("w1", clock.now)[0] == "alive", "back after the cut heals"


def test_a_new_master_reruns_at_once_an_assignment_that_never_reached_its_member(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The old master (term 2) committed two assignments to w1 and died; only one reached w1.
    The new master (term 3) gives the other back as soon as w1 has heartbeated for two
    intervals without it, inside its grace; the one w1 runs keeps its lease."""
    clock = Clock()
    old, node = party(tmp_path / "old", clock, monkeypatch)
    clock.now += DEAD + HB + 0.1
    reached, never = take(old, "w1"), take(old, "w1")
    new, node2 = party(tmp_path / "new", clock, monkeypatch, term=3, state=node.consensus.state)
    for _ in range(4):
        beat(new, "w1", reached, progress=clock.now)
        clock.now += HB
        reap(new)
    released = [(c["index"], c["reason"]) for c in node2.log if c["op"] == "release"]
    assert released == [(never["index"], "lost on w1")]
    job = node2.consensus.state.jobs["j"]
    assert job.maps[reached["index"]].state == "running" and job.maps[never["index"]].state == "pending"


def test_the_last_reduce_done_starts_its_assembly_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No sweep runs here (the master's loop is not started): the completion that leaves the
    job assembling starts the assembly itself (a round's next model is made without waiting
    for the next sweep)."""
    clock = Clock()
    m, node = party(tmp_path, clock, monkeypatch)
    clock.now += DEAD + HB + 0.1
    started: list[tuple[str, list[tuple[int, str]]]] = []

    async def assemble(job_id: str, spec: dict[str, Any], reducers: list[tuple[int, str]], gateway: str) -> bool:
        started.append((job_id, reducers))
        return False
    monkeypatch.setattr(m, "_assemble", assemble)
    for _ in range(2):
        assert done(m, "w1", take(m, "w1"))["accepted"] is True
    assert started == []
    last = take(m, "w1")
    assert last["phase"] == "reduce"

    async def report() -> dict[str, Any]:
        stream = Stream("w1")
        await m.handlers()["task_done"](stream, {"job": "j", "phase": "reduce", "index": 0,  # type: ignore[arg-type]
                                                 "attempt": last["attempt"]}, b"")
        await asyncio.sleep(0)  # the assembly task's first step
        return stream.sent[-1]
    assert asyncio.run(report())["accepted"] is True
    assert node.consensus.state.jobs["j"].state == "assembling"
    assert started == [("j", [(0, "w1")])]


def test_a_change_during_a_sweep_is_not_missed() -> None:
    """A change between noting ``seen`` and waiting (during a sweep) ends the wait at once;
    without one, the wait lasts its timeout."""
    async def scenario() -> None:
        changes = Changes()
        seen = changes.seen
        changes.notify()
        await asyncio.wait_for(changes.wait(30.0, since=seen), 5.0)  # at once, not after 30 s
        waiter = asyncio.create_task(changes.wait(30.0, since=changes.seen))
        await asyncio.sleep(0.01)
        assert not waiter.done()
        changes.notify()
        await asyncio.wait_for(waiter, 5.0)
        await changes.wait(0.01, since=changes.seen)  # nothing changes: the timeout ends it
    asyncio.run(scenario())
