"""``pdp demo``: a 3-node party on 127.0.0.1 word-counts the bundled sample, checked against the oracle;
``pdp demo --chaos``: five nodes, a member and then the leader killed mid-job, the result still exact."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tempfile
import time
from collections.abc import Iterator
from importlib import resources
from pathlib import Path

from rich.console import Console
from rich.table import Table

from pdp.client import Client, Failover
from pdp.errors import PdpError
from pdp.jobs.builtin.wordcount import oracle
from pdp.local import LocalParty


def sample_path() -> Path:
    return Path(str(resources.files("pdp") / "data" / "sample.txt"))


@contextlib.contextmanager
def _workdir(prefix: str, keep: bool) -> Iterator[Path]:
    """A temp dir for the demo's party; removed afterwards unless ``keep`` or the demo failed
    (then its logs and spools are there to read)."""
    root = Path(tempfile.mkdtemp(prefix=prefix))
    yield root
    if not keep:
        shutil.rmtree(root, ignore_errors=True)


def _check_exact(out: Path, inputs: list[Path], root: Path) -> bytes:
    """The result, if byte-identical to the sequential oracle's; else PdpError."""
    got = out.read_bytes()
    if got != oracle([str(p) for p in inputs]):
        raise PdpError(f"the party's output differs from the sequential oracle (kept in {root})")
    return got


async def run_demo(nodes: int = 3, keep: bool = False) -> None:
    con = Console()
    sample = sample_path()
    with _workdir("pdp-demo-", keep) as root, LocalParty(root, n=nodes, cpus=1) as party:
        con.print(f"starting {nodes} nodes on 127.0.0.1 (logs in {root}) ...")
        t0 = time.monotonic()
        ready = await party.wait_ready(60.0)
        con.print(f"party ready in {time.monotonic() - t0:.1f} s; leader: [bold]{ready['leader']}[/bold]")
        out = root / "result.tsv"
        t1 = time.monotonic()
        async with Client(party.addr(0), party.key) as client:
            job_id = "demo-wordcount"
            await client.submit("wordcount", [sample], job_id, comment="pdp demo", chunk_size=16 * 1024)
            summary = await client.wait(job_id)
            await client.fetch_result(job_id, out)
        elapsed = time.monotonic() - t1
        _report(con, _check_exact(out, [sample], root), summary, elapsed, sample)


def _report(con: Console, output: bytes, summary: dict, elapsed: float, sample: Path) -> None:
    counts = [(w, int(c)) for w, c in (line.split(b"\t") for line in output.splitlines())]
    top = sorted(counts, key=lambda wc: (-wc[1], wc[0]))[:10]
    table = Table("word", "count", title="top words")
    for word, count in top:
        table.add_row(word.decode(), str(count))
    con.print(table)
    spread = ", ".join(f"{n}: {k} tasks" for n, k in sorted(summary["done_on"].items()))
    con.print(f"{sample.stat().st_size:,} bytes, {len(counts):,} distinct words, identical to the sequential oracle; "
              f"job took {elapsed:.2f} s; {summary['maps']} map + {summary['reduces']} reduce tasks on {spread}")


CHAOS_NODES = 5  # two of five may die and a majority (three) still commits
CHAOS_COPIES = 8  # the input: the bundled sample this many times over (about 1.1 MB)


async def run_chaos_demo(keep: bool = False) -> None:
    """The party's main promise in one command: a word count on five local nodes; a member is
    killed mid-job, then the leader; a new leader is elected, lost tasks run again, and the
    result is still byte-identical to the sequential oracle."""
    con = Console()
    # the test-only job "chaos" is word count whose tasks each pause 50 ms: time to watch it happen
    env, settings = {"PDP_TEST_KINDS": "1", "PDP_CHAOS": "sleep=0.05"}, {"heartbeat": 0.5, "dead_after": 2.0}
    with _workdir("pdp-demo-chaos-", keep) as root, \
            LocalParty(root / "party", n=CHAOS_NODES, cpus=1, env=env, settings=settings) as party:
        sample = root / "input.txt"
        sample.write_bytes(sample_path().read_bytes() * CHAOS_COPIES)
        con.print(f"starting {CHAOS_NODES} nodes on 127.0.0.1 (logs in {root}) ...")
        ready = await party.wait_ready(90.0)
        leader = party.names.index(ready["leader"])
        con.print(f"party ready; leader: [bold]{ready['leader']}[/bold] (term {ready['term']})")
        # the gateway keeps one copy of the input: submit through a member that is not killed
        # (each input lives on two members; killing both holders would lose it)
        gateway = next(i for i in range(party.n) if i != leader)
        worker = next(i for i in range(party.n) if i not in (leader, gateway))
        addrs = [party.addr(i) for i in [gateway, *range(party.n)] if i not in (worker, leader)]
        async with Failover(addrs, party.key, patience=120) as f:
            job_id = "demo-chaos"
            await f.run(lambda c: c.submit("chaos", [sample], job_id, comment="pdp demo --chaos",
                                           chunk_size=16 * 1024, reduces=4), "submit")
            await _when(f, job_id, 0.2)
            party.kill(worker)
            con.print(f"[red]killed member {party.names[worker]}[/red] (SIGKILL) with the job running")
            await _when(f, job_id, 0.5)
            party.kill(leader)
            con.print(f"[red]killed the leader {party.names[leader]}[/red] (SIGKILL)")
            summary = await f.run(lambda c: c.wait(job_id), "wait")
            out = root / "result.tsv"
            await f.run(lambda c: c.fetch_result(job_id, out), "fetch")
            status = await f.run(lambda c: c.call("status"), "status")
            _, events = await f.run(lambda c: c.events(), "events")
        _check_exact(out, [sample], root)
        _chaos_report(con, summary, status, events, sample)


async def _when(f: Failover, job_id: str, fraction: float) -> None:
    """Until that fraction of the job's first-step maps are done."""
    while True:
        jobs = await f.run(lambda c: c.jobs(), "list jobs")
        job = next((j for j in jobs if j["id"] == job_id), None)
        if job is not None and (job["maps"] and job["maps_done"] >= fraction * job["maps"] or job["state"] == "done"):
            return
        await asyncio.sleep(0.1)


def _chaos_report(con: Console, summary: dict, status: dict, events: list[dict], sample: Path) -> None:
    table = Table("event", "what the party did", title="what happened (the replicated log)")
    for e in events:
        if e["kind"] in ("election", "lost", "submitted", "done", "failed"):  # re-runs: summed below
            table.add_row(e["kind"], e["text"])
    reruns = sum(summary["reruns"].values())
    table.add_row("rerun", f"{reruns} task(s) ran again: " + "; ".join(f"{n}× {why}" for why, n in
                                                                        sorted(summary["reruns"].items())))
    con.print(table)
    con.print(f"new leader: [bold]{status['leader']}[/bold] (term {status['term']}); "
              f"{sample.stat().st_size:,} bytes counted, {summary['maps']} maps + {summary['reduces']} reduces; "
              f"[green]result identical to the sequential oracle[/green]")
