"""Sharing the party (issue 5) with real nodes: MIT 6.824's parallelism, job-count and
early-exit tests, fair shares between submitters, backups for a paused member, and each
owner's limits (cpus, memory, hours, reload); plus cancel. Every job is checked
byte-identical against the sequential oracle."""

from __future__ import annotations

import asyncio
import datetime
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any


from pdp.client import Client, run_job
from pdp.errors import PdpError
from pdp.jobs.builtin.wordcount import oracle
from pdp.local import LocalParty
from pdp.core.state import ACTIVE

KB = 1024


def run(coro: Any) -> Any:
    return asyncio.run(coro)


async def detail(party: LocalParty, job_id: str, i: int = 0) -> dict[str, Any]:
    """An ended job with its tasks, as member i sees it (its copy of the log may lag a moment)."""
    async with Client(party.addr(i), party.key) as c:
        for _ in range(50):
            job = await c.job(job_id)
            if job["state"] not in ACTIVE:
                break
            await asyncio.sleep(0.1)
        return job


async def wordcount(party: LocalParty, inputs: list[Path], out: Path, job_id: str, i: int = 0, kind: str = "chaos",
                    **form: Any) -> dict[str, Any]:
    """Run a job to the end, check its output against the oracle, return its tasks."""
    await run_job([party.addr(i)], party.key, kind, inputs, job_id, out, **form)
    assert out.read_bytes() == oracle([str(p) for p in inputs])
    return await detail(party, job_id, i)


def intervals(job: dict[str, Any], phase: str) -> list[tuple[float, float, str]]:
    return [(t["stats"]["started"], t["stats"]["ended"], t["node"]) for t in job["tasks"] if t["phase"] == phase]


def overlap_across_members(spans: list[tuple[float, float, str]]) -> bool:
    return any(a[2] != b[2] and a[0] < b[1] and b[0] < a[1] for a in spans for b in spans)


# -- MIT 6.824 ----------------------------------------------------------------------------------


def test_map_and_reduce_parallelism(make_party: Any, corpus: list[Path], tmp_path: Path) -> None:
    """Two members run maps at the same time, and reduces too (6.824's map/reduce parallelism)."""
    party = make_party("sleep=0.6")
    job = run(wordcount(party, corpus[:3], tmp_path / "out", "par", chunk_size=512 * KB, reduces=3))
    assert overlap_across_members(intervals(job, "map"))
    assert overlap_across_members(intervals(job, "reduce"))
    assert len({t["node"] for t in job["tasks"]}) == 3


def test_job_count_no_task_runs_twice_without_failures(party: LocalParty, corpus: list[Path],
                                                        tmp_path: Path) -> None:
    job = run(wordcount(party, corpus, tmp_path / "out", "count", kind="wordcount", chunk_size=256 * KB))
    assert job["maps"] > 6
    assert all(t["attempt"] == 1 for t in job["tasks"]), [t for t in job["tasks"] if t["attempt"] != 1]
    assert job["attempts"] == job["maps"] + job["reduces"] and job["backups"] == 0 and job["reruns"] == {}


def test_early_exit_submit_returns_only_with_the_final_output(party: LocalParty, corpus: list[Path],
                                                             tmp_path: Path) -> None:
    out = tmp_path / "result.tsv"
    proc = subprocess.Popen([sys.executable, "-m", "pdp", "submit", "wordcount", *map(str, corpus), "-o", str(out),
                             "--node", party.addr(1), "--key-file", str(party.key_file), "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    expected = oracle([str(p) for p in corpus])
    while proc.poll() is None:
        assert not out.exists() or out.read_bytes() == expected  # never a partial output
        time.sleep(0.02)
    assert proc.returncode == 0, proc.stderr.read()
    assert out.read_bytes() == expected
    import json
    job_id = json.loads(proc.stdout.read())["id"]
    assert run(detail(party, job_id, 1))["state"] == "done"


# -- fair shares ------------------------------------------------------------------------------


def test_two_submitters_at_once_get_about_equal_shares(make_party: Any, corpus: list[Path], tmp_path: Path) -> None:
    party = make_party("sleep=0.1")
    inputs = corpus[:2]

    async def submitter(who: str, count: int, node: int) -> list[str]:
        ids = [f"{who}-{k}" for k in range(count)]
        await asyncio.gather(*(run_job([party.addr(node)], party.cred(who), "chaos", inputs, job_id,
                                       tmp_path / job_id, chunk_size=256 * KB, reduces=1)
                               for job_id in ids))
        return ids

    async def both() -> tuple[list[str], list[str]]:
        return await asyncio.gather(submitter("ann", 4, 0), submitter("bob", 4, 1))

    ann, bob = run(both())
    jobs = {j: run(detail(party, j)) for j in ann + bob}
    for j in jobs:
        assert (tmp_path / j).read_bytes() == oracle([str(p) for p in inputs])
    end = min(max(jobs[j]["finished_at"] for j in ann), max(jobs[j]["finished_at"] for j in bob))
    started = {who: sum(1 for j in ids for t in jobs[j]["tasks"] if t["stats"]["started"] < end)
               for who, ids in (("ann", ann), ("bob", bob))}
    assert 0.6 <= started["ann"] / started["bob"] <= 1 / 0.6, started


def test_one_submitters_burst_does_not_make_another_wait(make_party: Any, corpus: list[Path], tmp_path: Path) -> None:
    party = make_party("sleep=0.1")

    async def scenario() -> tuple[float, list[float]]:
        burst = [asyncio.create_task(run_job([party.addr(0)], party.cred("ann"), "chaos", corpus[:2], f"ann-{k}",
                                             tmp_path / f"ann-{k}", chunk_size=256 * KB))
                 for k in range(12)]
        await asyncio.sleep(1.0)
        t0 = time.monotonic()
        await run_job([party.addr(1)], party.cred("bob"), "chaos", corpus[:2], "bob", tmp_path / "bob",
                      chunk_size=256 * KB)
        mine = time.monotonic() - t0
        await asyncio.gather(*burst)
        return mine, [(await detail(party, f"ann-{k}"))["finished_at"] for k in range(12)]

    bob_time, ann_done = run(scenario())
    bob = run(detail(party, "bob"))
    assert (tmp_path / "bob").read_bytes() == oracle([str(p) for p in corpus[:2]])
    # first come, first served would finish all twelve of ann's jobs first
    assert sum(t > bob["finished_at"] for t in ann_done) >= 4, "bob waited behind most of ann's burst"


def test_priority_jobs_go_first(make_party: Any, corpus: list[Path], tmp_path: Path) -> None:
    party = make_party("sleep=0.1")

    async def scenario() -> None:
        async with Client(party.addr(0), party.key) as c:
            for k in range(3):
                await c.submit("chaos", corpus[:2], f"low-{k}", chunk_size=256 * KB)
            await c.submit("chaos", corpus[:2], "urgent", chunk_size=256 * KB, priority=10)
        await run_job([party.addr(0)], party.key, "chaos", corpus[:2], "urgent", tmp_path / "urgent")
        for k in range(3):
            await run_job([party.addr(0)], party.key, "chaos", corpus[:2], f"low-{k}", tmp_path / f"low-{k}")

    run(scenario())
    urgent = run(detail(party, "urgent"))
    later = [run(detail(party, f"low-{k}"))["finished_at"] for k in (1, 2)]
    assert all(urgent["finished_at"] < t for t in later)


# -- stragglers -------------------------------------------------------------------------------


def leader_index(party: LocalParty) -> int:
    return party.names.index(run(party.status(0))["leader"])


def test_a_paused_members_task_gets_a_backup_and_the_job_time_stays_bounded(
        make_party: Any, corpus: list[Path], tmp_path: Path) -> None:
    party = make_party("crawl=1.0", dead_after=60.0, stall_after=120.0)  # only a backup can save the job
    victim = (leader_index(party) + 1) % 3

    async def scenario() -> tuple[float, dict[str, Any]]:
        job = asyncio.create_task(wordcount(party, corpus[:3], tmp_path / "out", "strag", i=(victim + 1) % 3,
                                            chunk_size=256 * KB, reduces=2))
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:  # pause the victim while it runs a map
            status = await party.status(victim)
            mine = [m for m in status["members"] if m["name"] == party.names[victim]]
            if mine and any(t["phase"] == "map" for t in mine[0]["tasks"]):
                break
            await asyncio.sleep(0.05)
        party.signal(victim, signal.SIGSTOP)
        t0 = time.monotonic()
        try:
            seen = await asyncio.wait_for(job, 40)  # the job as its (unpaused) gateway sees it when done
        finally:
            party.signal(victim, signal.SIGCONT)
        return time.monotonic() - t0, seen

    took, job = run(scenario())
    assert job["state"] == "done" and job["backups"] >= 1, job
    assert took < 25, f"the job needed {took:.1f} s after the pause"


# -- the owner's limits -----------------------------------------------------------------------


def test_a_node_with_one_cpu_never_runs_two_tasks_at_once(make_party: Any, corpus: list[Path],
                                                           tmp_path: Path) -> None:
    party = make_party("sleep=0.2", cpus=2, node_settings={1: {"cpus": 1}})
    job = run(wordcount(party, corpus[:3], tmp_path / "out", "cpus", chunk_size=256 * KB, reduces=4))
    for name in party.names:
        spans = sorted((a, b) for a, b, node in intervals(job, "map") + intervals(job, "reduce") if node == name)
        most = max(sum(1 for a, b in spans if a <= s < b) for s, _ in spans)
        assert most == (1 if name == "node2" else 2), (name, spans)


def test_a_task_over_its_memory_limit_fails_cleanly_and_runs_elsewhere(make_party: Any, corpus: list[Path],
                                                                        tmp_path: Path) -> None:
    party = make_party("alloc=150,sleep=0.2", node_settings={0: {"memory": "100M"}})
    job = run(wordcount(party, corpus[:3], tmp_path / "out", "mem", chunk_size=128 * KB, reduces=2))
    assert all(t["node"] != "node1" for t in job["tasks"] if t["phase"] == "map")
    assert any("node1" in t["failed_on"] for t in job["tasks"])  # it tried (9 maps, 3 slots) and failed
    assert party.alive(0)
    assert "the task needed more than this node's memory limit (memory = 100 MiB" in (party.root / "node1.log").read_text()


def test_a_node_outside_its_hours_takes_no_task_and_says_why(make_party: Any, corpus: list[Path],
                                                             tmp_path: Path) -> None:
    other_day = (datetime.datetime.now().weekday() + 3) % 7
    day = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"][other_day]
    party = make_party("sleep=0.05", node_settings={2: {"hours": [f"{day} 03:00-04:00"]}})
    time.sleep(2.5)  # the etiquette check runs every 2 s
    job = run(wordcount(party, corpus[:3], tmp_path / "out", "hours", chunk_size=256 * KB, reduces=3))
    assert all(t["node"] != "node3" for t in job["tasks"])
    status = run(party.status(0))
    paused = {m["name"]: m["paused"] for m in status["members"]}
    assert "outside its hours" in paused["node3"] and not paused["node1"]


def test_reload_applies_hours_without_a_restart(make_party: Any, corpus: list[Path], tmp_path: Path) -> None:
    party = make_party("sleep=0.05")
    pid = party.pid(2)
    other_day = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"][(datetime.datetime.now().weekday() + 3) % 7]
    settings = {**party.settings, "cpus": 1, "hours": [f"{other_day} 03:00-04:00"]}
    party.write_config(2, settings)
    os.kill(pid, signal.SIGHUP)

    async def paused_reason() -> str:
        for _ in range(60):
            status = await party.status(0)
            reason = {m["name"]: m["paused"] for m in status["members"]}["node3"]
            if reason:
                return reason
            await asyncio.sleep(0.1)
        return ""

    assert "outside its hours" in run(paused_reason())
    party.write_config(2, {**party.settings, "cpus": 1})

    async def reload() -> dict[str, Any]:
        async with Client(party.addr(2), party.key) as c:
            return await c.call("reload")

    assert run(reload())["applied"] == ["hours"]
    assert party.pid(2) == pid and party.alive(2)


# -- cancel ---------------------------------------------------------------------------------


def test_cancel_stops_the_job_and_frees_its_spool(make_party: Any, corpus: list[Path], tmp_path: Path) -> None:
    party = make_party("crawl=3.0")

    async def scenario() -> str:
        async with Client(party.addr(0), party.key) as c:
            await c.submit("chaos", corpus[:3], "doomed", chunk_size=256 * KB)
        await asyncio.sleep(1.0)
        async with Client(party.addr(1), party.key) as c:
            await c.call("cancel", id="doomed")
        try:
            await run_job([party.addr(2)], party.key, "chaos", corpus[:3], "doomed", tmp_path / "out")
        except PdpError as exc:
            return str(exc)
        return "no error"

    assert "doomed was: cancelled by" in run(scenario())
    assert not (tmp_path / "out").exists()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        leftovers = [p for name in party.names for p in (party.root / name / "spool").rglob("*doomed*")]
        busy = [t for m in run(party.status(0))["members"] for t in m["tasks"]]
        if not leftovers and not busy:
            break
        time.sleep(0.5)
    assert not leftovers and not busy, (leftovers, busy)
    assert run(detail(party, "doomed"))["state"] == "cancelled"


def test_a_pausing_node_hands_its_running_task_back(make_party: Any, corpus: list[Path], tmp_path: Path) -> None:
    """on_pause = "hand_back": when its hours end mid-task, the task runs elsewhere at once."""
    party = make_party("crawl=3.0", node_settings={i: {"on_pause": "hand_back"} for i in range(3)})
    victim = (leader_index(party) + 1) % 3
    name = party.names[victim]
    other_day = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"][(datetime.datetime.now().weekday() + 3) % 7]

    async def scenario() -> None:
        job = asyncio.create_task(wordcount(party, corpus[:3], tmp_path / "out", "handback", chunk_size=256 * KB,
                                            reduces=1))
        for _ in range(200):
            members = {m["name"]: m for m in (await party.status(victim))["members"]}
            if members[name]["tasks"]:
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError(f"{name} never ran a task")
        party.write_config(victim, {**party.settings, "cpus": 1, "on_pause": "hand_back",
                                    "hours": [f"{other_day} 03:00-04:00"]})
        party.signal(victim, signal.SIGHUP)
        await asyncio.wait_for(job, 60)

    run(scenario())
    job = run(detail(party, "handback"))
    assert any(why.startswith(f"handed back on {name}") for why in job["reruns"]), job["reruns"]
    assert all(t["node"] != name for t in job["tasks"]), job["tasks"]  # its task ran elsewhere; no more came


def test_a_full_spool_refuses_new_inputs_with_a_clear_error_and_mirrors_go_elsewhere(
        make_party: Any, corpus: list[Path], tmp_path: Path) -> None:
    party = make_party("sleep=0.05", node_settings={0: {"disk": "1M"}})
    big = corpus[:3]  # over a MiB together

    async def through(i: int, job_id: str) -> str:
        try:
            await wordcount(party, big, tmp_path / job_id, job_id, i=i, chunk_size=256 * KB)
        except PdpError as exc:
            return str(exc)
        return ""

    error = run(through(0, "refused"))
    assert "node1's spool is full for this" in error and "disk = 1 MiB" in error and "--node" in error, error
    for k in range(3):  # gateways mirror to node1 only while its spool has room, then elsewhere
        assert run(through(1 + k % 2, f"elsewhere{k}")) == ""
    held = sum(p.stat().st_size for p in (party.root / "node1" / "spool" / "inputs").glob("elsewhere*"))
    assert held <= 1 << 20
    assert party.alive(0)
