"""What each role may use of its node: the narrow services the composition root hands it.

A role is typed against one of these protocols, not against :class:`pdp.node.root.Node`, so
what it depends on is written down in one place, mypy checks that the node provides it (the
root passes itself), and a test can hand a role a small fake instead of a whole node. Each
protocol lists only what its role reads or calls today; widening one is a design decision
to make here, visibly.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from pdp.config import NodeConfig
    from pdp.net.transport import Peers, Stream
    from pdp.node.spool import Spool
    from pdp.partyfile import PartyFile
    from pdp.raft.consensus import Consensus


class Changes(Protocol):
    """Wakes waiters when the replicated state changed (or after ``timeout``); ``seen``
    counts the changes, so a waiter passing ``since=seen`` noted earlier misses none."""

    seen: int

    async def wait(self, timeout: float, since: int | None = None) -> None: ...


class Base(Protocol):
    """What every role has: its own name and settings, connections to peers, the spool."""

    name: str
    config: NodeConfig
    peers: Peers
    spool: Spool

    async def run_in_pool(self, fn: Any, *args: Any) -> Any:
        """Run ``fn(*args)`` in a task process, under the owner's limits."""

    async def push_file(self, addr: str, header: dict[str, Any], path: Path, timeout: float = 30.0) -> int:
        """Store ``path`` on the member at ``addr``; the bytes sent."""


class Replicated(Base, Protocol):
    """A role that reads the replicated state and proposes commands to it."""

    consensus: Consensus | None

    @property
    def changes(self) -> Changes: ...

    async def propose(self, cmd: dict[str, Any], timeout: float = 5.0) -> dict[str, Any]:
        """Commit ``cmd`` through Raft (at the master if this node does not lead)."""

    def member_addr(self, name: str) -> str:
        """The data address of member ``name``."""


class MasterServices(Replicated, Protocol):
    """The master: the log, the members' addresses, files to fetch and replicate, the party
    file (its founding identities)."""

    party: PartyFile

    async def fetch_file(self, addr: str, job_id: str, name: str, dest: Path, timeout: float = 30.0) -> int:
        """Fetch a stored file of ``job_id`` from the member at ``addr`` into ``dest``."""


class WorkerServices(Base, Protocol):
    """A worker: where the master is, the task pool, a job's code, map outputs to fetch."""

    registered: asyncio.Event
    pool: ProcessPoolExecutor | None

    def master_addr(self) -> tuple[str, str] | None:
        """(name, data address) of the current master, or None while there is none."""

    async def restart_pool(self, broken: ProcessPoolExecutor | None) -> None:
        """Replace a task pool that broke (a task process died)."""

    async def job_code(self, job_id: str, code: dict[str, Any] | None = None) -> Path:
        """The unpacked folder of a code job's bundle, fetched once per node."""

    async def fetch_parts(self, addr: str, job_id: str, maps: list[int], r: int, dest: Path,
                          timeout: float = 30.0) -> list[int]:
        """Partition ``r`` of these maps' outputs from ``addr``; the maps it did not hold."""


class MasterView(Protocol):
    """The gateway's read-only view of the master role on its own node."""

    def is_master(self) -> bool: ...

    def live_view(self) -> dict[str, Any]: ...


class Leaving(Protocol):
    leaving: bool


class GatewayServices(Replicated, Protocol):
    """The client-facing side: identities, the master's view, leaving the party."""

    voter: bool
    stopping: asyncio.Event

    @property
    def master(self) -> MasterView: ...

    @property
    def worker(self) -> Leaving: ...

    def identities(self) -> dict[str, dict[str, Any]]:
        """The party's identity records by fingerprint, from the replicated state."""

    def whoami(self, stream: Stream) -> dict[str, Any]:
        """Who the peer of ``stream`` provably is."""

    def master_addr(self) -> tuple[str, str] | None: ...

    def spool_full(self, adding: int) -> str:
        """Why storing ``adding`` more bytes would break the owner's disk limit, or ""."""
