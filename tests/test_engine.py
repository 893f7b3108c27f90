"""The engine's shuffle and task functions: sort buffers that spill, merges, multi-step jobs,
counters, SORT_VALUES, data types, user errors — against the one-process runner (``pdp run``).

The memory test runs a reducer over a partition ten times its sort buffer inside a task
process limited (RLIMIT) to less memory than the partition needs when held whole."""

from __future__ import annotations

import io
import os
import random
import zlib
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pdp.jobs import mapoutput
from pdp.jobs import engine, runtime
from pdp.jobs.local import run_job
from pdp.jobs.loader import load_module
from pdp.node.limits import MemoryLimitExceeded, MiB, run_limited

JOBS = Path(__file__).parent / "engine_jobs"


def records_of(path: str, offset: int = 0) -> list[tuple[Any, Any]]:
    return [(engine.decode_key(kb), msgpack.unpackb(vb)) for kb, vb in engine.read_run(path, offset)]


# -- the sort buffer -----------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(pairs=st.lists(st.tuples(st.one_of(st.text(max_size=6), st.integers(-5, 5),
                                         st.lists(st.integers(0, 3), max_size=2)), st.integers(0, 9)), max_size=300),
       n=st.integers(1, 4), limit=st.integers(1, 3000), combine=st.booleans())
def test_sorter_spills_equal_in_memory(pairs: list[tuple[Any, int]], n: int, limit: int, combine: bool,
                                       tmp_path_factory: pytest.TempPathFactory) -> None:
    """Whatever the buffer size (spilling often or never), the partitions hold the same
    records, each partition sorted, each key in its hashed partition; with a summing
    combiner, each key's total is kept."""
    tmp = str(tmp_path_factory.mktemp("sort"))

    def summing(key: Any, values: Any) -> Any:
        yield key, sum(values)

    sorter = engine.Sorter(n, limit, tmp, partition=lambda kb, n: zlib.crc32(kb) % n,
                           combine=summing if combine else None)
    sorter.add_all(pairs)
    out = os.path.join(tmp, "map")
    sorter.write_map_output(out)
    assert not [f for f in os.listdir(tmp) if f.startswith("spill-")], "spill files are removed"
    got: list[tuple[Any, Any]] = []
    for r in range(n):
        raw = list(engine.read_run(out, mapoutput.offset(out, r)))
        assert raw == sorted(raw)
        assert all(zlib.crc32(kb) % n == r for kb, _ in raw)
        got += [(engine.decode_key(kb), msgpack.unpackb(vb)) for kb, vb in raw]
    norm = [(engine.decode_key(engine.encode_key(k)), v) for k, v in pairs]
    if combine:
        totals: dict[bytes, int] = {}
        for k, v in norm:
            totals[engine.encode_key(k)] = totals.get(engine.encode_key(k), 0) + v
        sums: dict[bytes, int] = {}
        for k, v in got:
            sums[engine.encode_key(k)] = sums.get(engine.encode_key(k), 0) + v
        assert sums == totals
    else:
        assert sorted(got, key=repr) == sorted(norm, key=repr)


def test_merge_runs_in_passes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """More runs than MERGE_FACTOR merge in passes, in order, nothing lost."""
    monkeypatch.setattr(engine, "MERGE_FACTOR", 3)
    rng = random.Random(7)
    runs, every = [], []
    for k in range(10):
        recs = sorted((engine.encode_key(rng.randrange(100)), msgpack.packb(k)) for _ in range(rng.randrange(0, 30)))
        every += recs
        path = tmp_path / f"run{k}"
        with open(path, "wb") as f:
            engine.write_run(f, recs)
        runs.append((str(path), 0))
    assert list(engine.merge_runs(runs, str(tmp_path))) == sorted(every)
    assert sorted(os.listdir(tmp_path)) == sorted(f"run{k}" for k in range(10))


# -- jobs through the task functions vs the one-process runner ------------------------------------


def pipeline(spec: dict[str, Any], paths: list[Path], chunk: int, n_reduce: int, work: Path, steps: int) -> bytes:
    """A job through the engine's task functions as the party runs them: every step's maps over
    record-aligned ranges (the first step), or one per earlier reduce output."""
    from pdp.jobs.inputs import Splitter

    inputs: list[tuple[str, int, int, int, str, int]] = []  # (path, start, end, line, name, index)
    for i, p in enumerate(paths):
        splitter = Splitter(spec.get("data_type", "text"), chunk)
        splitter.feed(p.read_bytes())
        found = splitter.finish()
        bounds = [(0, 1), *found["cuts"], (found["size"], 0)]
        spec = {**spec, "header": found.get("header")}
        inputs += [(str(p), a[0], b[0], a[1], str(p), i) for a, b in zip(bounds, bounds[1:]) if found["size"]]
    outs: list[str] = []
    for k in range(steps):
        maps = []
        for m, (path, a, b, line, name, index) in enumerate(inputs):
            out = str(work / f"s{k}-map-{m}")
            runtime.map_task({**spec, "step": k, "name": name, "line": line, "input_index": index}, path, a, b,
                             n_reduce, out)
            maps.append(out)
        outs = []
        for r in range(n_reduce):
            out = str(work / f"s{k}-reduce-{r}")
            runtime.reduce_task({**spec, "step": k}, [(m, r) for m in maps], out)
            outs.append(out)
        inputs = [(o, 0, os.path.getsize(o), 1, o, 0) for o in outs]
    final = work / "final"
    runtime.merge_outputs(spec, outs, str(final))
    return final.read_bytes()


def local(job_file: Path, paths: list[Path], args: list[str] = (), data_type: str | None = None) -> tuple[bytes, dict]:
    module = load_module(str(job_file))
    cls = next(v for v in vars(module).values() if isinstance(v, type) and v.__module__ == module.__name__
               and hasattr(v, "steps"))
    out = io.BytesIO()
    result = run_job(lambda: cls(list(args)), paths, out, data_type)
    return out.getvalue(), result


@pytest.fixture
def books(tmp_path: Path) -> list[Path]:
    corpus = sorted(Path(__file__).resolve().parents[2].joinpath("shared", "corpus").glob("*.txt"))
    if not corpus:
        pytest.skip("no corpus")
    out = []
    for src in corpus[:2]:
        p = tmp_path / src.name
        p.write_bytes(src.read_bytes()[:150_000])
        out.append(p)
    return out


@pytest.mark.parametrize("chunk, n_reduce, sort_mb", [(1 << 20, 1, 64), (20_000, 3, 0.01)])
def test_multi_step_job_matches_one_process(books: list[Path], tmp_path: Path, chunk: int, n_reduce: int,
                                            sort_mb: float) -> None:
    """A two-step job (with combiner, init/final, SORT_VALUES, counters, arguments) gives the
    same bytes and counters through the task functions as `pdp run`, with tiny sort buffers
    (many spills) too."""
    job = JOBS / "steps.py"
    want, result = local(job, books, ["--min", "3"])
    assert want and result["counters"]["words"]["seen"] > 1000
    spec = {"code": str(JOBS), "main": "steps.py", "args": ["--min", "3"], "data_type": "text", "sort_mb": sort_mb}
    work = tmp_path / "work"
    work.mkdir()
    assert pipeline(spec, books, chunk, n_reduce, work, steps=2) == want


def test_csv_and_jsonl_records(tmp_path: Path) -> None:
    """CSV records (quoted newlines, a header) and JSON Lines reach the mapper as dicts, at
    any split, and a bad line fails with its file and line number."""
    rows = [f'{i},"name {i}\nline two",{i % 3}\r\n' for i in range(300)]
    data = "id,name,group\r\n" + "".join(rows)
    csv_path = tmp_path / "people.csv"
    csv_path.write_text(data, newline="")
    want, _ = local(JOBS / "group_count.py", [csv_path])
    assert want == b'"0"\t100\n"1"\t100\n"2"\t100\n'
    for chunk in (7, 100, 5000):
        work = tmp_path / f"w{chunk}"
        work.mkdir()
        spec = {"code": str(JOBS), "main": "group_count.py", "data_type": "csv"}
        assert pipeline(spec, [csv_path], chunk, 2, work, steps=1) == want
    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_text("".join(f'{{"group": "{i % 3}"}}\n' for i in range(300)) + "{broken\n")
    from pdp.jobs.inputs import BadRecord

    with pytest.raises(BadRecord, match=r"rows.jsonl, line 301"):
        local(JOBS / "group_count.py", [jsonl])


def test_user_exception_carries_the_users_traceback(tmp_path: Path) -> None:
    src = tmp_path / "in.txt"
    src.write_text("a\nb\n")
    with pytest.raises(runtime.JobCodeError) as err:
        runtime.map_task({"code": str(JOBS), "main": "boom.py", "step": 0, "name": "in.txt"}, str(src), 0, 4, 1,
                         str(tmp_path / "m"))
    text = str(err.value)
    assert "ZeroDivisionError" in text and 'boom.py", line' in text and "1 / 0" in text
    assert "pdp/jobs" not in text, "pdp's own frames are left out"


# -- the memory bound ---------------------------------------------------------------------------


def _big_job(tmp: str, sort_mb: float) -> dict[str, Any]:
    """Map then reduce ~60 MB of distinct records through one partition."""
    src = os.path.join(tmp, "in.txt")
    with open(src, "w") as f:
        f.write("".join(f"{i}\n" for i in range(300)))
    spec = {"code": str(JOBS), "main": "fanout.py", "step": 0, "sort_mb": sort_mb, "name": "in.txt"}
    mapped = runtime.map_task(spec, src, 0, os.path.getsize(src), 1, os.path.join(tmp, "map"))
    reduced = runtime.reduce_task(spec, [(os.path.join(tmp, "map"), 0)], os.path.join(tmp, "out"))
    return {"map_bytes": os.path.getsize(os.path.join(tmp, "map")), "keys": reduced["keys"],
            "records": mapped["records_out"]}


def test_reducer_over_ten_times_its_sort_buffer_stays_in_memory_limit(tmp_path: Path) -> None:
    """A task process limited to 200 MiB maps and reduces a partition of over 10 x its 4 MiB
    sort buffer; the same work with a buffer big enough to hold it all exceeds the limit.
    (A spawned process, as a node's pool: a forked one would inherit this test process's heap,
    numpy's and scikit-learn's included, and count it against the limit.)"""
    import multiprocessing

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        ok = pool.submit(run_limited, 200 * MiB, 0, _big_job, str(tmp_path), 4).result(timeout=300)
        assert ok["map_bytes"] > 10 * 4 * MiB
        assert ok["keys"] == ok["records"] == 300 * 2000
        (tmp_path / "map").unlink()
        (tmp_path / "out").unlink()
        with pytest.raises(MemoryLimitExceeded):
            pool.submit(run_limited, 200 * MiB, 0, _big_job, str(tmp_path), 4096).result(timeout=300)
