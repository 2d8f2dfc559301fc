"""Every use of a dependency's private API, in one place, each behind a feature check made at run time.

Why: a private attribute can vanish in any release of aiohttp or CPython. Nothing here is imported or
touched at import time, every function checks what it needs before using it and returns None/False when
it is missing, and each caller has a public fallback that is tested (``tests/test_private_api.py`` starts
a real relay and agent with these paths broken). What each use buys:

- ``aiohttp._websocket.helpers.websocket_mask`` (compiled, in place) and an aiohttp WebSocket's
  ``_writer.transport`` / ``_writer.protocol._drain_helper``: binary messages written straight to the
  TCP/TLS transport, one copy fewer per layer than ``send_bytes`` (profiling found a third of the agent's
  time in memcpy). Fallback: ``send_bytes``, through ``tunnel_link.transport.QueuedTransport``.
- the same ``_writer.transport``, to drop a connection whose peer stopped reading (a close handshake would
  wait behind a full send buffer). Fallback: ``shutdown()`` of the socket from the public
  ``get_extra_info("socket")``.
- ``ssl.SSLContext._msg_callback`` (a CPython debugging hook): the certificate a rejected inner-TLS peer
  presented, for the error message. Fallback: the message names no issuer.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import socket
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

__all__ = [
    "MISSING",
    "RawWriter",
    "abort_websocket",
    "raw_writer",
    "set_tls_message_callback",
    "tls_message_callback",
    "websocket_mask",
]

Mask = Callable[[bytes, bytearray], None]
MISSING: Any = object()  # what ``tls_message_callback`` returns when the hook does not exist
_TRANSPORT_METHODS = ("writelines", "get_write_buffer_size", "is_closing", "abort")
_mask: Mask | None | object = MISSING  # checked once per process


def websocket_mask() -> Mask | None:
    """aiohttp's compiled RFC 6455 masking function, if it is where it was and masks correctly."""
    global _mask
    if _mask is MISSING:
        _mask = _find_mask()
        if _mask is None:
            log.info("aiohttp's websocket_mask is not available: the agent sends through send_bytes")
    return _mask  # type: ignore[return-value]


def _find_mask() -> Mask | None:
    try:
        mask = getattr(importlib.import_module("aiohttp._websocket.helpers"), "websocket_mask", None)
    except ImportError:
        return None
    if not callable(mask):
        return None
    probe = bytearray(6)
    try:
        mask(b"\x01\x02\x03\x04", probe)
    except Exception:  # noqa: BLE001 - whatever a moved function does wrong, the fallback is safe
        return None
    return mask if probe == b"\x01\x02\x03\x04\x01\x02" else None


@dataclass(frozen=True, slots=True)
class RawWriter:
    """The TCP/TLS transport under an aiohttp WebSocket, and the wait for it to accept more."""

    transport: asyncio.WriteTransport
    drain: Callable[[], Awaitable[None]]


def raw_writer(ws: object) -> RawWriter | None:
    """The transport and drain of aiohttp WebSocket ``ws`` (client or prepared server side), or None if
    this aiohttp does not have them where this code expects them."""
    writer = getattr(ws, "_writer", None)
    transport = getattr(writer, "transport", None)
    drain = getattr(getattr(writer, "protocol", None), "_drain_helper", None)
    if transport is None or not callable(drain):
        return None
    if not all(callable(getattr(transport, name, None)) for name in _TRANSPORT_METHODS):
        return None
    return RawWriter(transport, drain)


def abort_websocket(ws: Any) -> bool:
    """Drop the connection under ``ws`` at once, without a close handshake; False if it cannot be reached.

    A wrapper that knows how (the inner-TLS session) offers ``abort()``; an aiohttp WebSocket is reached
    through its writer's transport, or else through its socket (public), which is shut down so that every
    pending read and write ends.
    """
    abort = getattr(ws, "abort", None)
    if callable(abort):
        abort()
        return True
    raw = raw_writer(ws)
    if raw is not None:
        raw.transport.abort()
        return True
    get_extra_info = getattr(ws, "get_extra_info", None)
    sock = get_extra_info("socket") if callable(get_extra_info) else None
    if sock is None:
        return False
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        return False  # not connected any more: nothing left to drop
    return True


def tls_message_callback(ctx: ssl.SSLContext) -> Any:
    """The context's message callback, None if unset, ``MISSING`` if this Python has no such hook."""
    return getattr(ctx, "_msg_callback", MISSING)


def set_tls_message_callback(ctx: ssl.SSLContext, callback: Callable[..., None] | None) -> bool:
    """Install (or with None remove) the message callback; False if this Python refuses it."""
    if tls_message_callback(ctx) is MISSING:
        return False
    try:
        ctx._msg_callback = callback  # type: ignore[attr-defined]
    except (AttributeError, TypeError):
        return False
    return True
