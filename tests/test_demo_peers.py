"""The demo's DICOM peers against real dcmtk tools: generated study, DemoPacs and StoreScp.

Every peer listens on 127.0.0.1 (embedded peers on port 0, CLI peers on ports found by binding 0).
dcmtk runs as subprocesses with argv lists and a timeout; embedded peers are stopped in fixtures,
CLI peers by the suite's `procs` fixture (by PID).
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import socket
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification

from tests.support import missing_prerequisite
from tests.support.ports import free_ports
from tests.support.procs import ProcessTracker, wait_for_port
from tunnel_demo.dataset import PHI_PATIENT_ID, PHI_PATIENT_NAME, StudyInfo, generate_study
from tunnel_demo.pacs import DemoPacs, enable_nodelay, parse_destination
from tunnel_demo.store_scp import StoreScp

HOST = "127.0.0.1"
TOOL_TIMEOUT_S = 60
DCMTK_TOOLS = ("echoscu", "findscu", "movescu", "getscu", "storescu")
REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------ helpers
def require_binaries(*names: str) -> None:
    missing = [name for name in names if shutil.which(name) is None]
    if missing:
        missing_prerequisite(f"dcmtk tools missing: {', '.join(missing)} (apt-get install dcmtk)")


def dcmtk(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=TOOL_TIMEOUT_S, check=False)
    if check:
        assert proc.returncode == 0, f"{argv[0]} exited {proc.returncode}: {proc.stderr[-2000:]}"
    return proc


def dataset_sha256(path: Path) -> str:
    """SHA-256 of a Part-10 file's dataset: everything after preamble, prefix and file meta group."""
    data = path.read_bytes()
    assert data[128:132] == b"DICM", path
    # (0002,0000) UL, explicit VR: tag(4) VR(2) length(2) then the 4-byte group length.
    assert data[132:138] == b"\x02\x00\x00\x00UL", "file meta must start with its group length"
    (group_length,) = struct.unpack_from("<I", data, 140)
    return hashlib.sha256(data[144 + group_length :]).hexdigest()


def source_hashes(study: StudyInfo) -> dict[str, str]:
    return dict(zip(study.sop_instance_uids, (dataset_sha256(p) for p in study.files), strict=True))


def received_hashes(paths: list[Path]) -> dict[str, str]:
    return {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID): dataset_sha256(p) for p in paths}


def find(port: int, out_dir: Path, *keys: str, model: str = "-S") -> list:
    """Run findscu, extract every response to ``out_dir`` and return them as datasets."""
    out_dir.mkdir(parents=True, exist_ok=True)
    argv = ["findscu", model, "-aec", "PACS", "-X", "-od", str(out_dir)]
    for key in keys:
        argv += ["-k", key]
    dcmtk(*argv, HOST, str(port))
    return [dcmread(p) for p in sorted(out_dir.glob("rsp*.dcm"))]


# ------------------------------------------------------------------------------------------ fixtures
@pytest.fixture
def tools() -> None:
    require_binaries(*DCMTK_TOOLS)


@pytest.fixture
def study(tmp_path: Path) -> StudyInfo:
    return generate_study(tmp_path / "study", 5, rows=64, cols=64, seed=7, series_count=2)


@pytest.fixture
def store_scp(tmp_path: Path) -> Iterator[StoreScp]:
    scp = StoreScp("STORE", HOST, 0, tmp_path / "cloud")
    scp.start()
    try:
        yield scp
    finally:
        scp.stop()


@pytest.fixture
def pacs(tmp_path: Path, study: StudyInfo, store_scp: StoreScp) -> Iterator[DemoPacs]:
    peer = DemoPacs("PACS", HOST, 0, tmp_path / "pacs", {"STORE": (HOST, store_scp.port)})
    assert peer.add_files(study.files) == 5
    peer.start()
    try:
        yield peer
    finally:
        peer.stop()


# ------------------------------------------------------------------------------------------ dataset
def test_generated_study_is_valid_ct_and_reproducible(tmp_path: Path) -> None:
    first = generate_study(tmp_path / "a", 6, rows=32, cols=48, seed=3, series_count=2)
    again = generate_study(tmp_path / "b", 6, rows=32, cols=48, seed=3, series_count=2)
    other = generate_study(tmp_path / "c", 6, rows=32, cols=48, seed=4, series_count=2)

    assert [p.read_bytes() for p in first.files] == [p.read_bytes() for p in again.files]
    assert len(set(first.sop_instance_uids)) == 6
    assert len(set(first.series_uids)) == 2
    assert not set(first.sop_instance_uids) & set(other.sop_instance_uids)
    assert first.study_uid != other.study_uid
    assert first.total_bytes == sum(p.stat().st_size for p in first.files)

    pixels = []
    series_sizes: dict[str, int] = {}
    for path, uid in zip(first.files, first.sop_instance_uids, strict=True):
        ds = dcmread(path)
        assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert ds.file_meta.MediaStorageSOPInstanceUID == uid == ds.SOPInstanceUID
        assert ds.SOPClassUID == CTImageStorage
        assert ds.StudyInstanceUID == first.study_uid
        assert (ds.PatientName, ds.PatientID) == (PHI_PATIENT_NAME, PHI_PATIENT_ID)
        assert ds.pixel_array.shape == (32, 48) and ds.pixel_array.dtype == np.uint16
        assert 32 * 48 * 2 < path.stat().st_size < 32 * 48 * 2 + 4096
        series_sizes[ds.SeriesInstanceUID] = series_sizes.get(ds.SeriesInstanceUID, 0) + 1
        pixels.append(ds.PixelData)
    assert sorted(series_sizes.values()) == [3, 3]
    assert len(set(pixels)) == 6


def test_generate_study_rejects_impossible_shapes(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        generate_study(tmp_path, 0)
    with pytest.raises(ValueError):
        generate_study(tmp_path, 2, series_count=3)


def test_dataset_cli_writes_files(tmp_path: Path) -> None:
    argv = [
        sys.executable,
        "-m",
        "tunnel_demo.dataset",
        str(tmp_path / "out"),
        "--instances",
        "3",
        "--rows",
        "16",
        "--cols",
        "16",
        "--seed",
        "9",
    ]
    proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    assert len(list((tmp_path / "out").glob("*.dcm"))) == 3


# ------------------------------------------------------------------------------------------ PACS
def test_echo_reaches_both_peers(tools: None, pacs: DemoPacs, store_scp: StoreScp) -> None:
    dcmtk("echoscu", "-aec", "PACS", HOST, str(pacs.port))
    dcmtk("echoscu", "-aec", "STORE", HOST, str(store_scp.port))


def test_find_study_level_matches_wildcard_and_returns_requested_keys(
    tools: None, pacs: DemoPacs, study: StudyInfo, tmp_path: Path
) -> None:
    keys = (
        "QueryRetrieveLevel=STUDY",
        "PatientName=CANARY*",
        "StudyInstanceUID",
        "NumberOfStudyRelatedInstances",
        "NumberOfStudyRelatedSeries",
        "ModalitiesInStudy",
    )
    [rsp] = find(pacs.port, tmp_path / "hit", *keys)
    assert rsp.StudyInstanceUID == study.study_uid
    assert rsp.PatientName == PHI_PATIENT_NAME
    assert int(rsp.NumberOfStudyRelatedInstances) == 5
    assert int(rsp.NumberOfStudyRelatedSeries) == 2
    assert rsp.ModalitiesInStudy == "CT"
    assert "PatientID" not in rsp and "StudyDate" not in rsp

    assert find(pacs.port, tmp_path / "miss", "QueryRetrieveLevel=STUDY", "PatientName=NOBODY*") == []
    ranged = find(pacs.port, tmp_path / "range", "QueryRetrieveLevel=STUDY", "StudyDate=20240101-20240131")
    assert len(ranged) == 1


def test_find_image_level_lists_every_instance(
    tools: None, pacs: DemoPacs, study: StudyInfo, tmp_path: Path
) -> None:
    rsps = find(
        pacs.port,
        tmp_path / "img",
        "QueryRetrieveLevel=IMAGE",
        f"StudyInstanceUID={study.study_uid}",
        "SOPInstanceUID",
        "InstanceNumber",
    )
    assert sorted(r.SOPInstanceUID for r in rsps) == sorted(study.sop_instance_uids)
    one = find(
        pacs.port,
        tmp_path / "one",
        "QueryRetrieveLevel=IMAGE",
        f"SOPInstanceUID={study.sop_instance_uids[2]}",
    )
    assert [r.SOPInstanceUID for r in one] == [study.sop_instance_uids[2]]


def test_find_patient_root_patient_and_series_levels(
    tools: None, pacs: DemoPacs, study: StudyInfo, tmp_path: Path
) -> None:
    [patient] = find(
        pacs.port,
        tmp_path / "pat",
        "QueryRetrieveLevel=PATIENT",
        "PatientID",
        "NumberOfPatientRelatedStudies",
        model="-P",
    )
    assert patient.PatientID == PHI_PATIENT_ID
    assert int(patient.NumberOfPatientRelatedStudies) == 1
    series = find(
        pacs.port,
        tmp_path / "ser",
        "QueryRetrieveLevel=SERIES",
        f"PatientID={PHI_PATIENT_ID}",
        f"StudyInstanceUID={study.study_uid}",
        "SeriesInstanceUID",
        "NumberOfSeriesRelatedInstances",
        model="-P",
    )
    assert sorted(s.SeriesInstanceUID for s in series) == sorted(study.series_uids)
    assert sorted(int(s.NumberOfSeriesRelatedInstances) for s in series) == [2, 3]
    # PATIENT level does not exist in the Study Root model: no match is returned.
    assert find(pacs.port, tmp_path / "bad", "QueryRetrieveLevel=PATIENT", "PatientID") == []


def test_move_sends_study_unchanged_to_store_scp(
    tools: None, pacs: DemoPacs, store_scp: StoreScp, study: StudyInfo
) -> None:
    dcmtk(
        "movescu",
        "-S",
        "-aec",
        "PACS",
        "-aem",
        "STORE",
        "-k",
        "QueryRetrieveLevel=STUDY",
        "-k",
        f"StudyInstanceUID={study.study_uid}",
        HOST,
        str(pacs.port),
    )
    assert len(store_scp.received) == 5
    assert received_hashes(store_scp.received) == source_hashes(study)


def test_move_series_level_sends_only_that_series(
    tools: None, pacs: DemoPacs, store_scp: StoreScp, study: StudyInfo
) -> None:
    dcmtk(
        "movescu",
        "-S",
        "-aec",
        "PACS",
        "-aem",
        "STORE",
        "-k",
        "QueryRetrieveLevel=SERIES",
        "-k",
        f"StudyInstanceUID={study.study_uid}",
        "-k",
        f"SeriesInstanceUID={study.series_uids[1]}",
        HOST,
        str(pacs.port),
    )
    got = received_hashes(store_scp.received)
    assert len(got) == 2 and set(got) <= set(study.sop_instance_uids)


def test_move_to_unknown_destination_is_refused(
    tools: None, pacs: DemoPacs, store_scp: StoreScp, study: StudyInfo
) -> None:
    proc = dcmtk(
        "movescu",
        "-S",
        "-aec",
        "PACS",
        "-aem",
        "NOWHERE",
        "-k",
        "QueryRetrieveLevel=STUDY",
        "-k",
        f"StudyInstanceUID={study.study_uid}",
        HOST,
        str(pacs.port),
        check=False,
    )
    assert proc.returncode != 0
    assert "MoveDestinationUnknown" in proc.stderr + proc.stdout
    assert store_scp.received == []


def test_get_returns_study_unchanged(tools: None, pacs: DemoPacs, study: StudyInfo, tmp_path: Path) -> None:
    out = tmp_path / "got"
    out.mkdir()
    dcmtk(
        "getscu",
        "-S",
        "-aec",
        "PACS",
        "-od",
        str(out),
        "-k",
        "QueryRetrieveLevel=STUDY",
        "-k",
        f"StudyInstanceUID={study.study_uid}",
        HOST,
        str(pacs.port),
    )
    files = sorted(out.iterdir())
    assert len(files) == 5
    assert received_hashes(files) == source_hashes(study)


def test_store_into_pacs_is_saved_and_queryable(tools: None, pacs: DemoPacs, tmp_path: Path) -> None:
    extra = generate_study(tmp_path / "extra", 3, rows=64, cols=64, seed=8, patient_id="OTHER-1")
    dcmtk("storescu", "-aec", "PACS", HOST, str(pacs.port), *map(str, extra.files))
    assert pacs.instance_count == 8
    stored = sorted((tmp_path / "pacs").glob("*.dcm"))
    assert received_hashes(stored) == source_hashes(extra)
    studies = find(pacs.port, tmp_path / "q", "QueryRetrieveLevel=STUDY", "StudyInstanceUID")
    assert len(studies) == 2
    # A restarted PACS indexes what it stored.
    again = DemoPacs("PACS2", HOST, 0, tmp_path / "pacs", {})
    assert again.instance_count == 3


def test_identifiers_with_phi_are_not_logged(
    tools: None, pacs: DemoPacs, study: StudyInfo, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    find(
        pacs.port, tmp_path / "f", "QueryRetrieveLevel=STUDY", f"PatientName={PHI_PATIENT_NAME}", "PatientID"
    )
    dcmtk(
        "movescu",
        "-S",
        "-aec",
        "PACS",
        "-aem",
        "STORE",
        "-k",
        "QueryRetrieveLevel=STUDY",
        "-k",
        f"StudyInstanceUID={study.study_uid}",
        HOST,
        str(pacs.port),
    )
    assert PHI_PATIENT_NAME not in caplog.text and PHI_PATIENT_ID not in caplog.text
    assert study.study_uid not in caplog.text


# ------------------------------------------------------------------------------------------ CLIs
def test_cli_peers_move_and_exit_cleanly_on_sigterm(
    tools: None, study: StudyInfo, tmp_path: Path, procs: ProcessTracker
) -> None:
    store_port, pacs_port = free_ports(2)
    store = procs.spawn(
        [
            sys.executable,
            "-m",
            "tunnel_demo.store_scp",
            "--ae",
            "STORE",
            "--port",
            str(store_port),
            "--dir",
            str(tmp_path / "cloud"),
        ],
        cwd=REPO,
        name="store_scp",
    )
    pacs = procs.spawn(
        [
            sys.executable,
            "-m",
            "tunnel_demo.pacs",
            "--ae",
            "PACS",
            "--port",
            str(pacs_port),
            "--dir",
            str(study.files[0].parent),
            "--move",
            f"STORE={HOST}:{store_port}",
        ],
        cwd=REPO,
        name="pacs",
    )
    wait_for_port(HOST, store_port, timeout=20, proc=store)
    wait_for_port(HOST, pacs_port, timeout=20, proc=pacs)
    dcmtk(
        "movescu",
        "-S",
        "-aec",
        "PACS",
        "-aem",
        "STORE",
        "-k",
        "QueryRetrieveLevel=STUDY",
        "-k",
        f"StudyInstanceUID={study.study_uid}",
        HOST,
        str(pacs_port),
    )
    assert received_hashes(sorted((tmp_path / "cloud").glob("*.dcm"))) == source_hashes(study)
    assert pacs.stop() == 0, pacs.describe()
    assert store.stop() == 0, store.describe()
    assert PHI_PATIENT_NAME not in pacs.log_text() + store.log_text()


def test_peers_set_tcp_nodelay_on_both_ends(store_scp: StoreScp) -> None:
    ae = AE(ae_title="PROBE")
    ae.add_requested_context(Verification)
    assoc = ae.associate(
        HOST, store_scp.port, ae_title="STORE", evt_handlers=[(evt.EVT_CONN_OPEN, enable_nodelay)]
    )
    try:
        assert assoc.is_established
        assert assoc.dul.socket.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        acceptors = store_scp._ae.active_associations  # the SCP end of this association
        assert acceptors and all(
            a.dul.socket.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) for a in acceptors
        )
        assert assoc.send_c_echo().Status == 0x0000
    finally:
        assoc.release()


def test_parse_destination() -> None:
    assert parse_destination("STORE=127.0.0.1:11113") == ("STORE", ("127.0.0.1", 11113))
    for bad in ("STORE", "STORE=host", "=h:1", "S=h:x"):
        with pytest.raises(ValueError):
            parse_destination(bad)
