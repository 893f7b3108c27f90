"""The benchmarks' memory probe: the peak RSS of process trees, sampled every 50 ms."""

from __future__ import annotations

import threading

import psutil


class PeakRss:
    """Peak RSS of each named process tree (a process and all its descendants, such as a
    node and its task pool) while the ``with`` block runs; ``peak`` maps name -> bytes."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids, self.peak = pids, {n: 0 for n in pids}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for name, pid in self.pids.items():
                try:
                    p = psutil.Process(pid)
                    rss = p.memory_info().rss
                    for c in p.children(recursive=True):
                        try:
                            rss += c.memory_info().rss
                        except psutil.Error:
                            pass  # a pool child that just ended
                    self.peak[name] = max(self.peak[name], rss)
                except psutil.Error:
                    pass
            self._stop.wait(0.05)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
