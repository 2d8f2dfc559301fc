"""tunnel_link.transport: both message-transport adapters over a real aiohttp WebSocket on 127.0.0.1, and the
version negotiation as aiohttp carries it (docs/protocol.md §1.1)."""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web

from tunnel_link.transport import (
    SUBPROTOCOLS,
    Closed,
    QueuedTransport,
    WebSocketTransport,
    as_transport,
    negotiated_version,
)

GUARD = 10.0


@contextlib.asynccontextmanager
async def ws_pair(*, server_protocols: tuple[str, ...] = (), client_protocols: tuple[str, ...] = ()
                  ) -> AsyncIterator[tuple[aiohttp.ClientWebSocketResponse, web.WebSocketResponse]]:
    server_ws: asyncio.Future[web.WebSocketResponse] = asyncio.get_running_loop().create_future()
    done = asyncio.Event()

    async def handler(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(protocols=server_protocols, max_msg_size=4 * 1024 * 1024)
        await ws.prepare(request)
        server_ws.set_result(ws)
        await done.wait()
        await ws.close()
        return ws

    app = web.Application()
    app.router.add_get("/tunnel", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    try:
        async with asyncio.timeout(GUARD), aiohttp.ClientSession() as http:
            async with http.ws_connect(f"ws://{host}:{port}/tunnel", protocols=client_protocols,
                                       max_msg_size=4 * 1024 * 1024) as client:
                try:
                    yield client, await server_ws
                finally:
                    done.set()
    finally:
        done.set()
        await runner.cleanup()


# --- version negotiation --------------------------------------------------------------------------------


async def test_agent_and_relay_agree_on_version_1_by_subprotocol() -> None:
    async with ws_pair(server_protocols=SUBPROTOCOLS, client_protocols=SUBPROTOCOLS) as (client, server):
        assert client.protocol == server.ws_protocol == "dicom-tunnel.1"
        assert negotiated_version(client) == negotiated_version(server) == 1


@pytest.mark.parametrize(("server_protocols", "client_protocols"), [
    pytest.param(SUBPROTOCOLS, (), id="old-agent"),
    pytest.param((), SUBPROTOCOLS, id="old-relay"),
])
async def test_a_peer_from_before_negotiation_is_spoken_to_in_version_1(server_protocols, client_protocols) -> None:
    async with ws_pair(server_protocols=server_protocols, client_protocols=client_protocols) as (client, server):
        assert client.protocol is None and server.ws_protocol is None
        assert negotiated_version(client) == negotiated_version(server) == 1


# --- the adapters ---------------------------------------------------------------------------------------


def messages(seed: int) -> list[bytes]:
    rng = random.Random(seed)
    sizes = [0, 1, 125, 126, 65535, 65536, 2 * 1024 * 1024] + [rng.randrange(1, 300_000) for _ in range(20)]
    return [rng.randbytes(n) for n in sizes]


@pytest.mark.parametrize("kind", ["fast", "queued"])
async def test_messages_cross_in_order_both_ways_and_a_close_reaches_the_peer(kind: str) -> None:
    async with ws_pair() as (client_ws, server_ws):
        if kind == "fast":
            client, server = as_transport(client_ws, client=True), as_transport(server_ws, client=False)
            assert type(client) is type(server) is WebSocketTransport
        else:
            client, server = QueuedTransport(client_ws), QueuedTransport(server_ws)
        pumps = [asyncio.create_task(client.pump()), asyncio.create_task(server.pump())]
        try:
            for sender, receiver, seed in ((client, server, 1), (server, client, 2)):
                sent = messages(seed)
                for message in sent:
                    sender.send(bytearray(message))  # the client's are masked in place: a copy each
                    if sender.congested:
                        await sender.drained()
                got = [await receiver.receive() for _ in sent]
                assert got == sent
            _, end = await asyncio.gather(client.close(), server.receive())  # a close waits for the answer
            assert end == Closed("peer closed the tunnel")
            with pytest.raises(ConnectionError):
                client.send(bytearray(b"after the close"))
        finally:
            for pump in pumps:
                pump.cancel()


async def test_the_queue_is_the_send_buffer_and_close_sends_what_is_queued() -> None:
    async with ws_pair() as (client_ws, server_ws):
        client, server = QueuedTransport(client_ws, high_water=1000), as_transport(server_ws, client=False)
        for n in range(5):
            client.send(bytearray([n]) * 400)
        assert client.congested  # 2000 bytes queued, nobody sending them yet
        pump = asyncio.create_task(client.pump())
        try:
            await client.drained()
            assert not client.congested
            for n in range(5):
                assert await server.receive() == bytes([n]) * 400
            pump.cancel()
            client.send(bytearray(b"queued behind no pump"))
            closing = asyncio.create_task(client.close())  # sends the rest first
            assert await server.receive() == b"queued behind no pump"
            assert isinstance(await server.receive(), Closed)
            await closing
        finally:
            pump.cancel()


@pytest.mark.parametrize("kind", ["fast", "queued"])
async def test_abort_ends_the_connection_at_once_for_both_sides(kind: str) -> None:
    async with ws_pair() as (client_ws, server_ws):
        client = as_transport(client_ws, client=True) if kind == "fast" else QueuedTransport(client_ws)
        server = as_transport(server_ws, client=False)
        assert client.abort()
        assert isinstance(await server.receive(), Closed)
        with pytest.raises(ConnectionError):
            client.send(bytearray(b"x"))
            await asyncio.sleep(0)
            client.send(bytearray(b"x"))
