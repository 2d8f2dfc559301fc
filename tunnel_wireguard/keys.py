"""X25519 key files for WireGuard.

Keys are X25519 (``cryptography``), stored as one base64 line in a 0600 file. A new key file is written
under a temporary name opened with O_CREAT|O_EXCL and mode 0600, then published atomically: by hard link
(never replaces an existing key) or, with ``overwrite=True``, by rename. Key material never reaches argv,
logs or exception text: ``wg set <if> private-key <path>`` reads the file itself.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import os
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from tunnel_wireguard.errors import InvalidKeyError

KEY_BYTES = 32
KEY_BASE64_LEN = 44


def validate_key(text: str) -> str:
    """Return ``text`` stripped if it is canonical base64 of a 32-byte key, else raise InvalidKeyError."""
    if not isinstance(text, str):
        raise InvalidKeyError("a WireGuard key must be a base64 string")
    value = text.strip()
    if len(value) != KEY_BASE64_LEN or not value.endswith("="):
        raise InvalidKeyError(f"a WireGuard key is {KEY_BASE64_LEN} base64 characters ending in '='")
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidKeyError("a WireGuard key must be valid base64") from None
    if len(raw) != KEY_BYTES or base64.b64encode(raw).decode("ascii") != value:
        raise InvalidKeyError("a WireGuard key must be the canonical base64 of 32 bytes")
    return value


def is_valid_key(text: str) -> bool:
    """True if ``text`` is a canonical base64 32-byte key (see validate_key)."""
    try:
        validate_key(text)
    except InvalidKeyError:
        return False
    return True


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def generate_private_key(path: str | os.PathLike[str], *, overwrite: bool = False) -> str:
    """Write a new X25519 private key to ``path`` (mode 0600) and return its public key in base64.

    The file appears complete or not at all. Without ``overwrite`` an existing file is an error
    (FileExistsError) and is left untouched. The directory should be private to the service user.
    """
    target = Path(path)
    key = X25519PrivateKey.generate()
    line = (_b64(key.private_bytes_raw()) + "\n").encode("ascii")
    tmp = _write_private_temp(target.parent, line)
    try:
        if overwrite:
            os.replace(tmp, target)
        else:
            os.link(tmp, target)  # atomic and, unlike rename, refuses to replace an existing key
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    _fsync_dir(target.parent)
    return _b64(key.public_key().public_bytes_raw())


def _write_private_temp(directory: Path, data: bytes) -> Path:
    """A new file in ``directory`` holding ``data``, created 0600 with O_EXCL, flushed to disk."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    for _ in range(16):  # bounded: a name collision with O_EXCL just picks another name
        tmp = directory / f".wgkey-{os.urandom(6).hex()}.tmp"
        try:
            fd = os.open(tmp, flags, 0o600)
        except FileExistsError:
            continue
        try:
            os.fchmod(fd, 0o600)  # the umask can only remove bits; be explicit anyway
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            os.unlink(tmp)
            raise
        os.close(fd)
        return tmp
    raise FileExistsError(f"could not create a temporary key file in {directory}")


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on directories; the rename/link is still atomic
    finally:
        os.close(fd)


def load_private_key(path: str | os.PathLike[str]) -> X25519PrivateKey:
    """Read a key file written by generate_private_key (or ``wg genkey``); refuse one others can read."""
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        raise InvalidKeyError(f"cannot open private key file {os.fspath(path)}: {exc.strerror}") from None
    try:
        mode = os.fstat(fd).st_mode & 0o777
        if mode & 0o077:
            raise InvalidKeyError(
                f"private key file {os.fspath(path)} has mode {mode:04o}; it must be 0600 (chmod 600 it)"
            )
        data = os.read(fd, 4096)
    finally:
        os.close(fd)
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        raise InvalidKeyError(f"private key file {os.fspath(path)} is not base64 text") from None
    try:
        value = validate_key(text)
    except InvalidKeyError as exc:
        raise InvalidKeyError(f"private key file {os.fspath(path)}: {exc}") from None
    return X25519PrivateKey.from_private_bytes(base64.b64decode(value))


def public_key_of(private_key: X25519PrivateKey | os.PathLike[str]) -> str:
    """The base64 public key of a private key object or of a key file (a Path)."""
    if not isinstance(private_key, X25519PrivateKey):
        private_key = load_private_key(private_key)
    return _b64(private_key.public_key().public_bytes_raw())
