"""The exception root of the WireGuard package. No message ever holds key material."""

from __future__ import annotations

import shlex
from collections.abc import Sequence


class WireGuardError(Exception):
    """Root of the WireGuard errors."""


class InvalidKeyError(WireGuardError, ValueError):
    """A key is not base64 of 32 bytes, or a key file is unreadable or too open. Never holds the key."""


class DumpParseError(WireGuardError, ValueError):
    """``wg show <if> dump`` output did not have the documented shape. Names line and field only."""


class WireGuardCommandError(WireGuardError):
    """A command managing the interface failed; the message is one line: the argv and its stderr.

    argv never holds key material, so the message is safe to log.
    """

    def __init__(self, argv: Sequence[str], detail: str, returncode: int | None = None) -> None:
        self.argv = tuple(argv)
        self.returncode = returncode
        self.detail = detail
        status = "" if returncode is None else f" (exit {returncode})"
        super().__init__(f"`{shlex.join(self.argv)}` failed{status}: {detail}")
