"""Who may make which request: every request type names the kind of peer it serves.

The peer is who its certificate proves it is (:class:`pdp.net.transport.Peer`), looked up in
the replicated list of identities; nothing a peer writes in a header changes it.

* ``anonymous``: no certificate; may only redeem a join token.
* ``user``: submit, watch, fetch and cancel its own jobs, see the party.
* ``admin``: a user who may also invite, revoke, change the core, make members leave or
  reload, and cancel any job.
* ``node``: a member node (data plane, heartbeats, tasks, forwarded proposals, Raft).
* ``master``: a member node that is the master of the current term.

A request type missing from :data:`REQUIRED` is refused: new handlers must say who may call them.
"""

from __future__ import annotations

from pdp.net.transport import Forbidden, Peer

REQUIRED: dict[str, str] = {
    # anyone holding a join token (no identity yet)
    "join": "anonymous",
    # users
    "submit": "user", "wait": "user", "result": "user", "status": "user", "jobs": "user", "job": "user", "events": "user",
    "cancel": "user", "whoami": "user",
    # admins
    "invite": "admin", "invites": "admin", "withdraw": "admin", "uninvite": "admin", "core": "admin",
    "leave": "admin", "reload": "admin",
    # any identity, about itself
    "rekey": "identified",
    # member nodes
    "party_info": "node", "fetch_range": "node", "fetch_file": "node", "fetch_parts": "node",
    "store_file": "node", "store_input": "node", "get_task": "node", "task_done": "node", "tasks_done": "node",
    "task_failed": "node", "heartbeat": "node", "unreachable": "node", "live": "node", "propose": "node",
    "core_change": "node",
    # the master of the current term only
    "become": "master",
}


def allowed(peer: Peer, required: str, is_master: bool) -> bool:
    if required == "anonymous":
        return True  # a join handler checks the token itself
    if required == "identified":
        return peer.kind in ("node", "user")
    if required in ("user", "admin"):
        return peer.kind == "user" and (required == "user" or peer.admin)
    if required == "node":
        return peer.kind == "node"
    if required == "master":
        return peer.kind == "node" and is_master
    return False


def check(peer: Peer, kind: str, is_master: bool) -> None:
    """Raise Forbidden unless ``peer`` may make a request of type ``kind``."""
    required = REQUIRED.get(kind)
    if required is None:
        raise Forbidden(f"request type {kind!r} is not served")
    if not allowed(peer, required, is_master):
        what = {"anonymous": "anyone", "identified": "a member or user", "user": "a user of the party", "admin": "an admin of the party",
                "node": "a member node", "master": "the master of the current term"}[required]
        raise Forbidden(f"forbidden: {kind!r} is for {what}; you are {peer.label}")
