"""Tests for pdp.core.state: the replicated state machine applied through the Raft log.

Every test drives ``State.apply`` only with plain commands, the way the log does, and
asserts exact results. A refused command must leave the state exactly as it was (compared
with ``pickle.dumps``; only the ``applied`` counter moves), and nothing may ever raise.
"""

from __future__ import annotations

import copy
import pickle
import random
from dataclasses import asdict
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pdp.core.split import plan_ranges
from pdp.core.state import ACTIVE, MAX_ERROR, Record, State

TERM = 3  # the current master's term in most tests

# -- helpers ------------------------------------------------------------------------------


def fresh(term: int = TERM) -> State:
    s = State()
    assert s.apply({"op": "master", "term": term, "name": "m1", "data_addr": "10.0.0.1:7000"}) == {"ok": True}
    return s


def inputs_for(sizes: list[int], holders: list[list[str]] | None = None) -> list[dict[str, Any]]:
    return [
        {"name": f"in{k}.txt", "size": size, "file_id": f"f{k}", "holders": list((holders or [])[k] if holders else ["n1"])}
        for k, size in enumerate(sizes)
    ]


def submit_cmd(job: str, sizes: list[int], chunk: int = 4, n_reduce: int = 2, now: float = 100.0,
               holders: list[list[str]] | None = None) -> dict[str, Any]:
    return {"op": "submit", "id": job, "kind": "wordcount", "inputs": inputs_for(sizes, holders),
            "n_reduce": n_reduce, "chunk_size": chunk, "form": {"source": "test", "submitter": "me"}, "now": now}


def assign_cmd(job: str, phase: str, index: int, node: str = "w1", term: int = TERM,
               lease_until: float = 130.0) -> dict[str, Any]:
    return {"op": "assign", "job": job, "phase": phase, "index": index, "node": node, "term": term,
            "lease_until": lease_until}


def complete_cmd(job: str, phase: str, index: int, attempt: int = 1, node: str = "w1", term: int = TERM,
                 stats: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"op": "complete", "job": job, "phase": phase, "index": index, "attempt": attempt, "node": node,
            "term": term, "stats": stats if stats is not None else {"records": index}}


def fail_cmd(job: str, term: int = TERM, error: str = "bad input", now: float = 200.0) -> dict[str, Any]:
    return {"op": "fail", "job": job, "term": term, "error": error, "now": now}


def finish_cmd(job: str, term: int = TERM, now: float = 300.0,
               result: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"op": "finish", "job": job, "term": term, "now": now,
            "result": result if result is not None else {"holder": "m1", "size": 42, "keys": 7, "sha256": "ab"}}


def member_cmd(name: str = "n1", cpus: int = 4, now: float = 1.0) -> dict[str, Any]:
    return {"op": "member", "name": name, "data_addr": f"{name}:7001", "raft_addr": f"{name}:7002",
            "cpus": cpus, "now": now}


def snap(s: State) -> Any:
    """A deep, plain copy of everything but the ``applied`` counter (compare with ==).

    Plain data rather than ``pickle.dumps``: pickle bytes also encode which equal objects
    are shared, which a copy (or a snapshot restore) does not preserve.
    """
    return ({k: asdict(m) for k, m in s.members.items()}, dict(s.master),
            {k: asdict(j) for k, j in s.jobs.items()}, s.next_seq, list(s.jobs),
            {k: asdict(r) for k, r in s.records.items()}, copy.deepcopy(s.invited),
            copy.deepcopy(s.identities), copy.deepcopy(s.tokens))


def ok(s: State, cmd: Any) -> dict[str, Any]:
    res = s.apply(cmd)
    assert res["ok"] is True, res
    return res


def refused(s: State, cmd: Any, **flags: Any) -> dict[str, Any]:
    """Apply ``cmd``, expect ok=False with ``flags`` and no change but ``applied`` += 1."""
    before, applied = snap(s), s.applied
    res = s.apply(cmd)
    assert isinstance(res, dict)
    assert res["ok"] is False, res
    assert isinstance(res["error"], str) and res["error"]
    for k, v in flags.items():
        assert res.get(k) == v, (k, res)
    assert snap(s) == before, f"refused command changed the state: {res}"
    assert s.applied == applied + 1
    return res


def run_maps(s: State, job: str) -> None:
    for t in s.jobs[job].maps:
        ok(s, assign_cmd(job, "map", t.index))
        ok(s, complete_cmd(job, "map", t.index))


def run_reduces(s: State, job: str) -> None:
    for t in s.jobs[job].reduces:
        ok(s, assign_cmd(job, "reduce", t.index))
        ok(s, complete_cmd(job, "reduce", t.index))


def to_phase(s: State, job: str, phase: str) -> None:
    """Drive a submitted (queued) job to ``phase``."""
    if phase == "queued":
        return
    ok(s, assign_cmd(job, "map", 0))
    if phase == "mapping":
        return
    ok(s, complete_cmd(job, "map", 0))
    for t in s.jobs[job].maps[1:]:
        ok(s, assign_cmd(job, "map", t.index))
        ok(s, complete_cmd(job, "map", t.index))
    assert s.jobs[job].state == "reducing"
    if phase == "reducing":
        return
    run_reduces(s, job)
    assert s.jobs[job].state == "assembling"
    if phase == "assembling":
        return
    if phase == "done":
        ok(s, finish_cmd(job))
    elif phase == "failed":
        ok(s, fail_cmd(job))
    assert s.jobs[job].state == phase


def job_in(phase: str, sizes: list[int] | None = None, n_reduce: int = 2) -> State:
    s = fresh()
    ok(s, submit_cmd("j", sizes or [10, 5], chunk=4, n_reduce=n_reduce))
    to_phase(s, "j", phase)
    assert s.jobs["j"].state == phase
    return s


# -- basics ---------------------------------------------------------------------------------


def test_fresh_state() -> None:
    s = State()
    assert s.members == {} and s.jobs == {}
    assert s.master == {"term": 0, "name": "", "data_addr": ""}
    assert s.next_seq == 0 and s.applied == 0
    assert s.active_jobs() == []
    assert s.members.get("x") is None


def test_member_joins_and_rejoins() -> None:
    s = State()
    assert s.apply(member_cmd("n1", cpus=4, now=1.5)) == {"ok": True}
    m = s.members.get("n1")
    assert m is not None
    assert (m.name, m.data_addr, m.raft_addr, m.cpus, m.joined_at) == ("n1", "n1:7001", "n1:7002", 4, 1.5)
    ok(s, member_cmd("n2", cpus=2, now=2.0))
    ok(s, member_cmd("n1", cpus=8, now=3.0))  # rejoin replaces the record
    assert sorted(s.members) == ["n1", "n2"]
    assert s.members["n1"].cpus == 8 and s.members["n1"].joined_at == 3.0
    assert s.applied == 3


def test_member_name_taken_by_another_node_is_refused() -> None:
    s = State()
    ok(s, member_cmd("n1", cpus=4, now=1.0))
    clash = member_cmd("n1", cpus=2, now=2.0)
    clash["data_addr"] = "elsewhere:7001"
    res = refused(s, clash)
    assert "n1" in res["error"]
    assert s.members["n1"].data_addr == "n1:7001" and s.members["n1"].cpus == 4


def test_master_claims_terms() -> None:
    s = State()
    ok(s, {"op": "master", "term": 1, "name": "a", "data_addr": "a:1"})
    assert s.master == {"term": 1, "name": "a", "data_addr": "a:1"}
    ok(s, {"op": "master", "term": 5, "name": "b", "data_addr": "b:1"})
    assert s.master == {"term": 5, "name": "b", "data_addr": "b:1"}
    ok(s, {"op": "master", "term": 5, "name": "b", "data_addr": "b:2"})  # same term: re-claim is fine
    assert s.master["data_addr"] == "b:2"
    refused(s, {"op": "master", "term": 4, "name": "a", "data_addr": "a:1"})
    refused(s, {"op": "master", "term": 0, "name": "a", "data_addr": "a:1"})
    assert s.master == {"term": 5, "name": "b", "data_addr": "b:2"}


# -- submission -----------------------------------------------------------------------------


def test_submit_splits_every_input_into_chunks() -> None:
    s = fresh()
    cmd = submit_cmd("job-1", [10, 0, 7, 4], chunk=4, n_reduce=3, now=12.5)
    assert s.apply(cmd) == {"ok": True, "id": "job-1"}
    job = s.jobs["job-1"]
    assert (job.id, job.seq, job.kind, job.n_reduce, job.chunk_size) == ("job-1", 0, "wordcount", 3, 4)
    assert job.state == "queued" and job.error == "" and job.result == {} and job.finished_at == 0.0
    assert job.submitted_at == 12.5
    assert job.form == {"source": "test", "submitter": "me"}
    assert job.inputs == cmd["inputs"]
    assert [(t.phase, t.index, t.input, t.start, t.end) for t in job.maps] == [
        ("map", 0, 0, 0, 4), ("map", 1, 0, 4, 8), ("map", 2, 0, 8, 10),
        ("map", 3, 2, 0, 4), ("map", 4, 2, 4, 7),
        ("map", 5, 3, 0, 4),
    ]
    assert [(t.phase, t.index) for t in job.reduces] == [("reduce", 0), ("reduce", 1), ("reduce", 2)]
    for t in job.maps + job.reduces:
        assert (t.state, t.node, t.attempt, t.term, t.lease_until, t.stats) == ("pending", "", 0, 0, 0.0, {})
    assert job.counts() == {"maps": 6, "maps_done": 0, "reduces": 3, "reduces_done": 0, "step": 1, "steps": 1}
    assert s.next_seq == 1
    assert s.active_jobs() == [job]


@pytest.mark.parametrize(
    ("sizes", "chunk", "n_maps"),
    [
        ([1], 1, 1),
        ([5], 5, 1),
        ([6], 5, 2),
        ([3], 1, 3),
        ([3], 1000, 1),
        ([100, 1, 0, 99], 10, 21),
        ([0, 9, 0], 3, 3),
        ([64 * 1024 * 1024 + 1], 16 * 1024 * 1024, 5),
    ],
)
def test_submit_task_counts(sizes: list[int], chunk: int, n_maps: int) -> None:
    s = fresh()
    ok(s, submit_cmd("j", sizes, chunk=chunk, n_reduce=4))
    job = s.jobs["j"]
    assert len(job.maps) == n_maps == sum(len(plan_ranges(n, chunk)) for n in sizes)
    assert [t.index for t in job.maps] == list(range(n_maps))
    expected = [(k, a, b) for k, n in enumerate(sizes) for a, b in plan_ranges(n, chunk)]
    assert [(t.input, t.start, t.end) for t in job.maps] == expected
    assert len(job.reduces) == 4


def test_submit_copies_inputs_and_form() -> None:
    s = fresh()
    cmd = submit_cmd("j", [5], chunk=4)
    ok(s, cmd)
    cmd["inputs"][0]["size"] = 999
    cmd["inputs"].append({"size": 1})
    cmd["form"]["source"] = "changed"
    job = s.jobs["j"]
    assert job.inputs[0]["size"] == 5 and len(job.inputs) == 1
    assert job.form["source"] == "test"


@pytest.mark.parametrize(
    "sizes",
    [[], [0], [0, 0, 0]],
)
def test_all_empty_inputs_go_straight_to_reducing(sizes: list[int]) -> None:
    s = fresh()
    ok(s, submit_cmd("empty", sizes, n_reduce=2))
    job = s.jobs["empty"]
    assert job.maps == []
    assert job.state == "reducing"
    assert job.counts() == {"maps": 0, "maps_done": 0, "reduces": 2, "reduces_done": 0, "step": 1, "steps": 1}
    assert ok(s, assign_cmd("empty", "reduce", 1)) == {"ok": True, "attempt": 1}
    ok(s, complete_cmd("empty", "reduce", 1))
    assert job.state == "reducing"
    ok(s, assign_cmd("empty", "reduce", 0))
    ok(s, complete_cmd("empty", "reduce", 0))
    assert job.state == "assembling"
    ok(s, finish_cmd("empty"))
    assert job.state == "done"


def test_submit_is_idempotent() -> None:
    s = fresh()
    assert s.apply(submit_cmd("j", [10], now=1.0)) == {"ok": True, "id": "j"}
    first = snap(s)
    # The same id with the same kind and inputs (names, sizes) is the same job, even through
    # another gateway (chunk size, reduces, holders and time may differ): nothing changes.
    assert s.apply(submit_cmd("j", [10], now=1.0)) == {"ok": True, "dup": True, "id": "j"}
    assert s.apply(submit_cmd("j", [10], chunk=1, n_reduce=9, now=5.0, holders=[["n2"]])) == \
        {"ok": True, "dup": True, "id": "j"}
    assert snap(s) == first
    # The same id for other inputs, another kind or another submitter is refused.
    res = refused(s, submit_cmd("j", [1, 2, 3], chunk=1, n_reduce=9, now=5.0), id_taken=True)
    assert "already used for different inputs" in res["error"]
    refused(s, submit_cmd("j", [11]), id_taken=True)
    renamed = submit_cmd("j", [10])
    renamed["inputs"][0]["name"] = "other.txt"
    refused(s, renamed, id_taken=True)
    other_kind = {**submit_cmd("j", [10]), "kind": "chaos"}
    refused(s, other_kind, id_taken=True)
    other_user = submit_cmd("j", [10])
    other_user["form"]["submitter"] = "mallory"
    refused(s, other_user, id_taken=True)
    assert snap(s) == first
    assert list(s.jobs) == ["j"] and s.next_seq == 1
    assert len(s.jobs["j"].maps) == 3 and s.jobs["j"].submitted_at == 1.0
    # A duplicate of a job that moved on does not reset it.
    to_phase(s, "j", "reducing")
    before = snap(s)
    assert s.apply(submit_cmd("j", [10], now=1.0))["dup"] is True
    assert snap(s) == before


def test_submit_sequence_numbers() -> None:
    s = fresh()
    for k, name in enumerate(["zeta", "alpha", "mid"]):
        ok(s, submit_cmd(name, [4]))
        assert s.jobs[name].seq == k
    ok(s, submit_cmd("alpha", [4]))  # dup does not take a number
    refused(s, submit_cmd("bad", [4], n_reduce=0))  # nor does a refused one
    ok(s, submit_cmd("last", [4]))
    assert s.jobs["last"].seq == 3 and s.next_seq == 4
    assert [j.id for j in s.active_jobs()] == ["zeta", "alpha", "mid", "last"]


@pytest.mark.parametrize(
    "cmd",
    [
        submit_cmd("j", [10], n_reduce=0),
        submit_cmd("j", [10], n_reduce=-1),
        submit_cmd("j", [10], chunk=0),
        submit_cmd("j", [10], chunk=-4),
        submit_cmd("j", [10, -1]),
    ],
    ids=["n_reduce=0", "n_reduce<0", "chunk=0", "chunk<0", "negative size"],
)
def test_submit_refuses_bad_parameters(cmd: dict[str, Any]) -> None:
    s = fresh()
    refused(s, cmd)
    assert s.jobs == {} and s.next_seq == 0


# -- the whole lifecycle --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sizes", "chunk", "n_reduce"),
    [([10, 0, 7], 4, 3), ([1], 1, 1), ([9, 9, 9, 9], 2, 5), ([0, 3], 3, 1)],
)
def test_full_lifecycle(sizes: list[int], chunk: int, n_reduce: int) -> None:
    s = fresh()
    ok(s, member_cmd("n1"))  # holds the inputs
    ok(s, member_cmd("w1"))
    ok(s, member_cmd("w2"))
    ok(s, submit_cmd("j", sizes, chunk=chunk, n_reduce=n_reduce, now=10.0))
    job = s.jobs["j"]
    n_maps = sum(len(plan_ranges(n, chunk)) for n in sizes)
    assert len(job.maps) == n_maps and len(job.reduces) == n_reduce
    assert job.state == "queued"

    # Assign every map first (alternating workers), then complete them in reverse order.
    for t in job.maps:
        node = f"w{1 + t.index % 2}"
        res = s.apply(assign_cmd("j", "map", t.index, node=node, lease_until=50.0 + t.index))
        assert res == {"ok": True, "attempt": 1}
        assert (t.state, t.node, t.attempt, t.term, t.lease_until) == ("running", node, 1, TERM, 50.0 + t.index)
        assert job.state == "mapping"
        # Reduces wait for every map.
        refused(s, assign_cmd("j", "reduce", 0))
    for done, t in enumerate(reversed(job.maps), start=1):
        assert job.state == "mapping"
        res = s.apply(complete_cmd("j", "map", t.index, attempt=1, node=t.node, stats={"bytes": t.end - t.start}))
        assert res == {"ok": True}
        assert t.state == "done" and t.stats == {"bytes": t.end - t.start}
        assert job.counts()["maps_done"] == done
        assert job.state == ("reducing" if done == n_maps else "mapping")
    assert job.state == "reducing"
    refused(s, finish_cmd("j"))

    for t in job.reduces:
        assert s.apply(assign_cmd("j", "reduce", t.index, node="w2")) == {"ok": True, "attempt": 1}
        assert t.state == "running" and t.node == "w2"
        assert job.state == "reducing"
    for done, t in enumerate(job.reduces, start=1):
        assert job.state == "reducing"
        assert s.apply(complete_cmd("j", "reduce", t.index, node="w2")) == {"ok": True}
        assert t.state == "done" and t.node == "w2"
        assert job.counts() == {"maps": n_maps, "maps_done": n_maps, "reduces": n_reduce, "reduces_done": done,
                                "step": 1, "steps": 1}
    assert job.state == "assembling"
    assert s.active_jobs() == [job]

    result = {"holder": "m1", "size": 10, "keys": 3, "sha256": "00"}
    assert s.apply(finish_cmd("j", now=99.5, result=result)) == {"ok": True}
    assert job.state == "done" and job.result == result and job.finished_at == 99.5 and job.error == ""
    assert s.active_jobs() == []
    # Done is final.
    refused(s, finish_cmd("j"), inactive=True)
    refused(s, fail_cmd("j"), inactive=True)


def test_two_jobs_progress_independently() -> None:
    s = fresh()
    ok(s, submit_cmd("a", [8], chunk=4, n_reduce=1))
    ok(s, submit_cmd("b", [4], chunk=4, n_reduce=1))
    run_maps(s, "b")
    assert s.jobs["b"].state == "reducing" and s.jobs["a"].state == "queued"
    ok(s, assign_cmd("a", "map", 1))
    assert s.jobs["a"].state == "mapping"
    refused(s, assign_cmd("a", "reduce", 0))
    ok(s, fail_cmd("b", error="x"))
    assert s.jobs["b"].state == "failed" and s.jobs["a"].state == "mapping"
    assert [j.id for j in s.active_jobs()] == ["a"]


@pytest.mark.parametrize("phase", ACTIVE)
def test_fail_from_every_active_phase(phase: str) -> None:
    s = job_in(phase)
    long = "e" * (MAX_ERROR + 500)
    assert s.apply(fail_cmd("j", error=long, now=77.0)) == {"ok": True}
    job = s.jobs["j"]
    assert job.state == "failed" and job.error == "e" * MAX_ERROR and job.finished_at == 77.0
    assert s.active_jobs() == []


def test_result_of_assign_counts_attempts() -> None:
    s = job_in("queued")
    assert s.apply(assign_cmd("j", "map", 2, node="w9", lease_until=1.25)) == {"ok": True, "attempt": 1}
    t = s.jobs["j"].maps[2]
    assert (t.state, t.node, t.attempt, t.term, t.lease_until) == ("running", "w9", 1, TERM, 1.25)


def test_complete_without_stats() -> None:
    s = job_in("mapping")
    cmd = complete_cmd("j", "map", 0)
    del cmd["stats"]
    ok(s, cmd)
    assert s.jobs["j"].maps[0].stats == {}
    cmd = complete_cmd("j", "map", 1)
    cmd["stats"] = None
    ok(s, assign_cmd("j", "map", 1))
    ok(s, cmd)
    assert s.jobs["j"].maps[1].stats == {}


def test_orders_follow_the_new_master_term() -> None:
    s = job_in("mapping")  # map 0 assigned in term TERM
    ok(s, {"op": "master", "term": TERM + 2, "name": "m2", "data_addr": "m2:1"})
    # The old master's orders are refused now, the new one's accepted (a completion of a
    # task assigned in an earlier term is fine: the new master relays it).
    refused(s, complete_cmd("j", "map", 0, term=TERM), stale=True)
    ok(s, complete_cmd("j", "map", 0, term=TERM + 2))
    ok(s, assign_cmd("j", "map", 1, term=TERM + 2))
    assert s.jobs["j"].maps[1].term == TERM + 2
    refused(s, assign_cmd("j", "map", 2, term=TERM), stale=True)


# -- illegal orders -------------------------------------------------------------------------


def _order(op: str, s: State, term: int) -> dict[str, Any]:
    """A valid order of kind ``op`` for job "j" in ``s`` (apart from ``term``)."""
    job = s.jobs["j"]
    if op == "assign":
        t = next(t for t in job.maps if t.state == "pending")
        return assign_cmd("j", "map", t.index, term=term)
    if op == "complete":
        t = next(t for t in job.maps if t.state == "running")
        return complete_cmd("j", "map", t.index, attempt=t.attempt, term=term)
    if op == "fail":
        return fail_cmd("j", term=term)
    return finish_cmd("j", term=term)


@pytest.mark.parametrize("op", ["assign", "complete", "fail", "finish"])
@pytest.mark.parametrize("delta", [-1, -TERM, +1, +10])
def test_orders_with_another_term_are_refused(op: str, delta: int) -> None:
    s = job_in("assembling" if op == "finish" else "mapping", sizes=[16])
    cmd = _order(op, s, TERM + delta)
    res = refused(s, cmd)
    if delta < 0:
        assert res["stale"] is True
    # The same order with the current term goes through: the term was the only problem.
    cmd["term"] = TERM
    ok(s, cmd)


def test_stale_term_checked_before_job() -> None:
    s = fresh()
    refused(s, assign_cmd("nope", "map", 0, term=TERM - 1), stale=True)


@pytest.mark.parametrize("state", ["running", "done"])
@pytest.mark.parametrize("phase", ["map", "reduce"])
def test_assign_of_running_or_done_task(state: str, phase: str) -> None:
    s = job_in("reducing" if phase == "reduce" else "queued")
    ok(s, assign_cmd("j", phase, 1, node="first"))
    if state == "done":
        ok(s, complete_cmd("j", phase, 1, node="first"))
    res = refused(s, assign_cmd("j", phase, 1, node="second"), busy=True)
    assert "second" not in res["error"]
    t = s.jobs["j"].tasks(phase)[1]
    assert t.state == state and t.node == "first" and t.attempt == 1


@pytest.mark.parametrize("phase", ["queued", "mapping"])
def test_assign_of_reduce_before_every_map_is_done(phase: str) -> None:
    s = job_in(phase)
    for r in range(2):
        refused(s, assign_cmd("j", "reduce", r))
    # Every map but the last done: still too early.
    job = s.jobs["j"]
    for t in job.maps[:-1]:
        if t.state == "pending":
            ok(s, assign_cmd("j", "map", t.index))
        ok(s, complete_cmd("j", "map", t.index))
    refused(s, assign_cmd("j", "reduce", 0))
    ok(s, assign_cmd("j", "map", job.maps[-1].index))
    refused(s, assign_cmd("j", "reduce", 0))
    ok(s, complete_cmd("j", "map", job.maps[-1].index))
    assert job.state == "reducing"
    ok(s, assign_cmd("j", "reduce", 0))


@pytest.mark.parametrize("attempt", [0, -1, 2, 7])
def test_complete_of_attempt_never_assigned(attempt: int) -> None:
    s = job_in("mapping")  # map 0 running, attempt 1
    refused(s, complete_cmd("j", "map", 0, attempt=attempt))
    # A pending task was never assigned at all: attempt 1 is as bad as any.
    refused(s, complete_cmd("j", "map", 1, attempt=1))
    refused(s, complete_cmd("j", "map", 1, attempt=attempt))


def test_complete_twice_first_completion_wins() -> None:
    s = job_in("mapping")  # map 0: attempt 1 on w1
    ok(s, {**assign_cmd("j", "map", 0, node="fast"), "backup": True})  # attempt 2
    ok(s, complete_cmd("j", "map", 0, attempt=2, node="fast", stats={"n": 1}))
    res = refused(s, complete_cmd("j", "map", 0, attempt=1, node="w1", stats={"n": 2}), dup=True)
    assert res["dup"] is True
    t = s.jobs["j"].maps[0]
    assert t.state == "done" and t.node == "fast" and t.stats == {"n": 1}
    # Even a bogus attempt on a done task is just a duplicate.
    refused(s, complete_cmd("j", "map", 0, attempt=9, node="slow"), dup=True)


def test_complete_twice_on_last_reduce_keeps_first() -> None:
    s = job_in("reducing", n_reduce=1)
    ok(s, assign_cmd("j", "reduce", 0, node="a"))
    ok(s, {**assign_cmd("j", "reduce", 0, node="b"), "backup": True})
    ok(s, complete_cmd("j", "reduce", 0, attempt=1, node="a"))
    assert s.jobs["j"].state == "assembling"
    refused(s, complete_cmd("j", "reduce", 0, attempt=2, node="b"), dup=True)
    assert s.jobs["j"].reduces[0].node == "a" and s.jobs["j"].state == "assembling"


def test_complete_by_another_node_is_refused() -> None:
    """A member cannot report (forge) the completion of an attempt that runs elsewhere."""
    s = job_in("mapping")  # map 0: attempt 1 on w1
    res = refused(s, complete_cmd("j", "map", 0, node="evil"), not_yours=True)
    assert "runs on w1" in res["error"]
    ok(s, complete_cmd("j", "map", 0, node="w1"))


def test_complete_of_a_given_up_attempt_is_refused() -> None:
    s = job_in("mapping")
    ok(s, {"op": "release", "job": "j", "phase": "map", "index": 0, "attempt": 1, "term": TERM,
           "reason": "stalled", "now": 5.0})
    refused(s, complete_cmd("j", "map", 0, attempt=1, node="w1"), stale_attempt=True)
    ok(s, assign_cmd("j", "map", 0, node="w2"))
    refused(s, complete_cmd("j", "map", 0, attempt=1, node="w1"), stale_attempt=True)
    refused(s, complete_cmd("j", "map", 0, attempt=2, node="w1"), not_yours=True)
    ok(s, complete_cmd("j", "map", 0, attempt=2, node="w2"))


@pytest.mark.parametrize("phase", ["queued", "mapping", "reducing"])
def test_finish_when_not_assembling(phase: str) -> None:
    s = job_in(phase)
    refused(s, finish_cmd("j"))


@pytest.mark.parametrize("op", ["assign", "complete", "fail", "finish"])
def test_orders_for_unknown_jobs(op: str) -> None:
    s = job_in("mapping")
    cmd = {"assign": assign_cmd("ghost", "map", 0), "complete": complete_cmd("ghost", "map", 0),
           "fail": fail_cmd("ghost"), "finish": finish_cmd("ghost")}[op]
    refused(s, cmd)


@pytest.mark.parametrize("op", ["assign", "complete"])
@pytest.mark.parametrize(("phase", "index"), [("map", -1), ("map", 5), ("map", 100), ("reduce", -1), ("reduce", 2)])
def test_orders_for_out_of_range_tasks(op: str, phase: str, index: int) -> None:
    s = job_in("reducing")  # 5 maps done, 2 reduces pending
    assert len(s.jobs["j"].maps) == 5
    cmd = assign_cmd("j", phase, index) if op == "assign" else complete_cmd("j", phase, index)
    refused(s, cmd)


@pytest.mark.parametrize("final", ["failed", "done"])
@pytest.mark.parametrize("op", ["assign", "complete", "fail", "finish"])
def test_orders_for_inactive_jobs(final: str, op: str) -> None:
    s = fresh()
    ok(s, submit_cmd("j", [10, 5], chunk=4, n_reduce=2))
    if final == "failed":
        ok(s, assign_cmd("j", "map", 0))  # leave one running: complete must still be refused
        ok(s, fail_cmd("j"))
    else:
        to_phase(s, "j", "done")
    cmd = {"assign": assign_cmd("j", "map", 1), "complete": complete_cmd("j", "map", 0),
           "fail": fail_cmd("j"), "finish": finish_cmd("j")}[op]
    refused(s, cmd, inactive=True)
    assert s.jobs["j"].state == final


# -- malformed commands ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "cmd",
    [None, [], ["op", "submit"], "submit", 5, 1.5, b"op", True, ({"op": "member"},), {"op"}, object()],
    ids=lambda c: type(c).__name__,
)
def test_not_a_dict(cmd: Any) -> None:
    s = job_in("mapping")
    refused(s, cmd)


@pytest.mark.parametrize(
    "cmd",
    [{}, {"op": "nope"}, {"op": None}, {"op": 5}, {"op": ["assign"]}, {"op": {"x": 1}}, {"op": "Submit"},
     {"op": "apply"}, {"op": "_submit"}, {"op": "__init__"}, {"op": "active_jobs"}, {"name": "x"}],
)
def test_unknown_op(cmd: dict[str, Any]) -> None:
    s = job_in("mapping")
    res = refused(s, cmd)
    assert "unknown command" in res["error"]


def _valid_commands() -> dict[str, tuple[str, dict[str, Any]]]:
    """op -> (phase the job "j" must be in, a command that succeeds there)."""
    return {
        "member": ("queued", member_cmd("n7")),
        "master": ("queued", {"op": "master", "term": TERM + 1, "name": "m2", "data_addr": "m2:1"}),
        "submit": ("queued", submit_cmd("k", [5])),
        "assign": ("queued", assign_cmd("j", "map", 0)),
        "complete": ("mapping", complete_cmd("j", "map", 0)),
        "fail": ("mapping", fail_cmd("j")),
        "finish": ("assembling", finish_cmd("j")),
        "batch": ("queued", {"op": "batch", "cmds": [member_cmd("n8")]}),
    }


REQUIRED = {
    "member": ["name", "data_addr", "raft_addr", "cpus", "now"],
    "master": ["term", "name", "data_addr"],
    "submit": ["id", "kind", "inputs", "n_reduce", "chunk_size", "form", "now"],
    "assign": ["job", "phase", "index", "node", "term", "lease_until"],
    "complete": ["job", "phase", "index", "attempt", "node", "term"],
    "fail": ["job", "term", "error", "now"],
    "finish": ["job", "term", "result", "now"],
    "batch": ["cmds"],
}



def _missing_key_params() -> list[Any]:
    out = []
    for op, keys in REQUIRED.items():
        for key in keys:
            out.append(pytest.param(op, key, id=f"{op}-{key}"))
    return out


def _state_for(op: str) -> tuple[State, dict[str, Any]]:
    phase, cmd = _valid_commands()[op]
    s = job_in(phase)
    return s, copy.deepcopy(cmd)


@pytest.mark.parametrize("op", sorted(REQUIRED))
def test_valid_command_fixtures_succeed(op: str) -> None:
    s, cmd = _state_for(op)
    ok(s, cmd)


@pytest.mark.parametrize(("op", "key"), _missing_key_params())
def test_missing_key(op: str, key: str) -> None:
    s, cmd = _state_for(op)
    del cmd[key]
    refused(s, cmd)


def test_submit_input_without_size() -> None:
    s, cmd = _state_for("submit")
    del cmd["inputs"][0]["size"]
    refused(s, cmd)


BAD_VALUES: list[Any] = [
    ("member", "cpus", "many"), ("member", "cpus", None), ("member", "now", "later"), ("member", "now", None),
    ("master", "term", None), ("master", "term", "x"), ("master", "term", [1]),
    ("submit", "inputs", 5), ("submit", "inputs", [5]), ("submit", "inputs", [{"size": "big"}]),
    ("submit", "inputs", [{"size": None}]), ("submit", "inputs", None), ("submit", "inputs", [{"size": -3}]),
    ("submit", "n_reduce", "x"), ("submit", "n_reduce", None), ("submit", "chunk_size", "x"),
    ("submit", "chunk_size", {}), ("submit", "form", 5), ("submit", "form", "ab"), ("submit", "form", None),
    ("submit", "now", "x"),
    ("assign", "term", None), ("assign", "term", "x"), ("assign", "index", "x"), ("assign", "index", None),
    ("assign", "index", [0]), ("assign", "job", {"a": 1}),
    ("complete", "term", None), ("complete", "index", "x"), ("complete", "attempt", "x"),
    ("complete", "attempt", None), ("complete", "attempt", float("nan")), ("complete", "index", float("inf")),
    ("fail", "term", "x"), ("fail", "term", None),
    ("finish", "term", None), ("finish", "result", 5), ("finish", "result", "ab"), ("finish", "result", None),
    ("finish", "result", [1, 2]),
    ("batch", "cmds", 5), ("batch", "cmds", None),
    pytest.param("assign", "lease_until", "soon", id="assign-lease_until-soon"),
    pytest.param("assign", "lease_until", None, id="assign-lease_until-None"),
    pytest.param("fail", "now", "x", id="fail-now-x"),
    pytest.param("finish", "now", None, id="finish-now-None"),
    pytest.param("complete", "stats", 5, id="complete-stats-5"),
    pytest.param("complete", "stats", "xy", id="complete-stats-xy"),
    pytest.param("complete", "stats", [1], id="complete-stats-list"),
    pytest.param("assign", "phase", "garbage", id="assign-phase-garbage"),
    pytest.param("batch", "cmds", "ab", id="batch-cmds-str"),
    pytest.param("batch", "cmds", {"op": "member"}, id="batch-cmds-dict"),
]


def _bad_params() -> list[Any]:
    return [pytest.param(*b, id=f"{b[0]}-{b[1]}-{b[2]!r}") if type(b) is tuple else b for b in BAD_VALUES]


@pytest.mark.parametrize(("op", "key", "value"), _bad_params())
def test_wrong_type(op: str, key: str, value: Any) -> None:
    s, cmd = _state_for(op)
    if op == "assign" and key == "phase":
        s = job_in("reducing")  # a "phase" that is not "map" must not reach the reduces either
    cmd[key] = value
    refused(s, cmd)

def test_unknown_phase_on_complete_of_running_reduce() -> None:
    s = job_in("reducing")
    ok(s, assign_cmd("j", "reduce", 0))
    refused(s, complete_cmd("j", "bogus", 0))

@pytest.mark.parametrize("stats", [7, "junk", [["records", 1]]])
def test_bad_stats_on_last_map_does_not_wedge_the_job(stats: Any) -> None:
    s = fresh()
    ok(s, submit_cmd("j", [4], chunk=4, n_reduce=1))
    ok(s, assign_cmd("j", "map", 0))
    cmd = complete_cmd("j", "map", 0)
    cmd["stats"] = stats
    # Stats that are not a dict refuse the whole completion, changing nothing: the map still
    # runs on w1, the job is still mapping, and w1 is not credited with a done task.
    assert refused(s, cmd)["error"] == "stats must be a dict"
    job = s.jobs["j"]
    t = job.maps[0]
    assert (t.state, t.node, t.attempt, t.runs) == ("running", "w1", 1, {1: "w1"})
    assert job.state == "mapping" and s.records.get("w1", Record()).done == 0
    # The same attempt's good completion still goes through and moves the job on.
    ok(s, complete_cmd("j", "map", 0))
    assert (t.state, t.node, t.stats) == ("done", "w1", {"records": 0})
    assert job.state == "reducing" and [r.state for r in job.reduces] == ["pending"]
    assert s.records["w1"].done == 1

def test_complete_with_empty_node_is_refused() -> None:
    s = job_in("mapping")
    refused(s, complete_cmd("j", "map", 0, node=""))


def test_never_raises_on_hostile_values() -> None:
    class Boom:
        def __int__(self) -> int:
            raise RuntimeError("no int")

        def __float__(self) -> float:
            raise RuntimeError("no float")

        def __str__(self) -> str:
            raise RuntimeError("no str")

    s = job_in("mapping")
    for op in REQUIRED:
        for key in REQUIRED[op]:
            _, cmd = _state_for(op)
            cmd[key] = Boom()
            res = s.apply(cmd)
            assert isinstance(res, dict) and res["ok"] is False


def test_deeply_nested_batch_never_raises() -> None:
    s = fresh()
    cmd: dict[str, Any] = {"op": "batch", "cmds": []}
    inner = cmd
    for _ in range(3000):
        nxt: dict[str, Any] = {"op": "batch", "cmds": []}
        inner["cmds"] = [nxt]
        inner = nxt
    inner["cmds"] = [member_cmd("deep")]
    res = s.apply(cmd)
    assert isinstance(res, dict) and "ok" in res


# -- batch ----------------------------------------------------------------------------------


def test_batch_applies_in_order_and_returns_results() -> None:
    s = fresh()
    cmds = [
        submit_cmd("j", [4], chunk=4, n_reduce=1),
        assign_cmd("j", "map", 0, node="w1"),
        assign_cmd("j", "map", 0, node="w2"),  # busy now
        {"op": "nope"},
        complete_cmd("j", "map", 0, node="w1"),
        assign_cmd("j", "reduce", 0),  # legal only because the map completion came first
        submit_cmd("j", [4]),
        "junk",
    ]
    res = s.apply({"op": "batch", "cmds": cmds})
    assert res["ok"] is True
    results = res["results"]
    assert len(results) == len(cmds)
    assert results[0] == {"ok": True, "id": "j"}
    assert results[1] == {"ok": True, "attempt": 1}
    assert results[2]["ok"] is False and results[2]["busy"] is True
    assert results[3]["ok"] is False
    assert results[4] == {"ok": True}
    assert results[5] == {"ok": True, "attempt": 1}
    assert results[6] == {"ok": True, "dup": True, "id": "j"}
    assert results[7]["ok"] is False
    job = s.jobs["j"]
    assert job.state == "reducing" and job.maps[0].node == "w1" and job.reduces[0].state == "running"


def test_batch_equals_applying_one_by_one() -> None:
    cmds = [submit_cmd("a", [9], chunk=4), submit_cmd("b", [0]), assign_cmd("a", "map", 2),
            complete_cmd("a", "map", 2, attempt=2), complete_cmd("a", "map", 2), assign_cmd("b", "reduce", 1),
            fail_cmd("a"), assign_cmd("a", "map", 0)]
    one, many = fresh(), fresh()
    batch = one.apply({"op": "batch", "cmds": copy.deepcopy(cmds)})
    singles = [many.apply(c) for c in copy.deepcopy(cmds)]
    assert batch == {"ok": True, "results": singles}
    assert snap(one) == snap(many)


def test_batch_does_not_roll_back() -> None:
    s = fresh()
    res = s.apply({"op": "batch", "cmds": [submit_cmd("a", [4]), {"op": "master", "term": 0}, submit_cmd("b", [4])]})
    assert [r["ok"] for r in res["results"]] == [True, False, True]
    assert list(s.jobs) == ["a", "b"]


def test_empty_batch() -> None:
    s = fresh()
    before = snap(s)
    assert s.apply({"op": "batch", "cmds": []}) == {"ok": True, "results": []}
    assert snap(s) == before


def test_applied_counts_every_command() -> None:
    s = State()
    s.apply(member_cmd())
    s.apply({"op": "nope"})
    s.apply(None)
    s.apply({"op": "master", "term": 1})  # missing keys: still counted
    assert s.applied == 4
    # A batch counts itself and each of its commands (they go through apply too).
    s.apply({"op": "batch", "cmds": [member_cmd("a"), {"op": "nope"}, {"op": "batch", "cmds": [None]}]})
    assert s.applied == 4 + 1 + 3 + 1


# -- determinism and invariants -------------------------------------------------------------

JOB_ORDER = {"queued": 0, "mapping": 1, "reducing": 2, "assembling": 3, "done": 4}
TASK_ORDER = {"pending": 0, "running": 1, "done": 2}
JOB_IDS = [f"j{k}" for k in range(8)]
NODES = ["n1", "n2", "n3"]


class Gen:
    """Builds a mix of valid and invalid commands against the current state of ``s``."""

    def __init__(self, rng: random.Random, s: State, full: bool) -> None:
        self.rng, self.s, self.full = rng, s, full

    def term(self) -> int:
        cur = self.s.master["term"]
        return self.rng.choice([cur] * 8 + [cur - 1, cur + 1, 0])

    def runner(self, job_id: str, phase: str, index: int, attempt: int) -> str:
        """Mostly the node running that attempt (the one allowed to report it), else any."""
        job = self.s.jobs.get(job_id)
        if job is not None and phase in ("map", "reduce") and 0 <= index < len(job.tasks(phase)) \
                and self.rng.random() < 0.85:
            node = job.tasks(phase)[index].runs.get(attempt)
            if node:
                return node
        return self.rng.choice(NODES)

    def task_ref(self, kind: str) -> tuple[str, str, int, int]:
        r = self.rng
        active = [j.id for j in self.s.active_jobs()]
        job_id = r.choice(active) if active and r.random() < 0.85 else r.choice(JOB_IDS + ["ghost"])
        job = self.s.jobs.get(job_id)
        if job is not None and r.random() < 0.8:
            phase = "reduce" if job.state == "reducing" else "map"  # the phase that can make progress
        else:
            phase = r.choice(["map", "reduce"])
        if job is None or not job.tasks(phase):
            return job_id, phase, r.randint(-1, 3), 1
        tasks = job.tasks(phase)
        running = [t for t in tasks if t.state == "running"]
        pending = [t for t in tasks if t.state == "pending"]
        wanted = pending if kind == "assign" else running
        if r.random() < 0.85 and wanted:
            t = r.choice(wanted)
        elif r.random() < 0.8:
            t = r.choice(tasks)
        else:
            return job_id, phase, r.choice([-1, len(tasks), len(tasks) + 3]), 1
        attempt = t.attempt if r.random() < 0.8 else r.choice([0, t.attempt + 1, -1])
        return job_id, phase, t.index, attempt

    def one(self) -> Any:
        r = self.rng
        kind = r.choices(
            ["submit", "assign", "complete", "fail", "finish", "master", "member", "batch", "junk"],
            weights=[5, 30, 30, 1, 8, 2, 2, 4, 5],
        )[0]
        if kind == "submit":
            sizes = [r.choice([0, 0, 1, 3, 5, 9]) for _ in range(r.randint(0, 3))]
            cmd = submit_cmd(r.choice(JOB_IDS), sizes, chunk=r.choice([1, 3, 4, 8]), n_reduce=r.randint(0, 3),
                             now=float(r.randint(0, 1000)), holders=[r.sample(NODES, r.randint(0, 2)) for _ in sizes])
        elif kind in ("assign", "complete"):
            job_id, phase, index, attempt = self.task_ref(kind)
            if kind == "assign":
                cmd = assign_cmd(job_id, phase, index, node=r.choice(NODES), term=self.term(),
                                 lease_until=r.random() * 100)
            else:
                cmd = complete_cmd(job_id, phase, index, attempt=attempt, node=self.runner(job_id, phase, index, attempt),
                                   term=self.term(),
                                   stats={"bytes": r.randint(0, 99)})
        elif kind == "fail":
            cmd = fail_cmd(r.choice(JOB_IDS + ["ghost"]), term=self.term(), error="x" * r.randint(0, 3000),
                           now=r.random())
        elif kind == "finish":
            assembling = [j for j in self.s.jobs if self.s.jobs[j].state == "assembling"]
            job_id = r.choice(assembling) if assembling and r.random() < 0.8 else r.choice(JOB_IDS + ["ghost"])
            cmd = finish_cmd(job_id, term=self.term(), now=r.random(), result={"size": r.randint(0, 9)})
        elif kind == "master":
            cur = self.s.master["term"]
            cmd = {"op": "master", "term": r.choice([cur, cur + 1, cur + 1, cur - 1]), "name": r.choice(NODES),
                   "data_addr": "x"}
        elif kind == "member":
            cmd = member_cmd(r.choice(NODES), cpus=r.randint(1, 8), now=r.random())
        elif kind == "batch":
            # Sub-commands are generated against the state before the batch: some will be stale.
            cmd = {"op": "batch", "cmds": [self.one() for _ in range(r.randint(0, 4))]}
        else:
            cmd = r.choice([None, 5, "submit", [], {}, {"op": "nope"}, {"op": 3}, {"op": "assign"}])
        if isinstance(cmd, dict) and cmd.get("op") not in (None, "batch") and r.random() < 0.08:
            cmd = self.corrupt(cmd)
        return cmd

    def corrupt(self, cmd: dict[str, Any]) -> dict[str, Any]:
        r = self.rng
        op = cmd["op"]
        cmd = copy.deepcopy(cmd)
        keys = list(REQUIRED.get(op, []))
        if self.full and op == "complete":
            keys.append("stats")
        if not keys:
            return cmd
        key = r.choice(keys)
        if key not in cmd:
            return cmd
        if r.random() < 0.5 or (key == "phase" and not self.full):  # any bad phase value is the known bug
            del cmd[key]
        else:
            cmd[key] = r.choice([None, "x", [], {"z": 1}, 5])
        return cmd


def _count(cmd: Any) -> int:
    """How many apply() calls ``cmd`` makes."""
    if isinstance(cmd, dict) and cmd.get("op") == "batch" and isinstance(cmd.get("cmds"), list):
        return 1 + sum(_count(c) for c in cmd["cmds"])
    return 1


def check_invariants(s: State) -> None:
    assert s.next_seq == len(s.jobs)
    assert sorted(j.seq for j in s.jobs.values()) == list(range(len(s.jobs)))
    assert s.active_jobs() == sorted((j for j in s.jobs.values() if j.state in ACTIVE), key=lambda j: j.seq)
    for job in s.jobs.values():
        assert job.state in ("queued", "mapping", "reducing", "assembling", "done", "failed")
        assert job.n_reduce >= 1 and len(job.reduces) == job.n_reduce
        assert [t.index for t in job.maps] == list(range(len(job.maps)))
        assert [t.index for t in job.reduces] == list(range(job.n_reduce))
        for t in job.maps + job.reduces:
            assert t.state in TASK_ORDER
            if t.state == "done":
                assert t.node, f"done task without node: {job.id} {t.phase} {t.index}"
            if t.state != "pending":
                assert t.attempt >= 1 and t.node
            else:
                assert t.attempt == 0  # nothing ever returns a task to pending
        maps_done = all(t.state == "done" for t in job.maps)
        reduces_done = all(t.state == "done" for t in job.reduces)
        if not maps_done:
            assert all(t.state == "pending" for t in job.reduces), "a reduce ran before every map was done"
        if job.state == "queued":
            assert not maps_done and all(t.state == "pending" for t in job.maps + job.reduces)
        elif job.state == "mapping":
            assert not maps_done
        elif job.state == "reducing":
            assert maps_done and not reduces_done
        elif job.state in ("assembling", "done"):
            assert maps_done and reduces_done
        if job.state == "done":
            assert isinstance(job.result, dict)
        if job.state in ("done", "failed"):
            assert isinstance(job.finished_at, float)
        assert len(job.error) <= MAX_ERROR


def summary(s: State) -> dict[str, Any]:
    """What check_step compares across one command (cheap: it runs after every step)."""
    return {
        j.id: (j.state, [(t.state, t.attempt, t.node, t.stats) for t in j.maps + j.reduces],
               (j.error, j.result, j.finished_at))
        for j in s.jobs.values()
    }


def state_bytes(s: State) -> bytes:
    return pickle.dumps((s.members, s.master, s.jobs, s.next_seq, s.records, s.invited, s.identities, s.tokens))


def check_step(before: dict[str, Any], after: dict[str, Any], cmd: Any, res: Any) -> None:
    """What may change between two consecutive states (summaries)."""
    assert isinstance(res, dict) and isinstance(res.get("ok"), bool)
    if not res["ok"]:
        assert isinstance(res.get("error"), str)
    assert set(before) <= set(after)
    for job_id, (old_state, old_tasks, old_end) in before.items():
        new_state, new_tasks, new_end = after[job_id]
        if old_state in ("done", "failed"):
            assert (new_state, new_tasks, new_end) == (old_state, old_tasks, old_end), "a finished job changed"
            continue
        if new_state != "failed":
            assert JOB_ORDER[new_state] >= JOB_ORDER[old_state], (old_state, new_state)
        for (o_state, o_attempt, o_node, o_stats), (n_state, n_attempt, n_node, n_stats) in zip(
                old_tasks, new_tasks, strict=True):
            assert n_attempt >= o_attempt, "attempt count decreased"
            assert TASK_ORDER[n_state] >= TASK_ORDER[o_state], "task state went back"
            if o_state == "done":
                assert (n_node, n_stats) == (o_node, o_stats), "first completion must win"


def run_sequence(seed: int, steps: int, full: bool = False) -> tuple[State, set[str]]:
    rng = random.Random(seed)
    a, b = fresh(1), fresh(1)
    gen = Gen(rng, a, full)
    seen: set[str] = set()
    expected_applied = a.applied
    prev_bytes, prev_summary, prev_term = state_bytes(a), summary(a), a.master["term"]
    for _ in range(steps):
        cmd = gen.one()
        res_a = a.apply(copy.deepcopy(cmd))
        res_b = b.apply(copy.deepcopy(cmd))
        expected_applied += _count(cmd)
        # Determinism: same results, byte-identical states.
        assert res_a == res_b
        now_bytes = state_bytes(a)
        assert now_bytes == state_bytes(b)
        assert pickle.dumps(a) == pickle.dumps(b)
        assert a.applied == b.applied == expected_applied
        is_batch = isinstance(cmd, dict) and cmd.get("op") == "batch"
        if (not res_a["ok"] and not is_batch) or res_a.get("dup"):
            assert now_bytes == prev_bytes, f"refused {cmd!r} changed the state: {res_a}"
        now_summary = summary(a)
        check_step(prev_summary, now_summary, cmd, res_a)
        assert a.master["term"] >= prev_term
        check_invariants(a)
        seen.update(j.state for j in a.jobs.values())
        prev_bytes, prev_summary, prev_term = now_bytes, now_summary, a.master["term"]
    return a, seen


@pytest.mark.parametrize("seed", range(12))
def test_random_sequences_are_deterministic_and_keep_invariants(seed: int) -> None:
    _, seen = run_sequence(seed, 400)
    # The generator is useful only if it gets jobs through their whole life.
    assert {"reducing", "assembling", "done"} <= seen


def test_random_sequences_cover_every_phase() -> None:
    seen: set[str] = set()
    for seed in range(100, 106):
        seen |= run_sequence(seed, 300)[1]
    assert seen == {"queued", "mapping", "reducing", "assembling", "done", "failed"}

def test_random_sequences_with_every_kind_of_malformed_command() -> None:
    for seed in range(6):
        run_sequence(1000 + seed, 600, full=True)


@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(min_value=0, max_value=2**32 - 1), st.integers(min_value=1, max_value=150))
def test_random_sequences_hypothesis(seed: int, steps: int) -> None:
    run_sequence(seed, steps)


def test_pickle_round_trip_mid_sequence() -> None:
    """A replica restored from a snapshot (pickle) continues exactly like one that was not."""
    rng = random.Random(7)
    s = fresh(1)
    gen = Gen(rng, s, full=False)
    cmds = []
    for _ in range(300):
        cmd = gen.one()
        cmds.append(copy.deepcopy(cmd))
        s.apply(cmd)
    ref = fresh(1)
    for cmd in cmds[:150]:
        ref.apply(copy.deepcopy(cmd))
    restored: State = pickle.loads(pickle.dumps(ref))
    for cmd in cmds[150:]:
        assert restored.apply(copy.deepcopy(cmd)) == ref.apply(copy.deepcopy(cmd))
    assert snap(restored) == snap(ref) == snap(s)
    assert restored.applied == ref.applied == s.applied
