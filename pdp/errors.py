"""The error types pdp raises; each carries a message that tells the user what to do."""


class PdpError(Exception):
    """Base of every error pdp reports to a user (the CLI turns it into a message and exit 1)."""


class ConfigError(PdpError):
    """A setting is missing or breaks a rule; the message names the rule."""


class InputError(PdpError):
    """A job's input cannot be used (missing file, invalid UTF-8, ...)."""


class ProtocolError(PdpError):
    """A peer sent bytes that break the wire protocol; the connection is dropped."""


class AuthError(PdpError):
    """A peer could not prove it holds the party secret (or we could not prove it to them)."""


class RemoteError(PdpError):
    """A node answered a request with an error."""
