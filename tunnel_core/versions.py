"""Which version of the mux protocol two peers speak (docs/protocol.md §1.1): pure, no I/O.

The version is agreed on before the first frame, in the WebSocket handshake, as a subprotocol
(RFC 6455 §1.9): the agent offers ``dicom-tunnel.<n>`` for every version it speaks, newest first; the
relay answers with the first one it speaks too. A peer that offers or answers none is an older peer that
speaks version 1 only, so old agents and old relays keep working. Byte 0 of every frame header then
carries the agreed version. Frame types and error codes added within a version need no negotiation: a
receiver ignores a frame type it does not know and reads an unknown code as INTERNAL_ERROR.
"""

from __future__ import annotations

from collections.abc import Iterable

from tunnel_core.errors import ProtocolError

__all__ = ["SPOKEN", "SUBPROTOCOL_PREFIX", "negotiated_version", "offered_subprotocols", "select_subprotocol",
           "subprotocol"]

SUBPROTOCOL_PREFIX = "dicom-tunnel."
SPOKEN = (1,)  # the versions this implementation speaks, newest first
DEFAULT_VERSION = 1  # what a peer that negotiates nothing speaks


def subprotocol(version: int) -> str:
    return f"{SUBPROTOCOL_PREFIX}{version}"


def offered_subprotocols(spoken: Iterable[int] = SPOKEN) -> tuple[str, ...]:
    """What the agent offers (``Sec-WebSocket-Protocol``), newest first."""
    return tuple(subprotocol(v) for v in spoken)


def select_subprotocol(offered: Iterable[str], spoken: Iterable[int] = SPOKEN) -> str | None:
    """The relay's answer: the first offered subprotocol it speaks (the agent lists its newest first), or
    None — then the answer carries no subprotocol and both sides speak version 1."""
    ours = set(offered_subprotocols(spoken))
    return next((p.strip() for p in offered if p.strip() in ours), None)


def negotiated_version(selected: str | None, spoken: Iterable[int] = SPOKEN) -> int:
    """The version agreed on, from the subprotocol the handshake selected (None or "": version 1).
    Raises ``ProtocolError`` for one this side does not speak (a peer may only select what was offered)."""
    if not selected:
        return DEFAULT_VERSION
    prefix, _, number = selected.partition(SUBPROTOCOL_PREFIX)
    if prefix or not number.isdigit() or int(number) not in tuple(spoken):
        raise ProtocolError(f"the peer selected WebSocket subprotocol {selected[:40]!r}, "
                            "which this side does not speak")
    return int(number)
