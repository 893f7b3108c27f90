"""The README's demo commands, run as a user would: `pdp demo` and `pdp demo --chaos`."""

from __future__ import annotations

import subprocess
import sys


def demo(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pdp", "demo", *args], capture_output=True, text=True, timeout=240,
                          env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"})


def test_demo_counts_the_sample_exactly() -> None:
    res = demo()
    assert res.returncode == 0, res.stdout + res.stderr
    assert "identical to the sequential oracle" in res.stdout, res.stdout


def test_chaos_demo_kills_a_member_and_the_leader_and_the_result_stays_exact() -> None:
    res = demo("--chaos")
    assert res.returncode == 0, res.stdout + res.stderr
    out = res.stdout
    assert "killed member" in out and "killed the leader" in out, out
    killed_leader = out.split("killed the leader ")[1].split()[0]
    new_leader = out.split("new leader: ")[1].split()[0]
    assert new_leader != killed_leader, out  # Raft elected another
    assert out.count("lost: its tasks") == 2 and "task(s) ran again" in out, out
    assert "result identical to the sequential oracle" in out, out
