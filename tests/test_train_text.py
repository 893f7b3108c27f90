"""Naive Bayes over a text column, without a party: word count's words, per-class counts
that merge to the same whatever the chunking, the vocabulary cut, sparse documents, and the
parameters and layouts that are refused (and the CLI's message when a model is too big)."""

from __future__ import annotations

import itertools
import json
import random
import subprocess
import sys
from collections import Counter
from functools import reduce
from pathlib import Path

import numpy as np
import pytest

from pdp.errors import ConfigError, InputError
from pdp.jobs.builtin.wordcount import oracle
from pdp.train import models, table, text

LAYOUT = {"columns": [], "features": [], "target": "label", "task": "classification",
          "classes": ["a", "b", "c"], "missing": "drop", "input_columns": ["label", "body"], "text": "body"}


def isalpha_runs(s: str) -> list[str]:
    return ["".join(run) for alpha, run in itertools.groupby(s, str.isalpha) if alpha]


def test_the_words_are_word_counts(corpus: list[Path]) -> None:
    book = corpus[0].read_text(encoding="utf-8")
    got = text.words(book)
    want = dict(line.split("\t") for line in oracle([str(corpus[0])]).decode().splitlines())
    assert got == {w: int(n) for w, n in want.items()}
    assert text.words("Élan élan ÉLAN x²y", lowercase=True) == Counter({"élan": 3, "x": 1, "y": 1})
    assert text.words("a\ud800b") == Counter({"a": 1, "b": 1})  # a lone surrogate (from JSON) is no letter


def _rows(n: int, seed: int = 1) -> list[tuple[int, dict[str, object]]]:
    rng = random.Random(seed)
    vocab = ["alpha", "beta", "Gamma", "delta", "ünïcode", "x"]
    rows: list[tuple[int, dict[str, object]]] = []
    for line in range(2, n + 2):
        body: object = " ".join(rng.choice(vocab) + rng.choice([" ", ",", "-", "1"]) for _ in range(rng.randint(0, 9)))
        if line % 17 == 0:
            body = None  # an empty document
        label: object = rng.choice("abc") if line % 23 else ""  # a missing target drops the row
        rows.append((line, {"label": label, "body": body}))
    return rows


def test_partials_merge_to_the_whole_whatever_the_chunks() -> None:
    rows = _rows(400)
    whole = text.partial(rows, LAYOUT, "d.jsonl")
    for cuts in ([100, 250], [1, 2, 3, 399], list(range(0, 400, 37))):
        bounds = [0, *cuts, len(rows)]
        parts = [text.partial(rows[a:b], LAYOUT, "d.jsonl") for a, b in zip(bounds, bounds[1:])]
        random.Random(len(cuts)).shuffle(parts)
        merged = reduce(models.merge, parts)
        assert merged["words"]["words"] == whole["words"]["words"]
        assert np.array_equal(merged["words"]["counts"], whole["words"]["counts"])
        assert merged["n"] == whole["n"] and merged["dropped"] == whole["dropped"] == sum(1 for ln, _ in rows if ln % 23 == 0)
        assert np.array_equal(merged["class_count"], whole["class_count"])
    by_class = {c: Counter() for c in "abc"}  # the obvious way
    for _, rec in rows:
        if rec["label"]:
            by_class[str(rec["label"])].update(isalpha_runs(str(rec["body"] or "")))
    leaf = whole["words"]
    assert leaf["words"] == sorted(set().union(*by_class.values()))
    for j, c in enumerate("abc"):
        assert [int(v) for v in leaf["counts"][:, j]] == [by_class[c][w] for w in leaf["words"]]


def test_the_vocabulary_keeps_the_most_frequent_words_ties_by_word() -> None:
    leaf = {"__w__": 1, "words": ["a", "b", "c", "d", "e"], "counts": np.array([[1, 0], [3, 3], [2, 0], [0, 2], [5, 0]])}
    vocab, counts = text.vocabulary(leaf, 3)
    assert vocab == ["b", "c", "e"]  # totals 1, 6, 2, 2, 5: b, e, then c before d
    assert counts.tolist() == [[3, 2, 5], [3, 0, 0]]
    assert text.vocabulary(leaf, 10)[0] == leaf["words"]


def test_documents_multiply_like_dense_counts() -> None:
    layout = {**LAYOUT, "features": ["Gamma", "alpha", "beta", "x"]}
    rows = _rows(50)
    found, lines = text.docs(rows, layout)
    assert lines == [ln for ln, _ in rows] and len(found) == 50  # every record, even without words
    dense = np.zeros((50, 4))
    for i, (_, rec) in enumerate(rows):
        for w in isalpha_runs(str(rec["body"] or "")):
            if w in layout["features"]:
                dense[i, layout["features"].index(w)] += 1
    M = np.random.default_rng(0).normal(size=(4, 3))
    assert np.allclose(found @ M, dense @ M, rtol=0, atol=1e-12)


def test_text_parameters_are_checked() -> None:
    params = models.check_params("naive-bayes", {"text": "body"})
    assert params["kind"] == "multinomial" and params["max_features"] == 10000 and params["lowercase"] is False
    for bad, why in (({"text": "body", "kind": "gaussian"}, "multinomial"),
                     ({"max_features": 5}, "needs text=COLUMN"),
                     ({"text": "body", "max_features": 0}, "max_features"),
                     ({"text": "body", "lowercase": "yes"}, "lowercase"),
                     ({"text": 3}, "name a column")):
        with pytest.raises(ConfigError, match=why):
            models.check_params("naive-bayes", bad)


def _scan(rows: list[tuple[int, dict[str, object]]]) -> dict[str, object]:
    return table.scan_partial(rows, "d.jsonl")


def test_a_text_layout_has_no_feature_columns_whatever_the_distinct_values() -> None:
    rows = [(k + 2, {"label": "ab"[k % 2], "body": f"doc number {k} " + "w" * (k % 50 + 1)}) for k in range(3000)]
    scan = _scan(rows)
    layout = table.make_layout(scan, target="label", features=None, task="classification", text="body")
    assert layout["columns"] == [] and layout["text"] == "body" and layout["classes"] == ["a", "b"]
    with pytest.raises(InputError, match="more than 1000 distinct"):  # as a categorical feature it fails
        table.make_layout(scan, target="label", features=None, task="classification")
    for kwargs, why in (({"text": "nope"}, "text column 'nope' is not in the input"),
                        ({"text": "label"}, "is the target"),
                        ({"text": "body", "features": ["body"]}, "leave out --features")):
        args = {"target": "label", "features": None, "task": "classification", **kwargs}
        with pytest.raises(InputError, match=why):
            table.make_layout(scan, **args)  # type: ignore[arg-type]


def test_a_model_too_big_for_the_log_fails_saying_what_to_lower(tmp_path: Path) -> None:
    rng = random.Random(3)
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = ["".join(rng.choice(letters) for _ in range(8)) for _ in range(30000)]
    data = tmp_path / "many.jsonl"
    data.write_text("".join(json.dumps({"label": f"c{k % 12}", "body": " ".join(words[k * 10:(k + 1) * 10])}) + "\n"
                            for k in range(3000)))
    out = tmp_path / "m.json"
    done = subprocess.run([sys.executable, "-m", "pdp", "run", "train", str(data), "-o", str(out), "--",
                           "--algorithm", "naive-bayes", "--target", "label", "--param", "text=body",
                           "--param", "max_features=100000"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and not out.exists()
    assert "MiB; a round's model may be at most 1 MiB" in done.stderr and "lower --param max_features" in done.stderr
    done = subprocess.run([sys.executable, "-m", "pdp", "run", "train", str(data), "-o", str(out), "--",
                           "--algorithm", "naive-bayes", "--target", "label", "--param", "text=body",
                           "--param", "max_features=2000"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert len(json.loads(out.read_text())["features"]) == 2000
