"""The mitmproxy harness (tests/support/mitm.py) really intercepts: HTTPS and a WebSocket through it
arrive, the client saw mitmproxy's certificate, and the flow dump holds what they carried in clear."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from relay.pki import init_ca, issue_server_cert
from tests.support.mitm import MitmProxy, start_mitmproxy
from tests.support.procs import ProcessTracker

LOOPBACK = "127.0.0.1"
GUARD = 60.0
REQUEST_MARKER = b"request-body-marker-41d2"
RESPONSE_MARKER = b"response-body-marker-98ce"
WS_MARKER = b"websocket-message-marker-5b07"


@pytest.fixture
def server_ca(tmp_path: Path) -> Path:
    """A private CA with a server certificate for 127.0.0.1 (state/relay.crt, relay.key)."""
    state = tmp_path / "server-pki"
    init_ca(state, common_name="Origin Test CA")
    issue_server_cert(state, ["localhost", LOOPBACK])
    return state


@contextlib.asynccontextmanager
async def origin(state: Path) -> AsyncIterator[str]:
    """An HTTPS server on 127.0.0.1: POST /echo answers with the body and a marker; /ws echoes messages."""

    async def post_echo(request: web.Request) -> web.Response:
        return web.Response(body=await request.read() + RESPONSE_MARKER)

    async def ws_echo(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        for _ in range(1000):
            msg = await ws.receive()
            if msg.type is not aiohttp.WSMsgType.BINARY:
                break
            await ws.send_bytes(msg.data)
        return ws

    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(state / "relay.crt", state / "relay.key")
    app = web.Application()
    app.router.add_post("/echo", post_echo)
    app.router.add_get("/ws", ws_echo)
    runner = web.AppRunner(app, shutdown_timeout=2.0)
    await runner.setup()
    site = web.TCPSite(runner, LOOPBACK, 0, ssl_context=ctx)
    await site.start()
    try:
        yield f"https://{LOOPBACK}:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


def trusting(cafile: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(cafile))


def issuer_of(ssl_object: ssl.SSLObject | None) -> str:
    assert ssl_object is not None
    return repr(ssl_object.getpeercert()["issuer"])


async def test_https_through_mitmproxy_is_intercepted_and_recorded(server_ca: Path, procs: ProcessTracker,
                                                                   tmp_path: Path) -> None:
    mitm = start_mitmproxy(procs, tmp_path / "mitm", upstream_ca=server_ca / "ca.crt")
    assert mitm.ca_cert.is_relative_to(tmp_path) and mitm.ca_cert.exists()
    async with origin(server_ca) as base, aiohttp.ClientSession() as http:
        async with asyncio.timeout(GUARD):
            # Trusting only mitmproxy's CA works: the certificate the client saw was the interceptor's.
            async with http.post(f"{base}/echo", data=REQUEST_MARKER, proxy=mitm.proxy_url,
                                 ssl=trusting(mitm.ca_cert)) as response:
                assert response.status == 200
                assert await response.read() == REQUEST_MARKER + RESPONSE_MARKER
            # A client that trusts only the origin's own CA refuses the interceptor's certificate.
            with pytest.raises(aiohttp.ClientConnectorCertificateError):
                await http.post(f"{base}/echo", data=b"x", proxy=mitm.proxy_url, ssl=trusting(server_ca / "ca.crt"))
    mitm.finish()
    assert not mitm.process.running
    dump = mitm.dump_bytes()
    assert REQUEST_MARKER in dump and RESPONSE_MARKER in dump, "the dump does not hold the exchange in clear"
    flows = [f for f in mitm.flows() if f.get("url") == f"{base}/echo" and f.get("status") == 200]
    assert len(flows) == 1, mitm.flows()
    assert flows[0]["request_size"] == len(REQUEST_MARKER)


async def test_websocket_through_mitmproxy_with_outer_tls_trusting_its_ca(server_ca: Path, procs: ProcessTracker,
                                                                          tmp_path: Path) -> None:
    mitm = start_mitmproxy(procs, tmp_path / "mitm")  # no upstream CA: ssl_insecure towards the origin
    async with origin(server_ca) as base, aiohttp.ClientSession() as http:
        async with asyncio.timeout(GUARD):
            async with http.ws_connect(f"{base.replace('https', 'wss')}/ws", proxy=mitm.proxy_url,
                                       ssl=trusting(mitm.ca_cert)) as ws:
                assert "mitmproxy" in issuer_of(ws.get_extra_info("ssl_object"))
                for size in (1, 1000, 300_000):
                    message = WS_MARKER + bytes(size)
                    await ws.send_bytes(message)
                    reply = await ws.receive()
                    assert reply.type is aiohttp.WSMsgType.BINARY and reply.data == message
    _assert_websocket_recorded(mitm, base)


def _assert_websocket_recorded(mitm: MitmProxy, base: str) -> None:
    mitm.finish()
    assert WS_MARKER in mitm.dump_bytes()
    (flow,) = [f for f in mitm.flows() if f.get("url") == f"{base}/ws"]
    assert flow["status"] == 101
    sizes = [m["size"] for m in flow["websocket"] if m["type"] == "binary"]
    assert sizes.count(len(WS_MARKER) + 300_000) == 2, flow  # both directions, byte for byte
