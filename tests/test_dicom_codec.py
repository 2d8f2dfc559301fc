"""tunnel_core.dicom.pdu: every upper-layer PDU, decoded and encoded, and the bounded PDU reader.

Annotated hex vectors, every reader whole / byte by byte / with trailing bytes, hypothesis round trips,
differential checks against pynetdicom's PDU classes both ways, hostile inputs, and the fuzz target run over
generated inputs (tests/fuzz/fuzz_dicom_pdu.py runs the same body under atheris).
"""

from __future__ import annotations

import random
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pynetdicom import pdu as pn
from pynetdicom import pdu_items as pni
from pynetdicom import pdu_primitives as pnp
from pynetdicom.presentation import PresentationContext as PnContext

from tests.fuzz.fuzz_dicom_pdu import SEEDS, fuzz_one
from tunnel_core.codes import RejectReason
from tunnel_core.dicom import pdu
from tunnel_core.dicom.pdu import (
    PDV,
    Abort,
    AssociateAC,
    AssociateRJ,
    AssociateRQ,
    AsyncOperationsWindow,
    CommonExtendedNegotiation,
    ContextResult,
    ExtendedNegotiation,
    PDataTF,
    PduReader,
    PresentationContext,
    PresentationContextResult,
    ReleaseRP,
    ReleaseRQ,
    RoleSelection,
    UserIdentity,
    UserIdentityResponse,
    UserInformation,
)
from tunnel_core.errors import (
    InvalidAeTitle,
    MalformedPdu,
    PduTooLarge,
    UnrecognizedPdu,
    UnrecognizedPduParameter,
)

VERIFICATION = "1.2.840.10008.1.1"
CT = "1.2.840.10008.5.1.4.1.1.2"
IMPLICIT, EXPLICIT = "1.2.840.10008.1.2", "1.2.840.10008.1.2.1"
IMPL = "1.2.826.0.1.3680043.9.3811"

# --- annotated vectors ----------------------------------------------------------------------------------

RQ_VECTOR = b"".join([
    bytes.fromhex("01 00 00000156"),  # A-ASSOCIATE-RQ, reserved, PDU length 342
    bytes.fromhex("0001 0000"),  # protocol version 1, reserved
    b"PACS            ",  # called AE title: 16 bytes, space padded
    b"MODALITY        ",  # calling AE title
    bytes(32),  # reserved
    bytes.fromhex("10 00 0015"), b"1.2.840.10008.3.1.1.1",  # application context item (21): DICOM
    bytes.fromhex("20 00 002e 01 000000"),  # presentation context item (46): id 1, three reserved bytes
    bytes.fromhex("30 00 0011"), b"1.2.840.10008.1.1",  # .. abstract syntax (17): Verification
    bytes.fromhex("40 00 0011"), b"1.2.840.10008.1.2",  # .. transfer syntax (17): implicit VR little endian
    bytes.fromhex("20 00 004d 03 000000"),  # presentation context item (77): id 3
    bytes.fromhex("30 00 0019"), CT.encode(),  # .. abstract syntax (25): CT Image Storage
    bytes.fromhex("40 00 0013"), b"1.2.840.10008.1.2.1",  # .. transfer syntax (19): explicit VR little endian
    bytes.fromhex("40 00 0011"), b"1.2.840.10008.1.2",  # .. transfer syntax (17): implicit VR little endian
    bytes.fromhex("50 00 0072"),  # user information item (114)
    bytes.fromhex("51 00 0004 00004000"),  # .. maximum length received: 16384
    bytes.fromhex("52 00 001a"), IMPL.encode(),  # .. implementation class UID (26)
    bytes.fromhex("55 00 000a"), b"TUNNEL_010",  # .. implementation version name (10)
    bytes.fromhex("53 00 0004 0005 0001"),  # .. asynchronous operations window: 5 invoked, 1 performed
    bytes.fromhex("54 00 001d 0019"), CT.encode(), bytes.fromhex("01 00"),  # .. role selection (29): SCU yes, SCP no
    bytes.fromhex("58 00 0011 02 01 0005"), b"alice",  # .. user identity (17): type 2, response requested, primary
    bytes.fromhex("0006"), b"secret",  # .. .. secondary field (the passcode)
])
RQ = AssociateRQ(
    "PACS", "MODALITY",
    (PresentationContext(1, VERIFICATION, (IMPLICIT,)), PresentationContext(3, CT, (EXPLICIT, IMPLICIT))),
    UserInformation(max_pdu_length=16384, implementation_class_uid=IMPL, implementation_version_name="TUNNEL_010",
                    async_window=AsyncOperationsWindow(5, 1), roles=(RoleSelection(CT, scu=True, scp=False),),
                    user_identity=UserIdentity(2, True, b"alice", b"secret")),
)

AC_VECTOR = b"".join([
    bytes.fromhex("02 00 000000e9"),  # A-ASSOCIATE-AC, reserved, PDU length 233
    bytes.fromhex("0001 0000"),  # protocol version 1, reserved
    b"PACS            ",  # called AE title, echoed (not tested on receipt)
    b"MODALITY        ",  # calling AE title, echoed
    bytes(32),  # reserved
    bytes.fromhex("10 00 0015"), b"1.2.840.10008.3.1.1.1",  # application context item (21)
    bytes.fromhex("21 00 0019 01 00 00 00"),  # presentation context result (25): id 1, reserved, acceptance, reserved
    bytes.fromhex("40 00 0011"), b"1.2.840.10008.1.2",  # .. transfer syntax chosen (17): implicit VR little endian
    bytes.fromhex("21 00 0008 03 00 04 00"),  # presentation context result (8): id 3, transfer syntaxes not supported
    bytes.fromhex("40 00 0000"),  # .. transfer syntax: empty, not significant when rejected
    bytes.fromhex("50 00 005f"),  # user information item (95)
    bytes.fromhex("51 00 0004 00008000"),  # .. maximum length received: 32768
    bytes.fromhex("52 00 001a"), IMPL.encode(),  # .. implementation class UID (26)
    bytes.fromhex("55 00 000a"), b"TUNNEL_010",  # .. implementation version name (10)
    bytes.fromhex("54 00 001d 0019"), CT.encode(), bytes.fromhex("01 00"),  # .. role selection accepted: SCU
    bytes.fromhex("59 00 0006 0004"), b"ACK1",  # .. user identity server response (6): length 4
])
AC = AssociateAC(
    "PACS", "MODALITY",
    (PresentationContextResult(1, ContextResult.ACCEPTANCE, IMPLICIT),
     PresentationContextResult(3, ContextResult.TRANSFER_SYNTAXES_NOT_SUPPORTED, "")),
    UserInformation(max_pdu_length=32768, implementation_class_uid=IMPL, implementation_version_name="TUNNEL_010",
                    roles=(RoleSelection(CT, scu=True, scp=False),),
                    user_identity_response=UserIdentityResponse(b"ACK1")),
)

PDATA_VECTOR = b"".join([
    bytes.fromhex("04 00 00000013"),  # P-DATA-TF, reserved, PDU length 19
    bytes.fromhex("00000006 01 03"), bytes.fromhex("08000000"),  # PDV (6): context 1, command + last, 4 bytes
    bytes.fromhex("00000005 01 00"), b"abc",  # PDV (5): context 1, dataset, not last, 3 bytes
])
PDATA = PDataTF((PDV(1, True, True, bytes.fromhex("08000000")), PDV(1, False, False, b"abc")))

VECTORS: list[tuple[str, bytes, pdu.Pdu]] = [
    ("associate-rq", RQ_VECTOR, RQ),
    ("associate-ac", AC_VECTOR, AC),
    # type rsvd length       rsvd result source reason: rejected permanent, service user, called AE unknown
    ("associate-rj", bytes.fromhex("03 00 00000004 00 01 01 07"), AssociateRJ(1, 1, 7)),
    ("p-data-tf", PDATA_VECTOR, PDATA),
    # type rsvd length       four reserved bytes
    ("release-rq", bytes.fromhex("05 00 00000004 00000000"), ReleaseRQ()),
    ("release-rp", bytes.fromhex("06 00 00000004 00000000"), ReleaseRP()),
    # type rsvd length       rsvd rsvd source reason: service provider, invalid PDU parameter value
    ("abort", bytes.fromhex("07 00 00000004 00 00 02 06"), Abort(2, 6)),
]
IDS = [name for name, _, _ in VECTORS]


@pytest.mark.parametrize(("name", "wire", "value"), VECTORS, ids=IDS)
def test_vector_decodes_and_encodes(name: str, wire: bytes, value: pdu.Pdu) -> None:
    assert pdu.decode(wire) == value
    assert pdu.encode(value) == wire


@pytest.mark.parametrize(("name", "wire", "value"), VECTORS, ids=IDS)
def test_vector_read_by_pynetdicom_as_the_same_fields(name: str, wire: bytes, value: pdu.Pdu) -> None:
    assert from_pynetdicom(pynetdicom_decode(wire)) == value


def test_reject_from_reason() -> None:
    assert AssociateRJ.from_reason(RejectReason.CAPACITY) == AssociateRJ(2, 3, 2)


def test_credentials_and_data_stay_out_of_repr() -> None:
    assert "secret" not in repr(RQ) and "alice" not in repr(RQ)
    assert "ACK1" not in repr(AC)
    assert "abc" not in repr(PDATA)


# --- the reader: whole, byte by byte, with trailing bytes ------------------------------------------------


@pytest.mark.parametrize(("name", "wire", "value"), VECTORS, ids=IDS)
def test_reader_whole(name: str, wire: bytes, value: pdu.Pdu) -> None:
    reader = PduReader(1024)
    assert reader.receive_data(wire) == [value]
    assert reader.buffered == 0


@pytest.mark.parametrize(("name", "wire", "value"), VECTORS, ids=IDS)
def test_reader_one_byte_at_a_time(name: str, wire: bytes, value: pdu.Pdu) -> None:
    reader = PduReader(1024)
    for i, byte in enumerate(wire[:-1]):
        assert reader.receive_data(bytes([byte])) == []
        assert reader.buffered == i + 1
    assert reader.receive_data(wire[-1:]) == [value]
    assert reader.buffered == 0


@pytest.mark.parametrize(("name", "wire", "value"), VECTORS, ids=IDS)
def test_reader_with_trailing_bytes(name: str, wire: bytes, value: pdu.Pdu) -> None:
    reader = PduReader(1024)
    following = RQ_VECTOR[:40]
    assert reader.receive_data(wire + following) == [value]
    assert reader.buffered == len(following)
    assert reader.receive_data(RQ_VECTOR[40:] + wire) == [RQ, value]


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_reader_under_any_chunking(data: st.DataObject) -> None:
    order = data.draw(st.lists(st.sampled_from(VECTORS), min_size=1, max_size=8))
    wire = b"".join(w for _, w, _ in order)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=12)))
    reader = PduReader(1024)
    got = []
    for start, end in zip([0, *cuts], [*cuts, len(wire)], strict=True):
        got += reader.receive_data(memoryview(wire)[start:end])
    assert got == [value for _, _, value in order]
    assert reader.buffered == 0


def test_reader_limit_may_change_between_calls() -> None:
    """The maximum length is known only after negotiation: ``max_pdu`` is set then."""
    with pytest.raises(PduTooLarge):
        PduReader(18).receive_data(PDATA_VECTOR)  # its body is 19 bytes
    reader = PduReader(18)
    reader.max_pdu = 19
    assert reader.receive_data(PDATA_VECTOR) == [PDATA]


def test_reader_buffering_stays_linear() -> None:
    """A 1 MiB P-DATA-TF fed in 1 KiB pieces: never more than one PDU held, and one decode."""
    body = bytes(1024 * 1024)
    wire = pdu.encode_pdv(1, False, True, body)
    reader = PduReader(len(body) + 6)
    for start in range(0, len(wire) - 1, 1024):
        end = min(start + 1024, len(wire) - 1)
        assert reader.receive_data(wire[start:end]) == []
        assert reader.buffered == end
    assert reader.receive_data(wire[-1:]) == [PDataTF((PDV(1, False, True, body),))]
    assert reader.buffered == 0


# --- hostile inputs -------------------------------------------------------------------------------------


@pytest.mark.parametrize("pdu_type", [1, 2, 3, 4, 5, 6, 7])
def test_a_length_above_the_cap_is_refused_on_the_header(pdu_type: int) -> None:
    header = struct.pack("!BBI", pdu_type, 0, 0xFFFFFFFF)
    reader = PduReader(16384)
    assert reader.receive_data(header[:5]) == []
    with pytest.raises((PduTooLarge, MalformedPdu)):  # fixed-size PDUs: the length is wrong as well as big
        reader.receive_data(header[5:])
    assert reader.buffered == 6


def test_caps_count_what_the_standard_counts() -> None:
    """A P-DATA-TF's cap is its body (the negotiated maximum length); every other PDU's is the whole PDU."""
    assert PduReader(100).receive_data(struct.pack("!BBI", 4, 0, 100)) == []
    with pytest.raises(PduTooLarge):
        PduReader(100).receive_data(struct.pack("!BBI", 4, 0, 101))
    assert PduReader(100, max_associate_pdu=1000).receive_data(struct.pack("!BBI", 1, 0, 994)) == []
    with pytest.raises(PduTooLarge):
        PduReader(100, max_associate_pdu=1000).receive_data(struct.pack("!BBI", 1, 0, 995))


@pytest.mark.parametrize("first", [0x00, 0x08, 0x16, 0x47, 0xFF])
def test_unknown_pdu_type_fails_on_the_first_byte(first: int) -> None:
    with pytest.raises(UnrecognizedPdu):
        PduReader(1024).receive_data(bytes([first]))
    with pytest.raises(UnrecognizedPdu):
        pdu.decode(bytes([first]) + bytes.fromhex("00 00000004 00000000"))


@pytest.mark.parametrize("length", [0, 3, 5, 0x10000])
@pytest.mark.parametrize("pdu_type", [3, 5, 6, 7])
def test_fixed_size_pdus_with_another_length(pdu_type: int, length: int) -> None:
    with pytest.raises(MalformedPdu):
        PduReader(1024).receive_data(struct.pack("!BBI", pdu_type, 0, length))


def _replace(wire: bytes, old: bytes, new: bytes) -> bytes:
    assert wire.count(old) >= 1
    return wire.replace(old, new, 1)


def _rq_variable(*items: bytes) -> bytes:
    """An A-ASSOCIATE-RQ with the vector's fixed fields and the variable items given."""
    body = RQ_VECTOR[6:74] + b"".join(items)
    return struct.pack("!BBI", 1, 0, len(body)) + body


def _with_ac_items(*items: bytes) -> bytes:
    body = AC_VECTOR[6:74] + b"".join(items)
    return struct.pack("!BBI", 2, 0, len(body)) + body


APP = bytes.fromhex("10 00 0015") + b"1.2.840.10008.3.1.1.1"
CTX = (bytes.fromhex("20 00 002e 01 000000 30 00 0011") + VERIFICATION.encode()
       + bytes.fromhex("40 00 0011") + IMPLICIT.encode())
USER = bytes.fromhex("50 00 0008 51 00 0004 00004000")

HOSTILE = [
    ("empty", b"", MalformedPdu),
    ("header-only-short", bytes.fromhex("01 00 0000"), MalformedPdu),
    ("length-beyond-data", RQ_VECTOR[:-1], MalformedPdu),
    ("length-short-of-data", RQ_VECTOR + b"\x00", MalformedPdu),
    ("rq-shorter-than-fixed", struct.pack("!BBI", 1, 0, 67) + bytes(67), MalformedPdu),
    ("item-longer-than-pdu", _rq_variable(APP, CTX, bytes.fromhex("50 00 0100 51 00 0004 00004000")), MalformedPdu),
    ("sub-item-longer-than-item", _rq_variable(APP, CTX, bytes.fromhex("50 00 0008 51 00 0005 00004000")),
     MalformedPdu),
    ("truncated-item-header", _rq_variable(APP, CTX, USER, bytes.fromhex("50 00")), MalformedPdu),
    ("bytes-left-in-sub-item", _rq_variable(APP, CTX, bytes.fromhex("50 00 0009 51 00 0005 00004000 00")),
     MalformedPdu),
    ("no-application-context", _rq_variable(CTX, USER), MalformedPdu),
    ("two-application-contexts", _rq_variable(APP, APP, CTX, USER), MalformedPdu),
    ("no-presentation-context", _rq_variable(APP, USER), MalformedPdu),
    ("two-user-informations", _rq_variable(APP, CTX, USER, USER), MalformedPdu),
    ("two-max-lengths", _rq_variable(APP, CTX, bytes.fromhex("50 00 0010 51 00 0004 00004000 51 00 0004 00001000")),
     MalformedPdu),
    ("ac-item-in-rq", _rq_variable(APP, _replace(CTX, b"\x20", b"\x21"), USER), UnrecognizedPduParameter),
    ("unknown-item-in-rq", _rq_variable(APP, CTX, USER, bytes.fromhex("60 00 0000")), UnrecognizedPduParameter),
    ("unknown-item-in-context", _rq_variable(APP, _replace(CTX, b"\x40\x00\x00\x11", b"\x41\x00\x00\x11"), USER),
     UnrecognizedPduParameter),
    ("identity-response-in-rq", _rq_variable(APP, CTX, bytes.fromhex("50 00 0006 59 00 0002 0000")),
     UnrecognizedPduParameter),
    ("even-context-id", _rq_variable(APP, _replace(CTX, b"\x20\x00\x00\x2e\x01", b"\x20\x00\x00\x2e\x02"), USER),
     MalformedPdu),
    ("repeated-context-id", _rq_variable(APP, CTX, CTX, USER), MalformedPdu),
    ("context-without-transfer-syntax", _rq_variable(APP, bytes.fromhex("20 00 0019 01 000000 30 00 0011")
                                                     + b"1.2.840.10008.1.1", USER), MalformedPdu),
    ("non-ascii-uid", _replace(RQ_VECTOR, b"1.2.840.10008.1.1", "1.2.840.10008.1.é".encode("latin-1")), MalformedPdu),
    ("control-character-in-uid", _replace(RQ_VECTOR, b"1.2.840.10008.1.1", b"1.2.840.10\n08.1.1"), MalformedPdu),
    ("empty-uid", _rq_variable(bytes.fromhex("10 00 0000"), CTX, USER), MalformedPdu),
    ("uid-over-64", _rq_variable(bytes.fromhex("10 00 0041") + b"1" * 65, CTX, USER), MalformedPdu),
    ("role-flag-not-0-or-1", _replace(RQ_VECTOR, CT.encode() + b"\x01\x00", CT.encode() + b"\x02\x00"), MalformedPdu),
    ("identity-field-beyond-item", _replace(RQ_VECTOR, b"\x00\x06secret", b"\x00\x07secret"), MalformedPdu),
    ("version-name-over-16", _rq_variable(APP, CTX, bytes.fromhex("50 00 0015 55 00 0011") + b"V" * 17), MalformedPdu),
    ("bad-called-ae", _replace(RQ_VECTOR, b"PACS ", b"PA\x00S "), InvalidAeTitle),
    ("blank-calling-ae", _replace(RQ_VECTOR, b"MODALITY        ", b" " * 16), InvalidAeTitle),
    ("ac-even-context-id", _replace(AC_VECTOR, bytes.fromhex("21 00 0019 01"), bytes.fromhex("21 00 0019 02")),
     MalformedPdu),
    ("ac-accepted-without-syntax", _replace(AC_VECTOR, bytes.fromhex("21 00 0008 03 00 04 00"),
                                            bytes.fromhex("21 00 0008 03 00 00 00")), MalformedPdu),
    ("ac-result-out-of-range", _replace(AC_VECTOR, bytes.fromhex("21 00 0008 03 00 04 00"),
                                        bytes.fromhex("21 00 0008 03 00 05 00")), MalformedPdu),
    ("ac-rq-item", _replace(AC_VECTOR, bytes.fromhex("21 00 0008 03"), bytes.fromhex("20 00 0008 03")),
     UnrecognizedPduParameter),
    ("ac-identity-in-ac", _replace(AC_VECTOR, bytes.fromhex("59 00 0006 0004"), bytes.fromhex("58 00 0006 0004")),
     UnrecognizedPduParameter),
    ("two-abstract-syntaxes", _rq_variable(APP, bytes.fromhex("20 00 0043 01 000000") + CTX[8:29] + CTX[8:], USER),
     MalformedPdu),
    ("ac-abstract-syntax-in-result", _with_ac_items(APP, bytes.fromhex("21 00 0008 01 00 00 00 30 00 0000"), USER),
     UnrecognizedPduParameter),
    ("ac-two-transfer-syntaxes", _with_ac_items(APP, bytes.fromhex("21 00 002e 01 00 00 00") + CTX[29:] * 2, USER),
     MalformedPdu),
    ("pdv-length-below-2", bytes.fromhex("04 00 00000006 00000001 0100"), MalformedPdu),
    ("pdv-beyond-pdu", bytes.fromhex("04 00 00000007 00000004 01 02 00"), MalformedPdu),
    ("p-data-without-pdv", bytes.fromhex("04 00 00000000"), MalformedPdu),
]


@pytest.mark.parametrize(("name", "wire", "error"), HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_pdus_raise_the_documented_error(name: str, wire: bytes, error: type[Exception]) -> None:
    with pytest.raises(error) as info:
        pdu.decode(wire)
    assert str(info.value).isprintable() and len(str(info.value)) < 200


def test_lenient_where_the_standard_says_not_to_test() -> None:
    """Reserved bytes, padded UIDs, items in another order, a rejected context's syntax, AC echo titles,
    a user identity without its secondary field length: all read."""
    reserved = bytearray(RQ_VECTOR)
    reserved[1] = reserved[8] = reserved[9] = reserved[50] = reserved[75] = 0xFF  # PDU, fixed fields, an item
    assert pdu.decode(bytes(reserved)) == RQ
    plain = pdu.decode(_rq_variable(APP, CTX, USER))
    padded = (bytes.fromhex("20 00 0030 01 000000 30 00 0012") + b"1.2.840.10008.1.1\x00"
              + bytes.fromhex("40 00 0012") + b"1.2.840.10008.1.2 ")
    assert pdu.decode(_rq_variable(APP, padded, USER)) == plain
    assert pdu.decode(_rq_variable(USER, CTX, APP)) == plain
    garbage_syntax = bytes.fromhex("21 00 000a 03 00 04 00 40 00 0002 fffe")  # rejected: not tested
    no_syntax = bytes.fromhex("21 00 0004 05 00 03 00")
    ac = pdu.decode(_with_ac_items(APP, garbage_syntax, no_syntax, USER))
    assert isinstance(ac, AssociateAC)
    assert ac.contexts == (PresentationContextResult(3, ContextResult.TRANSFER_SYNTAXES_NOT_SUPPORTED, ""),
                           PresentationContextResult(5, ContextResult.ABSTRACT_SYNTAX_NOT_SUPPORTED, ""))
    echo = pdu.decode(_replace(AC_VECTOR, b"PACS            ", b"\xffACS\\\x00          "))
    assert isinstance(echo, AssociateAC) and echo.called_ae == ""
    no_secondary = _rq_variable(APP, CTX, bytes.fromhex("50 00 000b 58 00 0007 01 00 0003") + b"bob")
    decoded = pdu.decode(no_secondary)
    assert isinstance(decoded, AssociateRQ) and decoded.user.user_identity == UserIdentity(1, False, b"bob")


def test_unknown_user_information_sub_items_are_kept_in_order() -> None:
    wire = _rq_variable(APP, CTX, bytes.fromhex("50 00 0014 51 00 0004 00004000 7f 00 0002 abcd 00 00 0002 0102"))
    decoded = pdu.decode(wire)
    assert isinstance(decoded, AssociateRQ)
    assert decoded.user.unknown == ((0x7F, b"\xab\xcd"), (0x00, b"\x01\x02"))
    assert pdu.encode(decoded) == wire


@settings(max_examples=500, deadline=None)
@given(data=st.binary(max_size=400))
def test_random_bytes_raise_only_malformed_pdu(data: bytes) -> None:
    try:
        pdu.decode(data)
    except MalformedPdu:
        pass


@settings(max_examples=500, deadline=None)
@given(data=st.data())
def test_mutated_vectors_raise_only_malformed_pdu(data: st.DataObject) -> None:
    _name, wire, _value = data.draw(st.sampled_from(VECTORS))
    mutated = bytearray(wire)
    for _ in range(data.draw(st.integers(1, 4))):
        mutated[data.draw(st.integers(0, len(mutated) - 1))] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(mutated)))
    try:
        decoded = pdu.decode(bytes(mutated[:cut]))
    except MalformedPdu:
        return
    assert pdu.decode(pdu.encode(decoded)) == decoded


# --- encoding refuses what cannot be encoded -----------------------------------------------------------

BAD_ENCODES = [
    ("ae-too-long", AssociateRQ("X" * 17, "B", RQ.contexts)),
    ("ae-blank", AssociateRQ("  ", "B", RQ.contexts)),
    ("ae-backslash", AssociateRQ("A\\B", "B", RQ.contexts)),
    ("ae-non-ascii", AssociateRQ("PACSÉ", "B", RQ.contexts)),
    ("no-context", AssociateRQ("A", "B", ())),
    ("even-context", AssociateRQ("A", "B", (PresentationContext(2, VERIFICATION, (IMPLICIT,)),))),
    ("repeated-context", AssociateRQ("A", "B", RQ.contexts[:1] * 2)),
    ("no-transfer-syntax", AssociateRQ("A", "B", (PresentationContext(1, VERIFICATION, ()),))),
    ("uid-too-long", AssociateRQ("A", "B", (PresentationContext(1, "1" * 65, (IMPLICIT,)),))),
    ("uid-empty", AssociateRQ("A", "B", RQ.contexts, application_context="")),
    ("uid-non-ascii", AssociateRQ("A", "B", (PresentationContext(1, "1.2.é", (IMPLICIT,)),))),
    ("max-length-over-32-bits", AssociateRQ("A", "B", RQ.contexts, UserInformation(max_pdu_length=1 << 32))),
    ("identity-response-in-rq", AssociateRQ("A", "B", RQ.contexts,
                                            UserInformation(user_identity_response=UserIdentityResponse(b"")))),
    ("identity-in-ac", AssociateAC("A", "B", (), UserInformation(user_identity=UserIdentity(1, False, b"x")))),
    ("known-type-as-unknown", AssociateRQ("A", "B", RQ.contexts, UserInformation(unknown=((0x51, b"1234"),)))),
    ("version-name-too-long", AssociateRQ("A", "B", RQ.contexts,
                                          UserInformation(implementation_version_name="X" * 17))),
    ("accepted-without-syntax", AssociateAC("A", "B", (PresentationContextResult(1, ContextResult.ACCEPTANCE, ""),))),
    ("identity-over-16-bits", AssociateRQ("A", "B", RQ.contexts,
                                          UserInformation(user_identity=UserIdentity(1, False, bytes(70000))))),
    ("sub-item-over-16-bits", AssociateRQ("A", "B", RQ.contexts, UserInformation(unknown=((0x7F, bytes(70000)),)))),
    ("empty-p-data", PDataTF(())),
    ("context-id-over-8-bits", PDataTF((PDV(256, True, True, b""),))),
    ("reject-field-over-8-bits", AssociateRJ(256, 1, 1)),
    ("abort-negative", Abort(-1, 0)),
]


@pytest.mark.parametrize(("name", "value"), BAD_ENCODES, ids=[b[0] for b in BAD_ENCODES])
def test_encode_refuses_what_cannot_be_encoded(name: str, value: pdu.Pdu) -> None:
    with pytest.raises(ValueError):
        pdu.encode(value)


def test_encode_refuses_what_is_not_a_pdu() -> None:
    with pytest.raises(TypeError):
        pdu.encode("A-ABORT")  # type: ignore[arg-type]


def test_uids_are_written_without_padding() -> None:
    """PS3.8 Annex F / PS3.5 §9.1: no trailing NUL in network negotiation, odd lengths included."""
    wire = pdu.encode(RQ)
    assert b"1.2.840.10008.1.1\x00" not in wire and b"\x00\x11" + VERIFICATION.encode() in wire


# --- hypothesis round trips -----------------------------------------------------------------------------

_PRINTABLE = st.characters(min_codepoint=0x21, max_codepoint=0x7E)
conformant_uids = st.from_regex(r"[1-9][0-9]{0,4}(\.(0|[1-9][0-9]{0,4})){1,8}", fullmatch=True)
uids = st.one_of(conformant_uids, st.text(_PRINTABLE, min_size=1, max_size=64))
ae_titles = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E, exclude_characters="\\"),
                    min_size=1, max_size=16).map(str.strip).filter(bool)
context_ids = st.lists(st.integers(0, 127).map(lambda n: 2 * n + 1), min_size=1, max_size=6, unique=True)
u16 = st.integers(0, 0xFFFF)


@st.composite
def proposed_contexts(draw: st.DrawFn, uid: st.SearchStrategy[str] = uids) -> tuple[PresentationContext, ...]:
    return tuple(PresentationContext(cid, draw(uid), tuple(draw(st.lists(uid, min_size=1, max_size=4, unique=True))))
                 for cid in draw(context_ids))


@st.composite
def context_results(draw: st.DrawFn, uid: st.SearchStrategy[str] = uids, empty: bool = True
                    ) -> tuple[PresentationContextResult, ...]:
    results = []
    for cid in draw(context_ids):
        result = draw(st.sampled_from(ContextResult))
        rejected = st.one_of(st.just(""), uid) if empty else uid
        syntax = draw(uid) if result is ContextResult.ACCEPTANCE else draw(rejected)
        results.append(PresentationContextResult(cid, result, syntax))
    return tuple(results)


def user_information(requested: bool, uid: st.SearchStrategy[str] = uids, unknown: bool = True
                     ) -> st.SearchStrategy[UserInformation]:
    identity = st.builds(UserIdentity, st.integers(0, 255), st.booleans(), st.binary(max_size=40),
                         st.binary(max_size=40))
    return st.builds(
        UserInformation,
        max_pdu_length=st.none() | st.integers(0, 0xFFFFFFFF),
        implementation_class_uid=st.none() | uid,
        implementation_version_name=st.none() | st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E),
                                                         max_size=16).map(str.rstrip),
        async_window=st.none() | st.builds(AsyncOperationsWindow, u16, u16),
        roles=st.lists(st.builds(RoleSelection, uid, st.booleans(), st.booleans()), max_size=3).map(tuple),
        extended=st.lists(st.builds(ExtendedNegotiation, uid, st.binary(max_size=20)), max_size=2).map(tuple),
        common_extended=st.lists(st.builds(CommonExtendedNegotiation, uid, uid,
                                           st.lists(uid, max_size=3).map(tuple)), max_size=2).map(tuple),
        user_identity=st.none() | identity if requested else st.none(),
        user_identity_response=st.none() if requested else st.none() | st.builds(UserIdentityResponse,
                                                                                 st.binary(max_size=40)),
        unknown=st.lists(st.tuples(st.integers(0, 255).filter(lambda t: not 0x51 <= t <= 0x59),
                                   st.binary(max_size=20)), max_size=3 if unknown else 0).map(tuple),
    )


def associate_rqs(uid: st.SearchStrategy[str] = uids, unknown: bool = True) -> st.SearchStrategy[AssociateRQ]:
    return st.builds(AssociateRQ, ae_titles, ae_titles, proposed_contexts(uid), user_information(True, uid, unknown),
                     uid, u16)


def associate_acs(uid: st.SearchStrategy[str] = uids, unknown: bool = True) -> st.SearchStrategy[AssociateAC]:
    return st.builds(AssociateAC, ae_titles | st.just(""), ae_titles | st.just(""), context_results(uid),
                     user_information(False, uid, unknown), uid, u16)


pdvs = st.builds(PDV, st.integers(0, 255), st.booleans(), st.booleans(), st.binary(max_size=64))
byte = st.integers(0, 255)
pdus = st.one_of(
    associate_rqs(), associate_acs(), st.builds(AssociateRJ, byte, byte, byte),
    st.lists(pdvs, min_size=1, max_size=5).map(lambda p: PDataTF(tuple(p))),
    st.just(ReleaseRQ()), st.just(ReleaseRP()), st.builds(Abort, byte, byte),
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(value=pdus)
def test_decode_encode_round_trip(value: pdu.Pdu) -> None:
    wire = pdu.encode(value)
    assert pdu.decode(wire) == value
    assert pdu.encode(pdu.decode(wire)) == wire


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(values=st.lists(pdus, min_size=1, max_size=4), data=st.data())
def test_generated_pdus_through_the_reader_in_any_chunking(values: list[pdu.Pdu], data: st.DataObject) -> None:
    wire = b"".join(pdu.encode(v) for v in values)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=6)))
    reader = PduReader(0xFFFFFFFF, 0xFFFFFFFF)
    got = []
    for start, end in zip([0, *cuts], [*cuts, len(wire)], strict=True):
        got += reader.receive_data(wire[start:end])
    assert got == values


# --- differential: pynetdicom --------------------------------------------------------------------------

_PN_CLASSES = {1: pn.A_ASSOCIATE_RQ, 2: pn.A_ASSOCIATE_AC, 3: pn.A_ASSOCIATE_RJ, 4: pn.P_DATA_TF,
               5: pn.A_RELEASE_RQ, 6: pn.A_RELEASE_RP, 7: pn.A_ABORT_RQ}


def pynetdicom_decode(wire: bytes) -> object:
    decoded = _PN_CLASSES[wire[0]]()
    decoded.decode(wire)
    return decoded


def _user_from_pynetdicom(item: pni.UserInformationItem | None) -> UserInformation:
    fields: dict[str, object] = {"roles": [], "extended": [], "common_extended": []}
    for sub in item.user_data if item else []:
        match sub:
            case pni.MaximumLengthSubItem():
                fields["max_pdu_length"] = sub.maximum_length_received
            case pni.ImplementationClassUIDSubItem():
                fields["implementation_class_uid"] = str(sub.implementation_class_uid)
            case pni.ImplementationVersionNameSubItem():
                fields["implementation_version_name"] = sub.implementation_version_name
            case pni.AsynchronousOperationsWindowSubItem():
                fields["async_window"] = AsyncOperationsWindow(sub.max_operations_invoked, sub.max_operations_performed)
            case pni.SCP_SCU_RoleSelectionSubItem():
                fields["roles"].append(RoleSelection(str(sub.sop_class_uid), bool(sub.scu), bool(sub.scp)))
            case pni.SOPClassExtendedNegotiationSubItem():
                fields["extended"].append(ExtendedNegotiation(str(sub.sop_class_uid), sub.app_info))
            case pni.SOPClassCommonExtendedNegotiationSubItem():
                fields["common_extended"].append(CommonExtendedNegotiation(
                    str(sub.sop_class_uid), str(sub.service_class_uid),
                    tuple(str(u) for u in sub.related_general_sop_class_identification)))
            case pni.UserIdentitySubItemRQ():
                fields["user_identity"] = UserIdentity(sub.id_type, bool(sub.response_requested), sub.primary,
                                                       sub.secondary or b"")
            case pni.UserIdentitySubItemAC():
                fields["user_identity_response"] = UserIdentityResponse(sub.response)
    fields.update({k: tuple(fields[k]) for k in ("roles", "extended", "common_extended")})  # type: ignore[arg-type]
    return UserInformation(**fields)  # type: ignore[arg-type]


def from_pynetdicom(decoded: object) -> pdu.Pdu:
    """Our dataclass for a PDU as pynetdicom read it: the fields it found, field by field."""
    match decoded:
        case pn.A_ASSOCIATE_RQ():
            contexts = tuple(PresentationContext(cx.context_id, str(cx.abstract_syntax),
                                                 tuple(str(ts) for ts in cx.transfer_syntax))
                             for cx in decoded.presentation_context)
            return AssociateRQ(decoded.called_ae_title, decoded.calling_ae_title, contexts,
                               _user_from_pynetdicom(decoded.user_information), str(decoded.application_context_name),
                               decoded.protocol_version)
        case pn.A_ASSOCIATE_AC():
            results = tuple(PresentationContextResult(cx.context_id, ContextResult(cx.result),
                                                      str(cx.transfer_syntax or ""))
                            for cx in decoded.presentation_context)
            return AssociateAC(decoded.reserved_aet, decoded.reserved_aec, results,
                               _user_from_pynetdicom(decoded.user_information), str(decoded.application_context_name),
                               decoded.protocol_version)
        case pn.A_ASSOCIATE_RJ():
            return AssociateRJ(decoded.result, decoded.source, decoded.reason_diagnostic)
        case pn.P_DATA_TF():
            return PDataTF(tuple(PDV(v.context_id, bool(v.data[0] & 1), bool(v.data[0] & 2), v.data[1:])
                                 for v in decoded.presentation_data_value_items))
        case pn.A_RELEASE_RQ():
            return ReleaseRQ()
        case pn.A_RELEASE_RP():
            return ReleaseRP()
        case pn.A_ABORT_RQ():
            return Abort(decoded.source, decoded.reason_diagnostic)
    raise AssertionError(f"unexpected {decoded!r}")


def _pn_user(user: UserInformation) -> list[object]:
    items: list[object] = []
    if user.max_pdu_length is not None:
        items.append(pnp.MaximumLengthNotification())
        items[-1].maximum_length_received = user.max_pdu_length  # type: ignore[attr-defined]
    if user.implementation_class_uid is not None:
        items.append(pnp.ImplementationClassUIDNotification())
        items[-1].implementation_class_uid = user.implementation_class_uid  # type: ignore[attr-defined]
    if user.implementation_version_name:
        items.append(pnp.ImplementationVersionNameNotification())
        items[-1].implementation_version_name = user.implementation_version_name  # type: ignore[attr-defined]
    if user.async_window is not None:
        window = pnp.AsynchronousOperationsWindowNegotiation()
        window.maximum_number_operations_invoked = user.async_window.invoked
        window.maximum_number_operations_performed = user.async_window.performed
        items.append(window)
    for role in user.roles:
        selection = pnp.SCP_SCU_RoleSelectionNegotiation()
        selection.sop_class_uid, selection.scu_role, selection.scp_role = role.sop_class_uid, role.scu, role.scp
        items.append(selection)
    for ext in user.extended:
        negotiation = pnp.SOPClassExtendedNegotiation()
        negotiation.sop_class_uid, negotiation.service_class_application_information = ext.sop_class_uid, ext.info
        items.append(negotiation)
    for common in user.common_extended:
        c = pnp.SOPClassCommonExtendedNegotiation()
        c.sop_class_uid, c.service_class_uid = common.sop_class_uid, common.service_class_uid
        c.related_general_sop_class_identification = list(common.related)
        items.append(c)
    items += _pn_identity(user)
    return items


def _pn_identity(user: UserInformation) -> list[object]:
    identity = pnp.UserIdentityNegotiation()
    if user.user_identity is not None:
        identity.user_identity_type = user.user_identity.kind
        identity.positive_response_requested = user.user_identity.response_requested
        identity.primary_field = user.user_identity.primary
        identity.secondary_field = user.user_identity.secondary
        return [identity]
    if user.user_identity_response is not None:
        identity.server_response = user.user_identity_response.server_response
        return [identity]
    return []


def pynetdicom_encode(value: AssociateRQ | AssociateAC) -> bytes:
    """What pynetdicom puts on the wire for the same fields, built from its own primitives."""
    primitive = pnp.A_ASSOCIATE()
    primitive.application_context_name = value.application_context
    primitive.called_ae_title, primitive.calling_ae_title = value.called_ae, value.calling_ae
    contexts = []
    for cx in value.contexts:
        context = PnContext()
        context.context_id = cx.id
        if isinstance(cx, PresentationContext):
            context.abstract_syntax = cx.abstract_syntax
            context.transfer_syntax = list(cx.transfer_syntaxes)
        else:
            context.result = int(cx.result)
            context.transfer_syntax = [cx.transfer_syntax] if cx.transfer_syntax else []
        contexts.append(context)
    primitive.user_information = _pn_user(value.user)
    if isinstance(value, AssociateRQ):
        primitive.presentation_context_definition_list = contexts
        return bytes(pn.A_ASSOCIATE_RQ(primitive).encode())
    primitive.result = 0
    primitive.presentation_context_definition_results_list = contexts
    return bytes(pn.A_ASSOCIATE_AC(primitive).encode())


pn_ae_titles = st.text(st.sampled_from("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_"), min_size=1, max_size=16)
pn_versions = st.text(st.sampled_from("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_."), min_size=1, max_size=16)


def _pn_compatible(user: st.SearchStrategy[UserInformation]) -> st.SearchStrategy[UserInformation]:
    """What pynetdicom's primitives can express: a version name of 1-16 characters, a non-empty primary
    field, a role per SOP class at most once and not both roles refused."""
    def fix(u: UserInformation, version: str) -> UserInformation:
        roles = tuple({r.sop_class_uid: RoleSelection(r.sop_class_uid, r.scu or not r.scp, r.scp)
                       for r in u.roles}.values())
        identity = u.user_identity
        if identity is not None and not identity.primary:
            identity = UserIdentity(identity.kind, identity.response_requested, b"p", identity.secondary)
        if identity is not None and identity.kind not in (1, 2, 3, 4, 5):
            identity = UserIdentity(2, identity.response_requested, identity.primary, identity.secondary or b"s")
        if identity is not None and identity.kind != 2:
            identity = UserIdentity(identity.kind, identity.response_requested, identity.primary, b"")
        if identity is not None and identity.kind == 2 and not identity.secondary:
            identity = UserIdentity(2, identity.response_requested, identity.primary, b"s")
        return UserInformation(
            u.max_pdu_length, u.implementation_class_uid, version if u.implementation_version_name else None,
            u.async_window, roles, u.extended, u.common_extended, identity, u.user_identity_response)
    return st.builds(fix, user, pn_versions)


pn_associates = st.one_of(
    st.builds(AssociateRQ, pn_ae_titles, pn_ae_titles, proposed_contexts(conformant_uids),
              _pn_compatible(user_information(True, conformant_uids, unknown=False)), conformant_uids),
    st.builds(AssociateAC, pn_ae_titles, pn_ae_titles, context_results(conformant_uids, empty=False),
              _pn_compatible(user_information(False, conformant_uids, unknown=False)), conformant_uids),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(value=pn_associates)
def test_differential_both_ways_against_pynetdicom(value: AssociateRQ | AssociateAC) -> None:
    """pynetdicom's bytes are ours, byte for byte; we read its bytes, and it reads ours, as the same fields."""
    theirs = pynetdicom_encode(value)
    assert pdu.decode(theirs) == value
    assert from_pynetdicom(pynetdicom_decode(pdu.encode(value))) == value
    assert pdu.encode(value) == theirs


@settings(max_examples=150, deadline=None)
@given(values=st.lists(st.tuples(st.integers(1, 255), st.booleans(), st.booleans(), st.binary(max_size=64)),
                       min_size=1, max_size=5))
def test_p_data_differential_against_pynetdicom(values: list[tuple[int, bool, bool, bytes]]) -> None:
    primitive = pnp.P_DATA()
    primitive.presentation_data_value_list = [[cid, bytes([cmd | last << 1]) + data] for cid, cmd, last, data in values]
    theirs = bytes(pn.P_DATA_TF(primitive).encode())
    ours = PDataTF(tuple(PDV(*v) for v in values))
    assert pdu.decode(theirs) == ours
    assert pdu.encode(ours) == theirs
    assert from_pynetdicom(pynetdicom_decode(pdu.encode(ours))) == ours


@pytest.mark.parametrize("value", [AssociateRJ(1, 1, 7), AssociateRJ(2, 3, 2), Abort(0, 0), Abort(2, 6)],
                         ids=["rj-1-1-7", "rj-2-3-2", "abort-user", "abort-provider"])
def test_fixed_pdus_differential_against_pynetdicom(value: AssociateRJ | Abort) -> None:
    theirs: pn.A_ASSOCIATE_RJ | pn.A_ABORT_RQ
    if isinstance(value, AssociateRJ):
        theirs = pn.A_ASSOCIATE_RJ()
        theirs.result, theirs.source, theirs.reason_diagnostic = value.result, value.source, value.reason
    else:
        theirs = pn.A_ABORT_RQ()
        theirs.source, theirs.reason_diagnostic = value.source, value.reason
    assert pdu.decode(theirs.encode()) == value
    assert pdu.encode(value) == theirs.encode()
    assert pdu.encode(ReleaseRQ()) == pn.A_RELEASE_RQ().encode()
    assert pdu.encode(ReleaseRP()) == pn.A_RELEASE_RP().encode()


def test_pynetdicom_request_round_trips_byte_for_byte() -> None:
    from tests.test_dicom_pdu import pynetdicom_rq

    wire = pynetdicom_rq(contexts=5)
    assert pdu.encode(pdu.decode(wire)) == wire


# --- the fuzz target, exercised without atheris ----------------------------------------------------------


def test_fuzz_target_over_mutated_seeds() -> None:
    """Thousands of inputs, each a seed with random bytes flipped, cut, spliced or appended: only
    DicomError escapes (the target itself asserts the rest)."""
    rng = random.Random(12)
    for _ in range(3000):
        data = bytearray(rng.choice(SEEDS))
        for _ in range(rng.randint(0, 4)):
            op = rng.randrange(4)
            if op == 0 and data:
                data[rng.randrange(len(data))] = rng.randrange(256)
            elif op == 1:
                del data[rng.randrange(len(data) + 1):]
            elif op == 2:
                data += rng.choice(SEEDS)
            else:
                data += rng.randbytes(rng.randint(1, 16))
        fuzz_one(bytes(data))


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=600))
def test_fuzz_target_over_random_bytes(data: bytes) -> None:
    fuzz_one(data)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(values=st.lists(pdus, min_size=1, max_size=4))
def test_fuzz_target_over_generated_pdus(values: list[pdu.Pdu]) -> None:
    fuzz_one(b"".join(pdu.encode(v) for v in values))


@pytest.mark.parametrize(("name", "wire", "value"), VECTORS, ids=IDS)
def test_every_vector_cut_short_is_malformed(name: str, wire: bytes, value: pdu.Pdu) -> None:
    for cut in range(len(wire)):
        with pytest.raises(MalformedPdu):
            pdu.decode(wire[:cut])
        assert PduReader(1024).receive_data(wire[:cut]) == []  # the reader: need more, not an error
