"""Tests for pdp.core.statecodec: State <-> plain msgpack values, and pickle-free dump files.

States are built by applying real commands (the helpers and the random command generator of
tests/test_state.py); a restored state must equal the original exactly and go on applying
commands exactly like it.
"""

from __future__ import annotations

import copy
import gzip
import pickle
import random
import time
from pathlib import Path
from typing import Any

import msgpack
import pytest
from pysyncobj.node import TCPNode
from test_state import Gen, assign_cmd, fresh, job_in, member_cmd, ok, run_sequence, snap, submit_cmd

from pdp.errors import ProtocolError
from pdp.raft.raftnet import NO_OP, pack_command
from pdp.core.state import State
from pdp.core.statecodec import (MAGIC, StateDump, is_pdp_dump, read_dump, state_from_plain, state_to_plain,
                            write_dump)


def through_msgpack(state: State) -> State:
    """What a snapshot does: plain, msgpack bytes, back."""
    data = msgpack.packb(state_to_plain(state), use_bin_type=True)
    return state_from_plain(msgpack.unpackb(data, raw=False, strict_map_key=True))


def assert_same(a: State, b: State) -> None:
    assert state_to_plain(a) == state_to_plain(b)
    assert a.members == b.members and a.jobs == b.jobs and a.records == b.records  # dataclass equality
    assert (a.master, a.invited, a.next_seq, a.applied) == (b.master, b.invited, b.next_seq, b.applied)
    assert snap(a) == snap(b)


def backup_state() -> State:
    """A job with a straggler's backup: Task.runs holds two int-keyed attempts."""
    s = fresh()
    for name in ("n1", "w1", "w2"):
        ok(s, member_cmd(name))
    ok(s, submit_cmd("j", [10], chunk=4, n_reduce=2))
    ok(s, assign_cmd("j", "map", 0, node="w1"))
    ok(s, {**assign_cmd("j", "map", 0, node="w2"), "backup": True})
    assert s.jobs["j"].maps[0].runs == {1: "w1", 2: "w2"}
    return s


@pytest.mark.parametrize("phase", ["queued", "mapping", "reducing", "assembling", "done", "failed"])
def test_round_trip_of_every_phase(phase: str) -> None:
    s = job_in(phase)
    assert_same(through_msgpack(s), s)


def test_round_trip_keeps_int_keys_of_runs() -> None:
    s = backup_state()
    restored = through_msgpack(s)
    assert restored.jobs["j"].maps[0].runs == {1: "w1", 2: "w2"}
    assert all(type(k) is int for k in restored.jobs["j"].maps[0].runs)
    assert_same(restored, s)


@pytest.mark.parametrize("seed", range(4))
def test_round_trip_of_random_sequences(seed: int) -> None:
    s, _ = run_sequence(seed, 300)
    assert_same(through_msgpack(s), s)


def test_restored_state_goes_on_like_the_original() -> None:
    """A replica restored from a (msgpack) snapshot continues exactly like one that was not."""
    rng = random.Random(11)
    s = fresh(1)
    gen = Gen(rng, s, full=True)
    cmds = []
    for _ in range(400):
        cmd = gen.one()
        cmds.append(copy.deepcopy(cmd))
        s.apply(cmd)
    ref = fresh(1)
    for cmd in cmds[:200]:
        ref.apply(copy.deepcopy(cmd))
    restored = through_msgpack(ref)
    for cmd in cmds[200:]:
        assert restored.apply(copy.deepcopy(cmd)) == ref.apply(copy.deepcopy(cmd))
    assert_same(restored, ref)
    assert_same(restored, s)


def test_plain_form_is_a_copy() -> None:
    s = job_in("mapping")
    plain = state_to_plain(s)
    plain["jobs"]["j"]["form"]["source"] = "changed"
    plain["jobs"]["j"]["maps"][0]["stats"]["x"] = 1
    assert s.jobs["j"].form["source"] == "test" and "x" not in s.jobs["j"].maps[0].stats


def _broken(change: Any) -> dict[str, Any]:
    plain = state_to_plain(backup_state())
    change(plain)
    return plain


BAD_STATES: list[tuple[str, Any]] = [
    ("not a map", []),
    ("missing field", _broken(lambda p: p.pop("records"))),
    ("extra field", _broken(lambda p: p.update(x=1))),
    ("str for int", _broken(lambda p: p.update(next_seq="1"))),
    ("bool for int", _broken(lambda p: p.update(applied=True))),
    ("str for float", _broken(lambda p: p["members"]["w1"].update(joined_at="now"))),
    ("unknown task field", _broken(lambda p: p["jobs"]["j"]["maps"][0].update(evil=1))),
    ("runs as a map", _broken(lambda p: p["jobs"]["j"]["maps"][0].update(runs={"1": "w1"}))),
    ("runs with a str key", _broken(lambda p: p["jobs"]["j"]["maps"][0].update(runs=[["1", "w1"]]))),
    ("bytes in stats", _broken(lambda p: p["jobs"]["j"]["maps"][0].update(stats={"b": b"x"}))),
    ("job without id", _broken(lambda p: p["jobs"]["j"].pop("id"))),
    ("member as a list", _broken(lambda p: p["members"].update(w1=[1]))),
    ("invited as a list", _broken(lambda p: p.update(invited=[]))),
    ("int job key", _broken(lambda p: p["jobs"].update({1: p["jobs"]["j"]}))),
]


@pytest.mark.parametrize("plain", [p for _, p in BAD_STATES], ids=[k for k, _ in BAD_STATES])
def test_state_from_plain_refuses(plain: Any) -> None:
    with pytest.raises(ProtocolError):
        state_from_plain(plain)


def test_missing_dataclass_field_takes_its_default() -> None:
    plain = _broken(lambda p: p["jobs"]["j"].pop("backups"))
    assert state_from_plain(plain).jobs["j"].backups == 0


# -- dump files ---------------------------------------------------------------------------

LAST = (pack_command({"op": "member", "name": "n1"}), 12, 3)
PREV = (bytes([NO_OP]), 11, 3)
CLUSTER = ["127.0.0.1:7101", "127.0.0.1:7102"]


def test_dump_round_trip(tmp_path: Path) -> None:
    s = backup_state()
    path = tmp_path / "raft.dump"
    write_dump(path, s, LAST, PREV, CLUSTER)
    assert is_pdp_dump(path) and path.read_bytes().startswith(MAGIC)
    state, last, prev, cluster = read_dump(path)
    assert_same(state, s)
    assert (last, prev, cluster) == (LAST, PREV, CLUSTER)
    assert type(last) is tuple and type(prev) is tuple


def test_state_dump_serializer_and_deserializer(tmp_path: Path) -> None:
    """As pysyncobj calls them: data[1:] in, (last, prev, set of TCPNode) out."""
    source, target = backup_state(), [State()]
    writer = StateDump(lambda: source, lambda s: None)
    reader = StateDump(lambda: target[0], lambda s: target.__setitem__(0, s))
    path = str(tmp_path / "raft.dump")
    writer.serializer(path, (LAST, PREV, {TCPNode(CLUSTER[0]), TCPNode(CLUSTER[1]), None}))
    last, prev, cluster = reader.deserializer(path)
    assert (last, prev) == (LAST, PREV)
    assert cluster == {TCPNode(CLUSTER[0]), TCPNode(CLUSTER[1])}
    assert all(type(n) is TCPNode for n in cluster)
    assert_same(target[0], source)


class Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> Any:
        import os
        return os.system, (f"touch {self.marker}",)


def _dump_bytes(tmp_path: Path, **fields: Any) -> bytes:
    path = tmp_path / "good.dump"
    write_dump(path, backup_state(), LAST, PREV, CLUSTER)
    if not fields:
        return path.read_bytes()
    import hashlib
    body = msgpack.unpackb(path.read_bytes()[len(MAGIC) + 32:])
    body.update(fields)
    raw = msgpack.packb(body, use_bin_type=True)
    return MAGIC + hashlib.sha256(raw).digest() + raw


def test_deserializer_refuses_and_keeps_the_state(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    evil_entry = [bytes([0]) + pickle.dumps((0, (Evil(marker),)), 2), 12, 3]
    good = _dump_bytes(tmp_path)
    flipped = bytearray(good)
    flipped[-5] ^= 1
    cases = {
        "pysyncobj's gzip pickle": gzip.compress(pickle.dumps((None, LAST, PREV, set(), Evil(marker)))),
        "bare pickle": pickle.dumps(Evil(marker)),
        "damaged": bytes(flipped),
        "truncated": good[:-10],
        "evil last entry": _dump_bytes(tmp_path, last=evil_entry),
        "evil prev entry": _dump_bytes(tmp_path, prev=[evil_entry[0], 11, 3]),
        "entries apart": _dump_bytes(tmp_path, prev=[bytes([NO_OP]), 5, 3]),
        "bad cluster id": _dump_bytes(tmp_path, cluster=["ro:x"]),
        "other format": _dump_bytes(tmp_path, format=2),
        "bad state": _dump_bytes(tmp_path, state={"members": 1}),
    }
    state = State()
    dump = StateDump(lambda: state, lambda s: pytest.fail("a refused dump must not replace the state"))
    for name, data in cases.items():
        path = tmp_path / "raft.dump"
        path.write_bytes(data)
        with pytest.raises(ProtocolError):
            dump.deserializer(str(path))
        assert not marker.exists(), name


def test_dump_speed_of_a_large_state(tmp_path: Path) -> None:
    """Printed with -s: dumps run on pysyncobj's tick thread (no fork with a custom serializer)."""
    s = fresh()
    ok(s, member_cmd("n1"))
    for k in range(200):
        ok(s, submit_cmd(f"j{k}", [400], chunk=4, n_reduce=4))
    tasks = sum(len(j.maps) + len(j.reduces) for j in s.jobs.values())
    path = tmp_path / "raft.dump"
    start = time.perf_counter()
    write_dump(path, s, LAST, PREV, CLUSTER)
    written = time.perf_counter() - start
    start = time.perf_counter()
    restored = read_dump(path)[0]
    read = time.perf_counter() - start
    assert_same(restored, s)
    print(f"dump of {len(s.jobs)} jobs / {tasks} tasks: {path.stat().st_size} B, write {written * 1000:.0f} ms, "
          f"read {read * 1000:.0f} ms")
