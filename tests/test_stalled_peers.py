"""A peer that stops reading must never freeze the relay (or the agent) for anyone else (issue 10).

Real relay and agent processes, real dcmtk peers. The stalled peers are a hand-driven WebSocket that
upgrades with the site's certificate, takes streams and credit, and then never reads again; an agent
under SIGSTOP with 16 transfers in flight; and, on the agent's side, a relay under SIGSTOP. In each case:
the peer is declared dead within three heartbeats, the same site reconnecting is served within a second,
and another site's revocation takes effect within the sweep meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from relay.registry import Registry
from tests.support.dcmtk import echoscu, require_binary, start_storescp
from tests.support.ports import free_port, free_ports
from tests.support.procs import wait_until
from tests.support.rawdicom import associate_rq
from tests.support.rawws import RawWebSocket, open_raw_websocket
from tests.support.stack import (
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
from tunnel_core import frames as fr
from tunnel_core import mux as m
from tunnel_core.codes import FrameType
from tunnel_demo.dataset import generate_study
from tunnel_link.tls import client_context

HEARTBEAT = 2.0  # relay and agents: dead after 3 silent (or blocked) intervals, 6 s
DEAD_WITHIN = 3 * HEARTBEAT + 1.5  # three intervals, plus the time to notice and report it
STREAMS = 16
# Instances above the 4 MiB stream window: 16 transfers then hold 64 MiB in flight, more than the kernel's
# socket buffers can hide, so a frozen peer really leaves the sender's buffer full.
STUDY = {"n_instances": 6, "rows": 1536, "cols": 1536}
GUARD = 60.0


def _site(relay: RelayHandle, name: str) -> dict:
    return next(s for s in relay.status()["sites"] if s["name"] == name)


def _revoke_in_registry(relay: RelayHandle, site: str) -> None:
    """Revoke as another process would (a second relay, an operator's script): straight into the registry,
    so only the relay's once-a-second sweep can notice it."""
    registry = Registry.open(relay.state_dir)
    try:
        registry.revoke_site(site, time.time(), "test", "revoked while another site is stalled")
    finally:
        registry.close()


async def _stall(ws: RawWebSocket, streams: int) -> None:
    """Act as the agent until the relay has opened ``streams`` streams, grant them (and the connection)
    lots of credit so the relay keeps sending, then stop reading for good."""
    mux = m.Mux(m.Role.AGENT)
    grants = [fr.encode(FrameType.WINDOW, 0, fr.encode_window(2**30))]
    opened: set[int] = set()
    async with asyncio.timeout(GUARD):
        while len(opened) < streams:
            opcode, payload = await ws.receive()
            if opcode != 0x2:
                continue
            for event in mux.receive_data(payload):
                if isinstance(event, m.StreamOpened):
                    opened.add(event.stream_id)
                    grants.append(fr.encode(FrameType.WINDOW, event.stream_id, fr.encode_window(2**28)))
        await ws.send(b"".join(grants))


async def _push(port: int, called: str, megabytes: int) -> None:
    """A cloud caller that sends its A-ASSOCIATE-RQ and then pushes bytes as fast as the relay takes them,
    without waiting for an answer (the relay splices after the request). Ends when the relay stops taking
    them for long, or closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(associate_rq(called, "CLOUDAI"))
        chunk = bytes(64 * 1024)
        for _ in range(megabytes * 16):
            writer.write(chunk)
            await asyncio.wait_for(writer.drain(), 30)
    except (TimeoutError, ConnectionError):
        pass
    finally:
        writer.transport.abort()


@dataclass
class Sites:
    relay: RelayHandle
    agent_a: AgentHandle
    agent_b: AgentHandle
    pacs_a: int
    cloud: int


@pytest.fixture
def sites(procs, tmp_path: Path) -> Sites:
    """A relay with two sites: hospital-a (whose peer will stall) and hospital-b (connected, to be revoked)."""
    pacs_a, pacs_b, cloud = free_port(), free_port(), free_port()
    # --fork: the associations a frozen agent still holds open must not keep the PACS from others.
    start_storescp(procs, pacs_a, "PACS", tmp_path / "pacs-a", ["--fork"])
    start_storescp(procs, pacs_b, "PACS", tmp_path / "pacs-b")
    start_storescp(procs, cloud, "CLOUD", tmp_path / "cloud", ["--fork"])
    relay = make_relay(tmp_path / "relay", heartbeat=HEARTBEAT,
                       listener_routes=[ListenerRoute("A_PACS", "hospital-a", "pacs"),
                                        ListenerRoute("B_PACS", "hospital-b", "pacs")],
                       sites={"hospital-a": [SiteDest("CLOUD", cloud)], "hospital-b": []})
    agent_a = make_agent(relay, "hospital-a", tmp_path / "agent-a", routes=[AgentRoute("pacs", pacs_a)],
                         heartbeat=HEARTBEAT)
    agent_b = make_agent(relay, "hospital-b", tmp_path / "agent-b", routes=[AgentRoute("pacs", pacs_b)],
                         heartbeat=HEARTBEAT)
    start_relay(procs, relay)
    start_agent(procs, agent_b, relay)
    return Sites(relay, agent_a, agent_b, pacs_a, cloud)


def _standby(agent: AgentHandle, root: Path) -> AgentHandle:
    """A second agent host for the same site with the same certificate: the same config, its own ports."""
    root.mkdir(parents=True)
    status_port, listener_port = free_ports(2)
    text = agent.config.read_text()
    text = text.replace(f"port = {agent.status_port}\n", f"port = {status_port}\n")
    text = text.replace(f"port = {agent.listener_port}\n", f"port = {listener_port}\n")
    (root / "agent.toml").write_text(text)
    return AgentHandle(agent.site, root, root / "agent.toml", status_port, listener_port)


def _served_within(relay: RelayHandle, called: str, seconds: float) -> float:
    """Seconds until a C-ECHO through the relay to ``called`` succeeds; fails the test past ``seconds``."""
    start = time.monotonic()
    while True:
        result = echoscu("127.0.0.1", relay.dicom_port, called, "CLOUDAI", timeout=5)
        elapsed = time.monotonic() - start
        if result.ok:
            assert elapsed <= seconds, f"served only after {elapsed:.2f}s"
            return elapsed
        assert elapsed < seconds, f"not served within {seconds}s:\n{result.stdout}{result.stderr}"
        time.sleep(0.05)


def _revoke_other_site_meanwhile(relay: RelayHandle, since: float) -> None:
    """Revoke hospital-b where only the sweep sees it; its tunnel must close within 2 s, while the stall
    that started at ``since`` is still unresolved."""
    _revoke_in_registry(relay, "hospital-b")
    wait_until(lambda: not _site(relay, "hospital-b")["connected"], 2.0,
               message="hospital-b's tunnel closed by the sweep within 2 s")
    assert _site(relay, "hospital-a")["connected"], "the stall ended before the revocation was tested"
    assert time.monotonic() - since < 3 * HEARTBEAT


def _declared_dead(relay: RelayHandle, since: float) -> str:
    wait_until(lambda: not _site(relay, "hospital-a")["connected"], DEAD_WITHIN,
               message="the stalled tunnel declared dead within three heartbeats")
    assert time.monotonic() - since <= DEAD_WITHIN
    reason = _site(relay, "hospital-a")["last_disconnect_reason"]
    assert "peer silent" in reason or "stopped reading" in reason, reason
    return reason


async def test_a_socket_that_is_never_read_freezes_nothing(procs, sites: Sites) -> None:
    relay = sites.relay
    certs = sites.agent_a.root / "certs"
    ctx = client_context(certs / "agent.crt", certs / "agent.key", certs / "ca.crt")
    ws = await open_raw_websocket(relay.tunnel_port, ctx, receive_buffer=4096)
    pushers = [asyncio.create_task(_push(relay.dicom_port, "A_PACS", 16)) for _ in range(STREAMS)]
    try:
        await _stall(ws, STREAMS)
        stalled_at = time.monotonic()
        await asyncio.to_thread(_revoke_other_site_meanwhile, relay, stalled_at)
        await asyncio.to_thread(_declared_dead, relay, stalled_at)
        async with asyncio.timeout(GUARD):  # its callers are not left hanging
            await asyncio.gather(*pushers)
    finally:
        ws.close()
        for task in pushers:
            task.cancel()
        await asyncio.gather(*pushers, return_exceptions=True)
    # The same site reconnecting, with the real agent this time, is served at once.
    await asyncio.to_thread(start_agent, procs, sites.agent_a, relay)
    await asyncio.to_thread(_served_within, relay, "A_PACS", 1.0)


async def test_a_site_reconnecting_replaces_its_stalled_tunnel_at_once(procs, sites: Sites) -> None:
    relay = sites.relay
    certs = sites.agent_a.root / "certs"
    ctx = client_context(certs / "agent.crt", certs / "agent.key", certs / "ca.crt")
    ws = await open_raw_websocket(relay.tunnel_port, ctx, receive_buffer=4096)
    pushers = [asyncio.create_task(_push(relay.dicom_port, "A_PACS", 16)) for _ in range(STREAMS)]
    try:
        await _stall(ws, STREAMS)
        # The real agent connects while the old tunnel is still stalled, its send buffer full.
        await asyncio.to_thread(start_agent, procs, sites.agent_a, relay)
        await asyncio.to_thread(_served_within, relay, "A_PACS", 1.0)
        assert _site(relay, "hospital-a")["connects"] == 2
        # And the relay has dropped the stalled connection rather than waiting for it.
        async with asyncio.timeout(10):
            with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
                while await ws.reader.read(1 << 16):
                    pass
    finally:
        ws.close()
        for task in pushers:
            task.cancel()
        await asyncio.gather(*pushers, return_exceptions=True)


def _transfers_in_flight(procs, sites: Sites, tmp_path: Path, *, to_site: bool) -> list:
    """Start the agent and 16 storescu transfers (cloud → site through the relay, or modality → cloud
    through the agent); return once all 16 are associations in progress."""
    relay, agent = sites.relay, sites.agent_a
    start_agent(procs, agent, relay)
    study = generate_study(tmp_path / "study", **STUDY)
    port, called, calling, side = ((relay.dicom_port, "A_PACS", "CLOUDAI", relay) if to_site
                                   else (agent.listener_port, "CLOUD", "MODALITY", agent))
    scus = [procs.spawn([require_binary("storescu"), "-aet", calling, "-aec", called, "-to", "60", "-ta", "60",
                         "-td", "60", "127.0.0.1", str(port), *map(str, study.files)],
                        env={"TCP_NODELAY": "1"}, name=f"storescu-{i}") for i in range(STREAMS)]
    wait_until(lambda: len(side.status()["associations"]) >= STREAMS, 30,
               message=f"{STREAMS} transfers in flight")
    return scus


def test_a_frozen_agent_with_transfers_in_flight_is_declared_dead_and_replaced(procs, sites: Sites,
                                                                              tmp_path: Path) -> None:
    relay, agent = sites.relay, sites.agent_a
    scus = _transfers_in_flight(procs, sites, tmp_path, to_site=True)
    agent.proc.kill(signal.SIGSTOP)
    try:
        stopped_at = time.monotonic()
        _revoke_other_site_meanwhile(relay, stopped_at)
        _declared_dead(relay, stopped_at)
        for scu in scus:  # none is left hanging on the frozen agent
            scu.wait(30)
        standby = _standby(agent, tmp_path / "standby")
        start_agent(procs, standby, relay)
        _served_within(relay, "A_PACS", 1.0)
    finally:
        agent.proc.kill(signal.SIGCONT)


def test_a_standby_agent_replaces_a_frozen_one_at_once(procs, sites: Sites, tmp_path: Path) -> None:
    relay, agent = sites.relay, sites.agent_a
    scus = _transfers_in_flight(procs, sites, tmp_path, to_site=True)
    agent.proc.kill(signal.SIGSTOP)
    try:
        standby = _standby(agent, tmp_path / "standby")
        start_agent(procs, standby, relay)  # before the frozen one is declared dead
        _served_within(relay, "A_PACS", 1.0)
        assert _site(relay, "hospital-a")["connects"] == 2
        for scu in scus:
            scu.wait(30)
    finally:
        agent.proc.kill(signal.SIGCONT)


def test_the_agent_declares_a_frozen_relay_dead_with_transfers_in_flight(procs, sites: Sites,
                                                                         tmp_path: Path) -> None:
    relay, agent = sites.relay, sites.agent_a
    scus = _transfers_in_flight(procs, sites, tmp_path, to_site=False)
    relay.proc.kill(signal.SIGSTOP)
    try:
        stopped_at = time.monotonic()
        wait_until(lambda: agent.status()["state"] != "connected", DEAD_WITHIN,
                   message="the agent declared the frozen relay dead within three heartbeats")
        assert time.monotonic() - stopped_at <= DEAD_WITHIN
        reason = agent.status()["last_error"]
        assert "peer silent" in reason or "stopped reading" in reason, reason
        for scu in scus:  # the modalities hear of it; none hangs
            scu.wait(30)
    finally:
        relay.proc.kill(signal.SIGCONT)
    wait_until(lambda: agent.status()["state"] == "connected", 30, message="agent back once the relay runs")
    assert echoscu("127.0.0.1", agent.listener_port, "CLOUD", "MODALITY", timeout=10).ok
