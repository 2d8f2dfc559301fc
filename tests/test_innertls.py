"""Mutual TLS inside the WebSocket (tunnel_link.innertls): real aiohttp WebSockets on 127.0.0.1, the
project's own PKI and TLS contexts, an in-memory WebSocket that re-frames the record stream at will, a
MuxSession pair on top, and mitmproxy in the middle intercepting the outer TLS."""

from __future__ import annotations

import asyncio
import contextlib
import random
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from cryptography import x509

from relay.pki import SiteBundle, init_ca, issue_server_cert, issue_site_cert, site_from_certificate
from tests.support.mitm import start_mitmproxy
from tunnel_core.codes import ErrorCode, TargetKind
from tunnel_core.frames import OpenPayload
from tunnel_core.mux import Mux, Role
from tunnel_link.innertls import (
    READY,
    InnerTlsError,
    InnerTlsFailure,
    InnerTlsWebSocket,
    inner_tls_client,
    inner_tls_server,
)
from tunnel_link.session import MAX_MESSAGE_IN, MuxSession, TunnelStream
from tunnel_link.tls import client_context, server_context
from tunnel_link.transport import QueuedTransport

LOOPBACK = "127.0.0.1"
SITE = "hospital-a"
RELAY_NAME = "localhost"
PATH = "/tunnel"
TIMEOUT = 10.0
GUARD = 60.0
MARKER = b"PLAINTEXT-MARKER-7f3a9c"
SIZES = [1, 2, 255, 16383, 16384, 16385, 65537, 1_000_003, 3 * 1024 * 1024]


# --- certificates --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pki:
    state: Path
    site: SiteBundle

    @property
    def ca(self) -> Path:
        return self.state / "ca.crt"

    def relay_context(self, client_ca: Path | None = None) -> ssl.SSLContext:
        return server_context(self.state / "relay.crt", self.state / "relay.key", client_ca or self.ca)

    def agent_context(self, relay_ca: Path | None = None) -> ssl.SSLContext:
        return client_context(self.site.cert, self.site.key, relay_ca or self.site.ca)

    def ca_key_id(self) -> str:
        cert = x509.load_pem_x509_certificate(self.ca.read_bytes())
        ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
        return ski[:8].hex(":")


def _make_pki(root: Path, ca_name: str) -> Pki:
    state = root / "state"
    init_ca(state, common_name=ca_name)
    issue_server_cert(state, [RELAY_NAME, LOOPBACK])
    return Pki(state=state, site=issue_site_cert(state, SITE, root / "agent"))


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return _make_pki(tmp_path / "main", "Tunnel Test CA")


@pytest.fixture
def other_pki(tmp_path: Path) -> Pki:
    """An unrelated CA (think: a network's interception CA) with its own relay and site certificates."""
    return _make_pki(tmp_path / "other", "Other Test CA")


def outer_server_context(pki: Pki) -> ssl.SSLContext:
    """A plain server-authenticated outer TLS (as a relay behind a public certificate would have)."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(pki.state / "relay.crt", pki.state / "relay.key")
    return ctx


def outer_client_context(cafile: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(cafile))


# --- a relay end and an agent end over real WebSockets ------------------------------------------------

Serve = Callable[[InnerTlsWebSocket, web.WebSocketResponse], Awaitable[None]]


@dataclass
class RelayEnd:
    url: str
    results: asyncio.Queue[InnerTlsWebSocket | InnerTlsError]
    release: asyncio.Event

    async def result(self) -> InnerTlsWebSocket | InnerTlsError:
        async with asyncio.timeout(TIMEOUT):
            return await self.results.get()


@contextlib.asynccontextmanager
async def relay_end(inner_ctx: ssl.SSLContext | None, *, outer_ssl: ssl.SSLContext | None = None,
                    serve: Serve | None = None) -> AsyncIterator[RelayEnd]:
    """An aiohttp server on 127.0.0.1 whose WebSocket runs the inner TLS server side (``inner_ctx``; None:
    it never answers), then ``serve`` (default: read until the agent closes)."""
    results: asyncio.Queue[InnerTlsWebSocket | InnerTlsError] = asyncio.Queue(maxsize=16)
    release = asyncio.Event()

    async def handler(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(compress=False, max_msg_size=MAX_MESSAGE_IN)
        await ws.prepare(request)
        if inner_ctx is None:
            await release.wait()
            return ws
        try:
            inner = await inner_tls_server(ws, inner_ctx, TIMEOUT)
        except InnerTlsError as exc:
            results.put_nowait(exc)
            return ws
        results.put_nowait(inner)
        try:
            await (serve or drain)(inner, ws)
        finally:
            await inner.close()
        return ws

    app = web.Application()
    app.router.add_get(PATH, handler)
    runner = web.AppRunner(app, shutdown_timeout=2.0)
    await runner.setup()
    site = web.TCPSite(runner, LOOPBACK, 0, ssl_context=outer_ssl)
    await site.start()
    port = runner.addresses[0][1]
    scheme = "wss" if outer_ssl else "ws"
    try:
        yield RelayEnd(f"{scheme}://{LOOPBACK}:{port}{PATH}", results, release)
    finally:
        release.set()
        await runner.cleanup()


@contextlib.asynccontextmanager
async def agent_ws(url: str, *, outer_ssl: ssl.SSLContext | None = None,
                   proxy: str | None = None) -> AsyncIterator[aiohttp.ClientWebSocketResponse]:
    async with aiohttp.ClientSession() as http:
        async with http.ws_connect(url, compress=0, max_msg_size=MAX_MESSAGE_IN, ssl=outer_ssl or True,
                                   proxy=proxy) as ws:
            yield ws


async def drain(inner: InnerTlsWebSocket, _outer: web.WebSocketResponse) -> None:
    for _ in range(1_000_000):
        msg = await inner.receive()
        if msg.type is not aiohttp.WSMsgType.BINARY:
            return


async def echo(inner: InnerTlsWebSocket, _outer: web.WebSocketResponse) -> None:
    for _ in range(1_000_000):
        msg = await inner.receive()
        if msg.type is not aiohttp.WSMsgType.BINARY:
            return
        await inner.send_bytes(msg.data)


async def receive_exactly(inner: InnerTlsWebSocket, size: int, *, max_chunk: int | None = None) -> bytes:
    chunks: list[bytes] = []
    got = 0
    for _ in range(size):
        if got >= size:
            break
        msg = await inner.receive()
        assert msg.type is aiohttp.WSMsgType.BINARY, msg
        assert max_chunk is None or len(msg.data) <= max_chunk
        chunks.append(msg.data)
        got += len(msg.data)
    assert got == size
    return b"".join(chunks)


class Tap:
    """Wraps the agent's WebSocket and keeps every binary payload it carries, both ways."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.sent: list[bytes] = []
        self.received = bytearray()

    async def send_bytes(self, data: bytes) -> None:
        self.sent.append(bytes(data))
        await self.ws.send_bytes(data)

    async def receive(self) -> aiohttp.WSMessage:
        msg = await self.ws.receive()
        if msg.type is aiohttp.WSMsgType.BINARY:
            self.received += msg.data
        return msg

    async def close(self, *, code: int = aiohttp.WSCloseCode.OK, message: bytes = b"") -> bool:
        return await self.ws.close(code=code, message=message)

    def exception(self) -> BaseException | None:
        return self.ws.exception()


def payload(size: int, seed: int = 0) -> bytes:
    return random.Random(seed * 7919 + size).randbytes(size)


# --- data both ways ------------------------------------------------------------------------------------


async def test_echo_of_many_sizes_both_ways(pki: Pki) -> None:
    async with relay_end(pki.relay_context(), serve=echo) as relay, agent_ws(relay.url) as ws:
        async with asyncio.timeout(GUARD):
            agent = await inner_tls_client(ws, pki.agent_context(), RELAY_NAME, TIMEOUT)
            assert isinstance(await relay.result(), InnerTlsWebSocket)
            for size in SIZES:
                data = payload(size)
                _, back = await asyncio.gather(agent.send_bytes(data), receive_exactly(agent, size))
                assert back == data, f"echo of {size} bytes differs"
            await agent.close()


async def test_relay_sends_many_sizes_in_single_writes(pki: Pki) -> None:
    async def send_all(inner: InnerTlsWebSocket, _outer: web.WebSocketResponse) -> None:
        for size in SIZES:
            await inner.send_bytes(payload(size, seed=1))
        await inner.receive()  # until the agent closes

    async with relay_end(pki.relay_context(), serve=send_all) as relay, agent_ws(relay.url) as ws:
        async with asyncio.timeout(GUARD):
            agent = await inner_tls_client(ws, pki.agent_context(), RELAY_NAME, TIMEOUT, max_receive=100_000)
            got = await receive_exactly(agent, sum(SIZES), max_chunk=100_000)
            assert got == b"".join(payload(size, seed=1) for size in SIZES)
            await agent.close()


async def test_outgoing_messages_are_bounded_and_carry_only_ciphertext(pki: Pki) -> None:
    async with relay_end(pki.relay_context(), serve=echo) as relay, agent_ws(relay.url) as ws:
        async with asyncio.timeout(GUARD):
            tap = Tap(ws)
            agent = await inner_tls_client(tap, pki.agent_context(), RELAY_NAME, TIMEOUT, max_message=16384)
            data = payload(300_000) + MARKER * 50 + payload(5000)
            _, back = await asyncio.gather(agent.send_bytes(data), receive_exactly(agent, len(data)))
            assert back == data
            await agent.close()
    sent = b"".join(tap.sent)
    assert len(sent) > len(data), "the payload did not go through the tap"
    # One TLS record of at most 16 KiB plaintext per message: its ciphertext is a little larger.
    assert max(map(len, tap.sent)) <= 16384 + 256
    assert MARKER not in sent
    assert MARKER not in tap.received
    assert READY not in tap.received


async def test_tls_1_3_session_tickets_after_the_handshake_are_absorbed(pki: Pki) -> None:
    async with relay_end(pki.relay_context(), serve=echo) as relay, agent_ws(relay.url) as ws:
        async with asyncio.timeout(GUARD):
            agent = await inner_tls_client(ws, pki.agent_context(), RELAY_NAME, TIMEOUT)
            await agent.send_bytes(b"ping")
            assert await receive_exactly(agent, 4) == b"ping"
            assert agent.version() == "TLSv1.3"
            assert agent.ssl_object.session is not None and agent.ssl_object.session.has_ticket
            await agent.close()


async def test_tls_1_2_works_too(pki: Pki) -> None:
    ctx = pki.agent_context()
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    async with relay_end(pki.relay_context(), serve=echo) as relay, agent_ws(relay.url) as ws:
        async with asyncio.timeout(GUARD):
            agent = await inner_tls_client(ws, ctx, RELAY_NAME, TIMEOUT)
            data = payload(70_000)
            _, back = await asyncio.gather(agent.send_bytes(data), receive_exactly(agent, len(data)))
            assert back == data
            assert agent.version() == "TLSv1.2"
            assert "GCM" in agent.cipher()[0] or "CHACHA20" in agent.cipher()[0]
            await agent.close()


async def test_outer_tls_around_inner_tls(pki: Pki, other_pki: Pki) -> None:
    # The outer TLS uses an unrelated CA (as a public certificate would be); identity is the inner one.
    async with relay_end(pki.relay_context(), outer_ssl=outer_server_context(other_pki), serve=echo) as relay:
        async with agent_ws(relay.url, outer_ssl=outer_client_context(other_pki.ca)) as ws:
            async with asyncio.timeout(GUARD):
                agent = await inner_tls_client(ws, pki.agent_context(), RELAY_NAME, TIMEOUT)
                server = await relay.result()
                assert isinstance(server, InnerTlsWebSocket)
                assert site_from_certificate(server.getpeercert(binary_form=True)) == SITE
                data = payload(1_000_003)
                _, back = await asyncio.gather(agent.send_bytes(data), receive_exactly(agent, len(data)))
                assert back == data
                await agent.close()


async def test_site_is_read_from_the_inner_client_certificate(pki: Pki) -> None:
    async with relay_end(pki.relay_context()) as relay, agent_ws(relay.url) as ws:
        async with asyncio.timeout(GUARD):
            agent = await inner_tls_client(ws, pki.agent_context(), RELAY_NAME, TIMEOUT)
            server = await relay.result()
            assert isinstance(server, InnerTlsWebSocket)
            assert site_from_certificate(server.getpeercert(binary_form=True)) == SITE
            assert site_from_certificate(server.get_extra_info("ssl_object").getpeercert(True)) == SITE
            assert server.getpeercert()["subject"] == ((("commonName", SITE),),)
            relay_cert = x509.load_der_x509_certificate(agent.getpeercert(binary_form=True))
            assert relay_cert.issuer.rfc4514_string() == "CN=Tunnel Test CA"
            assert not hasattr(agent, "_writer") and not hasattr(server, "_writer")
            await agent.close()


# --- closing -------------------------------------------------------------------------------------------


async def test_close_sends_close_notify(pki: Pki) -> None:
    seen: asyncio.Queue[tuple[aiohttp.WSMessage, bool]] = asyncio.Queue(maxsize=1)

    async def watch(inner: InnerTlsWebSocket, _outer: web.WebSocketResponse) -> None:
        msg = await inner.receive()
        seen.put_nowait((msg, inner.peer_closed))

    async with relay_end(pki.relay_context(), serve=watch) as relay, agent_ws(relay.url) as ws:
        async with asyncio.timeout(GUARD):
            agent = await inner_tls_client(ws, pki.agent_context(), RELAY_NAME, TIMEOUT)
            await agent.close()
            msg, peer_closed = await seen.get()
    assert msg.type is aiohttp.WSMsgType.CLOSE
    assert peer_closed, "the relay saw the WebSocket close but no TLS close_notify"
    assert agent.closed
    with pytest.raises(ConnectionResetError):
        await agent.send_bytes(b"after close")


async def test_relay_close_reaches_the_agent_as_close(pki: Pki) -> None:
    async def close_at_once(inner: InnerTlsWebSocket, _outer: web.WebSocketResponse) -> None:
        await inner.send_bytes(b"bye")

    async with relay_end(pki.relay_context(), serve=close_at_once) as relay, agent_ws(relay.url) as ws:
        async with asyncio.timeout(GUARD):
            agent = await inner_tls_client(ws, pki.agent_context(), RELAY_NAME, TIMEOUT)
            assert await receive_exactly(agent, 3) == b"bye"
            msg = await agent.receive()
            assert msg.type is aiohttp.WSMsgType.CLOSE
            assert agent.peer_closed
            await agent.close()


async def test_text_and_ping_messages_on_the_outer_websocket_are_ignored(pki: Pki) -> None:
    async def noisy(inner: InnerTlsWebSocket, outer: web.WebSocketResponse) -> None:
        await inner.send_bytes(b"one")
        await outer.send_str("not part of the TLS stream")
        await outer.ping(b"p")
        await inner.send_bytes(b"two")
        await inner.receive()

    async with relay_end(pki.relay_context(), serve=noisy) as relay, agent_ws(relay.url) as ws:
        async with asyncio.timeout(GUARD):
            agent = await inner_tls_client(ws, pki.agent_context(), RELAY_NAME, TIMEOUT)
            assert await receive_exactly(agent, 6) == b"onetwo"
            await agent.close()


async def test_garbage_in_the_record_stream_is_an_error_message(pki: Pki) -> None:
    async def corrupt(inner: InnerTlsWebSocket, outer: web.WebSocketResponse) -> None:
        await outer.send_bytes(b"\x17\x03\x03\x00\x20" + bytes(32))  # an application-data record nobody sealed
        await inner.receive()

    async with relay_end(pki.relay_context(), serve=corrupt) as relay, agent_ws(relay.url) as ws:
        async with asyncio.timeout(GUARD):
            agent = await inner_tls_client(ws, pki.agent_context(), RELAY_NAME, TIMEOUT)
            msg = await agent.receive()
            assert msg.type is aiohttp.WSMsgType.ERROR
            error = agent.exception()
            assert isinstance(error, InnerTlsError) and error.failure is InnerTlsFailure.TLS
            assert "inner TLS" in str(error)
            with pytest.raises(ConnectionResetError):
                await agent.send_bytes(b"x")
            await agent.close()


# --- handshake failures --------------------------------------------------------------------------------


async def test_agent_certificate_from_another_ca_is_refused(pki: Pki, other_pki: Pki) -> None:
    wrong_agent = client_context(other_pki.site.cert, other_pki.site.key, pki.ca)
    async with relay_end(pki.relay_context()) as relay, agent_ws(relay.url) as ws:
        async with asyncio.timeout(GUARD):
            with pytest.raises(InnerTlsError) as agent_side:
                await inner_tls_client(ws, wrong_agent, RELAY_NAME, TIMEOUT)
            relay_side = await relay.result()
            assert ws.closed
    assert isinstance(relay_side, InnerTlsError)
    assert relay_side.failure is InnerTlsFailure.PEER_CERTIFICATE_REJECTED
    message = str(relay_side)
    assert "certificate verify failed" in message and "agent" in message
    assert "unable to get local issuer certificate" in message
    assert "issued by 'CN=Other Test CA'" in message and other_pki.ca_key_id() in message
    assert relay_side.presented is not None and relay_side.presented.subject == f"CN={SITE}"
    # Under TLS 1.3 the agent learns of the refusal from the relay's alert, before READY would come.
    assert agent_side.value.failure is InnerTlsFailure.REFUSED_BY_PEER
    assert "relay refused" in str(agent_side.value) and "alert" in str(agent_side.value)


async def test_relay_certificate_from_another_ca_is_refused(pki: Pki, other_pki: Pki) -> None:
    impostor = server_context(other_pki.state / "relay.crt", other_pki.state / "relay.key", pki.ca)
    async with relay_end(impostor) as relay, agent_ws(relay.url) as ws:
        async with asyncio.timeout(GUARD):
            with pytest.raises(InnerTlsError) as agent_side:
                await inner_tls_client(ws, pki.agent_context(), RELAY_NAME, TIMEOUT)
            relay_side = await relay.result()
            assert ws.closed
    error = agent_side.value
    assert error.failure is InnerTlsFailure.PEER_CERTIFICATE_REJECTED
    assert "certificate verify failed" in str(error) and "relay" in str(error)
    assert "issued by 'CN=Other Test CA'" in str(error) and other_pki.ca_key_id() in str(error)
    assert error.verify_message == "unable to get local issuer certificate"
    assert isinstance(relay_side, InnerTlsError) and relay_side.failure is InnerTlsFailure.REFUSED_BY_PEER


async def test_certificate_capture_hook_is_only_installed_during_handshakes(pki: Pki, other_pki: Pki) -> None:
    # The hook costs a Python call per TLS record: a context shared with other connections must not keep it.
    agent_ctx, relay_ctx = pki.agent_context(), pki.relay_context()
    async with relay_end(relay_ctx) as relay:
        async with agent_ws(relay.url) as ws1, agent_ws(relay.url) as ws2:
            async with asyncio.timeout(GUARD):
                agents = await asyncio.gather(*(inner_tls_client(ws, agent_ctx, RELAY_NAME, TIMEOUT)
                                                 for ws in (ws1, ws2)))
                for _ in agents:
                    assert isinstance(await relay.result(), InnerTlsWebSocket)
                assert agent_ctx._msg_callback is None and relay_ctx._msg_callback is None
                for agent in agents:
                    await agent.close()
    # Someone else's hook is left alone; the error then just cannot name the issuer.
    seen: list[object] = []
    foreign_ctx = pki.agent_context()
    foreign_ctx._msg_callback = lambda *args: seen.append(args)
    impostor = server_context(other_pki.state / "relay.crt", other_pki.state / "relay.key", pki.ca)
    async with relay_end(impostor) as relay, agent_ws(relay.url) as ws:
        async with asyncio.timeout(GUARD):
            with pytest.raises(InnerTlsError) as agent_side:
                await inner_tls_client(ws, foreign_ctx, RELAY_NAME, TIMEOUT)
    assert agent_side.value.failure is InnerTlsFailure.PEER_CERTIFICATE_REJECTED
    assert agent_side.value.presented is None and "certificate verify failed" in str(agent_side.value)
    assert seen and foreign_ctx._msg_callback is not None


async def test_relay_name_mismatch_is_refused(pki: Pki) -> None:
    async with relay_end(pki.relay_context()) as relay, agent_ws(relay.url) as ws:
        async with asyncio.timeout(GUARD):
            with pytest.raises(InnerTlsError) as agent_side:
                await inner_tls_client(ws, pki.agent_context(), "relay.example.org", TIMEOUT)
    assert agent_side.value.failure is InnerTlsFailure.PEER_CERTIFICATE_REJECTED
    assert "relay.example.org" in str(agent_side.value)


async def test_handshake_is_bounded_by_the_timeout(pki: Pki) -> None:
    async with relay_end(None) as relay, agent_ws(relay.url) as ws:
        async with asyncio.timeout(GUARD):
            with pytest.raises(InnerTlsError) as agent_side:
                await inner_tls_client(ws, pki.agent_context(), RELAY_NAME, 0.5)
            assert ws.closed
    assert agent_side.value.failure is InnerTlsFailure.TIMEOUT
    assert "within 0.5s" in str(agent_side.value) and "nothing received" in str(agent_side.value)


async def test_websocket_closed_during_the_handshake(pki: Pki) -> None:
    async def close_early(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await ws.receive()  # the ClientHello
        await ws.close(code=aiohttp.WSCloseCode.GOING_AWAY, message=b"bye")
        return ws

    app = web.Application()
    app.router.add_get(PATH, close_early)
    runner = web.AppRunner(app, shutdown_timeout=2.0)
    await runner.setup()
    site = web.TCPSite(runner, LOOPBACK, 0)
    await site.start()
    try:
        async with agent_ws(f"ws://{LOOPBACK}:{runner.addresses[0][1]}{PATH}") as ws:
            async with asyncio.timeout(GUARD):
                with pytest.raises(InnerTlsError) as agent_side:
                    await inner_tls_client(ws, pki.agent_context(), RELAY_NAME, TIMEOUT)
    finally:
        await runner.cleanup()
    assert agent_side.value.failure is InnerTlsFailure.CONNECTION_LOST
    assert "1001" in str(agent_side.value) and "during the handshake" in str(agent_side.value)


# --- any re-framing of the record stream ---------------------------------------------------------------


class Wire:
    """One direction of an in-memory WebSocket: a byte stream handed out in chunks ``chunking`` chooses."""

    def __init__(self, chunking: Callable[[int], int]) -> None:
        self.buffer = bytearray()
        self.closed = False
        self.changed = asyncio.Event()
        self.chunking = chunking
        self.messages = 0


class FakeWs:
    """Delivers the peer's ciphertext split at arbitrary points or coalesced across its messages."""

    def __init__(self, outgoing: Wire, incoming: Wire) -> None:
        self.outgoing, self.incoming = outgoing, incoming

    async def send_bytes(self, data: bytes) -> None:
        if self.outgoing.closed:
            raise ConnectionResetError("closed")
        self.outgoing.buffer += data
        self.outgoing.changed.set()

    async def receive(self) -> aiohttp.WSMessage:
        wire = self.incoming
        for _ in range(1_000_000):
            if wire.buffer:
                break
            if wire.closed:
                return aiohttp.WSMessage(aiohttp.WSMsgType.CLOSED, None, None)
            wire.changed.clear()
            await wire.changed.wait()
        n = max(1, min(len(wire.buffer), wire.chunking(len(wire.buffer))))
        chunk = bytes(wire.buffer[:n])
        del wire.buffer[:n]
        wire.messages += 1
        return aiohttp.WSMessage(aiohttp.WSMsgType.BINARY, chunk, None)

    async def close(self, *, code: int = aiohttp.WSCloseCode.OK, message: bytes = b"") -> bool:
        self.outgoing.closed = True
        self.outgoing.changed.set()
        return True

    def exception(self) -> BaseException | None:
        return None


def _chunkings(seed: int) -> dict[str, Callable[[int], int]]:
    rng = random.Random(seed)
    return {
        "one-byte": lambda available: 1,
        "random-splits": lambda available: rng.randint(1, 3000),
        "coalesced": lambda available: available,
        "mixed": lambda available: rng.choice((1, 5, 17, 1000, 20000, available)),
    }


@pytest.mark.parametrize("chunking", ["one-byte", "random-splits", "coalesced", "mixed"])
async def test_records_split_or_coalesced_arbitrarily(pki: Pki, chunking: str) -> None:
    to_relay, to_agent = Wire(_chunkings(1)[chunking]), Wire(_chunkings(2)[chunking])
    agent_end, relay_end_ = FakeWs(to_relay, to_agent), FakeWs(to_agent, to_relay)
    size = 20_000 if chunking == "one-byte" else 400_000
    data = payload(size, seed=3)
    hello = b"first bytes right behind READY"

    async def relay_side() -> InnerTlsWebSocket:
        relay = await inner_tls_server(relay_end_, pki.relay_context(), TIMEOUT, max_message=5000)
        await relay.send_bytes(hello)  # "coalesced": READY and these reach the agent in one message
        return relay

    async with asyncio.timeout(GUARD):
        agent, relay = await asyncio.gather(
            inner_tls_client(agent_end, pki.agent_context(), RELAY_NAME, TIMEOUT, max_message=7000),
            relay_side())
        assert await receive_exactly(agent, len(hello)) == hello
        # Several writes queue up before the peer reads: "coalesced" hands them over as one message.
        for start in range(0, size, 50_000):
            await agent.send_bytes(data[start:start + 50_000])
        assert await receive_exactly(relay, size) == data
        _, back = await asyncio.gather(relay.send_bytes(data), receive_exactly(agent, size))
        assert back == data
        await agent.close()
        msg = await relay.receive()
    assert msg.type is aiohttp.WSMsgType.CLOSE and relay.peer_closed
    assert site_from_certificate(relay.getpeercert(binary_form=True)) == SITE
    if chunking == "one-byte":
        assert to_agent.messages > size  # it really was fed byte by byte


# --- the mux over the inner TLS ------------------------------------------------------------------------


class Collector:
    """A stream listener that keeps what arrives, returns the credit, and wakes the sender on credit."""

    def __init__(self, session: MuxSession, stream: TunnelStream) -> None:
        self.session, self.stream = session, stream
        self.data = bytearray()
        self.eof = asyncio.Event()
        self.credit = asyncio.Event()
        self.reset: ErrorCode | None = None

    def stream_data(self, data: bytes | memoryview) -> None:
        self.data += data
        self.stream.consumed(len(data))

    def stream_eof(self) -> None:
        self.eof.set()

    def stream_reset(self, code: ErrorCode) -> None:
        self.reset = code
        self.eof.set()
        self.credit.set()

    def stream_writable(self) -> None:
        self.credit.set()


async def send_all(session: MuxSession, collector: Collector, data: bytes) -> None:
    view = memoryview(data)
    for _ in range(100_000):
        if not view:
            break
        collector.credit.clear()
        taken = collector.stream.send(view[:256 * 1024])
        view = view[taken:]
        await session.flush()
        if not taken:
            await collector.credit.wait()
            assert collector.reset is None
    assert not view
    assert collector.stream.end()
    await session.flush()


async def test_mux_session_pair_carries_a_stream(pki: Pki) -> None:
    data = payload(3 * 1024 * 1024 + 17, seed=4)

    async def relay_serve(inner: InnerTlsWebSocket, _outer: web.WebSocketResponse) -> None:
        async def on_stream(stream: TunnelStream) -> None:
            collector = Collector(session, stream)
            stream.attach(collector)
            await collector.eof.wait()
            await send_all(session, collector, bytes(collector.data[::-1]))

        session = MuxSession(inner, Mux(Role.RELAY), heartbeat_interval=30.0, on_stream=on_stream, label="relay")
        await session.run()

    async def refuse(stream: TunnelStream) -> None:
        await stream.reset(ErrorCode.UNKNOWN_ROUTE)

    async with relay_end(pki.relay_context(), serve=relay_serve) as relay, agent_ws(relay.url) as ws:
        async with asyncio.timeout(GUARD), asyncio.TaskGroup() as tasks:
            inner = await inner_tls_client(ws, pki.agent_context(), RELAY_NAME, TIMEOUT)
            session = MuxSession(inner, Mux(Role.AGENT), heartbeat_interval=30.0, on_stream=refuse, label="agent")
            assert type(session.transport) is QueuedTransport  # no fast path around the inner TLS
            run = tasks.create_task(session.run())
            for _ in range(100):  # let run() set up its task group
                if session._tasks is not None:
                    break
                await asyncio.sleep(0)
            stream = await session.open_stream(OpenPayload(TargetKind.CALLED_AE, "CLOUD", "MODALITY"))
            collector = Collector(session, stream)
            stream.attach(collector)
            await send_all(session, collector, data)
            await collector.eof.wait()
            assert collector.reset is None
            assert bytes(collector.data) == data[::-1]
            await stream.release()
            await session.close()
            await run
    assert session.close_reason == "closed"


# --- through mitmproxy intercepting the outer TLS ------------------------------------------------------


async def test_inner_tls_through_mitmproxy_keeps_the_payload_secret(pki: Pki, other_pki: Pki, procs,
                                                                    tmp_path: Path) -> None:
    mitm = start_mitmproxy(procs, tmp_path / "mitm", upstream_ca=other_pki.ca)
    data = payload(200_000, seed=5) + MARKER * 100 + payload(1_000_000, seed=6)
    async with relay_end(pki.relay_context(), outer_ssl=outer_server_context(other_pki), serve=echo) as relay:
        # The agent's outer TLS trusts the interceptor's CA, as a hospital's configured bundle would.
        async with agent_ws(relay.url, outer_ssl=outer_client_context(mitm.ca_cert), proxy=mitm.proxy_url) as ws:
            async with asyncio.timeout(GUARD):
                outer_cert = ws.get_extra_info("ssl_object").getpeercert()
                assert "mitmproxy" in repr(outer_cert["issuer"]), "the outer TLS was not intercepted"
                agent = await inner_tls_client(ws, pki.agent_context(), RELAY_NAME, TIMEOUT)
                server = await relay.result()
                assert isinstance(server, InnerTlsWebSocket)
                assert site_from_certificate(server.getpeercert(binary_form=True)) == SITE
                _, back = await asyncio.gather(agent.send_bytes(data), receive_exactly(agent, len(data)))
                assert back == data
                await agent.close()
    mitm.finish()
    dump = mitm.dump_bytes()
    assert PATH.encode() in dump, "the interceptor recorded no WebSocket upgrade"
    assert MARKER not in dump
    assert READY not in dump
    (flow,) = [f for f in mitm.flows() if f.get("url", "").endswith(PATH)]
    assert flow["status"] == 101
    carried = sum(m["size"] for m in flow["websocket"] if m["from_client"])
    assert carried > len(data), "the interceptor did not see the tunnel's messages"
