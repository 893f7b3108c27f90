"""Tests for pdp.core.scheduler: which pending task a free slot gets (pure placement)."""

from __future__ import annotations

import pickle
import random
from typing import Any

import pytest

from pdp.core.scheduler import TaskKey, jobs_to_assemble, key, pick_task
from pdp.core.state import State

TERM = 2


def fresh() -> State:
    s = State()
    assert s.apply({"op": "master", "term": TERM, "name": "m", "data_addr": "m:1"})["ok"]
    return s


def ok(s: State, cmd: dict[str, Any]) -> dict[str, Any]:
    res = s.apply(cmd)
    assert res["ok"] is True, res
    return res


def submit(s: State, job: str, sizes: list[int], holders: list[list[str]] | None = None, chunk: int = 4,
           n_reduce: int = 2, with_holders_key: bool = True) -> None:
    inputs = []
    for k, size in enumerate(sizes):
        inp: dict[str, Any] = {"name": f"{job}-{k}", "size": size, "file_id": f"{job}{k}"}
        if with_holders_key:
            inp["holders"] = list(holders[k]) if holders else []
        inputs.append(inp)
    ok(s, {"op": "submit", "id": job, "kind": "wordcount", "inputs": inputs, "n_reduce": n_reduce,
           "chunk_size": chunk, "form": {}, "now": 1.0})


def assign(s: State, job: str, phase: str, index: int, node: str = "w") -> None:
    ok(s, {"op": "assign", "job": job, "phase": phase, "index": index, "node": node, "term": TERM,
           "lease_until": 9.0})


def complete(s: State, job: str, phase: str, index: int, node: str = "w") -> None:
    attempt = s.jobs[job].tasks(phase)[index].attempt
    ok(s, {"op": "complete", "job": job, "phase": phase, "index": index, "attempt": attempt, "node": node,
           "term": TERM})


def run_all(s: State, job: str, phase: str) -> None:
    for t in s.jobs[job].tasks(phase):
        if t.state == "pending":
            assign(s, job, phase, t.index)
        if t.state == "running":
            complete(s, job, phase, t.index)


def picked(s: State, node: str = "w", reserved: set[TaskKey] | None = None) -> TaskKey | None:
    """pick_task as a key, checking it returns the live objects and changes nothing."""
    res_before = set(reserved or ())
    before = pickle.dumps(s)
    got = pick_task(s, node, reserved if reserved is not None else set())
    assert pickle.dumps(s) == before, "pick_task must not change the state"
    assert set(reserved or ()) == res_before, "pick_task must not change reserved"
    if got is None:
        return None
    job, task = got
    assert s.jobs[job.id] is job
    assert task in job.tasks(task.phase) and job.tasks(task.phase)[task.index] is task
    assert task.state == "pending"
    return key(job, task)


# -- nothing to do --------------------------------------------------------------------------


def test_empty_state_gives_none() -> None:
    assert picked(State()) is None
    assert picked(fresh()) is None
    assert jobs_to_assemble(State()) == []


def test_key() -> None:
    s = fresh()
    submit(s, "j", [9])
    job = s.jobs["j"]
    assert key(job, job.maps[2]) == ("j", "map", 2)
    assert key(job, job.reduces[1]) == ("j", "reduce", 1)


def test_none_when_every_task_is_running_or_done() -> None:
    s = fresh()
    submit(s, "j", [8], n_reduce=2)  # 2 maps
    assign(s, "j", "map", 0)
    assign(s, "j", "map", 1)
    assert picked(s) is None  # maps running, reduces must wait
    complete(s, "j", "map", 0)
    assert picked(s) is None  # one map still running: reduces still wait
    complete(s, "j", "map", 1)
    assert s.jobs["j"].state == "reducing"
    assert picked(s) == ("j", "reduce", 0)
    assign(s, "j", "reduce", 0)
    assign(s, "j", "reduce", 1)
    assert picked(s) is None
    run_all(s, "j", "reduce")
    assert s.jobs["j"].state == "assembling"
    assert picked(s) is None  # assembling is the master's job, not a worker's


@pytest.mark.parametrize("final", ["done", "failed"])
def test_finished_jobs_give_nothing(final: str) -> None:
    s = fresh()
    submit(s, "j", [8])
    if final == "failed":
        ok(s, {"op": "fail", "job": "j", "term": TERM, "error": "x", "now": 2.0})
    else:
        run_all(s, "j", "map")
        run_all(s, "j", "reduce")
        ok(s, {"op": "finish", "job": "j", "term": TERM, "result": {}, "now": 2.0})
    assert s.jobs["j"].state == final
    assert picked(s) is None
    assert jobs_to_assemble(s) == []


def test_none_when_everything_is_reserved() -> None:
    s = fresh()
    submit(s, "a", [8])
    submit(s, "b", [0], n_reduce=1)  # reducing at once
    reserved = {("a", "map", 0), ("a", "map", 1), ("b", "reduce", 0)}
    assert picked(s, reserved=reserved) is None


# -- submission order -----------------------------------------------------------------------


def test_jobs_served_in_submission_order() -> None:
    s = fresh()
    for job in ["zz", "aa", "mm"]:
        submit(s, job, [8])  # 2 maps each
    order = []
    for _ in range(6):
        k = picked(s)
        assert k is not None
        order.append(k)
        assign(s, k[0], k[1], k[2])
    assert order == [("zz", "map", 0), ("zz", "map", 1), ("aa", "map", 0), ("aa", "map", 1),
                     ("mm", "map", 0), ("mm", "map", 1)]
    assert picked(s) is None


def test_submission_order_is_seq_not_dict_order() -> None:
    s = fresh()
    submit(s, "first", [4])
    submit(s, "second", [4])
    s.jobs = dict(reversed(list(s.jobs.items())))  # the scheduler must not rely on insertion order
    assert picked(s) == ("first", "map", 0)


def test_a_busy_job_does_not_block_later_jobs() -> None:
    s = fresh()
    submit(s, "a", [4])
    submit(s, "b", [4])
    assign(s, "a", "map", 0)  # a: its only map running, its reduces wait
    assert picked(s) == ("b", "map", 0)


def test_older_job_reduces_before_newer_job_maps() -> None:
    s = fresh()
    submit(s, "a", [4], n_reduce=1)
    submit(s, "b", [4])
    run_all(s, "a", "map")
    assert s.jobs["a"].state == "reducing"
    assert picked(s) == ("a", "reduce", 0)


def test_finished_and_failed_jobs_are_skipped() -> None:
    s = fresh()
    submit(s, "a", [4])
    submit(s, "b", [4])
    submit(s, "c", [4])
    ok(s, {"op": "fail", "job": "a", "term": TERM, "error": "x", "now": 2.0})
    assert picked(s) == ("b", "map", 0)


# -- maps before reduces --------------------------------------------------------------------


def test_maps_before_reduces_largest_first_then_in_index_order() -> None:
    s = fresh()
    submit(s, "j", [10, 3], chunk=4, n_reduce=3)  # maps 0,1 (4 bytes), 2 (2 bytes) of input 0, 3 (3 bytes)
    seen = []
    while (k := picked(s)) is not None:
        seen.append(k)
        assign(s, *k)
    assert seen == [("j", "map", i) for i in (0, 1, 3, 2)]
    for i in (3, 1, 0):
        complete(s, "j", "map", i)
        assert picked(s) is None, "a reduce was offered before every map was done"
    complete(s, "j", "map", 2)
    seen = []
    while (k := picked(s)) is not None:
        seen.append(k)
        assign(s, *k)
    assert seen == [("j", "reduce", r) for r in range(3)]


def test_reduce_only_when_reducing() -> None:
    s = fresh()
    submit(s, "j", [8], n_reduce=1)
    for phase in ("queued", "mapping"):
        assert s.jobs["j"].state == phase
        k = picked(s)
        assert k is not None and k[1] == "map"
        assign(s, *k)
    assert picked(s) is None
    run_all(s, "j", "map")
    assert picked(s) == ("j", "reduce", 0)


def test_empty_input_job_offers_reduces_at_once() -> None:
    s = fresh()
    submit(s, "e", [0, 0], n_reduce=2)
    assert s.jobs["e"].state == "reducing"
    assert picked(s) == ("e", "reduce", 0)


def test_pending_reduce_after_a_running_one() -> None:
    s = fresh()
    submit(s, "j", [0], n_reduce=3)
    assign(s, "j", "reduce", 0)
    complete(s, "j", "reduce", 0)
    assign(s, "j", "reduce", 2)
    assert picked(s) == ("j", "reduce", 1)


# -- data locality --------------------------------------------------------------------------


def test_locality_prefers_maps_of_inputs_the_node_holds() -> None:
    s = fresh()
    # input 0 (maps 0, 1) on n1; input 1 (maps 2, 3) on n2 and n3; input 2 (map 4) on nobody.
    submit(s, "j", [8, 8, 4], holders=[["n1"], ["n2", "n3"], []], chunk=4)
    assert picked(s, "n1") == ("j", "map", 0)
    assert picked(s, "n2") == ("j", "map", 2)
    assert picked(s, "n3") == ("j", "map", 2)
    assert picked(s, "stranger") == ("j", "map", 0)  # holds nothing: still gets the first pending map

    assign(s, "j", "map", 2, node="n2")
    assert picked(s, "n2") == ("j", "map", 3)
    assert picked(s, "n3") == ("j", "map", 3)
    assign(s, "j", "map", 3, node="n3")
    # n2 holds nothing that is still pending: it takes any other map rather than idle.
    assert picked(s, "n2") == ("j", "map", 0)
    assert picked(s, "n1") == ("j", "map", 0)
    assign(s, "j", "map", 0, node="n1")
    assign(s, "j", "map", 1, node="n1")
    assert picked(s, "n1") == ("j", "map", 4)  # local maps gone: the rest for anyone
    assert picked(s, "n3") == ("j", "map", 4)


def test_locality_respects_reserved() -> None:
    s = fresh()
    submit(s, "j", [4, 8], holders=[[], ["n2"]], chunk=4)  # map 0 on nobody; maps 1, 2 on n2
    assert picked(s, "n2", {("j", "map", 1)}) == ("j", "map", 2)
    assert picked(s, "n2", {("j", "map", 1), ("j", "map", 2)}) == ("j", "map", 0)
    assert picked(s, "n2", {("j", "map", 0), ("j", "map", 1), ("j", "map", 2)}) is None


def test_locality_does_not_jump_the_job_queue() -> None:
    s = fresh()
    submit(s, "a", [4], holders=[["n1"]])
    submit(s, "b", [4], holders=[["n2"]])
    assert picked(s, "n2") == ("a", "map", 0)  # a was submitted first
    assign(s, "a", "map", 0, node="n1")
    assert picked(s, "n2") == ("b", "map", 0)


def test_inputs_without_holders() -> None:
    s = fresh()
    submit(s, "j", [8], with_holders_key=False)
    assert picked(s, "n1") == ("j", "map", 0)


# -- reserved -------------------------------------------------------------------------------


def test_reserved_keys_are_skipped() -> None:
    s = fresh()
    submit(s, "a", [12], n_reduce=1)  # maps 0..2
    submit(s, "b", [4])
    assert picked(s, reserved={("a", "map", 0)}) == ("a", "map", 1)
    assert picked(s, reserved={("a", "map", 0), ("a", "map", 1)}) == ("a", "map", 2)
    assert picked(s, reserved={("a", "map", 0), ("a", "map", 1), ("a", "map", 2)}) == ("b", "map", 0)
    # Keys of other jobs, other phases or other indexes do not hide a task.
    assert picked(s, reserved={("b", "map", 0), ("a", "reduce", 0), ("a", "map", 7), ("x", "map", 0)}) \
        == ("a", "map", 0)


def test_reserved_reduces_are_skipped() -> None:
    s = fresh()
    submit(s, "j", [0], n_reduce=3)
    assert picked(s, reserved={("j", "reduce", 0), ("j", "reduce", 1)}) == ("j", "reduce", 2)
    assert picked(s, reserved={("j", "map", 0)}) == ("j", "reduce", 0)


# -- jobs_to_assemble -----------------------------------------------------------------------


def test_jobs_to_assemble_lists_exactly_the_assembling_jobs_in_order() -> None:
    s = fresh()
    for job in ["q", "a3", "m", "a1", "r", "d", "f", "a2"]:
        submit(s, job, [4], n_reduce=1)
    assign(s, "m", "map", 0)  # mapping
    run_all(s, "r", "map")  # reducing
    for job in ["a2", "a1", "a3", "d"]:  # completed out of submission order
        run_all(s, job, "map")
        run_all(s, job, "reduce")
    ok(s, {"op": "finish", "job": "d", "term": TERM, "result": {}, "now": 3.0})
    ok(s, {"op": "fail", "job": "f", "term": TERM, "error": "x", "now": 3.0})
    states = {j.id: j.state for j in s.jobs.values()}
    assert states == {"q": "queued", "a3": "assembling", "m": "mapping", "a1": "assembling", "r": "reducing",
                      "d": "done", "f": "failed", "a2": "assembling"}
    got = jobs_to_assemble(s)
    assert [j.id for j in got] == ["a3", "a1", "a2"]
    assert all(j is s.jobs[j.id] for j in got)
    ok(s, {"op": "finish", "job": "a1", "term": TERM, "result": {}, "now": 4.0})
    assert [j.id for j in jobs_to_assemble(s)] == ["a3", "a2"]


def test_empty_job_reaches_assembly() -> None:
    s = fresh()
    submit(s, "e", [], n_reduce=1)
    assert jobs_to_assemble(s) == []
    run_all(s, "e", "reduce")
    assert [j.id for j in jobs_to_assemble(s)] == ["e"]


# -- the master's loop ----------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
def test_master_loop_runs_every_job_to_assembly(seed: int) -> None:
    """pick_task + assign/complete, as the master does, finishes every job exactly once per task."""
    rng = random.Random(seed)
    s = fresh()
    nodes = ["n1", "n2", "n3"]
    jobs = []
    for k in range(4):
        sizes = [rng.choice([0, 3, 8, 13]) for _ in range(rng.randint(0, 3))]
        holders = [rng.sample(nodes, rng.randint(0, 2)) for _ in sizes]
        submit(s, f"job{k}", sizes, holders=holders, chunk=4, n_reduce=rng.randint(1, 3))
        jobs.append(f"job{k}")
    running: list[tuple[str, str, int, str]] = []
    assigned: list[TaskKey] = []
    for _ in range(10_000):
        if running and (rng.random() < 0.5 or len(running) >= 4):
            job, phase, index, node = running.pop(rng.randrange(len(running)))
            complete(s, job, phase, index, node=node)
            continue
        node = rng.choice(nodes)
        got = pick_task(s, node, set())
        if got is None:
            if not running:
                break
            continue
        job_obj, task = got
        if task.phase == "map":
            holders = job_obj.inputs[task.input].get("holders", [])
            local_pending = [t for t in job_obj.maps if t.state == "pending"
                             and node in job_obj.inputs[t.input].get("holders", [])]
            # A non-local map only when no map of this job is local to the node.
            assert node in holders or not local_pending
        assign(s, job_obj.id, task.phase, task.index, node=node)
        assigned.append(key(job_obj, task))
        running.append((job_obj.id, task.phase, task.index, node))
    assert not running
    assert len(assigned) == len(set(assigned)) == sum(len(s.jobs[j].maps) + len(s.jobs[j].reduces) for j in jobs)
    assert [j.id for j in jobs_to_assemble(s)] == jobs
    for j in jobs:
        assert all(t.attempt == 1 and t.state == "done" for t in s.jobs[j].maps + s.jobs[j].reduces)
    # Reduces of a job were never assigned before all of its maps.
    for j in jobs:
        first_reduce = min(assigned.index((j, "reduce", r)) for r in range(s.jobs[j].n_reduce))
        assert all(assigned.index((j, "map", t.index)) < first_reduce for t in s.jobs[j].maps)


def test_an_iterative_round_gives_a_chunk_to_the_member_that_mapped_it_before() -> None:
    """Round 2 of a training job: each member first gets the chunks it mapped in round 1
    (it keeps their parsed arrays), although another member holds the input; and the
    round's model and the next round come from the state's `round` order."""
    s = fresh()
    inputs = [{"name": "d.csv", "size": 16, "file_id": "d0", "holders": ["a"]}]
    ok(s, {"op": "submit", "id": "t", "kind": "train", "inputs": inputs, "n_reduce": 1, "chunk_size": 4,
           "form": {}, "now": 1.0, "spec": {"builtin": "train", "iterate": True}})
    job = s.jobs["t"]
    for t in job.maps:
        who = "b" if t.index % 2 else "a"
        assign(s, "t", "map", t.index, who)
        complete(s, "t", "map", t.index, who)
    run_all(s, "t", "reduce")
    assert job.state == "assembling" and [j.id for j in jobs_to_assemble(s)] == ["t"]
    stale = s.apply({"op": "round", "job": "t", "term": TERM, "round": 1, "model": {"w": 1}, "done": False})
    assert stale["ok"] is False and job.step == 0  # not the round it is in: refused, nothing changed
    ok(s, {"op": "round", "job": "t", "term": TERM, "round": 0, "model": {"w": [1.0, 2.0]}, "done": False})
    assert job.step == 1 and job.state == "mapping" and job.spec["model"] == {"w": [1.0, 2.0]}
    assert [(t.start, t.end) for t in job.current("map")] == [(t.start, t.end) for t in job.maps if t.step == 0]
    first = picked(s, "b")
    assert first is not None and first[2] % 2 == 1  # b's own chunk from round 1, not a's local ones


def _round(s: State, job: str, who: dict[int, str], seconds: float) -> None:
    """Run the job's current round: map chunk k on who[k], each taking ``seconds``; then the
    master's `round` order."""
    for t in s.jobs[job].current("map"):
        ok(s, {"op": "assign", "job": job, "phase": "map", "index": t.index, "node": who[t.index % len(who)],
               "term": TERM, "lease_until": 9.0})
        ok(s, {"op": "complete", "job": job, "phase": "map", "index": t.index, "attempt": t.attempt,
               "node": who[t.index % len(who)], "term": TERM, "stats": {"seconds": seconds}})
    run_all(s, job, "reduce")
    ok(s, {"op": "round", "job": job, "term": TERM, "round": s.jobs[job].step, "model": {}, "done": False})


@pytest.mark.parametrize("scan_seconds,stolen", [(1.0, False), (0.05, True)])
def test_a_busy_member_keeps_its_warm_maps_unless_parsing_anew_is_quicker(scan_seconds: float, stolen: bool) -> None:
    """Round 3: a mapped chunks 0-2 before, b chunk 3. b, done with its own, does not take
    a's while a is at work on the round and would get to them before b could parse one
    (warm 0.1 s a map there, the scan took ``scan_seconds``): the second of a's, one map
    ahead in a's queue, goes to b only when its scan was quicker than a warm map."""
    s = fresh()
    inputs = [{"name": "d.csv", "size": 16, "file_id": "d0", "holders": ["a", "b"]}]
    ok(s, {"op": "submit", "id": "t", "kind": "train", "inputs": inputs, "n_reduce": 1, "chunk_size": 4,
           "form": {}, "now": 1.0, "spec": {"builtin": "train", "iterate": True}})
    who = {0: "a", 1: "a", 2: "a", 3: "b"}
    _round(s, "t", who, scan_seconds)
    _round(s, "t", who, 0.1)
    job = s.jobs["t"]
    mine = picked(s, "b")
    assert mine is not None and mine[2] % 4 == 3
    assign(s, "t", "map", mine[2], "b")
    assert picked(s, "b") is not None  # a is not at work on the round: nothing is kept for it
    first = picked(s, "a")
    assert first is not None and first[2] % 4 == 0
    assign(s, "t", "map", first[2], "a")
    got = picked(s, "b")
    assert (got is not None and got[2] % 4 == 2) if stolen else got is None
    attempt = job.maps[first[2]].attempt
    ok(s, {"op": "complete", "job": "t", "phase": "map", "index": first[2], "attempt": attempt, "node": "a",
           "term": TERM, "stats": {"seconds": 0.1, "ended": 100.0}})
    between = pick_task(s, "b", set(), now=100.2)  # a between two maps still counts as at work
    assert (between is not None) if stolen else between is None
    later = pick_task(s, "b", set(), now=101.0)  # but not for long: a gone quiet holds nothing
    assert later is not None and later[1].index % 4 in (1, 2)
    assert job.step == 2
