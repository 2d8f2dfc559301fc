"""First light: echo both ways through a real relay and agent process, with dcmtk."""

from __future__ import annotations

from tests.support.dcmtk import echoscu, start_storescp, storescu
from tests.support.ports import free_port
from tests.support.stack import (
    AgentRoute,
    ListenerRoute,
    SiteDest,
    make_agent,
    make_relay,
    start_agent,
    start_relay,
)


def test_echo_both_ways(procs, tmp_path, ct_study_small):
    pacs_port, cloud_port = free_port(), free_port()
    start_storescp(procs, pacs_port, "PACS", tmp_path / "pacs")
    start_storescp(procs, cloud_port, "CLOUD", tmp_path / "cloud")
    relay = make_relay(tmp_path / "relay", listener_routes=[ListenerRoute("HOSP_PACS", "hospital-a", "pacs")],
                       sites={"hospital-a": [SiteDest("CLOUD", cloud_port)]})
    agent = make_agent(relay, "hospital-a", tmp_path / "agent", routes=[AgentRoute("pacs", pacs_port, "PACS")])
    start_relay(procs, relay)
    start_agent(procs, agent, relay)
    r = echoscu("127.0.0.1", relay.dicom_port, "HOSP_PACS", "CLOUDAI")
    assert r.ok, r.stderr
    r = echoscu("127.0.0.1", agent.listener_port, "CLOUD", "MODALITY")
    assert r.ok, r.stderr
    r = storescu("127.0.0.1", agent.listener_port, "CLOUD", "MODALITY", ct_study_small.files)
    assert r.ok, r.stderr
    assert len(list((tmp_path / "cloud").iterdir())) == len(ct_study_small.files)
