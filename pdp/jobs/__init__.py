"""Job kinds: each kind is a module with map, reduce, merge and a sequential oracle.

The functions run inside a node's process pool, so they take file paths (never bulk bytes
through a pipe) and return small, msgpack-able dicts of statistics.
"""

from __future__ import annotations

from types import ModuleType

from pdp.errors import PdpError


def job_kind(name: str) -> ModuleType:
    """Return the module implementing job kind ``name`` or raise a PdpError naming the known ones."""
    from pdp.jobs import wordcount

    kinds = {"wordcount": wordcount}
    try:
        return kinds[name]
    except KeyError:
        raise PdpError(f"unknown job kind {name!r}; known kinds: {', '.join(sorted(kinds))}") from None


KINDS = ("wordcount",)
