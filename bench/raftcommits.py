"""Raft commits per second of a 3-node pysyncobj group on loopback: plain vs durable journals.

    python bench/raftcommits.py [--seconds 5] [--runs 3] [--inflight 64] [--size 100] [--batch]

Each run starts three node processes (this script with ``--node``) on 127.0.0.1, each a
``SyncObj`` with a journal and a dump file in a fresh directory, pysyncobj's own
``TCPTransport`` with a password (for this measurement only; pdp carries Raft over its own
transport) and pdp's Raft settings (unbatched appends unless ``--batch``). The leader
keeps ``--inflight`` commands of ``--size`` bytes in flight for ``--seconds`` and counts
the commits. *plain*: pysyncobj's journal as it is (nothing fsynced). *durable*: the
journal wrapped by :func:`pdp.raft.durable.make_durable` and flushed (msync + fsync) before
every message a node sends, i.e. before every vote and every acknowledgement. Plain and
durable runs alternate in the same process tree; the ratio durable/plain is the result.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from pysyncobj import SyncObj, SyncObjConf, SyncObjConsumer, replicated
from pysyncobj.transport import TCPTransport

from pdp.local import free_ports


PASSWORD = "bench-raftcommits"


class FlushingTCPTransport(TCPTransport):
    """pysyncobj's TCP transport calling ``before_send`` (a journal flush) before every message."""

    before_send: Any = None

    def send(self, node: Any, message: Any) -> bool:
        hook = self.before_send
        if hook is not None:
            hook()
        return bool(super().send(node, message))


class Counter(SyncObjConsumer):
    def __init__(self) -> None:
        super().__init__()
        self.n = 0

    @replicated
    def add(self, payload: bytes) -> int:
        self.n += 1
        return self.n


# -- one node (a subprocess) ----------------------------------------------------------------


def make_node(i: int, ports: list[int], mode: str, root: Path, batch: bool) -> tuple[SyncObj, Counter, Any]:
    addrs = [f"127.0.0.1:{p}" for p in ports]
    conf = SyncObjConf(password=PASSWORD, journalFile=str(root / f"n{i}.journal"),
                       fullDumpFile=str(root / f"n{i}.dump"), appendEntriesUseBatch=batch,
                       appendEntriesPeriod=0.05, raftMinTimeout=0.4, raftMaxTimeout=0.9,
                       leaderFallbackTimeout=1.5, connectionTimeout=2.0, connectionRetryTime=0.5)
    counter = Counter()
    sync = SyncObj(addrs[i], [a for k, a in enumerate(addrs) if k != i], conf, consumers=[counter],
                   transportClass=FlushingTCPTransport)
    journal = None
    if mode == "durable":
        from pdp.raft.durable import install_durable_dumps, make_durable

        install_durable_dumps()
        journal = make_durable(sync._SyncObj__raftLog, dump_file=conf.fullDumpFile)
        sync._SyncObj__raftLog = journal
        sync._SyncObj__transport.before_send = journal.flush
    return sync, counter, journal


def drive(sync: SyncObj, counter: Counter, seconds: float, inflight: int, size: int) -> dict[str, Any]:
    """Keep ``inflight`` commands going for ``seconds`` (after a 1 s warm-up); count commits."""
    gate, lock = threading.Semaphore(inflight), threading.Lock()
    done = {"ok": 0, "err": 0}
    counting = threading.Event()
    payload = os.urandom(size)

    def cb(result: Any, err: int) -> None:
        if counting.is_set():
            with lock:
                done["ok" if err == 0 else "err"] += 1
        gate.release()

    warm_until = time.monotonic() + 1.0
    end = warm_until + seconds
    while time.monotonic() < end:
        if not counting.is_set() and time.monotonic() >= warm_until:
            counting.set()
        if gate.acquire(timeout=0.5):
            counter.add(payload, callback=cb)
    counting.clear()
    return {"commits": done["ok"], "errors": done["err"], "seconds": seconds}


class _Truncations(logging.Handler):
    """Counts pysyncobj's "truncating already-applied log entries" (its known late-ack fault,
    which pdp's consensus layer suppresses; harmless here, the entries come back identical)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.count += "truncating already-applied" in str(record.msg)


def node_main(args: argparse.Namespace) -> None:
    truncations = _Truncations()
    pysyncobj_log = logging.getLogger("pysyncobj")
    pysyncobj_log.addHandler(truncations)
    pysyncobj_log.propagate = False
    ports = [int(p) for p in args.ports.split(",")]
    sync, counter, journal = make_node(args.node, ports, args.mode, Path(args.dir), args.batch)
    deadline = time.monotonic() + 30
    while sync._getLeader() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)  # let the leader settle
    if sync._isLeader():
        result = drive(sync, counter, args.seconds, args.inflight, args.size)
        print(json.dumps({"role": "leader", "node": args.node, **result}), flush=True)
    else:
        print(json.dumps({"role": "follower", "node": args.node}), flush=True)
    sys.stdin.read()  # the parent closes stdin when the run is over
    stats = {"node": args.node, "flushes": journal.flushes if journal is not None else 0, "applied": counter.n,
             "truncations": truncations.count}
    print(json.dumps(stats), flush=True)
    sync.destroy()


# -- the parent -------------------------------------------------------------------------------


def one_run(mode: str, args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="pdp-raftbench-") as tmp:
        ports = free_ports(3)
        procs = [subprocess.Popen([sys.executable, __file__, "--node", str(i), "--ports", ",".join(map(str, ports)),
                                   "--mode", mode, "--dir", tmp, "--seconds", str(args.seconds),
                                   "--inflight", str(args.inflight), "--size", str(args.size)]
                                  + (["--batch"] if args.batch else []),
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) for i in range(3)]
        try:
            first = [json.loads(p.stdout.readline() or "{}") for p in procs]  # type: ignore[union-attr]
            for p in procs:
                p.stdin.close()  # type: ignore[union-attr]
            last = [json.loads(p.stdout.readline() or "{}") for p in procs]  # type: ignore[union-attr]
            for p in procs:
                p.wait(10)
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
    leaders = [r for r in first if r.get("role") == "leader"]
    if len(leaders) != 1:
        raise SystemExit(f"{mode}: expected one leader, got {first}")
    lead = leaders[0]
    flushes = sum(int(s.get("flushes", 0)) for s in last)
    applied = max(int(s.get("applied", 0)) for s in last) or 1
    return {"rate": lead["commits"] / lead["seconds"], "errors": lead["errors"], "flushes_per_commit": flushes / applied,
            "truncations": sum(int(s.get("truncations", 0)) for s in last)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--inflight", type=int, default=64)
    ap.add_argument("--size", type=int, default=100, help="bytes per command")
    ap.add_argument("--batch", action="store_true", help="appendEntriesUseBatch=True (pdp runs unbatched)")
    ap.add_argument("--node", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--ports", help=argparse.SUPPRESS)
    ap.add_argument("--mode", choices=("plain", "durable"), help=argparse.SUPPRESS)
    ap.add_argument("--dir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.node is not None:
        node_main(args)
        return
    rates: dict[str, list[float]] = {"plain": [], "durable": []}
    for run in range(args.runs):
        for mode in ("plain", "durable"):
            got = one_run(mode, args)
            rates[mode].append(got["rate"])
            print(f"run {run + 1} {mode:8s} {got['rate']:8.0f} commits/s  (errors {got['errors']}, "
                  f"{got['flushes_per_commit']:.2f} journal flushes per commit over the 3 nodes, "
                  f"{got['truncations']} pysyncobj truncation lines)", flush=True)
    plain, durable = statistics.median(rates["plain"]), statistics.median(rates["durable"])
    print(f"3 nodes, {args.inflight} in flight, {args.size} B commands, "
          f"{'batched' if args.batch else 'unbatched'} appends, median of {args.runs}:")
    print(f"plain journal    {plain:8.0f} commits/s")
    print(f"durable journal  {durable:8.0f} commits/s   ratio durable/plain {durable / plain:.3f}")


if __name__ == "__main__":
    main()
