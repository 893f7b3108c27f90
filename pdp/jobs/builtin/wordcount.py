"""The word count job kind (MIT 6.824 ``wc`` semantics).

A word is a maximal run of characters for which ``str.isalpha()`` is True (any
Unicode letter); case is kept. The output is UTF-8, one ``word\\tcount\\n`` line
per distinct word, sorted by code point. Input must be valid UTF-8 (strict:
encoded surrogates are invalid); otherwise :class:`InvalidUtf8` names the first
bad byte.

On the engine it is the job class :class:`WordCount`: a mapper of lines for any input and,
for text, the fast kernel (``map_counts``: the counts of a whole byte range, combined
already) and a reduce that sums (``REDUCE_SUMS``). Its output protocol writes the plain
``word\tcount`` lines.

The fast kernel (:func:`count_words`) works on bytes: ASCII non-letters can never
be part of a multibyte UTF-8 sequence, so translating them to spaces and
splitting yields tokens made of ASCII letters and non-ASCII bytes. The ASCII
tokens are words as they are; the few distinct non-ASCII tokens are decoded and
re-split exactly by ``str.isalpha()``. :func:`oracle` is the slow, obviously
correct sequential reference the tests and the node compare against.
"""

from __future__ import annotations

import string
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from itertools import groupby
from typing import Any

from pdp.errors import InputError
from pdp.jobs.api import MRJob, TabProtocol
from pdp.jobs.progress import report

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
    bytes counted so far are recorded there after every piece (see :mod:`pdp.jobs.progress`).
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


def format_counts(counts: Mapping[bytes, int]) -> bytes:
    """The output lines ``word\tcount\n`` for ``counts``, sorted by code point."""
    return b"".join(sorted(b"%s\t%d\n" % (w, n) for w, n in counts.items()))


_TABLE_STR = _NonLettersToSpace()


class WordCount(MRJob):
    """``word<TAB>count`` for every word (a maximal run of letters), sorted by code point."""

    OUTPUT_PROTOCOL = TabProtocol
    REDUCE_SUMS = True  # the reducer sums: the engine may sum at C speed

    def mapper(self, _: Any, line: str) -> Iterator[tuple[str, int]]:
        for word in line.translate(_TABLE_STR).split():
            yield word, 1

    def combiner(self, word: str, counts: Iterable[int]) -> Iterator[tuple[str, int]]:
        yield word, sum(counts)

    def reducer(self, word: str, counts: Iterable[int]) -> Iterator[tuple[str, int]]:
        yield word, sum(counts)

    def map_counts(self, path: str, start: int, end: int, progress: str | None = None, *, name: str = "",
                   base: int = 0) -> Counter[bytes]:
        """The combined map output of bytes ``[start, end)`` of a text input, by the fast kernel
        (``name``: the input as the user named it; ``base``: where ``path`` starts in it)."""
        try:
            return count_file_range(path, start, end, progress=progress)
        except InvalidUtf8 as exc:
            raise InputError(f"input {name or path} is not valid UTF-8: invalid byte at offset {base + exc.offset}; "
                             "convert it to UTF-8 (e.g. iconv -f latin1 -t utf-8) and submit again") from None
