"""Acceptance (issue 12): a modality's C-STORE to a spool destination is answered by the agent once each
instance is durable, and the forwarder delivers every instance to the cloud, byte-identical.

    storescu ──► agent listener "CLOUD" (spool: the agent is the SCP) ··· spool ···
             forwarder ──► tunnel ──► relay ──► cloud storescp "CLOUD"

The relay may be down while the modality sends: the modality's send still completes, and the cloud has
everything once the relay is back.
"""

from __future__ import annotations

import json
import os
import shutil
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE, StoragePresentationContexts, evt

from devkit.fixtures import small_tmpfs
from tests.support.dcmtk import start_storescp, storescu
from tests.support.orthanc import start_orthanc
from tests.support.ports import free_ports
from tests.support.procs import ProcessTracker, wait_until
from tests.support.stack import (
    ListenerRoute,
    SiteDest,
    make_agent,
    make_relay,
    start_agent,
    start_relay,
)
from tests.test_e2e_store import dataset_bytes, files_in, received, sha256, source_digests
from tunnel_demo.dataset import StudyInfo, generate_study

LOOPBACK = "127.0.0.1"
N_INSTANCES = 60
CLOUD_AE = "CLOUD"
MODALITY_AE = "MODALITY"
STORE_TIMEOUT = 60.0


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> StudyInfo:
    return generate_study(tmp_path_factory.mktemp("spool-study"), N_INSTANCES, rows=128, cols=128, seed=12,
                          series_count=2)


def spool_sections(parallel: int = 4) -> list[str]:
    return ["[[destinations]]", 'name = "cloud"', f'called_ae = "{CLOUD_AE}"', 'mode = "spool"',
            f"parallel = {parallel}"]


def status(port: int) -> dict:
    with urllib.request.urlopen(f"http://{LOOPBACK}:{port}/api/status", timeout=5) as response:
        return json.load(response)


def arrived(directory: Path) -> set[str]:
    """SOP Instance UIDs of the files storescp has finished writing; one it is still writing is left for the
    next look (polled by wait_until: a half-written file is not yet an arrival, nor an error)."""
    uids: set[str] = set()
    for path in files_in(directory):
        try:
            uids.add(str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID))
        except (pydicom.errors.InvalidDicomError, EOFError, OSError, ValueError, AttributeError):
            continue
    return uids


def assert_delivered(study: StudyInfo, out_dir: Path) -> None:
    got = received(out_dir)
    assert set(got) == set(study.sop_instance_uids)
    source = source_digests(study)
    altered = [uid for uid, data in got.items() if sha256(dataset_bytes(data, uid)) != source[uid]]
    assert not altered, f"{len(altered)} datasets differ from the source"


def test_spool_destination_stores_then_forwards_everything(procs: ProcessTracker, tmp_path: Path,
                                                           study: StudyInfo) -> None:
    cloud_port, = free_ports(1)
    cloud_dir = tmp_path / "cloud"
    start_storescp(procs, cloud_port, CLOUD_AE, cloud_dir)
    relay = make_relay(tmp_path / "relay", listener_routes=[ListenerRoute("UNUSED", "hospital-a", "pacs")],
                       sites={"hospital-a": [SiteDest(CLOUD_AE, cloud_port, [MODALITY_AE, "TUNNEL-HEALTH"])]})
    agent = make_agent(relay, "hospital-a", tmp_path / "agent", routes=[],
                       extra=[f'state_dir = "{tmp_path / "agent" / "state"}"'], sections=spool_sections())
    start_relay(procs, relay)
    start_agent(procs, agent, relay, wait_listener=True)
    result = storescu(LOOPBACK, agent.listener_port, CLOUD_AE, MODALITY_AE, study.files, timeout=STORE_TIMEOUT)
    assert result.ok, result.stdout + result.stderr
    wait_until(lambda: len(files_in(cloud_dir)) >= N_INSTANCES, 30,
               message=lambda: f"{N_INSTANCES} files at the cloud, have {len(files_in(cloud_dir))}")
    assert_delivered(study, cloud_dir)
    # The forwarded count moves just after an entry leaves the spool (one event-loop turn): wait for both.
    spool = wait_until(lambda: (s := status(agent.status_port)["spool"]["cloud"])["instances"] == 0
                       and s["forwarded"] + s["quarantined"] >= N_INSTANCES and s, 10)
    assert spool["forwarded"] == N_INSTANCES and spool["quarantined"] == 0
    state = tmp_path / "agent" / "state" / "spool"
    assert os.stat(state).st_mode & 0o777 == 0o700


def test_relay_down_during_the_send(procs: ProcessTracker, tmp_path: Path, study: StudyInfo) -> None:
    cloud_port, = free_ports(1)
    cloud_dir = tmp_path / "cloud"
    start_storescp(procs, cloud_port, CLOUD_AE, cloud_dir)
    relay = make_relay(tmp_path / "relay", listener_routes=[ListenerRoute("UNUSED", "hospital-a", "pacs")],
                       sites={"hospital-a": [SiteDest(CLOUD_AE, cloud_port)]})
    agent = make_agent(relay, "hospital-a", tmp_path / "agent", routes=[],
                       extra=[f'state_dir = "{tmp_path / "agent" / "state"}"'], sections=spool_sections())
    start_agent(procs, agent, wait_connected=False, wait_listener=True)  # the relay is not running
    result = storescu(LOOPBACK, agent.listener_port, CLOUD_AE, MODALITY_AE, study.files, timeout=STORE_TIMEOUT)
    assert result.ok, result.stdout + result.stderr  # answered from the spool, relay or not
    assert files_in(cloud_dir) == []
    assert status(agent.status_port)["spool"]["cloud"]["instances"] == N_INSTANCES
    start_relay(procs, relay)
    wait_until(lambda: len(files_in(cloud_dir)) >= N_INSTANCES, 60,
               message=lambda: f"{N_INSTANCES} files at the cloud, have {len(files_in(cloud_dir))}")
    assert_delivered(study, cloud_dir)


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs of the test's own, unmounted afterwards (also when the test fails)."""
    with small_tmpfs(tmp_path / "small", "2m") as mount_point:
        yield mount_point


def store_responses(log: str) -> tuple[list[str], list[str]]:
    """(files answered success, files answered anything else) from a storescu -v log."""
    ok, failed, current = [], [], None
    for line in log.splitlines():
        if line.startswith("I: Sending file: "):
            current = line.removeprefix("I: Sending file: ").strip()
        elif line.startswith(("I: Received Store Response", "E: Store Failed", "W: Store Response")) and current:
            (ok if "(Success)" in line else failed).append(current)
            current = None
    return ok, failed


def test_a_full_spool_answers_failure_never_success_and_recovers(procs: ProcessTracker, tmp_path: Path,
                                                               small_fs: Path) -> None:
    big = generate_study(tmp_path / "big", 40, rows=256, cols=256, seed=5, series_count=1)  # 40 x 128 KiB
    cloud_port, = free_ports(1)
    cloud_dir = tmp_path / "cloud"
    start_storescp(procs, cloud_port, CLOUD_AE, cloud_dir)
    relay = make_relay(tmp_path / "relay", listener_routes=[ListenerRoute("UNUSED", "hospital-a", "pacs")],
                       sites={"hospital-a": [SiteDest(CLOUD_AE, cloud_port)]})
    agent = make_agent(relay, "hospital-a", tmp_path / "agent", routes=[],
                       extra=[f'state_dir = "{tmp_path / "agent" / "state"}"'],
                       sections=[*spool_sections(), "[spool]", f'directory = "{small_fs / "spool"}"',
                                 "min_free_bytes = 0"])
    agent_proc = start_agent(procs, agent, wait_connected=False, wait_listener=True)  # relay down: it fills
    files = [str(f) for f in big.files]
    first = storescu(LOOPBACK, agent.listener_port, CLOUD_AE, MODALITY_AE, files, ["-v", "-nh"],
                     timeout=STORE_TIMEOUT)
    ok, failed = store_responses(first.stdout + first.stderr)
    assert ok and failed, f"expected both outcomes from a 2 MiB spool:\n{first.stdout}{first.stderr}"
    assert len(ok) + len(failed) == len(files)
    assert "Received Store Response (Refused: OutOfResources)" in first.stderr  # 0xA700
    assert agent_proc.running
    held = status(agent.status_port)["spool"]["cloud"]
    assert held["instances"] == len(ok)  # exactly what was answered success, nothing more
    start_relay(procs, relay)  # space comes back as the spool drains
    uid_of = dict(zip(files, big.sop_instance_uids, strict=True))
    wait_until(lambda: {uid_of[f] for f in ok} <= arrived(cloud_dir), 60, message="the stored ones delivered")
    # Arrived is one step ahead of gone from the spool (the entry is removed once the cloud's answer is in):
    # the second send must find the space back.
    wait_until(lambda: status(agent.status_port)["spool"]["cloud"]["instances"] == 0, 30,
               message="the spool emptied")
    second = storescu(LOOPBACK, agent.listener_port, CLOUD_AE, MODALITY_AE, failed, ["-v", "-nh"],
                      timeout=STORE_TIMEOUT)
    ok2, failed2 = store_responses(second.stdout + second.stderr)
    assert sorted(ok2) == sorted(failed) and not failed2
    wait_until(lambda: len(arrived(cloud_dir)) == len(files), 60, message="everything at the cloud")
    assert set(received(cloud_dir)) == set(big.sop_instance_uids)


SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"


def test_a_sop_class_the_destination_refuses_is_quarantined_and_stalls_nothing(
        procs: ProcessTracker, tmp_path: Path, study: StudyInfo) -> None:
    """The cloud (a pynetdicom SCP) negotiates Secondary Capture but answers 0x0122 for it: those instances
    go to quarantine with the reason, the CT instances behind and among them are delivered."""
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    files = []
    for source in study.files:  # copies: the module's study stays as it is
        files.append(str(mixed / source.name))
        shutil.copyfile(source, files[-1])
    refused = {}
    for path in files[::6]:  # every sixth instance becomes Secondary Capture
        ds = pydicom.dcmread(path)
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = SECONDARY_CAPTURE
        ds.save_as(path)
        refused[str(ds.SOPInstanceUID)] = path
    stored: list[str] = []

    def on_store(event: evt.Event) -> int:
        if event.request.AffectedSOPClassUID == SECONDARY_CAPTURE:
            return 0x0122
        stored.append(str(event.request.AffectedSOPInstanceUID))
        return 0x0000

    cloud = AE(ae_title=CLOUD_AE)
    cloud.supported_contexts = StoragePresentationContexts
    cloud_port, = free_ports(1)
    server = cloud.start_server((LOOPBACK, cloud_port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    try:
        relay = make_relay(tmp_path / "relay", listener_routes=[ListenerRoute("UNUSED", "hospital-a", "pacs")],
                           sites={"hospital-a": [SiteDest(CLOUD_AE, cloud_port)]})
        agent = make_agent(relay, "hospital-a", tmp_path / "agent", routes=[],
                           extra=[f'state_dir = "{tmp_path / "agent" / "state"}"'], sections=spool_sections())
        start_relay(procs, relay)
        start_agent(procs, agent, relay, wait_listener=True)
        result = storescu(LOOPBACK, agent.listener_port, CLOUD_AE, MODALITY_AE, files, timeout=STORE_TIMEOUT)
        assert result.ok, result.stdout + result.stderr
        cts = set(study.sop_instance_uids) - set(refused)
        wait_until(lambda: set(stored) >= cts, 30, message=lambda: f"{len(cts - set(stored))} CT instances missing")
        # The forwarded count moves just after an entry leaves the spool (one event-loop turn): wait for both.
        spool = wait_until(lambda: (s := status(agent.status_port)["spool"]["cloud"])["instances"] == 0
                           and s["forwarded"] + s["quarantined"] >= len(files) and s, 10)
        assert spool["quarantined"] == len(refused)
        assert spool["forwarded"] == len(cts)
        metrics = urllib.request.urlopen(f"http://{LOOPBACK}:{agent.status_port}/metrics", timeout=5).read().decode()
        assert f'dicom_tunnel_spool_quarantined{{destination="cloud"}} {len(refused)}.0' in metrics
        quarantine = tmp_path / "agent" / "state" / "spool" / "cloud" / "quarantine"
        reasons = [p.read_text() for p in quarantine.glob("*.reason")]
        assert len(reasons) == len(refused) and all("SOP class not supported" in r for r in reasons)
        for uid in refused:
            assert uid not in metrics and uid not in "".join(reasons)  # no identifiers where ops look
    finally:
        server.shutdown()


def test_orthanc_as_the_sending_modality(procs: ProcessTracker, tmp_path: Path, study: StudyInfo) -> None:
    """Orthanc pushes a study (REST /modalities/cloud/store, a C-STORE SCU) to the agent's spool
    destination; every instance reaches the cloud storescp byte-identical."""
    cloud_port, = free_ports(1)
    cloud_dir = tmp_path / "cloud"
    start_storescp(procs, cloud_port, CLOUD_AE, cloud_dir)
    relay = make_relay(tmp_path / "relay", listener_routes=[ListenerRoute("UNUSED", "hospital-a", "pacs")],
                       sites={"hospital-a": [SiteDest(CLOUD_AE, cloud_port, ["ORTHANC", "TUNNEL-HEALTH"])]})
    agent = make_agent(relay, "hospital-a", tmp_path / "agent", routes=[],
                       extra=[f'state_dir = "{tmp_path / "agent" / "state"}"'], sections=spool_sections())
    start_relay(procs, relay)
    start_agent(procs, agent, relay, wait_listener=True)
    orthanc = start_orthanc(procs, tmp_path, aet="ORTHANC",
                            modalities={"cloud": (CLOUD_AE, LOOPBACK, agent.listener_port)})
    ids = orthanc.upload(study.files)
    answer = orthanc.post_json("/modalities/cloud/store", {"Resources": ids, "Synchronous": True})
    assert answer.get("FailedInstancesCount", 0) == 0, answer
    wait_until(lambda: len(files_in(cloud_dir)) >= N_INSTANCES, 30,
               message=lambda: f"{N_INSTANCES} files at the cloud, have {len(files_in(cloud_dir))}")
    assert_delivered(study, cloud_dir)
