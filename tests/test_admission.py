"""tunnel_core.admission: the caps on connections that have not authenticated yet."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tunnel_core.admission import Admission, AdmissionLimits


def test_per_source_cap_refuses_that_source_only() -> None:
    gate = Admission(AdmissionLimits(max_total=10, max_per_source=2))
    assert gate.admit("10.0.0.1") and gate.admit("10.0.0.1")
    assert not gate.admit("10.0.0.1")
    assert gate.admit("10.0.0.2")
    assert (gate.total, gate.refused, gate.held("10.0.0.1")) == (3, 1, 2)


def test_total_cap_refuses_everyone_and_release_makes_room() -> None:
    gate = Admission(AdmissionLimits(max_total=3, max_per_source=3))
    for source in ("a", "b", "c"):
        assert gate.admit(source)
    assert not gate.admit("d")
    gate.release("b")
    assert gate.admit("d")
    assert gate.sources == 3


def test_releasing_what_was_never_admitted_is_an_error() -> None:
    gate = Admission()
    with pytest.raises(ValueError):
        gate.release("nobody")


@pytest.mark.parametrize(("total", "per_source"), [(0, 1), (1, 0), (2, 3)])
def test_limits_validate(total: int, per_source: int) -> None:
    with pytest.raises(ValueError):
        AdmissionLimits(max_total=total, max_per_source=per_source)


@settings(max_examples=200, deadline=None)
@given(ops=st.lists(st.tuples(st.booleans(), st.sampled_from("abcde")), max_size=300),
       total=st.integers(1, 12), per_source=st.integers(1, 12))
def test_counts_match_a_model_and_never_pass_the_caps(ops, total: int, per_source: int) -> None:
    per_source = min(per_source, total)
    gate = Admission(AdmissionLimits(max_total=total, max_per_source=per_source))
    model: dict[str, int] = {}
    refused = 0
    for admit, source in ops:
        if admit:
            allowed = model.get(source, 0) < per_source and sum(model.values()) < total
            assert gate.admit(source) is allowed
            if allowed:
                model[source] = model.get(source, 0) + 1
            else:
                refused += 1
        elif model.get(source):
            gate.release(source)
            model[source] -= 1
        assert gate.total == sum(model.values()) <= total
        assert all(gate.held(s) == n <= per_source for s, n in model.items())
        assert gate.sources == sum(1 for n in model.values() if n) <= total
        assert gate.refused == refused
