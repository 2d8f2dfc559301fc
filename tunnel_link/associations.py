"""Carrying one DICOM association between a TCP socket and a tunnel stream, on either side.

``serve_caller`` is the ingress (a DICOM peer connected to us): sniff the A-ASSOCIATE-RQ under the ARTIM
timer and a size cap, let the caller's ``decide`` either reject it or open a stream, forward the exact bytes
and splice. ``serve_stream`` is the egress (the far side opened a stream): sniff the request from the stream,
let ``choose`` map it to a configured destination (or a RESET code), dial, forward, splice.

A refusal that arrives as a stream RESET before the far end has answered anything becomes an
A-ASSOCIATE-RJ the caller's DICOM tool understands; after that it becomes an A-ABORT. Nothing here ever
invents a DICOM success: every response the caller sees came from the real peer.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from tunnel_core import dicom
from tunnel_core.codes import ErrorCode
from tunnel_core.dicom import AssociateRequest, AssociateSniffer, RejectReason
from tunnel_core.errors import DicomError
from tunnel_core.routing import Destination
from tunnel_link.errors import StreamResetError
from tunnel_link.pipe import Pipe, dial
from tunnel_link.session import TunnelStream
from tunnel_link.splice import Splice

log = logging.getLogger("tunnel.association")



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
    bytes_from_caller: int = 0
    bytes_to_caller: int = 0
    outcome: str = "active"

    def as_dict(self) -> dict[str, object]:
        return {
            "id": self.id, "direction": self.direction, "calling_ae": self.calling_ae,
            "called_ae": self.called_ae, "site": self.site, "route": self.route,
            "started": self.started, "bytes_from_caller": self.bytes_from_caller,
            "bytes_to_caller": self.bytes_to_caller, "outcome": self.outcome,
        }


class AssociationTracker:
    """Active associations and outcome counts; writes one log line when each ends."""

    def __init__(self, prefix: str) -> None:
        self._ids = itertools.count(1)
        self._prefix = prefix
        self.active: dict[str, Association] = {}
        self.outcomes: dict[str, int] = {}

    def start(self, direction: str, req: AssociateRequest) -> Association:
        assoc = Association(f"{self._prefix}{next(self._ids)}", direction, req.calling_ae, req.called_ae)
        self.active[assoc.id] = assoc
        return assoc

    def finish(self, assoc: Association, outcome: str) -> None:
        assoc.outcome = outcome
        self.active.pop(assoc.id, None)
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1
        log.info("assoc=%s direction=%s site=%s route=%s calling=%s called=%s bytes_in=%d bytes_out=%d "
                 "duration=%.3fs outcome=%s", assoc.id, assoc.direction, assoc.site or "-",
                 assoc.route or "-", assoc.calling_ae, assoc.called_ae, assoc.bytes_from_caller,
                 assoc.bytes_to_caller, time.time() - assoc.started, outcome)

    def refused(self, reason: str) -> None:
        """A connection refused before it was an association (not DICOM, too big, silent)."""
        self.outcomes[reason] = self.outcomes.get(reason, 0) + 1


Decision = TunnelStream | RejectReason
Decide = Callable[[AssociateRequest, Association], Awaitable[Decision]]
Choose = Callable[[AssociateRequest], Destination | ErrorCode]


async def serve_caller(pipe: Pipe, *, limits: IngressLimits, decide: Decide, tracker: AssociationTracker,
                       direction: str) -> None:
    """Handle one inbound DICOM connection to the end. Never raises for peer faults."""
    peer = pipe.peername()
    try:
        first = await _sniff_caller(pipe, limits, tracker, peer)
        if first is None:
            return
        req, rest = first
        assoc = tracker.start(direction, req)
        outcome = "internal-error"
        try:
            decision = await decide(req, assoc)
            if isinstance(decision, RejectReason):
                pipe.write(dicom.associate_reject(decision))
                await pipe.drain()
                outcome = f"rejected:{decision.name.lower()}"
                return
            assoc.bytes_from_caller = len(req.pdu) + len(rest)
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
                        peer: object) -> tuple[AssociateRequest, bytes] | None:
    sniffer = AssociateSniffer(limits.max_associate_rq)
    try:
        async with asyncio.timeout(limits.artim_timeout):
            while True:
                data = await pipe.read()
                if not data:
                    tracker.refused("closed-before-associate")
                    return None
                req = sniffer.feed(data)
                if req is not None:
                    return req, sniffer.rest
    except TimeoutError:
        log.info("peer=%s refused: silent past the ARTIM timeout of %.1fs", peer, limits.artim_timeout)
        tracker.refused("artim-timeout")
    except DicomError as exc:
        log.info("peer=%s refused: %s", peer, exc)
        tracker.refused(f"bad-first-pdu:{type(exc).__name__}")
    except ConnectionError:
        tracker.refused("closed-before-associate")
    return None


async def serve_stream(stream: TunnelStream, *, limits: IngressLimits, choose: Choose,
                       connect_timeout: float, tracker: AssociationTracker, direction: str,
                       site: str = "") -> None:
    """Handle one stream the far side opened: decide, dial the chosen destination, splice."""
    sniffed = await _sniff_stream(stream, limits)
    if sniffed is None:
        return
    req, rest, consumed = sniffed
    assoc = tracker.start(direction, req)
    assoc.site = site
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


async def _sniff_stream(stream: TunnelStream, limits: IngressLimits
                        ) -> tuple[AssociateRequest, bytes, int] | None:
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
