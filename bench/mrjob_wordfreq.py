"""mrjob's own word frequency example, unmodified: mrjob's local runner against a pdp party.

    python bench/mrjob_wordfreq.py [--mb 20] [--nodes 3] [--cpus 1] [--chunk-mb 8] [--runs 1]

Builds ~MB megabytes by repeating ../shared/corpus, then times (1) mrjob's `-r local` runner
(`python mr_word_freq_count.py -r local INPUT`: a subprocess per task, on every core) and
(2) `pdp submit mr_word_freq_count.py INPUT` on a local party of real `pdp node` processes with
allow_code = true, the same file as it ships with mrjob (submit -> result file, CLI start-up
included on both sides). Checks the outputs are the same lines (pdp sorts them by key,
mrjob by reducer) and prints the ratio pdp / mrjob-local. Target: <= 0.20.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mrjob

from pdp.local import LocalParty

sys.path.insert(0, str(Path(__file__).resolve().parent))
from wordcount import build_input  # noqa: E402  (the same input as the word count benchmark)
JOB = Path(mrjob.__file__).resolve().parent / "examples" / "mr_word_freq_count.py"
TARGET = 0.20


def timed(cmd: list[str], out: Path, env: dict[str, str], cwd: Path) -> float:
    t0 = time.perf_counter()
    with open(out, "wb") as f:
        res = subprocess.run(cmd, stdout=f, stderr=subprocess.PIPE, env=env, cwd=cwd)
    took = time.perf_counter() - t0
    if res.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:4])} ... failed:\n{res.stderr.decode(errors='replace')[-3000:]}")
    return took


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=float, default=20)
    ap.add_argument("--nodes", type=int, default=3)
    ap.add_argument("--cpus", type=int, default=1, help="task slots per node")
    ap.add_argument("--chunk-mb", type=float, default=8, help="the party's map chunk (chunk_mb of the nodes)")
    ap.add_argument("--runs", type=int, default=1, help="party runs (the best and median are printed)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="pdp-bench-mrjob-") as tmp:
        root = Path(tmp)
        (root / "tmp").mkdir()
        env = {**os.environ, "TMPDIR": str(root / "tmp")}  # mrjob's task files go in here too
        inp = root / "input.txt"
        size = build_input(inp, args.mb)
        print(f"input: {size / 1e6:.1f} MB ({size} bytes); job: {JOB.name} (unmodified, mrjob {mrjob.__version__}); "
              f"party: {args.nodes} nodes x {args.cpus} slot(s), chunks of {args.chunk_mb} MiB; "
              f"{os.cpu_count()} cores")
        mr_out = root / "mrjob.out"
        t_mrjob = timed([sys.executable, str(JOB), "-r", "local", "--no-conf", str(inp)], mr_out, env, root)
        print(f"mrjob -r local                {t_mrjob:7.2f} s", flush=True)
        expected = sorted(mr_out.read_bytes().splitlines())
        settings = {"allow_code": True, "chunk_mb": args.chunk_mb}
        with LocalParty(root / "party", n=args.nodes, cpus=args.cpus, settings=settings) as party:
            asyncio.run(party.wait_ready(60))
            env["PDP_KEY_FILE"] = str(party.key_file)
            times, info = [], {}
            for run in range(args.runs):
                out = root / f"pdp{run}.out"
                t0 = time.perf_counter()
                res = subprocess.run([sys.executable, "-m", "pdp", "submit", str(JOB), str(inp), "-o", str(out),
                                      "--node", party.addr(run % party.n), "--json"],
                                     capture_output=True, env=env, cwd=root)
                times.append(time.perf_counter() - t0)
                if res.returncode != 0:
                    raise SystemExit(f"pdp submit failed:\n{res.stderr.decode(errors='replace')[-3000:]}")
                info = json.loads(res.stdout)
                lines = out.read_bytes().splitlines()
                assert sorted(lines) == expected, "the party's output differs from mrjob's"
                assert lines == sorted(lines, key=lambda line: json.loads(line.split(b"\t")[0])), "not sorted by key"
        times.sort()
        t_pdp = times[len(times) // 2]
        ratio = t_pdp / t_mrjob
        done_on = ", ".join(f"{n} {k}" for n, k in sorted(info.get("done_on", {}).items()))
        print(f"pdp party, median of {len(times)} (best {times[0]:.2f} s) {t_pdp:7.2f} s   "
              f"ratio {ratio:.3f} x mrjob local (target <= {TARGET:.2f}: {'met' if ratio <= TARGET else 'NOT met'})")
        print(f"party tasks done on: {done_on}; party's own clock {info.get('seconds')} s")
        print(f"outputs identical as sorted lines: yes ({len(expected)} lines)")


if __name__ == "__main__":
    main()
