"""The master's lease and liveness rules (pdp.core.leases), in milliseconds: no processes,
no sockets, no clocks. Each test is one of the rules the module docstring states; the real
processes of tests/test_chaos.py check that the master acts on them."""

from __future__ import annotations

from pdp.core.leases import Leases, Running

HB, DEAD, STALL = 0.5, 3.0, 10.0


def leases(term: int = 2, since: float = 0.0) -> Leases:
    return Leases(HB, DEAD, STALL, since, term)


def task(node: str = "w1", index: int = 0, attempt: int = 1, term: int = 2) -> Running:
    return Running("j", "map", index, attempt, node, term)


def listed(t: Running, progress: float) -> dict[str, object]:
    return {"job": t.job, "phase": t.phase, "index": t.index, "attempt": t.attempt, "progress": progress}


def test_health_goes_alive_suspected_dead_and_back() -> None:
    le = leases()
    assert le.health("w1", 0.0) == ("unknown", None)
    assert le.heard("w1", [], 1, "", 1.0) == "alive"
    assert le.heard("w1", [], 1, "", 1.5) == ""
    assert le.health("w1", 1.5 + 2 * HB)[0] == "alive"
    assert le.health("w1", 1.5 + 2 * HB + 0.01)[0] == "suspected"
    assert le.health("w1", 1.5 + DEAD + 0.01)[0] == "dead"
    le.lost("w1")
    assert le.heard("w1", [], 1, "", 9.0) == "back"
    assert le.health("w1", 9.0) == ("alive", 0.0)
    assert le.view(9.5)["w1"] == {"health": "alive", "age": 0.5, "tasks": [], "slots": 1, "paused": ""}


def test_a_new_master_judges_nothing_by_time_until_everyone_could_speak() -> None:
    le, t = leases(since=100.0), task()
    grace_end = 100.0 + DEAD + HB
    assert le.expired([t], grace_end - 0.01) == []  # even never heard of: grace
    assert le.expired([t], grace_end + 0.01) == []  # first noticed now: a full grace of its own
    assert le.expired([t], grace_end + DEAD + HB + 0.02) == [(t, "lost on w1")]  # never listed


def test_progress_keeps_a_lease_and_standing_still_loses_it() -> None:
    le, t = leases(), task()
    now = DEAD + HB + 1.0  # past the new-master grace
    for step in range(30):  # progress moves every heartbeat: the lease holds for 15 s > STALL
        le.heard("w1", [listed(t, step)], 1, "", now)
        assert le.expired([t], now) == []
        now += HB
    for _ in range(int(STALL / HB) - 1):  # listed, but the same progress: holds until STALL
        le.heard("w1", [listed(t, 29)], 1, "", now)
        assert le.expired([t], now) == []
        now += HB
    le.heard("w1", [listed(t, 29)], 1, "", now + HB)
    assert le.expired([t], now + HB) == [(t, "stalled on w1")]


def test_an_attempt_its_live_member_stops_listing_is_lost() -> None:
    le, t = leases(), task()
    now = DEAD + HB + 1.0
    le.heard("w1", [listed(t, 1)], 1, "", now)
    for i in range(1, 8):  # the member goes on heartbeating, without the attempt
        le.heard("w1", [], 1, "", now + i * HB)
    assert le.expired([t], now + DEAD) == []
    assert le.expired([t], now + DEAD + HB + 0.01) == [(t, "lost on w1")]


def test_an_assignment_that_never_reached_its_member_runs_again_at_once() -> None:
    """A former master (term 1) committed it and died before telling w1; this master (term 2)
    gives it back as soon as w1 heartbeats for more than two intervals without it — inside
    the grace, which is for members that could not speak yet, not for this."""
    le, old, mine = leases(term=2, since=50.0), task(term=1), task(index=1, term=2)
    le.heard("w1", [], 1, "", 50.1)
    assert le.expired([old, mine], 50.1 + 2 * HB) == []
    le.heard("w1", [], 1, "", 50.1 + 2 * HB + 0.01)
    assert le.expired([old, mine], 50.2 + 2 * HB) == [(old, "lost on w1")]  # not this term's own
    le2 = leases(term=2, since=50.0)  # the member lists it: it did reach the member
    le2.heard("w1", [listed(old, 0.5)], 1, "", 50.1)
    le2.heard("w1", [listed(old, 0.6)], 1, "", 51.5)
    assert le2.expired([old], 51.5) == []


def test_the_sweep_loses_gone_and_silent_members_and_probes_quiet_ones() -> None:
    le = leases(since=12.0)
    for name in ("quiet", "silent", "fine"):
        le.heard(name, [], 1, "", 10.0)
    le.heard("fine", [], 1, "", 14.0)
    sweep = le.silent({"gone", "quiet", "silent", "fine", "me", "never"}, {"quiet", "silent", "fine", "me", "never"},
                      "me", 14.0)
    assert sweep.lose == [("gone", "no longer a member"), ("quiet", "silent for 4.0 s"),
                          ("silent", "silent for 4.0 s")]
    assert sweep.probe == ["never"]  # never heard by this master: is its process there at all?
    le.heard("quiet", [], 1, "", 13.0)
    assert le.silent({"quiet"}, {"quiet"}, "me", 14.2).probe == ["quiet"]  # 1.2 s > two heartbeats
    le.lost("quiet")
    assert le.silent({"quiet"}, {"quiet"}, "me", 20.0).lose == []  # declared once


def test_a_lost_members_attempts_are_not_judged_and_ended_attempts_are_forgotten() -> None:
    le, a, b = leases(), task("w1"), task("w2", index=1)
    now = DEAD + HB + 1.0
    le.assigned(a.key, now)
    le.heard("w1", [listed(a, 5)], 1, "", now)
    le.heard("w2", [listed(b, 7)], 1, "", now)
    assert le.running_info(now + 2) == {a.key: (2.0, 5)}
    le.lost("w2")
    assert le.expired([a, b], now + 100) == [(a, "lost on w1")]
    assert set(le.watch) == {a.key, b.key} and set(le.started) == {a.key, b.key}
    assert le.expired([a], now + 101) == [(a, "lost on w1")]
    assert set(le.watch) == {a.key} and set(le.started) == {a.key}
    assert le.expired([], now + 102) == [] and not le.watch and not le.started
