"""A private virtual LAN in Linux network namespaces, for partition tests.

One namespace holds a Linux bridge; every member namespace (the nodes and the client) gets a
veth pair whose inner end is ``eth0`` with ``10.231.X.H/24`` and whose outer end is a port of
that bridge. The namespaces have no default route: they can reach the test subnet and nothing
else. Before anything is created, the root namespace gets a blackhole route for the subnet so
that no process outside the namespaces can send to it either.

Cutting a member off = ``ip link set eth0 down`` in its namespace (TCP peers see silence, not
resets); healing = up again.

Packet loss = :meth:`VirtualLan.lossy`: one rule in that member namespace's INPUT chain,
``iptables -A INPUT -i eth0 -m statistic --mode random --probability P -j DROP``, so each packet
arriving from the LAN (from any other namespace; the member's own loopback is spared) is dropped
with probability P; :meth:`VirtualLan.clear_loss` deletes it again (the rule also dies with the
namespace). ``tc netem`` is not in this kernel, hence iptables' ``statistic`` match. Inside a
namespace Debian's ``iptables`` may be the nf_tables backend; the first of ``iptables`` and
``iptables-legacy`` that can add (and then find) such a rule in a throwaway namespace is used
(:func:`loss_backend`); if neither can, :class:`LossUnavailable` says why.

Everything is torn down in :meth:`VirtualLan.close`: processes by PID (those started through
:meth:`VirtualLan.spawn` and any still left inside the namespaces), each namespace, the route.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import IO, Any

IP = shutil.which("ip")
IPTABLES = ("iptables", "iptables-legacy")  # tried in this order


class NetnsUnavailable(Exception):
    """This machine cannot host the namespaces (not root, no iproute2, no netns support)."""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    assert IP is not None
    proc = subprocess.run([IP, *args], capture_output=True, text=True, timeout=30)
    if check and proc.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def check_available() -> None:
    """Raise NetnsUnavailable with the reason unless we can create namespaces here."""
    if os.geteuid() != 0:
        raise NetnsUnavailable("network namespaces need root")
    if IP is None:
        raise NetnsUnavailable("`ip` (iproute2) is not installed")
    probe = f"pdpt-{os.getpid()}-probe{random.randrange(1 << 30):x}"
    proc = _ip("netns", "add", probe, check=False)
    if proc.returncode != 0:
        raise NetnsUnavailable(f"`ip netns add` failed: {proc.stderr.strip()}")
    _ip("netns", "del", probe, check=False)


class LossUnavailable(NetnsUnavailable):
    """Packet loss cannot be emulated here (no iptables, or no backend that works in a netns)."""


def _loss_rule(probability: float) -> list[str]:
    if not 0.0 < probability < 1.0:
        raise ValueError(f"loss probability must be in (0, 1), not {probability!r}")
    return ["INPUT", "-i", "eth0", "-m", "statistic", "--mode", "random", "--probability", f"{probability:.4f}",
            "-j", "DROP"]


def _iptables_in(ns: str, binary: str, *args: str) -> subprocess.CompletedProcess[str]:
    assert IP is not None
    return subprocess.run([IP, "netns", "exec", ns, binary, "-w", "5", *args], capture_output=True, text=True,
                          timeout=30, stdin=subprocess.DEVNULL)


def _try_backend(ns: str, binary: str, rule: list[str]) -> str:
    """Add ``rule`` with ``binary`` inside ``ns`` and check it is there: "" when it worked, else why not."""
    if shutil.which(binary) is None:
        return f"{binary}: not installed"
    try:
        added = _iptables_in(ns, binary, "-A", *rule)
        if added.returncode != 0:
            return f"{binary} -A: {added.stderr.strip() or added.returncode}"
        found = _iptables_in(ns, binary, "-C", *rule)
        if found.returncode != 0:
            _iptables_in(ns, binary, "-D", *rule)
            return f"{binary} -C (rule added but not found): {found.stderr.strip() or found.returncode}"
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{binary}: {exc}"
    return ""


_backend: str | None = None


def loss_backend() -> str:
    """The iptables binary whose ``statistic`` DROP rules work inside a namespace here (probed
    once, in a throwaway namespace with no links but ``lo``); LossUnavailable with every reason."""
    global _backend
    if _backend is not None:
        return _backend
    check_available()
    probe = f"pdpt-{os.getpid()}-probe{random.randrange(1 << 30):x}"
    _ip("netns", "add", probe)
    why: list[str] = []
    try:
        for binary in IPTABLES:
            reason = _try_backend(probe, binary, _loss_rule(0.03))
            if not reason:
                _backend = binary
                return binary
            why.append(reason)
    finally:
        _ip("netns", "del", probe, check=False)
    raise LossUnavailable("no iptables backend can add a `statistic` DROP rule inside a network namespace ("
                          + "; ".join(why) + "); install iptables (apt-get install iptables)")


class VirtualLan:
    """A bridge namespace plus member namespaces on 10.231.X.0/24 (X random, 1..250)."""

    def __init__(self) -> None:
        check_available()
        self.prefix = f"pdpt-{os.getpid()}-{random.randrange(1 << 24):06x}-"
        self.subnet_id: int | None = None
        self.route: str | None = None
        self.namespaces: list[str] = []
        self.members: dict[str, tuple[str, str]] = {}  # short name -> (namespace, ip)
        self.loss: dict[str, tuple[str, list[str], int]] = {}  # name -> (iptables binary, DROP rule, rx then)
        self.procs: list[subprocess.Popen[Any]] = []
        self.bridge_ns = self.prefix + "br"
        self._reserve_subnet()

    # -- set-up -------------------------------------------------------------------------

    def _reserve_subnet(self) -> None:
        """Pick X and add the root-namespace blackhole route first (a taken X is skipped)."""
        for x in random.sample(range(1, 251), 250):
            route = f"10.231.{x}.0/24"
            if _ip("route", "add", "blackhole", route, check=False).returncode == 0:
                self.subnet_id, self.route = x, route
                return
        raise RuntimeError("no free 10.231.X.0/24 test subnet (every blackhole route exists)")

    def ip(self, host: int) -> str:
        assert self.subnet_id is not None
        return f"10.231.{self.subnet_id}.{host}"

    def _add_ns(self, ns: str) -> None:
        _ip("netns", "add", ns)
        self.namespaces.append(ns)
        _ip("-n", ns, "link", "set", "lo", "up")

    def build(self, members: dict[str, int]) -> VirtualLan:
        """``members``: short name -> host number in the subnet (e.g. {"n1": 2, "c": 100})."""
        self._add_ns(self.bridge_ns)
        _ip("-n", self.bridge_ns, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.bridge_ns, "link", "set", "br0", "up")
        for k, (name, host) in enumerate(members.items()):
            ns = self.prefix + name
            self._add_ns(ns)
            port = f"p{k}"
            # created inside the member namespace, the outer end moved straight into the bridge one
            _ip("-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", port, "netns", self.bridge_ns)
            _ip("-n", self.bridge_ns, "link", "set", port, "master", "br0")
            _ip("-n", self.bridge_ns, "link", "set", port, "up")
            _ip("-n", ns, "addr", "add", f"{self.ip(host)}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            self.members[name] = (ns, self.ip(host))
        return self

    def ns(self, name: str) -> str:
        return self.members[name][0]

    def addr(self, name: str) -> str:
        return self.members[name][1]

    # -- faults -------------------------------------------------------------------------

    def cut(self, name: str) -> None:
        subprocess.run([IP or "ip", "netns", "exec", self.ns(name), IP or "ip", "link", "set", "eth0", "down"],
                       check=True, timeout=30)

    def heal(self, name: str) -> None:
        ns, ip = self.members[name]
        subprocess.run([IP or "ip", "netns", "exec", ns, IP or "ip", "link", "set", "eth0", "up"],
                       check=True, timeout=30)
        # the address stays through down/up and the kernel re-adds its prefix route; make sure
        if f"{ip}/24" not in _ip("-n", ns, "addr", "show", "dev", "eth0").stdout:
            _ip("-n", ns, "addr", "add", f"{ip}/24", "dev", "eth0")
        assert self.route is not None
        if self.route.split("/")[0] not in _ip("-n", ns, "route", "show").stdout:
            _ip("-n", ns, "route", "add", self.route, "dev", "eth0", "src", ip)

    def lossy(self, name: str, probability: float) -> str:
        """Drop each packet reaching member ``name`` from the LAN with ``probability`` (a
        ``statistic`` DROP rule on its INPUT chain, replacing an earlier one); returns the
        iptables binary used. LossUnavailable when no backend works in that namespace."""
        rule = _loss_rule(probability)
        self.clear_loss(name)
        ns = self.ns(name)
        first = loss_backend()
        why: list[str] = []
        for binary in [first, *(b for b in IPTABLES if b != first)]:
            reason = _try_backend(ns, binary, rule)
            if not reason:
                self.loss[name] = (binary, rule, self._rx_packets(name))
                return binary
            why.append(reason)
        raise LossUnavailable(f"cannot add a DROP rule in {ns}: " + "; ".join(why))

    def clear_loss(self, name: str) -> None:
        """Remove the loss rule :meth:`lossy` put on member ``name`` (nothing if there is none)."""
        entry = self.loss.pop(name, None)
        if entry is None:
            return
        binary, rule, _ = entry
        done = _iptables_in(self.ns(name), binary, "-D", *rule)
        if done.returncode != 0:
            raise RuntimeError(f"{binary} -D {' '.join(rule)} in {self.ns(name)}: {done.stderr.strip()}")

    def _rx_packets(self, name: str) -> int:
        link = _ip("-n", self.ns(name), "-s", "-j", "link", "show", "dev", "eth0").stdout
        return int(json.loads(link)[0]["stats64"]["rx"]["packets"])

    def loss_stats(self, name: str) -> tuple[int, int]:
        """(packets the loss rule dropped, packets that reached ``eth0``) for member ``name``,
        both since :meth:`lossy` installed the rule."""
        binary, _, rx_then = self.loss[name]
        listing = _iptables_in(self.ns(name), binary, "-L", "INPUT", "-v", "-x", "-n")
        dropped = 0
        for line in listing.stdout.splitlines():
            fields = line.split()
            if "DROP" in fields and "statistic" in fields and fields[0].isdigit():
                dropped += int(fields[0])
        return dropped, self._rx_packets(name) - rx_then

    # -- processes ----------------------------------------------------------------------

    def command(self, name: str, argv: list[str]) -> list[str]:
        assert IP is not None
        return [IP, "netns", "exec", self.ns(name), *argv]

    def spawn(self, name: str, argv: list[str], log: Path | None = None, env: dict[str, str] | None = None,
              stdout: IO[bytes] | int | None = None) -> subprocess.Popen[bytes]:
        """Start ``argv`` inside member ``name``'s namespace (``ip netns exec`` execs: same PID)."""
        out: Any = stdout if stdout is not None else subprocess.DEVNULL
        handle = None
        if log is not None:
            handle = open(log, "ab")
            out = handle
        try:
            proc = subprocess.Popen(self.command(name, argv), stdout=out,
                                    stderr=subprocess.STDOUT if log is not None else None,
                                    stdin=subprocess.DEVNULL, env=env)
        finally:
            if handle is not None:
                handle.close()
        self.procs.append(proc)
        return proc

    def run(self, name: str, argv: list[str], env: dict[str, str] | None = None,
            timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` inside member ``name``'s namespace to completion; output captured."""
        return subprocess.run(self.command(name, argv), capture_output=True, text=True, env=env,
                              timeout=timeout, stdin=subprocess.DEVNULL)

    # -- teardown -----------------------------------------------------------------------

    def _pids_in(self, ns: str) -> list[int]:
        proc = _ip("netns", "pids", ns, check=False)
        return [int(p) for p in proc.stdout.split() if p.strip().isdigit()]

    def close(self) -> None:
        errors: list[str] = []
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 5.0
        for proc in self.procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        # anything still inside our namespaces was started by us (e.g. pool workers): by PID
        for ns in self.namespaces:
            for _ in range(50):
                pids = self._pids_in(ns)
                if not pids:
                    break
                for pid in pids:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                time.sleep(0.1)
        for ns in reversed(self.namespaces):
            done = _ip("netns", "del", ns, check=False)
            if done.returncode != 0:
                errors.append(f"netns del {ns}: {done.stderr.strip()}")
        self.namespaces.clear()
        self.loss.clear()  # the rules went with their namespaces
        if self.route is not None:
            done = _ip("route", "del", "blackhole", self.route, check=False)
            if done.returncode != 0:
                errors.append(f"route del blackhole {self.route}: {done.stderr.strip()}")
            self.route = None
        if errors:
            raise RuntimeError("; ".join(errors))

    def __enter__(self) -> VirtualLan:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
