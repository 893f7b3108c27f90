"""The fast path for the common training input: a CSV chunk of plain numbers.

:func:`parse` takes a chunk's bytes and gives its cells as a float matrix and as the text
tokens, or None when the chunk is anything but plain: a quote, a space or tab, a blank
line, a ragged row, a value that is not a number (a category, a missing value), a ``_``
digit separator. The general path (:mod:`pdp.train.table`, record by record) then reads
it, with the same results: :func:`scan` gives exactly what :func:`pdp.train.table.scan_partial`
gives for these rows (but for the stand-ins of a column with too many distinct values, see
:func:`_values`), and :func:`encode` what :func:`pdp.train.table.encode` gives. The tests
check both against the general path.
"""

from __future__ import annotations

import heapq
from collections import Counter
from typing import Any

import numpy as np

from pdp.train.table import _CAP, exact_sum, hash64


class Plain:
    """A chunk of plain numbers: ``cells`` (rows × columns floats), ``tokens`` (the text of
    each column's cells) and the line number of its first row."""

    def __init__(self, header: list[str], cells: np.ndarray, tokens: list[list[str]], line: int) -> None:
        self.header, self.cells, self.tokens, self.line = header, cells, tokens, line

    @property
    def rows(self) -> int:
        return int(self.cells.shape[0])


def parse(data: bytes, header: list[str], line: int) -> Plain | None:
    """``data``: whole records (no header row) starting at ``line``; None unless plain
    (a header naming a column twice included: the general path keeps the last, as a dict)."""
    if not header or len(set(header)) != len(header) or any(b in data for b in (b'"', b" ", b"\t", b"_")):
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
    rows = text.split("\n")
    flat = text.replace("\n", ",").split(",")
    width = len(header)
    if len(flat) != len(rows) * width:
        return None  # a ragged row, or a blank line: the general path says which
    try:
        cells = np.array(flat, dtype=np.float64).reshape(len(rows), width)
    except ValueError:
        return None
    if not np.isfinite(cells).all():
        return None  # "inf", "nan": text to the general path
    return Plain(header, cells, [flat[j::width] for j in range(width)], line)


def _values(tokens: list[str], values: np.ndarray) -> dict[str, int]:
    """A column's distinct values with counts, as :func:`pdp.train.table.scan_partial`
    keeps them: exact while there are few. Past ``_CAP`` distinct numbers only their being
    too many is ever read (a numeric feature ignores them; a target or a category of so many
    fails), so any ``_CAP`` of them stand for the rest, without sorting a million strings."""
    distinct = np.unique(values)
    if len(distinct) > _CAP:
        return {repr(float(v)): 1 for v in distinct[:_CAP]}
    counts = Counter(tokens)
    return {k: counts[k] for k in sorted(counts)[:_CAP]}


def scan(chunk: Plain, name: str, *, sample: int = 0, seed: int = 0) -> dict[str, Any]:
    """:func:`pdp.train.table.scan_partial` of the chunk's rows."""
    n = chunk.rows
    cols: dict[str, Any] = {}
    for j, col in enumerate(chunk.header if n else []):
        values = chunk.cells[:, j]
        cols[col] = {"present": n, "missing": 0, "numeric": n, "sum": exact_sum(values.tolist()),
                     "min": float(values.min()), "max": float(values.max()),
                     "cats": {}, "values": _values(chunk.tokens[j], values), "first": [chunk.line, j]}
    kept: list[list[Any]] = []
    if sample > 0 and n:
        keys = ((hash64(seed, name, chunk.line + k), chunk.line + k, k) for k in range(n))
        for key, ln, k in heapq.nsmallest(sample, keys):
            kept.append([key, ln, name, {c: chunk.tokens[j][k] for j, c in enumerate(chunk.header)}])
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
