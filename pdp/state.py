"""The replicated state machine: members, the master's term, jobs and their tasks.

Pure and deterministic: ``State.apply(cmd)`` takes a plain dict command (only ints, floats,
strings, bytes, lists and dicts: it travels through the Raft log) and returns a result dict.
It never raises, never reads a clock, random source, file or socket: times and ids come in
as arguments, so every member that applies the same log reaches the same state.

A job is split at submission into map tasks (line-aligned byte ranges of its inputs, the
alignment itself happens where the bytes are) and ``n_reduce`` reduce tasks. Phases::

    queued -> mapping -> reducing -> assembling -> done
          \\________________________________________-> failed

Task states: ``pending -> running -> done``. Every order (assign, complete, fail, finish)
carries the master's Raft term; an order from an older term than the current master's is
refused, so a cut-off old leader cannot change a job.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pdp.split import plan_ranges

Cmd = dict[str, Any]
Result = dict[str, Any]

ACTIVE = ("queued", "mapping", "reducing", "assembling")
MAX_ERROR = 2000


@dataclass
class Member:
    name: str
    data_addr: str
    raft_addr: str
    cpus: int
    joined_at: float


@dataclass
class Task:
    phase: str  # "map" | "reduce"
    index: int
    input: int = 0  # map: index into Job.inputs
    start: int = 0  # map: byte range [start, end) of that input (not yet line-aligned)
    end: int = 0
    state: str = "pending"
    node: str = ""  # running: the node holding it; done: the node holding its output
    attempt: int = 0
    term: int = 0
    lease_until: float = 0.0
    stats: dict[str, Any] = field(default_factory=dict)


@dataclass
class Job:
    id: str
    seq: int
    kind: str
    inputs: list[dict[str, Any]]  # {"name", "size", "file_id", "holders": [node names]}
    n_reduce: int
    chunk_size: int
    form: dict[str, Any]  # the standard form: source, data_type, size, comment, submitter, ...
    submitted_at: float
    state: str = "queued"
    error: str = ""
    maps: list[Task] = field(default_factory=list)
    reduces: list[Task] = field(default_factory=list)
    result: dict[str, Any] = field(default_factory=dict)
    finished_at: float = 0.0

    def tasks(self, phase: str) -> list[Task]:
        return self.maps if phase == "map" else self.reduces

    def counts(self) -> dict[str, int]:
        return {
            "maps": len(self.maps),
            "maps_done": sum(t.state == "done" for t in self.maps),
            "reduces": len(self.reduces),
            "reduces_done": sum(t.state == "done" for t in self.reduces),
        }


def _err(message: str, **extra: Any) -> Result:
    return {"ok": False, "error": message, **extra}


class State:
    """Everything the party agrees on. Mutated only through :meth:`apply`."""

    def __init__(self) -> None:
        self.members: dict[str, Member] = {}
        self.master: dict[str, Any] = {"term": 0, "name": "", "data_addr": ""}
        self.jobs: dict[str, Job] = {}
        self.next_seq = 0
        self.applied = 0

    # -- entry point ------------------------------------------------------------------

    def apply(self, cmd: Cmd) -> Result:
        """Apply one command; never raises (a raising Raft method would wedge the log)."""
        self.applied += 1
        try:
            op = cmd.get("op") if isinstance(cmd, dict) else None
            handler = _HANDLERS.get(op) if isinstance(op, str) else None
            if handler is None:
                return _err(f"unknown command {op!r}")
            return handler(self, cmd)
        except Exception as exc:  # a bug must not stop the log: report it as a value
            return _err(f"internal error applying {cmd.get('op')!r}: {type(exc).__name__}: {exc}")

    # -- commands ---------------------------------------------------------------------

    def _member(self, c: Cmd) -> Result:
        name = str(c["name"])
        known = self.members.get(name)
        if known is not None and known.raft_addr != str(c["raft_addr"]):
            return _err(f"the name {name!r} is taken by the member at {known.data_addr}; give this node another --name")
        self.members[name] = Member(name, str(c["data_addr"]), str(c["raft_addr"]), int(c["cpus"]), float(c["now"]))
        return {"ok": True}

    def _master(self, c: Cmd) -> Result:
        term = int(c["term"])
        if term < self.master["term"]:
            return _err(f"stale term {term} < {self.master['term']}")
        self.master = {"term": term, "name": str(c["name"]), "data_addr": str(c["data_addr"])}
        return {"ok": True}

    def _submit(self, c: Cmd) -> Result:
        job_id = str(c["id"])
        if job_id in self.jobs:
            return {"ok": True, "dup": True, "id": job_id}
        n_reduce, chunk = int(c["n_reduce"]), int(c["chunk_size"])
        if n_reduce < 1 or chunk < 1:
            return _err("n_reduce and chunk_size must be at least 1")
        inputs = [dict(i) for i in c["inputs"]]
        for inp in inputs:
            inp["holders"] = [str(h) for h in inp.get("holders") or []]
        job = Job(job_id, self.next_seq, str(c["kind"]), inputs, n_reduce, chunk, dict(c["form"]), float(c["now"]))
        for k, inp in enumerate(inputs):
            for start, end in plan_ranges(int(inp["size"]), chunk):
                job.maps.append(Task("map", len(job.maps), input=k, start=start, end=end))
        job.reduces = [Task("reduce", r) for r in range(n_reduce)]
        self.next_seq += 1
        self.jobs[job_id] = job
        self._advance(job)  # inputs that are all empty have no map to wait for
        return {"ok": True, "id": job_id}

    def _check_order(self, c: Cmd) -> tuple[Job | None, Result | None]:
        """Common checks of a master's order: current term, known and active job."""
        term = int(c["term"])
        if term != self.master["term"]:
            return None, _err(f"order from term {term}, current master term is {self.master['term']}", stale=True)
        job = self.jobs.get(str(c["job"]))
        if job is None:
            return None, _err(f"unknown job {c['job']!r}")
        if job.state not in ACTIVE:
            return None, _err(f"job {job.id} is {job.state}", inactive=True)
        return job, None

    def _task(self, job: Job, c: Cmd) -> Task | None:
        if c["phase"] not in ("map", "reduce"):
            return None
        tasks = job.tasks(c["phase"])
        index = int(c["index"])
        return tasks[index] if 0 <= index < len(tasks) else None

    def _assign(self, c: Cmd) -> Result:
        lease_until, node = float(c["lease_until"]), str(c["node"])  # parse before any change
        job, bad = self._check_order(c)
        if job is None:
            return bad or _err("unknown job")
        task = self._task(job, c)
        if task is None:
            return _err(f"no task {c['phase']} {c['index']} in job {job.id}")
        if task.state != "pending":
            return _err(f"task {task.phase} {task.index} of {job.id} is {task.state}", busy=True)
        if task.phase == "reduce" and job.state != "reducing":
            return _err(f"job {job.id} is {job.state}: reduce tasks wait for every map")
        task.state, task.node, task.term = "running", node, int(c["term"])
        task.attempt += 1
        task.lease_until = lease_until
        if job.state == "queued":
            job.state = "mapping"
        return {"ok": True, "attempt": task.attempt}

    def _complete(self, c: Cmd) -> Result:
        stats, node, attempt = dict(c.get("stats") or {}), str(c["node"]), int(c["attempt"])
        if not node:
            return _err("a completion must name the node holding the output")
        job, bad = self._check_order(c)
        if job is None:
            return bad or _err("unknown job")
        task = self._task(job, c)
        if task is None:
            return _err(f"no task {c['phase']} {c['index']} in job {job.id}")
        if task.state == "done":
            return _err("already done", dup=True)
        if not 1 <= attempt <= task.attempt:
            return _err(f"attempt {attempt} of task {task.phase} {task.index} was never assigned")
        task.state, task.node, task.stats = "done", node, stats
        self._advance(job)
        return {"ok": True}

    def _advance(self, job: Job) -> None:
        if job.state in ("queued", "mapping") and all(t.state == "done" for t in job.maps):
            job.state = "reducing"
        if job.state == "reducing" and all(t.state == "done" for t in job.reduces):
            job.state = "assembling"

    def _fail(self, c: Cmd) -> Result:
        now, error = float(c["now"]), str(c["error"])[:MAX_ERROR]
        job, bad = self._check_order(c)
        if job is None:
            return bad or _err("unknown job")
        job.state, job.error, job.finished_at = "failed", error, now
        return {"ok": True}

    def _finish(self, c: Cmd) -> Result:
        now, result = float(c["now"]), dict(c["result"])
        job, bad = self._check_order(c)
        if job is None:
            return bad or _err("unknown job")
        if job.state != "assembling":
            return _err(f"job {job.id} is {job.state}, not assembling")
        job.state, job.result, job.finished_at = "done", result, now
        return {"ok": True}

    def _batch(self, c: Cmd) -> Result:
        if not isinstance(c["cmds"], list):
            return _err("batch needs a list of commands")
        return {"ok": True, "results": [self.apply(sub) for sub in c["cmds"]]}

    # -- queries (read-only helpers for the shell) ---------------------------------------

    def active_jobs(self) -> list[Job]:
        return sorted((j for j in self.jobs.values() if j.state in ACTIVE), key=lambda j: j.seq)

    def member_by_name(self, name: str) -> Member | None:
        return self.members.get(name)


_HANDLERS = {
    "member": State._member,
    "master": State._master,
    "submit": State._submit,
    "assign": State._assign,
    "complete": State._complete,
    "fail": State._fail,
    "finish": State._finish,
    "batch": State._batch,
}
