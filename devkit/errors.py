"""The dev kit's one exception root and its few kinds.

Each also derives from the built-in the callers caught before the dev kit existed (``TimeoutError``,
``RuntimeError``), so ``except TimeoutError`` around a wait keeps meaning what it meant. (``StopFailed``,
which carries how each process ended, lives with them in ``devkit.procs``.)
"""

from __future__ import annotations

__all__ = ["CommandFailed", "DevkitError", "MissingProgram", "ProcessExited", "WaitTimeout"]


class DevkitError(Exception):
    """Something the dev kit was asked to do did not happen; the message says what, for a person."""


class WaitTimeout(DevkitError, TimeoutError):
    """A bounded wait ran out of time before its condition held."""


class ProcessExited(DevkitError, RuntimeError):
    """A process that was being waited on exited first; the message carries its log tail."""


class CommandFailed(DevkitError, RuntimeError):
    """A short command (a CLI run, an ``ip`` call) exited with a non-zero status."""


class MissingProgram(DevkitError):
    """A program the caller needs is not installed where it was looked for."""

