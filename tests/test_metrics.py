"""Prometheus metrics of relay and agent, and the structured association log record.

The integration tests scrape ``/metrics`` of a real relay and a real agent process, parse it with
prometheus-client's own parser and watch values move as dcmtk runs associations through the tunnel
(and has them refused); a PHI canary proves no patient data reaches the metrics or the structured logs.
The unit tests feed the collectors and the tracker known state.
"""

from __future__ import annotations

import json
import logging
import re
import urllib.request
from types import SimpleNamespace

import pytest
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from relay.metrics import registry_for as relay_registry
from relay.status import RelayStatus, SiteStatus
from tests.support.dcmtk import echoscu, start_storescp, storescu
from tests.support.ports import free_port
from tests.support.procs import wait_until
from tests.support.stack import (
    AgentRoute,
    ListenerRoute,
    SiteDest,
    make_agent,
    make_relay,
    start_agent,
    start_relay,
)
from tunnel_agent.metrics import registry_for as agent_registry
from tunnel_agent.status import AgentStatus, TransportStatus, WireGuardStatus
from tunnel_core.dicom import AssociateRequest
from tunnel_core.health import AgentState, Condition, parse_report
from tunnel_demo.dataset import PHI_PATIENT_ID, PHI_PATIENT_NAME
from tunnel_link.associations import DURATION_BUCKETS, AssociationTracker, DurationHistogram
from tunnel_runtime.procstats import ProcessStats
from tunnel_runtime.service import JsonFormatter

ASSOCS = "dicom_tunnel_associations_total"
BYTES = "dicom_tunnel_association_bytes_total"
C2S, S2C = "cloud-to-site", "site-to-cloud"
WAIT = 15.0  # bound on waiting for a counter that moves once an association has fully ended


# --- scraping and parsing ---------------------------------------------------------------------------------


class Scrape:
    """One parsed /metrics answer: samples by (sample name, labels)."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.samples: dict[tuple[str, frozenset], float] = {}
        self.families = {}
        for family in text_string_to_metric_families(text):
            self.families[family.name] = family
            for sample in family.samples:
                self.samples[(sample.name, frozenset(sample.labels.items()))] = sample.value

    def value(self, name: str, **labels: str) -> float:
        """The sample's value, 0 if it is absent (a counter not incremented yet has no sample)."""
        return self.samples.get((name, frozenset(labels.items())), 0.0)

    def has(self, name: str, **labels: str) -> bool:
        return (name, frozenset(labels.items())) in self.samples


def scrape(port: int) -> Scrape:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        assert r.headers["Content-Type"] == CONTENT_TYPE_LATEST
        return Scrape(r.read().decode())


def moved(port: int, name: str, before: Scrape, by: float = 1, **labels: str) -> Scrape:
    """Wait (bounded) until the sample grew by ``by`` since ``before``; returns the scrape that showed it."""
    want = before.value(name, **labels) + by
    return wait_until(lambda: (s := scrape(port)).value(name, **labels) >= want and s, WAIT,
                      message=f"{name}{labels} to reach {want} on port {port}")


# --- the stack ------------------------------------------------------------------------------------------


@pytest.fixture
def stack(procs, tmp_path, monkeypatch):
    monkeypatch.setenv("TUNNEL_LOG_FORMAT", "json")  # inherited by relay and agent: structured log lines
    pacs_port, cloud_port = free_port(), free_port()
    start_storescp(procs, pacs_port, "PACS", tmp_path / "pacs")
    start_storescp(procs, cloud_port, "CLOUD", tmp_path / "cloud")
    relay = make_relay(tmp_path / "relay", listener_routes=[ListenerRoute("HOSP_PACS", "hospital-a", "pacs")],
                       sites={"hospital-a": [SiteDest("CLOUD", cloud_port)]}, heartbeat=1.0)
    agent = make_agent(relay, "hospital-a", tmp_path / "agent", routes=[AgentRoute("pacs", pacs_port, "PACS")],
                       heartbeat=1.0, backoff_max=0.5)
    start_relay(procs, relay)
    start_agent(procs, agent, relay)
    return relay, agent


def test_metrics_count_successful_and_refused_associations(stack):
    relay, agent = stack
    r0, a0 = scrape(relay.admin_port), scrape(agent.status_port)
    assert r0.value("dicom_tunnel_site_up", site="hospital-a") == 1
    assert r0.value("dicom_tunnel_site_condition", site="hospital-a", condition="down") == 0
    assert a0.value("dicom_tunnel_connected") == 1 and a0.value("dicom_tunnel_state", state="connected") == 1
    assert r0.value("dicom_tunnel_connects_total", site="hospital-a") == 1
    assert r0.has("dicom_tunnel_certificate_expiry_timestamp_seconds", site="hospital-a")
    assert a0.has("dicom_tunnel_certificate_expiry_timestamp_seconds")
    assert r0.value("process_resident_memory_bytes") > 0 and r0.value("process_open_fds") > 0
    assert a0.value("process_resident_memory_bytes") > 0

    # A C-ECHO from the cloud through the relay to the PACS: "completed" on both sides.
    assert echoscu("127.0.0.1", relay.dicom_port, "HOSP_PACS", "CLOUDAI").ok
    r1 = moved(relay.admin_port, ASSOCS, r0, direction=C2S, outcome="completed")
    a1 = moved(agent.status_port, ASSOCS, a0, direction=C2S, outcome="completed")
    assert r1.value("dicom_tunnel_association_duration_seconds_count", direction=C2S) >= \
        r0.value("dicom_tunnel_association_duration_seconds_count", direction=C2S) + 1
    assert r1.value("dicom_tunnel_association_bytes_total", direction=C2S, way="to_caller") > 0

    # An unknown called AE at the relay's listener: rejected there, with the reason as the outcome.
    assert not echoscu("127.0.0.1", relay.dicom_port, "NOBODY", "CLOUDAI", timeout=15).ok
    r2 = moved(relay.admin_port, ASSOCS, r1, direction=C2S, outcome="rejected:called_ae_unknown")

    # An unknown called AE at the agent's listener: the relay refuses the stream, the agent sees the reset.
    assert not echoscu("127.0.0.1", agent.listener_port, "NOBODY", "MODALITY", timeout=15).ok
    moved(relay.admin_port, ASSOCS, r2, direction=S2C, outcome="refused:unknown_route")
    a2 = moved(agent.status_port, ASSOCS, a1, direction=S2C, outcome="reset:unknown_route")
    assert a2.value(ASSOCS, direction=C2S, outcome="completed") == a1.value(ASSOCS, direction=C2S,
                                                                            outcome="completed")


def test_bytes_counters_grow_with_a_store_and_agree_on_both_ends(stack, ct_study_small):
    relay, agent = stack
    r0, a0 = scrape(relay.admin_port), scrape(agent.status_port)
    result = storescu("127.0.0.1", agent.listener_port, "CLOUD", "MODALITY", ct_study_small.files)
    assert result.ok, result.stderr
    r1 = moved(relay.admin_port, ASSOCS, r0, direction=S2C, outcome="completed")
    a1 = moved(agent.status_port, ASSOCS, a0, direction=S2C, outcome="completed")
    grown = {}
    for name, before, after in (("relay", r0, r1), ("agent", a0, a1)):
        for way in ("from_caller", "to_caller"):
            grown[name, way] = after.value(BYTES, direction=S2C, way=way) - before.value(BYTES, direction=S2C,
                                                                                         way=way)
    # The modality's bytes went out through the agent and arrived at the cloud SCP through the relay.
    assert grown["agent", "from_caller"] >= ct_study_small.total_bytes // 2
    assert grown["agent", "to_caller"] > 0
    assert grown["relay", "from_caller"] == grown["agent", "from_caller"]
    assert grown["relay", "to_caller"] == grown["agent", "to_caller"]


def test_site_up_drops_when_the_agent_stops(stack):
    relay, agent = stack
    before = scrape(relay.admin_port)
    assert before.value("dicom_tunnel_site_up", site="hospital-a") == 1
    agent.proc.stop()
    after = wait_until(lambda: (s := scrape(relay.admin_port)).value("dicom_tunnel_site_up", site="hospital-a")
                       == 0 and s, WAIT, message="site_up 0 after the agent stopped")
    assert after.value("dicom_tunnel_site_condition", site="hospital-a", condition="down") == 1
    assert after.value("dicom_tunnel_site_condition", site="hospital-a", condition="up") == 0
    assert after.has("dicom_tunnel_site_up", site="hospital-a")  # still listed, not vanished
    assert not after.has("dicom_tunnel_rtt_seconds", site="hospital-a")


def test_no_phi_in_metrics_or_association_logs(stack, ct_study_small):
    relay, agent = stack
    r0, a0 = scrape(relay.admin_port), scrape(agent.status_port)
    # Patient data both ways: cloud -> relay -> agent -> PACS, and modality -> agent -> relay -> cloud.
    assert storescu("127.0.0.1", relay.dicom_port, "HOSP_PACS", "CLOUDAI", ct_study_small.files).ok
    assert storescu("127.0.0.1", agent.listener_port, "CLOUD", "MODALITY", ct_study_small.files).ok
    moved(relay.admin_port, ASSOCS, r0, direction=S2C, outcome="completed")
    moved(agent.status_port, ASSOCS, a0, direction=C2S, outcome="completed")
    canaries = [PHI_PATIENT_NAME, PHI_PATIENT_ID, ct_study_small.study_uid,
                *ct_study_small.series_uids, *ct_study_small.sop_instance_uids]
    for where, text in (("relay metrics", scrape(relay.admin_port).text),
                        ("agent metrics", scrape(agent.status_port).text),
                        ("relay log", relay.proc.log_text()), ("agent log", agent.proc.log_text())):
        for canary in canaries:
            assert canary not in text, f"{canary!r} in the {where}"
    # The association lines are structured: each side logged both stores with their fields.
    relay_done, agent_done = ([r for r in _assoc_records(proc.log_text()) if r["outcome"] == "completed"]
                              for proc in (relay.proc, agent.proc))
    for done in (relay_done, agent_done):
        assert {(r["direction"], r["calling_ae"], r["called_ae"]) for r in done} == \
            {(C2S, "CLOUDAI", "HOSP_PACS"), (S2C, "MODALITY", "CLOUD")}
        assert all(r["bytes_from_caller"] > 0 and r["bytes_to_caller"] > 0 for r in done)
    assert {(r["direction"], r["site"], r["route"]) for r in relay_done} == \
        {(C2S, "hospital-a", "pacs"), (S2C, "hospital-a", "CLOUD")}  # route: the cloud destination


def _assoc_records(log: str) -> list[dict]:
    out = []
    for line in log.splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and "assoc" in entry:
            out.append(entry["assoc"])
    return out


# --- unit: the structured record, the histogram, the collectors --------------------------------------------


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def captured():
    handler, logger = _Capture(), logging.getLogger("tunnel.association")
    logger.addHandler(handler)
    old_level = logger.level
    logger.setLevel(logging.INFO)
    try:
        yield handler.records
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)


def _request(called: str = "HOSP_PACS", calling: str = "CLOUDAI") -> AssociateRequest:
    return AssociateRequest(called_ae=called, calling_ae=calling, pdu=b"")


def test_association_log_record_carries_structured_fields(captured):
    tracker = AssociationTracker("t")
    assoc = tracker.start(C2S, _request())
    assoc.site, assoc.route, assoc.bytes_from_caller, assoc.bytes_to_caller = "hospital-a", "pacs", 1234, 56
    tracker.finish(assoc, "completed")
    refused = tracker.start(C2S, _request(called="NOBODY"))
    tracker.finish(refused, "rejected:called_ae_unknown")

    first, second = captured
    assert re.fullmatch(r"assoc=t1 direction=cloud-to-site site=hospital-a route=pacs calling=CLOUDAI "
                        r"called=HOSP_PACS bytes_in=1234 bytes_out=56 duration=\d+\.\d{3}s outcome=completed",
                        first.getMessage())
    record = first.assoc
    assert {k: v for k, v in record.items() if k != "duration_s"} == {
        "id": "t1", "direction": C2S, "calling_ae": "CLOUDAI", "called_ae": "HOSP_PACS", "site": "hospital-a",
        "route": "pacs", "bytes_from_caller": 1234, "bytes_to_caller": 56, "outcome": "completed",
        "reject_reason": None, "tunnel": "hospital-a", "stream": None}
    assert record["duration_s"] >= 0
    assert second.assoc["reject_reason"] == "called_ae_unknown" and second.assoc["site"] is None
    assert "outcome=rejected:called_ae_unknown" in second.getMessage()
    # The JSON formatter renders the record as a nested object next to the unchanged message.
    entry = json.loads(JsonFormatter().format(first))
    assert entry["assoc"]["id"] == "t1" and entry["msg"] == first.getMessage()
    # The counters the metrics read moved with it.
    assert tracker.totals == {(C2S, "completed"): 1, (C2S, "rejected:called_ae_unknown"): 1}
    assert tracker.bytes_total == {(C2S, "from_caller"): 1234, (C2S, "to_caller"): 56}
    assert tracker.durations[C2S].count == 2
    tracker.refused("artim-timeout", S2C)
    assert tracker.totals[(S2C, "artim-timeout")] == 1 and tracker.outcomes["artim-timeout"] == 1


def test_duration_histogram_buckets_are_upper_bounds():
    hist = DurationHistogram()
    for seconds in (0.0, DURATION_BUCKETS[0], DURATION_BUCKETS[0] * 1.5, DURATION_BUCKETS[-1] + 1):
        hist.observe(seconds)
    cumulative = hist.cumulative()
    assert cumulative[0] == (DURATION_BUCKETS[0], 2)  # 0 and exactly the first bound
    assert cumulative[1] == (DURATION_BUCKETS[1], 3)
    assert cumulative[-2] == (DURATION_BUCKETS[-1], 3)
    assert cumulative[-1] == (float("inf"), 4) and hist.count == 4
    assert hist.sum == pytest.approx(0.0 + 0.01 + 0.015 + DURATION_BUCKETS[-1] + 1)


def _site(name: str, *, connected: bool, condition: str, report: dict | None = None) -> SiteStatus:
    return SiteStatus(name=name, condition=Condition(condition), reason="", transport=None, wireguard=None,
                      health=parse_report(json.dumps(report).encode()) if report else None,
                      health_age_s=4.0 if report else None, reports_ignored=0, connected=connected, peer=None,
                      connected_since=None, rtt_ms=2.5 if connected else None, active_streams=0, connects=3,
                      last_disconnect=None, last_disconnect_reason="", certificate_serial=None,
                      certificate_not_after=1.9e9 if connected else None)


REPORT = {
    "v": 1, "version": "0.1.0", "sent_at": 1.0, "report_interval": 30.0,
    "destinations": [
        {"route": "pacs", "host": "10.0.0.5", "port": 104, "ok": True, "latency_ms": 12.0, "last_success": 100.0,
         "last_failure": None, "last_failure_reason": "", "checked_at": 100.0},
        {"route": "ris", "host": "10.0.0.6", "port": 104, "ok": False, "latency_ms": None, "last_success": None,
         "last_failure": 99.0, "last_failure_reason": "connection refused", "checked_at": 99.0},
        {"route": "new", "host": "10.0.0.7", "port": 104, "ok": None, "latency_ms": None, "last_success": None,
         "last_failure": None, "last_failure_reason": "", "checked_at": None},
    ],
    "host": {"cpu_percent": 7.5, "memory_percent": 40.0, "disk_free_bytes": 5e9, "rss_bytes": 6e7, "open_fds": 21},
    "tunnel": {"rtt_ms": 2.5, "reconnects": 2},
    "certificate": {"not_after": 1.9e9, "renewal_error": ""},
}


def test_relay_collector_reads_sites_and_health_reports():
    tracker = AssociationTracker("r")
    assoc = tracker.start(C2S, _request())
    assoc.site = "hospital-a"
    sites = [_site("hospital-a", connected=True, condition="degraded", report=REPORT),
             _site("hospital-b", connected=False, condition="down", report=REPORT)]  # a stale report: not shown
    snapshot = RelayStatus(started=0.0, sites=tuple(sites), associations=tuple(tracker.active.values()), outcomes={},
                           process=ProcessStats(rss=1, fds=1, tasks=9))
    relay = SimpleNamespace(readiness=lambda: SimpleNamespace(ready=True), snapshot=lambda: snapshot,
                            registry_up=lambda: False)
    s = Scrape(generate_latest(relay_registry(relay, tracker)).decode())
    assert s.value("dicom_tunnel_registry_up") == 0
    assert s.value("dicom_tunnel_site_up", site="hospital-a") == 1
    assert s.value("dicom_tunnel_site_up", site="hospital-b") == 0
    assert s.value("dicom_tunnel_site_condition", site="hospital-a", condition="degraded") == 1
    assert s.value("dicom_tunnel_site_condition", site="hospital-a", condition="up") == 0
    assert s.value("dicom_tunnel_rtt_seconds", site="hospital-a") == pytest.approx(0.0025)
    assert s.value("dicom_tunnel_active_associations", site="hospital-a") == 1
    assert s.value("dicom_tunnel_connects_total", site="hospital-a") == 3
    assert s.value("dicom_tunnel_destination_echo_ok", site="hospital-a", route="pacs") == 1
    assert s.has("dicom_tunnel_destination_echo_ok", site="hospital-a", route="ris")
    assert s.value("dicom_tunnel_destination_echo_ok", site="hospital-a", route="ris") == 0
    assert not s.has("dicom_tunnel_destination_echo_ok", site="hospital-a", route="new")  # not checked yet
    assert s.value("dicom_tunnel_destination_echo_latency_seconds", site="hospital-a", route="pacs") == 0.012
    assert not s.has("dicom_tunnel_destination_echo_ok", site="hospital-b", route="pacs")
    assert s.value("dicom_tunnel_agent_host_cpu_percent", site="hospital-a") == 7.5
    assert s.value("dicom_tunnel_agent_disk_free_bytes", site="hospital-a") == 5e9
    assert s.value("dicom_tunnel_agent_reconnects_total", site="hospital-a") == 2
    assert s.value("dicom_tunnel_agent_info", site="hospital-a", version="0.1.0") == 1
    assert s.value("dicom_tunnel_health_report_age_seconds", site="hospital-a") == 4
    assert s.value("dicom_tunnel_certificate_expiry_timestamp_seconds", site="hospital-a") == 1.9e9
    assert s.value("dicom_tunnel_ready") == 1 and s.value("dicom_tunnel_asyncio_tasks") == 9


def _agent_status(**extra) -> AgentStatus:
    fields = {"version": "0.1.0", "state": AgentState.BACKOFF, "relay_url": "wss://relay:8443/tunnel",
              "connected_since": None, "rtt_ms": None, "active_streams": 0, "connects": 4,
              "last_error": "ConnectionRefusedError: x", "next_attempt": None, "certificate_not_after": 1.9e9,
              "renewals": 0, "renewal_error": "relay unreachable", "routes": (), "listener": None,
              "associations": (), "outcomes": {}, "process": ProcessStats(rss=1, fds=1, tasks=5), "health": None,
              "transport": TransportStatus()}
    return AgentStatus(**{**fields, **extra})


# The last: a report with nothing in it where the agent's report has destinations and host numbers.
@pytest.mark.parametrize("health", [None, REPORT, {"v": 1, "destinations": [], "host": 3}])
def test_agent_collector_with_and_without_health(health):
    extra = {} if health is None else {"health": parse_report(json.dumps(health).encode())}
    assert _agent_status(**extra).reconnects == 3
    s = Scrape(generate_latest(agent_registry(lambda: _agent_status(**extra), AssociationTracker("a"))).decode())
    assert s.value("dicom_tunnel_connected") == 0 and s.value("dicom_tunnel_ready") == 0
    assert s.value("dicom_tunnel_state", state="backoff") == 1
    assert s.value("dicom_tunnel_state", state="connected") == 0
    assert not s.has("dicom_tunnel_rtt_seconds")
    assert s.value("dicom_tunnel_reconnects_total") == 3
    assert s.value("dicom_tunnel_certificate_renewal_failing") == 1
    assert s.value("dicom_tunnel_certificate_expiry_timestamp_seconds") == 1.9e9
    assert s.has("dicom_tunnel_destination_echo_ok", route="pacs") == (health is REPORT)
    if health is REPORT:
        assert s.value("dicom_tunnel_destination_echo_ok", route="ris") == 0
        assert s.value("dicom_tunnel_destination_echo_latency_seconds", route="pacs") == 0.012
        assert s.value("dicom_tunnel_agent_host_memory_percent") == 40


def test_agent_transport_and_wireguard_metrics_come_from_its_status() -> None:
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from tunnel_agent.metrics import _transport_families

    class Fake:
        def __init__(self, transport):
            self.transport = transport

        def collect(self):
            yield from _transport_families(self.transport)

    def scrape(transport) -> dict[tuple[str, tuple], float]:
        registry = CollectorRegistry()
        registry.register(Fake(transport))
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for f in text_string_to_metric_families(generate_latest(registry).decode()) for s in f.samples}

    wg = scrape(TransportStatus("wireguard", "", WireGuardStatus(
        interface="wgtunnel0", up=True, implementation="kernel", address="10.99.0.2/24", relay_address="10.99.0.1",
        endpoint=None, latest_handshake_age_s=3.5, rx_bytes=100, tx_bytes=200, checked_at=None, retry_in_s=None,
        last_error="")))
    assert wg[("dicom_tunnel_transport", (("transport", "wireguard"),))] == 1.0
    assert wg[("dicom_tunnel_wireguard_handshake_age_seconds", ())] == 3.5
    assert wg[("dicom_tunnel_wireguard_transfer_bytes_total", (("way", "tx"),))] == 200
    plain = scrape(TransportStatus("websocket"))
    assert ("dicom_tunnel_wireguard_handshake_age_seconds", ()) not in plain
