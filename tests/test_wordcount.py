"""Tests for the word count job kind: fast kernel vs. a naive oracle, errors, and the full pipeline."""

from __future__ import annotations

import os
import pickle
from collections import Counter
from pathlib import Path

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import zlib

from pdp.jobs import mapoutput
from pdp.jobs import engine, runtime
from pdp.errors import InputError, PdpError
from pdp.jobs.builtin import wordcount as wc
from pdp.core.split import aligned_bounds, plan_ranges

CORPUS = Path(os.environ.get("PDP_CORPUS", "/work/shared/corpus"))


def naive(text: str) -> Counter[bytes]:
    """Char-by-char reference: split on ``not ch.isalpha()``."""
    counts: Counter[bytes] = Counter()
    word: list[str] = []
    for ch in text + " ":
        if ch.isalpha():
            word.append(ch)
        elif word:
            counts["".join(word).encode()] += 1
            word = []
    return counts


SPECIAL = [
    "naïve", "Straße", "日本語", "a\u0301", "\u00ad", "0123456789", "_", "²", "½", "Ωμέγα", "Кириллица",
    "\ufeff", "\u2028", "\r\n", "\t", " ", "'", "-", "ǅ", "ﬁ", "𝔘𝔫𝔦", "😀", "\u200b", "\u0660", "Ⅻ", "ا", "ह\u093f",
]  # fmt: skip
chars = st.one_of(
    st.characters(blacklist_categories=("Cs",)),
    st.characters(min_codepoint=0x20, max_codepoint=0x7E),
    st.sampled_from([c for s in SPECIAL for c in s]),
)
texts = st.lists(st.one_of(st.text(chars, max_size=12), st.sampled_from(SPECIAL)), max_size=30).map("".join)


@settings(max_examples=500, deadline=None)
@given(text=texts)
def test_count_words_matches_naive(text: str) -> None:
    assert wc.count_words(text.encode()) == naive(text)


@pytest.mark.parametrize("text", SPECIAL + [" ".join(SPECIAL), "".join(SPECIAL), "", "a", "Hello, world!\r\n"])
def test_count_words_explicit(text: str) -> None:
    assert wc.count_words(text.encode()) == naive(text)


def test_count_words_examples() -> None:
    got = wc.count_words("naïve a\u0301b x\u00ady 3²½_z \ufeffBOM one\u2028two Straße Straße\r\n".encode())
    want = {"naïve": 1, "a": 1, "b": 1, "x": 1, "y": 1, "z": 1, "BOM": 1, "one": 1, "two": 1, "Straße": 2}
    assert got == Counter({k.encode(): v for k, v in want.items()})


@pytest.mark.parametrize(
    "data, offset",
    [
        (b"abc \xff def", 4),
        (b"abc \xc3", 4),  # truncated sequence at the end
        (b"ok \xe6\x97", 3),
        (b"x\xed\xa0\x80y", 1),  # an encoded surrogate
        ("é".encode() + b"\x80", 2),  # stray continuation byte
        (b"\xc0\xaf", 0),  # overlong
    ],
)
def test_invalid_utf8_offset(data: bytes, offset: int, tmp_path: Path) -> None:
    with pytest.raises(wc.InvalidUtf8) as ei:
        wc.count_words(data)
    assert ei.value.offset == offset
    assert f"byte {offset}" in str(ei.value)
    p = tmp_path / "bad.txt"
    prefix = "héllo wörld\n".encode() * 5
    p.write_bytes(prefix + data)
    for piece in (1, 7, 1 << 22):
        with pytest.raises(wc.InvalidUtf8) as ei:
            wc.count_file_range(str(p), 0, len(prefix) + len(data), piece=piece)
        assert ei.value.offset == len(prefix) + offset



def test_invalid_utf8_is_input_error_and_pickles() -> None:
    e = wc.InvalidUtf8(12, "f.txt")
    assert isinstance(e, InputError)
    e2 = pickle.loads(pickle.dumps(e))
    assert (type(e2), e2.offset, e2.path, str(e2)) == (wc.InvalidUtf8, 12, "f.txt", str(e))


@settings(max_examples=200, deadline=None)
@given(text=texts, piece=st.integers(1, 9), cut=st.data())
def test_count_file_range_pieces(text: str, piece: int, cut: st.DataObject, tmp_path_factory) -> None:
    data = text.encode()
    p = tmp_path_factory.mktemp("r") / "f"
    p.write_bytes(data)
    assert wc.count_file_range(str(p), 0, len(data), piece=piece) == wc.count_words(data)
    # Any sub-range that starts and ends on ASCII non-letters counts the same as its bytes.
    cuts = [i for i in range(len(data) + 1) if i in (0, len(data)) or data[i - 1 : i] in b" \r\n\t.,"]
    a = cut.draw(st.sampled_from(cuts))
    b = cut.draw(st.sampled_from([c for c in cuts if c >= a]))
    assert wc.count_file_range(str(p), a, b, piece=piece) == wc.count_words(data[a:b])


def test_count_file_range_corpus_small_pieces() -> None:
    path = sorted(CORPUS.glob("*.txt"))[0]
    data = path.read_bytes()[:200_000]
    end = 200_000
    assert wc.count_file_range(str(path), 0, end, piece=7) == wc.count_words(data)
    assert wc.count_file_range(str(path), 0, end, piece=4096) == wc.count_words(data)


def test_format_counts_order() -> None:
    words = ["ängel", "Zebra", "apple", "Ängel", "ab", "abc", "a", "日本"]
    out = wc.format_counts({w.encode(): i + 1 for i, w in enumerate(words)})
    lines = out.decode().splitlines(keepends=True)
    assert [ln.split("\t")[0] for ln in lines] == sorted(words)
    assert sorted(words)[:7] == ["Zebra", "a", "ab", "abc", "apple", "Ängel", "ängel"]
    assert lines[0] == "Zebra\t2\n"
    assert out.endswith(b"\n") and out.count(b"\t") == len(words)
    assert wc.format_counts({}) == b""


def test_oracle_names_file_and_offset(tmp_path: Path) -> None:
    good, bad = tmp_path / "good.txt", tmp_path / "bad.txt"
    good.write_bytes("fine text\n".encode())
    bad.write_bytes(b"hello\nw\xf0\x28rld\n")
    with pytest.raises(wc.InvalidUtf8) as ei:
        wc.oracle([str(good), str(bad)])
    assert ei.value.offset == 7 and ei.value.path == str(bad)
    assert str(bad) in str(ei.value) and "byte 7" in str(ei.value)


def test_oracle_small(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_bytes("the Thé the\r\n".encode())
    b.write_bytes("ängel x\u0301 the".encode())
    assert wc.oracle([str(a), str(b)]) == "Thé\t1\nthe\t3\nx\t1\nängel\t1\n".encode()


@pytest.fixture(scope="module")
def corpus_paths() -> list[str]:
    paths = sorted(str(p) for p in CORPUS.glob("*.txt"))
    if not paths:
        pytest.skip(f"no corpus at {CORPUS}")
    return paths


@pytest.fixture(scope="module")
def corpus_oracle(corpus_paths: list[str]) -> bytes:
    return wc.oracle(corpus_paths)


SPEC = {"builtin": "wordcount", "step": 0, "data_type": "text"}


def run_pipeline(paths: list[str], chunk: int, n_reduce: int, work: Path, spec: dict = SPEC) -> bytes:
    """Word count on the engine's task functions, as the party runs them."""
    maps: list[str] = []
    for path in paths:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            bounds = [aligned_bounds(f, s, e, size) for s, e in plan_ranges(size, chunk)]
        for a, b in bounds:
            out = str(work / f"m{len(maps)}")
            stats = runtime.map_task(spec, path, a, b, n_reduce, out)
            assert stats["bytes"] == b - a
            maps.append(out)
    reduced = []
    for r in range(n_reduce):
        out = str(work / f"r{r}")
        # half the partitions read from map output files, half as a fetched concatenation
        concat = work / f"in{r}"
        concat.write_bytes(b"".join(mapoutput.read(m, r) for m in maps[::2]))
        stats = runtime.reduce_task(spec, [(str(concat), -1), *((m, r) for m in maps[1::2])], out)
        assert stats["bytes"] == os.path.getsize(out)
        reduced.append(out)
    final = work / "final"
    stats = runtime.merge_outputs(spec, reduced, str(final))
    data = final.read_bytes()
    assert stats == {"keys": data.count(b"\n"), "bytes": len(data)}
    return data


@pytest.mark.parametrize("chunk, n_reduce", [(1 << 20, 1), (300_000, 3), (123_457, 8)])
def test_pipeline_equals_oracle(
    corpus_paths: list[str], corpus_oracle: bytes, chunk: int, n_reduce: int, tmp_path: Path
) -> None:
    assert run_pipeline(corpus_paths, chunk, n_reduce, tmp_path) == corpus_oracle


def test_map_task_partitions(tmp_path: Path) -> None:
    p = tmp_path / "in"
    p.write_bytes("b a b ä\nc".encode())
    out = str(tmp_path / "map")
    stats = runtime.map_task(SPEC, str(p), 0, p.stat().st_size, 4, out)
    assert (stats["bytes"], stats["records_in"], stats["keys"]) == (p.stat().st_size, 5, 4)
    merged: dict[str, int] = {}
    for i in range(4):
        records = list(engine.read_run(out, mapoutput.offset(out, i)))
        assert records == sorted(records)
        assert all(zlib.crc32(kb) % 4 == i for kb, _ in records)
        merged.update((engine.decode_key(kb), msgpack.unpackb(vb)) for kb, vb in records)
    assert merged == {"a": 1, "b": 2, "ä": 1, "c": 1}
    with pytest.raises(PdpError, match="has 4 partitions"):
        mapoutput.read(out, 4)
    Path(out).write_bytes(b"junk")
    with pytest.raises(PdpError, match="not a map output file"):
        mapoutput.read(out, 0)


def test_oracle_matches_naive_on_corpus_file(corpus_paths: list[str]) -> None:
    path = min(corpus_paths, key=os.path.getsize)
    counts = naive(Path(path).read_bytes().decode())
    assert wc.oracle([path]) == wc.format_counts(counts)
