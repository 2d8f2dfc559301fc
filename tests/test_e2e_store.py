"""Acceptance: C-STORE of a few hundred CT instances through the tunnel arrives byte-identical, both ways.

Every file is sent twice with dcmtk `storescu`, with the same calling and called AE titles: once through the
tunnel and once straight to a second bit-preserving `storescp` playing the same role. The tunnel is
transparent when each file the tunnel delivered is byte-identical to the one the direct path delivered
(file meta included), and the dataset part of each equals the generated source file's.

    site → cloud:  storescu ──► agent listener "CLOUD" ──► relay ──► cloud storescp
    cloud → site:  storescu ──► relay :dicom "HOSP_PACS" ──► agent route "pacs" ──► storescp "PACS"
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

from tests.support.dcmtk import start_storescp, storescu
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
N_INSTANCES = 240
N_SERIES = 3
MATRIX = 128
RELAY_AE = "HOSP_PACS"
PACS_AE = "PACS"
CLOUD_AE = "CLOUD"
MODALITY_AE = "MODALITY"
CALLER_AE = "CLOUDAI"
STORE_TIMEOUT = 45.0
LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}


@dataclass
class Stack:
    relay: RelayHandle
    agent: AgentHandle
    dirs: dict[str, Path]  # "cloud", "cloud-direct", "pacs", "pacs-direct" -> storescp output
    ports: dict[str, int]


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> StudyInfo:
    return generate_study(tmp_path_factory.mktemp("store-study"), N_INSTANCES, rows=MATRIX, cols=MATRIX,
                          seed=77, series_count=N_SERIES)


@pytest.fixture(scope="module")
def stack(module_procs: ProcessTracker, tmp_path_factory: pytest.TempPathFactory) -> Stack:
    root = tmp_path_factory.mktemp("store-stack")
    roles = {"cloud": CLOUD_AE, "cloud-direct": CLOUD_AE, "pacs": PACS_AE, "pacs-direct": PACS_AE}
    ports = dict(zip(roles, free_ports(len(roles)), strict=True))  # distinct ports
    dirs = {role: root / role for role in roles}
    for role, ae in roles.items():
        start_storescp(module_procs, ports[role], ae, dirs[role])
    relay = make_relay(root / "relay",
                       listener_routes=[ListenerRoute(RELAY_AE, "hospital-a", "pacs", [CALLER_AE])],
                       sites={"hospital-a": [SiteDest(CLOUD_AE, ports["cloud"], [MODALITY_AE])]})
    agent = make_agent(relay, "hospital-a", root / "agent",
                       routes=[AgentRoute("pacs", ports["pacs"], PACS_AE)])
    start_relay(module_procs, relay)
    start_agent(module_procs, agent, relay)
    return Stack(relay, agent, dirs, ports)


@pytest.fixture(autouse=True)
def _logs_on_failure(request: pytest.FixtureRequest, module_procs: ProcessTracker) -> Iterator[None]:
    """The stack is module-scoped, so print its processes' logs here when a test of ours failed."""
    yield
    reports = request.node.stash.get(PHASE_REPORTS, {})
    if any(rep.failed for rep in reports.values()):
        print(f"--- processes of this module ---\n{module_procs.report()}")


# --- helpers ----------------------------------------------------------------------------------------------


def dataset_bytes(data: bytes, name: object = "file") -> bytes:
    """The part of a Part-10 file after its file meta group (always explicit VR little endian)."""
    assert data[128:132] == b"DICM", f"{name} is not a Part-10 file"
    pos = 132
    for _ in range(64):  # the meta group has a handful of elements
        group = struct.unpack_from("<H", data, pos)[0]
        if group != 0x0002:
            return data[pos:]
        if data[pos + 4:pos + 6] in LONG_VRS:
            pos += 12 + struct.unpack_from("<I", data, pos + 8)[0]
        else:
            pos += 8 + struct.unpack_from("<H", data, pos + 6)[0]
    raise AssertionError(f"{name}: the file meta group does not end")


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def source_digests(study: StudyInfo) -> dict[str, str]:
    """SOP Instance UID -> SHA-256 of the dataset part of each generated file."""
    pairs = zip(study.sop_instance_uids, study.files, strict=True)
    return {uid: sha256(dataset_bytes(path.read_bytes(), path)) for uid, path in pairs}


def files_in(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.is_file()) if directory.exists() else []


def received(directory: Path) -> dict[str, bytes]:
    """SOP Instance UID -> whole file, for everything a storescp wrote."""
    out: dict[str, bytes] = {}
    for path in files_in(directory):
        uid = str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
        assert uid not in out, f"instance {uid} stored twice"
        out[uid] = path.read_bytes()
    return out


def send(port: int, called: str, calling: str, study: StudyInfo, out_dir: Path) -> float:
    """storescu every file in one association; wait until storescp wrote them all; return seconds."""
    assert files_in(out_dir) == [], f"{out_dir} must start empty"
    started = time.monotonic()
    result = storescu(LOOPBACK, port, called, calling, study.files, timeout=STORE_TIMEOUT)
    assert result.ok, result.stdout + result.stderr
    # storescp finishes writing a file after it answered the C-STORE; the count settles at once.
    wait_until(lambda: len(files_in(out_dir)) >= N_INSTANCES, 10,
               message=lambda: f"{N_INSTANCES} files in {out_dir}, have {len(files_in(out_dir))}")
    return time.monotonic() - started


def assert_transparent(study: StudyInfo, tunnelled_dir: Path, direct_dir: Path) -> None:
    tunnelled, direct = received(tunnelled_dir), received(direct_dir)
    assert len(tunnelled) == N_INSTANCES
    assert set(tunnelled) == set(study.sop_instance_uids)
    assert set(direct) == set(tunnelled)
    differing = sorted(uid for uid in tunnelled if tunnelled[uid] != direct[uid])
    assert not differing, f"{len(differing)} files differ between tunnel and direct, e.g. {differing[:3]}"
    source = source_digests(study)
    altered = sorted(uid for uid, data in tunnelled.items()
                     if sha256(dataset_bytes(data, uid)) != source[uid])
    assert not altered, f"{len(altered)} datasets differ from the source, e.g. {altered[:3]}"
    # Names match too (storescp names files by modality and SOP Instance UID).
    assert [p.name for p in files_in(tunnelled_dir)] == [p.name for p in files_in(direct_dir)]


def report(label: str, study: StudyInfo, tunnelled: float, direct: float) -> None:
    mb = study.total_bytes / 1e6
    print(f"{label}: {N_INSTANCES} files, {mb:.1f} MB; tunnel {tunnelled:.2f}s ({mb / tunnelled:.0f} MB/s), "
          f"direct {direct:.2f}s ({mb / direct:.0f} MB/s)")


# --- tests ------------------------------------------------------------------------------------------------


def test_store_site_to_cloud_is_byte_identical(stack: Stack, study: StudyInfo):
    tunnelled = send(stack.agent.listener_port, CLOUD_AE, MODALITY_AE, study, stack.dirs["cloud"])
    direct = send(stack.ports["cloud-direct"], CLOUD_AE, MODALITY_AE, study, stack.dirs["cloud-direct"])
    report("site->cloud C-STORE", study, tunnelled, direct)
    assert_transparent(study, stack.dirs["cloud"], stack.dirs["cloud-direct"])
    assert files_in(stack.dirs["pacs"]) == [], "nothing may reach the on-prem side"


def test_store_cloud_to_site_is_byte_identical(stack: Stack, study: StudyInfo):
    tunnelled = send(stack.relay.dicom_port, RELAY_AE, CALLER_AE, study, stack.dirs["pacs"])
    direct = send(stack.ports["pacs-direct"], PACS_AE, CALLER_AE, study, stack.dirs["pacs-direct"])
    report("cloud->site C-STORE", study, tunnelled, direct)
    assert_transparent(study, stack.dirs["pacs"], stack.dirs["pacs-direct"])


ASSOC_LINE = (r"assoc=\S+ direction={direction} .*calling={calling} called={called} "
              r"bytes_in=(\d+) bytes_out=(\d+) ")


def logged_bytes(proc, direction: str, calling: str, called: str) -> tuple[int, int]:
    """(bytes_in, bytes_out) from the one association line matching, once it has been written."""
    pattern = re.compile(ASSOC_LINE.format(direction=direction, calling=calling, called=called))

    def found() -> list[tuple[str, str]]:
        return pattern.findall(proc.log_text())

    matches = wait_until(found, 10, message=lambda: f"association line {pattern.pattern}\n{proc.describe()}")
    assert len(matches) == 1, matches
    return int(matches[0][0]), int(matches[0][1])


def test_both_ends_account_the_same_bytes(procs, tmp_path, ct_study_small):
    """The agent and the relay log one line per association; both ends must count the same bytes."""
    pacs_port, cloud_port = free_ports(2)
    start_storescp(procs, pacs_port, PACS_AE, tmp_path / "pacs")
    start_storescp(procs, cloud_port, CLOUD_AE, tmp_path / "cloud")
    relay = make_relay(tmp_path / "relay", listener_routes=[ListenerRoute(RELAY_AE, "hospital-a", "pacs")],
                       sites={"hospital-a": [SiteDest(CLOUD_AE, cloud_port)]})
    agent = make_agent(relay, "hospital-a", tmp_path / "agent",
                       routes=[AgentRoute("pacs", pacs_port, PACS_AE)])
    start_relay(procs, relay)
    start_agent(procs, agent, relay)
    payload = sum(path.stat().st_size for path in ct_study_small.files)
    storescu(LOOPBACK, agent.listener_port, CLOUD_AE, MODALITY_AE, ct_study_small.files).check()
    storescu(LOOPBACK, relay.dicom_port, RELAY_AE, CALLER_AE, ct_study_small.files).check()
    for direction, calling, called, ingress, egress in [
        ("site-to-cloud", MODALITY_AE, CLOUD_AE, agent.proc, relay.proc),
        ("cloud-to-site", CALLER_AE, RELAY_AE, relay.proc, agent.proc),
    ]:
        at_ingress = logged_bytes(ingress, direction, calling, called)
        at_egress = logged_bytes(egress, direction, calling, called)
        assert at_ingress[0] > payload * 0.9, (direction, at_ingress, payload)
        # bytes_in may differ only by the called-AE rewrite, which keeps the PDU length.
        assert at_egress == at_ingress, f"{direction}: ingress logged {at_ingress}, egress {at_egress}"
