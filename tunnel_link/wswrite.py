"""Binary WebSocket messages written straight to the connection's transport, with one copy fewer per
layer than ``send_bytes``.

Why: profiling the data path showed a third of the agent's time in memcpy. aiohttp's ``send_bytes``
copies the payload into a bytearray to mask it and then concatenates header, mask and payload (two full
copies per message), after our own frame encoding and joining (two more). Here the mux hands us a
bytearray it no longer uses; we mask it in place (client side, RFC 6455 §5.3, with aiohttp's compiled
mask function and a fresh random key per message) and write the 2-14 byte header and the payload as two
writes. Control frames (ping, pong, close) stay with aiohttp; every write here is a whole frame made
synchronously, so the two never interleave inside a frame.

This reaches into aiohttp's writer for its transport and protocol (no public accessor exists); if those
attributes are missing, ``FastBinaryWriter.attach`` returns None and the session falls back to
``send_bytes``.
"""

from __future__ import annotations

import asyncio
import os
import struct
from typing import Any

from aiohttp._websocket.helpers import websocket_mask

_OP_BINARY_FIN = 0x82
_LEN16 = struct.Struct("!BBH")
_LEN64 = struct.Struct("!BBQ")
_HIGH_WATER = 1024 * 1024  # bytes buffered in the transport before the writer waits


def frame_header(length: int, mask_key: bytes | None) -> bytes:
    """The RFC 6455 header of one final binary frame of ``length`` bytes (with the mask key, if any)."""
    mask_bit = 0x80 if mask_key is not None else 0
    if length < 126:
        header = bytes((_OP_BINARY_FIN, length | mask_bit))
    elif length < 1 << 16:
        header = _LEN16.pack(_OP_BINARY_FIN, 126 | mask_bit, length)
    else:
        header = _LEN64.pack(_OP_BINARY_FIN, 127 | mask_bit, length)
    return header + mask_key if mask_key is not None else header


def abort_websocket(ws: Any) -> bool:
    """Drop the connection under ``ws`` at once, without a close handshake; False if it cannot be reached.

    A WebSocket wrapper (the inner-TLS session) offers ``abort()``; an aiohttp WebSocket is reached through
    its writer's transport, as ``FastBinaryWriter.attach`` does.
    """
    abort = getattr(ws, "abort", None)
    if callable(abort):
        abort()
        return True
    transport = getattr(getattr(ws, "_writer", None), "transport", None)
    if transport is None:
        return False
    transport.abort()
    return True


class FastBinaryWriter:
    def __init__(self, transport: asyncio.WriteTransport, protocol: Any, mask: bool) -> None:
        self._transport = transport
        self._protocol = protocol
        self._mask = mask

    @classmethod
    def attach(cls, ws: Any, *, mask: bool) -> FastBinaryWriter | None:
        writer = getattr(ws, "_writer", None)
        transport = getattr(writer, "transport", None)
        protocol = getattr(writer, "protocol", None)
        if transport is None or not hasattr(protocol, "_drain_helper"):
            return None
        return cls(transport, protocol, mask)

    def write(self, message: bytearray) -> None:
        """Write ``message`` as one binary WebSocket message, now. Takes ownership: it is masked in place."""
        if self._transport.is_closing():
            raise ConnectionResetError("tunnel transport is closing")
        key = os.urandom(4) if self._mask else None
        if key is not None:
            websocket_mask(key, message)
        # One call, so a TLS transport sends both in one syscall (two TLS records, one header-sized).
        self._transport.writelines((frame_header(len(message), key), message))

    @property
    def congested(self) -> bool:
        return self._transport.get_write_buffer_size() > _HIGH_WATER

    def abort(self) -> None:
        """Drop the connection now: nothing buffered is sent, pending drains end with ConnectionError."""
        self._transport.abort()

    async def drained(self) -> None:
        """Return once the transport accepts more (immediately if it does)."""
        await self._protocol._drain_helper()
