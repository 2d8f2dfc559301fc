"""Status: `tunnel-agent status` (human and --json) and the relay's JSON endpoint show connected sites and
active associations; a frozen relay is declared dead by the agent within three heartbeat intervals."""

from __future__ import annotations

import json
import signal
import subprocess
import time

import pytest

from tests.support.dcmtk import start_storescp
from tests.support.ports import free_port
from tests.support.procs import wait_until
from tests.support.rawdicom import associate_rq, connect, read_pdu
from tests.support.stack import (
    AGENT,
    AgentRoute,
    ListenerRoute,
    SiteDest,
    make_agent,
    make_relay,
    start_agent,
    start_relay,
)

HEARTBEAT = 1.0


@pytest.fixture
def stack(procs, tmp_path):
    pacs_port = free_port()
    start_storescp(procs, pacs_port, "PACS", tmp_path / "pacs")
    relay = make_relay(tmp_path / "relay", listener_routes=[ListenerRoute("HOSP_PACS", "hospital-a", "pacs")],
                       sites={"hospital-a": [SiteDest("CLOUD", free_port())], "hospital-b": []},
                       heartbeat=HEARTBEAT)
    agent = make_agent(relay, "hospital-a", tmp_path / "agent", routes=[AgentRoute("pacs", pacs_port)],
                       heartbeat=HEARTBEAT, backoff_max=0.5)
    start_relay(procs, relay)
    start_agent(procs, agent, relay)
    return relay, agent


def _status_cli(agent, *extra):
    return subprocess.run([AGENT, "status", "--config", str(agent.config), *extra],
                          capture_output=True, text=True, timeout=30)


def test_status_shows_sites_and_active_associations(stack):
    relay, agent = stack
    with connect(relay.dicom_port) as caller:
        caller.sendall(associate_rq("HOSP_PACS", "CLOUDAI"))
        assert read_pdu(caller)[0] == 0x02  # A-ASSOCIATE-AC from the PACS: the association is up
        status = relay.status()
        sites = {s["name"]: s for s in status["sites"]}
        assert sites["hospital-a"]["connected"] and not sites["hospital-b"]["connected"]
        wait_until(lambda: relay.status()["sites"][0]["rtt_ms"] is not None, 5, message="an RTT sample")
        (assoc,) = relay.status()["associations"]
        assert (assoc["site"], assoc["route"], assoc["calling_ae"], assoc["called_ae"]) == \
            ("hospital-a", "pacs", "CLOUDAI", "HOSP_PACS")
        human = _status_cli(agent)
        assert human.returncode == 0, human.stderr
        assert "state:        connected" in human.stdout
        assert "1 active" in human.stdout and "CLOUDAI -> HOSP_PACS" in human.stdout
        raw = json.loads(_status_cli(agent, "--json").stdout)
        assert raw["state"] == "connected" and raw["routes"] == ["pacs"]
        assert len(raw["associations"]) == 1
        caller.sendall(bytes.fromhex("05000000000400000000"))  # A-RELEASE-RQ
        assert read_pdu(caller)[0] == 0x06  # A-RELEASE-RP
    wait_until(lambda: not relay.status()["associations"], 5, message="association ended")
    assert relay.status()["outcomes"]["completed"] == 1


def test_frozen_relay_is_declared_dead_within_three_heartbeats(stack):
    relay, agent = stack
    relay.proc.kill(signal.SIGSTOP)  # TCP stays up; only the heartbeat can tell
    try:
        start = time.monotonic()
        wait_until(lambda: agent.status()["state"] != "connected", 3 * HEARTBEAT + 2,
                   message="agent declares the frozen relay dead")
        elapsed = time.monotonic() - start
        print(f"frozen relay detected after {elapsed:.2f}s (heartbeat {HEARTBEAT}s)")
        assert "silent" in agent.status()["last_error"]
        down = _status_cli(agent)
        assert down.returncode == 3 and "last error:" in down.stdout
    finally:
        relay.proc.kill(signal.SIGCONT)
    wait_until(lambda: agent.status()["state"] == "connected", 15, message="agent reconnects")


def test_the_agent_status_port_names_no_server_software_and_drops_idle_connections(stack):
    import socket
    import urllib.request

    _relay, agent = stack
    for path in ("/api/status", "/healthz", "/readyz", "/metrics"):
        with urllib.request.urlopen(f"http://127.0.0.1:{agent.status_port}{path}", timeout=5) as r:
            assert "Server" not in r.headers, (path, dict(r.headers))
    # A connection that never sends a request is closed after one heartbeat interval, not an hour.
    with socket.create_connection(("127.0.0.1", agent.status_port), timeout=5) as idle:
        idle.settimeout(HEARTBEAT + 5)
        start = time.monotonic()
        assert idle.recv(1) == b""
        assert time.monotonic() - start < HEARTBEAT + 5
