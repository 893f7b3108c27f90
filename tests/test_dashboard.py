"""The dashboard in headless Chromium (selenium) and /metrics, against a real 3-node party
running a job while a member is killed: the page shows the member dead and the job done, the
metrics agree with what the job did. Screenshots are kept in tests/artifacts/."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from pdp.local import LocalParty
from test_chaos import finish, holder_of_running_task, leader_index, run, submit, wait_until

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
ARTIFACTS = Path(__file__).parent / "artifacts"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return bytes(resp.read())


def metrics(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(get(url + "/metrics").decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def attr(driver: Any, element_id: str, name: str) -> str:
    """An attribute of an element of the live page, read in one script (the page re-renders
    every second, so a found element may be replaced before it is read)."""
    return str(driver.execute_script(
        "const e = document.getElementById(arguments[0]); return e ? e.getAttribute(arguments[1]) : '';",
        element_id, name) or "")


def texts(driver: Any, selector: str) -> list[str]:
    return list(driver.execute_script(
        "return [...document.querySelectorAll(arguments[0])].map(e => e.textContent);", selector))


def browser() -> Any:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-quic", "--window-size=1200,900"):
        opts.add_argument(flag)
    return webdriver.Chrome(service=Service(str(DRIVER)), options=opts)


def test_bad_dashboard_addresses_are_refused_with_a_reason() -> None:
    from pdp.config import dashboard_address, dashboard_is_private
    from pdp.errors import ConfigError

    assert dashboard_address("off") is None and dashboard_address("127.0.0.1:7780") == ("127.0.0.1", 7780)
    assert dashboard_address("[::1]:80") == ("::1", 80) and dashboard_address("0.0.0.0:7780") == ("0.0.0.0", 7780)
    assert dashboard_is_private("127.0.0.1") and dashboard_is_private("::1") and dashboard_is_private("localhost")
    assert not dashboard_is_private("0.0.0.0") and not dashboard_is_private("10.1.2.3")
    for bad in ("7780", "127.0.0.1:99999", ":7780", "host:port"):
        with pytest.raises(ConfigError, match="HOST:PORT"):
            dashboard_address(bad)


def _https(port: int, pem: Path | None, node_fp: str, path: str = "/api/status") -> tuple[int, bytes]:
    """GET over TLS to 127.0.0.1:``port`` with the client certificate ``pem`` (or none),
    checking that the server is the node whose id is ``node_fp`` (its certificate's SHA-256)."""
    import hashlib
    import http.client
    import ssl

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE  # self-signed: pinned by hand below
    if pem is not None:
        ctx.load_cert_chain(str(pem))
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=10)
    try:
        conn.connect()
        der = conn.sock.getpeercert(binary_form=True)  # type: ignore[union-attr]
        assert der is not None and hashlib.sha256(der).hexdigest() == node_fp
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def test_a_dashboard_beyond_loopback_answers_party_identities_only(
        make_party: Callable[..., LocalParty], tmp_path: Path) -> None:
    """Bound to 0.0.0.0 (probed on 127.0.0.1 only), the dashboard is HTTPS with the node's own
    certificate and answers only a party identity's certificate: not plain HTTP, not a TLS
    client without a certificate, not a stranger's, not a revoked user's."""
    import ssl

    from pdp.identity import load_node_identity, new_credential

    port = free_port()
    party = make_party("sleep=0.01", node_settings={0: {"dashboard": f"0.0.0.0:{port}"}})
    node_fp = load_node_identity(party.root / party.names[0], party.names[0]).fp
    cli = [sys.executable, "-m", "pdp"]
    pems = {}
    for who, key in (("admin", party.key_file), ("bob", party.root / "bob.cred")):
        pems[who] = tmp_path / f"{who}.pem"
        done = subprocess.run([*cli, "export-cert", "--pem", str(pems[who]), "--key-file", str(key)],
                              capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, done.stderr
    pems["stranger"] = tmp_path / "stranger.pem"
    stranger = new_credential(tmp_path / "stranger.cred", "mallory", set(), force=True)
    pems["stranger"].write_text(stranger.identity.key_pem + stranger.identity.cert_pem)

    wait_until(lambda: _try(lambda: _https(port, pems["admin"], node_fp)[0] == 200), 30, "the HTTPS dashboard")
    status, body = _https(port, pems["admin"], node_fp)
    assert json.loads(body)["leader"] is not None
    status, body = _https(port, pems["bob"], node_fp, "/metrics")
    assert status == 200 and b"pdp_" in body
    status, body = _https(port, None, node_fp)
    assert status == 403 and b"pdp export-cert" in body
    with pytest.raises((ssl.SSLError, ConnectionError)):
        _https(port, pems["stranger"], node_fp)
    with pytest.raises(Exception):  # plain HTTP gets no page from a TLS server
        get(f"http://127.0.0.1:{port}/api/status")

    revoked = subprocess.run([*cli, "uninvite", "bob", "--node", party.addr(0), "--key-file", str(party.key_file)],
                             capture_output=True, text=True, timeout=30)
    assert revoked.returncode == 0, revoked.stderr
    wait_until(lambda: _try(lambda: _https(port, pems["bob"], node_fp)[0] == 403, refused=True), 15,
               "bob refused once revoked")


def _try(probe: Callable[[], bool], refused: bool = False) -> bool:
    """``probe()``, with a refused connection counting as ``refused``."""
    import ssl

    try:
        return probe()
    except (ssl.SSLError, ConnectionError, OSError):
        return refused


@pytest.mark.skipif(not (CHROMIUM and DRIVER), reason="needs Debian's chromium and chromium-driver")
def test_the_page_shows_a_killed_member_dead_and_the_job_done(
        make_party: Callable[..., LocalParty], corpus: list[Path], tmp_path: Path) -> None:
    ports = [free_port() for _ in range(3)]
    party = make_party("sleep=0.2", node_settings={i: {"dashboard": f"127.0.0.1:{p}"} for i, p in enumerate(ports)})
    urls = [f"http://127.0.0.1:{p}" for p in ports]
    leader = leader_index(party)
    watch = leader  # the master's page: it stays up and sees the member go
    wait_until(lambda: json.loads(get(urls[watch] + "/api/status"))["leader"] is not None, 30, "a status")
    ARTIFACTS.mkdir(exist_ok=True)
    driver = browser()
    try:
        driver.get(urls[watch] + "/")
        wait_until(lambda: attr(driver, "conn", "data-live") == "yes", 30, "live page")
        run(submit(party, leader, corpus, "watched"))
        victim: list[int] = []

        def running() -> bool:
            v = holder_of_running_task(party, "watched", "map", exclude=leader)
            victim.extend([] if v is None else [v])
            return bool(victim)

        wait_until(running, 60, "a member running a map")
        wait_until(lambda: bool(texts(driver, "#job-watched")), 20, "the job on the page")
        driver.save_screenshot(str(ARTIFACTS / "dashboard-1-running.png"))
        party.kill(victim[0])
        name = party.names[victim[0]]

        wait_until(lambda: attr(driver, f"member-{name}", "data-health") == "dead", 30, f"{name} shown dead")
        driver.save_screenshot(str(ARTIFACTS / "dashboard-2-member-dead.png"))
        summary = finish(party, "watched", tmp_path / "out.tsv", corpus)

        wait_until(lambda: attr(driver, "job-watched", "data-state") == "done", 30, "the job shown done")
        text = texts(driver, "#job-watched")[0]
        assert "100%" in text and "re-runs" in text, text
        events = texts(driver, "#events li")
        assert any(f"member {name} lost: its tasks of 1 job(s) run again" in e for e in events), events
        assert any("job watched done" in e for e in events), events
        driver.save_screenshot(str(ARTIFACTS / "dashboard-3-done.png"))
    finally:
        driver.quit()
    m = metrics(urls[watch])
    assert m[("pdp_tasks_finished_total", (("outcome", "done"), ("phase", "map")))] == summary["maps"]
    assert m[("pdp_tasks_finished_total", (("outcome", "done"), ("phase", "reduce")))] == summary["reduces"]
    assert m[("pdp_tasks_started_total", (("phase", "map"),))] + m[("pdp_tasks_started_total", (("phase", "reduce"),))] \
        == summary["attempts"]
    assert m[("pdp_task_reruns_total", ())] == sum(summary["reruns"].values()) >= 1
    assert m[("pdp_read_bytes_total", ())] == sum(p.stat().st_size for p in corpus)
    assert m[("pdp_jobs", (("state", "done"),))] == 1 and m[("pdp_queue_length", ())] == 0
    assert m[("pdp_members", (("health", "dead"),))] == 1 and m[("pdp_members", (("health", "alive"),))] == 2
    assert m[("pdp_job_seconds_count", ())] == 1
    assert m[("pdp_task_seconds_count", (("phase", "map"),))] == summary["maps"]
    assert m[("pdp_raft_commit_index", ())] > 0 and m[("pdp_elections_total", ())] >= 1
    logs = subprocess.run([sys.executable, "-m", "pdp", "logs", "watched", "-f", "--json", "--node", party.addr(watch),
                           "--key-file", str(party.key_file)], capture_output=True, text=True, timeout=60)
    assert logs.returncode == 0, logs.stderr
    lines = [json.loads(line) for line in logs.stdout.splitlines()]  # -f ends: the job has ended
    assert [e["kind"] for e in lines][0] == "submitted" and lines[-1]["kind"] == "done", lines
    assert {e["job"] for e in lines} == {"watched"}
    reruns = [e["text"] for e in lines if e["kind"] == "rerun"]
    assert len(reruns) == sum(summary["reruns"].values()) and all(f"member {name} lost" in t or
                                                                   f"lost with {name}" in t for t in reruns), reruns
    plain = subprocess.run([sys.executable, "-m", "pdp", "logs", "nosuchjob", "--node", party.addr(watch),
                            "--key-file", str(party.key_file)], capture_output=True, text=True, timeout=60)
    assert plain.returncode == 1 and "no job nosuchjob" in plain.stderr, plain.stderr
    jobs = json.loads(get(urls[watch] + "/api/jobs"))
    assert [(j["id"], j["state"], j["progress"], j["eta_seconds"]) for j in jobs] == [("watched", "done", 1.0, None)]
