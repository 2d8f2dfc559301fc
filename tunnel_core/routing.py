"""Routing decisions as pure functions.

The relay routes a cloud caller by the called AE title, in the table of the listener it called; the agent
maps a route name from the relay to a destination from its own configuration and nothing else; the relay
dials only the cloud destinations configured for the site whose certificate opened the stream.
"""

from __future__ import annotations

from collections.abc import Container, Mapping
from dataclasses import dataclass

from tunnel_core.codes import ErrorCode
from tunnel_core.dicom import RejectReason

ANY_CALLER = "*"


@dataclass(frozen=True, slots=True)
class IngressRoute:
    """A listener entry: callers asking for ``called_ae`` reach ``route`` at ``site``."""

    called_ae: str
    site: str
    route: str
    allowed_calling_aes: frozenset[str]


@dataclass(frozen=True, slots=True)
class Destination:
    """Somewhere one side may dial: a host and port, with an optional called-AE rewrite."""

    name: str
    host: str
    port: int
    called_ae: str | None = None
    allowed_calling_aes: frozenset[str] = frozenset({ANY_CALLER})


@dataclass(frozen=True, slots=True)
class Accept:
    site: str
    route: str


@dataclass(frozen=True, slots=True)
class Reject:
    reason: RejectReason


def caller_allowed(allowed: frozenset[str], calling_ae: str) -> bool:
    return ANY_CALLER in allowed or calling_ae in allowed


def decide_ingress(table: Mapping[str, IngressRoute], called_ae: str, calling_ae: str,
                   online_sites: Container[str]) -> Accept | Reject:
    """Relay DICOM ingress: unknown called AE → 1/1/7, caller not allowed → 1/1/3, site offline → 2/3/1."""
    entry = table.get(called_ae)
    if entry is None:
        return Reject(RejectReason.CALLED_AE_UNKNOWN)
    if not caller_allowed(entry.allowed_calling_aes, calling_ae):
        return Reject(RejectReason.CALLING_AE_NOT_ALLOWED)
    if entry.site not in online_sites:
        return Reject(RejectReason.SITE_OFFLINE)
    return Accept(entry.site, entry.route)


def decide_destination(destinations: Mapping[str, Destination], key: str,
                       calling_ae: str) -> Destination | ErrorCode:
    """Map a stream's target (route name, or called AE) to a configured destination, or a RESET code."""
    dest = destinations.get(key)
    if dest is None:
        return ErrorCode.UNKNOWN_ROUTE
    if not caller_allowed(dest.allowed_calling_aes, calling_ae):
        return ErrorCode.CALLING_AE_REFUSED
    return dest


_RESET_TO_REJECT = {
    ErrorCode.UNKNOWN_ROUTE: RejectReason.CALLED_AE_UNKNOWN,
    ErrorCode.CALLING_AE_REFUSED: RejectReason.CALLING_AE_NOT_ALLOWED,
    ErrorCode.CAPACITY: RejectReason.CAPACITY,
}


def reject_for_reset(code: ErrorCode) -> RejectReason:
    """How a stream refused before the association was accepted is told to the DICOM caller."""
    return _RESET_TO_REJECT.get(code, RejectReason.SITE_OFFLINE)


_REJECT_TO_RESET = {reason: code for code, reason in _RESET_TO_REJECT.items()}


def reset_for_reject(reason: RejectReason) -> ErrorCode:
    """The RESET a relay answers a peer relay's stream with, for the reject it decided: the peer turns it
    back into the same A-ASSOCIATE-RJ (:func:`reject_for_reset`); "no tunnel here" is 2/3/1."""
    return _REJECT_TO_RESET.get(reason, ErrorCode.DESTINATION_UNREACHABLE)
