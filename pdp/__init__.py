"""pdp — Party Distributed Processing: a few ordinary machines become one MapReduce party."""

__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    """``pdp.Client`` (the Python API: connect, submit, progress, wait, result, cancel),
    imported on first use so that task processes importing ``pdp`` stay light."""
    if name == "Client":
        from pdp.client import Client

        return Client
    raise AttributeError(f"module 'pdp' has no attribute {name!r}")
