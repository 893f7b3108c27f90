"""`pdp stats` over a large CSV on a 3-node local party against pandas' `describe` in this
process, with each node's peak RSS (the node and its task processes).

    pip install pandas          # the baseline only
    python bench/stats_csv.py [--mb 1024] [--chunk-mb 8]

The input is a generated block (seeded: 10 numeric columns of several distributions, one
text column) repeated up to the size. Prints the party's time (submit to result), pandas'
(`read_csv` + `describe`, and the text column's `value_counts`), their ratio, every node's
peak RSS, and the largest relative difference of mean and std between the two.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from peakrss import PeakRss
from pdp.client import Client
from pdp.local import LocalParty

COLUMNS = 10


def make_data(path: Path, mb: float, seed: int = 0) -> int:
    rng = np.random.default_rng(seed)
    rows = 200_000
    x = np.column_stack([rng.standard_normal(rows) * (j + 1) + j * 10 for j in range(COLUMNS // 2)]
                        + [rng.exponential(j + 1, rows) for j in range(COLUMNS - COLUMNS // 2)])
    words = np.array(["red", "green", "blue", "cyan", "magenta"])[rng.integers(0, 5, rows)]
    lines = [",".join(f"{v:.6g}" for v in row) + f",{w}" for row, w in zip(x, words)]
    block = ("\n".join(lines) + "\n").encode()
    with open(path, "wb") as f:
        f.write((",".join(f"c{j}" for j in range(COLUMNS)) + ",word\n").encode())
        written = 0
        while written < mb * 2**20:
            f.write(block)
            written += len(block)
    return path.stat().st_size


async def party_stats(party: LocalParty, data: Path, out: Path, chunk_mb: float) -> float:
    job_id = f"bench-stats-{int(time.time())}"
    t0 = time.perf_counter()
    async with Client(party.addr(0), party.key) as c:
        await c.submit("stats", [data], job_id, chunk_size=int(chunk_mb * 2**20), data_type="csv")
        await c.wait(job_id)
        seconds = time.perf_counter() - t0
        await c.fetch_result(job_id, out)
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=float, default=1024)
    ap.add_argument("--chunk-mb", type=float, default=8)  # the nodes' default chunk_mb
    opts = ap.parse_args()
    import pandas as pd

    with tempfile.TemporaryDirectory(prefix="pdp-bench-stats-") as tmp:
        root = Path(tmp)
        data = root / "data.csv"
        size = make_data(data, opts.mb)
        print(f"data: {size / 2**20:.0f} MiB of CSV", flush=True)
        t0 = time.perf_counter()
        frame = pd.read_csv(data)
        described = frame.describe()
        frame["word"].value_counts()
        pandas_seconds = time.perf_counter() - t0
        del frame
        with LocalParty(root / "party", n=3, cpus=1) as party:
            asyncio.run(party.wait_ready(60))
            with PeakRss({f"node{i + 1}": party.pid(i) for i in range(3)}) as rss:
                seconds = asyncio.run(party_stats(party, data, root / "stats.json", opts.chunk_mb))
        got = json.loads((root / "stats.json").read_text())
    worst = max(abs(got[c][k] - described[c][m]) / abs(described[c][m])
                for c in described.columns for k, m in (("mean", "mean"), ("std", "std")))
    print(f"party: {seconds:.2f} s; pandas read_csv + describe: {pandas_seconds:.2f} s; "
          f"ratio party / pandas: {seconds / pandas_seconds:.2f}")
    print("peak RSS per node (node + task processes): " + ", ".join(f"{n} {r / 2**20:.0f} MB" for n, r in rss.peak.items()))
    print(f"largest relative difference of mean/std from pandas: {worst:.1e}")


if __name__ == "__main__":
    main()
