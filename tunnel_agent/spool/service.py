"""The spool as one part of the agent: the store, the ingest and one forwarder per spool destination.

Built by the agent only when some ``[[destinations]]`` entry has ``mode = "spool"``. :meth:`start` opens
the store (replaying what a crash left, see ``tunnel_agent.spool.store``) before the listener accepts
anything; :meth:`run` runs the forwarders until cancelled; :meth:`close` releases the store's lock.
:meth:`snapshot` is the PHI-free view the status API and the metrics read.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tunnel_agent.config import AgentSettings
from tunnel_agent.spool.errors import SpoolIOError
from tunnel_agent.spool.forwarder import Forwarder, OpenStream
from tunnel_agent.spool.ingest import Ingest, IngestLimits
from tunnel_agent.spool.learned import LearnedContexts
from tunnel_agent.spool.replay import ReplayReport
from tunnel_agent.spool.store import Spool
from tunnel_agent.spool.studykey import StudyKeys
from tunnel_core.health import SpoolReport

__all__ = ["DestinationStatus", "SpoolService"]

log = logging.getLogger("agent.spool")


@dataclass(frozen=True, slots=True)
class DestinationStatus:
    """One spool destination as ops see it. Counts and ages only; studies never appear."""

    name: str
    called_ae: str
    instances: int
    bytes: int
    oldest_age: float | None  # seconds since the oldest instance still held arrived
    in_flight: int
    forwarded: int
    forwarded_bytes: int
    retries: int
    quarantined: int
    quarantined_bytes: int
    possible_duplicates: int
    associations_active: int
    learned_at: float | None  # when the destination last said what it accepts; None: never (configured)
    last_error: str

    def as_dict(self) -> dict[str, object]:
        return {field: getattr(self, field) for field in self.__slots__}


class SpoolService:
    def __init__(self, settings: AgentSettings, *, open_stream: OpenStream,
                 clock: Callable[[], float] = time.time) -> None:
        spooled = settings.spooled()
        config = settings.spool
        self.spool = Spool(config.directory, max_bytes=config.max_bytes, min_free_bytes=config.min_free_bytes,
                           destination_max_bytes={d.name: d.max_bytes for d in spooled})
        self.destinations = {d.name: d for d in spooled}
        self.clock = clock
        self._settings = settings
        self._open_stream = open_stream
        self.learned: LearnedContexts | None = None
        self.ingest: Ingest | None = None
        self.forwarders: dict[str, Forwarder] = {}
        self.replay: ReplayReport | None = None

    async def start(self) -> None:
        """Open the store (replay) and build the ingest and the forwarders. SpoolError if the spool cannot
        be opened (another agent holds it, its directory is not writable): the agent must not start."""
        s = self._settings
        root = s.spool.directory
        await asyncio.to_thread(_make_parent, root)
        self.replay = await asyncio.to_thread(self.spool.open)
        self.learned = LearnedContexts(root, self.destinations.values())
        keys = await asyncio.to_thread(StudyKeys.load_or_create, root)
        for name, destination in self.destinations.items():
            self.forwarders[name] = Forwarder(self.spool, destination, self.learned, open_stream=self._open_stream,
                                              probe_calling_ae=s.health.calling_ae,
                                              learn_interval=s.spool.learn_interval, clock=self.clock)
        limits = IngestLimits(artim_timeout=s.listener.artim_timeout)
        self.ingest = Ingest(self.spool, {d.called_ae: d for d in self.destinations.values()},
                             self.learned.acceptable, study_keys=keys, on_commit=self._committed,
                             limits=limits, clock=self.clock)
        report = self.replay
        log.info("spool open at %s: %d destinations, %d instances held", root, len(self.destinations),
                 self.spool.stats().instances)
        if report is not None and report.total.possible_duplicates:
            log.warning("spool: %d instances were being forwarded when the agent stopped; they are sent again "
                        "(the destination may receive them twice)", report.total.possible_duplicates)

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tasks:
            for forwarder in self.forwarders.values():
                tasks.create_task(forwarder.run())

    def close(self) -> None:
        self.spool.close()

    def _committed(self, destination: str) -> None:
        forwarder = self.forwarders.get(destination)
        if forwarder is not None:
            forwarder.wake()

    def report(self) -> tuple[SpoolReport, ...]:
        """The spool's part of the health report the relay shows (docs/protocol.md §3.8)."""
        if self.ingest is None:
            return ()
        return tuple(SpoolReport(d.name, d.called_ae, d.instances, d.bytes, d.oldest_age, d.forwarded,
                                 d.quarantined, d.last_error) for d in self.snapshot())

    def snapshot(self) -> tuple[DestinationStatus, ...]:
        now = self.clock()
        out = []
        for name, destination in sorted(self.destinations.items()):
            stats = self.spool.stats(name)
            forwarder = self.forwarders.get(name)
            f = forwarder.stats if forwarder is not None else None
            out.append(DestinationStatus(
                name=name, called_ae=destination.called_ae, instances=stats.instances, bytes=stats.bytes,
                oldest_age=round(now - stats.oldest_received, 3) if stats.oldest_received is not None else None,
                in_flight=stats.in_flight, forwarded=f.forwarded if f else 0,
                forwarded_bytes=f.forwarded_bytes if f else 0, retries=stats.retries_total,
                quarantined=stats.quarantined, quarantined_bytes=stats.quarantined_bytes,
                possible_duplicates=stats.possible_duplicates, associations_active=f.active if f else 0,
                learned_at=self.learned.learned_at(name) if self.learned else None,
                last_error=f.last_error if f else ""))
        return tuple(out)


def _make_parent(root: Path) -> None:
    """The spool's parent (the state directory, by default) must exist; made 0700 when it does not."""
    try:
        root.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise SpoolIOError(f"cannot create {root.parent} for the spool: {exc.strerror}", errno=exc.errno,
                           operation="mkdir") from None
