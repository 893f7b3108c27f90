"""The job API: ``MRJob`` and ``MRStep`` with mrjob's method names and defaults.

A job is a class. Its steps come from ``steps()`` (a list of :class:`MRStep`) or, by
default, from the methods the class redefines: ``mapper``, ``combiner``, ``reducer`` and
their ``*_init`` / ``*_final``. As in mrjob:

* the first step's mapper gets each input record as ``(None, value)``: a text line with its
  ``\\r\\n`` or ``\\n`` stripped (pdp also reads CSV records and JSON Lines as values);
* ``mapper``/``combiner``/``reducer`` yield ``(key, value)`` pairs; keys and values are any
  msgpack-able value (tuples come back as lists, as through mrjob's JSON protocol);
* ``*_init`` and ``*_final`` run once per task and may yield pairs too;
* ``SORT_VALUES = True`` hands each reducer call its values in sorted order;
* ``increment_counter(group, name, n)`` and ``set_status(msg)`` report to the party;
* ``configure_args`` / ``add_passthru_arg`` declare job arguments (``self.options``), given
  after ``--`` on the command line;
* the final output is written with ``OUTPUT_PROTOCOL`` (default :class:`JSONProtocol`:
  ``json(key) TAB json(value)``), one line per pair, sorted by the encoded key.

pdp additions (mrjob ignores them): ``SKIP_BAD_RECORDS = True`` skips input records that
cannot be read (counted under ``pdp / bad records``) instead of failing the job;
``partition(key_bytes, n)`` chooses the reduce task of an encoded key (a stable hash by
default; the built-in ``sort`` uses ranges); ``map_counts`` is the word count kernel's
fast path (see :mod:`pdp.jobs.builtin.wordcount`).
"""

from __future__ import annotations

import argparse
import json
import sys
import zlib
from collections.abc import Callable, Iterable
from typing import Any

from pdp.errors import InputError

STEP_FUNCS = ("mapper", "mapper_init", "mapper_final", "combiner", "combiner_init", "combiner_final",
              "reducer", "reducer_init", "reducer_final")
UNSUPPORTED = ("mapper_raw", "mapper_cmd", "mapper_pre_filter", "combiner_cmd", "combiner_pre_filter",
               "reducer_cmd", "reducer_pre_filter", "spark")


class JobDefinitionError(InputError, ValueError):
    """A job class asks for something pdp cannot run (the message says what)."""


# -- protocols (mrjob's names and byte formats) ------------------------------------------------


class JSONProtocol:
    """``json.dumps(key) TAB json.dumps(value)``, as mrjob's JSONProtocol."""

    def read(self, line: bytes) -> tuple[Any, Any]:
        key, sep, value = line.partition(b"\t")
        if not sep:
            raise ValueError("no tab in the line")
        return json.loads(key), json.loads(value)

    def write(self, key: Any, value: Any) -> bytes:
        return json.dumps(key).encode() + b"\t" + json.dumps(value).encode()


class JSONValueProtocol:
    """The value only, as JSON (the key is None when reading)."""

    def read(self, line: bytes) -> tuple[Any, Any]:
        return None, json.loads(line)

    def write(self, key: Any, value: Any) -> bytes:
        return json.dumps(value).encode()


class RawValueProtocol:
    """The value only, as UTF-8 text (the key is None when reading)."""

    def read(self, line: bytes) -> tuple[Any, Any]:
        return None, line.decode("utf-8")

    def write(self, key: Any, value: Any) -> bytes:
        return value if isinstance(value, bytes) else str(value).encode()


class RawProtocol:
    """``key TAB value`` as text (no tab: the whole line is the key, the value None)."""

    def read(self, line: bytes) -> tuple[Any, Any]:
        key, sep, value = line.decode("utf-8").partition("\t")
        return key, (value if sep else None)

    def write(self, key: Any, value: Any) -> bytes:
        return b"\t".join(x if isinstance(x, bytes) else str(x).encode() for x in (key, value) if x is not None)


class TabProtocol:
    """``key TAB value`` with both written by ``str`` (the built-in jobs' plain output)."""

    def write(self, key: Any, value: Any) -> bytes:
        return f"{key}\t{value}".encode()


# -- steps -----------------------------------------------------------------------------------


def _identity_mapper(key: Any, value: Any) -> Iterable[tuple[Any, Any]]:
    yield key, value


def _identity_reducer(key: Any, values: Iterable[Any]) -> Iterable[tuple[Any, Any]]:
    for value in values:
        yield key, value


class MRStep:
    """One map/combine/reduce step; ``step["mapper"]`` and so on, as in mrjob (a missing
    mapper or reducer is the identity: a map-only step passes its pairs through a reduce
    that changes nothing)."""

    def __init__(self, **kwargs: Any) -> None:
        unknown = sorted(set(kwargs) - set(STEP_FUNCS) - set(UNSUPPORTED) - {"jobconf"})
        if unknown:
            raise JobDefinitionError(f"MRStep got unexpected arguments: {', '.join(unknown)}")
        unsupported = sorted(k for k in UNSUPPORTED if kwargs.get(k))
        if unsupported:
            raise JobDefinitionError(f"pdp runs Python steps only; {', '.join(unsupported)} is not supported")
        if not any(kwargs.get(k) for k in STEP_FUNCS):
            raise JobDefinitionError("a step needs at least one of " + ", ".join(STEP_FUNCS))
        self._steps = {k: kwargs.get(k) for k in STEP_FUNCS}

    def __getitem__(self, key: str) -> Any:
        if key == "mapper" and self._steps["mapper"] is None:
            return _identity_mapper
        if key == "reducer" and self._steps["reducer"] is None:
            return _identity_reducer
        return self._steps[key]

    def __repr__(self) -> str:
        named = ", ".join(f"{k}={getattr(v, '__name__', v)}" for k, v in self._steps.items() if v)
        return f"MRStep({named})"


# -- the job class -----------------------------------------------------------------------------


class Reporter:
    """Where a job's counters and status go while a task runs (one per task)."""

    def __init__(self, status_file: str | None = None) -> None:
        self.counters: dict[str, dict[str, int]] = {}
        self.status = ""
        self.status_file = status_file  # a running task's status goes here for the worker's heartbeats

    def increment_counter(self, group: str, counter: str, amount: int = 1) -> None:
        if not isinstance(amount, int) or isinstance(amount, bool):
            raise TypeError(f"amount must be an integer, not {amount!r}")
        names = self.counters.setdefault(str(group), {})
        names[str(counter)] = names.get(str(counter), 0) + amount

    def set_status(self, msg: str) -> None:
        self.status = str(msg)[:200]
        if self.status_file is not None:
            with open(self.status_file, "w", encoding="utf-8") as f:
                f.write(self.status)


class MRJob:
    """Subclass it and define ``mapper``/``combiner``/``reducer`` (or ``steps``)."""

    INPUT_PROTOCOL: Any = RawValueProtocol
    INTERNAL_PROTOCOL: Any = JSONProtocol  # unused: pdp's shuffle is msgpack with ordered keys
    OUTPUT_PROTOCOL: Any = JSONProtocol
    SORT_VALUES: bool | None = None
    SKIP_BAD_RECORDS = False
    FILES: list[str] = []

    def __init__(self, args: list[str] | None = None) -> None:
        self.arg_parser = argparse.ArgumentParser(prog=type(self).__name__, add_help=True, exit_on_error=False)
        self.configure_args()
        self.load_args(list(args or []))
        self.reporter = Reporter()

    # -- arguments (mrjob's names) --

    def configure_args(self) -> None:
        """Redefine to add job arguments with :meth:`add_passthru_arg`."""

    def add_passthru_arg(self, *args: Any, **kwargs: Any) -> None:
        self.arg_parser.add_argument(*args, **kwargs)

    def add_file_arg(self, *args: Any, **kwargs: Any) -> None:
        """A job argument naming a file: the file must also be listed in ``FILES`` to travel."""
        self.arg_parser.add_argument(*args, **kwargs)

    def load_args(self, args: list[str]) -> None:
        try:
            self.options = self.arg_parser.parse_args(args)
        except (argparse.ArgumentError, SystemExit) as exc:
            raise JobDefinitionError(f"bad job arguments {args!r}: {exc}") from None

    # -- reporting --

    def increment_counter(self, group: str, counter: str, amount: int = 1) -> None:
        self.reporter.increment_counter(group, counter, amount)

    def set_status(self, msg: str) -> None:
        self.reporter.set_status(msg)

    # -- steps --

    def steps(self) -> list[MRStep]:
        """One step made of the step methods this class redefines (mrjob's default)."""
        mine = {name: getattr(self, name) for name in STEP_FUNCS + UNSUPPORTED
                if getattr(type(self), name, None) is not getattr(MRJob, name, None)}
        return [MRStep(**mine)] if mine else []

    def input_protocol(self) -> Any:
        return self.INPUT_PROTOCOL()

    def output_protocol(self) -> Any:
        return self.OUTPUT_PROTOCOL()

    def sort_values(self) -> bool:
        return bool(self.SORT_VALUES)

    def partition(self, key: bytes, n: int) -> int:
        """The reduce task (0..n-1) of an encoded key: a stable hash, the same everywhere."""
        return zlib.crc32(key) % n

    # mrjob's step methods exist on the base class so that `steps()` can tell which a job
    # redefines; they are never called unless redefined.
    mapper: Callable[..., Any] | None = None
    mapper_init: Callable[..., Any] | None = None
    mapper_final: Callable[..., Any] | None = None
    combiner: Callable[..., Any] | None = None
    combiner_init: Callable[..., Any] | None = None
    combiner_final: Callable[..., Any] | None = None
    reducer: Callable[..., Any] | None = None
    reducer_init: Callable[..., Any] | None = None
    reducer_final: Callable[..., Any] | None = None
    mapper_raw: Callable[..., Any] | None = None
    mapper_cmd: Callable[..., Any] | None = None
    mapper_pre_filter: Callable[..., Any] | None = None
    combiner_cmd: Callable[..., Any] | None = None
    combiner_pre_filter: Callable[..., Any] | None = None
    reducer_cmd: Callable[..., Any] | None = None
    reducer_pre_filter: Callable[..., Any] | None = None
    spark: Callable[..., Any] | None = None

    @classmethod
    def run(cls) -> None:
        """``python my_job.py [INPUT...] [-- JOB_ARGS]``: run in this process, print the output
        (as mrjob's inline runner; ``pdp run`` does the same with more options)."""
        from pdp.jobs.local import run_job_class

        argv = sys.argv[1:]
        split = argv.index("--") if "--" in argv else len(argv)
        sys.stdout.flush()
        run_job_class(cls, argv[:split], argv[split + 1:], sys.stdout.buffer)
