"""Presentation-context negotiation for an agent that accepts associations on a destination's behalf.

Theory of operation: in spool mode the agent answers a modality's A-ASSOCIATE-RQ itself, so it must
accept only what the cloud destination will accept when the instance is forwarded — the dataset goes on
in the transfer syntax it arrived in, never transcoded. What a destination accepts is learned by asking
it: :func:`probe_contexts` proposes each (abstract syntax, transfer syntax) pair as a presentation context
of its own (at most 128 per association, PS3.8 §9.3.2.2), and :func:`accepted_pairs` reads the answer.
Until a first answer exists, the destination's configured pairs stand in for it.

:func:`answer_contexts` is the agent's answer to a modality: each offered context is accepted with the
first transfer syntax the modality proposed that the destination accepts for that abstract syntax, or
refused with the reason PS3.8 Table 9-18 gives (abstract syntax not supported, transfer syntaxes not
supported). Verification is always accepted: a C-ECHO to the agent tests the agent.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from tunnel_core.dicom.pdu import ContextResult, PresentationContext, PresentationContextResult
from tunnel_core.dicom.uids import DEFAULT_TRANSFER_SYNTAXES, VERIFICATION

__all__ = ["Acceptable", "MAX_CONTEXTS", "accepted_pairs", "answer_contexts", "probe_contexts"]

MAX_CONTEXTS = 128  # presentation context ids are the odd numbers 1-255
Acceptable = Mapping[str, Sequence[str]]  # abstract syntax -> the transfer syntaxes accepted for it
_ALWAYS: dict[str, Sequence[str]] = {VERIFICATION: DEFAULT_TRANSFER_SYNTAXES}


def answer_contexts(offered: Iterable[PresentationContext],
                    acceptable: Acceptable) -> tuple[PresentationContextResult, ...]:
    """One result per offered context, in the order offered (see the module docstring)."""
    results = []
    for context in offered:
        accepted = acceptable.get(context.abstract_syntax) or _ALWAYS.get(context.abstract_syntax)
        if not accepted:
            results.append(PresentationContextResult(context.id, ContextResult.ABSTRACT_SYNTAX_NOT_SUPPORTED, ""))
            continue
        chosen = next((ts for ts in context.transfer_syntaxes if ts in accepted), None)
        if chosen is None:
            results.append(PresentationContextResult(context.id, ContextResult.TRANSFER_SYNTAXES_NOT_SUPPORTED, ""))
        else:
            results.append(PresentationContextResult(context.id, ContextResult.ACCEPTANCE, chosen))
    return tuple(results)


def probe_contexts(pairs: Iterable[tuple[str, str]]) -> list[tuple[PresentationContext, ...]]:
    """The (abstract syntax, transfer syntax) pairs as presentation contexts, one pair each, in batches
    of at most ``MAX_CONTEXTS`` (one association per batch); duplicates are dropped, order is kept."""
    unique = list(dict.fromkeys(pairs))
    batches = []
    for start in range(0, len(unique), MAX_CONTEXTS):
        batch = unique[start:start + MAX_CONTEXTS]
        batches.append(tuple(PresentationContext(2 * i + 1, abstract, (ts,))
                             for i, (abstract, ts) in enumerate(batch)))
    return batches


def accepted_pairs(proposed: Iterable[PresentationContext],
                   results: Iterable[PresentationContextResult]) -> dict[str, tuple[str, ...]]:
    """What a destination accepted, from the contexts proposed and its A-ASSOCIATE-AC's results: by
    abstract syntax, the transfer syntaxes accepted, in the order proposed. A result for a context id
    that was not proposed, or with a transfer syntax that was not proposed for it, is ignored."""
    by_id = {context.id: context for context in proposed}
    accepted: dict[str, list[str]] = {}
    for result in results:
        context = by_id.get(result.id)
        if (context is None or result.result is not ContextResult.ACCEPTANCE
                or result.transfer_syntax not in context.transfer_syntaxes):
            continue
        syntaxes = accepted.setdefault(context.abstract_syntax, [])
        if result.transfer_syntax not in syntaxes:
            syntaxes.append(result.transfer_syntax)
    return {abstract: tuple(syntaxes) for abstract, syntaxes in accepted.items()}


def configured_pairs(sop_classes: Iterable[str], transfer_syntaxes: Sequence[str]) -> dict[str, tuple[str, ...]]:
    """The cold-start answer: every configured SOP class with every configured transfer syntax."""
    return {sop_class: tuple(transfer_syntaxes) for sop_class in sop_classes}
