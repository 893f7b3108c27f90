"""What a node remembers of its party between runs: ``<data_dir>/party.json`` (mode 0600).

Its Raft seat (voter or worker), the core's addresses (Raft ids), and the identities it
knew before its copy of the replicated log could tell it: those of the founding members
(``genesis``: the first master records them as the log's first identities) or those a
``pdp join`` brought back. Once the replicated state lists identities, they are the
truth and this file only says where the core is.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pdp.errors import ConfigError
from pdp.identity import Credential, Identity, new_credential, write_private

FILE = "party.json"


@dataclass
class PartyFile:
    path: Path
    voter: bool
    core: list[str]
    known: dict[str, dict[str, Any]] = field(default_factory=dict)  # fp -> {name, kind, admin, cert, addr}
    genesis: bool = False  # a founding member: its master proposes `known` as the genesis entry

    @classmethod
    def load(cls, data_dir: Path) -> PartyFile:
        path = data_dir / FILE
        try:
            body = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{data_dir} holds no party: found one with `pdp party init`, or join one with "
                              "`pdp join TOKEN` (a token from `pdp invite NAME` on a member)") from None
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read {path}: {exc}") from None
        return cls(path, bool(body["voter"]), [str(a) for a in body["core"]], dict(body.get("known") or {}),
                   bool(body.get("genesis")))

    def save(self) -> None:
        body = {"voter": self.voter, "core": sorted(self.core), "known": self.known, "genesis": self.genesis}
        write_private(self.path, json.dumps(body, indent=1, sort_keys=True) + "\n")

    def genesis_cmd(self, now: float) -> dict[str, Any]:
        """The log's first identities: the founding nodes and users."""
        nodes = [{"name": r["name"], "fp": fp, "cert": r["cert"], "addr": r.get("addr", "")}
                 for fp, r in sorted(self.known.items()) if r["kind"] == "node"]
        users = [{"name": r["name"], "fp": fp, "cert": r["cert"], "admin": bool(r.get("admin"))}
                 for fp, r in sorted(self.known.items()) if r["kind"] == "user"]
        return {"op": "genesis", "nodes": nodes, "users": users, "now": now}


def record(ident: Identity, admin: bool = False, addr: str = "") -> dict[str, Any]:
    return {"name": ident.name, "kind": ident.kind, "admin": admin, "cert": ident.cert_pem, "addr": addr}


def found(nodes: list[tuple[Identity, Path, str]], admin: str, cred_path: Path | None,
          force: bool = False) -> Credential:
    """Found a party: each (node identity, data dir, address) becomes a core voter, and
    ``admin`` its first admin user (a new credential at ``cred_path``)."""
    pins = {ident.fp for ident, _, _ in nodes}
    cred = new_credential(cred_path, admin, pins, force=force, addrs={ident.fp: addr for ident, _, addr in nodes})
    known = {ident.fp: record(ident, addr=addr) for ident, _, addr in nodes}
    known[cred.identity.fp] = record(cred.identity, admin=True)
    for _, data_dir, _ in nodes:
        pf = data_dir / FILE
        if pf.exists() and not force:
            raise ConfigError(f"{pf} exists: that data dir belongs to a party already (--force replaces it)")
        data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        PartyFile(pf, True, sorted(addr for _, _, addr in nodes), known, genesis=True).save()
    return cred
