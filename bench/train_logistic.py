"""`pdp train logistic` on a 3-node local party against scikit-learn's LogisticRegression in
this process, on the same generated data (seeded) and the same penalty and tolerance.

    python bench/train_logistic.py [--rows 1000000] [--features 20] [--chunk-mb 16] [--tol 1e-4]

Prints the party's total time (submit to model file), its time per round (from the job's
replicated events) and scikit-learn's fit time (lbfgs on the arrays already in memory, so
it is not charged for reading the CSV that the party parses), and their ratio; the time one
process takes to read the CSV (pandas, else numpy) and the ratio to reading plus fitting; then the
largest coefficient difference between the models (and from a scikit-learn fit converged
to tol 1e-10: lbfgs at the same tol stops well before Newton's rounds do).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from pdp.client import Client
from pdp.local import LocalParty


def make_data(path: Path, rows: int, features: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, features))
    w = rng.standard_normal(features)
    y = (x @ w + 0.5 * rng.standard_normal(rows) > 0).astype(int)
    with open(path, "w", encoding="utf-8") as f:
        f.write(",".join([*(f"x{i}" for i in range(features)), "y"]) + "\n")
        block = 100_000
        for k in range(0, rows, block):
            body = np.column_stack([x[k:k + block], y[k:k + block]])
            lines = ["," .join(f"{v:.6f}" for v in row[:-1]) + f",{int(row[-1])}" for row in body]
            f.write("\n".join(lines) + "\n")
    return x, y


def read_time(data: Path) -> tuple[str, float]:
    """How long one process takes to read the CSV into arrays (pandas if installed, else
    numpy's loadtxt): what scikit-learn's user pays before the fit, and the party's scan does."""
    t0 = time.perf_counter()
    try:
        import pandas

        pandas.read_csv(data).to_numpy()
        return "pandas.read_csv", time.perf_counter() - t0
    except ImportError:
        np.loadtxt(data, delimiter=",", skiprows=1)
        return "numpy.loadtxt", time.perf_counter() - t0


async def party_fit(party: LocalParty, data: Path, out: Path, chunk_mb: float, tol: float
                    ) -> tuple[float, float, list[float]]:
    job_id = f"bench-train-{int(time.time())}"
    t0 = time.perf_counter()
    async with Client(party.addr(0), party.key) as c:
        await c.submit("train", [data], job_id, args=["--algorithm", "logistic", "--target", "y",
                                                       "--param", f"tol={tol}"],
                       chunk_size=int(chunk_mb * 1024 * 1024), data_type="csv")
        uploaded = time.perf_counter() - t0
        await c.wait(job_id)
        total = time.perf_counter() - t0
        await c.fetch_result(job_id, out)
        _, events = await c.events(job_id)
    times = [e["time"] for e in events if e["kind"] in ("submitted", "round", "done")]
    return total, uploaded, [b - a for a, b in zip(times, times[1:])]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--features", type=int, default=20)
    ap.add_argument("--chunk-mb", type=float, default=16.0)
    ap.add_argument("--tol", type=float, default=1e-4)
    opts = ap.parse_args()
    from sklearn.linear_model import LogisticRegression

    with tempfile.TemporaryDirectory(prefix="pdp-bench-train-") as tmp:
        root = Path(tmp)
        data = root / "data.csv"
        x, y = make_data(data, opts.rows, opts.features)
        print(f"data: {opts.rows} rows x {opts.features} features, {data.stat().st_size / 2**20:.0f} MiB of CSV",
              flush=True)
        t0 = time.perf_counter()
        ref = LogisticRegression(C=1.0, tol=opts.tol, max_iter=1000).fit(x, y)
        sk = time.perf_counter() - t0
        reader, read = read_time(data)
        with LocalParty(root / "party", n=3, cpus=1) as party:
            asyncio.run(party.wait_ready(60))
            total, uploaded, rounds = asyncio.run(party_fit(party, data, root / "model.json", opts.chunk_mb,
                                                            opts.tol))
        model = json.loads((root / "model.json").read_text())
    coef = np.array(model["coef"][0] + model["intercept"])
    theirs = np.concatenate([ref.coef_[0], ref.intercept_])
    print(f"party: {total:.2f} s: upload {uploaded:.2f} s, the scan round and {model['rounds']} fit rounds (s): "
          + " ".join(f"{r:.2f}" for r in rounds))
    print(f"scikit-learn lbfgs: {sk:.2f} s ({ref.n_iter_[0]} iterations)")
    print(f"ratio party / scikit-learn: {total / sk:.2f}")
    print(f"reading the CSV into arrays ({reader}): {read:.2f} s; party / (read + fit): {total / (read + sk):.2f}")
    tight = LogisticRegression(C=1.0, tol=1e-10, max_iter=10000).fit(x, y)
    exact = np.concatenate([tight.coef_[0], tight.intercept_])
    print(f"largest coefficient difference from scikit-learn at tol {opts.tol:g}: {np.max(np.abs(coef - theirs)):.2e}, "
          f"at tol 1e-10 (converged): {np.max(np.abs(coef - exact)):.2e} (coefficients up to "
          f"{np.max(np.abs(exact)):.2f})")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
