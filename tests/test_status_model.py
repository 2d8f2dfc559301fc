"""The typed status model above the core (relay.status, tunnel_agent.status): the JSON it gives is the
docs/api.md contract, key for key and in order, and the health report reads the same on both ends.

Integration tests read these answers from running programs; here each field is set to a value of its own,
so a key that is renamed, dropped, reordered or fed from the wrong field fails by name."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

from relay.registry import SiteRecord
from relay.sites import SiteState
from relay.status import RegisteredSite, RelayStatus, SiteStatus, WireGuardPeerStatus
from tunnel_agent.status import AgentStatus, TransportStatus, WireGuardStatus
from tunnel_agent.version import __version__
from tunnel_core.health import (
    AgentState,
    CertificateReport,
    Condition,
    DestinationReport,
    HealthReport,
    HostReport,
    TunnelReport,
    parse_report,
)
from tunnel_runtime.procstats import ProcessStats

ROOT = Path(__file__).resolve().parent.parent
SITE_KEYS = ["name", "condition", "reason", "transport", "wireguard", "health", "health_age_s", "reports_ignored",
             "connected", "peer", "connected_since", "rtt_ms", "active_streams", "connects", "last_disconnect",
             "last_disconnect_reason", "certificate_serial", "certificate_not_after", "agents"]
AGENT_KEYS = ["version", "state", "relay_url", "connected_since", "rtt_ms", "active_streams", "connects",
              "reconnects", "last_error", "next_attempt", "certificate_not_after", "renewals", "renewal_error",
              "routes", "listener", "associations", "outcomes", "process", "health", "spool", "transport",
              "transport_reason"]
REPORT = HealthReport(
    version="0.1.0", sent_at=100.0, report_interval=30.0,
    destinations=(DestinationReport("pacs", "10.0.0.5", 104, True, 2.5, 99.0, None, "", 99.5),),
    host=HostReport(cpu_percent=7.5, memory_percent=40.0, disk_free_bytes=5_000_000_000, rss_bytes=60_000_000,
                    open_fds=21),
    tunnel=TunnelReport(rtt_ms=1.25, reconnects=2), certificate=CertificateReport(not_after=1.9e9))


def test_the_report_reads_the_same_on_both_ends():
    payload = REPORT.encode()
    assert json.loads(payload) == REPORT.as_dict()
    assert list(REPORT.as_dict()) == ["v", "version", "sent_at", "report_interval", "destinations", "host", "tunnel",
                                      "certificate"]
    assert REPORT.as_dict()["destinations"][0] == {
        "route": "pacs", "host": "10.0.0.5", "port": 104, "ok": True, "latency_ms": 2.5, "last_success": 99.0,
        "last_failure": None, "last_failure_reason": "", "checked_at": 99.5}
    parsed = parse_report(payload)
    assert parsed == REPORT  # ints the agent sent read back as equal floats
    assert isinstance(parsed.host.open_fds, float) and isinstance(REPORT.as_dict()["host"]["open_fds"], int)


def test_a_down_site_is_shown_as_docs_api_md_says():
    site = SiteState("hospital-b", connects=2, last_disconnect=50.0, last_disconnect_reason="peer silent")
    row = SiteStatus.of(site, now=60.0).as_dict()
    assert list(row) == SITE_KEYS
    assert row == {"name": "hospital-b", "condition": "down", "reason": "peer silent", "transport": None,
                   "wireguard": None, "health": None, "health_age_s": None, "reports_ignored": 0, "connected": False,
                   "peer": None, "connected_since": None, "rtt_ms": None, "active_streams": 0, "connects": 2,
                   "last_disconnect": 50.0, "last_disconnect_reason": "peer silent", "certificate_serial": None,
                   "certificate_not_after": None, "agents": []}
    assert SiteStatus.never_seen("hospital-c", 60.0).as_dict()["reason"] == "never connected"


def test_every_site_field_lands_under_its_own_key():
    wg = WireGuardPeerStatus(latest_handshake_age_s=12.0, rx_bytes=10, tx_bytes=20, endpoint="198.51.100.7:40211")
    status = SiteStatus(name="a", condition=Condition.UP, reason="ok", transport="websocket", wireguard=wg,
                        health=REPORT, health_age_s=3.2, reports_ignored=4, connected=True, peer="203.0.113.7",
                        connected_since=11.0, rtt_ms=1.9, active_streams=5, connects=6, last_disconnect=7.0,
                        last_disconnect_reason="closed", certificate_serial="4ea7", certificate_not_after=8.0,
                        agents=({"agent": "gw-1"},))
    row = status.as_dict()
    assert list(row) == SITE_KEYS
    assert row["wireguard"] == {"latest_handshake_age_s": 12.0, "rx_bytes": 10, "tx_bytes": 20,
                                "endpoint": "198.51.100.7:40211"}
    assert row["health"] == REPORT.as_dict()
    assert [row[k] for k in SITE_KEYS if k not in ("wireguard", "health")] == [
        "a", "up", "ok", "websocket", 3.2, 4, True, "203.0.113.7", 11.0, 1.9, 5, 6, 7.0, "closed", "4ea7", 8.0,
        [{"agent": "gw-1"}]]
    relay = RelayStatus(started=1.0, sites=(status,), associations=(), outcomes={"completed": 3},
                        process=ProcessStats(rss=100, fds=9, tasks=6))
    assert relay.as_dict() == {"started": 1.0, "sites": [row], "associations": [], "outcomes": {"completed": 3},
                               "process": {"rss": 100, "fds": 9, "tasks": 6}}
    assert relay.site("a") is status and relay.site("b") is None


def test_a_registered_site_adds_what_the_relay_knows_to_its_record():
    record = SiteRecord("a", 1.0, None, None, 2, 9.0)
    assert RegisteredSite(record, configured=True, connected=False).as_dict() == {
        **record.as_dict(), "configured": True, "connected": False}
    assert list(RegisteredSite(record, True, False).as_dict()) == [
        "name", "created_at", "revoked", "revoked_at", "revoked_why", "certificates", "latest_not_after",
        "configured", "connected"]


def _agent(**changes) -> AgentStatus:
    fields = dict(version="1.2.3", state=AgentState.BACKOFF, relay_url="wss://relay.example.org:8443/tunnel",
                  connected_since=None, rtt_ms=None, active_streams=0, connects=3, last_error="refused",
                  next_attempt=99.0, certificate_not_after=1.9e9, renewals=1, renewal_error="x", routes=("pacs",),
                  listener="0.0.0.0:11112", associations=(), outcomes={"completed": 12},
                  process=ProcessStats(rss=1, fds=2, tasks=3), health=None, transport=TransportStatus())
    return AgentStatus(**{**fields, **changes})


def test_the_agent_status_is_shown_as_docs_api_md_says():
    answer = _agent().as_dict()
    assert list(answer) == AGENT_KEYS
    assert answer == {"version": "1.2.3", "state": "backoff", "relay_url": "wss://relay.example.org:8443/tunnel",
                      "connected_since": None, "rtt_ms": None, "active_streams": 0, "connects": 3, "reconnects": 2,
                      "last_error": "refused", "next_attempt": 99.0, "certificate_not_after": 1.9e9, "renewals": 1,
                      "renewal_error": "x", "routes": ["pacs"], "listener": "0.0.0.0:11112", "associations": [],
                      "outcomes": {"completed": 12}, "process": {"rss": 1, "fds": 2, "tasks": 3}, "health": None,
                      "spool": {}, "transport": "websocket", "transport_reason": ""}
    assert json.loads(json.dumps(answer))["state"] == "backoff"
    assert _agent(health=REPORT).as_dict()["health"] == REPORT.as_dict()
    assert _agent(connects=0).reconnects == 0
    assert not _agent().readiness.ready and _agent(state=AgentState.CONNECTED).readiness.ready


def test_the_agent_over_wireguard_adds_its_interface():
    wg = WireGuardStatus(interface="wgtunnel0", up=True, implementation="userspace", address="10.99.0.2/24",
                         relay_address="10.99.0.1", endpoint="203.0.113.5:51820", latest_handshake_age_s=12.0,
                         rx_bytes=5, tx_bytes=6, checked_at=7.0, retry_in_s=None, last_error="")
    answer = _agent(transport=TransportStatus("websocket (fallback)", "no tunnel over WireGuard", wg)).as_dict()
    assert list(answer) == [*AGENT_KEYS, "wireguard"]
    assert (answer["transport"], answer["transport_reason"]) == ("websocket (fallback)", "no tunnel over WireGuard")
    assert list(answer["wireguard"]) == ["interface", "up", "implementation", "address", "relay_address", "endpoint",
                                         "latest_handshake_age_s", "rx_bytes", "tx_bytes", "checked_at",
                                         "retry_in_s", "last_error"]


def test_agent_states_keep_their_strings_and_which_wait():
    assert [s.value for s in AgentState] == ["starting", "connecting", "connected", "disconnected", "backoff",
                                             "revoked", "refused"]
    assert {s for s in AgentState if s.waiting} == {AgentState.BACKOFF, AgentState.REVOKED, AgentState.REFUSED}


def test_the_agent_version_is_pyprojects():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert __version__ == project["version"]
