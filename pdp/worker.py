"""The worker role: ask the master for tasks, run them in the process pool, report back.

Each task slot (``cpus`` of them) is a loop: long-poll the master for a task, fetch what
the task reads (a chunk of input from a holder, or map outputs from the mappers), run the
job kind's function in the pool, report completion. A heartbeat loop tells the master this
member is alive and what it is running. Workers refuse an assignment from a term older
than one they have already obeyed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pdp.errors import InputError, PdpError
from pdp.jobs import job_kind
from pdp.progress import read as read_progress
from pdp.progress import report as report_progress
from pdp.split import aligned_bounds
from pdp.streams import recv_file
from pdp.transport import ConnectionLost, Handler

if TYPE_CHECKING:
    from pdp.node import Node

log = logging.getLogger("pdp.worker")

FETCH_PARALLEL = 8


class Unreachable(PdpError):
    """Outputs of done tasks could not be fetched from a holder (it is down or lost them)."""

    def __init__(self, phase: str, holder: str, indexes: list[int], why: str) -> None:
        super().__init__(f"{phase} output(s) {indexes} unreachable on {holder}: {why}")
        self.phase, self.holder, self.indexes = phase, holder, indexes


class Worker:
    def __init__(self, node: Node) -> None:
        self.node = node
        self.running: dict[int, dict[str, Any]] = {}  # slot -> what it runs (listed in heartbeats)
        self.highest_term = 0
        self.leaving = False  # set by `pdp leave`: ask for no more work
        cfg = node.config
        # a heartbeat stuck on a master that is gone must give up well before the new master
        # counts this member silent (dead_after), so the next one reaches the new master in time
        self._beat_timeout = min(2 * cfg.heartbeat, cfg.dead_after / 3)

    def handlers(self) -> dict[str, Handler]:
        return {}

    def start(self) -> list[asyncio.Task[None]]:
        slots = [asyncio.create_task(self._slot(i)) for i in range(self.node.config.cpus)]
        return [*slots, asyncio.create_task(self._heartbeats())]

    # -- the loops --------------------------------------------------------------------

    async def _slot(self, slot: int) -> None:
        await self.node.registered.wait()  # the master only talks to members
        backoff = 0.1
        while True:
            if self.leaving:
                return
            await self.node.registered.wait()  # again after a change of Raft seat
            try:
                task = await self._ask()
                backoff = 0.1
            except (PdpError, OSError) as exc:
                log.debug("slot %d: no master to ask (%s)", slot, exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 1.0)
                continue
            if task is None:
                continue
            if task["term"] < self.highest_term:
                log.warning("refused %s %s of %s from old term %d", task["phase"], task["index"], task["job"], task["term"])
                continue
            self.highest_term = task["term"]
            progress = self.node.spool.file(task["job"], f"progress-{slot}")
            progress.unlink(missing_ok=True)
            self.running[slot] = {"job": task["job"], "phase": task["phase"], "index": task["index"],
                                  "attempt": task["attempt"], "since": time.time(), "file": str(progress)}
            try:
                await self._run(task, str(progress))
            finally:
                self.running.pop(slot, None)

    async def _ask(self) -> dict[str, Any] | None:
        master = self.node.master_addr()
        if master is None:
            raise PdpError("no master elected yet")
        frame = await self.node.peers.request(master[1], {"t": "get_task", "node": self.node.name, "wait": 2.0},
                                              timeout=5.0)
        return frame.header if frame.header["t"] == "task" else None

    def _listing(self) -> list[dict[str, Any]]:
        """What this member runs, with progress (bytes done), for the master's leases."""
        return [{**{k: v for k, v in r.items() if k != "file"}, "progress": read_progress(r["file"])}
                for r in self.running.values()]

    async def _heartbeats(self) -> None:
        await self.node.registered.wait()
        while True:
            master = self.node.master_addr()
            if master is not None:
                try:
                    await self.node.peers.request(master[1], {"t": "heartbeat", "node": self.node.name,
                                                              "slots": self.node.config.cpus,
                                                              "tasks": self._listing()}, timeout=self._beat_timeout)
                except (PdpError, OSError) as exc:
                    log.debug("heartbeat to %s failed: %s", master[0], exc)
            await asyncio.sleep(self.node.config.heartbeat)

    # -- running a task -----------------------------------------------------------------

    async def _run(self, task: dict[str, Any], progress: str) -> None:
        t0 = time.monotonic()
        pool = self.node.pool
        ident = {"job": task["job"], "phase": task["phase"], "index": task["index"], "attempt": task["attempt"],
                 "node": self.node.name}
        try:
            stats = await (self._map(task, progress) if task["phase"] == "map" else self._reduce(task, progress))
        except InputError as exc:
            await self._report({"t": "task_failed", **ident, "error": str(exc)})
            return
        except Unreachable as exc:
            log.warning("%s %s of %s: %s", task["phase"], task["index"], task["job"], exc)
            await self._report({"t": "unreachable", "job": task["job"], "phase": exc.phase, "holder": exc.holder,
                                "indexes": exc.indexes})
            await self._report({"t": "task_failed", **ident, "retry": True, "counted": False, "error": str(exc)})
            return
        except (PdpError, OSError, BrokenProcessPool) as exc:
            if isinstance(exc, BrokenProcessPool):
                exc = PdpError("the task process died")
                await self.node.restart_pool(pool)
            log.warning("%s %s of %s failed here: %s", task["phase"], task["index"], task["job"], exc)
            await self._report({"t": "task_failed", **ident, "retry": True, "error": str(exc)})
            return
        stats["seconds"] = round(time.monotonic() - t0, 4)
        await self._report({"t": "task_done", **ident, "stats": stats})

    async def _report(self, header: dict[str, Any]) -> None:
        """Tell the master, retrying across a master change until one answers."""
        for _ in range(120):
            master = self.node.master_addr()
            if master is not None:
                try:
                    await self.node.peers.request(master[1], header, timeout=6.0)
                    return
                except (PdpError, OSError) as exc:
                    log.debug("report to %s failed: %s", master[0], exc)
            await asyncio.sleep(0.5)
        log.warning("could not report %s %s of %s to any master", header.get("phase"), header.get("index"), header["job"])

    async def _map(self, task: dict[str, Any], progress: str) -> dict[str, Any]:
        node, job = self.node, task["job"]
        local = node.spool.input(task["file"])
        if local.exists():
            with open(local, "rb") as f:
                a, b = aligned_bounds(f, task["start"], task["end"], local.stat().st_size)
            path, base = local, 0
        else:
            path = node.spool.file(job, f"chunk-{task['index']}")
            base, end = await self._fetch_range(task, path)
            a, b = 0, end - base
        outs = [str(node.spool.file(job, f"map-{task['index']}-{r}")) for r in range(task["n_reduce"])]
        kind = job_kind(task["kind"])
        try:
            stats = await node.run_in_pool(kind.map_range, str(path), a, b, task["n_reduce"], outs, progress)
        except kind.InvalidUtf8 as exc:
            raise InputError(f"input {task['name']} is not valid UTF-8: invalid byte at offset {base + exc.offset}; "
                             "convert it to UTF-8 (e.g. iconv -f latin1 -t utf-8) and submit again") from None
        finally:
            if path != local:
                path.unlink(missing_ok=True)
        return dict(stats)

    async def _fetch_range(self, task: dict[str, Any], dest: Path) -> tuple[int, int]:
        """Fetch the map's line-aligned bytes from the first holder that answers."""
        errors = []
        for holder, addr in task["holders"]:
            try:
                conn = await self.node.peers.get(addr)
                stream = conn.open_stream()
                try:
                    await stream.send({"t": "fetch_range", "file": task["file"], "start": task["start"],
                                       "end": task["end"]})
                    head = await stream.recv(30.0)
                    await recv_file(stream, dest)
                    return int(head.header["a"]), int(head.header["b"])
                finally:
                    stream.close()
            except (PdpError, OSError) as exc:
                errors.append(f"{holder}: {exc}")
        raise ConnectionLost(f"no holder of input {task['name']} answered ({'; '.join(errors) or 'none known'})")

    async def _reduce(self, task: dict[str, Any], progress: str) -> dict[str, Any]:
        node, job, r = self.node, task["job"], task["index"]
        gate = asyncio.Semaphore(FETCH_PARALLEL)
        fetched = 0

        async def fetch(m: int, holder: str, addr: str) -> str:
            nonlocal fetched
            if holder == node.name:
                path = node.spool.file(job, f"map-{m}-{r}")
                if not path.exists():
                    raise Unreachable("map", holder, [m], "not in this spool")
                return str(path)
            dest = node.spool.file(job, f"in-{r}-{m}")
            async with gate:
                for attempt in range(2):
                    try:
                        await node.fetch_file(addr, job, f"map-{m}-{r}", dest, timeout=15.0)
                        break
                    except (PdpError, OSError) as exc:
                        if attempt:
                            raise Unreachable("map", holder, [m], str(exc)) from None
                        await asyncio.sleep(0.3)
            fetched += 1
            report_progress(progress, fetched)
            return str(dest)

        results = await asyncio.gather(*(fetch(m, h, a) for m, h, a in task["sources"]), return_exceptions=True)
        lost = [e for e in results if isinstance(e, Unreachable)]
        if lost:
            holder = lost[0].holder
            raise Unreachable("map", holder, sorted(i for e in lost if e.holder == holder for i in e.indexes),
                              str(lost[0]))
        for e in results:
            if isinstance(e, BaseException):
                raise e
        inputs = [str(p) for p in results]
        out = str(node.spool.file(job, f"reduce-{r}"))
        stats = await node.run_in_pool(job_kind(task["kind"]).reduce_partitions, inputs, out)
        for path in inputs:
            if "/in-" in path:
                Path(path).unlink(missing_ok=True)
        return dict(stats)
