"""tunnel_core.dicom.uids: every named UID agrees with pynetdicom's registry, and the UID syntax check."""

from __future__ import annotations

import pytest
from pynetdicom import sop_class

from tunnel_core.dicom import uids


@pytest.mark.parametrize(("name", "uid"), sorted(uids.COMMON_STORAGE_SOP_CLASSES.items()))
def test_each_common_storage_class_is_the_storage_class_of_that_name(name: str, uid: str) -> None:
    assert getattr(sop_class, name) == uid
    assert uid in sop_class._STORAGE_CLASSES.values()  # a storage SOP class, not another service's


def test_the_service_uids() -> None:
    assert uids.VERIFICATION == sop_class.Verification
    assert uids.STORAGE_COMMITMENT_PUSH == sop_class.StorageCommitmentPushModel


@pytest.mark.parametrize("value", ["1.2.840.10008.1.2", "0", "1.0.3", "9" * 64])
def test_valid_uids(value: str) -> None:
    assert uids.is_uid(value)


@pytest.mark.parametrize("value", ["", "1..2", "1.02", ".1", "1.", "1.2a", "1" * 65, "١.٢"])
def test_invalid_uids(value: str) -> None:
    assert not uids.is_uid(value)
