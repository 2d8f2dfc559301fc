"""The little DICOM the tunnel needs: read the A-ASSOCIATE-RQ, build A-ASSOCIATE-RJ and A-ABORT.

Theory of operation: the tunnel routes an association by its called AE title, which sits in the first PDU
the caller sends (PS3.8 §9.3.2). ``AssociateSniffer`` is fed the caller's first bytes in any chunking. From
the 6-byte PDU header it checks the type (0x01) and the announced length against ``max_pdu`` *before*
buffering the body, then waits for the whole PDU and returns an ``AssociateRequest`` holding the AE titles
and the exact bytes consumed, so they can be forwarded untouched. Bytes after the PDU are kept in ``rest``.
An HTTP request or a TLS ClientHello fails on the first byte.

What the caller is told depends on how far the bytes got. Not a DICOM association at all (wrong first PDU
type, a length above the cap or below the fixed fields): the caller is closed without a reply, because
it does not speak DICOM. A whole, well-framed A-ASSOCIATE-RQ whose called or calling AE field is not an
AE title (PS3.5 §6.2: a byte outside printable ASCII, a control character such as NUL, a backslash, or
nothing but spaces) is a DICOM tool talking to us: ``InvalidAeTitle`` carries the ``RejectReason`` to
answer with, 1/1/7 for the called title (checked first), 1/1/3 for the calling one. Any 16 bytes decode
safely; an invalid title only ever reaches a message through ``escape_ae``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from tunnel_core.codes import RejectReason
from tunnel_core.errors import InvalidAeTitle, MalformedPdu, NotAssociateRequest, PduTooLarge

A_ASSOCIATE_RQ = 0x01
A_ASSOCIATE_AC = 0x02
A_ASSOCIATE_RJ = 0x03
P_DATA_TF = 0x04
A_RELEASE_RQ = 0x05
A_RELEASE_RP = 0x06
A_ABORT = 0x07

PDU_HEADER = struct.Struct("!BBI")
PDU_HEADER_SIZE = PDU_HEADER.size
# protocol-version(2) reserved(2) called-AE(16) calling-AE(16) reserved(32)
_RQ_FIXED = 68
_CALLED = slice(PDU_HEADER_SIZE + 4, PDU_HEADER_SIZE + 20)
_CALLING = slice(PDU_HEADER_SIZE + 20, PDU_HEADER_SIZE + 36)
DEFAULT_MAX_ASSOCIATE_RQ = 1024 * 1024


@dataclass(frozen=True, slots=True)
class AssociateRequest:
    called_ae: str
    calling_ae: str
    pdu: bytes  # the whole A-ASSOCIATE-RQ PDU, exactly as received


class AssociateSniffer:
    """Feed the caller's first bytes; ``feed`` returns None until the whole A-ASSOCIATE-RQ is in.

    Raises ``NotAssociateRequest``, ``PduTooLarge`` or ``MalformedPdu`` (all ``DicomError``) as soon as
    the bytes show it: the caller should be closed without a reply. Once the whole PDU is in, a called or
    calling AE field that is not an AE title raises ``InvalidAeTitle`` (a ``MalformedPdu``) instead: answer
    the caller ``associate_reject(exc.reason)``. After a request is returned, ``rest`` holds any bytes that
    followed it.
    """

    def __init__(self, max_pdu: int = DEFAULT_MAX_ASSOCIATE_RQ) -> None:
        self._max_pdu = max_pdu
        self._buf = bytearray()
        self._need: int | None = None
        self.rest = b""

    def feed(self, data: bytes) -> AssociateRequest | None:
        self._buf += data
        if self._need is None:
            self._read_header()
            if self._need is None:
                return None
        if len(self._buf) < self._need:
            return None
        pdu = bytes(self._buf[:self._need])
        self.rest = bytes(self._buf[self._need:])
        self._buf.clear()
        called = _ae(pdu[_CALLED], "called", RejectReason.CALLED_AE_UNKNOWN)
        calling = _ae(pdu[_CALLING], "calling", RejectReason.CALLING_AE_NOT_ALLOWED)
        return AssociateRequest(called, calling, pdu)

    def _read_header(self) -> None:
        if self._buf and self._buf[0] != A_ASSOCIATE_RQ:
            raise NotAssociateRequest(f"first PDU type 0x{self._buf[0]:02x} is not A-ASSOCIATE-RQ")
        if len(self._buf) < PDU_HEADER_SIZE:
            return
        _type, _reserved, length = PDU_HEADER.unpack_from(self._buf)
        if length + PDU_HEADER_SIZE > self._max_pdu:
            raise PduTooLarge(f"A-ASSOCIATE-RQ of {length} bytes exceeds the cap of {self._max_pdu}")
        if length < _RQ_FIXED:
            raise MalformedPdu(f"A-ASSOCIATE-RQ length {length} is shorter than its fixed fields")
        self._need = PDU_HEADER_SIZE + length


def _ae(raw: bytes, which: str, reason: RejectReason) -> str:
    """The title of a 16-byte AE field, leading and trailing spaces dropped (they are not significant)."""
    title = raw.strip(b" ")
    if not title or not all(0x20 <= b < 0x7F and b != 0x5C for b in title):
        raise InvalidAeTitle(f"{which} AE title '{escape_ae(raw)}' is not a valid AE title",
                             which=which, title=raw, reason=reason)
    return title.decode("ascii")


def escape_ae(raw: bytes) -> str:
    """An AE field as a short, log-safe string: trailing spaces dropped, printable ASCII as is, every other
    byte and the backslash as ``\\xNN`` (so the result is unambiguous and never breaks a log line)."""
    return "".join(chr(b) if 0x20 <= b < 0x7F and b != 0x5C else f"\\x{b:02x}" for b in raw.rstrip(b" "))


def rewrite_called_ae(pdu: bytes, called_ae: str) -> bytes:
    """The same A-ASSOCIATE-RQ with its called AE title replaced (agent-side rewrite)."""
    raw = called_ae.encode("ascii")
    if not 1 <= len(raw) <= 16:
        raise ValueError("AE title must be 1-16 ASCII characters")
    return pdu[:_CALLED.start] + raw.ljust(16, b" ") + pdu[_CALLED.stop:]


def associate_reject(reason: RejectReason) -> bytes:
    result, source, diag = reason.value
    return PDU_HEADER.pack(A_ASSOCIATE_RJ, 0, 4) + bytes([0, result, source, diag])


def abort(source: int = 2, reason: int = 0) -> bytes:
    """A-ABORT; source 2 = service provider (the tunnel), reason 0 = not specified."""
    return PDU_HEADER.pack(A_ABORT, 0, 4) + bytes([0, 0, source, reason])


def parse_reject(pdu: bytes) -> tuple[int, int, int]:
    """(result, source, reason) of an A-ASSOCIATE-RJ PDU; used by tests and diagnostics."""
    if len(pdu) != 10 or pdu[0] != A_ASSOCIATE_RJ:
        raise MalformedPdu("not an A-ASSOCIATE-RJ PDU")
    return pdu[7], pdu[8], pdu[9]
