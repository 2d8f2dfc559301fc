"""Faults: the relay SIGKILLed mid-C-STORE, the agent SIGKILLed. No false success, prompt rejects, and the
agent reconnects by itself when the relay comes back."""

from __future__ import annotations

import re
import signal
import time

import pydicom
import pytest

from tests.support.dcmtk import echoscu, require_binary, start_storescp, storescu
from tests.support.ports import free_port
from tests.support.procs import wait_until
from tests.support.rawdicom import request_reject
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


@pytest.fixture
def stack(procs, tmp_path):
    pacs_port, cloud_port = free_port(), free_port()
    start_storescp(procs, pacs_port, "PACS", tmp_path / "pacs")
    start_storescp(procs, cloud_port, "CLOUD", tmp_path / "cloud")
    relay = make_relay(tmp_path / "relay", listener_routes=[ListenerRoute("HOSP_PACS", "hospital-a", "pacs")],
                       sites={"hospital-a": [SiteDest("CLOUD", cloud_port)]})
    agent = make_agent(relay, "hospital-a", tmp_path / "agent", routes=[AgentRoute("pacs", pacs_port)],
                       backoff_max=0.5)
    start_relay(procs, relay)
    start_agent(procs, agent, relay)
    return relay, agent, tmp_path


def _successes(log: str) -> list[str]:
    """Files storescu itself reported as stored with a Success response."""
    done, current = [], None
    for line in log.splitlines():
        if m := re.search(r"Sending file: (\S+)", line):
            current = m.group(1)
        elif "Received Store Response (Success)" in line and current:
            done.append(current)
            current = None
    return done


def test_relay_killed_mid_store_no_false_success_then_reconnect(procs, stack):
    relay, agent, tmp = stack
    study = generate_study(tmp / "study", 300, rows=512, cols=512)
    scu = procs.spawn([require_binary("storescu"), "-v", "-aet", "MODALITY", "-aec", "CLOUD", "-to", "30",
                       "-ta", "30", "127.0.0.1", str(agent.listener_port), *map(str, study.files)],
                      env={"TCP_NODELAY": "1"}, name="storescu")
    cloud = tmp / "cloud"
    wait_until(lambda: len(list(cloud.iterdir())) >= 10, 60, message="transfer under way")
    relay.proc.kill(signal.SIGKILL)
    relay.proc.wait(10)
    scu.wait(60)
    log = scu.log_text()
    succeeded = _successes(log)
    assert len(succeeded) < len(study.files), "the kill came too late to interrupt the transfer"
    assert scu.returncode != 0 or re.search(r"^[EF]: ", log, re.M), "storescu did not report the failure"
    arrived = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in cloud.iterdir()}
    claimed = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in succeeded}
    assert claimed <= arrived, f"{len(claimed - arrived)} instances reported stored but never arrived"
    print(f"relay killed after {len(succeeded)} of {len(study.files)} instances; all of them arrived")

    # The agent notices, backs off, and reconnects by itself once the relay is back on the same port.
    wait_until(lambda: agent.status()["state"] != "connected", 10, message="agent notices the relay died")
    start_relay(procs, relay)
    wait_until(lambda: agent.status()["state"] == "connected", 15, message="agent reconnects")
    assert agent.status()["reconnects"] >= 1
    assert echoscu("127.0.0.1", agent.listener_port, "CLOUD", "MODALITY").ok
    assert storescu("127.0.0.1", agent.listener_port, "CLOUD", "MODALITY", study.files[-1:]).ok
    assert echoscu("127.0.0.1", relay.dicom_port, "HOSP_PACS", "CLOUDAI").ok


def test_agent_killed_callers_get_2_3_1_at_once(procs, stack):
    relay, agent, _tmp = stack
    assert echoscu("127.0.0.1", relay.dicom_port, "HOSP_PACS", "CLOUDAI").ok
    agent.proc.kill(signal.SIGKILL)
    agent.proc.wait(10)
    start = time.monotonic()
    reason, elapsed = request_reject(relay.dicom_port, "HOSP_PACS", "CLOUDAI")
    assert reason == (2, 3, 1)
    assert elapsed < 2.0
    result = echoscu("127.0.0.1", relay.dicom_port, "HOSP_PACS", "CLOUDAI", timeout=10)
    assert not result.ok and "Temporary Congestion" in result.stdout + result.stderr
    print(f"agent killed: rejects in {elapsed * 1000:.1f} ms, echoscu answered in "
          f"{(time.monotonic() - start) * 1000:.0f} ms")
