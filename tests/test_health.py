"""Health: the relay's strict reading of a REPORT (tunnel_core.health.parse_report), the pure up / degraded /
down and readiness decisions, and the agent's side (tunnel_agent.health): reasons, the report it builds,
C-ECHOs against real DICOM peers on 127.0.0.1 and the monitor reporting to each new tunnel."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import psutil
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tunnel_agent.config import AgentRoute, HealthConfig
from tunnel_agent.echo import EchoAttempt, c_echo
from tunnel_agent.health import (
    DestinationHealth,
    HealthMonitor,
    build_report,
    echo_reason,
    host_metrics,
)
from tunnel_core import health as core_health
from tunnel_core.health import (
    AgentState,
    Condition,
    Readiness,
    ReportError,
    SpoolReport,
    agent_readiness,
    parse_report,
    relay_readiness,
    site_condition,
)
from tunnel_core.limits import MAX_REPORT

NOW = 1_800_000_000.0


def _report(**changes) -> dict:
    report = {
        "v": 1, "version": "0.1.0", "sent_at": NOW, "report_interval": 30.0,
        "destinations": [{"route": "pacs", "host": "127.0.0.1", "port": 4242, "ok": True, "latency_ms": 3.2,
                          "last_success": NOW, "last_failure": None, "last_failure_reason": "",
                          "checked_at": NOW}],
        "host": {"cpu_percent": 3.0, "memory_percent": 41.5, "disk_free_bytes": 1e10, "rss_bytes": 5e7,
                 "open_fds": 23.0},
        "tunnel": {"rtt_ms": 1.5, "reconnects": 0.0},
        "certificate": {"not_after": NOW + 30 * 86400, "renewal_error": ""},
    }
    report.update(changes)
    return report


def _dest(**changes) -> dict:
    return {**_report()["destinations"][0], **changes}


def _parse(obj: object) -> dict:
    return parse_report(json.dumps(obj).encode()).as_dict()


# --- parse_report ---------------------------------------------------------------------------------------


def test_parse_accepts_the_documented_schema():
    report = _report()
    assert _parse(report) == report


def test_parse_takes_the_version_1_shape_only_from_the_wire_bytes():
    # Compact and pretty-printed JSON are the same report.
    assert parse_report(json.dumps(_report(), indent=2).encode()).as_dict() == _report()


@pytest.mark.parametrize("payload", [b"", b"not json", b"\xff\xfe\x00", b"{\"v\": 1,", b"[1, 2]", b"1", b"null"])
def test_parse_rejects_what_is_not_a_json_object(payload):
    with pytest.raises(ReportError):
        parse_report(payload)


@pytest.mark.parametrize("version", [0, 2, "1", None, 1.5, [1], True, 1.0])
def test_parse_rejects_other_versions(version):
    with pytest.raises(ReportError, match="version"):
        _parse(_report(v=version))


def test_parse_rejects_a_missing_version():
    report = _report()
    del report["v"]
    with pytest.raises(ReportError):
        _parse(report)


@pytest.mark.parametrize("destinations", [[_dest()] * 65, [_dest()] * 10_000, "pacs", {"pacs": 1}, None])
def test_parse_rejects_huge_or_malformed_destination_lists(destinations):
    with pytest.raises(ReportError, match="destinations"):
        _parse(_report(destinations=destinations))


def test_parse_accepts_the_largest_allowed_list():
    assert len(_parse(_report(destinations=[_dest()] * 64))["destinations"]) == 64


def test_parse_replaces_non_printable_characters():
    parsed = _parse(_report(version="0.1\x1b[31m", destinations=[_dest(route="pa\ncs\x00",
                                                                         last_failure_reason="x\u202ey")]))
    assert parsed["version"] == "0.1?[31m"
    assert parsed["destinations"][0]["route"] == "pa?cs?"
    assert parsed["destinations"][0]["last_failure_reason"] == "x?y"


def test_parse_bounds_every_string():
    long = "A" * 100_000
    parsed = _parse(_report(version=long, destinations=[_dest(host=long, last_failure_reason=long)],
                            certificate={"not_after": None, "renewal_error": long}))
    assert len(parsed["version"]) == 300
    assert len(parsed["destinations"][0]["host"]) == 300
    assert len(parsed["destinations"][0]["last_failure_reason"]) == 300
    assert len(parsed["certificate"]["renewal_error"]) == 300


def test_parse_ignores_unknown_keys_everywhere():
    report = _report(extra="x", destinations=[{**_dest(), "patient": "x"}])
    report["host"]["swap"] = 1.0
    report["tunnel"]["peer"] = "x"
    parsed = _parse(report)
    assert parsed == _report()


def test_parse_turns_nan_infinity_and_wrong_types_into_none():
    raw = json.dumps(_report()).replace('"cpu_percent": 3.0', '"cpu_percent": NaN') \
        .replace('"rtt_ms": 1.5', '"rtt_ms": Infinity').replace('"latency_ms": 3.2', '"latency_ms": -Infinity')
    parsed = parse_report(raw.encode()).as_dict()
    assert parsed["host"]["cpu_percent"] is None
    assert parsed["tunnel"]["rtt_ms"] is None
    assert parsed["destinations"][0]["latency_ms"] is None
    odd = _parse(_report(sent_at="now", destinations=[_dest(ok="yes", port="4242", checked_at=True)],
                         host="lots", tunnel=[], certificate=None))
    assert odd["sent_at"] is None
    assert odd["destinations"][0]["ok"] is None and odd["destinations"][0]["port"] is None
    assert odd["destinations"][0]["checked_at"] is None
    assert set(odd["host"].values()) == {None}
    assert odd["tunnel"] == {"rtt_ms": None, "reconnects": None}
    assert odd["certificate"] == {"not_after": None, "renewal_error": ""}


def test_parse_non_dict_destination_entries_become_empty_entries():
    (entry,) = _parse(_report(destinations=["pacs"]))["destinations"]
    assert entry["route"] == "" and entry["ok"] is None


# --- parse_report against hostile bytes: ReportError and nothing else ------------------------------------


@pytest.mark.parametrize("payload", [
    pytest.param(b"[" * 60_000, id="array-bomb"),
    pytest.param(b"[" * 100_000, id="array-bomb-over-the-mux-limit"),
    pytest.param(b'{"a":' * 13_000, id="object-bomb"),
    pytest.param(b"[" * 30_000 + b"]" * 30_000, id="balanced-bomb"),
    pytest.param(b'{"v": 1, "destinations": [], "x": ' + b"[" * 30_000 + b"]" * 30_000 + b"}", id="nested-value"),
    pytest.param(b'{"v": 1, "destinations": [[[[[[[[[]]]]]]]]]}', id="just-too-deep"),
])
def test_a_nesting_bomb_is_a_report_error(payload):
    with pytest.raises(ReportError, match="nests deeper than 8 levels"):
        parse_report(payload)


def test_nesting_up_to_the_limit_is_read_and_brackets_in_strings_do_not_count():
    eight = _report(extra=[[[[[[[]]]]]]])  # the report object, then seven arrays
    assert _parse(eight) == _report()
    assert _parse(_report(version="[[[[[[[[[[{{{{{{{{{{")) == _report(version="[[[[[[[[[[{{{{{{{{{{")
    quoted = _report(version='"[[[[[[[[[[\\')  # an escaped quote and a trailing backslash inside the string
    assert _parse(quoted)["version"] == quoted["version"]
    # After a string that ends in an escaped backslash, brackets count again.
    raw = '{"v": 1, "destinations": [], "a": "\\\\", "b": [[[[[[[[1]]]]]]]]}'
    with pytest.raises(ReportError, match="nests deeper"):
        parse_report(raw.encode())


@pytest.mark.parametrize("where", ["sent_at", "report_interval", "port", "latency_ms", "cpu_percent", "not_after",
                                   "unknown"])
@pytest.mark.parametrize("digits", [21, 400, 4_301, 60_000])
def test_a_huge_integer_anywhere_is_a_report_error(where, digits):
    big = "9" * digits
    text = json.dumps(_report(unknown=0)).replace(f'"{where}": ', f'"{where}": -{big}, "_": ', 1)
    assert big in text
    with pytest.raises(ReportError, match=f"integer of {digits} digits"):
        parse_report(text.encode())


def test_integers_up_to_twenty_digits_and_huge_floats_are_read():
    assert _parse(_report(sent_at=10**19 * 9))["sent_at"] == 9e19
    text = json.dumps(_report()).replace('"sent_at": 1800000000.0', '"sent_at": 1e400')
    assert parse_report(text.encode()).sent_at is None  # inf: a number out of range is no number
    text = json.dumps(_report()).replace('"sent_at": 1800000000.0', '"sent_at": ' + "9" * 400 + ".0")
    assert parse_report(text.encode()).sent_at is None


def test_number_helper_never_overflows():
    assert core_health._number(10**400) is None
    assert core_health._number(-(10**400)) is None
    assert core_health._number(10**15) == 1e15


@pytest.mark.parametrize("port", [1e300, -1, 65536, 10**19])
def test_a_port_out_of_range_is_none(port):
    assert _parse(_report(destinations=[_dest(port=port)]))["destinations"][0]["port"] is None


def test_a_report_not_in_utf8_is_a_report_error():
    with pytest.raises(ReportError, match="UTF-8"):
        parse_report(json.dumps(_report()).encode("utf-16"))


_JSONISH = st.text(st.sampled_from(list('[]{}",:\\-+.eE0123456789 \ntruefalsnulNaInfiy') + ["\u00e9"]),
                   max_size=400)


def _hostile_reports() -> st.SearchStrategy[bytes]:
    """Reports of the right shape with hostile values: deep values, huge integers, odd types."""
    leaf = st.one_of(st.none(), st.booleans(), st.integers(-(10**30), 10**30), st.floats(), st.text(max_size=20))
    value = st.recursive(leaf, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5),
                                                                                          inner, max_size=3),
                         max_leaves=30)
    keys = st.sampled_from(["sent_at", "report_interval", "version", "destinations", "host", "tunnel",
                            "certificate", "v", "extra"])
    return st.dictionaries(keys, value, max_size=9).map(
        lambda d: json.dumps({"v": 1, "destinations": [], **d}).encode())


@settings(max_examples=400, deadline=None)
@given(payload=st.one_of(st.binary(max_size=600), _JSONISH.map(str.encode), _hostile_reports(),
                         st.integers(1, 70_000).map(lambda n: b"[" * n), st.integers(1, 5_000).map(
                             lambda n: b'{"v": 1, "destinations": [], "sent_at": ' + b"7" * n + b"}")))
def test_any_bytes_give_a_bounded_report_or_a_report_error(payload):
    """Only ReportError escapes (never RecursionError, OverflowError, TypeError...); what is accepted is the
    documented shape with finite numbers, so the status API can always serialise it."""
    try:
        parsed = parse_report(payload).as_dict()
    except ReportError:
        return
    assert set(_report()) <= set(parsed) <= set(_report()) | {"spool"}
    text = json.dumps(parsed, allow_nan=False)
    assert len(text) < 100_000


# --- site_condition --------------------------------------------------------------------------------------


def _condition(report: dict | None = None, *, connected: bool = True, reason: str = "", age: float = 1.0):
    parsed = parse_report(json.dumps(report).encode()) if report is not None else None
    return site_condition(connected=connected, disconnect_reason=reason, report=parsed,
                          report_at=None if report is None else NOW - age, now=NOW)


def test_down_when_disconnected_with_the_reason():
    health = _condition(_report(), connected=False, reason="peer silent for 30.2s")
    assert health.condition is Condition.DOWN and health.reason == "peer silent for 30.2s"
    assert _condition(None, connected=False).reason == "never connected"


def test_degraded_without_a_report():
    health = _condition(None)
    assert health.condition is Condition.DEGRADED and "no health report" in health.reason


def test_degraded_with_a_stale_report():
    health = _condition(_report(), age=30.0 * 3)
    assert health.condition is Condition.DEGRADED and "no health report for 90 s" == health.reason
    assert _condition(_report(), age=30.0 * 2).condition is Condition.UP  # within 2.5 intervals


def test_degraded_names_the_failing_route_and_reason():
    failing = _dest(ok=False, last_failure=NOW, last_failure_reason="connection refused", latency_ms=None)
    health = _condition(_report(destinations=[_dest(route="archive"), failing]))
    assert health.condition is Condition.DEGRADED
    assert health.reason == "C-ECHO pacs (127.0.0.1:4242) failed: connection refused"
    two = _condition(_report(destinations=[failing, {**failing, "route": "archive"}]))
    assert two.reason.endswith("connection refused (and 1 more)")


def test_degraded_when_the_certificate_expires_soon_and_renewal_fails():
    expiring = {"not_after": NOW + 2 * 86400, "renewal_error": "relay refused the renewal (403)"}
    health = _condition(_report(certificate=expiring))
    assert health.condition is Condition.DEGRADED
    assert "expires in 2.0 days" in health.reason and "relay refused the renewal (403)" in health.reason
    # Expiring while renewal has not failed, or failing renewal with plenty of time, is still up.
    assert _condition(_report(certificate={**expiring, "renewal_error": ""})).condition is Condition.UP
    far = {"not_after": NOW + 20 * 86400, "renewal_error": "x"}
    assert _condition(_report(certificate=far)).condition is Condition.UP


def test_up_otherwise_including_destinations_not_checked_yet():
    assert _condition(_report()) == _condition(_report(destinations=[_dest(ok=None)]))
    health = _condition(_report())
    assert health.condition is Condition.UP and health.reason == "ok"
    assert _condition(_report(destinations=[])).condition is Condition.UP


def test_readiness():
    assert not relay_readiness(started=False, registry_ok=True).ready
    assert relay_readiness(started=True, registry_ok=False).reason == "registry unavailable"
    assert relay_readiness(started=True, registry_ok=True).ready
    shared_down = relay_readiness(started=True, registry_ok=False, registry_shared=True)
    assert shared_down.ready and "shared registry is unavailable" in shared_down.reason
    assert not relay_readiness(started=False, registry_ok=True, registry_shared=True).ready
    assert relay_readiness(started=True, registry_ok=True, draining=True) == Readiness(False, "draining")
    assert agent_readiness(state=AgentState.CONNECTED, last_error="").ready
    waiting = agent_readiness(state=AgentState.BACKOFF, last_error="ConnectionRefusedError: x")
    assert not waiting.ready and waiting.reason == "tunnel backoff: ConnectionRefusedError: x"
    assert agent_readiness(state=AgentState.CONNECTING, last_error="").reason == "tunnel connecting"


# --- the agent's side: reasons and the report ----------------------------------------------------------


@pytest.mark.parametrize(("attempt", "reason"), [
    (EchoAttempt(True, True, True, 0x0000, latency=0.01), ""),
    (EchoAttempt(False, tcp_error="connection refused"), "connection refused"),
    (EchoAttempt(False), "connection refused"),
    (EchoAttempt(True, True, rejection="Rejected Permanent, Service User: Called AE title not recognised"),
     "association rejected (Rejected Permanent, Service User: Called AE title not recognised)"),
    (EchoAttempt(True), "no answer within 5 s"),
    (EchoAttempt(True, aborted=True), "association aborted before an answer"),
    (EchoAttempt(True, True), "association aborted (Verification not accepted)"),
    (EchoAttempt(True, True, True), "no C-ECHO response within 5 s"),
    (EchoAttempt(True, True, True, aborted=True), "association aborted during the C-ECHO"),
    (EchoAttempt(True, True, True, 0x0110), "C-ECHO status 0x0110"),
])
def test_echo_reason(attempt, reason):
    assert echo_reason(attempt, 5.0) == reason


def test_destination_keeps_last_success_and_last_failure():
    dest = DestinationHealth.of(AgentRoute(name="pacs", host="127.0.0.1", port=4242))
    assert dest.called_ae == "ANY-SCP" and dest.ok is None
    dest.record("", 0.0032, NOW)
    assert (dest.ok, dest.latency_ms, dest.last_success, dest.last_failure) == (True, 3.2, NOW, None)
    dest.record("connection refused", None, NOW + 30)
    assert (dest.ok, dest.latency_ms, dest.last_success) == (False, None, NOW)
    assert (dest.last_failure, dest.last_failure_reason, dest.checked_at) == (NOW + 30, "connection refused",
                                                                               NOW + 30)
    dest.record("", 0.004, NOW + 60)
    assert dest.ok and dest.last_failure == NOW + 30 and dest.last_failure_reason == "connection refused"


def test_built_report_is_exactly_what_the_relay_parses():
    dests = [DestinationHealth.of(AgentRoute(name="pacs", host="10.0.0.5", port=104, called_ae="ORTHANC")),
             DestinationHealth.of(AgentRoute(name="archive", host="10.0.0.6", port=11112))]
    dests[0].record("", 0.0021, NOW)
    dests[1].record("no answer within 5 s", None, NOW)
    host = host_metrics(Path("/"), psutil.Process())
    built = build_report(version="0.1.0", now=NOW, interval=30.0, destinations=dests, host=host,
                         rtt_ms=1.25, reconnects=2, not_after=NOW + 86400, renewal_error="")
    report = built.as_dict()
    assert set(report) == {"v", "version", "sent_at", "report_interval", "destinations", "host", "tunnel",
                           "certificate"}
    assert built.encode() == json.dumps(report).encode()
    parsed = parse_report(built.encode())
    assert parsed.as_dict() == json.loads(json.dumps(report)) | {
        "host": {k: float(v) for k, v in asdict(host).items()}, "tunnel": {"rtt_ms": 1.25, "reconnects": 2.0}}
    health = site_condition(connected=True, disconnect_reason="", report=parsed, report_at=NOW, now=NOW)
    assert health.reason == "C-ECHO archive (10.0.0.6:11112) failed: no answer within 5 s"


def test_the_largest_report_fits_a_report_frame():
    dest = DestinationHealth("r" * 64, "h" * 253, 65535, "ANY-SCP")
    dest.record("x" * 10_000, None, NOW)
    spool = SpoolReport("s" * 63, "A" * 16, 1e12, 1e15, 1e9, 1e12, 1e12, "e" * 10_000)
    report = build_report(version="0.1.0", now=NOW, interval=30.0, destinations=[dest] * 100,
                          host=host_metrics(Path("/"), psutil.Process()), rtt_ms=None, reconnects=0,
                          not_after=None, renewal_error="y" * 10_000, spool=(spool,) * 100)
    payload = report.encode()
    assert len(payload) <= MAX_REPORT
    parsed = parse_report(payload)
    assert len(parsed.destinations) == 64 and len(parsed.spool) == 16
    assert parsed.spool[0].last_error == "e" * 200


def test_spool_entries_are_read_with_the_same_care_as_the_rest():
    report = _report()
    report["spool"] = [{"name": "cloud\x07", "called_ae": 5, "instances": "12", "bytes": float("inf"),
                        "oldest_age": 3.5, "forwarded": True, "quarantined": 2, "last_error": "x" * 1000},
                       "not an object"]
    parsed = parse_report(json.dumps(report).encode()).spool
    assert parsed[0] == SpoolReport("cloud?", "", None, None, 3.5, None, 2.0, "x" * 300)
    assert parsed[1] == SpoolReport()
    report["spool"] = {"not": "a list"}
    assert parse_report(json.dumps(report).encode()).spool == ()
    assert "spool" not in parse_report(json.dumps(_report()).encode()).as_dict()  # an agent without a spool


def test_host_metrics_use_the_nearest_existing_directory(tmp_path):
    metrics = host_metrics(tmp_path / "not" / "yet", psutil.Process())
    assert set(asdict(metrics)) == {"cpu_percent", "memory_percent", "disk_free_bytes", "rss_bytes", "open_fds"}
    assert metrics.disk_free_bytes == pytest.approx(psutil.disk_usage(str(tmp_path)).free, rel=0.05)
    assert metrics.rss_bytes > 0 and metrics.open_fds > 0 and 0 <= metrics.memory_percent <= 100


# --- C-ECHO against real peers on 127.0.0.1 ----------------------------------------------------------------


@contextlib.contextmanager
def verification_scp(ae_title: str = "PACS", *, require_called_aet: bool = False,
                     verification: bool = True) -> Iterator[int]:
    """A pynetdicom SCP on a free loopback port (Verification, or only CT storage); shut down on exit."""
    from pynetdicom import AE
    from pynetdicom.sop_class import CTImageStorage, Verification

    ae = AE(ae_title=ae_title)
    ae.add_supported_context(Verification if verification else CTImageStorage)
    ae.require_called_aet = require_called_aet
    server = ae.start_server(("127.0.0.1", 0), block=False)
    try:
        yield server.socket.getsockname()[1]
    finally:
        server.shutdown()


@contextlib.contextmanager
def silent_server(close_at_once: bool) -> Iterator[int]:
    """Accepts TCP and never answers DICOM (or closes the connection at once)."""
    listener = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []

    def serve() -> None:
        with contextlib.suppress(OSError):
            conn, _ = listener.accept()
            if close_at_once:
                conn.close()
            else:
                accepted.append(conn)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        listener.close()
        thread.join(5)
        for conn in accepted:
            conn.close()


def _closed_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as s:
        return s.getsockname()[1]


def test_c_echo_succeeds_and_measures_latency():
    with verification_scp() as port:
        attempt = c_echo("127.0.0.1", port, "PACS", "TUNNEL-HEALTH", 5.0)
    assert echo_reason(attempt, 5.0) == "" and attempt.latency is not None and attempt.latency > 0


def test_c_echo_reasons_from_real_peers():
    assert echo_reason(c_echo("127.0.0.1", _closed_port(), "PACS", "T", 2.0), 2.0) == "connection refused"
    with verification_scp(require_called_aet=True) as port:
        rejected = echo_reason(c_echo("127.0.0.1", port, "WRONG", "T", 2.0), 2.0)
    assert rejected == "association rejected (Rejected Permanent, Service User: Called AE title not recognised)"
    with verification_scp(verification=False) as port:
        assert echo_reason(c_echo("127.0.0.1", port, "PACS", "T", 2.0), 2.0) == \
            "association aborted (Verification not accepted)"
    with silent_server(close_at_once=False) as port:
        assert echo_reason(c_echo("127.0.0.1", port, "PACS", "T", 0.5), 0.5) == "no answer within 0.5 s"
    with silent_server(close_at_once=True) as port:
        assert echo_reason(c_echo("127.0.0.1", port, "PACS", "T", 2.0), 2.0) == \
            "association aborted before an answer"
    unresolvable = echo_reason(c_echo("no-such-host.invalid", 104, "PACS", "T", 2.0), 2.0)
    assert unresolvable.startswith("cannot resolve no-such-host.invalid")


# --- the monitor ---------------------------------------------------------------------------------------------


class FakeSession:
    rtt = 0.002

    def __init__(self) -> None:
        self.reports: list[dict] = []

    def send_report(self, payload: bytes) -> None:
        self.reports.append(parse_report(payload).as_dict())


class FakeAgent:
    def __init__(self) -> None:
        self.session: FakeSession | None = None
        self.connects = 0
        self.renewal_error = ""

    def certificate_not_after(self) -> float | None:
        return NOW


async def test_monitor_echoes_all_routes_and_reports_to_each_new_tunnel(tmp_path):
    agent = FakeAgent()
    with verification_scp() as pacs:
        routes = [AgentRoute(name="pacs", host="127.0.0.1", port=pacs, called_ae="PACS"),
                  AgentRoute(name="archive", host="127.0.0.1", port=_closed_port())]
        monitor = HealthMonitor(agent, agent, HealthConfig(echo_interval=60.0, echo_timeout=2.0), routes,
                                state_dir=tmp_path, version="9.9")
        async with asyncio.timeout(30):
            task = asyncio.create_task(monitor.run())
            try:
                while monitor.rounds < 1:
                    await asyncio.sleep(0.05)
                assert monitor.latest is not None and monitor.latest.version == "9.9"
                ok = {d.route: d.ok for d in monitor.latest.destinations}
                assert ok == {"pacs": True, "archive": False}
                # A tunnel comes up between rounds (60 s apart): it gets the report at once.
                agent.session, agent.connects = FakeSession(), 1
                while not agent.session.reports:
                    await asyncio.sleep(0.05)
                (report,) = agent.session.reports
                assert report["tunnel"] == {"rtt_ms": 2.0, "reconnects": 0.0}
                assert report["destinations"][1]["last_failure_reason"] == "connection refused"
                assert report["report_interval"] == 60.0 and report["certificate"]["not_after"] == NOW
            finally:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
