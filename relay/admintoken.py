"""The admin API's bearer token: one secret file in the state directory, made on first use (0600), read by
the relay at start-up and by the CLI on the same host. Site certificates never work on the admin port."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

ADMIN_TOKEN_FILE = "admin.token"


def admin_token(state_dir: Path) -> str:
    """Read the admin token, creating it (0600, never overwritten) if it does not exist yet."""
    path = state_dir / ADMIN_TOKEN_FILE
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        pass
    token = secrets.token_urlsafe(32)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
    except FileExistsError:
        return path.read_text().strip()
    with os.fdopen(fd, "w") as fh:
        fh.write(token + "\n")
    return token
