"""Training data over a real 3-node party, through the real CLI (`pdp stats`, `pdp train`,
`pdp predict`), against numpy and scikit-learn on the small datasets scikit-learn ships
(iris, wine, breast cancer, diabetes, digits: no download), written to CSV and JSON Lines
and cut into many chunks. Then the same model whatever the chunk size, and the same model
when a member dies mid-round and the leader between rounds."""

from __future__ import annotations

import asyncio
import csv
import itertools
import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest

sklearn = pytest.importorskip("sklearn")
from sklearn import datasets  # noqa: E402
from sklearn.cluster import KMeans  # noqa: E402
from sklearn.linear_model import LogisticRegression, Ridge  # noqa: E402
from sklearn.naive_bayes import GaussianNB, MultinomialNB  # noqa: E402

from pdp.local import LocalParty  # noqa: E402
from pdp.train.stats import RANK_ERROR  # noqa: E402
from conftest import ready_party  # noqa: E402
from test_chaos import leader_index, wait_until  # noqa: E402

CHUNK = "0.004"  # MiB: 4 KiB chunks, dozens of maps per round on these datasets


@pytest.fixture(scope="module")
def party(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalParty]:
    with ready_party(tmp_path_factory.mktemp("trainparty"), n=3, cpus=1) as p:
        yield p


def write_csv(path: Path, x: np.ndarray, y: np.ndarray | None, names: list[str], target: str = "target") -> Path:
    with open(path, "w", encoding="utf-8", newline="") as f:
        f.write(",".join(names + ([target] if y is not None else [])) + "\r\n")
        for k, row in enumerate(x):
            cells = [repr(float(v)) for v in row] + ([str(y[k])] if y is not None else [])
            f.write(",".join(cells) + "\r\n")
    return path


def write_jsonl(path: Path, x: np.ndarray, y: np.ndarray, names: list[str], target: str = "target") -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for row, label in zip(x, y):
            f.write(json.dumps({**{n: float(v) for n, v in zip(names, row)}, target: int(label)}) + "\n")
    return path


def standardized(x: np.ndarray) -> np.ndarray:
    return (x - x.mean(axis=0)) / x.std(axis=0)


def pdp(party: LocalParty, *args: str, node: int = 0, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    """The real CLI with the admin's credential at member ``node`` (before any `--` and job arguments)."""
    split = args.index("--") if "--" in args else len(args)
    where = ["--node", party.addr(node), "--key-file", str(party.key_file)]
    return subprocess.run([sys.executable, "-m", "pdp", *args[:split], *where, *args[split:]], capture_output=True,
                          text=True, timeout=timeout)


def train(party: LocalParty, tmp: Path, algorithm: str, data: Path, *args: str, chunk: str = CHUNK,
          node: int = 0) -> dict[str, Any]:
    out = tmp / f"{algorithm}-{data.stem}-{chunk}.json"
    done = pdp(party, "train", algorithm, str(data), "-o", str(out), "--chunk-mb", chunk, *args, node=node)
    assert done.returncode == 0, done.stderr
    return dict(json.loads(out.read_text()))


def predictions(party: LocalParty, tmp: Path, model: dict[str, Any], data: Path) -> list[dict[str, Any]]:
    path, out = tmp / "model-for-predict.json", tmp / "predictions.jsonl"
    path.write_text(json.dumps(model))
    done = pdp(party, "predict", str(path), str(data), "-o", str(out), "--chunk-mb", CHUNK)
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in out.read_text().splitlines()]


def rel(a: Any, b: Any) -> float:
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    return float(np.max(np.abs(a - b)) / max(1e-300, float(np.max(np.abs(b)))))


# -- stats ------------------------------------------------------------------------------------


def test_stats_are_exact_and_quantiles_within_the_rank_error(party: LocalParty, tmp_path: Path) -> None:
    d = datasets.load_diabetes()
    path = tmp_path / "diabetes.csv"
    x = d.data.copy()
    with open(path, "w", encoding="utf-8") as f:  # plus a text column and a column with gaps
        f.write(",".join(d.feature_names) + ",target,group,gappy\n")
        for k, row in enumerate(x):
            gap = "" if k % 7 == 0 else repr(float(k) * 1.5)
            f.write(",".join(repr(float(v)) for v in row) + f",{d.target[k]},g{k % 3},{gap}\n")
    done = pdp(party, "stats", str(path), "--json", "--chunk-mb", CHUNK)
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout)
    assert list(got)[:len(d.feature_names)] == list(d.feature_names)
    n = len(x)
    for j, name in enumerate(d.feature_names + ["target"]):
        col = d.target.astype(float) if name == "target" else x[:, j]
        s = got[name]
        assert (s["count"], s["missing"]) == (n, 0)
        for key, want in (("mean", col.mean()), ("std", col.std(ddof=1)), ("min", col.min()), ("max", col.max())):
            # relative to the column's scale (diabetes is centred: its means are ~1e-19)
            assert abs(s[key] - want) <= 1e-12 * max(abs(want), col.std()), (name, key, s[key], want)
        ordered = np.sort(col)
        for q, value in s["quantiles"].items():  # (with ties a value's ranks are a range)
            low, high = (np.searchsorted(ordered, value, side=side) / n for side in ("left", "right"))
            assert low - RANK_ERROR - 1.0 / n <= float(q) <= high + RANK_ERROR + 1.0 / n, (name, q, value, low, high)
    gappy = np.array([k * 1.5 for k in range(n) if k % 7])
    assert got["gappy"]["missing"] == sum(1 for k in range(n) if k % 7 == 0)
    assert abs(got["gappy"]["mean"] - gappy.mean()) <= 1e-12 * gappy.mean()
    assert got["group"]["type"] == "text" and {v for v, _ in got["group"]["top"]} == {"g0", "g1", "g2"}
    table = pdp(party, "stats", str(path), "--chunk-mb", CHUNK)
    assert table.returncode == 0 and "gappy" in table.stdout and "bmi" in table.stdout


# -- models ------------------------------------------------------------------------------------


def test_linear_matches_lstsq_and_ridge(party: LocalParty, tmp_path: Path) -> None:
    d = datasets.load_diabetes()
    data = write_csv(tmp_path / "diabetes.csv", d.data, d.target, list(d.feature_names))
    model = train(party, tmp_path, "linear", data, "--target", "target")
    a = np.column_stack([d.data, np.ones(len(d.data))])
    want = np.linalg.lstsq(a, d.target.astype(float), rcond=None)[0]
    assert rel(model["coef"][0] + model["intercept"], want) <= 1e-8
    assert model["rows"] == len(d.data) and model["features"] == list(d.feature_names)
    ridge = train(party, tmp_path, "linear", data, "--target", "target", "--param", "alpha=1.0")
    ref = Ridge(alpha=1.0).fit(d.data, d.target)
    assert rel(ridge["coef"][0], ref.coef_) <= 1e-8 and rel(ridge["intercept"], [ref.intercept_]) <= 1e-8


@pytest.mark.parametrize("dataset,fmt", [("breast_cancer", "csv"), ("iris", "jsonl")])
def test_logistic_matches_scikit_learn(party: LocalParty, tmp_path: Path, dataset: str, fmt: str) -> None:
    d = getattr(datasets, f"load_{dataset}")()
    names = [f"f{j}" for j in range(d.data.shape[1])]
    x = standardized(d.data)
    data = (write_csv if fmt == "csv" else write_jsonl)(tmp_path / f"{dataset}.{fmt}", x, d.target, names)
    model = train(party, tmp_path, "logistic", data, "--target", "target", "--param", "tol=1e-10",
                  "--param", "max_iter=200")
    ref = LogisticRegression(C=1.0, tol=1e-10, max_iter=10000).fit(x, d.target)
    assert rel(model["coef"], ref.coef_) <= 1e-4 and rel(model["intercept"], ref.intercept_) <= 1e-4
    assert model["classes"] == [str(c) for c in ref.classes_] and model["rounds"] > 2
    got = predictions(party, tmp_path, model, data)
    assert len(got) == len(x)  # one line per record, in input order
    assert [int(g["prediction"]) for g in got] == list(ref.predict(x))
    probs = np.array([[g["probabilities"][str(c)] for c in ref.classes_] for g in got])
    assert np.max(np.abs(probs - ref.predict_proba(x))) <= 1e-4


def test_naive_bayes_matches_scikit_learn(party: LocalParty, tmp_path: Path) -> None:
    wine = datasets.load_wine()
    names = [f"f{j}" for j in range(wine.data.shape[1])]
    gauss = train(party, tmp_path, "naive-bayes", write_csv(tmp_path / "wine.csv", wine.data, wine.target, names),
                  "--target", "target")
    ref = GaussianNB().fit(wine.data, wine.target)
    assert rel(gauss["theta"], ref.theta_) <= 1e-9 and rel(gauss["var"], ref.var_) <= 1e-9
    assert rel(gauss["class_log_prior"], np.log(ref.class_prior_)) <= 1e-9

    digits = datasets.load_digits()
    names = [f"p{j}" for j in range(digits.data.shape[1])]
    data = write_csv(tmp_path / "digits.csv", digits.data.astype(int), digits.target, names)
    multi = train(party, tmp_path, "naive-bayes", data, "--target", "target", "--param", "kind=multinomial")
    ref_m = MultinomialNB().fit(digits.data, digits.target)
    assert rel(multi["feature_log_prob"], ref_m.feature_log_prob_) <= 1e-9
    assert rel(multi["class_log_prior"], ref_m.class_log_prior_) <= 1e-9
    got = predictions(party, tmp_path, multi, data)
    assert [int(g["prediction"]) for g in got] == list(ref_m.predict(digits.data))


BOOKS = ("metamorphosis", "being_ernest", "frankenstein")


def book_paragraphs(corpus: list[Path]) -> list[tuple[str, str]]:
    """(book, paragraph) of three books of the shared corpus, interleaved."""
    rows = []
    for book in BOOKS:
        text = (corpus[0].parent / f"pg-{book}.txt").read_text(encoding="utf-8")
        paras = [p.replace("\n", " ").strip() for p in text.split("\n\n")]
        rows += [(i, book, p) for i, p in enumerate(p for p in paras if len(p) > 40)]
    return [(b, p) for _, b, p in sorted(rows)]


def isalpha_runs(text: str) -> list[str]:
    """Word count's words, the obvious way: maximal runs of str.isalpha() characters."""
    return ["".join(run) for alpha, run in itertools.groupby(text, str.isalpha) if alpha]


def test_text_naive_bayes_matches_count_vectorizer_and_multinomial_nb(party: LocalParty, tmp_path: Path,
                                                                      corpus: list[Path]) -> None:
    from sklearn.feature_extraction.text import CountVectorizer

    rows = book_paragraphs(corpus)
    train_rows, test_rows = [r for k, r in enumerate(rows) if k % 5], [r for k, r in enumerate(rows) if k % 5 == 0]
    data = tmp_path / "books.jsonl"  # JSON Lines, with an empty, a null and a numeric text among them
    extra = [("frankenstein", ""), ("metamorphosis", None), ("being_ernest", 42)]
    data.write_text("".join(json.dumps({"book": b, "text": t}) + "\n" for b, t in train_rows + extra))
    docs = [t for _, t in train_rows] + ["", "", "42"]
    labels = [b for b, _ in train_rows + extra]
    vectorizer = CountVectorizer(analyzer=isalpha_runs)
    counts = vectorizer.fit_transform(docs)
    ref = MultinomialNB(alpha=0.5).fit(counts, labels)
    model = train(party, tmp_path, "naive-bayes", data, "--target", "book", "--param", "text=text",
                  "--param", "alpha=0.5", chunk="0.016")
    assert model["features"] == sorted(vectorizer.vocabulary_) and model["rows"] == len(docs)
    assert model["classes"] == sorted(BOOKS) == list(ref.classes_)
    assert rel(model["feature_log_prob"], ref.feature_log_prob_) <= 1e-9
    assert rel(model["class_log_prior"], ref.class_log_prior_) <= 1e-9

    held_out = tmp_path / "held-out.csv"  # predicted from CSV: the column is found by name
    with open(held_out, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "book"])
        writer.writerows([t, b] for b, t in test_rows)
    got = predictions(party, tmp_path, model, held_out)
    x = vectorizer.transform([t for _, t in test_rows])
    assert [g["prediction"] for g in got] == list(ref.predict(x))
    log_probs = np.log([[g["probabilities"][c] for c in ref.classes_] for g in got])
    assert np.max(np.abs(log_probs - ref.predict_log_proba(x))) <= 1e-9 * max(1.0, float(np.max(np.abs(log_probs))))

    lowered = CountVectorizer(analyzer=lambda s: isalpha_runs(s.lower())).fit_transform(docs)
    ordered = np.sort(np.asarray(lowered.sum(axis=0)).ravel())[::-1]  # the most frequent words, cut between
    limit = next(k for k in range(300, len(ordered)) if ordered[k - 1] > ordered[k])  # two counts, not in a tie
    small = train(party, tmp_path, "naive-bayes", data, "--target", "book", "--param", "text=text",
                  "--param", f"max_features={limit}", "--param", "lowercase=true")
    lower = CountVectorizer(analyzer=lambda s: isalpha_runs(s.lower()), max_features=limit)
    ref_small = MultinomialNB().fit(lower.fit_transform(docs), labels)
    assert small["features"] == sorted(lower.vocabulary_)
    assert rel(small["feature_log_prob"], ref_small.feature_log_prob_) <= 1e-9


def test_kmeans_matches_scikit_learn_from_the_same_centres(party: LocalParty, tmp_path: Path) -> None:
    iris = datasets.load_iris()
    names = [f"f{j}" for j in range(iris.data.shape[1])]
    data = write_csv(tmp_path / "iris-x.csv", iris.data, None, names)
    model = train(party, tmp_path, "kmeans", data, "--param", "k=3", "--param", "seed=7", "--param", "tol=0")
    again = train(party, tmp_path, "kmeans", data, "--param", "k=3", "--param", "seed=7", "--param", "tol=0",
                  chunk="1")
    assert rel(again["init_centers"], model["init_centers"]) == 0.0  # seeded: the same start however it is cut
    ref = KMeans(n_clusters=3, init=np.array(model["init_centers"]), n_init=1, algorithm="lloyd", tol=0,
                 max_iter=300).fit(iris.data)
    assert abs(model["inertia"] - ref.inertia_) <= 1e-8 * ref.inertia_
    order = np.lexsort(np.array(model["centers"]).T[::-1])
    ref_order = np.lexsort(ref.cluster_centers_.T[::-1])
    assert rel(np.array(model["centers"])[order], ref.cluster_centers_[ref_order]) <= 1e-8
    got = predictions(party, tmp_path, model, data)
    assert [g["cluster"] for g in got] == [g["prediction"] for g in got]
    assert [g["cluster"] for g in got] == list(np.argmin(
        ((iris.data[:, None, :] - np.array(model["centers"])[None]) ** 2).sum(axis=2), axis=1))


def test_a_model_bigger_than_a_frame_header_reaches_every_map(party: LocalParty, tmp_path: Path) -> None:
    """k-means' centres (150 x 64, ~170 KiB as msgpack) go to the maps every round, beside the
    assignments (a header is at most 64 KiB), and to `pdp predict` in the submit's payload."""
    digits = datasets.load_digits()
    names = [f"p{j}" for j in range(digits.data.shape[1])]
    data = write_csv(tmp_path / "digits-x.csv", digits.data, None, names)
    model = train(party, tmp_path, "kmeans", data, "--param", "k=150", "--param", "max_iter=2", "--param", "tol=0")
    assert len(model["centers"]) == 150 and model["rows"] == len(digits.data) and model["rounds"] == 3
    assert len(msgpack.packb(model)) > 2 * 65536
    centers, x = np.array(model["init_centers"]), digits.data  # two Lloyd steps, the obvious way (scikit-learn
    for _ in range(2):                                           # moves an empty cluster's centre; pdp keeps it)
        labels = ((x[:, None, :] - centers[None]) ** 2).sum(axis=2).argmin(axis=1)
        centers = np.array([x[labels == k].mean(axis=0) if (labels == k).any() else c for k, c in enumerate(centers)])
    assert rel(model["centers"], centers) <= 1e-12
    got = predictions(party, tmp_path, model, data)
    assert [g["cluster"] for g in got] == list(((x[:, None, :] - centers[None]) ** 2).sum(axis=2).argmin(axis=1))


def test_the_same_model_whatever_the_chunks_and_members(party: LocalParty, tmp_path: Path) -> None:
    wine = datasets.load_wine()
    names = [f"f{j}" for j in range(wine.data.shape[1])]
    data = write_csv(tmp_path / "wine.csv", standardized(wine.data), wine.target, names)
    args = ("--target", "target", "--param", "tol=1e-10")
    small, whole = (train(party, tmp_path, "logistic", data, *args, chunk=c) for c in (CHUNK, "1"))
    assert rel(small["coef"], whole["coef"]) <= 1e-10 and small["rounds"] == whole["rounds"]
    alone = tmp_path / "alone.json"  # one process, no party: `pdp run` (the sequential reference)
    done = subprocess.run([sys.executable, "-m", "pdp", "run", "train", str(data), "-o", str(alone), "--",
                           "--algorithm", "logistic", *args], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    one = json.loads(alone.read_text())
    assert rel(one["coef"], small["coef"]) <= 1e-10 and one["rounds"] == small["rounds"]


def test_bad_data_fails_the_job_naming_file_line_and_column(party: LocalParty, tmp_path: Path) -> None:
    good, bad = tmp_path / "good.csv", tmp_path / "bad.csv"
    good.write_text("a,b,y\n" + "".join(f"{k},{k * 2},{k % 2}\n" for k in range(200)))
    model = train(party, tmp_path, "logistic", good, "--target", "y")
    bad.write_text("a,b\n" + "".join(f"{k},{k * 2}\n" for k in range(200)) + "7,oops\n")
    path, out = tmp_path / "m.json", tmp_path / "never.jsonl"
    path.write_text(json.dumps(model))
    done = pdp(party, "predict", str(path), str(bad), "-o", str(out), "--chunk-mb", CHUNK)
    assert done.returncode == 1 and not out.exists()
    assert "bad.csv line 202, column 'b': 'oops' is not a number" in done.stderr, done.stderr

    ragged = tmp_path / "ragged.csv"
    ragged.write_text("a,b,y\n" + "".join(f"{k},{k * 2},{k % 2}\n" for k in range(200)) + "7,1\n")
    done = pdp(party, "train", "linear", str(ragged), "-o", str(out), "--target", "y", "--chunk-mb", CHUNK)
    assert done.returncode == 1 and "line 202" in done.stderr and "2 fields" in done.stderr, done.stderr
    for args, why in ((["--target", "nope"], "'nope'"), (["--target", "y", "--param", "C=-1"], "C")):
        done = pdp(party, "train", "logistic", str(good), "-o", str(out), *args)
        assert done.returncode == 1 and why in done.stderr and not out.exists(), done.stderr
    assert pdp(party, "predict", str(good), str(good), "-o", str(out)).returncode == 1  # not a model file


# -- failures ----------------------------------------------------------------------------------


def _rounds(party: LocalParty, job_id: str, node: int) -> int:
    done = pdp(party, "logs", job_id, "--json", node=node, timeout=30)
    if done.returncode != 0:
        return 0
    return sum(json.loads(line)["kind"] == "round" for line in done.stdout.splitlines())


def test_the_same_model_when_a_member_dies_mid_round_and_the_leader_between_rounds(
        make_party: Callable[..., LocalParty], tmp_path: Path) -> None:
    """`slowtrain` (test-only) is `train` whose maps sleep 0.5 s: about ten rounds slow enough
    to kill a member mid-round (then restart it: two of three must stay up) and later the
    leader between rounds. The model equals the undisturbed run's: re-run maps make the same
    partials, and the new master goes on from the round and model in the log."""
    digits = datasets.load_digits()
    keep = digits.target < 4  # 4 classes x 65 weights: about ten Newton rounds of 6 maps each
    names = [f"p{j}" for j in range(digits.data.shape[1])]
    data = write_csv(tmp_path / "digits.csv", digits.data[keep] / 16.0, digits.target[keep], names)
    job_args = ["--algorithm", "logistic", "--target", "target", "--param", "tol=1e-10", "--param", "C=0.1"]
    party = make_party("sleep=0.5", n=3, chunk_mb=0.0625)
    leader = leader_index(party)
    gw, member = [i for i in range(3) if i != leader]  # the gateway holds every input: it stays up
    calm = tmp_path / "calm.json"
    done = pdp(party, "train", "logistic", str(data), "-o", str(calm), "--chunk-mb", "0.0625", *job_args[2:], node=gw)
    assert done.returncode == 0, done.stderr
    out = tmp_path / "chaos.json"
    job = pdp(party, "submit", "slowtrain", str(data), "--no-wait", "--data-type", "csv", "--", *job_args, node=gw)
    assert job.returncode == 0, job.stderr
    job_id = job.stdout.strip()
    wait_until(lambda: _rounds(party, job_id, gw) >= 2, 60, "round 3")
    wait_until(lambda: party.names[member] in _at_work(party, job_id, gw), 30, "a map running on the member")
    party.kill(member)  # mid-round: its maps run again elsewhere
    party.start_node(member)
    asyncio.run(party.wait_ready(60))
    seen = _rounds(party, job_id, gw)
    wait_until(lambda: _rounds(party, job_id, gw) > seen, 60, "a round after the member came back")
    assert _state(party, job_id, gw) != "done", "the job ended before the leader could be killed: slow it down"
    assert leader_index(party) == leader
    party.kill(leader)  # between rounds (or just after one began)
    done = pdp(party, "wait", job_id, "-o", str(out), node=gw, timeout=240)
    assert done.returncode == 0, done.stderr
    a, b = json.loads(calm.read_text()), json.loads(out.read_text())
    assert a["rounds"] == b["rounds"] and a["rows"] == b["rows"] and rel(a["coef"], b["coef"]) <= 1e-12
    assert _extra_attempts(party, job_id, gw) > 0  # the member's map did run again


def _job(party: LocalParty, job_id: str, node: int) -> dict[str, Any]:
    """`pdp jobs JOB --json` at member ``node`` ({} if it did not answer)."""
    done = pdp(party, "jobs", job_id, "--json", node=node)
    return dict(json.loads(done.stdout)) if done.returncode == 0 else {}


def _at_work(party: LocalParty, job_id: str, node: int) -> list[str]:
    job = _job(party, job_id, node)
    return list(job.get("nodes_at_work", [])) if job.get("state") == "mapping" else []


def _state(party: LocalParty, job_id: str, node: int) -> str:
    return str(_job(party, job_id, node).get("state", ""))


def _extra_attempts(party: LocalParty, job_id: str, node: int) -> int:
    """Attempts beyond one per task (re-runs, backups)."""
    job = _job(party, job_id, node)
    return int(job["attempts"] - len(job["tasks"]))
