"""The master's placement policy: which pending tasks a free worker slot gets next.

Pure: reads a :class:`~pdp.core.state.State` (plus times and progress passed in), returns a
decision. The policy, in order:

1. **Priority, then fair share by submitter.** Among jobs with work for the asking member,
   the highest priority goes first; within a priority, the submitter with the fewest
   running tasks, so one person's hundred jobs do not starve another's one; within a
   submitter, jobs in submission order. Maps come before reduces (the state machine
   enforces that too).
2. **Scores.** Each member's score (0..1) comes from its record: throughput on recent
   tasks relative to the party's fastest, times its reliability (failures and lost
   attempts, recent ones weighing most). A member that failed or lost several attempts in
   a row gets no work for a cooling-off time while others can take it; a task does not go
   back to a member it failed on while another member has not tried it.
3. **Locality and size.** A map prefers a member that holds its input bytes; well-scored
   members get the largest pending tasks and, when tasks are small, several at once (a
   bundle sized by the score); poorly-scored ones get the smallest.
4. **Backups** (Google MapReduce's backup tasks). When a phase has nothing left to hand
   out, a running task whose progress says it will finish much later than its peers did
   gets a second attempt on a faster member; the first to finish wins.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

from pdp.core.state import Job, Record, State, Task

TaskKey = tuple[str, str, int]  # (job id, phase, index)
AttemptKey = tuple[str, str, int, int]  # (job id, phase, index, attempt)

QUARANTINE_STREAK = 3  # failures/losses in a row that bench a member for a while
QUARANTINE_BASE = 5.0  # seconds, doubled for every further failure, at most QUARANTINE_MAX
QUARANTINE_MAX = 600.0
BUNDLE_BYTES = 4 << 20  # small map tasks are handed out together up to about this many bytes
BUNDLE_MAX = 128
GOOD_SCORE = 0.5


def key(job: Job, task: Task) -> TaskKey:
    return (job.id, task.phase, task.index)


# -- scores ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Score:
    score: float  # 0..1: speed relative to the fastest member times reliability
    rate: float  # average bytes/s of recent tasks, 0 if not known yet
    benched_until: float  # no work before this time (0: not benched)


def quarantine_until(rec: Record) -> float:
    """When a member on a failure streak may take work again (0 if it is not benched)."""
    if rec.streak < QUARANTINE_STREAK:
        return 0.0
    return rec.last_fail + min(QUARANTINE_BASE * 2 ** (rec.streak - QUARANTINE_STREAK), QUARANTINE_MAX)


def scores(state: State) -> dict[str, Score]:
    """Every member's score from what it actually did (unknown speed counts as the best)."""
    best = max((r.rate for r in state.records.values()), default=0.0)
    out = {}
    for name in state.members:
        rec = state.records.get(name) or Record()
        speed = rec.rate / best if rec.rate and best else 1.0
        reliability = 0.5 ** min(rec.streak, 10) * (rec.done + 1) / (rec.done + rec.failed + rec.lost + 1)
        out[name] = Score(round(speed * reliability, 3), rec.rate, quarantine_until(rec))
    return out


def benched(state: State, node: str, now: float, table: dict[str, Score]) -> bool:
    """Is ``node`` cooling off after repeated failures while another member is not?"""
    mine = table.get(node)
    if mine is None or mine.benched_until <= now:
        return False
    return any(s.benched_until <= now for name, s in table.items() if name != node)


# -- handing out pending tasks ----------------------------------------------------------------


def _pending(job: Job, phase: str, reserved: set[TaskKey]) -> list[Task]:
    return [t for t in job.tasks(phase) if t.state == "pending" and (job.id, phase, t.index) not in reserved]


def _phase(job: Job) -> str | None:
    return "map" if job.state in ("queued", "mapping") else "reduce" if job.state == "reducing" else None


def _offerable(state: State, job: Job, node: str, reserved: set[TaskKey], now: float = 0.0) -> list[Task]:
    """The job's pending tasks of its current phase that ``node`` may take."""
    phase = _phase(job)
    if phase is None:
        return []
    members = set(state.members)
    if job.code and not (node in state.members and state.members[node].allow_code):
        return []  # a user's code runs only where the owner allows it
    pending = [t for t in _pending(job, phase, reserved)
               if node not in t.failed_on or members <= set(t.failed_on)]  # elsewhere first, if anyone is left
    warm = Warmth.of(job) if phase == "map" else None
    return [t for t in pending if not warm.held(t, node, now)] if warm else pending


HOLD = 0.5  # seconds a member between two maps of a round still counts as at work on it


class Warmth:
    """Which member has each chunk of an iterative job's current round parsed (it mapped the
    chunk the round before), computed once per pick: one pass over the round's maps."""

    def __init__(self, job: Job, maps: list[Task]) -> None:
        self.job, self.per_round = job, len(maps)
        self.ahead: dict[int, int] = {}  # a pending map -> how many of its member's warm maps come first
        queued: dict[str, int] = {}
        self.running: set[str] = set()  # members running one of the round's maps
        self.ended: dict[str, float] = {}  # member -> when its last map of the round ended
        for m in maps:
            owner = self.owner(m)
            if m.state == "pending" and owner:
                self.ahead[m.index] = queued.get(owner, 0)
                queued[owner] = self.ahead[m.index] + 1
            elif m.state == "running":
                self.running.update(m.runs.values())
            elif m.state == "done" and isinstance(m.stats.get("ended"), (int, float)):
                self.ended[m.node] = max(self.ended.get(m.node, m.stats["ended"]), m.stats["ended"])

    @classmethod
    def of(cls, job: Job) -> Warmth | None:
        """The job's warmth, or None when it is not in a later round of an iterative job."""
        if not job.iterative or job.step == 0:
            return None
        return cls(job, job.current("map"))

    def previous(self, t: Task) -> Task:
        """The same chunk's map in the round before."""
        return self.job.maps[t.index - self.per_round]

    def owner(self, t: Task) -> str:
        """The member that mapped ``t``'s chunk the round before ("" if none did)."""
        return self.previous(t).node

    def held(self, t: Task, node: str, now: float) -> bool:
        """Is map ``t`` kept for the member that has its chunk parsed? While that member is at
        work on this round (running one of its maps, or it finished one in the last
        :data:`HOLD` seconds: it is between two), as long as it would get to this map before
        ``node`` could parse the chunk anew: the chunk's scan took ``cold`` seconds, its last
        map there ``warm``, and the member has ``ahead`` of its maps before this one. A member
        not at work on the round (dead, paused, leaving) holds nothing."""
        owner = self.owner(t)
        if owner in ("", node) or not self._busy(owner, now):
            return False
        warm, cold = self.previous(t).stats.get("seconds"), self.job.maps[t.index % self.per_round].stats.get("seconds")
        if not isinstance(warm, (int, float)) or not isinstance(cold, (int, float)):
            return False
        return cold >= warm * self.ahead[t.index]

    def _busy(self, owner: str, now: float) -> bool:
        ended = self.ended.get(owner)
        return owner in self.running or (ended is not None and 0.0 <= now - ended <= HOLD)


def _running_by_submitter(state: State, reserved: set[TaskKey]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for job in state.active_jobs():
        busy = sum(t.state == "running" for t in job.maps + job.reduces)
        busy += sum(1 for j, _, _ in reserved if j == job.id)
        counts[job.submitter] = counts.get(job.submitter, 0) + busy
    return counts


def _order(job: Job, tasks: list[Task], node: str, good: bool) -> list[Task]:
    """Warm maps first (an iterative job's chunk on the member that mapped it the round
    before: it keeps the parsed arrays), then local ones; then the largest tasks for a good
    member, the smallest for a poor one."""
    warmth = Warmth.of(job)

    def rank(t: Task) -> tuple[bool, bool, int, int]:
        warm = warmth is not None and t.phase == "map" and warmth.owner(t) == node
        local = t.phase == "map" and node in job.step_inputs()[t.input].get("holders", ())
        return (not warm, not local, -t.size() if good else t.size(), t.index)
    return sorted(tasks, key=rank)


def pick_tasks(state: State, node: str, reserved: set[TaskKey], now: float = 0.0,
               limit: int = BUNDLE_MAX) -> list[tuple[Job, Task]]:
    """The next tasks (one job, one phase; at most ``limit``) for a free slot on ``node``."""
    table = scores(state)
    if benched(state, node, now, table):
        return []
    offers = [(job, tasks) for job in state.active_jobs() if (tasks := _offerable(state, job, node, reserved, now))]
    if not offers:
        return []
    running = _running_by_submitter(state, reserved)
    job, tasks = min(offers, key=lambda o: (-o[0].priority, running.get(o[0].submitter, 0), o[0].seq))
    score = table[node].score if node in table else 1.0
    ordered = _order(job, tasks, node, score >= GOOD_SCORE)
    return [(job, t) for t in ordered[:_bundle_size(state, job, ordered, score, limit)]]


def _bundle_size(state: State, job: Job, ordered: list[Task], score: float, limit: int) -> int:
    """How many of the ordered tasks go out together: small maps in a bundle of about
    ``BUNDLE_BYTES`` x score, leaving every slot of the party a share of what is pending."""
    slots = sum(m.cpus for m in state.members.values()) or 1
    count = max(1, min(limit, BUNDLE_MAX, len(ordered) // (2 * slots)))
    if ordered[0].phase == "reduce":
        return count
    budget, total, n = max(ordered[0].size(), int(BUNDLE_BYTES * score)), 0, 0
    for t in ordered[:count]:
        if n and total + t.size() > budget:
            break
        total, n = total + t.size(), n + 1
    return n


def pick_task(state: State, node: str, reserved: set[TaskKey], now: float = 0.0) -> tuple[Job, Task] | None:
    """The single next task for ``node`` (see :func:`pick_tasks`)."""
    picked = pick_tasks(state, node, reserved, now, limit=1)
    return picked[0] if picked else None


# -- backups for stragglers -------------------------------------------------------------------


def pick_backup(state: State, node: str, now: float, running: dict[AttemptKey, tuple[float, int]]
                ) -> tuple[Job, Task] | None:
    """A straggling task to run a second copy of on ``node``, if any.

    Only in a phase with nothing left to hand out. ``running`` maps attempts to
    (seconds since they started, progress: bytes for maps, fetched outputs for reduces).
    A task qualifies when it runs elsewhere as a single attempt, has run at least twice as
    long as its phase's median finished task (and a second longer), is estimated to need
    more than twice that median still, and ``node`` is expected to be over twice as fast.
    The longest estimated remaining time goes first.
    """
    table = scores(state)
    if benched(state, node, now, table):
        return None
    mine = table[node].rate if node in table else 0.0
    best: tuple[float, Job, Task] | None = None
    for job in state.active_jobs():
        phase = _phase(job)
        if phase is None or any(t.state == "pending" for t in job.current(phase)):
            continue
        tasks = job.current(phase)
        done = [t for t in tasks if t.state == "done" and isinstance(t.stats.get("seconds"), (int, float))]
        if not done:
            continue
        median = statistics.median(float(t.stats["seconds"]) for t in done)
        rates = [float(t.stats["input_bytes"]) / float(t.stats["seconds"]) for t in done
                 if isinstance(t.stats.get("input_bytes"), (int, float)) and t.stats["seconds"] > 0]
        expected = mine or (statistics.median(rates) if rates else 0.0)
        for t in tasks:
            if t.state != "running" or len(t.runs) != 1 or node in t.runs.values():
                continue
            attempt = next(iter(t.runs))
            seen = running.get((job.id, phase, t.index, attempt))
            if seen is None:
                continue
            left = _time_left(t, len(job.current("map")), median, *seen, expected)
            if left > 2 * median and (best is None or left > best[0]):
                best = (left, job, t)
    return None if best is None else (best[1], best[2])


def _time_left(task: Task, n_maps: int, median: float, elapsed: float, progress: int, expected: float) -> float:
    """Estimated seconds a running attempt still needs, or 0 if it is not a straggler."""
    if elapsed < max(2 * median, median + 1.0):
        return 0.0
    total = task.size() if task.phase == "map" else n_maps
    fraction = min(1.0, progress / total) if total > 0 else 1.0
    if task.phase == "map" and expected and fraction > 0 and progress / elapsed * 2 > expected:
        return 0.0  # already running at least half as fast as a backup would
    if fraction >= 1.0:  # nothing more to learn from progress (a reduce merging): judge by time
        return float("inf") if elapsed > 3 * median + 1.0 else 0.0
    return float("inf") if fraction <= 0 else elapsed * (1 - fraction) / fraction


def jobs_to_assemble(state: State) -> list[Job]:
    """Jobs whose every reduce task is done: the master merges their outputs."""
    return [j for j in state.active_jobs() if j.state == "assembling"]
