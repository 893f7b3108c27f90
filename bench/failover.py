"""Failover benchmark: word count on a 3-node local party, undisturbed vs leader SIGKILLed halfway.

    python bench/failover.py [--mb 30] [--runs 5]

Each round runs the job once undisturbed, then once more with the leader killed at half
the undisturbed time (the client talks to a follower; every output is checked against the
oracle); the killed node is restarted before the next round. Prints each pair and the
median and worst added time.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
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


async def leader(party: LocalParty) -> int:
    for _ in range(100):
        for i in range(party.n):
            if party.alive(i):
                try:
                    if (await party.status(i))["is_leader"]:
                        return i
                except Exception:
                    pass
        await asyncio.sleep(0.1)
    raise RuntimeError("no leader")


async def one(party: LocalParty, inp: Path, out: Path, job_id: str, kill_after: float | None) -> float:
    lead = await leader(party)
    gateway = (lead + 1) % party.n
    addrs = [party.addr(gateway)] + [party.addr(i) for i in range(party.n) if i != gateway]
    t0 = time.perf_counter()
    job = asyncio.create_task(run_job(addrs, party.key, "wordcount", [inp], job_id, out, chunk_size=2 << 20))
    if kill_after is not None:
        await asyncio.sleep(kill_after)
        party.kill(lead)
    await job
    elapsed = time.perf_counter() - t0
    if kill_after is not None:
        party.start_node(lead)
        await party.wait_ready(60)
    return elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=float, default=30)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (node logs) and print its path")
    args = ap.parse_args()
    with contextlib.ExitStack() as cleanup:
        root = Path(tempfile.mkdtemp(prefix="pdp-failover-"))
        if args.keep:
            print(f"logs in {root}")
        else:
            cleanup.callback(shutil.rmtree, root, ignore_errors=True)
        inp = root / "input.txt"
        size = build_input(inp, args.mb)
        expected = oracle([str(inp)])
        print(f"input {size / 1e6:.1f} MB, 3 nodes x 1 slot, chunks of 2 MiB, {args.runs} rounds")
        added = []
        with LocalParty(root / "party", n=3, cpus=1) as party:
            asyncio.run(party.wait_ready(60))
            for r in range(args.runs):
                base = asyncio.run(one(party, inp, root / "a.tsv", f"calm-{r}", None))
                hit = asyncio.run(one(party, inp, root / "b.tsv", f"kill-{r}", base / 2))
                for name in ("a.tsv", "b.tsv"):
                    assert (root / name).read_bytes() == expected, f"round {r}: {name} differs from the oracle"
                added.append(hit - base)
                print(f"round {r}: undisturbed {base:.2f} s, leader killed at {base / 2:.2f} s: {hit:.2f} s "
                      f"(+{hit - base:.2f} s)")
        print(f"added by the leader kill: median {statistics.median(added):.2f} s, worst {max(added):.2f} s "
              f"(targets: median <= 1.5 s, worst <= 3 s); outputs identical to the oracle")


if __name__ == "__main__":
    main()
