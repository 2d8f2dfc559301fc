"""Every upper-layer PDU of PS3.8 §9.3, parsed and built in full, and a bounded PDU reader.

Theory of operation
-------------------
A PDU is a 6-byte header (type, reserved, 32-bit length) and a body of exactly that length. ``decode``
takes one whole PDU and returns one of the frozen dataclasses below; ``encode`` is its inverse. For every
PDU ``p`` whose fields can be encoded, ``decode(encode(p)) == p``, and ``encode`` never produces what
``decode`` refuses.

The body is read through a ``_Cursor``, a read window: an item's length is checked against the window of
what encloses it before the item is read, and a read past the window is a ``MalformedPdu``. So no length
from the wire is trusted or allocated, and ``decode`` raises nothing but ``MalformedPdu`` and its
subclasses, whatever the bytes: ``UnrecognizedPdu`` for an unknown PDU type,
``UnrecognizedPduParameter`` for an item type that is not allowed where it stands, ``InvalidAeTitle`` for
an A-ASSOCIATE-RQ whose called or calling AE title is not one (its ``reason`` is the reject to answer).

What is accepted that a sender should not send: reserved fields are not tested (§9.3.1), the variable items
may come in any order, UIDs may carry trailing NUL or space padding (stripped), a rejected presentation
context's transfer syntax may be missing, empty or not a UID (§9.3.3.2: not tested; read as ""), an
A-ASSOCIATE-AC's AE titles (echoes, not tested) may hold any bytes (a field that is not an AE title reads
as ""), a User Identity sub-item may omit its secondary-field length. What is refused: a UID that is
empty, longer than 64 characters or not printable ASCII without spaces; a single-valued item given twice
(two parsers reading the first and the last of them would disagree about what was negotiated); bytes left
over inside an item after its fields; an even or repeated presentation context id.
User Information sub-items of a type this module does not know are kept, in order, in ``unknown``.

Encoding follows PS3.8 Annex F: UIDs are written as they are, without padding (PS3.5 §9.1 pads UIDs to an
even length "except when used for network negotiation"). Known user-information sub-items are written in
the order of PS3.7 Annex D.3.3, then the unknown ones. A field that cannot be encoded (a non-ASCII or
over-long UID, an AE title that is not one, a number out of its field's range) raises ``ValueError``.

``PduReader`` frames a byte stream into PDUs in any chunking. It checks the type on the first byte and the
announced length on the sixth, before any of the body is buffered, holds at most one incomplete PDU, and
copies each byte at most once while collecting a split PDU (a PDU that arrives whole is decoded in place).
"""

from __future__ import annotations

import re
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

from tunnel_core.codes import RejectReason
from tunnel_core.dicom.sniffer import (
    A_ABORT,
    A_ASSOCIATE_AC,
    A_ASSOCIATE_RJ,
    A_ASSOCIATE_RQ,
    A_RELEASE_RP,
    A_RELEASE_RQ,
    DEFAULT_MAX_ASSOCIATE_RQ,
    P_DATA_TF,
    PDU_HEADER,
    PDU_HEADER_SIZE,
)
from tunnel_core.dicom.sniffer import _ae as _requested_ae
from tunnel_core.errors import MalformedPdu, PduTooLarge, UnrecognizedPdu, UnrecognizedPduParameter

__all__ = [
    "DEFAULT_MAX_ASSOCIATE_RQ", "DICOM_APPLICATION_CONTEXT", "PDV", "PDV_OVERHEAD", "Abort", "AssociateAC",
    "AssociateRJ", "AssociateRQ", "AsyncOperationsWindow", "CommonExtendedNegotiation", "ContextResult",
    "ExtendedNegotiation", "PDataTF", "Pdu", "PduReader", "PresentationContext", "PresentationContextResult",
    "ReleaseRP", "ReleaseRQ", "RoleSelection", "UserIdentity", "UserIdentityResponse", "UserInformation",
    "decode", "encode", "encode_pdv",
]

DICOM_APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
PDV_OVERHEAD = 6  # the bytes of a P-DATA-TF body that are not data when it holds one PDV: length, id, header

# Item types (PS3.8 §9.3.2-9.3.3, PS3.7 Annex D.3.3)
_APPLICATION_CONTEXT = 0x10
_CONTEXT_RQ, _CONTEXT_AC = 0x20, 0x21
_ABSTRACT_SYNTAX, _TRANSFER_SYNTAX = 0x30, 0x40
_USER_INFORMATION = 0x50
_MAX_LENGTH, _IMPLEMENTATION_UID, _ASYNC_WINDOW, _ROLE = 0x51, 0x52, 0x53, 0x54
_IMPLEMENTATION_VERSION, _EXTENDED, _COMMON_EXTENDED = 0x55, 0x56, 0x57
_USER_IDENTITY, _USER_IDENTITY_RESPONSE = 0x58, 0x59

_ITEM_HEADER = struct.Struct("!BBH")
_PDV_HEADER = struct.Struct("!BBIIBB")  # PDU type, reserved, PDU length, PDV length, context id, control
_FIXED = struct.Struct("!HH16s16s32s")  # protocol version, reserved, called AE, calling AE, reserved
_UID = re.compile(rb"[\x21-\x7e]{1,64}")  # PS3.5 §9.1 says digits and dots; any printable ASCII is read
_VERSION_NAME = re.compile(rb"[\x20-\x7e]{0,16}")
_ECHO_AE = re.compile(rb"[\x20-\x5b\x5d-\x7e]{0,16}")  # an AE title (PS3.5 §6.2), or nothing

# (smallest, largest) body length of each PDU type; None: no bound but the reader's limits
_BODY_LENGTH: dict[int, tuple[int, int | None]] = {
    A_ASSOCIATE_RQ: (_FIXED.size, None), A_ASSOCIATE_AC: (_FIXED.size, None), A_ASSOCIATE_RJ: (4, 4),
    P_DATA_TF: (PDV_OVERHEAD, None), A_RELEASE_RQ: (4, 4), A_RELEASE_RP: (4, 4), A_ABORT: (4, 4),
}


# --- the PDUs -------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PresentationContext:
    """A proposed presentation context (A-ASSOCIATE-RQ item 0x20): an odd id 1-255, one abstract syntax, and
    the transfer syntaxes offered for it (at least one)."""

    id: int
    abstract_syntax: str
    transfer_syntaxes: tuple[str, ...]


class ContextResult(IntEnum):
    """Result/Reason of a presentation context in an A-ASSOCIATE-AC (PS3.8 Table 9-18)."""

    ACCEPTANCE = 0
    USER_REJECTION = 1
    NO_REASON = 2
    ABSTRACT_SYNTAX_NOT_SUPPORTED = 3
    TRANSFER_SYNTAXES_NOT_SUPPORTED = 4


_RESULTS = frozenset(ContextResult)


@dataclass(frozen=True, slots=True)
class PresentationContextResult:
    """The answer to one proposed context (A-ASSOCIATE-AC item 0x21). ``transfer_syntax`` is the one chosen
    when accepted; for any other result it is not significant and reads as "" unless a UID was sent."""

    id: int
    result: ContextResult
    transfer_syntax: str = ""


@dataclass(frozen=True, slots=True)
class AsyncOperationsWindow:
    """Maximum operations invoked / performed asynchronously (sub-item 0x53); 0 means unlimited."""

    invoked: int
    performed: int


@dataclass(frozen=True, slots=True)
class RoleSelection:
    """SCP/SCU role selection for one SOP class (sub-item 0x54): proposed in an RQ, accepted in an AC."""

    sop_class_uid: str
    scu: bool
    scp: bool


@dataclass(frozen=True, slots=True)
class ExtendedNegotiation:
    """SOP class extended negotiation (sub-item 0x56): service-class-specific bytes for one SOP class."""

    sop_class_uid: str
    info: bytes


@dataclass(frozen=True, slots=True)
class CommonExtendedNegotiation:
    """SOP class common extended negotiation (sub-item 0x57)."""

    sop_class_uid: str
    service_class_uid: str
    related: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class UserIdentity:
    """User identity negotiation (sub-item 0x58, RQ only). ``kind``: 1 username, 2 username and passcode,
    3 Kerberos, 4 SAML, 5 JWT. The fields are credentials: they are kept out of ``repr``."""

    kind: int
    response_requested: bool
    primary: bytes = field(repr=False)
    secondary: bytes = field(default=b"", repr=False)


@dataclass(frozen=True, slots=True)
class UserIdentityResponse:
    """The acceptor's answer to a user identity that asked for one (sub-item 0x59, AC only)."""

    server_response: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class UserInformation:
    """The User Information item (0x50). ``max_pdu_length`` is the largest P-DATA-TF body the sender
    receives (0: unlimited); None means the sub-item is absent. ``unknown`` holds the sub-items of other
    types as (type, body), in the order they came."""

    max_pdu_length: int | None = None
    implementation_class_uid: str | None = None
    implementation_version_name: str | None = None
    async_window: AsyncOperationsWindow | None = None
    roles: tuple[RoleSelection, ...] = ()
    extended: tuple[ExtendedNegotiation, ...] = ()
    common_extended: tuple[CommonExtendedNegotiation, ...] = ()
    user_identity: UserIdentity | None = None
    user_identity_response: UserIdentityResponse | None = None
    unknown: tuple[tuple[int, bytes], ...] = ()


@dataclass(frozen=True, slots=True)
class AssociateRQ:
    """A-ASSOCIATE-RQ (PDU type 0x01). AE titles without their padding."""

    called_ae: str
    calling_ae: str
    contexts: tuple[PresentationContext, ...]
    user: UserInformation = field(default_factory=UserInformation)
    application_context: str = DICOM_APPLICATION_CONTEXT
    protocol_version: int = 1


@dataclass(frozen=True, slots=True)
class AssociateAC:
    """A-ASSOCIATE-AC (PDU type 0x02). The AE titles echo the request's and are not tested on receipt; a
    field that is not an AE title reads as ""."""

    called_ae: str
    calling_ae: str
    contexts: tuple[PresentationContextResult, ...]
    user: UserInformation = field(default_factory=UserInformation)
    application_context: str = DICOM_APPLICATION_CONTEXT
    protocol_version: int = 1


@dataclass(frozen=True, slots=True)
class AssociateRJ:
    """A-ASSOCIATE-RJ (PDU type 0x03): result, source and reason of PS3.8 Table 9-21."""

    result: int
    source: int
    reason: int

    @classmethod
    def from_reason(cls, reason: RejectReason) -> AssociateRJ:
        return cls(*reason.value)


@dataclass(frozen=True, slots=True)
class PDV:
    """One presentation data value: a fragment of a command set or a dataset. ``data`` is kept out of
    ``repr`` (a dataset fragment can hold patient data)."""

    context_id: int
    is_command: bool
    is_last: bool
    data: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class PDataTF:
    """P-DATA-TF (PDU type 0x04): one or more PDVs."""

    pdvs: tuple[PDV, ...]


@dataclass(frozen=True, slots=True)
class ReleaseRQ:
    """A-RELEASE-RQ (PDU type 0x05)."""


@dataclass(frozen=True, slots=True)
class ReleaseRP:
    """A-RELEASE-RP (PDU type 0x06)."""


@dataclass(frozen=True, slots=True)
class Abort:
    """A-ABORT (PDU type 0x07): source 0 service user, 2 service provider; reason (PS3.8 Table 9-26) is
    significant for source 2 only."""

    source: int
    reason: int


Pdu = AssociateRQ | AssociateAC | AssociateRJ | PDataTF | ReleaseRQ | ReleaseRP | Abort


# --- reading --------------------------------------------------------------------------------------------


class _Cursor:
    """A read window ``[pos, end)`` over a PDU. Every read is checked against ``end``."""

    __slots__ = ("_buf", "pos", "end")

    def __init__(self, buf: memoryview, pos: int, end: int) -> None:
        self._buf, self.pos, self.end = buf, pos, end

    @property
    def remaining(self) -> int:
        return self.end - self.pos

    def take(self, n: int, what: str) -> memoryview:
        if n > self.end - self.pos:
            raise MalformedPdu(f"{what}: needs {n} bytes, {self.end - self.pos} left in its enclosing length")
        self.pos += n
        return self._buf[self.pos - n:self.pos]

    def u8(self, what: str) -> int:
        return self.take(1, what)[0]

    def uint(self, size: int, what: str) -> int:  # big endian, as every number in a PDU
        return int.from_bytes(self.take(size, what), "big")

    def sub(self, n: int, what: str) -> _Cursor:
        """The next ``n`` bytes as a window of their own (they are skipped here)."""
        start = self.pos
        self.take(n, what)
        return _Cursor(self._buf, start, start + n)

    def rest(self) -> bytes:
        return bytes(self.take(self.remaining, "rest"))

    def done(self, what: str) -> None:
        if self.pos != self.end:
            raise MalformedPdu(f"{what}: {self.end - self.pos} bytes after its last field")

    def items(self, where: str) -> Iterator[tuple[int, _Cursor]]:
        """The items (type, reserved, 16-bit length, body) filling the rest of this window."""
        while self.pos < self.end:
            kind, _reserved, length = _ITEM_HEADER.unpack(self.take(_ITEM_HEADER.size, f"item header in {where}"))
            yield kind, self.sub(length, f"item 0x{kind:02x} in {where}")


def _uid(raw: bytes | memoryview, what: str, *, tested: bool = True) -> str:
    """The UID in ``raw``, its padding stripped. A field the standard says not to test reads as "" when
    it holds no UID."""
    text = bytes(raw).rstrip(b"\x00 ")
    if _UID.fullmatch(text):
        return text.decode("ascii")
    if not tested:
        return ""
    raise MalformedPdu(f"{what} is not a UID (1-64 printable ASCII characters; {len(raw)} bytes given)")


def _flag(value: int, what: str) -> bool:
    if value not in (0, 1):
        raise MalformedPdu(f"{what} is {value}, not 0 or 1")
    return value == 1


def _context_id(value: int) -> int:
    if value % 2 == 0:
        raise MalformedPdu(f"presentation context id {value} is even")
    return value


def _echo_ae(raw: bytes) -> str:
    """An A-ASSOCIATE-AC's AE field, not tested (§9.3.3): its title, or "" if it does not hold one."""
    title = raw.strip(b" ")
    return title.decode("ascii") if _ECHO_AE.fullmatch(title) else ""


def _decode_rq_context(cur: _Cursor) -> PresentationContext:
    context_id = _context_id(cur.take(4, "presentation context header")[0])  # id and three reserved bytes
    abstract: str | None = None
    transfer: list[str] = []
    for kind, item in cur.items("presentation context"):
        if kind == _ABSTRACT_SYNTAX and abstract is None:
            abstract = _uid(item.rest(), "abstract syntax")
        elif kind == _TRANSFER_SYNTAX:
            transfer.append(_uid(item.rest(), "transfer syntax"))
        elif kind == _ABSTRACT_SYNTAX:
            raise MalformedPdu(f"presentation context {context_id} has two abstract syntaxes")
        else:
            raise UnrecognizedPduParameter(f"item 0x{kind:02x} is not allowed in a proposed presentation context")
    if abstract is None or not transfer:
        raise MalformedPdu(f"presentation context {context_id} lacks its abstract or transfer syntax")
    return PresentationContext(context_id, abstract, tuple(transfer))


def _decode_ac_context(cur: _Cursor) -> PresentationContextResult:
    context_id, _reserved, value, _reserved2 = cur.take(4, "presentation context header")
    _context_id(context_id)
    if value not in _RESULTS:
        raise MalformedPdu(f"presentation context {context_id} has result {value}, not 0-4")
    result = ContextResult(value)
    syntaxes = []
    for kind, item in cur.items("presentation context result"):
        if kind != _TRANSFER_SYNTAX:
            raise UnrecognizedPduParameter(f"item 0x{kind:02x} is not allowed in a presentation context result")
        syntaxes.append(item.rest())
    if len(syntaxes) > 1:
        raise MalformedPdu(f"presentation context {context_id} names {len(syntaxes)} transfer syntaxes")
    if result is ContextResult.ACCEPTANCE:
        return PresentationContextResult(context_id, result, _uid(syntaxes[0] if syntaxes else b"", "transfer syntax"))
    return PresentationContextResult(context_id, result, _uid(syntaxes[0] if syntaxes else b"", "", tested=False))


def _sub_version_name(cur: _Cursor) -> str:
    raw = cur.rest().rstrip(b"\x00 ")
    if not _VERSION_NAME.fullmatch(raw):
        raise MalformedPdu(f"implementation version name of {len(raw)} bytes is not 0-16 printable ASCII")
    return raw.decode("ascii")


def _sized_bytes(cur: _Cursor, what: str) -> bytes:  # a field after its 16-bit length
    return bytes(cur.take(cur.uint(2, f"{what} length"), what))


def _sized_uid(cur: _Cursor, what: str) -> str:
    return _uid(_sized_bytes(cur, what), what)


def _sub_role(cur: _Cursor) -> RoleSelection:
    uid = _sized_uid(cur, "role selection SOP class UID")
    return RoleSelection(uid, _flag(cur.u8("SCU role"), "SCU role"), _flag(cur.u8("SCP role"), "SCP role"))


def _sub_common_extended(cur: _Cursor) -> CommonExtendedNegotiation:
    sop = _sized_uid(cur, "common extended negotiation SOP class UID")
    service = _sized_uid(cur, "service class UID")
    related = cur.sub(cur.uint(2, "related general SOP classes length"), "related general SOP classes")
    uids = []
    while related.remaining:
        uids.append(_sized_uid(related, "related general SOP class UID"))
    return CommonExtendedNegotiation(sop, service, tuple(uids))


def _sub_user_identity(cur: _Cursor) -> UserIdentity:
    kind = cur.u8("user identity type")
    requested = _flag(cur.u8("positive response requested"), "positive response requested")
    primary = _sized_bytes(cur, "primary field")
    return UserIdentity(kind, requested, primary, _sized_bytes(cur, "secondary field") if cur.remaining else b"")


# sub-item type -> (UserInformation field, decoder, repeated)
_USER_SUB_ITEMS: dict[int, tuple[str, Callable[[_Cursor], Any], bool]] = {
    _MAX_LENGTH: ("max_pdu_length", lambda cur: cur.uint(4, "maximum length"), False),
    _IMPLEMENTATION_UID: ("implementation_class_uid", lambda cur: _uid(cur.rest(), "implementation UID"), False),
    _ASYNC_WINDOW: ("async_window", lambda cur: AsyncOperationsWindow(cur.uint(2, "invoked"), cur.uint(2, "performed")),
                    False),
    _ROLE: ("roles", _sub_role, True),
    _IMPLEMENTATION_VERSION: ("implementation_version_name", _sub_version_name, False),
    _EXTENDED: ("extended", lambda cur: ExtendedNegotiation(_sized_uid(cur, "SOP class UID"), cur.rest()), True),
    _COMMON_EXTENDED: ("common_extended", _sub_common_extended, True),
    _USER_IDENTITY: ("user_identity", _sub_user_identity, False),
    _USER_IDENTITY_RESPONSE: ("user_identity_response", lambda cur: UserIdentityResponse(_sized_bytes(cur, "response")),
                              False),
}
_NOT_IN = {A_ASSOCIATE_RQ: _USER_IDENTITY_RESPONSE, A_ASSOCIATE_AC: _USER_IDENTITY}


def _decode_user(cur: _Cursor, pdu_type: int) -> UserInformation:
    single: dict[str, Any] = {}
    repeated: dict[str, list[Any]] = {"roles": [], "extended": [], "common_extended": []}
    unknown: list[tuple[int, bytes]] = []
    for kind, item in cur.items("user information"):
        if kind == _NOT_IN[pdu_type]:
            raise UnrecognizedPduParameter(f"user information sub-item 0x{kind:02x} is not allowed in this PDU")
        if kind not in _USER_SUB_ITEMS:
            unknown.append((kind, item.rest()))
            continue
        name, decoder, many = _USER_SUB_ITEMS[kind]
        value = decoder(item)
        item.done(f"user information sub-item 0x{kind:02x}")
        if many:
            repeated[name].append(value)
        elif name in single:
            raise MalformedPdu(f"user information sub-item 0x{kind:02x} given twice")
        else:
            single[name] = value
    return UserInformation(**single, **{k: tuple(v) for k, v in repeated.items()}, unknown=tuple(unknown))


def _decode_associate(cur: _Cursor, pdu_type: int) -> AssociateRQ | AssociateAC:
    version, _reserved, called, calling, _reserved2 = _FIXED.unpack(cur.take(_FIXED.size, "fixed fields"))
    context_type = _CONTEXT_RQ if pdu_type == A_ASSOCIATE_RQ else _CONTEXT_AC
    application: str | None = None
    contexts: list[Any] = []
    user: UserInformation | None = None
    for kind, item in cur.items("A-ASSOCIATE variable items"):
        if kind == _APPLICATION_CONTEXT and application is None:
            application = _uid(item.rest(), "application context name")
        elif kind == context_type:
            contexts.append(_decode_rq_context(item) if kind == _CONTEXT_RQ else _decode_ac_context(item))
        elif kind == _USER_INFORMATION and user is None:
            user = _decode_user(item, pdu_type)
        elif kind in (_APPLICATION_CONTEXT, _USER_INFORMATION):
            raise MalformedPdu(f"item 0x{kind:02x} given twice")
        else:
            raise UnrecognizedPduParameter(f"item 0x{kind:02x} is not allowed in PDU type 0x{pdu_type:02x}")
    application = _checked_items(application, contexts, pdu_type)
    if pdu_type == A_ASSOCIATE_RQ:
        called_ae = _requested_ae(called, "called", RejectReason.CALLED_AE_UNKNOWN)
        calling_ae = _requested_ae(calling, "calling", RejectReason.CALLING_AE_NOT_ALLOWED)
        return AssociateRQ(called_ae, calling_ae, tuple(contexts), user or UserInformation(), application, version)
    return AssociateAC(_echo_ae(called), _echo_ae(calling), tuple(contexts), user or UserInformation(),
                       application, version)


def _checked_items(application: str | None, contexts: list[Any], pdu_type: int) -> str:
    if application is None:
        raise MalformedPdu("A-ASSOCIATE without an application context item")
    if pdu_type == A_ASSOCIATE_RQ and not contexts:
        raise MalformedPdu("A-ASSOCIATE-RQ without a presentation context")
    if len({c.id for c in contexts}) != len(contexts):
        raise MalformedPdu("a presentation context id is given twice")
    return application


def _decode_pdata(cur: _Cursor) -> PDataTF:
    pdvs = []
    while cur.remaining:
        length = cur.uint(4, "PDV item length")
        if length < 2:
            raise MalformedPdu(f"PDV item length {length} is shorter than its context id and header")
        item = cur.sub(length, "PDV item")
        context_id, control = item.u8("context id"), item.u8("message control header")
        pdvs.append(PDV(context_id, bool(control & 1), bool(control & 2), item.rest()))
    return PDataTF(tuple(pdvs))


# the PDUs of four fixed bytes: reserved, then result/source/reason (RJ), -/source/reason (A-ABORT), or nothing
_FIXED_PDUS: dict[int, Callable[[memoryview], Pdu]] = {
    A_ASSOCIATE_RJ: lambda b: AssociateRJ(b[1], b[2], b[3]), A_ABORT: lambda b: Abort(b[2], b[3]),
    A_RELEASE_RQ: lambda b: ReleaseRQ(), A_RELEASE_RP: lambda b: ReleaseRP(),
}


def _check_body_length(pdu_type: int, length: int) -> None:
    bounds = _BODY_LENGTH.get(pdu_type)
    if bounds is None:
        raise UnrecognizedPdu(f"PDU type 0x{pdu_type:02x} is not a DICOM upper-layer PDU")
    low, high = bounds
    if length < low or (high is not None and length > high):
        raise MalformedPdu(f"PDU type 0x{pdu_type:02x} with a length of {length} bytes")


def decode(data: bytes | bytearray | memoryview) -> Pdu:
    """One whole PDU, its 6-byte header included, as a dataclass. Raises only ``MalformedPdu`` (and its
    subclasses ``UnrecognizedPdu``, ``UnrecognizedPduParameter``, ``InvalidAeTitle``)."""
    view = memoryview(data)
    if len(view) < PDU_HEADER_SIZE:
        raise MalformedPdu(f"{len(view)} bytes are shorter than a PDU header")
    pdu_type, _reserved, length = PDU_HEADER.unpack_from(view)
    _check_body_length(pdu_type, length)
    if length != len(view) - PDU_HEADER_SIZE:
        raise MalformedPdu(f"PDU length {length} but {len(view) - PDU_HEADER_SIZE} bytes follow the header")
    cur = _Cursor(view, PDU_HEADER_SIZE, len(view))
    if pdu_type in (A_ASSOCIATE_RQ, A_ASSOCIATE_AC):
        return _decode_associate(cur, pdu_type)
    if pdu_type == P_DATA_TF:
        return _decode_pdata(cur)
    return _FIXED_PDUS[pdu_type](cur.take(4, "fixed fields"))


# --- writing --------------------------------------------------------------------------------------------


def _int(value: int, bits: int, what: str) -> int:
    if not isinstance(value, int) or not 0 <= value < 1 << bits:
        raise ValueError(f"{what} must be an integer of {bits} bits, not {value!r}")
    return value


def _item(kind: int, body: bytes) -> bytes:
    if len(body) > 0xFFFF:
        raise ValueError(f"item 0x{kind:02x} of {len(body)} bytes does not fit its 16-bit length")
    return _ITEM_HEADER.pack(kind, 0, len(body)) + body


def _uid_bytes(uid: str, what: str) -> bytes:
    raw = uid.encode("ascii") if uid.isascii() else b""
    if not _UID.fullmatch(raw):
        raise ValueError(f"{what} {uid!r} is not a UID of 1-64 printable ASCII characters")
    return raw


def _sized(raw: bytes, what: str) -> bytes:
    if len(raw) > 0xFFFF:
        raise ValueError(f"{what} of {len(raw)} bytes does not fit its 16-bit length")
    return len(raw).to_bytes(2, "big") + raw


def _ae_field(title: str, *, requested: bool) -> bytes:
    raw = title.encode("ascii") if title.isascii() else b"\x00"
    valid = _ECHO_AE.fullmatch(raw) and raw == raw.strip(b" ") and (raw or not requested)
    if not valid:
        raise ValueError(f"AE title {title!r} is not 0-16 printable ASCII characters without a backslash")
    return raw.ljust(16, b" ")


def _encode_rq_context(cx: PresentationContext) -> bytes:
    if not cx.transfer_syntaxes:
        raise ValueError(f"presentation context {cx.id} proposes no transfer syntax")
    body = bytes([cx.id, 0, 0, 0]) + _item(_ABSTRACT_SYNTAX, _uid_bytes(cx.abstract_syntax, "abstract syntax"))
    body += b"".join(_item(_TRANSFER_SYNTAX, _uid_bytes(ts, "transfer syntax")) for ts in cx.transfer_syntaxes)
    return _item(_CONTEXT_RQ, body)


def _encode_ac_context(cx: PresentationContextResult) -> bytes:
    result = ContextResult(cx.result)
    needed = result is ContextResult.ACCEPTANCE or cx.transfer_syntax  # else an empty sub-item
    syntax = _uid_bytes(cx.transfer_syntax, "transfer syntax") if needed else b""
    return _item(_CONTEXT_AC, bytes([cx.id, 0, result, 0]) + _item(_TRANSFER_SYNTAX, syntax))


def _encode_role(role: RoleSelection) -> bytes:
    uid = _sized(_uid_bytes(role.sop_class_uid, "role selection SOP class UID"), "UID")
    return _item(_ROLE, uid + bytes([bool(role.scu), bool(role.scp)]))


def _encode_extended(ext: ExtendedNegotiation) -> bytes:
    uid = _sized(_uid_bytes(ext.sop_class_uid, "extended negotiation SOP class UID"), "UID")
    return _item(_EXTENDED, uid + bytes(ext.info))


def _encode_common_extended(ext: CommonExtendedNegotiation) -> bytes:
    related = b"".join(_sized(_uid_bytes(uid, "related general SOP class UID"), "UID") for uid in ext.related)
    body = (_sized(_uid_bytes(ext.sop_class_uid, "SOP class UID"), "UID")
            + _sized(_uid_bytes(ext.service_class_uid, "service class UID"), "UID") + _sized(related, "related"))
    return _item(_COMMON_EXTENDED, body)


def _encode_user_identity(identity: UserIdentity) -> bytes:
    head = bytes([_int(identity.kind, 8, "user identity type"), bool(identity.response_requested)])
    body = head + _sized(bytes(identity.primary), "primary field") + _sized(bytes(identity.secondary), "secondary")
    return _item(_USER_IDENTITY, body)


def _encode_version_name(name: str) -> bytes:
    raw = name.encode("ascii") if name.isascii() else b"\x00"
    if not _VERSION_NAME.fullmatch(raw) or raw != raw.rstrip(b" "):
        raise ValueError(f"implementation version name {name!r} is not 0-16 printable ASCII characters")
    return _item(_IMPLEMENTATION_VERSION, raw)


def _encode_user(user: UserInformation, pdu_type: int) -> bytes:
    """The sub-items in the order of PS3.7 Annex D.3.3 (0x51, 0x52, 0x55, 0x53, ...), as pynetdicom and DCMTK
    write them, then the unknown ones."""
    if (user.user_identity_response if pdu_type == A_ASSOCIATE_RQ else user.user_identity) is not None:
        raise ValueError("a user identity goes in an A-ASSOCIATE-RQ, its response in an A-ASSOCIATE-AC")
    parts = []
    if user.max_pdu_length is not None:
        parts.append(_item(_MAX_LENGTH, _int(user.max_pdu_length, 32, "maximum length").to_bytes(4, "big")))
    if user.implementation_class_uid is not None:
        parts.append(_item(_IMPLEMENTATION_UID, _uid_bytes(user.implementation_class_uid, "implementation UID")))
    if user.implementation_version_name is not None:
        parts.append(_encode_version_name(user.implementation_version_name))
    if user.async_window is not None:
        window = user.async_window
        parts.append(_item(_ASYNC_WINDOW, _int(window.invoked, 16, "operations invoked").to_bytes(2, "big")
                           + _int(window.performed, 16, "operations performed").to_bytes(2, "big")))
    parts += [_encode_role(role) for role in user.roles]
    parts += [_encode_extended(ext) for ext in user.extended]
    parts += [_encode_common_extended(ext) for ext in user.common_extended]
    if user.user_identity is not None:
        parts.append(_encode_user_identity(user.user_identity))
    if user.user_identity_response is not None:
        parts.append(_item(_USER_IDENTITY_RESPONSE, _sized(bytes(user.user_identity_response.server_response),
                                                           "server response")))
    parts += [_encode_unknown(kind, body) for kind, body in user.unknown]
    return _item(_USER_INFORMATION, b"".join(parts))


def _encode_unknown(kind: int, body: bytes) -> bytes:
    if _int(kind, 8, "sub-item type") in _USER_SUB_ITEMS:
        raise ValueError(f"sub-item type 0x{kind:02x} is a known one: give it in its own field")
    return _item(kind, bytes(body))


def _encode_associate(pdu: AssociateRQ | AssociateAC) -> bytes:
    requested = isinstance(pdu, AssociateRQ)
    pdu_type = A_ASSOCIATE_RQ if requested else A_ASSOCIATE_AC
    for cx in pdu.contexts:
        if _int(cx.id, 8, "presentation context id") % 2 == 0:
            raise ValueError(f"presentation context id {cx.id} is even")
    if len({cx.id for cx in pdu.contexts}) != len(pdu.contexts) or (requested and not pdu.contexts):
        raise ValueError("presentation context ids must be unique, and a request needs at least one")
    fixed = _FIXED.pack(_int(pdu.protocol_version, 16, "protocol version"), 0,
                        _ae_field(pdu.called_ae, requested=requested), _ae_field(pdu.calling_ae, requested=requested),
                        bytes(32))
    contexts = b"".join(_encode_rq_context(cx) if requested else _encode_ac_context(cx) for cx in pdu.contexts)
    application = _item(_APPLICATION_CONTEXT, _uid_bytes(pdu.application_context, "application context name"))
    return _with_header(pdu_type, fixed + application + contexts + _encode_user(pdu.user, pdu_type))


def _with_header(pdu_type: int, body: bytes) -> bytes:
    if len(body) > 0xFFFFFFFF:
        raise ValueError(f"a PDU body of {len(body)} bytes does not fit its 32-bit length")
    return PDU_HEADER.pack(pdu_type, 0, len(body)) + body


def _encode_pdata(pdu: PDataTF) -> bytes:
    if not pdu.pdvs:
        raise ValueError("a P-DATA-TF holds at least one PDV")
    pdvs = (encode_pdv(p.context_id, p.is_command, p.is_last, p.data)[PDU_HEADER_SIZE:] for p in pdu.pdvs)
    return _with_header(P_DATA_TF, b"".join(pdvs))


def encode_pdv(context_id: int, is_command: bool, is_last: bool, data: bytes | memoryview) -> bytes:
    """One P-DATA-TF PDU holding one PDV, ``data`` copied once: what the association machine sends."""
    control = bool(is_command) | bool(is_last) << 1
    header = _PDV_HEADER.pack(P_DATA_TF, 0, PDV_OVERHEAD + len(data), 2 + len(data),
                              _int(context_id, 8, "context id"), control)
    return b"".join((header, data))


def encode(pdu: Pdu) -> bytes:
    """The PDU as bytes, header included. Raises ``ValueError`` for a field that cannot be encoded."""
    match pdu:
        case AssociateRQ() | AssociateAC():
            return _encode_associate(pdu)
        case PDataTF():
            return _encode_pdata(pdu)
        case AssociateRJ():
            pdu_type, fields = A_ASSOCIATE_RJ, (0, pdu.result, pdu.source, pdu.reason)
        case Abort():
            pdu_type, fields = A_ABORT, (0, 0, pdu.source, pdu.reason)
        case ReleaseRQ() | ReleaseRP():
            pdu_type, fields = (A_RELEASE_RQ if isinstance(pdu, ReleaseRQ) else A_RELEASE_RP), (0, 0, 0, 0)
        case _:
            raise TypeError(f"not a PDU: {type(pdu).__name__}")
    return _with_header(pdu_type, bytes(_int(v, 8, "PDU field") for v in fields))


# --- framing --------------------------------------------------------------------------------------------


class PduReader:
    """Frames a byte stream into PDUs: feed any chunking to ``receive_data``, get the PDUs it completed.

    ``max_pdu`` bounds a P-DATA-TF's body (the maximum length this side announced; the header's 6 bytes
    come on top) and may be changed between calls; ``max_associate_pdu`` bounds every other PDU, header
    included. Both are checked on the header, before any of the body is buffered: ``PduTooLarge``. An
    unknown PDU type is refused on its first byte (``UnrecognizedPdu``), a fixed-size PDU whose header
    announces another size on its sixth (``MalformedPdu``); the rest is ``decode``'s. After an error the
    reader is unusable: the association is over.
    """

    def __init__(self, max_pdu: int, max_associate_pdu: int = DEFAULT_MAX_ASSOCIATE_RQ) -> None:
        self.max_pdu = max_pdu
        self.max_associate_pdu = max_associate_pdu
        self._partial = bytearray()  # the start of a PDU that has not completed yet
        self._need = 0  # the whole size of the PDU in _partial once its header is in, else 0

    @property
    def buffered(self) -> int:
        """Bytes held of a PDU that has not completed yet."""
        return len(self._partial)

    def receive_data(self, data: bytes | bytearray | memoryview) -> list[Pdu]:
        return list(self.pdus(data))

    def pdus(self, data: bytes | bytearray | memoryview) -> Iterator[Pdu]:
        """``receive_data`` as a generator, each PDU decoded only when asked for: a caller that stops after
        a final PDU (A-ABORT, A-RELEASE-RP) leaves what followed it unread, and must close the generator."""
        view = memoryview(data)
        pos, end = 0, len(view)
        while pos < end:
            if not self._partial and end - pos >= PDU_HEADER_SIZE:
                size = self._size(view, pos)
                if end - pos >= size:
                    pos += size
                    yield decode(view[pos - size:pos])
                    continue
            pos = self._collect(view, pos)
            if self._need and len(self._partial) == self._need:
                whole, self._partial, self._need = self._partial, bytearray(), 0
                yield decode(whole)

    def _collect(self, view: memoryview, pos: int) -> int:
        """Append what the partial PDU still lacks from ``view[pos:]``: its header first (checked), then at
        most the rest of its body. Returns the new position in ``view``."""
        if not self._need:
            take = min(PDU_HEADER_SIZE - len(self._partial), len(view) - pos)
            self._partial += view[pos:pos + take]
            pos += take
            self._check_type(self._partial[0])
            if len(self._partial) < PDU_HEADER_SIZE:
                return pos
            self._need = self._size(self._partial, 0)
        take = min(self._need - len(self._partial), len(view) - pos)
        self._partial += view[pos:pos + take]
        return pos + take

    @staticmethod
    def _check_type(pdu_type: int) -> None:
        if pdu_type not in _BODY_LENGTH:
            raise UnrecognizedPdu(f"PDU type 0x{pdu_type:02x} is not a DICOM upper-layer PDU")

    def _size(self, buf: bytes | bytearray | memoryview, pos: int) -> int:
        """The whole size of the PDU whose header starts at ``pos``, checked against the limits."""
        pdu_type, _reserved, length = PDU_HEADER.unpack_from(buf, pos)
        self._check_type(pdu_type)
        if pdu_type == P_DATA_TF and length > self.max_pdu:
            raise PduTooLarge(f"P-DATA-TF of {length} bytes exceeds the maximum length of {self.max_pdu}")
        if pdu_type != P_DATA_TF and length + PDU_HEADER_SIZE > self.max_associate_pdu:
            raise PduTooLarge(f"PDU type 0x{pdu_type:02x} of {length} bytes exceeds the cap of "
                              f"{self.max_associate_pdu}")
        _check_body_length(pdu_type, length)
        return PDU_HEADER_SIZE + length
