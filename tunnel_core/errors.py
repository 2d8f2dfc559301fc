"""The exception root of the pure core. Every error carries the wire code the adapter should send."""

from __future__ import annotations

from tunnel_core.codes import ErrorCode, RejectReason


class CoreError(Exception):
    """Root of every error raised by :mod:`tunnel_core`."""


class ProtocolError(CoreError):
    """The peer broke the mux protocol. The connection must be closed with GOAWAY(``code``)."""

    def __init__(self, message: str, code: ErrorCode = ErrorCode.PROTOCOL_ERROR) -> None:
        super().__init__(message)
        self.code = code


class FrameTooLarge(ProtocolError):
    """A frame header announced a payload above the configured limit. Nothing was buffered."""

    def __init__(self, length: int, limit: int) -> None:
        super().__init__(f"frame payload of {length} bytes exceeds the limit of {limit}",
                         ErrorCode.FRAME_SIZE_ERROR)


class FlowControlError(ProtocolError):
    """The peer sent more than the credit it was given."""

    def __init__(self, message: str) -> None:
        super().__init__(message, ErrorCode.FLOW_CONTROL_ERROR)


class UsageError(CoreError):
    """The local caller used the API out of order (e.g. sent on a closed stream). A bug, not a peer fault."""


class DicomError(CoreError):
    """The first bytes from a DICOM caller are not an acceptable A-ASSOCIATE-RQ."""


class NotAssociateRequest(DicomError):
    """The first PDU is not an A-ASSOCIATE-RQ (an HTTP request, a TLS ClientHello, garbage)."""


class PduTooLarge(DicomError):
    """The first PDU announced a length above the configured cap. Refused before buffering it."""


class MalformedPdu(DicomError):
    """An A-ASSOCIATE-RQ whose fixed fields cannot be read (short length, bad AE title)."""


class InvalidAeTitle(MalformedPdu):
    """A whole A-ASSOCIATE-RQ whose called or calling AE title is not an AE title (PS3.5 §6.2: non-ASCII,
    a control character, a backslash, or nothing but spaces). Unlike the other ``DicomError``s the caller
    is answered: ``reason`` is the A-ASSOCIATE-RJ to send, ``RejectReason.CALLED_AE_UNKNOWN`` (1/1/7) for
    the called title, ``RejectReason.CALLING_AE_NOT_ALLOWED`` (1/1/3) for the calling one. ``which`` is
    ``"called"`` or ``"calling"``; ``title`` is the field's 16 bytes as received (the message shows them
    escaped, never raw)."""

    def __init__(self, message: str, *, which: str, title: bytes, reason: RejectReason) -> None:
        super().__init__(message)
        self.which = which
        self.title = title
        self.reason = reason


class DatasetError(DicomError):
    """The first bytes of a dataset are not well-formed in its transfer syntax (an element out of order, an
    invalid VR, an undefined length where none may be, sequences nested too deep), or they are deflated.
    Raised by ``tunnel_core.dicom.dataset.peek_elements`` only; a caller treats the elements as unknown."""


class DimseError(DicomError):
    """A DIMSE command set (PS3.7 §9.3, §10.3) that cannot be read: bytes outside group 0000, out of
    order, cut short or wrong for their VR, a mandatory element missing, an unknown command field. The
    only exception ``tunnel_core.dicom.dimse.decode_command`` lets escape, whatever the bytes. It is a
    peer's fault: the message cannot be understood, so the association cannot go on in step (A-ABORT)."""


class UnrecognizedPdu(MalformedPdu):
    """A PDU header whose type is none of the seven of PS3.8 §9.3 (A-ABORT reason 1, unrecognized PDU)."""


class UnrecognizedPduParameter(MalformedPdu):
    """An item or sub-item type where it is not allowed, e.g. a presentation-context result in an
    A-ASSOCIATE-RQ (A-ABORT reason 4, unrecognized PDU parameter)."""


class AssociationError(DicomError):
    """The peer broke the upper-layer protocol of an association (PS3.8 §9): it must be aborted.

    ``source`` and ``reason`` are the A-ABORT's (§9.3.8): source 2, the service provider, with reason
    1 unrecognized PDU, 2 unexpected PDU, 4 unrecognized PDU parameter, 5 unexpected PDU parameter or
    6 invalid PDU parameter value. ``abort_pdu`` is that A-ABORT: write it, then close the transport.
    """

    def __init__(self, message: str, *, source: int = 2, reason: int = 0) -> None:
        super().__init__(message)
        self.source = source
        self.reason = reason

    @property
    def abort_pdu(self) -> bytes:
        # type 0x07, reserved, length 4, reserved, reserved, source, reason
        return bytes([0x07, 0, 0, 0, 0, 4, 0, 0, self.source, self.reason])
