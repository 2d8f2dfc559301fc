"""Wire codes: the mux protocol's (see docs/protocol.md), and the A-ASSOCIATE-RJ rejects the tunnel sends."""

from __future__ import annotations

from enum import Enum, IntEnum


class FrameType(IntEnum):
    DATA = 0x0
    OPEN = 0x1
    WINDOW = 0x2
    FIN = 0x3
    RESET = 0x4
    PING = 0x5
    GOAWAY = 0x6
    REPORT = 0x7  # agent -> relay: the agent's health, a JSON object (docs/protocol.md §3.8)


class FrameFlag(IntEnum):
    ACK = 0x1  # on PING: this is the pong


class TargetKind(IntEnum):
    """What an OPEN frame names. Never a host:port."""

    ROUTE = 1  # relay → agent: a route name from the agent's own config
    CALLED_AE = 2  # agent → relay: the called AE title of a cloud destination of this site
    # relay → relay (fleet peering): a listener name; the receiving relay routes the A-ASSOCIATE-RQ that
    # follows within that listener's table, to a site whose tunnel it holds itself (one hop, no further)
    LISTENER = 3


class ErrorCode(IntEnum):
    """Reason codes carried by RESET and GOAWAY."""

    NO_ERROR = 0
    PROTOCOL_ERROR = 1
    FLOW_CONTROL_ERROR = 2
    FRAME_SIZE_ERROR = 3
    UNKNOWN_ROUTE = 4  # no such route / called AE: becomes A-ASSOCIATE-RJ 1/1/7
    CALLING_AE_REFUSED = 5  # calling AE not on the allow-list: 1/1/3
    DESTINATION_UNREACHABLE = 6  # the final destination could not be dialed: 2/3/1
    CAPACITY = 7  # stream limit reached: 2/3/2
    GOING_AWAY = 8  # the peer is draining; retry elsewhere: 2/3/1
    ABORTED = 9  # the far end's TCP connection ended abruptly
    TIMEOUT = 10  # the far end was silent too long (ARTIM)
    INTERNAL_ERROR = 11
    REVOKED = 12  # GOAWAY: the site or its certificate was revoked, or the certificate expired; do not retry soon

    @classmethod
    def from_wire(cls, value: int) -> ErrorCode:
        """Unknown codes from a newer peer are treated as INTERNAL_ERROR rather than refused."""
        try:
            return cls(value)
        except ValueError:
            return cls.INTERNAL_ERROR


class RejectReason(Enum):
    """The rejects of DESIGN.md, as (result, source, reason) of PS3.8 §9.3.4."""

    CALLED_AE_UNKNOWN = (1, 1, 7)
    CALLING_AE_NOT_ALLOWED = (1, 1, 3)
    SITE_OFFLINE = (2, 3, 1)
    CAPACITY = (2, 3, 2)
