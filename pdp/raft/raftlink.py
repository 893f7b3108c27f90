"""The asyncio side of Raft: pysyncobj's messages over members' authenticated connections.

Implements :class:`pdp.raft.raftnet.Bridge`. Every voter keeps one outbound connection (purpose
``raft``, apart from bulk data so heartbeats never wait behind a 1 MiB frame) to each voter
it wants and sends its messages there; what a voter receives on its *inbound* connections
comes from the voter whose certificate that connection proved. A worker (read-only
follower) dials every voter and says ``follow``: the voter then links ``ro:<name>`` to
that connection and sends its log there.

Only member nodes' connections carry Raft frames; a voter id is resolved from the peer's
proven name (``addr_of``), never from the frame.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import socket
import time
from collections.abc import Callable
from typing import Any

from pdp.errors import AuthError, PdpError
from pdp.net.transport import Connection, Peers

log = logging.getLogger("pdp.raft.raftlink")

REDIAL = 0.5  # seconds between attempts to reach a voter that is down
LINK_TIMEOUT = 3.0  # seconds of silence (data unacknowledged, keepalives unanswered) that close a Raft link
SHUNNED_AFTER = 2.0  # every voter refusing this identity this long: it was revoked


def _fail_fast(conn: Connection) -> None:
    """A Raft link to a peer cut off by the network must close within seconds, not when TCP
    gives up minutes later: otherwise the link looks up, messages vanish into it and, once the
    network heals, elections churn until the idle timeout. Unacknowledged data (and idle
    keepalive probes) fail the connection after LINK_TIMEOUT; it is then redialed."""
    sock = conn.writer.get_extra_info("socket")
    if sock is None:
        return
    with contextlib.suppress(OSError, AttributeError):  # options Linux has (others keep TCP's defaults)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, int(LINK_TIMEOUT))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, int(LINK_TIMEOUT * 1000))


class RaftLink:
    """The bridge. ``addr_of(name)`` gives a member node's Raft id (its data address)."""

    def __init__(self, peers: Peers, addr_of: Callable[[str], str | None], own_name: str, voter: bool) -> None:
        self.loop = asyncio.get_running_loop()
        self.peers, self.addr_of, self.own_name = peers, addr_of, own_name
        self.voter = voter
        self.transport: Any = None
        self.wanted: set[str] = set()
        self.followers: dict[str, Connection] = {}  # "ro:<name>" -> the follower's connection to us
        self._dialing: set[str] = set()
        self._last_try: dict[str, float] = {}
        self._task: asyncio.Task[None] | None = None
        self.refused: dict[str, float] = {}  # voter -> since when it refuses this node's identity
        self.on_shunned: Callable[[str], None] = lambda why: None

    # -- Bridge (pysyncobj's threads) -------------------------------------------------------

    def attach(self, transport: Any) -> None:
        self.transport = transport
        self.loop.call_soon_threadsafe(self._start)

    def detach(self, transport: Any) -> None:
        if self.transport is transport:
            self.transport = None

    def want(self, node_id: str) -> None:
        self.loop.call_soon_threadsafe(self._want, node_id)

    def unwant(self, node_id: str) -> None:
        self.loop.call_soon_threadsafe(self.wanted.discard, node_id)

    def post(self, node_id: str, data: bytes) -> bool:
        if self.loop.is_closed():
            return False
        self.loop.call_soon_threadsafe(self._send, node_id, data)
        return True

    # -- event loop ---------------------------------------------------------------------------

    def _start(self) -> None:
        if self._task is None or self._task.done():
            self._task = self.loop.create_task(self._maintain())
        for node_id, conn in self.followers.items():
            if not conn.closed and self.transport is not None:
                self.transport.link_up(node_id, True)
        for node_id in self.wanted:
            if self.peers.live(node_id, "raft") is not None and self.transport is not None:
                self.transport.link_up(node_id)

    def _want(self, node_id: str) -> None:
        self.wanted.add(node_id)
        self._last_try.pop(node_id, None)
        if self._task is None or self._task.done():
            self._task = self.loop.create_task(self._maintain())

    def _send(self, node_id: str, data: bytes) -> None:
        conn = self.followers.get(node_id) if node_id.startswith("ro:") else self.peers.live(node_id, "raft")
        if conn is not None:
            conn.send_nowait({"t": "raft"}, data)

    async def _maintain(self) -> None:
        """Keep an outbound Raft connection to every wanted voter."""
        while True:
            now = time.monotonic()
            for node_id in list(self.wanted):
                if self.peers.live(node_id, "raft") is None and node_id not in self._dialing \
                        and now - self._last_try.get(node_id, 0.0) >= REDIAL:
                    self._last_try[node_id] = now
                    self._dialing.add(node_id)
                    self.loop.create_task(self._dial(node_id))
            await asyncio.sleep(REDIAL / 2)

    async def _dial(self, node_id: str) -> None:
        try:
            conn = await self.peers.get(node_id, timeout=2.0, purpose="raft")
        except AuthError as exc:
            self._refused_by(node_id, str(exc))
            return
        except (PdpError, OSError) as exc:
            log.debug("raft link to %s: %s", node_id, exc)
            return
        finally:
            self._dialing.discard(node_id)
        self.refused.pop(node_id, None)
        _fail_fast(conn)
        if not self.voter:
            conn.send_nowait({"t": "raft", "follow": True})
        conn.on_close.append(functools.partial(self._down_on_close, node_id))
        if self.transport is not None:
            self.transport.link_up(node_id)

    def _refused_by(self, node_id: str, why: str) -> None:
        """A voter does not know this identity: once every voter has refused it for a while, it
        was revoked (a voter whose log lags a fresh join refuses only briefly)."""
        now = time.monotonic()
        first = self.refused.setdefault(node_id, now)
        log.warning("raft link to %s refused: %s", node_id, why)
        if self.wanted and all(now - self.refused.get(v, now) >= SHUNNED_AFTER for v in self.wanted) \
                and now - first >= SHUNNED_AFTER:
            self.on_shunned(why)

    def _down_on_close(self, node_id: str, _conn: Connection) -> None:
        self._down(node_id)

    def _down(self, node_id: str) -> None:
        if self.transport is not None:
            self.transport.link_down(node_id)

    # -- frames in (Connection.oneway) ---------------------------------------------------------

    def on_frame(self, conn: Connection, header: dict[str, Any], payload: bytes) -> None:
        if header.get("t") != "raft" or conn.who.kind != "node":
            log.warning("dropping %s (%s): a one-way %r frame is for member nodes only", conn.peer, conn.who.label,
                        str(header.get("t"))[:40])
            conn.close()
            return
        transport = self.transport
        if transport is None:
            return
        if conn.handlers is None:  # our own outbound connection: the voter we dialed answers
            transport.deliver(conn.peer, payload)
            return
        if header.get("follow"):
            node_id = f"ro:{conn.who.name}"
            old = self.followers.get(node_id)
            self.followers[node_id] = conn
            if old is not None and old is not conn:
                old.close()
            conn.on_close.append(functools.partial(self._follower_gone, node_id))
            transport.link_up(node_id, True)
            return
        follower = f"ro:{conn.who.name}"
        if self.followers.get(follower) is conn:  # a worker's acknowledgements, on the link it opened
            transport.deliver(follower, payload)
            return
        voter = self.addr_of(conn.who.name)
        if voter is None:
            log.warning("dropped a Raft message from %s: not a known member node", conn.who.label)
            return
        transport.deliver(voter, payload)

    def _follower_gone(self, node_id: str, conn: Connection) -> None:
        if self.followers.get(node_id) is conn:
            del self.followers[node_id]
            if self.transport is not None:
                self.transport.link_down(node_id)

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
