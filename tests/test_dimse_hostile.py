"""tunnel_core.dicom.dimse against unusual and hostile command sets: what decoding tolerates, and one
hostile command set per rule it refuses. Split from tests/test_dimse.py, whose builders it uses.
"""

from __future__ import annotations

import pytest

from tests.test_dimse import (
    CT,
    command_set,
    echo_rq_with,
    element,
    rebuild,
    split,
    us,
)
from tunnel_core.dicom import dimse as d
from tunnel_core.dicom.dimse import (
    CEchoRQ,
    CFindRQ,
    CFindRSP,
    CMoveRQ,
    CStoreRSP,
    NEventReportRSP,
    Priority,
    decode_command,
    encode_command,
)
from tunnel_core.errors import DicomError, DimseError

# --- what decoding tolerates -------------------------------------------------------------------------------

@pytest.mark.parametrize("retired", [
    (0x0001, (0).to_bytes(4, "little")),  # CommandLengthToEnd (UL)
    (0x0010, b"RECO"),  # CommandRecognitionCode (SH)
    (0x4000, b"dialog"),  # DialogReceiver
    (0x5010, b"SET1"),  # MessageSetID (SH)
    (0x0850, us(3)),  # NumberOfMatches
    (0x7777, b"\xff\xfe"),  # never defined at all
])
def test_retired_and_unknown_elements_of_group_0000_are_skipped(retired: tuple[int, bytes]) -> None:
    assert decode_command(echo_rq_with(retired)) == CEchoRQ(1)


def test_an_element_the_message_does_not_use_is_skipped_even_with_a_value_it_would_refuse() -> None:
    # MoveDestination belongs to C-MOVE-RQ; on a C-ECHO-RQ it is not read, so its bytes do not matter
    assert decode_command(echo_rq_with((0x0600, b"\xff\\" * 20))) == CEchoRQ(1)


@pytest.mark.parametrize("present", [0x0000, 0x0001, 0x0102, 0xFEFE, 0xFFFF])
def test_any_dataset_type_but_0x0101_means_a_dataset_follows(present: int) -> None:
    wire = rebuild([(0x0100, us(0x8020)), (0x0120, us(2)), (0x0800, us(present)), (0x0900, us(0xFF00))])
    assert decode_command(wire) == CFindRSP(2, 0xFF00, has_dataset=True)


def test_padding_and_leading_spaces_are_dropped() -> None:
    wire = rebuild([(0x0002, b" 1.2.3 \x00"), (0x0100, us(0x0021)), (0x0110, us(4)),
                    (0x0600, b"  DEST  \x00\x00"), (0x0700, us(2)), (0x0800, us(1))])
    assert decode_command(wire) == CMoveRQ(4, "1.2.3", "DEST", Priority.LOW)


@pytest.mark.parametrize("empty", [0x0002, 0x0901, 0x0902, 0x0903, 0x1000])
def test_a_zero_length_optional_element_is_absent(empty: int) -> None:
    pairs = [(0x0100, us(0x8001)), (0x0120, us(7)), (0x0800, us(0x0101)), (0x0900, us(0)), (empty, b"")]
    assert decode_command(rebuild(sorted(pairs))) == CStoreRSP(7, 0)


def test_unnamed_priority_status_and_type_ids_are_carried_not_refused() -> None:
    rq = rebuild([(0x0002, b"1.2\x00"), (0x0100, us(0x0020)), (0x0110, us(1)), (0x0700, us(9)),
                  (0x0800, us(1))])
    assert decode_command(rq) == CFindRQ(1, "1.2", priority=9)
    rsp = decode_command(encode_command(NEventReportRSP(3, 0xD123, False, event_type_id=0xFFFF)))
    assert rsp.status == 0xD123 and rsp.event_type_id == 0xFFFF


def test_an_error_comment_in_a_national_character_set_survives_byte_for_byte() -> None:
    wire = rebuild([(0x0100, us(0x8001)), (0x0120, us(7)), (0x0800, us(0x0101)), (0x0900, us(0xA700)),
                    (0x0902, "Plattenspeicher voll: Größe".encode("latin-1") + b" ")])
    decoded = decode_command(wire)
    assert decoded.error_comment == "Plattenspeicher voll: Größe"
    assert encode_command(decoded) == wire


def test_decode_takes_any_bytes_like() -> None:
    wire = encode_command(CEchoRQ(5))
    assert decode_command(bytearray(wire)) == decode_command(memoryview(wire)) == CEchoRQ(5)


# --- the rules, one hostile command set each ---------------------------------------------------------------

GOOD = echo_rq_with()

HOSTILE = [
    pytest.param(b"", id="empty"),
    pytest.param(GOOD[:7], id="header-cut-short"),
    pytest.param(GOOD[:-1], id="last-value-cut-short"),
    pytest.param(GOOD + element(0x0018, b"1.2\x00", group=0x0008), id="tag-outside-group-0000"),
    pytest.param(element(0x0000, b"\x0c\x00\x00\x00", group=0x0002) + GOOD[12:], id="group-length-of-group-2"),
    pytest.param(GOOD[12:], id="no-group-length-first"),
    pytest.param(rebuild([(0x0100, us(0x0030)), (0x0002, b"1.2\x00"), (0x0110, us(1)), (0x0800, us(0x0101))]),
                 id="out-of-order"),
    pytest.param(rebuild([(0x0002, b"1.2\x00"), (0x0100, us(0x0030)), (0x0110, us(1)), (0x0110, us(1)),
                          (0x0800, us(0x0101))]), id="duplicate"),
    pytest.param(command_set(element(0x0002, b"1.2\x00"), element(0x0100, us(0x0030)),
                             element(0x0110, us(1)), element(0x0800, us(0x0101), length=4)), id="length-past-end"),
    pytest.param(command_set(element(0x0100, us(0x0030)), element(0x0110, b"", length=0xFFFFFFFF)),
                 id="undefined-length"),
    pytest.param(echo_rq_with((0x0003, b"odd")), id="odd-length"),
    pytest.param(rebuild([(0x0002, b"1.2\x00"), (0x0100, us(0x0030)), (0x0110, us(1) * 2),
                          (0x0800, us(0x0101))]), id="US-of-four-bytes"),
    pytest.param(rebuild([(0x0002, b"1.2\x00"), (0x0100, us(0x0030) * 3), (0x0110, us(1)),
                          (0x0800, us(0x0101))]), id="command-field-of-six-bytes"),
    pytest.param(element(0x0000, b"\x38\x00") + GOOD[12:], id="UL-of-two-bytes"),
    pytest.param(command_set(*(element(n, v) for n, v in split(GOOD)), group_length=len(GOOD) - 11),
                 id="group-length-one-too-many"),
    pytest.param(command_set(*(element(n, v) for n, v in split(GOOD)), group_length=len(GOOD) - 13),
                 id="group-length-one-too-few"),
    pytest.param(GOOD + b"\x00" * 10, id="bytes-after-the-group"),
    pytest.param(rebuild([(0x0002, b"1.2\x00"), (0x0110, us(1)), (0x0800, us(0x0101))]), id="no-command-field"),
    pytest.param(rebuild([(0x0002, b"1.2\x00"), (0x0100, us(0x0030)), (0x0110, us(1))]), id="no-dataset-type"),
    pytest.param(rebuild([(0x0002, b"1.2\x00"), (0x0100, b""), (0x0110, us(1)), (0x0800, us(0x0101))]),
                 id="empty-command-field"),
    pytest.param(rebuild([(0x0002, b"1.2\x00"), (0x0100, us(0x0030)), (0x0800, us(0x0101))]),
                 id="C-ECHO-RQ-without-message-id"),
    pytest.param(rebuild([(0x0002, b"1.2\x00"), (0x0100, us(0x0030)), (0x0110, b""), (0x0800, us(0x0101))]),
                 id="C-ECHO-RQ-with-empty-message-id"),
    pytest.param(rebuild([(0x0100, us(0x0002)), (0x0110, us(1)), (0x0800, us(0x0101))]), id="unknown-field"),
    pytest.param(rebuild([(0x0003, b"1.2\x00"), (0x0100, us(0x0110)), (0x0110, us(1)), (0x0800, us(0x0101))]),
                 id="N-GET-RQ-not-supported"),
    pytest.param(echo_rq_with()[:-2] + us(0x0001), id="C-ECHO-RQ-announcing-a-dataset"),
    pytest.param(rebuild([(0x0002, CT.encode() + b"\x00"), (0x0100, us(0x0001)), (0x0110, us(1)),
                          (0x0700, us(0)), (0x0800, us(0x0101)), (0x1000, b"1.2\x00")]),
                 id="C-STORE-RQ-without-a-dataset"),
    pytest.param(rebuild([(0x0002, "1.2.é".encode("latin-1") + b"\x00"), (0x0100, us(0x0030)),
                          (0x0110, us(1)), (0x0800, us(0x0101))]), id="UID-non-ASCII"),
    pytest.param(rebuild([(0x0002, b"1.2\x003"), (0x0100, us(0x0030)), (0x0110, us(1)), (0x0800, us(0x0101))]),
                 id="UID-with-NUL-inside"),
    pytest.param(rebuild([(0x0002, b"1.2\\3\x00"), (0x0100, us(0x0030)), (0x0110, us(1)),
                          (0x0800, us(0x0101))]), id="UID-with-backslash"),
    pytest.param(rebuild([(0x0002, b"1." * 32 + b"12"), (0x0100, us(0x0030)), (0x0110, us(1)),
                          (0x0800, us(0x0101))]), id="UID-of-66-characters"),
    pytest.param(rebuild([(0x0002, b"1.2\x00"), (0x0100, us(0x0021)), (0x0110, us(1)),
                          (0x0600, b"ABCDEFGHIJKLMNOPQR"), (0x0700, us(0)), (0x0800, us(1))]),
                 id="AE-of-18-characters"),
    pytest.param(rebuild([(0x0002, b"1.2\x00"), (0x0100, us(0x0021)), (0x0110, us(1)),
                          (0x0600, "DÉST".encode("latin-1")), (0x0700, us(0)), (0x0800, us(1))]),
                 id="AE-non-ASCII"),
    pytest.param(rebuild([(0x0002, b"1.2\x00"), (0x0100, us(0x0021)), (0x0110, us(1)),
                          (0x0600, b"DE\x07T "), (0x0700, us(0)), (0x0800, us(1))]), id="AE-control-character"),
    pytest.param(rebuild([(0x0002, b"1.2\x00"), (0x0100, us(0x0021)), (0x0110, us(1)),
                          (0x0600, b"    "), (0x0700, us(0)), (0x0800, us(1))]), id="AE-only-spaces-mandatory"),
    pytest.param(rebuild([(0x0100, us(0x8001)), (0x0120, us(7)), (0x0800, us(0x0101)), (0x0900, us(0)),
                          (0x0902, b"x" * 66)]), id="LO-of-66-characters"),
    pytest.param(rebuild([(0x0100, us(0x8001)), (0x0120, us(7)), (0x0800, us(0x0101)), (0x0900, us(0)),
                          (0x0901, b"\x10\x00\x10\x00\x20\x00")]), id="AT-not-a-multiple-of-4"),
]


@pytest.mark.parametrize("wire", HOSTILE)
def test_a_hostile_command_set_raises_dimse_error(wire: bytes) -> None:
    with pytest.raises(DimseError):
        decode_command(wire)


def test_dimse_error_is_a_dicom_error() -> None:
    assert issubclass(DimseError, DicomError)


def test_the_length_cap_is_checked_first() -> None:
    wire = echo_rq_with((0x7770, b"\x00" * 100))
    assert decode_command(wire, max_length=len(wire)) == CEchoRQ(1)
    with pytest.raises(DimseError, match="exceeds the limit"):
        decode_command(wire, max_length=len(wire) - 1)
    with pytest.raises(DimseError, match="exceeds the limit"):
        decode_command(b"\xff" * (d.DEFAULT_MAX_COMMAND_SET + 1))


