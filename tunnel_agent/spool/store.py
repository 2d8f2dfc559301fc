"""The spool store: received instances kept durably on disk until their destination has them.

Theory of operation. The agent answers a modality's C-STORE with success only once the instance is durable
here; the forwarder removes it only once the destination answered success; after a crash, whatever was
committed is forwarded again (at-least-once), and what was in flight is counted as possibly duplicated.
Each instance is one file (:mod:`~tunnel_agent.spool.entryfile`), so that one rename commits it, and its
area (:class:`~tunnel_agent.spool.layout.Area`: ``incoming/``, ``ready/``, ``sending/``, ``quarantine/``
under ``<root>/<destination>/``) is its state.

The write path, step by step, and why each fsync is there:

1. :meth:`Spool.begin` checks the limits and the filesystem's free space, then creates
   ``incoming/<name>`` (``O_EXCL``, 0600) and writes the header, unsealed. No fsync: nothing in
   ``incoming/`` is ever trusted or acknowledged, and replay deletes it.
2. :meth:`SpoolWriter.write` reserves the bytes against the limits, then appends them with ``os.write``.
3. :meth:`SpoolWriter.commit`:

   a. seals the header in place (the dataset's length and the header CRC), so that a file in ``ready/``
      proves its own completeness: its length must match the sealed one;
   b. ``fdatasync`` on the file: its bytes and its size reach the disk *before* the name that makes them
      count. Without it a power loss can leave the renamed name pointing at a short or zero-filled file
      (delayed allocation: the rename may reach the journal before the data does);
   c. renames ``incoming/`` → ``ready/``: atomic, so the entry is either uncommitted or whole;
   d. fsyncs the ``ready/`` directory: a rename is only durable once its directory is. Only when
      ``commit`` returns may the caller answer success.

   The directories themselves were made durable in their parents when they were created.

The forward path makes no fsync of its own, by design: ``claim`` (``ready/`` → ``sending/``),
``retry`` (back) and ``delivered`` (unlink) can each be lost only with the operating system (a power loss,
a kernel crash), and losing one only makes an entry come back and be sent again — a duplicate, never a
loss. After a process crash (SIGKILL, the OOM killer), which loses nothing the kernel was already told,
replay's ``possible_duplicates`` is exactly the number of entries that were claimed and not yet settled
(some of them may not have been sent at all); after a power loss it can miss entries whose claim or
unlink was lost. ``quarantine`` does fsync (reason file, then its rename), because an operator must find
both the entry and why it is there.

After a restart, :meth:`Spool.open` replays the areas (:mod:`~tunnel_agent.spool.replay`) before anything
else may happen. Errors: :class:`~tunnel_agent.spool.errors.SpoolFull` (answer 0xA700),
:class:`~tunnel_agent.spool.errors.SpoolIOError`, :class:`~tunnel_agent.spool.errors.SpoolStateError` (a
caller out of turn); after any of them nothing half-done is kept and the spool stays usable.

Threading: every method may be called from any thread (the asyncio callers use ``asyncio.to_thread``).
The spool's state is one :class:`~tunnel_agent.spool.ledger.Ledger` under one lock that is never held
across I/O: an entry being moved is marked so that no other thread can take it meanwhile. A writer has a
lock of its own and is meant for one association at a time.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import BinaryIO

from tunnel_agent.spool.entryfile import (
    REASON_SUFFIX,
    SpoolRecord,
    encode_header,
    encode_reason,
    seal,
    validate_destination,
)
from tunnel_agent.spool.errors import SpoolError, SpoolFull, SpoolStateError, translate_os_error
from tunnel_agent.spool.layout import FILE_MODE, Area, Layout, write_all
from tunnel_agent.spool.ledger import Held, Ledger, QuarantineEntry, SpoolEntry, SpoolStats, Where
from tunnel_agent.spool.replay import ReplayReport, replay_destination

__all__ = ["Spool", "SpoolWriter"]

DEFAULT_MAX_BYTES = 10 * 1024**3
DEFAULT_MIN_FREE_BYTES = 1024**3
_sync_data = getattr(os, "fdatasync", os.fsync)
_READY, _SENDING = frozenset({Where.READY}), frozenset({Where.SENDING})


class Spool:
    """The spool under ``root`` (created 0700). ``max_bytes`` bounds all destinations together,
    ``destination_max_bytes`` some of them (a limit of 0: none of its own); ``min_free_bytes`` is the
    filesystem free space below which :meth:`begin` refuses. Byte counts are of whole entry files.

    Call :meth:`open` (or use ``with``) before anything else, once; :meth:`close` when every writer is
    finished. One process at a time may have a spool open (an exclusive ``flock`` on ``<root>/.lock``).
    Invalid arguments (a destination name that is not ``[a-z0-9-]{1,63}``, a malformed record) raise
    ValueError; everything else the spool raises is a :class:`~tunnel_agent.spool.errors.SpoolError`.
    """

    def __init__(self, root: Path | str, *, max_bytes: int = DEFAULT_MAX_BYTES,
                 min_free_bytes: int = DEFAULT_MIN_FREE_BYTES,
                 destination_max_bytes: Mapping[str, int] | None = None) -> None:
        self._layout = Layout(Path(root))
        self._ledger = Ledger(max_bytes, destination_max_bytes or {})
        self._configured = sorted(destination_max_bytes or {})
        self._min_free = min_free_bytes
        self._state = "new"
        self.report: ReplayReport | None = None  # what open() found

    def open(self) -> ReplayReport:
        """Take the spool's lock and replay every destination (see :mod:`~tunnel_agent.spool.replay`):
        delete half-written entries, move in-flight ones back to ready (counted as possible duplicates),
        index the ready ones, quarantine corrupt ones. SpoolError when the spool is held by another
        process or its directories cannot be read or changed."""
        if self._state != "new":
            raise SpoolStateError("a spool is opened once")
        self._layout.open()
        try:
            self.report = _replay(self._layout, self._ledger, self._configured)
        except BaseException:
            self._layout.close()
            raise
        self._state = "open"
        return self.report

    def close(self) -> None:
        """Release the lock. A writer still open can no longer commit (SpoolStateError): finish them first."""
        self._state = "closed"
        self._layout.close()

    def __enter__(self) -> Spool:
        self.open()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # --- the write path -------------------------------------------------------------------------------

    def begin(self, record: SpoolRecord) -> SpoolWriter:
        """Start an entry for ``record`` (its ``size`` is ignored): write the dataset with the writer's
        :meth:`~SpoolWriter.write`, then :meth:`~SpoolWriter.commit` — or discard it. SpoolFull at once
        when the destination or the spool is at its limit or the filesystem's free space is below
        ``min_free_bytes``; SpoolIOError when the file cannot be created."""
        self._require_open()
        header = encode_header(record)
        destination = record.destination
        self._layout.ensure(destination)
        _check_free_space(self._layout.root, self._min_free)
        self._ledger.reserve(destination, len(header))
        name = self._ledger.new_name(record.received)
        path = self._layout.path(destination, Area.INCOMING, name)
        fd = -1
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE)
            write_all(fd, header, len(header))
        except OSError as exc:
            if fd >= 0:  # created (O_EXCL: it is ours), then the header failed
                _close_quietly(fd)
                _unlink_quietly(path)
            self._ledger.unreserve(destination, len(header))
            raise translate_os_error(exc, "create", f"{destination}/incoming/{name}") from None
        return SpoolWriter(self, record, name, fd, header)

    # --- the forward path -----------------------------------------------------------------------------

    def ready(self, destination: str, limit: int, now: float) -> list[SpoolEntry]:
        """Up to ``limit`` entries of ``destination`` waiting to be sent, oldest first: not claimed, and
        not waiting for a retry time after ``now``. Claim one before sending it."""
        return self._ledger.ready(validate_destination(destination), limit, now)

    def claim(self, entry: SpoolEntry) -> bool:
        """Take a ready entry for sending (``ready/`` → ``sending/``). False when it is no longer ready
        (another task claimed, delivered or quarantined it): pick another. After a True, exactly one of
        :meth:`delivered`, :meth:`retry` or :meth:`quarantine` must follow."""
        self._require_open()
        try:
            self._ledger.mark(entry, _READY)
        except SpoolStateError:
            return False
        try:
            self._layout.move(entry.destination, entry.name, Area.READY, Area.SENDING)
        except SpoolError:
            self._ledger.undo(entry)
            raise
        self._ledger.settle(entry, Where.SENDING)
        return True

    def open_dataset(self, entry: SpoolEntry) -> BinaryIO:
        """The claimed entry's dataset, as a binary file positioned at its first byte and ending with its
        last (``entry.record.size`` bytes). The caller closes it, before delivered/retry/quarantine."""
        item = self._ledger.located(entry, Where.SENDING)
        path = self._layout.path(entry.destination, Area.SENDING, entry.name)
        try:
            stream = open(path, "rb")  # the caller owns and closes it
            stream.seek(item.dataset_offset)
        except OSError as exc:
            raise translate_os_error(exc, "open", f"{entry.destination}/sending/{entry.name}") from None
        return stream

    def delivered(self, entry: SpoolEntry) -> None:
        """The destination answered success for the claimed entry: remove it. The unlink is not fsynced:
        if the operating system loses it (a power loss right after), the entry comes back at replay and is
        sent again — a duplicate, never a loss."""
        self._ledger.mark(entry, _SENDING)
        try:
            self._layout.unlink(entry.destination, Area.SENDING, entry.name, missing_ok=True)
        except SpoolError:
            self._ledger.undo(entry)
            raise
        self._ledger.forget(entry, delivered=True)

    def retry(self, entry: SpoolEntry, not_before: float, reason: str) -> int:
        """The claimed entry could not be delivered: back to ready, not offered by :meth:`ready` before
        ``not_before`` (the caller's clock). Returns its failed attempts since the spool was opened (in
        memory only); the caller decides when that is enough to :meth:`quarantine` it instead."""
        self._ledger.mark(entry, _SENDING)
        try:
            self._layout.move(entry.destination, entry.name, Area.SENDING, Area.READY)
        except SpoolError:
            self._ledger.undo(entry)
            raise
        return self._ledger.retried(entry, not_before, reason)

    def quarantine(self, entry: SpoolEntry, reason: str) -> None:
        """Set a claimed (or ready) entry aside for an operator, with ``reason`` (PHI-free: it is shown to
        operators) durably beside it. It counts against the limits until released or dropped."""
        item = self._ledger.mark(entry, _READY | _SENDING)
        source = Area.SENDING if item.came_from is Where.SENDING else Area.READY
        try:
            self._layout.set_aside(entry.destination, entry.name, source, encode_reason(reason, item.attempts))
        except SpoolError:
            self._ledger.undo(entry)
            raise
        self._ledger.quarantine(entry, reason)

    # --- operators ------------------------------------------------------------------------------------

    def quarantined(self, destination: str) -> list[QuarantineEntry]:
        """The quarantined entries of ``destination``, oldest first, records included: the caller decides
        what of them it shows."""
        return self._ledger.quarantined(validate_destination(destination))

    def release_quarantine(self, destination: str, name: str) -> SpoolEntry:
        """Requeue a quarantined entry: ready again, attempts from 0. SpoolStateError when there is no such
        entry or its header cannot be read (drop it instead)."""
        aside = self._ledger.take_aside(validate_destination(destination), name)
        try:
            if aside.record is None:
                raise SpoolStateError(f"spool entry {destination}/{name} has no readable header")
            self._layout.move(destination, name, Area.QUARANTINE, Area.READY)
        except SpoolError:
            self._ledger.put_back_aside(destination, name)
            raise
        held = Held(name, aside.record, aside.dataset_offset, aside.file_bytes)
        self._ledger.end_aside(destination, name, held)
        # The reason file last: if this is lost, replay deletes a reason without an entry.
        self._layout.fsync(destination, Area.READY)
        self._layout.unlink(destination, Area.QUARANTINE, name + REASON_SUFFIX, missing_ok=True)
        return held.entry(destination)

    def drop_quarantine(self, destination: str, name: str) -> None:
        """Delete a quarantined entry for good. SpoolStateError when there is no such entry."""
        self._ledger.take_aside(validate_destination(destination), name)
        try:
            self._layout.unlink(destination, Area.QUARANTINE, name, missing_ok=True)
        except SpoolError:
            self._ledger.put_back_aside(destination, name)
            raise
        self._ledger.end_aside(destination, name, None)
        self._layout.unlink(destination, Area.QUARANTINE, name + REASON_SUFFIX, missing_ok=True)

    # --- stats ----------------------------------------------------------------------------------------

    def stats(self, destination: str | None = None) -> SpoolStats:
        """PHI-free counters of one destination, or of all of them together (``None``)."""
        return self._ledger.stats(None if destination is None else validate_destination(destination))

    def destinations(self) -> list[str]:
        """Every destination the spool holds or has held since it was opened."""
        return self._ledger.destinations()

    def _require_open(self) -> None:
        if self._state != "open":
            raise SpoolStateError(f"the spool is {self._state}, not open")


class SpoolWriter:
    """One entry being written: from :meth:`Spool.begin`, then :meth:`write` the dataset's bytes as they
    arrive and :meth:`commit`, or :meth:`discard`. As a context manager it discards unless committed.
    After an error the writer is discarded (its file removed, its bytes released) and the spool is usable.
    """

    def __init__(self, spool: Spool, record: SpoolRecord, name: str, fd: int, header: bytes) -> None:
        self._spool = spool
        self._record = record
        self.name = name
        self._fd = fd
        self._header = header
        self._reserved = len(header)
        self._length = 0  # dataset bytes written
        self._lock = threading.Lock()
        self._done = False

    @property
    def destination(self) -> str:
        return self._record.destination

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Append dataset bytes. SpoolFull when they would pass a limit or the filesystem is full;
        SpoolIOError for another write error; either way the writer is discarded."""
        count = len(data) if isinstance(data, bytes | bytearray) else memoryview(data).nbytes
        with self._lock:
            self._require_active()
            try:
                self._spool._ledger.reserve(self.destination, count)
            except SpoolFull:
                self._discard()
                raise
            self._reserved += count
            try:
                write_all(self._fd, data, count)
            except OSError as exc:
                self._discard()
                raise translate_os_error(exc, "write", self._where(Area.INCOMING)) from None
            self._length += count

    def commit(self) -> SpoolEntry:
        """Make the entry durable (seal, fdatasync, rename to ready/, fsync ready/) and return it. Only
        after this returns may the sender be told success. SpoolFull or SpoolIOError: nothing was kept."""
        with self._lock:
            self._require_active()
            if self._spool._state != "open":
                self._discard()
                raise SpoolStateError(f"the spool is {self._spool._state}: {self._where(Area.INCOMING)} discarded")
            offset, sealing = seal(self._header, self._length)
            try:
                if os.pwrite(self._fd, sealing, offset) != len(sealing):
                    raise OSError(5, "short write of the header seal")  # EIO: never for a regular file
                _sync_data(self._fd)
            except OSError as exc:
                self._discard()
                raise translate_os_error(exc, "fsync", self._where(Area.INCOMING)) from None
            _close_quietly(self._fd)
            self._fd = -1
            layout = self._spool._layout
            try:
                layout.move(self.destination, self.name, Area.INCOMING, Area.READY)
            except SpoolError:
                self._discard()
                raise
            try:
                layout.fsync(self.destination, Area.READY)
            except SpoolError:
                # Not durable, and the sender will hear a failure: take it back rather than forward it.
                _unlink_quietly(layout.path(self.destination, Area.READY, self.name))
                self._discard()
                raise
            self._done = True
            record = replace(self._record, size=self._length)
            held = Held(self.name, record, len(self._header), self._reserved)
            return self._spool._ledger.commit(self.destination, held, self._reserved)

    def discard(self) -> None:
        """Give the entry up: its file is removed and its bytes released. Harmless when already done."""
        with self._lock:
            if not self._done:
                self._discard()

    def __enter__(self) -> SpoolWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.discard()

    def _discard(self) -> None:
        self._done = True
        _close_quietly(self._fd)
        self._fd = -1
        _unlink_quietly(self._spool._layout.path(self.destination, Area.INCOMING, self.name))
        self._spool._ledger.unreserve(self.destination, self._reserved)

    def _require_active(self) -> None:
        if self._done:
            raise SpoolStateError(f"spool writer {self.destination}/{self.name} is already finished")

    def _where(self, area: Area) -> str:
        return f"{self.destination}/{area.value}/{self.name}"


def _replay(layout: Layout, ledger: Ledger, configured: list[str]) -> ReplayReport:
    found = {}
    for destination in sorted({*layout.destinations(), *configured}):
        replayed = replay_destination(layout, destination)
        ledger.load(destination, replayed.held, replayed.quarantined, replayed.counts.possible_duplicates)
        found[destination] = replayed.counts
    return ReplayReport(found)


def _check_free_space(root: Path, minimum: int) -> None:
    try:
        info = os.statvfs(root)
    except OSError as exc:
        raise translate_os_error(exc, "statvfs", "the spool root") from None
    free = info.f_bavail * info.f_frsize
    if free < minimum:
        raise SpoolFull(f"the spool's filesystem has {free} bytes free, below {minimum}", limit="free space")


def _close_quietly(fd: int) -> None:
    if fd >= 0:
        try:
            os.close(fd)
        except OSError:
            pass


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass  # best effort: replay deletes what is left in incoming/
