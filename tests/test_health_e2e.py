"""Acceptance, with real processes: the agent C-ECHOes the PACS behind it and the relay shows the result.

    relay ◄── tunnel ── agent ──C-ECHO every second──► storescp "PACS"

- The site is "up" with the destination ok and a latency; with the PACS stopped it is "degraded", with the
  C-ECHO failure as the reason, within two echo intervals; with the PACS back it is "up" again.
- ``tunnel-relay sites`` and ``tunnel-agent status`` show it; the agent's /readyz follows the tunnel.
- PHI canary: after a C-STORE of the canary study through the tunnel, the patient's name and ID appear in
  no status answer and in neither program's log.
"""

from __future__ import annotations

import json
import subprocess
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.dcmtk import start_storescp, storescu
from tests.support.ports import free_port
from tests.support.procs import ManagedProcess, ProcessTracker, wait_until
from tests.support.stack import (
    AGENT,
    RELAY,
    AgentHandle,
    AgentRoute,
    ListenerRoute,
    RelayHandle,
    SiteDest,
    make_agent,
    make_relay,
    start_agent,
    start_relay,
)
from tunnel_demo.dataset import PHI_PATIENT_ID, PHI_PATIENT_NAME, StudyInfo

ECHO_INTERVAL = 1.0
SLACK = 1.5  # the relay's status call, process scheduling: the acceptance bound is two echo intervals
PACS_AE = "PACS"
RELAY_AE = "HOSP_PACS"


@dataclass
class Stack:
    relay: RelayHandle
    agent: AgentHandle
    pacs: ManagedProcess
    pacs_port: int
    pacs_dir: Path


@pytest.fixture
def stack(procs: ProcessTracker, tmp_path: Path) -> Stack:
    pacs_port = free_port()
    pacs = start_storescp(procs, pacs_port, PACS_AE, tmp_path / "pacs")
    relay = make_relay(tmp_path / "relay", listener_routes=[ListenerRoute(RELAY_AE, "hospital-a", "pacs")],
                       sites={"hospital-a": [SiteDest("CLOUD", free_port())], "hospital-b": []})
    agent = make_agent(relay, "hospital-a", tmp_path / "agent",
                       routes=[AgentRoute("pacs", pacs_port, PACS_AE)], backoff_max=0.5)
    with agent.config.open("a") as config:
        config.write(f"[health]\necho_interval = {ECHO_INTERVAL}\necho_timeout = 2.0\n")
    start_relay(procs, relay)
    start_agent(procs, agent, relay)
    return Stack(relay, agent, pacs, pacs_port, tmp_path / "pacs")


def _site(relay: RelayHandle, name: str) -> dict:
    return next(s for s in relay.status()["sites"] if s["name"] == name)


def _cli(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=30)


def _sites_lines(relay: RelayHandle) -> dict[str, str]:
    result = _cli(RELAY, "sites", "--config", str(relay.config))
    assert result.returncode == 0, result.stderr
    header, *rows = result.stdout.splitlines()
    assert header.split()[:3] == ["SITE", "CONDITION", "TRANSPORT"]
    return {row.split()[0]: row for row in rows}


def _readyz(agent: AgentHandle) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{agent.status_port}/readyz", timeout=5) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as exc:
        return exc.code, json.load(exc)


def _up_with_echo(relay: RelayHandle) -> dict | None:
    site = _site(relay, "hospital-a")
    dests = (site["health"] or {}).get("destinations") or []
    if site["condition"] == "up" and dests and dests[0]["ok"] and dests[0]["latency_ms"] is not None:
        return site
    return None


def test_pacs_down_degrades_the_site_and_back_up_restores_it(stack: Stack, procs: ProcessTracker):
    relay, agent = stack.relay, stack.agent
    site = wait_until(lambda: _up_with_echo(relay), 15, message=lambda: f"site up: {_site(relay, 'hospital-a')}")
    (dest,) = site["health"]["destinations"]
    assert (dest["route"], dest["host"], dest["port"]) == ("pacs", "127.0.0.1", stack.pacs_port)
    assert site["health"]["report_interval"] == ECHO_INTERVAL and site["health"]["version"]
    assert site["health"]["host"]["rss_bytes"] > 0

    lines = _sites_lines(relay)
    assert lines["hospital-a"].split()[1] == "up" and " 1/1 " in lines["hospital-a"]
    assert lines["hospital-a"].endswith(" ok") and "websocket" in lines["hospital-a"]
    assert lines["hospital-b"].split()[1] == "down" and lines["hospital-b"].endswith("never connected")
    as_json = json.loads(_cli(RELAY, "sites", "--config", str(relay.config), "--json").stdout)
    assert {s["name"]: s["condition"] for s in as_json} == {"hospital-a": "up", "hospital-b": "down"}

    assert _readyz(agent) == (200, {"ready": True, "reason": "ready"})
    with urllib.request.urlopen(f"http://127.0.0.1:{agent.status_port}/healthz", timeout=5) as r:
        assert json.load(r) == {"ok": True}
    human = _cli(AGENT, "status", "--config", str(agent.config))
    assert human.returncode == 0, human.stderr
    pacs_line = next(line for line in human.stdout.splitlines() if line.strip().startswith("pacs "))
    assert f"127.0.0.1:{stack.pacs_port}" in pacs_line and " ok " in pacs_line and pacs_line.endswith(" ms")
    assert "host:" in human.stdout and "disk free" in human.stdout

    # The PACS goes away: the site turns degraded within two echo intervals, naming the C-ECHO failure.
    stack.pacs.stop()
    failed = f"C-ECHO pacs (127.0.0.1:{stack.pacs_port}) failed: "
    degraded = wait_until(lambda: (s := _site(relay, "hospital-a"))["condition"] == "degraded" and s,
                          2 * ECHO_INTERVAL + SLACK, interval=0.05,
                          message=lambda: f"site degraded: {_site(relay, 'hospital-a')}")
    # An echo under way when storescp ended sees the association aborted; the next one is refused.
    assert degraded["reason"] in (failed + "connection refused", failed + "association aborted during the C-ECHO",
                                  failed + "association aborted before an answer"), degraded["reason"]
    assert degraded["connected"]  # the tunnel itself is fine
    refused = wait_until(lambda: (s := _site(relay, "hospital-a"))["reason"] == failed + "connection refused" and s,
                         2 * ECHO_INTERVAL + SLACK, interval=0.05,
                         message=lambda: f"refused: {_site(relay, 'hospital-a')}")
    line = _sites_lines(relay)["hospital-a"]
    assert line.split()[1] == "degraded" and " 0/1 " in line and line.endswith("failed: connection refused")
    human = _cli(AGENT, "status", "--config", str(agent.config)).stdout
    assert "FAILED: connection refused" in human
    # One line when the destination stops answering, not one per round; pynetdicom's own lines are muted.
    first = refused["health"]["destinations"][0]["checked_at"]
    wait_until(lambda: agent.status()["health"]["destinations"][0]["checked_at"] > first, 10, interval=0.1,
               message="one more failing round")
    log = agent.proc.log_text()
    assert log.count(f"route=pacs C-ECHO 127.0.0.1:{stack.pacs_port} (called AE PACS) failed: ") == 1, log
    assert "pynetdicom" not in log, log

    # The PACS comes back on the same port: up again.
    start_storescp(procs, stack.pacs_port, PACS_AE, stack.pacs_dir)
    wait_until(lambda: _up_with_echo(relay), 2 * ECHO_INTERVAL + SLACK, interval=0.05,
               message=lambda: f"site up again: {_site(relay, 'hospital-a')}")
    dest = _site(relay, "hospital-a")["health"]["destinations"][0]
    assert dest["last_failure_reason"] and dest["last_success"] > dest["last_failure"]

    # Without the relay the agent is alive but not ready, and says why.
    relay.proc.stop()
    status, body = wait_until(lambda: (r := _readyz(agent))[0] == 503 and r, 15,
                              message=lambda: f"agent not ready: {_readyz(agent)}")
    assert body["ready"] is False and body["reason"].startswith("tunnel ")
    with urllib.request.urlopen(f"http://127.0.0.1:{agent.status_port}/healthz", timeout=5) as r:
        assert r.status == 200


def test_phi_appears_in_no_status_and_no_log(stack: Stack, ct_study_small: StudyInfo):
    relay, agent = stack.relay, stack.agent
    wait_until(lambda: _up_with_echo(relay), 15, message="site up")
    storescu("127.0.0.1", relay.dicom_port, RELAY_AE, "CLOUDAI", ct_study_small.files).check()
    stored = [p.read_bytes() for p in stack.pacs_dir.rglob("*") if p.is_file()]
    assert len(stored) == len(ct_study_small.files)
    assert all(PHI_PATIENT_ID.encode() in data for data in stored)  # the canary did go through the tunnel
    wait_until(lambda: relay.status()["outcomes"].get("completed"), 10, message="association recorded")

    answers = {
        "relay status": json.dumps(relay.status()),
        "relay sites": _cli(RELAY, "sites", "--config", str(relay.config), "--json").stdout,
        "relay sites (text)": _cli(RELAY, "sites", "--config", str(relay.config)).stdout,
        "agent status": json.dumps(agent.status()),
        "agent status (text)": _cli(AGENT, "status", "--config", str(agent.config)).stdout,
    }
    relay.proc.stop()
    agent.proc.stop()
    answers |= {"relay log": relay.proc.log_text(), "agent log": agent.proc.log_text()}
    assert answers["agent log"] and answers["relay log"]
    for what, text in answers.items():
        for canary in (PHI_PATIENT_NAME, PHI_PATIENT_ID, PHI_PATIENT_NAME.replace("^", " ")):
            assert canary.lower() not in text.lower(), f"{canary!r} in {what}"
