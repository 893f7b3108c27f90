"""pdp — Party Distributed Processing: a few ordinary machines become one MapReduce party."""

__version__ = "0.1.0"
