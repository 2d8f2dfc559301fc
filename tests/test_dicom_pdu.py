"""tunnel_core.dicom: the A-ASSOCIATE-RQ sniffer and the A-ASSOCIATE-RJ / A-ABORT builders.

Differential: requests are encoded by pynetdicom's own PDU classes, rejects and aborts are decoded by them.
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID
from pynetdicom.pdu import A_ABORT_RQ, A_ASSOCIATE_RJ, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import A_ASSOCIATE, ImplementationClassUIDNotification, MaximumLengthNotification
from pynetdicom.presentation import build_context

from tunnel_core import dicom
from tunnel_core.errors import DicomError, InvalidAeTitle, MalformedPdu, NotAssociateRequest, PduTooLarge

VERIFICATION = "1.2.840.10008.1.1"
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


def pynetdicom_rq(called: str = "PACS", calling: str = "MODALITY", contexts: int = 2) -> bytes:
    """An A-ASSOCIATE-RQ exactly as pynetdicom would put it on the wire."""
    primitive = A_ASSOCIATE()
    primitive.application_context_name = "1.2.840.10008.3.1.1.1"
    primitive.calling_ae_title = calling
    primitive.called_ae_title = called
    abstract = [VERIFICATION, CT_IMAGE_STORAGE] * contexts
    primitive.presentation_context_definition_list = [build_context(uid) for uid in abstract[:contexts]]
    for i, cx in enumerate(primitive.presentation_context_definition_list):
        cx.context_id = 2 * i + 1
    max_length = MaximumLengthNotification()
    max_length.maximum_length_received = 16382
    impl = ImplementationClassUIDNotification()
    impl.implementation_class_uid = PYNETDICOM_IMPLEMENTATION_UID
    primitive.user_information = [max_length, impl]
    return A_ASSOCIATE_RQ(primitive).encode()


def minimal_rq(called: bytes = b"PACS".ljust(16), calling: bytes = b"CT1".ljust(16)) -> bytes:
    """The fixed fields only (length 68): enough for the sniffer, which reads nothing else."""
    body = b"\x00\x01\x00\x00" + called + calling + bytes(32)
    return struct.pack("!BBI", 0x01, 0, len(body)) + body


RQ = pynetdicom_rq()


# --- sniffer --------------------------------------------------------------------------------------------


def test_pynetdicom_request_whole() -> None:
    sniffer = dicom.AssociateSniffer()
    request = sniffer.feed(RQ)
    assert request == dicom.AssociateRequest("PACS", "MODALITY", RQ)
    assert sniffer.rest == b""


def test_pynetdicom_request_one_byte_at_a_time() -> None:
    sniffer = dicom.AssociateSniffer()
    for byte in RQ[:-1]:
        assert sniffer.feed(bytes([byte])) is None
    request = sniffer.feed(RQ[-1:])
    assert request is not None and request.pdu == RQ
    assert (request.called_ae, request.calling_ae) == ("PACS", "MODALITY")


def test_trailing_bytes_are_kept_in_rest() -> None:
    sniffer = dicom.AssociateSniffer()
    following = b"\x04\x00\x00\x00\x00\x10P-DATA follows"
    request = sniffer.feed(RQ[:100])
    assert request is None
    request = sniffer.feed(RQ[100:] + following)
    assert request is not None and request.pdu == RQ
    assert sniffer.rest == following


@settings(max_examples=100, deadline=None)
@given(called=st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E, exclude_characters="\\"),
                      min_size=1, max_size=16),
       calling=st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E, exclude_characters="\\"),
                       min_size=1, max_size=16),
       contexts=st.integers(1, 20), data=st.data())
def test_sniffer_against_pynetdicom_under_random_chunking(called: str, calling: str, contexts: int,
                                                          data: st.DataObject) -> None:
    pdu = pynetdicom_rq(called, calling, contexts)
    tail = data.draw(st.binary(max_size=20))
    wire = pdu + tail
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=8)))
    chunks = [wire[start:end] for start, end in zip([0, *cuts], [*cuts, len(wire)], strict=True)]
    sniffer = dicom.AssociateSniffer()
    fed = 0
    request = None
    while request is None:
        chunk = chunks.pop(0)
        request = sniffer.feed(chunk)
        fed += len(chunk)
        assert (request is None) == (fed < len(pdu))
    assert sniffer.rest + b"".join(chunks) == tail
    assert request == dicom.AssociateRequest(called, calling, pdu)
    # pynetdicom reads the same titles back from the bytes we hand on
    decoded = A_ASSOCIATE_RQ()
    decoded.decode(request.pdu)
    assert (decoded.called_ae_title, decoded.calling_ae_title) == (called, calling)


def test_ae_titles_padded_on_either_side_are_trimmed() -> None:
    request = dicom.AssociateSniffer().feed(minimal_rq(b"  PACS".ljust(16), b"CT 1".ljust(16)))
    assert request is not None and (request.called_ae, request.calling_ae) == ("PACS", "CT 1")


@pytest.mark.parametrize("first", [
    pytest.param(b"GET / HTTP/1.1\r\nHost: relay\r\n\r\n", id="http"),
    pytest.param(bytes.fromhex("16 03 01 02 00 01 00 01 fc 03 03"), id="tls-client-hello"),
    pytest.param(bytes.fromhex("04 00 00 00 00 04 00 00 00 00"), id="p-data-tf"),
    pytest.param(bytes.fromhex("07 00 00 00 00 04 00 00 00 00"), id="a-abort"),
    pytest.param(b"\x00", id="zero"),
])
def test_not_an_associate_request_fails_on_the_first_byte(first: bytes) -> None:
    with pytest.raises(NotAssociateRequest):
        dicom.AssociateSniffer().feed(first[:1])
    with pytest.raises(NotAssociateRequest):
        dicom.AssociateSniffer().feed(first)


def test_empty_feed_is_need_more() -> None:
    sniffer = dicom.AssociateSniffer()
    assert sniffer.feed(b"") is None
    assert sniffer.feed(b"\x01") is None


def test_announced_length_above_the_cap_fails_after_six_bytes() -> None:
    sniffer = dicom.AssociateSniffer()  # 1 MiB default cap
    header = struct.pack("!BBI", 0x01, 0, 0xFFFFFFFF)
    for byte in header[:-1]:
        assert sniffer.feed(bytes([byte])) is None
    with pytest.raises(PduTooLarge):
        sniffer.feed(header[-1:])


def test_cap_counts_the_whole_pdu_including_its_header() -> None:
    cap = 1024 * 1024
    at_cap = struct.pack("!BBI", 0x01, 0, cap - 6)
    assert dicom.AssociateSniffer(cap).feed(at_cap) is None  # exactly the cap: waits for the body
    with pytest.raises(PduTooLarge):
        dicom.AssociateSniffer(cap).feed(struct.pack("!BBI", 0x01, 0, cap - 5))


def test_a_smaller_configured_cap() -> None:
    with pytest.raises(PduTooLarge):
        dicom.AssociateSniffer(max_pdu=len(RQ) - 1).feed(RQ)
    assert dicom.AssociateSniffer(max_pdu=len(RQ)).feed(RQ) is not None


@pytest.mark.parametrize("length", [0, 4, 67])
def test_length_shorter_than_the_fixed_fields_is_malformed(length: int) -> None:
    with pytest.raises(MalformedPdu):
        dicom.AssociateSniffer().feed(struct.pack("!BBI", 0x01, 0, length))


def test_length_of_exactly_the_fixed_fields_is_read() -> None:
    pdu = minimal_rq()
    assert len(pdu) == 6 + 68
    assert dicom.AssociateSniffer().feed(pdu) == dicom.AssociateRequest("PACS", "CT1", pdu)


CALLED_RJ, CALLING_RJ = dicom.RejectReason.CALLED_AE_UNKNOWN, dicom.RejectReason.CALLING_AE_NOT_ALLOWED


@pytest.mark.parametrize(("called", "calling", "reason", "shown"), [
    pytest.param("PACSÉ".encode("latin-1").ljust(16), b"CT1".ljust(16), CALLED_RJ, r"PACS\xc9", id="called-latin1"),
    pytest.param("PACSÉ".encode().ljust(16), b"CT1".ljust(16), CALLED_RJ, r"PACS\xc3\x89", id="called-utf8"),
    pytest.param(b"PACS".ljust(16), "CT1é".encode().ljust(16), CALLING_RJ, r"CT1\xc3\xa9", id="calling-utf8"),
    pytest.param(b"PA\x00CS".ljust(16), b"CT1".ljust(16), CALLED_RJ, r"PA\x00CS", id="called-NUL"),
    pytest.param(b"PACS".ljust(16), b"CT\x1b1".ljust(16), CALLING_RJ, r"CT\x1b1", id="calling-ESC"),
    pytest.param(b"PACS\n".ljust(16), b"CT1".ljust(16), CALLED_RJ, r"PACS\x0a", id="called-newline"),
    pytest.param(b"PA\\CS".ljust(16), b"CT1".ljust(16), CALLED_RJ, r"PA\x5cCS", id="called-backslash"),
    pytest.param(b" " * 16, b"CT1".ljust(16), CALLED_RJ, "", id="called-blank"),
    pytest.param(b"PACS".ljust(16), b" " * 16, CALLING_RJ, "", id="calling-blank"),
    pytest.param(b"PACS".ljust(16), bytes(16), CALLING_RJ, r"\x00" * 16, id="calling-all-NUL"),
    pytest.param(b"\xff" * 16, b"\x00" * 16, CALLED_RJ, r"\xff" * 16, id="both-bad-called-first"),
    pytest.param(b"PACS\x7f".ljust(16), b"CT1".ljust(16), CALLED_RJ, r"PACS\x7f", id="called-DEL"),
    pytest.param(b"PACS\t".ljust(16), b"CT1".ljust(16), CALLED_RJ, r"PACS\x09", id="called-tab"),
])
def test_bad_ae_titles_carry_the_reject_to_answer(called: bytes, calling: bytes, reason: dicom.RejectReason,
                                                  shown: str) -> None:
    """PS3.5 §6.2 AE: printable ASCII but backslash, not all spaces. 1/1/7 for the called, 1/1/3 for the calling
    title; the message shows the title escaped, so it is one short log-safe line."""
    pdu = minimal_rq(called, calling)
    with pytest.raises(InvalidAeTitle) as info:
        dicom.AssociateSniffer().feed(pdu)
    exc = info.value
    assert isinstance(exc, MalformedPdu) and isinstance(exc, DicomError)
    assert exc.reason is reason
    assert exc.which == ("called" if reason is CALLED_RJ else "calling")
    assert exc.title == (called if reason is CALLED_RJ else calling)
    assert f"'{shown}'" in str(exc)
    assert str(exc).isprintable() and len(str(exc)) < 120
    assert dicom.associate_reject(exc.reason) == bytes([3, 0, 0, 0, 0, 4, 0, *reason.value])


def test_bad_called_ae_is_known_only_once_the_whole_pdu_is_in() -> None:
    """The titles sit in the fixed fields, but the verdict waits for the whole PDU (byte by byte: need more
    until the last byte), like a good one: the PDU is framed, so it is a DICOM caller to answer."""
    pdu = pynetdicom_rq()
    pdu = pdu[:10] + b"\x00PACS".ljust(16) + pdu[26:]
    sniffer = dicom.AssociateSniffer()
    for byte in pdu[:-1]:
        assert sniffer.feed(bytes([byte])) is None
    with pytest.raises(InvalidAeTitle) as info:
        sniffer.feed(pdu[-1:])
    assert info.value.reason is CALLED_RJ


_AE_FIELD = st.one_of(
    st.binary(min_size=16, max_size=16),
    st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=16).map(
        lambda t: t.encode().ljust(16, b" ")),
    st.text(max_size=16).map(lambda t: t.encode()[:16].ljust(16, b" ")),
)


def _valid_ae(field: bytes) -> str | None:
    """An independent reading of PS3.5 §6.2 for a 16-byte AE field: the title, or None if it is not one."""
    try:
        text = field.decode("ascii")
    except UnicodeDecodeError:
        return None
    title = text.strip(" ")
    if not title or "\\" in title or not title.isprintable():
        return None
    return title


@settings(max_examples=400, deadline=None)
@given(called=_AE_FIELD, calling=_AE_FIELD, data=st.data())
def test_any_ae_bytes_under_any_chunking(called: bytes, calling: bytes, data: st.DataObject) -> None:
    """Any 16+16 bytes in the AE fields: a request with the trimmed titles, or InvalidAeTitle with the
    called title's reject first, and nothing else; the same whatever the chunking."""
    pdu = minimal_rq(called, calling)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(pdu) - 1), max_size=6)))  # the last chunk ends it
    chunks = [pdu[a:b] for a, b in zip([0, *cuts], [*cuts, len(pdu)], strict=True)]
    sniffer = dicom.AssociateSniffer()
    want_called, want_calling = _valid_ae(called), _valid_ae(calling)
    try:
        results = [sniffer.feed(chunk) for chunk in chunks]
    except InvalidAeTitle as exc:
        assert exc.reason is (CALLED_RJ if want_called is None else CALLING_RJ)
        assert want_called is None or want_calling is None
        assert str(exc).isprintable()
        return
    assert results[:-1] == [None] * (len(results) - 1)
    assert results[-1] == dicom.AssociateRequest(want_called, want_calling, pdu)


def test_escape_ae_shows_printable_ascii_and_escapes_the_rest() -> None:
    assert dicom.escape_ae(b"CT 1".ljust(16)) == "CT 1"
    assert dicom.escape_ae(b"  A\\B\x00\xc3\x89\n".ljust(16)) == r"  A\x5cB\x00\xc3\x89\x0a"
    assert dicom.escape_ae(b" " * 16) == ""
    assert all(dicom.escape_ae(bytes([b]) * 16).isprintable() for b in range(256))


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=200), cap=st.integers(6, 300))
def test_sniffer_raises_only_dicom_errors(data: bytes, cap: int) -> None:
    sniffer = dicom.AssociateSniffer(cap)
    try:
        request = sniffer.feed(data)
    except DicomError:
        return
    if request is not None:
        assert len(request.pdu) <= cap and data.startswith(request.pdu)
        assert sniffer.rest == data[len(request.pdu):]


# --- rewrite --------------------------------------------------------------------------------------------


def test_rewrite_called_ae_changes_only_the_called_title() -> None:
    rewritten = dicom.rewrite_called_ae(RQ, "ORTHANC")
    assert len(rewritten) == len(RQ)
    assert rewritten[10:26] == b"ORTHANC         "
    assert rewritten[:10] == RQ[:10] and rewritten[26:] == RQ[26:]
    assert dicom.AssociateSniffer().feed(rewritten) == dicom.AssociateRequest("ORTHANC", "MODALITY", rewritten)
    decoded = A_ASSOCIATE_RQ()
    decoded.decode(rewritten)
    assert decoded.called_ae_title == "ORTHANC"
    assert [str(cx.abstract_syntax) for cx in decoded.presentation_context] == [VERIFICATION, CT_IMAGE_STORAGE]


@pytest.mark.parametrize("title", ["", "X" * 17, "PACSÉ"])
def test_rewrite_refuses_bad_titles(title: str) -> None:
    with pytest.raises(ValueError):
        dicom.rewrite_called_ae(RQ, title)


# --- rejects and aborts ---------------------------------------------------------------------------------

REJECT_VECTORS = [
    # type  rsvd  length        rsvd result source reason
    (dicom.RejectReason.CALLED_AE_UNKNOWN, "03 00 00 00 00 04 00 01 01 07"),
    (dicom.RejectReason.CALLING_AE_NOT_ALLOWED, "03 00 00 00 00 04 00 01 01 03"),
    (dicom.RejectReason.SITE_OFFLINE, "03 00 00 00 00 04 00 02 03 01"),
    (dicom.RejectReason.CAPACITY, "03 00 00 00 00 04 00 02 03 02"),
]


@pytest.mark.parametrize(("reason", "wire"), REJECT_VECTORS, ids=[r.name for r, _ in REJECT_VECTORS])
def test_associate_reject_bytes(reason: dicom.RejectReason, wire: str) -> None:
    pdu = dicom.associate_reject(reason)
    assert pdu == bytes.fromhex(wire)
    decoded = A_ASSOCIATE_RJ()
    decoded.decode(pdu)
    assert (decoded.result, decoded.source, decoded.reason_diagnostic) == reason.value
    assert dicom.parse_reject(pdu) == reason.value


def test_reject_reasons_are_the_design_table() -> None:
    """DESIGN.md "DICOM behaviour at the edges" (PS3.8 §9.3.4 result / source / reason)."""
    assert {r.name: r.value for r in dicom.RejectReason} == {
        "CALLED_AE_UNKNOWN": (1, 1, 7),
        "CALLING_AE_NOT_ALLOWED": (1, 1, 3),
        "SITE_OFFLINE": (2, 3, 1),
        "CAPACITY": (2, 3, 2),
    }


@pytest.mark.parametrize(("reason", "text"), [
    (dicom.RejectReason.CALLED_AE_UNKNOWN, ("Rejected Permanent", "Service User", "Called AE title not recognised")),
    (dicom.RejectReason.CALLING_AE_NOT_ALLOWED,
     ("Rejected Permanent", "Service User", "Calling AE title not recognised")),
    (dicom.RejectReason.SITE_OFFLINE,
     ("Rejected Transient", "Service Provider (Presentation)", "Temporary congestion")),
    (dicom.RejectReason.CAPACITY,
     ("Rejected Transient", "Service Provider (Presentation)", "Local limit exceeded")),
], ids=lambda v: v.name if isinstance(v, dicom.RejectReason) else "")
def test_rejects_read_by_pynetdicom_as_the_intended_reasons(reason: dicom.RejectReason,
                                                            text: tuple[str, str, str]) -> None:
    decoded = A_ASSOCIATE_RJ()
    decoded.decode(dicom.associate_reject(reason))
    reject = decoded.to_primitive()
    assert (reject.result_str, reject.source_str, reject.reason_str) == text


@pytest.mark.parametrize("pdu", [b"", bytes.fromhex("07 00 00 00 00 04 00 00 02 00"),
                                 bytes.fromhex("03 00 00 00 00 04 00 01 01")])
def test_parse_reject_refuses_other_pdus(pdu: bytes) -> None:
    with pytest.raises(MalformedPdu):
        dicom.parse_reject(pdu)


@pytest.mark.parametrize(("args", "wire"), [
    # type rsvd length      rsvd rsvd source reason
    ((), "07 00 00 00 00 04 00 00 02 00"),  # service provider, reason not specified
    ((0, 0), "07 00 00 00 00 04 00 00 00 00"),  # service user
    ((2, 6), "07 00 00 00 00 04 00 00 02 06"),  # provider, invalid PDU parameter value
])
def test_abort_bytes(args: tuple[int, ...], wire: str) -> None:
    pdu = dicom.abort(*args)
    assert pdu == bytes.fromhex(wire)
    decoded = A_ABORT_RQ()
    decoded.decode(pdu)
    assert (decoded.source, decoded.reason_diagnostic) == (pdu[8], pdu[9])
