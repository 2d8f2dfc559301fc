"""DESIGN.md's reject table and hostile first bytes, at the relay and the agent, with raw sockets and
dcmtk's own reject messages; other associations are unharmed throughout. AE titles that are not AE titles
(non-ASCII, control characters, backslash, all spaces) are answered 1/1/7 or 1/1/3, never a silent close,
and the log line names the caller's address."""

from __future__ import annotations

import asyncio
import re
import struct
import time

import aiohttp
import pytest

from tests.support.dcmtk import echoscu, start_storescp
from tests.support.muxclient import raw_agent
from tests.support.ports import free_port
from tests.support.procs import wait_until
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
from tunnel_core import mux as m
from tunnel_core.codes import ErrorCode, TargetKind
from tunnel_core.dicom import parse_reject

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


# --- AE fields that are not AE titles ---------------------------------------------------------------------


def rq_with_fields(called: bytes, calling: bytes) -> bytes:
    """A real A-ASSOCIATE-RQ (pynetdicom's encoding) with its two 16-byte AE fields replaced verbatim."""
    pdu = associate_rq("X", "Y")
    return pdu[:10] + called.ljust(16, b" ") + calling.ljust(16, b" ") + pdu[42:]


def raw_reject(port: int, called: bytes, calling: bytes) -> tuple[tuple[int, int, int], str]:
    """Send the RQ with those AE bytes; expect exactly one A-ASSOCIATE-RJ and a close. Returns the reason
    and our own "host:port", as the far side's log should name it."""
    with connect(port) as sock:
        me = "{}:{}".format(*sock.getsockname()[:2])
        sock.sendall(rq_with_fields(called, calling))
        data, _ = read_until_closed(sock, timeout=5)
    assert len(data) == 10, f"expected one A-ASSOCIATE-RJ PDU, got {data[:32].hex() or 'a silent close'}"
    return parse_reject(data), me


BAD_FIELDS = [  # (called, calling) bytes -> the reject; NUL and raw 0xff cannot be passed in echoscu's argv
    pytest.param(b"PA\x00CS", b"CLOUDAI", (1, 1, 7), id="called-NUL"),
    pytest.param(bytes(16), b"CLOUDAI", (1, 1, 7), id="called-all-NUL"),
    pytest.param(b"\xff\xfePACS", b"CLOUDAI", (1, 1, 7), id="called-not-utf8"),
    pytest.param(b"", b"CLOUDAI", (1, 1, 7), id="called-blank"),
    pytest.param(b"HOSP_PACS", b"CLOUD\x00AI", (1, 1, 3), id="calling-NUL"),
    pytest.param(b"HOSP_PACS", "CLOUDAÏ".encode(), (1, 1, 3), id="calling-utf8"),
    pytest.param(b"HOSP_PACS", b"", (1, 1, 3), id="calling-blank"),
    pytest.param(b"\x1b[31m", b"\r\n", (1, 1, 7), id="both-bad-called-first"),
]


def _log_names(proc, reason: tuple[int, int, int], peer: str) -> bool:
    return any(f"peer={peer} rejected {'/'.join(map(str, reason))}:" in line
               for line in proc.log_text().splitlines())


@pytest.mark.parametrize(("called", "calling", "reason"), BAD_FIELDS)
def test_bad_ae_bytes_are_rejected_at_the_relay_and_the_agent(stack, called, calling, reason):
    relay, agent = stack
    for side, port, proc in (("relay", relay.dicom_port, relay.proc), ("agent", agent.listener_port, agent.proc)):
        got, me = raw_reject(port, called, calling)
        assert got == reason, side
        wait_until(lambda p=proc, who=me: _log_names(p, reason, who), 5,
                   message=lambda p=proc, who=me, s=side: f"{s} log line naming {who}:\n{p.log_tail()}")
    # One line each, escaped: no raw control bytes of the title reach the log.
    for proc in (relay.proc, agent.proc):
        lines = [line for line in proc.log_text().splitlines() if " rejected 1/1/" in line]
        assert len(lines) == 1 and lines[0].isprintable() and "Traceback" not in proc.log_text()
    assert echoscu("127.0.0.1", relay.dicom_port, "HOSP_PACS", "CLOUDAI").ok


DCMTK_BAD_TITLES = [  # what echoscu itself puts on the wire for these arguments (checked with a capture):
    pytest.param("PACSÉ", "CLOUDAI", "Called AE Title Not Recognized", id="called-non-ascii"),  # UTF-8 bytes
    pytest.param(" " * 16, "CLOUDAI", "Called AE Title Not Recognized", id="called-all-spaces"),  # 16 spaces
    pytest.param("PA\\CS", "CLOUDAI", "Called AE Title Not Recognized", id="called-backslash"),
    pytest.param("HOSP_PACS", "    ", "Calling AE Title Not Recognized", id="calling-all-spaces"),
    pytest.param("HOSP_PACS", "CLOUD\x1bAI", "Calling AE Title Not Recognized", id="calling-ESC"),
]


@pytest.mark.parametrize(("called", "calling", "message"), DCMTK_BAD_TITLES)
def test_dcmtk_reports_the_reject_for_bad_titles(stack, called, calling, message):
    """Before: "Peer aborted Association (or never connected)", which sends on-call hunting a network
    fault. Now dcmtk names the title, at the relay and at the agent, and the log names the caller."""
    relay, agent = stack
    code = "1/1/7" if message.startswith("Called") else "1/1/3"
    for port, proc in ((relay.dicom_port, relay.proc), (agent.listener_port, agent.proc)):
        result = echoscu("127.0.0.1", port, called, calling, timeout=10)
        text = result.stdout + result.stderr
        assert not result.ok and "Association Rejected" in text and message in text, text
        assert "Peer aborted" not in text, text
        line = wait_until(lambda p=proc: [ln for ln in p.log_text().splitlines() if f"rejected {code}:" in ln],
                          5, message=lambda p=proc: f"the rejection's log line:\n{p.log_tail()}")
        assert re.search(r"peer=127\.0\.0\.1:\d+ rejected", line[0]), line
        assert "peer=None" not in proc.log_text() and "peer=-" not in proc.log_text()
    assert echoscu("127.0.0.1", relay.dicom_port, "HOSP_PACS", "CLOUDAI").ok


async def _first_data(raw, sid: int, timeout: float = 5.0) -> bytes:
    """The first DATA the relay sends on ``sid`` (a RESET instead fails the test)."""
    async with asyncio.timeout(timeout):
        while True:
            for event in raw.events:
                if isinstance(event, m.DataReceived) and event.stream_id == sid:
                    return bytes(event.data)
                assert not (isinstance(event, m.StreamReset) and event.stream_id == sid), event
            msg = await raw.ws.receive()
            assert msg.type is aiohttp.WSMsgType.BINARY, msg
            raw.events += raw.mux.receive_data(msg.data)
            await raw.flush()


async def test_a_stream_with_a_bad_ae_is_reset_with_the_code_that_means_the_same_reject(procs, tmp_path):
    """The ingress checks titles, but a stream's receiver does not trust that: a hand-driven agent with the
    site's certificate sends RQs with bad titles; the relay resets with UNKNOWN_ROUTE / CALLING_AE_REFUSED
    (which an ingress answers 1/1/7 / 1/1/3, docs/protocol.md §10) and logs it with the tunnel and stream;
    the same tunnel then carries a good association."""
    cloud_port = free_port()
    start_storescp(procs, cloud_port, "CLOUD", tmp_path / "cloud")
    relay = make_relay(tmp_path / "relay", listener_routes=[],
                       sites={"hospital-a": [SiteDest("CLOUD", cloud_port, ["MODALITY"])]})
    agent = make_agent(relay, "hospital-a", tmp_path / "agent", routes=[])  # its certificate only
    start_relay(procs, relay)
    async with raw_agent(relay.tunnel_port, agent.root / "certs") as raw:
        sid = await raw.open(TargetKind.CALLED_AE, "CLOUD", rq_with_fields(b"CL\x00OUD", b"MODALITY"))
        assert await raw.wait_reset(sid) is ErrorCode.UNKNOWN_ROUTE
        sid = await raw.open(TargetKind.CALLED_AE, "CLOUD", rq_with_fields(b"CLOUD", b" " * 16))
        assert await raw.wait_reset(sid) is ErrorCode.CALLING_AE_REFUSED
        sid = await raw.open(TargetKind.CALLED_AE, "CLOUD", associate_rq("CLOUD", "MODALITY"))
        assert (await _first_data(raw, sid))[:1] == b"\x02"  # the cloud SCP's A-ASSOCIATE-AC
    log = relay.proc.log_text()
    assert re.search(r"tunnel=hospital-a stream=\d+ refused \(UNKNOWN_ROUTE\): called AE title 'CL\\x00OUD' "
                     r"is not a valid AE title", log), log
    assert re.search(r"tunnel=hospital-a stream=\d+ refused \(CALLING_AE_REFUSED\): calling AE title ''", log), log
    assert "Traceback" not in log
