"""The job engine: the job API (:mod:`pdp.jobs.api`, exported as :mod:`pdp.job`), input
formats (:mod:`~pdp.jobs.inputs`), ordered keys (:mod:`~pdp.jobs.keys`), the shuffle
(:mod:`~pdp.jobs.engine`), task functions (:mod:`~pdp.jobs.runtime`), the one-process
runner (:mod:`~pdp.jobs.local`) and the built-in jobs (:mod:`pdp.jobs.builtin`).

The two helpers here batch task functions for the node's pool: a whole small job in one
call, and a bundle of small maps in one call.
"""

from __future__ import annotations

import os
from typing import Any

from pdp.jobs import runtime
from pdp.jobs.progress import report


def run_whole(spec: dict[str, Any], path: str, start: int, end: int, part: str, result: str,
              progress: str | None = None) -> dict[str, Any]:
    """A whole one-map, one-reduce job in one pool call: map ``[start, end)`` of ``path`` into
    the single partition ``part``, reduce it, and write the job's result to ``result``.
    Returns the map's statistics (counters of both) with ``result_bytes`` and ``result_keys``."""
    stats = runtime.map_task(spec, path, start, end, 1, part, progress)
    reduced = runtime.reduce_task(spec, [(part, 0)], part + ".reduced")
    try:
        merged = runtime.merge_outputs(spec, [part + ".reduced"], result)  # durable: the submitter's result
    finally:
        os.unlink(part + ".reduced")
    stats["counters"] = _sum_counters(stats.get("counters") or {}, reduced.get("counters") or {})
    if reduced.get("status"):
        stats["status"] = reduced["status"]
    return {**stats, "result_bytes": merged["bytes"], "result_keys": merged["keys"]}


def run_maps(spec: dict[str, Any], maps: list[tuple[str, int, int, int, str, dict[str, Any]]],
             progress: str | None = None) -> list[dict[str, Any]]:
    """Several small map tasks of one job in one pool call (a bundle): each ``(path, start,
    end, n_reduce, out, input spec)``; returns their statistics in order. Progress is the
    bytes done over the whole bundle."""
    done, out = 0, []
    for path, start, end, n_reduce, out_path, inp in maps:
        out.append(runtime.map_task({**spec, **inp}, path, start, end, n_reduce, out_path))
        done += end - start
        report(progress, done)
    return out


def _sum_counters(a: dict[str, dict[str, int]], b: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
    out = {g: dict(names) for g, names in a.items()}
    for group, names in b.items():
        mine = out.setdefault(group, {})
        for name, n in names.items():
            mine[name] = mine.get(name, 0) + n
    return out
