"""The ``indexer`` job (MIT 6.824's inverted index): which documents each word occurs in.

A word is what word count counts: a maximal run of characters for which ``str.isalpha()``
is True, case kept. A document is one input, named as the user gave it. The output is one
line per distinct word, sorted by code point::

    word<TAB>N doc1,doc2,...

with N the number of distinct documents holding the word and the documents' names sorted
by code point, separated by commas. Input is text (UTF-8); no job arguments.

On the engine a map task collects the distinct words of its range in a set
(``mapper_init``/``mapper``/``mapper_final``) and emits each word once, with the value
``[name]``; the combiner merges and de-duplicates the name lists of a key; the reducer
writes the count and the sorted names. :func:`oracle` is the sequential reference.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from itertools import groupby
from typing import Any

from pdp.jobs.api import JobDefinitionError, MRJob, TabProtocol
from pdp.jobs.builtin.wordcount import _NonLettersToSpace
from pdp.jobs.inputs import read_text

_TABLE = _NonLettersToSpace()  # every non-letter becomes a space (filled lazily)


def _names(lists: Iterable[list[str]]) -> list[str]:
    """The distinct names of several name lists, sorted."""
    seen: set[str] = set()
    for names in lists:
        seen.update(names)
    return sorted(seen)


class Indexer(MRJob):
    """``word<TAB>N doc1,doc2,...`` for every word: the documents (inputs) that hold it."""

    OUTPUT_PROTOCOL = TabProtocol

    input_name = ""

    def mapper_init(self) -> None:
        self._words: set[str] = set()

    def mapper(self, _: Any, line: Any) -> None:
        if not isinstance(line, str):
            raise JobDefinitionError("indexer reads text input (lines), not csv or jsonl records")
        self._words.update(line.translate(_TABLE).split())  # letters are never whitespace

    def mapper_final(self) -> Iterator[tuple[str, list[str]]]:
        doc = [self.input_name]
        for word in self._words:
            yield word, doc
        self._words = set()

    def combiner(self, word: str, docs: Iterable[list[str]]) -> Iterator[tuple[str, list[str]]]:
        yield word, _names(docs)

    def reducer(self, word: str, docs: Iterable[list[str]]) -> Iterator[tuple[str, str]]:
        names = _names(docs)
        yield word, f"{len(names)} {','.join(names)}"


def oracle(paths: list[str]) -> bytes:
    """Sequential reference: the complete indexer output for ``paths`` (each document named
    ``str(path)``), written to be obviously correct."""
    docs: dict[str, set[str]] = {}
    for path in paths:
        name = str(path)
        text = read_text(name)
        for is_letter, run in groupby(text, str.isalpha):  # maximal runs of letters and of the rest
            if is_letter:
                docs.setdefault("".join(run), set()).add(name)
    lines = []
    for w in sorted(docs):
        names = sorted(docs[w])
        lines.append(f"{w}\t{len(names)} {','.join(names)}\n")
    return "".join(lines).encode("utf-8")
