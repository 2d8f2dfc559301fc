"""Version negotiation against a real relay (docs/protocol.md §1.1): an agent that offers the mux
protocol's subprotocols gets `dicom-tunnel.1` back; one that offers nothing (an agent older than
negotiation) or only versions the relay does not speak gets no subprotocol, which means version 1, and
its tunnel works all the same."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from tests.support.stack import make_agent, make_relay, start_relay
from tunnel_core import mux as m
from tunnel_link.tls import client_context
from tunnel_link.transport import SUBPROTOCOLS

SITE = "hospital-a"


@pytest.fixture
def relay(procs, tmp_path):
    handle = make_relay(tmp_path / "relay", listener_routes=[], sites={SITE: []})
    make_agent(handle, SITE, tmp_path / "agent", routes=[])  # the site's certificate
    start_relay(procs, handle)
    return handle


async def _pong_over(ws: aiohttp.ClientWebSocketResponse) -> None:
    """A PING through the mux is answered: the relay serves this tunnel."""
    mux = m.Mux(m.Role.AGENT)
    mux.ping(b"version1")
    await ws.send_bytes(bytes(mux.data_to_send()))
    async with asyncio.timeout(5):
        while True:
            msg = await ws.receive()
            assert msg.type is aiohttp.WSMsgType.BINARY, msg
            if any(isinstance(e, m.PongReceived) for e in mux.receive_data(msg.data)):
                return


@pytest.mark.parametrize(("offered", "selected"), [(SUBPROTOCOLS, "dicom-tunnel.1"), ((), None),
                                                   (("dicom-tunnel.9",), None)])
async def test_the_relay_selects_the_version_it_speaks_or_none(relay, tmp_path, offered, selected) -> None:
    certs = tmp_path / "agent" / "certs"
    ctx = client_context(certs / "agent.crt", certs / "agent.key", certs / "ca.crt")
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx)) as http:
        async with http.ws_connect(f"wss://127.0.0.1:{relay.tunnel_port}/tunnel", compress=0,
                                   protocols=offered) as ws:
            assert ws.protocol == selected
            await _pong_over(ws)
