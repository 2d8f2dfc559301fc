"""An asyncio SCP that accepts every association and holds it as long as the caller wants.

It answers any A-ASSOCIATE-RQ with an A-ASSOCIATE-AC (every proposed context accepted, see
:func:`tunnel_bench.pdus.associate_ac`) and any A-RELEASE-RQ with an A-RELEASE-RP, then closes. P-DATA
is read and dropped. One coroutine per connection and no per-association buffer beyond one PDU, so it
holds thousands of idle associations cheaply: the destination of the idle-association and churn
measurements. Run as its own process: ``python -m tunnel_bench.acceptscp --port N``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import socket
from collections.abc import Sequence

from tunnel_bench.pdus import (
    A_ABORT,
    A_ASSOCIATE_RQ,
    A_RELEASE_RQ,
    RELEASE_RP,
    PduBuffer,
    PduError,
    associate_ac,
)

__all__ = ["AcceptAllScp", "main"]

READ_CHUNK = 65536


class AcceptAllScp:
    """Accept-all DICOM SCP on 127.0.0.1. ``await start()``, then ``close()`` when done."""

    def __init__(self, port: int, *, max_connections: int = 10000, max_pdu: int = 1 << 20) -> None:
        self.port = port
        self.max_connections = max_connections
        self.max_pdu = max_pdu
        self.open_connections = 0
        self.associations = 0
        self._server: asyncio.Server | None = None

    async def start(self) -> int:
        """Listen; returns the bound port (useful with port 0)."""
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port, backlog=1024)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    def close(self) -> None:
        if self._server is not None:
            self._server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.open_connections >= self.max_connections:
            writer.close()
            return
        self.open_connections += 1
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            await self._converse(reader, writer)
        except (ConnectionError, PduError, asyncio.IncompleteReadError):
            pass  # the caller went away or spoke nonsense: just close
        finally:
            self.open_connections -= 1
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def _converse(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        pdus = PduBuffer(self.max_pdu)
        while data := await reader.read(READ_CHUNK):
            for pdu in pdus.feed(data):
                if not await self._answer(pdu, writer):
                    return

    async def _answer(self, pdu: bytes, writer: asyncio.StreamWriter) -> bool:
        """Reply to one PDU; False when the association is over."""
        kind = pdu[0]
        if kind == A_ASSOCIATE_RQ:
            self.associations += 1
            writer.write(associate_ac(pdu))
        elif kind == A_RELEASE_RQ:
            writer.write(RELEASE_RP)
            await writer.drain()
            return False
        elif kind == A_ABORT:
            return False
        await writer.drain()
        return True


async def _run(port: int, max_connections: int) -> None:
    scp = AcceptAllScp(port, max_connections=max_connections)
    bound = await scp.start()
    print(f"acceptscp listening on 127.0.0.1:{bound}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    scp.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tunnel_bench.acceptscp", description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--max-connections", type=int, default=10000)
    args = parser.parse_args(argv)
    asyncio.run(_run(args.port, args.max_connections))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
