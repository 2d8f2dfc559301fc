"""Acceptance (issue 12): SIGKILL the agent at random moments while modalities send to a spool destination
and while it forwards; after every restart the spool is replayed. Every instance whose C-STORE-RSP success
storescu saw arrives at the cloud (none lost); the cloud sees a second copy only of instances the agent
reported in flight at a crash; the spool ends empty.

    storescu -v ──► agent (spool, killed and restarted) ──► tunnel ──► relay ──► storescp +uf (every copy kept)
"""

from __future__ import annotations

import json
import random
import re
import signal
import time
import urllib.request
from collections import Counter
from pathlib import Path

import pydicom

from tests.support.dcmtk import require_binary, start_storescp
from tests.support.ports import free_ports
from tests.support.procs import ProcessTracker, wait_until
from tests.support.stack import ListenerRoute, SiteDest, make_agent, make_relay, start_agent, start_relay
from tunnel_demo.dataset import generate_study

LOOPBACK = "127.0.0.1"
CLOUD_AE, MODALITY_AE = "CLOUD", "MODALITY"
N_INSTANCES = 240
KILLS = 22
BUDGET_SECONDS = 240.0  # the whole loop; each round is bounded on its own too
DUPLICATES_LINE = re.compile(r"spool: (\d+) instances were being forwarded when the agent stopped")


def acked(log: str) -> set[str]:
    """The files whose C-STORE-RSP success storescu saw, from its -v log."""
    done, current = set(), None
    for line in log.splitlines():
        if line.startswith("I: Sending file: "):
            current = line.removeprefix("I: Sending file: ").strip()
        elif line.startswith("I: Received Store Response (Success)") and current is not None:
            done.add(current)
            current = None
    return done


def spool_status(port: int) -> dict:
    with urllib.request.urlopen(f"http://{LOOPBACK}:{port}/api/status", timeout=5) as response:
        return json.load(response)["spool"]["cloud"]


def cloud_copies(directory: Path) -> Counter[str]:
    return Counter(str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID)
                   for p in directory.iterdir() if p.is_file())


def test_sigkill_during_ingest_and_forwarding_loses_nothing(procs: ProcessTracker, tmp_path: Path) -> None:
    rng = random.Random(20261203)
    study = generate_study(tmp_path / "study", N_INSTANCES, rows=64, cols=64, seed=3, series_count=4)
    uid_of = {str(path): uid for path, uid in zip(study.files, study.sop_instance_uids, strict=True)}
    cloud_port, = free_ports(1)
    cloud_dir = tmp_path / "cloud"
    start_storescp(procs, cloud_port, CLOUD_AE, cloud_dir, ["+uf"])  # a second copy is a second file
    relay = make_relay(tmp_path / "relay", listener_routes=[ListenerRoute("UNUSED", "hospital-a", "pacs")],
                       sites={"hospital-a": [SiteDest(CLOUD_AE, cloud_port)]})
    agent = make_agent(relay, "hospital-a", tmp_path / "agent", routes=[],
                       extra=[f'state_dir = "{tmp_path / "agent" / "state"}"'],
                       sections=["[[destinations]]", 'name = "cloud"', f'called_ae = "{CLOUD_AE}"',
                                 'mode = "spool"', "parallel = 4"])
    start_relay(procs, relay)
    agents = [start_agent(procs, agent, relay, wait_listener=True)]
    storescu = require_binary("storescu")
    confirmed: set[str] = set()
    interrupted = 0  # rounds whose kill cut a storescu short: a kill during ingest
    started = time.monotonic()
    for round_ in range(KILLS):
        assert time.monotonic() - started < BUDGET_SECONDS, f"only {round_} kills within the budget"
        pending = [str(f) for f in study.files if str(f) not in confirmed]
        sender = None
        if pending:
            sender = procs.spawn([storescu, "-v", "-aet", MODALITY_AE, "-aec", CLOUD_AE, "-to", "10", "-ta", "10",
                                  LOOPBACK, str(agent.listener_port), *pending], name=f"storescu-{round_}")
        time.sleep(rng.uniform(0.05, 0.8))  # into the ingest, or the forwarding, or both
        agents[-1].kill(signal.SIGKILL)
        agents[-1].wait(10)
        if sender is not None:
            interrupted += sender.wait(20) != 0
            confirmed |= acked(sender.log_text())
        agents.append(start_agent(procs, agent, relay, wait_listener=True))
    rest = [str(f) for f in study.files if str(f) not in confirmed]
    if rest:  # the last round: no kill
        final = procs.spawn([storescu, "-v", "-aet", MODALITY_AE, "-aec", CLOUD_AE, LOOPBACK,
                             str(agent.listener_port), *rest], name="storescu-final")
        assert final.wait(120) == 0, final.describe()
        confirmed |= acked(final.log_text())
    assert len(confirmed) == N_INSTANCES
    assert interrupted >= 5, f"only {interrupted} kills landed during an ingest"
    wanted = {uid_of[path] for path in confirmed}
    wait_until(lambda: set(cloud_copies(cloud_dir)) >= wanted, 120,
               message=lambda: f"{len(wanted - set(cloud_copies(cloud_dir)))} confirmed instances not at the cloud")
    wait_until(lambda: spool_status(agent.status_port)["instances"] == 0, 60, message="the spool to drain")
    copies = cloud_copies(cloud_dir)
    assert set(copies) == wanted, "the cloud holds an instance nobody confirmed"  # (impossible: only ours)
    duplicates = sum(n - 1 for n in copies.values())
    in_flight = sum(int(m) for proc in agents for m in DUPLICATES_LINE.findall(proc.log_text()))
    print(f"{KILLS} kills ({interrupted} during an ingest): {N_INSTANCES} instances, "
          f"{duplicates} duplicates at the cloud, "
          f"{in_flight} reported in flight at a crash")
    assert duplicates <= in_flight
    assert spool_status(agent.status_port)["quarantined"] == 0
