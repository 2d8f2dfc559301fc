"""Acceptance with a real PACS: Orthanc behind the agent, cloud dcmtk tools in front of the relay.

Topology (one stack per module; Orthanc takes seconds to start and stop):

    cloud SCU ──► relay :dicom  "HOSP_PACS" ──► site hospital-a, route "pacs" ──► agent ──► Orthanc
    Orthanc C-MOVE sub-association ──► agent listener, called "CLOUD" ──► relay ──► cloud storescp

What the tunnel carries must be indistinguishable from talking to Orthanc directly: C-FIND answers equal
those of the same query sent straight to Orthanc, C-GET returns every instance byte for byte, and C-MOVE
lands every instance of the study at the cloud store SCP through both directions of the tunnel.
"""

from __future__ import annotations

import hashlib
import re
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest

from tests.support.dcmtk import echoscu, findscu, getscu, movescu, start_storescp
from tests.support.orthanc import OrthancHandle, normalize_find, start_orthanc
from tests.support.ports import free_ports
from tests.support.procs import PHASE_REPORTS, ProcessTracker, wait_until
from tests.support.stack import (
    AgentHandle,
    AgentRoute,
    ListenerRoute,
    RelayHandle,
    SiteDest,
    make_agent,
    make_relay,
    start_agent,
    start_relay,
)
from tunnel_demo.dataset import StudyInfo, generate_study

LOOPBACK = "127.0.0.1"
RELAY_AE = "HOSP_PACS"      # what cloud callers call at the relay
ORTHANC_AE = "ORTHANC"      # the PACS's own AE title (the agent rewrites the called AE to it)
CLOUD_AE = "CLOUD"          # the cloud store SCP, a C-MOVE destination known to Orthanc
CALLER_AE = "CLOUDAI"       # the cloud service's calling AE
N_INSTANCES = 12
N_SERIES = 2
TOOL_TIMEOUT = 30.0
SUB_ASSOCIATION = re.compile(
    rf"direction=site-to-cloud .*calling={ORTHANC_AE} called={CLOUD_AE} .*outcome=completed")


@dataclass
class Stack:
    study: StudyInfo
    orthanc: OrthancHandle
    relay: RelayHandle
    agent: AgentHandle
    cloud_dir: Path
    procs: ProcessTracker


# --- fixtures ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> StudyInfo:
    return generate_study(tmp_path_factory.mktemp("orthanc-study"), N_INSTANCES, rows=64, cols=64, seed=41,
                          series_count=N_SERIES)


@pytest.fixture(scope="module")
def stack(module_procs: ProcessTracker, tmp_path_factory: pytest.TempPathFactory,
          study: StudyInfo) -> Stack:
    root = tmp_path_factory.mktemp("orthanc-stack")
    cloud_port, orthanc_port = free_ports(2)  # distinct: held open together while chosen
    cloud_dir = root / "cloud"
    start_storescp(module_procs, cloud_port, CLOUD_AE, cloud_dir)
    # Only Orthanc may send to the cloud destination, and only the cloud service may query the PACS.
    relay = make_relay(root / "relay",
                       listener_routes=[ListenerRoute(RELAY_AE, "hospital-a", "pacs", [CALLER_AE])],
                       sites={"hospital-a": [SiteDest(CLOUD_AE, cloud_port, [ORTHANC_AE])]})
    agent = make_agent(relay, "hospital-a", root / "agent",
                       routes=[AgentRoute("pacs", orthanc_port, ORTHANC_AE)])
    # Orthanc knows the cloud AE at the agent's local listener: C-MOVE goes out through the tunnel.
    orthanc = start_orthanc(module_procs, root, aet=ORTHANC_AE, dicom_port=orthanc_port,
                            modalities={"cloud": (CLOUD_AE, LOOPBACK, agent.listener_port)},
                            extra_config={"DicomCheckCalledAet": True})
    orthanc.upload(study.files)
    assert orthanc.instances_count() == N_INSTANCES
    start_relay(module_procs, relay)
    start_agent(module_procs, agent, relay)
    return Stack(study, orthanc, relay, agent, cloud_dir, module_procs)


@pytest.fixture(autouse=True)
def _logs_on_failure(request: pytest.FixtureRequest, module_procs: ProcessTracker) -> Iterator[None]:
    """The stack is module-scoped, so print its processes' logs here when a test of ours failed."""
    yield
    reports = request.node.stash.get(PHASE_REPORTS, {})
    if any(rep.failed for rep in reports.values()):
        print(f"--- processes of this module ---\n{module_procs.report()}")


# --- helpers ----------------------------------------------------------------------------------------------


def dataset_bytes(path: Path) -> bytes:
    """The part of a Part-10 file after the file meta group (explicit VR little endian group 0002)."""
    data = path.read_bytes()
    assert data[128:132] == b"DICM", f"{path} is not a Part-10 file"
    pos = 132
    for _ in range(64):  # the meta group has a handful of elements
        group, _element = struct.unpack_from("<HH", data, pos)
        if group != 0x0002:
            return data[pos:]
        vr = data[pos + 4:pos + 6]
        if vr in (b"OB", b"OW", b"OF", b"SQ", b"UT", b"UN", b"UC", b"UR", b"OD", b"OL", b"OV", b"SV", b"UV"):
            length = struct.unpack_from("<I", data, pos + 8)[0]
            pos += 12 + length
        else:
            length = struct.unpack_from("<H", data, pos + 6)[0]
            pos += 8 + length
    raise AssertionError(f"{path}: file meta group does not end")


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def source_digests(study: StudyInfo) -> dict[str, str]:
    """SOP Instance UID -> SHA-256 of the dataset part of the generated file."""
    pairs = zip(study.sop_instance_uids, study.files, strict=True)
    return {uid: sha256(dataset_bytes(path)) for uid, path in pairs}


def received_digests(directory: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        uid = str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
        assert uid not in out, f"instance {uid} received twice"
        out[uid] = sha256(dataset_bytes(path))
    return out


def files_in(directory: Path) -> list[Path]:
    return [p for p in directory.rglob("*") if p.is_file()] if directory.exists() else []


def find_both_ways(stack: Stack, level: str, keys: dict[str, str | None]) -> tuple[list, list]:
    """The same C-FIND through the relay and straight at Orthanc; both must succeed."""
    tunnelled = findscu(LOOPBACK, stack.relay.dicom_port, RELAY_AE, CALLER_AE, level, keys,
                        timeout=TOOL_TIMEOUT).check()
    direct = findscu(LOOPBACK, stack.orthanc.dicom_port, ORTHANC_AE, CALLER_AE, level, keys,
                     timeout=TOOL_TIMEOUT).check()
    return tunnelled.responses, direct.responses


# --- tests ------------------------------------------------------------------------------------------------


def test_echo_through_the_relay_reaches_orthanc(stack: Stack):
    result = echoscu(LOOPBACK, stack.relay.dicom_port, RELAY_AE, CALLER_AE, timeout=TOOL_TIMEOUT)
    assert result.ok, result.stdout + result.stderr
    # Orthanc checks the called AE: it answered because the agent rewrote HOSP_PACS to ORTHANC.
    refused = echoscu(LOOPBACK, stack.orthanc.dicom_port, RELAY_AE, CALLER_AE, timeout=TOOL_TIMEOUT)
    assert not refused.ok, "Orthanc should refuse its non-own called AE; the rewrite check proves nothing"


def test_find_study_level_equals_direct(stack: Stack):
    keys = {"StudyInstanceUID": None, "PatientID": None, "PatientName": None, "StudyDate": None,
            "AccessionNumber": None, "ModalitiesInStudy": None, "NumberOfStudyRelatedSeries": None,
            "NumberOfStudyRelatedInstances": None}
    tunnelled, direct = find_both_ways(stack, "STUDY", keys)
    assert normalize_find(tunnelled) == normalize_find(direct)
    assert [str(ds.StudyInstanceUID) for ds in tunnelled] == [stack.study.study_uid]
    assert int(tunnelled[0].NumberOfStudyRelatedInstances) == N_INSTANCES
    assert int(tunnelled[0].NumberOfStudyRelatedSeries) == N_SERIES


def test_find_series_level_equals_direct(stack: Stack):
    keys = {"StudyInstanceUID": stack.study.study_uid, "SeriesInstanceUID": None, "Modality": None,
            "SeriesNumber": None, "NumberOfSeriesRelatedInstances": None}
    tunnelled, direct = find_both_ways(stack, "SERIES", keys)
    assert normalize_find(tunnelled) == normalize_find(direct)
    assert {str(ds.SeriesInstanceUID) for ds in tunnelled} == set(stack.study.series_uids)


def test_find_image_level_equals_direct(stack: Stack):
    keys = {"StudyInstanceUID": stack.study.study_uid, "SeriesInstanceUID": None, "PatientID": None,
            "Modality": None, "SOPInstanceUID": None, "SOPClassUID": None, "InstanceNumber": None}
    tunnelled, direct = find_both_ways(stack, "IMAGE", keys)
    assert normalize_find(tunnelled) == normalize_find(direct)
    assert len(tunnelled) == N_INSTANCES
    assert {str(ds.SOPInstanceUID) for ds in tunnelled} == set(stack.study.sop_instance_uids)
    # A matching key narrows the answer the same way on both paths: one series only.
    series = stack.study.series_uids[1]
    tunnelled, direct = find_both_ways(stack, "IMAGE", {**keys, "SeriesInstanceUID": series})
    assert normalize_find(tunnelled) == normalize_find(direct)
    assert 0 < len(tunnelled) < N_INSTANCES
    assert {str(ds.SeriesInstanceUID) for ds in tunnelled} == {series}


def test_get_through_the_relay_returns_every_instance_bit_for_bit(stack: Stack, tmp_path: Path):
    out = tmp_path / "get"
    out.mkdir()
    started = time.monotonic()
    result = getscu(LOOPBACK, stack.relay.dicom_port, RELAY_AE, CALLER_AE,
                    {"StudyInstanceUID": stack.study.study_uid}, "STUDY", out, timeout=TOOL_TIMEOUT)
    assert result.ok, result.stdout + result.stderr
    print(f"C-GET of {N_INSTANCES} instances through the tunnel: {time.monotonic() - started:.2f}s")
    assert received_digests(out) == source_digests(stack.study)


def test_move_through_the_relay_lands_at_the_cloud_scp(stack: Stack):
    assert files_in(stack.cloud_dir) == [], "the cloud SCP is only written by this test"
    started = time.monotonic()
    result = movescu(LOOPBACK, stack.relay.dicom_port, RELAY_AE, CALLER_AE, CLOUD_AE,
                     {"StudyInstanceUID": stack.study.study_uid}, "STUDY", timeout=TOOL_TIMEOUT)
    assert result.ok, result.stdout + result.stderr
    # movescu returns after the final C-MOVE response; storescp may still be closing the last file.
    wait_until(lambda: len(files_in(stack.cloud_dir)) >= N_INSTANCES, 10,
               message=lambda: f"{N_INSTANCES} files at the cloud SCP, have {len(files_in(stack.cloud_dir))}")
    print(f"C-MOVE of {N_INSTANCES} instances out and back through the tunnel: "
          f"{time.monotonic() - started:.2f}s")
    received = received_digests(stack.cloud_dir)
    assert set(received) == set(stack.study.sop_instance_uids)
    assert received == source_digests(stack.study)
    # The instances went out on Orthanc's own association, carried site-to-cloud by agent and relay.
    for proc in (stack.agent.proc, stack.relay.proc):
        assert SUB_ASSOCIATION.search(proc.log_text()), f"no sub-association logged:\n{proc.describe()}"
