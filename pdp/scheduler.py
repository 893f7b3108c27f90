"""The master's placement policy: which pending task a free worker slot gets next.

Pure: reads a :class:`~pdp.state.State`, returns a decision. Jobs are served in submission
order; within a job, maps come before reduces (the state machine enforces that too) and a
map prefers a worker that already holds its input bytes (data locality).
"""

from __future__ import annotations

from pdp.state import Job, State, Task

TaskKey = tuple[str, str, int]  # (job id, phase, index)


def key(job: Job, task: Task) -> TaskKey:
    return (job.id, task.phase, task.index)


def _pending(job: Job, phase: str, reserved: set[TaskKey]) -> list[Task]:
    return [t for t in job.tasks(phase) if t.state == "pending" and (job.id, phase, t.index) not in reserved]


def pick_task(state: State, node: str, reserved: set[TaskKey]) -> tuple[Job, Task] | None:
    """The next task for a free slot on ``node``, skipping tasks already being assigned."""
    for job in state.active_jobs():
        if job.state in ("queued", "mapping"):
            pending = _pending(job, "map", reserved)
            local = [t for t in pending if node in job.inputs[t.input].get("holders", ())]
            if local or pending:
                return job, (local or pending)[0]
        elif job.state == "reducing":
            pending = _pending(job, "reduce", reserved)
            if pending:
                return job, pending[0]
    return None


def jobs_to_assemble(state: State) -> list[Job]:
    """Jobs whose every reduce task is done: the master merges their outputs."""
    return [j for j in state.active_jobs() if j.state == "assembling"]
