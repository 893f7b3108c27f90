"""``pdp demo``: a 3-node party on 127.0.0.1 word-counts the bundled sample, checked against the oracle."""

from __future__ import annotations

import shutil
import tempfile
import time
from importlib import resources
from pathlib import Path

from rich.console import Console
from rich.table import Table

from pdp.client import Client
from pdp.errors import PdpError
from pdp.jobs.builtin.wordcount import oracle
from pdp.local import LocalParty


def sample_path() -> Path:
    return Path(str(resources.files("pdp") / "data" / "sample.txt"))


async def run_demo(nodes: int = 3, keep: bool = False) -> None:
    con = Console()
    root = Path(tempfile.mkdtemp(prefix="pdp-demo-"))
    sample = sample_path()
    party = LocalParty(root, n=nodes, cpus=1)
    try:
        con.print(f"starting {nodes} nodes on 127.0.0.1 (logs in {root}) ...")
        t0 = time.monotonic()
        party.start()
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
        expected = oracle([str(sample)])
        got = out.read_bytes()
        if got != expected:
            raise PdpError(f"the party's output differs from the sequential oracle (kept in {root})")
        _report(con, got, summary, elapsed, sample)
    finally:
        party.stop()
        if not keep:
            shutil.rmtree(root, ignore_errors=True)


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
