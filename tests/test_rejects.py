"""DESIGN.md's reject table and hostile first bytes, at the relay and the agent, with raw sockets and
dcmtk's own reject messages; other associations are unharmed throughout."""

from __future__ import annotations

import struct
import time

import pytest

from tests.support.dcmtk import echoscu, start_storescp
from tests.support.ports import free_port
from tests.support.rawdicom import associate_rq, connect, read_until_closed, request_reject
from tests.support.stack import (
    AgentRoute,
    ListenerRoute,
    SiteDest,
    make_agent,
    make_relay,
    start_agent,
    start_relay,
)

ARTIM = 1.0


@pytest.fixture
def stack(procs, tmp_path):
    pacs_port, cloud_port = free_port(), free_port()
    start_storescp(procs, pacs_port, "PACS", tmp_path / "pacs")
    start_storescp(procs, cloud_port, "CLOUD", tmp_path / "cloud")
    relay = make_relay(
        tmp_path / "relay",
        listener_routes=[ListenerRoute("HOSP_PACS", "hospital-a", "pacs", ["CLOUDAI"]),
                         ListenerRoute("OFFLINE_PACS", "hospital-b", "pacs"),
                         ListenerRoute("NOROUTE", "hospital-a", "secret")],
        sites={"hospital-a": [SiteDest("CLOUD", cloud_port, ["MODALITY"])], "hospital-b": []},
        artim=ARTIM)
    agent = make_agent(relay, "hospital-a", tmp_path / "agent", routes=[AgentRoute("pacs", pacs_port)],
                       artim=ARTIM)
    start_relay(procs, relay)
    start_agent(procs, agent, relay)
    return relay, agent


def test_reject_table_at_the_relay(stack):
    relay, _agent = stack
    port = relay.dicom_port
    assert request_reject(port, "NOBODY", "CLOUDAI")[0] == (1, 1, 7)
    assert request_reject(port, "HOSP_PACS", "INTRUDER")[0] == (1, 1, 3)
    reason, elapsed = request_reject(port, "OFFLINE_PACS", "CLOUDAI")
    assert reason == (2, 3, 1)
    assert elapsed < 2.0
    print(f"site offline rejected in {elapsed * 1000:.1f} ms")
    # A route the agent never configured: the relay asks, the agent refuses, the caller hears 1/1/7.
    assert request_reject(port, "NOROUTE", "CLOUDAI")[0] == (1, 1, 7)


def test_reject_table_at_the_agent(stack):
    _relay, agent = stack
    port = agent.listener_port
    assert request_reject(port, "NOBODY", "MODALITY")[0] == (1, 1, 7)
    assert request_reject(port, "CLOUD", "INTRUDER")[0] == (1, 1, 3)


def test_dcmtk_reports_the_rejects(stack):
    relay, _agent = stack
    cases = {
        ("NOBODY", "CLOUDAI"): "Called AE Title Not Recognized",
        ("HOSP_PACS", "INTRUDER"): "Calling AE Title Not Recognized",
        ("OFFLINE_PACS", "CLOUDAI"): "Temporary Congestion",
    }
    for (called, calling), message in cases.items():
        result = echoscu("127.0.0.1", relay.dicom_port, called, calling, timeout=10)
        assert not result.ok
        text = result.stdout + result.stderr
        assert "Association Rejected" in text and message in text, text


HOSTILE = {
    "oversized": struct.pack("!BBI", 1, 0, 2 * 1024 * 1024) + b"\x00" * 64,
    "http": b"GET / HTTP/1.1\r\nHost: relay\r\n\r\n",
    "tls-client-hello": bytes.fromhex("16030100f4010000f00303") + b"\x00" * 32,
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_first_bytes_are_closed_without_harm(stack, name):
    relay, _agent = stack
    with connect(relay.dicom_port) as bystander:
        # An association in progress on the same listener, before and after the hostile caller.
        bystander.sendall(associate_rq("HOSP_PACS", "CLOUDAI"))
        with connect(relay.dicom_port) as hostile:
            hostile.sendall(HOSTILE[name])
            data, elapsed = read_until_closed(hostile, timeout=ARTIM + 3)
        assert data == b"", f"{name}: expected a silent close, got {data[:16].hex()}"
        bystander.settimeout(5)
        answer = bystander.recv(6)
        assert answer[:1] == b"\x02", "the bystander's association was accepted by the PACS"
    assert echoscu("127.0.0.1", relay.dicom_port, "HOSP_PACS", "CLOUDAI").ok


def test_silent_caller_is_closed_after_artim(stack):
    relay, agent = stack
    for port in (relay.dicom_port, agent.listener_port):
        with connect(port) as silent:
            start = time.monotonic()
            data, _ = read_until_closed(silent, timeout=ARTIM + 3)
            elapsed = time.monotonic() - start
        assert data == b""
        assert ARTIM * 0.9 <= elapsed < ARTIM + 2, elapsed
    assert echoscu("127.0.0.1", relay.dicom_port, "HOSP_PACS", "CLOUDAI").ok
