"""The forwarder: drains one spool destination through the tunnel to its cloud destination.

Theory of operation: ``parallel`` workers each claim the oldest ready entry (claimed in the spool so no
other worker takes it), open one tunnel stream to the destination's called AE title (the relay routes it
as it routes any association from this site), associate proposing the presentation contexts that entry and
the next ready ones of the same calling AE need (``lookahead``), one (SOP class, transfer syntax) pair
each, and C-STORE, streaming each dataset from its file. While the association is up a worker keeps
claiming the next entry it can send on it, one at a time, so a busy destination reuses associations and
no worker sits on entries another idle one could send: across workers the link is kept full to the last
instance, within a study and across studies, as stop-and-wait DICOM allows.

After each C-STORE-RSP the verdict is ``tunnel_core.delivery``'s: delivered (the entry is removed from the
spool: only now), retried later with jittered backoff, or quarantined with its reason. A context the
destination refuses quarantines or retries the entries that needed it, and a permanent refusal also stops
the ingest accepting that pair (``LearnedContexts.refused``). Anything that is not the instance's fault —
no tunnel, the relay or the destination refusing or dropping the association, a stream reset — puts the
batch back without counting an attempt, and the worker waits a jittered backoff (the spool holds).

The learner asks the destination what it accepts (``probe_contexts``) when it never did or the answer is
older than ``learn_interval``, using the health calling AE title.

Every await on the peer has a deadline (``ForwardLimits``). Logs name the destination, the stream and
counts, never a UID.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from tunnel_agent.config import AgentDestination
from tunnel_agent.spool.errors import SpoolError, SpoolStateError
from tunnel_agent.spool.learned import LearnedContexts
from tunnel_agent.spool.ledger import SpoolEntry
from tunnel_agent.spool.store import Spool
from tunnel_agent.version import __version__
from tunnel_core.backoff import Backoff
from tunnel_core.codes import TargetKind
from tunnel_core.delivery import Judgement, Verdict, judge_context, judge_no_response, judge_store_status, retry_delay
from tunnel_core.dicom import association as ua
from tunnel_core.dicom.dimse import CStoreRQ, CStoreRSP, StatusCategory, category, decode_command, encode_command
from tunnel_core.dicom.negotiation import accepted_pairs, probe_contexts
from tunnel_core.dicom.pdu import AssociateRQ, ContextResult, PresentationContext, UserInformation
from tunnel_core.dicom.uids import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_PREFIX
from tunnel_core.errors import DicomError
from tunnel_core.frames import OpenPayload
from tunnel_link.channels import ChannelClosed, StreamChannel
from tunnel_link.dicomconn import DicomConnection
from tunnel_link.session import TunnelStream

__all__ = ["ForwardLimits", "Forwarder", "OpenStream", "Unavailable"]

log = logging.getLogger("agent.spool")

OpenStream = Callable[[OpenPayload], Awaitable[TunnelStream]]
Pair = tuple[str, str]
CHUNK = 1024 * 1024  # dataset bytes read from the spool file and handed to the tunnel at a time


class Unavailable(Exception):
    """The destination cannot be reached now (no tunnel, refused, dropped): not the instance's fault."""


class _EntryBroken(Exception):
    """The entry's own file cannot be read back whole: it goes to quarantine, the association is aborted."""


@dataclass(frozen=True, slots=True)
class ForwardLimits:
    lookahead: int = 64  # ready entries looked at to choose an association's presentation contexts
    associate_timeout: float = 30.0  # seconds for the A-ASSOCIATE-AC, and for the A-RELEASE-RP
    response_timeout: float = 120.0  # seconds for a C-STORE-RSP after the dataset's last byte left
    max_pdu_receive: int = 64 * 1024  # responses are small
    idle_poll: float = 1.0  # seconds between looks at an empty spool when nothing woke the worker
    backoff_initial: float = 0.5  # seconds: a worker's wait after the destination was unavailable
    backoff_max: float = 30.0
    learn_retry: float = 30.0  # seconds between probes while the destination cannot be asked


@dataclass(slots=True)
class ForwardStats:
    forwarded: int = 0
    forwarded_bytes: int = 0  # retries and quarantine are counted by the spool itself (Spool.stats)
    active: int = 0  # associations open now
    last_error: str = ""


class Forwarder:
    """Build per spool destination; ``await run()`` (cancel to stop). ``wake()`` after a commit."""

    def __init__(self, spool: Spool, destination: AgentDestination, learned: LearnedContexts, *,
                 open_stream: OpenStream, probe_calling_ae: str, learn_interval: float,
                 limits: ForwardLimits = ForwardLimits(), clock: Callable[[], float] = time.time,
                 rand: Callable[[], float] = random.random) -> None:
        self.spool = spool
        self.destination = destination
        self.name = destination.name
        self.learned = learned
        self.open_stream = open_stream
        self.probe_calling_ae = probe_calling_ae
        self.learn_interval = learn_interval
        self.limits = limits
        self.clock = clock
        self.rand = rand
        self.stats = ForwardStats()
        self._wakeup = asyncio.Event()
        self._taking = asyncio.Lock()
        self._failures: dict[str, int] = {}  # entry name -> DIMSE failures so far (not counting outages)

    def wake(self) -> None:
        self._wakeup.set()

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(_Learner(self).run())
            for _ in range(self.destination.parallel):
                tasks.create_task(self._worker())

    # --- workers ------------------------------------------------------------------------------------------

    async def _worker(self) -> None:
        backoff = Backoff(self.limits.backoff_initial, self.limits.backoff_max, self.rand)
        while True:
            batch = await self._take(1)
            if not batch:
                await self._idle()
                continue
            try:
                await self._forward(batch)
                backoff.reset()
            except Unavailable as exc:
                self.stats.last_error = str(exc)
                await asyncio.sleep(backoff.next_delay())
            except Exception as exc:  # a bug or a disk error must not stop the destination's forwarding
                self.stats.last_error = f"{type(exc).__name__}: {str(exc)[:200]}"
                log.error("spool destination %s: forwarding failed: %s", self.name, self.stats.last_error)
                await asyncio.sleep(backoff.next_delay())

    async def _idle(self) -> None:
        self._wakeup.clear()
        try:
            async with asyncio.timeout(self.limits.idle_poll):
                await self._wakeup.wait()
        except TimeoutError:
            pass

    async def _take(self, limit: int, *, calling_ae: str | None = None,
                    pairs: frozenset[Pair] | None = None) -> list[SpoolEntry]:
        """Claim up to ``limit`` ready entries (of one calling AE title; with ``pairs``, only those), in one
        trip to a worker thread (each claim is a rename)."""
        async with self._taking:
            candidates = self.spool.ready(self.name, limit * 4, self.clock())
            return await asyncio.to_thread(self._claim, candidates, limit, calling_ae, pairs)

    def _claim(self, candidates: list[SpoolEntry], limit: int, calling_ae: str | None,
               pairs: frozenset[Pair] | None) -> list[SpoolEntry]:
        taken: list[SpoolEntry] = []
        for entry in candidates:
            calling_ae = calling_ae or entry.record.calling_ae
            if entry.record.calling_ae != calling_ae or (pairs is not None and _pair(entry) not in pairs):
                continue
            if self.spool.claim(entry):
                taken.append(entry)
            if len(taken) >= limit:
                break
        return taken

    async def _forward(self, batch: list[SpoolEntry]) -> None:
        """One association: the batch, then whatever else it can carry. On any failure what is left goes
        back to ready (an entry already settled is left as it is)."""
        queue = collections.deque(batch)
        calling_ae = batch[0].record.calling_ae
        current: SpoolEntry | None = None
        try:
            upcoming = [e for e in self.spool.ready(self.name, self.limits.lookahead, self.clock())
                        if e.record.calling_ae == calling_ae]
            contexts = probe_contexts(dict.fromkeys(_pair(e) for e in [*batch, *upcoming]))[0]
            proposed = {(c.abstract_syntax, c.transfer_syntaxes[0]) for c in contexts}
            for entry in [e for e in batch if _pair(e) not in proposed]:  # more pairs than fit: next time
                queue.remove(entry)
                await self._put_back(entry, "")
            async with _Associated(self, calling_ae, contexts) as conn:
                by_pair = await _sort_out(self, conn, contexts, queue)
                message_id = 0
                while queue or (queue := collections.deque(
                        await self._take(1, calling_ae=calling_ae, pairs=frozenset(by_pair)))):
                    current = queue.popleft()
                    message_id = message_id % 0xFFFF + 1
                    await self._store(conn, by_pair[_pair(current)], current, message_id, queue)
                    current = None
        except Exception as exc:
            for entry in [*queue, *([current] if current is not None else [])]:
                await self._put_back(entry, str(exc) if isinstance(exc, Unavailable) else "")
            raise

    async def _store(self, conn: DicomConnection, context_id: int, entry: SpoolEntry, message_id: int,
                     queue: collections.deque[SpoolEntry]) -> None:
        record = entry.record
        if conn.association.state is not ua.State.ESTABLISHED:  # the destination aborted or released
            queue.appendleft(entry)
            raise Unavailable(f"destination {self.name} ended the association")
        command = CStoreRQ(message_id, record.sop_class_uid, record.sop_instance_uid)
        conn.association.send_command(context_id, encode_command(command))
        try:
            await _send_dataset(self, conn, context_id, entry)
            response = await _response(self, conn, message_id)
        except Unavailable:
            queue.appendleft(entry)  # put back with the rest: the outage is not the instance's fault
            raise
        except _EntryBroken as exc:
            await self._quarantine(entry, str(exc))
            await conn.abort()  # part of its dataset may have gone out
            raise Unavailable(f"destination {self.name}: association aborted after {exc}") from None
        except TimeoutError:
            what = f"no C-STORE-RSP within {self.limits.response_timeout:.0f}s"
            await self._judged(entry, judge_no_response(what, attempts=self._failed(entry),
                                                        max_attempts=self.destination.max_attempts))
            await conn.abort()
            raise Unavailable(f"destination {self.name}: {what}") from None
        kind = category(response.status)
        failed = kind not in (StatusCategory.SUCCESS, StatusCategory.WARNING)
        attempts = self._failures.get(entry.name, 0) + failed
        judgement = judge_store_status(response.status, attempts=attempts, max_attempts=self.destination.max_attempts)
        if judgement.verdict is Verdict.RETRY:
            self._failures[entry.name] = attempts
        await self._judged(entry, judgement)

    # --- verdicts -----------------------------------------------------------------------------------------

    def _failed(self, entry: SpoolEntry) -> int:
        self._failures[entry.name] = self._failures.get(entry.name, 0) + 1
        return self._failures[entry.name]

    async def _judged(self, entry: SpoolEntry, judgement: Judgement) -> None:
        if judgement.verdict is Verdict.DELIVERED:
            self._failures.pop(entry.name, None)
            await asyncio.to_thread(self.spool.delivered, entry)
            self.stats.forwarded += 1
            self.stats.forwarded_bytes += entry.record.size
        elif judgement.verdict is Verdict.QUARANTINE:
            await self._quarantine(entry, judgement.reason)
        else:
            delay = retry_delay(self._failures.get(entry.name, 1), initial=self.destination.retry_initial,
                                cap=self.destination.retry_max, rand=self.rand)
            await asyncio.to_thread(self.spool.retry, entry, self.clock() + delay, judgement.reason)

    async def _quarantine(self, entry: SpoolEntry, reason: str) -> None:
        self._failures.pop(entry.name, None)
        await asyncio.to_thread(self.spool.quarantine, entry, reason)
        log.warning("spool destination %s: an instance was quarantined: %s", self.name, reason)

    async def _put_back(self, entry: SpoolEntry, reason: str) -> None:
        """Back to ready at once, no attempt counted (the spool's own retry count still grows); an entry
        that is no longer claimed (settled meanwhile) is left alone."""
        try:
            await asyncio.to_thread(self.spool.retry, entry, self.clock(), reason or "not sent")
        except SpoolStateError:
            pass

    # --- the association ----------------------------------------------------------------------------------

    async def _event(self, conn: DicomConnection, timeout: float) -> ua.Event:
        try:
            return await conn.next_event(timeout)
        except (ChannelClosed, DicomError) as exc:
            raise Unavailable(f"destination {self.name}: {exc}") from exc

    async def _flush(self, conn: DicomConnection) -> None:
        try:
            await conn.flush()
        except ChannelClosed as exc:
            raise Unavailable(f"destination {self.name}: {exc}") from exc
        except TimeoutError:  # the tunnel gave no credit for write_timeout: not the instance's fault
            raise Unavailable(f"destination {self.name}: nothing could be sent for {conn.write_timeout:.0f}s") from None

class _Learner:
    """Asks the destination what it accepts when it never did, or the answer is older than
    ``learn_interval`` (see the module docstring); records the answer in ``LearnedContexts``."""

    def __init__(self, forwarder: Forwarder) -> None:
        self.f = forwarder

    async def run(self) -> None:
        while True:
            learned_at = self.f.learned.learned_at(self.f.name)
            due = learned_at is None or self.f.clock() - learned_at >= self.f.learn_interval
            if not due:
                await asyncio.sleep(max(1.0, learned_at + self.f.learn_interval - self.f.clock()))
                continue
            try:
                accepted = await self.probe()
            except Unavailable as exc:
                log.info("spool destination %s: could not ask what it accepts: %s", self.f.name, exc)
                await asyncio.sleep(self.f.limits.learn_retry)
                continue
            await asyncio.to_thread(self.f.learned.record, self.f.name, accepted, self.f.clock())
            log.info("spool destination %s accepts %d of %d configured SOP classes", self.f.name, len(accepted),
                     len(self.f.learned.configured(self.f.name)))

    async def probe(self) -> dict[str, tuple[str, ...]]:
        pairs = [(a, ts) for a, syntaxes in self.f.learned.configured(self.f.name).items() for ts in syntaxes]
        accepted: dict[str, tuple[str, ...]] = {}
        for contexts in probe_contexts(pairs):
            async with _Associated(self.f, self.f.probe_calling_ae, contexts) as conn:
                assert conn.association.ac is not None
                for abstract, syntaxes in accepted_pairs(contexts, conn.association.ac.contexts).items():
                    accepted[abstract] = accepted.get(abstract, ()) + syntaxes
        return accepted


class _Associated:
    """``async with``: an association to the destination through a new tunnel stream, released at the end
    (aborted if the block failed). Unavailable when it cannot be opened."""

    def __init__(self, forwarder: Forwarder, calling_ae: str, contexts: tuple[PresentationContext, ...]) -> None:
        self.f = forwarder
        self.calling_ae = calling_ae
        self.contexts = contexts
        self.channel: StreamChannel | None = None
        self.conn: DicomConnection | None = None

    async def __aenter__(self) -> DicomConnection:
        f = self.f
        called = f.destination.called_ae
        try:
            stream = await f.open_stream(OpenPayload(TargetKind.CALLED_AE, called, self.calling_ae))
        except Exception as exc:  # no session, draining, stream limit, link error: all "not now"
            raise Unavailable(f"no tunnel to the relay for destination {f.name}: {type(exc).__name__}") from exc
        self.channel = StreamChannel(stream)
        self.conn = conn = DicomConnection(self.channel, ua.Association(ua.Role.REQUESTOR,
                                                                     max_pdu_receive=f.limits.max_pdu_receive))
        user = UserInformation(implementation_class_uid=IMPLEMENTATION_CLASS_UID,
                               implementation_version_name=(IMPLEMENTATION_VERSION_PREFIX + __version__)[:16])
        try:
            conn.association.request(AssociateRQ(called, self.calling_ae, self.contexts, user))
            await f._flush(conn)
            event = await f._event(conn, f.limits.associate_timeout)
        except TimeoutError:
            await self._close(failed=True)
            what = f"no A-ASSOCIATE-AC within {f.limits.associate_timeout:.0f}s"
            raise Unavailable(f"destination {f.name}: {what}") from None
        except Unavailable:
            await self._close(failed=True)
            raise
        if isinstance(event, ua.AssociateRejected):
            rj = event.rj
            await self._close(failed=False)
            raise Unavailable(f"destination {f.name} rejected the association {rj.result}/{rj.source}/{rj.reason}")
        if not isinstance(event, ua.AssociateAccepted):
            await self._close(failed=True)
            raise Unavailable(f"destination {f.name} answered the A-ASSOCIATE-RQ with {type(event).__name__}")
        f.stats.active += 1
        return conn

    async def __aexit__(self, exc_type: object, exc: object, tb: object) -> None:
        self.f.stats.active -= 1
        assert self.conn is not None
        if exc_type is None and self.conn.association.state is ua.State.ESTABLISHED:
            try:
                await self._release()
                return
            except (Unavailable, TimeoutError):
                pass
        await self._close(failed=True)

    async def _release(self) -> None:
        assert self.conn is not None
        self.conn.association.release()
        await self.f._flush(self.conn)
        while True:
            event = await self.f._event(self.conn, self.f.limits.associate_timeout)
            if isinstance(event, ua.ReleaseConfirmed):
                break
            if isinstance(event, ua.ReleaseRequested):  # a collision: answer, then wait for ours
                self.conn.association.release_response()
                await self.f._flush(self.conn)
        # Released: end our half and let the relay end its own (the destination closes after A-RELEASE-RP),
        # so the association ends "completed" at the relay too, not as a reset.
        assert self.channel is not None
        self.channel.close()
        try:
            async with asyncio.timeout(self.f.limits.associate_timeout):
                while await self.channel.read():
                    pass
        except (TimeoutError, ChannelClosed):
            pass
        await self._close(failed=False)

    async def _close(self, *, failed: bool) -> None:
        if self.conn is not None and failed:
            await self.conn.abort()
        if self.channel is not None:
            await self.channel.release()


async def _sort_out(f: Forwarder, conn: DicomConnection, contexts: tuple[PresentationContext, ...],
                    queue: collections.deque[SpoolEntry]) -> dict[Pair, int]:
    """The accepted pairs -> context id; entries whose pair was refused are judged and leave the queue."""
    accepted = conn.association.accepted_contexts
    by_pair = {(c.abstract_syntax, c.transfer_syntaxes[0]): c.id for c in contexts if c.id in accepted}
    results = {r.id: r.result for r in conn.association.ac.contexts} if conn.association.ac else {}
    for entry in [e for e in queue if _pair(e) not in by_pair]:
        queue.remove(entry)
        context = next(c for c in contexts if (c.abstract_syntax, c.transfer_syntaxes[0]) == _pair(entry))
        judgement = judge_context(results.get(context.id, ContextResult.NO_REASON))
        assert judgement is not None
        if judgement.verdict is Verdict.QUARANTINE:
            await asyncio.to_thread(f.learned.refused, f.name, *_pair(entry))  # it writes and fsyncs a file
            await f._quarantine(entry, judgement.reason)
        else:
            await f._put_back(entry, judgement.reason)
    return by_pair


async def _send_dataset(f: Forwarder, conn: DicomConnection, context_id: int, entry: SpoolEntry) -> None:
    try:
        source = await asyncio.to_thread(f.spool.open_dataset, entry)
    except SpoolError as exc:
        raise _EntryBroken(f"spool entry unreadable: {exc}") from exc
    try:
        left = entry.record.size
        while True:
            chunk = await asyncio.to_thread(source.read, min(CHUNK, left) if left else 0)
            left -= len(chunk)
            if not chunk and left > 0:
                raise _EntryBroken("spool entry shorter than its header says")
            conn.association.send_dataset(context_id, chunk, last=left <= 0)
            await f._flush(conn)
            if left <= 0:
                return
    finally:
        source.close()


async def _response(f: Forwarder, conn: DicomConnection, message_id: int) -> CStoreRSP:
    async with asyncio.timeout(f.limits.response_timeout):  # in all, however the bytes trickle in
        event = await f._event(conn, f.limits.response_timeout)
    if not isinstance(event, ua.CommandReceived):
        raise Unavailable(f"destination {f.name} ended the association ({type(event).__name__})")
    try:
        response = decode_command(event.command)
    except DicomError as exc:
        await conn.abort()
        raise Unavailable(f"destination {f.name} sent a bad command set: {exc}") from exc
    if not isinstance(response, CStoreRSP) or response.responded_to != message_id:
        await conn.abort()
        raise Unavailable(f"destination {f.name} answered {response.describe()} to C-STORE {message_id}")
    return response


def _pair(entry: SpoolEntry) -> Pair:
    return entry.record.sop_class_uid, entry.record.transfer_syntax

