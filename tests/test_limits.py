"""Tests for the owner's limits: sizes, hours, the pause decision, the sampler, config loading
and reloading, and run_limited in a real spawned pool (memory limit, niceness)."""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import pickle
import sys
import time
from collections import namedtuple
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from datetime import datetime, timedelta
from pathlib import Path

import psutil
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pdp.node import limits
from pdp.config import RESTART_ONLY, NodeConfig, changed_settings, load_config
from pdp.errors import ConfigError, PdpError
from pdp.node.limits import (MemoryLimitExceeded, MiB, Sampler, format_size, parse_hours, parse_size, pause_reason,
                        run_limited)

GiB = 1 << 30
MONDAY = datetime(2024, 1, 1)  # a Monday
DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
EVERY_MINUTE = [MONDAY + timedelta(minutes=i) for i in range(7 * 1440)]


def at(day: str, hhmm: str) -> datetime:
    hour, minute = map(int, hhmm.split(":"))
    return MONDAY + timedelta(days=DAYS.index(day), hours=hour, minutes=minute)


# -- sizes ------------------------------------------------------------------------------


@pytest.mark.parametrize("value, expected", [
    (0, 0), (512, 512 * MiB), ("0", 0), ("512", 512 * MiB), ("512M", 512 * MiB), ("512MB", 512 * MiB),
    ("512MiB", 512 * MiB), ("512 mib", 512 * MiB), ("800MB", 800 * MiB), ("2G", 2 * GiB), ("2gb", 2 * GiB),
    ("1.5GiB", 3 * GiB // 2), (" 20G ", 20 * GiB), ("64K", 64 << 10), ("1T", 1 << 40), ("4096B", 4096),
    (".5G", GiB // 2),
])
def test_parse_size(value: object, expected: int) -> None:
    assert parse_size(value) == expected


@pytest.mark.parametrize("value", ["", "G", "-1G", "1X", "1.5.5G", "2 G B", "lots", 1.5, True, None, [1], -3])
def test_parse_size_rejects(value: object) -> None:
    with pytest.raises(ConfigError, match="512"):  # the message shows the syntax
        parse_size(value)


@pytest.mark.parametrize("n, text", [
    (0, "0 B"), (1023, "1023 B"), (64 << 10, "64 KiB"), (512 * MiB, "512 MiB"), (20 * GiB, "20 GiB"),
    (int(21.3 * GiB), "21.3 GiB"), (3 * GiB // 2, "1.5 GiB"),
])
def test_format_size(n: int, text: str) -> None:
    assert format_size(n) == text


# -- hours ------------------------------------------------------------------------------


@pytest.mark.parametrize("rules, yes, no", [
    ([], [("mon", "00:00"), ("sun", "23:59")], []),
    (["mon-fri 18:00-08:00"],
     [("mon", "18:00"), ("tue", "07:59"), ("fri", "23:00"), ("sat", "07:59"), ("wed", "03:00")],
     [("mon", "17:59"), ("tue", "08:00"), ("sat", "09:00"), ("sat", "18:30"), ("sun", "07:00"), ("mon", "07:00")]),
    (["fri 22:00-02:00"], [("fri", "22:00"), ("sat", "01:00"), ("sat", "01:59")],
     [("fri", "21:59"), ("sat", "02:00"), ("fri", "01:00"), ("sat", "23:00")]),
    (["weekends"], [("sat", "00:00"), ("sun", "23:59")], [("mon", "00:00"), ("fri", "23:59")]),
    (["sat-sun"], [("sat", "00:00"), ("sun", "23:59")], [("mon", "00:00"), ("fri", "23:59")]),
    (["weekdays"], [("mon", "00:00"), ("fri", "23:59")], [("sat", "12:00"), ("sun", "00:00")]),
    (["22:00-07:00"], [("mon", "03:00"), ("sun", "23:00"), ("wed", "06:59")], [("mon", "07:00"), ("thu", "21:59")]),
    (["mon,wed,fri 09:00-17:00"], [("mon", "09:00"), ("wed", "16:59"), ("fri", "12:00")],
     [("tue", "12:00"), ("mon", "17:00"), ("fri", "08:59"), ("sat", "12:00")]),
    (["fri-mon"], [("fri", "00:00"), ("sun", "12:00"), ("mon", "23:59")], [("tue", "00:00"), ("thu", "23:59")]),
    (["00:00-24:00"], [("mon", "00:00"), ("sun", "23:59")], []),
    (["sat 12:00-24:00"], [("sat", "12:00"), ("sat", "23:59")], [("sun", "00:00"), ("sat", "11:59")]),
    (["sun 23:00-01:00"], [("sun", "23:30"), ("mon", "00:30")], [("mon", "01:00"), ("sat", "23:30")]),
    (["weekdays 09:00-12:00", "weekends"], [("tue", "10:00"), ("sat", "20:00")], [("tue", "13:00")]),
    (["Mon - Fri  18:00 - 08:00"], [("mon", "19:00")], [("mon", "12:00")]),
    (["Monday, Wednesday 09:00-10:00"], [("wed", "09:30")], [("tue", "09:30")]),
    (["mon-wed,sat"], [("tue", "12:00"), ("sat", "12:00")], [("thu", "12:00")]),
])
def test_hours(rules: list[str], yes: list[tuple[str, str]], no: list[tuple[str, str]]) -> None:
    hours = parse_hours(rules)
    for day, hhmm in yes:
        assert hours.allows(at(day, hhmm)), (rules, day, hhmm)
    for day, hhmm in no:
        assert not hours.allows(at(day, hhmm)), (rules, day, hhmm)


def test_hours_ignore_seconds() -> None:
    assert parse_hours(["mon 09:00-10:00"]).allows(at("mon", "09:59") + timedelta(seconds=59.9))


@pytest.mark.parametrize("rule", [
    "", "   ", "mon-fri 18:00", "18:00-08:00 mon", "mon fri", "mon 8-17", "funday", "mon-fri 24:30-08:00",
    "mon 24:00-08:00", "mon 08:00-08:00", "00:00-00:00", "mon 12:60-13:00", "mon 9-17:00", "mon,,tue",
    "mon- 09:00-10:00", "mon 09:00-10:00 11:00-12:00", "mon 09:00-10:00-11:00",
])
def test_hours_reject(rule: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_hours(["weekends", rule])
    assert repr(rule) in str(err.value) and "[DAYS] [HH:MM-HH:MM]" in str(err.value)


def test_hours_reject_non_string() -> None:
    with pytest.raises(ConfigError, match="not a string"):
        parse_hours([42])  # type: ignore[list-item]


def _oracle(rules: list[tuple[set[int] | None, tuple[int, int] | None]]) -> set[tuple[int, int]]:
    """Brute force: mark every (weekday, minute) each rule covers, walking from its start."""
    marked = set()
    for days, times in rules:
        start, end = times or (0, 1440)
        length = (end - start) % 1440 or 1440
        for day in (days if days is not None else range(7)):
            for t in range(start, start + length):
                marked.add(((day + t // 1440) % 7, t % 1440))
    return marked


_day_item = st.one_of(
    st.integers(0, 6).map(lambda d: ({d}, DAYS[d])),
    st.tuples(st.integers(0, 6), st.integers(0, 6)).map(
        lambda ab: ({(ab[0] + k) % 7 for k in range((ab[1] - ab[0]) % 7 + 1)}, f"{DAYS[ab[0]]}-{DAYS[ab[1]]}")),
    st.just(({0, 1, 2, 3, 4}, "weekdays")),
    st.just(({5, 6}, "weekends")),
)
_days = st.one_of(st.none(), st.lists(_day_item, min_size=1, max_size=3))
_time = st.tuples(st.integers(0, 23), st.integers(0, 59)).map(lambda hm: hm[0] * 60 + hm[1])
_times = st.one_of(st.none(), st.tuples(_time, st.one_of(_time, st.just(1440))).filter(lambda se: se[0] != se[1]))


def _text(days: list[tuple[set[int], str]] | None, times: tuple[int, int] | None) -> str:
    parts = [",".join(text for _, text in days)] if days else []
    if times:
        parts.append("-".join(f"{t // 60:02d}:{t % 60:02d}" for t in times))
    return " ".join(parts)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(_days, _times).filter(lambda r: r != (None, None)), max_size=3))
def test_hours_match_brute_force(rules: list) -> None:
    hours = parse_hours([_text(days, times) for days, times in rules])
    want = _oracle([(set().union(*(d for d, _ in days)) if days else None, times) for days, times in rules])
    if not rules:
        want = {(d, m) for d in range(7) for m in range(1440)}
    got = {(dt.weekday(), dt.hour * 60 + dt.minute) for dt in EVERY_MINUTE if hours.allows(dt)}
    assert got == want


# -- the pause decision -----------------------------------------------------------------


def cfg(**kw: object) -> NodeConfig:
    return NodeConfig(name="a", **kw).validate()  # type: ignore[arg-type]


def test_pause_reason_none() -> None:
    assert pause_reason(cfg(), at("mon", "12:00"), 0.99, True, 0) == "on battery (pause_on_battery = true)"
    assert pause_reason(cfg(pause_on_battery=False), at("mon", "12:00"), 0.99, True, 10 * GiB) == ""
    assert pause_reason(cfg(max_load=0.5, disk=GiB), at("mon", "12:00"), None, None, 0) == ""  # unknown never pauses


def test_pause_reason_hours() -> None:
    c = cfg(hours=("mon-fri 18:00-08:00",))
    assert pause_reason(c, at("mon", "12:00"), 0.0, False, 0) == "outside its hours (mon-fri 18:00-08:00)"
    assert pause_reason(c, at("mon", "19:00"), 0.0, False, 0) == ""
    two = cfg(hours=("mon-fri 18:00-08:00", "weekends"))
    assert pause_reason(two, at("tue", "12:00"), 0.0, False, 0) == "outside its hours (mon-fri 18:00-08:00; weekends)"
    assert pause_reason(two, at("sun", "12:00"), 0.0, False, 0) == ""


def test_pause_reason_load() -> None:
    c = cfg(max_load=0.5)
    assert pause_reason(c, at("mon", "12:00"), 0.82, False, 0) == "the owner's load is 0.82 (max_load = 0.5)"
    assert pause_reason(c, at("mon", "12:00"), 0.5, False, 0) == ""
    assert pause_reason(cfg(), at("mon", "12:00"), 1.0, False, 0) == ""  # max_load = 0: never


def test_pause_reason_battery() -> None:
    assert pause_reason(cfg(), at("mon", "12:00"), 0.0, True, 0) == "on battery (pause_on_battery = true)"
    assert pause_reason(cfg(), at("mon", "12:00"), 0.0, False, 0) == ""
    assert pause_reason(cfg(), at("mon", "12:00"), 0.0, None, 0) == ""


def test_pause_reason_disk() -> None:
    c = cfg(disk=20 * GiB)
    assert pause_reason(c, at("mon", "12:00"), 0.0, False, int(21.3 * GiB)) == \
        "spool uses 21.3 GiB of disk = 20 GiB"
    assert pause_reason(c, at("mon", "12:00"), 0.0, False, 20 * GiB - 1) == ""
    assert pause_reason(cfg(), at("mon", "12:00"), 0.0, False, 1 << 50) == ""  # disk = 0: no limit


# -- the sampler ------------------------------------------------------------------------


def test_owner_load_arithmetic(monkeypatch: pytest.MonkeyPatch) -> None:
    machine = iter([(100.0, 1000.0), (160.0, 1100.0), (160.0, 1100.0), (290.0, 1200.0), (300.0, 1300.0)])
    ours = iter([5.0, 20.0, 0.0, 0.0, 50.0])
    monkeypatch.setattr(limits, "_machine_cpu", lambda: next(machine))
    monkeypatch.setattr(Sampler, "_our_cpu", lambda self: next(ours))
    s = Sampler()
    assert s.owner_load() is None  # first call: nothing to compare with
    assert s.owner_load() == pytest.approx(0.4)  # 60% busy, 20% ours
    assert s.owner_load() is None  # no time passed
    assert s.owner_load() == 1.0  # 130 busy of 100 s (skewed counters) would be 1.3: clamped to 1
    assert s.owner_load() == 0.0  # 10 busy, 50 ours would be -0.4: clamped to 0


def test_owner_load_real() -> None:
    s = Sampler()
    s.owner_load()
    sum(i * i for i in range(200_000))
    load = s.owner_load()
    assert load is None or 0.0 <= load <= 1.0


def test_owner_load_never_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken() -> None:
        raise NotImplementedError

    monkeypatch.setattr(psutil, "cpu_times", broken)
    assert Sampler().owner_load() is None


def burn_then_wait(seconds: float) -> None:
    """In a child: use ``seconds`` of CPU, then idle a while (so it is still there to count)."""
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass
    time.sleep(30.0)


def test_our_cpu_counts_children() -> None:
    s = Sampler()
    s._our_cpu()
    child = multiprocessing.get_context("spawn").Process(target=burn_then_wait, args=(0.3,))
    child.start()
    used, deadline = 0.0, time.monotonic() + 20
    try:
        while used < 0.29 and time.monotonic() < deadline:
            time.sleep(0.2)
            used += s._our_cpu()
    finally:
        child.terminate()
        child.join()
    assert used >= 0.29  # the child's CPU counts as ours


Battery = namedtuple("Battery", "percent secsleft power_plugged")


@pytest.mark.parametrize("reading, expected", [
    (None, None), (Battery(50, 100, True), False), (Battery(50, 100, False), True), (Battery(50, 100, None), None),
])
def test_on_battery(monkeypatch: pytest.MonkeyPatch, reading: object, expected: bool | None) -> None:
    monkeypatch.setattr(psutil, "sensors_battery", lambda: reading, raising=False)
    assert Sampler().on_battery() is expected


def test_on_battery_without_sensor(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(psutil, "sensors_battery", raising=False)
    assert Sampler().on_battery() is None

    def broken() -> None:
        raise RuntimeError("no sysfs")

    monkeypatch.setattr(psutil, "sensors_battery", broken, raising=False)
    assert Sampler().on_battery() is None


def test_spool_bytes(tmp_path: Path) -> None:
    now = [100.0]
    s = Sampler(clock=lambda: now[0])
    assert s.spool_bytes(tmp_path / "missing") == 0
    (tmp_path / "job" / "deep").mkdir(parents=True)
    (tmp_path / "a").write_bytes(b"x" * 1000)
    (tmp_path / "job" / "deep" / "b").write_bytes(b"x" * 24)
    (tmp_path / "link").symlink_to(tmp_path / "a")  # not counted twice
    assert s.spool_bytes(tmp_path) == 1024
    (tmp_path / "job" / "c").write_bytes(b"x" * 1000)
    now[0] += 4.9
    assert s.spool_bytes(tmp_path) == 1024  # cached
    now[0] += 0.2
    assert s.spool_bytes(str(tmp_path)) == 2024


# -- config -----------------------------------------------------------------------------


def load(tmp_path: Path, text: str, **overrides: object) -> NodeConfig:
    path = tmp_path / "node.toml"
    path.write_text("[node]\nname = \"a\"\n" + text)
    return load_config(path, dict(overrides))


def test_defaults() -> None:
    c = load_config(None, {"name": "a"})
    assert (c.memory, c.disk, c.nice, c.hours, c.max_load) == (0, 0, 10, (), 0.0)
    assert (c.pause_on_battery, c.on_pause, c.backup_tasks) == (True, "finish", True)


def test_example_config_loads() -> None:
    c = load_config(Path(__file__).resolve().parents[1] / "configs" / "node.example.toml", {})
    assert c.name == "a" and c.memory == 0 and c.hours == ()


def test_load_limits(tmp_path: Path) -> None:
    c = load(tmp_path, 'memory = "1.5GiB"\ndisk = "20G"\nnice = 19\nhours = ["mon-fri 18:00-08:00", "weekends"]\n'
                       'max_load = 1\npause_on_battery = false\non_pause = "hand_back"\nbackup_tasks = false\n')
    assert c.memory == 3 * GiB // 2 and c.disk == 20 * GiB and c.nice == 19
    assert c.hours == ("mon-fri 18:00-08:00", "weekends")
    assert c.max_load == 1.0 and isinstance(c.max_load, float)
    assert (c.pause_on_battery, c.on_pause, c.backup_tasks) == (False, "hand_back", False)
    assert load(tmp_path, "memory = 512\nhours = \"weekends\"\nmax_load = 0.25\n").memory == 512 * MiB
    assert load(tmp_path, "hours = \"weekends\"\n").hours == ("weekends",)
    assert load(tmp_path, "memory = 0\ndisk = \"0\"\nnice = 0\n").memory == 0
    assert load(tmp_path, "", memory="64M", hours=["sat"]).memory == 64 * MiB  # overrides use the file's syntax


@pytest.mark.parametrize("text, message", [
    ('memory = "16M"', r"memory = 16 MiB: must be 0 \(no limit\) or at least 32 MiB, since the task process's own "
                       "interpreter counts"),
    ("memory = 31", "at least 32 MiB"),
    ('memory = "lots"', r"memory = 'lots': not a size; write a whole number of MiB \(512\)"),
    ("memory = -1", "memory = -1: a size cannot be negative"),
    ("memory = 1.5", r"memory = 1.5: not a size"),
    ('disk = "20 parsecs"', "disk = '20 parsecs': not a size"),
    ("nice = 20", r"nice = 20: must be between 0 \(normal priority\) and 19"),
    ("nice = -1", "nice = -1: must be between 0"),
    ('nice = "low"', "nice = 'low': must be a whole number"),
    ('hours = ["mon-fri 25:00-08:00"]',
     r"hours rule 'mon-fri 25:00-08:00': '25:00' is not a time .* expected \[DAYS\]"),
    ("hours = [1]", "hours rule 1: not a string"),
    ("hours = 1", r"hours = 1: must be a list of rules such as \["),
    ("max_load = 1.5", "max_load = 1.5: must be a fraction of all CPUs between 0"),
    ("max_load = -0.1", "max_load = -0.1"),
    ('max_load = "high"', "max_load = 'high'"),
    ('pause_on_battery = "yes"', "pause_on_battery = 'yes': must be true or false"),
    ("backup_tasks = 1", "backup_tasks = 1: must be true or false"),
    ('on_pause = "stop"',
     r"""on_pause = 'stop': must be "finish" \(running tasks finish, no new ones start\) or "hand_back\""""),
])
def test_load_limits_rejects(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load(tmp_path, text + "\n")


def test_existing_callers_unchanged(tmp_path: Path) -> None:
    c = load_config(None, {"name": "b", "peers": ("127.0.0.1:7702",), "data_dir": tmp_path, "cpus": None,
                           "listen": None})
    assert c.peers == ("127.0.0.1:7702",) and c.data_dir == tmp_path and c.memory == 0


def test_changed_settings() -> None:
    old = cfg()
    new = dataclasses.replace(old, peers=("10.0.0.2:7700",), memory=64 * MiB, nice=5, hours=("weekends",),
                              data_dir=Path("/elsewhere"))
    assert changed_settings(old, new) == (["memory", "nice", "hours"], ["peers", "data_dir"])
    assert changed_settings(old, dataclasses.replace(old)) == ([], [])
    assert RESTART_ONLY <= {f.name for f in dataclasses.fields(NodeConfig)}


# -- run_limited in a real spawned pool -------------------------------------------------


def allocate(keep_mib: int, then_mib: int) -> int:
    """Hold ``keep_mib`` (pages touched), then try to allocate ``then_mib`` more."""
    keep = bytearray(keep_mib * MiB)
    keep[::4096] = b"\x01" * len(range(0, len(keep), 4096))
    more = bytearray(then_mib * MiB)
    more[::4096] = b"\x01" * len(range(0, len(more), 4096))
    return len(keep) + len(more)


def failure_frees_memory() -> tuple[int, int, bool]:
    """In the pool process: (RSS growth in MiB after a failed call, the limit after it,
    whether the raised error drags the MemoryError along)."""
    import resource

    rss = psutil.Process().memory_info().rss
    try:
        run_limited(100 * MiB, 0, allocate, 60, 300)
    except MemoryLimitExceeded as exc:
        chained = exc.__context__ is not None or exc.__cause__ is not None
    grown = (psutil.Process().memory_info().rss - rss) // MiB
    return grown, resource.getrlimit(resource.RLIMIT_DATA)[0], chained


@pytest.fixture(scope="module")
def pool() -> Iterator[ProcessPoolExecutor]:
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as executor:
        yield executor


linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_DATA is Linux's")


@linux_only
def test_memory_limit(pool: ProcessPoolExecutor) -> None:
    with pytest.raises(MemoryLimitExceeded) as err:
        pool.submit(run_limited, 100 * MiB, 10, allocate, 0, 300).result()
    assert str(err.value) == ("the task needed more than this node's memory limit (memory = 100 MiB in its config); "
                              "it will run on another member")
    assert isinstance(err.value, PdpError)
    # The same process then runs normal calls: no limit, then a limit the call fits in.
    assert pool.submit(run_limited, 0, 10, allocate, 0, 300).result() == 300 * MiB
    assert pool.submit(run_limited, 100 * MiB, 10, allocate, 0, 10).result() == 10 * MiB


@linux_only
def test_memory_freed_after_failure(pool: ProcessPoolExecutor) -> None:
    import resource

    grown, soft_after, chained = pool.submit(failure_frees_memory).result()
    assert grown < 30  # the 60 MiB held by the failed call are gone
    assert soft_after == resource.getrlimit(resource.RLIMIT_DATA)[0]  # the pool's own limit is back
    assert not chained
    # Twice 60 MiB would not fit under 100 MiB: the first call's memory must be free.
    assert pool.submit(run_limited, 100 * MiB, 10, allocate, 60, 0).result() == 60 * MiB
    assert pool.submit(run_limited, 100 * MiB, 10, allocate, 60, 0).result() == 60 * MiB


@linux_only
def test_chaos_alloc_fails_cleanly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pdp.jobs import runtime

    src = tmp_path / "in.txt"
    src.write_text("hello world hello\n")
    outs = str(tmp_path / "out-0")
    monkeypatch.setenv("PDP_CHAOS", "alloc=200")
    monkeypatch.setenv("PDP_TEST_KINDS", "1")
    spec = {"builtin": "chaos", "step": 0}
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as executor:
        with pytest.raises(MemoryLimitExceeded, match="memory = 64 MiB"):
            executor.submit(run_limited, 64 * MiB, 10, runtime.map_task, spec, str(src), 0, src.stat().st_size, 1,
                            outs).result()
        stats = executor.submit(run_limited, 0, 10, runtime.map_task, spec, str(src), 0, src.stat().st_size, 1,
                                outs).result()
    assert stats["records_in"] == 3 and stats["keys"] == 2


@pytest.mark.skipif(not hasattr(os, "getpriority"), reason="no Unix niceness")
def test_niceness(pool: ProcessPoolExecutor) -> None:
    start = os.getpriority(os.PRIO_PROCESS, 0)  # the pool process inherits ours
    assert pool.submit(run_limited, 0, 10, os.getpriority, os.PRIO_PROCESS, 0).result() == max(10, start)
    # Never lowered (that would need privilege): a smaller nice leaves it as it is.
    assert pool.submit(run_limited, 0, 5, os.getpriority, os.PRIO_PROCESS, 0).result() == max(10, start)


def test_memory_limit_exceeded_pickles() -> None:
    exc = pickle.loads(pickle.dumps(MemoryLimitExceeded(64 * MiB)))
    assert isinstance(exc, MemoryLimitExceeded) and exc.limit == 64 * MiB
    assert "memory = 64 MiB in its config" in str(exc)
    assert "ran out of memory" in str(MemoryLimitExceeded(0))


def test_run_limited_passes_other_errors() -> None:
    with pytest.raises(ZeroDivisionError):
        run_limited(0, 0, divmod, 1, 0)
    assert run_limited(0, 0, divmod, 7, 2) == (3, 1)
