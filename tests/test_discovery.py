"""Finding the party on the LAN (``pdp node --discover``, ``pdp join --discover``,
``pdp discover``): mDNS between network namespaces on a private bridge (``tests/netns.py``),
multicast and all. Discovery only finds addresses: a forged announcement of a member's
fingerprint, at a stranger's node, gets the joiner nowhere and spends nothing.

The namespace tests need root and iproute2 and skip without them.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pdp.identity import load_node_identity
from pdp.net.discovery import VERSION, _parse, announced_hosts
from pdp.partyfile import found

from netns import NetnsUnavailable, VirtualLan, check_available

PY = sys.executable
PORT = 7700

ANNOUNCE = """\
import asyncio, sys
from pdp.net.discovery import Announcer
async def main():
    a = Announcer(sys.argv[1], sys.argv[2], sys.argv[3])
    assert await a.start()
    print("announced", flush=True)
    await asyncio.sleep(120)
asyncio.run(main())
"""


# -- pure parts ---------------------------------------------------------------------------------


def test_only_dialable_addresses_are_announced() -> None:
    assert announced_hosts("10.1.2.3:7700") == ["10.1.2.3"]
    assert announced_hosts("127.0.0.1:7700") == []
    assert announced_hosts("0.0.0.0:7700") == []
    assert announced_hosts("localhost:7700") == []
    assert announced_hosts("224.0.0.251:7700") == []


class FakeInfo:
    def __init__(self, props: dict[bytes, bytes | None], port: Any = 7700, addrs: tuple[str, ...] = ("10.0.0.5",)):
        self.properties, self.port, self._addrs = props, port, addrs

    def parsed_addresses(self) -> list[str]:
        return list(self._addrs)


def test_malformed_announcements_are_ignored() -> None:
    fp = "ab" * 32
    good = {b"v": VERSION.encode(), b"name": b"n1", b"fp": fp.encode()}
    parsed = _parse(FakeInfo(good))
    assert parsed is not None and parsed.fp == fp and parsed.addrs == ("10.0.0.5:7700",) and parsed.name == "n1"
    assert _parse(FakeInfo({**good, b"fp": b"abc"})) is None  # not a fingerprint
    assert _parse(FakeInfo({**good, b"v": b"9"})) is None  # a version we do not speak
    assert _parse(FakeInfo({k: v for k, v in good.items() if k != b"fp"})) is None
    assert _parse(FakeInfo(good, port=0)) is None
    assert _parse(FakeInfo(good, addrs=("fe80::1",))) is None  # IPv6 only: nothing dialable as HOST:PORT
    assert _parse(FakeInfo({**good, b"name": None})) is not None  # a missing name is only a missing name


# -- between namespaces ---------------------------------------------------------------------------


@pytest.fixture()
def lan() -> Iterator[VirtualLan]:
    try:
        check_available()
    except NetnsUnavailable as exc:
        pytest.skip(f"discovery tests need network namespaces: {exc}")
    with VirtualLan() as lan:
        yield lan.build({"a": 2, "b": 3, "x": 4})


def _pdp(lan: VirtualLan, where: str, *args: str, env: dict[str, str] | None = None,
         timeout: float = 40.0) -> subprocess.CompletedProcess[str]:
    return lan.run(where, [PY, "-m", "pdp", *args], env=env, timeout=timeout)


def _wait_ready(lan: VirtualLan, addr: str, env: dict[str, str], proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the node exited ({proc.returncode}):\n{log.read_text(errors='replace')[-3000:]}")
        done = _pdp(lan, "b", "status", "--json", "--node", addr, env=env, timeout=15)
        if done.returncode == 0 and json.loads(done.stdout).get("leader"):
            return
        time.sleep(0.3)
    raise AssertionError(f"no leader at {addr}:\n{log.read_text(errors='replace')[-3000:]}")


def _party(lan: VirtualLan, root: Path, host: str, *flags: str) -> tuple[str, str, dict[str, str]]:
    """A one-node party on ``host``'s namespace, started with ``flags``: (address, node fp, env)."""
    addr = f"{lan.addr(host)}:{PORT}"
    ident = load_node_identity(root / "n", "n1")
    key_file = root / "admin.cred"
    found([(ident, root / "n", addr)], "admin", key_file)
    env = {**os.environ, "PDP_KEY_FILE": str(key_file)}
    log = root / "node.log"
    proc = lan.spawn(host, [PY, "-m", "pdp", "node", "--name", "n1", "--listen", addr, "--data-dir",
                            str(root / "n"), "--dashboard", "off", *flags], log=log, env=env)
    _wait_ready(lan, addr, env, proc, log)
    return addr, ident.fp, env


def _stale(token: str, addr: str) -> str:
    """``token`` with its addresses replaced by ``addr`` (where the member no longer is)."""
    body64 = token[len("pdp1-"):]
    body = json.loads(base64.urlsafe_b64decode(body64 + "=" * (-len(body64) % 4)))
    body["a"] = [addr]
    raw = json.dumps(body, separators=(",", ":")).encode()
    return "pdp1-" + base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")


def test_a_member_is_found_and_a_node_joins_at_the_announced_address(lan: VirtualLan, tmp_path: Path) -> None:
    addr, fp, env = _party(lan, tmp_path / "p", "a", "--discover")
    listed = _pdp(lan, "b", "discover", "--json", "--timeout", "2")
    assert listed.returncode == 0, listed.stderr
    rows = json.loads(listed.stdout)
    assert [(r["name"], r["fp"], r["addrs"]) for r in rows] == [("n1", fp, [addr])]

    invite = _pdp(lan, "b", "invite", "n2", "--node", addr, "--json", env=env)
    assert invite.returncode == 0, invite.stderr
    token = _stale(json.loads(invite.stdout)["token"], f"{lan.addr('a')}:7799")  # the member moved
    b_addr, b_dir = f"{lan.addr('b')}:{PORT}", tmp_path / "b"
    conf = tmp_path / "b.toml"
    base = ["join", token, "--data-dir", str(b_dir), "--listen", b_addr, "--config", str(conf)]
    stuck = _pdp(lan, "b", *base)
    assert stuck.returncode == 1 and "could not reach the party" in stuck.stderr, stuck.stderr
    joined = _pdp(lan, "b", *base, "--discover")
    assert joined.returncode == 0, joined.stderr
    assert "joined as node n2" in joined.stdout

    log = tmp_path / "b.log"  # and the new node finds the party by discovery too (no --peer given)
    proc = lan.spawn("b", [PY, "-m", "pdp", "node", "--config", str(conf), "--dashboard", "off", "--discover"],
                     log=log, env=env)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        status = _pdp(lan, "b", "status", "--json", "--node", addr, env=env, timeout=15)
        names = {m["name"] for m in json.loads(status.stdout)["members"]} if status.returncode == 0 else set()
        if names == {"n1", "n2"}:
            break
        assert proc.poll() is None, log.read_text(errors="replace")[-3000:]
        time.sleep(0.3)
    else:
        raise AssertionError(f"n2 never joined: {log.read_text(errors='replace')[-3000:]}")
    assert f"discovery: found 1 member(s) on the LAN: {addr}" in log.read_text()


def test_a_forged_announcement_gets_a_joiner_nowhere(lan: VirtualLan, tmp_path: Path) -> None:
    addr, fp, env = _party(lan, tmp_path / "p", "a")  # the real member does not announce itself
    stranger, _, _ = _party(lan, tmp_path / "s", "x")  # a stranger's party's node
    forger = lan.spawn("x", [PY, "-c", ANNOUNCE, "n1", fp, stranger], stdout=subprocess.PIPE)
    assert forger.stdout is not None and forger.stdout.readline() == b"announced\n"

    invite = _pdp(lan, "b", "invite", "n2", "--user", "--node", addr, "--json", env=env)
    assert invite.returncode == 0, invite.stderr
    token = _stale(json.loads(invite.stdout)["token"], f"{lan.addr('a')}:7799")
    key = tmp_path / "n2.cred"
    refused = _pdp(lan, "b", "join", token, "--key-file", str(key), "--discover")
    assert refused.returncode == 1, refused.stdout
    assert stranger in refused.stderr and "could not reach the party" in refused.stderr
    assert not key.exists()
    listing = _pdp(lan, "b", "invites", "--json", "--node", addr, env=env)
    assert [p["name"] for p in json.loads(listing.stdout)["pending"]] == ["n2"]  # nothing was spent

    real = lan.spawn("a", [PY, "-c", ANNOUNCE, "n1", fp, addr], stdout=subprocess.PIPE)
    assert real.stdout is not None and real.stdout.readline() == b"announced\n"
    joined = _pdp(lan, "b", "join", token, "--key-file", str(key), "--discover")
    assert joined.returncode == 0, joined.stderr
    assert key.exists()
