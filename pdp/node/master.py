"""The master's duties, run by whichever node leads the Raft group.

A node acts as master only after a ``master`` entry of its own Raft term has committed
(leadership is a hint, the log is the truth). The master hands tasks to workers that ask
for them (long poll), records completions (first wins), fails a job whose input is bad,
merges finished jobs' reduce outputs into the result (stored on two members), and keeps
the live view of members (heartbeats, current tasks, progress) that ``pdp status`` shows.

Leases: an assignment records a deadline in the log; while it runs, the worker's
heartbeats list the task with its progress, and the master keeps the lease alive in
memory for as long as progress moves (no Raft write per heartbeat). The reaper gives a
task back to the queue when its member goes silent for ``dead_after`` (then everything the
member held is redone: ``lost``), when a live member stops listing it, or when its
progress stands still for ``stall_after``. A new master starts every lease afresh.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgpack

from pdp.raft.consensus import Consensus, ConsensusError
from pdp.errors import NotMaster, PdpError
from pdp.fsutil import Damaged, crc32_file, sha256_file
from pdp.jobs import runtime
from pdp.core.leases import Leases, Running
from pdp.core.scheduler import BUNDLE_MAX, TaskKey, jobs_to_assemble, pick_backup, pick_tasks
from pdp.core.state import ACTIVE, Job, Task
from pdp.net.transport import Handler, Stream, raft_addr_of, split_addr

if TYPE_CHECKING:
    from pdp.node.services import MasterServices

log = logging.getLogger("pdp.node.master")

POLL = 2.0  # longest a worker's task request waits for work
REAP_GAP = 0.02  # the sweeps (reaper, assembly) start at most this often, however busy the log is
TICK = 0.2  # longest the sweeps wait without a change (leases run out without one)


class Master:
    def __init__(self, node: MasterServices) -> None:
        self.node = node
        self.term = 0  # the term this node is master in, 0 if not master
        self.reserved: set[TaskKey] = set()
        self.assembling: set[str] = set()
        self.probed: dict[str, float] = {}
        self.core_lock = asyncio.Lock()  # pysyncobj needs membership changes one at a time
        cfg = node.config
        self.dead_after, self.stall_after, self.max_failures = cfg.dead_after, cfg.stall_after, cfg.max_failures
        self.leases = self._new_leases(0)

    def _new_leases(self, term: int) -> Leases:
        cfg = self.node.config
        return Leases(cfg.heartbeat, cfg.dead_after, cfg.stall_after, time.monotonic(), term)

    def handlers(self) -> dict[str, Handler]:
        return {"get_task": self._get_task, "task_done": self._task_done, "tasks_done": self._tasks_done,
                "task_failed": self._task_failed,
                "heartbeat": self._heartbeat, "live": self._live, "unreachable": self._unreachable,
                "core_change": self._core}

    # -- becoming master ----------------------------------------------------------------

    def is_master(self) -> bool:
        c = self.node.consensus
        if c is None or not c.is_leader():
            return False
        with c.reading() as state:
            return state.master["term"] == c.term() and state.master["name"] == self.node.name

    async def run(self) -> None:
        """Claim mastership after each election won; while master, sweep (assemble finished
        jobs, reap leases) after every change of the state, at most every ``REAP_GAP``, and
        every ``TICK`` without one. A change during a sweep starts the next one (no lost
        wake-up); an idle master sweeps at once (no fixed pause)."""
        changes, last = self.node.changes, -REAP_GAP
        while True:
            seen = changes.seen
            c = self.node.consensus
            if c is None:  # switching between voter and worker
                await asyncio.sleep(0.1)
                continue
            await asyncio.sleep(max(0.0, last + REAP_GAP - time.monotonic()))  # at most ~50 sweeps a second
            last = time.monotonic()
            await self._sweep(c)
            await changes.wait(TICK, since=seen)

    async def _sweep(self, c: Consensus) -> None:
        """Claim a won election, or do the master's rounds: assembly and the reaper."""
        if c.is_leader() and not self.is_master():
            await self._claim(c.term())
        if self.is_master():
            if self.term != c.term():
                self.term = c.term()
                self.reserved.clear()
                self.leases = self._new_leases(self.term)
                log.info("%s is master in term %d", self.node.name, self.term)
            await self._record_genesis()
            self._start_assembly()
            await self._reap()
        elif self.term:
            log.info("%s is no longer master (term %d)", self.node.name, self.term)
            self.term = 0

    async def _record_genesis(self) -> None:
        """A founding member's first master writes the founders' identities into the log."""
        c, party = self.node.consensus, self.node.party
        if c is None or not party.genesis:
            return
        with c.reading() as state:
            if state.identities:
                party.genesis = False
                party.save()
                return
        try:
            res = await self.node.propose(party.genesis_cmd(time.time()), timeout=3.0)
        except ConsensusError as exc:
            log.debug("genesis not recorded yet: %s", exc)
            return
        if res.get("ok") or res.get("exists"):
            log.info("the party's founding identities are recorded")
        else:
            log.error("the founding identities were refused: %s", res.get("error"))

    async def _claim(self, term: int) -> None:
        cmd = {"op": "master", "term": term, "name": self.node.name, "data_addr": self.node.config.advertise_addr,
               "now": time.time()}
        try:
            await self.node.propose(cmd, timeout=2.0)
        except ConsensusError as exc:
            log.debug("claim of term %d failed: %s", term, exc)

    def _require(self) -> int:
        if not self.is_master():
            raise NotMaster(f"{self.node.name} is not the master")
        return self.term or self.node.consensus.term()  # type: ignore[union-attr]

    # -- handing out tasks ----------------------------------------------------------------

    async def _get_task(self, stream: Stream, hdr: dict[str, Any], _: bytes) -> None:
        """Long poll: answer with one or more tasks (a bundle of small ones) or ``idle``."""
        worker = stream.conn.who.name  # who asks is who its certificate says, never a header field
        deadline = time.monotonic() + min(float(hdr.get("wait", POLL)), POLL)
        while True:
            term = self._require()
            assigned, models = await self._assign_next(worker, term, int(hdr.get("max", BUNDLE_MAX)))
            if assigned:
                await stream.send({"t": "tasks", "tasks": assigned}, _models_payload(assigned, models, hdr.get("have")))
                return
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                await stream.send({"t": "idle"})
                return
            await self.node.changes.wait(remaining)

    async def _assign_next(self, worker: str, term: int, limit: int
                           ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """Pick tasks for ``worker`` and commit their assignment (one Raft entry for a bundle);
        returns the assignments and the models they name (by :func:`model_key`)."""
        c = self.node.consensus
        assert c is not None
        while True:
            backup = False
            with c.reading() as state:
                picked = pick_tasks(state, worker, self.reserved, time.time(), limit)
                if not picked and self.node.config.backup_tasks:
                    straggler = pick_backup(state, worker, time.time(), self.leases.running_info(time.monotonic()))
                    picked, backup = ([straggler], True) if straggler else ([], False)
                if not picked:
                    return [], {}
                specs = [_assignment(state.members, job, task) for job, task in picked]
                models = {model_key(job): job.spec["model"] for job, _ in picked if "model" in job.spec}
            now = time.monotonic()
            for spec in specs:  # a whole small job's result copy goes to a live member first
                if "copy_to" in spec:
                    spec["copy_to"].sort(key=lambda m: self.leases.health(m[0], now)[0] != "alive")
            keys = {(job.id, task.phase, task.index) for job, task in picked}
            self.reserved |= keys
            try:
                results = await asyncio.gather(*(self.node.propose(
                    {"op": "assign", "job": job.id, "phase": task.phase, "index": task.index, "node": worker,
                     "term": term, "backup": backup, "lease_until": time.time() + self.stall_after})
                    for job, task in picked))
            finally:
                self.reserved -= keys
            if any(res.get("stale") for res in results):
                raise NotMaster(next(res["error"] for res in results if res.get("stale")))
            assigned = []
            for spec, res in zip(specs, results):
                if res.get("ok"):
                    self.leases.assigned((spec["job"], spec["phase"], spec["index"], res["attempt"]), time.monotonic())
                    assigned.append({**spec, "attempt": res["attempt"], "term": term})
            if assigned:
                first = assigned[0]
                log.info("job %s: %s %s -> %s (attempt %d)%s", first["job"], first["phase"],
                         ",".join(str(a["index"]) for a in assigned), worker, first["attempt"],
                         " as a backup of a straggler" if backup else "")
                return assigned, models

    async def _task_done(self, stream: Stream, hdr: dict[str, Any], _: bytes) -> None:
        res = await self._complete({**hdr, "node": stream.conn.who.name})
        await stream.send({"t": "ok", "accepted": bool(res.get("ok")), "why": res.get("error", "")})

    async def _tasks_done(self, stream: Stream, hdr: dict[str, Any], _: bytes) -> None:
        """Completions of a bundle of small tasks: one Raft entry for all of them."""
        done = [{**d, "node": stream.conn.who.name} for d in hdr["done"] if isinstance(d, dict)]
        results = await asyncio.gather(*(self._complete(d) for d in done))
        await stream.send({"t": "ok", "accepted": sum(bool(r.get("ok")) for r in results)})

    def _runs_on(self, hdr: dict[str, Any]) -> bool:
        """Is attempt ``hdr["attempt"]`` of that task running on ``hdr["node"]`` (the proven
        reporter)? A report about anything else never reaches the log."""
        c = self.node.consensus
        assert c is not None
        try:
            with c.reading() as state:
                job = state.jobs.get(str(hdr["job"]))
                if job is None or hdr.get("phase") not in ("map", "reduce"):
                    return False
                tasks, index = job.tasks(str(hdr["phase"])), int(hdr["index"])
                if not 0 <= index < len(tasks):
                    return False
                attempt = int(hdr["attempt"])
                return hdr["node"] in (tasks[index].runs.get(attempt), tasks[index].given_up.get(attempt))
        except (KeyError, TypeError, ValueError):
            return False

    async def _complete(self, hdr: dict[str, Any]) -> dict[str, Any]:
        term = self._require()
        if not self._runs_on(hdr):
            return {"ok": False, "error": f"attempt {hdr.get('attempt')} of {hdr.get('phase')} {hdr.get('index')} "
                                          f"of {hdr.get('job')} is not running on {hdr['node']}"}
        cmd = {"op": "complete", "job": hdr["job"], "phase": hdr["phase"], "index": hdr["index"],
               "attempt": hdr["attempt"], "node": hdr["node"], "term": term, "stats": hdr.get("stats") or {}}
        cmd["now"] = time.time()  # (a whole small job ends with it; a step that fails records it)
        if isinstance(hdr.get("result"), dict):
            cmd["result"] = hdr["result"]
        res = await self.node.propose(cmd)
        if res.get("stale"):
            raise NotMaster(res["error"])
        if res.get("ok"):
            log.info("job %s: %s %s done on %s (attempt %s)%s", hdr["job"], hdr["phase"], hdr["index"], hdr["node"],
                     hdr["attempt"], "; the job is done" if res.get("job_done") else "")
            self._start_assembly()  # the last reduce of a job (or of a round): assemble it now, not at the next sweep
        return res

    async def _task_failed(self, stream: Stream, hdr: dict[str, Any], _: bytes) -> None:
        """A bad input fails the job; any other failure gives the task back (counted)."""
        term = self._require()
        hdr = {**hdr, "node": stream.conn.who.name}
        if not self._runs_on(hdr):  # only the member running an attempt can fail it (or its job)
            await stream.send({"t": "ok"})
            return
        if hdr.get("retry"):
            counted = bool(hdr.get("counted", True))
            res = await self._release(hdr, f"{hdr.get('why', 'failed')} on {hdr['node']}: {hdr['error']}",
                                      failed=counted, blame=counted, node=hdr["node"])
            if res.get("job_failed"):
                log.warning("job %s failed: %s %s failed %d times", hdr["job"], hdr["phase"], hdr["index"],
                            self.max_failures)
        else:
            res = await self.node.propose({"op": "fail", "job": hdr["job"], "term": term,
                                           "error": str(hdr["error"]), "now": time.time()})
            if res.get("ok"):
                log.warning("job %s failed: %s", hdr["job"], hdr["error"])
        await stream.send({"t": "ok"})

    async def _release(self, t: dict[str, Any], reason: str, failed: bool = False,
                       blame: bool = True, node: str | None = None, may_finish: bool = False) -> dict[str, Any]:
        cmd = {"op": "release", "job": t["job"], "phase": t["phase"], "index": t["index"], "attempt": t["attempt"],
               "term": self.term, "reason": reason, "failed": failed, "blame": blame,
               "max_failures": self.max_failures, "now": time.time()}
        if node is not None:
            cmd["node"] = node
        if may_finish:
            cmd["may_finish"] = True
        res = await self.node.propose(cmd)
        if res.get("ok"):
            log.warning("job %s: %s %s runs again (%s)", t["job"], t["phase"], t["index"], reason)
        return res

    async def _unreachable(self, stream: Stream, hdr: dict[str, Any], _: bytes) -> None:
        """A worker could not fetch done tasks' outputs from a holder: redo those tasks."""
        term = self._require()
        res = await self.node.propose({"op": "redo", "job": hdr["job"], "phase": hdr["phase"],
                                       "holder": hdr["holder"], "indexes": hdr["indexes"], "term": term})
        if res.get("redone"):
            log.warning("job %s: %d %s output(s) unreachable on %s run again", hdr["job"], res["redone"],
                        hdr["phase"], hdr["holder"])
        await stream.send({"t": "ok"})

    # -- the core (Raft voters) ---------------------------------------------------------------

    async def _core(self, stream: Stream, hdr: dict[str, Any], _: bytes) -> None:
        """Add a worker to the Raft core or remove a voter from it, one change at a time.

        Add: commit the new voter first, then tell the member to follow the log as a voter
        (pysyncobj's order). Remove: the leader cannot remove itself, so it hands leadership
        over and answers ``moved`` (the gateway asks the new master)."""
        self._require()
        c = self.node.consensus
        assert c is not None
        action, name = str(hdr["action"]), str(hdr["name"])
        log.info("core %s %s requested", action, name)
        async with self.core_lock:
            with c.reading() as state:
                member = state.members.get(name)
            if member is None:
                raise PdpError(f"no member called {name} (see `pdp status`)")
            voters = c.voters()
            if action == "add":
                if member.voter:
                    raise PdpError(f"{name} is already a core member")
                addr = raft_addr_of(member.data_addr)
                become = {"t": "become", "voter": True, "core": sorted({*voters, addr})}
                if len(voters) == 1:  # a core of two needs the newcomer's vote to commit its own seat: seat it first
                    await self.node.peers.request(member.data_addr, become, timeout=15.0)
                    await c.change_membership("add", addr, timeout=30.0)
                else:
                    await c.change_membership("add", addr)
                    log.info("core: %s added to the Raft configuration; telling it to take its seat", addr)
                    await self.node.peers.request(member.data_addr, become, timeout=15.0)
            elif action == "remove":
                if not member.voter:
                    raise PdpError(f"{name} is not a core member")
                if len(voters) <= 1:
                    raise PdpError("the core cannot lose its last voter")
                if name == self.node.name:
                    await c.transfer_leadership()
                    await stream.send({"t": "moved"})
                    return
                await c.change_membership("remove", member.raft_addr)
                try:
                    await self.node.peers.request(member.data_addr, {"t": "become", "voter": False,
                                                                     "core": sorted(set(voters) - {member.raft_addr})},
                                                  timeout=15.0)
                except (PdpError, OSError) as exc:
                    log.warning("%s left the core but did not answer (%s); it follows as a worker when back", name, exc)
            else:
                raise PdpError(f"unknown core action {action!r}: use add or remove")
        log.warning("core %s %s: voters now %s", action, name, ", ".join(c.voters()))
        await stream.send({"t": "ok", "voters": c.voters()})

    # -- liveness ---------------------------------------------------------------------

    async def _heartbeat(self, stream: Stream, hdr: dict[str, Any], _: bytes) -> None:
        self._require()  # a deposed master must not keep a live view (or claim to be master)
        name = stream.conn.who.name
        tasks = [t for t in hdr.get("tasks") or [] if isinstance(t, dict)]
        news = self.leases.heard(name, tasks, int(hdr.get("slots", 0)), str(hdr.get("paused", "")), time.monotonic())
        if news:
            log.info("member %s is %s", name, news)
        await stream.send({"t": "ok", "master": self.node.name, "abort": self._to_abort(name, tasks)})

    def _to_abort(self, name: str, tasks: list[dict[str, Any]]) -> list[list[Any]]:
        """Attempts a member still runs that can no longer count: their job ended or was
        cancelled, or another attempt finished the task. The member stops them. (An attempt
        given up on, e.g. stalled, runs on: if it finishes first, it still wins.)"""
        c = self.node.consensus
        assert c is not None
        stop = []
        with c.reading() as state:
            for t in tasks:
                job = state.jobs.get(str(t.get("job")))
                if job is None:
                    continue
                phase, index, attempt = str(t.get("phase")), int(t.get("index", -1)), int(t.get("attempt", 0))
                found = job.tasks(phase) if phase in ("map", "reduce") else []
                task = found[index] if 0 <= index < len(found) else None
                if job.state not in ACTIVE or task is None or (task.state == "done" and task.attempt >= attempt):
                    stop.append([job.id, phase, index, attempt])
        return stop

    def health(self, name: str, now: float) -> tuple[str, float | None]:
        return self.leases.health(name, now)

    def live_view(self) -> dict[str, Any]:
        return self.leases.view(time.monotonic())

    async def _live(self, stream: Stream, hdr: dict[str, Any], _: bytes) -> None:
        self._require()
        await stream.send({"t": "live", "members": self.live_view()})

    # -- the reaper: leases ----------------------------------------------------------------

    async def _reap(self) -> None:
        """Give back the tasks of lost members, tasks nobody runs, and stalled tasks."""
        c = self.node.consensus
        assert c is not None
        now = time.monotonic()
        with c.reading() as state:
            addrs = {m.name: m.data_addr for m in state.members.values()}
            running = [Running(j.id, t.phase, t.index, attempt, node, t.term)
                       for j in state.active_jobs() for t in j.maps + j.reduces if t.state == "running"
                       for attempt, node in t.runs.items()]
            holding = {t.node for j in state.active_jobs() for t in j.maps + j.reduces if t.node}
            holding |= {r.node for r in running}
        sweep = self.leases.silent(holding, set(addrs), self.node.name, now)
        for name, why in sweep.lose:
            await self._declare_lost(name, why)
        for name in sweep.probe:
            if await self._refused(name, addrs[name], now):
                await self._declare_lost(name, "its node process is gone (connection refused)")
        for t, reason in self.leases.expired(running, now):
            await self._release(asdict(t), reason, may_finish=reason.startswith("stalled"))

    async def _declare_lost(self, name: str, why: str) -> None:
        res = await self.node.propose({"op": "lost", "node": name, "term": self.term, "now": time.time()})
        if res.get("ok"):
            self.leases.lost(name)
            log.warning("member %s lost (%s): its tasks run elsewhere (%d job(s))", name, why, res["jobs"])

    async def _refused(self, name: str, addr: str, now: float) -> bool:
        """Probe a silent member once a second: a refused connection means its process died
        (a paused or cut-off member just times out and waits for ``dead_after``)."""
        if now - self.probed.get(name, 0.0) < 1.0:
            return False
        self.probed[name] = now
        host, port = split_addr(addr)
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 0.5)
        except ConnectionRefusedError:
            return True
        except (OSError, asyncio.TimeoutError):
            return False
        writer.close()
        return False

    # -- assembling results -------------------------------------------------------------

    def _start_assembly(self) -> None:
        """Start assembling every job whose reduces are all done (and not being assembled)."""
        c = self.node.consensus
        assert c is not None
        with c.reading() as state:
            jobs = [(j.id, job_spec(j), [(t.index, t.node) for t in j.current("reduce")],
                     str(j.form.get("gateway", ""))) for j in jobs_to_assemble(state) if j.id not in self.assembling]
        for job_id, spec, reducers, gateway in jobs:
            self.assembling.add(job_id)
            task = asyncio.create_task(self._assemble(job_id, spec, reducers, gateway))
            task.add_done_callback(functools.partial(self._assembly_ended, job_id))

    def _assembly_ended(self, job_id: str, task: asyncio.Task[bool]) -> None:
        """A job's assembly ended; if it recorded the job's last round, the result (the model)
        is stored at once rather than at the next sweep."""
        self.assembling.discard(job_id)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            log.error("assembling job %s failed", job_id, exc_info=exc)
        elif task.result() and self.is_master():
            self._start_assembly()

    async def _assemble(self, job_id: str, spec: dict[str, Any], reducers: list[tuple[int, str]],
                        gateway: str) -> bool:
        """Merge the reduce outputs into the result, store a second copy, record it. For an
        iterative job between rounds, record the round instead; True if it was the last."""
        node, term = self.node, self.term
        try:
            if spec.get("iterate") and not spec.get("final"):
                return await self._next_round(job_id, spec, reducers)
            result = node.spool.file(job_id, "result")
            if spec.get("iterate"):  # the last round is over: the result is the model the job makes of it
                stats = await node.run_in_pool(runtime.write_result, spec, str(result))
            else:
                parts = await self._fetch_parts(job_id, reducers)
                if parts is None:
                    return False  # unreachable outputs are being redone
                stats = await node.run_in_pool(runtime.merge_outputs, spec, [str(p) for p in parts], str(result))
            digest = await asyncio.to_thread(sha256_file, result)
            copies = await self._replicate(job_id, result, gateway, digest)
            res = await node.propose({"op": "finish", "job": job_id, "term": term, "now": time.time(),
                                      "result": {"holders": [node.name, *copies], "size": stats["bytes"],
                                                 "keys": stats["keys"], "sha256": digest}})
            if res.get("ok"):
                log.info("job %s done: %d distinct keys, %d bytes, stored on %s", job_id, stats["keys"],
                         stats["bytes"], ", ".join([node.name, *copies]))
        except (PdpError, OSError) as exc:
            log.warning("assembling job %s failed (will retry): %s", job_id, exc)
            await asyncio.sleep(1.0)
        return False

    async def _next_round(self, job_id: str, spec: dict[str, Any], reducers: list[tuple[int, str]]) -> bool:
        """An iterative job's round is reduced: make the next model from its sums (a built-in's
        ``update``, in the pool) and commit it with the round; a job whose update fails (its
        data cannot make a model) fails with the reason. True if the last round was recorded."""
        node = self.node
        parts = await self._fetch_parts(job_id, reducers)
        if parts is None:
            return False  # unreachable outputs are being redone
        try:
            step = await node.run_in_pool(runtime.update_round, spec, [str(p) for p in parts])
        except PdpError as exc:  # the update is pure: its errors are the data's (no rows left, a bad k)
            await node.propose({"op": "fail", "job": job_id, "term": self.term, "error": str(exc), "now": time.time()})
            log.warning("job %s failed: %s", job_id, exc)
            return False
        res = await node.propose({"op": "round", "job": job_id, "term": self.term, "round": spec["round"],
                                  "model": step["model"], "done": step["done"], "text": step.get("text", "")})
        if not res.get("ok"):
            log.warning("job %s: round %d not recorded: %s", job_id, spec["round"] + 1, res.get("error"))
            return False
        return bool(step["done"])

    async def _fetch_parts(self, job_id: str, reducers: list[tuple[int, str]]) -> list[Path] | None:
        results = await asyncio.gather(*(self._fetch_part(job_id, r, name) for r, name in reducers),
                                       return_exceptions=True)
        missing: dict[str, list[int]] = {}
        for (r, name), got in zip(reducers, results):
            if isinstance(got, BaseException):
                if not isinstance(got, (PdpError, OSError)):
                    raise got
                log.warning("job %s: reduce %d output unreachable on %s: %s", job_id, r, name, got)
                missing.setdefault(name, []).append(r)
        for holder, indexes in missing.items():
            await self.node.propose({"op": "redo", "job": job_id, "phase": "reduce", "holder": holder,
                                     "indexes": indexes, "term": self.term})
        return None if missing else [p for p in results if isinstance(p, Path)]

    async def _fetch_part(self, job_id: str, r: int, holder: str) -> Path:
        """Reduce ``r``'s output (fetched unless it is here), checked against the CRC-32 its
        reducer recorded in the log (Damaged: it counts as unreachable and runs again)."""
        node = self.node
        assert node.consensus is not None
        with node.consensus.reading() as state:
            job = state.jobs.get(job_id)
            crc = job.reduces[r].stats.get("crc32") if job is not None and r < len(job.reduces) else None
        if holder == node.name:
            dest = node.spool.file(job_id, f"reduce-{r}")
        else:
            dest = node.spool.file(job_id, f"part-{r}")
            await node.fetch_file(node.member_addr(holder), job_id, f"reduce-{r}", dest)
        if crc is not None and await asyncio.to_thread(crc32_file, dest) != crc:
            raise Damaged(f"{holder}'s output of reduce {r} is damaged (CRC mismatch)")
        return dest

    async def _replicate(self, job_id: str, path: Path, prefer: str, sha256: str = "") -> list[str]:
        """Store a second copy of the result on another member (a live one; the job's gateway
        first), which checks it against ``sha256`` before keeping it."""
        c = self.node.consensus
        assert c is not None
        now = time.monotonic()
        with c.reading() as state:
            others = sorted((m for m in state.members.values() if m.name != self.node.name),
                            key=lambda m: (self.health(m.name, now)[0] != "alive", m.name != prefer, m.name))
        for member in others:
            if self.health(member.name, now)[0] not in ("alive", "suspected"):
                continue
            try:
                await self.node.push_file(member.data_addr, {"t": "store_file", "job": job_id, "name": "result",
                                                             "sha256": sha256 or await asyncio.to_thread(sha256_file, path)},
                                          path)
                return [member.name]
            except (PdpError, OSError) as exc:
                log.warning("could not store a copy of %s's result on %s: %s", job_id, member.name, exc)
        if others:
            raise PdpError("no other member took a copy of the result")
        return []


def job_spec(job: Job, with_model: bool = True) -> dict[str, Any]:
    """What a task process needs to load the job: a built-in's name, or the code bundle (the
    worker fetches it and puts its directory in ``code``), the arguments and the data type,
    and (``with_model``) the job's model."""
    spec = {k: v for k, v in job.spec.items() if with_model or k != "model"}
    spec["steps"] = job.steps
    if job.iterative:
        spec["round"] = job.step
    if not spec.get("builtin") and not job.code:
        spec["builtin"] = job.kind  # a job submitted by kind name only
    if job.code:
        spec["code"] = job.code["file_id"]  # (the worker replaces it with the unpacked bundle's directory)
    return spec


def model_key(job: Job) -> str:
    """What names a job's model as it is now: the job and its round (a model never changes
    within one)."""
    return f"{job.id}/{job.step}"


def _models_payload(assigned: list[dict[str, Any]], models: dict[str, Any], have: Any) -> bytes:
    """The models the assignments name that the worker does not say it keeps (``have``),
    msgpack-packed: a model (up to 1 MiB) travels in a frame's payload, once per worker and
    round, not in every assignment's header (64 KiB)."""
    kept = set(have) if isinstance(have, list) else set()
    wanted = {a["model_key"] for a in assigned if "model_key" in a} - kept
    return msgpack.packb({k: models[k] for k in sorted(wanted)}) if wanted else b""


def _assignment(members: dict[str, Any], job: Job, task: Task) -> dict[str, Any]:
    """What a worker needs to run ``task``: where its bytes are and where its output goes."""
    spec: dict[str, Any] = {"job": job.id, "kind": job.kind, "phase": task.phase, "index": task.index,
                            "n_reduce": job.n_reduce, "step": task.step, "steps": job.steps,
                            "partition": task.index % job.n_reduce, "spec": job_spec(job, with_model=False)}
    if "model" in job.spec:  # sent beside the assignments, once per worker (see _models_payload)
        spec["model_key"] = model_key(job)
    if job.code:
        spec["code"] = {"file": job.code["file_id"], "size": job.code["size"],
                        "holders": [(h, members[h].data_addr) for h in job.code["holders"] if h in members]}
    if task.phase == "map":
        inp = job.step_inputs()[task.input]
        spec.update(file=inp["file_id"], name=inp["name"], input_index=task.input, start=task.start, end=task.end,
                    line=task.line,
                    header=inp.get("header"),
                    holders=[(h, members[h].data_addr) for h in inp["holders"] if h in members])
        if job.whole:  # the task also reduces and stores the result, a copy on the job's gateway first
            gateway = str(job.form.get("gateway", ""))
            spec["copy_to"] = sorted(((m.name, m.data_addr) for m in members.values()),
                                     key=lambda m: (m[0] != gateway, m[0] not in inp["holders"], m[0]))
    else:
        spec["sources"] = [(t.index, t.node, members[t.node].data_addr) for t in job.current("map")]
        if task.step + 1 < job.steps:  # an intermediate output is stored twice, like an input
            spec["copy_to"] = sorted((m.name, m.data_addr) for m in members.values())
    return spec
