"""Raw DICOM upper-layer PDUs (PS3.8 §9.3) for the association probes and the accept-all SCP (pure).

The probe's A-ASSOCIATE-RQ is encoded by pynetdicom (an independent encoder, proposing Verification).
The accept-all SCP answers with :func:`associate_ac`, which accepts every proposed presentation context
with the first transfer syntax proposed for it. :class:`PduBuffer` splits a byte stream into whole PDUs
under a size limit checked before buffering (a 32-bit length from the wire is never trusted).
"""

from __future__ import annotations

import struct

__all__ = [
    "A_ABORT",
    "A_ASSOCIATE_AC",
    "A_ASSOCIATE_RJ",
    "A_ASSOCIATE_RQ",
    "A_RELEASE_RP",
    "A_RELEASE_RQ",
    "PduBuffer",
    "PduError",
    "RELEASE_RP",
    "RELEASE_RQ",
    "associate_ac",
    "associate_rq",
    "pdu_type",
]

A_ASSOCIATE_RQ, A_ASSOCIATE_AC, A_ASSOCIATE_RJ = 0x01, 0x02, 0x03
P_DATA_TF, A_RELEASE_RQ, A_RELEASE_RP, A_ABORT = 0x04, 0x05, 0x06, 0x07
RELEASE_RQ = bytes([A_RELEASE_RQ, 0]) + struct.pack(">I", 4) + bytes(4)
RELEASE_RP = bytes([A_RELEASE_RP, 0]) + struct.pack(">I", 4) + bytes(4)

APPLICATION_CONTEXT = b"1.2.840.10008.3.1.1.1"
VERIFICATION = "1.2.840.10008.1.1"
IMPLEMENTATION_UID = b"2.25.84616062262935271151926003447102917331"
MAX_PDU_RECEIVED = 16384
_FIXED_FIELDS = 68  # protocol version, reserved, called AE, calling AE, 32 reserved bytes
_ITEM_APP_CONTEXT, _ITEM_PC_RQ, _ITEM_PC_AC = 0x10, 0x20, 0x21
_ITEM_TRANSFER_SYNTAX, _ITEM_USER_INFO, _ITEM_MAX_LENGTH, _ITEM_IMPL_UID = 0x40, 0x50, 0x51, 0x52


class PduError(ValueError):
    """Bytes that are not the PDU expected here."""


def pdu_type(pdu: bytes) -> int:
    return pdu[0]


def associate_rq(called: str, calling: str) -> bytes:
    """A real A-ASSOCIATE-RQ proposing Verification (context 1), encoded by pynetdicom."""
    from pynetdicom.pdu import A_ASSOCIATE_RQ as Rq
    from pynetdicom.pdu_primitives import A_ASSOCIATE, MaximumLengthNotification
    from pynetdicom.presentation import build_context

    primitive = A_ASSOCIATE()
    primitive.application_context_name = APPLICATION_CONTEXT.decode()
    primitive.calling_ae_title = calling
    primitive.called_ae_title = called
    max_length = MaximumLengthNotification()
    max_length.maximum_length_received = MAX_PDU_RECEIVED
    primitive.user_information = [max_length]
    context = build_context(VERIFICATION)
    context.context_id = 1
    primitive.presentation_context_definition_list = [context]
    pdu = Rq()
    pdu.from_primitive(primitive)
    return pdu.encode()


def _items(data: bytes, start: int) -> list[tuple[int, bytes]]:
    """(type, value) of each item (1-byte type, 1 reserved, 2-byte length) from ``start`` to the end."""
    items, pos = [], start
    while pos < len(data):
        if pos + 4 > len(data):
            raise PduError("truncated item header")
        kind, length = data[pos], struct.unpack_from(">H", data, pos + 2)[0]
        if pos + 4 + length > len(data):
            raise PduError(f"item 0x{kind:02x} runs past the end of the PDU")
        items.append((kind, data[pos + 4:pos + 4 + length]))
        pos += 4 + length
    return items


def _item(kind: int, value: bytes) -> bytes:
    return struct.pack(">BBH", kind, 0, len(value)) + value


def _accepted_context(rq_item: bytes) -> bytes:
    """The A-ASSOCIATE-AC presentation context item accepting ``rq_item`` with its first transfer syntax."""
    context_id = rq_item[0]
    syntaxes = [value for kind, value in _items(rq_item, 4) if kind == _ITEM_TRANSFER_SYNTAX]
    if not syntaxes:
        raise PduError(f"presentation context {context_id} proposes no transfer syntax")
    return _item(_ITEM_PC_AC, bytes([context_id, 0, 0, 0]) + _item(_ITEM_TRANSFER_SYNTAX, syntaxes[0]))


def associate_ac(rq: bytes) -> bytes:
    """An A-ASSOCIATE-AC for A-ASSOCIATE-RQ ``rq`` that accepts every proposed presentation context."""
    if len(rq) < 6 + _FIXED_FIELDS or rq[0] != A_ASSOCIATE_RQ:
        raise PduError("not an A-ASSOCIATE-RQ")
    if struct.unpack_from(">I", rq, 2)[0] != len(rq) - 6:
        raise PduError("A-ASSOCIATE-RQ length field does not match its size")
    fixed = rq[6:6 + _FIXED_FIELDS]  # echoed: PS3.8 says the AC repeats the RQ's values here
    contexts = [_accepted_context(v) for kind, v in _items(rq, 6 + _FIXED_FIELDS) if kind == _ITEM_PC_RQ]
    user_info = _item(_ITEM_USER_INFO, _item(_ITEM_MAX_LENGTH, struct.pack(">I", MAX_PDU_RECEIVED))
                      + _item(_ITEM_IMPL_UID, IMPLEMENTATION_UID))
    body = fixed + _item(_ITEM_APP_CONTEXT, APPLICATION_CONTEXT) + b"".join(contexts) + user_info
    return struct.pack(">BBI", A_ASSOCIATE_AC, 0, len(body)) + body


class PduBuffer:
    """Splits a byte stream into whole PDUs. ``feed(data)`` returns the PDUs completed by ``data``."""

    def __init__(self, max_pdu: int = 1 << 20) -> None:
        self.max_pdu = max_pdu
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        self._buffer += data
        pdus = []
        while len(self._buffer) >= 6:
            length = struct.unpack_from(">I", self._buffer, 2)[0]
            if length > self.max_pdu:
                raise PduError(f"PDU of {length} bytes exceeds the limit of {self.max_pdu}")
            if len(self._buffer) < 6 + length:
                break
            pdus.append(bytes(self._buffer[:6 + length]))
            del self._buffer[:6 + length]
        return pdus

    @property
    def pending(self) -> int:
        """Bytes received that do not form a whole PDU yet."""
        return len(self._buffer)
