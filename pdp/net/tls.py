"""TLS 1.3 contexts built from pdp identities, with both ends pinned by fingerprint.

Every pdp connection is mutual TLS 1.3 from the standard library's ``ssl`` (forward-secret
ECDHE, the whole handshake bound, both certificates proven by their keys):

* The **listener** asks for a client certificate (``CERT_OPTIONAL``) and trusts exactly the
  certificates of the party's identities (self-signed, loaded as the trust store). A
  certificate it does not know fails the handshake; a dialer with *no* certificate gets an
  anonymous connection that may only redeem a join token. The trust store is rebuilt when
  the replicated list of identities changes; a listener's base context swaps the current
  one in for each new connection (``sni_callback``), so the listening socket stays.
* The **dialer** does not use a CA at all: after the handshake it compares the listener's
  certificate fingerprint with the one it expected (``check_pin``). TLS 1.3 has already
  checked the listener's signature with that certificate's key.
"""

from __future__ import annotations

import logging
import os
import ssl
import tempfile
import time
from collections.abc import Callable, Iterable

from pdp.errors import AuthError
from pdp.identity import Identity, display_id, fingerprint

SNI = "pdp"
log = logging.getLogger("pdp.net.tls")


def _load_chain(ctx: ssl.SSLContext, ident: Identity) -> None:
    """ssl wants files: write key and certificate to a private temp file, load, delete."""
    with tempfile.TemporaryDirectory(prefix="pdp-tls-") as tmp:
        path = os.path.join(tmp, "chain.pem")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(ident.key_pem + ident.cert_pem)
        ctx.load_cert_chain(path)


def _base(purpose: int) -> ssl.SSLContext:
    ctx = ssl.SSLContext(purpose)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.options |= ssl.OP_NO_TICKET  # no session resumption: every connection proves its certificate
    return ctx


def server_context(ident: Identity, trusted_pems: Iterable[str]) -> ssl.SSLContext:
    """A listener's context: its own certificate, trusting exactly ``trusted_pems``."""
    ctx = _base(ssl.PROTOCOL_TLS_SERVER)
    _load_chain(ctx, ident)
    ctx.verify_mode = ssl.CERT_OPTIONAL
    pems = "".join(sorted(set(trusted_pems)))
    if pems:
        ctx.load_verify_locations(cadata=pems)
    return ctx


_ALERTS = {42: "a bad certificate", 48: "a certificate that is not a party member's (unknown identity)",
           46: "an unsupported certificate", 43: "an unsupported certificate", 45: "an expired certificate",
           70: "an old protocol version (pdp speaks TLS 1.3 only)", 40: "a failed handshake",
           116: "no certificate where one is required"}


def listening_context(ident: Identity, current: Callable[[], ssl.SSLContext],
                      watch: HandshakeWatch | None = None) -> ssl.SSLContext:
    """The context the listening socket keeps: each handshake switches to ``current()``."""
    base = server_context(ident, [])

    def pick(sslobj: ssl.SSLObject, _name: str | None, _ctx: ssl.SSLContext) -> None:
        ctx = current()
        if watch is not None:
            watch.started(ctx)
        sslobj.context = ctx

    base.sni_callback = pick  # type: ignore[assignment]
    return base


class HandshakeWatch:
    """Says in the log why the listener refused a handshake (asyncio reports failed server
    handshakes only in debug mode): while handshakes are in flight, OpenSSL's message hook
    shows the fatal alert the listener sends. The hook runs for every TLS record (it cost a
    third of the throughput), so it is only installed while a handshake is under way;
    connections are long-lived and pooled."""

    STALE = 15.0  # a handshake that neither finished nor failed this long is forgotten

    def __init__(self) -> None:
        self.pending = 0
        self.deadline = 0.0
        self.hooked: list[ssl.SSLContext] = []

    def started(self, ctx: ssl.SSLContext) -> None:
        now = time.monotonic()
        if now > self.deadline:
            self.pending = 0
        self.pending += 1
        self.deadline = now + self.STALE
        if ctx not in self.hooked:
            ctx._msg_callback = self._on_message  # type: ignore[attr-defined]
            self.hooked.append(ctx)

    def finished(self) -> None:
        """A handshake completed (the connection reached the application) or failed."""
        self.pending -= 1
        if self.pending <= 0:
            self.pending = 0
            for ctx in self.hooked:
                ctx._msg_callback = None  # type: ignore[attr-defined]
            self.hooked.clear()

    def _on_message(self, _conn: object, direction: str, _version: object, content_type: object, _msg: object,
                    data: bytes) -> None:
        alert = ssl._TLSContentType.ALERT  # type: ignore[attr-defined]
        if direction == "write" and content_type == alert and len(data) == 2 and data[0] == 2:
            log.warning("refused a TLS connection: the dialer presented %s",
                        _ALERTS.get(data[1], f"alert {data[1]}"))
            self.finished()


def client_context(ident: Identity | None) -> ssl.SSLContext:
    """A dialer's context: presents ``ident`` (None: anonymous, to redeem a join token);
    the listener is checked afterwards by :func:`check_pin`."""
    ctx = _base(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # pinned by fingerprint after the handshake instead of a CA
    if ident is not None:
        _load_chain(ctx, ident)
    return ctx


def peer_fingerprint(sslobj: ssl.SSLObject | None) -> str | None:
    """The fingerprint of the certificate the other end proved, or None if it sent none."""
    if sslobj is None:
        return None
    der = sslobj.getpeercert(binary_form=True)
    return fingerprint(der) if der else None


def check_pin(addr: str, got: str | None, expected: str | Iterable[str]) -> str:
    """Refuse a listener whose certificate is not the one expected (a redirected or
    impersonated connection); returns its fingerprint."""
    allowed = {expected} if isinstance(expected, str) else set(expected)
    if got is None or got not in allowed:
        raise PinMismatch(addr, got, allowed)
    return got


class PinMismatch(AuthError):
    """The listener proved a certificate other than the one(s) expected."""

    def __init__(self, addr: str, got: str | None, allowed: set[str]) -> None:
        want = display_id(next(iter(allowed))) if len(allowed) == 1 else f"one of {len(allowed)} party members"
        super().__init__(f"the node at {addr} is not the one expected: its id is "
                         f"{display_id(got) if got else 'missing'}, expected {want} (a wrong address, or someone "
                         "else is answering there)")
        self.got = got
