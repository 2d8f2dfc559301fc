"""Carrying one DICOM association between a TCP socket and a tunnel stream, on either side.

``serve_caller`` is the ingress (a DICOM peer connected to us): sniff the A-ASSOCIATE-RQ under the ARTIM
timer and a size cap, let the caller's ``decide`` either reject it or open a stream, forward the exact bytes
and splice. ``serve_stream`` is the egress (the far side opened a stream): sniff the request from the stream,
let ``choose`` map it to a configured destination (or a RESET code), dial, forward, splice.

A refusal that arrives as a stream RESET before the far end has answered anything becomes an
A-ASSOCIATE-RJ the caller's DICOM tool understands; after that it becomes an A-ABORT. Nothing here ever
invents a DICOM success: every response the caller sees came from the real peer.

First bytes that are not a DICOM association (``tunnel_core.dicom``: wrong PDU type, too big, too short)
close the caller without a reply. A whole A-ASSOCIATE-RQ whose called or calling AE field is not an AE
title (``InvalidAeTitle``) is answered, at the ingress with the A-ASSOCIATE-RJ the error carries (1/1/7,
1/1/3), and on a stream with the RESET the far ingress turns into that same reject (``UNKNOWN_ROUTE``,
``CALLING_AE_REFUSED``). Either way ``decide`` / ``choose`` never see it: routing only ever gets valid
titles. Refusals before an association are logged with the caller's ``host:port`` (``Pipe.peer``), or
with the tunnel and stream id, and the offending title only escaped.

``AssociationTracker`` is what the metrics, the status API and the association log line read. It keeps
cumulative counts by (direction, outcome), byte totals and a fixed-bucket duration histogram per
direction, all updated once, when an association ends (never per byte), and writes one log line per
association whose ``extra={"assoc": {...}}`` carries the same fields for JSON logs. Outcomes are the
strings of this module and ``tunnel_link.splice``: ``completed``, ``rejected:<reason>``,
``refused:<code>``, ``reset:<code>``, ``aborted:<why>``, ``destination-unreachable``, ``internal-error``,
and for connections that never became an association ``closed-before-associate``, ``artim-timeout``,
``bad-first-pdu:<error>``. AE titles, sizes and times only: nothing here ever holds patient data.
"""

from __future__ import annotations

import asyncio
import bisect
import itertools
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from tunnel_core import dicom
from tunnel_core.codes import ErrorCode
from tunnel_core.dicom import AssociateRequest, AssociateSniffer, RejectReason
from tunnel_core.errors import DicomError, InvalidAeTitle
from tunnel_core.routing import Destination
from tunnel_link.errors import StreamResetError
from tunnel_link.pipe import Pipe, dial
from tunnel_link.session import TunnelStream
from tunnel_link.splice import Splice

log = logging.getLogger("tunnel.association")

# Upper bounds (seconds) of the duration histogram: an echo takes milliseconds, a study minutes.
DURATION_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0)
# The two ways an association's bytes flow, as named in metrics and log records.
FROM_CALLER, TO_CALLER = "from_caller", "to_caller"


@dataclass(frozen=True, slots=True)
class IngressLimits:
    artim_timeout: float = 10.0
    max_associate_rq: int = dicom.DEFAULT_MAX_ASSOCIATE_RQ


@dataclass(slots=True)
class Association:
    """What ops may see of one association: AE titles, route, sizes and outcome. Never PHI."""

    id: str
    direction: str
    calling_ae: str
    called_ae: str
    site: str = ""
    route: str = ""
    started: float = field(default_factory=time.time)
    started_monotonic: float = field(default_factory=time.monotonic, repr=False)
    bytes_from_caller: int = 0
    bytes_to_caller: int = 0
    outcome: str = "active"
    stream: int | None = None  # the mux stream carrying it, within the site's tunnel

    def as_dict(self) -> dict[str, object]:
        return {
            "id": self.id, "direction": self.direction, "calling_ae": self.calling_ae,
            "called_ae": self.called_ae, "site": self.site, "route": self.route, "stream": self.stream,
            "started": self.started, "bytes_from_caller": self.bytes_from_caller,
            "bytes_to_caller": self.bytes_to_caller, "outcome": self.outcome,
        }


@dataclass(slots=True)
class DurationHistogram:
    """Association durations in the fixed ``DURATION_BUCKETS``: one ``observe`` per ended association."""

    counts: list[int] = field(default_factory=lambda: [0] * (len(DURATION_BUCKETS) + 1))  # last: > every bound
    sum: float = 0.0
    count: int = 0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(DURATION_BUCKETS, seconds)] += 1  # a bucket holds values <= its bound
        self.sum += seconds
        self.count += 1

    def cumulative(self) -> list[tuple[float, int]]:
        """``(upper bound, count of durations <= it)`` for every bound and +Inf, as Prometheus wants them."""
        running, out = 0, []
        for bound, n in zip((*DURATION_BUCKETS, float("inf")), self.counts, strict=True):
            running += n
            out.append((bound, running))
        return out


class AssociationTracker:
    """Active associations and cumulative counts; writes one log line when each ends.

    ``outcomes`` counts by outcome alone (the status API), ``totals`` by (direction, outcome),
    ``bytes_total`` by (direction, way) with way ``FROM_CALLER`` or ``TO_CALLER``, ``durations`` by
    direction. All only grow, and only when an association ends or a connection is refused."""

    def __init__(self, prefix: str) -> None:
        self._ids = itertools.count(1)
        self._prefix = prefix
        self.active: dict[str, Association] = {}
        self.outcomes: dict[str, int] = {}
        self.totals: dict[tuple[str, str], int] = {}
        self.bytes_total: dict[tuple[str, str], int] = {}
        self.durations: dict[str, DurationHistogram] = {}
        # Called with each association as it ends (its counts are final then): e.g. the dashboard's meter.
        self.finish_listeners: list[Callable[[Association], None]] = []

    def start(self, direction: str, req: AssociateRequest) -> Association:
        assoc = Association(f"{self._prefix}{next(self._ids)}", direction, req.calling_ae, req.called_ae)
        self.active[assoc.id] = assoc
        return assoc

    def finish(self, assoc: Association, outcome: str) -> None:
        """Call once, when the association is over: counts it and writes its log line."""
        assoc.outcome = outcome
        self.active.pop(assoc.id, None)
        duration = time.monotonic() - assoc.started_monotonic
        self._count(assoc.direction, outcome)
        for way, n in ((FROM_CALLER, assoc.bytes_from_caller), (TO_CALLER, assoc.bytes_to_caller)):
            key = (assoc.direction, way)
            self.bytes_total[key] = self.bytes_total.get(key, 0) + n
        self.durations.setdefault(assoc.direction, DurationHistogram()).observe(duration)
        log.info("assoc=%s direction=%s site=%s route=%s calling=%s called=%s bytes_in=%d bytes_out=%d "
                 "duration=%.3fs outcome=%s", assoc.id, assoc.direction, assoc.site or "-",
                 assoc.route or "-", assoc.calling_ae, assoc.called_ae, assoc.bytes_from_caller,
                 assoc.bytes_to_caller, duration, outcome, extra={"assoc": log_record(assoc, duration)})
        for listener in self.finish_listeners:
            listener(assoc)

    def refused(self, reason: str, direction: str) -> None:
        """A connection refused before it was an association (not DICOM, too big, silent)."""
        self._count(direction, reason)

    def _count(self, direction: str, outcome: str) -> None:
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1
        key = (direction, outcome)
        self.totals[key] = self.totals.get(key, 0) + 1


def reject_reason(outcome: str) -> str | None:
    """The reason of a refusal outcome (``rejected:called_ae_unknown`` -> ``called_ae_unknown``), else None."""
    kind, _, reason = outcome.partition(":")
    return reason if kind in ("rejected", "refused") and reason else None


def log_record(assoc: Association, duration: float) -> dict[str, object]:
    """The structured fields of an association's log line: AE titles, route, sizes, times. Never PHI."""
    return {
        "id": assoc.id, "direction": assoc.direction, "calling_ae": assoc.calling_ae,
        "called_ae": assoc.called_ae, "site": assoc.site or None, "route": assoc.route or None,
        "tunnel": assoc.site or None, "stream": assoc.stream,
        "bytes_from_caller": assoc.bytes_from_caller, "bytes_to_caller": assoc.bytes_to_caller,
        "duration_s": round(duration, 6), "outcome": assoc.outcome, "reject_reason": reject_reason(assoc.outcome),
    }


# What a stream's receiver resets with when the RQ's AE field is invalid: the codes the ingress turns back
# into the same reject (docs/protocol.md §10), so the caller hears 1/1/7 or 1/1/3 whichever side saw it.
_RESET_FOR_INVALID_AE = {RejectReason.CALLED_AE_UNKNOWN: ErrorCode.UNKNOWN_ROUTE,
                         RejectReason.CALLING_AE_NOT_ALLOWED: ErrorCode.CALLING_AE_REFUSED}

@dataclass(frozen=True, slots=True)
class LocalAnswer:
    """A decision to answer the caller here instead of carrying it (the agent's spool destinations):
    ``serve(pipe, first_bytes, association_id)`` runs the association to its end and returns
    (outcome, bytes from the caller, bytes to the caller). ``route`` names it in status and logs."""

    serve: Callable[[Pipe, bytes, str], Awaitable[tuple[str, int, int]]]
    route: str


Decision = TunnelStream | RejectReason | LocalAnswer
Decide = Callable[[AssociateRequest, Association], Awaitable[Decision]]
Choose = Callable[[AssociateRequest], Destination | ErrorCode]


async def serve_caller(pipe: Pipe, *, limits: IngressLimits, decide: Decide, tracker: AssociationTracker,
                       direction: str) -> None:
    """Handle one inbound DICOM connection to the end. Never raises for peer faults."""
    peer = pipe.peer
    try:
        first = await _sniff_caller(pipe, limits, tracker, peer, direction)
        if first is None:
            return
        req, rest = first
        assoc = tracker.start(direction, req)
        outcome = "internal-error"
        try:
            decision = await decide(req, assoc)
            if isinstance(decision, RejectReason):
                outcome = f"rejected:{decision.name.lower()}"
                await _answer_reject(pipe, decision, limits)
                return
            if isinstance(decision, LocalAnswer):
                assoc.route = decision.route
                outcome, assoc.bytes_from_caller, assoc.bytes_to_caller = await decision.serve(
                    pipe, req.pdu + rest, assoc.id)
                return
            assoc.bytes_from_caller = len(req.pdu) + len(rest)
            assoc.stream = decision.id
            try:
                outcome = await _splice(decision, pipe, assoc, answered=False, first=req.pdu + rest)
            finally:
                await decision.release()  # the stream we opened: reset if still open, and drop it
        finally:
            tracker.finish(assoc, outcome)
    except (ConnectionError, StreamResetError):
        pass
    finally:
        pipe.close()


async def _sniff_caller(pipe: Pipe, limits: IngressLimits, tracker: AssociationTracker,
                        peer: str, direction: str) -> tuple[AssociateRequest, bytes] | None:
    sniffer = AssociateSniffer(limits.max_associate_rq)
    try:
        async with asyncio.timeout(limits.artim_timeout):
            while True:
                data = await pipe.read()
                if not data:
                    tracker.refused("closed-before-associate", direction)
                    return None
                req = sniffer.feed(data)
                if req is not None:
                    return req, sniffer.rest
    except TimeoutError:
        log.info("peer=%s refused: silent past the ARTIM timeout of %.1fs", peer, limits.artim_timeout,
                 extra={"peer": peer})
        tracker.refused("artim-timeout", direction)
    except InvalidAeTitle as exc:  # a DICOM tool with a bad title: it is told which, as DESIGN.md's table says
        result, source, reason = exc.reason.value
        log.info("peer=%s rejected %d/%d/%d: %s", peer, result, source, reason, exc, extra={"peer": peer})
        tracker.refused(f"rejected:{exc.reason.name.lower()}", direction)
        await _answer_reject(pipe, exc.reason, limits)
    except DicomError as exc:
        log.info("peer=%s refused: %s", peer, exc, extra={"peer": peer})
        tracker.refused(f"bad-first-pdu:{type(exc).__name__}", direction)
    except ConnectionError:
        tracker.refused("closed-before-associate", direction)
    return None


async def _answer_reject(pipe: Pipe, reason: RejectReason, limits: IngressLimits) -> None:
    """Write the A-ASSOCIATE-RJ; the caller closes next. A caller that does not read is not waited for
    longer than the ARTIM timeout (the close then drops what it did not take)."""
    pipe.write(dicom.associate_reject(reason))
    try:
        async with asyncio.timeout(limits.artim_timeout):
            await pipe.drain()
    except TimeoutError:
        pass


async def serve_stream(stream: TunnelStream, *, limits: IngressLimits, choose: Choose,
                       connect_timeout: float, tracker: AssociationTracker, direction: str,
                       site: str = "") -> None:
    """Handle one stream the far side opened: decide, dial the chosen destination, splice."""
    sniffed = await sniff_stream(stream, limits, tracker, direction)
    if sniffed is None:
        return
    req, rest, consumed = sniffed
    assoc = tracker.start(direction, req)
    assoc.site = site
    assoc.stream = stream.id
    outcome = "internal-error"
    try:
        choice = choose(req)
        if isinstance(choice, ErrorCode):
            await stream.reset(choice)
            outcome = f"refused:{choice.name.lower()}"
            return
        assoc.route = choice.name
        try:
            async with asyncio.timeout(connect_timeout):
                pipe = await dial(choice.host, choice.port)
        except (OSError, TimeoutError) as exc:
            log.info("assoc=%s destination %s unreachable: %s", assoc.id, choice.name, exc.__class__.__name__)
            await stream.reset(ErrorCode.DESTINATION_UNREACHABLE)
            outcome = "destination-unreachable"
            return
        pdu = dicom.rewrite_called_ae(req.pdu, choice.called_ae) if choice.called_ae else req.pdu
        try:
            assoc.bytes_from_caller = consumed
            outcome = await _splice(stream, pipe, assoc, answered=True, first=pdu + rest, first_credit=consumed)
        finally:
            pipe.close()
    except StreamResetError as exc:
        outcome = f"reset:{exc.code.name.lower()}"
    finally:
        tracker.finish(assoc, outcome)


async def sniff_stream(stream: TunnelStream, limits: IngressLimits, tracker: AssociationTracker,
                       direction: str) -> tuple[AssociateRequest, bytes, int] | None:
    """Read the A-ASSOCIATE-RQ off a stream the far side opened, under the ARTIM timer and the size cap:
    (request, bytes after it, bytes read, all still held), or None once the stream was answered with the
    RESET its fault calls for."""
    sniffer = AssociateSniffer(limits.max_associate_rq)
    consumed = 0
    try:
        async with asyncio.timeout(limits.artim_timeout):
            while True:
                data = await stream.read()
                if not data:
                    await stream.reset(ErrorCode.PROTOCOL_ERROR)
                    return None
                consumed += len(data)
                req = sniffer.feed(data)
                if req is not None:
                    return req, sniffer.rest, consumed
    except InvalidAeTitle as exc:  # the far ingress should have answered it; answer the same way anyway
        code = _RESET_FOR_INVALID_AE[exc.reason]
        log.info("tunnel=%s stream=%d refused (%s): %s", stream.session.label, stream.id, code.name, exc,
                 extra={"tunnel": stream.session.label, "stream": stream.id})
        tracker.refused(f"refused:{code.name.lower()}", direction)
        await stream.reset(code)
    except DicomError:
        await stream.reset(ErrorCode.PROTOCOL_ERROR)
    except TimeoutError:
        await stream.reset(ErrorCode.TIMEOUT)
    except StreamResetError:
        pass
    return None


async def _splice(stream: TunnelStream, pipe: Pipe, assoc: Association, *, answered: bool, first: bytes,
                  first_credit: int = 0) -> str:
    """Copy both ways until both directions end (see ``tunnel_link.splice``); returns the outcome."""
    splice = Splice(stream, pipe, ingress=not answered)
    try:
        return await splice.run(first, first_credit)
    finally:
        if splice.ingress:
            assoc.bytes_from_caller = splice.from_socket
            assoc.bytes_to_caller = splice.to_socket
        else:
            assoc.bytes_from_caller = first_credit + splice.to_socket
            assoc.bytes_to_caller = splice.from_socket
