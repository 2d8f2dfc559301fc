"""Opaque study keys: the spool groups instances by study without writing the study's UID where ops look.

A key is the first 16 hex digits of HMAC-SHA256 over the Study Instance UID, with a random secret that is
made once per spool (``<root>/.study-key``, 0600) and never leaves this host. The same study always gets
the same key on this agent, so ops can follow one study's instances through status and metrics, yet a
key cannot be turned back into the UID, nor matched against a UID guessed elsewhere.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

__all__ = ["StudyKeys"]

SECRET_NAME = ".study-key"
_SECRET_BYTES = 32


class StudyKeys:
    def __init__(self, secret: bytes) -> None:
        if len(secret) < 16:
            raise ValueError("a study-key secret needs at least 16 bytes")
        self._secret = secret

    @classmethod
    def load_or_create(cls, root: Path) -> StudyKeys:
        """The secret at ``root/.study-key``, made (0600, O_EXCL) when missing. ``root`` must exist."""
        path = root / SECRET_NAME
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except FileExistsError:
            return cls(path.read_bytes())
        try:
            os.write(fd, secrets.token_bytes(_SECRET_BYTES))
            os.fsync(fd)
        finally:
            os.close(fd)
        return cls(path.read_bytes())

    def key(self, study_uid: bytes) -> str:
        return hmac.new(self._secret, study_uid, hashlib.sha256).hexdigest()[:16]
