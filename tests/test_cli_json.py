"""Scripting through the real CLI: every read command's `--json` has exactly the keys the
README documents, `pdp submit --no-wait` then `pdp wait` writes the bytes of the oracle (also
through the loss of the member it talks to), and the exit codes are the README's: 0 success,
1 error (a failed or cancelled job too), 2 usage, 3 `pdp wait --timeout` ran out, 130 Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from pdp import cli
from pdp.jobs.builtin.wordcount import oracle
from pdp.local import LocalParty
from conftest import FAST, ready_party

SLEEP = 2.0  # each `chaos` map and reduce call sleeps this long: a job that takes a few seconds
STATES = {"queued", "mapping", "reducing", "assembling", "done", "failed", "cancelled"}
OUTCOME = {"id": str, "output": str, "size": int, "keys": int, "sha256": str, "done_on": dict, "reruns": dict,
           "seconds": (int, float)}
NO_WAIT = {"id": str, "accepted": bool, "dup": bool, "state": str}
RESULT = {"id": str, "output": str, "size": int, "keys": int, "sha256": str}
JOB = {"id": str, "kind": str, "state": str, "error": str, "form": dict, "submitted_at": (int, float),
       "finished_at": (int, float, type(None)), "maps": int, "maps_done": int, "reduces": int, "reduces_done": int,
       "step": int, "steps": int, "nodes_at_work": list, "done_on": dict, "result": dict, "reruns": dict,
       "priority": int, "backups": int, "attempts": int, "counters": dict, "job": str, "args": list}
FORM = {"source": list, "data_type": str, "size": int, "comment": str, "submitter": str, "output": str,
        "gateway": str, "priority": int}
TASK = {"phase": str, "index": int, "step": int, "state": str, "node": str, "attempt": int, "runs": list,
        "failed_on": list, "bytes": int, "stats": dict}
STATUS = {"node": str, "leader": (str, type(None)), "term": int, "is_leader": bool, "raft": dict, "members": list,
          "jobs": dict, "reruns": dict, "invited": list}
RAFT = {"term": int, "leader_raft": (str, type(None)), "has_quorum": bool, "commit_idx": int, "last_applied": int,
        "log_len": int, "truncations": int, "diverged": int, "refused": int}
MEMBER = {"name": str, "data_addr": str, "raft_addr": str, "cpus": int, "voter": bool, "score": (int, float),
          "rate": (int, float), "benched_until": (int, float), "record": dict, "health": str,
          "heartbeat_age": (int, float, type(None)), "tasks": list, "paused": str}
JOB_COUNTS = {"queued", "running", "done", "failed", "cancelled"}


@pytest.fixture(scope="module")
def party(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalParty]:
    """One party for the whole module: three real nodes that also run the slow `chaos` kind."""
    with ready_party(tmp_path_factory.mktemp("jsonparty"), n=3, cpus=1,
                     env={"PDP_TEST_KINDS": "1", "PDP_CHAOS": f"sleep={SLEEP}"}, settings=FAST) as p:
        yield p


@pytest.fixture(scope="module")
def text(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("inputs") / "words.txt"
    path.write_text("the quick brown fox jumps over the lazy dog\nthe end\n" * 40 + "Ünïcode wörds too\n")
    return path


def _env() -> dict[str, str]:
    return {**os.environ, "PDP_TEST_KINDS": "1"}


def pdp(party: LocalParty, *args: str, node: int | None = 0, cwd: Path | None = None,
        timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """The real `pdp` command with the admin's credential, pointed at member ``node`` (None: a
    command that talks to no member)."""
    where = [] if node is None else ["--node", party.addr(node)]
    return subprocess.run([sys.executable, "-m", "pdp", *args, *where, "--key-file", str(party.key_file)],
                          capture_output=True, text=True, env=_env(), cwd=cwd, timeout=timeout)


def one_json(res: subprocess.CompletedProcess[str]) -> Any:
    """Exit 0 and exactly one JSON document on stdout."""
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)  # raises on anything else on stdout


def check_shape(obj: Any, shape: dict[str, Any], what: str) -> None:
    assert isinstance(obj, dict), (what, obj)
    assert set(obj) == set(shape), f"{what}: keys {sorted(obj)} != documented {sorted(shape)}"
    for key, types in shape.items():
        assert isinstance(obj[key], types), f"{what}.{key} = {obj[key]!r} is not {types}"


def no_wait(party: LocalParty, kind: str, text: Path, node: int = 0) -> str:
    res = pdp(party, "submit", kind, str(text), "--no-wait", node=node)
    assert res.returncode == 0, res.stderr
    job_id = res.stdout.strip()
    assert res.stdout == job_id + "\n" and job_id.startswith(f"{kind}-")  # nothing but the id on stdout
    return job_id


def test_submit_result_and_jobs_json(party: LocalParty, text: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.tsv"
    done = one_json(pdp(party, "submit", "wordcount", str(text), "-o", str(out), "--comment", "shapes", "--json"))
    check_shape(done, OUTCOME, "submit --json")
    assert out.read_bytes() == oracle([str(text)])
    assert done["output"] == str(out) and done["size"] == out.stat().st_size and len(done["sha256"]) == 64

    again = one_json(pdp(party, "result", done["id"], "-o", str(tmp_path / "again.tsv"), "--json"))
    check_shape(again, RESULT, "result --json")
    assert (tmp_path / "again.tsv").read_bytes() == out.read_bytes()
    assert {k: again[k] for k in ("size", "keys", "sha256")} == {k: done[k] for k in ("size", "keys", "sha256")}

    listing = one_json(pdp(party, "jobs", "--json"))
    assert isinstance(listing, list)
    [mine] = [j for j in listing if j["id"] == done["id"]]
    for j in listing:
        check_shape(j, JOB, "jobs --json[]")
        check_shape(j["form"], FORM, "jobs --json[].form")
        assert j["state"] in STATES
    assert mine["state"] == "done" and mine["form"]["comment"] == "shapes"
    assert set(mine["result"]) == {"holders", "size", "keys", "sha256"}

    one = one_json(pdp(party, "jobs", done["id"], "--json"))
    check_shape(one, {**JOB, "tasks": list}, "jobs ID --json")
    assert one["tasks"] and one["tasks"][0]["phase"] == "map"
    for t in one["tasks"]:
        check_shape(t, TASK, "jobs ID --json .tasks[]")


def test_status_json(party: LocalParty) -> None:
    st = one_json(pdp(party, "status", "--json", node=1))
    check_shape(st, STATUS, "status --json")
    check_shape(st["raft"], RAFT, "status --json .raft")
    assert set(st["jobs"]) == JOB_COUNTS and all(isinstance(n, int) for n in st["jobs"].values())
    assert [m["name"] for m in st["members"]] == party.names
    for m in st["members"]:
        check_shape(m, MEMBER, "status --json .members[]")


def test_invite_invites_reload_and_id_json(party: LocalParty, tmp_path: Path) -> None:
    token = one_json(pdp(party, "invite", "scripted", "--user", "--ttl", "10m", "--json"))
    check_shape(token, {"name": str, "kind": str, "token": str, "expires": (int, float)}, "invite --json")
    assert token["token"].startswith("pdp1-") and token["kind"] == "user"

    listing = one_json(pdp(party, "invites", "--json"))
    check_shape(listing, {"pending": list, "identities": list}, "invites --json")
    [pending] = [p for p in listing["pending"] if p["name"] == "scripted"]
    check_shape(pending, {"name": str, "kind": str, "expires": (int, float), "by": str}, "invites .pending[]")
    for r in listing["identities"]:
        check_shape(r, {"name": str, "kind": str, "admin": bool, "fp": str}, "invites .identities[]")

    gone = one_json(pdp(party, "invite", "scripted", "--withdraw", "--json"))
    assert gone == {"name": "scripted", "withdrawn": True}

    assert one_json(pdp(party, "reload", "--json")) == {"applied": [], "restart": []}

    both = one_json(pdp(party, "id", "--data-dir", str(party.root / party.names[0]), "--json", node=None))
    check_shape(both, {"node": dict, "user": dict}, "id --json")
    check_shape(both["node"], {"id": str, "path": str}, "id --json .node")
    check_shape(both["user"], {"id": str, "name": str, "path": str}, "id --json .user")
    assert both["user"]["name"] == "admin"
    user_only = one_json(pdp(party, "id", "--data-dir", str(tmp_path), "--json", node=None))
    assert user_only["node"] is None and user_only["user"] == both["user"]


def test_core_json(monkeypatch: pytest.MonkeyPatch) -> None:
    """`pdp core add|remove --json`, the party's answer faked (a real change is test_membership's)."""

    async def fake_call(addr: str, key: Any, kind: str, **fields: Any) -> dict[str, Any]:
        assert kind == "core"
        return {"t": "ok", "voters": ["a", "b"] + (["c"] if fields["action"] == "add" else [])}

    monkeypatch.setattr(cli, "_call", fake_call)
    monkeypatch.setattr(cli, "_key", lambda key_file: None)
    for action, voters in (("add", ["a", "b", "c"]), ("remove", ["a", "b"])):
        res = CliRunner().invoke(cli.app, ["core", action, "c", "--json"])
        assert res.exit_code == 0, res.output
        assert json.loads(res.stdout) == {"name": "c", "action": action, "voters": voters}


def test_no_wait_then_wait_writes_the_oracle(party: LocalParty, text: Path, tmp_path: Path) -> None:
    ack = one_json(pdp(party, "submit", "wordcount", str(text), "--no-wait", "--json", node=1))
    check_shape(ack, NO_WAIT, "submit --no-wait --json")
    assert ack["accepted"] is True and ack["dup"] is False and ack["state"] in STATES
    out = tmp_path / "waited.tsv"
    done = one_json(pdp(party, "wait", ack["id"], "-o", str(out), "--json", node=2))
    check_shape(done, OUTCOME, "wait --json")
    assert out.read_bytes() == oracle([str(text)])
    assert done["id"] == ack["id"] and done["size"] == len(out.read_bytes())

    res = pdp(party, "wait", ack["id"], cwd=tmp_path)  # done already: at once; default file as `pdp result`
    assert res.returncode == 0, res.stderr
    assert res.stdout == f"{ack['id']}: {done['keys']} keys, {done['size']} bytes -> {ack['id']}.tsv\n"
    assert (tmp_path / f"{ack['id']}.tsv").read_bytes() == out.read_bytes()

    res = pdp(party, "wait", ack["id"], "--timeout", "0", "-o", str(tmp_path / "zero.tsv"))
    assert res.returncode == 0, res.stderr  # a timeout of 0 looks once: the job is done
    assert (tmp_path / "zero.tsv").read_bytes() == out.read_bytes()


def test_wait_timeout_exits_3_and_the_job_goes_on(party: LocalParty, text: Path, tmp_path: Path) -> None:
    job_id = no_wait(party, "chaos", text)
    started = time.monotonic()
    res = pdp(party, "wait", job_id, "--timeout", "0.5", "-o", str(tmp_path / "early.tsv"), "--json")
    assert res.returncode == 3, (res.returncode, res.stderr)
    assert time.monotonic() - started < 2 * SLEEP + 10
    assert res.stdout == ""
    assert f"error: job {job_id} did not end within 0.5 s; it goes on" in res.stderr
    assert not (tmp_path / "early.tsv").exists()

    out = tmp_path / "late.tsv"
    done = one_json(pdp(party, "wait", job_id, "-o", str(out), "--json"))
    assert out.read_bytes() == oracle([str(text)]) and done["id"] == job_id


def test_wait_on_an_unknown_job_exits_1(party: LocalParty) -> None:
    job_id = "wordcount-20260101-000000-" + "ab" * 16
    res = pdp(party, "wait", job_id, "--json")
    assert res.returncode == 1 and res.stdout == ""
    assert f"error: no job {job_id} in the party (check `pdp jobs`)" in res.stderr


def test_wait_on_a_cancelled_job_exits_1(party: LocalParty, text: Path, tmp_path: Path) -> None:
    job_id = no_wait(party, "chaos", text)
    assert one_json(pdp(party, "cancel", job_id, "--json")) == {"id": job_id, "cancelled": True}
    res = pdp(party, "wait", job_id, "-o", str(tmp_path / "never.tsv"), node=1)
    assert res.returncode == 1 and res.stdout == ""
    assert f"error: job {job_id} was: cancelled by admin" in res.stderr
    assert not (tmp_path / "never.tsv").exists()


def test_errors_exit_1_and_usage_errors_exit_2(party: LocalParty, tmp_path: Path) -> None:
    res = pdp(party, "submit", "wordcount", str(tmp_path / "missing.txt"), "--json")
    assert res.returncode == 1 and res.stdout == "" and "does not exist" in res.stderr
    res = pdp(party, "wait", "x", "-o", str(tmp_path / "no" / "such" / "dir.tsv"))
    assert res.returncode == 1 and "the output directory" in res.stderr
    for args in (["wait"], ["status", "--no-such-flag"], ["wait", "x", "--timeout", "-1"], ["jobs", "a", "b"]):
        res = pdp(party, *args)
        assert res.returncode == 2, (args, res.returncode, res.stderr)
        assert res.stdout == ""


def test_ctrl_c_exits_130(party: LocalParty, text: Path, tmp_path: Path) -> None:
    job_id = no_wait(party, "chaos", text)
    proc = subprocess.Popen([sys.executable, "-m", "pdp", "wait", job_id, "-o", str(tmp_path / "out.tsv"),
                             "--node", party.addr(0), "--key-file", str(party.key_file)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    assert proc.stderr is not None
    proc.stderr.readline()  # the first progress line: it is waiting
    proc.send_signal(signal.SIGINT)
    assert proc.wait(30) == 130
    res = pdp(party, "wait", job_id, "-o", str(tmp_path / "out.tsv"))  # the job went on without its waiter
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "out.tsv").read_bytes() == oracle([str(text)])


def test_wait_survives_the_loss_of_its_member(party: LocalParty, text: Path, tmp_path: Path) -> None:
    """Last in the module: it kills a member. `pdp wait` carries on through another one."""
    st = one_json(pdp(party, "status", "--json"))
    gateway = next(i for i, name in enumerate(party.names) if name != st["leader"])
    job_id = no_wait(party, "chaos", text, node=gateway)
    out = tmp_path / "out.tsv"
    proc = subprocess.Popen([sys.executable, "-m", "pdp", "wait", job_id, "-o", str(out), "--json",
                             "--node", party.addr(gateway), "--key-file", str(party.key_file)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    time.sleep(1.0)
    assert proc.poll() is None, proc.communicate()  # still waiting: the job takes 2 × SLEEP at least
    party.kill(gateway)
    stdout, stderr = proc.communicate(timeout=180)
    assert proc.returncode == 0, stderr
    assert json.loads(stdout)["id"] == job_id
    assert out.read_bytes() == oracle([str(text)])
