"""Job kinds: each kind is a module with map, reduce, merge and a sequential oracle.

The functions run inside a node's process pool, so they take file paths (never bulk bytes
through a pipe) and return small, msgpack-able dicts of statistics. A kind module exposes
``map_range``, ``reduce_partitions``, ``merge_outputs``, ``oracle`` and ``InvalidUtf8``.
"""

from __future__ import annotations

import os
from types import ModuleType
from typing import Any

from pdp.errors import InputError
from pdp.progress import report


def kinds() -> dict[str, ModuleType]:
    """The job kinds this process runs (test-only kinds need PDP_TEST_KINDS=1)."""
    from pdp.jobs import wordcount

    known = {"wordcount": wordcount}
    if os.environ.get("PDP_TEST_KINDS") == "1":
        from pdp.jobs import chaos

        known["chaos"] = chaos
    return known


def job_kind(name: str) -> ModuleType:
    """Return the module implementing job kind ``name`` or raise an error naming the known ones."""
    known = kinds()
    try:
        return known[name]
    except KeyError:
        raise InputError(f"unknown job kind {name!r}; known kinds: {', '.join(sorted(known))}") from None


def run_whole(kind: str, path: str, start: int, end: int, part: str, result: str,
              progress: str | None = None) -> dict[str, Any]:
    """A whole one-map, one-reduce job in one pool call: map ``[start, end)`` of ``path`` into
    the single partition ``part``, reduce it into ``result``. Returns the map's statistics
    with the result's ``result_bytes`` and ``result_keys``."""
    module = job_kind(kind)
    stats = dict(module.map_range(path, start, end, 1, part, progress))
    reduced = module.reduce_partitions([(part, 0)], result)
    fd = os.open(result, os.O_RDONLY)  # the result is what the submitter gets: make it durable
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return {**stats, "result_bytes": reduced["bytes"], "result_keys": reduced["keys"]}


def run_maps(kind: str, maps: list[tuple[str, int, int, int, str]], progress: str | None = None
             ) -> list[dict[str, Any]]:
    """Several small map tasks in one pool call (a bundle): each ``(path, start, end,
    n_reduce, out)`` as in ``map_range``; returns their statistics in order. Progress is
    the bytes done over the whole bundle."""
    module, done, out = job_kind(kind), 0, []
    for path, start, end, n_reduce, out_path in maps:
        out.append(dict(module.map_range(path, start, end, n_reduce, out_path)))
        done += end - start
        report(progress, done)
    return out
