"""pdp.train.table and pdp.train.models in process: a small local driver runs the rounds
over chunks of scikit-learn's bundled data sets and the results are compared with
numpy's and scikit-learn's."""

from __future__ import annotations

import json
from functools import reduce
from typing import Any

import msgpack
import numpy as np
import pytest
from sklearn import datasets
from sklearn.cluster import KMeans
from sklearn.linear_model import LinearRegression, LogisticRegression, Ridge
from sklearn.naive_bayes import GaussianNB, MultinomialNB

from pdp.errors import InputError
from pdp.train import codec, models, table

NAME = "data.csv"
CHUNKS = (7, 50, 10**9)


def to_rows(X: np.ndarray, y: np.ndarray | None = None) -> list[tuple[int, dict[str, Any]]]:
    """Rows like a CSV reader gives (line 1 is the header)."""
    out = []
    for i, row in enumerate(X):
        rec = {f"x{j}": repr(float(v)) for j, v in enumerate(row)}
        if y is not None:
            rec["target"] = str(y[i])
        out.append((i + 2, rec))
    return out


def chunked(rows: list[Any], size: int) -> list[list[Any]]:
    return [rows[i:i + size] for i in range(0, len(rows), size)]


def fit(rows: list[Any], algorithm: str, params: dict[str, Any], *, chunk: int = 50,
        target: str | None = "target", features: list[str] | None = None,
        missing: str = "drop") -> dict[str, Any]:
    """The local driver: scan, layout, start, then partial/merge/update rounds, finish."""
    parts = chunked(rows, chunk)
    size = models.sample_size(algorithm, params)
    scans = [table.scan_partial(p, NAME, sample=size, seed=3) for p in parts]
    scan = reduce(table.merge_scan, scans)
    msgpack.packb(scan)  # plain data
    layout = table.make_layout(scan, target=target, features=features, missing=missing,
                               task=models.task_of(algorithm))
    model = models.start(algorithm, params, layout, scan)
    encoded = [table.encode(p, layout, NAME) for p in parts]
    for _ in range(10000):
        msgpack.packb(model)  # plain data: no numpy
        partials = [codec.unpack(codec.pack(models.partial(model, X, y, dropped=dr)))
                    for X, y, dr, _ in encoded]
        model, done = models.update(model, reduce(models.merge, partials))
        if done:
            break
    mf = models.finish(model)
    assert json.loads(json.dumps(mf)) == mf
    return mf


def standardized(X: np.ndarray) -> np.ndarray:
    return (X - X.mean(axis=0)) / X.std(axis=0)


def close(a: Any, b: Any, rel: float) -> None:
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    scale = max(float(np.max(np.abs(b))), 1e-300)
    assert np.max(np.abs(a - b)) <= rel * scale, (np.max(np.abs(a - b)) / scale)


# ---------------------------------------------------------------- linear


def test_linear_matches_lstsq_and_sklearn() -> None:
    X, y = datasets.load_diabetes(return_X_y=True)
    rows = to_rows(X, y)
    mf = fit(rows, "linear", {})
    Xa = np.column_stack([X, np.ones(len(X))])
    w = np.linalg.lstsq(Xa, y, rcond=None)[0]
    close(mf["coef"][0], w[:-1], 1e-8)
    close(mf["intercept"], [w[-1]], 1e-8)
    lr = LinearRegression().fit(X, y)
    close(mf["coef"][0], lr.coef_, 1e-8)
    assert mf["loss"] == pytest.approx(np.mean((lr.predict(X) - y) ** 2), rel=1e-8)
    assert mf["rows"] == len(X) and mf["dropped"] == 0 and mf["rounds"] == 1
    pred = [r["prediction"] for r in models.predict(mf, X)]
    close(pred, lr.predict(X), 1e-8)

    ridge = fit(rows, "linear", {"alpha": 1.0})
    sk = Ridge(alpha=1.0).fit(X, y)
    close(ridge["coef"][0], sk.coef_, 1e-8)
    close(ridge["intercept"], [sk.intercept_], 1e-8)


# ---------------------------------------------------------------- logistic


def _logistic_check(X: np.ndarray, y: np.ndarray) -> dict[str, Any]:
    mf = fit(to_rows(X, y), "logistic", {"C": 1.0, "tol": 1e-10})
    sk = LogisticRegression(C=1.0, tol=1e-10, max_iter=10000).fit(X, y)
    close(mf["coef"], sk.coef_, 1e-4)
    close(mf["intercept"], sk.intercept_, 1e-4)
    out = models.predict(mf, X)
    assert [r["prediction"] for r in out] == [str(c) for c in sk.predict(X)]
    P = np.array([[r["probabilities"][str(c)] for c in sk.classes_] for r in out])
    close(P, sk.predict_proba(X), 1e-4)
    assert mf["classes"] == [str(c) for c in sk.classes_]
    assert 1 < mf["rounds"] < 100
    return mf


def test_logistic_binary_breast_cancer() -> None:
    X, y = datasets.load_breast_cancer(return_X_y=True)
    mf = _logistic_check(standardized(X), y)
    assert len(mf["coef"]) == 1


def test_logistic_multinomial_iris_and_wine() -> None:
    X, y = datasets.load_iris(return_X_y=True)
    assert len(_logistic_check(X, y)["coef"]) == 3
    X, y = datasets.load_wine(return_X_y=True)
    _logistic_check(standardized(X), y)


def test_logistic_stops_at_max_iter() -> None:
    X, y = datasets.load_iris(return_X_y=True)
    mf = fit(to_rows(X, y), "logistic", {"tol": 0.0, "max_iter": 3})
    assert mf["rounds"] == 3 and mf["loss"] > 0


def test_logistic_rounds_lengthen_a_short_newton_step_and_halve_a_long_one() -> None:
    rng = np.random.default_rng(0)  # nearly separable: Newton's steps from zero are short
    X = rng.standard_normal((4000, 5))
    y = (X @ np.array([3.0, -2.0, 1.0, 4.0, 0.5]) + 0.3 * rng.standard_normal(4000) > 0).astype(int)
    mf = fit(to_rows(X, y), "logistic", {"tol": 1e-8})
    sk = LogisticRegression(C=1.0, tol=1e-12, max_iter=10000).fit(X, y)
    close(mf["coef"], sk.coef_, 1e-6)
    plain = 0  # the same problem by plain Newton steps (one point a round)
    theta, mask = np.zeros(6), np.r_[np.ones(5), 0.0]
    Xa = np.column_stack([X, np.ones(len(X))])
    while True:
        plain += 1
        p = 1 / (1 + np.exp(-Xa @ theta))
        g = Xa.T @ (p - y) + mask * theta
        step = -np.linalg.solve((Xa * (p * (1 - p))[:, None]).T @ Xa + np.diag(mask), g)
        if np.max(np.abs(g)) / len(X) <= 1e-8 and np.max(np.abs(step)) <= 1e-8 * max(1.0, np.max(np.abs(theta))):
            break
        theta = theta + step
    assert mf["rounds"] < plain - 2, (mf["rounds"], plain)

    layout = {"features": ["a"], "classes": ["0", "1"], "columns": []}  # and the halving, by hand
    model = models.start("logistic", {}, layout, {})
    model = dict(model, state={**model["state"], "theta": [1.0, 0.0], "step": [4.0, 0.0], "ts": [1.0, 2.0],
                               "best": {"theta": [1.0, 0.0], "f": 10.0, "loss": 1.0}})
    worse = {"n": 10, "dropped": 0, "loss": np.array([11.0, 12.0]), "grad": np.zeros((2, 2)), "hess": np.eye(2)}
    model, done = models.update(model, worse)
    assert not done and model["state"]["ts"] == [0.5, 0.25, 0.125] and model["state"]["halvings"] == 1
    better = {"n": 10, "dropped": 0, "loss": np.array([9.0, 3.0, 5.0]), "grad": np.zeros((3, 2)), "hess": np.eye(2)}
    model, _ = models.update(model, better)
    assert model["state"]["best"]["theta"] == [2.0, 0.0] and model["state"]["halvings"] == 0  # 1 + 0.25 * 4


# ---------------------------------------------------------------- naive Bayes


def test_multinomial_nb_digits() -> None:
    X, y = datasets.load_digits(return_X_y=True)
    mf = fit(to_rows(X, y), "naive-bayes", {"kind": "multinomial", "alpha": 1.0})
    sk = MultinomialNB(alpha=1.0).fit(X, y)
    close(mf["class_log_prior"], sk.class_log_prior_, 1e-9)
    close(mf["feature_log_prob"], sk.feature_log_prob_, 1e-9)
    close(mf["class_count"], sk.class_count_, 1e-12)
    out = models.predict(mf, X)
    assert [r["prediction"] for r in out] == [str(c) for c in sk.predict(X)]
    P = np.array([[r["probabilities"][str(c)] for c in sk.classes_] for r in out])
    close(P, sk.predict_proba(X), 1e-9)
    jll = sk.predict_joint_log_proba(X)
    assert mf["loss"] == pytest.approx(-np.mean(jll[np.arange(len(y)), y]), rel=1e-9)


def test_gaussian_nb_iris() -> None:
    X, y = datasets.load_iris(return_X_y=True)
    mf = fit(to_rows(X, y), "naive-bayes", {}, chunk=7)
    sk = GaussianNB().fit(X, y)
    close(mf["theta"], sk.theta_, 1e-9)
    close(mf["var"], sk.var_, 1e-9)
    close(mf["class_log_prior"], np.log(sk.class_prior_), 1e-9)
    jll = sk.predict_joint_log_proba(X)
    close(models._nb_jll(mf, X), jll, 1e-9)
    out = models.predict(mf, X)
    assert [r["prediction"] for r in out] == [str(c) for c in sk.predict(X)]
    P = np.array([[r["probabilities"][str(c)] for c in sk.classes_] for r in out])
    close(P, sk.predict_proba(X), 1e-9)
    assert mf["loss"] == pytest.approx(-np.mean(jll[np.arange(len(y)), y]), rel=1e-9)


def test_multinomial_nb_rejects_negative() -> None:
    X, y = datasets.load_iris(return_X_y=True)
    with pytest.raises(InputError, match="non-negative"):
        fit(to_rows(X - 5, y), "naive-bayes", {"kind": "multinomial"})


# ---------------------------------------------------------------- k-means


@pytest.mark.parametrize("k", [3, 8])
def test_kmeans_matches_sklearn_from_same_init(k: int) -> None:
    X, _ = datasets.load_wine(return_X_y=True)
    X = standardized(X)
    rows = to_rows(X)
    scan = table.scan_partial(rows, NAME, sample=10000, seed=3)
    layout = table.make_layout(scan, target=None, features=None, task="none")
    init = np.array(models.start("kmeans", {"k": k, "seed": 5}, layout, scan)["state"]["centers"])
    mf = fit(rows, "kmeans", {"k": k, "seed": 5, "tol": 1e-12}, target=None)
    sk = KMeans(n_clusters=k, init=init, n_init=1, algorithm="lloyd", tol=1e-12).fit(X)
    assert mf["inertia"] == pytest.approx(sk.inertia_, rel=1e-8)
    close(mf["centers"], sk.cluster_centers_, 1e-8)
    assert [r["cluster"] for r in models.predict(mf, X)] == sk.labels_.tolist()
    assert mf["loss"] == pytest.approx(sk.inertia_ / len(X), rel=1e-8)


def test_kmeans_default_tol_final_inertia() -> None:
    X, _ = datasets.load_iris(return_X_y=True)
    mf = fit(to_rows(X), "kmeans", {"k": 3}, target=None)
    labels, dist = models.assign(X, np.asarray(mf["centers"]))
    assert mf["inertia"] == pytest.approx(dist.sum(), rel=1e-12)


def test_kmeans_init_is_seeded_and_chunking_free() -> None:
    X, _ = datasets.load_iris(return_X_y=True)
    rows = to_rows(X)
    inits = []
    for size in CHUNKS:
        scan = reduce(table.merge_scan, [table.scan_partial(p, NAME, sample=40, seed=1)
                                         for p in chunked(rows, size)])
        assert len(scan["sample"]) == 40
        layout = table.make_layout(scan, target=None, features=None, task="none")
        inits.append(models.start("kmeans", {"k": 4, "seed": 2}, layout, scan)["state"]["centers"])
    assert inits[0] == inits[1] == inits[2]


# ---------------------------------------------------------------- chunking


@pytest.mark.parametrize("algorithm,params,loader", [
    ("linear", {"alpha": 0.5}, datasets.load_diabetes),
    ("logistic", {"tol": 1e-8}, datasets.load_iris),
    ("naive-bayes", {}, datasets.load_wine),
    ("kmeans", {"k": 3, "tol": 1e-10}, datasets.load_iris),
])
def test_same_model_whatever_the_chunking(algorithm: str, params: dict[str, Any], loader: Any) -> None:
    X, y = loader(return_X_y=True)
    target = None if algorithm == "kmeans" else "target"
    rows = to_rows(X, None if target is None else y)
    fits = [fit(rows, algorithm, params, chunk=c, target=target) for c in CHUNKS]
    keys = {"linear": ["coef", "intercept"], "logistic": ["coef", "intercept"],
            "naive-bayes": ["theta", "var", "class_log_prior"], "kmeans": ["centers", "inertia"]}
    for other in fits[1:]:
        for key in keys[algorithm]:
            close(other[key], fits[0][key], 1e-10)
        assert other["rounds"] == fits[0]["rounds"]
        assert other["layout"] == fits[0]["layout"]


# ---------------------------------------------------------------- the table


def test_scan_merge_is_grouping_free() -> None:
    rows = [(i + 2, {"a": str(i % 1500), "b": ["x", "y", "NA", ""][i % 4], "c": str(i)})
            for i in range(4000)]
    one = table.scan_partial(rows, NAME, sample=30)
    many = reduce(table.merge_scan, [table.scan_partial(p, NAME, sample=30) for p in chunked(rows, 333)])
    assert one["sample"] == many["sample"]
    for col in ("a", "b", "c"):
        x, y = one["columns"][col], many["columns"][col]
        assert x["values"] == y["values"] and x["cats"] == y["cats"]
        assert x["present"] == y["present"] and x["missing"] == y["missing"]
    assert one["columns"]["b"]["present"] == 2000 and one["columns"]["b"]["missing"] == 2000
    assert len(one["columns"]["a"]["values"]) == table.MAX_CATEGORIES + 1
    assert table.column_order(many) == ["a", "b", "c"]


def test_layout_kinds_classes_and_categories() -> None:
    rows: list[tuple[int, dict[str, Any]]] = [
        (i + 2, {"n": str(i), "colour": ["red", "blue", "1"][i % 3], "label": str([2, 10, 1][i % 3])})
        for i in range(30)]
    scan = table.scan_partial(rows, NAME)
    layout = table.make_layout(scan, target="label", features=None, task="classification")
    assert layout["classes"] == ["1", "2", "10"]
    assert layout["features"] == ["n", "colour=1", "colour=blue", "colour=red"]
    X, y, dropped, lines = table.encode(rows[:3], layout, NAME)
    assert X.tolist() == [[0, 0, 0, 1], [1, 0, 1, 0], [2, 1, 0, 0]]
    assert y is not None and y.tolist() == [1, 2, 0] and dropped == 0 and lines == [2, 3, 4]


def test_json_records_and_bools() -> None:
    rows: list[tuple[int, dict[str, Any]]] = [(1, {"a": 1, "b": True, "t": 0.5}), (2, {"a": 2.5, "b": False, "t": None}),
            (3, {"a": None, "b": True, "t": 2})]
    scan = table.scan_partial(rows, "x.jsonl")
    layout = table.make_layout(scan, target="t", features=None, task="regression")
    assert layout["features"] == ["a", "b=false", "b=true"]
    X, y, dropped, lines = table.encode(rows, layout, "x.jsonl")
    assert X.tolist() == [[1, 0, 1]] and y is not None and y.tolist() == [0.5]
    assert dropped == 2 and lines == [1]


def test_non_number_names_file_line_and_column() -> None:
    rows = [(2, {"a": "1", "t": "1"}), (3, {"a": "2", "t": "2"})]
    layout = table.make_layout(table.scan_partial(rows, NAME), target="t", features=None,
                               task="regression")
    with pytest.raises(InputError, match=r"data\.csv line 7, column 'a': 'oops' is not a number"):
        table.encode([(7, {"a": "oops", "t": "1"})], layout, NAME)
    with pytest.raises(InputError, match="line 8, column 't'"):
        table.encode([(8, {"a": "1", "t": "inf"})], layout, NAME)


def test_unknown_columns_are_listed() -> None:
    scan = table.scan_partial([(2, {"a": "1", "b": "2"})], NAME)
    with pytest.raises(InputError, match=r"target column 'nope'.*'a', 'b'"):
        table.make_layout(scan, target="nope", features=None, task="regression")
    with pytest.raises(InputError, match=r"target column 'nope'.*'a', 'b'"):
        table.make_layout(scan, target="nope", features=None, task="none")
    with pytest.raises(InputError, match=r"feature column 'zz'.*'a', 'b'"):
        table.make_layout(scan, target="a", features=["zz"], task="regression")


def test_regression_target_must_be_numeric() -> None:
    scan = table.scan_partial([(2, {"a": "1", "t": "x"}), (3, {"a": "1", "t": "2"})], NAME)
    with pytest.raises(InputError, match="numeric"):
        table.make_layout(scan, target="t", features=None, task="regression")


def test_too_many_categories() -> None:
    rows = [(i, {"a": f"v{i}", "t": "1"}) for i in range(table.MAX_CATEGORIES + 5)]
    with pytest.raises(InputError, match="--features"):
        table.make_layout(table.scan_partial(rows, NAME), target="t", features=None, task="regression")


def test_missing_mean_and_drop() -> None:
    rows = [(2, {"a": "1", "c": "x", "t": "1"}), (3, {"a": "3", "c": "y", "t": "2"}),
            (4, {"a": "NA", "c": "x", "t": "3"}), (5, {"a": "5", "c": "", "t": "4"}),
            (6, {"a": "2", "c": "y", "t": ""}), (7, {"c": "x", "t": "5"})]
    scan = table.scan_partial(rows, NAME)
    mean = table.make_layout(scan, target="t", features=None, missing="mean", task="regression")
    X, y, dropped, lines = table.encode(rows, mean, NAME)
    assert mean["columns"][0]["mean"] == pytest.approx(11 / 4)
    assert X.tolist() == [[1, 1, 0], [3, 0, 1], [2.75, 1, 0], [5, 0, 0], [2.75, 1, 0]]
    assert dropped == 1 and lines == [2, 3, 4, 5, 7]
    drop = table.make_layout(scan, target="t", features=None, task="regression")
    X, y, dropped, lines = table.encode(rows, drop, NAME)
    assert dropped == 4 and lines == [2, 3] and y is not None and y.tolist() == [1, 2]
    X, y, dropped, lines = table.encode(rows, drop, NAME, need_target=False)
    assert y is None and dropped == 3 and lines == [2, 3, 6]
    mf = fit(rows, "linear", {"alpha": 1.0}, target="t", missing="drop")
    assert mf["rows"] == 2 and mf["dropped"] == 4


def test_predict_unknown_label_is_not_an_error() -> None:
    X, y = datasets.load_iris(return_X_y=True)
    rows = to_rows(X, y)
    mf = fit(rows, "naive-bayes", {})
    fresh = [(line, dict(rec, target="never-seen")) for line, rec in rows[:5]]
    Xp, yp, dropped, lines = table.encode(fresh, mf["layout"], "new.csv", need_target=False)
    assert yp is None and len(models.predict(mf, Xp)) == 5


def test_bad_params() -> None:
    from pdp.errors import ConfigError
    scan = table.scan_partial([(2, {"a": "1"}), (3, {"a": "2"})], NAME, sample=5)
    layout = table.make_layout(scan, target=None, features=None, task="none")
    with pytest.raises(ConfigError, match="k"):
        models.start("kmeans", {}, layout, scan)
    with pytest.raises(InputError, match="k=5"):
        models.start("kmeans", {"k": 5}, layout, scan)
    with pytest.raises(ConfigError, match="unknown algorithm"):
        models.task_of("svm")
    with pytest.raises(ConfigError, match="no parameter"):
        models.check_params("linear", {"C": 1})


def test_logistic_row_blocks_and_merge_order(monkeypatch: pytest.MonkeyPatch) -> None:
    X, y = datasets.load_wine(return_X_y=True)
    rows = to_rows(standardized(X), y)
    whole = fit(rows, "logistic", {"tol": 1e-8}, chunk=10**9)
    monkeypatch.setattr(models, "_BLOCK", 200)
    blocks = fit(rows[::-1], "logistic", {"tol": 1e-8}, chunk=13)
    close(blocks["coef"], whole["coef"], 1e-10)
    close(blocks["intercept"], whole["intercept"], 1e-10)


def test_linear_with_a_categorical_feature() -> None:
    X, y = datasets.load_diabetes(return_X_y=True)
    colour = np.array(["red", "green", "blue"])[np.arange(len(y)) % 3]
    rows = to_rows(X, y)
    for (_, rec), c in zip(rows, colour):
        rec["colour"] = c
    mf = fit(rows, "linear", {})
    assert mf["features"][-3:] == ["colour=blue", "colour=green", "colour=red"]
    onehot = (colour[:, None] == np.array(["blue", "green", "red"])[None, :]).astype(float)
    Xf = np.column_stack([X, onehot])
    sk = LinearRegression().fit(Xf, y)
    close([r["prediction"] for r in models.predict(mf, Xf)], sk.predict(Xf), 1e-8)
    close(mf["coef"][0], sk.coef_, 1e-6)  # both the minimum-norm solution
