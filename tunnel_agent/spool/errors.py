"""The exceptions of the spool: one root, :class:`SpoolError`, and what a caller must tell apart.

- :class:`SpoolFull`: no room for this instance now (a limit, the filesystem's free space, ENOSPC or
  EDQUOT). The DICOM layer answers C-STORE 0xA700 (Refused: out of resources); nothing was kept.
- :class:`SpoolIOError`: the filesystem refused an operation (``errno`` says how). Nothing half-done was
  kept; the spool stays usable, and the same call may succeed once the fault is gone.
- :class:`SpoolStateError`: the caller used an entry out of turn (claimed twice, delivered without a
  claim, an unknown or already removed entry). A bug or a lost race, never a disk fault.

Messages name destinations and entry file names only: never a patient, a UID or an AE title.
"""

from __future__ import annotations

import errno as errno_codes

__all__ = ["SpoolError", "SpoolFull", "SpoolIOError", "SpoolStateError", "translate_os_error"]

_FULL_ERRNOS = frozenset({errno_codes.ENOSPC, errno_codes.EDQUOT})


class SpoolError(Exception):
    """Root of every error the spool raises."""


class SpoolFull(SpoolError):
    """No room: ``limit`` says which one ("destination", "total", "free space" or "filesystem"), and
    ``errno`` is ENOSPC or EDQUOT when the filesystem itself said so (None for the spool's own limits)."""

    def __init__(self, message: str, *, limit: str, errno: int | None = None) -> None:
        super().__init__(message)
        self.limit = limit
        self.errno = errno


class SpoolIOError(SpoolError):
    """An operating-system error on the spool's files; ``errno`` is the error number, ``operation`` what
    the spool was doing ("create", "write", "fsync", "rename", ...)."""

    def __init__(self, message: str, *, errno: int | None, operation: str) -> None:
        super().__init__(message)
        self.errno = errno
        self.operation = operation


class SpoolStateError(SpoolError):
    """The entry is not where the call needs it: unknown, not claimed, already claimed, being removed."""


def translate_os_error(exc: OSError, operation: str, where: str) -> SpoolError:
    """The spool's error for ``exc``, raised while doing ``operation`` on ``where`` (a PHI-free name):
    :class:`SpoolFull` for ENOSPC and EDQUOT, :class:`SpoolIOError` for everything else."""
    reason = errno_codes.errorcode.get(exc.errno or 0, str(exc.errno))
    message = f"spool {operation} failed on {where}: {reason} ({exc.strerror})"
    if exc.errno in _FULL_ERRNOS:
        return SpoolFull(message, limit="filesystem", errno=exc.errno)
    return SpoolIOError(message, errno=exc.errno, operation=operation)
