"""Shared fixtures: the corpus beside the repo, a real 3-node local party, and a factory of
parties running the test-only `chaos` job kind with short leases."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from pdp.local import LocalParty

CORPUS = Path(__file__).resolve().parents[2] / "shared" / "corpus"


@pytest.fixture(scope="session")
def corpus() -> list[Path]:
    files = sorted(CORPUS.glob("*.txt"))
    if not files:
        pytest.skip(f"no corpus at {CORPUS}")
    return files


@contextlib.contextmanager
def ready_party(root: Path, **kwargs: Any) -> Iterator[LocalParty]:
    """A started LocalParty, ready (one leader, every member beating); stopped afterwards,
    also when it never got ready. For module-scoped party fixtures."""
    p = LocalParty(root, **kwargs)
    p.start()
    try:
        asyncio.run(p.wait_ready(60.0))
        yield p
    finally:
        p.stop()


@pytest.fixture(scope="module")
def party(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalParty]:
    """Three real `pdp node` processes on 127.0.0.1, ready."""
    with ready_party(tmp_path_factory.mktemp("party"), n=3, cpus=1, users=("ann", "bob")) as p:
        yield p


FAST = {"heartbeat": 0.5, "dead_after": 2.0, "stall_after": 20.0}


@pytest.fixture
def make_party(tmp_path: Path) -> Iterator[Callable[..., LocalParty]]:
    parties: list[LocalParty] = []

    def make(chaos: str = "sleep=0.15", n: int = 3, cpus: int = 1,
             node_settings: dict[int, dict[str, Any]] | None = None, **settings: Any) -> LocalParty:
        party = LocalParty(tmp_path / f"party{len(parties)}", n=n, cpus=cpus,
                           env={"PDP_TEST_KINDS": "1", "PDP_CHAOS": chaos}, settings={**FAST, **settings},
                           node_settings=node_settings, users=("ann", "bob"))
        parties.append(party)
        party.start()
        asyncio.run(party.wait_ready(60))
        return party

    yield make
    for party in parties:
        for i in range(party.n):
            party.signal(i, signal.SIGCONT)
        party.stop()
