"""Line-aligned byte ranges for splitting a text file among map tasks (Hadoop's rule).

A file is first cut into fixed-size byte ranges by :func:`plan_ranges`; those cuts
ignore lines. :func:`aligned_bounds` then moves each cut to a line boundary using
one rule: the range ``[start, end)`` *owns* every line that *starts* inside it,
where a line starts at byte ``p`` if ``p == 0`` or byte ``p - 1`` is ``b"\\n"``.
The owned bytes are ``[a, b)`` with ``a`` the first line start ``>= start`` and
``b`` the first line start ``>= end`` (or the file size when there is none).

Because every range applies the same rule to its own two ends, consecutive
ranges meet exactly: the concatenation of the owned pieces is the whole file,
with no overlap and no gap, and each nonempty piece begins at a line start. A
line longer than several chunks is owned by the one range in which it starts;
the ranges after it own nothing. CRLF needs no special case (the cut is after
the ``\\n``), and a missing trailing newline just means the last line ends at
the file size.

Everything here is pure: the functions only seek and read the file they are
given, in blocks of 64 KiB, and never read the whole file.
"""

from __future__ import annotations

from typing import BinaryIO

BLOCK = 1 << 16


def plan_ranges(size: int, chunk_size: int) -> list[tuple[int, int]]:
    """Half-open ranges ``[start, end)`` covering ``[0, size)`` in order.

    Every range is ``chunk_size`` bytes long except possibly the last; a size of
    0 gives no ranges.
    """
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise ValueError(f"size must be an integer >= 0, got {size!r}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an integer >= 1, got {chunk_size!r}")
    return [(s, min(s + chunk_size, size)) for s in range(0, size, chunk_size)]


def _next_line_start(f: BinaryIO, pos: int, size: int) -> int:
    """The smallest line start ``>= pos``, or ``size`` if there is none."""
    if pos <= 0:
        return 0
    if pos >= size:
        return size
    scan = pos - 1  # a line starts at pos iff byte pos-1 is a newline
    f.seek(scan)
    while scan < size:
        block = f.read(min(BLOCK, size - scan))
        if not block:
            break
        i = block.find(b"\n")
        if i >= 0:
            return min(scan + i + 1, size)
        scan += len(block)
    return size


def aligned_bounds(f: BinaryIO, start: int, end: int, size: int) -> tuple[int, int]:
    """The bytes ``[a, b)`` owned by the range ``[start, end)`` of a file of ``size`` bytes.

    ``a`` is the first line start ``>= start`` and ``b`` the first line start
    ``>= end`` (``size`` if none, or if ``end >= size``). When ``a >= b`` the
    range owns nothing and ``(a, a)`` is returned.
    """
    if size < 0 or start < 0 or end < start:
        raise ValueError(f"bad range [{start}, {end}) for a file of {size} bytes")
    a = _next_line_start(f, start, size)
    b = size if end >= size else _next_line_start(f, end, size)
    return (a, a) if a >= b else (a, b)
