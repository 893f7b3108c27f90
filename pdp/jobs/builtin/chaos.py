"""Test-only job kinds: ``chaos``, word count whose task calls misbehave on purpose, and
``slowtrain`` (:class:`SlowTrain`).

Enabled only on nodes started with ``PDP_TEST_KINDS=1``. The behaviour comes from the
node's environment, ``PDP_CHAOS`` (comma-separated ``key=value``):

- ``crash=P``: a map or reduce call kills its process with probability P;
- ``stall=P`` and ``stall_max=S``: with probability P it sleeps up to S seconds first;
- ``sleep=S``: every call sleeps S seconds first (slow, predictable tasks for fault tests);
- ``crawl=S``: every map call works slowly for S seconds first, reporting progress all the
  while (a long but healthy task: its lease must hold);
- ``alloc=MB``: every map call first allocates MB MiB and touches every page, holding it
  while it works (a memory-hungry task: a node whose ``memory`` limit is lower must fail
  it cleanly, with :class:`pdp.node.limits.MemoryLimitExceeded`, so it runs elsewhere).

MIT 6.824's crash test is ``crash=0.33,stall=0.33,stall_max=10``. Outputs are those of
word count whatever happens, so the sequential oracle still judges the result.
"""

from __future__ import annotations

import os
import random
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

from pdp.jobs.builtin.train import Train
from pdp.jobs.builtin.wordcount import WordCount
from pdp.jobs.progress import report


def _settings() -> dict[str, float]:
    out = {}
    for item in os.environ.get("PDP_CHAOS", "").split(","):
        key, _, value = item.partition("=")
        if key.strip():
            out[key.strip()] = float(value)
    return out


def _misbehave(progress: str | None = None, crawl: bool = False) -> None:
    cfg = _settings()
    time.sleep(cfg.get("sleep", 0.0))
    steps = int(cfg.get("crawl", 0.0) / 0.1) if crawl else 0
    for step in range(steps):
        time.sleep(0.1)
        report(progress, step + 1)
    r = random.random()
    if r < cfg.get("crash", 0.0):
        os._exit(17)
    if r < cfg.get("crash", 0.0) + cfg.get("stall", 0.0):
        time.sleep(random.uniform(0, cfg.get("stall_max", 10.0)))


def _hog() -> bytearray:
    """``alloc`` MiB with every page written, so the memory is really in use."""
    buf = bytearray(int(_settings().get("alloc", 0.0) * (1 << 20)))
    buf[::4096] = b"\x01" * len(range(0, len(buf), 4096))
    return buf


class Chaos(WordCount):
    """Word count whose map and reduce tasks misbehave as ``PDP_CHAOS`` says."""

    REDUCE_SUMS = False  # the reduce goes through reducer_init (which misbehaves)

    def map_counts(self, path: str, start: int, end: int, progress: str | None = None, *, name: str = "",
                   base: int = 0) -> Counter[bytes]:
        hog = _hog()
        _misbehave(progress, crawl=True)
        counts = super().map_counts(path, start, end, progress, name=name, base=base)
        del hog
        return counts

    def reducer_init(self) -> Iterator[tuple[str, int]]:
        _misbehave()
        return iter(())


class SlowTrain(Train):
    """Test-only ``slowtrain``: ``train`` whose every map sleeps ``PDP_CHAOS``'s ``sleep``
    seconds first (rounds slow enough to kill members at chosen points; same models)."""

    def map_chunk(self, path: str, start: int, end: int, spec: dict[str, Any], workdir: str
                  ) -> Iterator[tuple[str, bytes]]:
        time.sleep(_settings().get("sleep", 0.0))
        return super().map_chunk(path, start, end, spec, workdir)
