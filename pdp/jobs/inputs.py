"""Input data types, record-aligned cut points for map tasks, and reading a range's records.

A job's input has one of :data:`DATA_TYPES`:

* ``text``: every line is a record; the value is the line without its ``"\\n"`` or
  ``"\\r\\n"`` (a lone ``"\\r"`` is data), as mrjob's RawValueProtocol reads it.
* ``jsonl``: every line that is not blank (JSON whitespace only) holds one JSON value.
* ``csv``: RFC 4180. The first record is the header row; every other record becomes a
  dict of the header's names to its fields. A quoted field may hold newlines, so a
  record may span lines.

Cutting (:class:`Splitter`) uses Hadoop's rule of :mod:`pdp.core.split` with records in
place of lines: the map task for chunk ``k`` starts at the first record start at or
after ``k * chunk``. A record starts right after a ``b"\\n"`` that ends one: for text
and jsonl after every ``b"\\n"``; for csv after a ``b"\\n"`` preceded (since the file
start) by an even number of ``b'"'`` bytes. An escaped quote ``""`` adds two, so the
parity says whether a byte is inside a quoted field; a CSV whose quotes are not RFC
4180 is still cut consistently (a stray quote just makes a long record, which then
fails to parse as one row and is a bad record). The same rule delimits the records
:func:`records` reads, so reading every range and concatenating gives exactly the
records of reading the whole file.

All input is UTF-8 (strict); a UTF-8 BOM at the file start is dropped. A record that
cannot be used (invalid UTF-8, invalid JSON, a CSV row whose field count differs from
the header's, a record longer than :data:`MAX_RECORD` bytes) raises :class:`BadRecord`,
or is skipped and its line counted when asked to. Memory stays bounded: the splitter
keeps counters (and, for csv, the unfinished header row, at most :data:`MAX_HEADER`
bytes); the reader holds about one block plus the record being assembled.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterator
from typing import Any, AnyStr

from pdp.errors import InputError

DATA_TYPES = ("text", "csv", "jsonl")
BLOCK = 1 << 20  # bytes :func:`records` reads at a time
MAX_RECORD = 1 << 26  # a longer record is bad (its bytes are skipped, never held)
MAX_HEADER = 1 << 20  # a longer csv header row makes the input unusable
_BOM = b"\xef\xbb\xbf"
_JSON_WS = " \t\r\n"
_SKIP = object()  # "no record here" from _Reader.value
_json_decode = json.JSONDecoder().decode  # json.loads without its per-call checks


def data_type_of(name: str, given: str | None = None) -> str:
    """The data type of input ``name``: ``given`` if set, else from the file extension
    (``.csv`` is csv; ``.jsonl`` and ``.ndjson`` are jsonl; anything else is text)."""
    if given is not None:
        if given == "text/utf-8":
            return "text"
        if given in DATA_TYPES:
            return given
        raise InputError(f"unknown data type {given!r} for {name}; choose one of: {', '.join(DATA_TYPES)}")
    ext = os.path.splitext(name)[1].lower()
    if ext == ".csv":
        return "csv"
    if ext in (".jsonl", ".ndjson"):
        return "jsonl"
    return "text"


class BadRecord(InputError):
    """A record of input ``name`` starting at (1-based) ``line`` cannot be used, for ``reason``."""

    def __init__(self, name: str, line: int, reason: str) -> None:
        self.name = name
        self.line = line
        self.reason = reason
        super().__init__(f"{name}, line {line}: {reason}")

    def __reduce__(self) -> tuple[type, tuple[str, int, str]]:
        # Rebuild from the fields so the error survives a process pool's pickling.
        return (type(self), (self.name, self.line, self.reason))


def _check_type(data_type: str) -> None:
    if data_type not in DATA_TYPES:
        raise ValueError(f"data type must be one of {', '.join(DATA_TYPES)}, got {data_type!r}")


def _record_end(s: AnyStr, i: int, odd: bool, nl: AnyStr, quote: AnyStr) -> int:
    """Index of the first ``nl`` at or after ``i`` preceded by an even number of ``quote``
    (``odd`` is the parity of those before ``i``), or -1. Two C calls per line."""
    while True:
        n = s.find(nl, i)
        if n < 0:
            return -1
        if s.count(quote, i, n) & 1:
            odd = not odd
        if not odd:
            return n
        i = n + 1


def _last_record_end(s: bytes, lo: int, fallback: int) -> int:
    """Index of the last ``b"\\n"`` at or after ``lo`` preceded by an even number of quotes
    counted from ``lo`` (where the parity is even), or ``fallback``."""
    j = s.rfind(b"\n", lo)
    if j < 0:
        return fallback
    odd = s.count(b'"', lo, j) & 1
    while odd:
        k = s.rfind(b"\n", lo, j)
        if k < 0:
            return fallback
        odd ^= s.count(b'"', k, j) & 1
        j = k
    return j


def _csv_pieces(s: AnyStr, nl: AnyStr, quote: AnyStr) -> Iterator[AnyStr]:
    """The csv records of ``s`` (which starts at a record start), each with its terminator;
    the last one has none if ``s`` does not end a record."""
    i, n = 0, len(s)
    while i < n:
        j = _record_end(s, i, False, nl, quote)
        if j < 0:
            yield s[i:]
            return
        yield s[i : j + 1]
        i = j + 1


def _csv_fields(record: str) -> list[str]:
    """The fields of one csv record (with or without its terminator); [] for a blank line.
    Raises csv.Error for a record the csv module rejects (e.g. a newline it sees outside
    quotes, which a record delimited by quote parity has only if its quoting is broken)."""
    return next(csv.reader((record,)), [])


class _Feed:
    """An iterator handing a csv reader one record at a time (then StopIteration until
    the next): a reader kept across records parses each alone, 3x faster than a new one."""

    __slots__ = ("item",)

    def __init__(self) -> None:
        self.item: str | None = None

    def __iter__(self) -> _Feed:
        return self

    def __next__(self) -> str:
        item = self.item
        if item is None:
            raise StopIteration
        self.item = None
        return item


def _parse_header(raw: bytes) -> list[str]:
    """The csv header row from the bytes of the first record (BOM included, if any)."""
    if raw.startswith(_BOM):
        raw, skipped = raw[len(_BOM) :], len(_BOM)
    else:
        skipped = 0
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"the csv header row is not valid UTF-8 (byte {e.start + skipped})") from None
    try:
        return _csv_fields(text)
    except csv.Error as e:
        raise InputError(f"the csv header row is not valid CSV: {e}") from None


class Splitter:
    """Fed every byte of one input in order; finds record-aligned cut points for map tasks.

    :meth:`finish` gives ``{"cuts": [[offset, line], ...], "size": n}`` (and
    ``"header"``, the header row's names, for csv). For every ``k >= 1`` with
    ``k * chunk < size`` the cut is the first record start at or after ``k * chunk``
    with the 1-based line number of the record's first line; cuts are distinct,
    increasing and strictly between 0 and ``size``. Feeding costs a few C-level passes
    (``bytes.count``/``find``) over each frame and keeps no data except, for csv, the
    unfinished header row. ``feed`` or ``finish`` raise InputError for a csv header row
    that is not valid UTF-8 or CSV, or longer than :data:`MAX_HEADER` bytes.
    """

    def __init__(self, data_type: str, chunk: int) -> None:
        _check_type(data_type)
        if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
            raise ValueError(f"chunk must be an integer >= 1, got {chunk!r}")
        self._csv = data_type == "csv"
        self._chunk = chunk
        self._size = 0  # bytes fed
        self._lines = 0  # b"\n" fed
        self._odd = False  # parity of the b'"' fed (csv)
        # Where to look for the b"\n" that ends the record before the next cut: one byte
        # before the next multiple of chunk (a record starts there iff that byte ends one).
        self._scan = chunk - 1
        self._cuts: list[list[int]] = []
        self._head: bytearray | None = bytearray() if self._csv else None  # csv header not yet complete
        self._header: list[str] = []

    def feed(self, data: bytes) -> None:
        """Account for the next bytes of the input."""
        if isinstance(data, memoryview):
            data = data.tobytes()
        n = len(data)
        if not n:
            return
        base = self._size
        if self._head is not None:
            self._take_header(data)
        # Counters at index p of data: newlines and quote parity before it.
        p, nl, odd = 0, self._lines, self._odd
        while self._scan < base + n:
            i = self._scan - base  # >= 0: scans start at or after the frame's start
            nl += data.count(b"\n", p, i)
            if self._csv:
                odd ^= bool(data.count(b'"', p, i) & 1)
                j = _record_end(data, i, odd, b"\n", b'"')
            else:
                j = data.find(b"\n", i)
            p = i
            if j < 0:
                self._scan = base + n
                break
            nl += data.count(b"\n", p, j + 1)
            odd, p = False, j + 1  # the record ended at j: the parity there is even
            cut = base + j + 1
            self._cuts.append([cut, nl + 1])
            self._scan = (cut // self._chunk + 1) * self._chunk - 1
        self._lines = nl + data.count(b"\n", p)
        if self._csv:
            self._odd = odd ^ bool(data.count(b'"', p) & 1)
        self._size = base + n

    def _take_header(self, data: bytes) -> None:
        """Collect the header row's bytes from ``data``; parse it once it is complete."""
        assert self._head is not None
        j = _record_end(data, 0, self._odd, b"\n", b'"')
        if j >= 0:
            self._head += data[: j + 1]
            self._header = _parse_header(bytes(self._head))
            self._head = None
            return
        self._head += data
        if len(self._head) > MAX_HEADER:
            raise InputError(f"the csv header row is longer than {MAX_HEADER} bytes (is a quote unbalanced?)")

    def finish(self) -> dict:
        """The cut points, the size and (csv) the header, after the last byte was fed."""
        if self._head is not None:  # the header row is the whole input (or it is empty)
            self._header = _parse_header(bytes(self._head))
            self._head = None
        cuts = [c for c in self._cuts if c[0] < self._size]  # a record start at the end is no cut
        out: dict[str, Any] = {"cuts": cuts, "size": self._size}
        if self._csv:
            out["header"] = list(self._header)
        return out


class _Reader:
    """Turns the regions (whole records) of one range into (key, value) pairs."""

    def __init__(self, data_type: str, name: str, start: int, header: list[str] | None,
                 skip_bad: bool, bad: list[int] | None, numbered: bool = False) -> None:
        self.type = data_type
        self.numbered = numbered  # keys are the records' line numbers (else None)
        self.name = name
        self.header = header
        self.skip_bad = skip_bad
        self.bad = bad
        self.at_start = start == 0  # the next region starts the file (drop a BOM)
        self.need_header = data_type == "csv" and start == 0  # the next record is the header row
        self._feed = _Feed()
        self._csv = csv.reader(self._feed)

    def fields(self, record: str) -> list[str]:
        """As _csv_fields, with the reader kept across records."""
        self._feed.item = record
        try:
            return next(self._csv, [])
        finally:
            self._feed.item = None

    def fail(self, line: int, reason: str) -> None:
        """The record at ``line`` is bad: raise, or count it when skipping bad records."""
        if self.need_header:  # the header row itself
            self.need_header = False
            if self.header is None:  # without it nothing can be read
                raise BadRecord(self.name, line, f"the header row: {reason}")
            return
        if not self.skip_bad:
            raise BadRecord(self.name, line, reason)
        if self.bad is not None:
            self.bad.append(line)

    def value(self, record: str, line: int) -> Any:
        """The value of a jsonl or csv record (a jsonl line may lack its b"\\n"), or _SKIP."""
        if self.type == "jsonl":
            if not record.strip(_JSON_WS):
                return _SKIP
            try:
                return _json_decode(record)
            except json.JSONDecodeError as e:
                self.fail(line, f"not valid JSON: {e.msg} (column {e.colno})")
            except (ValueError, RecursionError) as e:  # too many digits, nested too deeply
                self.fail(line, f"not valid JSON: {e or type(e).__name__}")
            return _SKIP
        if self.need_header:
            if self.header is not None:
                self.need_header = False
                return _SKIP
            try:
                self.header = self.fields(record)
            except csv.Error as e:
                self.fail(line, f"not valid CSV: {e}")
            self.need_header = False
            return _SKIP
        try:
            fields = self.fields(record)
        except csv.Error as e:
            self.fail(line, f"not valid CSV: {e}")
            return _SKIP
        if not fields:  # a blank line (csv.DictReader skips them too)
            return _SKIP
        header = self.header
        assert header is not None
        if len(fields) != len(header):
            self.fail(line, f"{len(fields)} fields where the header has {len(header)}")
            return _SKIP
        return dict(zip(header, fields))

    def region(self, data: bytes, off: int, line: int) -> Iterator[tuple[Any, Any]]:
        """The records of ``data``, whole records of the file from byte ``off`` (line ``line``)."""
        if self.at_start:
            self.at_start = False
            if data.startswith(_BOM):
                data, off = data[len(_BOM) :], off + len(_BOM)
        try:
            s = data.decode("utf-8")
        except UnicodeDecodeError:
            yield from self._region_bytes(data, off, line)
            return
        if self.type == "csv" and '"' in s:
            for record in _csv_pieces(s, "\n", '"'):
                v = self.value(record, line)
                if v is not _SKIP:
                    yield (line if self.numbered else None), v
                line += record.count("\n")
            return
        parts = s.split("\n")  # lines; for csv without quotes records too (a "\r" left is a newline to csv)
        last = parts.pop()  # not ended by "\n": "" unless the file lacks a final newline
        if self.type == "text":
            for part in parts:
                yield None, part.removesuffix("\r")
            if last:
                yield None, last
            return
        if last:
            parts.append(last)
        for part in parts:
            v = self.value(part, line)
            if v is not _SKIP:
                yield (line if self.numbered else None), v
            line += 1

    def _region_bytes(self, data: bytes, off: int, line: int) -> Iterator[tuple[Any, Any]]:
        """As :meth:`region` for ``data`` that is not all valid UTF-8: record by record."""
        if self.type == "csv":
            pieces = list(_csv_pieces(data, b"\n", b'"'))
        else:
            pieces = data.split(b"\n")
            last = pieces.pop()
            pieces = [p + b"\n" for p in pieces]
            if last:
                pieces.append(last)
        for piece in pieces:
            try:
                record = piece.decode("utf-8")
            except UnicodeDecodeError as e:
                self.fail(line, f"not valid UTF-8 (byte {off + e.start})")
            else:
                if self.type == "text":
                    if record.endswith("\n"):
                        record = record[:-2] if record.endswith("\r\n") else record[:-1]
                    yield None, record
                else:
                    v = self.value(record, line)
                    if v is not _SKIP:
                        yield (line if self.numbered else None), v
            off += len(piece)
            line += piece.count(b"\n")


def records(path: str, start: int, end: int, data_type: str, *, name: str, line: int = 1,
            header: list[str] | None = None, skip_bad: bool = False,
            bad: list[int] | None = None, numbered: bool = False, base: int = 0) -> Iterator[tuple[Any, Any]]:
    """The (key, value) records of bytes ``[start, end)`` of ``path``, read in blocks.

    ``start`` and ``end`` are record starts (cuts of :class:`Splitter`, 0, or the
    size); ``line`` is the line number at ``start`` and ``name`` the input's name as
    the user gave it, both for :class:`BadRecord`. Keys are None; values are a text
    line (str), a JSON value, or a csv dict. csv needs ``header`` unless ``start`` is
    0 (then the header row is read from the file when not given); the header row is
    never a record. A bad record raises BadRecord unless ``skip_bad``: then it is
    skipped and its line appended to ``bad``. With ``numbered`` (csv and jsonl) the key
    of each record is its line number (a csv record's first line). ``base`` is where
    ``path``'s byte 0 is in the input (a range fetched into a file of its own): only the
    input's own start has a BOM to drop and (csv) the header row. Arguments are checked at the call; the
    file is read as the iterator is consumed.
    """
    _check_type(data_type)
    if start < 0 or end < start:
        raise ValueError(f"bad range [{start}, {end})")
    if data_type == "csv" and header is None and start != 0:
        raise ValueError("a csv range that does not start the file needs the header")
    return _records(path, start, end, _Reader(data_type, name, base + start, header, skip_bad, bad, numbered), line)


def _records(path: str, start: int, end: int, reader: _Reader, line: int) -> Iterator[tuple[Any, Any]]:
    is_csv = reader.type == "csv"
    cap = MAX_RECORD
    block_size = max(1, min(BLOCK, cap))  # a record inside one block is never too long
    too_long = f"longer than {cap} bytes"
    # The record being assembled across blocks: its start, its bytes so far (dropped once
    # it is too long), their newlines and (csv) quote parity.
    rec_off, rec_line = start, line
    pending: list[bytes] = []
    pend_len = pend_nl = 0
    odd, dropped = False, False
    with open(path, "rb") as f:
        f.seek(start)
        pos = start
        while pos < end:
            block = f.read(min(block_size, end - pos))
            if not block:
                raise InputError(f"{reader.name} ends at byte {pos}, before {end} (did it change?)")
            block_off, pos = pos, pos + len(block)
            first = _record_end(block, 0, odd, b"\n", b'"') if is_csv else block.find(b"\n")
            if first < 0:  # the whole block is inside the record
                pend_nl += block.count(b"\n")
                if is_csv:
                    odd ^= bool(block.count(b'"') & 1)
                pend_len += len(block)
                if not dropped:
                    pending.append(block)
                    if pend_len > cap:
                        pending, dropped = [], True
                continue
            last = _last_record_end(block, first + 1, first) if is_csv else block.rfind(b"\n")
            if dropped or pend_len + first + 1 > cap:
                reader.at_start = False
                reader.fail(rec_line, too_long)
                rline = rec_line + pend_nl + block.count(b"\n", 0, first + 1)
                region, roff = block[first + 1 : last + 1], block_off + first + 1
            else:
                region = b"".join([*pending, block[: last + 1]]) if pending else block[: last + 1]
                roff, rline = rec_off, rec_line
            if region:
                yield from reader.region(region, roff, rline)
            rec_off, rec_line = block_off + last + 1, rline + region.count(b"\n")
            tail = block[last + 1 :]
            pending, pend_len, pend_nl = ([tail] if tail else []), len(tail), tail.count(b"\n")
            odd, dropped = (bool(tail.count(b'"') & 1) if is_csv else False), False
            if pend_len > cap:
                pending, dropped = [], True
    if dropped:  # the range ends inside a record that is too long
        reader.at_start = False
        reader.fail(rec_line, too_long)
    elif pending:  # the last record, without a final newline
        yield from reader.region(b"".join(pending), rec_off, rec_line)


def read_text(path: str) -> str:
    """A whole file as strict UTF-8: the sequential oracles' reader (small inputs only)."""
    with open(path, "rb") as f:
        raw = f.read()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{path} is not valid UTF-8 (byte {e.start})") from None
