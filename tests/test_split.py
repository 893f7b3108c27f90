"""Tests for pdp.core.split: fixed-size planning and Hadoop-style line alignment."""

from __future__ import annotations

import io

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pdp.core import split
from pdp.core.split import aligned_bounds, plan_ranges


def owned(data: bytes, chunk: int) -> list[tuple[int, int]]:
    f = io.BytesIO(data)
    return [aligned_bounds(f, s, e, len(data)) for s, e in plan_ranges(len(data), chunk)]


def is_line_start(data: bytes, p: int) -> bool:
    return p == 0 or data[p - 1 : p] == b"\n"


def test_plan_ranges_edges() -> None:
    assert plan_ranges(0, 5) == []
    assert plan_ranges(10, 5) == [(0, 5), (5, 10)]
    assert plan_ranges(11, 5) == [(0, 5), (5, 10), (10, 11)]
    assert plan_ranges(3, 1) == [(0, 1), (1, 2), (2, 3)]
    assert plan_ranges(3, 100) == [(0, 3)]


@pytest.mark.parametrize("size, chunk", [(-1, 5), (5, 0), (5, -2), (1.5, 1), (5, True)])
def test_plan_ranges_rejects_bad_arguments(size: object, chunk: object) -> None:
    with pytest.raises(ValueError):
        plan_ranges(size, chunk)  # type: ignore[arg-type]


def test_empty_file(tmp_path) -> None:
    p = tmp_path / "empty"
    p.write_bytes(b"")
    with open(p, "rb") as f:
        assert aligned_bounds(f, 0, 0, 0) == (0, 0)
        assert aligned_bounds(f, 0, 10, 0) == (0, 0)


def test_single_line_without_newline(tmp_path) -> None:
    p = tmp_path / "one"
    p.write_bytes(b"hello world")
    with open(p, "rb") as f:
        assert [aligned_bounds(f, s, e, 11) for s, e in plan_ranges(11, 4)] == [(0, 11), (11, 11), (11, 11)]


def test_no_trailing_newline() -> None:
    data = b"ab\ncd\nef"
    assert owned(data, 4) == [(0, 6), (6, 8)]
    assert owned(data, 1) == [(0, 3), (3, 3), (3, 3), (3, 6), (6, 6), (6, 6), (6, 8), (8, 8)]


def test_crlf() -> None:
    data = b"ab\r\ncd\r\nef\r\n"
    # The range [0,3) ends on "\r": the CRLF line is owned whole by the first range.
    assert owned(data, 3) == [(0, 4), (4, 8), (8, 12), (12, 12)]


def test_chunk_ending_right_after_newline() -> None:
    data = b"abc\ndef\n"
    assert owned(data, 4) == [(0, 4), (4, 8)]
    f = io.BytesIO(data)
    assert aligned_bounds(f, 4, 8, 8) == (4, 8)
    assert aligned_bounds(f, 3, 4, 8) == (4, 4)  # starts on the "\n": owns nothing


def test_line_longer_than_many_chunks(tmp_path) -> None:
    data = b"x" * 300_000 + b"\nshort\n" + b"y" * 200_000  # longer than the 64 KiB scan block
    p = tmp_path / "long"
    p.write_bytes(data)
    with open(p, "rb") as f:
        got = [aligned_bounds(f, s, e, len(data)) for s, e in plan_ranges(len(data), 50_000)]
    assert got[0] == (0, 300_001)
    assert all(a == b for a, b in got[1:6])  # these start inside the long line: own nothing
    assert b"".join(data[a:b] for a, b in got) == data
    assert [(a, b) for a, b in got if a < b] == [(0, 300_001), (300_001, len(data))]


def test_range_past_end_is_clamped() -> None:
    f = io.BytesIO(b"ab\ncd")
    assert aligned_bounds(f, 2, 100, 5) == (3, 5)
    assert aligned_bounds(f, 5, 100, 5) == (5, 5)


def test_scan_block_boundary(monkeypatch) -> None:
    monkeypatch.setattr(split, "BLOCK", 3)
    data = b"abcdefgh\nij\nklmnopqrstu"
    assert b"".join(data[a:b] for a, b in owned(data, 2)) == data
    assert owned(data, 5)[0] == (0, 9)


line_bytes = st.lists(
    st.one_of(st.just(b"\n"), st.just(b"\r\n"), st.binary(min_size=0, max_size=6)), max_size=40
).map(b"".join)


@settings(max_examples=400, deadline=None)
@given(data=line_bytes, chunk=st.integers(1, 50))
def test_pieces_partition_the_data(data: bytes, chunk: int) -> None:
    pieces = owned(data, chunk)
    pos = 0
    for a, b in pieces:
        assert a <= b
        if a < b:
            assert a == pos, "pieces must be contiguous and in order"
            assert is_line_start(data, a)
            pos = b
    assert pos == len(data)
    assert b"".join(data[a:b] for a, b in pieces) == data
