"""The error types pdp raises; each carries a message that tells the user what to do.

Every error also has a stable ``code``: it travels in the ``error`` frame a node answers
with (``{"t": "error", "code", "message"}``) and comes back as :class:`RemoteError`'s
``code``, so callers decide by code (``exc.code in TRANSIENT``), never by message text.
"""

from __future__ import annotations


class PdpError(Exception):
    """Base of every error pdp reports to a user (the CLI turns it into a message and exit 1)."""

    code = "error"


class ConfigError(PdpError):
    """A setting is missing or breaks a rule; the message names the rule."""

    code = "config"


class InputError(PdpError):
    """A job's input cannot be used (missing file, invalid UTF-8, ...)."""

    code = "input"


class ProtocolError(PdpError):
    """A peer sent bytes that break the wire protocol; the connection is dropped."""

    code = "protocol"


class AuthError(PdpError):
    """A peer could not prove who it is (or we could not prove it to them)."""

    code = "auth"


class NotMaster(PdpError):
    """The request needs the master and this node is not (or no longer) it."""

    code = "not_master"


class Unavailable(PdpError):
    """The node could not help now (no master answered, no holder of a file answered); later may work."""

    code = "unavailable"


class RemoteError(PdpError):
    """A node answered a request with an error; ``code`` is the code it sent."""

    def __init__(self, message: str, code: str = "error") -> None:
        super().__init__(message)
        self.code = code


# codes that mean "this member cannot help right now": a client tries again or another member
TRANSIENT = frozenset({"not_master", "no_commit", "connection_lost", "unavailable"})
