"""A WebSocket client written by hand, for tests that must misbehave below what aiohttp allows: a peer that
upgrades and then never reads, or one that drips a frame one byte per message. The upgrade is plain
HTTP/1.1 over the product's own TLS client context; messages are framed here (RFC 6455 §5.2), masked
with the all-zero key so that precomputed bytes can be written in bulk."""

from __future__ import annotations

import asyncio
import base64
import os
import socket
import ssl
import struct
from dataclasses import dataclass

ZERO_MASK = b"\0\0\0\0"


def client_frame(payload: bytes, opcode: int = 0x2) -> bytes:
    """One final client-to-server frame carrying ``payload`` (masked with the zero key: bytes unchanged)."""
    n = len(payload)
    if n < 126:
        header = bytes((0x80 | opcode, 0x80 | n))
    elif n < 1 << 16:
        header = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
    else:
        header = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
    return header + ZERO_MASK + payload


def one_byte_messages(data: bytes) -> bytes:
    """``data`` as one binary message per byte, ready to be written in one go."""
    return b"".join(b"\x82\x81" + ZERO_MASK + data[i:i + 1] for i in range(len(data)))


@dataclass
class RawWebSocket:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter

    async def send(self, payload: bytes) -> None:
        self.writer.write(client_frame(payload))
        await self.writer.drain()

    async def receive(self) -> tuple[int, bytes]:
        """The next frame from the server: (opcode, payload). Raises IncompleteReadError at EOF."""
        b0, b1 = await self.reader.readexactly(2)
        n = b1 & 0x7F
        if n == 126:
            (n,) = struct.unpack("!H", await self.reader.readexactly(2))
        elif n == 127:
            (n,) = struct.unpack("!Q", await self.reader.readexactly(8))
        return b0 & 0x0F, await self.reader.readexactly(n)

    def close(self) -> None:
        self.writer.transport.abort()


async def open_raw_websocket(port: int, ssl_ctx: ssl.SSLContext, *, path: str = "/tunnel",
                             receive_buffer: int | None = None, timeout: float = 10.0) -> RawWebSocket:
    """Connect to 127.0.0.1:``port`` with TLS and upgrade ``path``; ``receive_buffer`` shrinks SO_RCVBUF so
    that a client that stops reading makes the server's send buffer fill quickly."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if receive_buffer is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    sock.setblocking(False)
    async with asyncio.timeout(timeout):
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
        reader, writer = await asyncio.open_connection(sock=sock, ssl=ssl_ctx, server_hostname="127.0.0.1")
        key = base64.b64encode(os.urandom(16)).decode()
        writer.write((f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
                      f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
        head = await reader.readuntil(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 101"):
        writer.transport.abort()
        raise ConnectionError(f"upgrade refused: {head.splitlines()[0]!r}")
    return RawWebSocket(reader, writer)
