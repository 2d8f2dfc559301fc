"""DIMSE command sets (PS3.7 §9.3, §10.3, Annex E) and their statuses, encoded and decoded without I/O.

Theory of operation: every DIMSE message opens with a command set, a run of group 0000 elements in
implicit VR little endian (tag, 4-byte length, value), led by (0000,0000) CommandGroupLength, which counts
the bytes after it. The association layer reassembles the command PDVs of one message and hands the
bytes to ``decode_command``, which returns one frozen dataclass per message type (``CStoreRQ``,
``CFindRSP``, ...); ``encode_command`` is its inverse. Whether a dataset follows the command set is read
from (0000,0800) CommandDataSetType: 0x0101 means none, any other value means one (PS3.7 §E.2).

Decoding runs in two passes. ``_split`` walks the bytes once, checking every element header and every
value length *before* slicing: group 0000 only, (0000,0000) first and equal to the bytes that follow it,
tags strictly ascending (so no duplicates), even lengths that end inside the data. Then the command field
picks a row of ``_SPECS``, and only the elements that message uses are read by their VR (``_ELEMENTS``).
Elements the message does not use, including retired ones old devices still send ((0000,0001),
(0000,0010), (0000,4000), (0000,5010), ...), pass the structural checks and are otherwise skipped, as
PS3.7 asks of a receiver. A field whose dataclass default is ``None`` is optional on the wire (PS3.7 "U"
or "C"); every other field is mandatory ("M") and its absence is an error. Whatever the bytes, only
``DimseError`` escapes ``decode_command``.

What is read leniently, and why (a tunnel carries other people's devices' traffic): trailing NUL and
space padding are dropped from UI, AE and LO values, leading spaces from UI and AE (PS3.5 §6.2: not
significant in AE, not allowed in UI); a zero-length value counts as absent (PS3.5 §7.1.1: no value), an
error only where the element is mandatory; Priority, Status and the type IDs are carried as any 16-bit
value, not refused when this module has no name for them; an ErrorComment is read byte for byte as
Latin-1, so a comment in a national character set survives. What is refused: a UID that is not 1-64
printable ASCII characters without a backslash, an AE title that is not 1-16 of them, an ErrorComment
over 64 characters, and a CommandDataSetType that contradicts the message type (a C-ECHO with a dataset,
a C-STORE-RQ without one): the layer above would otherwise take the peer's dataset fragments for the
next command.

Encoding writes the elements in ascending tag order, pads UI values with NUL and AE and LO values with a
space to even length, and writes CommandDataSetType as 0x0101 (none) or 0x0001 (present; what dcmtk and
pynetdicom send). A value ``decode_command`` would refuse (or could not give back unchanged, such as a
UID with a trailing space) makes ``encode_command`` raise ``ValueError``: a local bug, not a peer fault.

PHI: SOP instance UIDs and error comments can identify a patient. A message's ``repr`` shows them and is
for tests only; ``describe()`` gives the one-line, PHI-free summary that log lines may hold.
"""

from __future__ import annotations

import dataclasses
import struct
from dataclasses import dataclass
from enum import Enum, IntEnum
from typing import Any, ClassVar

from tunnel_core.dicom.uids import COMMON_STORAGE_SOP_CLASSES, STORAGE_COMMITMENT_PUSH, VERIFICATION
from tunnel_core.errors import DimseError

DEFAULT_MAX_COMMAND_SET = 65536  # command sets are a few hundred bytes; anything near this is hostile
DATASET_ABSENT = 0x0101  # CommandDataSetType: no dataset follows
DATASET_PRESENT = 0x0001  # what we send when one does; on receipt any value but 0x0101 means one does


class CommandField(IntEnum):
    """(0000,0100) CommandField of the supported messages (PS3.7 §E.1)."""

    C_STORE_RQ = 0x0001
    C_STORE_RSP = 0x8001
    C_GET_RQ = 0x0010
    C_GET_RSP = 0x8010
    C_FIND_RQ = 0x0020
    C_FIND_RSP = 0x8020
    C_MOVE_RQ = 0x0021
    C_MOVE_RSP = 0x8021
    C_ECHO_RQ = 0x0030
    C_ECHO_RSP = 0x8030
    N_EVENT_REPORT_RQ = 0x0100
    N_EVENT_REPORT_RSP = 0x8100
    N_ACTION_RQ = 0x0130
    N_ACTION_RSP = 0x8130
    C_CANCEL_RQ = 0x0FFF

    @property
    def wire_name(self) -> str:
        """The standard's spelling, e.g. ``C-STORE-RQ``."""
        return self.name.replace("_", "-")


class Priority(IntEnum):
    """(0000,0700) Priority of C-STORE, C-FIND, C-GET and C-MOVE requests."""

    MEDIUM = 0x0000
    HIGH = 0x0001
    LOW = 0x0002


class Status(IntEnum):
    """(0000,0900) Status codes the product names (PS3.7 Annex C, PS3.4 B.2.3, C.4). Where two services
    give one code two meanings, the second name is an alias: ``Status(0xB000).name`` is the first."""

    SUCCESS = 0x0000
    PENDING = 0xFF00
    PENDING_WARNING = 0xFF01  # C-FIND: matches continue, an optional key was not supported
    CANCEL = 0xFE00
    # warnings
    OPTIONAL_ATTRIBUTES_NOT_SUPPORTED = 0x0001
    ATTRIBUTE_LIST_ERROR = 0x0107
    ATTRIBUTE_VALUE_OUT_OF_RANGE = 0x0116
    COERCION_OF_DATA_ELEMENTS = 0xB000  # C-STORE
    SUB_OPERATIONS_COMPLETE_WITH_FAILURES = 0xB000  # C-MOVE, C-GET: one or more failures or warnings
    MATCHING_REACHED_RESPONSE_LIMIT = 0xB001  # C-FIND
    ELEMENTS_DISCARDED = 0xB006
    DATASET_DOES_NOT_MATCH_SOP_CLASS_WARNING = 0xB007
    # failures of the query/retrieve and storage services
    OUT_OF_RESOURCES = 0xA700
    OUT_OF_RESOURCES_MATCHES = 0xA701  # unable to calculate the number of matches
    OUT_OF_RESOURCES_SUB_OPERATIONS = 0xA702  # unable to perform sub-operations
    MOVE_DESTINATION_UNKNOWN = 0xA801
    DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
    IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS = 0xA900  # C-FIND, C-MOVE, C-GET
    CANNOT_UNDERSTAND = 0xC000
    UNABLE_TO_PROCESS = 0xC000  # C-FIND, C-MOVE, C-GET
    # general failures (PS3.7 Annex C.5)
    NO_SUCH_ATTRIBUTE = 0x0105
    INVALID_ATTRIBUTE_VALUE = 0x0106
    PROCESSING_FAILURE = 0x0110
    DUPLICATE_SOP_INSTANCE = 0x0111
    NO_SUCH_SOP_INSTANCE = 0x0112
    NO_SUCH_EVENT_TYPE = 0x0113
    NO_SUCH_ARGUMENT = 0x0114
    INVALID_ARGUMENT_VALUE = 0x0115
    INVALID_OBJECT_INSTANCE = 0x0117
    NO_SUCH_SOP_CLASS = 0x0118
    CLASS_INSTANCE_CONFLICT = 0x0119
    MISSING_ATTRIBUTE = 0x0120
    MISSING_ATTRIBUTE_VALUE = 0x0121
    SOP_CLASS_NOT_SUPPORTED = 0x0122
    NO_SUCH_ACTION = 0x0123
    NOT_AUTHORIZED = 0x0124
    DUPLICATE_INVOCATION = 0x0210
    UNRECOGNIZED_OPERATION = 0x0211
    MISTYPED_ARGUMENT = 0x0212
    RESOURCE_LIMITATION = 0x0213


class StatusCategory(Enum):
    SUCCESS = "success"
    WARNING = "warning"
    FAILURE = "failure"
    CANCEL = "cancel"
    PENDING = "pending"


_WARNING_CODES = frozenset({0x0001, 0x0107, 0x0116})
_PENDING_CODES = frozenset({0xFF00, 0xFF01})


def category(status: int) -> StatusCategory:
    """The category of any status code, never raising (PS3.7 Annex C).

    0x0000 is success; 0xFF00 and 0xFF01 pending; 0xFE00 cancel; 0x0001, 0x0107, 0x0116 and
    0xB000-0xBFFF warning. Everything else is failure: the standard's failure ranges (0xA000-0xAFFF,
    0xC000-0xCFFF, the other 0x01xx and 0x02xx codes) and, by choice, every code it leaves undefined
    (e.g. 0x0002, 0xD000, 0xFE01, 0xFF02, or an int outside 16 bits): a status nobody defined is not a
    success its sender meant, and reading it as a failure is the safe side for a store that must not be
    reported done.
    """
    if status == 0x0000:
        return StatusCategory.SUCCESS
    if status in _PENDING_CODES:
        return StatusCategory.PENDING
    if status == 0xFE00:
        return StatusCategory.CANCEL
    if status in _WARNING_CODES or 0xB000 <= status <= 0xBFFF:
        return StatusCategory.WARNING
    return StatusCategory.FAILURE


# SOP class names for describe(), as pydicom's keywords: the storage classes of ``uids`` and the services
# below. SOP class UIDs are not PHI, so an unnamed one appears as is.
SOP_CLASS_NAMES: dict[str, str] = {
    VERIFICATION: "Verification",
    STORAGE_COMMITMENT_PUSH: "StorageCommitmentPushModel",
    "1.2.840.10008.3.1.2.3.3": "ModalityPerformedProcedureStep",
    "1.2.840.10008.5.1.4.1.2.1.1": "PatientRootQueryRetrieveInformationModelFind",
    "1.2.840.10008.5.1.4.1.2.1.2": "PatientRootQueryRetrieveInformationModelMove",
    "1.2.840.10008.5.1.4.1.2.1.3": "PatientRootQueryRetrieveInformationModelGet",
    "1.2.840.10008.5.1.4.1.2.2.1": "StudyRootQueryRetrieveInformationModelFind",
    "1.2.840.10008.5.1.4.1.2.2.2": "StudyRootQueryRetrieveInformationModelMove",
    "1.2.840.10008.5.1.4.1.2.2.3": "StudyRootQueryRetrieveInformationModelGet",
    "1.2.840.10008.5.1.4.31": "ModalityWorklistInformationModelFind",
    **{uid: keyword for keyword, uid in COMMON_STORAGE_SOP_CLASSES.items()},
}


# --- the messages ----------------------------------------------------------------------------------------

# describe()'s details after the IDs, class and status: (attribute, label). Instance UIDs, error comments
# and offending elements are left out on purpose: the first two can identify a patient.
_DESCRIBED = (("priority", "priority"), ("move_destination", "destination"), ("move_originator_ae", "originator"),
              ("move_originator_message_id", "originator-id"), ("event_type_id", "event"),
              ("action_type_id", "action"), ("remaining_sub_operations", "remaining"),
              ("completed_sub_operations", "completed"), ("failed_sub_operations", "failed"),
              ("warning_sub_operations", "warning"), ("error_id", "error-id"))


class _Message:
    """What every message answers. ``message_id`` is a request's own ID (None on a response and on
    C-CANCEL-RQ); ``responded_to`` the ID a response or C-CANCEL-RQ refers to (None on other requests).
    No property here shares a name with a dataclass field: dataclasses would take it for the default."""

    __slots__ = ()
    command_field: ClassVar[CommandField]
    is_response: ClassVar[bool] = False

    @property
    def responded_to(self) -> int | None:
        return getattr(self, "message_id_being_responded_to", None)

    def describe(self) -> str:
        """A one-line summary for logs, free of PHI: the message type, IDs, SOP class name or UID,
        status and category, counts. Never an instance UID or an error comment."""
        parts = [self.command_field.wire_name]
        message_id = self.message_id  # a field on requests, a property (None) on the rest
        if message_id is not None:
            parts.append(f"id={message_id}")
        if self.responded_to is not None:
            parts.append(f"to={self.responded_to}")
        sop_class = getattr(self, "affected_sop_class_uid", None) or getattr(self, "requested_sop_class_uid", None)
        if sop_class is not None:
            parts.append(f"class={SOP_CLASS_NAMES.get(sop_class, sop_class)}")
        status = getattr(self, "status", None)
        if status is not None:
            parts.append(f"status=0x{status:04X}({category(status).value})")
        for attribute, label in _DESCRIBED:
            value = getattr(self, attribute, None)
            if value is not None:
                parts.append(f"{label}={_describe_value(attribute, value)}")
        if self.has_dataset:  # a field or a ClassVar on every message class
            parts.append("dataset")
        return " ".join(parts)


_PRIORITY_NAMES = {priority.value: priority.name for priority in Priority}


def _describe_value(attribute: str, value: object) -> str:
    if attribute == "priority" and isinstance(value, int):
        return _PRIORITY_NAMES.get(value, str(value))
    return str(value)


class _Request(_Message):
    __slots__ = ()


class _Response(_Message):
    __slots__ = ()
    is_response: ClassVar[bool] = True

    @property
    def message_id(self) -> int | None:
        return None


@dataclass(frozen=True, slots=True)
class CEchoRQ(_Request):
    message_id: int
    affected_sop_class_uid: str = VERIFICATION
    command_field: ClassVar[CommandField] = CommandField.C_ECHO_RQ
    has_dataset: ClassVar[bool] = False


@dataclass(frozen=True, slots=True)
class CEchoRSP(_Response):
    message_id_being_responded_to: int
    status: int
    affected_sop_class_uid: str | None = None
    error_comment: str | None = None
    offending_element: tuple[int, ...] | None = None
    error_id: int | None = None
    command_field: ClassVar[CommandField] = CommandField.C_ECHO_RSP
    has_dataset: ClassVar[bool] = False


@dataclass(frozen=True, slots=True)
class CStoreRQ(_Request):
    message_id: int
    affected_sop_class_uid: str
    affected_sop_instance_uid: str
    priority: int = Priority.MEDIUM
    move_originator_ae: str | None = None  # set when the store is a sub-operation of a C-MOVE
    move_originator_message_id: int | None = None
    command_field: ClassVar[CommandField] = CommandField.C_STORE_RQ
    has_dataset: ClassVar[bool] = True


@dataclass(frozen=True, slots=True)
class CStoreRSP(_Response):
    message_id_being_responded_to: int
    status: int
    affected_sop_class_uid: str | None = None
    affected_sop_instance_uid: str | None = None
    error_comment: str | None = None
    offending_element: tuple[int, ...] | None = None
    error_id: int | None = None
    command_field: ClassVar[CommandField] = CommandField.C_STORE_RSP
    has_dataset: ClassVar[bool] = False


@dataclass(frozen=True, slots=True)
class CFindRQ(_Request):
    message_id: int
    affected_sop_class_uid: str
    priority: int = Priority.MEDIUM
    command_field: ClassVar[CommandField] = CommandField.C_FIND_RQ
    has_dataset: ClassVar[bool] = True  # the identifier


@dataclass(frozen=True, slots=True)
class CFindRSP(_Response):
    message_id_being_responded_to: int
    status: int
    has_dataset: bool  # a pending response carries a match; the final one normally none
    affected_sop_class_uid: str | None = None
    error_comment: str | None = None
    offending_element: tuple[int, ...] | None = None
    error_id: int | None = None
    command_field: ClassVar[CommandField] = CommandField.C_FIND_RSP


@dataclass(frozen=True, slots=True)
class CGetRQ(_Request):
    message_id: int
    affected_sop_class_uid: str
    priority: int = Priority.MEDIUM
    command_field: ClassVar[CommandField] = CommandField.C_GET_RQ
    has_dataset: ClassVar[bool] = True


@dataclass(frozen=True, slots=True)
class CGetRSP(_Response):
    message_id_being_responded_to: int
    status: int
    has_dataset: bool  # a final failure or warning may carry the Failed SOP Instance UID List
    affected_sop_class_uid: str | None = None
    remaining_sub_operations: int | None = None
    completed_sub_operations: int | None = None
    failed_sub_operations: int | None = None
    warning_sub_operations: int | None = None
    error_comment: str | None = None
    offending_element: tuple[int, ...] | None = None
    error_id: int | None = None
    command_field: ClassVar[CommandField] = CommandField.C_GET_RSP


@dataclass(frozen=True, slots=True)
class CMoveRQ(_Request):
    message_id: int
    affected_sop_class_uid: str
    move_destination: str
    priority: int = Priority.MEDIUM
    command_field: ClassVar[CommandField] = CommandField.C_MOVE_RQ
    has_dataset: ClassVar[bool] = True


@dataclass(frozen=True, slots=True)
class CMoveRSP(_Response):
    message_id_being_responded_to: int
    status: int
    has_dataset: bool
    affected_sop_class_uid: str | None = None
    remaining_sub_operations: int | None = None
    completed_sub_operations: int | None = None
    failed_sub_operations: int | None = None
    warning_sub_operations: int | None = None
    error_comment: str | None = None
    offending_element: tuple[int, ...] | None = None
    error_id: int | None = None
    command_field: ClassVar[CommandField] = CommandField.C_MOVE_RSP


@dataclass(frozen=True, slots=True)
class CCancelRQ(_Request):
    message_id_being_responded_to: int  # the C-FIND, C-GET or C-MOVE to cancel
    command_field: ClassVar[CommandField] = CommandField.C_CANCEL_RQ
    has_dataset: ClassVar[bool] = False

    @property
    def message_id(self) -> int | None:
        return None


@dataclass(frozen=True, slots=True)
class NActionRQ(_Request):
    message_id: int
    requested_sop_class_uid: str
    requested_sop_instance_uid: str
    action_type_id: int
    has_dataset: bool  # the action information
    command_field: ClassVar[CommandField] = CommandField.N_ACTION_RQ


@dataclass(frozen=True, slots=True)
class NActionRSP(_Response):
    message_id_being_responded_to: int
    status: int
    has_dataset: bool  # the action reply
    affected_sop_class_uid: str | None = None
    affected_sop_instance_uid: str | None = None
    action_type_id: int | None = None
    error_comment: str | None = None
    offending_element: tuple[int, ...] | None = None
    error_id: int | None = None
    command_field: ClassVar[CommandField] = CommandField.N_ACTION_RSP


@dataclass(frozen=True, slots=True)
class NEventReportRQ(_Request):
    message_id: int
    affected_sop_class_uid: str
    affected_sop_instance_uid: str
    event_type_id: int
    has_dataset: bool  # the event information
    command_field: ClassVar[CommandField] = CommandField.N_EVENT_REPORT_RQ


@dataclass(frozen=True, slots=True)
class NEventReportRSP(_Response):
    message_id_being_responded_to: int
    status: int
    has_dataset: bool  # the event reply
    affected_sop_class_uid: str | None = None
    affected_sop_instance_uid: str | None = None
    event_type_id: int | None = None
    error_comment: str | None = None
    offending_element: tuple[int, ...] | None = None
    error_id: int | None = None
    command_field: ClassVar[CommandField] = CommandField.N_EVENT_REPORT_RSP


Command = (CEchoRQ | CEchoRSP | CStoreRQ | CStoreRSP | CFindRQ | CFindRSP | CGetRQ | CGetRSP | CMoveRQ
           | CMoveRSP | CCancelRQ | NActionRQ | NActionRSP | NEventReportRQ | NEventReportRSP)
MESSAGE_TYPES: tuple[type[Command], ...] = (
    CEchoRQ, CEchoRSP, CStoreRQ, CStoreRSP, CFindRQ, CFindRSP, CGetRQ, CGetRSP, CMoveRQ, CMoveRSP,
    CCancelRQ, NActionRQ, NActionRSP, NEventReportRQ, NEventReportRSP)


# --- the element table -----------------------------------------------------------------------------------

GROUP_LENGTH = 0x0000  # element numbers of group 0000
COMMAND_FIELD = 0x0100
COMMAND_DATA_SET_TYPE = 0x0800

# Element number -> (dataclass field, VR), PS3.7 Annex E. The three above are handled by hand.
_ELEMENTS: dict[int, tuple[str, str]] = {
    0x0002: ("affected_sop_class_uid", "UI"),
    0x0003: ("requested_sop_class_uid", "UI"),
    0x0110: ("message_id", "US"),
    0x0120: ("message_id_being_responded_to", "US"),
    0x0600: ("move_destination", "AE"),
    0x0700: ("priority", "US"),
    0x0900: ("status", "US"),
    0x0901: ("offending_element", "AT"),
    0x0902: ("error_comment", "LO"),
    0x0903: ("error_id", "US"),
    0x1000: ("affected_sop_instance_uid", "UI"),
    0x1001: ("requested_sop_instance_uid", "UI"),
    0x1002: ("event_type_id", "US"),
    0x1008: ("action_type_id", "US"),
    0x1020: ("remaining_sub_operations", "US"),
    0x1021: ("completed_sub_operations", "US"),
    0x1022: ("failed_sub_operations", "US"),
    0x1023: ("warning_sub_operations", "US"),
    0x1030: ("move_originator_ae", "AE"),
    0x1031: ("move_originator_message_id", "US"),
}
_TAG_OF_FIELD = {name: element for element, (name, _vr) in _ELEMENTS.items()}


@dataclass(frozen=True, slots=True)
class _Spec:
    """One row of the command table: the message class, its elements, and its dataset rule."""

    cls: type[Command]
    elements: tuple[tuple[str, int, str, bool], ...]  # (field, element, VR, mandatory), ascending element
    dataset: bool | None  # the fixed answer to "does a dataset follow", or None: the message says


def _spec(cls: type[Command]) -> _Spec:
    """A message's row, read off its dataclass: a field defaulting to None is optional, any other field
    mandatory; ``has_dataset`` as a field means the dataset varies, as a ClassVar that it is fixed."""
    rows = []
    variable_dataset = False
    for field in dataclasses.fields(cls):
        if field.name == "has_dataset":
            variable_dataset = True
            continue
        element = _TAG_OF_FIELD[field.name]
        rows.append((field.name, element, _ELEMENTS[element][1], field.default is not None))
    return _Spec(cls, tuple(sorted(rows, key=lambda row: row[1])), None if variable_dataset else cls.has_dataset)


_SPECS: dict[int, _Spec] = {cls.command_field: _spec(cls) for cls in MESSAGE_TYPES}

_HEADER = struct.Struct("<HHI")  # group, element, value length
_US = struct.Struct("<H")
_UL = struct.Struct("<I")
_AT = struct.Struct("<HH")
_MAX_UI = 64
_MAX_AE = 16
_MAX_LO = 64


# --- value rules, shared by both directions -------------------------------------------------------------

def _text_problem(value: str, limit: int) -> str | None:
    """Why ``value`` is not a UI or AE value (after padding is dropped), or None if it is one."""
    if not value:
        return "is empty"
    if len(value) > limit:
        return f"is {len(value)} characters, more than {limit}"
    if not all(" " <= ch <= "~" and ch != "\\" for ch in value):
        return "holds a character outside printable ASCII, or a backslash"
    return None


def _comment_problem(value: str) -> str | None:
    if not value:
        return "is empty"
    if len(value) > _MAX_LO:
        return f"is {len(value)} characters, more than {_MAX_LO}"
    return None


# --- decoding ----------------------------------------------------------------------------------------------

def decode_command(data: bytes, *, max_length: int = DEFAULT_MAX_COMMAND_SET) -> Command:
    """The message of one whole command set (the command PDVs of one message, joined).

    Raises ``DimseError``, and nothing else, for any bytes that are not a well-formed command set of a
    supported message; ``max_length`` is checked first. After a message with ``has_dataset`` true, the
    next PDVs of the presentation context are its dataset.
    """
    if len(data) > max_length:
        raise DimseError(f"command set of {len(data)} bytes exceeds the limit of {max_length}")
    elements = _split(bytes(data))
    field = _mandatory_us(elements, COMMAND_FIELD, "CommandField")
    spec = _SPECS.get(field)
    if spec is None:
        raise DimseError(f"command field 0x{field:04X} is unknown or not supported")
    has_dataset = _mandatory_us(elements, COMMAND_DATA_SET_TYPE, "CommandDataSetType") != DATASET_ABSENT
    values: dict[str, Any] = {}  # each value of the VR its field is typed with
    for name, element, vr, mandatory in spec.elements:
        raw = elements.get(element)
        value = None if raw is None else _READERS[vr](raw, name)
        if value is not None:
            values[name] = value
        elif mandatory:
            raise DimseError(f"{spec.cls.command_field.wire_name} lacks {name} (0000,{element:04X})")
    if spec.dataset is None:
        values["has_dataset"] = has_dataset
    elif has_dataset != spec.dataset:
        announced = "announces a dataset" if has_dataset else "announces no dataset"
        raise DimseError(f"{spec.cls.command_field.wire_name} {announced}, which it never does")
    return spec.cls(**values)


def _split(data: bytes) -> dict[int, bytes]:
    """Element number -> value of a command set, every structural rule checked before a slice is taken."""
    elements: dict[int, bytes] = {}
    offset, previous, end = 0, -1, len(data)
    while offset < end:
        if end - offset < _HEADER.size:
            raise DimseError(f"element header at offset {offset} is cut short ({end - offset} bytes)")
        group, element, length = _HEADER.unpack_from(data, offset)
        where = f"({group:04X},{element:04X}) at offset {offset}"
        if group != 0x0000:
            raise DimseError(f"{where} is outside the command group 0000")
        if offset == 0 and element != GROUP_LENGTH:
            raise DimseError(f"{where} comes before (0000,0000) CommandGroupLength")
        if element <= previous:
            raise DimseError(f"{where} is out of ascending order or repeated")
        if length % 2:
            raise DimseError(f"{where} has an odd value length {length}")
        start = offset + _HEADER.size
        if length > end - start:
            raise DimseError(f"{where} has a value length {length} past the end ({end - start} bytes left)")
        elements[element] = data[start:start + length]
        previous, offset = element, start + length
    if GROUP_LENGTH not in elements:
        raise DimseError("empty command set: no (0000,0000) CommandGroupLength")
    group_length = _read_ul(elements[GROUP_LENGTH], "CommandGroupLength")
    if group_length != end - _HEADER.size - _UL.size:
        raise DimseError(f"CommandGroupLength says {group_length} bytes, "
                         f"{end - _HEADER.size - _UL.size} follow it")
    return elements


def _mandatory_us(elements: dict[int, bytes], element: int, name: str) -> int:
    value = _read_us(elements.get(element, b""), name)
    if value is None:
        raise DimseError(f"command set lacks {name} (0000,{element:04X})")
    return value


def _read_ul(raw: bytes, name: str) -> int:
    if len(raw) != _UL.size:
        raise DimseError(f"{name} (UL) has value length {len(raw)}, not 4")
    return _UL.unpack(raw)[0]


def _read_us(raw: bytes, name: str) -> int | None:
    if not raw:
        return None
    if len(raw) != _US.size:
        raise DimseError(f"{name} (US) has value length {len(raw)}, not 2")
    return _US.unpack(raw)[0]


def _read_ui(raw: bytes, name: str) -> str | None:
    return _read_text(raw, name, _MAX_UI)


def _read_ae(raw: bytes, name: str) -> str | None:
    return _read_text(raw, name, _MAX_AE)


def _read_text(raw: bytes, name: str, limit: int) -> str | None:
    raw = raw.rstrip(b"\x00 ").lstrip(b" ")
    if not raw:
        return None
    value = raw.decode("latin-1")  # never fails; the character check below refuses what is not ASCII
    problem = _text_problem(value, limit)
    if problem:
        raise DimseError(f"{name} {problem}")
    return value


def _read_lo(raw: bytes, name: str) -> str | None:
    value = raw.rstrip(b"\x00 ").decode("latin-1")
    if not value:
        return None
    problem = _comment_problem(value)
    if problem:
        raise DimseError(f"{name} {problem}")
    return value


def _read_at(raw: bytes, name: str) -> tuple[int, ...] | None:
    if len(raw) % _AT.size:
        raise DimseError(f"{name} (AT) has value length {len(raw)}, not a multiple of 4")
    return tuple(group << 16 | element for group, element in _AT.iter_unpack(raw)) or None


_READERS = {"US": _read_us, "UI": _read_ui, "AE": _read_ae, "LO": _read_lo, "AT": _read_at}


# --- encoding ----------------------------------------------------------------------------------------------

def encode_command(command: Command) -> bytes:
    """The command set of ``command``: group length first, then its elements in ascending order.

    Raises ``ValueError`` for a value ``decode_command`` would refuse (a UID over 64 characters, an AE
    title with a backslash, a count over 65535, a mandatory field set to None, ...). Send the dataset,
    if ``has_dataset``, as the PDVs that follow.
    """
    spec = _SPECS.get(getattr(type(command), "command_field", -1))
    if spec is None or spec.cls is not type(command):
        raise ValueError(f"{type(command).__name__} is not a DIMSE message of this module")
    present = DATASET_PRESENT if command.has_dataset else DATASET_ABSENT
    items = [(COMMAND_FIELD, _write_us(command.command_field, "command_field")),
             (COMMAND_DATA_SET_TYPE, _write_us(present, "has_dataset"))]
    for name, element, vr, mandatory in spec.elements:
        value = getattr(command, name)
        if value is None:
            if mandatory:
                raise ValueError(f"{spec.cls.__name__}.{name} is mandatory")
            continue
        items.append((element, _WRITERS[vr](value, name)))
    items.sort()
    body = b"".join(_HEADER.pack(0x0000, element, len(value)) + value for element, value in items)
    return _HEADER.pack(0x0000, GROUP_LENGTH, _UL.size) + _UL.pack(len(body)) + body


def _write_us(value: object, name: str) -> bytes:
    if not isinstance(value, int) or not 0 <= value <= 0xFFFF:
        raise ValueError(f"{name} must be an int from 0 to 65535, not {value!r}")
    return _US.pack(value)


def _write_text(value: object, name: str, limit: int, pad: bytes) -> bytes:
    if not isinstance(value, str):
        raise ValueError(f"{name} must be a str, not {type(value).__name__}")
    problem = _text_problem(value, limit) or (value != value.strip(" ") and "has a leading or trailing space")
    if problem:
        raise ValueError(f"{name} {problem}")
    raw = value.encode("ascii")
    return raw + pad if len(raw) % 2 else raw


def _write_ui(value: object, name: str) -> bytes:
    return _write_text(value, name, _MAX_UI, b"\x00")


def _write_ae(value: object, name: str) -> bytes:
    return _write_text(value, name, _MAX_AE, b" ")


def _write_lo(value: object, name: str) -> bytes:
    if not isinstance(value, str):
        raise ValueError(f"{name} must be a str, not {type(value).__name__}")
    problem = _comment_problem(value) or (value != value.rstrip("\x00 ") and "has trailing padding")
    if problem:
        raise ValueError(f"{name} {problem}")
    try:
        raw = value.encode("latin-1")
    except UnicodeEncodeError as exc:
        raise ValueError(f"{name} holds a character outside Latin-1") from exc
    return raw + b" " if len(raw) % 2 else raw


def _write_at(value: object, name: str) -> bytes:
    if not isinstance(value, tuple) or not value:
        raise ValueError(f"{name} must be a non-empty tuple of tags")
    if not all(isinstance(tag, int) and 0 <= tag <= 0xFFFFFFFF for tag in value):
        raise ValueError(f"{name} holds something that is not a 32-bit tag")
    return b"".join(_AT.pack(tag >> 16, tag & 0xFFFF) for tag in value)


_WRITERS = {"US": _write_us, "UI": _write_ui, "AE": _write_ae, "LO": _write_lo, "AT": _write_at}
