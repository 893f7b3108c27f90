"""A text column as word counts: multinomial naive Bayes over documents.

A word is what word count counts (:func:`pdp.jobs.builtin.wordcount.count_words`): a
maximal run of characters for which ``str.isalpha()`` is True, case kept unless the model's
``lowercase`` parameter asks otherwise. A record's document is its text column; an absent
or null value, or an empty string, is an empty document (no words), never a dropped row.
JSON numbers and booleans are their text (which holds no words but ``true``/``false``).

* :func:`partial`: one chunk's per-class document and word counts (a mergeable leaf
  ``{"__w__": 1, "words", "counts"}``, words sorted, counts (words, classes)).
* :func:`merge_words`: two leaves as one (the union of their words; exact).
* :func:`vocabulary`: the ``max_features`` most frequent words of the merged counts.
* :func:`docs`: records as :class:`Docs`, sparse word counts over a model's vocabulary,
  which multiply a (vocabulary, classes) matrix like a dense ``X`` would.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from pdp.errors import InputError
from pdp.jobs.builtin.wordcount import count_words
from pdp.train.table import as_label, is_missing

Rows = Iterable[tuple[int, dict[str, Any]]]


def text_of(v: Any) -> str:
    """A record's text value as the document's string ("" for absent or null)."""
    if v is None:
        return ""
    return v if v.__class__ is str else as_label(v)


def words(text: str, lowercase: bool = False) -> Counter[str]:
    """The word counts of ``text`` (word count's words; lowercased first if asked)."""
    if lowercase:
        text = text.lower()
    data = text.encode("utf-8", "replace")  # a lone surrogate (JSON "\\ud800") is no letter
    return Counter({w.decode("utf-8"): n for w, n in count_words(data).items()})


def _leaf(counts: dict[str, np.ndarray], K: int) -> dict[str, Any]:
    vocab = sorted(counts)
    arr = np.array([counts[w] for w in vocab], dtype=np.int64).reshape(len(vocab), K)
    return {"__w__": 1, "words": vocab, "counts": arr}


def partial(rows: Rows, layout: dict[str, Any], name: str, lowercase: bool = False) -> dict[str, Any]:
    """One chunk's ``{"n", "dropped", "class_count", "words"}``: rows with a missing target
    are dropped; every class's documents are counted at once (joined by newlines, which no
    word crosses)."""
    col, target = layout["text"], layout["target"]
    classes = {c: i for i, c in enumerate(layout["classes"])}
    K = len(classes)
    texts: list[list[str]] = [[] for _ in range(K)]
    dropped = 0
    for line, rec in rows:
        v = rec.get(target)
        if is_missing(v):
            dropped += 1
            continue
        k = classes.get(as_label(v))
        if k is None:
            raise InputError(f"{name} line {line}, column {target!r}: {v!r} is not a class the scan saw")
        texts[k].append(text_of(rec.get(col)))
    counts: dict[str, np.ndarray] = {}
    for k, docs_k in enumerate(texts):
        for w, n in words("\n".join(docs_k), lowercase).items():
            row = counts.get(w)
            if row is None:
                row = counts[w] = np.zeros(K, dtype=np.int64)
            row[k] += n
    class_count = np.array([len(t) for t in texts], dtype=np.float64)
    return {"n": int(class_count.sum()), "dropped": dropped, "class_count": class_count,
            "words": _leaf(counts, K)}


def merge_words(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Two word-count leaves as one: the sorted union of their words, counts added."""
    vocab = sorted(set(a["words"]) | set(b["words"]))
    at = {w: i for i, w in enumerate(vocab)}
    K = max(np.shape(a["counts"])[1], np.shape(b["counts"])[1])
    out = np.zeros((len(vocab), K), dtype=np.int64)
    for leaf in (a, b):
        if len(leaf["words"]):
            out[[at[w] for w in leaf["words"]]] += np.asarray(leaf["counts"], dtype=np.int64)
    return {"__w__": 1, "words": vocab, "counts": out}


def vocabulary(leaf: dict[str, Any], max_features: int) -> tuple[list[str], np.ndarray]:
    """The vocabulary (sorted) and its counts (classes, words): every word when there are at
    most ``max_features``, else the ``max_features`` most frequent over all classes (ties
    to the word that sorts first)."""
    vocab, counts = list(leaf["words"]), np.asarray(leaf["counts"], dtype=np.int64).reshape(len(leaf["words"]), -1)
    if len(vocab) > max_features:
        total = counts.sum(axis=1)
        order = np.lexsort((np.arange(len(vocab)), -total))  # most frequent first, then by word
        keep = np.sort(order[:max_features])
        vocab, counts = [vocab[i] for i in keep], counts[keep]
    return vocab, counts.T.astype(np.float64)


@dataclass
class Docs:
    """Documents as sparse word counts: entry ``i`` is word ``cols[i]`` counted ``counts[i]``
    times in document ``rows[i]``. ``docs @ M`` is the dense ``X @ M`` of ``M`` (words, m)."""

    n: int
    rows: np.ndarray
    cols: np.ndarray
    counts: np.ndarray

    def __len__(self) -> int:
        return self.n

    def __matmul__(self, M: np.ndarray) -> np.ndarray:
        M = np.asarray(M)
        out = np.zeros((self.n, M.shape[1]))
        np.add.at(out, self.rows, M[self.cols] * self.counts[:, None])
        return out


def docs(rows: Rows, layout: dict[str, Any], lowercase: bool = False) -> tuple[Docs, list[int]]:
    """Records as :class:`Docs` over the layout's vocabulary (other words are ignored), and
    their line numbers: every record is a document, none is dropped."""
    col = layout["text"]
    at = {w: i for i, w in enumerate(layout["features"])}
    r: list[int] = []
    c: list[int] = []
    v: list[int] = []
    lines: list[int] = []
    for line, rec in rows:
        for w, n in words(text_of(rec.get(col)), lowercase).items():
            j = at.get(w)
            if j is not None:
                r.append(len(lines))
                c.append(j)
                v.append(n)
        lines.append(line)
    return (Docs(len(lines), np.array(r, dtype=np.int64), np.array(c, dtype=np.int64),
                 np.array(v, dtype=np.float64)), lines)
