"""The replicated state machine: members, the master's term, jobs and their tasks.

Pure and deterministic: ``State.apply(cmd)`` takes a plain dict command (only ints, floats,
strings, bytes, lists and dicts: it travels through the Raft log) and returns a result dict.
It never raises, never reads a clock, random source, file or socket: times and ids come in
as arguments, so every member that applies the same log reaches the same state.

A job is split at submission into map tasks (line-aligned byte ranges of its inputs, the
alignment itself happens where the bytes are) and ``n_reduce`` reduce tasks. Phases::

    queued -> mapping -> reducing -> assembling -> done
          \\________________________________________-> failed | cancelled

Task states: ``pending -> running -> done``. A running task has one attempt, or two when
a straggler got a backup copy (``Task.runs``); the first completion wins. Every order
(assign, complete, release, fail, finish) carries the master's Raft term; an order from an
older term than the current master's is refused, so a cut-off old leader cannot change a job.

Each member has a :class:`Record` of what it actually did (tasks done, failed, lost; an
average throughput): the scheduler scores members from it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pdp.split import plan_ranges

Cmd = dict[str, Any]
Result = dict[str, Any]

ACTIVE = ("queued", "mapping", "reducing", "assembling")
MAX_ERROR = 2000
RATE_MIN_BYTES = 64 * 1024  # tasks smaller than this say more about overheads than speed
RATE_WEIGHT = 0.3  # weight of the newest task in a member's average throughput


@dataclass
class Member:
    name: str
    data_addr: str
    raft_addr: str  # "" for a worker without a Raft seat
    cpus: int
    joined_at: float
    voter: bool = True


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
    runs: dict[int, str] = field(default_factory=dict)  # running attempts: attempt -> node (2 with a backup)
    failed_on: list[str] = field(default_factory=list)  # members where an attempt failed (tried last there)

    def __setstate__(self, data: dict[str, Any]) -> None:
        """Dumps written before a field existed load with its default."""
        self.runs, self.failed_on = {}, []
        self.__dict__.update(data)
        if self.state == "running" and not self.runs:
            self.runs = {self.attempt: self.node}

    def size(self) -> int:
        return self.end - self.start


@dataclass
class Record:
    """What a member actually did, for its score: counts and an average throughput."""

    done: int = 0
    failed: int = 0  # attempts that failed there
    lost: int = 0  # attempts given up there (member lost, lease expired)
    rate: float = 0.0  # average bytes/s of its recent tasks (0: not known yet)
    streak: int = 0  # failures and losses since its last success
    last_fail: float = 0.0


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
    priority: int = 0
    maps: list[Task] = field(default_factory=list)
    reduces: list[Task] = field(default_factory=list)
    result: dict[str, Any] = field(default_factory=dict)
    finished_at: float = 0.0
    reruns: dict[str, int] = field(default_factory=dict)  # why tasks ran again -> how often
    failures: dict[str, int] = field(default_factory=dict)  # "map 3" -> failed attempts
    backups: int = 0  # backup attempts started for stragglers

    def __setstate__(self, data: dict[str, Any]) -> None:
        self.priority, self.backups = 0, 0
        self.__dict__.update(data)

    @property
    def submitter(self) -> str:
        return str(self.form.get("submitter", ""))

    @property
    def whole(self) -> bool:
        """A small job (one map, one reduce) runs as a single task that also stores the result
        (Hadoop's "uber" jobs): one assignment and one completion instead of four entries,
        and no fetches between members."""
        return len(self.maps) == 1 and self.n_reduce == 1

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
        self.invited: dict[str, dict[str, Any]] = {}  # name -> {"by", "at"}: who may join as a member
        self.records: dict[str, Record] = {}  # member name -> what it did (kept when it leaves)

    def __setstate__(self, data: dict[str, Any]) -> None:
        """Dumps written before a field existed load with its default."""
        self.__init__()  # type: ignore[misc]
        self.__dict__.update(data)

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
        """A node registers (again). Core voters are invited by being configured as voters;
        any other member needs an invitation by name (``pdp invite``)."""
        name, data, raft, voter = str(c["name"]), str(c["data_addr"]), str(c["raft_addr"]), bool(c.get("voter", True))
        cpus, now = int(c["cpus"]), float(c["now"])
        known = self.members.get(name)
        if known is not None and known.data_addr != data:
            return _err(f"the name {name!r} is taken by the member at {known.data_addr}; give this node another --name")
        if not voter and name not in self.invited:
            return _err(f"{name} is not invited to this party: a member must first run `pdp invite {name}`",
                        not_invited=True)
        if voter:
            self.invited.setdefault(name, {"by": "core", "at": now})
        self.members[name] = Member(name, data, raft, cpus, now, voter)
        return {"ok": True}

    def _invite(self, c: Cmd) -> Result:
        name, by, now = str(c["name"]), str(c["by"]), float(c["now"])
        if not name or len(name) > 64 or any(ch.isspace() for ch in name):
            return _err(f"bad member name {name!r}: 1-64 characters without spaces")
        self.invited[name] = {"by": by, "at": now}
        return {"ok": True}

    def _uninvite(self, c: Cmd) -> Result:
        """Withdraw an invitation: the member is removed and its work runs elsewhere."""
        name = str(c["name"])
        member = self.members.get(name)
        if member is not None and member.voter:
            return _err(f"{name} is a core (Raft) member: run `pdp core remove {name}` first")
        if name not in self.invited:
            return _err(f"{name} is not invited")
        del self.invited[name]
        self.members.pop(name, None)
        if int(c["term"]) == self.master["term"]:
            self._lost({"node": name, "term": c["term"]})
        return {"ok": True}

    def _leave(self, c: Cmd) -> Result:
        """A member leaves cleanly (its invitation stays: it may come back)."""
        name = str(c["name"])
        member = self.members.get(name)
        if member is None:
            return {"ok": True, "gone": True}
        if member.voter:
            return _err(f"{name} is a core (Raft) member: it must be removed from the core first")
        del self.members[name]
        if int(c["term"]) == self.master["term"]:
            self._lost({"node": name, "term": c["term"]})
        return {"ok": True}

    def _add_holder(self, c: Cmd) -> Result:
        """Another member now holds a copy of a job's input (a leaving member handed it over)."""
        job, index, node = self.jobs.get(str(c["job"])), int(c["input"]), str(c["node"])
        if job is None or not 0 <= index < len(job.inputs):
            return _err(f"no input {index} in job {c['job']!r}")
        holders = job.inputs[index]["holders"]
        if node not in holders:
            holders.append(node)
        return {"ok": True}

    def admitted(self, name: str) -> bool:
        """May a node called ``name`` talk to members (bootstrap: anyone with the secret)?"""
        return name in self.invited or name in self.members or not self.master["name"]

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
        job = Job(job_id, self.next_seq, str(c["kind"]), inputs, n_reduce, chunk, dict(c["form"]), float(c["now"]),
                  priority=max(-100, min(100, int(c.get("priority", 0)))))
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

    def _order_task(self, c: Cmd) -> tuple[Job, Task] | Result:
        """The job and task a master's order names, or the error result refusing it."""
        job, bad = self._check_order(c)
        if job is None:
            return bad or _err("unknown job")
        task = self._task(job, c)
        if task is None:
            return _err(f"no task {c['phase']} {c['index']} in job {job.id}")
        return job, task

    def _task(self, job: Job, c: Cmd) -> Task | None:
        if c["phase"] not in ("map", "reduce"):
            return None
        tasks = job.tasks(c["phase"])
        index = int(c["index"])
        return tasks[index] if 0 <= index < len(tasks) else None

    def _assign(self, c: Cmd) -> Result:
        """Start an attempt of a pending task on ``node``; with ``backup``, a second attempt
        of a running task (a straggler's backup copy) on another member."""
        lease_until, node, backup = float(c["lease_until"]), str(c["node"]), bool(c.get("backup"))
        found = self._order_task(c)
        if isinstance(found, dict):
            return found
        job, task = found
        if backup:
            if task.state != "running" or len(task.runs) != 1 or node in task.runs.values():
                return _err(f"task {task.phase} {task.index} of {job.id} cannot take a backup on {node}", busy=True)
            job.backups += 1
        elif task.state != "pending":
            return _err(f"task {task.phase} {task.index} of {job.id} is {task.state}", busy=True)
        if task.phase == "reduce" and job.state != "reducing":
            return _err(f"job {job.id} is {job.state}: reduce tasks wait for every map")
        task.attempt += 1
        if not backup:
            task.state, task.node, task.runs = "running", node, {}
        task.runs[task.attempt] = node
        task.term, task.lease_until = int(c["term"]), lease_until
        if job.state == "queued":
            job.state = "mapping"
        return {"ok": True, "attempt": task.attempt}

    def _complete(self, c: Cmd) -> Result:
        stats, node, attempt = dict(c.get("stats") or {}), str(c["node"]), int(c["attempt"])
        if not node:
            return _err("a completion must name the node holding the output")
        found = self._order_task(c)
        if isinstance(found, dict):
            return found
        job, task = found
        if task.state == "done":
            return _err("already done", dup=True)
        if not 1 <= attempt <= task.attempt:
            return _err(f"attempt {attempt} of task {task.phase} {task.index} was never assigned")
        result = c.get("result")
        task.state, task.node, task.stats, task.runs = "done", node, stats, {}
        self._credit(node, stats)
        if job.whole and task.phase == "map" and isinstance(result, dict) and result.get("holders"):
            reduce = job.reduces[0]  # done within the same task
            reduce.state, reduce.node, reduce.attempt = "done", node, max(reduce.attempt, 1)
            job.state, job.result, job.finished_at = "done", dict(result), float(c["now"])
            return {"ok": True, "job_done": True}
        self._advance(job)
        return {"ok": True}

    def _record(self, name: str) -> Record:
        return self.records.setdefault(name, Record())

    def _credit(self, name: str, stats: dict[str, Any]) -> None:
        """A member finished a task: count it, and fold its throughput into the average."""
        rec = self._record(name)
        rec.done, rec.streak = rec.done + 1, 0
        size, seconds = stats.get("input_bytes"), stats.get("seconds")
        if isinstance(size, (int, float)) and isinstance(seconds, (int, float)) and size >= RATE_MIN_BYTES \
                and seconds > 0:
            rate = float(size) / float(seconds)
            rec.rate = rate if not rec.rate else (1 - RATE_WEIGHT) * rec.rate + RATE_WEIGHT * rate

    def _blame(self, name: str, now: float, failed: bool) -> None:
        """An attempt failed (``failed``) or was given up on member ``name``."""
        rec = self._record(name)
        if failed:
            rec.failed += 1
        else:
            rec.lost += 1
        rec.streak += 1
        rec.last_fail = now

    def _advance(self, job: Job) -> None:
        """Derive the phase of an active job from its tasks (it may also move back)."""
        if not all(t.state == "done" for t in job.maps):
            if job.state != "queued" or any(t.attempt for t in job.maps):
                job.state = "mapping"
        elif not all(t.state == "done" for t in job.reduces):
            job.state = "reducing"
        else:
            job.state = "assembling"

    def _rerun(self, job: Job, task: Task, reason: str) -> None:
        task.state, task.node, task.stats, task.runs = "pending", "", {}, {}
        job.reruns[reason] = job.reruns.get(reason, 0) + 1

    def _drop_run(self, job: Job, task: Task, attempt: int, reason: str) -> None:
        """Attempt ``attempt`` ends without a result: a backup carries on, else the task runs again."""
        task.runs.pop(attempt, None)
        if task.runs:
            task.node = next(iter(task.runs.values()))
        else:
            self._rerun(job, task, reason)

    def _release(self, c: Cmd) -> Result:
        """A running attempt is given up (member lost, stalled, failed): the task runs again
        (or its backup carries on).

        ``failed=True`` counts towards ``max_failures``; past it the job fails. ``blame``
        (default: true when failed) counts it against the member's record.
        """
        reason, attempt, failed = str(c["reason"])[:200], int(c["attempt"]), bool(c.get("failed"))
        max_failures, now, blame = int(c.get("max_failures", 0)), float(c["now"]), bool(c.get("blame", failed))
        found = self._order_task(c)
        if isinstance(found, dict):
            return found
        job, task = found
        node = task.runs.get(attempt)
        if task.state != "running" or node is None:
            return _err(f"task {task.phase} {task.index} attempt {attempt} is not running", stale_attempt=True)
        if blame:
            self._blame(node, now, failed)
        key = f"{task.phase} {task.index}"
        if failed:
            job.failures[key] = job.failures.get(key, 0) + 1
            if node not in task.failed_on:
                task.failed_on.append(node)
            if max_failures and job.failures[key] >= max_failures:
                job.state, job.finished_at = "failed", now
                job.error = f"{key} failed {job.failures[key]} times; last: {c['reason']}"[:MAX_ERROR]
                return {"ok": True, "job_failed": True}
        self._drop_run(job, task, attempt, reason.split(":")[0])
        return {"ok": True}

    def _lost(self, c: Cmd) -> Result:
        """Member ``node`` is gone: its running tasks and the outputs it held run again.

        Reduce outputs it held are redone; map outputs only while some reduce still needs
        them (Google MapReduce: completed maps of a failed worker are reset).
        """
        name, now = str(c["node"]), float(c.get("now", 0.0))
        job_count = 0
        if int(c["term"]) != self.master["term"]:
            return _err("order from an old term", stale=True)
        if name in self.members or name in self.records:
            self._blame(name, now, failed=False)
        for job in self.active_jobs():
            before = sum(job.reruns.values())
            for t in job.maps + job.reduces:
                if t.state == "running":
                    for attempt in [a for a, n in t.runs.items() if n == name]:
                        self._drop_run(job, t, attempt, f"member {name} lost")
                elif t.node == name and t.phase == "reduce" and t.state == "done":
                    self._rerun(job, t, f"member {name} lost")
            if not all(t.state == "done" for t in job.reduces):
                for t in job.maps:
                    if t.node == name and t.state == "done":
                        self._rerun(job, t, f"map output lost with {name}")
            self._advance(job)
            job_count += sum(job.reruns.values()) != before
        return {"ok": True, "jobs": job_count}

    def _redo(self, c: Cmd) -> Result:
        """Outputs of done tasks could not be fetched from ``holder``: run those tasks again."""
        holder, phase, indexes = str(c["holder"]), str(c["phase"]), [int(i) for i in c["indexes"]]
        job, bad = self._check_order(c)
        if job is None:
            return bad or _err("unknown job")
        if phase not in ("map", "reduce"):
            return _err(f"unknown phase {phase!r}")
        tasks, redone = job.tasks(phase), 0
        for i in indexes:
            if 0 <= i < len(tasks) and tasks[i].state == "done" and tasks[i].node == holder:
                self._rerun(job, tasks[i], f"{phase} output unreachable on {holder}")
                redone += 1
        self._advance(job)
        return {"ok": True, "redone": redone}

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

    def _cancel(self, c: Cmd) -> Result:
        """A user stops a job: no task of it runs again, members drop its files."""
        by, now = str(c.get("by", "?"))[:200], float(c["now"])
        job = self.jobs.get(str(c["job"]))
        if job is None:
            return _err(f"no job {c['job']!r} in the party (check `pdp jobs`)")
        if job.state not in ACTIVE:
            return _err(f"job {job.id} is already {job.state}", inactive=True)
        job.state, job.finished_at, job.error = "cancelled", now, f"cancelled by {by}"
        for t in job.maps + job.reduces:
            t.runs = {}
        return {"ok": True}

    def _batch(self, c: Cmd) -> Result:
        if not isinstance(c["cmds"], list):
            return _err("batch needs a list of commands")
        return {"ok": True, "results": [self.apply(sub) for sub in c["cmds"]]}

    # -- queries (read-only helpers for the shell) ---------------------------------------

    def active_jobs(self) -> list[Job]:
        return sorted((j for j in self.jobs.values() if j.state in ACTIVE), key=lambda j: j.seq)


_HANDLERS = {
    "member": State._member,
    "master": State._master,
    "submit": State._submit,
    "assign": State._assign,
    "complete": State._complete,
    "fail": State._fail,
    "finish": State._finish,
    "batch": State._batch,
    "release": State._release,
    "lost": State._lost,
    "redo": State._redo,
    "invite": State._invite,
    "uninvite": State._uninvite,
    "leave": State._leave,
    "add_holder": State._add_holder,
    "cancel": State._cancel,
}
