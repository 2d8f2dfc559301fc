"""A hand-driven agent for tests that must speak the mux protocol directly (what a hostile or buggy agent
could send): the real TLS client context, the real sans-IO core, no product adapter in between."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp

from tunnel_core import mux as m
from tunnel_core.codes import ErrorCode, TargetKind
from tunnel_core.frames import OpenPayload
from tunnel_link.tls import client_context


class RawAgent:
    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.mux = m.Mux(m.Role.AGENT)
        self.events: list[m.Event] = []

    async def flush(self) -> None:
        if self.mux.has_data_to_send():
            await self.ws.send_bytes(self.mux.data_to_send())

    async def open(self, kind: TargetKind, target: str, first_bytes: bytes) -> int:
        sid = self.mux.open_stream(OpenPayload(kind, target, "RAW"))
        self.mux.send_data(sid, first_bytes)
        await self.flush()
        return sid

    async def wait_reset(self, sid: int, timeout: float = 5.0) -> ErrorCode:
        async with asyncio.timeout(timeout):
            while True:
                for event in self.events:
                    if isinstance(event, m.StreamReset) and event.stream_id == sid:
                        return event.code
                msg = await self.ws.receive()
                assert msg.type is aiohttp.WSMsgType.BINARY, msg
                self.events += self.mux.receive_data(msg.data)
                await self.flush()


@contextlib.asynccontextmanager
async def raw_agent(port: int, certs: Path, *, path: str = "/tunnel") -> AsyncIterator[RawAgent]:
    ssl_ctx = client_context(certs / "agent.crt", certs / "agent.key", certs / "ca.crt")
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ssl_ctx)) as http:
        async with http.ws_connect(f"wss://127.0.0.1:{port}{path}", compress=0) as ws:
            agent = RawAgent(ws)
            await agent.flush()
            yield agent
