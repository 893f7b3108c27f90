"""Straggler benchmark: word count with one member slowed by a SIGSTOP/SIGCONT duty cycle, backups off vs on.

    python bench/straggler.py [--mb 30] [--stop-ms 800] [--period-ms 1000] [--runs 3] [--chunk-mb 2]

Two local parties of 3 real `pdp node` processes (1 slot each, dead_after = 5 s and
stall_after = 60 s so the slowed member is never declared dead), one with the node setting
``backup_tasks = false`` and one with ``backup_tasks = true``. In each round, on each party,
the job runs once undisturbed and once with a member that is not the Raft leader slowed: a
thread sends SIGSTOP to its node process and every task-pool process under it, then SIGCONT
STOP_MS later, every PERIOD_MS (stopped 80% of the time by default); SIGCONT is always sent
in a finally block. The client talks to the third member. Prints every run, then the medians
of (a) undisturbed (backups on), (b) slowed with backups off, (c) slowed with backups on and
the ratios (b)/(a), (c)/(a); also the undisturbed time with backups off (a backup policy
should not slow a calm party), the backups started, and any Raft elections the duty cycle
caused. Every output is checked against the sequential oracle.

Target: (c)/(a) well below (b)/(a), ideally <= 1.5.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))

from wordcount import build_input  # noqa: E402  (bench/wordcount.py)

from pdp.client import run_job  # noqa: E402
from pdp.jobs.builtin.wordcount import oracle  # noqa: E402
from pdp.local import LocalParty  # noqa: E402


def tree(pid: int) -> list[psutil.Process]:
    """The node process and every process under it (its task pool)."""
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return []


def send(procs: list[psutil.Process], sig: int) -> None:
    for p in procs:
        try:
            p.send_signal(sig)
        except psutil.Error:
            pass


class DutyCycle:
    """Stop a node (and its pool) for ``stop`` seconds of every ``period``; SIGCONT on the way out."""

    def __init__(self, pid: int, stop: float, period: float) -> None:
        self.pid, self.stop_s, self.period = pid, stop, period
        self.halt = threading.Event()
        self.cycles = 0
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        stopped: list[psutil.Process] = []
        try:
            while not self.halt.is_set():
                stopped = tree(self.pid)  # listed afresh: the pool may have replaced a process
                send(stopped, signal.SIGSTOP)
                self.halt.wait(self.stop_s)
                send(stopped + tree(self.pid), signal.SIGCONT)
                stopped = []
                self.cycles += 1
                self.halt.wait(self.period - self.stop_s)
        finally:
            send(stopped + tree(self.pid), signal.SIGCONT)

    def __enter__(self) -> DutyCycle:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.halt.set()
        self.thread.join()
        send(tree(self.pid), signal.SIGCONT)  # once more, whatever the thread was doing


async def roles(party: LocalParty) -> tuple[int, int, int]:
    """(leader, slowed, gateway) indexes: the slowed member and the gateway are followers."""
    await party.wait_ready(60)
    leader = party.names.index((await party.status(0))["leader"])
    followers = [i for i in range(party.n) if i != leader]
    return leader, followers[0], followers[-1]


async def term(party: LocalParty, i: int) -> int:
    return int((await party.status(i))["term"])


def one(party: LocalParty, inp: Path, out: Path, job_id: str, chunk: int, slow: tuple[float, float] | None
        ) -> dict[str, Any]:
    leader, slowed, gateway = asyncio.run(roles(party))
    term0 = asyncio.run(term(party, gateway))
    addrs = [party.addr(gateway), party.addr(leader)]
    t0 = time.perf_counter()
    if slow is None:
        summary, _ = asyncio.run(run_job(addrs, party.key, "wordcount", [inp], job_id, out, chunk_size=chunk))
    else:
        with DutyCycle(party.pid(slowed), *slow):
            summary, _ = asyncio.run(run_job(addrs, party.key, "wordcount", [inp], job_id, out, chunk_size=chunk))
    elapsed = time.perf_counter() - t0
    asyncio.run(party.wait_ready(60))
    return {"time": elapsed, "slowed": party.names[slowed] if slow else "", "backups": summary.get("backups", "?"),
            "done_on": summary.get("done_on", {}), "reruns": summary.get("reruns", {}),
            "elections": asyncio.run(term(party, gateway)) - term0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=float, default=30)
    ap.add_argument("--stop-ms", type=float, default=800)
    ap.add_argument("--period-ms", type=float, default=1000)
    ap.add_argument("--runs", type=int, default=3, help="rounds (medians are printed)")
    ap.add_argument("--chunk-mb", type=float, default=2)
    args = ap.parse_args()
    if not 0 < args.stop_ms < args.period_ms:
        raise SystemExit("need 0 < --stop-ms < --period-ms")
    slow = (args.stop_ms / 1000, args.period_ms / 1000)
    chunk = int(args.chunk_mb * 1024 * 1024)
    with tempfile.TemporaryDirectory(prefix="pdp-straggler-") as tmp:
        root = Path(tmp)
        inp = root / "input.txt"
        size = build_input(inp, args.mb)
        expected = oracle([str(inp)])
        print(f"input {size / 1e6:.1f} MB, 3 nodes x 1 slot, chunks of {args.chunk_mb:g} MiB; slowed member stopped "
              f"{args.stop_ms:g} ms of every {args.period_ms:g} ms; {args.runs} round(s)")
        times: dict[str, list[float]] = {}
        for backups in (False, True):
            settings = {"dead_after": 5.0, "stall_after": 60.0, "backup_tasks": backups}
            with LocalParty(root / f"party-{backups}", n=3, cpus=1, settings=settings) as party:
                asyncio.run(party.wait_ready(60))
                one(party, inp, root / "warm.tsv", "warm", chunk, None)  # not counted
                for r in range(args.runs):
                    for label, s in (("undisturbed", None), ("slowed", slow)):
                        out = root / "out.tsv"
                        res = one(party, inp, out, f"{label}-{r}", chunk, s)
                        assert out.read_bytes() == expected, f"{label} run {r}: output differs from the oracle"
                        out.unlink()
                        key = f"{label}, backups {'on' if backups else 'off'}"
                        times.setdefault(key, []).append(res["time"])
                        where = ", ".join(f"{n} {k}" for n, k in sorted(res["done_on"].items()))
                        print(f"  {key:<26} {res['time']:7.2f} s  " + (f"slowed {res['slowed']}, " if s else "")
                              + f"backups started {res['backups']}, tasks done on: {where}"
                              + (f"; reruns {res['reruns']}" if res["reruns"] else "")
                              + (f"; {res['elections']} Raft term change(s)" if res["elections"] else ""))
        med = {k: statistics.median(v) for k, v in times.items()}
        a, a_off = med["undisturbed, backups on"], med["undisturbed, backups off"]
        b, c = med["slowed, backups off"], med["slowed, backups on"]
        print(f"(a) undisturbed           {a:7.2f} s   (backups off: {a_off:.2f} s, {a_off / a:.2f} x)")
        print(f"(b) slowed, backups off   {b:7.2f} s   (b)/(a) = {b / a:.2f}")
        print(f"(c) slowed, backups on    {c:7.2f} s   (c)/(a) = {c / a:.2f}")
        print("outputs identical to the oracle")


if __name__ == "__main__":
    main()
