"""The relay and the agent in this test's own event loop, so their sockets and buffers can be inspected:
backpressure from a stalled destination reaches the sending socket with bounded memory and nothing lost;
TCP_NODELAY on every socket the tunnel owns; WebSocket compression off."""

from __future__ import annotations

import asyncio
import gc
import socket
from contextlib import AsyncExitStack

import aiohttp

from relay.config import load_relay_settings
from relay.server import Relay
from tests.support.ports import free_port
from tests.support.rawdicom import associate_rq
from tests.support.stack import AgentRoute, ListenerRoute, SiteDest, make_agent, make_relay
from tunnel_agent.agent import Agent
from tunnel_agent.config import load_agent_settings
from tunnel_link.sockets import nodelay_enabled
from tunnel_link.tls import client_context
from tunnel_link.transport import WebSocketTransport

WINDOW = 256 * 1024


class Sink:
    """A destination that accepts and reads nothing until told to, then counts what it gets."""

    def __init__(self) -> None:
        self.reading = asyncio.Event()
        self.received = bytearray()
        self.connected = asyncio.Event()
        self.done = asyncio.Event()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connected.set()
        await self.reading.wait()
        while data := await reader.read(1 << 20):
            self.received += data
        self.done.set()
        writer.close()


async def _start(tmp_path, sink_port: int) -> tuple[AsyncExitStack, Relay, Agent]:
    relay_h = make_relay(tmp_path / "relay", listener_routes=[ListenerRoute("SINK", "hospital-a", "sink")],
                         sites={"hospital-a": [SiteDest("NOWHERE", free_port())]})
    agent_h = make_agent(relay_h, "hospital-a", tmp_path / "agent", routes=[AgentRoute("sink", sink_port)])
    for handle in (relay_h, agent_h):
        with handle.config.open("a") as f:
            f.write(f"[mux]\nstream_window = {WINDOW}\nconnection_window = {4 * WINDOW}\n")
    stack = AsyncExitStack()
    relay = Relay(load_relay_settings(relay_h.config))
    agent = Agent(load_agent_settings(agent_h.config))
    await relay.start(stack)
    await agent.start(stack)
    task = asyncio.create_task(agent.connect_forever())
    stack.callback(task.cancel)
    async with asyncio.timeout(10):
        while agent.state != "connected" or not relay.online_sites():
            await asyncio.sleep(0.01)
    return stack, relay, agent


async def test_backpressure_reaches_the_sending_socket(tmp_path):
    sink = Sink()
    server = await asyncio.start_server(sink.handle, "127.0.0.1", 0)
    sink_port = server.sockets[0].getsockname()[1]
    stack, relay, agent = await _start(tmp_path, sink_port)
    async with stack:
        reader, writer = await asyncio.open_connection("127.0.0.1", relay.bound["listener:cloud"][1])
        writer.transport.set_write_buffer_limits(high=64 * 1024)
        rq = associate_rq("SINK", "CLOUDAI")
        writer.write(rq)
        await sink.connected.wait()
        chunk = bytes(range(256)) * 256  # 64 KiB
        sent = 0
        stalls = 0
        async with asyncio.timeout(60):
            while stalls < 3 and sent < 512 * 1024 * 1024:
                writer.write(chunk)
                sent += len(chunk)
                try:
                    await asyncio.wait_for(writer.drain(), 0.3)
                    stalls = 0
                except TimeoutError:
                    stalls += 1
        assert stalls == 3, f"the sender was never blocked after {sent} bytes"
        # What the tunnel holds is bounded by its windows: the agent's stream queue never exceeds one
        # stream window, and the relay has no credit left to send more.
        (stream,) = agent.session._streams.values()
        queued = sum(map(len, stream._inbound))
        assert queued <= WINDOW
        (relay_session,) = [s.session for s in relay.sites.values() if s.session]
        (sid,) = relay_session.mux.stream_ids()
        assert relay_session.mux.send_window(sid) == 0
        print(f"sender blocked after {sent / 2**20:.1f} MiB; agent queue {queued} bytes")
        assert sent < 64 * 1024 * 1024, "more was accepted than windows plus socket buffers explain"
        # Nothing is lost: once the destination reads, every byte arrives in order.
        sink.reading.set()
        writer.write_eof()
        async with asyncio.timeout(30):
            await sink.done.wait()
        expected = rq + chunk * ((sent) // len(chunk))
        assert len(sink.received) == len(expected)
        assert bytes(sink.received) == expected
        writer.close()
    server.close()


async def test_nodelay_on_every_tunnel_socket_and_no_compression(tmp_path):
    sink = Sink()
    sink.reading.set()
    server = await asyncio.start_server(sink.handle, "127.0.0.1", 0)
    sink_port = server.sockets[0].getsockname()[1]
    stack, relay, agent = await _start(tmp_path, sink_port)
    async with stack:
        _reader, writer = await asyncio.open_connection("127.0.0.1", relay.bound["listener:cloud"][1])
        writer.write(associate_rq("SINK", "CLOUDAI"))
        await writer.drain()
        await sink.connected.wait()
        ports = {
            "relay DICOM ingress": ("local", relay.bound["listener:cloud"][1]),
            "relay WebSocket": ("local", relay.bound["tunnel"][1]),
            "agent WebSocket": ("peer", relay.bound["tunnel"][1]),
            "agent dial to destination": ("peer", sink_port),
        }
        found = {}
        for obj in gc.get_objects():
            if not isinstance(obj, socket.socket) or obj.fileno() < 0 or obj.family not in (
                    socket.AF_INET, socket.AF_INET6) or obj.type != socket.SOCK_STREAM:
                continue
            try:
                local, peer = obj.getsockname()[1], obj.getpeername()[1]
            except OSError:
                continue  # listening socket
            for name, (side, port) in ports.items():
                if (local if side == "local" else peer) == port:
                    found[name] = nodelay_enabled(obj)
        assert set(found) == set(ports), found
        assert all(found.values()), found
        # Both ends write straight to the transport under their WebSocket (the private paths are there).
        (relay_session,) = [s.session for s in relay.sites.values() if s.session]
        assert type(agent.session.transport) is WebSocketTransport
        assert type(relay_session.transport) is WebSocketTransport
        # Compression: the agent never offers it, and the relay refuses a client that does.
        assert agent.session.ws.compress == 0
        certs = tmp_path / "agent" / "certs"
        ssl_ctx = client_context(certs / "agent.crt", certs / "agent.key", certs / "ca.crt")
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ssl_ctx)) as http:
            url = f"wss://127.0.0.1:{relay.bound['tunnel'][1]}/tunnel"
            async with http.ws_connect(url, compress=15) as ws:
                assert ws.compress == 0
                assert "permessage-deflate" not in ws._response.headers.get("Sec-WebSocket-Extensions", "")
        writer.close()
    server.close()
