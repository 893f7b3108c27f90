"""Tests for issue 5's pure policy: fair share by submitter, priority, scores, benching,
bundles of small tasks, backup attempts for stragglers, and cancel (state + scheduler)."""

from __future__ import annotations

import pickle
from typing import Any

import pytest

from pdp.core.scheduler import (QUARANTINE_BASE, QUARANTINE_STREAK, pick_backup, pick_task, pick_tasks, scores)
from pdp.core.state import State

TERM = 3
NODES = ("n1", "n2", "n3")


def ok(s: State, cmd: dict[str, Any]) -> dict[str, Any]:
    res = s.apply(cmd)
    assert res["ok"] is True, res
    return res


def party(nodes: tuple[str, ...] = NODES, cpus: int = 1) -> State:
    s = State()
    ok(s, {"op": "master", "term": TERM, "name": "n1", "data_addr": "n1:1"})
    for n in nodes:
        ok(s, {"op": "member", "name": n, "data_addr": f"{n}:1", "raft_addr": f"{n}:2", "cpus": cpus, "now": 0.0})
    return s


def submit(s: State, job: str, size: int = 16, chunk: int = 4, n_reduce: int = 1, who: str = "ann",
           priority: int = 0) -> None:
    ok(s, {"op": "submit", "id": job, "kind": "wordcount", "n_reduce": n_reduce, "chunk_size": chunk,
           "inputs": [{"name": job, "size": size, "file_id": f"{job}-0", "holders": []}],
           "form": {"submitter": who}, "priority": priority, "now": 1.0})


def assign(s: State, job: str, phase: str, index: int, node: str, backup: bool = False) -> int:
    return ok(s, {"op": "assign", "job": job, "phase": phase, "index": index, "node": node, "term": TERM,
                  "lease_until": 99.0, "backup": backup})["attempt"]


def complete(s: State, job: str, phase: str, index: int, node: str, attempt: int, **stats: Any) -> dict[str, Any]:
    return s.apply({"op": "complete", "job": job, "phase": phase, "index": index, "attempt": attempt, "node": node,
                    "term": TERM, "stats": stats})


def release(s: State, job: str, phase: str, index: int, attempt: int, failed: bool = True,
            now: float = 10.0) -> dict[str, Any]:
    return s.apply({"op": "release", "job": job, "phase": phase, "index": index, "attempt": attempt,
                    "term": TERM, "reason": "failed on x: boom", "failed": failed, "max_failures": 10, "now": now})


# -- fair share and priority ------------------------------------------------------------------


def test_one_submitters_many_jobs_do_not_starve_anothers_one() -> None:
    s = party(cpus=2)
    for k in range(20):
        submit(s, f"ann{k}", who="ann")
    submit(s, "bob0", who="bob")
    got = []
    for node in ("n1", "n2", "n3", "n1", "n2", "n3"):
        job, task = pick_task(s, node, set())  # type: ignore[misc]
        assign(s, job.id, task.phase, task.index, node)
        got.append(job.submitter)
    assert got.count("bob") == 3 and got.count("ann") == 3, got  # alternating: equal shares


def test_equal_shares_count_reserved_tasks() -> None:
    s = party()
    submit(s, "a", who="ann")
    submit(s, "b", who="bob")
    first = pick_task(s, "n1", set())
    assert first is not None and first[0].id == "a"  # a tie: the older job
    second = pick_task(s, "n2", {("a", "map", first[1].index)})
    assert second is not None and second[0].id == "b"  # ann already has one being assigned


def test_higher_priority_first_then_fair_share() -> None:
    s = party()
    submit(s, "low", who="ann")
    submit(s, "high", who="bob", priority=5)
    for _ in range(4):
        got = pick_task(s, "n1", set())
        assert got is not None and got[0].id == "high"
        assign(s, "high", "map", got[1].index, "n1")
    got = pick_task(s, "n1", set())
    assert got is not None and got[0].id == "low"  # nothing pending left in the high job


def test_priority_is_clamped_and_kept_in_dumps() -> None:
    s = party()
    submit(s, "j", priority=1000)
    assert s.jobs["j"].priority == 100
    assert pickle.loads(pickle.dumps(s)).jobs["j"].priority == 100


# -- cancel -----------------------------------------------------------------------------------


def test_cancel_stops_handing_out_and_is_final() -> None:
    s = party()
    submit(s, "j")
    a = assign(s, "j", "map", 0, "n1")
    res = ok(s, {"op": "cancel", "job": "j", "by": "ann@pc", "now": 5.0})
    assert res["ok"]
    job = s.jobs["j"]
    assert job.state == "cancelled" and job.error == "cancelled by ann@pc" and job.finished_at == 5.0
    assert pick_task(s, "n2", set()) is None
    assert complete(s, "j", "map", 0, "n1", a)["inactive"]  # a late completion changes nothing
    assert s.apply({"op": "cancel", "job": "j", "by": "x", "now": 6.0})["inactive"]
    assert "no job" in s.apply({"op": "cancel", "job": "nope", "by": "x", "now": 6.0})["error"]


# -- records and scores -----------------------------------------------------------------------


def test_records_count_done_failed_lost_and_average_throughput() -> None:
    s = party()
    submit(s, "j", size=4 << 20, chunk=1 << 20)
    a = assign(s, "j", "map", 0, "n1")
    assert complete(s, "j", "map", 0, "n1", a, input_bytes=1 << 20, seconds=1.0)["ok"]
    b = assign(s, "j", "map", 1, "n2")
    assert complete(s, "j", "map", 1, "n2", b, input_bytes=1 << 20, seconds=4.0)["ok"]
    c = assign(s, "j", "map", 2, "n3")
    assert release(s, "j", "map", 2, c)["ok"]
    assert s.records["n1"].done == 1 and s.records["n1"].rate == 1 << 20
    assert s.records["n3"].failed == 1 and s.records["n3"].streak == 1
    table = scores(s)
    assert table["n1"].score == 1.0
    assert table["n2"].score == pytest.approx(0.25, abs=0.01)  # a quarter of the fastest's speed
    assert table["n3"].score < 0.5  # unknown speed, but one failure in a row
    d = assign(s, "j", "map", 3, "n3")
    ok(s, {"op": "lost", "node": "n3", "term": TERM, "now": 11.0})
    assert s.records["n3"].lost == 1 and s.records["n3"].streak == 2
    assert s.jobs["j"].maps[3].state == "pending" and d == 1


def test_tiny_tasks_do_not_set_the_rate() -> None:
    s = party()
    submit(s, "j")
    a = assign(s, "j", "map", 0, "n1")
    complete(s, "j", "map", 0, "n1", a, input_bytes=4, seconds=0.001)
    assert s.records["n1"].done == 1 and s.records["n1"].rate == 0.0


def test_a_member_failing_in_a_row_is_benched_while_others_can_work() -> None:
    s = party()
    submit(s, "j", size=64)
    for k in range(QUARANTINE_STREAK):
        got = pick_task(s, "n3", set(), now=10.0)
        assert got is not None
        release(s, "j", "map", got[1].index, assign(s, "j", "map", got[1].index, "n3"), now=10.0)
    assert scores(s)["n3"].benched_until == 10.0 + QUARANTINE_BASE
    assert pick_task(s, "n3", set(), now=11.0) is None
    assert pick_task(s, "n1", set(), now=11.0) is not None
    assert pick_task(s, "n3", set(), now=10.0 + QUARANTINE_BASE + 1) is not None  # cooled off
    got = pick_task(s, "n1", set(), now=11.0)
    assert got is not None
    complete(s, "j", "map", got[1].index, "n1", assign(s, "j", "map", got[1].index, "n1"))
    # a success clears the streak
    got = pick_task(s, "n3", set(), now=200.0)
    assert got is not None
    complete(s, "j", "map", got[1].index, "n3", assign(s, "j", "map", got[1].index, "n3"))
    assert s.records["n3"].streak == 0 and scores(s)["n3"].benched_until == 0.0


def test_when_everyone_is_benched_work_still_goes_out() -> None:
    s = party(nodes=("n1",))
    submit(s, "j", size=64)
    for _ in range(QUARANTINE_STREAK):
        got = pick_task(s, "n1", set(), now=10.0)
        assert got is not None
        release(s, "j", "map", got[1].index, assign(s, "j", "map", got[1].index, "n1"))
    assert pick_task(s, "n1", set(), now=10.0) is not None


def test_a_task_goes_elsewhere_after_failing_on_a_member() -> None:
    s = party()
    submit(s, "j", size=4)
    release(s, "j", "map", 0, assign(s, "j", "map", 0, "n1"))
    assert s.jobs["j"].maps[0].failed_on == ["n1"]
    assert pick_task(s, "n1", set()) is None
    assert pick_task(s, "n2", set()) is not None
    release(s, "j", "map", 0, assign(s, "j", "map", 0, "n2"))
    release(s, "j", "map", 0, assign(s, "j", "map", 0, "n3"))
    assert pick_task(s, "n1", set()) is not None  # every member failed it: anyone may try again


# -- bundles and sizes ----------------------------------------------------------------------


def test_small_maps_go_out_in_bundles_leaving_shares_for_every_slot() -> None:
    s = party()
    submit(s, "j", size=600 * 1024, chunk=4096)  # 150 maps of 4 KiB, 3 slots
    bundle = pick_tasks(s, "n1", set())
    assert len(bundle) == 150 // 6
    assert len({job.id for job, _ in bundle}) == 1 and all(t.phase == "map" for _, t in bundle)
    assert len(pick_tasks(s, "n1", set(), limit=3)) == 3


def test_big_maps_go_out_one_at_a_time() -> None:
    s = party()
    submit(s, "j", size=64 << 20, chunk=8 << 20)
    assert len(pick_tasks(s, "n1", set())) == 1


def test_a_poorly_scored_member_gets_the_smallest_task() -> None:
    s = party()
    submit(s, "j", size=10 << 20, chunk=4 << 20)  # maps of 4, 4 and 2 MiB
    submit(s, "k", size=2 << 20, chunk=1 << 20)
    a = assign(s, "k", "map", 0, "n1")
    complete(s, "k", "map", 0, "n1", a, input_bytes=1 << 20, seconds=0.1)
    b = assign(s, "k", "map", 1, "n2")
    complete(s, "k", "map", 1, "n2", b, input_bytes=1 << 20, seconds=10.0)
    fast, slow = pick_task(s, "n1", set()), pick_task(s, "n2", set())
    assert fast is not None and fast[1].size() == 4 << 20
    assert slow is not None and slow[1].size() == 2 << 20


# -- backups --------------------------------------------------------------------------------


def straggling(s: State) -> dict[tuple[str, str, int, int], tuple[float, int]]:
    """Maps 0-2 done in 1 s each; map 3 running on n3 for 5 s with 10% progress."""
    submit(s, "j", size=4 << 20, chunk=1 << 20)
    for i, node in enumerate(("n1", "n2", "n1")):
        complete(s, "j", "map", i, node, assign(s, "j", "map", i, node), input_bytes=1 << 20, seconds=1.0)
    attempt = assign(s, "j", "map", 3, "n3")
    return {("j", "map", 3, attempt): (5.0, (1 << 20) // 10)}


def test_a_straggler_gets_a_backup_on_a_faster_member() -> None:
    s = party()
    running = straggling(s)
    got = pick_backup(s, "n1", 0.0, running)
    assert got is not None and (got[0].id, got[1].phase, got[1].index) == ("j", "map", 3)
    assert pick_backup(s, "n3", 0.0, running) is None  # not on the member already running it
    attempt = assign(s, "j", "map", 3, "n1", backup=True)
    task = s.jobs["j"].maps[3]
    assert task.runs == {1: "n3", 2: "n1"} and attempt == 2 and s.jobs["j"].backups == 1
    assert pick_backup(s, "n2", 0.0, {**running, ("j", "map", 3, 2): (0.1, 0)}) is None  # one backup at most
    assert not s.apply({"op": "assign", "job": "j", "phase": "map", "index": 3, "node": "n2", "term": TERM,
                        "lease_until": 9.0, "backup": True})["ok"]


def test_first_attempt_to_finish_wins_and_the_other_is_void() -> None:
    s = party()
    straggling(s)
    assign(s, "j", "map", 3, "n1", backup=True)
    assert complete(s, "j", "map", 3, "n1", 2, input_bytes=1 << 20, seconds=1.0)["ok"]
    assert complete(s, "j", "map", 3, "n3", 1)["dup"]
    task = s.jobs["j"].maps[3]
    assert task.state == "done" and task.node == "n1" and task.runs == {}
    assert s.jobs["j"].state == "reducing"


def test_losing_one_of_two_attempts_keeps_the_other_running() -> None:
    s = party()
    straggling(s)
    assign(s, "j", "map", 3, "n1", backup=True)
    ok(s, {"op": "lost", "node": "n3", "term": TERM, "now": 9.0})
    task = s.jobs["j"].maps[3]
    assert task.state == "running" and task.runs == {2: "n1"} and task.node == "n1"
    assert release(s, "j", "map", 3, 1)["stale_attempt"]
    assert release(s, "j", "map", 3, 2, failed=False)["ok"]
    assert task.state == "pending" and task.runs == {}


def test_no_backup_while_tasks_are_pending_or_for_healthy_tasks() -> None:
    s = party()
    running = straggling(s)
    (key, (elapsed, progress)), = running.items()
    assert pick_backup(s, "n1", 0.0, {key: (1.5, progress)}) is None  # not yet twice the median
    assert pick_backup(s, "n1", 0.0, {key: (2.5, int(0.9 * (1 << 20)))}) is None  # almost done
    submit(s, "k", size=8 << 20, chunk=1 << 20)
    assert pick_backup(s, "n1", 0.0, running) is not None  # other jobs do not matter...
    ok(s, {"op": "release", "job": "j", "phase": "map", "index": 3, "attempt": 1, "term": TERM, "reason": "x",
           "now": 1.0})
    assert pick_backup(s, "n1", 0.0, running) is None  # ...but a pending task in its phase does


def test_old_dumps_load_with_running_attempts() -> None:
    s = party()
    submit(s, "j")
    assign(s, "j", "map", 0, "n2")
    task = s.jobs["j"].maps[0]
    data = dict(task.__dict__)
    for name in ("runs", "failed_on"):
        data.pop(name)
    old = object.__new__(type(task))
    old.__setstate__(data)
    assert old.runs == {1: "n2"} and old.failed_on == []
