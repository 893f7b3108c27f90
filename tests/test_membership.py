"""Invitations and workers without a Raft seat: refused when not invited, joining with a
one-time token mid-job through one member, cut off at once when revoked; jobs stay exact."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from pdp.client import Client, Failover
from pdp.jobs.builtin.wordcount import oracle
from pdp.local import LocalParty

@pytest.fixture
def party(make_party: Callable[..., LocalParty]) -> LocalParty:
    return make_party("sleep=0.25")


def _cli(party: LocalParty, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PDP_KEY_FILE=str(party.key_file))
    return subprocess.run([sys.executable, "-m", "pdp", *args, "--node", party.addr(0)], capture_output=True,
                          text=True, env=env, timeout=60)


def _status(party: LocalParty, i: int = 0) -> dict[str, Any]:
    return asyncio.run(party.status(i))


def _wait(cond: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def _finish(party: LocalParty, job_id: str, out: Path) -> dict[str, Any]:
    async def go() -> dict[str, Any]:
        f = Failover([party.addr(i) for i in range(3)], party.key, patience=120)
        summary = await f.run(lambda c: c.wait(job_id), "wait")
        await f.run(lambda c: c.fetch_result(job_id, out), "fetch")
        return summary

    return asyncio.run(go())


def _submit(party: LocalParty, inputs: list[Path], job_id: str) -> None:
    async def go() -> None:
        async with Client(party.addr(0), party.key) as c:
            await c.submit("chaos", inputs, job_id, chunk_size=128 * 1024, reduces=4)

    asyncio.run(go())


def _token(party: LocalParty, name: str) -> str:
    res = _cli(party, "invite", name)
    assert res.returncode == 0, res.stderr
    assert "pdp join TOKEN" in res.stderr
    return res.stdout.strip()


def test_a_node_that_is_not_invited_is_refused(party: LocalParty) -> None:
    """A node with every file a member has but its own (never invited) identity gets nowhere."""
    w = party.add_node("stranger", peers=[1])
    _wait(lambda: "does not know this identity" in (party.root / "stranger.log").read_text(), 30,
          "the stranger to be refused")
    assert "stranger" not in [m["name"] for m in _status(party)["members"]]
    assert "not a party member's (unknown identity)" in (party.root / f"{party.names[1]}.log").read_text()
    assert w == 3


def test_invited_worker_joins_mid_job_takes_tasks_and_is_cut_off_when_uninvited(
        party: LocalParty, corpus: list[Path], tmp_path: Path) -> None:
    token = _token(party, "helper")
    _submit(party, corpus, "with-helper")
    party.add_node("helper", peers=[2], token=token)  # names a single member, not the leader necessarily
    _wait(lambda: any(m["name"] == "helper" and m["health"] == "alive" for m in _status(party)["members"]), 30,
          "the helper to join")
    [helper] = [m for m in _status(party)["members"] if m["name"] == "helper"]
    assert helper["voter"] is False and helper["raft_addr"] == ""
    summary = _finish(party, "with-helper", tmp_path / "a.tsv")
    assert (tmp_path / "a.tsv").read_bytes() == oracle([str(p) for p in corpus])
    assert summary["done_on"].get("helper", 0) >= 1  # the newcomer took work

    # a second job; the helper is uninvited while it runs
    _submit(party, corpus, "helper-cut")
    _wait(lambda: _job(party, "helper-cut")["maps_done"] >= 2, 60, "maps under way")
    res = _cli(party, "uninvite", "helper")
    assert res.returncode == 0, res.stderr
    assert party.procs["helper"].wait(20) == 1  # it learns and stops
    party.start_node(3, [2])  # restarted with every file it kept: refused at once
    time.sleep(1.5)
    assert "helper" not in [m["name"] for m in _status(party)["members"]]
    _finish(party, "helper-cut", tmp_path / "b.tsv")
    assert (tmp_path / "b.tsv").read_bytes() == oracle([str(p) for p in corpus])
    assert "helper" not in [m["name"] for m in _status(party)["members"]]
    log = (party.root / "helper.log").read_text()
    assert "identity was revoked" in log and "does not know this identity" in log


def test_core_members_cannot_be_uninvited(party: LocalParty) -> None:
    res = _cli(party, "uninvite", party.names[1])
    assert res.returncode == 1 and "core remove" in res.stderr


def _job(party: LocalParty, job_id: str) -> dict[str, Any]:
    async def go() -> list[dict[str, Any]]:
        async with Client(party.addr(0), party.key) as c:
            return await c.jobs()

    for _ in range(50):  # a member's copy of the log may lag a moment
        found = [j for j in asyncio.run(go()) if j["id"] == job_id]
        if found:
            return found[0]
        time.sleep(0.1)
    raise AssertionError(f"no member lists job {job_id}")


def _voters(party: LocalParty) -> dict[str, bool]:
    return {m["name"]: m["voter"] for m in _status(party)["members"]}


def test_a_voter_is_added_and_removed_while_a_job_runs(party: LocalParty, corpus: list[Path], tmp_path: Path) -> None:
    party.add_node("seat", peers=[0], token=_token(party, "seat"))
    _wait(lambda: _voters(party).get("seat") is False, 30, "seat to join as a worker")
    _submit(party, corpus, "core-change")
    res = _cli(party, "core", "add", "seat")
    assert res.returncode == 0, res.stderr
    _wait(lambda: _voters(party).get("seat") is True, 30, "seat to hold a Raft seat")
    assert len(res.stdout.split("voters:")[1].split(",")) == 4  # three founders and the new seat
    res = _cli(party, "core", "remove", "seat")
    assert res.returncode == 0, res.stderr
    _wait(lambda: _voters(party).get("seat") is False, 30, "seat to be a worker again")
    _finish(party, "core-change", tmp_path / "out.tsv")
    assert (tmp_path / "out.tsv").read_bytes() == oracle([str(p) for p in corpus])
    views = [_status(party, i) for i in range(3)]
    assert len({v["leader"] for v in views}) == 1 and all(v["raft"]["diverged"] == 0 for v in views)


def test_members_leave_cleanly_mid_job_even_the_leader(party: LocalParty, corpus: list[Path],
                                                       tmp_path: Path) -> None:
    v = party.add_node("visitor", peers=[1], token=_token(party, "visitor"))
    _wait(lambda: _voters(party).get("visitor") is False, 30, "the visitor to join")
    _submit(party, corpus, "leaving")
    _wait(lambda: _job(party, "leaving")["maps_done"] >= 2, 60, "maps under way")
    env = dict(os.environ, PDP_KEY_FILE=str(party.key_file))
    res = subprocess.run([sys.executable, "-m", "pdp", "leave", "--node", party.addr(v)], capture_output=True,
                         text=True, env=env, timeout=60)
    assert res.returncode == 0, res.stderr
    assert party.procs["visitor"].wait(20) == 0
    leader = party.names.index(_status(party)["leader"])
    res = subprocess.run([sys.executable, "-m", "pdp", "leave", "--node", party.addr(leader)], capture_output=True,
                         text=True, env=env, timeout=90)
    assert res.returncode == 0, res.stderr
    assert party.procs[party.names[leader]].wait(30) == 0
    rest = [i for i in range(3) if i != leader]

    async def go() -> None:
        f = Failover([party.addr(i) for i in rest], party.key, patience=120)
        await f.run(lambda c: c.wait("leaving"), "wait")
        await f.run(lambda c: c.fetch_result("leaving", tmp_path / "out.tsv"), "fetch")

    asyncio.run(go())
    assert (tmp_path / "out.tsv").read_bytes() == oracle([str(p) for p in corpus])
    st = asyncio.run(party.status(rest[0]))
    assert st["leader"] in [party.names[i] for i in rest]
    assert {m["name"] for m in st["members"]} == {party.names[i] for i in rest}


def test_a_party_of_one_grows_its_core(make_party: Callable[..., LocalParty], tmp_path: Path) -> None:
    """`pdp party init` makes a core of one; the README's next steps invite, join and seat
    a second voter, whose vote the change itself needs."""
    party = make_party("sleep=0.05", n=1)
    party.add_node("second", peers=[0], token=_token(party, "second"))
    _wait(lambda: _voters(party).get("second") is False, 30, "second to join as a worker")
    res = _cli(party, "core", "add", "second")
    assert res.returncode == 0, res.stderr
    _wait(lambda: _voters(party).get("second") is True, 30, "second to hold a Raft seat")
    views = [_status(party, i) for i in (0, 1)]
    assert len({v["leader"] for v in views}) == 1 and None not in {v["leader"] for v in views}
