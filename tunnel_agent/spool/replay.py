"""Replay: what the files of one destination say after a restart, clean or not.

Theory of operation: the durability protocol (see :mod:`tunnel_agent.spool.store`) leaves every entry in
exactly one area, and each area has one meaning after a crash:

1. ``incoming/`` — written but never committed, so never acknowledged to anyone (a C-STORE success is
   only answered after the commit's rename is durable). Deleted.
2. ``sending/`` — claimed by the forwarder and maybe sent, maybe even stored by the destination, whose
   answer was lost with the process. Moved back to ``ready/`` and counted as a *possible duplicate*: it
   will be sent again (at-least-once).
3. ``ready/`` — committed. Each header is read and checked; the index is built from the headers (record,
   sizes) without reading any dataset. A file that fails the check cannot have been produced by the
   protocol, but a disk can lie: it is quarantined with the reason, not trusted and not fatal.
4. ``quarantine/`` — indexed with the reasons beside the entries. A reason without its entry is the trace
   of an interrupted release or drop and is deleted; an entry without its reason keeps a placeholder.

Each step is idempotent, so a crash during replay is replayed by the next one.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field

from tunnel_agent.spool.entryfile import (
    MAX_REASON_FILE,
    REASON_SUFFIX,
    CorruptEntry,
    EntryHeader,
    decode_reason,
    encode_reason,
    entry_sequence,
    read_header,
)
from tunnel_agent.spool.layout import FILE_MODE, Area, Layout
from tunnel_agent.spool.ledger import Held, SetAside

__all__ = ["DestinationReplay", "ReplayCounts", "ReplayReport", "replay_destination"]


@dataclass(frozen=True, slots=True)
class ReplayCounts:
    """What replay found for one destination (or, in :attr:`ReplayReport.total`, for all)."""

    instances: int = 0  # entries ready to forward after replay
    bytes: int = 0  # their files' bytes
    removed_incoming: int = 0  # half-written entries deleted (never acknowledged)
    possible_duplicates: int = 0  # in flight at the crash, back in ready/: may reach the destination twice
    corrupt: int = 0  # ready/ or sending/ entries whose header failed its check: quarantined now
    quarantined: int = 0  # entries in quarantine/ after replay, these included


@dataclass(frozen=True, slots=True)
class ReplayReport:
    """The outcome of :meth:`Spool.open`: counts per destination and their total. PHI-free."""

    by_destination: Mapping[str, ReplayCounts] = field(default_factory=dict)

    @property
    def total(self) -> ReplayCounts:
        parts = self.by_destination.values()
        return ReplayCounts(**{name: sum(getattr(p, name) for p in parts)
                               for name in ReplayCounts.__dataclass_fields__})


@dataclass(frozen=True, slots=True)
class DestinationReplay:
    counts: ReplayCounts
    held: list[Held]
    quarantined: list[SetAside]


def replay_destination(layout: Layout, destination: str) -> DestinationReplay:
    """Bring one destination's files to a consistent state (above) and index them. SpoolError (from the
    layout) when a directory cannot be listed or a file cannot be moved: the spool cannot be trusted."""
    layout.ensure(destination)
    removed = 0
    for name in layout.names(destination, Area.INCOMING):
        layout.unlink(destination, Area.INCOMING, name, missing_ok=True)
        removed += 1
    in_flight = layout.names(destination, Area.SENDING)
    for name in in_flight:
        layout.move(destination, name, Area.SENDING, Area.READY)
    if in_flight:
        layout.fsync(destination, Area.READY)
    held, corrupt = _index_ready(layout, destination)
    asides = _index_quarantine(layout, destination)
    counts = ReplayCounts(instances=len(held), bytes=sum(h.file_bytes for h in held), removed_incoming=removed,
                          possible_duplicates=len(in_flight), corrupt=corrupt, quarantined=len(asides))
    return DestinationReplay(counts, held, asides)


def _index_ready(layout: Layout, destination: str) -> tuple[list[Held], int]:
    held: list[Held] = []
    corrupt = 0
    for name in layout.names(destination, Area.READY):
        try:
            header, size = _read_entry(layout, destination, Area.READY, name)
        except _NotAFile:
            continue
        except CorruptEntry as exc:
            layout.set_aside(destination, name, Area.READY, encode_reason(f"corrupt header: {exc}", 0))
            corrupt += 1
            continue
        held.append(Held(name, header.record, header.dataset_offset, size))
    return held, corrupt


def _index_quarantine(layout: Layout, destination: str) -> list[SetAside]:
    names = set(layout.names(destination, Area.QUARANTINE))
    asides = []
    for name in sorted(names):
        base = name.removesuffix(REASON_SUFFIX)
        if base != name and entry_sequence(base) is not None:
            if base not in names:
                layout.unlink(destination, Area.QUARANTINE, name, missing_ok=True)  # an interrupted release
            continue
        try:
            header, size = _read_entry(layout, destination, Area.QUARANTINE, name)
            record, offset = header.record, header.dataset_offset
        except _NotAFile:
            continue
        except CorruptEntry:
            record, offset, size = None, 0, _size(layout.path(destination, Area.QUARANTINE, name))
        data = layout.read_small(destination, Area.QUARANTINE, name + REASON_SUFFIX, MAX_REASON_FILE)
        reason, attempts = decode_reason(data) if data is not None else ("reason file missing", 0)
        asides.append(SetAside(name, record, offset, size, reason, attempts))
    return asides


class _NotAFile(Exception):
    """A directory or another non-regular file in an area: not the spool's, left alone."""


def _read_entry(layout: Layout, destination: str, area: Area, name: str) -> tuple[EntryHeader, int]:
    """The checked header of an entry file and the file's size. CorruptEntry for anything that is not a
    sealed entry of this destination, an unreadable file included."""
    path = layout.path(destination, area, name)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError as exc:
        if os.path.isdir(path):
            raise _NotAFile from None
        raise CorruptEntry(f"cannot be opened ({os.strerror(exc.errno or 0)})") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise _NotAFile
        if stat.S_IMODE(info.st_mode) != FILE_MODE:
            os.fchmod(fd, FILE_MODE)
        if entry_sequence(name) is None:
            raise CorruptEntry("not an entry file name")
        header = read_header(fd, info.st_size)
    except OSError as exc:
        raise CorruptEntry(f"cannot be read ({os.strerror(exc.errno or 0)})") from None
    finally:
        os.close(fd)
    if header.record.destination != destination:
        raise CorruptEntry("the record names another destination")
    return header, info.st_size


def _size(path: os.PathLike[str] | str) -> int:
    try:
        return os.lstat(path).st_size
    except OSError:
        return 0
