"""WireGuard mode against raw wireguard-go, over the same two namespaces (issue 6's benchmark row).

    hospital namespace                                   cloud namespace
    raw:  storescu ─────────── wireguard-go <10.204.n.2> ═══ <10.204.n.1> wireguard-go ──► storescp
    ours: storescu ─► agent ── wireguard-go <10.205.n.x> ═══ <10.205.n.1> wireguard-go ──► relay ──► storescp

Both paths cross the same veth, both use wireguard-go (``implementation = "userspace"`` for relay and agent,
so the kernel module, where present, favours neither), and both end at the same ``storescp --fork`` in the
cloud namespace (it listens on every address there; the raw storescu dials the cloud's WireGuard address).
The agent registers its key over the relay's TLS port and carries the mux WebSocket inside WireGuard,
exactly as a hospital would run it. One association; ``runs`` interleaved runs, median reported. The
namespaces are the dev kit's lab (:class:`devkit.netns.NetnsLab`, names ``tb-<tag>-...``, veths in
10.203.<n>.0/24); relay and agent configs come from :mod:`devkit.stack`. Every process runs under the lab
(ended by PID) and the namespaces are deleted at the end, also on failure.
"""

from __future__ import annotations

import ipaddress
import json
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from devkit import netns
from devkit.errors import DevkitError
from devkit.netns import NetnsLab, SitePair, missing_prerequisites
from devkit.procs import ManagedProcess, ProcessTracker
from devkit.programs import AGENT, RELAY, require_binary
from devkit.stack import AgentHandle, RelayHandle, SiteDest, make_agent, make_relay
from devkit.waits import wait_until
from tunnel_bench.errors import BenchError
from tunnel_bench.peers import CALLING_AE, DCMTK_ENV, STORE_TIMEOUT_S, Workload, clear_dir, count_files
from tunnel_bench.stats import MB, median, ratio, throughput

__all__ = ["TARGET_RATIO", "interface_name", "measure_wireguard", "pair_addresses", "summarize_wireguard"]

TARGET_RATIO = 0.8
WARMUP_FILES = 10
LAB_PREFIX, LAB_NET = "tb", 203  # the bench lab's names and veth subnets (the tests' labs: dt, 10.201)
RAW_NET, OUR_NET = 204, 205  # the raw WireGuard pair's subnet, and our WireGuard mode's
# Fixed ports in the namespaces (they are new, nothing else listens there); relay and agent pick free ones.
SCP_PORT, WG_TCP, OUR_UDP, RAW_UDP = 11120, 8444, 51820, 51821
SITE, CLOUD_AE = "benchwg", "CLOUD"
START_TIMEOUT_S = 60.0
KEEPALIVE_S = 25


def pair_addresses(index: int, net: int = LAB_NET) -> tuple[ipaddress.IPv4Interface, ipaddress.IPv4Interface]:
    """(hospital, cloud) addresses .1 and .2 of 10.<net>.<index>.0/24: the bench lab's veth by default."""
    return netns.pair_addresses(index, net)


def interface_name(tag: str, suffix: str) -> str:
    """The name the bench lab with ``tag`` gives an interface: ``tb<tag><suffix>`` (see NetnsLab.ifname)."""
    return netns.interface_name(f"{LAB_PREFIX}{tag}", suffix)


def summarize_wireguard(total_bytes: int, instances: int, raw_seconds: Sequence[float],
                        ours_seconds: Sequence[float]) -> dict:
    """{"raw", "tunnel", "ratio"}: median throughput of each (with every run's MB/s) and ours / raw."""
    out = {}
    for key, seconds in (("raw", raw_seconds), ("tunnel", ours_seconds)):
        if not seconds:
            raise ValueError(f"no {key} runs")
        out[key] = {**throughput(total_bytes, instances, median(seconds)),
                    "runs": [throughput(total_bytes, instances, s)["mb_s"] for s in seconds]}
    value = ratio(out["tunnel"]["mb_s"], out["raw"]["mb_s"])
    out["ratio"] = None if value is None else round(value, 3)
    return out


class _Lab:
    """The namespaces, the raw WireGuard pair, the sink, relay and agent of one measurement."""

    def __init__(self, procs: ProcessTracker, root: Path, sink_dir: Path) -> None:
        self.procs = procs  # runs the CLI commands in the host namespace; the lab runs what is inside
        self.root = root
        self.sink_dir = sink_dir
        self.lab = NetnsLab(root / "procs", prefix=LAB_PREFIX, net=LAB_NET)
        self.pair: SitePair | None = None
        self.relay: RelayHandle | None = None
        self.agent: AgentHandle | None = None
        self.pids: dict[str, int] = {}

    # -- building --

    def build(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.pair = pair = self.lab.site_pair()
        self.raw_hosp_addr, self.raw_cloud_addr = pair_addresses(pair.index, RAW_NET)
        self.our_address = f"{pair_addresses(pair.index, OUR_NET)[0].ip}/24"  # relay side: .1
        storescp = require_binary("storescp", "dcmtk")
        scp = self.lab.spawn(pair.cloud, [storescp, "--fork", "-aet", "SINK", "-od", str(self.sink_dir), "-ta",
                                          str(STORE_TIMEOUT_S), "-ts", str(STORE_TIMEOUT_S), str(SCP_PORT)],
                             name="wg-storescp", env=DCMTK_ENV)
        wait_until(lambda: self.lab.port_accepts(pair.cloud, "127.0.0.1", SCP_PORT), 20, interval=0.1,
                   message="storescp in the cloud namespace", watch=[scp])
        self._raw_tunnel(pair)
        self._relay_and_agent(pair)

    def _raw_tunnel(self, pair: SitePair) -> None:
        from tunnel_wireguard.interface import WireGuardInterface
        from tunnel_wireguard.keys import generate_private_key

        keys = self.root / "raw-keys"
        keys.mkdir(mode=0o700, exist_ok=True)
        cloud_pub = generate_private_key(keys / "cloud.key")
        hosp_pub = generate_private_key(keys / "hosp.key")
        cloud = WireGuardInterface(netns=pair.cloud, implementation="userspace")
        self.lab.defer(cloud.down)
        cloud.up(self.lab.ifname("rc"), keys / "cloud.key", str(self.raw_cloud_addr), RAW_UDP)
        hosp = WireGuardInterface(netns=pair.hospital, implementation="userspace")
        self.lab.defer(hosp.down)
        hosp.up(self.lab.ifname("rh"), keys / "hosp.key", str(self.raw_hosp_addr))
        cloud.set_peer(hosp_pub, allowed_ips=[f"{self.raw_hosp_addr.ip}/32"])
        hosp.set_peer(cloud_pub, allowed_ips=[f"{self.raw_cloud_addr.ip}/32"],
                      endpoint=f"{pair.cloud_ip}:{RAW_UDP}", persistent_keepalive=KEEPALIVE_S)
        wait_until(lambda: self.lab.port_accepts(pair.hospital, str(self.raw_cloud_addr.ip), SCP_PORT), 20,
                   interval=0.2, message="storescp through the raw WireGuard tunnel")

    def _relay_and_agent(self, pair: SitePair) -> None:
        wireguard = ["[wireguard]", "enabled = true", f'interface = "{self.lab.ifname("oc")}"',
                     f"listen_port = {OUR_UDP}", f'address = "{self.our_address}"', f"tunnel_port = {WG_TCP}",
                     f'endpoint = "{pair.cloud_ip}:{OUR_UDP}"', f"persistent_keepalive = {KEEPALIVE_S}",
                     'implementation = "userspace"']
        self.relay = relay = make_relay(self.root / "relay", listener_routes=[], host=pair.cloud_ip,
                                        sites={SITE: [SiteDest(CLOUD_AE, SCP_PORT)]}, sections=wireguard,
                                        procs=self.procs)
        self.agent = agent = make_agent(
            relay, SITE, self.root / "agent", routes=[], connect_timeout=10.0, procs=self.procs,
            extra=[f'state_dir = "{self.root / "agent" / "state"}"', 'transport = "wireguard"'],
            sections=["[wireguard]", f'interface = "{self.lab.ifname("oh")}"', "fallback_after = 30.0",
                      "retry_interval = 30.0", 'implementation = "userspace"'])
        relay.proc = self.lab.spawn(pair.cloud, [RELAY, "serve", "--config", str(relay.config)], name="wg-relay")
        wait_until(lambda: self.lab.port_accepts(pair.cloud, pair.cloud_ip, relay.tunnel_port), START_TIMEOUT_S,
                   interval=0.1, message="the relay's TLS port", watch=[relay.proc])
        agent.proc = self.lab.spawn(pair.hospital, [AGENT, "run", "--config", str(agent.config)], name="wg-agent")
        self.pids = {"relay": relay.proc.pid, "agent": agent.proc.pid}
        wait_until(self._over_wireguard, START_TIMEOUT_S, interval=0.25,
                   message="the agent connected over WireGuard", watch=[agent.proc, relay.proc])

    def _over_wireguard(self) -> bool:
        assert self.pair is not None and self.agent is not None
        done = self.lab.execute(self.pair.hospital, [AGENT, "status", "--json", "--config", str(self.agent.config)])
        try:
            status = json.loads(done.stdout) if done.returncode == 0 else {}
        except ValueError:
            return False
        return status.get("state") == "connected" and status.get("transport") == "wireguard"

    # -- measuring --

    def store(self, host: str, port: int, called_ae: str, workload: Workload, timeout: float, log: Path) -> float:
        """Seconds for one storescu in the hospital namespace to send ``workload`` until the sink holds it."""
        assert self.pair is not None
        storescu = require_binary("storescu", "dcmtk")
        timeouts = ["-to", str(STORE_TIMEOUT_S), "-ta", str(STORE_TIMEOUT_S), "-td", str(STORE_TIMEOUT_S)]
        argv = self.lab.argv(self.pair.hospital, [storescu, "-aet", CALLING_AE, "-aec", called_ae, *timeouts,
                                                  host, str(port), *map(str, workload.files)])
        clear_dir(self.sink_dir)
        started = time.perf_counter()
        with ManagedProcess(argv, name="storescu", log_path=log, env=DCMTK_ENV) as proc:  # ended by PID on exit
            try:
                code = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired as exc:
                raise BenchError(f"storescu to {host}:{port} still running after {timeout:.0f} s") from exc
        if code != 0:
            raise BenchError(f"storescu to {host}:{port} exited {code}:\n{proc.log_tail(2000)}")
        expected = len(workload.files)
        wait_until(lambda: count_files(self.sink_dir) >= expected, 30,
                   message=lambda: f"{expected} files in {self.sink_dir} (have {count_files(self.sink_dir)})")
        elapsed = time.perf_counter() - started
        clear_dir(self.sink_dir)
        return elapsed

    # -- teardown --

    def close(self) -> list[str]:
        """End every process by PID (relay and agent take their interfaces down on SIGTERM), take the raw
        interfaces down, delete the namespaces; what could not be undone."""
        try:
            self.lab.close()
        except DevkitError as exc:
            return [str(exc)]
        return []


def measure_wireguard(workload: Workload, runs: int, procs: ProcessTracker, root: Path, sink_dir: Path,
                      progress, store_timeout: float) -> dict:
    """{"skipped": reason} or {"implementation", "instances", "bytes", "runs", "raw", "tunnel", "ratio"}."""
    reason = missing_prerequisites()
    if reason is not None:
        progress(f"wireguard: skipped, {reason}")
        return {"skipped": reason}
    sink_dir.mkdir(parents=True, exist_ok=True)
    lab = _Lab(procs, root, sink_dir)
    try:
        lab.build()
        raw = (str(lab.raw_cloud_addr.ip), SCP_PORT, "SINK")
        assert lab.agent is not None
        ours = ("127.0.0.1", lab.agent.listener_port, CLOUD_AE)
        logs = root / "logs"
        for name, (host, port, ae) in (("raw", raw), ("ours", ours)):  # untimed warm-up
            lab.store(host, port, ae, workload.head(WARMUP_FILES), store_timeout, logs / f"warmup-{name}.log")
        seconds: dict[str, list[float]] = {"raw": [], "ours": []}
        for run in range(runs):
            for name, (host, port, ae) in (("raw", raw), ("ours", ours)):
                elapsed = lab.store(host, port, ae, workload, store_timeout, logs / f"{name}-{run}.log")
                seconds[name].append(elapsed)
                label = "raw wireguard-go" if name == "raw" else "our WireGuard mode"
                progress(f"wireguard run {run + 1}/{runs} {label:<20} x1: "
                         f"{workload.total_bytes / MB / elapsed:7.1f} MB/s ({elapsed:.2f} s)")
        summary = summarize_wireguard(workload.total_bytes, len(workload.files), seconds["raw"], seconds["ours"])
    finally:
        problems = lab.close()
        for problem in problems:
            progress(f"wireguard teardown: {problem}")
    return {"implementation": "wireguard-go (userspace) on both paths", "instances": len(workload.files),
            "bytes": workload.total_bytes, "run_count": runs, **summary}
