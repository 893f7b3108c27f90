"""Finding party members on the local network: mDNS / DNS-SD (``zeroconf``, ``_pdp._tcp``).

A node run with ``--discover`` (config ``discover = true``) announces one service instance,
``NAME-FP8._pdp._tcp.local.``, whose TXT record holds ``v=1``, its ``name`` and its node
``fp`` (the SHA-256 of its certificate, hex), at the host and port of its advertised
address. :func:`browse` collects such announcements.

Discovery only finds *addresses*. Whoever uses a found address still dials it over mutual
TLS and pins the fingerprint it already expected (from a join token or its party file): a
forged announcement, or one of a stranger's party, costs a failed dial and nothing else.
An announcement is not even believed about its own fingerprint: callers pass the
fingerprints they want and get only those (:func:`browse`'s ``want``).

IPv4 only (``IPVersion.V4Only``): the LANs pdp is for hand out IPv4 leases, and an
IPv6 link-local address needs a scope that a ``HOST:PORT`` cannot carry.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
import socket
import time
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

SERVICE = "_pdp._tcp.local."
VERSION = "1"
_FP = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class Found:
    """One member's announcement: its name, node fingerprint and ``HOST:PORT`` addresses."""

    name: str
    fp: str
    addrs: tuple[str, ...]


def announced_hosts(advertise: str) -> list[str]:
    """The IPv4 addresses to announce for the advertised ``HOST:PORT``: the host itself, or
    what a host name resolves to; never loopback or unspecified (others cannot dial those)."""
    host = advertise.rsplit(":", 1)[0].strip("[]")
    try:
        candidates = [str(ipaddress.ip_address(host))]
    except ValueError:
        try:
            candidates = sorted({str(info[4][0]) for info in socket.getaddrinfo(host, None, socket.AF_INET)})
        except OSError:
            candidates = []
    hosts = []
    for text in candidates:
        ip = ipaddress.ip_address(text)
        if ip.version == 4 and not (ip.is_loopback or ip.is_unspecified or ip.is_multicast):
            hosts.append(text)
    return hosts


def _instance(name: str, fp: str) -> str:
    label = re.sub(r"[^A-Za-z0-9-]", "-", name)[:40] or "node"
    return f"{label}-{fp[:8]}.{SERVICE}"


def _parse(info: Any) -> Found | None:
    """A :class:`Found` from a resolved ``AsyncServiceInfo``; None for anything malformed."""
    props = {(k or b"").decode("utf-8", "replace"): (v or b"").decode("utf-8", "replace")
             for k, v in (info.properties or {}).items()}
    fp, port = props.get("fp", "").lower(), info.port
    if props.get("v") != VERSION or not _FP.fullmatch(fp) or not isinstance(port, int) or not 0 < port < 65536:
        return None
    hosts = [h for h in info.parsed_addresses() if ipaddress.ip_address(h).version == 4]
    if not hosts:
        return None
    return Found(props.get("name", "")[:64], fp, tuple(f"{h}:{port}" for h in hosts))


class Announcer:
    """This node's announcement, from :meth:`start` until :meth:`close`."""

    def __init__(self, name: str, fp: str, advertise: str) -> None:
        self.name, self.fp, self.advertise = name, fp, advertise
        self._zc: Any = None
        self._info: Any = None

    async def start(self) -> bool:
        """Announce; False (with a warning saying why) when there is no address to announce."""
        from zeroconf import IPVersion, ServiceInfo
        from zeroconf.asyncio import AsyncZeroconf

        hosts = announced_hosts(self.advertise)
        if not hosts:
            log.warning("discovery: not announced on the LAN: the advertised address %s is loopback or unknown "
                        "(set advertise = \"LAN-IP:PORT\")", self.advertise)
            return False
        port = int(self.advertise.rsplit(":", 1)[1])
        self._info = ServiceInfo(SERVICE, _instance(self.name, self.fp), port=port,
                                 addresses=[socket.inet_aton(h) for h in hosts],
                                 properties={"v": VERSION, "name": self.name, "fp": self.fp},
                                 server=f"pdp-{self.fp[:16]}.local.")
        self._zc = AsyncZeroconf(ip_version=IPVersion.V4Only)
        # a name taken on the LAN (a forger's, or a stale one of ours) gets a " (2)": the
        # fingerprint in the TXT record, not the instance name, is what browsers match
        await self._zc.async_register_service(self._info, allow_name_change=True)
        log.info("discovery: announced as %s at %s", self._info.name, ", ".join(f"{h}:{port}" for h in hosts))
        return True

    async def close(self) -> None:
        if self._zc is None:
            return
        try:
            await self._zc.async_unregister_service(self._info)
        finally:
            await self._zc.async_close()
            self._zc = None


async def browse(seconds: float, want: set[str] | None = None) -> list[Found]:
    """The members announcing ``_pdp._tcp`` on the LAN within ``seconds``, by name; with
    ``want`` (fingerprints), only those. It listens the whole time, even once every wanted
    fingerprint answered: a forger may announce one first, and the addresses of every
    announcement of a fingerprint are kept (in the order they came) for the dialer to try."""
    from zeroconf import IPVersion, ServiceStateChange
    from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

    zc = AsyncZeroconf(ip_version=IPVersion.V4Only)
    names: asyncio.Queue[str] = asyncio.Queue()
    seen: dict[str, Found] = {}

    def on_change(zeroconf: Any, service_type: str, name: str, state_change: Any) -> None:
        if state_change in (ServiceStateChange.Added, ServiceStateChange.Updated):
            names.put_nowait(name)

    browser = AsyncServiceBrowser(zc.zeroconf, [SERVICE], handlers=[on_change])
    deadline = time.monotonic() + seconds
    try:
        while (left := deadline - time.monotonic()) > 0:
            try:
                name = await asyncio.wait_for(names.get(), left)
            except asyncio.TimeoutError:
                break
            info = AsyncServiceInfo(SERVICE, name)
            if not await info.async_request(zc.zeroconf, int(max(0.2, min(left, 3.0)) * 1000)):
                continue
            found = _parse(info)
            if found is None:
                log.debug("discovery: ignored a malformed announcement %s", name)
            elif want is None or found.fp in want:
                before = seen.get(found.fp)
                addrs = (*before.addrs, *found.addrs) if before else found.addrs
                seen[found.fp] = Found(found.name, found.fp, tuple(dict.fromkeys(addrs)))
    finally:
        await browser.async_cancel()
        await zc.async_close()
    return sorted(seen.values(), key=lambda f: (f.name, f.fp))
