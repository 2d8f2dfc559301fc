"""Why the relay will not carry a site's tunnel, told to the agent, and what the agent does about it.

Theory of operation. The relay's registry decides who may connect (``relay.registry``). When it says no,
the relay tells the agent why, on the wire (``docs/protocol.md`` §1 and §10), in one of three ways:

- a tunnel request answered ``403`` with the header ``Tunnel-Refused: <token>``;
- in inner-TLS mode, the WebSocket closed with code 1008 (policy violation) instead of the inner READY,
  its close message being ``<token>: <words>`` (:func:`close_message` builds it,
  :func:`token_of_close_message` reads it back);
- a live tunnel ended with GOAWAY ``REVOKED`` (the site or its certificate was revoked since, or the
  certificate expired).

The relay maps its verdict to a :class:`RefusalToken`; the agent turns what it received into a
:class:`Refusal` with :func:`refusal_from_token` or :func:`refusal_from_goaway`: whether this is a
revocation or another refusal, a plain sentence for ``tunnel-agent status`` that names what to do, and
(:func:`retry_delay`) how long to wait before asking again. None of these is transient, so the agent
does not hammer the relay with reconnects; it still asks again after a long while, in case the site was
reinstated. A 403 without the header (an older relay) is no decision here: the agent treats it as any
other failed attempt. Nothing here does I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum, StrEnum

from tunnel_core.codes import ErrorCode

__all__ = [
    "REFUSED_HEADER",
    "Refusal",
    "RefusalKind",
    "RefusalToken",
    "close_message",
    "refusal_from_goaway",
    "refusal_from_token",
    "retry_delay",
    "token_of_close_message",
]

REFUSED_HEADER = "Tunnel-Refused"
_TOKEN_MAX = 40  # characters of an unknown token quoted back (it comes from the network)
_CLOSE_WORDS = "a valid, unrevoked site certificate is required"


class RefusalToken(StrEnum):
    """The ``Tunnel-Refused`` tokens (docs/protocol.md §1)."""

    NO_CERTIFICATE = "no-certificate"
    UNKNOWN_CERTIFICATE = "unknown-certificate"
    CERTIFICATE_REVOKED = "certificate-revoked"
    SITE_REVOKED = "site-revoked"
    SITE_MISMATCH = "site-mismatch"


class RefusalKind(Enum):
    """``REVOKED``: an operator revoked the site or its certificate (or it expired). ``REFUSED``: the relay
    does not accept this certificate for another reason (unknown to its registry, another site's, none)."""

    REVOKED = "revoked"
    REFUSED = "refused"


@dataclass(frozen=True, slots=True)
class Refusal:
    """A refusal as the agent reports it. ``code`` is the wire token or ``GOAWAY REVOKED``; ``reason`` and
    ``hint`` are plain words; :meth:`describe` is the one line for ``last_error`` and the log."""

    kind: RefusalKind
    code: str
    reason: str
    hint: str

    def describe(self) -> str:
        return f"{self.kind.value} by the relay: {self.reason} ({self.code}); {self.hint}"


def _reenroll(site: str) -> str:
    return (f"to rejoin, re-enroll with a new token: `tunnel-relay site add {site}` on the relay, then "
            "`tunnel-agent enroll --force` here")


# token -> (kind, reason, hint); "{reenroll}" in a hint becomes the re-enrollment commands for the site.
_TOKENS: dict[RefusalToken, tuple[RefusalKind, str, str]] = {
    RefusalToken.SITE_REVOKED: (RefusalKind.REVOKED, "this site is revoked", "ask the relay operator; {reenroll}"),
    RefusalToken.CERTIFICATE_REVOKED: (RefusalKind.REVOKED, "this site's certificate is revoked", "{reenroll}"),
    RefusalToken.UNKNOWN_CERTIFICATE: (
        RefusalKind.REFUSED, "the relay's registry has no record of this certificate (was the relay's registry "
        "reset or restored from a backup?)", "{reenroll}"),
    RefusalToken.SITE_MISMATCH: (RefusalKind.REFUSED, "the relay's registry holds this certificate for another site",
                                 "ask the relay operator; {reenroll}"),
    RefusalToken.NO_CERTIFICATE: (
        RefusalKind.REFUSED, "no client certificate reached the relay",
        "something between here and the relay ends TLS (a load balancer or an inspecting proxy): ask the relay "
        'operator and the network team, or set tls_mode = "inner"'),
}


def refusal_from_token(value: str | None, *, site: str = "NAME") -> Refusal | None:
    """The refusal a ``Tunnel-Refused`` header (or an inner-TLS close message's token) names; None when
    there is none (an older relay: an ordinary failure). ``site`` fills in the commands of the hint."""
    if value is None or not value.strip():
        return None
    text = value.strip()
    try:
        token = RefusalToken(text.lower())
    except ValueError:
        quoted = "".join(ch if 0x20 <= ord(ch) < 0x7F else "?" for ch in text[:_TOKEN_MAX])
        return Refusal(RefusalKind.REFUSED, quoted, "the relay refused this site's certificate for a reason this "
                       "agent does not know (a newer relay?)", "ask the relay operator")
    kind, reason, hint = _TOKENS[token]
    return Refusal(kind, token.value, reason, hint.format(reenroll=_reenroll(site)))


def refusal_from_goaway(code: ErrorCode | None, *, site: str = "NAME") -> Refusal | None:
    """The refusal a live tunnel's end carries: GOAWAY ``REVOKED``; None for any other end (reconnect)."""
    if code is not ErrorCode.REVOKED:
        return None
    return Refusal(RefusalKind.REVOKED, "GOAWAY REVOKED", "the relay ended the tunnel because this site or its "
                   "certificate was revoked, or the certificate expired", _reenroll(site))


def retry_delay(refusal: Refusal, *, revoked_retry: float, refused_retry: float) -> float:
    """Seconds to wait before the next attempt after ``refusal`` (the agent's ``revoked_retry`` or
    ``refused_retry`` setting): long, since asking again at once would be refused again."""
    return revoked_retry if refusal.kind is RefusalKind.REVOKED else refused_retry


def close_message(token: RefusalToken) -> bytes:
    """The inner-TLS WebSocket close message for a refusal: ``b"<token>: <words>"`` (under 123 bytes)."""
    return f"{token.value}: {_CLOSE_WORDS}".encode()


def token_of_close_message(message: str | None) -> str | None:
    """The token at the front of a close message made by :func:`close_message`, else None."""
    if not message or ":" not in message:
        return None
    head = message.split(":", 1)[0].strip()
    return head if 0 < len(head) <= _TOKEN_MAX and head.isascii() and head.replace("-", "").isalnum() else None
