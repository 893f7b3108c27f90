"""The word count job kind (MIT 6.824 ``wc`` semantics).

A word is a maximal run of characters for which ``str.isalpha()`` is True (any
Unicode letter); case is kept. The output is UTF-8, one ``word\\tcount\\n`` line
per distinct word, sorted by code point. Input must be valid UTF-8 (strict:
encoded surrogates are invalid); otherwise :class:`InvalidUtf8` names the first
bad byte.

Pipeline, each step taking file paths and returning a small dict of statistics:

* :func:`map_range` counts words in a byte range of an input file and writes
  ``n_reduce`` msgpack partition files (word bytes -> count), a word going to
  partition :func:`partition_of`.
* :func:`reduce_partitions` sums the map outputs of one partition and writes
  its sorted final lines.
* :func:`merge_outputs` k-way merges the reduce outputs (disjoint, each sorted).

Sorting UTF-8 bytes gives code point order, and words contain no byte below
0x41 while the separator is a tab (0x09), so sorting whole ``word\\tcount\\n``
lines as bytes orders them by word.

The fast kernel (:func:`count_words`) works on bytes: ASCII non-letters can never
be part of a multibyte UTF-8 sequence, so translating them to spaces and
splitting yields tokens made of ASCII letters and non-ASCII bytes. The ASCII
tokens are words as they are; the few distinct non-ASCII tokens are decoded and
re-split exactly by ``str.isalpha()``. :func:`oracle` is the slow, obviously
correct sequential reference the tests and the node compare against.
"""

from __future__ import annotations

import heapq
import string
import zlib
from collections import Counter
from collections.abc import Iterable, Mapping
from contextlib import ExitStack
from itertools import groupby

import msgpack

from pdp import mapoutput
from pdp.errors import InputError
from pdp.fsutil import atomic_write, atomic_writer
from pdp.progress import report

_LETTERS = frozenset(string.ascii_letters.encode())
# Keep ASCII letters and every byte >= 0x80; every other ASCII byte becomes a space.
_TABLE = bytes(b if b in _LETTERS or b >= 0x80 else 0x20 for b in range(256))
_PIECE = 1 << 22


class InvalidUtf8(InputError):
    """The input is not valid UTF-8; ``offset`` is the absolute byte offset of the first bad byte."""

    def __init__(self, offset: int, path: str | None = None) -> None:
        self.offset = offset
        self.path = path
        where = f" of {path}" if path is not None else ""
        super().__init__(f"invalid UTF-8 at byte {offset}{where}")

    def __reduce__(self) -> tuple[type, tuple[int, str | None]]:
        # Rebuild from (offset, path) so the error survives a process pool's pickling.
        return (type(self), (self.offset, self.path))


def _validate(data: bytes) -> None:
    """Raise InvalidUtf8 (offset relative to ``data``) unless ``data`` is strict UTF-8."""
    if data.isascii():
        return
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InvalidUtf8(e.start) from None


def _split_alpha(token: bytes) -> list[bytes]:
    """The words (maximal ``str.isalpha()`` runs) of a token that is valid UTF-8."""
    text = token.decode("utf-8")
    if text.isalpha():
        return [token]
    return ["".join(run).encode("utf-8") for alpha, run in groupby(text, str.isalpha) if alpha]


def count_words(data: bytes) -> Counter[bytes]:
    """Count the words of UTF-8 ``data``; keys are the UTF-8 encoded words."""
    _validate(data)
    counts = Counter(data.translate(_TABLE).split())
    for token in [t for t in counts if not t.isascii()]:
        words = _split_alpha(token)
        if words == [token]:
            continue
        n = counts.pop(token)
        for word in words:
            counts[word] += n
    return counts


def _last_cut(buf: bytes, lo: int) -> int:
    """Index just after the last ASCII non-letter byte at or after ``lo`` in ``buf``, or -1."""
    hi, width = len(buf), 256
    while hi > lo:
        s = max(lo, hi - width)
        i = buf[s:hi].translate(_TABLE).rfind(b" ")
        if i >= 0:
            return s + i + 1
        hi, width = s, width * 2
    return -1


def _pieces(path: str, start: int, end: int, piece: int) -> Iterable[tuple[int, bytes]]:
    """Yield ``(offset, bytes)`` pieces of ``[start, end)``, each cut after an ASCII non-letter."""
    with open(path, "rb") as f:
        f.seek(start)
        pos, carry = start, b""
        remaining = max(0, end - start)
        while remaining > 0:
            chunk = f.read(min(piece, remaining))
            if not chunk:
                break
            remaining -= len(chunk)
            buf = carry + chunk
            cut = len(buf) if remaining == 0 else _last_cut(buf, len(carry))
            if cut < 0:
                carry = buf
                continue
            yield pos, buf[:cut]
            pos, carry = pos + cut, buf[cut:]
        if carry:
            yield pos, carry


def count_file_range(
    path: str, start: int, end: int, piece: int = _PIECE, progress: str | None = None
) -> Counter[bytes]:
    """Count the words in bytes ``[start, end)`` of ``path``, reading about ``piece`` bytes at a time.

    Pieces end just after an ASCII non-letter byte, so no word and no UTF-8
    sequence is split. InvalidUtf8.offset is absolute in the file. With ``progress``, the
    bytes counted so far are recorded there after every piece (see :mod:`pdp.progress`).
    """
    if piece < 1:
        raise ValueError(f"piece must be >= 1, got {piece}")
    total: Counter[bytes] = Counter()
    for pos, data in _pieces(path, start, end, piece):
        try:
            total.update(count_words(data))
        except InvalidUtf8 as e:
            raise InvalidUtf8(pos + e.offset, path) from None
        report(progress, pos + len(data) - start)
    return total


def partition_of(word: bytes, n: int) -> int:
    """The reduce partition of ``word`` among ``n``: stable across processes and machines."""
    return zlib.crc32(word) % n


_PARTITIONS: dict[int, dict[bytes, int]] = {}  # n_reduce -> word -> partition, per task process
_PARTITIONS_MAX = 1 << 20


def _partitions(n: int) -> dict[bytes, int]:
    """This process's memo of partition_of for ``n`` partitions (words repeat across maps)."""
    known = _PARTITIONS.setdefault(n, {})
    if len(known) > _PARTITIONS_MAX:
        known.clear()
    return known


def map_range(
    path: str, start: int, end: int, n_reduce: int, out_path: str, progress: str | None = None
) -> dict:
    """Count bytes ``[start, end)`` of ``path`` and write one map output file (see
    :mod:`pdp.mapoutput`) of ``n_reduce`` msgpack partitions (word bytes -> count)."""
    if n_reduce < 1:
        raise ValueError(f"need n_reduce >= 1, got {n_reduce}")
    counts = count_file_range(path, start, end, progress=progress)
    parts: list[dict[bytes, int]] = [{} for _ in range(n_reduce)]
    known = _partitions(n_reduce)
    for word, n in counts.items():
        r = known.get(word)
        if r is None:
            r = known[word] = partition_of(word, n_reduce)
        parts[r][word] = n
    mapoutput.write(out_path, [msgpack.packb(part, use_bin_type=True) for part in parts])
    return {"bytes": end - start, "words": sum(counts.values()), "keys": len(counts)}


def format_counts(counts: Mapping[bytes, int]) -> bytes:
    """The output lines ``word\\tcount\\n`` for ``counts``, sorted by code point."""
    return b"".join(sorted(b"%s\t%d\n" % (w, n) for w, n in counts.items()))


def reduce_partitions(sources: list[mapoutput.Source], out_path: str) -> dict:
    """Sum one partition of the map outputs (``sources``, see :mod:`pdp.mapoutput`) and write
    its sorted lines to ``out_path``."""
    total: Counter[bytes] = Counter()
    for path, r in sources:
        unpacker = msgpack.Unpacker(raw=False, strict_map_key=False, max_buffer_size=0)
        unpacker.feed(mapoutput.read(path, r))
        for counts in unpacker:
            total.update(counts)
    data = format_counts(total)
    atomic_write(out_path, data, durable=False)
    return {"keys": len(total), "bytes": len(data)}


def merge_outputs(in_paths: list[str], out_path: str) -> dict:
    """Stream the k-way merge of sorted, disjoint reduce outputs into ``out_path``."""
    keys = size = 0
    with ExitStack() as stack, atomic_writer(out_path) as out:
        files = [stack.enter_context(open(p, "rb")) for p in in_paths]
        for line in heapq.merge(*files):
            out.write(line)
            keys += 1
            size += len(line)
    return {"keys": keys, "bytes": size}


class _NonLettersToSpace(dict[int, int]):
    """A ``str.translate`` table, filled lazily: every non-letter code point maps to a space."""

    def __missing__(self, c: int) -> int:
        self[c] = c if chr(c).isalpha() else 0x20
        return self[c]


def oracle(paths: list[str]) -> bytes:
    """Sequential reference: the complete word count output for ``paths``, written to be obviously correct."""
    counts: Counter[str] = Counter()
    table = _NonLettersToSpace()
    for path in paths:
        with open(path, "rb") as f:
            raw = f.read()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise InvalidUtf8(e.start, path) from None
        counts.update(text.translate(table).split())  # letters are never whitespace
    return "".join(f"{w}\t{counts[w]}\n" for w in sorted(counts)).encode("utf-8")
