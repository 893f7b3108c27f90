"""Word count party runs for before/after comparisons of two pdp versions, alternated.

    git worktree add /tmp/before <commit>
    (cd /tmp/before && PYTHONPATH=/tmp/before python /path/to/bench/wordcount_ab.py before)
    python bench/wordcount_ab.py after        # alternate the two a few times, then compare medians

Builds ~MB megabytes from ../shared/corpus (found beside this file, or at $PDP_CORPUS), starts
one 3-node local party of whichever pdp is on the path, and prints, per run, the seconds of
submit (upload), wait and fetch. It uses only the client API both versions share
(``Client.submit/wait/fetch_result`` of the built-in word count), so an older checkout runs it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from pdp.client import Client
from pdp.local import LocalParty

CORPUS = Path(os.environ.get("PDP_CORPUS") or Path(__file__).resolve().parents[2] / "shared" / "corpus")


def build_input(path: Path, mb: float) -> None:
    corpus = b"".join(p.read_bytes() for p in sorted(CORPUS.glob("*.txt")))
    if not corpus:
        raise SystemExit(f"no corpus in {CORPUS}: set PDP_CORPUS")
    with open(path, "wb") as f:
        written = 0
        while written < mb * 1024 * 1024:
            f.write(corpus)
            written += len(corpus)


async def one(party: LocalParty, inp: Path, out: Path, job_id: str, chunk: int) -> tuple[float, float, float]:
    t0 = time.perf_counter()
    async with Client(party.addr(0), party.key) as c:
        await c.submit("wordcount", [inp], job_id, chunk_size=chunk)
        t1 = time.perf_counter()
        await c.wait(job_id)
        t2 = time.perf_counter()
        await c.fetch_result(job_id, out)
    return t1 - t0, t2 - t1, time.perf_counter() - t2


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("label", help="printed on every line (before, after, ...)")
    ap.add_argument("--mb", type=float, default=100)
    ap.add_argument("--runs", type=int, default=6)
    ap.add_argument("--chunk-mb", type=float, default=8)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="pdp-ab-") as tmp:
        root = Path(tmp)
        inp = root / "in.txt"
        build_input(inp, args.mb)
        totals = []
        with LocalParty(root / "party", n=3, cpus=1) as party:
            asyncio.run(party.wait_ready(60))
            for r in range(args.runs):
                s, w, f = asyncio.run(one(party, inp, root / f"o{r}", f"ab-{r}", int(args.chunk_mb * 1024 * 1024)))
                totals.append(s + w + f)
                print(f"{args.label} submit {s:.2f} wait {w:.2f} fetch {f:.2f} total {s + w + f:.2f}", flush=True)
        print(f"{args.label} median {statistics.median(totals):.2f} best {min(totals):.2f} of {len(totals)}",
              file=sys.stderr)


if __name__ == "__main__":
    main()
