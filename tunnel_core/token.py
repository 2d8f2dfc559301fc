"""Enrollment tokens: the one line an operator copies from the relay to the hospital.

A token carries what the agent needs to trust the relay *before* it has any certificate: the relay's URL
and the SHA-256 fingerprint of the relay CA (the agent pins it), plus a random secret that the relay
stores only as a hash. Format, all ASCII: ``dtun1.`` followed by unpadded base64url of a compact JSON
object ``{"u": url, "f": fingerprint-hex, "s": secret}``. The prefix names the version, so a later format
can be told apart, and makes a pasted token recognisable in support tickets without revealing the secret.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass

__all__ = ["TOKEN_PREFIX", "EnrollmentToken", "TokenFormatError"]

TOKEN_PREFIX = "dtun1."
_FINGERPRINT = re.compile(r"^[0-9a-f]{64}$")
_MAX_TOKEN = 2048


class TokenFormatError(ValueError):
    """The text is not an enrollment token of a version we understand."""


@dataclass(frozen=True, slots=True)
class EnrollmentToken:
    relay_url: str
    ca_fingerprint: str  # lower-case hex SHA-256 of the CA certificate's DER
    secret: str

    def encode(self) -> str:
        body = json.dumps({"u": self.relay_url, "f": self.ca_fingerprint, "s": self.secret},
                          separators=(",", ":"), sort_keys=True).encode()
        return TOKEN_PREFIX + base64.urlsafe_b64encode(body).rstrip(b"=").decode()

    @classmethod
    def decode(cls, text: str) -> EnrollmentToken:
        text = text.strip()
        if len(text) > _MAX_TOKEN:
            raise TokenFormatError("too long to be an enrollment token")
        if not text.startswith(TOKEN_PREFIX):
            raise TokenFormatError(f"an enrollment token starts with {TOKEN_PREFIX!r}")
        raw = text[len(TOKEN_PREFIX):]
        try:
            body = json.loads(base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)))
        except (binascii.Error, ValueError) as exc:
            raise TokenFormatError("the token is damaged (copy the whole line)") from exc
        if not isinstance(body, dict) or set(body) != {"u", "f", "s"} or \
                not all(isinstance(body[k], str) for k in "ufs"):
            raise TokenFormatError("the token is damaged (copy the whole line)")
        if not _FINGERPRINT.fullmatch(body["f"]) or len(body["s"]) < 16:
            raise TokenFormatError("the token is damaged (copy the whole line)")
        return cls(relay_url=body["u"], ca_fingerprint=body["f"], secret=body["s"])

    def __repr__(self) -> str:  # never print the secret by accident
        return f"EnrollmentToken(relay_url={self.relay_url!r}, ca_fingerprint={self.ca_fingerprint[:16]}...)"
