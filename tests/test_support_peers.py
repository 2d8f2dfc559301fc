"""The real-peer fixtures work: Orthanc on free ports, dcmtk SCUs and storescp, processes ended by PID."""

from __future__ import annotations

import os
import signal
import sys
import textwrap
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from tests.support import dcmtk
from tests.support.orthanc import normalize_find, start_orthanc
from tests.support.ports import free_port, free_ports
from tests.support.procs import ProcessTracker, spawn, wait_until

LOOPBACK = "127.0.0.1"
N_FILES = 6


def write_ct_files(out_dir: Path, count: int, *, seed: str = "support", size: int = 32) -> list[Path]:
    """`count` small CT instances of one study and one series (stand-in for tunnel_demo.dataset)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    study_uid = generate_uid(entropy_srcs=[seed, "study"])
    series_uid = generate_uid(entropy_srcs=[seed, "series"])
    pixels = np.arange(size * size, dtype=np.uint16).reshape(size, size) % 4096
    files = []
    for index in range(count):
        sop_uid = generate_uid(entropy_srcs=[seed, "sop", str(index)])
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = sop_uid
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.PatientName = "TEST^SUPPORT"
        ds.PatientID = f"SUPPORT-{seed}"
        ds.StudyID = "1"
        ds.StudyDate = "20240101"
        ds.AccessionNumber = "A1"
        ds.Modality = "CT"
        ds.SeriesNumber = 1
        ds.InstanceNumber = index + 1
        ds.Rows = ds.Columns = size
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.PixelData = pixels.tobytes()
        path = out_dir / f"ct{index:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return files


def sop_uids(paths: list[Path]) -> set[str]:
    return {str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID) for path in paths}


def dicom_files_in(directory: Path) -> list[Path]:
    return sorted(path for path in directory.rglob("*") if path.is_file())


@pytest.fixture
def ct_files(tmp_path: Path) -> list[Path]:
    return write_ct_files(tmp_path / "study", N_FILES)


def test_orthanc_store_then_find_at_study_and_image_level(procs, tmp_path, ct_files):
    orthanc = start_orthanc(procs, tmp_path, aet="PACS")
    assert orthanc.instances_count() == 0
    dcmtk.echoscu(LOOPBACK, orthanc.dicom_port, "PACS", "ANY-SCU").check()

    dcmtk.storescu(LOOPBACK, orthanc.dicom_port, "PACS", "ANY-SCU", ct_files[0].parent).check()
    assert orthanc.instances_count() == N_FILES

    study_uid = str(pydicom.dcmread(ct_files[0]).StudyInstanceUID)
    studies = dcmtk.findscu(
        LOOPBACK,
        orthanc.dicom_port,
        "PACS",
        "ANY-SCU",
        "STUDY",
        {"StudyInstanceUID": None, "PatientID": None, "NumberOfStudyRelatedInstances": None},
    ).check()
    assert [str(ds.StudyInstanceUID) for ds in studies.responses] == [study_uid]
    assert int(studies.responses[0].NumberOfStudyRelatedInstances) == N_FILES

    images = dcmtk.findscu(
        LOOPBACK,
        orthanc.dicom_port,
        "PACS",
        "ANY-SCU",
        "IMAGE",
        {"StudyInstanceUID": study_uid, "SeriesInstanceUID": None, "SOPInstanceUID": None},
    ).check()
    assert {str(ds.SOPInstanceUID) for ds in images.responses} == sop_uids(ct_files)
    keys = ["SOPInstanceUID", "StudyInstanceUID"]
    rows = normalize_find(images.responses, keys=keys)
    assert rows == normalize_find(list(reversed(images.responses)), keys=keys)
    assert len(rows) == N_FILES and all(row["StudyInstanceUID"] == study_uid for row in rows)


def test_orthanc_rest_upload_and_empty_find(procs, tmp_path, ct_files):
    orthanc = start_orthanc(procs, tmp_path)
    assert len(orthanc.upload(ct_files[:3])) == 3
    assert orthanc.instances_count() == 3

    none = dcmtk.findscu(
        LOOPBACK,
        orthanc.dicom_port,
        "ORTHANC",
        "ANY-SCU",
        "STUDY",
        {"StudyInstanceUID": "1.2.3.4.5.6.7.8.9"},
    ).check()
    assert none.responses == []


def test_orthanc_move_and_get_deliver_every_instance(procs, tmp_path, ct_files):
    incoming = free_port()
    orthanc = start_orthanc(procs, tmp_path, modalities={"mover": ("MOVER", LOOPBACK, incoming)})
    orthanc.upload(ct_files)
    study_uid = str(pydicom.dcmread(ct_files[0]).StudyInstanceUID)

    moved = tmp_path / "moved"
    moved.mkdir()
    dcmtk.movescu(
        LOOPBACK,
        orthanc.dicom_port,
        "ORTHANC",
        "MOVER",
        "MOVER",
        {"StudyInstanceUID": study_uid},
        "STUDY",
        port_for_incoming=incoming,
        out_dir=moved,
    ).check()
    assert sop_uids(dicom_files_in(moved)) == sop_uids(ct_files)

    fetched = tmp_path / "fetched"
    fetched.mkdir()
    dcmtk.getscu(
        LOOPBACK, orthanc.dicom_port, "ORTHANC", "GETTER", {"StudyInstanceUID": study_uid}, "STUDY", fetched
    ).check()
    assert sop_uids(dicom_files_in(fetched)) == sop_uids(ct_files)


def test_storescp_receives_what_storescu_sends(procs, tmp_path, ct_files):
    port = free_port()
    received = tmp_path / "received"
    scp = dcmtk.start_storescp(procs, port, "STORESCP", received)
    dcmtk.storescu(LOOPBACK, port, "STORESCP", "SENDER", ct_files).check()

    assert sop_uids(dicom_files_in(received)) == sop_uids(ct_files)
    sent = pydicom.dcmread(ct_files[0])
    got = pydicom.dcmread(received / f"CT.{sent.SOPInstanceUID}")
    assert got.PixelData == sent.PixelData
    assert scp.running


def test_failed_association_is_reported_not_hidden(tmp_path):
    closed = free_port()
    result = dcmtk.echoscu(LOOPBACK, closed, "NOBODY", "ANY-SCU", timeout=10)
    assert not result.ok
    with pytest.raises(dcmtk.DcmtkError):
        result.check()


def test_dcmtk_binaries_are_native_not_the_venv_scripts():
    path = dcmtk.require_binary("findscu")
    assert not Path(path).resolve().is_relative_to(Path(sys.prefix).resolve())
    assert dcmtk.find_binary("surely-not-a-binary-xyz") is None


def test_spawn_ends_the_child_by_pid(tmp_path):
    with spawn(["sleep", "60"], log_path=tmp_path / "sleep.log") as proc:
        pid = proc.pid
        os.kill(pid, 0)  # alive inside the block
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert proc.returncode == -signal.SIGTERM


def test_stop_escalates_to_sigkill_when_sigterm_is_ignored(tmp_path):
    tracker = ProcessTracker(tmp_path / "procs")
    code = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); "
    code += "time.sleep(60)"
    proc = tracker.spawn([sys.executable, "-c", code], name="stubborn")
    try:
        wait_until(lambda: "ready" in proc.log_text(), 10, message="child to ignore SIGTERM")
        assert proc.stop(grace=0.2) == -signal.SIGKILL
    finally:
        tracker.stop_all()
    with pytest.raises(ProcessLookupError):
        os.kill(proc.pid, 0)


def test_procs_fixture_ends_children_at_teardown_even_when_the_test_fails(pytester, tmp_path):
    pid_file = tmp_path / "child.pid"
    pytester.makeconftest(
        """
        import pytest
        from tests.support.procs import PHASE_REPORTS, procs  # noqa: F401

        @pytest.hookimpl(wrapper=True)
        def pytest_runtest_makereport(item, call):
            report = yield
            item.stash.setdefault(PHASE_REPORTS, {})[report.when] = report
            return report
        """
    )
    pytester.makepyfile(
        textwrap.dedent(
            f"""
            from pathlib import Path

            def test_child(procs):
                child = procs.spawn(["sleep", "60"])
                Path({str(pid_file)!r}).write_text(str(child.pid))
                assert False, "fail on purpose: teardown must still end the child"
            """
        )
    )
    result = pytester.runpytest_inprocess(
        "-p", "no:cacheprovider", "-o", "asyncio_default_fixture_loop_scope=function"
    )
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*processes started by this test*", "*'sleep', '60'*"])
    with pytest.raises(ProcessLookupError):
        os.kill(int(pid_file.read_text()), 0)


def test_free_ports_are_distinct_and_bindable():
    ports = free_ports(3)
    assert len(set(ports)) == 3 and all(1024 <= port <= 65535 for port in ports)


def test_ct_study_small_is_a_readable_single_study(ct_study_small):
    files = list(ct_study_small.files)
    assert len(files) == len(ct_study_small.sop_instance_uids) > 0
    assert {str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID) for path in files} == {
        ct_study_small.study_uid
    }
