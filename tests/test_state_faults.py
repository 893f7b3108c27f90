"""State machine: the fault-handling commands (release, lost, redo) and first-completion-wins."""

from __future__ import annotations

from typing import Any

from pdp.core.state import State

T = 3  # the master's term in these tests


def _state(n_maps: int = 3, n_reduce: int = 2) -> State:
    s = State()
    assert s.apply({"op": "master", "term": T, "name": "m", "data_addr": "a:1"})["ok"]
    res = s.apply({"op": "submit", "id": "j", "kind": "wordcount", "n_reduce": n_reduce, "chunk_size": 10,
                   "inputs": [{"name": "in", "size": 10 * n_maps, "file_id": "j-0", "holders": ["a"]}],
                   "form": {}, "now": 1.0})
    assert res["ok"]
    return s


def _order(op: str, phase: str, index: int, **kw: Any) -> dict[str, Any]:
    return {"op": op, "job": "j", "phase": phase, "index": index, "term": T, **kw}


def _assign(s: State, phase: str, index: int, node: str) -> int:
    res = s.apply(_order("assign", phase, index, node=node, lease_until=99.0))
    assert res["ok"], res
    return int(res["attempt"])


def _complete(s: State, phase: str, index: int, node: str, attempt: int) -> dict[str, Any]:
    return s.apply(_order("complete", phase, index, node=node, attempt=attempt))


def _run_maps(s: State, nodes: list[str]) -> None:
    for i, node in enumerate(nodes):
        assert _complete(s, "map", i, node, _assign(s, "map", i, node))["ok"]


def test_release_puts_the_running_attempt_back_and_counts_the_reason() -> None:
    s = _state()
    attempt = _assign(s, "map", 0, "b")
    assert s.apply(_order("release", "map", 0, attempt=attempt + 1, reason="x", now=2.0))["stale_attempt"]
    assert s.apply(_order("release", "map", 0, attempt=attempt, reason="stalled on b", now=2.0))["ok"]
    task = s.jobs["j"].maps[0]
    assert (task.state, task.node, task.attempt) == ("pending", "", 1)
    assert s.jobs["j"].reruns == {"stalled on b": 1}
    assert _assign(s, "map", 0, "c") == 2


def test_a_released_attempt_cannot_complete() -> None:
    s = _state()
    first = _assign(s, "map", 0, "b")
    s.apply(_order("release", "map", 0, attempt=first, reason="stalled on b", now=2.0))
    second = _assign(s, "map", 0, "c")
    assert _complete(s, "map", 0, "b", first)["stale_attempt"]  # given up on: its result is not taken
    assert _complete(s, "map", 0, "b", second)["not_yours"]
    assert _complete(s, "map", 0, "c", second)["ok"]
    assert s.jobs["j"].maps[0].node == "c"


def test_first_completion_wins_between_a_task_and_its_backup() -> None:
    s = _state()
    first = _assign(s, "map", 0, "b")
    res = s.apply(_order("assign", "map", 0, node="c", lease_until=99.0, backup=True))
    assert res["ok"]
    assert _complete(s, "map", 0, "c", res["attempt"])["ok"]  # the backup finishes first
    assert _complete(s, "map", 0, "b", first)["dup"]
    assert s.jobs["j"].maps[0].node == "c"


def test_release_from_a_workers_report_must_come_from_its_node() -> None:
    s = _state()
    attempt = _assign(s, "map", 0, "b")
    before = repr(s.jobs)
    res = s.apply(_order("release", "map", 0, attempt=attempt, reason="failed on c: boom", failed=True,
                         node="c", now=2.0))
    assert res["not_yours"] and repr(s.jobs) == before and "c" not in s.records
    res = s.apply(_order("release", "map", 0, attempt=attempt, reason="failed on b: boom", failed=True,
                         node="b", now=2.0))
    assert res["ok"] and s.jobs["j"].maps[0].state == "pending" and s.records["b"].failed == 1


def test_repeated_failures_fail_the_job() -> None:
    s = _state()
    for n in range(3):
        attempt = _assign(s, "map", 1, "b")
        res = s.apply(_order("release", "map", 1, attempt=attempt, reason="failed on b: boom", failed=True,
                             max_failures=3, now=5.0))
        assert res["ok"]
    job = s.jobs["j"]
    assert job.state == "failed" and "map 1 failed 3 times" in job.error and job.finished_at == 5.0


def test_lost_member_reruns_its_running_and_needed_tasks() -> None:
    s = _state(n_maps=3)
    _run_maps(s, ["b", "c", "b"])
    assert s.jobs["j"].state == "reducing"
    _assign(s, "reduce", 0, "b")
    res = s.apply({"op": "lost", "node": "b", "term": T})
    assert res == {"ok": True, "jobs": 1}
    job = s.jobs["j"]
    assert [t.state for t in job.maps] == ["pending", "done", "pending"]  # b's outputs are gone
    assert job.reduces[0].state == "pending"
    assert job.state == "mapping"  # back: maps must run again before any reduce
    assert job.reruns == {"member b lost": 1, "map output lost with b": 2}


def test_lost_member_keeps_map_outputs_no_reduce_needs() -> None:
    s = _state(n_maps=2, n_reduce=1)
    _run_maps(s, ["b", "c"])
    assert _complete(s, "reduce", 0, "c", _assign(s, "reduce", 0, "c"))["ok"]
    assert s.jobs["j"].state == "assembling"
    s.apply({"op": "lost", "node": "b", "term": T})
    assert s.jobs["j"].state == "assembling" and s.jobs["j"].reruns == {}


def test_lost_reducer_before_assembly_redoes_its_reduce() -> None:
    s = _state(n_maps=2, n_reduce=2)
    _run_maps(s, ["c", "c"])
    for r, node in enumerate(["b", "c"]):
        assert _complete(s, "reduce", r, node, _assign(s, "reduce", r, node))["ok"]
    s.apply({"op": "lost", "node": "b", "term": T})
    job = s.jobs["j"]
    assert job.state == "reducing" and [t.state for t in job.reduces] == ["pending", "done"]


def test_lost_from_an_old_term_is_refused() -> None:
    s = _state()
    _assign(s, "map", 0, "b")
    assert s.apply({"op": "lost", "node": "b", "term": T - 1})["stale"]
    assert s.jobs["j"].maps[0].state == "running"


def test_redo_only_touches_outputs_of_that_holder() -> None:
    s = _state(n_maps=3)
    _run_maps(s, ["b", "c", "b"])
    res = s.apply({"op": "redo", "job": "j", "phase": "map", "holder": "b", "indexes": [0, 1, 2, 7], "term": T})
    assert res == {"ok": True, "redone": 2}
    assert [t.state for t in s.jobs["j"].maps] == ["pending", "done", "pending"]
    assert s.jobs["j"].state == "mapping"
    assert not s.apply({"op": "redo", "job": "j", "phase": "nope", "holder": "b", "indexes": [], "term": T})["ok"]


def test_a_stalled_attempt_given_up_on_may_still_win_but_only_on_its_own_node() -> None:
    s = _state()
    first = _assign(s, "map", 0, "n2")
    res = s.apply(_order("release", "map", 0, attempt=first, reason="stalled on n2", now=1.0, may_finish=True))
    assert res["ok"]
    second = _assign(s, "map", 0, "n3")
    assert not _complete(s, "map", 0, "n3", first)["ok"]  # not n3's attempt
    assert _complete(s, "map", 0, "n2", first)["ok"]  # the stalled one finished first: it wins
    assert s.jobs["j"].maps[0].node == "n2"
    assert not _complete(s, "map", 0, "n3", second)["ok"]  # the other attempt lost the race


def test_orders_must_carry_the_raft_term_of_their_entry() -> None:
    """The term an order names is checked against the term Raft gives its log entry, not only
    against the master field: an order stamped for another term changes nothing."""
    s = _state()
    before = repr(vars(s.jobs["j"]))
    cmd = {"op": "assign", "job": "j", "phase": "map", "index": 0, "node": "b", "term": s.master["term"],
           "lease_until": 10.0}
    assert s.apply(cmd, raft_term=s.master["term"] + 1)["stale"]
    assert s.apply({"op": "batch", "cmds": [cmd]}, raft_term=s.master["term"] + 1)["results"][0]["stale"]
    assert repr(vars(s.jobs["j"])) == before
    assert s.apply(cmd, raft_term=s.master["term"])["ok"]
    assert s.apply({"op": "master", "term": 9, "name": "x", "data_addr": "x:1"}, raft_term=8)["stale"]
