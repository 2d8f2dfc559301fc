"""The fleet's acceptance (issue 13): three relays on one PostgreSQL registry behind haproxy, two agents for
one site each holding tunnels to two relays, Orthanc as the PACS, and cloud callers through haproxy.

- Rolling restart of all three relays, one after another (SIGTERM: a drain, then the same relay started
  again), under continuous load — a C-ECHO loop at about 20 a second, a C-FIND loop, a 600-instance
  C-STORE and a C-MOVE: no new association fails; the C-STORE's and C-MOVE's own associations either
  complete or end with an A-ABORT, and every instance reported stored is in the PACS (no false success).
- SIGKILL of one relay mid-traffic, and of one of the two agents: new associations go on succeeding.

Real processes throughout: haproxy, PostgreSQL, Orthanc, storescp, the relays and agents; pynetdicom is the
cloud caller so that every association's outcome is counted. Every load loop is bounded in count and time.
"""

from __future__ import annotations

import signal
import threading
import time
import urllib.error
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import (
    CTImageStorage,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)

from devkit.fleet import haproxy_config, make_fleet
from tests.support.dcmtk import start_storescp
from tests.support.haproxy import haproxy_binary
from tests.support.orthanc import OrthancHandle, start_orthanc
from tests.support.ports import free_ports
from tests.support.procs import ManagedProcess, wait_for_port, wait_until
from tests.support.stack import (
    AgentHandle,
    AgentRoute,
    ListenerRoute,
    RelayHandle,
    SiteDest,
    enroll_agent,
    http_json,
    make_agent,
    start_agent,
    start_relay,
)
from tunnel_demo.dataset import StudyInfo, generate_study

SITE = "st-marys"
RELAY_AE = "SM_PACS"  # what cloud callers call
ORTHANC_AE = "ORTHANC"
CLOUD_AE = "CLOUD"  # the C-MOVE destination, a cloud storescp reached through the tunnel
CALLER_AE = "CLOUDAI"
DRAIN_DEADLINE = 5.0
ECHO_EVERY = 0.02  # seconds between C-ECHO associations (each takes ~30 ms here): about 20 a second
FIND_EVERY = 0.25
LOAD_LIMIT_S = 240.0  # no load loop runs longer than this, whatever happens
STORE_INSTANCES = 600
MOVE_INSTANCES = 20
TIMEOUT = 30.0


@dataclass
class Fleet:
    relays: dict[str, RelayHandle]
    haproxy: ManagedProcess
    agents: list[AgentHandle]
    orthanc: OrthancHandle
    dicom_port: int
    cloud_dir: Path
    moved: StudyInfo
    stored: StudyInfo


@dataclass
class Loop:
    """One load loop's tally: each association attempt's outcome ("ok" or why not), failures with the
    monotonic time their attempt started."""

    outcomes: Counter[str] = field(default_factory=Counter)
    failures: list[tuple[float, str]] = field(default_factory=list)
    succeeded: list[float] = field(default_factory=list)  # when each successful attempt started

    def count(self, started: float, outcome: str) -> None:
        self.outcomes[outcome] += 1
        if outcome != "ok":
            self.failures.append((started, outcome))
        else:
            self.succeeded.append(started)

    def succeeded_after(self, moment: float) -> int:
        return sum(1 for t in self.succeeded if t >= moment)

    def failed_after(self, moment: float) -> list[tuple[float, str]]:
        return [(round(t - moment, 3), why) for t, why in self.failures if t >= moment]


def _ae(*contexts) -> AE:
    ae = AE(ae_title=CALLER_AE)
    for context in contexts:
        ae.add_requested_context(context)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = TIMEOUT
    return ae


def _echo_once(ae: AE, port: int) -> str:
    assoc = ae.associate("127.0.0.1", port, ae_title=RELAY_AE)
    if not assoc.is_established:
        return "rejected" if assoc.is_rejected else "not established"
    status = assoc.send_c_echo()
    assoc.release()
    return "ok" if status and status.Status == 0x0000 else f"status {status.Status if status else None}"


def _find_once(ae: AE, port: int, study_uid: str) -> str:
    assoc = ae.associate("127.0.0.1", port, ae_title=RELAY_AE)
    if not assoc.is_established:
        return "rejected" if assoc.is_rejected else "not established"
    query = Dataset()
    query.QueryRetrieveLevel, query.StudyInstanceUID = "STUDY", study_uid
    matches, final = 0, None
    for status, identifier in assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind):
        if status and status.Status in (0xFF00, 0xFF01) and identifier is not None:
            matches += 1
        elif status:
            final = status.Status
    assoc.release()
    return "ok" if final == 0x0000 and matches == 1 else f"final {final}, {matches} matches"


def _loop(stop: threading.Event, every: float, once, tally: Loop) -> threading.Thread:
    def run() -> None:
        ended = time.monotonic() + LOAD_LIMIT_S
        for _ in range(int(LOAD_LIMIT_S / every)):
            if stop.is_set() or time.monotonic() > ended:
                return
            started = time.monotonic()
            try:
                tally.count(started, once())
            except Exception as exc:  # a tally, never a crash of the loop
                tally.count(started, f"error {type(exc).__name__}: {exc}")
            stop.wait(every)

    return _background(run)


@dataclass
class Transfer:
    established: bool = False
    aborted: bool = False  # ended by an A-ABORT
    cut: bool = False  # ended before every instance was sent (A-ABORT, or the connection closed)
    acknowledged: list[str] = field(default_factory=list)  # SOP instance UIDs the far end said it stored
    final: int | None = None
    completed: int = 0


def _store(port: int, study: StudyInfo, result: Transfer) -> threading.Thread:
    def run() -> None:
        assoc = _ae(CTImageStorage).associate("127.0.0.1", port, ae_title=RELAY_AE)
        result.established = assoc.is_established
        if not assoc.is_established:
            return
        for path, uid in zip(study.files, study.sop_instance_uids, strict=True):
            if not assoc.is_established:
                result.cut = True
                break
            status = assoc.send_c_store(dcmread(path))
            if status and status.Status == 0x0000:
                result.acknowledged.append(uid)
        result.cut = result.cut or not assoc.is_established
        _finish(assoc, result)

    return _background(run)


def _move(port: int, study_uid: str, result: Transfer) -> threading.Thread:
    def run() -> None:
        assoc = _ae(StudyRootQueryRetrieveInformationModelMove).associate("127.0.0.1", port, ae_title=RELAY_AE)
        result.established = assoc.is_established
        if not assoc.is_established:
            return
        query = Dataset()
        query.QueryRetrieveLevel, query.StudyInstanceUID = "STUDY", study_uid
        for status, _identifier in assoc.send_c_move(query, CLOUD_AE, StudyRootQueryRetrieveInformationModelMove):
            if status and status.Status not in (0xFF00,):
                result.final = status.Status
                result.completed = int(getattr(status, "NumberOfCompletedSuboperations", 0) or 0)
        _finish(assoc, result)

    return _background(run)


def _finish(assoc, result: Transfer) -> None:
    result.aborted = assoc.is_aborted
    if assoc.is_established:
        assoc.release()


def _background(run) -> threading.Thread:
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def _stored_in(orthanc: OrthancHandle, study_uid: str) -> set[str]:
    found = orthanc.post_json("/tools/find", {"Level": "Instance", "Query": {"StudyInstanceUID": study_uid},
                                              "Expand": True})
    return {item["MainDicomTags"]["SOPInstanceUID"] for item in found}


def _haproxy_has(haproxy: ManagedProcess, server: str) -> bool:
    log = haproxy.log_text()
    return log.count(f"{server} is UP") >= log.count(f"{server} is DOWN")


def _ready(relay: RelayHandle) -> bool:
    try:
        return bool(http_json(f"http://127.0.0.1:{relay.admin_port}/readyz", timeout=2)["ready"])
    except (OSError, urllib.error.HTTPError, ValueError, KeyError):
        return False


def _tunnels(relays: dict[str, RelayHandle]) -> dict[str, int]:
    """How many agent tunnels of the site each relay holds now."""
    held = {}
    for name, relay in relays.items():
        try:
            sites = {s["name"]: s for s in relay.status()["sites"]}
        except OSError:
            held[name] = 0
            continue
        held[name] = len(sites.get(SITE, {}).get("agents", []))
    return held


@pytest.fixture
def fleet(procs, postgres, tmp_path) -> Fleet:
    haproxy_bin = haproxy_binary()
    cloud_port, orthanc_port, tunnel_port, dicom_port = free_ports(4)
    cloud_dir = tmp_path / "cloud"
    start_storescp(procs, cloud_port, CLOUD_AE, cloud_dir)
    relays = make_fleet(tmp_path / "fleet", postgres, ("a", "b", "c"),
                        listener_routes=[ListenerRoute(RELAY_AE, SITE, "pacs", [CALLER_AE])],
                        sites={SITE: [SiteDest(CLOUD_AE, cloud_port, [ORTHANC_AE])]},
                        fleet=[f"drain_deadline = {DRAIN_DEADLINE}"],
                        tunnel=[f'public_url = "wss://127.0.0.1:{tunnel_port}/tunnel"',
                                "max_unauthenticated_per_source = 1000"])
    for name, relay in relays.items():
        start_relay(procs, relay, name=f"relay-{name}")
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(haproxy_config(tunnel_port, dicom_port, list(relays.values())))
    haproxy = procs.spawn([haproxy_bin, "-db", "-f", str(cfg)], name="haproxy")
    wait_for_port("127.0.0.1", dicom_port, 15, proc=haproxy)
    # Each agent joins with its own token (the token names haproxy) and its own certificate.
    agents = [make_agent(relays["a"], SITE, tmp_path / f"agent-{i}", enrolled=True, heartbeat=1.0,
                         routes=[AgentRoute("pacs", orthanc_port, ORTHANC_AE)], extra=[f'agent_name = "gw-{i}"'])
              for i in (1, 2)]
    for agent in agents:
        enroll_agent(relays["a"], agent)
    # Orthanc sends C-MOVE sub-operations to the cloud AE at agent 1's listener, out through the tunnel.
    orthanc = start_orthanc(procs, tmp_path, aet=ORTHANC_AE, dicom_port=orthanc_port,
                            modalities={"cloud": (CLOUD_AE, "127.0.0.1", agents[0].listener_port)})
    moved = generate_study(tmp_path / "moved", MOVE_INSTANCES, rows=16, cols=16, seed=71)
    orthanc.upload(moved.files)
    stored = generate_study(tmp_path / "stored", STORE_INSTANCES, rows=16, cols=16, seed=72)
    for i, agent in enumerate(agents):
        start_agent(procs, agent, name=f"agent-{i + 1}")
    wait_until(lambda: sum(_tunnels(relays).values()) == 4, TIMEOUT,
               message=lambda: f"two tunnels per agent, have {_tunnels(relays)}")
    return Fleet(relays, haproxy, agents, orthanc, dicom_port, cloud_dir, moved, stored)


def test_a_rolling_restart_of_every_relay_fails_no_new_association(procs, fleet):
    stop = threading.Event()
    echoes, finds = Loop(), Loop()
    echo_ae, find_ae = _ae(Verification), _ae(StudyRootQueryRetrieveInformationModelFind)
    loops = [_loop(stop, ECHO_EVERY, lambda: _echo_once(echo_ae, fleet.dicom_port), echoes),
             _loop(stop, FIND_EVERY, lambda: _find_once(find_ae, fleet.dicom_port, fleet.moved.study_uid), finds)]
    store, move = Transfer(), Transfer()
    try:
        wait_until(lambda: echoes.outcomes["ok"] >= 20, TIMEOUT, message="the load to be flowing")
        transfers = [_store(fleet.dicom_port, fleet.stored, store), _move(fleet.dicom_port, fleet.moved.study_uid,
                                                                          move)]
        for index, (name, relay) in enumerate(fleet.relays.items()):
            server = f"relays-dicom/relay-{index}"  # as devkit.fleet names it for haproxy
            relay.proc.kill(signal.SIGTERM)  # a drain: readiness fails, agents move, callers go elsewhere
            assert relay.proc.wait(DRAIN_DEADLINE + 15) == 0
            start_relay(procs, relay, name=f"relay-{name}-again")
            wait_until(lambda r=relay: _ready(r), TIMEOUT, message=f"relay {name} ready again")
            wait_until(lambda: sum(_tunnels(fleet.relays).values()) >= 4, TIMEOUT,
                       message=lambda: f"the agents' four tunnels back, have {_tunnels(fleet.relays)}")
            # haproxy logs each change of a server's state: as many "UP" as "DOWN" means it takes it again.
            wait_until(lambda s=server: _haproxy_has(fleet.haproxy, s), TIMEOUT,
                       message=f"haproxy to take relay {name} back")
        for thread in transfers:
            thread.join(120)
    finally:
        stop.set()
        for thread in loops:
            thread.join(TIMEOUT)
    print(f"C-ECHO: {dict(echoes.outcomes)}; C-FIND: {dict(finds.outcomes)}; C-STORE: "
          f"{len(store.acknowledged)}/{STORE_INSTANCES} acknowledged, cut={store.cut}, aborted={store.aborted}; "
          f"C-MOVE: final={move.final}, completed={move.completed}, aborted={move.aborted}")
    assert echoes.outcomes["ok"] >= 200 and not echoes.failures, echoes.failures[:20]
    assert finds.outcomes["ok"] >= 20 and not finds.failures, finds.failures[:20]
    assert store.established and move.established  # their associations were new ones too
    # No false success: every instance the PACS acknowledged through the tunnel is in the PACS.
    assert set(store.acknowledged) <= _stored_in(fleet.orthanc, fleet.stored.study_uid)
    # In flight on a relay past its drain deadline: cut (pynetdicom may see the A-ABORT or only the close).
    assert store.cut or len(store.acknowledged) == STORE_INSTANCES
    received = len([p for p in fleet.cloud_dir.rglob("*") if p.is_file()])
    assert move.completed <= received
    assert move.aborted or (move.final == 0x0000 and received == MOVE_INSTANCES)


def _echo_load(fleet: Fleet) -> tuple[threading.Event, Loop, threading.Thread]:
    stop, echoes, ae = threading.Event(), Loop(), _ae(Verification)
    thread = _loop(stop, ECHO_EVERY, lambda: _echo_once(ae, fleet.dicom_port), echoes)
    wait_until(lambda: echoes.outcomes["ok"] >= 20, TIMEOUT, message="the load to be flowing")
    return stop, echoes, thread


def test_sigkill_of_a_relay_fails_only_what_was_on_it(procs, fleet):
    stop, echoes, thread = _echo_load(fleet)
    try:
        held = _tunnels(fleet.relays)
        victim = max(held, key=lambda name: held[name])
        killed = time.monotonic()
        fleet.relays[victim].proc.kill(signal.SIGKILL)
        survivors = {name: relay for name, relay in fleet.relays.items() if name != victim}
        wait_until(lambda: sum(_tunnels(survivors).values()) == 4, 5.0,
                   message=lambda: f"the agents on the other relays within 5 s, have {_tunnels(survivors)}")
        time.sleep(3.0)  # load after the move
    finally:
        stop.set()
        thread.join(TIMEOUT)
    print(f"C-ECHO: {dict(echoes.outcomes)}; failures after the kill: {echoes.failed_after(killed)}")
    assert not echoes.failed_after(killed + 1.0)  # new associations succeed within 1 s of the kill
    assert echoes.succeeded_after(killed + 1.0) >= 20


def test_sigkill_of_one_of_the_two_agents_sends_new_associations_to_the_other(procs, fleet):
    stop, echoes, thread = _echo_load(fleet)
    try:
        killed = time.monotonic()
        fleet.agents[1].proc.kill(signal.SIGKILL)
        wait_until(lambda: sum(_tunnels(fleet.relays).values()) == 2, 5.0,
                   message=lambda: f"only the other agent's two tunnels, have {_tunnels(fleet.relays)}")
        time.sleep(2.0)
    finally:
        stop.set()
        thread.join(TIMEOUT)
    print(f"C-ECHO: {dict(echoes.outcomes)}; failures after the kill: {echoes.failed_after(killed)}")
    # Only an association in flight on the killed agent's tunnel may fail; every new one goes to the other.
    assert len(echoes.failed_after(killed)) <= 1, echoes.failed_after(killed)
    assert echoes.succeeded_after(killed) >= 20


def test_a_revocation_through_one_relay_closes_the_sites_tunnels_on_all_three_within_5s(procs, fleet):
    assert sum(_tunnels(fleet.relays).values()) == 4
    revoked = time.monotonic()
    fleet.relays["a"].admin("POST", f"/api/sites/{SITE}/revoke", {"reason": "fleet test"})
    wait_until(lambda: sum(_tunnels(fleet.relays).values()) == 0, 5.0,
               message=lambda: f"every relay to close the site's tunnels, have {_tunnels(fleet.relays)}")
    assert time.monotonic() - revoked < 5.0
    for agent in fleet.agents:
        wait_until(lambda a=agent: a.state() == "revoked", 10.0, message=lambda a=agent: f"agent told: {a.status()}")
