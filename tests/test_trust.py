"""The attacks of issue 9 against a live party, each of which worked before identities:

a pickle sent to the Raft port ran; a client naming itself after the master wiped a voter's
journal with ``become``; names and roles were whatever a peer said. Now every connection is
mutual TLS, the peer is who its certificate proves, and every request is authorized.
Each test asserts the refusal *and* that nothing changed (state, journals, spools).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import pickle
import struct
import time
from pathlib import Path
from typing import Any

import msgpack
import pytest

from pdp.core import authz
from pdp.client import Client
from pdp.errors import AuthError, RemoteError
from pdp.identity import Credential, Identity, load_node_identity, new_credential, parse_token
from pdp.local import LocalParty
from pdp.net.transport import dial

MARK = Path("/tmp/pdp-trust-test-pwned")


class _Evil:
    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return os.system, (f"touch {MARK}",)


def _run(coro: Any) -> Any:
    return asyncio.run(coro)


def _snapshot(party: LocalParty, i: int) -> tuple[Any, ...]:
    """What must not change: the Raft journal and dump, the spool's files, the replicated state."""
    root = party.root / party.names[i]
    raft = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((root / "raft").glob("raft.*"))
            if not p.name.endswith(".meta")}  # (the meta file rewrites its commit index on a timer)
    spool = sorted(str(p.relative_to(root)) for p in (root / "spool").rglob("*"))
    st = _run(party.status(i))
    return raft, spool, st["raft"]["commit_idx"], st["term"], [m["name"] for m in st["members"]], st["jobs"]


def _quiet(party: LocalParty) -> None:
    """Until the log stops moving (registrations and heartbeats write no entries once settled)."""
    last = None
    for _ in range(50):
        now = [_run(party.status(i))["raft"]["commit_idx"] for i in range(party.n)]
        if now == last:
            return
        last = now
        time.sleep(0.3)


async def _raw(addr: str, data: bytes) -> bytes:
    host, port = addr.rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(data)
    await writer.drain()
    try:
        return await asyncio.wait_for(reader.read(4096), 10)
    except (ConnectionError, asyncio.TimeoutError):
        return b""
    finally:
        writer.close()


def test_pickles_and_garbage_on_every_port_run_nothing(party: LocalParty) -> None:
    MARK.unlink(missing_ok=True)
    evil = pickle.dumps(_Evil())
    framed = struct.pack("i", len(evil)) + evil  # pysyncobj's own framing
    _quiet(party)
    before = _snapshot(party, 1)
    for i in range(party.n):
        host, port = party.addr(i).rsplit(":", 1)
        for data in (evil, framed, os.urandom(300), b"\x16\x03\x01\x00\x05hello"):
            _run(_raw(party.addr(i), data))
        with pytest.raises(OSError):  # the old Raft port (data port + 1) is gone
            _run(_raw(f"{host}:{int(port) + 1}", framed))
    time.sleep(0.5)
    assert not MARK.exists()
    assert _snapshot(party, 1) == before
    assert all(party.alive(i) for i in range(party.n))


def test_unknown_certificate_is_refused_on_the_one_port(party: LocalParty, tmp_path: Path) -> None:
    stranger = new_credential(tmp_path / "x.cred", "node1", party.key.pins)  # even one that claims a member's name
    with pytest.raises(AuthError, match="does not know this identity"):
        _run(Client(party.addr(0), stranger).__aenter__())
    assert "not a party member's (unknown identity)" in (party.root / "node1.log").read_text()


def test_a_user_can_call_no_node_master_or_admin_request(party: LocalParty, tmp_path: Path) -> None:
    """The admin's credential is a user's too; a plain user (ann) may not even administer."""
    _quiet(party)
    before = [_snapshot(party, i) for i in range(party.n)]
    ann = party.cred("ann")
    become = {"voter": False, "core": [party.addr(0)]}
    fields = {"become": become, "get_task": {"node": party.names[0]}, "heartbeat": {"node": party.names[0]},
              "task_done": {"job": "x", "phase": "map", "index": 0, "attempt": 1, "node": party.names[0]},
              "store_file": {"job": "x", "name": "result"}, "store_input": {"file": "x-0", "size": 1},
              "fetch_range": {"file": "x-0", "start": 0, "end": 1}, "propose": {}, "party_info": {}}
    node_only = [k for k, v in authz.REQUIRED.items() if v in ("node", "master")]
    admin_only = [k for k, v in authz.REQUIRED.items() if v == "admin"]

    async def attempts() -> list[str]:
        refusals = []
        for cred, kinds in ((party.key, node_only), (ann, node_only + admin_only)):
            for i in range(party.n):
                async with Client(party.addr(i), cred) as c:
                    for kind in kinds:
                        with pytest.raises(RemoteError) as err:
                            await c.call(kind, timeout=10.0, **fields.get(kind, {"name": "node2", "id": "x"}))
                        refusals.append(str(err.value))
        return refusals

    refusals = _run(attempts())
    assert refusals and all(r.startswith("forbidden:") for r in refusals), set(refusals)
    assert all(_snapshot(party, i) == before[i] for i in range(party.n))
    assert all(party.alive(i) for i in range(party.n))


def _node_credential(party: LocalParty, i: int) -> Credential:
    """A member node's own identity, used as a client would (what a compromised member holds)."""
    ident = load_node_identity(party.root / party.names[i], party.names[i])
    return Credential(Identity(ident.name, "node", ident.key_pem, ident.cert_pem), set(party.key.pins))


def test_a_member_cannot_report_anothers_task_or_become_master(party: LocalParty) -> None:
    st = _run(party.status(0))
    leader = party.names.index(st["leader"])
    other = next(i for i in range(party.n) if i != leader)
    third = next(i for i in range(party.n) if i not in (leader, other))
    _quiet(party)
    before = _snapshot(party, third)

    async def go() -> None:
        async with Client(party.addr(leader), _node_credential(party, other)) as c:
            reply = await c.call("task_done", job="nope", phase="map", index=0, attempt=1, node=party.names[third],
                                 stats={})
            assert reply["accepted"] is False
        async with Client(party.addr(third), _node_credential(party, other)) as c:  # not the master: no `become`
            with pytest.raises(RemoteError, match="forbidden"):
                await c.call("become", voter=False, core=[party.addr(other)])

    _run(go())
    assert _snapshot(party, third) == before  # journal, dump and seat intact
    assert _run(party.status(third))["raft"]["commit_idx"] == before[2]


def test_a_dialer_refuses_a_member_that_is_not_the_one_it_expected(party: LocalParty) -> None:
    node2 = load_node_identity(party.root / "node2", "node2")
    with pytest.raises(AuthError, match="not the one expected"):
        _run(dial(party.addr(0), party.key.identity, node2.fp))  # node1 answers at that address


def _invite(party: LocalParty, name: str, **extra: Any) -> str:
    async def go() -> str:
        async with Client(party.addr(0), party.key) as c:
            return str((await c.call("invite", name=name, **extra))["token"])

    return _run(go())


async def _redeem(token: str, cert: str) -> dict[str, Any]:
    t = parse_token(token)
    conn = await dial(t.addrs[0], None, set(t.pins))
    try:
        frame = await conn.request({"t": "join", "secret": t.secret, "cert": cert}, timeout=20.0)
        return dict(msgpack.unpackb(frame.payload))
    finally:
        conn.close()


def test_tokens_work_once_and_can_be_withdrawn(party: LocalParty, tmp_path: Path) -> None:
    token = _invite(party, "carol", user=True)
    first = new_credential(tmp_path / "a.cred", "carol", party.key.pins)
    assert "known" in _run(_redeem(token, first.identity.cert_pem))
    second = new_credential(tmp_path / "b.cred", "carol", party.key.pins)
    with pytest.raises(RemoteError, match="never made, is used already or was withdrawn"):
        _run(_redeem(token, second.identity.cert_pem))
    with pytest.raises(AuthError):  # the second key never became anyone
        _run(Client(party.addr(1), second).__aenter__())

    async def whoami() -> dict[str, Any]:
        async with Client(party.addr(1), first) as c:
            return await c.whoami()

    assert _run(whoami())["name"] == "carol"

    withdrawn = _invite(party, "dave", user=True)

    async def withdraw() -> None:
        async with Client(party.addr(0), party.key) as c:
            await c.call("withdraw", name="dave")

    _run(withdraw())
    with pytest.raises(RemoteError, match="withdrawn"):
        _run(_redeem(withdrawn, second.identity.cert_pem))

    with pytest.raises(RemoteError, match="ttl"):  # (expiry itself: tests/test_authority.py, in the state's terms)
        _invite(party, "frank", user=True, ttl=30)


def test_the_old_shared_secret_ways_are_gone() -> None:
    from pdp.net import wire

    assert not hasattr(wire, "DialerHandshake") and not hasattr(wire, "derive")
    import pdp.raft.consensus as consensus

    assert "password" not in consensus.Consensus.__init__.__code__.co_varnames


def test_a_member_node_cannot_forge_identity_changes(party: LocalParty, tmp_path: Path) -> None:
    """What a compromised member relays to the master: admin acts need the admin's signature,
    a join needs the token's secret (the log shows pending invitations' hashes only)."""
    st = _run(party.status(0))
    leader = party.names.index(st["leader"])
    other = next(i for i in range(party.n) if i != leader)
    mallory = new_credential(tmp_path / "m.cred", "mallory", party.key.pins)
    forged = [
        {"op": "token", "name": "mallory", "kind": "user", "token_hash": "0" * 64, "expires": time.time() + 600,
         "by": "admin", "now": time.time()},
        {"op": "revoke", "name": "ann", "now": time.time()},
        {"op": "rekey", "name": "admin", "old_fp": party.key.identity.fp, "fp": mallory.identity.fp,
         "cert": mallory.identity.cert_pem, "now": time.time()},
    ]
    # a signature by someone else (ann is no admin) does not do either
    from pdp.identity import sign

    forged.append({**forged[1], "auth": sign(party.cred("ann").identity, {"t": "uninvite", "name": "ann"})})

    pending = parse_token(_invite(party, "grace", user=True))  # its hash is in every member's log

    async def go() -> list[str]:
        refusals = []
        async with Client(party.addr(leader), _node_credential(party, other)) as c:
            for cmd in forged:
                with pytest.raises(RemoteError) as err:
                    await c._conn().request({"t": "propose"}, msgpack.packb(cmd), timeout=10.0)
                refusals.append(str(err.value))
            frame = await c._conn().request({"t": "propose"}, msgpack.packb(
                {"op": "join", "token_hash": pending.hash,
                 "fp": mallory.identity.fp, "cert": mallory.identity.cert_pem, "now": time.time()}), timeout=10.0)
            assert msgpack.unpackb(frame.payload)["ok"] is False  # the hash alone redeems nothing
        return refusals

    refusals = _run(go())
    assert all("forbidden" in r for r in refusals), refusals
    with pytest.raises(AuthError):
        _run(Client(party.addr(0), mallory).__aenter__())
    ann = _run(Client(party.addr(0), party.cred("ann")).__aenter__())  # ann was not revoked
    ann.conn.close()  # type: ignore[union-attr]


def test_rekey_gives_a_new_key_and_the_old_one_stops_working(party: LocalParty) -> None:
    from pdp.setup import rekey_identity

    bob = party.cred("bob")
    old = bob.identity
    message = _run(rekey_identity(party.addr(1), bob, None))
    assert "new id" in message
    fresh = party.cred("bob")  # the file now holds the new key
    assert fresh.identity.fp != old.fp

    async def whoami(cred: Credential) -> dict[str, Any]:
        async with Client(party.addr(2), cred) as c:
            return await c.whoami()

    assert _run(whoami(fresh))["name"] == "bob"
    with pytest.raises(AuthError):
        _run(whoami(Credential(old, set(party.key.pins))))
