"""The benchmark suite's pure pieces and small servers (tunnel_bench): statistics, PDUs, the WAN proxy's
link model and the proxy itself against a local echo server, the accept-all SCP, and the report tables.

Nothing here measures speed. The proxy tests assert lower bounds the emulated link must respect (bytes
cannot arrive before their delay and serialization time) and that bytes arrive intact and in order.
"""

from __future__ import annotations

import asyncio
import struct
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.support.ports import free_port
from tunnel_bench.acceptscp import AcceptAllScp
from tunnel_bench.paths import Endpoint
from tunnel_bench.pdus import (
    A_ASSOCIATE_AC,
    RELEASE_RP,
    RELEASE_RQ,
    PduBuffer,
    PduError,
    associate_ac,
    associate_rq,
)
from tunnel_bench.peers import Workload
from tunnel_bench.probes import hold_idle, probe, release_all
from tunnel_bench.readme import render_readme
from tunnel_bench.report import evaluate_targets, format_table, markdown_table, terminal_report
from tunnel_bench.stats import latency_summary, median, percentile, ratio, throughput
from tunnel_bench.wanproxy import ByteBudget, Link, TokenBucket, WanProxy, default_buffer_bytes

# --- stats ---------------------------------------------------------------------------------------------


@given(st.lists(st.floats(min_value=0, max_value=1e6, allow_nan=False), min_size=1, max_size=300),
       st.floats(min_value=0, max_value=100))
def test_percentile_matches_numpy_linear(values, q):
    assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)), rel=1e-9, abs=1e-9)


def test_percentile_known_values():
    values = list(range(1, 201))  # 1..200
    assert median(values) == 100.5
    assert percentile(values, 99) == pytest.approx(198.01)
    assert percentile([7.0], 99) == 7.0
    assert percentile([3, 1, 2], 0) == 1 and percentile([3, 1, 2], 100) == 3


def test_percentile_rejects_empty_and_out_of_range():
    with pytest.raises(ValueError):
        percentile([], 50)
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_latency_summary_in_ms_with_failures():
    summary = latency_summary([0.001, 0.002, 0.003], failures=2)
    assert summary["n"] == 3 and summary["failures"] == 2
    assert summary["p50_ms"] == 2.0 and summary["max_ms"] == 3.0 and summary["mean_ms"] == 2.0
    empty = latency_summary([], failures=5)
    assert empty["n"] == 0 and empty["p50_ms"] is None and empty["failures"] == 5


def test_throughput_and_ratio():
    assert throughput(300_000_000, 600, 2.0) == {"seconds": 2.0, "mb_s": 150.0, "inst_s": 300.0}
    with pytest.raises(ValueError):
        throughput(1, 1, 0)
    assert ratio(3.0, 1.5) == 2.0
    assert ratio(None, 1.0) is None and ratio(1.0, 0) is None


def test_workload_split_deals_round_robin(tmp_path: Path):
    files = tuple(tmp_path / f"f{i}" for i in range(10))
    parts = Workload("x", files, 0).split(4)
    assert [len(p) for p in parts] == [3, 3, 2, 2]
    assert sorted(f for p in parts for f in p) == sorted(files)
    assert len(Workload("x", files[:3], 0).split(8)) == 3  # no empty storescu runs


# --- PDUs ----------------------------------------------------------------------------------------------


def test_associate_ac_accepts_every_context_and_pynetdicom_decodes_it():
    from pynetdicom.pdu import A_ASSOCIATE_AC as PynetdicomAc

    rq = associate_rq("CALLED", "CALLING")
    ac = associate_ac(rq)
    assert ac[0] == A_ASSOCIATE_AC
    assert struct.unpack(">I", ac[2:6])[0] == len(ac) - 6
    decoded = PynetdicomAc()
    decoded.decode(ac)
    contexts = decoded.presentation_context
    assert [(c.context_id, c.result) for c in contexts] == [(1, 0)]
    assert decoded.application_context_name == "1.2.840.10008.3.1.1.1"
    assert decoded.called_ae_title == "CALLED" and decoded.calling_ae_title == "CALLING"


@pytest.mark.parametrize("bad", [b"", RELEASE_RQ, b"\x01\x00\x00\x00\x00\x10" + bytes(16)])
def test_associate_ac_refuses_what_is_not_a_whole_rq(bad):
    with pytest.raises(PduError):
        associate_ac(bad)


def test_pdu_buffer_any_chunking_and_limit():
    stream = associate_rq("A", "B") + RELEASE_RQ + RELEASE_RP
    whole = PduBuffer().feed(stream)
    assert [p[0] for p in whole] == [1, 5, 6]
    buffer, pieces = PduBuffer(), []
    for byte in stream:
        pieces += buffer.feed(bytes([byte]))
    assert pieces == whole and buffer.pending == 0
    with pytest.raises(PduError):
        PduBuffer(max_pdu=100).feed(b"\x04\x00" + struct.pack(">I", 101))


# --- WAN link model (pure) -----------------------------------------------------------------------------


def test_token_bucket_serializes_at_rate_after_the_burst():
    bucket = TokenBucket(rate=1000.0, burst=100.0, now=0.0)
    assert bucket.reserve(0.0, 100) == 0.0  # the burst goes at once
    assert bucket.reserve(0.0, 500) == pytest.approx(0.5)  # then 1000 B/s
    assert bucket.reserve(0.0, 500) == pytest.approx(1.0)  # reservations queue up, never go back
    assert bucket.reserve(10.0, 50) == 10.0  # idle time refills (up to the burst)


def test_token_bucket_unlimited_and_invalid():
    assert TokenBucket(None, 0).reserve(3.0, 10**9) == 3.0
    with pytest.raises(ValueError):
        TokenBucket(0, 1)
    with pytest.raises(ValueError):
        TokenBucket(1, -1)


def test_link_adds_the_delay_after_serialization():
    link = Link(delay=0.04, rate=25e6, burst=0.0, now=0.0)
    assert link.arrival(0.0, 250_000) == pytest.approx(0.01 + 0.04)
    assert Link(delay=0.02, rate=None).arrival(1.0, 10) == pytest.approx(1.02)
    later_start = Link(delay=0.01, rate=None, now=5.0)  # a link not usable before t=5 (handshake)
    assert later_start.bucket.reserve(0.0, 1) == 5.0


def test_default_buffer_holds_twice_the_round_trip_bdp():
    assert default_buffer_bytes(0.04, 25e6) == int(2 * 25e6 * 0.08) + 256 * 1024
    assert default_buffer_bytes(0.01, None) == 4 * 1024 * 1024


async def test_byte_budget_blocks_until_released():
    budget = ByteBudget(100)
    await budget.acquire(60)
    waiter = asyncio.create_task(budget.acquire(60))
    await asyncio.sleep(0)
    assert not waiter.done() and budget.used == 60
    await budget.release(60)
    await asyncio.wait_for(waiter, 5)
    assert budget.used == 60
    await budget.release(60)
    await budget.acquire(1000)  # an oversized chunk passes when nothing else is queued


# --- WAN proxy against a local echo server -------------------------------------------------------------


async def _echo_server() -> asyncio.Server:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.close()

    return await asyncio.start_server(echo, "127.0.0.1", 0)


async def _through_proxy(delay: float, rate: float | None, payload: bytes) -> tuple[bytes, float, float]:
    """Send ``payload`` through a proxy to an echo server; (echoed bytes, first-byte RTT, total seconds)."""
    server = await _echo_server()
    proxy = WanProxy(0, server.sockets[0].getsockname()[1], delay=delay, rate=rate)
    port = await proxy.start()
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(30):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            start = loop.time()
            writer.write(payload[:1])
            first = await reader.readexactly(1)
            first_rtt = loop.time() - start
            writer.write(payload[1:])
            writer.write_eof()
            rest = await reader.readexactly(len(payload) - 1)
            total = loop.time() - start
            writer.close()
    finally:
        proxy.close()
        server.close()
    return first + rest, first_rtt, total


async def test_proxy_delays_both_directions_and_the_handshake():
    payload = bytes(range(256)) * 64
    echoed, first_rtt, _ = await _through_proxy(0.03, None, payload)
    assert echoed == payload
    # handshake (one RTT) + the byte out (one way) + back (one way): at least two round trips
    assert first_rtt >= 4 * 0.03 - 0.002


async def test_proxy_limits_bandwidth_and_keeps_bytes_in_order():
    rate = 2e6  # 2 MB/s each way
    payload = np.random.default_rng(1).integers(0, 256, 600_000, dtype=np.uint8).tobytes()
    echoed, _, total = await _through_proxy(0.001, rate, payload)
    assert echoed == payload
    # 600 kB cannot cross a 2 MB/s link in less than 0.3 s (minus one burst of 64 KiB)
    assert total >= (len(payload) - 65536) / rate


async def test_proxy_connections_share_the_link_bandwidth():
    rate = 2e6
    payload = bytes(300_000)
    server = await _echo_server()
    proxy = WanProxy(0, server.sockets[0].getsockname()[1], delay=0.001, rate=rate)
    port = await proxy.start()
    loop = asyncio.get_running_loop()

    async def send() -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(payload)
        writer.write_eof()
        data = await reader.readexactly(len(payload))
        writer.close()
        return data

    try:
        start = loop.time()
        async with asyncio.timeout(30):
            echoed = await asyncio.gather(send(), send())
        total = loop.time() - start
    finally:
        proxy.close()
        server.close()
    assert echoed == [payload, payload]
    # two connections share one 2 MB/s link: 600 kB take at least 0.3 s (minus one 64 KiB burst)
    assert total >= (2 * len(payload) - 65536) / rate


# --- accept-all SCP and the probes ---------------------------------------------------------------------


async def test_accept_all_scp_answers_raw_probes_and_holds_many():
    scp = AcceptAllScp(0)
    port = await scp.start()
    try:
        elapsed = await asyncio.to_thread(probe, Endpoint(port, "ANY"))
        assert elapsed > 0
        held = await hold_idle([Endpoint(port, "A"), Endpoint(port, "B")], 50)
        assert len(held.streams) == 50 and not held.errors
        assert scp.open_connections == 50
        assert await release_all(held) == 0
        assert scp.associations == 51
    finally:
        scp.close()


async def test_accept_all_scp_accepts_pynetdicom_and_releases():
    from pynetdicom import AE

    scp = AcceptAllScp(0)
    port = await scp.start()

    def associate() -> tuple[bool, bool]:
        ae = AE(ae_title="PYNET")
        ae.add_requested_context("1.2.840.10008.1.1")
        ae.acse_timeout = ae.network_timeout = 10
        assoc = ae.associate("127.0.0.1", port, ae_title="WHATEVER")
        established = assoc.is_established
        assoc.release()
        return established, assoc.is_released

    try:
        assert await asyncio.to_thread(associate) == (True, True)
    finally:
        scp.close()


async def test_accept_all_scp_closes_on_garbage():
    scp = AcceptAllScp(0, max_pdu=1024)
    port = await scp.start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"\x01\x00" + struct.pack(">I", 10**6))  # a length above the limit
        async with asyncio.timeout(10):
            assert await reader.read() == b""
        writer.close()
    finally:
        scp.close()


def test_probe_fails_cleanly_without_a_listener():
    with pytest.raises(OSError):
        probe(Endpoint(free_port(), "X"), timeout=2)


# --- report --------------------------------------------------------------------------------------------


def test_format_table_aligns_columns():
    text = format_table(["path", "MB/s"], [["direct", "700.0"], ["ssh -R", "12.5"]])
    lines = text.splitlines()
    assert lines[0] == "path     MB/s"
    assert lines[1] == "------  -----"
    assert lines[2] == "direct  700.0"
    assert lines[3] == "ssh -R   12.5"
    assert len({len(line) for line in lines}) == 1


def test_markdown_table_shape():
    text = markdown_table(["a", "b"], [["1", "2"]])
    assert text.splitlines() == ["| a | b |", "| --- | ---: |", "| 1 | 2 |"]


def _path(label: str, mb1: float, mb8: float, p50: float, p99: float, loaded99: float, roles: dict) -> dict:
    res = {role: {"cpu_s_per_gb": cpu, "peak_rss": 50 * 2**20} for role, cpu in roles.items()}

    def tp(mb: float) -> dict:
        runs = [{"mb_s": mb * 0.9}, {"mb_s": mb}]
        return {"mb_s": mb, "inst_s": mb * 2, "seconds": 1.0, "runs": runs, "resources": res}

    lat = {"n": 200, "failures": 0, "p50_ms": p50, "p99_ms": p99}
    return {"label": label, "throughput": {"1": tp(mb1), "8": tp(mb8)},
            "latency": {"idle": lat, "loaded": {**lat, "p50_ms": p50 * 2, "p99_ms": loaded99}}}


def _snap(rss_mib: float, fds: int, tasks: int | None) -> dict:
    return {"rss": int(rss_mib * 2**20), "fds": fds, "tasks": tasks, "source": "status"}


@pytest.fixture
def results() -> dict:
    snaps = {"relay": _snap(60, 19, 6), "agent": _snap(50, 18, 5)}
    return {
        "schema": 1, "command": "python -m tunnel_bench --quick", "mode": "quick", "started": "2024-01-01T00:00:00",
        "duration_s": 120.0,
        "config": {"runs": 1, "parallel": 8, "latency_count": 200, "idle_associations": 1000, "churn_rate": 100,
                   "churn_seconds": 10, "wan_rtts_ms": [20, 80], "wan_rate_mbit": 200.0, "wan_instances": 40,
                   "wan_runs": 1},
        "workload": {"description": "200 CT instances", "instances": 200, "bytes": 105_000_000},
        "machine": {"cpu_model": "cpu", "cores": 2, "ram_bytes": 2**34, "kernel": "Linux 6", "os": "Debian",
                    "python": "CPython 3.11", "dcmtk": "v3.6.7", "openssh": "OpenSSH_9.2", "stunnel": "5.68",
                    "openssl": "3.0", "python_packages": {"aiohttp": "3"}, "git_commit": "abc",
                    "git_modified_files": 0},
        "paths": {
            "direct": _path("direct TCP", 600, 400, 0.1, 0.2, 1.0, {}),
            "ssh": _path("OpenSSH ssh -R", 100, 120, 0.8, 44, 50, {"sshd": 2.0, "ssh": 2.0}),
            "stunnel": _path("stunnel pair", 300, 250, 6.9, 9.4, 12, {"stunnel-client": 1.5}),
            "tunnel_s2c": _path("our tunnel, site->cloud", 250, 300, 0.5, 3.0, 1.5, {"relay": 3.0, "agent": 3.0}),
            "tunnel_c2s": _path("our tunnel, cloud->site", 150, 260, 2.0, 6.0, 4.0, {"relay": 3.0, "agent": 3.0}),
        },
        "idle": {"requested": 1000, "established": 1000, "open_failures": 0, "relay_active": 1000,
                 "before": snaps, "during": {"relay": _snap(75, 1019, 3006), "agent": _snap(65, 1018, 3005)},
                 "after": snaps, "settle_s": 0.1, "bytes_per_association": 30 * 1024},
        "churn": {"attempted": 1000, "completed": 1000, "skipped": 0, "failures": 0, "achieved_rate": 100.0,
                  "latency": {"p50_ms": 3.0, "p99_ms": 5.0}, "before": snaps, "after": snaps, "settle_s": 0.0,
                  "rss_growth_total": 3 * 2**20, "rss_growth_second_half": 2 * 2**20, "fds_back": True,
                  "tasks_back": True},
        "wan": {"rate_mbit": 200.0, "points": [
            {"rtt_ms": rtt, "ratio": r, "direct": {"mb_s": 5.0, "association": {"p50_ms": 3.0 * rtt}},
             "tunnel": {"mb_s": 5.0 * r, "association": {"p50_ms": 2.0 * rtt}},
             "parallel": {"associations": 8, "direct": {"mb_s": 20.0}, "tunnel": {"mb_s": 10.0}, "ratio": 0.5}}
            for rtt, r in ((20, 0.85), (80, 0.95))]},
    }


def _target(targets: list[dict], start: str) -> dict:
    matches = [t for t in targets if t["target"].startswith(start)]
    assert len(matches) == 1, (start, [t["target"] for t in targets])
    return matches[0]


def test_targets_met_and_missed_with_margins(results):
    targets = evaluate_targets(results)
    ssh = _target(targets, "our tunnel, site->cloud, 1 assoc: throughput >= 2.0x ssh -R")
    assert ssh["met"] is True and ssh["measured"].startswith("2.50x") and ssh["margin"] == "met, 25% above"
    stunnel = _target(targets, "our tunnel, cloud->site, 1 assoc: throughput >= 1.0x stunnel")
    assert stunnel["met"] is False and stunnel["margin"] == "not met: 50% short (needs x2.00)"
    assert _target(targets, "our tunnel, site->cloud, 1 assoc: throughput >= 0.5x direct")["kind"] == "stretch"
    p50 = _target(targets, "our tunnel, cloud->site: association p50 <= 1 ms")
    assert p50["met"] is False and p50["margin"] == "not met: 2.00x the bound"
    fair = _target(targets, "our tunnel, cloud->site: p99 during bulk")
    assert fair["met"] is False and fair["measured"].startswith("4.00x")
    assert _target(targets, "our tunnel, site->cloud: p99 during bulk")["met"] is True
    assert _target(targets, "<= 64 KiB per idle association")["met"] is True
    churn = _target(targets, "no growth over the churn")
    assert churn["met"] is False and "+2.0 MiB" in churn["margin"]
    wan80 = _target(targets, "emulated WAN 80 ms RTT: 1 assoc")
    assert wan80["met"] is True and wan80["kind"] == "target"
    assert _target(targets, "emulated WAN 20 ms RTT: 1 assoc")["kind"] == "reference"
    many = _target(targets, "emulated WAN 80 ms RTT: 8 assoc")
    assert many["met"] is False and many["kind"] == "reference" and many["measured"].startswith("0.50x")


def test_unknown_task_counts_do_not_fail_the_churn_target(results):
    results["churn"]["tasks_back"] = None
    results["churn"]["rss_growth_second_half"] = 0
    churn = _target(evaluate_targets(results), "no growth over the churn")
    assert churn["met"] is True and "tasks n/a" in churn["measured"]


def test_terminal_report_and_readme_render(results, tmp_path: Path):
    results["targets"] = evaluate_targets(results)
    text = terminal_report(results)
    assert "x ssh -R" in text and "our tunnel, cloud->site" in text and "NOT MET" in text
    direct_row = next(line for line in text.splitlines() if line.startswith("direct TCP"))
    assert "6.00x" in direct_row  # 600 MB/s against ssh -R's 100
    assert "540.0 / 600.0" in text  # every run is listed
    readme = render_readme(results, ["throughput.png"], tmp_path)
    assert "`python -m tunnel_bench --quick`" in readme
    assert "![throughput.png](throughput.png)" in readme
    assert "## What each measurement is" in readme and "| CPU | cpu (2 logical cores) |" in readme


# --- the WireGuard row (issue 6) -----------------------------------------------------------------------


def test_summarize_wireguard_medians_runs_and_ratio():
    from tunnel_bench.wgbench import summarize_wireguard

    summary = summarize_wireguard(100_000_000, 100, [2.0, 4.0, 3.0], [5.0, 4.0, 4.0])
    assert summary["raw"]["mb_s"] == 33.33 and summary["raw"]["runs"] == [50.0, 25.0, 33.33]
    assert summary["tunnel"]["mb_s"] == 25.0 and summary["tunnel"]["inst_s"] == 25.0
    assert summary["ratio"] == 0.75
    with pytest.raises(ValueError):
        summarize_wireguard(1, 1, [], [1.0])


def test_namespace_addresses_and_interface_names():
    from tunnel_bench.wgbench import interface_name, pair_addresses

    hospital, cloud = pair_addresses(7)
    assert (str(hospital), str(cloud)) == ("10.203.7.1/24", "10.203.7.2/24")
    assert str(pair_addresses(250, 204)[1].ip) == "10.204.250.2"
    for bad in ((0, 203), (255, 203), (1, 256)):
        with pytest.raises(ValueError):
            pair_addresses(*bad)
    assert interface_name("a1b2c3", "rc") == "tba1b2c3rc"
    for tag, suffix in (("a1b2c3", ""), ("a1b2c3d4e5f6", "xyz"), ("a1b2c3", "r c")):
        with pytest.raises(ValueError):
            interface_name(tag, suffix)


def _wireguard(raw: float, ours: float) -> dict:
    return {"implementation": "wireguard-go", "instances": 100, "bytes": 52_000_000, "run_count": 1,
            "raw": {"mb_s": raw, "inst_s": 60.0, "seconds": 1.0, "runs": [raw]},
            "tunnel": {"mb_s": ours, "inst_s": 55.0, "seconds": 1.1, "runs": [ours]}, "ratio": ours / raw}


def test_wireguard_target_table_and_readme(results, tmp_path: Path):
    from tunnel_bench.report import wireguard_measured, wireguard_report

    assert not wireguard_measured(results) and not wireguard_measured({"wireguard": {"skipped": "not root"}})
    assert not [t for t in evaluate_targets(results) if "WireGuard" in t["target"]]
    results["wireguard"] = _wireguard(40.0, 30.0)
    missed = _target(evaluate_targets(results), "WireGuard mode, 1 assoc: throughput >= 0.8x raw")
    assert missed["met"] is False and missed["measured"] == "0.75x (30.0 vs 40.0 MB/s)"
    results["wireguard"] = _wireguard(40.0, 36.0)
    results["targets"] = evaluate_targets(results)
    assert _target(results["targets"], "WireGuard mode")["margin"] == "met, 12% above"
    text = terminal_report(results)
    ours = next(line for line in text.splitlines() if line.startswith("our tunnel, WireGuard mode"))
    assert "36.0" in ours and "0.90x" in ours
    assert "Target of issue 6" in wireguard_report(results) and "0.90x" in wireguard_report(results)
    readme = render_readme(results, [], tmp_path)
    assert "WireGuard mode against raw wireguard-go" in readme and "| our tunnel, WireGuard mode |" in readme


def test_readme_says_why_wireguard_was_skipped(results, tmp_path: Path):
    results["wireguard"] = {"skipped": "needs root"}
    results["targets"] = evaluate_targets(results)
    assert "- WireGuard: skipped (needs root)" in render_readme(results, [], tmp_path)
