"""The owner's limits: the machine belongs to someone, and they come first.

A pure core decides; a thin shell measures and enforces.

* :func:`parse_size` and :func:`parse_hours` read the ``memory``/``disk`` and ``hours``
  settings; :func:`pause_reason` says why the node should take no work right now (or "").
* :class:`Sampler` measures what :func:`pause_reason` needs: the owner's own CPU load, the
  battery, the spool's size. It never raises where a sensor is missing; it answers None.
* :func:`run_limited` runs a task function inside a pool process with the node's niceness
  and memory limit, turning a MemoryError into :class:`MemoryLimitExceeded`.

Memory limits: on Linux the limit is RLIMIT_DATA, which counts the heap and anonymous
memory maps (everything a task allocates, plus the interpreter's own few tens of MiB) but
not shared libraries. Other Unix systems get RLIMIT_AS (the whole address space, libraries
included, so it bites sooner) when the system accepts it; macOS typically does not enforce
it. Where no limit can be set (Windows, or a refusing system) tasks run without one.
"""

from __future__ import annotations

import functools
import gc
import os
import re
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, TypeVar

import psutil

from pdp.errors import ConfigError, PdpError

if TYPE_CHECKING:
    from pdp.config import NodeConfig

try:
    import resource
except ImportError:  # Windows
    resource = None  # type: ignore[assignment]

T = TypeVar("T")

MiB = 1 << 20
_UNITS = {"": MiB, "b": 1, "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10, "m": MiB, "mb": MiB, "mib": MiB,
          "g": 1 << 30, "gb": 1 << 30, "gib": 1 << 30, "t": 1 << 40, "tb": 1 << 40, "tib": 1 << 40}
_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)\s*", re.IGNORECASE)
SIZE_SYNTAX = 'a whole number of MiB (512) or a number with a unit ("512M", "800MB", "2G", "1.5GiB")'


# -- sizes ------------------------------------------------------------------------------


def parse_size(value: object) -> int:
    """Bytes from a size setting: an integer counts MiB, a string may carry a unit.

    M, MB and MiB all mean MiB (2**20); K, G and T likewise (binary); B is bytes.
    """
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise ConfigError(f"{value!r}: a size cannot be negative; write {SIZE_SYNTAX}")
        return value * MiB
    match = _SIZE.fullmatch(value) if isinstance(value, str) else None
    if match is None or match.group(2).lower() not in _UNITS:
        raise ConfigError(f"{value!r}: not a size; write {SIZE_SYNTAX}")
    return round(float(match.group(1)) * _UNITS[match.group(2).lower()])


def format_size(n: int) -> str:
    """``n`` bytes for people: "512 MiB", "21.3 GiB" (one decimal, none when whole)."""
    for unit, size in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", MiB), ("KiB", 1 << 10)):
        if n >= size:
            return f"{round(n / size, 1):g} {unit}"
    return f"{n} B"


# -- hours ------------------------------------------------------------------------------

_DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_FULL_DAYS = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
_DAY_WORDS = {"weekdays": frozenset(range(5)), "weekday": frozenset(range(5)),
              "weekends": frozenset({5, 6}), "weekend": frozenset({5, 6})}
_TIME = re.compile(r"(\d{1,2}):(\d{2})")
HOURS_SYNTAX = ('[DAYS] [HH:MM-HH:MM], e.g. "mon-fri 18:00-08:00", "sat-sun", "weekends", "22:00-07:00", '
                '"mon,wed,fri 09:00-17:00" (DAYS: mon..sun, a range like fri-mon, a list, weekdays or '
                'weekends; a time range past midnight belongs to the day it starts on)')
_WHOLE_DAY = (0, 1440)


@dataclass(frozen=True)
class _Rule:
    days: frozenset[int]  # weekday numbers, Monday = 0
    start: int  # minute of the day the window opens
    end: int  # minute it closes (exclusive); below start when it wraps past midnight

    def allows(self, weekday: int, minute: int) -> bool:
        if self.start < self.end:
            return weekday in self.days and self.start <= minute < self.end
        return (weekday in self.days and minute >= self.start) or ((weekday - 1) % 7 in self.days and minute < self.end)


@dataclass(frozen=True)
class Hours:
    """When a node takes work: any matching rule allows it; no rules means always."""

    rules: tuple[str, ...] = ()
    _parsed: tuple[_Rule, ...] = ()

    def allows(self, dt: datetime) -> bool:
        """Whether the wall-clock time ``dt`` (the owner's local time) falls in the hours."""
        if not self._parsed:
            return True
        weekday, minute = dt.weekday(), dt.hour * 60 + dt.minute
        return any(rule.allows(weekday, minute) for rule in self._parsed)

    def __str__(self) -> str:
        return "; ".join(self.rules) if self.rules else "always"


def parse_hours(rules: Iterable[str]) -> Hours:
    """Parse the ``hours`` setting; a bad rule raises ConfigError naming it and the syntax."""
    rules = tuple(rules)
    return Hours(rules, tuple(_parse_rule(rule) for rule in rules))


@functools.lru_cache(maxsize=64)
def _cached_hours(rules: tuple[str, ...]) -> Hours:
    return parse_hours(rules)


def _parse_rule(rule: object) -> _Rule:
    if not isinstance(rule, str):
        raise ConfigError(f"hours rule {rule!r}: not a string; expected {HOURS_SYNTAX}")
    words = re.sub(r"\s*([,-])\s*", r"\1", rule.strip().lower()).split()
    try:
        if not words or len(words) > 2:
            raise ValueError("expected at most a day part and a time part" if words else "empty rule")
        start, end = _parse_times(words.pop()) if ":" in words[-1] else _WHOLE_DAY
        if words and ":" in words[0]:
            raise ValueError("the days come before the time range")
        if len(words) > 1:
            raise ValueError(f"{words[1]!r} is not a time range HH:MM-HH:MM (join days with commas)")
        days = _parse_days(words[0]) if words else frozenset(range(7))
    except ValueError as exc:
        raise ConfigError(f"hours rule {rule!r}: {exc}; expected {HOURS_SYNTAX}") from None
    return _Rule(days, start, end)


def _parse_times(text: str) -> tuple[int, int]:
    start_text, dash, end_text = text.partition("-")
    if not dash:
        raise ValueError(f"{text!r} is not a time range HH:MM-HH:MM")
    start, end = _minute(start_text, end=False), _minute(end_text, end=True)
    if start == end:
        raise ValueError(f"{text!r} is empty or ambiguous; write 00:00-24:00 for a whole day")
    return start, end


def _minute(text: str, end: bool) -> int:
    match = _TIME.fullmatch(text)
    hour, minute = (int(match.group(1)), int(match.group(2))) if match else (-1, -1)
    if (hour, minute) == (24, 0) and end:
        return 1440
    if not (0 <= hour <= 23 and 0 <= minute <= 59):
        raise ValueError(f"{text!r} is not a time HH:MM between 00:00 and 23:59 (24:00 may end a range)")
    return hour * 60 + minute


def _parse_days(text: str) -> frozenset[int]:
    days: set[int] = set()
    for item in text.split(","):
        if item in _DAY_WORDS:
            days |= _DAY_WORDS[item]
            continue
        first, dash, last = item.partition("-")
        a = _day(first)
        b = _day(last) if dash else a
        days.update((a + k) % 7 for k in range((b - a) % 7 + 1))
    return frozenset(days)


def _day(text: str) -> int:
    if text in _DAYS:
        return _DAYS.index(text)
    if text in _FULL_DAYS:
        return _FULL_DAYS.index(text)
    raise ValueError(f"{text!r} is not a day")


# -- the decision -----------------------------------------------------------------------


def pause_reason(cfg: NodeConfig, now: datetime, owner_load: float | None, on_battery: bool | None,
                 spool_bytes: int) -> str:
    """Why this node should take no new work at ``now`` ("" when it may).

    ``owner_load`` and ``on_battery`` are None when unknown; an unknown never pauses.
    """
    if not _cached_hours(tuple(cfg.hours)).allows(now):
        return f"outside its hours ({'; '.join(cfg.hours)})"
    if on_battery and cfg.pause_on_battery:
        return "on battery (pause_on_battery = true)"
    if cfg.disk and spool_bytes >= cfg.disk:
        return f"spool uses {format_size(spool_bytes)} of disk = {format_size(cfg.disk)}"
    if cfg.max_load and owner_load is not None and owner_load > cfg.max_load:
        return f"the owner's load is {owner_load:.2f} (max_load = {cfg.max_load:g})"
    return ""


# -- measuring --------------------------------------------------------------------------


class Sampler:
    """Measures the machine for :func:`pause_reason`; every method answers, none raises.

    ``owner_load`` compares two calls, so call it at a steady pace (e.g. once per heartbeat).
    """

    def __init__(self, spool_every: float = 5.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.spool_every = spool_every
        self._clock = clock
        self._me = psutil.Process()
        self._machine: tuple[float, float] | None = None  # (busy, total) CPU seconds, all CPUs
        self._ours: dict[tuple[int, float], float] = {}  # (pid, create_time) -> CPU seconds
        self._spool: dict[str, tuple[float, int]] = {}  # path -> (measured at, bytes)

    def owner_load(self) -> float | None:
        """The owner's share of all CPUs since the last call, 0..1: the machine's busy share
        minus this process's and its descendants'. None on the first call or when unknown."""
        try:
            machine, ours = _machine_cpu(), self._our_cpu()
        except (psutil.Error, OSError, NotImplementedError, AttributeError):
            return None
        before, self._machine = self._machine, machine
        if before is None or machine[1] <= before[1]:
            return None
        total = machine[1] - before[1]
        return min(1.0, max(0.0, (machine[0] - before[0] - ours) / total))

    def _our_cpu(self) -> float:
        """CPU seconds this process and its descendants used since the last call."""
        now: dict[tuple[int, float], float] = {}
        for proc in [self._me, *self._me.children(recursive=True)]:
            try:
                with proc.oneshot():
                    times = proc.cpu_times()
                    now[(proc.pid, proc.create_time())] = times.user + times.system
            except psutil.Error:
                continue  # gone meanwhile: its last moments go uncounted
        used = sum(seconds - self._ours.get(key, 0.0) for key, seconds in now.items())
        self._ours = now
        return max(0.0, used)

    def on_battery(self) -> bool | None:
        """True when running on battery; None without a battery or a way to tell."""
        try:
            battery = psutil.sensors_battery() if hasattr(psutil, "sensors_battery") else None
        except Exception:  # noqa: BLE001 -- a broken sensor must not stop the node
            return None
        if battery is None or battery.power_plugged is None:
            return None
        return not battery.power_plugged

    def spool_bytes(self, path: str | os.PathLike[str], fresh: bool = False) -> int:
        """Total size of the files under ``path``, recounted at most every ``spool_every`` s
        (every time with ``fresh``)."""
        key, now = os.fspath(path), self._clock()
        cached = self._spool.get(key)
        if cached is not None and now - cached[0] < self.spool_every and not fresh:
            return cached[1]
        size = _tree_size(key)
        self._spool[key] = (now, size)
        return size


def _machine_cpu() -> tuple[float, float]:
    """(busy, total) CPU seconds since boot, summed over all CPUs."""
    times = psutil.cpu_times()
    fields = times._asdict()
    total = sum(fields.values()) - fields.get("guest", 0.0) - fields.get("guest_nice", 0.0)  # already in user/nice
    idle = fields.get("idle", 0.0) + fields.get("iowait", 0.0)
    return total - idle, total


def _tree_size(path: str) -> int:
    total = 0
    try:
        entries = list(os.scandir(path))
    except OSError:
        return 0
    for entry in entries:
        try:
            if entry.is_dir(follow_symlinks=False):
                total += _tree_size(entry.path)
            elif entry.is_file(follow_symlinks=False):
                total += entry.stat(follow_symlinks=False).st_size
        except OSError:
            continue  # removed while counting
    return total


# -- enforcing, inside a task process ---------------------------------------------------


class MemoryLimitExceeded(PdpError):
    """A task needed more memory than its node allows; it should run on another member."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        if limit:
            super().__init__(f"the task needed more than this node's memory limit (memory = {format_size(limit)} "
                             "in its config); it will run on another member")
        else:
            super().__init__("the task ran out of memory on this node; it will run on another member")

    def __reduce__(self) -> tuple[type, tuple[int]]:
        # Rebuild from the limit so the error survives a process pool's pickling.
        return (type(self), (self.limit,))


def run_limited(memory: int, nice: int, fn: Callable[..., T], *args: Any) -> T:
    """In a pool process: call ``fn(*args)`` with niceness at least ``nice`` and at most
    ``memory`` bytes of heap (0 = no limit). A MemoryError becomes MemoryLimitExceeded,
    raised after the failed call's memory is freed. The process's previous memory limit
    is back in place when this returns; the niceness stays (it cannot be lowered again
    without privilege), so a pool must be restarted for a lower ``nice`` to apply."""
    _raise_niceness(nice)
    restore = _set_memory_limit(memory)
    failed = False
    try:
        return fn(*args)
    except MemoryError:
        failed = True  # leave the handler first: its traceback holds the frames holding the memory
    finally:
        restore()
    assert failed
    gc.collect()
    raise MemoryLimitExceeded(memory)


def _raise_niceness(nice: int) -> None:
    try:
        if hasattr(os, "getpriority"):
            if os.getpriority(os.PRIO_PROCESS, 0) < nice:
                os.setpriority(os.PRIO_PROCESS, 0, nice)
        elif nice > 0 and sys.platform == "win32":
            psutil.Process().nice(psutil.BELOW_NORMAL_PRIORITY_CLASS)
    except (PermissionError, psutil.AccessDenied):
        pass  # cannot be changed here; the task runs at its current priority


def _set_memory_limit(memory: int) -> Callable[[], None]:
    """Set the soft memory limit (0: as high as the hard limit); return what undoes it."""
    if resource is None:
        return _nothing
    which = resource.RLIMIT_DATA if sys.platform.startswith("linux") else getattr(resource, "RLIMIT_AS", None)
    if which is None:
        return _nothing
    try:
        soft, hard = resource.getrlimit(which)
        want = hard if memory == 0 or (hard != resource.RLIM_INFINITY and memory > hard) else memory
        resource.setrlimit(which, (want, hard))
    except (ValueError, OSError):
        return _nothing  # this system refuses the limit: run without it

    def restore() -> None:
        try:
            resource.setrlimit(which, (soft, hard))
        except (ValueError, OSError):
            pass

    return restore


def _nothing() -> None:
    pass
