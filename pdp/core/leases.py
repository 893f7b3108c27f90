"""The master's liveness and lease decisions, pure: events in, decisions out.

The master feeds a :class:`Leases` what it hears (heartbeats, assignments) and, on each
sweep, what the replicated state says is running; the sweep answers which members to declare
lost, which to probe (is the process gone?) and which attempts to give back, and why. Every
method takes ``now`` (a monotonic clock reading) instead of reading a clock, so the rules are
tested in milliseconds (``tests/test_leases.py``); :mod:`pdp.node.master` does the I/O.

The rules. A member is *alive* while it heard from within two heartbeat intervals,
*suspected* up to ``dead_after``, then *dead*; a member whose connection is refused is lost at
once (its process is gone; a paused or cut-off member only times out). An attempt's lease holds
while its member lists it in heartbeats and its progress moves: it is given back when its
member stops listing it (``lost on``) or its progress stands still for ``stall_after``
(``stalled on``: it keeps running, and still wins if it finishes first). A new master judges
nothing by time until every member had ``dead_after`` plus a heartbeat to speak, and gives back
at once an attempt a former master assigned that its member does not list (the assignment was
committed but never reached it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

AttemptKey = tuple[str, str, int, int]  # (job, phase, index, attempt)


@dataclass(frozen=True)
class Running:
    """One running attempt, as the replicated state records it."""

    job: str
    phase: str
    index: int
    attempt: int
    node: str
    term: int  # the master term that assigned it

    @property
    def key(self) -> AttemptKey:
        return (self.job, self.phase, self.index, self.attempt)


@dataclass
class Sweep:
    """What one sweep decided: members to declare lost (name, why), members to probe, and
    attempts to give back (attempt, reason)."""

    lose: list[tuple[str, str]] = field(default_factory=list)
    probe: list[str] = field(default_factory=list)
    release: list[tuple[Running, str]] = field(default_factory=list)


def attempt_key(t: dict[str, Any]) -> AttemptKey:
    """The key of an attempt as a heartbeat lists it."""
    return (str(t.get("job")), str(t.get("phase")), int(t.get("index", -1)), int(t.get("attempt", 0)))


class Leases:
    """One master term's view of who is alive and which leases hold."""

    def __init__(self, heartbeat: float, dead_after: float, stall_after: float, since: float, term: int = 0) -> None:
        self.heartbeat, self.dead_after, self.stall_after = heartbeat, dead_after, stall_after
        self.since, self.term = since, term  # when this master took over, and its term
        self.live: dict[str, dict[str, Any]] = {}  # name -> seen, first, tasks, slots, paused
        self.watch: dict[AttemptKey, list[float]] = {}  # attempt -> [progress, moved_at, seen_at]
        self.started: dict[AttemptKey, float] = {}  # attempt -> when it started (or this master first saw it)
        self.declared_dead: set[str] = set()

    # -- events in --------------------------------------------------------------------

    def heard(self, name: str, tasks: list[dict[str, Any]], slots: int, paused: str, now: float) -> str:
        """A heartbeat from ``name`` listing its running ``tasks``; returns "alive" for a
        member first heard, "back" for one declared lost, else ""."""
        news = "back" if name in self.declared_dead else "alive" if name not in self.live else ""
        self.declared_dead.discard(name)
        for t in tasks:
            self._progress(attempt_key(t), float(t.get("progress", 0)), now)
        first = self.live.get(name, {}).get("first", now)
        self.live[name] = {"seen": now, "first": first, "tasks": tasks, "slots": slots, "paused": paused}
        return news

    def assigned(self, key: AttemptKey, now: float) -> None:
        self.started[key] = now

    def lost(self, name: str) -> None:
        """``name`` was declared lost (the log says so): its attempts are no longer judged."""
        self.declared_dead.add(name)

    def _progress(self, key: AttemptKey, progress: float, now: float) -> None:
        entry = self.watch.setdefault(key, [-1.0, now, now])
        if progress != entry[0]:
            entry[0], entry[1] = progress, now
        entry[2] = now

    # -- questions ----------------------------------------------------------------------

    def health(self, name: str, now: float) -> tuple[str, float | None]:
        """(alive | suspected | dead | unknown, seconds since the last heartbeat)."""
        seen = self.live.get(name)
        if seen is None:
            return ("dead" if name in self.declared_dead else "unknown"), None
        age = now - seen["seen"]
        state = "alive" if age <= 2 * self.heartbeat else "suspected" if age <= self.dead_after else "dead"
        return state, age

    def view(self, now: float) -> dict[str, Any]:
        """Every member heard of: health, seconds since heard, tasks, slots, pause reason."""
        view = {}
        for name in sorted(set(self.live) | self.declared_dead):
            health, age = self.health(name, now)
            info = self.live.get(name, {})
            view[name] = {"health": health, "age": None if age is None else round(age, 3),
                          "tasks": info.get("tasks", []), "slots": info.get("slots", 0),
                          "paused": info.get("paused", "")}
        return view

    def running_info(self, now: float) -> dict[AttemptKey, tuple[float, int]]:
        """(seconds running, progress) of every running attempt this master has seen."""
        info = {}
        for key, started in self.started.items():
            entry = self.watch.get(key)
            info[key] = (now - started, int(entry[0]) if entry and entry[0] > 0 else 0)
        return info

    # -- the sweep ------------------------------------------------------------------------

    def silent(self, holding: set[str], members: set[str], me: str, now: float) -> Sweep:
        """Members holding work that must be declared lost, or probed (silent for two
        heartbeats): a member gone from the party, or silent longer than ``dead_after``."""
        sweep = Sweep()
        for name in sorted(holding - members - self.declared_dead):
            sweep.lose.append((name, "no longer a member"))
        for name in sorted(holding & members - self.declared_dead - {me}):
            quiet = now - self.live.get(name, {}).get("seen", self.since)
            if quiet > self.dead_after:
                sweep.lose.append((name, f"silent for {quiet:.1f} s"))
            elif name not in self.live or quiet > 2 * self.heartbeat:
                sweep.probe.append(name)
        return sweep

    def expired(self, running: list[Running], now: float) -> list[tuple[Running, str]]:
        """The attempts whose lease is over, with why; forgets attempts no longer running."""
        out = []
        for t in running:
            if t.node in self.declared_dead:
                continue
            reason = self._unheld(t) or self._expired(t, now)
            if reason:
                out.append((t, reason))
        keys = {t.key for t in running}
        self.watch = {k: v for k, v in self.watch.items() if k in keys}
        self.started = {k: v for k, v in self.started.items() if k in keys}
        for k in keys - set(self.started):
            self.started[k] = now
        return out

    def _unheld(self, t: Running) -> str:
        """Assigned by a former master and not listed by its member in a heartbeat sent a
        full interval after this master took over: it never reached the member."""
        if t.term >= self.term or t.key in self.watch:
            return ""
        info = self.live.get(t.node, {})
        first, seen = info.get("first", 0.0), info.get("seen", 0.0)
        if first and seen - max(first, self.since) > 2 * self.heartbeat:
            return f"lost on {t.node}"
        return ""

    def _expired(self, t: Running, now: float) -> str:
        if now - self.since < self.dead_after + self.heartbeat:
            return ""  # a new master first hears from every member before judging by time
        entry = self.watch.get(t.key)
        if entry is None:  # first noticed (just assigned, or a new master): full grace
            self.watch[t.key] = [-1.0, now, now]
            return ""
        if now - entry[2] > self.dead_after + self.heartbeat:
            return f"lost on {t.node}"  # its member is alive but no longer runs it
        if now - entry[1] > self.stall_after:
            return f"stalled on {t.node}"
        return ""
