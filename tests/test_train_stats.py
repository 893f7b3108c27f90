"""Tests of pdp.train.stats: exact moments under any chunking and merge order, KLL quantiles
within the stated rank error, HLL distinct counts, top values, JSONL values, render."""

from __future__ import annotations

import math
from collections import Counter
from typing import Any, Callable

import numpy as np
import pytest
from rich.console import Console
from rich.table import Table
from sklearn.datasets import load_diabetes, load_iris, load_wine

from pdp.train import stats
from pdp.train.codec import pack, unpack

Rows = list[tuple[int, dict[str, Any]]]
MISSING_TOKENS = ["", "NA", " N/A ", "NaN", "nan", "null", "NULL", "None"]
CHUNK_SIZES = [3, 17, 100, None]  # None: all rows in one chunk


def dataset_rows(loader: Callable[..., Any]) -> tuple[Rows, list[str]]:
    """A dataset as CSV-like rows (every value a str) plus synthetic text/missing columns."""
    ds = loader()
    names = [str(n) for n in ds.feature_names]
    labels = [str(n) for n in getattr(ds, "target_names", [])] or ["lo", "hi"]
    rows: Rows = []
    for i, (x, t) in enumerate(zip(ds.data, ds.target)):
        rec: dict[str, Any] = {n: repr(float(v)) for n, v in zip(names, x)}
        label = labels[int(t) % len(labels)] if len(labels) > 2 else labels[int(t > 140)]
        rec["label"] = MISSING_TOKENS[i % 8] if i % 5 == 0 else label
        rec["gappy"] = MISSING_TOKENS[i % 8] if i % 3 == 0 else str(i % 11)
        rows.append((i + 2, rec))
    return rows, names + ["label", "gappy"]


def chunks(rows: Rows, size: int | None) -> list[Rows]:
    size = size or len(rows)
    return [rows[i:i + size] for i in range(0, len(rows), size)]


def partials(rows: Rows, size: int | None) -> list[dict[str, Any]]:
    """Partials of the chunks, each sent through the wire codec as a worker's would be."""
    return [unpack(pack(stats.partial(c, f"chunk{i}"))) for i, c in enumerate(chunks(rows, size))]


def tree(ps: list[dict[str, Any]]) -> dict[str, Any]:
    if len(ps) == 1:
        return ps[0]
    mid = len(ps) // 2
    return stats.merge(tree(ps[:mid]), tree(ps[mid:]))


def reversed_fold(ps: list[dict[str, Any]]) -> dict[str, Any]:
    total = stats.empty()
    for p in reversed(ps):
        total = stats.merge(p, total)  # keeps input order of columns, merges right to left
    return total


def swapped_fold(ps: list[dict[str, Any]]) -> dict[str, Any]:
    total = stats.empty()
    for p in reversed(ps):
        total = stats.merge(total, p)  # b before a: commutativity of the exact parts
    return total


GROUPINGS = {"left": stats.merge_all, "tree": tree, "reversed": reversed_fold,
             "swapped": swapped_fold}


def numeric_values(rows: Rows, col: str) -> np.ndarray:
    out = []
    for _, rec in rows:
        kind, x, _ = stats.classify(rec.get(col))
        if kind == "numeric":
            out.append(x)
    return np.asarray(out, dtype=np.float64)


def assert_close(got: float | None, want: float, rel: float) -> None:
    assert got is not None
    assert math.isclose(got, want, rel_tol=rel, abs_tol=rel * 1e-3), (got, want)


def assert_quantiles(qs: dict[str, float], values: np.ndarray, rank_error: float) -> None:
    """Each value's rank range in the sorted data is within rank_error*n (+1) of q*n."""
    data = np.sort(values)
    n = data.size
    assert set(qs) == {"0.01", "0.05", "0.25", "0.5", "0.75", "0.95", "0.99"}
    for q, v in qs.items():
        lo = int(np.searchsorted(data, v, side="left"))
        hi = int(np.searchsorted(data, v, side="right"))
        want, tol = float(q) * n, rank_error * n + 1
        assert lo - tol <= want <= hi + tol, (q, v, lo, hi, want, tol)
        assert data[0] <= v <= data[-1]


def check_result(res: dict[str, Any], rows: Rows, cols: list[str]) -> None:
    assert list(res) == cols
    for col in cols:
        r = res[col]
        present = [rec.get(col) for _, rec in rows]
        kinds = [stats.classify(v)[0] for v in present]
        assert r["count"] == sum(k != "missing" for k in kinds)
        assert r["missing"] == len(rows) - r["count"]
        assert r["rank_error"] == stats.RANK_ERROR
        texts = [stats.classify(v)[2] for v in present if stats.classify(v)[0] != "missing"]
        exact_distinct = len(set(texts))
        assert abs(r["distinct"] - exact_distinct) <= max(1, 0.05 * exact_distinct)
        if r["type"] == "numeric":
            x = numeric_values(rows, col)
            assert_close(r["mean"], float(np.mean(x)), 1e-12)
            assert_close(r["std"], float(np.std(x, ddof=1)), 1e-12)
            assert r["min"] == float(x.min()) and r["max"] == float(x.max())
            assert_quantiles(r["quantiles"], x, r["rank_error"])
            assert r["top"] == []
        else:
            assert r["mean"] is r["std"] is r["min"] is r["max"] is None
            assert r["quantiles"] == {}


@pytest.mark.parametrize("loader", [load_iris, load_diabetes, load_wine],
                         ids=["iris", "diabetes", "wine"])
def test_datasets_any_chunking_and_grouping(loader: Callable[..., Any]) -> None:
    rows, cols = dataset_rows(loader)
    results = []
    for size in CHUNK_SIZES:
        ps = partials(rows, size)
        for how, fold in GROUPINGS.items():
            res = stats.finish(fold(ps))
            check_result(res, rows, cols)
            results.append(res)
    base = results[0]  # (quantiles are exact only up to k values, else checked by rank)
    for res in results[1:]:  # the exact parts agree across chunkings and groupings
        for col in cols:
            for key in ("count", "missing", "type", "min", "max", "top", "distinct"):
                assert res[col][key] == base[col][key], (col, key)
            for key in ("mean", "std"):
                if base[col][key] is not None:
                    assert_close(res[col][key], base[col][key], 1e-12)


def test_text_column_top_values() -> None:
    rows, _ = dataset_rows(load_iris)
    res = stats.finish(tree(partials(rows, 17)))
    label = res["label"]
    assert label["type"] == "text"
    want = Counter(rec["label"] for _, rec in rows if stats.classify(rec["label"])[0] == "text")
    assert label["top"] == sorted(([v, c] for v, c in want.items()), key=lambda vc: (-vc[1], vc[0]))
    assert label["distinct"] == 3
    assert label["missing"] == 30
    # "gappy" holds only numbers and missing tokens: numeric
    assert res["gappy"]["type"] == "numeric" and res["gappy"]["missing"] == 50


def test_top_is_capped_and_ordered() -> None:
    rows: Rows = [(i, {"w": f"word{i % 25}" if i % 2 else "common"}) for i in range(1000)]
    res = stats.finish(stats.merge_all(partials(rows, 37)))["w"]
    assert len(res["top"]) == 10
    assert res["top"][0] == ["common", 500]
    assert all(c == 20 for _, c in res["top"][1:])
    assert res["distinct"] == 26


def test_large_column_quantiles_in_estimation_mode() -> None:
    rng = np.random.default_rng(7)
    x = np.concatenate([rng.normal(10, 3, 30000), rng.exponential(50, 10000)])
    rows: Rows = [(i, {"x": repr(float(v))}) for i, v in enumerate(x)]
    for size in (1000, 7919, None):
        res = stats.finish(tree(partials(rows, size)))["x"]
        assert res["count"] == x.size
        assert_close(res["mean"], float(np.mean(x)), 1e-12)
        assert_close(res["std"], float(np.std(x, ddof=1)), 1e-12)
        assert_quantiles(res["quantiles"], x, res["rank_error"])
        assert abs(res["distinct"] - x.size) <= 0.05 * x.size


def test_numerically_hard_moments() -> None:
    rng = np.random.default_rng(3)
    x = 1e9 + rng.normal(0, 1e-3, 5000)
    naive = (np.sum(x * x) - np.sum(x) ** 2 / x.size) / (x.size - 1)
    want = float(np.std(x, ddof=1))
    assert not math.isclose(math.sqrt(abs(naive)), want, rel_tol=1e-3)  # the trap is real
    rows: Rows = [(i, {"x": repr(float(v))}) for i, v in enumerate(x)]
    for size in (3, 17, 100, None):
        ps = partials(rows, size)
        for fold in GROUPINGS.values():
            res = stats.finish(fold(ps))["x"]
            assert_close(res["std"], want, 1e-9)
            assert_close(res["mean"], float(np.mean(x)), 1e-15)


def test_jsonl_values() -> None:
    rows: Rows = [
        (1, {"i": 1, "f": 1.5, "b": True, "n": None, "s": "3", "o": {"k": [1, 2]}}),
        (2, {"i": 2, "f": float("nan"), "b": False, "n": None, "s": 4.0}),
        (3, {"i": 3, "f": -2.5, "b": True, "s": "x", "late": 7}),
        (4, {"i": None, "f": 1e308 * 10, "b": None, "s": "NA"}),
    ]
    res = stats.finish(stats.merge(stats.partial(rows[:2], "a"), stats.partial(rows[2:], "b")))
    assert list(res) == ["i", "f", "b", "n", "s", "o", "late"]
    assert res["i"]["type"] == "numeric" and res["i"]["count"] == 3 and res["i"]["missing"] == 1
    assert res["i"]["mean"] == 2.0 and res["i"]["std"] == 1.0
    assert res["f"]["type"] == "text"  # inf is not a finite number
    assert res["f"]["count"] == 3 and res["f"]["missing"] == 1 and res["f"]["text"] == 1
    assert res["b"]["type"] == "text" and res["b"]["top"] == [["true", 2], ["false", 1]]
    assert res["n"]["count"] == 0 and res["n"]["missing"] == 4 and res["n"]["quantiles"] == {}
    assert res["n"]["mean"] is None and res["n"]["std"] is None and res["n"]["distinct"] == 0
    assert res["s"]["type"] == "text" and res["s"]["top"] == [["x", 1]]
    assert res["s"]["numeric"] == 2 and res["s"]["mean"] is None
    assert res["o"]["top"] == [['{"k":[1,2]}', 1]] and res["o"]["missing"] == 3
    assert res["late"]["count"] == 1 and res["late"]["missing"] == 3
    assert res["late"]["std"] is None and res["late"]["quantiles"]["0.5"] == 7.0


def test_classify() -> None:
    assert stats.classify(" 2.5 ") == ("numeric", 2.5, "2.5")
    assert stats.classify("1e3")[:2] == ("numeric", 1000.0)
    for token in MISSING_TOKENS + [None, float("nan")]:
        assert stats.classify(token)[0] == "missing"
    for text in ["inf", "-Infinity", "1_000", "abc", True, [1]]:
        assert stats.classify(text)[0] == "text"
    assert stats.classify(7) == ("numeric", 7.0, "7")


def test_partial_is_plain_data_and_merge_identity() -> None:
    rows, cols = dataset_rows(load_iris)
    p = stats.partial(rows, "iris.csv")
    assert unpack(pack(p)) == p
    assert stats.merge(stats.empty(), p) == p
    assert stats.merge_all([]) == stats.empty()
    assert stats.finish(stats.empty()) == {}
    assert p["columns"] == cols
    with pytest.raises(ValueError, match="iris.csv:9"):
        stats.partial([(9, ["not", "a", "dict"])], "iris.csv")  # type: ignore[list-item]


def test_rank_error_constant() -> None:
    assert stats.RANK_ERROR == pytest.approx(0.0133, abs=1e-4)


def test_render() -> None:
    rows, _ = dataset_rows(load_wine)
    rows[0][1]["label"] = "[bold]markup[/bold]"
    table = stats.render(stats.finish(stats.merge_all(partials(rows, 100))))
    assert isinstance(table, Table)
    console = Console(record=True, width=200)
    console.print(table)
    out = console.export_text()
    for word in ("column", "std", "25%", "distinct", "top value", "alcohol", "label", "class_1"):
        assert word in out
    assert len(table.rows) == len(load_wine().feature_names) + 2
