"""Multi-step jobs on a real party under faults: a member killed while step 2 maps, the
leader killed between steps. The output must equal `pdp run`'s byte for byte and the
counters must be counted once (the winning attempt of each task only)."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from pdp.client import Failover
from pdp.jobs.local import run_job
from pdp.jobs.loader import job_class, load_module
from pdp.local import LocalParty

from test_chaos import job, leader_index, run, wait_until

JOB = Path(__file__).parent / "engine_jobs" / "steps.py"
ARGS = ["--min", "2", "--sleep", "1.5"]


def expected(inputs: list[Path]) -> tuple[bytes, dict[str, Any]]:
    cls = job_class(load_module(str(JOB)))
    out = io.BytesIO()
    result = run_job(lambda: cls(list(ARGS)), inputs, out)
    return out.getvalue(), result["counters"]


@pytest.fixture
def books(corpus: list[Path], tmp_path: Path) -> list[Path]:
    out = []
    for src in corpus[:3]:
        p = tmp_path / src.name
        p.write_bytes(src.read_bytes()[:200_000])
        out.append(p)
    return out


def submit(party: LocalParty, i: int, inputs: list[Path], job_id: str) -> None:
    async def go() -> None:
        f = Failover([party.addr(k) for k in range(party.n)], party.key, patience=30)
        await f.run(lambda c: c.submit(str(JOB), inputs, job_id, args=ARGS, chunk_size=64 * 1024, reduces=3),
                    "submit")
    run(go())


def finish(party: LocalParty, job_id: str, out: Path) -> dict[str, Any]:
    async def go() -> dict[str, Any]:
        f = Failover([party.addr(k) for k in range(party.n) if party.alive(k)], party.key, patience=120)
        await f.run(lambda c: c.wait(job_id), "wait")
        await f.run(lambda c: c.fetch_result(job_id, out), "fetch")
        return await f.run(lambda c: c.job(job_id), "job")
    return run(go())


def in_step_two(party: LocalParty, job_id: str) -> bool:
    j = run(job(party, job_id))
    return j.get("step") == 2 and j["state"] == "mapping"


def test_member_killed_while_step_two_maps(make_party: Callable[..., LocalParty], books: list[Path],
                                           tmp_path: Path) -> None:
    want, counters = expected(books)
    party = make_party(allow_code=True)
    leader = leader_index(party)
    submit(party, leader, books, "steps-kill-mapper")
    wait_until(lambda: in_step_two(party, "steps-kill-mapper"), 90, "step 2 to start mapping")
    victim = next(i for i in range(party.n) if i != leader)
    party.kill(victim)
    detail = finish(party, "steps-kill-mapper", tmp_path / "out")
    assert (tmp_path / "out").read_bytes() == want
    assert detail["counters"] == counters
    assert detail["steps"] == 2 and detail["state"] == "done"
    assert sum(detail["reruns"].values()) >= 1, "the killed member's work ran again"


def test_leader_killed_between_steps(make_party: Callable[..., LocalParty], books: list[Path],
                                     tmp_path: Path) -> None:
    want, counters = expected(books)
    party = make_party(allow_code=True)
    leader = leader_index(party)
    submit(party, (leader + 1) % party.n, books, "steps-kill-leader")
    wait_until(lambda: in_step_two(party, "steps-kill-leader"), 90, "step 2 to start")
    party.kill(leader)
    new_leader = leader_index(party, [i for i in range(party.n) if i != leader])
    assert new_leader != leader
    detail = finish(party, "steps-kill-leader", tmp_path / "out")
    assert (tmp_path / "out").read_bytes() == want
    assert detail["counters"] == counters
    assert detail["state"] == "done"
