"""The registry's errors, apart so that its engines and its rules can both raise them."""

from __future__ import annotations

__all__ = ["RegistryError", "RegistryUnavailable"]


class RegistryError(Exception):
    """The registry cannot do what was asked (unknown site, unreadable or too new a database...)."""


class RegistryUnavailable(RegistryError):
    """The registry's database cannot be reached or did not answer in time; the message names it. Writes
    (enrollment, renewal, admin changes) fail with it; what the relay already holds keeps working."""
