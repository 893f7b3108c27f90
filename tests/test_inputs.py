"""Tests for pdp.jobs.inputs: data types, record-aligned cuts and reading a range's records.

The central property: for every input, every way of feeding it to the Splitter and every
chunk size, reading the records of each resulting range and concatenating them gives the
records of the whole file, which are those of a simple oracle (csv.DictReader, json.loads
per non-blank line, the file's lines).
"""

from __future__ import annotations

import csv
import io
import json
import itertools
import pickle
import warnings
from itertools import pairwise
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from pdp.errors import InputError
from pdp.jobs import inputs
from pdp.jobs.inputs import DATA_TYPES, BadRecord, Splitter, data_type_of, records
from pdp.core.state import _ranges

PROPERTY = settings(  # tmp_path is shared by the examples: each rewrites the file
    max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


# ---------------------------------------------------------------- helpers and oracles


def write(tmp_path: Path, data: bytes, name: str = "input") -> str:
    p = tmp_path / name
    p.write_bytes(data)
    return str(p)


def plan_of(data: bytes, data_type: str, chunk: int, frames: list[int] | None = None) -> dict:
    """Feed ``data`` to a Splitter in frames of the given sizes (cycled), or whole."""
    s = Splitter(data_type, chunk)
    sizes = frames or [max(1, len(data))]
    i = k = 0
    while i < len(data):
        n = sizes[k % len(sizes)]
        s.feed(data[i : i + n])
        i, k = i + n, k + 1
    return s.finish()


def record_starts(data: bytes, data_type: str) -> list[int]:
    """Every record start, byte by byte (slow and obvious)."""
    starts, quotes = [0], 0
    for p in range(1, len(data) + 1):
        quotes += data[p - 1] == ord('"')
        if data[p - 1] == ord("\n") and (data_type != "csv" or quotes % 2 == 0):
            starts.append(p)
    return starts


def expected_cuts(data: bytes, data_type: str, chunk: int) -> list[list[int]]:
    starts, k = record_starts(data, data_type), 1
    cuts: list[list[int]] = []
    while k * chunk < len(data):
        p = next((s for s in starts if s >= k * chunk), len(data))
        if p < len(data) and (not cuts or cuts[-1][0] != p):
            cuts.append([p, data[:p].count(b"\n") + 1])
        k += 1
    return cuts


def ranges(plan: dict) -> list[tuple[int, int, int]]:
    """(start, end, line) of the map tasks of a plan."""
    bounds = [0] + [c for c, _ in plan["cuts"]] + [plan["size"]]
    lines = [1] + [line for _, line in plan["cuts"]]
    return [(a, b, line) for (a, b), line in zip(pairwise(bounds), lines)]


def read_all(path: str, plan: dict, data_type: str, **kw: Any) -> list[tuple[Any, Any]]:
    out: list[tuple[Any, Any]] = []
    for a, b, line in ranges(plan):
        out += records(path, a, b, data_type, name="input", line=line, header=plan.get("header"), **kw)
    return out


def oracle(data: bytes, data_type: str) -> list[tuple[Any, Any]]:
    text = data.decode("utf-8-sig")
    if data_type == "csv":
        return [(None, row) for row in csv.DictReader(io.StringIO(text, newline=""))]
    parts = text.split("\n")
    last = parts.pop()  # not ended by "\n"
    lines = [p.removesuffix("\r") for p in parts] + ([last] if last else [])
    if data_type == "jsonl":
        return [(None, json.loads(line)) for line in lines if line.strip()]
    return [(None, line) for line in lines]


def oracle_header(data: bytes) -> list[str]:
    return csv.DictReader(io.StringIO(data.decode("utf-8-sig"), newline="")).fieldnames or []  # type: ignore[return-value]


def check(tmp_path: Path, data: bytes, data_type: str, chunks: list[int], frames: list[int],
          block: int | None = None) -> None:
    """The whole property for one input: cuts, header, and records of every plan."""
    path = write(tmp_path, data)
    expected = oracle(data, data_type)
    with mock.patch.object(inputs, "BLOCK", block or inputs.BLOCK):
        whole = list(records(path, 0, len(data), data_type, name="input"))
        assert whole == expected
        for chunk in chunks:
            plan = plan_of(data, data_type, chunk, frames)
            assert plan["size"] == len(data)
            assert plan["cuts"] == expected_cuts(data, data_type, chunk)
            if data_type == "csv":
                assert plan["header"] == oracle_header(data)
            else:
                assert "header" not in plan
            assert read_all(path, plan, data_type) == expected


# ---------------------------------------------------------------- generated inputs

newline = st.sampled_from(["\n", "\r\n"])
bom = st.sampled_from([b"", b"", inputs._BOM])
frames = st.lists(st.integers(1, 40), min_size=1, max_size=6)
chunks = st.lists(st.integers(1, 80), min_size=1, max_size=4)
blocks = st.sampled_from([None, 1, 2, 3, 7, 16, 64])


@st.composite
def text_inputs(draw: st.DrawFn) -> bytes:
    lines = draw(st.lists(st.text(st.characters(blacklist_categories=["Cs"], blacklist_characters="\n"),
                                  max_size=30), max_size=12))
    nl = draw(newline)
    data = "".join(line + nl for line in lines)
    if draw(st.booleans()) and data:
        data = data[: -len(nl)]  # no final newline
    return draw(bom) + data.encode("utf-8")


json_leaves = (st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
               | st.text(max_size=8))


def json_containers(inner: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """One level of nesting around ``inner`` (which st.recursive makes json values again)."""
    return st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3)


json_values = st.recursive(json_leaves, json_containers, max_leaves=8)


@st.composite
def jsonl_inputs(draw: st.DrawFn) -> bytes:
    items = draw(st.lists(st.one_of(json_values.map(lambda v: ("value", v)),
                                    st.sampled_from(["", "  ", "\t", " \r"]).map(lambda b: ("blank", b))),
                          max_size=12))
    ascii_only, nl = draw(st.booleans()), draw(newline)
    lines = [json.dumps(v, ensure_ascii=ascii_only) if kind == "value" else v for kind, v in items]
    data = "".join(line + nl for line in lines)
    if draw(st.booleans()) and data:
        data = data[: -len(nl)]
    return draw(bom) + data.encode("utf-8")


csv_field = st.lists(st.sampled_from(["a", "b", "é", " ", ",", '"', '""', "\n", "\r\n", "1", "€"]),
                     max_size=6).map("".join)


@st.composite
def csv_inputs(draw: st.DrawFn) -> bytes:
    n = draw(st.integers(1, 4))
    header = draw(st.lists(csv_field.filter(bool), min_size=n, max_size=n, unique=True))
    rows = draw(st.lists(st.one_of(st.lists(csv_field, min_size=n, max_size=n), st.just(None)), max_size=10))
    nl = draw(newline)
    buf = io.StringIO(newline="")
    writer = csv.writer(buf, lineterminator=nl, quoting=draw(st.sampled_from([csv.QUOTE_MINIMAL, csv.QUOTE_ALL])))
    writer.writerow(header)
    for row in rows:
        if row is None:
            buf.write(nl)  # a blank line: no record
        else:
            writer.writerow(row)
    data = buf.getvalue()
    if draw(st.booleans()):
        data = data[: -len(nl)]
    return draw(bom) + data.encode("utf-8")


@PROPERTY
@given(data=text_inputs(), chunks=chunks, frames=frames, block=blocks)
def test_text_ranges_match_oracle(tmp_path: Path, data: bytes, chunks: list[int], frames: list[int],
                                  block: int | None) -> None:
    check(tmp_path, data, "text", chunks, frames, block)


@PROPERTY
@given(data=jsonl_inputs(), chunks=chunks, frames=frames, block=blocks)
def test_jsonl_ranges_match_oracle(tmp_path: Path, data: bytes, chunks: list[int], frames: list[int],
                                   block: int | None) -> None:
    check(tmp_path, data, "jsonl", chunks, frames, block)


# Reported by a hypothesis run: the cut at the blank last line (offset 32 of 33) must not be missed.
BLANK_LAST_LINE = b'"a","\xc3\xa9","aa","a\xc3\xa9"\n"","","",""\n\n'


@PROPERTY
@given(data=csv_inputs(), chunks=chunks, frames=frames, block=blocks)
@example(data=BLANK_LAST_LINE, chunks=[1], frames=[2], block=None)
def test_csv_ranges_match_oracle(tmp_path: Path, data: bytes, chunks: list[int], frames: list[int],
                                 block: int | None) -> None:
    check(tmp_path, data, "csv", chunks, frames, block)


garbage = st.lists(st.sampled_from([b"a", b",", b'"', b'""', b"\n", b"\r\n", b"\r", b"\xff", b"\xc3\xa9",
                                     b"{", b"}", b"1", b" "]), max_size=40).map(b"".join)


@PROPERTY
@given(data=garbage, data_type=st.sampled_from(DATA_TYPES), chunks=chunks, frames=frames, block=blocks,
       cap=st.sampled_from([None, 4, 9]))
def test_bad_records_are_the_same_however_split(tmp_path: Path, data: bytes, data_type: str, chunks: list[int],
                                                frames: list[int], block: int | None, cap: int | None) -> None:
    """Broken input (stray quotes, invalid UTF-8 and JSON, too long records): reading the
    ranges of any plan skips the same records at the same lines as reading the whole file."""
    path = write(tmp_path, data)
    try:
        header = plan_of(data, data_type, 1).get("header")
    except InputError:  # a csv header that is not valid UTF-8: the input is refused at upload
        return
    with mock.patch.object(inputs, "BLOCK", block or inputs.BLOCK), \
            mock.patch.object(inputs, "MAX_RECORD", cap or inputs.MAX_RECORD):
        bad: list[int] = []
        try:
            whole = list(records(path, 0, len(data), data_type, name="input", skip_bad=True, bad=bad))
        except BadRecord as e:  # only a csv header that cannot be read stops a skipping reader
            assert data_type == "csv" and e.line == 1 and "header row" in e.reason and cap is not None
            return
        assert bad == sorted(set(bad))
        for chunk in chunks:
            plan = plan_of(data, data_type, chunk, frames)
            assert plan.get("header") == header
            got: list[int] = []
            assert read_all(path, plan, data_type, skip_bad=True, bad=got) == whole
            assert got == bad
            if bad:
                with pytest.raises(BadRecord) as info:
                    read_all(path, plan, data_type)
                assert info.value.line == bad[0]


# ---------------------------------------------------------------- fixed inputs

CSV = (b'id,"note\nwith newline",x\r\n'
       b'1,"a\nb",plain\r\n'
       b'2,"say ""hi""\r\nthere",\n'
       b'\n'
       b'3,,"""\n"""\n'
       b'4,"' + b"long " * 40 + b'\n",end')  # a record longer than small chunks, no final newline


@pytest.mark.parametrize("frame", [1, 3, 1 << 20])
def test_csv_every_offset_is_a_chunk_boundary(tmp_path: Path, frame: int) -> None:
    path = write(tmp_path, CSV)
    expected = oracle(CSV, "csv")
    assert [r["id"] for _, r in expected] == ["1", "2", "3", "4"]
    assert expected[1][1]["note\nwith newline"] == 'say "hi"\r\nthere'
    for chunk in range(1, len(CSV) + 1):
        plan = plan_of(CSV, "csv", chunk, [frame])
        assert plan["cuts"] == expected_cuts(CSV, "csv", chunk), chunk
        assert plan["header"] == ["id", "note\nwith newline", "x"]
        assert read_all(path, plan, "csv") == expected, chunk
    # Every cut of chunk 1 is every record start; each range alone is one record (or a blank line).
    plan = plan_of(CSV, "csv", 1, [frame])
    assert [c for c, _ in plan["cuts"]] == record_starts(CSV, "csv")[1:]
    assert [line for _, line in plan["cuts"]] == [3, 5, 7, 8, 10]


def test_csv_cut_lines_count_embedded_newlines() -> None:
    plan = plan_of(CSV, "csv", 1)
    for offset, line in plan["cuts"]:
        assert line == CSV[:offset].count(b"\n") + 1


@pytest.mark.parametrize("data_type", DATA_TYPES)
def test_empty_file(tmp_path: Path, data_type: str) -> None:
    path = write(tmp_path, b"")
    plan = plan_of(b"", data_type, 1)
    assert plan["cuts"] == [] and plan["size"] == 0
    assert plan.get("header", []) == []
    assert ("header" in plan) == (data_type == "csv")
    assert list(records(path, 0, 0, data_type, name="input")) == []
    assert list(records(path, 0, 0, data_type, name="input", header=[])) == []


def test_csv_header_only_and_bom(tmp_path: Path) -> None:
    data = inputs._BOM + b'"a\r\nb",c'
    assert plan_of(data, "csv", 1, [1])["header"] == ["a\r\nb", "c"]
    assert list(records(write(tmp_path, data), 0, len(data), "csv", name="input")) == []
    data = inputs._BOM + b"k,v\r\n1,2\r\n"
    assert list(records(write(tmp_path, data), 0, len(data), "csv", name="input")) == [(None, {"k": "1", "v": "2"})]
    # a header given at start 0 is used; the file's header row is still no record
    assert list(records(write(tmp_path, data), 0, len(data), "csv", name="input", header=["x", "y"])) == [
        (None, {"x": "1", "y": "2"})]


def test_bom_stripped_for_text_and_jsonl(tmp_path: Path) -> None:
    path = write(tmp_path, inputs._BOM + b"hello\r\nworld")
    assert list(records(path, 0, 15, "text", name="input")) == [(None, "hello"), (None, "world")]
    path = write(tmp_path, inputs._BOM + b'{"a": 1}\n')
    assert list(records(path, 0, 12, "jsonl", name="input")) == [(None, {"a": 1})]


def test_text_keeps_lone_cr_and_blank_lines(tmp_path: Path) -> None:
    data = b"a\rb\r\n\n\r\nlast\r"
    assert list(records(write(tmp_path, data), 0, len(data), "text", name="input")) == [
        (None, "a\rb"), (None, ""), (None, ""), (None, "last\r")]


def test_long_line_and_cuts_past_the_end() -> None:
    data = b"x" * 1000 + b"\nshort\n"
    plan = plan_of(data, "text", 10, [7])
    assert plan["cuts"] == [[1001, 2]]  # deduplicated; the start at the size is no cut
    assert plan_of(b"abc\n", "text", 2)["cuts"] == []
    assert plan_of(b"ab\ncd", "text", 3)["cuts"] == [[3, 2]]


# ---------------------------------------------------------------- frame boundaries and blank last lines


def framings(n: int) -> list[list[int]]:
    """Frame sizes putting a frame boundary at every offset: uniform frames of 1..n bytes,
    and one boundary (or a 1-byte frame, so boundaries right before and after that byte)
    at each offset."""
    return ([[f] for f in range(1, n + 1)] + [[k, n] for k in range(1, n)]
            + [[k, 1, n] for k in range(1, n)])


def check_every_split(tmp_path: Path, data: bytes, data_type: str) -> None:
    """``check`` for every chunk size 1..len+1 and every framing of ``framings``: the cuts
    do not depend on the framing, and the records of each chunk size's plan are the oracle's."""
    path = write(tmp_path, data)
    expected = oracle(data, data_type)
    assert list(records(path, 0, len(data), data_type, name="input")) == expected
    for chunk in range(1, len(data) + 2):
        cuts = expected_cuts(data, data_type, chunk)
        for frames in framings(len(data)):
            plan = plan_of(data, data_type, chunk, frames)
            assert (plan["cuts"], plan["size"]) == (cuts, len(data)), (chunk, frames)
            if data_type == "csv":
                assert plan["header"] == oracle_header(data)
        assert read_all(path, plan, data_type) == expected, chunk


def test_regression_csv_blank_last_line_in_2_byte_frames(tmp_path: Path) -> None:
    """The hypothesis report: csv ending in a blank line, fed in 2-byte frames, chunk 1.
    The first "\n" of the final "\n\n" ends the last frame but one, the blank line is alone
    in the last frame: its start (offset 32) is the last cut."""
    data = BLANK_LAST_LINE
    assert len(data) == 33 and data[30:] == b'"\n\n'
    assert record_starts(data, "csv") == [0, 20, 32, 33]
    plan = plan_of(data, "csv", 1, [2])
    assert plan == {"cuts": [[20, 2], [32, 3]], "size": 33, "header": ["a", "é", "aa", "aé"]}
    check(tmp_path, data, "csv", [1], [2])
    check_every_split(tmp_path, data, "csv")


@pytest.mark.parametrize(("data_type", "data"), [
    ("csv", BLANK_LAST_LINE[:-1]),  # no blank line
    ("csv", BLANK_LAST_LINE + b"\n"),  # two blank lines
    ("csv", BLANK_LAST_LINE.replace(b"\n", b"\r\n")),
    ("csv", b'"a","b"\n"1","2"\n\n\n\n'),
    ("csv", b'"a","b"\n"1\n\n",""\n\n'),  # blank lines inside a quoted field, then a real one
    ("csv", b"a,b\n1,2\n\n"),  # no quotes
    ("csv", b"a\n\n"),  # the header, then only a blank line
    ("csv", b"\n"),  # a blank header row
    ("text", b"a\n\n"),
    ("text", b"ab\n\n\n"),
    ("text", b"\n\n"),
    ("text", b"a\r\n\r\n"),
    ("jsonl", b'{"a": 1}\n\n'),
    ("jsonl", b"1\n \n\n"),
    ("jsonl", b'"x"\r\n\r\n'),
])
def test_blank_lines_at_the_end_any_frames_any_chunk(tmp_path: Path, data_type: str, data: bytes) -> None:
    check_every_split(tmp_path, data, data_type)


def test_splitter_exhaustive_small_inputs() -> None:
    """Every input of up to 5 bytes of ``a " \n \r``, every data type, chunk and framing:
    the cuts are those of the byte-by-byte oracle (a csv header that cannot be parsed is
    refused whatever the framing)."""
    for n in range(6):
        for combo in itertools.product([b"a", b'"', b"\n", b"\r"], repeat=n):
            data = b"".join(combo)
            for data_type in DATA_TYPES:
                try:
                    header = plan_of(data, data_type, 1).get("header")
                except InputError as e:
                    header, error = None, str(e)
                else:
                    error = None
                for chunk in range(1, n + 2):
                    cuts = expected_cuts(data, data_type, chunk)
                    for frames in framings(n):
                        try:
                            plan = plan_of(data, data_type, chunk, frames)
                        except InputError as e:
                            assert str(e) == error, (data, data_type, chunk, frames)
                            continue
                        assert error is None, (data, data_type, chunk, frames)
                        assert plan == {"cuts": cuts, "size": n, **({"header": header} if header is not None else {})}, (
                            data, data_type, chunk, frames)


def test_json_values_strategy_recurses() -> None:
    """extend must use its argument (else HypothesisDeprecationWarning: it cannot recurse)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        st.recursive(json_leaves, json_containers, max_leaves=8).validate()


# ---------------------------------------------------------------- bad records


def middle_range(plan: dict, line: int) -> tuple[int, int, int]:
    """The range holding ``line``, which must not be the first range."""
    rs = ranges(plan)
    for i, (a, b, first) in enumerate(rs):
        if first <= line and (i + 1 == len(rs) or line < rs[i + 1][2]):
            assert a > 0
            return a, b, first
    raise AssertionError(f"no range holds line {line}")


def test_bad_json_line_number(tmp_path: Path) -> None:
    lines = [json.dumps({"i": i}) for i in range(20)]
    lines[11] = '{"i": 11'  # line 12
    lines[4] = "   "  # blank lines count as lines
    data = ("\r\n".join(lines) + "\r\n").encode()
    path = write(tmp_path, data)
    with pytest.raises(BadRecord) as info:
        list(records(path, 0, len(data), "jsonl", name="in.jsonl"))
    assert (info.value.name, info.value.line) == ("in.jsonl", 12)
    assert str(info.value).startswith("in.jsonl, line 12: not valid JSON")
    plan = plan_of(data, "jsonl", 50, [13])
    a, b, first = middle_range(plan, 12)
    with pytest.raises(BadRecord) as info:
        list(records(path, a, b, "jsonl", name="in.jsonl", line=first))
    assert info.value.line == 12
    bad: list[int] = []
    got = read_all(path, plan, "jsonl", skip_bad=True, bad=bad)
    assert bad == [12]
    assert [v["i"] for _, v in got] == [i for i in range(20) if i not in (4, 11)]


def test_csv_wrong_field_count_line_number(tmp_path: Path) -> None:
    rows = [b'h1,h2\n'] + [b'%d,"multi\nline"\n' % i for i in range(10)]  # record i starts on line 2 + 2i
    rows[6] = b'5,"multi\nline",extra\n'  # record 5: line 12
    rows[9] = b'only\n'  # record 8: line 18
    data = b"".join(rows)
    path = write(tmp_path, data)
    with pytest.raises(BadRecord) as info:
        list(records(path, 0, len(data), "csv", name="t.csv"))
    assert info.value.line == 12
    assert info.value.reason == "3 fields where the header has 2"
    plan = plan_of(data, "csv", 40, [5])
    a, b, first = middle_range(plan, 12)
    with pytest.raises(BadRecord) as info:
        list(records(path, a, b, "csv", name="t.csv", line=first, header=plan["header"]))
    assert info.value.line == 12
    bad: list[int] = []
    got = read_all(path, plan, "csv", skip_bad=True, bad=bad)
    assert bad == [12, 18]
    assert [r["h1"] for _, r in got] == [str(i) for i in range(10) if i not in (5, 8)]
    bad2: list[int] = []
    assert list(records(path, 0, len(data), "csv", name="t.csv", skip_bad=True, bad=bad2)) == got
    assert bad2 == bad


def test_invalid_utf8_line_and_offset(tmp_path: Path) -> None:
    data = b"".join(b"line %d \xc3\xa9\n" % i for i in range(30))
    at = data.index(b"line 17 ") + 5
    data = data[:at] + b"\xff" + data[at + 1 :]  # line 18
    path = write(tmp_path, data)
    with pytest.raises(BadRecord) as info:
        list(records(path, 0, len(data), "text", name="in.txt"))
    assert info.value.line == 18
    assert info.value.reason == f"not valid UTF-8 (byte {at})"
    plan = plan_of(data, "text", 100, [33])
    a, b, first = middle_range(plan, 18)
    with pytest.raises(BadRecord) as info:
        list(records(path, a, b, "text", name="in.txt", line=first))
    assert (info.value.line, info.value.reason) == (18, f"not valid UTF-8 (byte {at})")
    bad: list[int] = []
    got = read_all(path, plan, "text", skip_bad=True, bad=bad)
    assert bad == [18] and len(got) == 29 and got[17] == (None, "line 18 é")
    # surrogates are not UTF-8 either; an error in a csv field or a json line too
    for data_type, data in [("text", b"ok\n\xed\xa0\x80\n"), ("jsonl", b'1\n"\xed\xa0\x80"\n'),
                            ("csv", b'a\n"x\n\xff"\n')]:
        with pytest.raises(BadRecord, match=r"line 2: not valid UTF-8 \(byte \d+\)"):
            list(records(write(tmp_path, data), 0, len(data), data_type, name="f"))


def test_csv_unbalanced_quote_is_one_bad_record_everywhere(tmp_path: Path) -> None:
    data = b'a,b\n1,2\n3,x"y\n4,5\n6,"7\n8,9\n'  # the stray quote pairs with the one on line 5
    path = write(tmp_path, data)
    bad: list[int] = []
    whole = list(records(path, 0, len(data), "csv", name="f", skip_bad=True, bad=bad))
    assert [r["a"] for _, r in whole] == ["1", "8"] and bad == [3]
    for chunk in range(1, len(data) + 1):
        bad = []
        assert read_all(path, plan_of(data, "csv", chunk), "csv", skip_bad=True, bad=bad) == whole
        assert bad == [3]


def test_record_longer_than_max_is_bad(tmp_path: Path) -> None:
    data = b"short\n" + b"y" * 100 + b"\nafter\n" + b"z" * 50 + b"\nend\n" + b"w" * 60
    path = write(tmp_path, data)
    for block in (1, 7, 64, 1 << 20):
        with mock.patch.object(inputs, "MAX_RECORD", 55), mock.patch.object(inputs, "BLOCK", block):
            with pytest.raises(BadRecord, match="line 2: longer than 55 bytes"):
                list(records(path, 0, len(data), "text", name="f"))
            bad: list[int] = []
            got = list(records(path, 0, len(data), "text", name="f", skip_bad=True, bad=bad))
            assert got == [(None, "short"), (None, "after"), (None, "z" * 50), (None, "end")]
            assert bad == [2, 6]
            for chunk in (1, 10, 33):
                bad = []
                assert read_all(path, plan_of(data, "text", chunk), "text", skip_bad=True, bad=bad) == got
                assert bad == [2, 6]
    csv_data = b'k\n"' + b"q\n" * 40 + b'"\nv\nx,y\n'  # an 83-byte record on lines 2-42, a bad one on 44
    path = write(tmp_path, csv_data)
    for block in (1, 8, 1 << 20):
        with mock.patch.object(inputs, "MAX_RECORD", 60), mock.patch.object(inputs, "BLOCK", block):
            bad = []
            got = list(records(path, 0, len(csv_data), "csv", name="f", skip_bad=True, bad=bad))
            assert got == [(None, {"k": "v"})] and bad == [2, 44]
            for chunk in (1, 10, 50):
                bad = []
                assert read_all(path, plan_of(csv_data, "csv", chunk), "csv", skip_bad=True, bad=bad) == got
                assert bad == [2, 44]


def test_bad_header(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="header row is not valid UTF-8"):
        plan_of(b"a,\xff\n1,2\n", "csv", 4, [2])
    with pytest.raises(InputError, match="header row is not valid UTF-8"):
        plan_of(b"a,\xff", "csv", 4)
    with mock.patch.object(inputs, "MAX_HEADER", 10), pytest.raises(InputError, match="longer than 10"):
        plan_of(b'"a' + b"\n" * 20, "csv", 4, [3])
    data = b"a,\xff\n1,2\n"
    path = write(tmp_path, data)
    with pytest.raises(BadRecord, match="line 1: the header row: not valid UTF-8"):
        list(records(path, 0, len(data), "csv", name="f", skip_bad=True))
    assert list(records(path, 0, len(data), "csv", name="f", header=["x", "y"])) == [(None, {"x": "1", "y": "2"})]


# ---------------------------------------------------------------- API details


def test_data_type_of() -> None:
    assert data_type_of("a/b.CSV") == "csv"
    assert data_type_of("x.jsonl") == data_type_of("x.ndjson") == "jsonl"
    assert data_type_of("x.txt") == data_type_of("README") == data_type_of("x.json") == "text"
    assert data_type_of("x.csv", "text/utf-8") == "text"
    assert data_type_of("x.txt", "csv") == "csv"
    with pytest.raises(InputError, match="text, csv, jsonl"):
        data_type_of("x.txt", "parquet")


def test_bad_record_pickles() -> None:
    e = BadRecord("data/in.csv", 42, "3 fields where the header has 2")
    assert str(e) == "data/in.csv, line 42: 3 fields where the header has 2"
    f = pickle.loads(pickle.dumps(e))
    assert type(f) is BadRecord and isinstance(f, InputError)
    assert (f.name, f.line, f.reason, str(f)) == (e.name, e.line, e.reason, str(e))


def test_argument_checks(tmp_path: Path) -> None:
    path = write(tmp_path, b"a\n1\n")
    with pytest.raises(ValueError):
        Splitter("xml", 10)
    with pytest.raises(ValueError):
        Splitter("text", 0)
    with pytest.raises(ValueError):
        records(path, 2, 4, "csv", name="f")  # no header for a later range: checked at the call
    with pytest.raises(ValueError):
        records(path, 0, 4, "xml", name="f")
    with pytest.raises(InputError, match="did it change"):
        list(records(path, 0, 10, "text", name="f"))


def test_splitter_accepts_memoryview_and_empty_frames() -> None:
    s = Splitter("csv", 3)
    for piece in (b"", memoryview(b'h\n"1\n'), b"", b'"\n2\n'):
        s.feed(piece)  # type: ignore[arg-type]
    assert s.finish() == {"cuts": [[7, 4]], "header": ["h"], "size": 9}
    assert expected_cuts(b'h\n"1\n"\n2\n', "csv", 3) == [[7, 4]]


def test_big_input_in_frames(tmp_path: Path) -> None:
    row = b'%d,"a ""quoted""\nfield",plain text here\r\n'
    data = b"n,q,t\r\n" + b"".join(row % i for i in range(20_000))
    plan = plan_of(data, "csv", 100_000, [1 << 16])
    assert plan["cuts"] == expected_cuts(data, "csv", 100_000)
    path = write(tmp_path, data)
    got = read_all(path, plan, "csv")
    assert len(got) == 20_000 and got[-1] == (None, {"n": "19999", "q": 'a "quoted"\nfield', "t": "plain text here"})


@pytest.mark.parametrize("data_type", ["csv", "jsonl", "text"])
def test_a_fetched_range_reads_as_in_the_whole_file(tmp_path: Path, data_type: str) -> None:
    """A member without the input fetches a map's range into a file of its own, which starts
    at byte 0 but not at the input's start (``base``): its first record is a record, not the
    header row, and no BOM is dropped there. (Every CSV map run on a member that fetched its
    range used to lose its first record.)"""
    rows = {"csv": "a,b\r\n" + "".join(f"{i},x{i}\r\n" for i in range(40)),
            "jsonl": "".join(f'{{"a": {i}}}\n' for i in range(40)),
            "text": "".join(f"line {i}\n" for i in range(40))}[data_type]
    data = inputs._BOM + rows.encode()
    path = write(tmp_path, data)
    plan = plan_of(data, data_type, 37, [len(data)])
    expected = oracle(data, data_type)
    assert list(records(path, 0, len(data), data_type, name="input")) == expected
    got = []
    for k, (start, end, line) in enumerate(_ranges({**plan, "size": len(data)}, 37)):
        chunk = tmp_path / f"chunk-{k}"
        chunk.write_bytes(data[start:end])
        got.extend(records(str(chunk), 0, end - start, data_type, name="input", line=line,
                           header=plan.get("header"), base=start))
    assert got == expected
