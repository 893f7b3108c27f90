"""Network partitions: a member is cut off the LAN mid-job (its link goes down, peers see
silence, not resets); the majority finishes the job exact and once; after healing the party
agrees on one leader and no applied Raft entry was ever replaced. Packet loss: every node drops
a few per cent of the packets reaching it from the LAN; the job is still exact and once, and
nobody is declared lost for it.

Every node and every client (the ``pdp`` CLI, the submitting script) runs in its own network
namespace on a private bridge (``tests/netns.py``); the root namespace blackholes the test
subnet. Needs root and iproute2: the module is skipped otherwise (the loss test also needs
iptables with the ``statistic`` match, and skips saying why without it).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from pdp.identity import load_node_identity
from pdp.jobs.builtin.wordcount import oracle
from pdp.partyfile import found

from netns import LossUnavailable, NetnsUnavailable, VirtualLan, check_available, loss_backend

try:
    check_available()
except NetnsUnavailable as exc:
    pytest.skip(f"partition tests need network namespaces: {exc}", allow_module_level=True)

PY = sys.executable
NODES = ["n1", "n2", "n3"]
PORT = 7700
SETTINGS = {"heartbeat": 0.5, "dead_after": 2.0, "stall_after": 20.0}
LOSS = 0.03  # the share of packets each node drops on arrival from the LAN
# pdp/node/master.py's warnings when a member is declared lost / a task's lease runs out
DECLARED_LOST = re.compile(r"member (\S+) lost \((.*?)\): its tasks run elsewhere")
RUNS_AGAIN = re.compile(r"job \S+: (map|reduce) \d+ runs again \(((lost|stalled) on \S+|member \S+ lost)")

CLIENT = """\
import asyncio, json, sys
from pathlib import Path
from pdp.client import run_job
from pdp.identity import load_credential

addrs, key_file, job_id, out, result = sys.argv[1].split(","), Path(sys.argv[2]), sys.argv[3], Path(sys.argv[4]), Path(sys.argv[5])
inputs = [Path(p) for p in sys.argv[6:]]
summary, head = asyncio.run(run_job(addrs, load_credential(key_file), "chaos", inputs, job_id, out,
                                    chunk_size=131072, reduces=4))
result.write_text(json.dumps({"summary": summary, "head": head}))
"""


def wait_for(probe: Callable[[], Any], timeout: float, what: str) -> Any:
    """Poll ``probe`` until it returns something truthy (and return that); fail naming ``what``."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        last = probe()
        if last:
            return last
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.1)


class NetParty:
    """Three ``pdp node`` processes in namespaces n1..n3; the CLI runs in namespace c."""

    def __init__(self, lan: VirtualLan, root: Path) -> None:
        self.lan = lan
        self.root = root
        self.key_file = root / "admin.cred"
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.env = {**os.environ, "PDP_KEY_FILE": str(self.key_file)}

    def addr(self, i: int) -> str:
        return f"{self.lan.addr(NODES[i])}:{PORT}"

    def log(self, i: int) -> Path:
        return self.root / f"{NODES[i]}.log"

    def start(self) -> None:
        found([(load_node_identity(self.root / n, n), self.root / n, self.addr(i)) for i, n in enumerate(NODES)],
              "admin", self.key_file)
        conf = self.root / "node.toml"
        conf.write_text("[node]\n" + "".join(f"{k} = {v!r}\n" for k, v in SETTINGS.items()))
        env = {**os.environ, "PDP_TEST_KINDS": "1", "PDP_CHAOS": "sleep=0.2"}
        for i, name in enumerate(NODES):
            argv = [PY, "-m", "pdp", "node", "--name", name, "--listen", self.addr(i),
                    *[a for j in range(len(NODES)) if j != i for a in ("--peer", self.addr(j))],
                    "--data-dir", str(self.root / name), "--cpus", "1",
                    "--config", str(conf)]
            self.procs[name] = self.lan.spawn(name, argv, log=self.log(i), env=env)

    def check_alive(self) -> None:
        for i, name in enumerate(NODES):
            code = self.procs[name].poll()
            if code is not None:
                raise AssertionError(f"{name} exited with {code}:\n{self.log(i).read_text(errors='replace')[-3000:]}")

    # -- the CLI, from namespace c ----------------------------------------------------------

    def cli(self, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen(self.lan.command("c", [PY, "-m", "pdp", *args]), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True, env=self.env)

    @staticmethod
    def _json(proc: subprocess.Popen[str], timeout: float = 25.0) -> Any:
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            return None
        if proc.returncode != 0:
            return None
        return json.loads(out)

    def statuses(self, among: list[int] | None = None) -> list[dict[str, Any] | None]:
        """``pdp status --json`` of every node (None where it did not answer), in parallel."""
        procs = [self.cli("status", "--json", "--node", self.addr(i)) for i in among or range(len(NODES))]
        return [self._json(p) for p in procs]

    def jobs(self, i: int) -> list[dict[str, Any]] | None:
        return self._json(self.cli("jobs", "--json", "--node", self.addr(i)))

    def agreed(self) -> tuple[int, list[dict[str, Any]]] | None:
        """(leader index, statuses) when every node names the same leader, exactly one says
        it is the leader (that one), and every node sees all three members beating."""
        self.check_alive()
        views = [v for v in self.statuses() if v is not None]
        if len(views) != len(NODES):
            return None
        leaders = {v["leader"] for v in views}
        if len(leaders) != 1 or None in leaders:
            return None
        [name] = leaders
        if [v["node"] for v in views if v["is_leader"]] != [name]:
            return None
        if not all(len(v["members"]) == len(NODES) and all(m["heartbeat_age"] is not None for m in v["members"])
                   for v in views):
            return None
        return NODES.index(name), views


@pytest.fixture
def net(tmp_path: Path) -> Iterator[NetParty]:
    lan = VirtualLan()
    try:
        lan.build({**{name: i + 2 for i, name in enumerate(NODES)}, "c": 100})
        party = NetParty(lan, tmp_path)
        party.start()
        wait_for(party.agreed, 30, "a ready party (one leader, every member beating)")
        yield party
    finally:
        lan.close()


def job_in(listing: list[dict[str, Any]] | None, job_id: str) -> list[dict[str, Any]]:
    return [j for j in listing or [] if j["id"] == job_id]


def partition_mid_job(net: NetParty, corpus: list[Path], tmp_path: Path, victim_is_leader: bool) -> None:
    leader, _ = wait_for(net.agreed, 20, "an agreed leader")
    gateway, other = [i for i in range(len(NODES)) if i != leader]
    victim = leader if victim_is_leader else other
    job_id = "partition-leader" if victim_is_leader else "partition-follower"
    out, result = tmp_path / "out.tsv", tmp_path / "client.json"
    script = tmp_path / "client.py"
    script.write_text(CLIENT)
    addrs = ",".join(net.addr(i) for i in (gateway, leader, other))  # a follower first
    client = net.lan.spawn("c", [PY, str(script), addrs, str(net.key_file), job_id, str(out), str(result),
                                 *map(str, corpus)], log=tmp_path / "client.log", env=net.env)

    def maps_under_way() -> dict[str, Any] | None:
        assert client.poll() is None, (tmp_path / "client.log").read_text()
        listed = job_in(net.jobs(gateway), job_id)
        return listed[0] if listed and listed[0]["maps_done"] >= 3 else None

    before = wait_for(maps_under_way, 20, "a few maps done")
    assert before["state"] == "mapping" and before["maps"] >= 20, before
    net.lan.cut(NODES[victim])
    cut_at = time.monotonic()

    try:
        client.wait(45)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"the job did not finish within 45 s of the partition; logs in {tmp_path}") from None
    assert client.returncode == 0, (tmp_path / "client.log").read_text()[-3000:]
    finished_in = time.monotonic() - cut_at
    summary = json.loads(result.read_text())["summary"]
    assert out.read_bytes() == oracle([str(p) for p in corpus])
    assert sum(summary["done_on"].values()) == summary["maps"] + summary["reduces"]
    # the job finished through the majority, whose leader is not the cut-off member
    majority = [i for i in range(len(NODES)) if i != victim]
    for view in net.statuses(majority):
        assert view is not None and view["leader"] not in (None, NODES[victim]), view
    assert [j["state"] for j in job_in(net.jobs(gateway), job_id)] == ["done"]

    net.lan.heal(NODES[victim])
    healed_at = time.monotonic()

    def healed() -> Any:
        agreed = net.agreed()
        if agreed is None:
            return None
        listings = [net.jobs(i) for i in range(len(NODES))]
        if not all(job_in(listing, job_id) and job_in(listing, job_id)[0]["state"] == "done" for listing in listings):
            return None
        return agreed, listings

    (new_leader, views), listings = wait_for(healed, 20, "one leader agreed by all three after healing")
    agreed_in = time.monotonic() - healed_at
    for v in views:
        assert int(v["raft"]["diverged"]) == 0, (v["node"], v["raft"])
    assert sum(v["is_leader"] for v in views) == 1
    for listing in listings:
        assert [j["state"] for j in job_in(listing, job_id)] == ["done"]
    log = net.log(victim).read_text(errors="replace")
    at = log.find("Traceback")
    assert at < 0, f"{NODES[victim]}.log has a Traceback:\n{log[max(0, log.rfind(chr(10), 0, at - 200)):at + 2000]}"
    print(f"{job_id}: cut {NODES[victim]} ({'leader' if victim_is_leader else 'follower'}) after "
          f"{before['maps_done']}/{before['maps']} maps; done {finished_in:.1f} s later; "
          f"healed, agreed in {agreed_in:.1f} s; leader {NODES[leader]} -> {NODES[new_leader]} (term {views[0]['term']}); "
          f"reruns {summary.get('reruns')}")


def test_leader_partitioned_mid_job(net: NetParty, corpus: list[Path], tmp_path: Path) -> None:
    partition_mid_job(net, corpus, tmp_path, victim_is_leader=True)


def test_minority_follower_partitioned_mid_job(net: NetParty, corpus: list[Path], tmp_path: Path) -> None:
    partition_mid_job(net, corpus, tmp_path, victim_is_leader=False)


@pytest.fixture(scope="session")
def iptables() -> str:
    """The iptables binary that can drop packets inside a namespace, or a skip saying why."""
    try:
        return loss_backend()
    except LossUnavailable as exc:
        pytest.skip(f"packet-loss test: {exc}")


def loss_verdicts(net: NetParty) -> dict[str, list[str]]:
    """Every node log's "member X lost" and "runs again (lost/stalled on X)" lines."""
    found: dict[str, list[str]] = {"declared lost": [], "runs again": []}
    for i in range(len(NODES)):
        for line in net.log(i).read_text(errors="replace").splitlines():
            if DECLARED_LOST.search(line):
                found["declared lost"].append(f"{NODES[i]}: {line.strip()}")
            elif RUNS_AGAIN.search(line):
                found["runs again"].append(f"{NODES[i]}: {line.strip()}")
    return found


def test_job_is_exact_under_packet_loss(iptables: str, net: NetParty, corpus: list[Path], tmp_path: Path) -> None:
    """3 % of the packets reaching each node are dropped for a whole job: TCP (and TLS over it)
    retransmits, heartbeats arrive late but well within ``dead_after``. The output is the
    oracle's, every task counted once, one leader, no divergence, nobody declared lost."""
    leader, _ = wait_for(net.agreed, 20, "an agreed leader")
    try:
        backends = {net.lan.lossy(name, LOSS) for name in NODES}
    except LossUnavailable as exc:
        pytest.skip(f"packet-loss test: {exc}")
    lossy_at = time.monotonic()
    gateway = next(i for i in range(len(NODES)) if i != leader)
    job_id = "packet-loss"
    out, result, client_log = tmp_path / "out.tsv", tmp_path / "client.json", tmp_path / "client.log"
    script = tmp_path / "client.py"
    script.write_text(CLIENT)
    addrs = ",".join(net.addr(i) for i in [gateway, *(j for j in range(len(NODES)) if j != gateway)])
    client = net.lan.spawn("c", [PY, str(script), addrs, str(net.key_file), job_id, str(out), str(result),
                                 *map(str, corpus)], log=client_log, env=net.env)
    try:
        client.wait(45)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"the job did not finish within 45 s under {LOSS:.0%} loss; logs in {tmp_path}") from None
    finished_in = time.monotonic() - lossy_at
    assert client.returncode == 0, client_log.read_text(errors="replace")[-3000:]
    summary = json.loads(result.read_text())["summary"]
    assert out.read_bytes() == oracle([str(p) for p in corpus])
    assert sum(summary["done_on"].values()) == summary["maps"] + summary["reduces"], summary

    # still lossy: the party agrees on one leader, every member beating, every copy of the log says done
    def settled() -> Any:
        agreed = net.agreed()
        if agreed is None:
            return None
        procs = [net.cli("jobs", "--json", "--node", net.addr(i)) for i in range(len(NODES))]  # in parallel
        listings = [net._json(p) for p in procs]
        if not all([j["state"] for j in job_in(listing, job_id)] == ["done"] for listing in listings):
            return None
        return agreed

    settled_at = time.monotonic()
    new_leader, views = wait_for(settled, 20, f"one leader agreed by all three under {LOSS:.0%} loss")
    settled_in = time.monotonic() - settled_at
    for v in views:
        assert int(v["raft"]["diverged"]) == 0, (v["node"], v["raft"])
    assert sum(v["is_leader"] for v in views) == 1
    stats = {name: net.lan.loss_stats(name) for name in NODES}
    for name in NODES:
        net.lan.clear_loss(name)

    verdicts = loss_verdicts(net)
    reruns = summary.get("reruns") or {}
    print(f"{job_id}: {LOSS:.0%} loss on {', '.join(NODES)} ({'/'.join(sorted(backends))}); "
          f"{summary['maps']} maps + {summary['reduces']} reduces done {finished_in:.1f} s after the loss began; "
          f"agreed {settled_in:.1f} s later; leader {NODES[leader]} -> {NODES[new_leader]} (term {views[0]['term']}); "
          f"dropped {', '.join(f'{n} {d}/{r}' for n, (d, r) in stats.items())} packets; "
          f"declared lost {len(verdicts['declared lost'])}, leases run out {len(verdicts['runs again'])}, "
          f"reruns {reruns}")
    for line in verdicts["declared lost"] + verdicts["runs again"]:
        print("   ", line)
    # the rule really dropped packets, at about the rate asked for
    dropped, received = map(sum, zip(*stats.values()))
    assert dropped > 0 and dropped <= 3 * LOSS * received + 20, stats
    # a few per cent of loss costs TCP retransmits (~0.2-1 s), never a 2 s silence in practice
    assert len(verdicts["declared lost"]) <= 1, verdicts
    assert len(verdicts["runs again"]) <= 2, verdicts
    for i in range(len(NODES)):
        log = net.log(i).read_text(errors="replace")
        at = log.find("Traceback")
        assert at < 0, f"{NODES[i]}.log has a Traceback:\n{log[max(0, at - 200):at + 2000]}"
