"""Sort benchmark: the built-in `sort` job on a 3-node local party against GNU sort on one machine.

    python bench/sort.py [--mb 1024] [--nodes 3] [--cpus 1] [--chunk-mb 8] [--seed 1] [--tmp DIR]

Builds MB megabytes of ~100-byte text records, one a line: "KEY PAYLOAD\\n" with KEY 10 and
PAYLOAD 88 seeded random characters of [-0-9A-Z_a-z] (no whitespace), then times (1) GNU sort
(`LC_ALL=C sort -t ' ' -k1,1`, default buffer and threads) and (2) `sort --field 1` on a local
party of real `pdp node` processes (submit -> result file; the gateway samples the stored
input for the range cuts). The orders are the same: pdp compares text keys by code point
(byte order of UTF-8, as LC_ALL=C) and breaks ties by input, then by the whole line, as GNU
sort's last-resort comparison does without -s; so the outputs must be byte-identical, which
`cmp` checks. Prints the seconds, the ratio party / GNU, the records per reduce task (the
tasks' "records_out") and each node's peak RSS (the node process plus its task pool, sampled
every 50 ms during the party runs; the issue's target is <= 200 MB per node).
Temporary files go in a fresh directory under --tmp (default: the system's temp dir) and
are deleted at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import string
import subprocess
import tempfile
import time
from pathlib import Path


from peakrss import PeakRss
from pdp.client import Client, run_job
from pdp.local import LocalParty

RSS_TARGET = 200 * 10**6  # bytes per node (node + task pool)
KEY_LEN, PAYLOAD_LEN = 10, 88  # + " " + "\n": 100-byte records
RECORD = KEY_LEN + 1 + PAYLOAD_LEN + 1
ALPHABET = ("-" + string.digits + string.ascii_uppercase + "_" + string.ascii_lowercase).encode()  # 64, sorted
TABLE = bytes(ALPHABET[b % 64] for b in range(256))
BLOCK_RECORDS = 100_000  # 10 MB written at a time


def build_input(path: Path, mb: float, seed: int) -> tuple[int, int]:
    """Write ~mb MiB of records; returns (bytes, records). Each block is assembled column by
    column (extended slice assignment into a bytearray), so no Python loop runs per record."""
    rnd = random.Random(seed)
    records = max(1, int(mb * 1024 * 1024) // RECORD)
    written = 0
    with open(path, "wb") as f:
        while written < records:
            n = min(BLOCK_RECORDS, records - written)
            chars = rnd.randbytes(n * (KEY_LEN + PAYLOAD_LEN)).translate(TABLE)
            buf = bytearray(n * RECORD)
            col = 0
            for j in range(RECORD):
                if j == KEY_LEN:
                    buf[j::RECORD] = b" " * n
                elif j == RECORD - 1:
                    buf[j::RECORD] = b"\n" * n
                else:
                    buf[j::RECORD] = chars[col * n:(col + 1) * n]
                    col += 1
            f.write(buf)
            written += n
    return records * RECORD, records


def gnu_sort(inp: Path, out: Path, tmp: Path) -> tuple[float, int, str]:
    cmd = ["sort", "-t", " ", "-k1,1", "-T", str(tmp), "-o", str(out), str(inp)]
    env = {**os.environ, "LC_ALL": "C"}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE)
    with PeakRss({"sort": proc.pid}) as rss:
        _, err = proc.communicate()
    took = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"GNU sort failed:\n{err.decode(errors='replace')[-3000:]}")
    shown = "LC_ALL=C " + " ".join(f"'{a}'" if a == " " else a for a in cmd)
    return took, rss.peak["sort"], shown


async def party_run(party: LocalParty, inp: Path, out: Path, job_id: str, chunk: int) -> tuple[float, list[int]]:
    t0 = time.perf_counter()
    await run_job([party.addr(0)], party.key, "sort", [inp], job_id, out, args=["--field", "1"], chunk_size=chunk)
    took = time.perf_counter() - t0
    async with Client(party.addr(0), party.key) as c:
        detail = await c.job(job_id)
    reduces = sorted((t for t in detail["tasks"] if t["phase"] == "reduce"), key=lambda t: t["index"])
    return took, [int(t["stats"].get("records_out", 0)) for t in reduces]


def same_bytes(a: Path, b: Path) -> tuple[bool, str]:
    res = subprocess.run(["cmp", str(a), str(b)], capture_output=True)
    return res.returncode == 0, (res.stdout + res.stderr).decode(errors="replace").strip()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=float, default=1024, help="input size in MiB")
    ap.add_argument("--nodes", type=int, default=3)
    ap.add_argument("--cpus", type=int, default=1, help="task slots per node")
    ap.add_argument("--chunk-mb", type=float, default=8, help="the party's map chunk")
    ap.add_argument("--runs", type=int, default=1, help="party runs (the best and median are printed)")
    ap.add_argument("--seed", type=int, default=1, help="of the random records")
    ap.add_argument("--tmp", type=Path, default=None, help="where the temporary directory goes (default: /tmp)")
    args = ap.parse_args()
    if args.tmp is not None:
        args.tmp.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="pdp-bench-sort-", dir=args.tmp) as tmp:
        root = Path(tmp)
        inp = root / "input.txt"
        t0 = time.perf_counter()
        size, records = build_input(inp, args.mb, args.seed)
        t_build = time.perf_counter() - t0
        print(f"input: {size / 1e6:.1f} MB ({size} bytes, {records} records of {RECORD} bytes, seed {args.seed}, "
              f"written in {t_build:.1f} s); {args.nodes} nodes x {args.cpus} slot(s), chunks of {args.chunk_mb} MiB; "
              f"{os.cpu_count()} cores; temp dir {root}", flush=True)
        (root / "gnu-tmp").mkdir()
        gnu_out = root / "gnu.out"
        t_gnu, gnu_rss, gnu_cmd = gnu_sort(inp, gnu_out, root / "gnu-tmp")
        if gnu_out.stat().st_size != size:
            raise SystemExit(f"GNU sort wrote {gnu_out.stat().st_size} bytes of {size}")
        print(f"GNU sort                      {t_gnu:7.2f} s   peak RSS {gnu_rss / 1e6:.0f} MB   ({gnu_cmd})",
              flush=True)
        chunk = int(args.chunk_mb * 1024 * 1024)
        with LocalParty(root / "party", n=args.nodes, cpus=args.cpus) as party:
            asyncio.run(party.wait_ready(60))
            times: list[float] = []
            shares: list[int] = []
            with PeakRss({name: proc.pid for name, proc in party.procs.items()}) as rss:
                for run in range(args.runs):
                    out = root / f"party{run}.out"
                    took, shares = asyncio.run(party_run(party, inp, out, f"bench-sort-{run}", chunk))
                    times.append(took)
                    same, why = same_bytes(gnu_out, out)
                    if not same:
                        raise SystemExit(f"the party's output differs from GNU sort's: {why}")
                    out.unlink()
        times.sort()
        t_party = times[len(times) // 2]
        print(f"party, median of {len(times)} (best {times[0]:.2f} s) {t_party:7.2f} s   "
              f"ratio {t_party / t_gnu:.3f} x GNU sort")
        print("outputs byte-identical (cmp): yes")
        mean = statistics.mean(shares) if shares else 0
        print(f"reduce shares ({len(shares)} tasks, records_out): {', '.join(str(s) for s in shares)}; "
              f"sum {sum(shares)} of {records}; largest / mean {max(shares) / mean if mean else 0:.3f}")
        peaks = ", ".join(f"{n} {v / 1e6:.0f} MB" for n, v in rss.peak.items())
        worst = max(rss.peak.values())
        print(f"peak RSS per node (node + pool, every 50 ms): {peaks}; target <= {RSS_TARGET / 1e6:.0f} MB: "
              f"{'met' if worst <= RSS_TARGET else 'NOT met'}")


if __name__ == "__main__":
    main()
