"""The fast path for the common training input: a CSV chunk of plain numbers.

:func:`parse` takes a chunk's bytes and gives its cells as a float matrix (numpy's C
reader; a column's text is cut from the bytes only when the scan needs it: a column of few
distinct values, the sampled rows), or None when the chunk is anything but plain: a quote,
a space or tab, a blank line, a ragged row, a value that is not a number (a category, a
missing value), a ``_`` digit separator, a byte that is not ASCII. :func:`parse_columns`
(for ``pdp stats``) also keeps the columns that are not numbers, as text. Anything else the
general path (:mod:`pdp.train.table`, record by record) reads, with the same results:
:func:`scan` gives exactly what :func:`pdp.train.table.scan_partial` gives for these rows
(but for the stand-ins of a column with too many distinct values, see :func:`_values`), and
:func:`encode` what :func:`pdp.train.table.encode` gives. The tests check both against the
general path.
"""

from __future__ import annotations

import heapq
import io
import math
from collections import Counter
from typing import Any

import numpy as np

from pdp.train.table import _CAP, exact_sum, hash64


class Plain:
    """A chunk of plain records: ``cells`` (rows × columns floats), the text of each
    column's cells (``tokens``, or cut from the chunk's ``data`` when asked: :meth:`column`,
    :meth:`record`), the line number of its first row, and ``text``: the columns that are
    not all numbers (their cells are NaN; only :mod:`pdp.train.stats` reads those)."""

    def __init__(self, header: list[str], cells: np.ndarray, tokens: list[list[str]], line: int,
                 text: frozenset[int] = frozenset(), data: bytes = b"") -> None:
        self.header, self.cells, self.tokens, self.line, self.text = header, cells, tokens, line, text
        self.data = data
        self._lines: list[str] | None = None

    @property
    def rows(self) -> int:
        return int(self.cells.shape[0])

    def lines(self) -> list[str]:
        """The records' text, a line each (from ``data``)."""
        if self._lines is None:
            self._lines = self.data.decode("ascii").split("\n") if self.rows else []
        return self._lines

    def column(self, j: int) -> list[str]:
        """Column ``j``'s cells as text."""
        if self.tokens:
            return self.tokens[j]
        if j == len(self.header) - 1:  # (often the target: the labels' text)
            return [ln.rpartition(",")[2] for ln in self.lines()]
        return [ln.split(",", j + 1)[j] for ln in self.lines()]

    def record(self, k: int) -> dict[str, str]:
        """Row ``k`` as the general path reads it: header name -> cell text."""
        if self.tokens:
            return {c: self.tokens[j][k] for j, c in enumerate(self.header)}
        return dict(zip(self.header, self.lines()[k].split(",")))


def parse(data: bytes, header: list[str], line: int) -> Plain | None:
    """``data``: whole records (no header row) starting at ``line``, every cell a finite
    number, parsed by numpy's C reader (``loadtxt``: correctly rounded, as ``float()``);
    None unless the records are plain (see :func:`parse_columns`; here ASCII only, and no
    ``_`` anywhere). The cells' text is cut from ``data`` only when asked."""
    width = len(header)
    if not header or len(set(header)) != width or not data.isascii() or \
            any(b in data for b in (b'"', b" ", b"\t", b"_")):
        return None
    if b"\r" in data:
        data = data.replace(b"\r\n", b"\n")
        if b"\r" in data:
            return None
    body = data.removesuffix(b"\n")
    if not body:
        return Plain(header, np.zeros((0, width)), [], line)
    if body.startswith(b"\n") or b"\n\n" in body:
        return None  # a blank line (numpy would skip it): the general path says where
    try:
        cells = np.loadtxt(io.BytesIO(body), delimiter=",", dtype=np.float64, ndmin=2, comments=None)
    except ValueError:
        return None  # a ragged row, an empty cell or not a number
    if cells.shape != (body.count(b"\n") + 1, width) or not np.isfinite(cells).all():
        return None
    return Plain(header, cells, [], line, data=body)


def parse_columns(data: bytes, header: list[str], line: int) -> Plain | None:
    """``data`` as columns: the numeric ones as floats, the others (a category, a missing
    value, text) marked in ``text``. None unless the records are plain: no quote, space or
    tab, no blank line or ragged row, valid UTF-8, a header naming each column once (the
    general path keeps the last of a repeated name, as a dict does)."""
    if not header or len(set(header)) != len(header) or any(b in data for b in (b'"', b" ", b"\t")):
        return None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return None
    text = text.replace("\r\n", "\n")
    if "\r" in text:
        return None
    text = text.removesuffix("\n")
    if not text:
        return Plain(header, np.zeros((0, len(header))), [[] for _ in header], line)
    n, width = text.count("\n") + 1, len(header)
    flat = text.replace("\n", ",").split(",")
    if len(flat) != n * width:
        return None  # a ragged row, or a blank line: the general path says which
    tokens = [flat[j::width] for j in range(width)]
    del flat
    cells = np.full((n, width), np.nan)
    odd = set()
    for j, col in enumerate(tokens):
        try:
            values = np.array(col, dtype=np.float64)
        except ValueError:
            odd.add(j)
            continue
        if not np.isfinite(values).all() or ("_" in text and any("_" in t for t in col)):
            odd.add(j)  # "inf", "nan", "1_000": not numbers to the general path
            continue
        cells[:, j] = values
    return Plain(header, cells, tokens, line, frozenset(odd))


_CELLS = 6  # 32-bit cells below a column's largest value that array_sum cuts values into


def array_sum(values: np.ndarray) -> list[float]:
    """:func:`pdp.train.table.exact_sum` of ``values``, at numpy's speed. Below the largest
    magnitude ``2**top``, cells of 32 bits: the k-th piece of every value is its remainder's
    integer part in units of ``2**(top - 32 k)`` (below 2**32, so a million of them sum
    exactly in float64), cut off exactly by power-of-two scaling and ``trunc``. The cells'
    sums total the values exactly, and ``exact_sum``'s result depends on that total only.
    Values spread over more than ``_CELLS`` cells, near the float range's ends or not
    finite take ``exact_sum`` itself."""
    v = np.ascontiguousarray(values, dtype=np.float64)
    if not len(v) or not np.isfinite(v).all():
        return exact_sum(v.tolist())
    peak = float(np.max(np.abs(v)))
    if peak == 0.0:
        return []
    top = math.frexp(peak)[1]  # every |value| < 2**top
    cells: list[float] = []
    for at in range(0, len(v), 1 << 20):
        rest = v[at:at + (1 << 20)]
        for k in range(1, _CELLS + 1):
            unit = top - 32 * k
            if unit < -1022:
                return exact_sum(v.tolist())
            piece = np.trunc(rest * 2.0 ** -unit) * 2.0 ** unit
            rest = rest - piece
            with np.errstate(over="ignore"):
                cells.append(float(piece.sum()))
            if not math.isfinite(cells[-1]):  # a cell's sum past the float range (values near 1e308)
                return exact_sum(v.tolist())
            if not rest.any():
                break
        else:
            return exact_sum(v.tolist())
    return exact_sum([c for c in cells if c])


def _values(chunk: Plain, j: int) -> dict[str, int]:
    """Column ``j``'s distinct values with counts, as :func:`pdp.train.table.scan_partial`
    keeps them: exact while there are few. Past ``_CAP`` distinct numbers only their being
    too many is ever read (a numeric feature ignores them; a target or a category of so many
    fails), so any ``_CAP`` of them stand for the rest, without sorting a million strings."""
    values = chunk.cells[:, j]
    distinct = np.unique(values[:4 * _CAP])  # (a prefix tells most columns of many values at once)
    if len(distinct) <= _CAP:
        distinct = np.unique(values)
    if len(distinct) > _CAP:
        return {repr(float(v)): 1 for v in distinct[:_CAP]}
    counts = Counter(chunk.column(j))
    return {k: counts[k] for k in sorted(counts)[:_CAP]}


def scan(chunk: Plain, name: str, *, sample: int = 0, seed: int = 0) -> dict[str, Any]:
    """:func:`pdp.train.table.scan_partial` of the chunk's rows."""
    n = chunk.rows
    cols: dict[str, Any] = {}
    for j, col in enumerate(chunk.header if n else []):
        values = chunk.cells[:, j]
        cols[col] = {"present": n, "missing": 0, "numeric": n, "sum": array_sum(values),
                     "min": float(values.min()), "max": float(values.max()),
                     "cats": {}, "values": _values(chunk, j), "first": [chunk.line, j]}
    kept: list[list[Any]] = []
    if sample > 0 and n:
        keys = ((hash64(seed, name, chunk.line + k), chunk.line + k, k) for k in range(n))
        for key, ln, k in heapq.nsmallest(sample, keys):
            kept.append([key, ln, name, chunk.record(k)])
    return {"rows": n, "columns": cols, "sample_size": sample, "seed": seed, "sample": kept}


def encode(chunk: Plain, layout: dict[str, Any], *, need_target: bool = True
           ) -> tuple[np.ndarray, np.ndarray | None, int, list[int]] | None:
    """:func:`pdp.train.table.encode` of the chunk, or None when a column is categorical
    (the general path one-hot encodes it) or absent."""
    index = {c: k for k, c in enumerate(chunk.header)}
    picks = []
    for column in layout["columns"]:
        if column["kind"] != "numeric" or column["name"] not in index:
            return None
        picks.append(index[column["name"]])
    x = np.ascontiguousarray(chunk.cells[:, picks])
    lines = list(range(chunk.line, chunk.line + chunk.rows))
    if not need_target or layout["task"] == "none":
        return x, None, 0, lines
    target = layout["target"]
    if target not in index:
        return None
    if layout["task"] == "regression":
        return x, chunk.cells[:, index[target]].copy(), 0, lines
    y = _class_indexes(chunk.cells[:, index[target]], layout["classes"] or [])
    return None if y is None else (x, y, 0, lines)


def _class_indexes(values: np.ndarray, classes: list[str]) -> np.ndarray | None:
    """Each row's class index from its target as a number. Exact: the classes are every
    label the scan saw, so when no two of them are the same number ("1" and "1.0"), a
    row's number names its label. None when two do, or a number is no class's."""
    try:
        numbers = [float(c) for c in classes]
    except ValueError:
        return None  # a text label (from a chunk the general path read)
    if len(set(numbers)) != len(numbers):
        return None
    order = np.argsort(numbers)
    ordered = np.asarray(numbers)[order]
    at = np.clip(np.searchsorted(ordered, values), 0, len(ordered) - 1)
    if len(values) and not np.array_equal(ordered[at], values):
        return None
    return np.asarray(order, dtype=np.int64)[at]
