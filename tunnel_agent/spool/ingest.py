"""The spool's SCP: a modality's association to a spool destination, answered by the agent itself.

Theory of operation: the listener's sniffer has read the A-ASSOCIATE-RQ and found that its called AE title
is a ``mode = "spool"`` destination. :meth:`Ingest.serve` then plays the destination's part: it accepts the
presentation contexts the destination accepts (``tunnel_core.dicom.negotiation``; what it learned, or the
configured ones before it learned anything), answers C-ECHO, and for each C-STORE streams the dataset into
a spool entry as its fragments arrive, never holding it whole. The C-STORE-RSP is sent only after the
entry's commit returned (fdatasync, rename, directory fsync): success means durable. A full spool
(``SpoolFull``: the spool's limits, free space, ENOSPC) answers 0xA700 out of resources; any other disk error
0x0110 processing failure; the dataset's remaining fragments are read and dropped so the association goes
on, and the next instance is tried afresh (space may have come back).

Disk work runs in worker threads, in batches of ``WRITE_BATCH`` bytes, one batch at a time per
association: while a batch is being written the association is not read, so a slow disk slows the
modality's TCP window and nothing piles up in memory. The first ``PEEK_BYTES`` of each dataset are held
until the Study Instance UID is read from them (``tunnel_core.dicom.dataset``), because the entry's record,
written first, carries the study's opaque key.

Outcomes, for the association's log line: ``completed`` (released), ``aborted:by-caller``,
``aborted:socket-closed``, ``aborted:idle-timeout``, ``aborted:protocol-error``, ``aborted:bad-command``,
``aborted:unsupported-command``. Nothing here logs a UID: the log names the association, AE titles and
counts only.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

from tunnel_agent.config import AgentDestination
from tunnel_agent.spool.entryfile import SpoolRecord
from tunnel_agent.spool.errors import SpoolError, SpoolFull
from tunnel_agent.spool.store import Spool, SpoolWriter
from tunnel_agent.spool.studykey import StudyKeys
from tunnel_agent.version import __version__
from tunnel_core.dicom import association as ua
from tunnel_core.dicom.dataset import STUDY_INSTANCE_UID, peek_elements
from tunnel_core.dicom.dimse import CEchoRQ, CEchoRSP, CStoreRQ, CStoreRSP, Status, decode_command, encode_command
from tunnel_core.dicom.negotiation import Acceptable, answer_contexts
from tunnel_core.dicom.pdu import AssociateAC, AssociateRQ, AsyncOperationsWindow, RoleSelection, UserInformation
from tunnel_core.dicom.uids import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_PREFIX
from tunnel_core.errors import AssociationError, DatasetError, DimseError
from tunnel_link.channels import ChannelClosed, PipeChannel
from tunnel_link.dicomconn import DicomConnection
from tunnel_link.pipe import Pipe

__all__ = ["Ingest", "IngestLimits"]

log = logging.getLogger("agent.spool")

PEEK_BYTES = 64 * 1024
WRITE_BATCH = 1024 * 1024


@dataclass(frozen=True, slots=True)
class IngestLimits:
    max_pdu: int = 256 * 1024  # the P-DATA-TF body we advertise and accept
    artim_timeout: float = 10.0  # seconds for the rest of the A-ASSOCIATE-RQ
    idle_timeout: float = 300.0  # seconds a modality may stay silent inside an association


class Ingest:
    """Build once with the spool, the spool destinations by called AE title and what each accepts (by
    destination name); the listener calls :meth:`serve` per association. ``on_commit(destination)``
    is called after each durable instance (the forwarder's wake-up)."""

    def __init__(self, spool: Spool, destinations: Mapping[str, AgentDestination],
                 acceptable: Callable[[str], Acceptable], *, study_keys: StudyKeys,
                 on_commit: Callable[[str], None] = lambda destination: None,
                 limits: IngestLimits = IngestLimits(), clock: Callable[[], float] = time.time) -> None:
        self.spool = spool
        self.destinations = dict(destinations)
        self.acceptable = acceptable
        self.study_keys = study_keys
        self.on_commit = on_commit
        self.limits = limits
        self.clock = clock

    def wants(self, called_ae: str) -> bool:
        return called_ae in self.destinations

    async def serve(self, pipe: Pipe, first: bytes, label: str) -> tuple[str, int, int]:
        """Answer one association whose first bytes (the sniffed A-ASSOCIATE-RQ and what followed) are
        ``first``; returns (outcome, bytes from the caller, bytes to it). Never raises for peer faults."""
        conn = DicomConnection(PipeChannel(pipe), ua.Association(ua.Role.ACCEPTOR, max_pdu_receive=self.limits.max_pdu))
        outcome = "aborted:protocol-error"
        session: _Session | None = None
        try:
            conn.feed(first)
            event = await conn.next_event(self.limits.artim_timeout)
            if not isinstance(event, ua.AssociateRequested):
                raise AssociationError("no A-ASSOCIATE-RQ", reason=ua.UNEXPECTED_PDU)
            destination = self.destinations[event.rq.called_ae]
            conn.association.accept(self._answer(event.rq, destination))
            await conn.flush()
            session = _Session(self, conn, destination, event.rq, label)
            outcome = await session.run()
        except AssociationError:
            outcome = "aborted:protocol-error"
        except ChannelClosed:
            outcome = "aborted:socket-closed"
        except TimeoutError:
            outcome = "aborted:idle-timeout"
            await conn.abort()
        finally:
            if session is not None:
                await session.drop_instance()
            pipe.close()
        return outcome, conn.bytes_in, conn.bytes_out

    def _answer(self, rq: AssociateRQ, destination: AgentDestination) -> AssociateAC:
        results = answer_contexts(rq.contexts, self.acceptable(destination.name))
        user = UserInformation(
            implementation_class_uid=IMPLEMENTATION_CLASS_UID,
            implementation_version_name=(IMPLEMENTATION_VERSION_PREFIX + __version__)[:16],
            # One operation at a time, whatever was asked (PS3.7 D.3.3.3: the acceptor may lower it).
            async_window=AsyncOperationsWindow(1, 1) if rq.user.async_window else None,
            # We are the SCP of what we accept, never an SCU on this association.
            roles=tuple(RoleSelection(r.sop_class_uid, r.scu, False) for r in rq.user.roles),
        )
        return AssociateAC(rq.called_ae, rq.calling_ae, results, user)


class _Session:
    """The messages of one accepted association."""

    def __init__(self, ingest: Ingest, conn: DicomConnection, destination: AgentDestination, rq: AssociateRQ,
                 label: str) -> None:
        self.ingest = ingest
        self.conn = conn
        self.destination = destination
        self.rq = rq
        self.label = label
        self.abstract = {c.id: c.abstract_syntax for c in rq.contexts}
        self.instance: _Instance | None = None

    async def run(self) -> str:
        while True:
            event = await self.conn.next_event(self.ingest.limits.idle_timeout)
            if self.conn.association.state is ua.State.CLOSED and not isinstance(event, ua.Aborted):
                continue  # a batch that ended in the caller's A-ABORT: what came before it is void
            if isinstance(event, ua.CommandReceived):
                outcome = await self._command(event)
                if outcome is not None:
                    return outcome
            elif isinstance(event, ua.DatasetFragment):
                if self.instance is None:  # a dataset after a command that has none
                    await self.conn.abort(2, ua.UNEXPECTED_PARAMETER)
                    return "aborted:protocol-error"
                await self.instance.add(event.data, last=event.last)
                if event.last:
                    await self._respond_store()
            elif isinstance(event, ua.ReleaseRequested):
                self.conn.association.release_response()
                await self.conn.flush()
                return "completed"
            elif isinstance(event, ua.Aborted):
                return "aborted:by-caller"
            else:
                await self.conn.abort(2, ua.UNEXPECTED_PDU)
                return "aborted:protocol-error"

    async def _command(self, event: ua.CommandReceived) -> str | None:
        if self.instance is not None:  # a new command while the C-STORE's dataset was still due
            await self.conn.abort(2, ua.UNEXPECTED_PARAMETER)
            return "aborted:protocol-error"
        try:
            command = decode_command(event.command)
        except DimseError as exc:
            log.info("assoc=%s aborted: bad command set: %s", self.label, exc)
            await self.conn.abort(2, ua.INVALID_PARAMETER)
            return "aborted:bad-command"
        if isinstance(command, CEchoRQ):
            reply = CEchoRSP(command.message_id, Status.SUCCESS, command.affected_sop_class_uid)
            self.conn.association.send_command(event.context_id, encode_command(reply))
            await self.conn.flush()
            return None
        if isinstance(command, CStoreRQ):
            self.instance = self._begin(event.context_id, command)
            return None
        log.info("assoc=%s aborted: %s is not served by a spool destination", self.label, command.describe())
        await self.conn.abort(2, 0)
        return "aborted:unsupported-command"

    def _begin(self, context_id: int, command: CStoreRQ) -> _Instance:
        syntax = self.conn.association.accepted_contexts.get(context_id, "")
        record = SpoolRecord(
            destination=self.destination.name, calling_ae=self.rq.calling_ae, called_ae=self.rq.called_ae,
            sop_class_uid=command.affected_sop_class_uid, sop_instance_uid=command.affected_sop_instance_uid,
            transfer_syntax=syntax, study_key="", received=self.ingest.clock())
        instance = _Instance(self.ingest, context_id, command, record)
        if self.abstract.get(context_id) != command.affected_sop_class_uid:
            instance.failure = Status.SOP_CLASS_NOT_SUPPORTED  # not the context's SOP class: never stored
        return instance

    async def _respond_store(self) -> None:
        instance, self.instance = self.instance, None
        assert instance is not None
        status = instance.failure if instance.failure is not None else Status.SUCCESS
        if status == Status.SUCCESS:
            self.ingest.on_commit(self.destination.name)
        command = instance.command
        reply = CStoreRSP(command.message_id, status, command.affected_sop_class_uid, command.affected_sop_instance_uid)
        self.conn.association.send_command(instance.context_id, encode_command(reply))
        await self.conn.flush()

    async def drop_instance(self) -> None:
        if self.instance is not None:
            await self.instance.discard()
            self.instance = None


class _Instance:
    """One C-STORE's dataset on its way into the spool."""

    def __init__(self, ingest: Ingest, context_id: int, command: CStoreRQ, record: SpoolRecord) -> None:
        self.ingest = ingest
        self.context_id = context_id
        self.command = command
        self.record = record
        self.failure: int | None = None
        self.writer: SpoolWriter | None = None
        self.pending: list[bytes] = []
        self.pending_bytes = 0

    async def add(self, data: bytes, *, last: bool) -> None:
        if self.failure is not None:
            return  # read and dropped: the association goes on
        self.pending.append(data)
        self.pending_bytes += len(data)
        try:
            if self.writer is None and (self.pending_bytes >= PEEK_BYTES or last):
                record = _with_study(self.record, b"".join(self.pending), self.ingest.study_keys)
                self.writer = await asyncio.to_thread(self.ingest.spool.begin, record)
            if self.writer is not None and (self.pending_bytes >= WRITE_BATCH or last):
                batch, self.pending, self.pending_bytes = b"".join(self.pending), [], 0
                await asyncio.to_thread(self.writer.write, batch)
            if last and self.writer is not None:
                writer, self.writer = self.writer, None
                await asyncio.to_thread(writer.commit)
        except SpoolError as exc:
            self.failure = Status.OUT_OF_RESOURCES if isinstance(exc, SpoolFull) else Status.PROCESSING_FAILURE
            self.pending, self.pending_bytes, self.writer = [], 0, None  # the spool discarded the writer
            log.warning("spool destination %s refused an instance: %s", self.record.destination, exc)

    async def discard(self) -> None:
        if self.writer is not None:
            writer, self.writer = self.writer, None
            await asyncio.to_thread(writer.discard)


def _with_study(record: SpoolRecord, head: bytes, keys: StudyKeys) -> SpoolRecord:
    """The record with its study's opaque key, read from the dataset's first bytes ("" when unknown)."""
    try:
        peek = peek_elements(head, record.transfer_syntax, [STUDY_INSTANCE_UID])
    except DatasetError:
        return record
    uid = peek.values.get(STUDY_INSTANCE_UID)
    if not uid:
        return record
    return replace(record, study_key=keys.key(uid))
