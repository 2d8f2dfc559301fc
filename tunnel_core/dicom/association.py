"""The upper-layer protocol machine of one DICOM association, either role (PS3.8 §9.2), sans-IO.

Theory of operation
-------------------
``Association`` is fed the peer's bytes (``receive_data``) and returns events; the caller answers with
``request``/``accept``/``reject``/``send_command``/``send_dataset``/``release``/``release_response``/
``abort`` and writes whatever ``data_to_send`` returns. Framing is ``PduReader``'s: every limit is checked
on a PDU's header before its body is buffered, a P-DATA-TF against the maximum length this side advertised
(``max_pdu_receive``, which ``request``/``accept`` write into the user information), every other PDU
against ``max_associate_pdu``.

The state is an enum, its transitions a table keyed by (state, input), one per role. The states are those
of PS3.8 Table 9-10 that the upper layer sees (the transport's are the adapter's): a requestor starts
``IDLE`` and waits in ``AWAITING_ASSOCIATE_AC``; an acceptor starts in ``AWAITING_ASSOCIATE_RQ`` and
answers from ``AWAITING_LOCAL_RESPONSE``; both then are ``ESTABLISHED`` until a release, a reject or an
abort leaves them ``CLOSED``, which is final. A local call with no transition raises ``UsageError`` and
changes nothing. A PDU with no transition (e.g. P-DATA-TF before the A-ASSOCIATE-AC) raises
``AssociationError`` carrying the A-ABORT to send (source 2, reason 2), and so does every other fault of
the peer's, with the reason of PS3.8 §9.3.8: 1 unrecognized PDU, 4 unrecognized PDU parameter (an item
type where it is not allowed), 5 unexpected PDU parameter (a PDV out of sequence), 6 invalid PDU parameter
value (a malformed or over-long PDU, a PDV on a context that was not accepted, a command set over
``max_command_bytes``, an A-ASSOCIATE-AC that answers a context that was not proposed or accepts a
transfer syntax that was not offered). The machine is then ``CLOSED``: write ``exc.abort_pdu`` and close
the transport. Events of the same ``receive_data`` call before the fault are dropped with it. One
exception: a whole A-ASSOCIATE-RQ whose called or calling AE title is not an AE title raises
``InvalidAeTitle`` (from the sniffer) unchanged, so the acceptor can answer ``AssociateRJ.from_reason(
exc.reason)`` as the tunnel does elsewhere; send it with ``sniffer.associate_reject``, then close.

P-DATA. A message is a command set, then, if the command says so, a dataset, on one presentation context.
The command's PDVs are collected (up to ``max_command_bytes``, checked before each fragment is added) and
delivered whole as ``CommandReceived``; a dataset is streamed, one ``DatasetFragment`` per PDV, as soon as
its PDU is in, and never held. The machine checks the order of fragments, in both directions: a dataset
only right after a complete command and on its context, a command only when no dataset is under way, every
fragment of a message on the message's context. It does not read the command set, so it cannot know
whether a command announces a dataset (0000,0800): a command may follow a command, and a dataset may follow
any command. The DIMSE layer above holds the command and is the one that tells a missing or unexpected
dataset (it sees the next ``CommandReceived`` or ``DatasetFragment``). Neither side may release in the
middle of a message.

Sending. ``send_command`` and ``send_dataset`` cut their data into P-DATA-TF PDUs of one PDV each, no
larger than the peer's maximum length (from its A-ASSOCIATE-RQ or -AC; 0 or absent means unlimited, which
is capped at ``max_pdu_send``). Nothing is sent before the association is established, and nothing after
``release`` (the peer may still send until it answers). After the peer's A-RELEASE-RQ this side may
finish sending, then calls ``release_response``.

Release collision (PS3.8 §9.2.3, states Sta9-Sta12): both sides sent A-RELEASE-RQ. Each side then gets
``ReleaseRequested(collision=True)`` and calls ``release_response`` as usual. The requestor's A-RELEASE-RP
goes out at once; the acceptor's waits, as the standard orders, until the requestor's A-RELEASE-RP has
arrived (``release_response`` before that is remembered). Both end with ``ReleaseConfirmed`` and
``CLOSED``.

Aborts discard whatever was queued and not yet taken by ``data_to_send``. No timers here: the adapter
bounds the waits (ARTIM) and aborts.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from enum import Enum
from types import MappingProxyType

from tunnel_core.dicom.pdu import (
    PDV_OVERHEAD,
    Abort,
    AssociateAC,
    AssociateRJ,
    AssociateRQ,
    ContextResult,
    PDataTF,
    Pdu,
    PduReader,
    ReleaseRP,
    ReleaseRQ,
    UserInformation,
    encode,
    encode_pdv,
)
from tunnel_core.dicom.sniffer import DEFAULT_MAX_ASSOCIATE_RQ
from tunnel_core.errors import (
    AssociationError,
    DicomError,
    InvalidAeTitle,
    PduTooLarge,
    UnrecognizedPdu,
    UnrecognizedPduParameter,
    UsageError,
)

__all__ = [
    "DEFAULT_MAX_COMMAND", "DEFAULT_MAX_PDU_RECEIVE", "DEFAULT_MAX_PDU_SEND", "Aborted", "AssociateAccepted",
    "AssociateRejected", "AssociateRequested", "Association", "AssociationError", "CommandReceived",
    "DatasetFragment", "Event", "Input", "ReleaseConfirmed", "ReleaseRequested", "Role", "State",
    "TRANSITIONS",
]

KIB = 1024
DEFAULT_MAX_PDU_RECEIVE = 256 * KIB  # the P-DATA-TF body we advertise and accept
DEFAULT_MAX_PDU_SEND = 256 * KIB  # the largest P-DATA-TF body we send to a peer that announced no limit
DEFAULT_MAX_COMMAND = 64 * KIB  # a command set is a few hundred bytes
MIN_PDU = PDV_OVERHEAD + 1  # a P-DATA-TF body that carries at least one byte of data

# A-ABORT reasons (PS3.8 §9.3.8) for a provider-initiated abort
UNRECOGNIZED_PDU, UNEXPECTED_PDU, UNRECOGNIZED_PARAMETER = 1, 2, 4
UNEXPECTED_PARAMETER, INVALID_PARAMETER = 5, 6


class Role(Enum):
    REQUESTOR = "requestor"
    ACCEPTOR = "acceptor"


class State(Enum):
    IDLE = "idle"  # requestor: nothing sent yet
    AWAITING_ASSOCIATE_RQ = "awaiting-associate-rq"  # acceptor (PS3.8 Sta2)
    AWAITING_ASSOCIATE_AC = "awaiting-associate-ac"  # requestor (Sta5)
    AWAITING_LOCAL_RESPONSE = "awaiting-local-response"  # acceptor: accept or reject (Sta3)
    ESTABLISHED = "established"  # Sta6
    AWAITING_RELEASE_RP = "awaiting-release-rp"  # we sent A-RELEASE-RQ (Sta7)
    AWAITING_LOCAL_RELEASE_RESPONSE = "awaiting-local-release-response"  # the peer did (Sta8)
    COLLISION_REQUESTOR_TO_RESPOND = "collision-requestor-to-respond"  # Sta9
    COLLISION_REQUESTOR_AWAITING_RP = "collision-requestor-awaiting-rp"  # Sta11
    COLLISION_ACCEPTOR_AWAITING_RP = "collision-acceptor-awaiting-rp"  # Sta10
    COLLISION_ACCEPTOR_RESPONDED = "collision-acceptor-responded"  # Sta10, our response held back
    COLLISION_ACCEPTOR_TO_RESPOND = "collision-acceptor-to-respond"  # Sta12
    CLOSED = "closed"  # released, rejected or aborted: final


class Input(Enum):
    REQUEST = "request"
    ACCEPT = "accept"
    REJECT = "reject"
    SEND_DATA = "send-data"
    RELEASE = "release"
    RELEASE_RESPONSE = "release-response"
    ABORT = "abort"
    RECV_RQ = "A-ASSOCIATE-RQ"
    RECV_AC = "A-ASSOCIATE-AC"
    RECV_RJ = "A-ASSOCIATE-RJ"
    RECV_DATA = "P-DATA-TF"
    RECV_RELEASE_RQ = "A-RELEASE-RQ"
    RECV_RELEASE_RP = "A-RELEASE-RP"
    RECV_ABORT = "A-ABORT"


_S, _I = State, Input
_COMMON: dict[tuple[State, Input], State] = {
    (_S.ESTABLISHED, _I.SEND_DATA): _S.ESTABLISHED,
    (_S.ESTABLISHED, _I.RECV_DATA): _S.ESTABLISHED,
    (_S.ESTABLISHED, _I.RELEASE): _S.AWAITING_RELEASE_RP,
    (_S.ESTABLISHED, _I.RECV_RELEASE_RQ): _S.AWAITING_LOCAL_RELEASE_RESPONSE,
    (_S.AWAITING_RELEASE_RP, _I.RECV_DATA): _S.AWAITING_RELEASE_RP,
    (_S.AWAITING_RELEASE_RP, _I.RECV_RELEASE_RP): _S.CLOSED,
    (_S.AWAITING_LOCAL_RELEASE_RESPONSE, _I.SEND_DATA): _S.AWAITING_LOCAL_RELEASE_RESPONSE,
    (_S.AWAITING_LOCAL_RELEASE_RESPONSE, _I.RELEASE_RESPONSE): _S.CLOSED,
}
_REQUESTOR = {
    (_S.IDLE, _I.REQUEST): _S.AWAITING_ASSOCIATE_AC,
    (_S.AWAITING_ASSOCIATE_AC, _I.RECV_AC): _S.ESTABLISHED,
    (_S.AWAITING_ASSOCIATE_AC, _I.RECV_RJ): _S.CLOSED,
    (_S.AWAITING_RELEASE_RP, _I.RECV_RELEASE_RQ): _S.COLLISION_REQUESTOR_TO_RESPOND,
    (_S.COLLISION_REQUESTOR_TO_RESPOND, _I.RELEASE_RESPONSE): _S.COLLISION_REQUESTOR_AWAITING_RP,
    (_S.COLLISION_REQUESTOR_AWAITING_RP, _I.RECV_RELEASE_RP): _S.CLOSED,
}
_ACCEPTOR = {
    (_S.AWAITING_ASSOCIATE_RQ, _I.RECV_RQ): _S.AWAITING_LOCAL_RESPONSE,
    (_S.AWAITING_LOCAL_RESPONSE, _I.ACCEPT): _S.ESTABLISHED,
    (_S.AWAITING_LOCAL_RESPONSE, _I.REJECT): _S.CLOSED,
    (_S.AWAITING_RELEASE_RP, _I.RECV_RELEASE_RQ): _S.COLLISION_ACCEPTOR_AWAITING_RP,
    (_S.COLLISION_ACCEPTOR_AWAITING_RP, _I.RECV_RELEASE_RP): _S.COLLISION_ACCEPTOR_TO_RESPOND,
    (_S.COLLISION_ACCEPTOR_AWAITING_RP, _I.RELEASE_RESPONSE): _S.COLLISION_ACCEPTOR_RESPONDED,
    (_S.COLLISION_ACCEPTOR_RESPONDED, _I.RECV_RELEASE_RP): _S.CLOSED,
    (_S.COLLISION_ACCEPTOR_TO_RESPOND, _I.RELEASE_RESPONSE): _S.CLOSED,
}


def _with_aborts(table: dict[tuple[State, Input], State]) -> Mapping[tuple[State, Input], State]:
    """``table`` plus an A-ABORT, sent or received, from each of its states but CLOSED."""
    states = {source for source, _what in table} - {_S.CLOSED}
    aborts = {(state, what): _S.CLOSED for state in states for what in (_I.ABORT, _I.RECV_ABORT)}
    return MappingProxyType(table | aborts)


TRANSITIONS: Mapping[Role, Mapping[tuple[State, Input], State]] = MappingProxyType({
    Role.REQUESTOR: _with_aborts(_COMMON | _REQUESTOR),
    Role.ACCEPTOR: _with_aborts(_COMMON | _ACCEPTOR),
})
_RECEIVED: dict[type, Input] = {
    AssociateRQ: _I.RECV_RQ, AssociateAC: _I.RECV_AC, AssociateRJ: _I.RECV_RJ, PDataTF: _I.RECV_DATA,
    ReleaseRQ: _I.RECV_RELEASE_RQ, ReleaseRP: _I.RECV_RELEASE_RP, Abort: _I.RECV_ABORT,
}
# A reader or decoder fault -> the A-ABORT reason; the first class that matches wins
_FAULT_REASONS: tuple[tuple[type[DicomError], int], ...] = (
    (UnrecognizedPdu, UNRECOGNIZED_PDU), (UnrecognizedPduParameter, UNRECOGNIZED_PARAMETER),
    (PduTooLarge, INVALID_PARAMETER), (DicomError, INVALID_PARAMETER),
)


# --- events ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AssociateRequested:
    """Acceptor: the peer asks. Answer with ``accept`` or ``reject`` (or ``abort``)."""

    rq: AssociateRQ


@dataclass(frozen=True, slots=True)
class AssociateAccepted:
    """Requestor: the association is established; ``accepted_contexts`` says on which contexts to send."""

    ac: AssociateAC


@dataclass(frozen=True, slots=True)
class AssociateRejected:
    rj: AssociateRJ


@dataclass(frozen=True, slots=True)
class CommandReceived:
    """A whole command set (group 0000, implicit VR little endian), its fragments joined."""

    context_id: int
    command: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class DatasetFragment:
    """One PDV of a dataset, as it came; ``last`` on the dataset's final fragment. May hold patient data:
    kept out of ``repr``."""

    context_id: int
    data: bytes = field(repr=False)
    last: bool


@dataclass(frozen=True, slots=True)
class ReleaseRequested:
    """The peer asks to release (``collision``: while our own A-RELEASE-RQ was out). Finish sending if
    needed, then call ``release_response``."""

    collision: bool = False


@dataclass(frozen=True, slots=True)
class ReleaseConfirmed:
    """The release is complete on the peer's side; the association is ``CLOSED`` once we responded too."""


@dataclass(frozen=True, slots=True)
class Aborted:
    """The peer sent A-ABORT; the association is ``CLOSED``. Close the transport."""

    source: int
    reason: int


Event = (AssociateRequested | AssociateAccepted | AssociateRejected | CommandReceived | DatasetFragment
         | ReleaseRequested | ReleaseConfirmed | Aborted)


# --- the order of a message's fragments -----------------------------------------------------------------


class _Phase(Enum):
    BETWEEN = "between messages"
    COMMAND = "in a command set"
    AFTER_COMMAND = "after a command set"  # its dataset may follow, or the next command
    DATASET = "in a dataset"


_P = _Phase
# (phase, is a command fragment) -> (phase after a fragment, after the last fragment, same context as before)
_FRAGMENTS: dict[tuple[_Phase, bool], tuple[_Phase, _Phase, bool]] = {
    (_P.BETWEEN, True): (_P.COMMAND, _P.AFTER_COMMAND, False),
    (_P.AFTER_COMMAND, True): (_P.COMMAND, _P.AFTER_COMMAND, False),
    (_P.COMMAND, True): (_P.COMMAND, _P.AFTER_COMMAND, True),
    (_P.AFTER_COMMAND, False): (_P.DATASET, _P.BETWEEN, True),
    (_P.DATASET, False): (_P.DATASET, _P.BETWEEN, True),
}


@dataclass(slots=True)
class _MessageOrder:
    """Where one direction stands in its current message."""

    phase: _Phase = _Phase.BETWEEN
    context_id: int = 0

    @property
    def between_messages(self) -> bool:
        return self.phase in (_Phase.BETWEEN, _Phase.AFTER_COMMAND)

    def step(self, context_id: int, is_command: bool, last: bool) -> str | None:
        """Take one fragment; or, changing nothing, say why it is out of order."""
        kind = "command" if is_command else "dataset"
        rule = _FRAGMENTS.get((self.phase, is_command))
        if rule is None:
            return f"a {kind} fragment {self.phase.value}"
        following, after_last, same_context = rule
        if same_context and context_id != self.context_id:
            return f"a {kind} fragment on context {context_id} {self.phase.value} on context {self.context_id}"
        self.phase, self.context_id = (after_last if last else following), context_id
        return None


# --- the machine ----------------------------------------------------------------------------------------


class Association:
    """The sans-IO state of one association. See the module docstring for the calling contract.

    Limits, all checked before anything is buffered: ``max_pdu_receive`` is the P-DATA-TF body this side
    advertises and accepts, ``max_associate_pdu`` the largest other PDU (header included),
    ``max_command_bytes`` the largest command set. ``max_pdu_send`` caps what is sent to a peer that
    announced no maximum length.
    """

    def __init__(self, role: Role, *, max_pdu_receive: int = DEFAULT_MAX_PDU_RECEIVE,
                 max_associate_pdu: int = DEFAULT_MAX_ASSOCIATE_RQ, max_command_bytes: int = DEFAULT_MAX_COMMAND,
                 max_pdu_send: int = DEFAULT_MAX_PDU_SEND) -> None:
        for name, value in (("max_pdu_receive", max_pdu_receive), ("max_pdu_send", max_pdu_send)):
            if not MIN_PDU <= value <= 0xFFFFFFFF:
                raise ValueError(f"{name} must be between {MIN_PDU} and 2**32 - 1, not {value}")
        self.role = role
        self.state = State.IDLE if role is Role.REQUESTOR else State.AWAITING_ASSOCIATE_RQ
        self.max_pdu_receive = max_pdu_receive
        self.max_pdu_send = max_pdu_send
        self.max_command_bytes = max_command_bytes
        self.rq: AssociateRQ | None = None  # the A-ASSOCIATE-RQ sent or received
        self.ac: AssociateAC | None = None  # the A-ASSOCIATE-AC sent or received
        self._table = TRANSITIONS[role]
        self._reader = PduReader(max_pdu_receive, max_associate_pdu)
        self._out: list[bytes] = []
        self._accepted: dict[int, str] = {}
        self._peer_max = 0  # the largest P-DATA-TF body we send, once established
        self._incoming = _MessageOrder()
        self._outgoing = _MessageOrder()
        self._command = bytearray()

    # --- queries --------------------------------------------------------------------------------------

    @property
    def accepted_contexts(self) -> Mapping[int, str]:
        """Accepted presentation context id -> its transfer syntax (empty until established)."""
        return MappingProxyType(self._accepted)

    @property
    def max_send_pdu(self) -> int:
        """The largest P-DATA-TF body sent to the peer (0 until the association is established)."""
        return self._peer_max

    def data_to_send(self) -> bytes:
        """The PDUs queued for the peer, in order, removed from the queue."""
        out = b"".join(self._out)
        self._out.clear()
        return out

    # --- local actions --------------------------------------------------------------------------------

    def request(self, rq: AssociateRQ) -> None:
        """Requestor, first call: send the A-ASSOCIATE-RQ, then feed the peer's bytes until
        ``AssociateAccepted`` or ``AssociateRejected``. ``rq.user.max_pdu_length`` is set to
        ``max_pdu_receive`` when None; any other value must equal it (else ``UsageError``)."""
        following = self._next(Input.REQUEST)
        rq = replace(rq, user=self._advertised(rq.user))
        data = encode(rq)
        self.rq, self.state = rq, following
        self._out.append(data)

    def accept(self, ac: AssociateAC) -> None:
        """Acceptor, after ``AssociateRequested``: send the A-ASSOCIATE-AC; the association is established.
        ``ac`` must answer only contexts the request proposed, each accepted one with a transfer syntax it
        offered (else ``UsageError``); its maximum length is filled in as for ``request``."""
        following = self._next(Input.ACCEPT)
        assert self.rq is not None
        problem = _answer_problem(self.rq, ac)
        if problem:
            raise UsageError(problem)
        ac = replace(ac, user=self._advertised(ac.user))
        data = encode(ac)
        self.ac, self.state = ac, following
        self._out.append(data)
        self._establish(ac, self.rq.user)

    def reject(self, rj: AssociateRJ) -> None:
        """Acceptor, after ``AssociateRequested``: send the A-ASSOCIATE-RJ; the association is ``CLOSED``.
        Close the transport once the bytes are written."""
        following = self._next(Input.REJECT)
        data = encode(rj)
        self.state = following
        self._out.append(data)

    def send_command(self, context_id: int, data: bytes | memoryview) -> None:
        """Send a whole command set on an accepted context. Then, if it announces one, the dataset with
        ``send_dataset``; or the next command."""
        following = self._sending(context_id, is_command=True, last=True)
        self._queue_pdvs(context_id, True, memoryview(data).cast("B"), True)
        self.state = following

    def send_dataset(self, context_id: int, data: bytes | memoryview, *, last: bool) -> None:
        """Send (a part of) the dataset of the command just sent, on its context; ``last=True`` on the final
        part ends the message. Any split works: the PDUs are cut to the peer's maximum length anyway."""
        view = memoryview(data).cast("B")
        following = self._sending(context_id, is_command=False, last=last)
        if view or last:  # an empty part that does not end the dataset sends nothing
            self._queue_pdvs(context_id, False, view, last)
        self.state = following

    def release(self) -> None:
        """Send A-RELEASE-RQ (between messages only). Keep feeding the peer's bytes: its P-DATA may still
        come, then ``ReleaseConfirmed`` (or ``ReleaseRequested(collision=True)``)."""
        following = self._next(Input.RELEASE)
        self._check_between_messages()
        self.state = following
        self._out.append(encode(ReleaseRQ()))

    def release_response(self) -> None:
        """After ``ReleaseRequested`` (and after finishing the message being sent, if any): send
        A-RELEASE-RP. Without a collision the association is then ``CLOSED``."""
        following = self._next(Input.RELEASE_RESPONSE)
        self._check_between_messages()
        self.state = following
        if following is not State.COLLISION_ACCEPTOR_RESPONDED:
            self._out.append(encode(ReleaseRP()))

    def abort(self, source: int = 0, reason: int = 0) -> None:
        """Send A-ABORT in any state but ``CLOSED``, dropping what was queued and not yet taken; the
        association is ``CLOSED``. ``source`` 0 (service user: ``reason`` must be 0) or 2 (service provider:
        ``reason`` one of PS3.8 §9.3.8's, 0-2 or 4-6)."""
        following = self._next(Input.ABORT)
        if not ((source == 0 and reason == 0) or (source == 2 and reason in (0, 1, 2, 4, 5, 6))):
            raise UsageError(f"A-ABORT source {source} with reason {reason} is not one of PS3.8 §9.3.8")
        self.state = following
        self._out = [encode(Abort(source, reason))]

    # --- receiving ------------------------------------------------------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview) -> list[Event]:
        """Feed what the peer sent, in any chunking; returns the events it completed, in order. ``state`` is
        already the state after the last of them: a batch may end the association (a command, then an
        A-ABORT), so check for ``CLOSED`` before answering an event. Raises ``AssociationError`` (write
        ``exc.abort_pdu``, close) or, for an acceptor's first PDU only, ``InvalidAeTitle`` (reject, close).
        Once ``CLOSED``, data is ignored."""
        events: list[Event] = []
        if self.state is State.CLOSED:
            return events
        pdus = self._reader.pdus(data)
        try:
            for pdu in pdus:
                events += self._receive(pdu)
                if self.state is State.CLOSED:
                    break
        except AssociationError:
            raise
        except InvalidAeTitle:
            if self.state is not State.AWAITING_ASSOCIATE_RQ:
                raise self._fault(INVALID_PARAMETER, "an A-ASSOCIATE-RQ with an invalid AE title") from None
            self._close()
            raise
        except DicomError as exc:
            reason = next(reason for kind, reason in _FAULT_REASONS if isinstance(exc, kind))
            raise self._fault(reason, str(exc)) from exc
        finally:
            pdus.close()
        return events

    def _receive(self, pdu: Pdu) -> list[Event]:
        what = _RECEIVED[type(pdu)]
        following = self._table.get((self.state, what))
        if following is None:
            raise self._fault(UNEXPECTED_PDU, f"{what.value} in state {self.state.value}")
        events = self._HANDLERS[what](self, pdu)
        self.state = following
        return events

    def _on_rq(self, rq: AssociateRQ) -> list[Event]:
        self._check_peer_max(rq.user)
        self.rq = rq
        return [AssociateRequested(rq)]

    def _on_ac(self, ac: AssociateAC) -> list[Event]:
        assert self.rq is not None
        problem = _answer_problem(self.rq, ac)
        if problem:
            raise self._fault(INVALID_PARAMETER, problem)
        self._check_peer_max(ac.user)
        self.ac = ac
        self._establish(ac, ac.user)
        return [AssociateAccepted(ac)]

    def _on_rj(self, rj: AssociateRJ) -> list[Event]:
        return [AssociateRejected(rj)]

    def _on_data(self, pdu: PDataTF) -> list[Event]:
        events: list[Event] = []
        for pdv in pdu.pdvs:
            if pdv.context_id not in self._accepted:
                raise self._fault(INVALID_PARAMETER, f"a PDV on context {pdv.context_id}, which was not accepted")
            problem = self._incoming.step(pdv.context_id, pdv.is_command, pdv.is_last)
            if problem:
                raise self._fault(UNEXPECTED_PARAMETER, f"received {problem}")
            if not pdv.is_command:
                events.append(DatasetFragment(pdv.context_id, pdv.data, pdv.is_last))
            elif self._collect_command(pdv.data, pdv.is_last):
                events.append(CommandReceived(pdv.context_id, bytes(self._command)))
                self._command.clear()
        return events

    def _collect_command(self, fragment: bytes, last: bool) -> bool:
        """Add a command fragment, within ``max_command_bytes``; True when the command is whole."""
        if len(self._command) + len(fragment) > self.max_command_bytes:
            raise self._fault(INVALID_PARAMETER, f"a command set over {self.max_command_bytes} bytes")
        self._command += fragment
        return last

    def _on_release_rq(self, _pdu: ReleaseRQ) -> list[Event]:
        self._check_peer_between_messages("A-RELEASE-RQ")
        return [ReleaseRequested(collision=self.state is State.AWAITING_RELEASE_RP)]

    def _on_release_rp(self, _pdu: ReleaseRP) -> list[Event]:
        self._check_peer_between_messages("A-RELEASE-RP")
        if self.state is State.COLLISION_ACCEPTOR_RESPONDED:
            self._out.append(encode(ReleaseRP()))  # the response held back until the requestor's came
        return [ReleaseConfirmed()]

    def _on_abort(self, abort: Abort) -> list[Event]:
        self._out.clear()
        return [Aborted(abort.source, abort.reason)]

    _HANDLERS: dict[Input, Callable[..., list[Event]]] = {
        Input.RECV_RQ: _on_rq, Input.RECV_AC: _on_ac, Input.RECV_RJ: _on_rj, Input.RECV_DATA: _on_data,
        Input.RECV_RELEASE_RQ: _on_release_rq, Input.RECV_RELEASE_RP: _on_release_rp, Input.RECV_ABORT: _on_abort,
    }

    # --- helpers --------------------------------------------------------------------------------------

    def _next(self, what: Input) -> State:
        """The state after the local action ``what``, changing nothing; ``UsageError`` if it has none."""
        following = self._table.get((self.state, what))
        if following is None:
            raise UsageError(f"{self.role.value}: {what.value} is not allowed in state {self.state.value}")
        return following

    def _sending(self, context_id: int, *, is_command: bool, last: bool) -> State:
        following = self._next(Input.SEND_DATA)
        if context_id not in self._accepted:
            raise UsageError(f"presentation context {context_id} was not accepted")
        problem = self._outgoing.step(context_id, is_command, last)
        if problem:
            raise UsageError(f"cannot send {problem}")
        return following

    def _queue_pdvs(self, context_id: int, is_command: bool, data: memoryview, last: bool) -> None:
        step = self._peer_max - PDV_OVERHEAD
        starts = range(0, len(data), step) if data else [0]
        for start in starts:
            end = min(len(data), start + step)
            self._out.append(encode_pdv(context_id, is_command, last and end == len(data), data[start:end]))

    def _advertised(self, user: UserInformation) -> UserInformation:
        if user.max_pdu_length is None:
            return replace(user, max_pdu_length=self.max_pdu_receive)
        if user.max_pdu_length != self.max_pdu_receive:
            raise UsageError(f"the maximum length advertised ({user.max_pdu_length}) must be max_pdu_receive "
                             f"({self.max_pdu_receive}), which is what this side accepts")
        return user

    def _establish(self, ac: AssociateAC, peer: UserInformation) -> None:
        self._accepted = {cx.id: cx.transfer_syntax for cx in ac.contexts if cx.result is ContextResult.ACCEPTANCE}
        announced = peer.max_pdu_length or 0
        self._peer_max = min(announced, self.max_pdu_send) if announced else self.max_pdu_send

    def _check_peer_max(self, user: UserInformation) -> None:
        if user.max_pdu_length is not None and 0 < user.max_pdu_length < MIN_PDU:
            raise self._fault(INVALID_PARAMETER, f"a maximum length of {user.max_pdu_length} carries no data")

    def _check_between_messages(self) -> None:
        if not self._outgoing.between_messages:
            raise UsageError(f"a message is being sent ({self._outgoing.phase.value}): finish it first")

    def _check_peer_between_messages(self, what: str) -> None:
        if not self._incoming.between_messages:
            raise self._fault(UNEXPECTED_PDU, f"{what} received {self._incoming.phase.value}")

    def _close(self) -> None:
        self.state = State.CLOSED
        self._out.clear()

    def _fault(self, reason: int, message: str) -> AssociationError:
        """The peer's fault: the association is CLOSED; the error carries the A-ABORT to send."""
        self._close()
        return AssociationError(message, source=2, reason=reason)


def _answer_problem(rq: AssociateRQ, ac: AssociateAC) -> str | None:
    """Why ``ac`` does not answer ``rq`` (None if it does): a context that was not proposed, or accepted
    with a transfer syntax that was not offered."""
    proposed = {cx.id: cx.transfer_syntaxes for cx in rq.contexts}
    for cx in ac.contexts:
        if cx.id not in proposed:
            return f"the A-ASSOCIATE-AC answers context {cx.id}, which was not proposed"
        if cx.result is ContextResult.ACCEPTANCE and cx.transfer_syntax not in proposed[cx.id]:
            return f"the A-ASSOCIATE-AC accepts context {cx.id} with a transfer syntax that was not offered"
    if len({cx.id for cx in ac.contexts}) != len(ac.contexts):
        return "the A-ASSOCIATE-AC answers a context twice"
    return None
