"""A relay asked to stop drains (issue 13, item 5, the relay's side): readiness fails first, the fleet sees it
draining, its DICOM listener takes no new caller, a cloud association in flight finishes, and the relay
exits; one that outlives ``drain_deadline`` is cut and the relay still exits on time. Real relay and agent
processes; the PACS is a pynetdicom SCP whose C-ECHO answer is slow on purpose.
"""

from __future__ import annotations

import signal
import threading
import time
import urllib.error

import pytest
from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification

from tests.support.dcmtk import echoscu
from tests.support.ports import free_port
from tests.support.procs import wait_until
from tests.support.stack import (
    AgentRoute,
    ListenerRoute,
    http_json,
    make_agent,
    make_relay,
    start_agent,
    start_relay,
)

ECHO_DELAY = 3.0  # seconds the PACS takes to answer a C-ECHO


@pytest.fixture
def slow_pacs():
    port = free_port()
    ae = AE(ae_title="PACS")
    ae.add_supported_context(Verification)
    server = ae.start_server(("127.0.0.1", port), block=False,
                             evt_handlers=[(evt.EVT_C_ECHO, lambda event: time.sleep(ECHO_DELAY) or 0x0000)])
    yield port
    server.shutdown()


def _site(procs, tmp_path, pacs_port: int, drain_deadline: float):
    relay = make_relay(tmp_path / "relay", listener_routes=[ListenerRoute("SM_PACS", "st-marys", "pacs")],
                       sites={"st-marys": []}, heartbeat=1.0,
                       sections=["[fleet]", 'name = "relay-1"', f"drain_deadline = {drain_deadline}"])
    agent = make_agent(relay, "st-marys", tmp_path / "agent", routes=[AgentRoute("pacs", pacs_port)], heartbeat=1.0)
    start_relay(procs, relay)
    start_agent(procs, agent, relay)
    return relay, agent


def _slow_echo(relay, results: list) -> threading.Thread:
    """A C-ECHO through the relay in a thread, returned once it is in flight; its status (or the failure)
    lands in ``results``."""

    def run() -> None:
        ae = AE(ae_title="CLOUDAI")
        ae.add_requested_context(Verification)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
        assoc = ae.associate("127.0.0.1", relay.dicom_port, ae_title="SM_PACS")
        if not assoc.is_established:
            results.append("not established")
            return
        status = assoc.send_c_echo()
        results.append(status.Status if status else "no answer")
        if assoc.is_established:
            assoc.release()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    wait_until(lambda: any(s["active_streams"] for s in relay.status()["sites"]), 10,
               message="the C-ECHO association in flight")
    return thread


def _admin(relay, path: str):
    try:
        return 200, http_json(f"http://127.0.0.1:{relay.admin_port}{path}", token=relay.admin_token)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_sigterm_drains_an_association_in_flight_then_exits(procs, tmp_path, slow_pacs):
    relay, agent = _site(procs, tmp_path, slow_pacs, drain_deadline=20.0)
    results: list = []
    thread = _slow_echo(relay, results)
    relay.proc.kill(signal.SIGTERM)
    wait_until(lambda: _admin(relay, "/readyz")[0] == 503, 2, message="readiness to fail first")
    # The agent is told to move at once (GOAWAY GOING_AWAY), while its association here carries on.
    wait_until(lambda: "peer is going away (GOING_AWAY)" in agent.proc.log_text(), 2,
               message="the agent to hear the relay going away")
    assert not results
    assert "draining" in _admin(relay, "/readyz")[1]
    fleet = {r["name"]: r["state"] for r in _admin(relay, "/api/fleet")[1]["relays"]}
    assert fleet == {"relay-1": "draining"}
    assert not echoscu("127.0.0.1", relay.dicom_port, "SM_PACS", "LATECOMER", timeout=10).ok  # no new callers
    thread.join(ECHO_DELAY + 10)
    assert results == [0x0000]  # the association in flight finished, with the PACS's own answer
    assert relay.proc.wait(15) == 0


def test_an_association_past_the_drain_deadline_is_cut_and_the_relay_exits_on_time(procs, tmp_path, slow_pacs):
    relay, _agent = _site(procs, tmp_path, slow_pacs, drain_deadline=0.5)
    results: list = []
    thread = _slow_echo(relay, results)
    asked = time.monotonic()
    relay.proc.kill(signal.SIGTERM)
    assert relay.proc.wait(10) == 0
    assert time.monotonic() - asked < ECHO_DELAY  # it did not wait for the PACS's answer
    thread.join(15)
    assert results and results[0] != 0x0000  # cut: never a success the PACS did not give


def test_the_admin_call_drains_too(procs, tmp_path, slow_pacs):
    relay, _agent = _site(procs, tmp_path, slow_pacs, drain_deadline=5.0)
    answer = http_json(f"http://127.0.0.1:{relay.admin_port}/api/drain", method="POST", body={},
                       token=relay.admin_token)
    assert answer == {"draining": True, "deadline_s": 5.0}
    assert relay.proc.wait(10) == 0  # nothing in flight: it stops at once
