"""Stateful (hypothesis) test of pdp.core.state: random runs of a party's commands.

A :class:`hypothesis.stateful.RuleBasedStateMachine` plays a master and its members (and
some hostile peers) against one :class:`pdp.core.state.State`: members register and leave,
masters claim terms (sometimes stale ones), users submit multi-step jobs, the master
assigns, completes, releases, redoes, cancels, fails and finishes them (alone or in
batches, stamped with the right Raft term or a wrong one), and garbage arrives too.

After every command the invariants check the transition (nothing raised, ``applied``
counted, a refused command changed nothing, first completion wins, terms and counters do
not go back) and the state (tasks, steps and phases of every active job agree). The whole
command log is replayed on a fresh State at teardown: the same dump must come out.

The bugs this machine found in pdp.core.state (a refused backup counted, a refused leave that
removed its member, a job failed between steps without a finish time, a job's counters
raising on bad stats) are fixed; the tests at the end pin them. One is not: a cancelled
job does not survive a pickle round trip (a strict xfail test).
"""

from __future__ import annotations

import copy
import pickle
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, invariant, multiple, precondition, rule

from pdp.core.state import ACTIVE, MAX_DEPTH, MAX_HOLDERS, ORDERS, State, plain
from pdp.core.statecodec import state_from_plain, state_to_plain

NODES = ("n1", "n2", "n3")  # core members (voters), registered at the start
SPARE = "n4"  # a voter that registers later (or never)
WORKERS = ("w1", "w2")  # members without a Raft seat: they need an invitation
FINAL = ("done", "failed", "cancelled")
TASK_STATES = ("pending", "running", "done")
RERUN_OPS = {"lost", "redo", "leave", "batch"}  # the commands that may send a done task back

# Bugs this machine found, now fixed (each has a test at the end):
# - a refused backup ``assign`` of a running reduce while the job is not reducing still
#   counted ``job.backups`` (the counter was bumped before the phase check);
# - ``leave`` without an int ``term`` removed the member, then raised (KeyError/TypeError);
# - ``Job.counters()`` raised when a done task's ``stats["counters"]`` is a non-empty value
#   that is not a dict ("abc", 7, [1]);
# - a job failed between steps (a reduce reported no stored output) had no finish time.
# Known, not fixed (a strict xfail test at the end; the machine skips what it changes):
# - ``cancel`` leaves a running task with no runs, which ``Task.__setstate__`` takes for a
#   dump older than ``runs`` and fills in: a pickle round trip changes such a state (State
#   snapshots travel as msgpack, pdp.core.statecodec, where the round trip is exact): the pickle
#   check at teardown skips those states.


# -- helpers -------------------------------------------------------------------------------


def plain_state(s: State) -> dict[str, Any]:
    """Everything but the ``applied`` counter, as plain values (a deep copy)."""
    p = state_to_plain(s)
    p.pop("applied")
    return p


def pack(p: Any) -> bytes:
    """Deterministic bytes (msgpack keeps bool, int and float apart, unlike ==)."""
    return msgpack.packb(p, use_bin_type=True)


def dump(s: State) -> bytes:
    """The whole state, ``applied`` included."""
    return pack(state_to_plain(s))


def n_applies(cmd: Any) -> int:
    """How much ``State.applied`` grows for ``cmd``: one per apply(), and a batch (plain,
    with a list of commands) applies each sub-command through apply() too."""
    if isinstance(cmd, dict) and cmd.get("op") == "batch" and plain(cmd) and type(cmd.get("cmds")) is list:
        return 1 + sum(n_applies(c) for c in cmd["cmds"])
    return 1


def changes_nothing(res: Any) -> bool:
    """A refusal, a duplicate submission, or a batch of nothing but those."""
    if not res["ok"] or res.get("dup"):
        return True
    return "results" in res and all(changes_nothing(r) for r in res["results"])


def walk(cmd: Any) -> list[Any]:
    """``cmd`` and, for a batch, every command inside it."""
    out = [cmd]
    if isinstance(cmd, dict) and cmd.get("op") == "batch" and isinstance(cmd.get("cmds"), list):
        for sub in cmd["cmds"]:
            out.extend(walk(sub))
    return out


def counters_of(job: Any) -> dict[str, dict[str, int]]:
    """Job.counters(), computed here independently: sum over done tasks of every step."""
    total: dict[str, dict[str, int]] = {}
    for t in job.maps + job.reduces:
        counters = t.stats.get("counters")
        if t.state != "done" or type(counters) is not dict:
            continue
        for group, names in counters.items():
            if type(names) is dict:
                mine = total.setdefault(group, {})
                for name, n in names.items():
                    if type(n) is int:  # (not a bool)
                        mine[name] = mine.get(name, 0) + n
    return total


def view(s: State) -> dict[str, Any]:
    """What the transition checks compare (task stats are replaced, never changed in place)."""
    return {
        j.id: (j.state, j.step, len(j.maps), len(j.reduces),
               {(t.phase, t.index): (t.state, t.node, t.attempt, t.stats) for t in j.maps + j.reduces},
               j.counters())
        for j in s.jobs.values()
    }


def nested(depth: int) -> Any:
    v: Any = []
    for _ in range(depth):
        v = [v]
    return v


# -- the machine ------------------------------------------------------------------------------


class PartyMachine(RuleBasedStateMachine):
    jobs = Bundle("jobs")

    def __init__(self) -> None:
        super().__init__()
        self.s = State()
        self.log: list[tuple[Any, int | None]] = []
        self.results: list[Any] = []
        self.last: dict[str, Any] | None = None
        self.raised: list[str] = []
        self.sent: dict[int, tuple[tuple[str, str, int], dict[str, Any]]] = {}  # serial -> task, stats
        self.submitted: dict[str, dict[str, Any]] = {}  # job id -> its accepted submit command
        self.unmarked: set[tuple[str, str, int]] = set()  # tasks sent a completion without our stats
        self.next_id = 0
        self.do({"op": "master", "term": 1, "name": "n1", "data_addr": "n1:7001"}, 1)
        for name in NODES:
            self.do({"op": "member", "name": name, "data_addr": f"{name}:7001", "raft_addr": f"{name}:7002",
                     "cpus": 2, "now": 1.0})

    # -- applying --------------------------------------------------------------------------

    def do(self, cmd: Any, raft_term: int | None = None, expect: dict[str, Any] | None = None) -> Any:
        # (the state changes only here: the last command's "after" is this one's "before")
        before = self.last["after"] if self.last is not None else plain_state(self.s)
        before_view = view(self.s)
        applied, term = self.s.applied, self.s.master["term"]
        try:
            res = self.s.apply(copy.deepcopy(cmd), raft_term)
        except BaseException as exc:  # noqa: BLE001 - apply must never raise
            self.raised.append(f"{cmd!r}: {type(exc).__name__}: {exc}")
            res = None
        self.log.append((copy.deepcopy(cmd), raft_term))
        self.results.append(copy.deepcopy(res))
        self.last = {"cmd": cmd, "raft_term": raft_term, "res": res, "expect": expect or {},
                     "before": before, "before_view": before_view, "applied": applied, "term": term,
                     "after": plain_state(self.s)}
        return res

    def raft_term_for(self, data: st.DataObject, cmd: Any) -> int | None:
        """No stamp (a unit test's apply) or the right one (what Raft gives)."""
        if not data.draw(st.booleans(), label="stamped"):
            return None
        if isinstance(cmd, dict) and cmd.get("op") in ORDERS and type(cmd.get("term")) is int:
            return int(cmd["term"])
        return int(self.s.master["term"])

    # -- queries ----------------------------------------------------------------------------

    def term(self, data: st.DataObject) -> int:
        cur = self.s.master["term"]
        return data.draw(st.sampled_from([cur] * 10 + [cur - 1, cur + 1]), label="term")

    def member_names(self) -> list[str]:
        return list(self.s.members) or list(NODES)

    def node(self, data: st.DataObject, avoid: Any = ()) -> str:
        names = [n for n in self.member_names() if n not in avoid] + [n for n in (*WORKERS, SPARE, "ghost")
                                                                     if n not in self.s.members]
        return data.draw(st.sampled_from(names), label="node")

    def current(self, pred: Any) -> list[tuple[Any, Any]]:
        return [(j, t) for j in self.s.active_jobs() for t in j.maps + j.reduces
                if t.step == j.step and pred(j, t)]

    def has_active(self) -> bool:
        return bool(self.s.active_jobs())

    def stats(self, data: st.DataObject, job: Any, task: Any) -> dict[str, Any]:
        serial = len(self.sent)
        stats: dict[str, Any] = {
            "serial": serial,
            "counters": {"io": {"records": data.draw(st.integers(0, 9), label="records"),
                                "bytes": data.draw(st.integers(0, 500), label="bytes")}},
            "input_bytes": task.size(), "seconds": 0.5,
        }
        if data.draw(st.booleans(), label="extra counters"):
            stats["counters"]["extra"] = {"k": 1}
        if task.phase == "reduce" and job.step + 1 < job.steps:
            how = data.draw(st.integers(0, 19), label="output")
            if how <= 17:  # a stored output, the next step's input
                holders = data.draw(st.lists(st.sampled_from(self.member_names()), min_size=1, max_size=2,
                                             unique=True), label="holders")
                stats["output"] = {"file_id": f"o{serial}", "size": data.draw(st.sampled_from([0, 7, 20])),
                                   "holders": holders}
            elif how == 18:
                stats["output"] = {"file_id": f"o{serial}", "size": 3, "holders": []}  # the job fails
            # how == 19: no output at all: the job fails
        self.sent[serial] = ((job.id, task.phase, task.index), copy.deepcopy(stats))
        return stats

    # -- command builders (also used for the sub-commands of batches) ---------------------

    def b_submit(self, data: st.DataObject) -> dict[str, Any]:
        reuse = data.draw(st.integers(0, 9), label="reuse id") == 9 and self.submitted
        if reuse:
            job_id = data.draw(st.sampled_from(sorted(self.submitted)), label="reused id")
            if data.draw(st.booleans(), label="same submission"):
                return copy.deepcopy(self.submitted[job_id])  # a retry: dup, changes nothing
        else:
            job_id = f"j{self.next_id}"
            self.next_id += 1
        sizes = data.draw(st.lists(st.sampled_from([0, 0, 3, 10, 25]), max_size=3), label="sizes")
        inputs = [{"name": f"in{k}.txt", "size": size, "file_id": f"{job_id}-{k}",
                   "holders": data.draw(st.lists(st.sampled_from(self.member_names()), min_size=1, max_size=2,
                                                 unique=True), label="input holders")}
                  for k, size in enumerate(sizes)]
        cmd = {"op": "submit", "id": job_id, "kind": "wordcount", "inputs": inputs,
               "n_reduce": data.draw(st.integers(1, 3), label="n_reduce"),
               "chunk_size": data.draw(st.sampled_from([10, 16, 32]), label="chunk"),
               "steps": data.draw(st.integers(1, 3), label="steps"),
               "form": {"source": "test", "submitter": "ann"}, "now": 10.0}
        bad = data.draw(st.integers(0, 11), label="bad submission")
        if bad == 1:
            cmd["n_reduce"] = 0
        elif bad == 2:
            cmd["steps"] = data.draw(st.sampled_from([0, 17]), label="bad steps")
        elif bad == 3 and inputs:
            inputs[0]["holders"] = ["stranger"]  # not a member of the party
        return cmd

    def b_assign(self, data: st.DataObject) -> dict[str, Any] | None:
        backup = data.draw(st.integers(0, 3), label="backup") == 3
        if backup:
            cands = self.current(lambda j, t: t.state == "running" and len(t.runs) == 1)
        else:  # pending tasks of the current step (reduces too early get refused)
            cands = self.current(lambda j, t: t.state == "pending")
        if not cands:
            return None
        job, task = data.draw(st.sampled_from(cands), label="task")
        cmd = {"op": "assign", "job": job.id, "phase": task.phase, "index": task.index,
               "node": self.node(data, avoid=task.runs.values()), "term": self.term(data),
               "lease_until": 50.0}
        if backup:
            cmd["backup"] = True
        return cmd

    def b_complete(self, data: st.DataObject) -> dict[str, Any] | None:
        cands = self.current(lambda j, t: t.state == "running" or bool(t.given_up))
        if data.draw(st.integers(0, 9), label="complete a done task") == 9:
            cands = [(j, t) for j in self.s.active_jobs() for t in j.maps + j.reduces if t.state == "done"]
        if not cands:
            return None
        job, task = data.draw(st.sampled_from(cands), label="task")
        others = [n for n in self.member_names() if n not in task.runs.values()] or ["ghost"]
        options = list(task.runs.items()) + list(task.given_up.items())  # may win
        options += [(a, others[0]) for a in task.runs]  # not on that node
        options += [(a, n) for a in range(task.attempt + 2) if a not in task.runs for n in others[:1]]
        if task.runs and data.draw(st.integers(0, 3), label="adversarial"):
            attempt, node = data.draw(st.sampled_from(sorted(task.runs.items())), label="attempt, node")
        else:
            attempt, node = data.draw(st.sampled_from(options), label="attempt, node")
        cmd = {"op": "complete", "job": job.id, "phase": task.phase, "index": task.index, "attempt": attempt,
               "node": node, "term": self.term(data), "stats": self.stats(data, job, task)}
        if job.whole and task.phase == "map" and data.draw(st.booleans(), label="whole"):
            cmd["result"], cmd["now"] = {"holders": [node], "size": 3}, 30.0
        return cmd

    def b_release(self, data: st.DataObject) -> dict[str, Any] | None:
        cands = self.current(lambda j, t: t.state == "running")
        if not cands:
            return None
        job, task = data.draw(st.sampled_from(cands), label="task")
        options = sorted(task.runs) * 3 + [task.attempt + 1, 0]  # mostly a running attempt
        attempt = data.draw(st.sampled_from(options), label="attempt")
        failed = data.draw(st.booleans(), label="failed")
        cmd = {"op": "release", "job": job.id, "phase": task.phase, "index": task.index, "attempt": attempt,
               "reason": "failed: boom" if failed else "stalled: slow", "failed": failed,
               "max_failures": data.draw(st.sampled_from([0, 2, 3]), label="max_failures"),
               "now": 40.0, "term": self.term(data)}
        if not failed and data.draw(st.booleans(), label="may_finish"):
            cmd["may_finish"] = True
        who = data.draw(st.integers(0, 3), label="reporter")  # 0, 1: the master's own decision
        if who == 2:
            cmd["node"] = task.runs.get(attempt, "n1")
        elif who == 3:
            cmd["node"] = self.node(data, avoid=task.runs.values())
        return cmd

    def b_lost(self, data: st.DataObject) -> dict[str, Any]:
        return {"op": "lost", "node": self.node(data), "term": self.term(data), "now": 45.0}

    def b_redo(self, data: st.DataObject) -> dict[str, Any] | None:
        cands = self.current(lambda j, t: t.state == "done")
        if not cands:
            return None
        job, task = data.draw(st.sampled_from(cands), label="task")
        same = [t.index for t in job.tasks(task.phase) if t.state == "done" and t.node == task.node]
        indexes = data.draw(st.lists(st.sampled_from(same + [-1, 999]), min_size=1, max_size=3), label="indexes")
        return {"op": "redo", "job": job.id, "holder": task.node, "phase": task.phase, "indexes": indexes,
                "term": self.term(data)}

    def b_master(self, data: st.DataObject) -> dict[str, Any]:
        cur = self.s.master["term"]
        return {"op": "master", "term": cur + data.draw(st.sampled_from([1, 0, 2, -1]), label="delta"),
                "name": data.draw(st.sampled_from(NODES), label="master"), "data_addr": "m:7001"}

    def b_member(self, data: st.DataObject) -> dict[str, Any]:
        name = data.draw(st.sampled_from([*NODES, SPARE]), label="member")
        addr = f"{name}:7001" if data.draw(st.integers(0, 4), label="addr") else "elsewhere:1"
        return {"op": "member", "name": name, "data_addr": addr, "raft_addr": f"{name}:7002",
                "cpus": data.draw(st.integers(1, 8), label="cpus"), "now": 2.0}

    def b_fail(self, data: st.DataObject) -> dict[str, Any] | None:
        active = self.s.active_jobs()
        if not active:
            return None
        job = data.draw(st.sampled_from(active), label="job")
        return {"op": "fail", "job": job.id, "term": self.term(data), "error": "bad input", "now": 60.0}

    def b_finish(self, data: st.DataObject) -> dict[str, Any] | None:
        jobs = [j for j in self.s.jobs.values() if j.state == "assembling"] or list(self.s.jobs.values())
        if not jobs:
            return None
        job = data.draw(st.sampled_from(jobs), label="job")
        return {"op": "finish", "job": job.id, "term": self.term(data), "now": 70.0,
                "result": {"holder": "n1", "size": 42}}

    def b_order(self, data: st.DataObject) -> dict[str, Any] | None:
        """Any order (a command that must carry the current Raft term)."""
        build = data.draw(st.sampled_from([self.b_assign, self.b_complete, self.b_release, self.b_lost,
                                           self.b_redo, self.b_master, self.b_fail, self.b_finish]),
                          label="order")
        return build(data)

    # -- rules --------------------------------------------------------------------------------

    @rule(data=st.data(), what=st.integers(0, 2))
    def membership(self, data: st.DataObject, what: int) -> None:
        """A core member registers (again, or under a taken name); a worker without a Raft seat
        is invited and registers (one batch) or registers uninvited; a member leaves."""
        if what == 0:
            cmd = self.b_member(data)
        elif what == 1:
            name = data.draw(st.sampled_from(WORKERS), label="worker")
            cmd = {"op": "member", "name": name, "data_addr": f"{name}:7001", "raft_addr": "", "cpus": 1,
                   "now": 3.0, "voter": False}
            if data.draw(st.integers(0, 3), label="invited"):
                cmd = {"op": "batch", "cmds": [{"op": "invite", "name": name, "by": "ann", "now": 3.0}, cmd]}
        else:  # (sometimes without a whole-number term: refused, the member stays)
            name = data.draw(st.sampled_from([*WORKERS, *NODES]), label="leaving")
            cmd = {"op": "leave", "name": name, "term": self.term(data)}
            bad = data.draw(st.integers(0, 7), label="bad term")
            if bad == 1:
                del cmd["term"]
            elif bad == 2:
                cmd["term"] = data.draw(st.sampled_from([None, "x", 1.5, [1]]), label="term value")
        self.do(cmd, self.raft_term_for(data, cmd))

    @rule(data=st.data())
    def claim_master(self, data: st.DataObject) -> None:
        cmd = self.b_master(data)
        expect = {"ok": False} if cmd["term"] < self.s.master["term"] else {"ok": True}
        self.do(cmd, self.raft_term_for(data, cmd), expect)

    @precondition(lambda self: len(self.s.active_jobs()) < 4)  # (let the jobs get through their steps)
    @rule(target=jobs, data=st.data())
    def submit(self, data: st.DataObject) -> Any:
        cmd = self.b_submit(data)
        res = self.do(cmd, self.raft_term_for(data, cmd))
        if res and res["ok"]:
            self.submitted.setdefault(cmd["id"], copy.deepcopy(cmd))
            return cmd["id"]
        return multiple()

    @precondition(lambda self: self.has_active())
    @rule(data=st.data())
    def assign(self, data: st.DataObject) -> None:
        cmd = self.b_assign(data)
        if cmd is not None:
            self.do(cmd, self.raft_term_for(data, cmd))

    @precondition(lambda self: self.has_active())
    @rule(data=st.data())
    def complete(self, data: st.DataObject) -> None:
        cmd = self.b_complete(data)
        if cmd is not None:
            self.do(cmd, self.raft_term_for(data, cmd))

    @precondition(lambda self: self.has_active())
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        cmd = self.b_release(data)
        if cmd is not None:
            self.do(cmd, self.raft_term_for(data, cmd))

    @precondition(lambda self: self.has_active())
    @rule(data=st.data(), oldest=st.booleans())
    def worker_round(self, data: st.DataObject, oldest: bool) -> None:
        """The master's batch: start the pending tasks of a job's current phase and, as if the
        workers answered at once, complete them (on their nodes, with stats and outputs); an
        assembling job is finished."""
        active = self.s.active_jobs()
        job = active[0] if oldest else data.draw(st.sampled_from(active), label="job")
        if job.state == "assembling":
            self.do({"op": "finish", "job": job.id, "term": self.s.master["term"], "now": 70.0,
                     "result": {"holder": "n1", "size": 42}}, self.s.master["term"], expect={"ok": True})
            return
        phase = "reduce" if job.state == "reducing" else "map"
        pending = [t for t in job.current(phase) if t.state == "pending"][:6]
        term, cmds = self.s.master["term"], []
        for t in pending:
            node = data.draw(st.sampled_from(self.member_names()), label="node")
            cmds.append({"op": "assign", "job": job.id, "phase": phase, "index": t.index, "node": node,
                         "term": term, "lease_until": 50.0})
            cmds.append({"op": "complete", "job": job.id, "phase": phase, "index": t.index, "node": node,
                         "attempt": t.attempt + 1, "term": term, "stats": self.stats(data, job, t)})
        self.do({"op": "batch", "cmds": cmds}, term)

    @rule(data=st.data())
    def lost(self, data: st.DataObject) -> None:
        cmd = self.b_lost(data)
        self.do(cmd, self.raft_term_for(data, cmd))

    @precondition(lambda self: self.has_active())
    @rule(data=st.data())
    def redo(self, data: st.DataObject) -> None:
        cmd = self.b_redo(data)
        if cmd is not None:
            self.do(cmd, self.raft_term_for(data, cmd))

    @rule(job=jobs, data=st.data(), how=st.integers(0, 7))
    def stop_job(self, job: str, data: st.DataObject, how: int) -> None:
        """A user cancels a job, or the master fails it (rarely: jobs should get far)."""
        if how == 0:
            was = self.s.jobs[job].state
            self.do({"op": "cancel", "job": job, "by": "ann", "now": 80.0}, expect={"ok": was in ACTIVE})
        elif how == 1:
            self.do({"op": "fail", "job": job, "term": self.term(data), "error": "bad input", "now": 60.0})

    @rule(data=st.data())
    def finish(self, data: st.DataObject) -> None:
        cmd = self.b_finish(data)
        if cmd is not None:
            self.do(cmd, self.raft_term_for(data, cmd))

    @rule(data=st.data())
    def batch(self, data: st.DataObject) -> None:
        """Several orders in one entry, all built against the state before it (some go stale)."""
        builders = [self.b_assign, self.b_complete, self.b_release, self.b_redo, self.b_lost, self.b_submit,
                    self.b_member, self.b_master, self.b_finish]
        cmds: list[Any] = []
        for build in data.draw(st.lists(st.sampled_from(builders), max_size=4), label="batch"):
            cmd = build(data)
            if cmd is not None:
                cmds.append(cmd)
        nest: bool = data.draw(st.booleans(), label="nest")
        if cmds and nest:
            cmds = [{"op": "batch", "cmds": cmds[:2]}, *cmds[2:]]
        cmd = {"op": "batch", "cmds": cmds}
        self.do(cmd, self.raft_term_for(data, cmd))

    @rule(data=st.data(), delta=st.sampled_from([1, -1, 2, -3]))
    def wrong_raft_term(self, data: st.DataObject, delta: int) -> None:
        """An order in an entry of another Raft term (a cut-off old leader's): refused."""
        cmd = self.b_order(data)
        if cmd is not None:
            self.do(cmd, cmd["term"] + delta, expect={"ok": False, "stale": True})

    @rule(data=st.data(), kind=st.integers(0, 7))
    def garbage(self, data: st.DataObject, kind: int) -> None:
        cmd: Any
        if kind == 0:
            self.do({"op": "frobnicate", "term": self.s.master["term"]}, expect={"ok": False})
        elif kind == 1:
            junk: Any = data.draw(st.sampled_from([None, 5, "submit", [], ("op", "assign"), 1.5, {}, {"op": 3},
                                                   {"op": None}, {"op": ["assign"]}]), label="junk")
            self.do(junk, expect={"ok": False})
        elif kind in (2, 3):  # bytes inside, or nesting too deep: refused whole
            cmd = self.b_order(data) or self.b_submit(data)
            cmd["extra"] = b"\x00bytes" if kind == 2 else nested(MAX_DEPTH)
            assert not plain(cmd)
            if data.draw(st.booleans(), label="inside a batch"):
                cmd = {"op": "batch", "cmds": [self.b_lost(data), cmd]}
            self.do(cmd, expect={"ok": False, "bad_request": True})
        elif kind == 4:  # batches nested past MAX_DEPTH
            cmd = self.b_lost(data)
            for _ in range(MAX_DEPTH // 2 + 1):
                cmd = {"op": "batch", "cmds": [cmd]}
            self.do(cmd, expect={"ok": False, "bad_request": True})
        elif kind in (5, 6):  # a key missing, or a value of the wrong type (never on leave)
            build = data.draw(st.sampled_from([self.b_assign, self.b_complete, self.b_release, self.b_redo,
                                               self.b_lost, self.b_submit, self.b_member, self.b_master,
                                               self.b_fail, self.b_finish]), label="builder")
            cmd = build(data)
            if cmd is None:
                return
            key = data.draw(st.sampled_from(sorted(k for k in cmd if k != "op")), label="key")
            if kind == 5:
                del cmd[key]
            else:
                cmd[key] = data.draw(st.sampled_from([None, "x", [], {}, -1, True, 1.5, [0], {"a": 1}]),
                                     label="value")
            if cmd["op"] == "complete" and key == "stats":
                self.unmarked.add((str(cmd["job"]), str(cmd["phase"]), int(cmd["index"])))
            self.do(cmd, self.raft_term_for(data, cmd))
        else:  # a stats value that is not a dict, or hostile counters
            cmd = self.b_complete(data) if self.has_active() else None
            if cmd is None:
                return
            stats = cmd["stats"]
            hostile = data.draw(st.sampled_from([5, "xy", [1], {"g": 3}, {"g": {"n": "many", "m": True}},
                                                 {"g": {"n": 2}, "h": [1]}, None, {}, [], "abc", 7, [2]]),
                                label="hostile")
            if hostile in (5, "xy", [1]):
                cmd["stats"] = hostile  # not a dict: refused
            else:
                stats["counters"] = hostile
                self.sent[stats["serial"]] = (self.sent[stats["serial"]][0], copy.deepcopy(stats))
            self.do(cmd, self.raft_term_for(data, cmd))

    # -- invariants: the last transition --------------------------------------------------------

    @invariant()
    def apply_never_raised(self) -> None:
        assert not self.raised, self.raised

    @invariant()
    def last_command_was_counted_and_refusals_changed_nothing(self) -> None:
        last = self.last
        if last is None:
            return
        cmd, res, expect = last["cmd"], last["res"], last["expect"]
        assert isinstance(res, dict) and type(res.get("ok")) is bool, res
        if not res["ok"]:
            assert isinstance(res.get("error"), str) and res["error"], res
        for key, value in expect.items():
            assert res.get(key) == value, (key, value, cmd, res)
        assert self.s.applied == last["applied"] + n_applies(cmd), (cmd, res)
        if changes_nothing(res):
            assert pack(last["after"]) == pack(last["before"]), \
                f"refused command changed the state: {cmd!r} -> {res!r}"

    @invariant()
    def terms_never_go_down(self) -> None:
        if self.last is not None:
            assert self.s.master["term"] >= self.last["term"]

    @invariant()
    def finished_jobs_never_change(self) -> None:
        if self.last is None:
            return
        before, after = self.last["before"]["jobs"], self.last["after"]["jobs"]
        assert set(before) <= set(after)
        for job_id, job in before.items():
            if job["state"] in FINAL:
                assert pack(after[job_id]) == pack(job), f"finished job {job_id} changed"

    @invariant()
    def first_completion_wins_and_counters_only_grow(self) -> None:
        if self.last is None:
            return
        op = self.last["cmd"].get("op") if isinstance(self.last["cmd"], dict) else None
        now = view(self.s)
        for job_id, (o_state, o_step, o_maps, o_reduces, o_tasks, o_counters) in self.last["before_view"].items():
            n_state, n_step, n_maps, n_reduces, n_tasks, n_counters = now[job_id]
            job = self.s.jobs[job_id]
            assert n_step >= o_step and n_maps >= o_maps and n_reduces >= o_reduces
            rerun = False
            for key, (state, node, attempt, stats) in o_tasks.items():
                n_task_state, n_node, n_attempt, n_stats = n_tasks[key]
                assert n_attempt >= attempt, f"attempt of {job_id} {key} went back"
                if state == "done":
                    if n_task_state == "done":
                        assert (n_node, n_stats) == (node, stats), f"{job_id} {key}: a later completion replaced it"
                    else:  # the output was lost: the task runs again
                        assert n_task_state == "pending" and n_stats == {} and op in RERUN_OPS, (job_id, key, op)
                        rerun = True
            for key, (state, node, attempt, stats) in n_tasks.items():
                if state == "done" and o_tasks.get(key, ("pending",))[0] != "done":
                    serial = stats.get("serial")
                    if serial is None:  # a small job's reduce, done within its map's task, or garbage
                        assert (job.whole and key[0] == "reduce" and job.state == "done") \
                            or (job_id, *key) in self.unmarked, (job_id, key, stats)
                    else:
                        assert self.sent[serial] == ((job_id, *key), stats), (job_id, key, stats)
            if n_state in ACTIVE and not rerun:
                for group, names in o_counters.items():
                    for name, n in names.items():
                        assert n_counters.get(group, {}).get(name, 0) >= n, (job_id, group, name)

    # -- invariants: the state --------------------------------------------------------------

    @invariant()
    def jobs_are_consistent(self) -> None:
        assert self.s.next_seq == len(self.s.jobs)
        for job in self.s.jobs.values():
            assert job.state in (*ACTIVE, *FINAL), job.state
            assert [t.index for t in job.maps] == list(range(len(job.maps)))
            assert [t.index for t in job.reduces] == list(range(len(job.reduces)))
            assert 0 <= job.step < job.steps
            assert len(job.reduces) == job.n_reduce * (job.step + 1)
            assert [t.step for t in job.reduces] == [i // job.n_reduce for i in range(len(job.reduces))]
            assert [t.step for t in job.maps] == sorted(t.step for t in job.maps)
            assert job.counters() == counters_of(job)
            if job.state == "done":
                assert job.step == job.steps - 1 and all(t.state == "done" for t in job.maps + job.reduces)
            if job.state not in ACTIVE:
                continue
            for t in job.maps + job.reduces:
                assert t.state in TASK_STATES, t.state
                assert t.step <= job.step
                if t.step != job.step:
                    assert t.state == "done", f"{job.id}: {t.phase} {t.index} of step {t.step} is {t.state}"
                if t.state == "running":
                    assert 1 <= len(t.runs) <= 2 and t.node in t.runs.values(), t
                    assert all(1 <= a <= t.attempt for a in t.runs), t
                else:
                    assert t.runs == {}, t
                if t.state == "done":
                    assert t.node and t.attempt >= 1, t
            maps, reduces = job.current("map"), job.current("reduce")
            if not all(t.state == "done" for t in maps):
                assert job.state in ("queued", "mapping"), (job.id, job.state)
                if job.state == "queued":
                    assert job.step == 0 and not any(t.attempt for t in maps)
            elif not all(t.state == "done" for t in reduces):
                assert job.state == "reducing", (job.id, job.state)
            else:
                assert job.state == "assembling" and job.step == job.steps - 1, (job.id, job.state, job.step)
            if job.step == 0:
                assert len(maps) == sum(-(-inp["size"] // job.chunk_size) for inp in job.inputs)
            else:  # the last step's reduce outputs, one map each
                outputs = [t.stats["output"] for t in job.reduces if t.step == job.step - 1]
                assert job.carried == [{"name": f"step {job.step} output {k}", "size": out["size"],
                                        "file_id": out["file_id"], "holders": out["holders"][:MAX_HOLDERS]}
                                       for k, out in enumerate(outputs)]
                assert [(t.input, t.start, t.end) for t in maps] == [(k, 0, out["size"])
                                                                     for k, out in enumerate(outputs)]

    # -- determinism ----------------------------------------------------------------------------

    def teardown(self) -> None:
        """The same log on a fresh State: the same results and the same dump; snapshots too."""
        if self.raised:
            return
        replica = State()
        results = [replica.apply(copy.deepcopy(cmd), raft_term) for cmd, raft_term in self.log]
        assert results == self.results
        assert dump(replica) == dump(self.s)
        assert replica.applied == self.s.applied
        if not any(t.state == "running" and not t.runs for j in self.s.jobs.values() for t in j.maps + j.reduces):
            assert dump(pickle.loads(pickle.dumps(self.s))) == dump(self.s)  # (a pickle: see KNOWN below)
        assert dump(state_from_plain(state_to_plain(self.s))) == dump(self.s)


PartyMachine.TestCase.settings = settings(
    max_examples=40, stateful_step_count=100, deadline=None, derandomize=True, database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large],
)
TestPartyMachine = PartyMachine.TestCase


# -- known bugs of pdp.core.state (minimal reproductions) -------------------------------------------------


def _job_with_a_running_reduce_while_mapping() -> State:
    """One job, maps done on n1, reduce 0 running on n2, then map 0 redone: mapping again."""
    s = State()
    assert s.apply({"op": "master", "term": 1, "name": "n1", "data_addr": "n1:1"})["ok"]
    for name in ("n1", "n2", "n3"):
        assert s.apply({"op": "member", "name": name, "data_addr": name, "raft_addr": name, "cpus": 1,
                        "now": 0.0})["ok"]
    assert s.apply({"op": "submit", "id": "j", "kind": "wc", "n_reduce": 1, "chunk_size": 10, "form": {},
                    "inputs": [{"name": "a", "size": 20, "file_id": "f", "holders": ["n1"]}], "now": 1.0})["ok"]

    def order(op: str, phase: str, index: int, **kw: Any) -> dict[str, Any]:
        return {"op": op, "job": "j", "phase": phase, "index": index, "term": 1, **kw}

    for i in (0, 1):
        assert s.apply(order("assign", "map", i, node="n1", lease_until=9.0))["ok"]
        assert s.apply(order("complete", "map", i, node="n1", attempt=1))["ok"]
    assert s.apply(order("assign", "reduce", 0, node="n2", lease_until=9.0))["ok"]
    assert s.apply({"op": "redo", "job": "j", "term": 1, "holder": "n1", "phase": "map", "indexes": [0]})["ok"]
    assert s.jobs["j"].state == "mapping" and s.jobs["j"].reduces[0].state == "running"
    return s


def test_refused_backup_of_a_reduce_changes_nothing() -> None:
    s = _job_with_a_running_reduce_while_mapping()
    before = plain_state(s)
    res = s.apply({"op": "assign", "job": "j", "phase": "reduce", "index": 0, "node": "n3", "term": 1,
                   "lease_until": 9.0, "backup": True})
    assert res["ok"] is False
    assert pack(plain_state(s)) == pack(before), f"job.backups is now {s.jobs['j'].backups}"


@pytest.mark.parametrize("term", [None, "x", "missing"])
def test_refused_leave_changes_nothing(term: Any) -> None:
    s = State()
    assert s.apply({"op": "master", "term": 1, "name": "n1", "data_addr": "n1:1"})["ok"]
    assert s.apply({"op": "invite", "name": "w1", "by": "ann", "now": 0.0})["ok"]
    assert s.apply({"op": "member", "name": "w1", "data_addr": "w1", "raft_addr": "", "cpus": 1, "now": 0.0,
                    "voter": False})["ok"]
    cmd: dict[str, Any] = {"op": "leave", "name": "w1", "term": term}
    if term == "missing":
        del cmd["term"]
    before = plain_state(s)
    res = s.apply(cmd)
    assert res["ok"] is False
    assert pack(plain_state(s)) == pack(before), "the member was removed by a refused leave"


def test_a_job_failed_between_steps_has_a_finish_time() -> None:
    s = State()
    assert s.apply({"op": "master", "term": 1, "name": "n1", "data_addr": "n1:1"})["ok"]
    assert s.apply({"op": "submit", "id": "j", "kind": "wc", "n_reduce": 1, "chunk_size": 10, "form": {},
                    "steps": 2, "inputs": [], "now": 100.0})["ok"]
    assert s.jobs["j"].state == "reducing"  # no maps
    assert s.apply({"op": "assign", "job": "j", "phase": "reduce", "index": 0, "node": "n1", "term": 1,
                    "lease_until": 9.0})["ok"]
    assert s.apply({"op": "complete", "job": "j", "phase": "reduce", "index": 0, "node": "n1", "attempt": 1,
                    "term": 1, "now": 150.0, "stats": {}})["ok"]  # no "output"
    job = s.jobs["j"]
    assert job.state == "failed" and "no stored output" in job.error
    assert job.finished_at >= job.submitted_at, job.finished_at


@pytest.mark.parametrize("counters", ["abc", 7, [1]])
def test_counters_of_a_job_with_bad_counters_do_not_raise(counters: Any) -> None:
    """Job.counters() raised AttributeError on a done task whose stats carried "counters" that
    are not a dict (the completion is accepted as is)."""
    s = State()
    assert s.apply({"op": "master", "term": 1, "name": "n1", "data_addr": "n1:1"})["ok"]
    assert s.apply({"op": "submit", "id": "j", "kind": "wc", "n_reduce": 1, "chunk_size": 10, "form": {},
                    "inputs": [{"name": "a", "size": 20, "file_id": "f", "holders": ["n1"]}], "now": 1.0})["ok"]
    assert s.apply({"op": "assign", "job": "j", "phase": "map", "index": 0, "node": "n1", "term": 1,
                    "lease_until": 9.0})["ok"]
    res = s.apply({"op": "complete", "job": "j", "phase": "map", "index": 0, "node": "n1", "attempt": 1,
                   "term": 1, "stats": {"counters": counters}})
    if res["ok"]:  # (refusing such stats would do too)
        assert s.jobs["j"].counters() == {}


@pytest.mark.xfail(strict=True, reason="cancel leaves running tasks without runs; Task.__setstate__ takes that "
                                       "for a dump older than runs and fills runs in: a pickle round trip "
                                       "changes the state")
def test_a_cancelled_job_survives_a_pickle_round_trip() -> None:
    s = State()
    assert s.apply({"op": "master", "term": 1, "name": "n1", "data_addr": "n1:1"})["ok"]
    assert s.apply({"op": "submit", "id": "j", "kind": "wc", "n_reduce": 1, "chunk_size": 10, "form": {},
                    "inputs": [{"name": "a", "size": 20, "file_id": "f", "holders": ["n1"]}], "now": 1.0})["ok"]
    assert s.apply({"op": "assign", "job": "j", "phase": "map", "index": 0, "node": "n1", "term": 1,
                    "lease_until": 9.0})["ok"]
    assert s.apply({"op": "cancel", "job": "j", "by": "ann", "now": 2.0})["ok"]
    restored = pickle.loads(pickle.dumps(s))
    assert dump(restored) == dump(s), restored.jobs["j"].maps[0].runs
