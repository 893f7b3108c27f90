"""Setting a machine up: founding a party, joining one with a token, replacing a key.

The commands behind ``pdp party init``, ``pdp join`` and ``pdp rekey``; each returns the
lines to print. Founding writes, per founding node, its identity (``node.pem``), its party
file and a settings file; and the admin's credential. Joining makes the identity, reaches
the party over TLS pinned to the token's fingerprints (no certificate of our own yet: an
anonymous connection that may only redeem the token), spends the token once, and writes
what the party answered (the core, the identities to trust).
"""

from __future__ import annotations

import asyncio
import getpass
import socket
import sys
from pathlib import Path
from typing import Any

import msgpack

from pdp.config import DEFAULT_PORT, default_config_file, default_data_dir
from pdp.errors import ConfigError, PdpError
from pdp.identity import (Credential, Identity, default_credential_path, load_node_identity, new_identity,
                          node_identity_path, parse_token, sign, write_private, Token)
from pdp.partyfile import FILE, PartyFile, found
from pdp.net.transport import ConnectionLost, dial

_TEMPLATE = """\
# pdp node settings: `pdp node --config THIS_FILE`; flags override them.
# Every key is documented in configs/node.example.toml of the pdp repository.
[node]
name = "{name}"
listen = "{listen}"
advertise = "{advertise}"
data_dir = "{data_dir}"
# peers = ["192.168.1.21:7700"]     # members to ask where the core is (the party file remembers it too)
# cpus = 2                          # task slots this node gives the party (default: all cores)
# chunk_mb = 8.0                    # map chunk size for jobs submitted through this node
# reduces = 0                       # reduce tasks per job; 0 = one per task slot, at most 16
# heartbeat = 0.5                   # seconds between heartbeats to the master
# dead_after = 2.5                  # a member silent this long is lost (same on every member)
# stall_after = 30.0                # a task without progress this long runs again
# max_failures = 10                 # a task failing this often fails its job
# backup_tasks = true               # a straggler near a phase's end gets a backup copy on a faster member
#
# The owner's limits (change them and run `kill -HUP PID` or `pdp reload`: no restart needed)
# memory = "2G"                     # per task; a task needing more fails here and runs elsewhere (0 = no limit)
# disk = "20G"                      # most the spool may use; above it the node takes no work (0 = no limit)
# nice = 10                         # niceness of task processes, 0-19
# hours = ["mon-fri 18:00-08:00", "weekends"]  # when the node takes work (default: always)
# max_load = 0.5                    # pause while the owner's own programs use more than this share of the CPUs
# pause_on_battery = true           # pause while a laptop runs on battery
# on_pause = "finish"               # or "hand_back": give running tasks back at once when pausing
"""


def _advertise(listen: str, advertise: str | None) -> str:
    if advertise:
        return advertise
    host, _, port = listen.rpartition(":")
    return f"{'127.0.0.1' if host in ('0.0.0.0', '', '::') else host}:{port or DEFAULT_PORT}"


def _write_config(path: Path, name: str, listen: str, advertise: str, data_dir: Path, force: bool) -> None:
    if path.exists() and not force:
        raise ConfigError(f"{path} exists; pass --force to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    write_private(path, _TEMPLATE.format(name=name, listen=listen, advertise=advertise, data_dir=data_dir.resolve()))


def found_party(root: Path | None, name: str | None, listen: str, advertise: str | None, admin: str | None,
                nodes: list[str], cred_path: Path | None, force: bool) -> list[str]:
    """``pdp party init``: one node here (or several local ones with ``--node``) and an admin."""
    admin = admin or getpass.getuser()
    specs = [_node_spec(n) for n in nodes] or [(name or socket.gethostname(), listen)]
    founding: list[tuple[Identity, Path, str]] = []
    lines = []
    for node_name, node_listen in specs:
        data_dir = (root / node_name) if root else default_data_dir()
        if node_identity_path(data_dir).exists() and not force:
            raise ConfigError(f"{node_identity_path(data_dir)} exists; this machine has a node already "
                              "(--force makes a new identity)")
        if force:
            node_identity_path(data_dir).unlink(missing_ok=True)
        ident = load_node_identity(data_dir, node_name)
        addr = _advertise(node_listen, advertise if not nodes else None)
        founding.append((ident, data_dir, addr))
        conf = (root / f"{node_name}.toml") if root else default_config_file()
        _write_config(conf, node_name, node_listen, addr, data_dir, force)
        lines.append(f"node {node_name} at {addr}: id {ident.display}; start it with `pdp node --config {conf}`")
    cred = found(founding, admin, (root / "admin.cred") if root and cred_path is None else cred_path, force)
    lines.append(f"admin {admin}: id {cred.identity.display}; credential {cred.path} (mode 0600, keep it private)")
    lines.append("invite more members with `pdp invite NAME` (users: `pdp invite NAME --user`)")
    return lines


def _node_spec(text: str) -> tuple[str, str]:
    name, sep, addr = text.partition("=")
    if not sep or not name or ":" not in addr:
        raise ConfigError(f"--node {text!r}: expected NAME=HOST:PORT")
    return name, addr


async def join_party(token_text: str, data_dir: Path | None, listen: str, advertise: str | None,
                     config: Path | None, cred_path: Path | None, force: bool, discover: bool = False) -> list[str]:
    """``pdp join TOKEN``: make this machine's identity and register it with the party
    (with ``discover``, at the addresses its pinned members announce on the LAN first)."""
    token = parse_token(token_text)
    if discover:
        token = await _with_discovered(token)
    if token.kind == "user":
        path = cred_path or default_credential_path()
        if path.exists() and not force:
            raise ConfigError(f"{path} already exists; pass --force to replace it (or --key-file elsewhere)")
        cred = Credential(new_identity(token.name, "user"), set(token.pins), path)
        answer = await _redeem(token, cred.identity)  # saved only once the party took it
        cred.learn({fp: str(r.get("addr") or "") for fp, r in answer["known"].items() if r["kind"] == "node"})
        cred.save()
        return [f"joined as user {token.name}: id {cred.identity.display}; credential {cred.path}",
                "submit with `pdp submit wordcount FILE --node HOST:PORT`"]
    data_dir = data_dir or default_data_dir()
    if (data_dir / FILE).exists() and not force:
        raise ConfigError(f"{data_dir} belongs to a party already (--force replaces it)")
    node_identity_path(data_dir).unlink(missing_ok=True)
    ident = load_node_identity(data_dir, token.name)
    answer = await _redeem(token, ident)
    PartyFile(data_dir / FILE, False, list(answer["core"]), dict(answer["known"])).save()
    conf = config or default_config_file()
    addr = _advertise(listen, advertise)
    _write_config(conf, token.name, listen, addr, data_dir, force=True)
    start = "pdp node" + ("" if config is None else f" --config {conf}")
    return [f"joined as node {token.name}: id {ident.display}", f"settings in {conf}; start it with `{start}`"]


async def _with_discovered(token: Token, seconds: float = 3.0) -> Token:
    """``token`` with the LAN addresses of its pinned members put before its own (an
    announcement of any other fingerprint is ignored; a forged one fails the pin check)."""
    from dataclasses import replace

    from pdp.net.discovery import browse

    found = await browse(seconds, set(token.pins))
    addrs = [a for f in found for a in f.addrs]
    if not addrs:
        print(f"pdp: none of the party's members announced itself on the LAN within {seconds:g} s; "
              "trying the token's addresses", file=sys.stderr)
    return replace(token, addrs=tuple(dict.fromkeys([*addrs, *token.addrs])))


async def _redeem(token: Token, ident: Identity) -> dict[str, Any]:
    """Spend ``token`` for ``ident``'s certificate at the first of its addresses that answers."""
    errors = []
    for addr in token.addrs:
        try:
            conn = await dial(addr, None, set(token.pins))
        except (ConnectionLost, PdpError, OSError) as exc:
            errors.append(f"{addr}: {exc}")
            continue
        try:
            frame = await conn.request({"t": "join", "secret": token.secret, "cert": ident.cert_pem}, timeout=30.0)
            return dict(msgpack.unpackb(frame.payload))
        finally:
            conn.close()
    raise PdpError("could not reach the party to join: " + "; ".join(errors))


async def rekey_identity(addr: str, cred: Credential, data_dir: Path | None) -> str:
    """``pdp rekey``: a new key for the user (or for the node with ``data_dir``). The new key
    is written beside the old one first (``.new``) and moved into place once the party
    answers to it: a lost reply never leaves the identity locked out."""
    if data_dir is None:
        assert cred.path is not None
        fresh = new_identity(cred.name, "user")
        pending = cred.path.with_name(cred.path.name + ".new")
        Credential(fresh, cred.pins, pending, cred.addrs).save()
        old = cred.identity.display
        await _ask_rekey(addr, cred.identity, cred.pins, fresh)
        pending.replace(cred.path)
        return f"user {cred.name}: new id {fresh.display} (the old id {old} no longer works)"
    old_ident = load_node_identity(data_dir, "", create=False)
    fresh = new_identity(old_ident.name or "node", "node")
    path = node_identity_path(data_dir)
    pending = path.with_name(path.name + ".new")
    write_private(pending, fresh.key_pem + fresh.cert_pem)
    await _ask_rekey(addr, old_ident, cred.pins, fresh)
    pending.replace(path)
    return f"node at {data_dir}: new id {fresh.display}; restart it (`pdp node`) to use it"


async def _ask_rekey(addr: str, old: Identity, pins: set[str], fresh: Identity) -> None:
    """Ask for the new key; the party closes the old key's connections as it commits, so the
    reply may never come: then the new key itself shows whether it took."""
    conn = await dial(addr, old, pins)
    try:
        await conn.request({"t": "rekey", "cert": fresh.cert_pem, "auth": sign(old, {"t": "rekey", "cert_fp":
                                                                                       fresh.fp})}, timeout=30.0)
        return
    except ConnectionLost:
        pass
    finally:
        conn.close()
    for _ in range(20):
        try:
            check = await dial(addr, fresh, pins)
            check.close()
            return
        except (PdpError, OSError):
            await asyncio.sleep(0.25)
    raise PdpError("the party did not take the new key (it was kept in a .new file beside the old one); "
                   "try `pdp rekey` again")
