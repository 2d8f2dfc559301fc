"""tunnel_core.routing: who may reach what, as pure decisions."""

from __future__ import annotations

import pytest

from tunnel_core.codes import ErrorCode
from tunnel_core.dicom import RejectReason
from tunnel_core.routing import (
    ANY_CALLER,
    Accept,
    Destination,
    IngressRoute,
    Reject,
    caller_allowed,
    decide_destination,
    decide_ingress,
    reject_for_reset,
)

TABLE = {
    "PACS_A": IngressRoute("PACS_A", site="hospital-a", route="pacs", allowed_calling_aes=frozenset({"AI"})),
    "PACS_B": IngressRoute("PACS_B", site="hospital-b", route="pacs", allowed_calling_aes=frozenset({ANY_CALLER})),
}


def test_accept_names_site_and_route() -> None:
    assert decide_ingress(TABLE, "PACS_A", "AI", {"hospital-a"}) == Accept("hospital-a", "pacs")
    assert decide_ingress(TABLE, "PACS_B", "ANYONE", {"hospital-b"}) == Accept("hospital-b", "pacs")


def test_unknown_called_ae_is_checked_first() -> None:
    # unknown AE, unknown caller, nothing online: the called AE is what the caller hears about
    assert decide_ingress(TABLE, "NOPE", "STRANGER", set()) == Reject(RejectReason.CALLED_AE_UNKNOWN)


def test_calling_ae_is_checked_before_the_site_is_online() -> None:
    # A refused caller learns nothing about the site's state: 1/1/3 even while it is offline.
    assert decide_ingress(TABLE, "PACS_A", "STRANGER", set()) == Reject(RejectReason.CALLING_AE_NOT_ALLOWED)
    assert decide_ingress(TABLE, "PACS_A", "STRANGER", {"hospital-a"}) == Reject(
        RejectReason.CALLING_AE_NOT_ALLOWED)


def test_site_offline_last() -> None:
    assert decide_ingress(TABLE, "PACS_A", "AI", {"hospital-b"}) == Reject(RejectReason.SITE_OFFLINE)


def test_titles_match_exactly() -> None:
    assert decide_ingress(TABLE, "pacs_a", "AI", {"hospital-a"}) == Reject(RejectReason.CALLED_AE_UNKNOWN)
    assert decide_ingress(TABLE, "PACS_A", "ai", {"hospital-a"}) == Reject(RejectReason.CALLING_AE_NOT_ALLOWED)


def test_star_allows_any_caller_and_is_not_a_pattern() -> None:
    assert caller_allowed(frozenset({ANY_CALLER}), "WHOEVER")
    assert caller_allowed(frozenset({"AI", ANY_CALLER}), "WHOEVER")
    assert caller_allowed(frozenset({"AI"}), "AI")
    assert not caller_allowed(frozenset({"AI"}), "AI2")
    assert not caller_allowed(frozenset({"AI*"}), "AI2")
    assert not caller_allowed(frozenset(), "AI")


DESTINATIONS = {
    "pacs": Destination("pacs", "10.0.0.5", 104, called_ae="ORTHANC", allowed_calling_aes=frozenset({"AI"})),
    "archive": Destination("archive", "10.0.0.6", 11112),
}


def test_destination_found() -> None:
    assert decide_destination(DESTINATIONS, "pacs", "AI") is DESTINATIONS["pacs"]
    assert decide_destination(DESTINATIONS, "archive", "ANYONE") is DESTINATIONS["archive"]  # default "*"


def test_destination_unknown_route() -> None:
    assert decide_destination(DESTINATIONS, "10.0.0.5:104", "AI") is ErrorCode.UNKNOWN_ROUTE
    assert decide_destination(DESTINATIONS, "", "AI") is ErrorCode.UNKNOWN_ROUTE


def test_destination_caller_refused() -> None:
    assert decide_destination(DESTINATIONS, "pacs", "STRANGER") is ErrorCode.CALLING_AE_REFUSED


@pytest.mark.parametrize(("code", "reason"), [
    (ErrorCode.UNKNOWN_ROUTE, RejectReason.CALLED_AE_UNKNOWN),
    (ErrorCode.CALLING_AE_REFUSED, RejectReason.CALLING_AE_NOT_ALLOWED),
    (ErrorCode.CAPACITY, RejectReason.CAPACITY),
    (ErrorCode.DESTINATION_UNREACHABLE, RejectReason.SITE_OFFLINE),
    (ErrorCode.GOING_AWAY, RejectReason.SITE_OFFLINE),
])
def test_reject_for_reset(code: ErrorCode, reason: RejectReason) -> None:
    assert reject_for_reset(code) is reason


def test_every_other_reset_code_reads_as_site_offline() -> None:
    specific = {ErrorCode.UNKNOWN_ROUTE, ErrorCode.CALLING_AE_REFUSED, ErrorCode.CAPACITY}
    for code in set(ErrorCode) - specific:
        assert reject_for_reset(code) is RejectReason.SITE_OFFLINE, code
