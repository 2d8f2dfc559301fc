"""tunnel_core.delivery: what the forwarder does with an instance once its destination answered."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tunnel_core.delivery import (
    Verdict,
    describe_status,
    judge_context,
    judge_no_response,
    judge_store_status,
    retry_delay,
)
from tunnel_core.dicom.pdu import ContextResult


@pytest.mark.parametrize("status", [0x0000, 0x0001, 0xB000, 0xB006, 0xB007, 0x0111])
def test_success_warnings_and_duplicates_are_delivered(status: int) -> None:
    assert judge_store_status(status, attempts=1, max_attempts=3).verdict is Verdict.DELIVERED


@pytest.mark.parametrize(("status", "words"), [
    (0x0122, "SOP class not supported"), (0x0124, "not authorised"), (0x0117, "invalid object instance"),
    (0xA900, "does not match"), (0xA9FF, "does not match"), (0xC000, "cannot understand"),
    (0xC123, "cannot understand")])
def test_permanent_failures_are_quarantined_at_the_first_attempt(status: int, words: str) -> None:
    judgement = judge_store_status(status, attempts=1, max_attempts=10)
    assert judgement.verdict is Verdict.QUARANTINE
    assert words in judgement.reason and f"0x{status:04X}" in judgement.reason


@pytest.mark.parametrize("status", [0xA700, 0xA7FF, 0x0110, 0x0213, 0x0212, 0xFF00, 0xFE00, 0xD000])
def test_transient_failures_are_retried_until_the_attempts_run_out(status: int) -> None:
    assert judge_store_status(status, attempts=2, max_attempts=3).verdict is Verdict.RETRY
    last = judge_store_status(status, attempts=3, max_attempts=3)
    assert last.verdict is Verdict.QUARANTINE and "3 times" in last.reason


def test_a_pending_status_is_named_as_not_final() -> None:
    assert "not a final C-STORE status" in judge_store_status(0xFF00, attempts=1, max_attempts=3).reason


def test_no_response_counts_as_an_attempt() -> None:
    assert judge_no_response("no response within 60s", attempts=1, max_attempts=2).verdict is Verdict.RETRY
    assert judge_no_response("no response within 60s", attempts=2, max_attempts=2).verdict is Verdict.QUARANTINE


def test_status_descriptions_name_known_codes_and_show_unknown_ones() -> None:
    assert describe_status(0xA700) == "status 0xA700 (out of resources)"
    assert describe_status(0xD00D) == "status 0xD00D"


@pytest.mark.parametrize(("result", "verdict"), [
    (ContextResult.ACCEPTANCE, None), (ContextResult.NO_REASON, Verdict.RETRY),
    (ContextResult.USER_REJECTION, Verdict.QUARANTINE),
    (ContextResult.ABSTRACT_SYNTAX_NOT_SUPPORTED, Verdict.QUARANTINE),
    (ContextResult.TRANSFER_SYNTAXES_NOT_SUPPORTED, Verdict.QUARANTINE)])
def test_negotiation_results(result: ContextResult, verdict: Verdict | None) -> None:
    judgement = judge_context(result)
    assert (judgement.verdict if judgement else None) is verdict


@given(status=st.integers(min_value=0, max_value=0xFFFF), attempts=st.integers(min_value=1, max_value=20))
def test_every_status_gets_a_verdict_with_a_phi_free_reason(status: int, attempts: int) -> None:
    judgement = judge_store_status(status, attempts=attempts, max_attempts=10)
    assert f"0x{status:04X}" in judgement.reason
    if attempts >= 10:
        assert judgement.verdict is not Verdict.RETRY


def test_retry_delays_double_up_to_the_cap_with_half_of_each_random() -> None:
    low = [retry_delay(n, initial=1.0, cap=8.0, rand=lambda: 0.0) for n in range(1, 7)]
    high = [retry_delay(n, initial=1.0, cap=8.0, rand=lambda: 1.0) for n in range(1, 7)]
    assert low == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    assert high == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    assert retry_delay(10_000, initial=1.0, cap=300.0, rand=lambda: 0.5) == 225.0
