"""Socket tuning applied to every TCP socket the tunnel owns."""

from __future__ import annotations

import asyncio
import socket


def tune_socket(sock: socket.socket | None) -> None:
    """TCP_NODELAY: DICOM is request/response with small PDUs; Nagle would add up to 40 ms per turn."""
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def tune(transport: asyncio.BaseTransport | None) -> None:
    if transport is not None:
        tune_socket(transport.get_extra_info("socket"))


def nodelay_enabled(sock: socket.socket) -> bool:
    return bool(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
