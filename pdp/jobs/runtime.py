"""Task functions: run one map, reduce or merge of a job's step inside a task process.

The node's worker calls these through its process pool. They take a *spec* (a plain dict
saying which job to load and how to read its input) and file paths, never bulk bytes, and
return small msgpack-able statistics, including the task's ``counters``.

spec keys: ``builtin`` (a built-in job's name) or ``code`` (a directory holding the job's
source file ``main`` and its ``FILES``), ``cls`` (a class name, optional), ``args`` (job
arguments), ``step``, ``data_type``, ``sort_mb`` (the sort buffer), per map input: ``name``,
``line`` (line number at the range's start), ``header`` (CSV columns).

A job's own exceptions come back as :class:`JobCodeError` with the traceback of the user's
file; they fail the job (a bug fails the same way on every member).
"""

from __future__ import annotations

import os
import sys
import traceback
import zlib
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import msgpack

from pdp.errors import InputError
from pdp.jobs import engine, inputs
from pdp.jobs.api import JobDefinitionError, MRJob, Reporter
from pdp.jobs.api import _identity_mapper as identity_mapper
from pdp.jobs.api import _identity_reducer as identity_reducer
from pdp.jobs.loader import load_job
from pdp.jobs.progress import report

MiB = 1 << 20
MAX_COUNTERS = 64  # groups, and names per group, a task may report
REPORT_EVERY = 4096  # records between progress reports


class JobCodeError(InputError):
    """The job's own code raised: the message carries its traceback."""

    def __reduce__(self) -> tuple[type, tuple[str]]:
        return (type(self), (str(self),))


@contextmanager
def user_code(what: str) -> Iterator[None]:
    """Run the job's code: its exceptions become a JobCodeError naming ``what`` (pdp's own
    input errors and a task asked to stop pass through)."""
    try:
        yield
    except (InputError, MemoryError, KeyboardInterrupt, BrokenPipeError):
        raise
    except Exception as exc:
        from pdp.jobs.progress import TaskAborted

        if isinstance(exc, TaskAborted):
            raise
        raise JobCodeError(f"the job's {what} raised {type(exc).__name__}: {exc}\n{_user_traceback(exc)}") from None


def _user_traceback(exc: BaseException) -> str:
    """The traceback without pdp's own frames, at most ~1500 characters (the last frames)."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if f"{os.sep}pdp{os.sep}" not in f.filename]
    text = "".join(traceback.format_list(frames)) + "".join(traceback.format_exception_only(type(exc), exc))
    return ("Traceback (most recent call last):\n" + text)[-1500:]


class Plan:
    """A loaded job, the functions of one of its steps, and where its counters go."""

    def __init__(self, spec: dict[str, Any], progress: str | None = None) -> None:
        with user_code("setup"):
            self.job = load_job(spec)
            steps = list(self.job.steps())
        if not steps:
            raise JobDefinitionError("the job defines no mapper, combiner or reducer (and no steps())")
        self.n_steps = len(steps)
        k = int(spec.get("step", 0))
        if not 0 <= k < len(steps):
            raise JobDefinitionError(f"the job has {len(steps)} step(s), not {k + 1}")
        self.step, self.k = steps[k], k
        self.reporter = Reporter(progress + ".status" if progress else None)
        self.job.increment_counter = self.reporter.increment_counter  # type: ignore[method-assign]
        self.job.set_status = self.reporter.set_status  # type: ignore[method-assign]
        check_step(self.step, k)
        self.sort_values = bool(self.job.sort_values()) if hasattr(self.job, "sort_values") else False
        partition = getattr(self.job, "partition", None)
        self.partition = partition if callable(partition) else None

    def fn(self, name: str) -> Any:
        return step_fn(self.step, name)

    def stats(self, **extra: Any) -> dict[str, Any]:
        counters = self.reporter.counters
        if len(counters) > MAX_COUNTERS or any(len(v) > MAX_COUNTERS for v in counters.values()):
            raise JobDefinitionError(f"a task may report at most {MAX_COUNTERS} counter groups of "
                                     f"{MAX_COUNTERS} counters")
        out = {k: v for k, v in extra.items()}
        out["counters"] = {g[:100]: {n[:100]: v for n, v in names.items()} for g, names in counters.items()}
        if self.reporter.status:
            out["status"] = self.reporter.status
        return out


UNSUPPORTED = ("mapper_raw", "mapper_cmd", "mapper_pre_filter", "combiner_cmd", "combiner_pre_filter",
               "reducer_cmd", "reducer_pre_filter", "spark")


def check_step(step: Any, k: int) -> None:
    """Refuse what pdp does not run (shell commands, raw input, Spark) with a clear error."""
    if not hasattr(step, "__getitem__"):
        raise JobDefinitionError(f"step {k + 1} is a {type(step).__name__}: pdp runs MRStep steps only")
    for name in UNSUPPORTED:
        if _step_get(step, name):
            raise JobDefinitionError(f"step {k + 1} uses {name}: pdp runs Python mappers, combiners "
                                     "and reducers only")


def set_input(job: Any, name: str, index: int) -> None:
    """Tell a map task which input it reads: ``self.input_name`` and ``self.input_index``
    (pdp), and what mrjob's ``jobconf_from_env('mapreduce.map.input.file')`` returns."""
    job.input_name, job.input_index = name, index
    uri = "file://" + name if name.startswith("/") else name
    os.environ["mapreduce_map_input_file"] = os.environ["map_input_file"] = uri


def with_positions(records: Iterable[tuple[Any, Any]], data_type: str, line: int) -> Iterator[tuple[Any, Any]]:
    """Text records keyed by their line number (``INPUT_POSITIONS = True``; Hadoop's
    TextInputFormat keys lines by offset)."""
    if data_type != "text":
        raise JobDefinitionError("INPUT_POSITIONS (records keyed by line number) needs text input")
    for n, (_, value) in enumerate(records, line):
        yield n, value


def _step_get(step: Any, name: str) -> Any:
    try:
        return step[name]
    except KeyError:
        return None


def step_fn(step: Any, name: str) -> Any:
    """A step's function by mrjob's name; a missing mapper or reducer is the identity (a
    map-only step's pairs pass through a reduce that changes nothing)."""
    fn = _step_get(step, name)
    if fn is None and name == "mapper":
        return identity_mapper
    if fn is None and name == "reducer":
        return identity_reducer
    return fn


def _pairs(fn: Any, *args: Any) -> Iterable[tuple[Any, Any]]:
    return fn(*args) or ()


# -- map ------------------------------------------------------------------------------------------


def step_input(spec: dict[str, Any], plan: Plan, path: str, start: int, end: int,
               bad: list[int]) -> Iterator[tuple[Any, Any]]:
    """The (key, value) records a map of this step reads from ``[start, end)`` of ``path``."""
    if plan.k > 0:  # an earlier step's reduce output: a run of records
        decode = engine.value_coder(False)[1]
        return ((engine.decode_key(kb), decode(vb)) for kb, vb in engine.read_run(path, 0))
    data_type = spec.get("data_type") or "text"
    name = str(spec.get("name", path))
    set_input(plan.job, name, int(spec.get("input_index", 0)))
    records = inputs.records(path, start, end, data_type, name=name,
                             line=int(spec.get("line", 1)), header=spec.get("header"),
                             skip_bad=bool(getattr(plan.job, "SKIP_BAD_RECORDS", False)), bad=bad,
                             base=int(spec.get("base", 0)))
    if getattr(plan.job, "INPUT_POSITIONS", False):
        return with_positions(records, data_type, int(spec.get("line", 1)))
    protocol = plan.job.input_protocol() if data_type == "text" else None
    if protocol is None or type(protocol).__name__ == "RawValueProtocol":
        return records
    read = protocol.read
    return (read(value.encode("utf-8")) for _, value in records)


def map_task(spec: dict[str, Any], path: str, start: int, end: int, n_reduce: int, out: str,
             progress: str | None = None) -> dict[str, Any]:
    """Map ``[start, end)`` of ``path`` (record-aligned) into a map output file of ``n_reduce``
    sorted partitions at ``out``."""
    plan = Plan(spec, progress)
    job, limit = plan.job, int(float(spec.get("sort_mb", 32)) * MiB)
    fast = getattr(job, "map_counts", None)
    if fast is not None and plan.k == 0 and (spec.get("data_type") or "text") == "text":
        with user_code("map_counts"):
            counts = fast(path, start, end, progress, name=str(spec.get("name") or path), base=int(spec.get("base", 0)))
        records = _count_records(counts, n_reduce, plan.partition)
        written = engine_write(records, out, n_reduce)
        return plan.stats(bytes=end - start, records_in=sum(counts.values()), records_out=written, keys=len(counts))
    combine = plan.fn("combiner")
    sorter = engine.Sorter(n_reduce, limit, os.path.dirname(out) or ".", partition=plan.partition,
                           combine=_combining(plan) if combine else None, sort_values=plan.sort_values)
    bad: list[int] = []
    chunk = getattr(job, "map_chunk", None) if plan.k == 0 else None
    try:
        if chunk is not None:  # a built-in that reads its range itself (training: cached arrays)
            with user_code("map_chunk"):
                sorter.add_all(chunk(path, start, end, spec, os.path.dirname(out) or "."))
        else:
            with user_code("mapper"):
                _run_mapper(plan, step_input(spec, plan, path, start, end, bad), sorter, progress, start)
        with user_code("combiner"):
            written = sorter.write_map_output(out)
    finally:
        sorter.close()
    if bad:
        plan.reporter.increment_counter("pdp", "bad records skipped", len(bad))
    return plan.stats(bytes=end - start, records_in=sorter.records_in, records_out=written)


def _combining(plan: Plan) -> Any:
    """The combiner with its *_init and *_final around the whole task (as mrjob: once per task)."""
    combine = plan.fn("combiner")
    init, final = plan.fn("combiner_init"), plan.fn("combiner_final")
    if init:
        list(_pairs(init))  # pairs an init yields have nowhere to go before any key: mrjob drops none; rare
    if final:
        raise JobDefinitionError("combiner_final is not supported: put the work in the combiner or reducer_final")
    return combine


def _run_mapper(plan: Plan, records: Iterable[tuple[Any, Any]], sorter: engine.Sorter,
                progress: str | None, start: int) -> None:
    mapper, init, final = plan.fn("mapper"), plan.fn("mapper_init"), plan.fn("mapper_final")
    add, n = sorter.add, 0
    if init:
        for k, v in _pairs(init):
            add(k, v)
            n += 1
    seen = 0
    for key, value in records:
        for k, v in mapper(key, value) or ():
            add(k, v)
            n += 1
        seen += 1
        if progress is not None and seen % REPORT_EVERY == 0:
            report(progress, seen)
    if final:
        for k, v in _pairs(final):
            add(k, v)
            n += 1
    sorter.records_in = n


_PACKED = [msgpack.packb(n) for n in range(1024)]


def _count_records(counts: dict[bytes, int], n: int, partition: Any) -> list[list[engine.Record]]:
    """Word counts (UTF-8 word -> count) as sorted records per partition (the job's
    ``partition``, or the default CRC-32 inlined: this is word count's hot loop)."""
    parts: list[list[engine.Record]] = [[] for _ in range(n)]
    pack, tag, packed, crc32 = msgpack.Packer().pack, engine.STR_TAG, _PACKED, zlib.crc32
    default = partition is None or getattr(partition, "__func__", None) is MRJob.partition
    for word, count in counts.items():
        kb = tag + word + b"\0" if b"\0" not in word else engine.encode_key(word.decode("utf-8"))
        r = 0 if n == 1 else crc32(kb) % n if default else partition(kb, n)
        parts[r].append((kb, packed[count] if count < 1024 else pack(count)))
    for records in parts:
        records.sort()
    return parts


def engine_write(parts: list[list[engine.Record]], out: str, n: int) -> int:
    from pdp.jobs import mapoutput

    return mapoutput.write_runs(out, n, parts, engine.write_run)


# -- reduce -----------------------------------------------------------------------------------


def reduce_task(spec: dict[str, Any], sources: list[tuple[str, int]], out: str,
                progress: str | None = None) -> dict[str, Any]:
    """Merge one partition of every map output (``sources``) and reduce it into a sorted run at
    ``out`` (this step's output: the next step's input, or a part of the job's result)."""
    plan = Plan(spec, progress)
    runs = engine.source_runs(sources)
    final = plan.k + 1 == int(spec.get("steps", plan.n_steps))
    lines = _with_lines(plan) if final else None
    if getattr(plan.job, "REDUCE_SUMS", False) and not plan.fn("reducer_init") and not plan.fn("reducer_final"):
        records = _summed(runs)
        from pdp.fsutil import atomic_writer

        with atomic_writer(out, durable=False) as f, user_code("output protocol"):
            written = engine.write_run(f, lines(iter(records)) if lines is not None else records)
        return plan.stats(keys=len(records), records_out=written, bytes=os.path.getsize(out))
    tmpdir = os.path.dirname(out) or "."
    reducer, init, final_fn = plan.fn("reducer"), plan.fn("reducer_init"), plan.fn("reducer_final")
    sorter = engine.Sorter(1, int(float(spec.get("sort_mb", 32)) * MiB), tmpdir)
    decode = engine.value_coder(plan.sort_values)[1]
    keys = 0
    try:
        with user_code("reducer"):
            if init:
                sorter.add_all(_pairs(init))
            for key, values in engine.groups(engine.merge_runs(runs, tmpdir), decode):
                sorter.add_all(_pairs(reducer, key, values))
                keys += 1
                if progress is not None and keys % REPORT_EVERY == 0:
                    report(progress, keys)
            if final_fn:
                sorter.add_all(_pairs(final_fn))
        with user_code("output protocol"):
            written = sorter.write_single_run(out, lines)
    finally:
        sorter.close()
    return plan.stats(keys=keys, records_out=written, bytes=os.path.getsize(out))


def _with_lines(plan: Plan) -> Any:
    """The final step's records with their output lines (``[kb, vb, line]``)."""
    write = plan.job.output_protocol().write
    decode_value = engine.value_coder(False)[1]

    def lines(records: Iterator[engine.Record]) -> Iterator[tuple[bytes, bytes, bytes]]:
        for kb, vb in records:
            line = write(engine.decode_key(kb), decode_value(vb))
            yield kb, vb, line.encode("utf-8") if isinstance(line, str) else line
    return lines


def _summed(runs: list[tuple[str, int]]) -> list[engine.Record]:
    """The reduce of a job whose reducer sums integers (``REDUCE_SUMS``: word count): a dict
    of sums at C speed instead of a merge (memory: one entry per distinct key)."""
    totals: dict[bytes, int] = {}
    unpack, get = msgpack.unpackb, totals.get
    for path, off in runs:
        for kb, vb in engine.read_run(path, off):
            totals[kb] = get(kb, 0) + unpack(vb)
    pack = msgpack.Packer().pack
    return sorted((kb, pack(n)) for kb, n in totals.items())


# -- the job's result -----------------------------------------------------------------------------


def merge_outputs(spec: dict[str, Any], in_paths: list[str], out_path: str) -> dict[str, Any]:
    """The job's result: the k-way merge of the final step's reduce outputs (sorted runs of
    ``[kb, vb, line]``), one line each. Runs no job code (the master may not allow it)."""
    from pdp.fsutil import atomic_writer

    lines = size = 0
    with atomic_writer(out_path) as out:
        buf: list[bytes] = []
        for record in engine.merge_runs([(p, 0) for p in in_paths], os.path.dirname(out_path) or "."):
            buf.append(record[2])
            lines += 1
            size += len(record[2]) + 1
            if len(buf) >= 4096:
                out.write(b"\n".join(buf) + b"\n")
                buf.clear()
        if buf:
            out.write(b"\n".join(buf) + b"\n")
    return {"keys": lines, "bytes": size}


def update_round(spec: dict[str, Any], in_paths: list[str]) -> dict[str, Any]:
    """An iterative job's round on the master: the job's ``update`` of ``spec["model"]`` with
    the values of the round's reduce outputs; ``{"model", "done", "text"}``. Built-ins only
    (the gateway marks only them iterative), so no user code runs on the master."""
    plan = Plan({**spec, "step": 0})
    decode = engine.value_coder(False)[1]
    values = [decode(record[1]) for p in in_paths for record in engine.read_run(p, 0)]
    with user_code("update"):
        return dict(plan.job.update(spec.get("model"), values))


def write_result(spec: dict[str, Any], out_path: str) -> dict[str, Any]:
    """An iterative job's result: the bytes its ``result`` makes of the last model."""
    from pdp.fsutil import atomic_writer

    plan = Plan({**spec, "step": 0})
    with user_code("result"):
        data = bytes(plan.job.result(spec.get("model")))
    with atomic_writer(out_path) as out:
        out.write(data)
    return {"keys": data.count(b"\n"), "bytes": len(data)}


def step_count(spec: dict[str, Any]) -> int:
    """How many steps the job has (loading it: its errors come back as JobCodeError)."""
    return Plan({**spec, "step": 0}).n_steps


def describe(spec: dict[str, Any]) -> dict[str, Any]:
    """What the party needs to know of a job before it runs: its steps (and the job's name)."""
    plan = Plan({**spec, "step": 0})
    return {"steps": plan.n_steps, "name": type(plan.job).__name__}


def flush_stdio() -> None:  # user code printing in a task process must not block on a full pipe
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
