"""Telling systemd how the node is doing: sd_notify(3) without libsystemd.

Under a ``Type=notify`` unit systemd passes ``$NOTIFY_SOCKET``, an AF_UNIX datagram socket
(a path, or an abstract name written with a leading ``@``); each message is a datagram of
``KEY=VALUE`` lines. The node sends ``READY=1`` once it has joined the party, ``STOPPING=1``
when it shuts down, ``STATUS=...`` for ``systemctl status``, and ``WATCHDOG=1`` at half the
``WatchdogSec=`` interval systemd passes in ``$WATCHDOG_USEC`` while its event loop runs, so
a hung loop gets the node restarted. While it has not joined yet (its party may be out of
reach) it sends ``EXTEND_TIMEOUT_USEC=`` instead, so a live node waiting for its peers is
not killed by ``TimeoutStartSec=``, but a hung one is.

Everything here is a no-op when ``$NOTIFY_SOCKET`` is unset (a node started by hand, by
launchd or by the tests), and a failed send is logged, never raised: the node's work never
depends on its service manager listening.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket

log = logging.getLogger("pdp.node.sdnotify")

PING_WITHOUT_WATCHDOG = 10.0  # seconds between "still starting" messages when no watchdog is set
SEND_TIMEOUT = 1.0  # a service manager that does not drain its socket cannot stall the node longer
_warned = False


def _address() -> str | None:
    """The socket address from ``$NOTIFY_SOCKET`` (abstract names with a NUL), or None."""
    addr = os.environ.get("NOTIFY_SOCKET", "")
    if not addr:
        return None
    if addr.startswith("@"):
        return "\0" + addr[1:]
    if addr.startswith("/"):
        return addr
    _warn_once(f"NOTIFY_SOCKET={addr!r} is neither a path nor an abstract socket name; not notifying")
    return None


def notify(*fields: str) -> bool:
    """Send one datagram of ``KEY=VALUE`` lines; True if it went out (False also when unset)."""
    addr = _address()
    if addr is None:
        return False
    data = "\n".join(fields).encode("utf-8")
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.settimeout(SEND_TIMEOUT)
            sock.sendto(data, addr)
    except OSError as exc:
        _warn_once(f"cannot notify the service manager at {os.environ.get('NOTIFY_SOCKET')}: {exc}")
        return False
    return True


def _warn_once(message: str) -> None:
    global _warned
    if not _warned:
        _warned = True
        log.warning("%s", message)
    else:
        log.debug("%s", message)


def _line(text: str) -> str:
    return " ".join(text.split())  # one line: a newline would start another field


def ready(text: str = "") -> bool:
    """The node is up: it has joined the party (``systemctl start`` returns now)."""
    return notify("READY=1", *([f"STATUS={_line(text)}"] if text else []))


def stopping(text: str = "") -> bool:
    """The node is shutting down (systemd shows "deactivating" instead of a failure)."""
    return notify("STOPPING=1", *([f"STATUS={_line(text)}"] if text else []))


def status(text: str) -> bool:
    """A one-line status for ``systemctl status``."""
    return notify(f"STATUS={_line(text)}")


def watchdog() -> bool:
    """The event loop is alive: reset systemd's ``WatchdogSec=`` timer."""
    return notify("WATCHDOG=1")


def extend_timeout(seconds: float) -> bool:
    """Still starting and alive: give the start (or stop) another ``seconds``."""
    return notify(f"EXTEND_TIMEOUT_USEC={int(seconds * 1_000_000)}")


def watchdog_interval() -> float | None:
    """Seconds between watchdog pings (half of ``$WATCHDOG_USEC``), or None if no watchdog
    is set for this process (``$WATCHDOG_PID``, when set, must be ours: sd_watchdog_enabled(3))."""
    pid = os.environ.get("WATCHDOG_PID", "")
    if pid and pid != str(os.getpid()):
        return None
    try:
        usec = int(os.environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    return usec / 2 / 1_000_000 if usec > 0 else None


async def keep_alive(joined: asyncio.Event) -> None:
    """Ping the service manager while the event loop runs: ``EXTEND_TIMEOUT_USEC`` until
    ``joined`` has been set once, ``WATCHDOG=1`` after. Returns at once without ``$NOTIFY_SOCKET``."""
    if _address() is None:
        return
    every = watchdog_interval() or PING_WITHOUT_WATCHDOG
    has_joined = False
    status("joining the party")
    while True:
        has_joined = has_joined or joined.is_set()
        if has_joined:
            watchdog()
        else:
            extend_timeout(3 * every)
        await asyncio.sleep(every)
