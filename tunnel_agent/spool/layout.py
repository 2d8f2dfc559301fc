"""Where the spool's files live, and the few filesystem operations the store is made of.

``<root>/`` (0700) holds ``.lock`` (an exclusive ``flock`` held while a :class:`~tunnel_agent.spool.store.
Spool` is open: two agents on one spool would replay each other's in-flight entries) and one directory per
destination, each with the four areas of :class:`Area`. Directories are 0700 and files 0600 — they hold
patient data — and a directory found looser is tightened. A directory this module creates is made durable
in its parent (fsync of the parent) before anything is committed inside it: a committed entry in a
directory whose own name was lost with the power would be lost with it.

Every method raises the spool's errors (:func:`~tunnel_agent.spool.errors.translate_os_error`), never a
bare OSError, and names files by destination, area and entry name only.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import threading
from enum import Enum
from pathlib import Path

from tunnel_agent.spool.entryfile import REASON_SUFFIX, validate_destination
from tunnel_agent.spool.errors import SpoolError, SpoolIOError, translate_os_error

__all__ = ["Area", "Layout"]

DIR_MODE = 0o700
FILE_MODE = 0o600
LOCK_NAME = ".lock"


class Area(Enum):
    INCOMING = "incoming"  # being written: never acknowledged, deleted at replay
    READY = "ready"  # committed, waiting for the forwarder
    SENDING = "sending"  # claimed by the forwarder: back to ready at replay, a possible duplicate
    QUARANTINE = "quarantine"  # set aside with a .reason file, for an operator


class Layout:
    """The spool's directory tree under ``root``. Not locked itself: the store serialises what needs it."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._root = os.fspath(self.root)
        self._lock_fd: int | None = None
        self._known: set[str] = set()  # destinations whose directories exist and were made durable
        self._ensuring = threading.Lock()  # so no writer commits in a directory another is still creating

    def open(self) -> None:
        """Create (or tighten) the root and take its lock; SpoolError when another process holds it."""
        created = self._make_dir(self.root, "root")
        if created:
            self._fsync_dir(self.root.parent, "root's parent")
        try:
            fd = os.open(self.root / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
        except OSError as exc:
            raise translate_os_error(exc, "lock", "the spool root") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise SpoolError(f"the spool at {self.root} is in use by another process") from None
        self._lock_fd = fd

    def close(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None

    def destinations(self) -> list[str]:
        """The destination directories found under the root (other names are left alone)."""
        try:
            names = os.listdir(self.root)
        except OSError as exc:
            raise translate_os_error(exc, "list", "the spool root") from None
        found = []
        for name in sorted(names):
            try:
                validate_destination(name)
            except ValueError:
                continue
            if (self.root / name).is_dir():
                found.append(name)
        return found

    def ensure(self, destination: str) -> None:
        """Create the destination's directories if needed, durably; tighten them if they are looser."""
        if destination in self._known:
            return
        with self._ensuring:
            if destination in self._known:
                return
            base = self.root / destination
            if self._make_dir(base, destination):
                self._fsync_dir(self.root, "the spool root")
            if any([self._make_dir(base / area.value, f"{destination}/{area.value}") for area in Area]):
                self._fsync_dir(base, destination)
            self._known.add(destination)

    def path(self, destination: str, area: Area, name: str = "") -> str:
        """The path of an area, or of an entry in it (a str: this is on every write's path)."""
        return f"{self._root}/{destination}/{area.value}/{name}" if name else f"{self._root}/{destination}/{area.value}"

    def names(self, destination: str, area: Area) -> list[str]:
        try:
            return sorted(os.listdir(self.path(destination, area)))
        except OSError as exc:
            raise translate_os_error(exc, "list", f"{destination}/{area.value}") from None

    def move(self, destination: str, name: str, source: Area, target: Area) -> None:
        try:
            os.rename(self.path(destination, source, name), self.path(destination, target, name))
        except OSError as exc:
            raise translate_os_error(exc, "rename", f"{destination}/{source.value}/{name}") from None

    def unlink(self, destination: str, area: Area, name: str, *, missing_ok: bool = False) -> None:
        try:
            os.unlink(self.path(destination, area, name))
        except FileNotFoundError:
            if not missing_ok:
                raise SpoolIOError(f"{destination}/{area.value}/{name} is gone", errno=errno.ENOENT,
                                   operation="unlink") from None
        except OSError as exc:
            raise translate_os_error(exc, "unlink", f"{destination}/{area.value}/{name}") from None

    def fsync(self, destination: str, area: Area) -> None:
        self._fsync_dir(self.path(destination, area), f"{destination}/{area.value}")

    def write_small(self, destination: str, area: Area, name: str, data: bytes) -> None:
        """Write a small file whole and fsync it (not its directory): a quarantine's reason."""
        where = f"{destination}/{area.value}/{name}"
        try:
            fd = os.open(self.path(destination, area, name),
                         os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, FILE_MODE)
        except OSError as exc:
            raise translate_os_error(exc, "create", where) from None
        try:
            write_all(fd, data, len(data))
            os.fsync(fd)
        except OSError as exc:
            raise translate_os_error(exc, "write", where) from None
        finally:
            os.close(fd)

    def set_aside(self, destination: str, name: str, source: Area, reason: bytes) -> None:
        """Move an entry to quarantine/ with its reason beside it: the reason file is written and made
        durable first, so a quarantined entry always has one; then the rename, made durable too."""
        self.write_small(destination, Area.QUARANTINE, name + REASON_SUFFIX, reason)
        self.fsync(destination, Area.QUARANTINE)
        self.move(destination, name, source, Area.QUARANTINE)
        self.fsync(destination, Area.QUARANTINE)

    def read_small(self, destination: str, area: Area, name: str, limit: int) -> bytes | None:
        """Up to ``limit`` bytes of a small file, or None when it does not exist or cannot be read."""
        try:
            with open(self.path(destination, area, name), "rb") as f:
                return f.read(limit)
        except OSError:
            return None

    def _make_dir(self, path: Path, where: str) -> bool:
        """Make ``path`` a 0700 directory; True when it had to be created."""
        try:
            try:
                os.mkdir(path, DIR_MODE)
                created = True
            except FileExistsError:
                created = False
            info = os.stat(path)
            if not stat.S_ISDIR(info.st_mode):
                raise SpoolIOError(f"spool {where} is not a directory", errno=errno.ENOTDIR, operation="mkdir")
            if stat.S_IMODE(info.st_mode) != DIR_MODE:
                os.chmod(path, DIR_MODE)
        except OSError as exc:
            raise translate_os_error(exc, "mkdir", where) from None
        return created

    @staticmethod
    def _fsync_dir(path: Path, where: str) -> None:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            raise translate_os_error(exc, "fsync", where) from None


def write_all(fd: int, data: bytes | bytearray | memoryview, length: int) -> None:
    """``os.write`` until all ``length`` bytes of ``data`` are written (a regular file may take fewer at a
    time, e.g. when a signal interrupts a large write). No copy: the rest is a memoryview slice."""
    written = os.write(fd, data)
    if written < length:
        view = memoryview(data).cast("B")[written:]
        while view:
            view = view[os.write(fd, view):]
