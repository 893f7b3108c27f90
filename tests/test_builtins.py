"""The built-in jobs grep, indexer and sort: `pdp run` (pdp.jobs.local) and the runtime's task
functions (several record-aligned maps per input, 1 or 3 reduces, the merge), each equal to
the job's sequential oracle byte for byte, on the corpus and on generated edge cases."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from pdp.jobs import mapoutput
from pdp.errors import InputError
from pdp.jobs import engine, inputs, runtime
from pdp.jobs.api import JobDefinitionError
from pdp.jobs.builtin import BUILTINS, grep, indexer
from pdp.jobs.builtin import sort as sortjob
from pdp.jobs.keys import encode_key
from pdp.jobs.loader import load_job
from pdp.jobs.local import run_job
from pdp.core.split import aligned_bounds, plan_ranges

CORPUS = Path(os.environ.get("PDP_CORPUS", "/work/shared/corpus"))
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def corpus_paths() -> list[str]:
    paths = sorted(str(p) for p in CORPUS.glob("*.txt"))
    if not paths:
        pytest.skip(f"no corpus at {CORPUS}")
    return paths


@pytest.fixture(scope="module")
def corpus_small(corpus_paths: list[str]) -> list[str]:
    """Three corpus files (the sort and indexer pipelines run several times)."""
    return sorted(corpus_paths, key=os.path.getsize)[:3]


def local(kind: str, args: list[str], paths: list[str], data_type: str | None = None) -> bytes:
    cls = BUILTINS[kind]
    buf = io.BytesIO()
    run_job(lambda: cls(list(args)), [Path(p) for p in paths], buf, data_type)
    return buf.getvalue()


def map_ranges(path: str, data_type: str, chunk: int) -> tuple[list[tuple[int, int, int]], list[str] | None]:
    """The record-aligned ``(start, end, line at start)`` ranges of one input (and a csv's
    header): plan_ranges + aligned_bounds for lines; for csv the Splitter's record cuts."""
    data = Path(path).read_bytes()
    size = len(data)
    if data_type == "csv":
        splitter = inputs.Splitter("csv", chunk)
        splitter.feed(data)
        done = splitter.finish()
        starts = [(0, 1)] + [(c[0], c[1]) for c in done["cuts"]]
        ends = [c[0] for c in done["cuts"]] + [size]
        return [(a, b, line) for (a, line), b in zip(starts, ends)], done["header"]
    out = []
    with open(path, "rb") as f:
        for s, e in plan_ranges(size, chunk):
            a, b = aligned_bounds(f, s, e, size)
            if a < b:
                out.append((a, b, 1 + data.count(b"\n", 0, a)))
    return out, None


def pipeline(kind: str, args: list[str], paths: list[str], chunk: int, n_reduce: int, work: Path,
             data_type: str = "text") -> tuple[bytes, list[str]]:
    """The job on the runtime's task functions, as the party runs them; returns the merged
    output and the reduce outputs (one sorted run per partition)."""
    base = {"builtin": kind, "args": list(args), "step": 0, "data_type": data_type}
    maps: list[str] = []
    for index, path in enumerate(paths):
        ranges, header = map_ranges(path, data_type, chunk)
        for a, b, line in ranges:
            spec = {**base, "name": path, "input_index": index, "line": line}
            if header is not None:
                spec["header"] = header
            out = str(work / f"m{len(maps)}")
            stats = runtime.map_task(spec, path, a, b, n_reduce, out)
            assert stats["bytes"] == b - a
            maps.append(out)
    reduced = []
    for r in range(n_reduce):
        out = str(work / f"r{r}")
        concat = work / f"in{r}"  # half the partitions as a fetched concatenation
        concat.write_bytes(b"".join(mapoutput.read(m, r) for m in maps[::2]))
        stats = runtime.reduce_task(base, [(str(concat), -1), *((m, r) for m in maps[1::2])], out)
        assert stats["bytes"] == os.path.getsize(out)
        reduced.append(out)
    final = work / "final"
    stats = runtime.merge_outputs(base, reduced, str(final))
    data = final.read_bytes()
    assert stats == {"keys": data.count(b"\n"), "bytes": len(data)}
    return data, reduced


def write(path: Path, data: bytes | str) -> str:
    path.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    return str(path)


@pytest.fixture()
def edge_files(tmp_path: Path) -> list[str]:
    """Text edge cases: empty, no final newline, CRLF, a lone CR, a BOM, blank lines, non-ASCII."""
    d = tmp_path / "edge"
    d.mkdir()
    return [
        write(d / "empty.txt", b""),
        write(d / "nonl.txt", "first line\nthe last line has no newline"),
        write(d / "crlf.txt", "Straße and naïve\r\nline two\r\n\r\nthe end\r\n"),
        write(d / "cr.txt", "a lone\rcarriage return\nand\r\n"),
        write(d / "bom.txt", "\ufeffBOM first word\nsecond\n"),
        write(d / "uni.txt", "日本語 Ωμέγα Кириллица naïve\n\n\nx\u0301y ½ 3²\nthe THE The\n" * 3),
    ]


# -- grep ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("args, kw", [
    (["Holmes"], {}),
    (["-i", r"\bwhale|monster\b"], {"ignore_case": True, "pattern": r"\bwhale|monster\b"}),
    (["-e", "^$"], {"pattern": "^$"}),
])
def test_grep_local_corpus(corpus_paths: list[str], args: list[str], kw: dict[str, Any]) -> None:
    kw = {"pattern": args[-1], **kw}
    want = grep.oracle(corpus_paths, **kw)
    assert want.count(b"\n") > 10
    assert local("grep", args, corpus_paths) == want


def test_grep_pipeline_corpus(corpus_paths: list[str], tmp_path: Path) -> None:
    want = grep.oracle(corpus_paths, "[Ww]atson|Dorian")
    for n_reduce in (1, 3):
        work = tmp_path / f"n{n_reduce}"
        work.mkdir()
        got, _ = pipeline("grep", ["[Ww]atson|Dorian"], corpus_paths, 150_000, n_reduce, work)
        assert got == want


def test_grep_edge_cases(edge_files: list[str], tmp_path: Path) -> None:
    cases: list[tuple[list[str], dict[str, Any]]] = [
        (["e"], {"pattern": "e"}), (["-v", "e"], {"pattern": "e", "invert": True}),
        (["^"], {"pattern": "^"}), (["-F", "."], {"pattern": ".", "fixed": True}),
        (["-i", "straSSE|the"], {"pattern": "straSSE|the", "ignore_case": True}),
        (["\r"], {"pattern": "\r"}), (["^BOM"], {"pattern": "^BOM"}), (["x\u0301"], {"pattern": "x\u0301"}),
    ]
    for args, kw in cases:
        want = grep.oracle(edge_files, **kw)
        assert local("grep", args, edge_files) == want, args
        for n_reduce in (1, 3):
            work = tmp_path / f"w{len(list(tmp_path.iterdir()))}"
            work.mkdir()
            assert pipeline("grep", args, edge_files, 7, n_reduce, work)[0] == want, (args, n_reduce)
    out = grep.oracle(edge_files, "^")
    assert f"{edge_files[1]}:2:the last line has no newline\n".encode() in out
    assert f"{edge_files[2]}:1:Straße and naïve\n".encode() in out  # no \r kept
    assert f"{edge_files[3]}:1:a lone\rcarriage return\n".encode() in out  # a lone \r is data
    assert f"{edge_files[4]}:1:BOM first word\n".encode() in out
    assert grep.oracle(edge_files, "^BOM") == f"{edge_files[4]}:1:BOM first word\n".encode()


def test_grep_errors(tmp_path: Path) -> None:
    with pytest.raises(JobDefinitionError, match="invalid regular expression"):
        grep.Grep(["a(b"])
    with pytest.raises(JobDefinitionError, match="invalid regular expression"):
        load_job({"builtin": "grep", "args": ["[z-a]"]})
    with pytest.raises(JobDefinitionError, match="needs a pattern"):
        grep.Grep([])
    assert grep.Grep(["--regexp=-x"]).search("a-x") is not None
    assert grep.Grep(["-i", "--", "-X"]).search("a-x") is not None
    p = write(tmp_path / "a.txt", "abc\n")
    with pytest.raises(JobDefinitionError, match="invalid regular expression"):
        runtime.map_task({"builtin": "grep", "args": ["*"], "data_type": "text"}, p, 0, 4, 1, str(tmp_path / "m"))


def test_grep_cli(corpus_paths: list[str], tmp_path: Path) -> None:
    path = min(corpus_paths, key=os.path.getsize)
    proc = subprocess.run([sys.executable, "-m", "pdp", "run", "grep", path, "--", "Gregor|Ernest"],
                          cwd=REPO, capture_output=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr.decode()
    want = grep.oracle([path], "Gregor|Ernest")
    assert want and proc.stdout == want


# -- indexer -----------------------------------------------------------------------------------------


def test_indexer_corpus(corpus_paths: list[str], corpus_small: list[str], tmp_path: Path) -> None:
    want = indexer.oracle(corpus_paths)
    assert b"Holmes\t" in want
    assert local("indexer", [], corpus_paths) == want
    assert pipeline("indexer", [], corpus_paths, 1 << 20, 1, tmp_path)[0] == want
    work = tmp_path / "n3"
    work.mkdir()
    assert pipeline("indexer", [], corpus_small, 100_000, 3, work)[0] == indexer.oracle(corpus_small)


def test_indexer_edge_cases(edge_files: list[str], tmp_path: Path) -> None:
    paths = edge_files + [edge_files[2]]  # the same document twice counts once
    want = indexer.oracle(paths)
    assert local("indexer", [], paths) == want
    for n_reduce in (1, 3):
        work = tmp_path / f"n{n_reduce}"
        work.mkdir()
        assert pipeline("indexer", [], paths, 5, n_reduce, work)[0] == want
    lines = want.decode().splitlines()
    assert f"the\t3 {','.join(sorted([edge_files[1], edge_files[2], edge_files[5]]))}" in lines
    assert f"Straße\t1 {edge_files[2]}" in lines
    assert f"x\t1 {edge_files[5]}" in lines and f"y\t1 {edge_files[5]}" in lines  # a combining mark splits
    assert f"BOM\t1 {edge_files[4]}" in lines
    assert [ln.split("\t")[0] for ln in lines] == sorted(ln.split("\t")[0] for ln in lines)


def test_indexer_oracle_small(tmp_path: Path) -> None:
    a = write(tmp_path / "a", "the cat, the hat\n")
    b = write(tmp_path / "b", "a cat\r\n")
    assert indexer.oracle([a, b]) == f"a\t1 {b}\ncat\t2 {a},{b}\nhat\t1 {a}\nthe\t1 {a}\n".encode()
    assert local("indexer", [], [b, a]) == indexer.oracle([b, a])


# -- sort --------------------------------------------------------------------------------------------


def corpus_cuts(paths: list[str], args: list[str], n: int, data_type: str = "text") -> list[Any]:
    keys: list[Any] = []
    for p in paths:
        keys.extend(sortjob.sample_keys(p, os.path.getsize(p), data_type, args, None, k=300))
    return sortjob.sample_cuts(keys, n)


def check_ranges(reduced: list[str], merged: bytes, args: list[str]) -> None:
    """The reduce outputs are consecutive ranges: their concatenation is the merged output."""
    write_line = sortjob.SortProtocol().write
    concat = b"".join(write_line(engine.decode_key(rec[0]), None) + b"\n"
                      for path in reduced for rec in engine.read_run(path, 0))
    assert concat == merged, args


@pytest.mark.parametrize("args", [[], ["--field", "1"]])
def test_sort_corpus(corpus_small: list[str], tmp_path: Path, args: list[str]) -> None:
    want = sortjob.oracle(corpus_small, args)
    assert local("sort", args, corpus_small) == want
    cuts = corpus_cuts(corpus_small, args, 3)
    assert len(cuts) == 2
    with_cuts = args + sortjob.cuts_arg(cuts)
    for n_reduce, job_args in ((1, args), (3, with_cuts), (3, args)):
        work = tmp_path / f"w{len(list(tmp_path.iterdir()))}"
        work.mkdir()
        got, reduced = pipeline("sort", job_args, corpus_small, 250_000, n_reduce, work)
        assert got == want
        sizes = [sum(1 for _ in engine.read_run(r, 0)) for r in reduced]
        if job_args is with_cuts:
            assert all(sizes), sizes  # every range got a share
            assert max(sizes) < 3 * min(sizes), sizes
            check_ranges(reduced, got, job_args)
        elif n_reduce == 3:
            assert sizes[1:] == [0, 0]  # no cuts: everything in partition 0


NUMBERS = "3\n-1.5\n10\n2\n-0\n0\n1e2\n  7  \n-1.5\n2.0\ninf\n-inf\n0.1\n3\n"


def test_sort_numeric_text(tmp_path: Path) -> None:
    a = write(tmp_path / "a.txt", NUMBERS)
    b = write(tmp_path / "b.txt", "x 5\ny -2\r\nz 5\nw 5.0\nv -2")
    for args, paths in ((["-n"], [a]), (["--numeric", "--field", "2"], [b]), ([], [a, b]), (["--field", "2"], [b])):
        want = sortjob.oracle(paths, args)
        assert local("sort", args, paths) == want, args
        cuts = sortjob.sample_cuts([k for p in paths for k in sortjob.sample_keys(p, os.path.getsize(p), "text",
                                                                                 args, None)], 3)
        for n_reduce, job_args in ((1, args), (3, args + sortjob.cuts_arg(cuts))):
            work = tmp_path / f"w{len(list(tmp_path.iterdir()))}"
            work.mkdir()
            got, reduced = pipeline("sort", job_args, paths, 4, n_reduce, work)
            assert got == want, job_args
            check_ranges(reduced, got, job_args)
    assert sortjob.oracle([a], ["-n"]).decode().split("\n")[:4] == ["-inf", "-1.5", "-1.5", "-0"]
    assert sortjob.oracle([a], ["-n"]).decode().split("\n")[4:7] == ["0", "0.1", "2"]  # -0 == 0: by text
    assert sortjob.oracle([b], ["-n", "--field", "2"]) == b"v -2\ny -2\nw 5.0\nx 5\nz 5\n"


def test_sort_duplicates_and_edges(edge_files: list[str], tmp_path: Path) -> None:
    dup = write(tmp_path / "dup.txt", "b\na\nb\r\na\n\nb\nc")
    paths = edge_files + [dup]
    for args in ([], ["--field", "2"]):
        want = sortjob.oracle(paths, args)
        assert local("sort", args, paths) == want
        for n_reduce in (1, 3):
            work = tmp_path / f"w{len(list(tmp_path.iterdir()))}"
            work.mkdir()
            cuts = sortjob.cuts_arg(["b", "the"]) if n_reduce == 3 else []
            got, reduced = pipeline("sort", args + cuts, paths, 6, n_reduce, work)
            assert got == want
            if cuts:
                check_ranges(reduced, got, args)
    assert sortjob.oracle([dup], []) == b"\na\na\nb\nb\nb\nc\n"


CSV = ('name,age,city\r\n'
       'ann,31,Oslo\r\n'
       'bob,9,"Paris, France"\r\n'
       '"Zoë ""Z""",31,"multi\nline"\r\n'
       '\r\n'
       'dan,-4.5,Köln\r\n'
       'eve,100,Oslo\r\n'
       'ann,31,Bergen\r\n')


def test_sort_csv(tmp_path: Path) -> None:
    a = write(tmp_path / "people.csv", "\ufeff" + CSV)
    b = write(tmp_path / "more.csv", "name,age,city\nfay,7,Rome\ngus,31,Oslo")
    for args in (["--key", "name"], ["--key", "age", "--numeric"], ["--key", "city"], ["--key", "age"]):
        want = sortjob.oracle([a, b], args)
        assert want.count(b"\n") == 8
        assert local("sort", args, [a, b]) == want, args
        keys = [k for p in (a, b) for k in sortjob.sample_keys(p, os.path.getsize(p), "csv", args, None)]
        cuts = sortjob.sample_cuts(keys, 3)
        for n_reduce, job_args in ((1, args), (3, args + sortjob.cuts_arg(cuts))):
            work = tmp_path / f"w{len(list(tmp_path.iterdir()))}"
            work.mkdir()
            got, reduced = pipeline("sort", job_args, [a, b], 20, n_reduce, work, "csv")
            assert got == want, job_args
            check_ranges(reduced, got, job_args)
    lines = sortjob.oracle([a, b], ["--key", "age", "-n"]).decode().splitlines()
    assert [json.loads(x)["age"] for x in lines] == ["-4.5", "7", "9", "31", "31", "31", "31", "100"]
    assert lines[0] == '{"name":"dan","age":"-4.5","city":"Köln"}'
    # ties: input order first, then the record's text ("Z" < "a")
    assert [json.loads(x)["city"] for x in lines[3:7]] == ["multi\nline", "Bergen", "Oslo", "Oslo"]
    assert json.loads(lines[6])["name"] == "gus"


JSONL = ('{"id": 3, "v": "b"}\n'
         '{"id": -1, "v": null}\n'
         '\n'
         '{"id": 2.5, "v": true}\r\n'
         '{"id": 2, "v": [1, 2]}\n'
         '{"id": 10, "w": 1}\n'
         '{"id": 0, "v": "ä"}\n'
         '{"id": 7, "v": 1e3}\n'
         '{"id": 3, "v": false}\n'
         '  {"id": 1, "v": {"k": 1}}  ')


def test_sort_jsonl(tmp_path: Path) -> None:
    a = write(tmp_path / "a.jsonl", JSONL)
    b = write(tmp_path / "b.jsonl", '{"id": 3, "v": "a"}\n{"id": -0.0, "v": -5}\n')
    for args in (["--key", "id"], ["--key", "id", "-n"], ["--key", "v"]):
        want = sortjob.oracle([a, b], args)
        assert want.count(b"\n") == 11
        assert local("sort", args, [a, b]) == want, args
        keys = [k for p in (a, b) for k in sortjob.sample_keys(p, os.path.getsize(p), "jsonl", args, None)]
        cuts = sortjob.sample_cuts(keys, 3)
        assert len(cuts) == 2
        for n_reduce, job_args in ((1, args), (3, args + sortjob.cuts_arg(cuts))):
            work = tmp_path / f"w{len(list(tmp_path.iterdir()))}"
            work.mkdir()
            got, reduced = pipeline("sort", job_args, [a, b], 16, n_reduce, work, "jsonl")
            assert got == want, job_args
            check_ranges(reduced, got, job_args)
    ids = [json.loads(x)["id"] for x in sortjob.oracle([a, b], ["--key", "id"]).decode().splitlines()]
    assert ids == [-1, 0, -0.0, 1, 2, 2.5, 3, 3, 3, 7, 10]
    vs = [json.loads(x).get("v", "MISSING") for x in sortjob.oracle([a], ["--key", "v"]).decode().splitlines()]
    assert vs == [None, "MISSING", False, True, 1000.0, "b", "ä", [1, 2], {"k": 1}]


def test_sort_errors(tmp_path: Path) -> None:
    p = write(tmp_path / "t.txt", "1\n2\nthree\n")
    with pytest.raises(InputError, match="'three' in .*t.txt is not a number"):
        local("sort", ["-n"], [p])
    with pytest.raises(InputError, match="'three'"):
        sortjob.oracle([p], ["-n"])
    with pytest.raises(InputError, match="not a number"):
        runtime.map_task({"builtin": "sort", "args": ["-n"], "data_type": "text", "name": p}, p, 0,
                         os.path.getsize(p), 2, str(tmp_path / "m"))
    with pytest.raises(InputError, match="NaN"):
        local("sort", ["-n"], [write(tmp_path / "nan.txt", "nan\n")])
    with pytest.raises(InputError, match="use --field"):
        local("sort", ["--key", "x"], [p])
    c = write(tmp_path / "c.csv", "a,b\n1,2\n")
    with pytest.raises(InputError, match="--key NAME"):
        local("sort", [], [c])
    with pytest.raises(InputError, match="no field 'z'"):
        local("sort", ["--key", "z", "-n"], [c])
    with pytest.raises(JobDefinitionError, match="not both"):
        sortjob.Sort(["--key", "a", "--field", "1"])
    with pytest.raises(JobDefinitionError, match="--cuts is not JSON"):
        sortjob.Sort(["--cuts", "[1,"])
    with pytest.raises(JobDefinitionError, match="bad --cuts"):
        sortjob.Sort(["-n", "--cuts", '["a"]'])
    with pytest.raises(JobDefinitionError, match="from 1"):
        load_job({"builtin": "sort", "args": ["--field", "0"]})


def test_sort_partition() -> None:
    job = sortjob.Sort(["--cuts", json.dumps(["b", "d"])])

    def part(key: Any) -> int:
        return job.partition(encode_key([key, 0, "x"]), 3)

    assert [part(k) for k in ["", "a", "azzz", "b", "b\x00", "c", "d", "d\x00", "zz", "日本"]] == \
        [0, 0, 0, 1, 1, 1, 2, 2, 2, 2]
    assert job.partition(encode_key(["z", 0, "x"]), 2) == 1  # more cuts than partitions: the last one
    nocuts = sortjob.Sort([])
    assert {nocuts.partition(encode_key([k, 0, k]), 4) for k in "abcxyz"} == {0}
    num = sortjob.Sort(["-n", "--cuts", "[-1, 2.5]"])
    assert [num.partition(encode_key([float(k), 1, "x"]), 3) for k in (-5, -1, 0, 2.5, 1e9)] == [0, 1, 1, 2, 2]


def test_sample_cuts() -> None:
    assert sortjob.sample_cuts([], 3) == []
    assert sortjob.sample_cuts(list("abc"), 1) == []
    assert sortjob.sample_cuts([str(i) for i in range(10, 100)], 3) == ["40", "70"]
    assert sortjob.sample_cuts(["a"] * 50, 4) == []  # one key: nothing to cut
    cuts = sortjob.sample_cuts([""] * 60 + list("abcdefghijklmnopqrst") * 2, 3)
    assert cuts and cuts[0] == "a" and cuts == sorted(set(cuts))  # the smallest key is never a cut
    assert sortjob.sample_cuts([3.0, -1.0, 2.0, 0.0, 1.0, 5.0], 3) == [1.0, 3.0]
    assert len(sortjob.sample_cuts([float(i) for i in range(1000)], 8)) == 7
    long = sortjob.sample_cuts(["a" * 300 + "b", "a" * 300 + "c", "a" * 300 + "d", "b" * 400], 3)
    assert long == ["a" * 256, "b" * 256]  # long strings: their prefixes (the order kept, duplicates merged)
    cuts = sortjob.sample_cuts([float("-inf"), 1.0, float("inf"), float("inf")], 2)
    assert sortjob.Sort(["-n", *sortjob.cuts_arg(cuts)]).cuts == cuts == [float("inf")]


def test_sample_keys(tmp_path: Path) -> None:
    p = write(tmp_path / "s.csv", "k,v\n" + "".join(f"{i % 17},x{i}\n" for i in range(2000)))
    keys = sortjob.sample_keys(p, os.path.getsize(p), "csv", ["--key", "k", "-n"], None, k=100)
    assert 80 <= len(keys) <= 100 and all(isinstance(k, float) and 0 <= k < 17 for k in keys)
    keys = sortjob.sample_keys(p, os.path.getsize(p), "csv", ["--key", "v"], ["k", "v"], k=50)
    assert keys and all(k.startswith("x") for k in keys)
    t = write(tmp_path / "t.txt", "".join(f"line {i}\n" for i in range(100)))
    keys = sortjob.sample_keys(t, os.path.getsize(t), "text", ["--field", "2", "-n"], None, k=1000)
    assert sorted(keys) == [float(i) for i in range(100)]  # every line once
    e = write(tmp_path / "e.txt", "")
    assert sortjob.sample_keys(e, 0, "text", [], None) == []
