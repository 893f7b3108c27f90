"""The fast path for plain-number CSV chunks gives exactly what the general, record-by-record
path gives (scan partial, arrays, lines), and steps aside for anything it does not handle."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from pdp.jobs import inputs
from pdp.jobs.builtin.train import _plain
from pdp.train import fastcsv, table


def _general(path: Path, start: int, end: int, header: list[str] | None, line: int) -> list[tuple[int, dict]]:
    return list(inputs.records(str(path), start, end, "csv", name="d.csv", line=line, header=header, numbered=True))


def _cuts(path: Path, chunk: int) -> tuple[list[tuple[int, int, int]], list[str]]:
    from pdp.core.state import _ranges

    splitter = inputs.Splitter("csv", chunk)
    splitter.feed(path.read_bytes())
    found = splitter.finish()
    return _ranges({"size": found["size"], "cuts": found["cuts"]}, chunk), found["header"]


@pytest.mark.parametrize("chunk", [300, 5000, 1 << 20])
def test_the_fast_path_equals_the_general_one(tmp_path: Path, chunk: int) -> None:
    rng = np.random.default_rng(3)
    path = tmp_path / "d.csv"
    x = rng.standard_normal((400, 3)) * [1.0, 1e6, 1e-6]
    with open(path, "w", encoding="utf-8", newline="") as f:
        f.write("a,b,c,label\r\n")
        for k, row in enumerate(x):
            f.write(",".join(repr(float(v)) for v in row) + f",{k % 3 * 5}\r\n")
    ranges, header = _cuts(path, chunk)
    assert len(ranges) > 1 or chunk > os.path.getsize(path)
    fast_parts, slow_parts = [], []
    for start, end, line in ranges:
        spec = {"data_type": "csv", "header": header, "line": line, "name": "d.csv"}
        plain = _plain(str(path), start, end, spec)
        assert plain is not None
        rows = _general(path, start, end, header, line)
        fast_parts.append(fastcsv.scan(plain, "d.csv", sample=50, seed=4))
        slow_parts.append(table.scan_partial(rows, "d.csv", sample=50, seed=4))
        assert fast_parts[-1] == slow_parts[-1]
    merged = fast_parts[0]
    for part in fast_parts[1:]:
        merged = table.merge_scan(merged, part)
    layout = table.make_layout(merged, target="label", features=None, task="classification")
    for start, end, line in ranges:
        spec = {"data_type": "csv", "header": header, "line": line, "name": "d.csv"}
        got = fastcsv.encode(_plain(str(path), start, end, spec), layout)  # type: ignore[arg-type]
        want = table.encode(_general(path, start, end, header, line), layout, "d.csv")
        assert got is not None
        assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])  # type: ignore[arg-type]
        assert got[2:] == want[2:]


@pytest.mark.parametrize("body", ['1,"2"\n', "1,\n", "1,x\n", "1, 2\n", "1,2\n\n3,4\n", "1,2,3\n", "1,inf\n",
                                  "1_0,2\n", "1,2\r3,4\n"])
def test_anything_but_plain_numbers_takes_the_general_path(body: str) -> None:
    assert fastcsv.parse(body.encode(), ["a", "b"], 2) is None


def test_a_category_column_is_encoded_by_the_general_path(tmp_path: Path) -> None:
    plain = fastcsv.parse(b"1,2\n3,4\n", ["a", "b"], 2)
    assert plain is not None
    layout = {"columns": [{"name": "a", "kind": "categorical", "categories": ["1", "3"], "width": 2}],
              "features": ["a=1", "a=3"], "task": "none", "target": None, "classes": None, "missing": "drop"}
    assert fastcsv.encode(plain, layout) is None


def test_stats_of_a_plain_chunk_equal_the_general_ones(tmp_path: Path) -> None:
    from pdp.train import stats

    path = tmp_path / "d.csv"
    path.write_text("a,b\n" + "".join(f"{k * 0.5},{k % 7}\n" for k in range(150)))  # under KLL's k: exact
    ranges, header = _cuts(path, 1 << 20)
    [(start, end, line)] = ranges
    plain = _plain(str(path), start, end, {"data_type": "csv", "header": header, "line": line})
    assert plain is not None
    fast = stats.partial_plain(plain.header, plain.cells, [plain.column(j) for j in range(len(plain.header))])
    assert fast == stats.partial(_general(path, start, end, header, line), "d.csv")
    assert stats.finish(fast)["b"]["distinct"] == 7


def test_class_indexes_by_number_only_when_the_numbers_name_the_labels() -> None:
    from pdp.train.fastcsv import _class_indexes

    got = _class_indexes(np.array([10.0, 0.0, 2.0, 2.0]), ["0", "2", "10"])
    assert got is not None and got.tolist() == [2, 0, 1, 1]
    assert _class_indexes(np.array([1.0]), ["1", "1.0"]) is None  # two labels, one number
    assert _class_indexes(np.array([3.0]), ["0", "2"]) is None  # no such class
    assert _class_indexes(np.array([0.0]), ["0", "red"]) is None  # a text label


def test_a_later_round_reads_the_cells_the_scan_kept(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text("a,b\n" + "".join(f"{k},{k % 2}\n" for k in range(50)))
    spec = {"data_type": "csv", "header": ["a", "b"], "line": 1, "name": "d.csv"}
    first = _plain(str(path), 0, path.stat().st_size, spec, str(tmp_path))
    path.write_text("garbage that would not parse\n")  # from now on only the kept cells can answer
    again = _plain(str(path), 0, 4 + sum(len(f"{k},{k % 2}\n") for k in range(50)), spec, str(tmp_path), reuse=True)
    assert first is not None and again is not None
    assert np.array_equal(first.cells, again.cells) and again.header == ["a", "b"] and again.line == first.line


def test_stats_of_a_chunk_with_text_and_gaps_equal_the_general_ones(tmp_path: Path) -> None:
    from pdp.train import stats

    path = tmp_path / "d.csv"
    path.write_text("a,word,gappy\n" + "".join(f"{k * 0.25},w{k % 5},{'' if k % 4 == 0 else k}\n" for k in range(120))
                    + "7,12,NA\n")
    ranges, header = _cuts(path, 1 << 20)
    [(start, end, line)] = ranges
    spec = {"data_type": "csv", "header": header, "line": line}
    assert _plain(str(path), start, end, spec) is None  # not all numbers: not for training's fast path
    plain = _plain(str(path), start, end, spec, columns=True)
    assert plain is not None and plain.text == {1, 2}
    fast = stats.partial_plain(plain.header, plain.cells, plain.tokens, plain.text)
    assert fast == stats.partial(_general(path, start, end, header, line), "d.csv")


def test_stats_read_in_blocks_equal_the_general_ones(tmp_path: Path) -> None:
    from pdp.jobs.builtin import train
    from pdp.train import stats

    path = tmp_path / "d.csv"
    path.write_text("a,word\n" + "".join(f"{k % 50},w{k % 3}\n" for k in range(3000)))
    ranges, header = _cuts(path, 1 << 20)
    [(start, end, line)] = ranges
    spec = {"data_type": "csv", "header": header, "line": line}
    old = train.STATS_BLOCK
    try:
        train.STATS_BLOCK = 500  # dozens of blocks
        fast = train._plain_stats(str(path), start, end, spec)
    finally:
        train.STATS_BLOCK = old
    assert fast is not None
    want = stats.finish(stats.partial(_general(path, start, end, header, line), "d.csv"))
    got = stats.finish(fast)
    assert list(got) == list(want)
    for col in want:  # merged block by block: the moments to rounding, the quantiles by the sketch
        for key in ("type", "count", "missing", "min", "max", "distinct", "top"):
            assert got[col][key] == want[col][key], (col, key)
        for key in ("mean", "std"):
            assert got[col][key] == (None if want[col][key] is None else pytest.approx(want[col][key], rel=1e-12)), key


def test_array_sums_equal_the_exact_sums_in_fewer_passes() -> None:
    import math
    import random

    rng = random.Random(5)
    cases = [[1e308, 1e308, -1e308], [1e308, 1e308], [5e-324, 1.0], [0.1] * 3, [1e-300, 1e300, -1e300], [0.0, -0.0]]
    cases += [[rng.choice([1, -1]) * rng.random() * 10 ** rng.randint(-20, 20) for _ in range(rng.randint(1, 60))]
              for _ in range(2000)]
    for values in cases:
        assert fastcsv.array_sum(np.array(values)) == table.exact_sum(values), values
    assert table.exact_sum([1e308, 1e308, -1e308]) == [1e308]  # a partial sum past the float range, exactly
    assert table.exact_sum([1e308, 1e308]) == [math.inf]
    scan = table.scan_partial([(k + 2, {"a": repr(v)}) for k, v in enumerate([1e308, 1e308, -1e308])], "d.csv")
    assert math.fsum(scan["columns"]["a"]["sum"]) == 1e308
