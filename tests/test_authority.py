"""Authority in the replicated state (pdp.core.state): who may complete or give up a task, what a
submission may ask for, and the identity registry with its one-time invitations.

Every refusal must leave the state exactly as it was (a deep copy compared with ==, only the
``applied`` counter moves), and no command may carry or leave anything but plain values.
"""

from __future__ import annotations

import copy
import datetime
import hashlib
import pickle
import pickletools
import re
import ssl
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from pdp.node.spool import check_id
from pdp.core.state import (MAX_CHUNK, MAX_INPUT_SIZE, MAX_INPUTS, MAX_MAPS, MAX_TOKEN_TTL, State, cert_fingerprint,
                       plain, valid_job_id)

TERM = 4
NOW = 1000.0

# -- keys -----------------------------------------------------------------------------------


def _cert(name: str) -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    start = datetime.datetime(2024, 1, 1, tzinfo=datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(start)
            .not_valid_after(start + datetime.timedelta(days=3650)).sign(key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.PEM).decode()


CERTS = {n: _cert(n) for n in ("a", "b", "c", "ann", "bob", "d", "d2", "e", "x")}
FP = {n: hashlib.sha256(ssl.PEM_cert_to_DER_cert(pem)).hexdigest() for n, pem in CERTS.items()}


def secret_hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


# -- helpers --------------------------------------------------------------------------------


def snapshot(s: State) -> dict[str, Any]:
    """Everything in the state but the ``applied`` counter, deeply copied (dataclasses compare
    by value)."""
    return copy.deepcopy({k: v for k, v in vars(s).items() if k != "applied"})


def ok(s: State, cmd: Any) -> dict[str, Any]:
    res = s.apply(cmd)
    assert res["ok"] is True, res
    return res


def refused(s: State, cmd: Any, **flags: Any) -> dict[str, Any]:
    before, applied = snapshot(s), s.applied
    res = s.apply(cmd)
    assert res["ok"] is False, res
    assert isinstance(res["error"], str) and res["error"]
    for k, v in flags.items():
        assert res.get(k) == v, (k, res)
    assert snapshot(s) == before, f"a refused command changed the state: {res}"
    assert s.applied == applied + 1
    return res


def party(members: tuple[str, ...] = ("a", "b", "c")) -> State:
    s = State()
    ok(s, {"op": "master", "term": TERM, "name": "a", "data_addr": "a:1"})
    for n in members:  # a is the core voter; the others are invited workers
        if n != "a":
            ok(s, {"op": "invite", "name": n, "by": "a", "now": 1.0})
        ok(s, {"op": "member", "name": n, "data_addr": f"{n}:1", "raft_addr": f"{n}:2" if n == "a" else "",
               "cpus": 2, "now": 1.0, "voter": n == "a"})
    return s


def submit_cmd(job: str = "wordcount-20240101-000000-" + "0" * 32, sizes: tuple[int, ...] = (30,),
               chunk: int = 10, n_reduce: int = 2, **extra: Any) -> dict[str, Any]:
    inputs = [{"name": f"in{k}.txt", "size": n, "file_id": f"{job}-{k}", "holders": ["b"]} for k, n in enumerate(sizes)]
    return {"op": "submit", "id": job, "kind": "wordcount", "inputs": inputs, "n_reduce": n_reduce,
            "chunk_size": chunk, "form": {"submitter": "ann", "comment": "hi"}, "now": 5.0, **extra}


JOB = submit_cmd()["id"]


def order(op: str, phase: str, index: int, **kw: Any) -> dict[str, Any]:
    return {"op": op, "job": JOB, "phase": phase, "index": index, "term": TERM, **kw}


def assign(s: State, phase: str, index: int, node: str, backup: bool = False) -> int:
    return int(ok(s, order("assign", phase, index, node=node, lease_until=99.0, backup=backup))["attempt"])


def complete(phase: str, index: int, node: str, attempt: int, **kw: Any) -> dict[str, Any]:
    return order("complete", phase, index, node=node, attempt=attempt, stats={"seconds": 1.0}, **kw)


# -- completions ----------------------------------------------------------------------------


def test_a_member_cannot_forge_the_completion_of_a_task_it_does_not_run() -> None:
    s = party()
    ok(s, submit_cmd())
    attempt = assign(s, "map", 0, "b")
    refused(s, complete("map", 0, "c", attempt), not_yours=True)
    refused(s, complete("map", 1, "c", 1))  # never assigned
    assert s.jobs[JOB].maps[0].state == "running" and "c" not in s.records
    ok(s, complete("map", 0, "b", attempt))
    assert s.jobs[JOB].maps[0].node == "b"


def test_forged_reduce_completion_is_refused() -> None:
    s = party()
    ok(s, submit_cmd(sizes=(10,)))
    ok(s, complete("map", 0, "b", assign(s, "map", 0, "b")))
    attempt = assign(s, "reduce", 1, "c")
    refused(s, complete("reduce", 1, "b", attempt), not_yours=True)
    refused(s, complete("reduce", 0, "c", attempt))  # reduce 0 never ran
    ok(s, complete("reduce", 1, "c", attempt))


def test_backup_attempts_each_complete_only_from_their_own_node() -> None:
    s = party()
    ok(s, submit_cmd())
    first = assign(s, "map", 0, "b")
    second = assign(s, "map", 0, "c", backup=True)
    refused(s, complete("map", 0, "c", first), not_yours=True)
    refused(s, complete("map", 0, "b", second), not_yours=True)
    refused(s, complete("map", 0, "a", second), not_yours=True)
    ok(s, complete("map", 0, "c", second))
    refused(s, complete("map", 0, "b", first), dup=True)  # the first completion won
    assert s.jobs[JOB].maps[0].node == "c"


def test_whole_small_job_completion_only_from_its_runner() -> None:
    s = party()
    ok(s, submit_cmd(sizes=(5,), n_reduce=1))
    attempt = assign(s, "map", 0, "b")
    result = {"holders": ["b", "c"], "size": 3, "keys": 1, "sha256": "00" * 32}
    refused(s, complete("map", 0, "c", attempt, result=result, now=9.0), not_yours=True)
    refused(s, complete("map", 0, "b", attempt, result=result))  # without now: refused before any change
    assert ok(s, complete("map", 0, "b", attempt, result=result, now=9.0)) == {"ok": True, "job_done": True}
    assert s.jobs[JOB].state == "done" and s.jobs[JOB].result == result


def test_completion_of_a_lost_members_attempt_is_refused() -> None:
    s = party()
    ok(s, submit_cmd())
    attempt = assign(s, "map", 0, "b")
    ok(s, {"op": "lost", "node": "b", "term": TERM, "now": 3.0})
    refused(s, complete("map", 0, "b", attempt), stale_attempt=True)
    again = assign(s, "map", 0, "c")
    refused(s, complete("map", 0, "b", attempt), stale_attempt=True)
    ok(s, complete("map", 0, "c", again))


def test_release_with_a_node_must_name_the_runner() -> None:
    s = party()
    ok(s, submit_cmd())
    attempt = assign(s, "map", 0, "b")
    release = order("release", "map", 0, attempt=attempt, reason="failed on b: boom", failed=True, now=3.0)
    refused(s, {**release, "node": "c"}, not_yours=True)
    refused(s, {**release, "node": ""}, not_yours=True)
    ok(s, {**release, "node": "b"})
    assert s.jobs[JOB].maps[0].state == "pending" and s.records["b"].failed == 1
    attempt = assign(s, "map", 0, "c")
    ok(s, {**release, "attempt": attempt})  # the master's own decision (no node): as before


# -- submissions ----------------------------------------------------------------------------


def _with(cmd: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """``cmd`` with one field replaced: "inputs.0.size", "form.comment", "n_reduce"."""
    cmd = copy.deepcopy(cmd)
    *parents, last = path.split(".")
    target: Any = cmd
    for p in parents:
        target = target[int(p)] if isinstance(target, list) else target[p]
    target[int(last) if isinstance(target, list) else last] = value
    return cmd


BAD_SUBMITS = {
    "too many inputs": _with(submit_cmd(), "inputs", [submit_cmd()["inputs"][0]] * (MAX_INPUTS + 1)),
    "negative size": _with(submit_cmd(), "inputs.0.size", -1),
    "size over 1 TiB": _with(_with(submit_cmd(), "inputs.0.size", MAX_INPUT_SIZE + 1), "chunk_size", MAX_CHUNK),
    "size as bool": _with(submit_cmd(), "inputs.0.size", True),
    "size as float": _with(submit_cmd(), "inputs.0.size", 30.0),
    "too many maps": submit_cmd(sizes=(MAX_MAPS // 2 + 1, MAX_MAPS // 2), chunk=1),
    "chunk 0": submit_cmd(chunk=0),
    "chunk over cap": submit_cmd(chunk=MAX_CHUNK + 1),
    "n_reduce 0": submit_cmd(n_reduce=0),
    "n_reduce 65": submit_cmd(n_reduce=65),
    "kind with space": _with(submit_cmd(), "kind", "word count"),
    "kind too long": _with(submit_cmd(), "kind", "w" * 65),
    "id with slash": submit_cmd(job="a/b"),
    "id with dot-dot": submit_cmd(job="a..b"),
    "id starting with dot": submit_cmd(job=".hidden"),
    "id with newline": submit_cmd(job="job\n"),
    "id empty": submit_cmd(job=""),
    "id too long": submit_cmd(job="j" * 101),
    "id with markup": submit_cmd(job="[red]x"),
    "id not a string": _with(submit_cmd(), "id", 7),
    "input name too long": _with(submit_cmd(), "inputs.0.name", "n" * 4097),
    "input name not a string": _with(submit_cmd(), "inputs.0.name", 5),
    "file id with slash": _with(submit_cmd(), "inputs.0.file_id", "../etc"),
    "file id with newline": _with(submit_cmd(), "inputs.0.file_id", "f\n"),
    "holder not a member": _with(submit_cmd(), "inputs.0.holders", ["b", "zed"]),
    "holder with a space": _with(submit_cmd(), "inputs.0.holders", ["b c"]),
    "too many holders": _with(submit_cmd(), "inputs.0.holders", ["b"] * 17),
    "comment too long": _with(submit_cmd(), "form.comment", "c" * 2001),
    "submitter too long": _with(submit_cmd(), "form.submitter", "s" * 201),
    "form field too long": _with(submit_cmd(), "form.output", "o" * 4097),
    "form nested dict": _with(submit_cmd(), "form.extra", {"a": 1}),
    "form too many fields": _with(submit_cmd(), "form", {f"k{i}": i for i in range(33)}),
    "form bytes": _with(submit_cmd(), "form.comment", b"hi"),
    "priority float": submit_cmd(priority=1.5),
    "priority string": submit_cmd(priority="9"),
    "priority none": submit_cmd(priority=None),
    "now nan": _with(submit_cmd(), "now", float("nan")),
    "bytes in an input": _with(submit_cmd(), "inputs.0.extra", b"\x00"),
}


@pytest.mark.parametrize("name", sorted(BAD_SUBMITS))
def test_submit_outside_the_caps_is_refused(name: str) -> None:
    s = party()
    res = refused(s, BAD_SUBMITS[name])
    assert s.jobs == {} and s.next_seq == 0
    assert len(res["error"]) < 500


def test_submit_at_the_caps_is_accepted() -> None:
    s = party()
    big = submit_cmd(job="big", sizes=(MAX_INPUT_SIZE,), chunk=1 << 24)  # 65536 maps
    big["inputs"][0]["file_id"] = "big-0"
    ok(s, big)
    ok(s, submit_cmd(job="many", sizes=(MAX_MAPS - 10, 10), chunk=1, n_reduce=64))
    assert len(s.jobs["many"].maps) == MAX_MAPS
    inputs = _with(submit_cmd(job="wide", sizes=(0,)), "inputs", [
        {"name": f"{k}", "size": k, "file_id": f"wide-{k}", "holders": ["b", "c"]} for k in range(MAX_INPUTS)])
    ok(s, _with(_with(inputs, "form.comment", "c" * 2000), "form.submitter", "s" * 200))
    ok(s, submit_cmd(job="j" * 100, priority=-10**9))
    assert s.jobs["j" * 100].priority == -100


def test_retried_submit_with_other_inputs_is_refused() -> None:
    s = party()
    ok(s, submit_cmd())
    assert ok(s, submit_cmd(chunk=4096, n_reduce=5)) == {"ok": True, "dup": True, "id": JOB}
    refused(s, submit_cmd(sizes=(31,)), id_taken=True)
    refused(s, submit_cmd(sizes=(30, 0)), id_taken=True)
    refused(s, _with(submit_cmd(), "inputs.0.name", "other"), id_taken=True)
    refused(s, _with(submit_cmd(), "kind", "chaos"), id_taken=True)
    refused(s, _with(submit_cmd(), "form.submitter", "mallory"), id_taken=True)


def test_new_job_ids_have_128_random_bits_and_pass_every_check() -> None:
    from pdp.client import new_job_id  # (here: the client's own imports are not this file's concern)

    ids = {new_job_id("wordcount") for _ in range(200)}
    assert len(ids) == 200
    for job_id in ids:
        assert re.fullmatch(r"wordcount-\d{8}-\d{6}-[0-9a-f]{32}", job_id), job_id
        assert valid_job_id(job_id) and check_id(job_id) == job_id and check_id(f"{job_id}-999")
    s = party()
    job_id = next(iter(ids))
    cmd = submit_cmd(job=job_id)
    ok(s, cmd)


# -- plain values ---------------------------------------------------------------------------

UNSAFE_OPCODES = {"GLOBAL", "STACK_GLOBAL", "REDUCE", "BUILD", "INST", "OBJ", "NEWOBJ", "NEWOBJ_EX", "EXT1",
                  "EXT2", "EXT4", "PERSID", "BINPERSID", "BINBYTES", "SHORT_BINBYTES", "BINBYTES8", "BYTEARRAY8"}


def assert_plain_pickle(value: Any) -> None:
    ops = {op.name for op, _, _ in pickletools.genops(pickle.dumps(value, protocol=5))}
    assert not ops & UNSAFE_OPCODES, ops & UNSAFE_OPCODES


@pytest.mark.parametrize("value", [b"x", bytearray(b"x"), {1, 2}, object(), {1: "int key"}, [[[[[]]]]] * 0 + [b""],
                                   {"a": (1, b"x")}])
def test_commands_with_anything_but_plain_values_are_refused(value: Any) -> None:
    s = party()
    ok(s, submit_cmd())
    attempt = assign(s, "map", 0, "b")
    refused(s, {**complete("map", 0, "b", attempt), "stats": {"v": value}})
    refused(s, {"op": "token", "name": "d", "kind": "node", "token_hash": value, "expires": NOW + 60, "by": "ann",
                "now": NOW})
    assert not plain(value) and plain({"a": [1, 2.5, None, True, ("t",)]})


def test_deep_nesting_is_refused_without_raising() -> None:
    deep: Any = "x"
    for _ in range(40):
        deep = [deep]
    s = party()
    refused(s, {"op": "member", "name": "z", "data_addr": "z:1", "raft_addr": "", "cpus": 1, "now": 1.0,
                "extra": deep}, bad_request=True)


# -- identities -----------------------------------------------------------------------------


def genesis_cmd(now: float = NOW) -> dict[str, Any]:
    return {"op": "genesis", "now": now,
            "nodes": [{"name": "a", "fp": FP["a"], "cert": CERTS["a"], "addr": "10.0.0.1:7700"}],
            "users": [{"name": "ann", "fp": FP["ann"], "cert": CERTS["ann"], "admin": True},
                      {"name": "bob", "fp": FP["bob"], "cert": CERTS["bob"], "admin": False}]}


def token_cmd(name: str = "d", kind: str = "node", secret: str = "s3cret", expires: float = NOW + 600,
              now: float = NOW, **extra: Any) -> dict[str, Any]:
    return {"op": "token", "name": name, "kind": kind, "token_hash": secret_hash(secret), "expires": expires,
            "by": "ann", "now": now, **extra}


def join_cmd(key: str = "d", secret: str = "s3cret", now: float = NOW + 1) -> dict[str, Any]:
    return {"op": "join", "token_hash": secret_hash(secret), "fp": FP[key], "cert": CERTS[key], "now": now}


def registry() -> State:
    s = party(members=("a",))
    assert ok(s, genesis_cmd()) == {"ok": True, "identities": 3}
    return s


def test_cert_fingerprint_is_the_sha256_of_the_der() -> None:
    pem = CERTS["a"]
    assert cert_fingerprint(pem) == FP["a"]
    assert cert_fingerprint(pem) == x509.load_pem_x509_certificate(pem.encode()).fingerprint(hashes.SHA256()).hex()
    assert cert_fingerprint("\n" + pem.replace("\n", "\r\n") + "\n") == FP["a"]
    for bad in ["", "x", pem + pem, pem.replace("CERTIFICATE", "PRIVATE KEY"), pem[:60] + "!" + pem[61:],
                "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", pem.encode(), None, 5,
                pem + "x" * 20000]:
        assert cert_fingerprint(bad) is None, bad


def test_genesis_records_the_first_identities_once() -> None:
    s = registry()
    assert s.identity(FP["a"]) == {"name": "a", "kind": "node", "admin": False, "cert": CERTS["a"], "at": NOW,
                                   "by": "genesis", "addr": "10.0.0.1:7700"}
    assert s.identity(FP["ann"])["admin"] is True and s.identity(FP["bob"])["admin"] is False  # type: ignore[index]
    assert s.identity(FP["x"]) is None and s.identity("nope") is None
    assert "a" in s.invited and "ann" not in s.invited
    assert s.node_certs() == [CERTS["a"], CERTS["ann"], CERTS["bob"]]
    assert s.is_admin("ann") and not s.is_admin("bob") and not s.is_admin("a")
    res = refused(s, genesis_cmd(), exists=True)
    assert "once" in res["error"]
    other = genesis_cmd()
    other["nodes"] = [{"name": "x", "fp": FP["x"], "cert": CERTS["x"]}]
    other["users"] = []
    refused(s, other, exists=True)


def test_identity_is_a_copy() -> None:
    s = registry()
    rec = s.identity(FP["ann"])
    assert rec is not None
    rec["admin"] = False
    assert s.is_admin("ann")


def _genesis_with(path: str, value: Any) -> dict[str, Any]:
    return _with(genesis_cmd(), path, value)


BAD_GENESIS = {
    "no nodes": _genesis_with("nodes", []),
    "nodes not a list": _genesis_with("nodes", {"a": 1}),
    "cert of another key": _genesis_with("nodes.0.cert", CERTS["b"]),
    "fingerprint upper case": _genesis_with("nodes.0.fp", FP["a"].upper()),
    "fingerprint short": _genesis_with("nodes.0.fp", FP["a"][:40]),
    "not a certificate": _genesis_with("nodes.0.cert", "hello"),
    "cert as bytes": _genesis_with("nodes.0.cert", CERTS["a"].encode()),
    "name with space": _genesis_with("users.0.name", "ann smith"),
    "name too long": _genesis_with("users.0.name", "n" * 65),
    "name unprintable": _genesis_with("users.0.name", "ann\x07"),
    "name twice": _genesis_with("users.1.name", "ann"),
    "node and user share a name": _genesis_with("users.0.name", "a"),
    "key twice": _genesis_with("users.1", {"name": "bob", "fp": FP["ann"], "cert": CERTS["ann"]}),
    "admin not a bool": _genesis_with("users.0.admin", "yes"),
    "admin node": _genesis_with("nodes.0.admin", True),
    "now missing": {k: v for k, v in genesis_cmd().items() if k != "now"},
}


@pytest.mark.parametrize("name", sorted(BAD_GENESIS))
def test_bad_genesis_is_refused(name: str) -> None:
    s = party(members=("a",))
    refused(s, BAD_GENESIS[name])
    assert s.identities == {}


def test_a_node_joins_once_with_its_token() -> None:
    s = registry()
    assert ok(s, token_cmd()) == {"ok": True, "replaced": False}
    assert s.invitation(secret_hash("s3cret"), NOW) == {"name": "d", "kind": "node", "expires": NOW + 600, "by": "ann"}
    assert "d" not in s.invited  # not before it joined
    refused(s, join_cmd(secret="wrong"), spent=True)
    assert ok(s, join_cmd()) == {"ok": True, "name": "d", "kind": "node"}
    assert s.identity(FP["d"]) == {"name": "d", "kind": "node", "admin": False, "cert": CERTS["d"], "at": NOW + 1,
                                   "by": "ann", "addr": ""}
    assert s.invited["d"] == {"by": "ann", "at": NOW + 1} and s.tokens == {}
    assert s.invitation(secret_hash("s3cret"), NOW) is None
    # The token is spent: the same key or another cannot use it again.
    refused(s, join_cmd(), spent=True)
    refused(s, join_cmd(key="e"), spent=True)
    # The new member can now register (the existing membership code).
    ok(s, {"op": "member", "name": "d", "data_addr": "d:1", "raft_addr": "", "cpus": 1, "now": NOW + 2,
           "voter": False})


def test_a_user_joins_without_being_a_member_or_admin() -> None:
    s = registry()
    ok(s, token_cmd(name="eve", kind="user", secret="u"))
    ok(s, join_cmd(key="e", secret="u"))
    assert s.identity(FP["e"])["kind"] == "user" and not s.is_admin("eve")  # type: ignore[index]
    assert "eve" not in s.invited and s.fingerprints_of("eve") == [FP["e"]]


def test_expired_token_is_refused() -> None:
    s = registry()
    ok(s, token_cmd(expires=NOW + 60))
    ok(s, join_cmd(now=NOW + 60))  # at the deadline: still fine
    ok(s, token_cmd(name="e", secret="t", expires=NOW + 60))
    refused(s, {**join_cmd(key="e", secret="t"), "now": NOW + 60.001}, expired=True)
    assert s.invitation(secret_hash("t"), NOW + 61) is None


def test_withdrawn_token_is_refused() -> None:
    s = registry()
    ok(s, token_cmd())
    ok(s, {"op": "withdraw", "name": "d"})
    refused(s, join_cmd(), spent=True)
    refused(s, {"op": "withdraw", "name": "d"})


@pytest.mark.parametrize("cmd", [
    token_cmd(name="d e"), token_cmd(name=""), token_cmd(name="x" * 65), token_cmd(kind="admin"),
    {**token_cmd(), "token_hash": "ab"}, {**token_cmd(), "token_hash": secret_hash("x").upper()},
    token_cmd(expires=NOW), token_cmd(expires=NOW - 1), token_cmd(expires=NOW + MAX_TOKEN_TTL + 1),
    token_cmd(expires=float("inf")), {**token_cmd(), "by": ""}, token_cmd(replace="yes"),
    token_cmd(name="a"),  # a has a key
    token_cmd(name="ann", kind="user"),  # so has ann
    token_cmd(name="ann", kind="node", replace=True),  # ann is a user
    token_cmd(name="a", kind="user", replace=True),  # a is a node
    {k: v for k, v in token_cmd().items() if k != "expires"},
], ids=lambda c: repr({k: c.get(k) for k in ("name", "kind", "expires", "replace")})[:60])
def test_bad_token_is_refused(cmd: dict[str, Any]) -> None:
    s = registry()
    refused(s, cmd)


def test_token_for_a_member_node_name_as_a_user_is_refused() -> None:
    s = party()  # b and c are members without keys (the old way)
    ok(s, genesis_cmd())
    refused(s, token_cmd(name="b", kind="user"))
    ok(s, token_cmd(name="b", kind="node"))  # b gets its key


def test_a_second_token_for_a_name_needs_replace() -> None:
    s = registry()
    ok(s, token_cmd(secret="one"))
    refused(s, token_cmd(secret="two"), exists=True)
    refused(s, token_cmd(name="e", secret="one"))  # the same secret for another name
    assert ok(s, token_cmd(secret="two", replace=True)) == {"ok": True, "replaced": True}
    refused(s, join_cmd(secret="one"), spent=True)  # the old secret stopped working
    ok(s, join_cmd(secret="two"))
    # An expired invitation does not block a new one.
    ok(s, token_cmd(name="e", secret="three", expires=NOW + 10))
    ok(s, token_cmd(name="e", secret="four", now=NOW + 20, expires=NOW + 100))
    refused(s, join_cmd(key="e", secret="three", now=NOW + 21), spent=True)
    ok(s, join_cmd(key="e", secret="four", now=NOW + 21))


def test_replace_adds_a_second_key_for_a_name() -> None:
    s = registry()
    ok(s, token_cmd(name="ann", kind="user", secret="laptop", replace=True))
    ok(s, join_cmd(key="x", secret="laptop"))
    assert s.fingerprints_of("ann") == [FP["ann"], FP["x"]]
    assert s.identity(FP["x"])["admin"] is False  # type: ignore[index]  # a new key is never admin


def test_join_with_a_registered_or_broken_key_is_refused() -> None:
    s = registry()
    ok(s, token_cmd())
    refused(s, join_cmd(key="a"), exists=True)  # a's key is taken
    refused(s, {**join_cmd(), "cert": CERTS["e"]})  # the certificate of another key
    refused(s, {**join_cmd(), "cert": "junk"})
    refused(s, {**join_cmd(), "fp": FP["d"][:-1]})
    refused(s, {**join_cmd(), "now": "soon"})
    ok(s, join_cmd())


def test_revoke_removes_keys_invitation_and_membership() -> None:
    s = party(members=("a", "b"))
    ok(s, genesis_cmd())
    ok(s, submit_cmd())
    ok(s, token_cmd(name="b", secret="b"))
    ok(s, join_cmd(key="b", secret="b"))
    attempt = assign(s, "map", 0, "b")
    ok(s, token_cmd(name="b", secret="b2", replace=True))  # a pending second key too
    assert ok(s, {"op": "revoke", "name": "b", "term": TERM, "now": 7.0}) == {"ok": True, "removed": 1}
    assert s.fingerprints_of("b") == [] and s.identity(FP["b"]) is None
    assert "b" not in s.members and "b" not in s.invited and "b" not in s.tokens
    assert CERTS["b"] not in s.node_certs()
    assert s.jobs[JOB].maps[0].state == "pending"  # its work runs elsewhere
    refused(s, complete("map", 0, "b", attempt), stale_attempt=True)
    refused(s, join_cmd(key="b", secret="b2"), spent=True)
    refused(s, {"op": "revoke", "name": "b"})  # nothing left to revoke


def test_revoke_a_user_and_the_last_admin() -> None:
    s = registry()
    ok(s, {"op": "revoke", "name": "bob"})
    assert s.identity(FP["bob"]) is None
    res = refused(s, {"op": "revoke", "name": "ann"}, last_admin=True)
    assert "last admin" in res["error"]
    refused(s, {"op": "revoke", "name": "a"}, core=True)  # a core voter leaves the core first
    refused(s, {"op": "revoke", "name": "nobody"})
    refused(s, {"op": "revoke", "name": "bob", "term": "4"})


def test_uninvite_also_revokes_the_keys() -> None:
    s = party(members=("a",))
    ok(s, genesis_cmd())
    ok(s, token_cmd())
    ok(s, join_cmd())
    ok(s, {"op": "uninvite", "name": "d", "term": TERM})
    assert s.identity(FP["d"]) is None and "d" not in s.invited
    refused(s, {"op": "uninvite", "name": "d", "term": TERM})
    refused(s, {"op": "uninvite", "name": "a", "term": TERM})  # a core voter


def test_rekey_replaces_one_key() -> None:
    s = registry()
    ok(s, {"op": "rekey", "name": "ann", "old_fp": FP["ann"], "fp": FP["x"], "cert": CERTS["x"], "now": NOW + 5})
    assert s.identity(FP["ann"]) is None
    assert s.identity(FP["x"]) == {"name": "ann", "kind": "user", "admin": True, "cert": CERTS["x"], "at": NOW + 5,
                                   "by": "genesis", "addr": ""}
    assert s.fingerprints_of("ann") == [FP["x"]] and CERTS["ann"] not in s.node_certs()
    assert list(s.identities)[1] == FP["x"]  # it keeps its place
    for bad in [{"old_fp": FP["ann"]},  # the old key is gone
                {"name": "bob", "old_fp": FP["x"]},  # not bob's key
                {"old_fp": FP["x"], "fp": FP["bob"], "cert": CERTS["bob"]},  # a registered key
                {"old_fp": FP["x"], "cert": CERTS["d"]},  # a cert that is not fp's
                {"old_fp": FP["x"], "now": "later"}]:
        refused(s, {"op": "rekey", "name": "ann", "fp": FP["e"], "cert": CERTS["e"], **bad})


def test_identity_commands_with_missing_fields_never_raise_nor_change() -> None:
    s = registry()
    ok(s, token_cmd(name="e", secret="e"))
    cmds = [token_cmd(), join_cmd(key="e", secret="e"), {"op": "withdraw", "name": "e"},
            {"op": "revoke", "name": "bob"}, {"op": "rekey", "name": "ann", "old_fp": FP["ann"], "fp": FP["x"],
                                              "cert": CERTS["x"]}, genesis_cmd()]
    for cmd in cmds:
        for key in [k for k in cmd if k != "op"]:
            refused(s, {k: v for k, v in cmd.items() if k != key})  # every field given here is needed
            for junk in (None, 5, [], {"x": 1}, "x", float("nan")):
                before = snapshot(s)
                res = s.apply({**cmd, key: junk})
                assert isinstance(res, dict) and isinstance(res["ok"], bool)
                if not res["ok"]:
                    assert snapshot(s) == before, (cmd["op"], key, junk)


def test_identity_state_is_plain_and_survives_a_snapshot() -> None:
    s = registry()
    ok(s, token_cmd())
    for cmd in (genesis_cmd(), token_cmd(), join_cmd(), {"op": "rekey", "name": "ann", "old_fp": FP["ann"],
                                                           "fp": FP["x"], "cert": CERTS["x"]}):
        assert_plain_pickle(cmd)
    assert_plain_pickle((s.identities, s.tokens, s.invited))
    restored: State = pickle.loads(pickle.dumps(s))
    assert snapshot(restored) == snapshot(s)
    assert restored.apply(join_cmd()) == s.apply(join_cmd())
    assert snapshot(restored) == snapshot(s)


def test_dumps_from_before_identities_load_empty() -> None:
    old = State()
    data = {k: v for k, v in vars(old).items() if k not in ("identities", "tokens")}
    loaded = State.__new__(State)
    loaded.__setstate__(data)
    assert loaded.identities == {} and loaded.tokens == {} and loaded.node_certs() == []


def test_two_replicas_agree_on_identity_commands() -> None:
    cmds = [genesis_cmd(), token_cmd(), token_cmd(), join_cmd(secret="no"), join_cmd(), token_cmd(name="e"),
            {"op": "withdraw", "name": "e"}, {"op": "revoke", "name": "d", "term": TERM},
            {"op": "rekey", "name": "bob", "old_fp": FP["bob"], "fp": FP["x"], "cert": CERTS["x"]}]
    one, two = party(members=("a",)), party(members=("a",))
    assert [one.apply(copy.deepcopy(c)) for c in cmds] == [two.apply(copy.deepcopy(c)) for c in cmds]
    assert snapshot(one) == snapshot(two) and pickle.dumps(one) == pickle.dumps(two)


# -- the spool: paths from validated ids only, private directories -----------------------------


@pytest.mark.parametrize("bad", ["job\n", "a/b", "..", "a..b", ".x", "", "j" * 129, "x\x00", "-x", "ü", 5, None])
def test_spool_ids_are_matched_whole(bad: Any) -> None:
    from pdp.errors import PdpError

    with pytest.raises(PdpError):
        check_id(bad)


def test_spool_directories_are_private(tmp_path: Any) -> None:
    import os
    import stat

    from pdp.errors import PdpError
    from pdp.node.spool import FILE_MODE, Spool

    root = tmp_path / "spool"
    (root / "jobs").mkdir(parents=True, mode=0o755)
    os.chmod(root / "jobs", 0o755)  # as an older version left it
    old = os.umask(0o022)
    try:
        spool = Spool(root)
        job_dir = spool.job_dir("wordcount-1")
        result = spool.file("wordcount-1", "result")
    finally:
        os.umask(old)
    for d in (root, root / "inputs", root / "jobs", job_dir):
        assert stat.S_IMODE(d.stat().st_mode) == 0o700, d
    assert result.parent == job_dir and FILE_MODE == 0o600
    assert spool.input("wordcount-1-0") == root / "inputs" / "wordcount-1-0"
    for name in ("result\n", "map-1/x", "../result", "map-", "chunk-1x"):
        with pytest.raises(PdpError):
            spool.file("wordcount-1", name)
