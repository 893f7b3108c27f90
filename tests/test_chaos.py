"""Chaos: real nodes are killed, paused and restarted mid-job; every job still ends exact, once.

Tasks use the test-only ``chaos`` kind (word count with ``sleep=S`` per call) so that a
kill lands where the test means it to. Each test asserts the output is byte-identical to
the sequential oracle and the job is recorded done exactly once. The long soak variants
are marked ``slow`` (run them with ``pytest -m slow``).
"""

from __future__ import annotations

import asyncio
import random
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest

from pdp.client import Client, Failover, run_job
from pdp.errors import PdpError
from pdp.jobs.builtin.wordcount import oracle
from pdp.local import LocalParty

def run(coro: Any) -> Any:
    return asyncio.run(coro)


async def submit(party: LocalParty, i: int, inputs: list[Path], job_id: str, chunk: int = 128 * 1024,
                 reduces: int = 4) -> None:
    async with Client(party.addr(i), party.key) as c:
        await c.submit("chaos", inputs, job_id, chunk_size=chunk, reduces=reduces)


async def jobs_view(party: LocalParty) -> list[dict[str, Any]]:
    return await Failover([party.addr(i) for i in range(party.n)], party.key, patience=30).run(
        lambda c: _jobs(c), "list jobs")


async def _jobs(c: Client) -> list[dict[str, Any]]:
    return await c.jobs()


async def job(party: LocalParty, job_id: str) -> dict[str, Any]:
    """The job as a member sees it (a follower's copy of the log may lag a moment)."""
    for _ in range(50):
        found = [j for j in await jobs_view(party) if j["id"] == job_id]
        if found:
            return found[0]
        await asyncio.sleep(0.1)
    raise AssertionError(f"no member lists job {job_id}")


def wait_until(cond: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def finish(party: LocalParty, job_id: str, out: Path, inputs: list[Path]) -> dict[str, Any]:
    """Wait through any member, fetch, and check exactness and exactly-once."""
    async def go() -> dict[str, Any]:
        f = Failover([party.addr(i) for i in range(party.n)], party.key, patience=120)
        summary = await f.run(lambda c: c.wait(job_id), "wait")
        await f.run(lambda c: c.fetch_result(job_id, out), "fetch")
        return summary

    summary = run(go())
    assert out.read_bytes() == oracle([str(p) for p in inputs])
    wait_until(lambda: [j["state"] for j in run(jobs_view(party)) if j["id"] == job_id] == ["done"], 10,
               f"every view to list {job_id} once, done")
    assert sum(summary["done_on"].values()) == summary["maps"] + summary["reduces"]
    return summary


def leader_index(party: LocalParty, among: list[int] | None = None) -> int:
    for _ in range(200):
        for i in among or range(party.n):
            if not party.alive(i):
                continue
            try:
                st = run(party.status(i))
            except (PdpError, OSError):
                continue
            if st["is_leader"]:
                return i
        time.sleep(0.1)
    raise AssertionError("no leader")


def holder_of_running_task(party: LocalParty, job_id: str, phase: str, exclude: int) -> int | None:
    j = run(job(party, job_id))
    running = [n for n in j["nodes_at_work"] if n != party.names[exclude]]
    return party.names.index(running[0]) if running and j["state"] == ("mapping" if phase == "map" else "reducing") else None


def diverged(party: LocalParty, i: int) -> int:
    """Applied Raft entries later replaced by different ones (pysyncobj's CRITICAL truncation
    lines also fire when a restarted member re-receives identical entries: those are harmless)."""
    return int(run(party.status(i))["raft"]["diverged"])


# -- worker loss ----------------------------------------------------------------------------


@pytest.mark.parametrize("phase", ["map", "reduce"])
def test_follower_killed_mid_phase(make_party: Callable[..., LocalParty], corpus: list[Path], tmp_path: Path,
                                   phase: str) -> None:
    party = make_party("sleep=0.3")
    leader = leader_index(party)
    run(submit(party, leader, corpus, f"kill-{phase}", reduces=6))
    victim: list[int] = []

    def found() -> bool:
        v = holder_of_running_task(party, f"kill-{phase}", phase, exclude=leader)
        if v is not None:
            victim.append(v)
        return bool(victim)

    wait_until(found, 60, f"a follower running a {phase} task")
    pool = psutil.Process(party.pid(victim[0])).children(recursive=True)
    party.kill(victim[0])
    summary = finish(party, f"kill-{phase}", tmp_path / "out.tsv", corpus)
    assert any("lost" in why for why in summary["reruns"]), summary["reruns"]
    _, alive = psutil.wait_procs(pool, timeout=5)
    assert not alive  # the dead node's task processes do not linger as orphans


def test_mapper_killed_before_reducers_fetch(make_party: Callable[..., LocalParty], corpus: list[Path],
                                             tmp_path: Path) -> None:
    """More reduces than slots: later reducers fetch after the mapper is gone; its maps rerun."""
    party = make_party("sleep=0.3")
    leader = leader_index(party)
    run(submit(party, leader, corpus, "kill-mapper", reduces=9))
    wait_until(lambda: run(job(party, "kill-mapper"))["state"] == "reducing", 60, "the reduce phase")
    j = run(job(party, "kill-mapper"))
    victim = next(i for i in range(party.n) if i != leader and j["done_on"].get(party.names[i]))
    party.kill(victim)
    summary = finish(party, "kill-mapper", tmp_path / "out.tsv", corpus)
    assert any("map output" in why or "lost" in why for why in summary["reruns"]), summary["reruns"]


def test_task_process_killed_pool_recovers(make_party: Callable[..., LocalParty], corpus: list[Path],
                                           tmp_path: Path) -> None:
    party = make_party("sleep=0.4")
    run(submit(party, 0, corpus, "kill-pool"))
    wait_until(lambda: run(job(party, "kill-pool"))["maps_done"] >= 1, 60, "a first map")
    killed = 0
    for i in range(party.n):
        for child in psutil.Process(party.pid(i)).children(recursive=True):
            if "multiprocessing" in " ".join(child.cmdline()) and "resource_tracker" not in " ".join(child.cmdline()):
                child.kill()
                killed += 1
                break
    assert killed
    summary = finish(party, "kill-pool", tmp_path / "out.tsv", corpus)
    logs = "".join((party.root / f"{name}.log").read_text() for name in party.names)
    assert "task pool restarted after a task process died" in logs
    # a lone task reports the failure and runs again; a bundle of small maps reruns its maps itself
    assert any("failed" in why for why in summary["reruns"]) or "running them one by one" in logs, summary["reruns"]
    assert all(party.alive(i) for i in range(party.n))


def test_paused_member_loses_its_tasks(make_party: Callable[..., LocalParty], corpus: list[Path],
                                       tmp_path: Path) -> None:
    """SIGSTOP: the member still accepts TCP, only its silence tells; its tasks run elsewhere."""
    party = make_party("sleep=0.3")
    leader = leader_index(party)
    run(submit(party, leader, corpus, "paused-member"))
    victim: list[int] = []
    wait_until(lambda: bool(victim.append(v) or victim) if (v := holder_of_running_task(
        party, "paused-member", "map", exclude=leader)) is not None else False, 60, "a follower at work")
    party.signal(victim[0], signal.SIGSTOP)
    try:
        summary = finish(party, "paused-member", tmp_path / "out.tsv", corpus)
        st = run(party.status(leader))
        [member] = [m for m in st["members"] if m["name"] == party.names[victim[0]]]
        assert member["health"] == "dead"
        assert any(f"{party.names[victim[0]]} lost" in why for why in summary["reruns"]), summary["reruns"]
        assert sum(st["reruns"].values()) >= 1
    finally:
        party.signal(victim[0], signal.SIGCONT)


def test_long_task_with_progress_keeps_its_lease(make_party: Callable[..., LocalParty], corpus: list[Path],
                                                 tmp_path: Path) -> None:
    party = make_party("crawl=3", stall_after=2.0)
    run(submit(party, 0, corpus[:2], "crawl", chunk=1 << 20, reduces=2))
    summary = finish(party, "crawl", tmp_path / "out.tsv", corpus[:2])
    assert summary["reruns"] == {}  # slow but moving: never re-run


def test_stalled_task_runs_again(make_party: Callable[..., LocalParty], corpus: list[Path], tmp_path: Path) -> None:
    party = make_party("sleep=3", stall_after=2.0)
    run(submit(party, 0, corpus[:1], "stall", chunk=1 << 20, reduces=1))
    summary = finish(party, "stall", tmp_path / "out.tsv", corpus[:1])
    assert any(why.startswith("stalled on") for why in summary["reruns"]), summary["reruns"]


# -- master loss ------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [1, 2])
def test_leader_killed_at_a_random_point(make_party: Callable[..., LocalParty], corpus: list[Path],
                                         tmp_path: Path, seed: int) -> None:
    _leader_kill(make_party, corpus, tmp_path, seed)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(3, 13))
def test_leader_killed_at_a_random_point_soak(make_party: Callable[..., LocalParty], corpus: list[Path],
                                              tmp_path: Path, seed: int) -> None:
    _leader_kill(make_party, corpus, tmp_path, seed)


def _leader_kill(make_party: Callable[..., LocalParty], corpus: list[Path], tmp_path: Path, seed: int) -> None:
    party = make_party("sleep=0.1")
    leader = leader_index(party)
    killed_term = run(party.status(leader))["term"]
    follower = (leader + 1) % party.n
    out = tmp_path / "out.tsv"

    async def client() -> tuple[dict[str, Any], dict[str, Any]]:
        # submitted through the leader itself: the client must survive its gateway dying
        return await run_job([party.addr(leader), party.addr(follower)], party.key, "chaos", corpus,
                             f"leader-kill-{seed}", out, chunk_size=128 * 1024, reduces=4)

    async def scenario() -> tuple[dict[str, Any], dict[str, Any]]:
        task = asyncio.create_task(client())
        await asyncio.sleep(random.Random(seed).uniform(0.3, 3.0))
        party.kill(leader)
        return await task

    summary, _ = run(scenario())
    assert out.read_bytes() == oracle([str(p) for p in corpus])
    wait_until(lambda: [j["state"] for j in run(jobs_view(party)) if j["id"] == f"leader-kill-{seed}"] == ["done"],
               10, "the job listed once, done")
    survivors = [i for i in range(party.n) if i != leader]
    new_leader = leader_index(party, survivors)  # only ever one of the survivors
    views = [run(party.status(i)) for i in survivors]
    seen = [(v["node"], v["leader"], v["term"], v["is_leader"]) for v in views]
    assert {v["leader"] for v in views} == {party.names[new_leader]}, seen  # elected and known to all
    assert all(v["term"] > killed_term for v in views), seen  # in a later term than the killed leader's
    assert diverged(party, new_leader) == 0


def test_paused_leader_cannot_commit_stale_orders(make_party: Callable[..., LocalParty], corpus: list[Path],
                                                  tmp_path: Path) -> None:
    party = make_party("sleep=0.2")
    leader = leader_index(party)
    run(submit(party, (leader + 1) % party.n, corpus, "pause"))
    wait_until(lambda: run(job(party, "pause"))["maps_done"] >= 2, 60, "maps under way")
    paused_term = run(party.status(leader))["term"]
    party.signal(leader, signal.SIGSTOP)
    others = [i for i in range(party.n) if i != leader]
    new_leader = leader_index(party, others)
    assert run(party.status(new_leader))["term"] > paused_term
    wait_until(lambda: run(job(party, "pause"))["maps_done"] >= 6, 60, "progress under the new leader")
    party.signal(leader, signal.SIGCONT)
    finish(party, "pause", tmp_path / "out.tsv", corpus)
    views = [run(party.status(i)) for i in range(party.n)]
    # one leader, named by every member (None would mean no master in the current term), elected in
    # a later term than the paused one's, and not the paused node taking its place back
    seen = [(v["node"], v["leader"], v["term"], v["is_leader"]) for v in views]
    leaders, terms = {v["leader"] for v in views}, {v["term"] for v in views}
    assert len(leaders) == 1 and None not in leaders and party.names[leader] not in leaders, seen
    assert [v["node"] for v in views if v["is_leader"]] == list(leaders), seen
    assert len(terms) == 1 and terms.pop() > paused_term, seen
    log = (party.root / f"{party.names[leader]}.log").read_text()
    assert "Traceback" not in log


# -- restarts ---------------------------------------------------------------------------------


def test_rolling_restart_of_every_member(make_party: Callable[..., LocalParty], corpus: list[Path],
                                         tmp_path: Path) -> None:
    party = make_party("sleep=0.25")
    run(submit(party, 0, corpus, "rolling", reduces=6))
    for i in range(party.n):
        party.kill(i)
        time.sleep(0.3)
        party.start_node(i)
        run(party.wait_ready(60))
    finish(party, "rolling", tmp_path / "out.tsv", corpus)


def test_two_of_three_down_no_progress_then_recovery(make_party: Callable[..., LocalParty], corpus: list[Path],
                                                     tmp_path: Path) -> None:
    party = make_party("sleep=0.25")
    run(submit(party, 0, corpus, "majority"))
    wait_until(lambda: run(job(party, "majority"))["maps_done"] >= 1, 60, "a first map")
    party.kill(1)
    party.kill(2)
    before = run(job(party, "majority"))

    async def lonely_submit() -> None:
        async with Client(party.addr(0), party.key) as c:
            await c.submit("chaos", corpus[:1], "no-quorum")

    with pytest.raises(PdpError):  # no false acknowledgement without a majority
        run(asyncio.wait_for(lonely_submit(), 60))
    time.sleep(1.0)
    after = run(job(party, "majority"))
    assert (after["maps_done"], after["reduces_done"]) == (before["maps_done"], before["reduces_done"])
    party.start_node(1)
    party.start_node(2)
    run(party.wait_ready(60))
    finish(party, "majority", tmp_path / "out.tsv", corpus)
    assert "no-quorum" not in [j["id"] for j in run(jobs_view(party))]


def test_whole_party_restart_continues_jobs(make_party: Callable[..., LocalParty], corpus: list[Path],
                                            tmp_path: Path) -> None:
    party = make_party("sleep=0.25")
    run(submit(party, 1, corpus, "full-restart"))
    wait_until(lambda: run(job(party, "full-restart"))["maps_done"] >= 2, 60, "maps under way")
    for i in range(party.n):
        party.kill(i)
    for i in range(party.n):
        party.start_node(i)
    run(party.wait_ready(60))
    finish(party, "full-restart", tmp_path / "out.tsv", corpus)


# -- the MIT 6.824 crash test -------------------------------------------------------------------


def test_crash_test(make_party: Callable[..., LocalParty], corpus: list[Path], tmp_path: Path) -> None:
    _crash_test(make_party, corpus, tmp_path, rounds=2, stall_max=3)


@pytest.mark.slow
def test_crash_test_soak(make_party: Callable[..., LocalParty], corpus: list[Path], tmp_path: Path) -> None:
    _crash_test(make_party, corpus, tmp_path, rounds=8, stall_max=10)


def _crash_test(make_party: Callable[..., LocalParty], corpus: list[Path], tmp_path: Path, rounds: int,
                stall_max: float) -> None:
    """Tasks crash a third of the time and stall another third; nodes die and return in a loop."""
    party = make_party(f"crash=0.33,stall=0.33,stall_max={stall_max}", stall_after=max(2 * stall_max, 4))
    rng = random.Random(6824)
    run(submit(party, 0, corpus, "crash", chunk=256 * 1024, reduces=3))
    for _ in range(rounds):
        time.sleep(rng.uniform(1.0, 3.0))
        victim = rng.randrange(party.n)
        party.kill(victim)
        time.sleep(rng.uniform(0.5, 2.0))
        party.start_node(victim)
    summary = finish(party, "crash", tmp_path / "out.tsv", corpus)
    assert summary["reruns"]  # the chaos really happened
    for i in range(party.n):
        assert diverged(party, i) == 0
