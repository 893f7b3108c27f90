"""Benchmark the word count kernel against the sequential oracle.

Usage: python bench/kernel.py [--mb 100] [--corpus DIR]

Builds a ~N MB file by repeating the corpus files' bytes, then times, in this
process, ``oracle([file])`` and ``count_file_range`` + ``format_counts`` over the
whole file, checks the outputs are identical and prints both times and the ratio.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from pdp.jobs.builtin import wordcount as wc


def build_input(corpus: Path, mb: float, out: Path) -> int:
    """Write corpus bytes repeated to about ``mb`` MB into ``out``; return the size."""
    blobs = [p.read_bytes() for p in sorted(corpus.glob("*.txt"))]
    if not blobs:
        raise SystemExit(f"no *.txt files in {corpus}")
    target, size = int(mb * 1024 * 1024), 0
    with open(out, "wb") as f:
        while size < target:
            for blob in blobs:
                f.write(blob)
                size += len(blob)
    return size


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=100.0, help="input size in MB (default 100)")
    ap.add_argument("--corpus", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "corpus")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="pdp-bench-") as tmp:
        path = Path(tmp) / "input.txt"
        size = build_input(args.corpus, args.mb, path)
        print(f"input: {size / 1e6:.1f} MB")

        t0 = time.perf_counter()
        want = wc.oracle([str(path)])
        t_oracle = time.perf_counter() - t0

        t0 = time.perf_counter()
        got = wc.format_counts(wc.count_file_range(str(path), 0, os.path.getsize(path)))
        t_fast = time.perf_counter() - t0

    assert got == want, "fast kernel output differs from the oracle"
    print(f"oracle: {t_oracle:.2f} s ({size / 1e6 / t_oracle:.1f} MB/s)")
    print(f"fast:   {t_fast:.2f} s ({size / 1e6 / t_fast:.1f} MB/s)")
    print(f"fast/oracle: {t_fast / t_oracle:.3f} (speedup {t_oracle / t_fast:.1f}x); outputs identical")


if __name__ == "__main__":
    main()
