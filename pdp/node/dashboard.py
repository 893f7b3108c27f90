"""The node's read-only web dashboard, JSON API and ``/metrics`` (aiohttp).

Routes: ``/`` the page (HTML, CSS and JS shipped in ``pdp/node/static``: no build step, nothing
from the internet), ``/api/status`` (what ``pdp status --json`` shows), ``/api/jobs`` (every
job with per-step map and reduce progress, throughput and an ETA), ``/api/events`` (the
party's recent events from the replicated state), ``/api/stream`` (server-sent events: the
three together, once a second, which the page renders live) and ``/metrics``
(:mod:`pdp.node.metrics`). Only GET; the page changes nothing.

It listens on ``dashboard`` (config) / ``--dashboard`` (default ``127.0.0.1:7780``, ``off``
to disable). On loopback it is plain HTTP. Beyond loopback it is HTTPS with the node's own
certificate (TLS 1.3), and every request must come with the certificate of one of the
party's identities (a user's, from ``pdp export-cert``, or a node's): the handshake checks
the certificate against the party's trust store, and :meth:`Dashboard._who` checks that
the identity is still in the party on every request (a revoked user is refused at once).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import ssl
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

from aiohttp import web

from pdp.core.state import Job, State
from pdp.identity import fingerprint
from pdp.node.metrics import CONTENT_TYPE, Metrics, PartyCollector

log = logging.getLogger("pdp.node.dashboard")

STATIC = Path(__file__).with_name("static")
PUSH_EVERY = 1.0  # seconds between server-sent snapshots
PAGE_FILES = {"dashboard.js": "application/javascript", "dashboard.css": "text/css"}


class DashboardServices(Protocol):
    """What the dashboard reads: the party's status, the replicated state, the live view."""

    async def status_view(self) -> dict[str, Any]: ...

    def reading(self) -> contextlib.AbstractContextManager[State | None]: ...

    def raft_status(self) -> dict[str, Any] | None: ...


def job_view(job: Job, now: float) -> dict[str, Any]:
    """A job for the page: per-step progress, bytes read per second, an ETA (None if unknown)."""
    steps = []
    for k in range(job.steps):
        maps = [t for t in job.maps if t.step == k]
        reduces = [t for t in job.reduces if t.step == k]
        steps.append({"step": k + 1, "maps": len(maps), "maps_done": sum(t.state == "done" for t in maps),
                      "reduces": len(reduces) if maps else job.n_reduce,
                      "reduces_done": sum(t.state == "done" for t in reduces),
                      "running": sum(t.state == "running" for t in maps + reduces)})
    total = sum(s["maps"] + s["reduces"] for s in steps) or 1
    done = sum(s["maps_done"] + s["reduces_done"] for s in steps)
    end = job.finished_at if job.state in ("done", "failed", "cancelled") and job.finished_at else now
    elapsed = max(0.0, end - job.submitted_at)
    read = sum(t.stats["bytes"] for t in job.maps if t.state == "done" and type(t.stats.get("bytes")) is int)
    fraction = done / total
    eta = None if job.state not in ("queued", "mapping", "reducing") or not done else elapsed * (1 - fraction) / fraction
    return {"id": job.id, "state": job.state, "error": job.error, "job": job.spec.get("shown") or
            job.spec.get("builtin") or job.kind, "submitter": job.form.get("submitter", ""),
            "step": job.step + 1, "steps": steps, "progress": round(fraction, 4), "elapsed": round(elapsed, 2),
            "read_bytes": read, "bytes_per_second": round(read / elapsed) if elapsed > 0 else 0,
            "eta_seconds": None if eta is None else round(eta, 1), "reruns": dict(job.reruns),
            "backups": job.backups, "counters": job.counters()}


EVENTS_SHOWN = 100  # the page's and /api/events' latest events


class Dashboard:
    """The aiohttp application and its server on one address."""

    def __init__(self, services: DashboardServices) -> None:
        self.services = services
        # beyond loopback: fingerprint -> the party identity's name, or None (refused)
        self.allowed: Callable[[str], str | None] | None = None
        self.last_status: dict[str, Any] = {}
        self.metrics = Metrics(PartyCollector(services.reading, self._members, services.raft_status))
        self.runner: web.AppRunner | None = None
        self.app = web.Application(middlewares=[self._who])
        self.app.router.add_get("/", self._page)
        self.app.router.add_get("/static/{name}", self._static)
        self.app.router.add_get("/api/status", self._status)
        self.app.router.add_get("/api/jobs", self._jobs)
        self.app.router.add_get("/api/events", self._events)
        self.app.router.add_get("/api/stream", self._stream)
        self.app.router.add_get("/metrics", self._metrics)

    async def start(self, host: str, port: int, ssl_context: ssl.SSLContext | None = None) -> int:
        """Listen (HTTPS with ``ssl_context``); returns the port (the OS's choice for port 0)."""
        self.runner = web.AppRunner(self.app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, host, port, ssl_context=ssl_context)
        await site.start()
        server = getattr(site, "_server", None)
        bound = server.sockets[0].getsockname()[1] if server is not None and server.sockets else port
        log.info("dashboard on %s://%s:%d/%s", "https" if ssl_context else "http", host, bound,
                 " (a party identity's certificate required)" if ssl_context else "")
        return int(bound)

    @web.middleware
    async def _who(self, request: web.Request, handler: Any) -> web.StreamResponse:
        """Beyond loopback, only a party identity's certificate gets an answer."""
        if self.allowed is not None:
            ssl_obj = request.transport.get_extra_info("ssl_object") if request.transport else None
            der = ssl_obj.getpeercert(binary_form=True) if ssl_obj is not None else None
            if not der or self.allowed(fingerprint(der)) is None:
                raise web.HTTPForbidden(text="pdp: this dashboard answers only the party's identities: present your "
                                             "pdp certificate (`pdp export-cert` writes one for a browser or curl)\n")
        result: web.StreamResponse = await handler(request)
        return result

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    # -- views -------------------------------------------------------------------------

    def _members(self) -> dict[str, Any]:
        return {m["name"]: m for m in self.last_status.get("members", [])}

    async def _status_now(self) -> dict[str, Any]:
        status = await self.services.status_view()
        self.last_status = status
        self.metrics.saw_leader(status.get("leader"))
        return status

    def _jobs_now(self) -> list[dict[str, Any]]:
        with self.services.reading() as state:
            now = time.time()
            return [job_view(j, now) for j in sorted(state.jobs.values(), key=lambda j: j.seq)] if state else []

    def _events_now(self) -> list[dict[str, Any]]:
        with self.services.reading() as state:
            return state.event_list(limit=EVENTS_SHOWN) if state else []

    async def snapshot(self) -> dict[str, Any]:
        status = await self._status_now()
        return {"status": status, "jobs": self._jobs_now(), "events": self._events_now(), "at": time.time()}

    async def _page(self, request: web.Request) -> web.StreamResponse:
        return web.FileResponse(STATIC / "dashboard.html", headers=_NO_CACHE)

    async def _static(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        if name not in PAGE_FILES:
            raise web.HTTPNotFound()
        return web.FileResponse(STATIC / name, headers={**_NO_CACHE, "Content-Type": PAGE_FILES[name]})

    async def _status(self, request: web.Request) -> web.Response:
        return _json(await self._status_now())

    async def _jobs(self, request: web.Request) -> web.Response:
        return _json(self._jobs_now())

    async def _events(self, request: web.Request) -> web.Response:
        return _json(self._events_now())

    async def _metrics(self, request: web.Request) -> web.Response:
        with contextlib.suppress(Exception):  # members by health from a fresh status, if there is one
            await self._status_now()
        return web.Response(body=self.metrics.render(), headers={"Content-Type": CONTENT_TYPE})

    async def _stream(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", **_NO_CACHE})
        await resp.prepare(request)
        with contextlib.suppress(ConnectionError, asyncio.CancelledError):
            while True:
                try:
                    data = json.dumps(await self.snapshot(), separators=(",", ":"))
                except Exception as exc:  # no leader yet, a member mid-switch: say so, keep the stream
                    data = json.dumps({"error": f"{type(exc).__name__}: {exc}", "at": time.time()})
                await resp.write(f"data: {data}\n\n".encode())
                await asyncio.sleep(PUSH_EVERY)
        return resp


_NO_CACHE = {"Cache-Control": "no-store"}


def _json(value: Any) -> web.Response:
    return web.Response(text=json.dumps(value), content_type="application/json")


def node_services(node: Any) -> DashboardServices:
    """The dashboard's view of a running node (the composition root passes itself)."""
    return _NodeView(node)


class _NodeView:
    def __init__(self, node: Any) -> None:
        self.node = node

    async def status_view(self) -> dict[str, Any]:
        result: dict[str, Any] = await self.node.gateway.status_view()
        return result

    @contextlib.contextmanager
    def reading(self) -> Iterator[State | None]:
        c = self.node.consensus
        if c is None:
            yield None
            return
        with c.reading() as state:
            yield state

    def raft_status(self) -> dict[str, Any] | None:
        c = self.node.consensus
        return None if c is None else dict(c.raft_status())
