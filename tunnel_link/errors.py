"""The exception root of the shared adapters."""

from __future__ import annotations

from tunnel_core.codes import ErrorCode


class LinkError(Exception):
    """Root of errors raised by :mod:`tunnel_link` (tunnel down, write failed)."""


class StreamResetError(LinkError):
    """The stream was reset; ``code`` says why (ABORTED when the whole tunnel went down)."""

    def __init__(self, code: ErrorCode) -> None:
        super().__init__(f"stream reset: {code.name}")
        self.code = code
