"""The spool's memory: which entries exist, where each one is, and how many bytes are held or promised.

Theory of operation: the files are the truth after a crash; while the process runs, the ledger is the
truth the store decides with, under one lock that is never held across I/O. An operation that moves a
file first *marks* its entry ``MOVING`` under the lock (so no other thread can take it), does the I/O
without the lock, then *settles* the entry where the file now is — or *undoes* the mark when the I/O
failed, leaving the entry where it was. Bytes are *reserved* before they are written, so writers running
at once can never together exceed a limit; a commit turns a writer's reservation into a held entry.

Byte counts are of whole entry files (header and dataset), and every area counts against the limits —
quarantined entries too, since they take the same disk. A limit of 0 means "no limit of its own".
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import Enum

from tunnel_agent.spool.entryfile import SpoolRecord, entry_name, entry_sequence, validate_destination
from tunnel_agent.spool.errors import SpoolFull, SpoolStateError

__all__ = ["Ledger", "QuarantineEntry", "SpoolEntry", "SpoolStats", "Where"]

_MAX_SEQUENCE = 2**62  # a received time past year 100,000 is clamped: names keep their 16 hex digits


class Where(Enum):
    READY = "ready"
    SENDING = "sending"
    MOVING = "moving"  # a thread is renaming or removing its file; nobody else may touch it


@dataclass(frozen=True, slots=True)
class SpoolEntry:
    """One committed instance, as the ledger saw it when this snapshot was taken. Hand it back to the
    spool's forward-path calls; ``attempts`` (failed deliveries, counted since the spool was opened) and
    ``not_before`` (the earliest retry time, on the caller's clock) are as of the snapshot."""

    destination: str
    name: str  # the entry file's name: PHI-free, sorts in receive order
    record: SpoolRecord  # record.size is the dataset's length
    attempts: int = 0
    not_before: float = float("-inf")
    last_reason: str = ""  # the reason of the last retry(), if any


@dataclass(frozen=True, slots=True)
class QuarantineEntry:
    """A quarantined entry, for an operator. ``record`` is None when the header could not be read;
    ``size`` is the whole file's length; ``reason`` is what the caller (or replay) said."""

    destination: str
    name: str
    record: SpoolRecord | None
    size: int
    reason: str
    attempts: int


@dataclass(frozen=True, slots=True)
class SpoolStats:
    """PHI-free counters for one destination or all of them. ``instances`` and ``bytes`` are the
    committed entries not yet delivered (ready and in flight); ``in_flight`` of those are claimed;
    ``possible_duplicates`` were in flight at the last crash; the totals count since the spool opened."""

    instances: int = 0
    bytes: int = 0
    oldest_received: float | None = None
    in_flight: int = 0
    quarantined: int = 0
    quarantined_bytes: int = 0
    possible_duplicates: int = 0
    delivered_total: int = 0
    retries_total: int = 0


@dataclass(slots=True)
class Held:
    """A committed entry in memory."""

    name: str
    record: SpoolRecord
    dataset_offset: int
    file_bytes: int
    where: Where = Where.READY
    attempts: int = 0
    not_before: float = float("-inf")
    last_reason: str = ""
    came_from: Where = Where.READY  # while MOVING: where undo() puts it back

    def entry(self, destination: str) -> SpoolEntry:
        return SpoolEntry(destination, self.name, self.record, self.attempts, self.not_before, self.last_reason)


@dataclass(slots=True)
class SetAside:
    """A quarantined entry in memory."""

    name: str
    record: SpoolRecord | None  # None: the header could not be read
    dataset_offset: int
    file_bytes: int
    reason: str
    attempts: int = 0
    busy: bool = False  # being released or dropped


@dataclass(slots=True)
class _Destination:
    limit: int
    reserved: int = 0
    held_bytes: int = 0
    quarantined_bytes: int = 0
    held: dict[str, Held] = field(default_factory=dict)
    order: list[str] = field(default_factory=list)  # names of ``held``, sorted: receive order
    quarantine: dict[str, SetAside] = field(default_factory=dict)
    possible_duplicates: int = 0
    delivered_total: int = 0
    retries_total: int = 0

    @property
    def used(self) -> int:
        return self.reserved + self.held_bytes + self.quarantined_bytes

    def add(self, item: Held) -> None:
        self.held[item.name] = item
        self.held_bytes += item.file_bytes
        bisect.insort(self.order, item.name)

    def remove(self, name: str) -> Held:
        item = self.held.pop(name)
        self.held_bytes -= item.file_bytes
        del self.order[bisect.bisect_left(self.order, name)]
        return item

    def set_aside(self, item: SetAside) -> None:
        self.quarantine[item.name] = item
        self.quarantined_bytes += item.file_bytes

    def stats(self) -> SpoolStats:
        held = self.held.values()
        return SpoolStats(
            instances=len(self.held), bytes=self.held_bytes,
            oldest_received=min((h.record.received for h in held), default=None),
            in_flight=sum(1 for h in held if h.where is not Where.READY),
            quarantined=len(self.quarantine), quarantined_bytes=self.quarantined_bytes,
            possible_duplicates=self.possible_duplicates, delivered_total=self.delivered_total,
            retries_total=self.retries_total)


class Ledger:
    """The in-memory index of a spool; every method is atomic under the one lock, none does I/O.

    ``max_bytes`` bounds all destinations together, ``limits`` each named one (0: no limit of its own).
    """

    def __init__(self, max_bytes: int, limits: Mapping[str, int]) -> None:
        self._lock = threading.Lock()
        self._max = max_bytes
        self._limits = {validate_destination(name): limit for name, limit in limits.items()}
        self._dest: dict[str, _Destination] = {}
        self._total = 0  # the sum of every destination's ``used``, kept as they change (reserve is hot)
        self._next_sequence = 0

    # --- loading (replay) and names ------------------------------------------------------------------

    def load(self, destination: str, held: Iterable[Held], quarantined: Iterable[SetAside],
             possible_duplicates: int) -> None:
        with self._lock:
            state = self._state(destination)
            before = state.used
            for item in held:
                state.add(item)
            for aside in quarantined:
                state.set_aside(aside)
            self._total += state.used - before
            state.possible_duplicates += possible_duplicates
            names = [*state.held, *state.quarantine]
            sequences = [s for s in map(entry_sequence, names) if s is not None]
            self._next_sequence = max([self._next_sequence, *(s + 1 for s in sequences)])

    def new_name(self, received: float) -> str:
        """A name for an entry received at ``received``: its sequence number is the receive time in
        microseconds, or one more than the last one given if that is not later, so names sort in receive
        order across restarts even when the spool was emptied, and never go back with the clock."""
        with self._lock:
            sequence = max(self._next_sequence, min(max(int(received * 1e6), 0), _MAX_SEQUENCE))
            self._next_sequence = sequence + 1
            return entry_name(sequence)

    def destinations(self) -> list[str]:
        with self._lock:
            return sorted(self._dest)

    # --- bytes ----------------------------------------------------------------------------------------

    def reserve(self, destination: str, count: int) -> None:
        """Promise ``count`` more bytes to a writer of ``destination``; SpoolFull when a limit would pass."""
        with self._lock:
            state = self._state(destination)
            if state.limit and state.used + count > state.limit:
                raise SpoolFull(f"spool destination {destination} is full ({state.used} of {state.limit} "
                                "bytes)", limit="destination")
            if self._max and self._total + count > self._max:
                raise SpoolFull(f"spool is full ({self._total} of {self._max} bytes)", limit="total")
            state.reserved += count
            self._total += count

    def unreserve(self, destination: str, count: int) -> None:
        with self._lock:
            self._dest[destination].reserved -= count
            self._total -= count

    def commit(self, destination: str, item: Held, reserved: int) -> SpoolEntry:
        """A writer's file is in ready/: its reservation becomes a held entry."""
        with self._lock:
            state = self._dest[destination]
            state.reserved -= reserved
            state.add(item)
            self._total += item.file_bytes - reserved
            return item.entry(destination)

    # --- the forward path -----------------------------------------------------------------------------

    def ready(self, destination: str, limit: int, now: float) -> list[SpoolEntry]:
        with self._lock:
            state = self._dest.get(destination)
            found: list[SpoolEntry] = []
            for name in state.order if state else ():
                if len(found) >= limit:
                    break
                item = state.held[name]
                if item.where is Where.READY and item.not_before <= now:
                    found.append(item.entry(destination))
            return found

    def mark(self, entry: SpoolEntry, allowed: frozenset[Where]) -> Held:
        """Mark ``entry`` MOVING if it is in one of ``allowed``; SpoolStateError otherwise."""
        with self._lock:
            item = self._held(entry)
            if item.where not in allowed:
                raise SpoolStateError(f"spool entry {entry.destination}/{entry.name} is {item.where.value}, "
                                      f"not {' or '.join(sorted(w.value for w in allowed))}")
            item.came_from, item.where = item.where, Where.MOVING
            return item

    def undo(self, entry: SpoolEntry) -> None:
        with self._lock:
            item = self._held(entry)
            item.where = item.came_from

    def settle(self, entry: SpoolEntry, where: Where) -> Held:
        """The file of a MOVING entry is now in ``where``."""
        with self._lock:
            item = self._held(entry)
            item.where = where
            return item

    def retried(self, entry: SpoolEntry, not_before: float, reason: str) -> int:
        """The MOVING entry's file is back in ready/ after a failed delivery: its attempts, now."""
        with self._lock:
            item = self._held(entry)
            item.where, item.not_before, item.last_reason = Where.READY, not_before, reason
            item.attempts += 1
            self._dest[entry.destination].retries_total += 1
            return item.attempts

    def located(self, entry: SpoolEntry, where: Where) -> Held:
        """The entry, if it is in ``where``; SpoolStateError otherwise."""
        with self._lock:
            item = self._held(entry)
            if item.where is not where:
                raise SpoolStateError(f"spool entry {entry.destination}/{entry.name} is {item.where.value}, "
                                      f"not {where.value}")
            return item

    def forget(self, entry: SpoolEntry, *, delivered: bool) -> Held:
        with self._lock:
            state = self._dest[entry.destination]
            state.delivered_total += delivered
            item = state.remove(entry.name)
            self._total -= item.file_bytes
            return item

    # --- quarantine -----------------------------------------------------------------------------------

    def quarantine(self, entry: SpoolEntry, reason: str) -> None:
        """The MOVING entry's file is in quarantine/ now."""
        with self._lock:
            state = self._dest[entry.destination]
            item = state.remove(entry.name)
            state.set_aside(SetAside(item.name, item.record, item.dataset_offset, item.file_bytes, reason,
                                     item.attempts))

    def quarantined(self, destination: str) -> list[QuarantineEntry]:
        with self._lock:
            state = self._dest.get(destination)
            asides = sorted(state.quarantine.values(), key=lambda a: a.name) if state else []
            return [QuarantineEntry(destination, a.name, a.record, a.file_bytes, a.reason, a.attempts)
                    for a in asides]

    def take_aside(self, destination: str, name: str) -> SetAside:
        """Mark a quarantined entry busy for a release or a drop; SpoolStateError if unknown or busy."""
        with self._lock:
            state = self._dest.get(destination)
            aside = state.quarantine.get(name) if state else None
            if aside is None or aside.busy:
                raise SpoolStateError(f"no quarantined spool entry {destination}/{name:.40}")
            aside.busy = True
            return aside

    def put_back_aside(self, destination: str, name: str) -> None:
        with self._lock:
            self._dest[destination].quarantine[name].busy = False

    def end_aside(self, destination: str, name: str, requeued: Held | None) -> None:
        """The quarantined entry was dropped, or requeued as ``requeued`` (its file is in ready/ now)."""
        with self._lock:
            state = self._dest[destination]
            before = state.used
            state.quarantined_bytes -= state.quarantine.pop(name).file_bytes
            if requeued is not None:
                state.add(requeued)
            self._total += state.used - before

    # --- stats ----------------------------------------------------------------------------------------

    def stats(self, destination: str | None) -> SpoolStats:
        with self._lock:
            if destination is not None:
                state = self._dest.get(destination)
                return state.stats() if state else SpoolStats()
            parts = [s.stats() for s in self._dest.values()]
        oldest = [p.oldest_received for p in parts if p.oldest_received is not None]
        sums = {name: sum(getattr(p, name) for p in parts) for name in SpoolStats.__dataclass_fields__
                if name != "oldest_received"}
        return SpoolStats(**sums, oldest_received=min(oldest, default=None))

    def _state(self, destination: str) -> _Destination:
        state = self._dest.get(destination)
        if state is None:
            state = self._dest[destination] = _Destination(self._limits.get(destination, 0))
        return state

    def _held(self, entry: SpoolEntry) -> Held:
        state = self._dest.get(entry.destination)
        item = state.held.get(entry.name) if state else None
        if item is None:
            raise SpoolStateError(f"no spool entry {entry.destination:.63}/{entry.name:.40}")
        return item
