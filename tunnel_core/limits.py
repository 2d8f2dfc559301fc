"""Every limit of the mux, with safe defaults. Passed to :class:`tunnel_core.mux.Mux` at construction."""

from __future__ import annotations

from dataclasses import dataclass

KIB = 1024
MIB = 1024 * KIB

# Protocol constants (docs/protocol.md): every receiver accepts frames up to MAX_FRAME_PAYLOAD, and every
# stream and connection starts with INITIAL_WINDOW of credit; a receiver raises it with WINDOW frames.
MAX_FRAME_PAYLOAD = 1 * MIB
INITIAL_WINDOW = 256 * KIB
MAX_REPORT = 64 * KIB  # the largest REPORT payload (the agent's health, JSON)
MAX_STREAM_ID = 2**32 - 1  # stream ids are u32; a side that would need a larger one has run out


@dataclass(frozen=True, slots=True)
class MuxLimits:
    """Sizes are bytes.

    ``stream_window`` is the credit each side grants a new stream; ``connection_window`` the credit for the
    sum of all streams. Both are credit, not allocation: an idle stream holds no buffer. Credit comes back
    only after the receiving side has written the bytes onward (see ``Mux.acknowledge``).
    """

    max_frame_payload: int = 256 * KIB
    stream_window: int = 4 * MIB
    connection_window: int = 64 * MIB
    max_streams: int = 4096

    def __post_init__(self) -> None:
        if not 1 <= self.max_frame_payload <= MAX_FRAME_PAYLOAD:
            raise ValueError("max_frame_payload must be between 1 byte and 1 MiB")
        if self.stream_window < INITIAL_WINDOW:
            raise ValueError("stream_window must be at least 256 KiB, the protocol's initial window")
        if self.stream_window >= 2**31:
            raise ValueError("stream_window must be below 2 GiB")
        if self.connection_window < self.stream_window or self.connection_window >= 2**31:
            raise ValueError("connection_window must be at least stream_window and below 2 GiB")
        if self.max_streams < 1:
            raise ValueError("max_streams must be at least 1")
