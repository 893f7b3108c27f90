"""Integration: three real `pdp node` processes on loopback, driven through the client and the CLI."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pdp.client import Client
from pdp.errors import AuthError
from pdp.identity import new_credential
from pdp.jobs.builtin.wordcount import oracle
from pdp.local import LocalParty


def _cli(*args: str, key_file: Path | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    if key_file is not None:
        env["PDP_KEY_FILE"] = str(key_file)
    return subprocess.run([sys.executable, "-m", "pdp", *args], capture_output=True, text=True, env=env, cwd=cwd,
                          timeout=120)


def _statuses(party: LocalParty) -> list[dict]:
    out = []
    for i in range(party.n):
        res = _cli("status", "--json", "--node", party.addr(i), key_file=party.key_file)
        assert res.returncode == 0, res.stderr
        out.append(json.loads(res.stdout))
    return out


def _leader_index(party: LocalParty) -> int:
    [leader] = {s["leader"] for s in _statuses(party)}
    return party.names.index(leader)


async def _run_job(party: LocalParty, i: int, inputs: list[Path], job_id: str, out: Path, **form) -> dict:
    async with Client(party.addr(i), party.key) as c:
        ack = await c.submit("wordcount", inputs, job_id, **form)
        assert ack["id"] == job_id
        summary = await c.wait(job_id)
        await c.fetch_result(job_id, out)
        return summary


def test_status_shows_exactly_one_leader(party: LocalParty) -> None:
    views = _statuses(party)
    assert len({v["leader"] for v in views}) == 1
    assert sum(v["is_leader"] for v in views) == 1
    leader = views[0]["leader"]
    assert [v["node"] for v in views if v["is_leader"]] == [leader]
    for v in views:
        assert [m["name"] for m in v["members"]] == party.names
        assert v["raft"]["truncations"] == 0
        assert all(m["heartbeat_age"] is not None and m["heartbeat_age"] < 5 for m in v["members"])


@pytest.mark.parametrize("where", ["leader", "follower"])
def test_corpus_wordcount_matches_oracle(party: LocalParty, corpus: list[Path], tmp_path: Path, where: str) -> None:
    leader = _leader_index(party)
    i = leader if where == "leader" else (leader + 1) % party.n
    out = tmp_path / "out.tsv"
    summary = asyncio.run(_run_job(party, i, corpus, f"corpus-{where}", out, chunk_size=256 * 1024, reduces=3))
    assert out.read_bytes() == oracle([str(p) for p in corpus])
    assert summary["maps"] == summary["maps_done"] >= len(corpus)
    assert summary["reduces"] == summary["reduces_done"] == 3
    assert sum(summary["done_on"].values()) == summary["maps"] + summary["reduces"]


def test_two_jobs_back_to_back_via_cli(party: LocalParty, corpus: list[Path], tmp_path: Path) -> None:
    for n, files in enumerate([corpus[:3], corpus[3:]]):
        out = tmp_path / f"out{n}.tsv"
        res = _cli("submit", "wordcount", *map(str, files), "-o", str(out), "--node", party.addr(n),
                   "--comment", f"back to back {n}", "--json", key_file=party.key_file)
        assert res.returncode == 0, res.stderr
        info = json.loads(res.stdout)
        assert out.read_bytes() == oracle([str(p) for p in files])
        assert info["output"] == str(out)
    for _ in range(50):  # party.addr(2)'s copy of the log may lag a moment
        jobs = json.loads(_cli("jobs", "--json", "--node", party.addr(2), key_file=party.key_file).stdout)
        mine = [j for j in jobs if j["form"]["comment"].startswith("back to back")]
        if [j["state"] for j in mine] == ["done", "done"]:
            break
        time.sleep(0.1)
    assert [j["state"] for j in mine] == ["done", "done"]
    assert mine[0]["form"]["size"] == sum(p.stat().st_size for p in corpus[:3])


def test_edge_inputs(party: LocalParty, tmp_path: Path) -> None:
    files = {
        "empty.txt": b"",
        "no-newline.txt": b"tail words without newline",
        "crlf.txt": b"one two\r\ntwo three\r\n\r\n",
        "long-line.txt": ("\u00e9t\u00e9 Stra\u00dfe " * 20000).encode(),
        "unicode.txt": "\u65e5\u672c\u8a9e \u0394\u03b5\u03bb\u03c6\u03bf\u03af a\u0301b x\u00b2y \u00bd\n".encode(),
    }
    paths = []
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
        paths.append(tmp_path / name)
    out = tmp_path / "out.tsv"
    asyncio.run(_run_job(party, 1, paths, "edge-inputs", out, chunk_size=4096, reduces=2))
    assert out.read_bytes() == oracle([str(p) for p in paths])


def test_invalid_utf8_fails_naming_file_and_offset(party: LocalParty, tmp_path: Path) -> None:
    bad = tmp_path / "latin1.txt"
    bad.write_bytes(b"fine line\n" * 1000 + b"caf\xe9 au lait\n")
    out = tmp_path / "never.tsv"
    res = _cli("submit", "wordcount", str(bad), "-o", str(out), "--node", party.addr(0), key_file=party.key_file)
    assert res.returncode == 1
    assert str(bad) in res.stderr and "offset 10003" in res.stderr and "UTF-8" in res.stderr
    assert not out.exists()


def test_bad_paths_are_clear_errors(party: LocalParty, tmp_path: Path) -> None:
    res = _cli("submit", "wordcount", str(tmp_path / "missing.txt"), "--node", party.addr(0), key_file=party.key_file)
    assert res.returncode == 1 and "does not exist" in res.stderr
    res = _cli("submit", "wordcount", str(tmp_path), "--node", party.addr(0), key_file=party.key_file)
    assert res.returncode == 1 and "not a regular file" in res.stderr
    res = _cli("submit", "wordcount", str(__file__), "-o", str(tmp_path / "no" / "dir.tsv"), key_file=party.key_file)
    assert res.returncode == 1 and "does not exist" in res.stderr


def test_an_unknown_identity_is_refused_and_node_stays_up(party: LocalParty, tmp_path: Path) -> None:
    stranger = new_credential(tmp_path / "stranger.cred", "mallory", party.key.pins)  # never joined
    res = _cli("status", "--node", party.addr(0), key_file=stranger.path)
    assert res.returncode == 1
    assert "does not know this identity" in res.stderr and "pdp id" in res.stderr
    with pytest.raises(AuthError):
        asyncio.run(Client(party.addr(1), stranger).__aenter__())
    log = (party.root / f"{party.names[0]}.log").read_text()
    assert "refused a TLS connection" in log and "certificate" in log
    assert len(_statuses(party)) == party.n  # everyone still serves the party


def test_garbage_on_the_data_port_is_dropped(party: LocalParty) -> None:
    async def garbage() -> bytes:
        host, port = party.addr(2).rsplit(":", 1)
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(b"\xff\xff\xff\xff" + os.urandom(64))
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), 5)
        writer.close()
        return data

    assert asyncio.run(garbage()) == b""  # dropped without an answer
    assert len(_statuses(party)) == party.n


def test_no_raft_log_truncation_under_load(party: LocalParty, corpus: list[Path], tmp_path: Path) -> None:
    """pdp's own load (many small jobs at once, through every member) never makes pysyncobj
    truncate applied log entries (guide: a known fault under heavy load)."""
    async def burst() -> None:
        async def one(k: int) -> None:
            await _run_job(party, k % party.n, [corpus[k % len(corpus)]], f"burst-{k}", tmp_path / f"b{k}.tsv",
                           chunk_size=64 * 1024, reduces=2)

        await asyncio.gather(*(one(k) for k in range(12)))

    asyncio.run(burst())
    for k in range(12):
        assert (tmp_path / f"b{k}.tsv").read_bytes() == oracle([str(corpus[k % len(corpus)])])
    for v in _statuses(party):
        assert v["raft"]["truncations"] == 0 and v["raft"]["diverged"] == 0


# -- the other built-in jobs on the party ---------------------------------------------------


def test_builtin_grep_indexer_and_sort_match_their_oracles(party: LocalParty, corpus: list[Path],
                                                           tmp_path: Path) -> None:
    """grep, indexer and sort through `pdp submit`, byte for byte their oracles; sort's reducers
    each get a share (the gateway sampled the inputs for the range cuts)."""
    from pdp.jobs.builtin import grep, indexer, sort

    books = [str(p) for p in corpus[:4]]
    cases = [("grep", ["--", "[Ww]hale|Alice"], grep.oracle(books, "[Ww]hale|Alice")),
             ("indexer", [], indexer.oracle(books)),
             ("sort", ["--", "--field", "1"], sort.oracle(books, ["--field", "1"]))]
    for job, args, want in cases:
        out = tmp_path / f"{job}.out"
        res = _cli("submit", job, *books, "-o", str(out), "--node", party.addr(1), "--json", *args,
                   key_file=party.key_file)
        assert res.returncode == 0, res.stderr
        assert out.read_bytes() == want, job
        job_id = json.loads(res.stdout)["id"]

        async def detail(job_id: str = job_id) -> dict:
            async with Client(party.addr(0), party.key) as c:
                return await c.job(job_id)
        tasks = asyncio.run(detail())["tasks"]
        if job == "sort":
            outs = [t["stats"]["records_out"] for t in tasks if t["phase"] == "reduce"]
            assert len(outs) > 1 and min(outs) > 0 and sum(outs) == want.count(b"\n"), outs
