"""The ``sort`` job: every record, ordered by a key over the whole party (range partitioned).

Job arguments (after ``--``):

* ``--key NAME``: csv and jsonl (required there): sort by the field ``NAME``;
* ``--field N``: text only: sort by the N-th (1-based) whitespace-separated field of each
  line (``str.split()``; a line with fewer fields has the key ``""``); without it the key
  is the whole line;
* ``--numeric`` (``-n``): compare keys as numbers (Python's ``float()`` of the text; a
  JSON number as it is); a key that is not a number (or is NaN) fails the job with an
  error naming the value and the input;
* ``--cuts JSON``: internal, set by the party: the range partition's boundaries, a JSON
  list of key values (:func:`sample_keys` and :func:`sample_cuts` compute them).

The order of keys: text and csv keys are strings, compared by code point. A jsonl field
compares by its JSON type first and then by value: missing or ``null`` < ``false`` <
``true`` < numbers (numerically, as floats) < strings (by code point) < arrays and objects
(by their compact JSON text). With ``--numeric`` every key is a float (``-0.0`` is ``0.0``).

Ties (equal keys) are ordered by input (in the order given), then by the output line's
text (as ``sort(1)``'s last-resort comparison): this is deterministic, the same however the
inputs are split into map tasks, so ``pdp run`` and ``pdp submit`` write the same bytes.
(Not by line number: ``INPUT_POSITIONS`` is a class-wide switch that fails on csv and jsonl,
and a per-task counter would order ties by how the input was split.)

The output is the records only, one per line, in that total order: a text record is its
line; a csv or jsonl record is written as compact JSON (``json.dumps(record,
ensure_ascii=False, separators=(",", ":"))``; a csv record is the object of the header's
names to the row's fields, all strings).

On the engine the map keys each record by ``[sort_key, input_index, output_text]`` (the
value is None) and the reduce is the identity. With ``--cuts`` the class's
:meth:`Sort.partition` sends the record to the range of its sort key (``bisect`` among the
cuts: reduce task ``i`` gets keys ``k`` with ``cuts[i-1] <= k < cuts[i]``), so the reduce
outputs are consecutive ranges of the result; without cuts every record goes to reduce task
0 (correct, just not parallel). :func:`oracle` is the sequential reference.
"""

from __future__ import annotations

import bisect
import csv
import io
import json
import math
import os
from collections.abc import Iterator
from typing import Any, BinaryIO, cast

from pdp.errors import InputError
from pdp.jobs import inputs
from pdp.jobs.api import JobDefinitionError, MRJob
from pdp.jobs.keys import encode_key
from pdp.core.split import aligned_bounds

_MAX_SHOWN = 80  # characters of a bad value an error message shows


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= _MAX_SHOWN else text[:_MAX_SHOWN] + "..."


def record_text(record: Any) -> str:
    """How a csv or jsonl record is written: compact JSON, non-ASCII as it is."""
    return json.dumps(record, ensure_ascii=False, separators=(",", ":"))


class SortProtocol:
    """The record's output text only (the key's last element)."""

    def write(self, key: Any, value: Any) -> bytes:
        return str(key[2]).encode("utf-8")


class Sort(MRJob):
    """Every record, sorted by ``--key`` / ``--field`` (``--numeric``), one per line."""

    OUTPUT_PROTOCOL = SortProtocol

    input_name = ""
    input_index = 0
    _cut_keys: tuple[bytes, ...] = ()

    def configure_args(self) -> None:
        self.add_passthru_arg("--key", default=None, help="csv/jsonl: the field to sort by")
        self.add_passthru_arg("--field", type=int, default=None,
                              help="text: sort by the N-th whitespace-separated field (1-based)")
        self.add_passthru_arg("-n", "--numeric", action="store_true", help="compare keys as numbers")
        self.add_passthru_arg("--cuts", default=None, help="internal: the range partition's boundaries (JSON)")

    def load_args(self, args: list[str]) -> None:
        super().load_args(args)
        opts = self.options
        if opts.key is not None and opts.field is not None:
            raise JobDefinitionError("sort: give --key (csv/jsonl) or --field (text), not both")
        if opts.field is not None and opts.field < 1:
            raise JobDefinitionError(f"sort: --field counts from 1, got {opts.field}")
        self.key_name: str | None = opts.key
        self.field: int | None = opts.field
        self.numeric = bool(opts.numeric)
        self.cuts: list[Any] = []
        if opts.cuts is not None:
            try:
                cuts = json.loads(opts.cuts)
            except ValueError as exc:
                raise JobDefinitionError(f"sort: --cuts is not JSON: {exc}") from None
            if not isinstance(cuts, list):
                raise JobDefinitionError("sort: --cuts must be a JSON list of key values")
            try:
                self.cuts = [self._cut_value(c) for c in cuts]
                encoded = sorted({encode_key([c]) for c in self.cuts})
            except (TypeError, ValueError) as exc:
                raise JobDefinitionError(f"sort: bad --cuts value: {exc}") from None
            self._cut_keys = tuple(encoded)  # each cut c as the encoded one-element list [c]

    def _cut_value(self, c: Any) -> Any:
        """A cut as a sort key: JSON numbers compare as floats (as every numeric key)."""
        if isinstance(c, (int, float)) and not isinstance(c, bool):
            return _number_key(c, "--cuts")
        if self.numeric:
            raise ValueError(f"{_shown(c)} is not a number (with --numeric every cut is a number)")
        return c

    # -- the key --

    def sort_key(self, record: Any) -> Any:
        """The sort key of one record (a text line, a csv row dict or a JSON value)."""
        where = self.input_name or "the input"
        value: Any
        if isinstance(record, str):  # a text line
            if self.key_name is not None:
                raise InputError(f"sort --key {self.key_name}: {where} is text (its lines have no named fields; "
                                 "use --field N)")
            if self.field is None:
                value = record
            else:
                parts = record.split()
                value = parts[self.field - 1] if len(parts) >= self.field else ""
            return _number_key(value, where) if self.numeric else value
        if self.field is not None:
            raise InputError(f"sort --field is for text input; {where} has records: use --key NAME")
        if self.key_name is None:
            raise InputError(f"sort: {where} has csv or jsonl records: give the field to sort by with --key NAME")
        if not isinstance(record, dict):
            raise InputError(f"sort --key {self.key_name}: a record of {where} is not a JSON object: "
                             f"{_shown(record)}")
        value = record.get(self.key_name)
        if self.numeric:
            if value is None and self.key_name not in record:
                raise InputError(f"sort --numeric: a record of {where} has no field {self.key_name!r}: "
                                 f"{_shown(record)}")
            return _number_key(value, where)
        return _json_key(value, where)

    def mapper(self, _: Any, record: Any) -> Iterator[tuple[list[Any], None]]:
        text = record if isinstance(record, str) else record_text(record)
        yield [self.sort_key(record), self.input_index, text], None

    def partition(self, kb: bytes, n: int) -> int:
        """The reduce task of an encoded key ``[sort_key, ...]``: its range among the cuts.

        ``encode_key`` preserves the order of lists element by element, a proper prefix
        first, so ``kb`` sorts after the encoded ``[c]`` exactly when ``sort_key >= c``:
        ``bisect`` on the raw bytes, with no decoding."""
        if not self.cuts or n <= 1:
            return 0
        return min(bisect.bisect_right(self._cut_keys, kb), n - 1)


def _number_key(value: Any, where: str) -> float:
    """A numeric sort key: a float (never NaN; -0.0 becomes 0.0)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise InputError(f"sort --numeric: {_shown(value)} in {where} is not a number")
    try:
        number = float(value)
    except (ValueError, OverflowError):
        raise InputError(f"sort --numeric: {_shown(value)} in {where} is not a number") from None
    if math.isnan(number):
        raise InputError(f"sort --numeric: {_shown(value)} in {where} is NaN, which has no place in an order")
    return number + 0.0  # -0.0 + 0.0 is 0.0


def _json_key(value: Any, where: str) -> Any:
    """A jsonl/csv field as a key whose encoding orders by JSON type, then value: None <
    False < True < float < str < [JSON text] (the key encoding's own order of types)."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, (int, float)):
        return _number_key(value, where)
    return [record_text(value)]


# -- sampling the keys for the range partition ----------------------------------------------------


class _ShortReads:
    """A file whose reads return at most ``limit`` bytes (finding a line start near a sample
    place should not read aligned_bounds' whole 64 KiB block each time)."""

    def __init__(self, f: BinaryIO, limit: int = 4096) -> None:
        self.f, self.limit = f, limit

    def seek(self, pos: int, whence: int = 0) -> int:
        return self.f.seek(pos, whence)

    def read(self, n: int = -1) -> bytes:
        return self.f.read(self.limit if n < 0 else min(n, self.limit))


def _csv_header(path: str, size: int) -> list[str]:
    splitter = inputs.Splitter("csv", max(1, size))
    with open(path, "rb") as f:
        splitter.feed(f.read(inputs.MAX_HEADER + 1))
    return list(splitter.finish().get("header") or [])


def sample_keys(path: str, size: int, data_type: str, args: list[str], header: list[str] | None,
                k: int = 1000) -> list[Any]:
    """The sort keys of about ``k`` records of one input, read at evenly spaced places.

    Each place is moved to the next line start (:func:`pdp.core.split.aligned_bounds`) and the
    one line there is read as a record (``data_type``; a csv needs its ``header``, read from
    the file when None). A csv record spanning lines may be sampled from its middle: such
    samples are skipped when they do not parse, and only the balance of the partition
    depends on them, never the output. Records whose key cannot be computed are skipped
    too (the map reports them). ``args`` are the job's arguments (``--key`` and so on)."""
    job = Sort(list(args))
    if data_type == "csv" and header is None:
        header = _csv_header(path, size)
    places = min(k, size)
    keys: list[Any] = []
    seen: set[int] = set()
    with open(path, "rb") as raw:
        f = cast(BinaryIO, _ShortReads(raw))
        for j in range(places):
            a = aligned_bounds(f, j * size // places, j * size // places, size)[0]
            if a >= size or a in seen:
                continue
            seen.add(a)
            start, end = aligned_bounds(f, a, a + 1, size)
            if start >= end:
                continue
            try:
                for _, record in inputs.records(path, start, end, data_type, name=path, header=header,
                                                skip_bad=True, bad=[]):
                    keys.append(job.sort_key(record))
            except InputError:
                continue
    return keys


def sample_cuts(keys: list[Any], n: int) -> list[Any]:
    """At most ``n - 1`` increasing boundaries splitting the sampled ``keys`` into ``n``
    ranges of about equal size (evenly spaced quantiles, deduplicated).

    A boundary is a sampled key; its range starts there (``partition`` sends a key equal
    to a cut to the range on its right). The smallest sampled key is never a boundary (the
    first range would hold only keys below every sample), so with many equal keys there
    are fewer boundaries, and some ranges stay empty. A string boundary longer than 256
    characters is shortened to its prefix."""
    if n <= 1 or not keys:
        return []
    ordered = sorted(((encode_key(v), v) for v in keys), key=lambda kv: kv[0])  # partition()'s order
    m = len(ordered)
    # The distinct keys after the smallest, with how many sampled keys are below each.
    distinct: list[Any] = []
    below: list[int] = []
    for i in range(1, m):
        if ordered[i][0] != ordered[i - 1][0]:
            distinct.append(ordered[i][1])
            below.append(i)
    cuts: list[Any] = []
    last = -1
    for q in range(1, n):
        target = q * m / n
        j = bisect.bisect_left(below, target)
        # the candidate nearest the target: below[j-1] < target <= below[j]
        if j > 0 and (j == len(below) or target - below[j - 1] <= below[j] - target):
            j -= 1
        if j < len(below) and j > last:
            cut = _shortened(distinct[j])
            if not cuts or encode_key(cut) != encode_key(cuts[-1]):
                cuts.append(cut)
            last = j
    return cuts


_CUT_CHARS = 256  # a longer string cut is cut to its prefix (still a boundary; the argument stays small)


def _shortened(key: Any) -> Any:
    """A key as a boundary of at most about _CUT_CHARS characters. A prefix of a string is
    a boundary as good (shortening keeps the cuts' order: ``x <= y`` gives ``x[:n] <= y[:n]``)."""
    if isinstance(key, str):
        return key[:_CUT_CHARS]
    if isinstance(key, list) and len(key) == 1 and isinstance(key[0], str):
        return [key[0][:_CUT_CHARS]]
    return key


def cuts_arg(cuts: list[Any]) -> list[str]:
    """The job arguments that hand ``cuts`` to the tasks: ``["--cuts", JSON]``."""
    return ["--cuts", json.dumps(cuts, ensure_ascii=False)]


# -- the sequential reference -----------------------------------------------------------------------


def _oracle_records(path: str, data_type: str) -> list[Any]:
    """Every record of one input, read with plain Python over the whole file."""
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as e:
        raise InputError(f"{path} is not valid UTF-8 (byte {e.start})") from None
    if data_type == "csv":
        rows = [row for row in csv.reader(io.StringIO(text, newline=""))]
        if not rows:
            return []
        header, out = rows[0], []
        for row in rows[1:]:
            if not row:
                continue  # a blank line
            if len(row) != len(header):
                raise InputError(f"{path}: a row has {len(row)} fields where the header has {len(header)}")
            out.append(dict(zip(header, row)))
        return out
    pieces = text.split("\n")
    last = pieces.pop()
    lines = [p.removesuffix("\r") for p in pieces] + ([last] if last else [])
    if data_type == "jsonl":
        return [json.loads(line) for line in lines if line.strip(" \t\r\n")]
    return lines


def _oracle_type(path: str, data_type: str | None) -> str:
    if data_type is not None:
        return data_type
    ext = os.path.splitext(path)[1].lower()
    return {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl"}.get(ext, "text")


def _oracle_number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise InputError(f"not a number: {value!r}")
    try:
        x = float(value)
    except (ValueError, OverflowError):
        raise InputError(f"not a number: {value!r}") from None
    if math.isnan(x):
        raise InputError(f"NaN: {value!r}")
    return 0.0 if x == 0 else x


def _oracle_key(record: Any, key: str | None, field: int | None, numeric: bool) -> tuple[Any, ...]:
    """A tuple that Python compares in the documented order of sort keys."""
    if isinstance(record, str):
        if key is not None:
            raise InputError("--key on text")
        value: Any = record if field is None else (record.split() + [""] * field)[field - 1]
        return (_oracle_number(value),) if numeric else (value,)
    if key is None or field is not None or not isinstance(record, dict):
        raise InputError("csv/jsonl records need --key (and objects)")
    if numeric:
        if key not in record:
            raise InputError(f"no field {key!r}")
        return (_oracle_number(record[key]),)
    value = record.get(key)
    if value is None:
        return (0,)
    if isinstance(value, bool):
        return (1, value)
    if isinstance(value, (int, float)):
        return (2, _oracle_number(value))
    if isinstance(value, str):
        return (3, value)
    return (4, json.dumps(value, ensure_ascii=False, separators=(",", ":")))


def oracle(paths: list[str], args: list[str], data_type: str | None = None) -> bytes:
    """Sequential reference: the complete sort output for ``paths`` with job arguments
    ``args`` (``data_type``: of every input; by default from each one's extension),
    written to be obviously correct: read everything, sort once, write."""
    options = Sort(list(args)).options
    rows: list[tuple[tuple[Any, ...], int, str]] = []
    for index, path in enumerate(paths):
        for record in _oracle_records(str(path), _oracle_type(str(path), data_type)):
            text = record if isinstance(record, str) else json.dumps(record, ensure_ascii=False,
                                                                     separators=(",", ":"))
            rows.append((_oracle_key(record, options.key, options.field, options.numeric), index, text))
    rows.sort()
    return "".join(text + "\n" for _, _, text in rows).encode("utf-8")
