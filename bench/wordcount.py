"""Word count benchmark: a 3-node local party against sequential runs, in the same process tree.

    python bench/wordcount.py [--mb 100] [--nodes 3] [--cpus 1] [--chunk-mb 8] [--rss-gb 0]

Builds ~MB megabytes by repeating ../shared/corpus, then times (1) the sequential oracle,
(2) the fast kernel run sequentially in this process, (3) a local party of real `pdp node`
processes (submit -> result file), checks the three outputs are identical and prints the
ratios. With --rss-gb N it also runs the party on an N GB input and reports each node's
peak RSS (the node process plus its task pool), sampled every 50 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path


from peakrss import PeakRss
from pdp.client import Client
from pdp.jobs.builtin.wordcount import count_file_range, format_counts, oracle
from pdp.local import LocalParty

CORPUS = Path(__file__).resolve().parents[2] / "shared" / "corpus"


def build_input(path: Path, mb: float) -> int:
    corpus = b"".join(p.read_bytes() for p in sorted(CORPUS.glob("*.txt")))
    if not corpus:
        raise SystemExit(f"no corpus in {CORPUS}: the benchmarks need ../shared/corpus beside the repository")
    target = int(mb * 1024 * 1024)
    with open(path, "wb") as f:
        written = 0
        while written < target:
            f.write(corpus)
            written += len(corpus)
    return written


async def party_run(party: LocalParty, inp: Path, out: Path, job_id: str, chunk: int) -> float:
    t0 = time.perf_counter()
    async with Client(party.addr(0), party.key) as c:
        await c.submit("wordcount", [inp], job_id, chunk_size=chunk)
        await c.wait(job_id)
        await c.fetch_result(job_id, out)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=float, default=100)
    ap.add_argument("--nodes", type=int, default=3)
    ap.add_argument("--cpus", type=int, default=1, help="task slots per node")
    ap.add_argument("--chunk-mb", type=float, default=8)
    ap.add_argument("--runs", type=int, default=1, help="party runs (the best and median are printed)")
    ap.add_argument("--rss-gb", type=float, default=0, help="also measure peak RSS per node on this many GB")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="pdp-bench-") as tmp:
        root = Path(tmp)
        inp = root / "input.txt"
        size = build_input(inp, args.mb)
        print(f"input: {size / 1e6:.1f} MB ({size} bytes), {args.nodes} nodes x {args.cpus} slot(s), "
              f"chunks of {args.chunk_mb} MiB")
        t0 = time.perf_counter()
        expected = oracle([str(inp)])
        t_oracle = time.perf_counter() - t0
        t0 = time.perf_counter()
        fast = format_counts(count_file_range(str(inp), 0, size))
        t_fast = time.perf_counter() - t0
        assert fast == expected, "fast kernel differs from the oracle"
        chunk = int(args.chunk_mb * 1024 * 1024)
        with LocalParty(root / "party", n=args.nodes, cpus=args.cpus) as party:
            asyncio.run(party.wait_ready(60))
            times = []
            for run in range(args.runs):
                out = root / f"out{run}.tsv"
                times.append(asyncio.run(party_run(party, inp, out, f"bench-{run}", chunk)))
                assert out.read_bytes() == expected, "party output differs from the oracle"
            times.sort()
            t_party = times[len(times) // 2]
            print(f"oracle (sequential, str)      {t_oracle:7.2f} s")
            print(f"fast kernel, one process      {t_fast:7.2f} s   ratio {t_fast / t_oracle:.3f} x oracle")
            print(f"party, median of {len(times)} (best {times[0]:.2f} s) {t_party:7.2f} s   "
                  f"ratio {t_party / t_oracle:.3f} x oracle, {t_party / t_fast:.3f} x fast sequential")
            print("outputs identical: yes")
            if args.rss_gb:
                big = root / "big.txt"
                inp.unlink()
                bsize = build_input(big, args.rss_gb * 1024)
                with PeakRss({name: proc.pid for name, proc in party.procs.items()}) as rss:
                    t_big = asyncio.run(party_run(party, big, root / "big.tsv", "bench-rss", chunk))
                peaks = ", ".join(f"{n} {v / 2**20:.0f} MiB" for n, v in rss.peak.items())
                print(f"{bsize / 1e9:.2f} GB input in {t_big:.1f} s; peak RSS per node (node + pool): {peaks}")


if __name__ == "__main__":
    main()
