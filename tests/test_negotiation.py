"""tunnel_core.dicom.negotiation: the agent accepts for a destination only what the destination accepts."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from tunnel_core.dicom import uids
from tunnel_core.dicom.negotiation import (
    MAX_CONTEXTS,
    accepted_pairs,
    answer_contexts,
    configured_pairs,
    probe_contexts,
)
from tunnel_core.dicom.pdu import ContextResult, PresentationContext, PresentationContextResult

CT = uids.COMMON_STORAGE_SOP_CLASSES["CTImageStorage"]
MR = uids.COMMON_STORAGE_SOP_CLASSES["MRImageStorage"]
JPEG_LOSSLESS = "1.2.840.10008.1.2.4.70"
EXPLICIT, IMPLICIT = uids.EXPLICIT_VR_LITTLE_ENDIAN, uids.IMPLICIT_VR_LITTLE_ENDIAN


def test_the_modalitys_first_acceptable_syntax_wins_and_the_rest_are_refused_with_their_reason() -> None:
    offered = [PresentationContext(1, CT, (JPEG_LOSSLESS, EXPLICIT, IMPLICIT)),
               PresentationContext(3, CT, (JPEG_LOSSLESS,)),
               PresentationContext(5, MR, (EXPLICIT,)),
               PresentationContext(7, uids.VERIFICATION, (IMPLICIT,))]
    assert answer_contexts(offered, {CT: (IMPLICIT, EXPLICIT)}) == (
        PresentationContextResult(1, ContextResult.ACCEPTANCE, EXPLICIT),
        PresentationContextResult(3, ContextResult.TRANSFER_SYNTAXES_NOT_SUPPORTED, ""),
        PresentationContextResult(5, ContextResult.ABSTRACT_SYNTAX_NOT_SUPPORTED, ""),
        PresentationContextResult(7, ContextResult.ACCEPTANCE, IMPLICIT),  # C-ECHO tests the agent itself
    )


def test_probes_propose_each_pair_alone_in_batches_of_at_most_128() -> None:
    pairs = [(f"1.2.3.{n}", ts) for n in range(70) for ts in (EXPLICIT, IMPLICIT)] + [("1.2.3.0", EXPLICIT)]
    batches = probe_contexts(pairs)
    assert [len(b) for b in batches] == [MAX_CONTEXTS, 140 - MAX_CONTEXTS]
    for batch in batches:
        assert [c.id for c in batch] == list(range(1, 2 * len(batch), 2))
        assert all(len(c.transfer_syntaxes) == 1 for c in batch)
    assert [(c.abstract_syntax, c.transfer_syntaxes[0]) for b in batches for c in b] == pairs[:140]


def test_what_was_accepted_is_read_from_the_answer_and_nothing_else() -> None:
    proposed = probe_contexts([(CT, EXPLICIT), (CT, IMPLICIT), (MR, EXPLICIT), (MR, JPEG_LOSSLESS)])[0]
    results = [PresentationContextResult(1, ContextResult.ACCEPTANCE, EXPLICIT),
               PresentationContextResult(3, ContextResult.ACCEPTANCE, IMPLICIT),
               PresentationContextResult(5, ContextResult.ABSTRACT_SYNTAX_NOT_SUPPORTED, ""),
               PresentationContextResult(7, ContextResult.ACCEPTANCE, EXPLICIT),  # not what was proposed for 7
               PresentationContextResult(9, ContextResult.ACCEPTANCE, EXPLICIT)]  # never proposed
    assert accepted_pairs(proposed, results) == {CT: (EXPLICIT, IMPLICIT)}


def test_the_cold_start_answer_is_every_configured_pair() -> None:
    assert configured_pairs([CT, MR], [EXPLICIT, IMPLICIT]) == {CT: (EXPLICIT, IMPLICIT), MR: (EXPLICIT, IMPLICIT)}


syntaxes = st.sampled_from([EXPLICIT, IMPLICIT, JPEG_LOSSLESS, "1.2.840.10008.1.2.4.50"])
classes = st.sampled_from([CT, MR, uids.VERIFICATION, "1.2.3"])


@given(offered=st.lists(st.tuples(classes, st.lists(syntaxes, min_size=1, max_size=3)), max_size=20),
       acceptable=st.dictionaries(classes, st.lists(syntaxes, min_size=1, max_size=3).map(tuple)))
def test_an_accepted_context_is_always_one_the_destination_accepts(offered, acceptable) -> None:
    contexts = [PresentationContext(2 * i + 1, a, tuple(t)) for i, (a, t) in enumerate(offered)]
    results = answer_contexts(contexts, acceptable)
    assert [r.id for r in results] == [c.id for c in contexts]
    for context, result in zip(contexts, results, strict=True):
        if result.result is ContextResult.ACCEPTANCE:
            assert result.transfer_syntax in context.transfer_syntaxes
            allowed = acceptable.get(context.abstract_syntax) or (
                uids.DEFAULT_TRANSFER_SYNTAXES if context.abstract_syntax == uids.VERIFICATION else ())
            assert result.transfer_syntax in allowed
