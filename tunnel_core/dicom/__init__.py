"""The DICOM the tunnel speaks, sans-IO: bytes in, events out, no sockets and no clock.

- :mod:`.sniffer`: the little a transparent route needs, the A-ASSOCIATE-RQ's AE titles and the refusals
  (A-ASSOCIATE-RJ, A-ABORT) the tunnel itself may send. Its names are re-exported here.
- :mod:`.pdu`: every upper-layer PDU (PS3.8 §9.3) parsed and built in full, and a bounded PDU reader.
- :mod:`.association`: the upper-layer protocol machine of one association, either role, with P-DATA
  reassembly that streams dataset fragments instead of holding a dataset whole.
- :mod:`.dimse`: DIMSE command sets (PS3.7 §9, §10; group 0000, implicit VR little endian) and statuses.

``docs/dicom.md`` says what is supported and what every parser failure becomes.
"""

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
    AssociateRequest,
    AssociateSniffer,
    RejectReason,
    abort,
    associate_reject,
    escape_ae,
    parse_reject,
    rewrite_called_ae,
)

__all__ = [
    "A_ABORT", "A_ASSOCIATE_AC", "A_ASSOCIATE_RJ", "A_ASSOCIATE_RQ", "A_RELEASE_RP", "A_RELEASE_RQ",
    "DEFAULT_MAX_ASSOCIATE_RQ", "P_DATA_TF", "PDU_HEADER", "PDU_HEADER_SIZE", "AssociateRequest",
    "AssociateSniffer", "RejectReason", "abort", "associate_reject", "escape_ae", "parse_reject",
    "rewrite_called_ae",
]
