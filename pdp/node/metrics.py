"""``/metrics``: the party in Prometheus text format (prometheus-client).

Most figures are read from the replicated state at scrape time, so every member reports the
same party-wide numbers and a new master loses none: tasks started (attempts) and finished by
phase and outcome, re-runs, bytes read by maps and shuffled to reduces, task and job latency
histograms, jobs by state and the queue length, elections (the master's term). Members by
health come from the latest live view; the Raft figures (commit index, truncations) and the
leader changes this node saw are its own. Names follow Prometheus conventions: ``pdp_``
prefix, ``_total`` counters, ``_seconds`` and ``_bytes`` units.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from pdp.core.state import State

TASK_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
JOB_BUCKETS = (0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0, 3600.0)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _histogram(name: str, doc: str, values: list[float], buckets: tuple[float, ...],
               labels: dict[str, str] | None = None) -> HistogramMetricFamily:
    counts = [(str(b), sum(v <= b for v in values)) for b in buckets] + [("+Inf", len(values))]
    h = HistogramMetricFamily(name, doc, labels=list(labels or {}))
    h.add_metric(list((labels or {}).values()), counts, sum(values))
    return h


def state_metrics(state: State) -> Iterator[Metric]:
    """Party-wide figures from one reading of the replicated state."""
    started = CounterMetricFamily("pdp_tasks_started", "Task attempts started, by phase", labels=["phase"])
    finished = CounterMetricFamily("pdp_tasks_finished", "Tasks finished, by phase and outcome",
                                   labels=["phase", "outcome"])
    seconds: dict[str, list[float]] = {"map": [], "reduce": []}
    done = {"map": 0, "reduce": 0}
    attempts = {"map": 0, "reduce": 0}
    read = shuffled = 0
    jobs = {s: 0 for s in ("queued", "mapping", "reducing", "done", "failed", "cancelled")}
    job_seconds: list[float] = []
    reruns = backups = 0
    for job in state.jobs.values():
        jobs[job.state] = jobs.get(job.state, 0) + 1
        reruns += sum(job.reruns.values())
        backups += job.backups
        if job.state == "done" and job.finished_at >= job.submitted_at:
            job_seconds.append(job.finished_at - job.submitted_at)
        for t in job.maps + job.reduces:
            attempts[t.phase] += t.attempt
            if t.state != "done":
                continue
            done[t.phase] += 1
            if isinstance(t.stats.get("seconds"), (int, float)):
                seconds[t.phase].append(float(t.stats["seconds"]))
            if t.phase == "map":
                read += t.stats["bytes"] if type(t.stats.get("bytes")) is int else 0
            elif type(t.stats.get("input_bytes")) is int:
                shuffled += t.stats["input_bytes"]
    for phase in ("map", "reduce"):
        started.add_metric([phase], attempts[phase])
        finished.add_metric([phase, "done"], done[phase])
    yield started
    yield finished
    yield CounterMetricFamily("pdp_task_reruns", "Tasks given back to run again (lost, stalled, failed)", reruns)
    yield CounterMetricFamily("pdp_task_backups", "Backup attempts started for stragglers", backups)
    yield CounterMetricFamily("pdp_read_bytes", "Input bytes read by done map tasks", read)
    yield CounterMetricFamily("pdp_shuffled_bytes", "Map output bytes fetched by done reduce tasks", shuffled)
    for phase in ("map", "reduce"):
        yield _histogram("pdp_task_seconds", "Run time of done tasks' winning attempts", seconds[phase],
                         TASK_BUCKETS, {"phase": phase})
    yield _histogram("pdp_job_seconds", "Submission to result of done jobs", job_seconds, JOB_BUCKETS)
    g = GaugeMetricFamily("pdp_jobs", "Jobs in the party's state, by state", labels=["state"])
    for name, n in sorted(jobs.items()):
        g.add_metric([name], n)
    yield g
    yield GaugeMetricFamily("pdp_queue_length", "Jobs waiting for their first task", jobs["queued"])
    yield CounterMetricFamily("pdp_elections", "Master elections (the master's Raft term)", state.master["term"])


class PartyCollector(Collector):
    """Collects at scrape time from the node's state, live view and Raft status."""

    def __init__(self, read_state: Callable[[], Any], live: Callable[[], dict[str, Any]],
                 raft: Callable[[], dict[str, Any] | None]) -> None:
        self.read_state, self.live, self.raft = read_state, live, raft

    def collect(self) -> Iterator[Metric]:
        with self.read_state() as state:
            if state is not None:
                yield from state_metrics(state)
        health = GaugeMetricFamily("pdp_members", "Members by health in the master's live view", labels=["health"])
        counts = {h: 0 for h in ("alive", "suspected", "dead", "unknown")}
        for m in self.live().values():
            counts[str(m.get("health", "unknown"))] = counts.get(str(m.get("health", "unknown")), 0) + 1
        for h, n in counts.items():
            health.add_metric([h], n)
        yield health
        raft = self.raft()
        if raft is not None:
            yield GaugeMetricFamily("pdp_raft_commit_index", "This node's Raft commit index", raft["commit_idx"])
            yield GaugeMetricFamily("pdp_raft_term", "This node's Raft term", raft["term"])
            yield CounterMetricFamily("pdp_raft_truncations", "pysyncobj's 'truncating already-applied log entries'",
                                      raft["truncations"])
            yield CounterMetricFamily("pdp_raft_refused_messages", "Raft messages the screen dropped",
                                      raft["refused"])


class Metrics:
    """One node's registry: the party collector plus what only this node observes."""

    def __init__(self, collector: PartyCollector) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(collector)
        self.leader_changes = Counter("pdp_leader_changes", "Leader changes this node saw", registry=self.registry)
        self._leader: str | None = None

    def saw_leader(self, leader: str | None) -> None:
        if leader and leader != self._leader:
            if self._leader is not None:
                self.leader_changes.inc()
            self._leader = leader

    def render(self) -> bytes:
        return generate_latest(self.registry)
