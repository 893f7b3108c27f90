"""``pdp run``: a whole job in one process, in memory: the sequential oracle and the quick way to debug.

Deliberately simple and independent of the engine's sort buffers, spills and merges: each
step maps every record (one map task per input file for the first step), runs the
combiner per task, sorts all pairs by ``(encoded key, encoded value)`` (the order the
engine's shuffle gives), reduces each key, and the final pairs are written sorted the
same way, so ``pdp run`` and ``pdp submit`` write the same bytes. Memory grows with the
data: use it on samples.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from itertools import groupby
from pathlib import Path
from typing import Any, BinaryIO

from pdp.jobs import engine, inputs
from pdp.jobs.api import JobDefinitionError, Reporter
from pdp.jobs.runtime import check_step, set_input, with_positions
from pdp.jobs.runtime import step_fn as _step_get
from pdp.jobs.runtime import user_code

Pair = tuple[Any, Any]


def _sorted(pairs: Iterable[Pair], sort_values: bool) -> list[tuple[bytes, bytes, Any, Any]]:
    enc = engine.value_coder(sort_values)[0]
    return sorted(((engine.encode_key(k), enc(v), k, v) for k, v in pairs), key=lambda r: (r[0], r[1]))


def _reduce(fn: Any, rows: list[tuple[bytes, bytes, Any, Any]]) -> list[Pair]:
    out: list[Pair] = []
    for kb, group in groupby(rows, key=lambda r: r[0]):
        values = [_roundtrip(r[3]) for r in group]
        out.extend(fn(engine.decode_key(kb), iter(values)) or ())
    return out


def _roundtrip(value: Any) -> Any:
    """A value as it comes out of the shuffle (tuples become lists, as through msgpack)."""
    return engine.value_coder(False)[1](engine.value_coder(False)[0](value))


def _map_task(step: Any, records: Iterable[Pair], sort_values: bool) -> list[Pair]:
    mapper, init, final = (_step_get(step, n) for n in ("mapper", "mapper_init", "mapper_final"))
    out: list[Pair] = list(init() or ()) if init else []
    for key, value in records:
        out.extend(mapper(key, value) or ())
    if final:
        out.extend(final() or ())
    combiner = _step_get(step, "combiner")
    if combiner:
        init = _step_get(step, "combiner_init")
        if init:
            list(init() or ())
        out = _reduce(combiner, _sorted(out, sort_values))
    return out


def _first_records(job: Any, path: Path, name: str, index: int, data_type: str, bad: list[int]) -> Iterable[Pair]:
    size = path.stat().st_size
    set_input(job, name, index)
    header = None
    records = inputs.records(str(path), 0, size, data_type, name=name, line=1, header=header,
                             skip_bad=bool(getattr(job, "SKIP_BAD_RECORDS", False)), bad=bad)
    if getattr(job, "INPUT_POSITIONS", False):
        return with_positions(records, data_type, 1)
    protocol = job.input_protocol() if data_type == "text" else None
    if protocol is None or type(protocol).__name__ == "RawValueProtocol":
        return records
    return (protocol.read(v.encode("utf-8")) for _, v in records)


def run_job(make: Any, paths: list[Path], out: BinaryIO, data_type: str | None = None,
            files: list[Path] | None = None) -> dict[str, Any]:
    """Run the job over ``paths``, write its output to ``out``; returns ``{"counters",
    "status", "lines"}``. ``make()`` gives a new job instance: one per task (a map task per
    input file, one reduce task per step), as mrjob runs a process per task. The job runs in a temporary working directory
    holding copies of ``files`` (its ``FILES``), as a task on the party does."""
    import shutil
    import tempfile

    absolute, names = [p.resolve() for p in paths], [str(p) for p in paths]  # a job sees the names as given
    here = os.getcwd()
    with tempfile.TemporaryDirectory(prefix="pdp-run-") as work:
        for f in files or []:
            shutil.copy(f, work)
        os.chdir(work)
        try:
            return _run_job(make, list(zip(absolute, names)), out, data_type)
        finally:
            os.chdir(here)


class _Tasks:
    """New job instances that all report to one Reporter."""

    def __init__(self, make: Any) -> None:
        self.make, self.reporter = make, Reporter()

    def new(self) -> Any:
        job = self.make()
        job.increment_counter = self.reporter.increment_counter
        job.set_status = self.reporter.set_status
        return job


def _run_job(make: Any, paths: list[tuple[Path, str]], out: BinaryIO, data_type: str | None) -> dict[str, Any]:
    tasks = _Tasks(make)
    first = tasks.new()
    if hasattr(first, "map_chunk"):
        return _run_chunked(first, paths, out, data_type)
    with user_code("setup"):
        n_steps = len(first.steps())
    if not n_steps:
        raise JobDefinitionError("the job defines no mapper, combiner or reducer (and no steps())")
    sort_values = bool(first.sort_values()) if hasattr(first, "sort_values") else False
    pairs: list[Pair] = []
    bad: list[int] = []
    for k in range(n_steps):
        with user_code("mapper"):
            if k == 0:
                mapped = []
                for index, (path, name) in enumerate(paths):
                    job = tasks.new()
                    step = _step(job, k)
                    kind = inputs.data_type_of(name, data_type)
                    mapped.extend(_map_task(step, _first_records(job, path, name, index, kind, bad), sort_values))
            else:
                mapped = _map_task(_step(tasks.new(), k), [(_roundtrip(a), _roundtrip(b)) for a, b in pairs],
                                   sort_values)
        step = _step(tasks.new(), k)
        reducer, init, final = (_step_get(step, n) for n in ("reducer", "reducer_init", "reducer_final"))
        with user_code("reducer"):
            pairs = list(init() or ()) if init else []
            pairs.extend(_reduce(reducer, _sorted(mapped, sort_values)))
            if final:
                pairs.extend(final() or ())
    if bad:
        tasks.reporter.increment_counter("pdp", "bad records skipped", len(bad))
    write = first.output_protocol().write
    lines = 0
    with user_code("output protocol"):
        for _, _, key, value in _sorted(pairs, False):
            line = write(_roundtrip(key), _roundtrip(value))
            out.write((line.encode("utf-8") if isinstance(line, str) else line) + b"\n")
            lines += 1
    return {"counters": tasks.reporter.counters, "status": tasks.reporter.status, "lines": lines}


def _run_chunked(job: Any, paths: list[tuple[Path, str]], out: BinaryIO, data_type: str | None) -> dict[str, Any]:
    """A built-in that reads its ranges itself (``map_chunk``: training, predict, stats), one
    chunk per input; an ``ITERATE`` job runs its rounds until its ``update`` says done."""
    import tempfile

    iterate, model = bool(getattr(job, "ITERATE", False)), None
    with tempfile.TemporaryDirectory(prefix="pdp-run-chunks-") as work:
        while True:
            mapped: list[Pair] = []
            for index, (path, name) in enumerate(paths):
                spec = {"data_type": inputs.data_type_of(name, data_type), "name": name, "input_index": index,
                        "line": 1, "model": model}
                mapped.extend(job.map_chunk(str(path), 0, path.stat().st_size, spec, work))
            pairs = _reduce(job.reducer, _sorted(mapped, False))
            if not iterate:
                break
            step = job.update(model, [value for _, value in pairs])
            model = step["model"]
            if step["done"]:
                data = bytes(job.result(model))
                out.write(data)
                return {"counters": {}, "status": "", "lines": data.count(b"\n")}
    write = job.output_protocol().write
    for _, _, key, value in _sorted(pairs, False):
        line = write(_roundtrip(key), _roundtrip(value))
        out.write((line.encode("utf-8") if isinstance(line, str) else line) + b"\n")
    return {"counters": {}, "status": "", "lines": len(pairs)}


def _step(job: Any, k: int) -> Any:
    with user_code("setup"):
        step = list(job.steps())[k]
    check_step(step, k)
    return step


def run_job_class(cls: type, paths: list[str], args: list[str], out: BinaryIO) -> dict[str, Any]:
    """``MyJob.run()``: the class over ``paths`` with job arguments ``args``."""
    result = run_job(lambda: cls(list(args)), [Path(p) for p in paths], out)
    out.flush()
    for group, names in sorted(result["counters"].items()):
        for name, n in sorted(names.items()):
            os.write(2, f"counter {group}: {name} = {n}\n".encode())
    return result
