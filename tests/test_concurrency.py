"""Many associations over one tunnel at once, and a C-ECHO that does not wait behind a bulk C-STORE."""

from __future__ import annotations

import hashlib
import time
from concurrent.futures import ThreadPoolExecutor

import pydicom
import pytest

from tests.support.dcmtk import echoscu, findscu, require_binary, start_storescp, storescu
from tests.support.ports import free_port
from tests.support.procs import wait_until
from tests.support.stack import (
    AgentRoute,
    ListenerRoute,
    SiteDest,
    make_agent,
    make_relay,
    start_agent,
    start_relay,
)
from tunnel_demo.dataset import generate_study
from tunnel_demo.pacs import DemoPacs


def _dataset_digest(path) -> str:
    """SHA-256 of the dataset after the file meta group: what C-STORE carries."""
    raw = path.read_bytes()
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    meta_len = 132 + 12 + ds.file_meta.FileMetaInformationGroupLength
    return hashlib.sha256(raw[meta_len:]).hexdigest()


@pytest.fixture
def stack(procs, tmp_path):
    cloud_port, echo_cloud, echo_site = free_port(), free_port(), free_port()
    start_storescp(procs, cloud_port, "CLOUD", tmp_path / "cloud")
    # dcmtk's storescp serves one association at a time: the echoes get SCPs of their own, so any wait
    # they show is the tunnel's.
    start_storescp(procs, echo_cloud, "ECHO", tmp_path / "echo-cloud")
    start_storescp(procs, echo_site, "ECHO", tmp_path / "echo-site")
    study = generate_study(tmp_path / "study", 20, rows=64, cols=64)
    pacs = DemoPacs("PACS", "127.0.0.1", 0, tmp_path / "pacs", {})
    pacs.add_files(study.files)
    pacs.start()
    relay = make_relay(tmp_path / "relay", listener_routes=[ListenerRoute("HOSP_PACS", "hospital-a", "pacs"),
                                                            ListenerRoute("HOSP_ECHO", "hospital-a", "echo")],
                       sites={"hospital-a": [SiteDest("CLOUD", cloud_port), SiteDest("ECHO", echo_cloud)]})
    agent = make_agent(relay, "hospital-a", tmp_path / "agent",
                       routes=[AgentRoute("pacs", pacs.port), AgentRoute("echo", echo_site)])
    start_relay(procs, relay)
    start_agent(procs, agent, relay)
    try:
        yield relay, agent, study, tmp_path
    finally:
        pacs.stop()


def test_fifty_parallel_associations(stack):
    relay, agent, study, tmp = stack
    uploads = [generate_study(tmp / f"up{i}", 3, rows=64, cols=64, seed=100 + i) for i in range(25)]

    def store(i: int) -> list[str]:
        files = uploads[i].files
        # Odd ones go cloud → on-prem PACS through the relay, even ones modality → cloud through the agent.
        port, called = (relay.dicom_port, "HOSP_PACS") if i % 2 else (agent.listener_port, "CLOUD")
        storescu("127.0.0.1", port, called, f"SCU{i}", files).check()
        return [_dataset_digest(f) for f in files]

    def find(i: int) -> int:
        result = findscu("127.0.0.1", relay.dicom_port, "HOSP_PACS", f"FIND{i}", "IMAGE",
                         {"StudyInstanceUID": study.study_uid, "SOPInstanceUID": None})
        result.check()
        return len({ds.SOPInstanceUID for ds in result.responses})

    with ThreadPoolExecutor(max_workers=50) as pool:
        stores = [pool.submit(store, i) for i in range(25)]
        finds = [pool.submit(find, i) for i in range(25)]
        digests = [f.result(timeout=120) for f in stores]
        counts = [f.result(timeout=120) for f in finds]
    assert counts == [len(study.files)] * 25
    received = {_dataset_digest(p) for p in (tmp / "cloud").iterdir()}
    received |= {_dataset_digest(p) for p in (tmp / "pacs").glob("*.dcm")}
    sent = {d for ds in digests for d in ds}
    assert sent <= received, f"{len(sent - received)} instances missing or altered"
    # Nothing is left behind: every stream of the 50 associations is gone from both ends.
    wait_until(lambda: relay.status()["sites"][0]["active_streams"] == 0, 10, message="relay streams released")
    wait_until(lambda: agent.status()["active_streams"] == 0, 10, message="agent streams released")
    assert not relay.status()["associations"] and not agent.status()["associations"]
    print(f"50 associations: {len(sent)} instances stored byte-identical, 25 C-FIND x {counts[0]} matches")


def test_echo_is_not_stuck_behind_a_bulk_store(stack, procs):
    relay, agent, _study, tmp = stack
    bulk = generate_study(tmp / "bulk", 600, rows=512, cols=512)  # ≈ 315 MB
    paths = [(relay.dicom_port, "HOSP_ECHO", "CLOUDAI"), (agent.listener_port, "ECHO", "MODALITY")]
    idle = _echo_times(paths)
    scu = procs.spawn([require_binary("storescu"), "-aet", "MODALITY", "-aec", "CLOUD", "-to", "120",
                       "-ta", "120", "127.0.0.1", str(agent.listener_port), *map(str, bulk.files)],
                      env={"TCP_NODELAY": "1"}, name="bulk-storescu")
    cloud = tmp / "cloud"
    wait_until(lambda: len(list(cloud.iterdir())) >= 20, 60, message="bulk transfer under way")
    assert scu.running, "bulk transfer finished before the echo could overlap it"
    loaded = _echo_times(paths * 3)
    still_running = scu.running
    progress = len(list(cloud.iterdir()))
    scu.wait(300)
    assert scu.returncode == 0, scu.log_tail()
    assert still_running, "the echoes only completed after the bulk transfer ended"
    assert len(list(cloud.iterdir())) == len(bulk.files)
    print(f"echoscu wall time (ms) idle: {_fmt(idle)}; during a 315 MB C-STORE on the same tunnel: "
          f"{_fmt(loaded)} (bulk at {progress}/{len(bulk.files)} instances when the echoes were done)")


def _echo_times(paths) -> list[float]:
    times = []
    for port, called, calling in paths:
        start = time.monotonic()
        assert echoscu("127.0.0.1", port, called, calling, timeout=30).ok
        times.append((time.monotonic() - start) * 1000)
    return times


def _fmt(values: list[float]) -> str:
    return ", ".join(f"{v:.1f}" for v in values)
