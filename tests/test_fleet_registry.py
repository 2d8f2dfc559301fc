"""Two relay processes on one PostgreSQL registry (issue 13, part 1): a site joined through one relay is
known to the other, and a revocation written through either closes the site's tunnel on the relay that
holds it within the 5 s the fleet promises. Real relays, a real agent, a real server, dcmtk for DICOM.
"""

from __future__ import annotations

import os
import shutil
import signal
import time
import urllib.error
from pathlib import Path

import pytest

from relay import pki
from tests.support.dcmtk import echoscu, start_storescp
from tests.support.ports import free_port
from tests.support.procs import wait_until
from tests.support.stack import (
    RELAY,
    AgentRoute,
    ListenerRoute,
    RelayHandle,
    _cli,
    enroll,
    enroll_agent,
    http_json,
    make_agent,
    make_relay,
    site_add,
    start_agent,
    start_relay,
)

SHARED_STATE = (pki.CA_CERT, pki.CA_KEY, pki.RELAY_CERT, pki.RELAY_KEY)  # one CA for the fleet


@pytest.fixture
def fleet(procs, postgres, tmp_path):
    """Relays "a" and "b" sharing the registry and the CA; a PACS behind site st-marys, not enrolled."""
    password = tmp_path / "registry-password"
    password.write_text(postgres.password + "\n")
    password.chmod(0o600)
    extra = [f'registry_url = "{postgres.url}"', f'registry_password_file = "{password}"']
    pacs = free_port()
    start_storescp(procs, pacs, "PACS", tmp_path / "pacs")
    routes = [ListenerRoute("SM_PACS", "st-marys", "pacs")]
    relays: dict[str, RelayHandle] = {}
    for name in ("a", "b"):
        relays[name] = make_relay(tmp_path / f"relay-{name}", listener_routes=routes, sites={"st-marys": []},
                                  heartbeat=1.0, extra=extra,
                                  sections=["[fleet]", f'name = "relay-{name}"', f'zone = "zone-{name}"'])
    for file in SHARED_STATE:
        shutil.copy2(relays["a"].state_dir / file, relays["b"].state_dir / file)
    for name, relay in relays.items():
        start_relay(procs, relay, name=f"relay-{name}")
    agent = make_agent(relays["b"], "st-marys", tmp_path / "agent", routes=[AgentRoute("pacs", pacs)],
                       enrolled=True, heartbeat=1.0, extra=['agent_name = "gw-1"'])
    return relays["a"], relays["b"], agent


def test_a_site_joined_on_one_relay_is_revoked_through_the_other_within_5s(procs, fleet):
    relay_a, relay_b, agent = fleet
    enroll_agent(relay_b, agent)  # the token and the certificate are written through relay b
    start_agent(procs, agent, relay_b)
    assert echoscu("127.0.0.1", relay_b.dicom_port, "SM_PACS", "CLOUDAI").ok
    known_to_a = {s["name"]: s for s in relay_a.admin("GET", "/api/sites")["sites"]}
    assert known_to_a["st-marys"]["certificates"] == 1  # relay a reads what relay b wrote

    revoked_at = time.monotonic()
    relay_a.admin("POST", "/api/sites/st-marys/revoke", {"reason": "fleet test"})
    wait_until(lambda: not relay_b.site_connected("st-marys"), 5.0,
               message="relay b to close the tunnel of a site revoked through relay a")
    assert time.monotonic() - revoked_at < 5.0
    wait_until(lambda: agent.state() == "revoked", 10.0, message=lambda: f"agent told: {agent.status()}")
    assert not echoscu("127.0.0.1", relay_b.dicom_port, "SM_PACS", "CLOUDAI", timeout=10).ok
    assert not (relay_a.state_dir / "registry.sqlite3").exists() or "site_revoked" not in \
        (relay_a.state_dir / "registry.sqlite3").read_bytes().decode(errors="replace")
    audit = relay_b.admin("GET", "/api/audit")["audit"]
    assert {"site_revoked", "token_redeemed", "certificate_issued"} <= {e["action"] for e in audit}


def _server_processes(postgres) -> list[int]:
    """The postmaster and every backend it forked (frozen together: a stalled server, not a dead one)."""
    pid = postgres.process.pid
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [pid, *map(int, children)]


def _admin_error(relay: RelayHandle, method: str, path: str, body: dict) -> tuple[int, str]:
    try:
        http_json(f"http://127.0.0.1:{relay.admin_port}{path}", method=method, body=body, token=relay.admin_token,
                  timeout=30)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")
    return 200, ""


def test_a_stalled_registry_never_stalls_the_relay(procs, fleet, postgres):
    _relay_a, relay, agent = fleet
    enroll_agent(relay, agent)
    start_agent(procs, agent, relay)
    frozen = _server_processes(postgres)
    for pid in frozen:
        os.kill(pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        assert http_json(f"http://127.0.0.1:{relay.admin_port}/healthz")["ok"]
        assert echoscu("127.0.0.1", relay.dicom_port, "SM_PACS", "CLOUDAI").ok  # routing from memory
        assert time.monotonic() - started < 5.0

        code, text = _admin_error(relay, "POST", "/api/sites", {"name": "new-site"})
        assert code == 503 and f"PostgreSQL tunnel@127.0.0.1:{postgres.port}/registry" in text
        assert postgres.password not in text
        ready = http_json(f"http://127.0.0.1:{relay.admin_port}/readyz")
        assert ready["ready"] and "shared registry is unavailable" in ready["reason"]

        # An agent that reconnects while the registry cannot be asked is admitted on this relay's last verdict.
        procs.stop(agent.proc)
        start_agent(procs, agent, relay, name="agent-again", timeout=30)
        assert echoscu("127.0.0.1", relay.dicom_port, "SM_PACS", "CLOUDAI").ok
    finally:
        for pid in frozen:
            os.kill(pid, signal.SIGCONT)
    # Back by itself: writes work again, and readiness no longer names the registry.
    wait_until(lambda: _admin_error(relay, "POST", "/api/sites", {"name": "new-site"})[0] == 200, 30,
               message="the relay to write to the registry again")
    wait_until(lambda: http_json(f"http://127.0.0.1:{relay.admin_port}/readyz")["reason"] == "ready", 10,
               message="readiness to recover")


def test_the_fleet_shows_which_relay_holds_each_site_and_a_relay_that_stops(procs, fleet):
    relay_a, relay_b, agent = fleet
    enroll_agent(relay_b, agent)
    start_agent(procs, agent, relay_b)
    wait_until(lambda: relay_a.admin("GET", "/api/fleet")["presence"] == {"st-marys": ["relay-b"]}, 5.0,
               message="relay a to see that relay b holds st-marys")
    answer = relay_a.admin("GET", "/api/fleet")
    assert answer["relay"] == "relay-a"
    assert answer["paths"] == {"st-marys": [{"relay": "relay-b", "agents": ["gw-1"]}]}
    assert {(r["name"], r["zone"], r["state"], r["sites"]) for r in answer["relays"]} == {
        ("relay-a", "zone-a", "serving", 0), ("relay-b", "zone-b", "serving", 1)}
    listing = _cli(RELAY, "fleet", "--config", str(relay_a.config)).stdout
    assert "relay-b" in listing and "serving" in listing and "(this relay)" in listing
    sites = _cli(RELAY, "sites", "--config", str(relay_a.config)).stdout
    assert "relay-b/gw-1 (single path)" in sites  # one agent on one relay: flagged

    procs.stop(relay_b.proc)  # a clean stop withdraws at once, without waiting for the lease
    answer = relay_a.admin("GET", "/api/fleet")
    assert answer["presence"] == {}
    assert {r["name"]: r["state"] for r in answer["relays"]}["relay-b"] == "gone"


def test_a_relay_stops_on_time_while_its_registry_is_frozen(procs, fleet, postgres):
    _relay_a, relay, _agent = fleet
    frozen = _server_processes(postgres)
    for pid in frozen:
        os.kill(pid, signal.SIGSTOP)
    try:
        wait_until(lambda: _admin_ready_reason(relay) != "ready", 15,
                   message="the relay's sweep to find its registry call stuck")
        asked = time.monotonic()
        relay.proc.kill(signal.SIGTERM)
        assert relay.proc.wait(20) == 0  # not held by the call that still waits on the frozen server
        assert time.monotonic() - asked < 20
    finally:
        for pid in frozen:
            os.kill(pid, signal.SIGCONT)


def _admin_ready_reason(relay: RelayHandle) -> str:
    return http_json(f"http://127.0.0.1:{relay.admin_port}/readyz")["reason"]


def test_postgresql_stopped_for_30s_associations_flow_enrollment_says_503_and_all_recovers(procs, fleet, postgres,
                                                                                          tmp_path):
    relay_a, relay_b, agent = fleet
    enroll_agent(relay_b, agent)
    start_agent(procs, agent, relay_b)
    newcomer = make_agent(relay_a, "general", tmp_path / "newcomer", routes=[], enrolled=True)
    token = site_add(relay_a, "general")  # issued before the outage, redeemed during it
    postgres.stop()
    try:
        stopped = time.monotonic()
        echoes = 0
        for _ in range(60):  # bounded: one C-ECHO a half second for 30 s
            assert echoscu("127.0.0.1", relay_b.dicom_port, "SM_PACS", "CLOUDAI", timeout=10).ok
            echoes += 1
            if time.monotonic() - stopped >= 30.0:
                break
            time.sleep(0.5)
        refused = enroll(newcomer, token)
        assert refused.returncode != 0 and "unavailable" in (refused.stdout + refused.stderr).lower()
        code, text = _admin_error(relay_a, "POST", "/api/sites", {"name": "during-outage"})
        assert code == 503 and "PostgreSQL" in text
    finally:
        postgres.start()
    assert echoes >= 50 and time.monotonic() - stopped >= 30.0
    # Back without touching the relays: enrollment with the same token, writes, presence, readiness.
    assert enroll(newcomer, token).returncode == 0
    wait_until(lambda: _admin_error(relay_a, "POST", "/api/sites", {"name": "after-outage"})[0] == 200, 30,
               message="relay a to write to the registry again")
    wait_until(lambda: relay_a.admin("GET", "/api/fleet")["presence"] == {"st-marys": ["relay-b"]}, 15,
               message="relay b's presence written again")
    for relay in (relay_a, relay_b):
        wait_until(lambda r=relay: _admin_ready_reason(r) == "ready", 15, message="readiness to recover")
    assert echoscu("127.0.0.1", relay_b.dicom_port, "SM_PACS", "CLOUDAI").ok
