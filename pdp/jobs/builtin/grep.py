"""The ``grep`` job: every line that matches a regular expression, as ``grep -Hn`` prints it.

Job arguments (after ``--``): ``PATTERN`` (Python :mod:`re` syntax; one that starts with
``-`` goes as ``--regexp=-PATTERN`` or after another ``--``: ``pdp run grep IN -- -- -x``), ``-i``/``--ignore-case``, ``-v``/``--invert-match`` (the lines that
do *not* match), ``-F``/``--fixed-strings`` (the pattern is a plain string). A line matches
when ``re.search`` finds the pattern anywhere in it.

Input is text: a line is a record without its ``\\n`` or ``\\r\\n`` (a lone ``\\r`` is data; a
UTF-8 BOM at the start of a file is dropped). The output is one line per matching line,
``NAME:LINE:TEXT`` (NAME: the input as the user named it, LINE: its 1-based line number),
in input order: the inputs in the order given, each one's lines ascending.

On the engine the map keys every matching line by ``[input_index, line]`` (the job asks
for ``INPUT_POSITIONS``, so lines come keyed by their line number) and carries
``[name, text]`` as the value; the output is sorted by key, which is input order. There
is no reducer (the identity). :func:`oracle` is the sequential reference.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

from pdp.jobs.api import JobDefinitionError, MRJob
from pdp.jobs.inputs import read_text


class GrepProtocol:
    """``NAME:LINE:TEXT`` from the key ``[input_index, line]`` and the value ``[name, text]``."""

    def write(self, key: Any, value: Any) -> bytes:
        return f"{value[0]}:{key[1]}:{value[1]}".encode()


def compile_pattern(pattern: str, ignore_case: bool = False, fixed: bool = False) -> re.Pattern[str]:
    """The compiled pattern; an invalid one is a :class:`JobDefinitionError` saying why."""
    try:
        return re.compile(re.escape(pattern) if fixed else pattern, re.IGNORECASE if ignore_case else 0)
    except re.error as exc:
        raise JobDefinitionError(f"grep: invalid regular expression {pattern!r}: {exc}") from None


class Grep(MRJob):
    """``NAME:LINE:TEXT`` for every line matching the pattern, in input order."""

    INPUT_POSITIONS = True  # text lines keyed by their 1-based line number
    OUTPUT_PROTOCOL = GrepProtocol

    input_name = ""
    input_index = 0

    def configure_args(self) -> None:
        self.add_passthru_arg("pattern", nargs="?", default=None, help="the regular expression (Python re)")
        self.add_passthru_arg("-e", "--regexp", default=None, help="the pattern (--regexp=-x for one starting with -)")
        self.add_passthru_arg("-i", "--ignore-case", action="store_true", help="match case-insensitively")
        self.add_passthru_arg("-v", "--invert-match", action="store_true", help="output non-matching lines")
        self.add_passthru_arg("-F", "--fixed-strings", action="store_true", help="the pattern is a plain string")

    def load_args(self, args: list[str]) -> None:
        super().load_args(args)
        opts = self.options
        if opts.pattern is not None and opts.regexp is not None:
            raise JobDefinitionError("grep: give the pattern once (as PATTERN or -e PATTERN)")
        pattern = opts.regexp if opts.regexp is not None else opts.pattern
        if pattern is None:
            raise JobDefinitionError("grep needs a pattern: pdp run grep INPUT... -- PATTERN")
        self.search = compile_pattern(pattern, opts.ignore_case, opts.fixed_strings).search
        self.invert = bool(opts.invert_match)

    def mapper(self, line: Any, text: Any) -> Iterator[tuple[list[int], list[Any]]]:
        if not isinstance(text, str):
            raise JobDefinitionError("grep reads text input (lines), not csv or jsonl records")
        if (self.search(text) is None) == self.invert:
            yield [self.input_index, line], [self.input_name, text]


def oracle(paths: list[str], pattern: str, ignore_case: bool = False, invert: bool = False,
           fixed: bool = False) -> bytes:
    """Sequential reference: the complete grep output for ``paths`` (named as given), written
    to be obviously correct."""
    regex = compile_pattern(pattern, ignore_case, fixed)
    out: list[str] = []
    for path in paths:
        name = str(path)
        text = read_text(name)
        text = text.removeprefix("\ufeff")
        pieces = text.split("\n")
        last = pieces.pop()  # after the final "\n": "" unless the file lacks one
        lines = [p.removesuffix("\r") for p in pieces] + ([last] if last else [])
        for number, line in enumerate(lines, 1):
            matched = regex.search(line) is not None
            if matched != invert:
                out.append(f"{name}:{number}:{line}\n")
    return "".join(out).encode("utf-8")
