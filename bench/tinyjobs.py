"""Tiny-job latency: a burst of small word counts from several submitters at once on a warm party.

    python bench/tinyjobs.py [--jobs 500] [--submitters 3] [--nodes 3] [--cpus 1] [--kb 1] [--reduces 0]

Starts a local party of real `pdp node` processes, warms it up with 10 jobs (not counted),
then times a solo baseline (the median of 20 jobs run one after another, one in flight) and
the burst: JOBS jobs of ~KB kilobytes each (every one a different text), split between
SUBMITTERS submitters (users user1, user2, ..., each with its own credential), each an asyncio task
talking to its own member and running its share back-to-back with ``run_job``. A job's
latency is the time from calling ``run_job`` to its output file being written and checked
against the party's SHA-256. Prints jobs/s and p50/p90/p99 latency per submitter and overall,
the ratio burst p50 / solo p50, the solo latency again after the burst, and where a burst
job's time goes (from the job's own timestamps: upload, commit + run, notify, fetch).
Every output is compared with the sequential oracle after the timing.

Target: burst p50 <= 50 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from wordcount import CORPUS  # noqa: E402  (bench/wordcount.py)

from pdp.client import run_job  # noqa: E402
from pdp.jobs.builtin.wordcount import oracle  # noqa: E402
from pdp.local import LocalParty  # noqa: E402

TARGET_P50 = 0.050


def corpus_words() -> list[str]:
    text = "".join(p.read_text(encoding="utf-8") for p in sorted(CORPUS.glob("*.txt")))
    words = text.split()
    if not words:
        raise SystemExit(f"no corpus in {CORPUS}: the benchmarks need ../shared/corpus beside the repository")
    return words


def tag(i: int) -> str:
    """A word unique to job ``i`` (letters only, so it is counted as one word)."""
    letters = ""
    while True:
        i, r = divmod(i, 26)
        letters += chr(ord("a") + r)
        if i == 0:
            return "zq" + letters


def make_inputs(root: Path, n: int, kb: float, seed: int = 7) -> list[Path]:
    """``n`` files of ~``kb`` KiB: random corpus words (with their punctuation), each with its own tag."""
    words, rng, size = corpus_words(), random.Random(seed), int(kb * 1024)
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        parts, used = [tag(i)], len(tag(i))
        while True:
            w = rng.choice(words)
            if used + 1 + len(w.encode()) > size:
                break
            parts.append(w)
            used += 1 + len(w.encode())
        path = root / f"in{i:05d}.txt"
        path.write_text(" ".join(parts) + "\n", encoding="utf-8")
        paths.append(path)
    return paths


@dataclass
class Run:
    submitter: str
    inp: Path
    out: Path
    latency: float = 0.0
    t0: float = 0.0  # wall clock (time.time) when run_job was called
    done_seen: float = 0.0  # wall clock when the "done" frame arrived
    t_end: float = 0.0
    summary: dict[str, Any] = field(default_factory=dict)


async def one(party: LocalParty, member: int, run: Run, job_id: str, form: dict[str, Any]) -> None:
    addrs = [party.addr(member)] + [party.addr(i) for i in range(party.n) if i != member]

    def progress(hdr: dict[str, Any]) -> None:
        if hdr["t"] == "done":
            run.done_seen = time.time()

    run.t0 = time.time()
    t0 = time.perf_counter()
    cred = party.cred(run.submitter) if run.submitter in party.users else party.key  # each submitter: a user
    run.summary, _ = await run_job(addrs, cred, "wordcount", [run.inp], job_id, run.out, progress, **form)
    run.latency = time.perf_counter() - t0
    run.t_end = time.time()


async def sequential(party: LocalParty, runs: list[Run], prefix: str, form: dict[str, Any]) -> None:
    for k, run in enumerate(runs):
        await one(party, 0, run, f"{prefix}-{k}", form)


async def burst(party: LocalParty, shares: dict[str, list[Run]], form: dict[str, Any]) -> float:
    async def submitter(s: int, name: str, runs: list[Run]) -> None:
        for k, run in enumerate(runs):
            await one(party, s % party.n, run, f"burst-{name}-{k}", form)

    t0 = time.perf_counter()
    await asyncio.gather(*(submitter(s, name, runs) for s, (name, runs) in enumerate(shares.items())))
    return time.perf_counter() - t0


def pct(xs: list[float], p: float) -> float:
    """Nearest-rank percentile."""
    xs = sorted(xs)
    return xs[max(0, min(len(xs) - 1, math.ceil(p / 100 * len(xs)) - 1))]


def row(label: str, runs: list[Run], wall: float) -> str:
    lat = [r.latency * 1000 for r in runs]
    return (f"{label:<8} {len(runs):5d} {len(runs) / wall:8.1f} {pct(lat, 50):8.1f} {pct(lat, 90):8.1f} "
            f"{pct(lat, 99):8.1f} {max(lat):8.1f}")


def breakdown(runs: list[Run]) -> str:
    """Median time per phase, from the client's clock and the job's own timestamps (same machine)."""
    phases = {
        "upload (dial, send, mirror)": [r.summary["submitted_at"] - r.t0 for r in runs],
        "commit + schedule + run + merge": [r.summary["finished_at"] - r.summary["submitted_at"] for r in runs],
        "notify (done -> client)": [r.done_seen - r.summary["finished_at"] for r in runs if r.done_seen],
        "fetch": [r.t_end - r.done_seen for r in runs if r.done_seen],
    }
    return ", ".join(f"{k} {statistics.median(v) * 1000:.1f} ms" for k, v in phases.items() if v)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=500)
    ap.add_argument("--submitters", type=int, default=3)
    ap.add_argument("--nodes", type=int, default=3)
    ap.add_argument("--cpus", type=int, default=1, help="task slots per node")
    ap.add_argument("--kb", type=float, default=1, help="size of each job's input")
    ap.add_argument("--warm", type=int, default=10, help="warm-up jobs (not counted)")
    ap.add_argument("--solo", type=int, default=20, help="sequential jobs for the solo baseline")
    ap.add_argument("--reduces", type=int, default=0, help="reduce tasks per job (0: the party's default)")
    args = ap.parse_args()
    form = {"reduces": args.reduces} if args.reduces else {}
    with tempfile.TemporaryDirectory(prefix="pdp-tiny-") as tmp:
        root = Path(tmp)
        n_in = args.warm + 2 * args.solo + args.jobs
        paths = make_inputs(root / "in", n_in, args.kb)
        runs = [Run("", p, root / "out" / f"{p.stem}.tsv") for p in paths]
        (root / "out").mkdir()
        warm, solo, after, bursty = (runs[:args.warm], runs[args.warm:args.warm + args.solo],
                                     runs[args.warm + args.solo:args.warm + 2 * args.solo],
                                     runs[args.warm + 2 * args.solo:])
        names = [f"user{s + 1}" for s in range(args.submitters)]
        for r in warm + solo + after:
            r.submitter = "solo"
        shares: dict[str, list[Run]] = {n: [] for n in names}
        for i, r in enumerate(bursty):
            r.submitter = names[i % len(names)]
            shares[r.submitter].append(r)
        print(f"{args.nodes} nodes x {args.cpus} slot(s); {args.jobs} jobs of ~{args.kb:g} KiB from "
              f"{args.submitters} submitters, each through its own member; {args.warm} warm-up jobs")
        with LocalParty(root / "party", n=args.nodes, cpus=args.cpus, users=tuple(names)) as party:
            asyncio.run(party.wait_ready(60))
            asyncio.run(sequential(party, warm, "warm", form))
            asyncio.run(sequential(party, solo, "solo", form))
            wall = asyncio.run(burst(party, shares, form))
            asyncio.run(sequential(party, after, "after", form))
        solo_p50 = pct([r.latency for r in solo], 50)
        after_p50 = pct([r.latency for r in after], 50)
        print(f"solo baseline: p50 of {len(solo)} sequential jobs {solo_p50 * 1000:.1f} ms")
        print(f"burst: {len(bursty)} jobs in {wall:.2f} s = {len(bursty) / wall:.1f} jobs/s")
        print(f"{'':<8} {'jobs':>5} {'jobs/s':>8} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'max ms':>8}")
        for name, share in shares.items():
            print(row(name, share, max(r.t_end for r in share) - min(r.t0 for r in share)))
        print(row("all", bursty, wall))
        burst_p50 = pct([r.latency for r in bursty], 50)
        print(f"burst p50 / solo p50 = {burst_p50 / solo_p50:.2f}; burst p50 {burst_p50 * 1000:.1f} ms "
              f"(target <= {TARGET_P50 * 1000:.0f} ms: {'met' if burst_p50 <= TARGET_P50 else 'NOT met'})")
        print(f"solo again after the burst: p50 of {len(after)} {after_p50 * 1000:.1f} ms "
              f"({after_p50 / solo_p50:.2f} x before)")
        print(f"where a burst job's time goes (medians): {breakdown(bursty)}")
        print(f"where a solo job's time goes (medians):  {breakdown(solo)}")
        for r in runs:
            assert r.out.read_bytes() == oracle([str(r.inp)]), f"{r.out.name} differs from the oracle"
            assert r.summary["form"]["submitter"] == r.submitter, f"{r.out.name}: submitter {r.summary['form']}"
        print(f"outputs identical to the oracle: {len(runs)}/{len(runs)}; submitters recorded as given")


if __name__ == "__main__":
    main()
