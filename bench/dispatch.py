"""Task dispatch rate: one word count cut into many tiny map chunks, against the same job in big chunks.

    python bench/dispatch.py [--mb 20] [--chunk-kb 16] [--reduces 3] [--runs 3] [--nodes 3] [--cpus 1]

Builds ~MB megabytes from ../shared/corpus (as bench/wordcount.py does) and runs it on a
local party of real `pdp node` processes, alternately with tiny map chunks (``chunk_size`` =
CHUNK_KB KiB, so thousands of tasks) and with 8 MiB chunks (a handful: the baseline), each
RUNS times. The rate is (maps + reduces) / job time, with the job time taken both by the
client (submit -> result file, which includes uploading the input) and by the party (the
job's submitted_at -> finished_at). Prints the medians of both variants, their ratio and the
per-task overhead estimate (t_small - t_big) / (tasks_small - tasks_big), which also holds
the real extra work of small chunks (more partition files to write and to merge). Every
output is checked against the sequential oracle.

Target: >= 1000 tasks/s with tiny chunks.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from wordcount import build_input  # noqa: E402  (bench/wordcount.py)

from pdp.client import run_job  # noqa: E402
from pdp.jobs.builtin.wordcount import oracle  # noqa: E402
from pdp.local import LocalParty  # noqa: E402

BIG = 8 << 20
TARGET = 1000.0


async def timed(party: LocalParty, inp: Path, out: Path, job_id: str, chunk: int, reduces: int
                ) -> tuple[float, float, int, int]:
    """(client wall time, party time, tasks, attempts beyond one per task) of one job."""
    t0 = time.perf_counter()
    summary, _ = await run_job([party.addr(0)], party.key, "wordcount", [inp], job_id, out,
                               chunk_size=chunk, reduces=reduces)
    wall = time.perf_counter() - t0
    extra = sum(summary.get("reruns", {}).values()) + int(summary.get("backups", 0))
    return wall, summary["finished_at"] - summary["submitted_at"], summary["maps"] + summary["reduces"], extra


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=float, default=20)
    ap.add_argument("--chunk-kb", type=float, default=16, help="map chunk size of the tiny-chunk job")
    ap.add_argument("--reduces", type=int, default=3)
    ap.add_argument("--runs", type=int, default=3, help="runs of each variant (medians are printed)")
    ap.add_argument("--nodes", type=int, default=3)
    ap.add_argument("--cpus", type=int, default=1, help="task slots per node")
    args = ap.parse_args()
    small = int(args.chunk_kb * 1024)
    with tempfile.TemporaryDirectory(prefix="pdp-dispatch-") as tmp:
        root = Path(tmp)
        inp = root / "input.txt"
        size = build_input(inp, args.mb)
        expected = oracle([str(inp)])
        print(f"input {size / 1e6:.1f} MB, {args.nodes} nodes x {args.cpus} slot(s), {args.reduces} reduces; "
              f"chunks of {small // 1024} KiB vs {BIG >> 20} MiB, {args.runs} run(s) each")
        res: dict[str, list[tuple[float, float, int, int]]] = {"small": [], "big": []}
        with LocalParty(root / "party", n=args.nodes, cpus=args.cpus) as party:
            asyncio.run(party.wait_ready(60))
            asyncio.run(timed(party, inp, root / "warm.tsv", "warm", BIG, args.reduces))  # not counted
            for r in range(args.runs):
                for name, chunk in (("small", small), ("big", BIG)):
                    out = root / f"{name}{r}.tsv"
                    res[name].append(asyncio.run(timed(party, inp, out, f"{name}-{r}", chunk, args.reduces)))
                    assert out.read_bytes() == expected, f"{name} run {r}: output differs from the oracle"
                    out.unlink()
        med = {k: (statistics.median(x[0] for x in v), statistics.median(x[1] for x in v), v[0][2])
               for k, v in res.items()}
        for name in ("small", "big"):
            wall, job, tasks = med[name]
            extra = [x[3] for x in res[name]]
            print(f"{name:<5} chunks: {tasks:6d} tasks  client {wall:6.2f} s = {tasks / wall:7.1f} tasks/s   "
                  f"party {job:6.2f} s = {tasks / job:7.1f} tasks/s"
                  + (f"   (reruns + backups per run: {extra})" if any(extra) else ""))
        (ws, js, ns), (wb, jb, nb) = med["small"], med["big"]
        print(f"small / big time: client {ws / wb:.2f}, party {js / jb:.2f}")
        if ns > nb:
            print(f"per-task overhead estimate: client {(ws - wb) / (ns - nb) * 1000:.2f} ms, "
                  f"party {(js - jb) / (ns - nb) * 1000:.2f} ms per extra task")
        rate = ns / js
        print(f"dispatch rate with tiny chunks (party time): {rate:.0f} tasks/s "
              f"(target >= {TARGET:.0f}: {'met' if rate >= TARGET else 'NOT met'}); outputs identical to the oracle")


if __name__ == "__main__":
    main()
