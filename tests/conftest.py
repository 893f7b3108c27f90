"""Shared fixtures: the corpus beside the repo, and a real 3-node local party."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from pdp.local import LocalParty

CORPUS = Path(__file__).resolve().parents[2] / "shared" / "corpus"


@pytest.fixture(scope="session")
def corpus() -> list[Path]:
    files = sorted(CORPUS.glob("*.txt"))
    if not files:
        pytest.skip(f"no corpus at {CORPUS}")
    return files


@pytest.fixture(scope="module")
def party(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalParty]:
    """Three real `pdp node` processes on 127.0.0.1, ready (one leader, every member beating)."""
    p = LocalParty(tmp_path_factory.mktemp("party"), n=3, cpus=1)
    p.start()
    try:
        asyncio.run(p.wait_ready(60.0))
        yield p
    finally:
        p.stop()
