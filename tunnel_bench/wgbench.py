"""WireGuard mode against raw wireguard-go, over the same two namespaces (issue 6's benchmark row).

    hospital namespace                                   cloud namespace
    raw:  storescu ─────────── wireguard-go <10.204.n.2> ═══ <10.204.n.1> wireguard-go ──► storescp
    ours: storescu ─► agent ── wireguard-go <10.205.n.x> ═══ <10.205.n.1> wireguard-go ──► relay ──► storescp

Both paths cross the same veth, both use wireguard-go (``implementation = "userspace"`` for relay and agent,
so the kernel module, where present, favours neither), and both end at the same ``storescp --fork`` in the
cloud namespace (it listens on every address there; the raw storescu dials the cloud's WireGuard address).
The agent registers its key over the relay's TLS port and carries the mux WebSocket inside WireGuard,
exactly as a hospital would run it. One association; ``runs`` interleaved runs, median reported. Every
process runs under the benchmark's ProcessSet (ended by PID) and the namespaces are deleted at the end,
also on failure.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from tunnel_bench.errors import BenchError
from tunnel_bench.netns import NetnsPair, missing_prerequisites, pair_addresses
from tunnel_bench.peers import CALLING_AE, DCMTK_ENV, STORE_TIMEOUT_S, Workload, clear_dir, count_files
from tunnel_bench.procs import Proc, ProcessSet, require_binary, venv_bin, wait_until
from tunnel_bench.stats import MB, median, ratio, throughput

__all__ = ["TARGET_RATIO", "measure_wireguard", "summarize_wireguard"]

TARGET_RATIO = 0.8
WARMUP_FILES = 10
# Fixed ports: the namespaces are new, nothing else listens there.
SCP_PORT, TLS_PORT, ADMIN_PORT, WG_TCP, OUR_UDP, RAW_UDP = 11120, 8443, 8081, 8444, 51820, 51821
AGENT_STATUS, AGENT_LISTENER = 8082, 11113
SITE, CLOUD_AE = "benchwg", "CLOUD"
START_TIMEOUT_S = 60.0
KEEPALIVE_S = 25


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

    def __init__(self, procs: ProcessSet, root: Path, sink_dir: Path) -> None:
        self.procs = procs
        self.root = root
        self.sink_dir = sink_dir
        self.pair = NetnsPair()
        self.raw_hosp_addr, self.raw_cloud_addr = pair_addresses(self.pair.index, 204)
        self.our_address = f"{pair_addresses(self.pair.index, 205)[0].ip}/24"  # relay side: .1
        self.interfaces: list = []
        self.started: list[Proc] = []
        self.pids: dict[str, int] = {}

    def spawn(self, ns: str, argv: Sequence[str], name: str, env: dict | None = None) -> Proc:
        proc = self.procs.spawn(self.pair.argv(ns, argv), name=name, env=env)
        self.started.append(proc)
        return proc

    def connects(self, ns: str, host: str, port: int) -> bool:
        code = f"import socket; socket.create_connection(({host!r}, {port}), timeout=1).close()"
        return self.pair.run(ns, [venv_bin("python"), "-c", code], timeout=10).returncode == 0

    # -- building --

    def build(self) -> None:
        self.pair.create()
        self.root.mkdir(parents=True, exist_ok=True)
        storescp = require_binary("storescp", "dcmtk")
        scp = self.spawn(self.pair.cloud, [storescp, "--fork", "-aet", "SINK", "-od", str(self.sink_dir), "-ta",
                                           str(STORE_TIMEOUT_S), "-ts", str(STORE_TIMEOUT_S), str(SCP_PORT)],
                         "wg-storescp", env=DCMTK_ENV)
        wait_until(lambda: self._alive(scp) and self.connects(self.pair.cloud, "127.0.0.1", SCP_PORT), 20,
                   interval=0.1, what="storescp in the cloud namespace")
        self._raw_tunnel()
        self._relay_and_agent()

    @staticmethod
    def _alive(proc: Proc) -> bool:
        if not proc.running:
            raise BenchError(f"exited early:\n{proc.describe()}")
        return True

    def _raw_tunnel(self) -> None:
        from tunnel_wireguard.interface import WireGuardInterface
        from tunnel_wireguard.keys import generate_private_key

        keys = self.root / "raw-keys"
        keys.mkdir(mode=0o700, exist_ok=True)
        cloud_pub = generate_private_key(keys / "cloud.key")
        hosp_pub = generate_private_key(keys / "hosp.key")
        cloud = WireGuardInterface(netns=self.pair.cloud, implementation="userspace")
        self.interfaces.append(cloud)
        cloud.up(self.pair.ifname("rc"), keys / "cloud.key", str(self.raw_cloud_addr), RAW_UDP)
        hosp = WireGuardInterface(netns=self.pair.hospital, implementation="userspace")
        self.interfaces.append(hosp)
        hosp.up(self.pair.ifname("rh"), keys / "hosp.key", str(self.raw_hosp_addr))
        cloud.set_peer(hosp_pub, allowed_ips=[f"{self.raw_hosp_addr.ip}/32"])
        hosp.set_peer(cloud_pub, allowed_ips=[f"{self.raw_cloud_addr.ip}/32"],
                      endpoint=f"{self.pair.cloud_ip}:{RAW_UDP}", persistent_keepalive=KEEPALIVE_S)
        wait_until(lambda: self.connects(self.pair.hospital, str(self.raw_cloud_addr.ip), SCP_PORT), 20,
                   interval=0.2, what="storescp through the raw WireGuard tunnel")

    def _relay_and_agent(self) -> None:
        relay_cfg, agent_cfg, certs = self.root / "relay.toml", self.root / "agent.toml", self.root / "certs"
        relay_cfg.write_text(self._relay_toml())
        relay_bin, agent_bin = venv_bin("tunnel-relay"), venv_bin("tunnel-agent")
        for argv in ([relay_bin, "ca", "init", "--config", str(relay_cfg), "--hostname", self.pair.cloud_ip],
                     [relay_bin, "site", "cert", SITE, "--config", str(relay_cfg), "--out", str(certs)]):
            done = subprocess.run(argv, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
                                  check=False)
            if done.returncode != 0:
                raise BenchError(f"{argv!r} failed ({done.returncode}): {done.stdout}{done.stderr}")
        agent_cfg.write_text(self._agent_toml(certs))
        relay = self.spawn(self.pair.cloud, [relay_bin, "serve", "--config", str(relay_cfg)], "wg-relay")
        wait_until(lambda: self._alive(relay) and self.connects(self.pair.cloud, self.pair.cloud_ip, TLS_PORT),
                   START_TIMEOUT_S, interval=0.1, what=lambda: f"the relay's TLS port\n{relay.log_tail()}")
        agent = self.spawn(self.pair.hospital, [agent_bin, "run", "--config", str(agent_cfg)], "wg-agent")
        self.pids = {"relay": relay.pid, "agent": agent.pid}

        def over_wireguard() -> bool:
            self._alive(agent)
            done = self.pair.run(self.pair.hospital, [agent_bin, "status", "--json", "--config", str(agent_cfg)])
            try:
                status = json.loads(done.stdout) if done.returncode == 0 else {}
            except ValueError:
                return False
            return status.get("state") == "connected" and status.get("transport") == "wireguard"

        wait_until(over_wireguard, START_TIMEOUT_S, interval=0.25,
                   what=lambda: f"the agent connected over WireGuard\n{agent.log_tail()}\n{relay.log_tail()}")

    def _relay_toml(self) -> str:
        return "\n".join([
            f'state_dir = "{self.root / "relay-state"}"',
            "[tunnel]", f'host = "{self.pair.cloud_ip}"', f"port = {TLS_PORT}",
            "[admin]", 'host = "127.0.0.1"', f"port = {ADMIN_PORT}",
            "[wireguard]", "enabled = true", f'interface = "{self.pair.ifname("oc")}"', f"listen_port = {OUR_UDP}",
            f'address = "{self.our_address}"', f"tunnel_port = {WG_TCP}",
            f'endpoint = "{self.pair.cloud_ip}:{OUR_UDP}"', f"persistent_keepalive = {KEEPALIVE_S}",
            'implementation = "userspace"',
            "[[sites]]", f'name = "{SITE}"',
            "[[sites.destinations]]", f'called_ae = "{CLOUD_AE}"', 'host = "127.0.0.1"', f"port = {SCP_PORT}",
            'allowed_calling_aes = ["*"]']) + "\n"

    def _agent_toml(self, certs: Path) -> str:
        return "\n".join([
            f'state_dir = "{self.root / "agent-state"}"',
            f'relay_url = "wss://{self.pair.cloud_ip}:{TLS_PORT}/tunnel"', f'cert_file = "{certs / "agent.crt"}"',
            f'key_file = "{certs / "agent.key"}"', f'ca_file = "{certs / "ca.crt"}"',
            'transport = "wireguard"', "backoff_initial = 0.1", "backoff_max = 1.0", "connect_timeout = 10.0",
            "[status]", 'host = "127.0.0.1"', f"port = {AGENT_STATUS}",
            "[listener]", 'host = "127.0.0.1"', f"port = {AGENT_LISTENER}",
            "[wireguard]", f'interface = "{self.pair.ifname("oh")}"', "fallback_after = 30.0",
            "retry_interval = 30.0", 'implementation = "userspace"']) + "\n"

    # -- measuring --

    def store(self, host: str, port: int, called_ae: str, workload: Workload, timeout: float, log: Path) -> float:
        """Seconds for one storescu in the hospital namespace to send ``workload`` until the sink holds it."""
        storescu = require_binary("storescu", "dcmtk")
        timeouts = ["-to", str(STORE_TIMEOUT_S), "-ta", str(STORE_TIMEOUT_S), "-td", str(STORE_TIMEOUT_S)]
        argv = self.pair.argv(self.pair.hospital, [storescu, "-aet", CALLING_AE, "-aec", called_ae, *timeouts,
                                                    host, str(port), *map(str, workload.files)])
        clear_dir(self.sink_dir)
        log.parent.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        with open(log, "wb") as out:
            popen = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                     env={**os.environ, **DCMTK_ENV})
            try:
                code = popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired as exc:
                raise BenchError(f"storescu to {host}:{port} still running after {timeout:.0f} s") from exc
            finally:
                if popen.poll() is None:
                    popen.kill()  # by PID, through the un-reaped Popen
                    popen.wait(timeout=10)
        if code != 0:
            raise BenchError(f"storescu to {host}:{port} exited {code}:\n{log.read_text(errors='replace')[-2000:]}")
        expected = len(workload.files)
        wait_until(lambda: count_files(self.sink_dir) >= expected, 30,
                   what=lambda: f"{expected} files in {self.sink_dir} (have {count_files(self.sink_dir)})")
        elapsed = time.perf_counter() - started
        clear_dir(self.sink_dir)
        return elapsed

    # -- teardown --

    def close(self) -> list[str]:
        problems = []
        for proc in reversed(self.started):  # the agent and relay take their interfaces down on SIGTERM
            try:
                self.procs.stop(proc)
            except (OSError, subprocess.TimeoutExpired) as exc:
                problems.append(f"{proc.name} pid={proc.pid}: {exc!r}")
        for interface in reversed(self.interfaces):
            try:
                interface.down()
            except Exception as exc:  # keep tearing down; reported
                problems.append(f"wireguard interface: {exc}")
        return problems + self.pair.close()


def measure_wireguard(workload: Workload, runs: int, procs: ProcessSet, root: Path, sink_dir: Path,
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
        ours = ("127.0.0.1", AGENT_LISTENER, CLOUD_AE)
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
