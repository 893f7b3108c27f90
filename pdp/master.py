"""The master's duties, run by whichever node leads the Raft group.

A node acts as master only after a ``master`` entry of its own Raft term has committed
(leadership is a hint, the log is the truth). The master hands tasks to workers that ask
for them (long poll), records completions (first wins), fails a job whose input is bad,
merges finished jobs' reduce outputs into the result, and keeps the live view of members
(heartbeats, current tasks) that ``pdp status`` shows.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pdp.consensus import ConsensusError
from pdp.errors import PdpError
from pdp.jobs import job_kind
from pdp.scheduler import TaskKey, jobs_to_assemble, pick_task
from pdp.state import Job, Task
from pdp.streams import recv_file
from pdp.transport import Handler, Stream

if TYPE_CHECKING:
    from pdp.node import Node

log = logging.getLogger("pdp.master")

POLL = 2.0  # longest a worker's task request waits for work
LEASE = 30.0  # lease length recorded with an assignment (enforced from issue 3 on)


class NotMaster(PdpError):
    pass


class Master:
    def __init__(self, node: Node) -> None:
        self.node = node
        self.term = 0  # the term this node is master in, 0 if not master
        self.reserved: set[TaskKey] = set()
        self.assembling: set[str] = set()
        self.live: dict[str, dict[str, Any]] = {}

    def handlers(self) -> dict[str, Handler]:
        return {"get_task": self._get_task, "task_done": self._task_done, "task_failed": self._task_failed,
                "heartbeat": self._heartbeat, "live": self._live}

    # -- becoming master ----------------------------------------------------------------

    def is_master(self) -> bool:
        c = self.node.consensus
        assert c is not None
        if not c.is_leader():
            return False
        with c.reading() as state:
            return state.master["term"] == c.term() and state.master["name"] == self.node.name

    async def run(self) -> None:
        """Claim mastership after each election won; assemble finished jobs while master."""
        c = self.node.consensus
        assert c is not None
        while True:
            if c.is_leader() and not self.is_master():
                await self._claim(c.term())
            if self.is_master():
                if self.term != c.term():
                    self.term = c.term()
                    self.reserved.clear()
                    log.info("%s is master in term %d", self.node.name, self.term)
                self._start_assembly()
            elif self.term:
                log.info("%s is no longer master (term %d)", self.node.name, self.term)
                self.term = 0
            await self.node.changes.wait(0.2)

    async def _claim(self, term: int) -> None:
        cmd = {"op": "master", "term": term, "name": self.node.name, "data_addr": self.node.config.advertise_addr}
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
        worker = str(hdr["node"])
        deadline = time.monotonic() + min(float(hdr.get("wait", POLL)), POLL)
        while True:
            term = self._require()
            assignment = await self._assign_next(worker, term)
            if assignment is not None:
                await stream.send({"t": "task", **assignment})
                return
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                await stream.send({"t": "idle"})
                return
            await self.node.changes.wait(remaining)

    async def _assign_next(self, worker: str, term: int) -> dict[str, Any] | None:
        c = self.node.consensus
        assert c is not None
        while True:
            with c.reading() as state:
                picked = pick_task(state, worker, self.reserved)
                if picked is None:
                    return None
                job, task = picked
                k = (job.id, task.phase, task.index)
                spec = _assignment(state.members, job, task)
            self.reserved.add(k)
            try:
                res = await self.node.propose({"op": "assign", "job": job.id, "phase": task.phase, "index": task.index,
                                               "node": worker, "term": term, "lease_until": time.time() + LEASE})
            finally:
                self.reserved.discard(k)
            if res.get("ok"):
                log.info("job %s: %s %d -> %s (attempt %d)", job.id, task.phase, task.index, worker, res["attempt"])
                return {**spec, "attempt": res["attempt"], "term": term}
            if res.get("stale"):
                raise NotMaster(res["error"])

    async def _task_done(self, stream: Stream, hdr: dict[str, Any], _: bytes) -> None:
        term = self._require()
        res = await self.node.propose({"op": "complete", "job": hdr["job"], "phase": hdr["phase"],
                                       "index": hdr["index"], "attempt": hdr["attempt"], "node": hdr["node"],
                                       "term": term, "stats": hdr.get("stats") or {}})
        if res.get("stale"):
            raise NotMaster(res["error"])
        if res.get("ok"):
            log.info("job %s: %s %s done on %s", hdr["job"], hdr["phase"], hdr["index"], hdr["node"])
        await stream.send({"t": "ok", "accepted": bool(res.get("ok")), "why": res.get("error", "")})

    async def _task_failed(self, stream: Stream, hdr: dict[str, Any], _: bytes) -> None:
        """A task hit an error that running it again cannot fix (bad input): fail the job."""
        term = self._require()
        res = await self.node.propose({"op": "fail", "job": hdr["job"], "term": term, "error": str(hdr["error"]),
                                       "now": time.time()})
        if res.get("ok"):
            log.warning("job %s failed: %s", hdr["job"], hdr["error"])
        await stream.send({"t": "ok"})

    # -- liveness ---------------------------------------------------------------------

    async def _heartbeat(self, stream: Stream, hdr: dict[str, Any], _: bytes) -> None:
        name = str(hdr["node"])
        if name not in self.live:
            log.info("member %s is alive", name)
        self.live[name] = {"seen": time.monotonic(), "tasks": list(hdr.get("tasks") or []),
                           "slots": int(hdr.get("slots", 0))}
        await stream.send({"t": "ok", "master": self.node.name})

    def live_view(self) -> dict[str, Any]:
        now = time.monotonic()
        return {name: {"age": round(now - v["seen"], 3), "tasks": v["tasks"], "slots": v["slots"]}
                for name, v in self.live.items()}

    async def _live(self, stream: Stream, hdr: dict[str, Any], _: bytes) -> None:
        self._require()
        await stream.send({"t": "live", "members": self.live_view()})

    # -- assembling results -------------------------------------------------------------

    def _start_assembly(self) -> None:
        c = self.node.consensus
        assert c is not None
        with c.reading() as state:
            jobs = [(j.id, j.kind, [t.node for t in j.reduces]) for j in jobs_to_assemble(state)]
        for job_id, kind, reducers in jobs:
            if job_id not in self.assembling:
                self.assembling.add(job_id)
                task = asyncio.create_task(self._assemble(job_id, kind, reducers, self.term))
                task.add_done_callback(lambda _, j=job_id: self.assembling.discard(j))

    async def _assemble(self, job_id: str, kind: str, reducers: list[str], term: int) -> None:
        node = self.node
        try:
            parts = await asyncio.gather(*(self._fetch_part(job_id, r, name) for r, name in enumerate(reducers)))
            result = node.spool.file(job_id, "result")
            stats = await node.run_in_pool(job_kind(kind).merge_outputs, [str(p) for p in parts], str(result))
            digest = await asyncio.to_thread(_sha256, result)
            res = await node.propose({"op": "finish", "job": job_id, "term": term, "now": time.time(),
                                      "result": {"holder": node.name, "size": stats["bytes"], "keys": stats["keys"],
                                                 "sha256": digest}})
            if res.get("ok"):
                log.info("job %s done: %d distinct keys, %d bytes", job_id, stats["keys"], stats["bytes"])
        except (PdpError, OSError) as exc:
            log.warning("assembling job %s failed (will retry): %s", job_id, exc)
            await asyncio.sleep(1.0)

    async def _fetch_part(self, job_id: str, r: int, holder: str) -> Path:
        node = self.node
        if holder == node.name:
            return node.spool.file(job_id, f"reduce-{r}")
        dest = node.spool.file(job_id, f"part-{r}")
        conn = await node.peers.get(node.member_addr(holder))
        stream = conn.open_stream()
        try:
            await stream.send({"t": "fetch_file", "job": job_id, "name": f"reduce-{r}"})
            await recv_file(stream, dest)
        finally:
            stream.close()
        return dest


def _assignment(members: dict[str, Any], job: Job, task: Task) -> dict[str, Any]:
    """What a worker needs to run ``task``: where its bytes are and where its output goes."""
    spec: dict[str, Any] = {"job": job.id, "kind": job.kind, "phase": task.phase, "index": task.index,
                            "n_reduce": job.n_reduce}
    if task.phase == "map":
        inp = job.inputs[task.input]
        spec.update(file=inp["file_id"], name=inp["name"], start=task.start, end=task.end,
                    holders=[(h, members[h].data_addr) for h in inp["holders"] if h in members])
    else:
        spec["sources"] = [(t.index, t.node, members[t.node].data_addr) for t in job.maps]
    return spec


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()
