"""``pdp stats``: per-column statistics of CSV / JSON Lines data, mergeable across chunks.

Each chunk computes :func:`partial` on a worker, the reduce combines partials with
:func:`merge` and the master turns the total into the result with :func:`finish`.

What is exact and what is estimated:

* ``count`` / ``missing`` / numeric ``mean``, ``std``, ``min``, ``max`` are exact (up to
  float rounding) for any grouping and order of chunks: the moments are computed per chunk
  with two passes over numpy arrays, stored as a shift (the chunk's first value) plus the
  mean of the shifted values, and combined with Chan et al.'s parallel update (never naive
  sums of squares), so ``1e9 + 1e-3 * noise`` keeps its precision through any merges.
* ``quantiles`` come from a KLL sketch (``k = 200``): the rank of a returned value is within
  :data:`RANK_ERROR` * n of the requested rank (with high probability). The sketch is exact
  while a column has at most ``k`` numeric values; beyond that its compactions use the
  library's random bits, so quantiles (only) may differ slightly between runs.
* ``distinct`` is an HLL estimate (``lg_k = 12``, about 1.6 % relative error; exact-ish for
  small cardinalities) over every non-missing value as a string (a JSON non-string value as
  its compact JSON text).
* ``top`` counts only the non-numeric ("text") values, with a frequent-strings sketch
  (``lg_max_k = 10``): exact while a column has at most 768 distinct text values overall,
  beyond that the counts are estimates (lower bound <= estimate <= upper bound).

A value is missing if its key is absent, it is JSON null (or a float NaN), or its stripped
string is one of :data:`MISSING`. A value is numeric if it is an int or float (not a bool)
or a string that parses as a finite float. A column is ``"numeric"`` if all its non-missing
values are numeric, else ``"text"`` (for a text column the numeric summaries are ``None``
and ``quantiles`` is ``{}``).

Column order: ``merge(a, b)`` keeps a's columns then b's new ones, so merging the chunks in
input order (any tree, as long as left stays left) gives the order of first appearance
(header order for CSV). Partials are plain msgpack-able data: dicts, lists, numbers, str and
the sketches as their serialized bytes. Everything is pure and deterministic apart from the
KLL compaction noted above.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from typing import Any

import datasketches as ds
import numpy as np
from rich.table import Table
from rich.text import Text

KLL_K = 200
RANK_ERROR: float = float(ds.kll_doubles_sketch.get_normalized_rank_error(KLL_K, False))
HLL_LG_K = 12
FREQ_LG_MAX_K = 10
TOP_N = 10
MISSING = ("", "NA", "N/A", "NaN", "nan", "null", "NULL", "None")
QUANTILES = (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99)
VERSION = 1

_MISSING = frozenset(MISSING)


# -- values ------------------------------------------------------------------------------------


def classify(value: Any) -> tuple[str, float | None, str]:
    """``(kind, number, text)``: kind is ``"missing"``, ``"numeric"`` or ``"text"``; number is
    the float for numeric values; text is the value's string form (for distinct/top)."""
    if value is None:
        return "missing", None, ""
    if isinstance(value, str):
        s = value.strip()
        if s in _MISSING:
            return "missing", None, ""
        return _classify_str(s)
    if isinstance(value, bool):
        return "text", None, "true" if value else "false"
    if isinstance(value, (int, float)):
        return _classify_number(value)
    return "text", None, json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def _classify_str(s: str) -> tuple[str, float | None, str]:
    if "_" in s:  # float() accepts "1_000"; a CSV reader should not
        return "text", None, s
    try:
        x = float(s)
    except ValueError:
        return "text", None, s
    return ("numeric", x, s) if math.isfinite(x) else ("text", None, s)


def _classify_number(value: int | float) -> tuple[str, float | None, str]:
    if isinstance(value, float) and math.isnan(value):
        return "missing", None, ""
    text = json.dumps(value)
    try:
        x = float(value)
    except OverflowError:
        return "text", None, text
    return ("numeric", x, text) if math.isfinite(x) else ("text", None, text)


# -- partial -----------------------------------------------------------------------------------


def empty() -> dict[str, Any]:
    """The identity of :func:`merge`: no rows, no columns."""
    return {"version": VERSION, "rows": 0, "columns": [], "stats": {}}


def _moments(values: list[float] | np.ndarray) -> dict[str, Any]:
    """n, shift, mean of ``x - shift``, M2, min, max. ``shift`` (the chunk's first value) keeps
    the mean's low digits: ``1e9 + 1e-3 * noise`` would otherwise lose them in the merges."""
    if len(values) == 0:
        return {"n": 0, "shift": 0.0, "mean": 0.0, "m2": 0.0, "min": None, "max": None}
    arr = np.asarray(values, dtype=np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        shift = float(arr[0])
        centered = arr - shift
        if not np.isfinite(centered).all():  # a span near the float range: no shift
            shift, centered = 0.0, arr
        mean = float(centered.mean())
        dev = centered - mean
        mean += float(dev.sum()) / arr.size  # second-pass correction of the mean
        dev = centered - mean
        m2 = float(np.dot(dev, dev))
    return {"n": int(arr.size), "shift": shift, "mean": mean, "m2": m2,
            "min": float(arr.min()), "max": float(arr.max())}


def _kll_bytes(values: list[float] | np.ndarray) -> bytes | None:
    if len(values) == 0:
        return None
    sk = ds.kll_doubles_sketch(KLL_K)
    sk.update(np.asarray(values, dtype=np.float64))
    return bytes(sk.serialize())


def _hll_bytes(texts: list[str]) -> bytes | None:
    if not texts:
        return None
    sk = ds.hll_sketch(HLL_LG_K)
    for t in set(texts):  # (a repeated value changes nothing in an HLL sketch)
        sk.update(t)
    return bytes(sk.serialize_compact())


def _freq_bytes(texts: list[str]) -> bytes | None:
    if not texts:
        return None
    counts: dict[str, int] = {}
    for t in texts:
        counts[t] = counts.get(t, 0) + 1
    sk = ds.frequent_strings_sketch(FREQ_LG_MAX_K)
    for t in sorted(counts):
        sk.update(t, counts[t])
    return bytes(sk.serialize())


def _column(numbers: list[float] | np.ndarray, all_texts: list[str], texts: list[str]) -> dict[str, Any]:
    return {"count": len(all_texts), "text": len(texts), **_moments(numbers),
            "kll": _kll_bytes(numbers), "hll": _hll_bytes(all_texts), "freq": _freq_bytes(texts)}


def partial(rows: Iterable[tuple[int, dict[str, Any]]], name: str) -> dict[str, Any]:
    """Statistics of one chunk's ``(line, record)`` rows; ``name`` (the chunk's input) is
    used in error messages only."""
    order: list[str] = []
    numbers: dict[str, list[float]] = {}
    all_texts: dict[str, list[str]] = {}
    texts: dict[str, list[str]] = {}
    n_rows = 0
    for line, record in rows:
        if not isinstance(record, dict):
            raise ValueError(f"{name}:{line}: a record must be an object, not {type(record).__name__}")
        n_rows += 1
        for key, value in record.items():
            col = str(key)
            if col not in numbers:
                order.append(col)
                numbers[col], all_texts[col], texts[col] = [], [], []
            kind, x, text = classify(value)
            if kind == "missing":
                continue
            all_texts[col].append(text)
            if x is not None:
                numbers[col].append(x)
            else:
                texts[col].append(text)
    stats = {c: _column(numbers[c], all_texts[c], texts[c]) for c in order}
    return {"version": VERSION, "rows": n_rows, "columns": order, "stats": stats}


def partial_plain(header: list[str], cells: np.ndarray, tokens: list[list[str]],
                  text: frozenset[int] = frozenset()) -> dict[str, Any]:
    """:func:`partial` of a plain CSV chunk (:func:`pdp.train.fastcsv.parse_columns`): its
    cells as a matrix and their text, a column each; ``text``: the columns that are not all
    numbers, read value by value. The same result, the numeric columns at numpy's speed."""
    stats = {}
    for j, c in enumerate(header if len(cells) else []):
        stats[c] = _column(*_classified(tokens[j])) if j in text else _column(cells[:, j], tokens[j], [])
    return {"version": VERSION, "rows": int(cells.shape[0]), "columns": list(stats), "stats": stats}


def _classified(values: list[str]) -> tuple[list[float], list[str], list[str]]:
    """(numbers, every non-missing value's text, the non-numeric ones' text) of a column."""
    numbers: list[float] = []
    all_texts: list[str] = []
    texts: list[str] = []
    for value in values:
        kind, x, text = classify(value)
        if kind == "missing":
            continue
        all_texts.append(text)
        if x is not None:
            numbers.append(x)
        else:
            texts.append(text)
    return numbers, all_texts, texts


# -- merge -------------------------------------------------------------------------------------


_MOMENTS = ("n", "shift", "mean", "m2", "min", "max")


def _merge_moments(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Chan et al.'s parallel update, in a's shift (the means are ``shift + mean``)."""
    na, nb = int(a["n"]), int(b["n"])
    if nb == 0:
        return {k: a[k] for k in _MOMENTS}
    if na == 0:
        return {k: b[k] for k in _MOMENTS}
    n = na + nb
    delta = (float(b["shift"]) - float(a["shift"])) + (float(b["mean"]) - float(a["mean"]))
    mean = float(a["mean"]) + delta * nb / n
    m2 = float(a["m2"]) + float(b["m2"]) + delta * delta * na * nb / n
    return {"n": n, "shift": float(a["shift"]), "mean": mean, "m2": m2,
            "min": min(float(a["min"]), float(b["min"])), "max": max(float(a["max"]), float(b["max"]))}


def _merge_sketch(kind: Any, a: bytes | None, b: bytes | None) -> bytes | None:
    """Two serialized sketches of ``kind`` (KLL or frequent items) as one."""
    if a is None or b is None:
        return a if b is None else b
    sk = kind.deserialize(a)
    sk.merge(kind.deserialize(b))
    return bytes(sk.serialize())


def _merge_hll(a: bytes | None, b: bytes | None) -> bytes | None:
    if a is None or b is None:
        return a if b is None else b
    union = ds.hll_union(HLL_LG_K)
    union.update(ds.hll_sketch.deserialize(a))
    union.update(ds.hll_sketch.deserialize(b))
    return bytes(union.get_result().serialize_compact())


def _merge_column(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    return {"count": int(a["count"]) + int(b["count"]), "text": int(a["text"]) + int(b["text"]),
            **_merge_moments(a, b), "kll": _merge_sketch(ds.kll_doubles_sketch, a["kll"], b["kll"]),
            "hll": _merge_hll(a["hll"], b["hll"]), "freq": _merge_sketch(ds.frequent_strings_sketch, a["freq"], b["freq"])}


def merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Combine two partials (a's columns first, then b's new ones); neither is modified."""
    order = list(a["columns"]) + [c for c in b["columns"] if c not in a["stats"]]
    stats: dict[str, Any] = {}
    for col in order:
        sa, sb = a["stats"].get(col), b["stats"].get(col)
        stats[col] = _merge_column(sa, sb) if sa is not None and sb is not None else dict(sa or sb)
    return {"version": VERSION, "rows": int(a["rows"]) + int(b["rows"]), "columns": order,
            "stats": stats}


def merge_all(partials: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Left fold of :func:`merge` over partials in input order (``empty()`` for none)."""
    total = empty()
    for p in partials:
        total = merge(total, p)
    return total


# -- finish ------------------------------------------------------------------------------------


def _quantiles(kll: bytes | None) -> dict[str, float]:
    if kll is None:
        return {}
    sk = ds.kll_doubles_sketch.deserialize(kll)
    if sk.is_empty():
        return {}
    values = sk.get_quantiles(list(QUANTILES), True)
    return {str(q): float(v) for q, v in zip(QUANTILES, values)}


def _top(freq: bytes | None) -> list[list[Any]]:
    if freq is None:
        return []
    sk = ds.frequent_strings_sketch.deserialize(freq)
    items = sk.get_frequent_items(ds.frequent_items_error_type.NO_FALSE_NEGATIVES)
    ranked = sorted(((str(it[0]), int(it[1])) for it in items), key=lambda vc: (-vc[1], vc[0]))
    return [[v, c] for v, c in ranked[:TOP_N]]


def _distinct(hll: bytes | None) -> int:
    return 0 if hll is None else int(round(ds.hll_sketch.deserialize(hll).get_estimate()))


def _finish_column(s: dict[str, Any], rows: int) -> dict[str, Any]:
    count, n, text = int(s["count"]), int(s["n"]), int(s["text"])
    numeric = text == 0
    std = math.sqrt(max(float(s["m2"]), 0.0) / (n - 1)) if numeric and n >= 2 else None
    return {
        "type": "numeric" if numeric else "text",
        "count": count, "missing": rows - count, "numeric": n, "text": text,
        "mean": float(s["shift"]) + float(s["mean"]) if numeric and n else None, "std": std,
        "min": s["min"] if numeric else None, "max": s["max"] if numeric else None,
        "quantiles": _quantiles(s["kll"]) if numeric else {},
        "distinct": _distinct(s["hll"]), "top": _top(s["freq"]) if not numeric else [],
        "rank_error": RANK_ERROR,
    }


def finish(total: dict[str, Any]) -> dict[str, Any]:
    """The result: one object per column, in column order (see the module docstring)."""
    rows = int(total["rows"])
    return {col: _finish_column(total["stats"][col], rows) for col in total["columns"]}


# -- render ------------------------------------------------------------------------------------

_HEADERS = ("column", "type", "count", "missing", "mean", "std", "min", "25%", "50%", "75%",
            "max", "distinct", "top value")


def _fmt(x: Any) -> str:
    if x is None:
        return ""
    if isinstance(x, float):
        return f"{x:.6g}"
    return str(x)


def _top_cell(top: list[list[Any]]) -> str:
    if not top:
        return ""
    value, count = top[0]
    shown = value if len(value) <= 40 else value[:39] + "…"
    return f"{shown} ({count})"


def _row(col: str, r: dict[str, Any]) -> list[Text]:
    q = r.get("quantiles") or {}
    cells = [col, r["type"], r["count"], r["missing"], r["mean"], r["std"], r["min"],
             q.get("0.25"), q.get("0.5"), q.get("0.75"), r["max"], r["distinct"]]
    return [Text(_fmt(c)) for c in cells] + [Text(_top_cell(r.get("top") or []))]


def render(result: dict[str, Any]) -> Table:
    """A terminal table of :func:`finish`'s result, one row per column (text escaped)."""
    table = Table(title="column statistics")
    for i, header in enumerate(_HEADERS):
        table.add_column(header, justify="left" if i < 2 or i == len(_HEADERS) - 1 else "right")
    for col, r in result.items():
        table.add_row(*_row(col, r))
    return table
