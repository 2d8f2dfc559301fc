"""tunnel_core.dicom.dataset: peeking at the first elements of a dataset as it streams in.

Datasets are written by pydicom in each transfer syntax, with sequences of defined and undefined length
before the wanted element, and read back from every prefix length: a short prefix says "incomplete",
never a wrong answer.
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.sequence import Sequence

from tunnel_core.dicom import dataset as ds
from tunnel_core.dicom import uids
from tunnel_core.errors import DatasetError

STUDY = "1.2.826.0.1.3680043.8.498.1234567890123456789"
SYNTAXES = {
    uids.IMPLICIT_VR_LITTLE_ENDIAN: (True, True),
    uids.EXPLICIT_VR_LITTLE_ENDIAN: (False, True),
    uids.EXPLICIT_VR_BIG_ENDIAN: (False, False),
}


def encoded(syntax: str, *, undefined_sequences: bool) -> bytes:
    """A small CT-like dataset with a nested sequence before (0020,000D) and pixel data after it."""
    inner = Dataset()
    inner.CodeValue = "123"
    inner.CodingSchemeDesignator = "DCM"
    item = Dataset()
    item.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    item.ReferencedSOPInstanceUID = "1.2.3.4.5"
    item.ConceptNameCodeSequence = Sequence([inner])
    d = Dataset()
    d.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    d.SOPInstanceUID = "1.2.3.4.5.6"
    d.Modality = "CT"
    d.ReferencedImageSequence = Sequence([item, item])
    d.PatientName = "Test^Patient"
    d.StudyInstanceUID = STUDY
    d.SeriesInstanceUID = STUDY + ".1"
    d.Rows = d.Columns = 4
    d.BitsAllocated = 16
    d.PixelData = bytes(32)
    implicit, little = SYNTAXES[syntax]
    if undefined_sequences:
        for owner, keyword in ((d, "ReferencedImageSequence"), (item, "ConceptNameCodeSequence")):
            owner[keyword].is_undefined_length = True
            for member in owner[keyword].value:
                member.is_undefined_length_sequence_item = True
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = little, implicit
    write_dataset(buffer, d)
    return buffer.getvalue()


@pytest.mark.parametrize("undefined", [False, True], ids=["defined", "undefined"])
@pytest.mark.parametrize("syntax", sorted(SYNTAXES))
def test_every_prefix_is_either_incomplete_or_right(syntax: str, undefined: bool) -> None:
    data = encoded(syntax, undefined_sequences=undefined)
    wanted = (ds.STUDY_INSTANCE_UID, ds.SERIES_INSTANCE_UID)
    answers = [ds.peek_elements(data[:n], syntax, wanted) for n in range(len(data) + 1)]
    for peek in answers:
        if peek.complete:
            assert peek.values == {ds.STUDY_INSTANCE_UID: STUDY.encode(),
                                   ds.SERIES_INSTANCE_UID: (STUDY + ".1").encode()}
        else:
            assert peek.values.get(ds.STUDY_INSTANCE_UID, STUDY.encode()) == STUDY.encode()
    assert answers[-1].complete  # the Rows element after the wanted tags ends the walk
    first = next(n for n, peek in enumerate(answers) if peek.complete)
    assert first < data.index(b"\xe0\x7f" if SYNTAXES[syntax][1] else b"\x7f\xe0")  # before the pixel data
    assert all(peek.complete for peek in answers[first:])


def test_a_tag_that_is_absent_is_known_absent_once_the_walk_passed_it() -> None:
    data = encoded(uids.EXPLICIT_VR_LITTLE_ENDIAN, undefined_sequences=False)
    peek = ds.peek_elements(data, uids.EXPLICIT_VR_LITTLE_ENDIAN, [0x00200010])  # StudyID: not in the dataset
    assert peek == ds.Peek({}, True)


def test_the_whole_dataset_with_nothing_after_the_wanted_tag_is_incomplete() -> None:
    d = Dataset()
    d.StudyInstanceUID = STUDY
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, True
    write_dataset(buffer, d)
    peek = ds.peek_elements(buffer.getvalue(), uids.IMPLICIT_VR_LITTLE_ENDIAN, [ds.STUDY_INSTANCE_UID])
    assert peek.values == {ds.STUDY_INSTANCE_UID: STUDY.encode()}
    assert not peek.complete  # the stream may hold more: the caller knows when the dataset ended


def element(tag: int, vr: bytes, value: bytes) -> bytes:
    return struct.pack("<HH", tag >> 16, tag & 0xFFFF) + vr + struct.pack("<H", len(value)) + value


def test_elements_out_of_order_are_refused() -> None:
    data = element(0x00100010, b"PN", b"AB") + element(0x00080060, b"CS", b"CT")
    with pytest.raises(DatasetError, match="out of order"):
        ds.peek_elements(data, uids.EXPLICIT_VR_LITTLE_ENDIAN, [ds.STUDY_INSTANCE_UID])


def test_an_invalid_vr_is_refused() -> None:
    with pytest.raises(DatasetError, match="VR"):
        ds.peek_elements(element(0x00080060, b"c\x00", b"CT"), uids.EXPLICIT_VR_LITTLE_ENDIAN, [ds.STUDY_INSTANCE_UID])


def test_an_undefined_length_on_a_short_vr_is_refused() -> None:
    # (0008,1140) with VR OB reserved + undefined length, whose first "item" is not an item tag.
    data = struct.pack("<HH", 0x0008, 0x1140) + b"OB\x00\x00" + b"\xff\xff\xff\xff" + element(0x00080060, b"CS", b"CT")
    with pytest.raises(DatasetError, match="item was expected"):
        ds.peek_elements(data, uids.EXPLICIT_VR_LITTLE_ENDIAN, [ds.STUDY_INSTANCE_UID])


def test_nesting_is_bounded() -> None:
    # Implicit VR: each level an undefined-length sequence holding one undefined-length item.
    level = struct.pack("<HHI", 0x0008, 0x1140, ds.UNDEFINED_LENGTH) + struct.pack("<HHI", 0xFFFE, 0xE000,
                                                                                  ds.UNDEFINED_LENGTH)
    with pytest.raises(DatasetError, match="nested deeper"):
        ds.peek_elements(level * (ds.MAX_DEPTH + 2), uids.IMPLICIT_VR_LITTLE_ENDIAN, [ds.STUDY_INSTANCE_UID])


def test_a_deflated_dataset_is_refused_up_front() -> None:
    with pytest.raises(DatasetError, match="deflated"):
        ds.peek_elements(b"", uids.DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN, [ds.STUDY_INSTANCE_UID])


@settings(max_examples=400, deadline=None)
@given(data=st.binary(max_size=512), syntax=st.sampled_from(sorted(SYNTAXES)))
def test_any_bytes_give_a_peek_or_a_dataset_error(data: bytes, syntax: str) -> None:
    try:
        peek = ds.peek_elements(data, syntax, [ds.STUDY_INSTANCE_UID])
    except DatasetError:
        return
    assert set(peek.values) <= {ds.STUDY_INSTANCE_UID}


@settings(max_examples=200, deadline=None)
@given(cut=st.integers(min_value=0, max_value=10_000), flip=st.integers(min_value=0, max_value=255),
       syntax=st.sampled_from(sorted(SYNTAXES)))
def test_mutated_datasets_give_a_peek_or_a_dataset_error(cut: int, flip: int, syntax: str) -> None:
    data = bytearray(encoded(syntax, undefined_sequences=True))
    data[cut % len(data)] ^= flip
    try:
        ds.peek_elements(bytes(data), syntax, [ds.STUDY_INSTANCE_UID, ds.SERIES_INSTANCE_UID])
    except DatasetError:
        pass
