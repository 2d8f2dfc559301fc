"""What the forwarder does with a spooled instance after its destination answered: the pure decisions.

Theory of operation: an instance leaves the spool only when the cloud destination said it holds it.
Everything else is either worth another try later or will never work, and telling those apart is what
keeps a spool from either losing data or retrying a hopeless instance for ever while it stalls nothing:

- **Delivered**: C-STORE-RSP success, or a warning (the destination stored it, perhaps with coercion, PS3.4
  B.2.3), or 0x0111 duplicate SOP instance (it already holds that instance: a replay after a crash).
- **Quarantine at once** (permanent, the same bytes will fail the same way): the SOP class is not supported
  (0x0122), not authorised (0x0124), the dataset does not match the SOP class (0xA9xx), the destination
  cannot understand it (0xCxxx), an invalid object instance (0x0117); or, in negotiation, the destination
  refused the instance's presentation context (abstract syntax or transfer syntax not supported, or
  refused by its user).
- **Retry** with jittered exponential backoff: out of resources (0xA7xx), processing failure (0x0110),
  resource limitation (0x0213), any other failure, a pending or cancel status (a protocol slip of the
  destination's), or no response at all. After ``max_attempts`` such DIMSE failures the instance goes to
  quarantine too, with the last reason: a destination that keeps failing one instance must not keep it in
  front of the others for ever.

Failures that are not the instance's (no tunnel, the relay refusing the association, the connection lost)
are not attempts: they delay everything and are retried without a limit; the spool holds meanwhile.
Reasons are PHI-free strings (status codes and names) that ops see in status and metrics labels.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

from tunnel_core.dicom.dimse import Status, StatusCategory, category
from tunnel_core.dicom.pdu import ContextResult

__all__ = ["Judgement", "Verdict", "describe_status", "judge_context", "judge_no_response", "judge_store_status",
           "retry_delay"]


class Verdict(Enum):
    DELIVERED = "delivered"
    RETRY = "retry"
    QUARANTINE = "quarantine"


@dataclass(frozen=True, slots=True)
class Judgement:
    verdict: Verdict
    reason: str  # PHI-free: what ops read in the quarantine list


_DUPLICATE_SOP_INSTANCE = 0x0111
_PERMANENT = {0x0117: "invalid object instance", 0x0122: "SOP class not supported",
              0x0124: "refused: not authorised"}
_PERMANENT_RANGES = ((0xA900, 0xA9FF, "dataset does not match the SOP class"),
                     (0xC000, 0xCFFF, "cannot understand"))


def describe_status(status: int) -> str:
    """``status 0xA700 (out of resources)``: the code, and its name where the standard names it."""
    try:
        name = Status(status).name.replace("_", " ").lower()
    except ValueError:
        return f"status 0x{status:04X}"
    return f"status 0x{status:04X} ({name})"


def judge_store_status(status: int, *, attempts: int, max_attempts: int) -> Judgement:
    """The verdict on a C-STORE-RSP ``status``; ``attempts`` counts DIMSE failures so far, this one included."""
    kind = category(status)
    if kind in (StatusCategory.SUCCESS, StatusCategory.WARNING) or status == _DUPLICATE_SOP_INSTANCE:
        return Judgement(Verdict.DELIVERED, describe_status(status))
    if status in _PERMANENT:
        return Judgement(Verdict.QUARANTINE, f"{describe_status(status)}: {_PERMANENT[status]}")
    for low, high, what in _PERMANENT_RANGES:
        if low <= status <= high:
            return Judgement(Verdict.QUARANTINE, f"status 0x{status:04X}: {what}")
    reason = describe_status(status)
    if kind is not StatusCategory.FAILURE:
        reason += " is not a final C-STORE status"
    if attempts >= max_attempts:
        return Judgement(Verdict.QUARANTINE, f"{reason}, {attempts} times")
    return Judgement(Verdict.RETRY, reason)


def judge_no_response(what: str, *, attempts: int, max_attempts: int) -> Judgement:
    """No C-STORE-RSP came (``what`` happened instead, e.g. "no response within 60s"): one failed attempt."""
    if attempts >= max_attempts:
        return Judgement(Verdict.QUARANTINE, f"{what}, {attempts} times")
    return Judgement(Verdict.RETRY, what)


def judge_context(result: ContextResult) -> Judgement | None:
    """The verdict on instances whose presentation context the destination answered with ``result``:
    None when it was accepted (they may be sent), else retry or quarantine."""
    if result is ContextResult.ACCEPTANCE:
        return None
    name = result.name.replace("_", " ").lower()
    if result is ContextResult.NO_REASON:
        return Judgement(Verdict.RETRY, f"presentation context refused: {name}")
    return Judgement(Verdict.QUARANTINE, f"presentation context refused: {name}")


def retry_delay(attempts: int, *, initial: float, cap: float, rand: Callable[[], float]) -> float:
    """Seconds before the next try after ``attempts`` failures: half the exponential ceiling plus a random
    half (so retries of many instances spread out, and none comes back at once)."""
    ceiling = min(cap, initial * 2 ** min(max(attempts - 1, 0), 62))
    return ceiling / 2 + rand() * ceiling / 2
