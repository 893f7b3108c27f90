"""The worker role: ask the master for tasks, run them in the process pool, report back.

Each task slot (``cpus`` of them) is a loop: long-poll the master for work (one task, or a
bundle of small ones), fetch what each task reads (a chunk of input from a holder, or map
outputs from the mappers), run the job kind's function in the pool, report completion. A
heartbeat loop tells the master this member is alive, what it is running and whether its
owner's limits pause it; the master answers with attempts to stop (cancelled jobs, tasks
another attempt finished). Workers refuse an assignment from a term older than one they
have already obeyed.

The owner comes first: a paused node (outside its hours, owner busy, on battery, spool
full: :mod:`pdp.node.limits`) asks for no work, and with ``on_pause = "hand_back"`` gives its
running tasks back at once.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import zlib
from collections import OrderedDict
from concurrent.futures.process import BrokenProcessPool
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgpack

from pdp.jobs import mapoutput
from pdp.jobs import progress as task_progress
from pdp.errors import InputError, PdpError
from pdp.fsutil import Damaged, check_range, crc32_file, sha256_file
from pdp.jobs import run_maps, run_whole, runtime
from pdp.node.limits import Sampler, pause_reason
from pdp.jobs.progress import TaskAborted
from pdp.jobs.progress import read as read_progress
from pdp.jobs.progress import report as report_progress
from pdp.core.split import aligned_bounds
from pdp.net.streams import recv_file
from pdp.net.transport import ConnectionLost, Handler

if TYPE_CHECKING:
    from pdp.node.services import WorkerServices

log = logging.getLogger("pdp.node.worker")

FETCH_PARALLEL = 8
FETCH_BATCH = 256  # map outputs fetched from one holder in one request
ETIQUETTE_EVERY = 2.0  # seconds between checks of the owner's limits


class Unreachable(PdpError):
    """Outputs of done tasks could not be fetched from a holder (it is down or lost them)."""

    def __init__(self, phase: str, holder: str, indexes: list[int], why: str) -> None:
        super().__init__(f"{phase} output(s) {indexes} unreachable on {holder}: {why}")
        self.phase, self.holder, self.indexes = phase, holder, indexes


class Aborted(PdpError):
    """The master (or this node's owner's limits) stopped an attempt before it finished."""


AttemptKey = tuple[str, str, int, int]
MODELS_KEPT = 16  # models (each at most 1 MiB) a worker keeps, so a round's model comes once


class Worker:
    def __init__(self, node: WorkerServices) -> None:
        self.node = node
        self.running: dict[AttemptKey, dict[str, Any]] = {}  # what this member runs (listed in heartbeats)
        self.models: OrderedDict[str, Any] = OrderedDict()  # the models of round jobs' tasks, by job and round
        self.highest_term = 0
        self.leaving = False  # set by `pdp leave`: ask for no more work
        self.paused = ""  # why the owner's limits pause this node ("" = taking work)
        self.unpaused = asyncio.Event()
        self.unpaused.set()
        self.slots: dict[int, asyncio.Task[None]] = {}
        self.sampler = Sampler()
        cfg = node.config
        # a heartbeat stuck on a master that is gone must give up well before the new master
        # counts this member silent (dead_after), so the next one reaches the new master in time
        self._beat_timeout = min(2 * cfg.heartbeat, cfg.dead_after / 3)

    def handlers(self) -> dict[str, Handler]:
        return {}

    def start(self) -> list[asyncio.Task[None]]:
        self.resize()
        return [asyncio.create_task(self._heartbeats()), asyncio.create_task(self._etiquette())]

    def resize(self) -> None:
        """Run one slot loop per configured cpu (after a reload, extra slots end after their work)."""
        for i in range(self.node.config.cpus):
            if i not in self.slots or self.slots[i].done():
                self.slots[i] = asyncio.create_task(self._slot(i))

    def stop(self) -> None:
        for task in self.slots.values():
            task.cancel()

    # -- the loops --------------------------------------------------------------------

    async def _slot(self, slot: int) -> None:
        await self.node.registered.wait()  # the master only talks to members
        backoff = 0.1
        while slot < self.node.config.cpus and not self.leaving:
            await self.unpaused.wait()
            await self.node.registered.wait()  # again after a change of Raft seat
            try:
                tasks = await self._ask()
                backoff = 0.1
            except (PdpError, OSError) as exc:
                log.debug("slot %d: no master to ask (%s)", slot, exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 1.0)
                continue
            if tasks and tasks[0]["term"] < self.highest_term:
                log.warning("refused %d task(s) of %s from old term %d", len(tasks), tasks[0]["job"], tasks[0]["term"])
                continue
            if tasks:
                self.highest_term = tasks[0]["term"]
                await self._run_bundle(slot, tasks)
        log.info("task slot %d closed", slot)

    async def _run_bundle(self, slot: int, tasks: list[dict[str, Any]]) -> None:
        """Run the tasks (small maps together, else one after another); each is listed (as
        running) in heartbeats until it ends."""
        progress = str(self.node.spool.file(tasks[0]["job"], f"progress-{slot}"))
        entries = []
        for task in tasks:
            k = _key(task)
            self.running[k] = {"job": task["job"], "phase": task["phase"], "index": task["index"],
                               "attempt": task["attempt"], "since": time.time(), "file": "", "aborted": ""}
            entries.append(k)
        reports: list[asyncio.Task[None]] = []
        try:
            together = await self._run_maps_together(tasks, progress) if len(tasks) > 1 else None
            if together is not None:
                if together:
                    reports.append(asyncio.create_task(self._report({"t": "tasks_done", "done": together})))
                return
            for task in tasks:
                entry = self.running[_key(task)]
                if entry["aborted"]:
                    continue
                task_progress.clear(progress)
                entry["file"] = progress
                try:
                    header = await self._run(task, progress, entry)
                finally:
                    self.running.pop(_key(task), None)  # done: no longer listed, nor stopped by a request
                if header is not None:
                    reports.append(asyncio.create_task(self._report(header)))
        finally:
            for k in entries:
                self.running.pop(k, None)
            if reports:
                await asyncio.gather(*reports, return_exceptions=True)

    async def _run_maps_together(self, tasks: list[dict[str, Any]], progress: str) -> list[dict[str, Any]] | None:
        """A bundle of small maps in one pool call, their inputs fetched first; returns the
        completion reports, or None to run them one by one (any trouble, or not maps)."""
        if any(t["phase"] != "map" or t.get("copy_to") is not None for t in tasks):
            return None
        node, t0, started = self.node, time.monotonic(), time.time()
        entries = [self.running[_key(t)] for t in tasks]
        fetched: list[Path] = []
        try:
            specs = await asyncio.gather(*(self._map_spec(t, fetched) for t in tasks))
            task_progress.clear(progress)
            for entry in entries:
                entry["file"] = progress
            spec = await self._spec(tasks[0])
            stats = await node.run_in_pool(run_maps, spec, [s[0] for s in specs], progress)
        except Exception as exc:  # noqa: BLE001 - each task then meets its own error on its own
            log.log(logging.WARNING if isinstance(exc, BrokenProcessPool) else logging.INFO,
                    "bundle of %d maps of %s: %s; running them one by one", len(tasks), tasks[0]["job"],
                    exc or type(exc).__name__)
            for entry in entries:
                entry["file"] = ""
            if isinstance(exc, BrokenProcessPool):
                await node.restart_pool(node.pool)
            return None  # the ones not stopped run one by one
        finally:
            for path in fetched:
                path.unlink(missing_ok=True)
        for t in tasks:
            self.running.pop(_key(t), None)
        seconds, ended = round((time.monotonic() - t0) / len(tasks), 4), round(time.time(), 4)
        return [{"t": "task_done", "job": t["job"], "phase": "map", "index": t["index"], "attempt": t["attempt"],
                 "node": node.name, "stats": {**st, "input_bytes": spec[1], "seconds": seconds,
                                              "started": round(started, 4), "ended": ended}}
                for t, st, spec in zip(tasks, stats, specs)]

    async def _map_spec(self, task: dict[str, Any], fetched: list[Path]
                        ) -> tuple[tuple[str, int, int, int, str, dict[str, Any]], int]:
        """(run_maps argument, its line-aligned size) for a map."""
        path, a, b, base = await self._locate(task, fetched)
        out = str(self.node.spool.file(task["job"], f"map-{task['index']}"))
        return (path, a, b, task["n_reduce"], out, {**_input_spec(task), "base": base}), b - a

    async def _spec(self, task: dict[str, Any]) -> dict[str, Any]:
        """The spec a task process loads the job from: a user job's code is fetched first,
        and only where this node's owner allows running it."""
        spec = {**task["spec"], "step": 0 if task["spec"].get("iterate") else task["step"],  # rounds: one step
                "sort_mb": self.node.config.sort_buffer_mb}
        if task.get("code"):
            if not self.node.config.allow_code:
                raise PdpError(f"{self.node.name} does not run users' code (allow_code = false)")
            spec["code"] = str(await self.node.job_code(task["job"], task["code"]))
        return spec

    async def _locate(self, task: dict[str, Any], fetched: list[Path]) -> tuple[str, int, int, int]:
        """(file, start, end, base) of a map's line-aligned bytes here: in its input if this
        member holds it, else in a chunk fetched from a holder (added to ``fetched``; ``base``
        is the chunk's offset in the input)."""
        node = self.node
        local = node.spool.input(task["file"])
        if local.exists():
            with open(local, "rb") as f:
                a, b = aligned_bounds(f, task["start"], task["end"], local.stat().st_size)
            try:  # every byte the map and the line search read, against the input's block checksums
                await asyncio.to_thread(check_range, local, max(0, task["start"] - 1), max(a, b))
                return str(local), a, b, 0
            except Damaged as exc:
                log.warning("map %s of %s: %s here; fetching it from another holder", task["index"], task["job"], exc)
        path = node.spool.file(task["job"], f"chunk-{task['index']}")
        fetched.append(path)
        base, end = await self._fetch_range(task, path)
        return str(path), 0, end - base, base

    async def _ask(self) -> list[dict[str, Any]]:
        master = self.node.master_addr()
        if master is None:
            raise PdpError("no master elected yet")
        frame = await self.node.peers.request(master[1], {"t": "get_task", "node": self.node.name, "wait": 2.0,
                                                          "have": list(self.models)}, timeout=5.0)
        if frame.header["t"] != "tasks":
            return []
        tasks = list(frame.header["tasks"])
        if frame.payload:
            self._keep_models(msgpack.unpackb(frame.payload))
        for task in tasks:
            key = task.get("model_key")
            if key is not None:
                if key not in self.models:  # (forgotten since it asked: the task's lease runs out, it runs again)
                    raise PdpError(f"the master sent {task['job']}'s task without its model {key}")
                self.models.move_to_end(key)
                task["spec"]["model"] = self.models[key]
        return tasks

    def _keep_models(self, models: Any) -> None:
        """Keep the latest MODELS_KEPT models the master sent (by job and round)."""
        for key, model in dict(models).items():
            self.models[str(key)] = model
            self.models.move_to_end(str(key))
        while len(self.models) > MODELS_KEPT:
            self.models.popitem(last=False)

    def _listing(self) -> list[dict[str, Any]]:
        """What this member runs, with progress (bytes done), for the master's leases."""
        return [{**{k: v for k, v in r.items() if k not in ("file", "aborted")},
                 "progress": read_progress(r["file"]) if r["file"] else 0,
                 **({"status": status} if r["file"] and (status := _status(r["file"])) else {})}
                for r in self.running.values()]

    async def _heartbeats(self) -> None:
        await self.node.registered.wait()
        while True:
            master = self.node.master_addr()
            if master is not None:
                try:
                    frame = await self.node.peers.request(
                        master[1], {"t": "heartbeat", "node": self.node.name, "slots": self.node.config.cpus,
                                    "tasks": self._listing(), "paused": self.paused}, timeout=self._beat_timeout)
                    for job, phase, index, attempt in frame.header.get("abort") or []:
                        self.abort((str(job), str(phase), int(index), int(attempt)), "the master stopped it")
                except (PdpError, OSError) as exc:
                    log.debug("heartbeat to %s failed: %s", master[0], exc)
            await asyncio.sleep(self.node.config.heartbeat)

    def abort(self, k: AttemptKey, why: str) -> None:
        """Stop an attempt: skip it if it has not started, else ask its task process to stop."""
        entry = self.running.get(k)
        if entry is None or entry["aborted"]:
            return
        log.info("stopping %s %s of %s (attempt %d): %s", k[1], k[2], k[0], k[3], why)
        entry["aborted"] = why
        if entry["file"]:
            task_progress.request_stop(entry["file"])

    # -- the owner's limits -------------------------------------------------------------

    async def _etiquette(self) -> None:
        """Pause (and resume) taking work by the owner's limits; say why in heartbeats."""
        while True:
            cfg = self.node.config
            try:
                reason = await asyncio.to_thread(self._pause_reason)
            except Exception as exc:  # a sensor failing must not stop the node
                log.warning("cannot check this machine's load or battery: %s", exc)
                reason = ""
            if reason != self.paused:
                log.warning("paused: %s", reason) if reason else log.warning("taking work again")
                self.paused = reason
            if reason:
                self.unpaused.clear()
                if cfg.on_pause == "hand_back":
                    for k in list(self.running):
                        self.abort(k, f"handed back: {reason}")
            else:
                self.unpaused.set()
            await asyncio.sleep(ETIQUETTE_EVERY)

    def _pause_reason(self) -> str:
        cfg, s = self.node.config, self.sampler
        return pause_reason(cfg, datetime.now(), s.owner_load() if cfg.max_load else None,
                            s.on_battery() if cfg.pause_on_battery else None,
                            s.spool_bytes(self.node.spool.root) if cfg.disk else 0)

    # -- running a task -----------------------------------------------------------------

    async def _run(self, task: dict[str, Any], progress: str, entry: dict[str, Any]) -> dict[str, Any] | None:
        """Run one task; returns the report for the master (None: nothing to say)."""
        t0, started = time.monotonic(), time.time()
        pool = self.node.pool
        ident = {"job": task["job"], "phase": task["phase"], "index": task["index"], "attempt": task["attempt"],
                 "node": self.node.name}
        try:
            stats = await (self._map(task, progress) if task["phase"] == "map" else self._reduce(task, progress))
            if entry["aborted"]:
                raise Aborted(entry["aborted"])
        except (TaskAborted, Aborted):
            why = entry["aborted"]
            log.info("%s %s of %s stopped: %s", task["phase"], task["index"], task["job"], why or "no reason")
            if not why or why.startswith("handed back"):  # give it back to run elsewhere at once
                return {"t": "task_failed", **ident, "retry": True, "counted": False, "why": "handed back",
                        "error": why or "stopped without a reason"}
            return None
        except InputError as exc:
            return {"t": "task_failed", **ident, "error": str(exc)}
        except Unreachable as exc:
            log.warning("%s %s of %s: %s", task["phase"], task["index"], task["job"], exc)
            await self._report({"t": "unreachable", "job": task["job"], "phase": exc.phase, "holder": exc.holder,
                                "indexes": exc.indexes})
            return {"t": "task_failed", **ident, "retry": True, "counted": False, "error": str(exc)}
        except (PdpError, OSError, BrokenProcessPool) as exc:
            if isinstance(exc, BrokenProcessPool):
                exc = PdpError("the task process died")
                await self.node.restart_pool(pool)
            log.warning("%s %s of %s failed here: %s", task["phase"], task["index"], task["job"], exc)
            return {"t": "task_failed", **ident, "retry": True, "error": str(exc)}
        except Exception as exc:  # noqa: BLE001 - a bug of ours must not end this slot: the task runs again
            log.exception("%s %s of %s failed here", task["phase"], task["index"], task["job"])
            return {"t": "task_failed", **ident, "retry": True, "error": f"{type(exc).__name__}: {exc}"}
        stats.update(seconds=round(time.monotonic() - t0, 4), started=round(started, 4),
                     ended=round(time.time(), 4))
        report = {"t": "task_done", **ident, "stats": stats}
        if "result" in stats:
            report["result"] = stats.pop("result")
        return report

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
        log.warning("could not report %s %s of %s to any master", header.get("phase"), header.get("index"), header.get("job", "a bundle"))

    async def _map(self, task: dict[str, Any], progress: str) -> dict[str, Any]:
        node, job = self.node, task["job"]
        fetched: list[Path] = []
        out = str(node.spool.file(job, f"map-{task['index']}"))
        whole = task.get("copy_to") is not None
        try:
            spec = {**await self._spec(task), **_input_spec(task)}
            path, a, b, base = await self._locate(task, fetched)
            if base:
                spec["base"] = base
            if whole:
                stats = await node.run_in_pool(run_whole, spec, path, a, b, out,
                                               str(node.spool.file(job, "result")), progress)
            else:
                stats = await node.run_in_pool(runtime.map_task, spec, path, a, b, task["n_reduce"], out, progress)
        finally:
            for chunk in fetched:
                chunk.unlink(missing_ok=True)
        stats = {**stats, "input_bytes": b - a}
        if whole:
            stats["result"] = await self._store_whole(task, stats.pop("result_bytes"), stats.pop("result_keys"))
        return stats

    async def _store_whole(self, task: dict[str, Any], size: int, keys: int) -> dict[str, Any]:
        """A whole small job ran in one task: store a copy of its result on another member;
        returns the result record for the log."""
        node, job = self.node, task["job"]
        result = node.spool.file(job, "result")
        digest = await asyncio.to_thread(sha256_file, result)
        holders, errors = [node.name], []
        for name, addr in task["copy_to"]:
            if name == node.name:
                continue
            try:
                await node.push_file(addr, {"t": "store_file", "job": job, "name": "result", "sha256": digest}, result)
                holders.append(name)
                break
            except (PdpError, OSError) as exc:
                errors.append(f"{name}: {exc}")
        if len(holders) < 2 and len(task["copy_to"]) > 1:
            raise PdpError(f"no other member took a copy of the result ({'; '.join(errors)})")
        return {"holders": holders, "size": int(size), "keys": int(keys), "sha256": digest}

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
                    await recv_file(stream, dest, durable=False)
                    return int(head.header["a"]), int(head.header["b"])
                finally:
                    stream.close()
            except (PdpError, OSError) as exc:
                log.warning("map %s of %s: input %s from %s failed: %s", task["index"], task["job"], task["name"],
                            holder, exc)
                errors.append(f"{holder}: {exc}")
        raise ConnectionLost(f"no holder of input {task['name']} answered ({'; '.join(errors) or 'none known'})")

    async def _reduce(self, task: dict[str, Any], progress: str) -> dict[str, Any]:
        node, job, r = self.node, task["job"], task["partition"]
        spec = await self._spec(task)
        sources: list[tuple[str, int]] = []  # (map output file, r) here; (fetched slices, -1) from others
        remote: dict[str, tuple[str, list[int]]] = {}  # holder -> (address, maps whose outputs it holds)
        local: list[tuple[int, str]] = []  # (map, its output file here)
        for m, holder, addr in task["sources"]:
            if holder == node.name:
                path = node.spool.file(job, f"map-{m}")
                if not path.exists():
                    raise Unreachable("map", holder, [m], "not in this spool")
                sources.append((str(path), r))
                local.append((m, str(path)))
            else:
                remote.setdefault(holder, (addr, []))[1].append(m)
        damaged = await asyncio.to_thread(mapoutput.damaged, local, r)  # CRCs stored by the maps
        if damaged:
            raise Unreachable("map", node.name, damaged, "damaged in this spool (CRC mismatch)")
        batches = [(h, a, ms[k:k + FETCH_BATCH]) for h, (a, ms) in remote.items() for k in range(0, len(ms), FETCH_BATCH)]
        gate = asyncio.Semaphore(FETCH_PARALLEL)
        fetched = len(sources)

        async def fetch(k: int, holder: str, addr: str, maps: list[int]) -> str:
            nonlocal fetched
            dest = node.spool.file(job, f"in-{r}-{k}")
            async with gate:
                for attempt in range(2):
                    try:
                        missing = await node.fetch_parts(addr, job, maps, r, dest)
                        break
                    except (PdpError, OSError) as exc:
                        if attempt:
                            raise Unreachable("map", holder, maps, str(exc)) from None
                        await asyncio.sleep(0.3)
            if missing:
                dest.unlink(missing_ok=True)
                raise Unreachable("map", holder, sorted(missing), "missing or damaged in its spool")
            fetched += len(maps)
            report_progress(progress, fetched)
            return str(dest)

        results = await asyncio.gather(*(fetch(k, *b) for k, b in enumerate(batches)), return_exceptions=True)
        fetched_files = [p for p in results if isinstance(p, str)]
        try:
            lost = [e for e in results if isinstance(e, Unreachable)]
            if lost:
                holder = lost[0].holder
                raise Unreachable("map", holder, sorted(i for e in lost if e.holder == holder for i in e.indexes),
                                  str(lost[0]))
            for got in results:
                if isinstance(got, BaseException):
                    raise got
            sources.extend((p, -1) for p in fetched_files)
            carried = task.get("copy_to") is not None  # not the last step: the output is the next one's input
            file_id = f"{job}-s{task['step']}-{r}"
            out = str(node.spool.input(file_id) if carried else node.spool.file(job, f"reduce-{task['index']}"))
            size = sum(Path(p).stat().st_size for p in fetched_files) + sum(
                mapoutput.size(p, r) for p, part in sources if part >= 0)
            stats = await node.run_in_pool(runtime.reduce_task, spec, sources, out)
            crc = await asyncio.to_thread(crc32_file, out)  # in the log: the master checks its copy
        finally:
            for p in fetched_files:
                Path(p).unlink(missing_ok=True)
        if carried:
            stats["output"] = {"file_id": file_id, "size": os.path.getsize(out),
                               "holders": await self._store_twice(task, file_id, Path(out))}
        return {**stats, "input_bytes": size, "crc32": crc}

    async def _store_twice(self, task: dict[str, Any], file_id: str, path: Path) -> list[str]:
        """A step's output is the next step's input: a second member stores a copy, as the
        job's inputs have (a party of one keeps its only copy)."""
        node, errors = self.node, []
        others = [(n, a) for n, a in task["copy_to"] if n != node.name]
        others.sort(key=lambda m: zlib.crc32(f"{file_id}/{m[0]}".encode()))
        for name, addr in others:
            try:
                await node.push_file(addr, {"t": "store_input", "file": file_id, "size": path.stat().st_size}, path)
                return [node.name, name]
            except (PdpError, OSError) as exc:
                errors.append(f"{name}: {exc}")
        if others:
            raise PdpError(f"no other member took a copy of step {task['step'] + 1}'s output ({'; '.join(errors)})")
        return [node.name]


def _status(progress: str) -> str:
    """What the job's code last said with ``set_status`` in the task reporting to ``progress``."""
    try:
        with open(progress + ".status", encoding="utf-8", errors="replace") as f:
            return f.read(200)
    except OSError:
        return ""


def _input_spec(task: dict[str, Any]) -> dict[str, Any]:
    """What a map's task process needs to read its records (file name, line, CSV header)."""
    return {"name": task.get("name", ""), "line": task.get("line") or 1, "header": task.get("header"),
            "input_index": task.get("input_index", 0),
            "data_type": task["spec"].get("data_type") or "text"}


def _key(task: dict[str, Any]) -> AttemptKey:
    return (str(task["job"]), str(task["phase"]), int(task["index"]), int(task["attempt"]))
