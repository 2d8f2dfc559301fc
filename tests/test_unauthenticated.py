"""What a connection that never authenticates may cost the relay (issue 10), against a real relay process:
idle TCP and idle TLS connections are closed within their deadlines, sources beyond their cap are refused
at once, a real agent connects while hundreds are held, and a peer's garbage HTTP reaches the log as one
short, escaped line."""

from __future__ import annotations

import asyncio
import re
import ssl
import time
import urllib.request
from pathlib import Path

import pytest

from tests.support.dcmtk import echoscu, start_storescp
from tests.support.ports import free_port
from tests.support.stack import AgentRoute, ListenerRoute, make_agent, make_relay, start_agent, start_relay

DEADLINE = 2.0  # [tunnel] handshake_timeout and request_timeout in these tests
SLACK = 2.0  # the relay's timer granularity and a loaded machine
PER_SOURCE = 120
IDLE_SOURCES = ("127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5", "127.0.0.6")  # 100 each: 500 in all


@pytest.fixture
def relay_and_agent(procs, tmp_path: Path):
    pacs = free_port()
    start_storescp(procs, pacs, "PACS", tmp_path / "pacs")
    relay = make_relay(tmp_path / "relay", listener_routes=[ListenerRoute("HOSP_PACS", "hospital-a", "pacs")],
                       sites={"hospital-a": []},
                       tunnel=[f"handshake_timeout = {DEADLINE}", f"request_timeout = {DEADLINE}",
                               f"max_unauthenticated_per_source = {PER_SOURCE}", "max_unauthenticated = 1000"])
    agent = make_agent(relay, "hospital-a", tmp_path / "agent", routes=[AgentRoute("pacs", pacs)])
    start_relay(procs, relay)
    return relay, agent


async def _connect(port: int, source: str, tls: ssl.SSLContext | None = None):
    return await asyncio.wait_for(
        asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0), ssl=tls,
                                server_hostname="127.0.0.1" if tls else None), 10)


async def _closed_after(reader: asyncio.StreamReader, opened: float, limit: float) -> float:
    """Seconds from ``opened`` until the relay closed the connection; fails past ``limit``."""
    try:
        async with asyncio.timeout(limit - (time.monotonic() - opened)):
            while await reader.read(4096):
                pass
    except (ConnectionError, ssl.SSLError):
        pass
    except TimeoutError as exc:
        raise AssertionError(f"connection still open {limit:.1f}s after it was made") from exc
    return time.monotonic() - opened


def _metric(relay, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{relay.admin_port}/metrics", timeout=5) as r:
        text = r.read().decode()
    match = re.search(rf"^{name} (\S+)$", text, re.M)
    assert match, f"{name} not in /metrics"
    return float(match.group(1))


async def test_idle_connections_are_closed_within_their_deadline_while_an_agent_connects(procs, relay_and_agent):
    relay, agent = relay_and_agent
    port = relay.tunnel_port
    opened = time.monotonic()
    idle = [await _connect(port, source) for source in IDLE_SOURCES for _ in range(100)]  # bare TCP, silent
    # A TLS client that finishes the handshake and then never sends a request.
    client = ssl.create_default_context(cafile=str(relay.state_dir / "ca.crt"))
    quiet_tls = [await _connect(port, "127.0.0.7", client) for _ in range(10)]
    quiet_at = time.monotonic()
    try:
        await asyncio.sleep(0.2)
        assert _metric(relay, "dicom_tunnel_unauthenticated_connections") >= 500
        # A real agent connects while all of them are held, and carries an association.
        await asyncio.to_thread(start_agent, procs, agent, relay)
        assert (await asyncio.to_thread(echoscu, "127.0.0.1", relay.dicom_port, "HOSP_PACS", "CLOUDAI")).ok
        waits = await asyncio.gather(*(_closed_after(r, opened, len(idle) / 500 + DEADLINE + SLACK)
                                       for r, _w in idle))
        quiet = await asyncio.gather(*(_closed_after(r, quiet_at, DEADLINE + SLACK) for r, _w in quiet_tls))
    finally:
        for _r, w in idle + quiet_tls:
            w.transport.abort()
    print(f"500 idle TCP connections closed after {min(waits):.2f}-{max(waits):.2f}s, "
          f"10 idle TLS connections after {min(quiet):.2f}-{max(quiet):.2f}s")
    assert min(waits) >= DEADLINE * 0.9, "closed before their handshake deadline"
    await asyncio.sleep(0.2)
    assert _metric(relay, "dicom_tunnel_unauthenticated_connections") == 0
    assert _metric(relay, "dicom_tunnel_tls_handshake_failures_total") >= 500
    assert agent.status()["state"] == "connected"


async def test_a_source_beyond_its_cap_is_refused_at_once_and_others_are_not(relay_and_agent):
    relay, _agent = relay_and_agent
    port = relay.tunnel_port
    held = [await _connect(port, "127.0.0.8") for _ in range(PER_SOURCE)]
    try:
        extra = [await _connect(port, "127.0.0.8") for _ in range(5)]
        refused_after = await asyncio.gather(*(_closed_after(r, time.monotonic(), 1.0) for r, _w in extra))
        assert max(refused_after) < DEADLINE, "a connection beyond the source's cap was held"
        other = await _connect(port, "127.0.0.9")
        await asyncio.sleep(0.3)
        assert not other[0].at_eof(), "another source was refused with the first one"
        other[1].transport.abort()
        assert _metric(relay, "dicom_tunnel_unauthenticated_refused_total") == 5
    finally:
        for _r, w in held:
            w.transport.abort()


async def test_garbage_after_a_valid_request_is_one_short_log_line(relay_and_agent):
    relay, _agent = relay_and_agent
    client = ssl.create_default_context(cafile=str(relay.state_dir / "ca.crt"))
    reader, writer = await _connect(relay.tunnel_port, "127.0.0.1", client)
    try:
        writer.write(b"GET /enroll/v1/ca HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        await writer.drain()
        async with asyncio.timeout(5):
            head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200")
        attacker = b"\x00\xffEVIL" + b"A" * 65536 + b"\r\n\r\n"
        writer.write(attacker)
        await writer.drain()
        await _closed_after(reader, time.monotonic(), 5.0)
    finally:
        writer.transport.abort()
    await asyncio.sleep(0.3)
    log = relay.proc.log_text()
    assert "Traceback" not in log
    assert "A" * 100 not in log, "the peer's bytes reached the log beyond a short prefix"
    lines = [line for line in log.splitlines() if "Error handling request" in line]
    assert len(lines) == 1, lines
    assert "\\x00" in lines[0] or "BadHttp" in lines[0] or "BadStatus" in lines[0], lines[0]
