"""Rows to arrays: the scan round, the feature layout and the encoder.

A row is ``(line, record)``: the line number in its input file and a record, a CSV row
(column -> str) or a JSON Lines object (name -> str/int/float/bool/None/...). A value is
*missing* when its key is absent, it is JSON null, or it is a string in :data:`MISSING`
(after strip). A value is a *number* when it parses as a finite float (JSON booleans are
not numbers; neither are strings with ``_`` digit separators).

* :func:`scan_partial` / :func:`merge_scan`: per-column counts, sums, distinct values
  (the :data:`MAX_CATEGORIES` + 1 smallest, so the merge is exact and independent of the
  grouping) and a seeded sample of rows that does not depend on the chunking.
* :func:`make_layout`: which columns are features, numeric or one-hot, the target and classes.
* :func:`encode`: rows to ``X``, ``y``, the number of dropped rows and the kept lines.

Everything is plain data (no numpy) except :func:`encode`'s arrays; nothing does I/O.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import math
from collections.abc import Iterable
from fractions import Fraction
from typing import Any

import numpy as np

from pdp.errors import InputError

MISSING = ("", "NA", "N/A", "NaN", "nan", "null", "NULL", "None")
MAX_CATEGORIES = 1000
_MISSING = frozenset(MISSING)
_CAP = MAX_CATEGORIES + 1
TASKS = ("regression", "classification", "none")
Rows = Iterable[tuple[int, dict[str, Any]]]


def is_missing(v: Any) -> bool:
    """Whether a record's value counts as missing (None or a :data:`MISSING` string)."""
    return v is None or (isinstance(v, str) and v.strip() in _MISSING)


def as_number(v: Any) -> float | None:
    """The value as a finite float, or None when it is not a number."""
    if isinstance(v, bool) or not isinstance(v, (str, int, float)):
        return None
    if isinstance(v, str) and "_" in v:
        return None
    try:
        f = float(v)
    except (ValueError, OverflowError):
        return None
    return f if math.isfinite(f) else None


def as_label(v: Any) -> str:
    """The value as a string: stripped text, ``true``/``false``, numbers as Python prints them."""
    if isinstance(v, str):
        return v.strip()
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return str(v)
    return json.dumps(v, sort_keys=True, separators=(",", ":"))


def hash64(seed: int, name: str, line: int) -> int:
    """A deterministic 64-bit key of (seed, file name, line): the sample's order."""
    data = f"{seed}\x00{name}\x00{line}".encode()
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


def label_order(labels: Iterable[str]) -> list[str]:
    """Sorted labels: numerically ("2" before "10") when all are numbers, else as strings."""
    labels = list(labels)
    nums = [as_number(s) for s in labels]
    if labels and all(n is not None for n in nums):
        return [s for _, s in sorted(zip(nums, labels), key=lambda p: (p[0], p[1]))]
    return sorted(labels)


# ---------------------------------------------------------------- the scan round


def _trim(counts: dict[str, int]) -> dict[str, int]:
    """Keep the ``_CAP`` smallest keys (exact counts survive any grouping of merges)."""
    if len(counts) <= _CAP:
        return counts
    return {k: counts[k] for k in sorted(counts)[:_CAP]}


def _count(counts: dict[str, int], cut: list[str | None], key: str) -> None:
    """Count ``key`` unless it can no longer be among the ``_CAP`` smallest (``cut[0]``)."""
    if key in counts:
        counts[key] += 1
        return
    if cut[0] is not None and key > cut[0]:
        return
    counts[key] = 1
    if len(counts) > 2 * _CAP:
        last = cut[0] = sorted(counts)[_CAP - 1]
        for k in [k for k in counts if k > last]:
            del counts[k]


def exact_sum(values: list[float]) -> list[float]:
    """An exact sum as a few floats whose exact sum it is (largest first): each is
    ``math.fsum`` of what the previous ones leave, so ``math.fsum`` of the result (or of any
    concatenation of results) is the correctly rounded total, whatever the grouping."""
    out: list[float] = []
    try:
        for _ in range(64):
            s = math.fsum(values + [-x for x in out])
            if not math.isfinite(s):  # (an infinite part, from a total beyond the float range)
                return [s]
            if s == 0.0:
                break
            out.append(s)
    except OverflowError:  # a partial sum beyond the float range: exactly, as a fraction (slow, and rare)
        return _fraction_floats(sum(map(Fraction, values), Fraction(0)))
    return out


def _fraction_floats(rest: Fraction) -> list[float]:
    """An exact rational as floats that sum to it (as :func:`exact_sum`), or ±inf when it is
    beyond the float range."""
    out: list[float] = []
    for _ in range(64):
        if rest == 0:
            break
        try:
            f = float(rest)
        except OverflowError:
            return [math.inf if rest > 0 else -math.inf]
        out.append(f)
        rest -= Fraction(f)
    return out


class _Column:
    """A column's statistics while scanning (turned into a plain dict at the end)."""

    __slots__ = ("present", "numeric", "sum", "buf", "lo", "hi", "cats", "values", "cuts", "first")

    def __init__(self, line: int, pos: int) -> None:
        self.present = self.numeric = 0
        self.sum: list[float] = []
        self.buf: list[float] = []
        self.lo, self.hi = math.inf, -math.inf
        self.cats: dict[str, int] = {}
        self.values: dict[str, int] = {}
        self.cuts: tuple[list[str | None], list[str | None]] = ([None], [None])
        self.first = [line, pos]

    def add(self, v: Any) -> None:
        """Count one value (a missing one is skipped)."""
        if v.__class__ is str:
            s = v.strip()
            if s in _MISSING:
                return
            try:
                f = float(s)
                num = f - f == 0.0 and "_" not in s
            except ValueError:
                num = False
        elif v is None:
            return
        else:
            s, g = as_label(v), as_number(v)
            f, num = (0.0, False) if g is None else (g, True)
        self.present += 1
        if num:
            self.buf.append(f)
            if len(self.buf) >= 4096:
                self.flush()
        else:
            _count(self.cats, self.cuts[0], s)
        if s in self.values:
            self.values[s] += 1
        else:
            _count(self.values, self.cuts[1], s)

    def flush(self) -> None:
        """Fold the buffered numbers into the count, exact sum, min and max."""
        if self.buf:
            self.numeric += len(self.buf)
            self.lo, self.hi = min(self.lo, min(self.buf)), max(self.hi, max(self.buf))
            self.sum, self.buf = exact_sum(self.sum + self.buf), []

    def plain(self, rows: int) -> dict[str, Any]:
        self.flush()
        some = self.numeric > 0
        return {"present": self.present, "missing": rows - self.present, "numeric": self.numeric,
                "sum": self.sum, "min": self.lo if some else None,
                "max": self.hi if some else None, "cats": _trim(self.cats),
                "values": _trim(self.values), "first": self.first}


def scan_partial(rows: Rows, name: str, *, sample: int = 0, seed: int = 0) -> dict[str, Any]:
    """One chunk's column statistics and (``sample`` > 0) its rows with the smallest keys.

    Per column: ``present`` (non-missing), ``missing`` (including absent keys), ``numeric``,
    ``sum`` of the numbers (exact, as a list of floats: ``math.fsum`` it), their ``min`` and
    ``max``, ``cats`` (non-numeric values) and ``values`` (all values as strings) with
    counts, each the ``MAX_CATEGORIES + 1`` smallest distinct (more than ``MAX_CATEGORIES``
    means too many), and ``first`` ([line, position] where the column was first seen: the
    column order). ``sample``: ``[key, line, name, record]`` sorted by key.
    """
    cols: dict[str, _Column] = {}
    heap: list[tuple[int, int, int, dict[str, Any]]] = []
    n = 0
    for line, rec in rows:
        n += 1
        for pos, (col, v) in enumerate(rec.items()):
            c = cols.get(col)
            if c is None:
                if not isinstance(col, str):
                    continue
                c = cols[col] = _Column(line, pos)
            c.add(v)
        if sample > 0:
            item = (-hash64(seed, name, line), -line, n, rec)
            if len(heap) < sample:
                heapq.heappush(heap, item)
            elif item[:2] > heap[0][:2]:
                heapq.heapreplace(heap, item)
    kept = sorted(((-k, -ln, rec) for k, ln, _, rec in heap), key=lambda t: (t[0], t[1]))
    return {"rows": n, "columns": {col: c.plain(n) for col, c in cols.items()},
            "sample_size": sample, "seed": seed,
            "sample": [[k, ln, name, rec] for k, ln, rec in kept]}


def _merge_counts(a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
    out = dict(a)
    for k, c in b.items():
        out[k] = out.get(k, 0) + c
    return _trim(out)


def _merge_column(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    lo = [x for x in (a["min"], b["min"]) if x is not None]
    hi = [x for x in (a["max"], b["max"]) if x is not None]
    return {"present": a["present"] + b["present"], "missing": 0,
            "numeric": a["numeric"] + b["numeric"], "sum": exact_sum(a["sum"] + b["sum"]),
            "min": min(lo) if lo else None, "max": max(hi) if hi else None,
            "cats": _merge_counts(a["cats"], b["cats"]),
            "values": _merge_counts(a["values"], b["values"]),
            "first": min(a["first"], b["first"])}


def merge_scan(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Two scan partials as one (associative and commutative; exact, sums included)."""
    cols: dict[str, dict[str, Any]] = {}
    for col in sorted(set(a["columns"]) | set(b["columns"])):
        ca, cb = a["columns"].get(col), b["columns"].get(col)
        st = _merge_column(ca, cb) if ca is not None and cb is not None else dict(ca or cb or {})
        cols[col] = st
    rows = a["rows"] + b["rows"]
    for st in cols.values():
        st["missing"] = rows - st["present"]
    size = max(a.get("sample_size", 0), b.get("sample_size", 0))
    both = sorted(a["sample"] + b["sample"], key=lambda s: (s[0], s[2], s[1]))
    return {"rows": rows, "columns": cols, "sample_size": size,
            "seed": a.get("seed", 0), "sample": both[:size]}


# ---------------------------------------------------------------- the layout


def column_order(scan: dict[str, Any]) -> list[str]:
    """The scan's columns in the order they appear in the input."""
    cols = scan["columns"]
    return sorted(cols, key=lambda c: (cols[c]["first"], c))


def _unknown(kind: str, col: str, names: list[str]) -> InputError:
    listed = ", ".join(repr(c) for c in names) or "(none)"
    return InputError(f"{kind} column {col!r} is not in the input; its columns are: {listed}")


def _feature_column(col: str, st: dict[str, Any]) -> dict[str, Any]:
    if st["numeric"] == st["present"]:
        mean = math.fsum(st["sum"]) / st["numeric"] if st["numeric"] else 0.0
        return {"name": col, "kind": "numeric", "mean": mean, "width": 1}
    if len(st["values"]) > MAX_CATEGORIES:
        raise InputError(f"column {col!r} has more than {MAX_CATEGORIES} distinct non-numeric "
                         f"values; leave it out with --features")
    cats = label_order(st["values"])
    return {"name": col, "kind": "categorical", "categories": cats, "width": len(cats)}


def _choose_features(names: list[str], scan: dict[str, Any], target: str | None,
                     features: list[str] | None) -> list[str]:
    if features is None:
        return [c for c in names if c != target and scan["columns"][c]["present"] > 0]
    for col in features:
        if col not in scan["columns"]:
            raise _unknown("feature", col, names)
        if col == target:
            raise InputError(f"column {col!r} is the target; it cannot also be a feature")
    if len(set(features)) != len(features):
        raise InputError(f"a feature column is listed twice: {features}")
    return list(features)


def _classes(target: str, st: dict[str, Any]) -> list[str]:
    if len(st["values"]) > MAX_CATEGORIES:
        raise InputError(f"target column {target!r} has more than {MAX_CATEGORIES} distinct values")
    classes = label_order(st["values"])
    if len(classes) < 2:
        raise InputError(f"target column {target!r} needs at least two classes; it has {classes}")
    return classes


def _check_target(target: str | None, scan: dict[str, Any], names: list[str], task: str) -> None:
    if target is None:
        raise InputError(f"{task} needs a target column; the columns are: {', '.join(names)}")
    if target not in scan["columns"]:
        raise _unknown("target", target, names)
    st = scan["columns"][target]
    if task == "regression" and (st["present"] == 0 or st["numeric"] != st["present"]):
        bad = next(iter(sorted(st["cats"])), None)
        raise InputError(f"target column {target!r} must be numeric for regression "
                         f"(it holds e.g. {bad!r})")


def _text_layout(scan: dict[str, Any], names: list[str], target: str | None, col: str,
                 features: list[str] | None) -> None:
    """Check a text column (naive Bayes over its words): in the input, not the target, and
    the only feature."""
    if col not in scan["columns"]:
        raise _unknown("text", col, names)
    if col == target:
        raise InputError(f"column {col!r} is the target; it cannot also be the text")
    if features:
        raise InputError(f"with text={col} the features are its words; leave out --features")


def make_layout(scan: dict[str, Any], *, target: str | None, features: list[str] | None,
                missing: str = "drop", task: str, text: str | None = None) -> dict[str, Any]:
    """The feature layout (plain data) from a merged scan.

    ``columns``: the feature columns in order, each ``{"name", "kind": "numeric", "mean"}`` or
    ``{"name", "kind": "categorical", "categories"}`` (one-hot, features ``col=value``), with
    its ``width``; ``features``: the expanded feature names; ``target``, ``task``,
    ``classes`` (classification: sorted labels as strings, else None), ``missing``,
    ``input_columns`` (every column of the input). With ``text`` (a column of documents)
    there are no feature ``columns``: the words are the features, known after the fit
    round (:mod:`pdp.train.text`), and ``text`` names the column.
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, not {task!r}")
    if missing not in ("drop", "mean"):
        raise InputError(f"missing must be 'drop' or 'mean', not {missing!r}")
    names = column_order(scan)
    if task == "none":
        if target is not None and target not in scan["columns"]:
            raise _unknown("target", target, names)
    else:
        _check_target(target, scan, names, task)
    classes = _classes(str(target), scan["columns"][target]) if task == "classification" else None
    if text is not None:
        _text_layout(scan, names, target, text, features)
        return {"columns": [], "features": [], "target": target, "task": task, "classes": classes,
                "missing": missing, "input_columns": names, "text": text}
    chosen = _choose_features(names, scan, target, features)
    if not chosen:
        raise InputError(f"no feature columns left; the columns are: {', '.join(names)}")
    columns = [_feature_column(c, scan["columns"][c]) for c in chosen]
    expanded: list[str] = []
    for c in columns:
        expanded += [c["name"]] if c["kind"] == "numeric" else [f"{c['name']}={v}" for v in c["categories"]]
    return {"columns": columns, "features": expanded, "target": target if task != "none" else None,
            "task": task, "classes": classes, "missing": missing, "input_columns": names}


# ---------------------------------------------------------------- rows to arrays


def _not_number(name: str, line: int, col: str, v: Any) -> InputError:
    return InputError(f"{name} line {line}, column {col!r}: {v!r} is not a number")


def _specs(layout: dict[str, Any]) -> list[tuple[str, bool, float, dict[str, int], int]]:
    out, off = [], 0
    for c in layout["columns"]:
        index = {v: i for i, v in enumerate(c.get("categories") or [])}
        out.append((c["name"], c["kind"] == "numeric", float(c.get("mean", 0.0)), index, off))
        off += c["width"]
    return out


def _fill(out: list[float], rec: dict[str, Any], specs: list[tuple[str, bool, float, dict[str, int], int]],
          impute: bool, name: str, line: int) -> bool:
    """Write one record's features into ``out``; False when a missing value drops the row."""
    for col, numeric, mean, index, off in specs:
        v = rec.get(col)
        if numeric:
            try:
                f = float(v)  # type: ignore[arg-type]
                if f - f == 0.0 and v.__class__ is not bool and not (v.__class__ is str and "_" in v):
                    out[off] = f
                    continue
            except (TypeError, ValueError, OverflowError):
                pass
            if not is_missing(v):
                raise _not_number(name, line, col, v)
            if not impute:
                return False
            out[off] = mean
        elif is_missing(v):
            if not impute:
                return False
        else:
            i = index.get(v.strip() if v.__class__ is str else as_label(v))
            if i is not None:
                out[off + i] = 1.0
    return True


def _target(rec: dict[str, Any], layout: dict[str, Any], classes: dict[str, int],
            name: str, line: int) -> float | int | None:
    col = layout["target"]
    v = rec.get(col)
    if is_missing(v):
        return None
    if layout["task"] == "regression":
        f = as_number(v)
        if f is None:
            raise _not_number(name, line, col, v)
        return f
    i = classes.get(as_label(v))
    if i is None:
        raise InputError(f"{name} line {line}, column {col!r}: {v!r} is not a class the scan saw")
    return i


def encode(rows: Rows, layout: dict[str, Any], name: str, *,
           need_target: bool = True) -> tuple[np.ndarray, np.ndarray | None, int, list[int]]:
    """Rows to ``(X, y, dropped, lines)``.

    ``X`` is float64 (n, d); ``y`` float64 (regression), int64 class indices
    (classification) or None (task "none", or ``need_target=False``: predicting, when the
    target is not read at all). Rows with a missing feature (policy "drop") or a missing
    target are dropped and counted; ``lines`` are the kept rows' line numbers.
    """
    specs = _specs(layout)
    d = len(layout["features"])
    impute = layout["missing"] == "mean"
    use_y = need_target and layout["task"] != "none"
    classes = {c: i for i, c in enumerate(layout["classes"] or [])}
    flat: list[float] = []
    ys: list[Any] = []
    lines: list[int] = []
    dropped = 0
    for line, rec in rows:
        out = [0.0] * d
        if not _fill(out, rec, specs, impute, name, line):
            dropped += 1
            continue
        if use_y:
            t = _target(rec, layout, classes, name, line)
            if t is None:
                dropped += 1
                continue
            ys.append(t)
        flat += out
        lines.append(line)
    X = np.array(flat, dtype=np.float64).reshape(len(lines), d)
    y = None
    if use_y:
        y = np.array(ys, dtype=np.float64 if layout["task"] == "regression" else np.int64)
    return X, y, dropped, lines
