"""``docs/benchmarks/README.md``, generated from the results dict so it is always true of the JSON."""

from __future__ import annotations

from pathlib import Path

from tunnel_bench.report import SCALE_TITLE, markdown_table, tables, targets_table

__all__ = ["render_readme"]

GIB = 1024**3

METHOD = """\
## What each measurement is

Everything runs on this one machine, on 127.0.0.1, in one run of `python -m tunnel_bench`; every
process it starts is ended by its PID when the run ends (also on failure). Ratios compare paths
*within the same run*. The sending side is always dcmtk `storescu`, the receiving side dcmtk
`storescp`, both with `TCP_NODELAY=1`; received files go to a tmpfs and are deleted after each run.

**Paths.** Every path ends at the same sinks.
- *direct TCP*: storescu -> storescp.
- *OpenSSH `ssh -R`* (the classic outbound tunnel): an sshd of the benchmark's own (own host key,
  config, `AuthorizedKeysFile` and known-hosts in a temporary directory, 127.0.0.1 only, default
  ciphers) and an `ssh -N -R` client as the "hospital" side, so the cloud storescu sends to the
  forwarded port -> sshd -> SSH connection -> ssh -> storescp.
- *stunnel pair*: a client-side stunnel (plain TCP in, mutual TLS out) and a server-side stunnel
  (TLS in, to storescp); certificates made with `cryptography`; `TCP_NODELAY` on both sides.
- *our tunnel* (WebSocket mode, the programs' default mux settings), both directions:
  site->cloud is storescu -> agent listener -> agent -> relay -> storescp, cloud->site is storescu
  -> relay listener -> relay -> agent -> storescp. Relay and agent are started from TOML configs
  with certificates issued by `tunnel-relay ca init` / `tunnel-relay site cert`.

**C-STORE throughput.** The whole workload, once in 1 association and once in N parallel
associations (N storescu processes, each with 1/N of the files dealt round-robin). The sink is one
`storescp --fork` (a child process per association) on every path, so parallel associations are
served in parallel everywhere and nothing but the path differs. Time runs from starting storescu until
every storescu exited 0 and every file is on disk. Runs are interleaved across paths; the table shows
the median run. MB = 10^6 bytes of Part-10 files.

**Association set-up + release latency.** A raw-socket client (A-ASSOCIATE-RQ encoded by
pynetdicom, proposing Verification) times TCP connect + A-ASSOCIATE-RQ -> AC + A-RELEASE-RQ -> RP,
sequentially, against a second storescp through the same path (over the same SSH connection, stunnel
pair, or tunnel as the bulk data). *idle*: nothing else runs. *loaded*: while one storescu sends the
workload over the same path (restarted if it ends first). p50/p99 by linear interpolation; 5 warm-up
probes are not counted; failed probes are counted, not timed.

**CPU and peak RSS per GB.** During each throughput run the path's own processes (relay and agent;
sshd with its per-connection children and ssh; both stunnels) are sampled with psutil: CPU time
(user + system) at start and end, RSS every 50 ms. Shown: median CPU seconds per GB moved, and the peak
RSS over all runs.

**Idle associations.** Fresh relay and agent processes (restarted, warmed up with 20
associations), then N associations opened through the tunnel (alternating directions) to an asyncio
accept-all SCP and held open. Memory per association = (relay + agent RSS with all open - RSS
before) / N, from the programs' `/api/status` `process` object. Then all are released and the run waits
(bounded) for descriptors and tasks to return to the baseline.

**Churn.** Fresh processes again; associations started at a fixed rate (each released right after
its A-ASSOCIATE-AC, alternating directions) for a fixed time. RSS sampled every second; "growth" is RSS at
the end minus RSS at half time (the warm-up of the first half is excluded). Descriptors and tasks must
be back to their pre-churn values once it is over.

**Emulated WAN.** `tc netem` is not available, so `tunnel_bench.wanproxy` emulates the link in
userspace: per direction a token bucket (the bandwidth) and a fixed one-way delay (RTT/2), shared by
every connection through the proxy, with a queue bounded at twice the round trip's bandwidth-delay
product + 256 KiB (back-pressure, not unbounded buffering). A new connection's first bytes cross one
round trip late, as if its TCP handshake had crossed the link. *direct*: storescu -> proxy ->
storescp. *tunnel*: storescu -> agent -> proxy -> relay -> storescp (the agent's `relay_url` names
the proxy). storescu waits for each C-STORE response, so both paths pay one round trip per instance.
Measured with 1 association (the issue's target) and with N in parallel (N TCP connections sharing
the link directly, N streams of one WebSocket through the tunnel). 20 association set-ups are timed
over the same link: direct pays TCP handshake + A-ASSOCIATE + A-RELEASE, the tunnel (already
connected) only the last two.

**WireGuard mode against raw wireguard-go** (issue 6). Two network namespaces made for the run
(cloud, hospital) joined by a veth. *raw*: a plain wireguard-go tunnel between them, storescu in the
hospital namespace -> the cloud's WireGuard address -> storescp. *our WireGuard mode*: relay in the
cloud namespace with `[wireguard]` enabled, agent in the hospital namespace with `transport =
"wireguard"`: storescu -> agent listener -> mux WebSocket inside WireGuard -> relay -> storescp.
Both use wireguard-go (`implementation = "userspace"`), the same veth and the same `storescp --fork`;
1 association, runs interleaved, median shown; 10 untimed warm-up files per path first. The quick
mode sends the first 100 instances. Needs root, `ip`, `wg`, `wireguard-go`, `nft`; otherwise the
row is skipped and the run says why.
"""


def _machine(results: dict) -> str:
    m = results["machine"]
    packages = ", ".join(f"{k} {v}" for k, v in m["python_packages"].items())
    rows = [["CPU", f"{m['cpu_model']} ({m['cores']} logical cores)"], ["RAM", f"{m['ram_bytes'] / GIB:.1f} GiB"],
            ["OS / kernel", f"{m['os']} / {m['kernel']}"], ["Python", m["python"]], ["dcmtk", m["dcmtk"]],
            ["OpenSSH", m["openssh"]], ["stunnel", m["stunnel"]], ["OpenSSL", m["openssl"]],
            ["Python packages", packages],
            ["source", f"git {m['git_commit']}" + (f" + {m['git_modified_files']} modified files"
                                                   if m["git_modified_files"] else "")]]
    return "| | |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)


def _config(results: dict) -> str:
    c, w = results["config"], results["workload"]
    wan = (f"RTT {', '.join(str(r) for r in c['wan_rtts_ms'])} ms at {c['wan_rate_mbit']:.0f} Mbit/s, "
           f"{c['wan_instances']} instances, median of {c['wan_runs']}")
    return "\n".join([
        f"- workload: {w['description']}; {w['instances']} files, {w['bytes'] / 1e6:.1f} MB",
        f"- throughput: median of {c['runs']} runs, 1 and {c['parallel']} associations",
        f"- latency: {c['latency_count']} sequential associations per path, idle and loaded",
        f"- idle associations: {c['idle_associations']}; churn: {c['churn_rate']}/s for {c['churn_seconds']} s",
        f"- emulated WAN: {wan}",
        *([f"- WireGuard: skipped ({results['wireguard']['skipped']})"]
          if (results.get("wireguard") or {}).get("skipped") else []),
    ])


def _scale_notes(results: dict) -> str:
    lines = []
    if idle := results.get("idle"):
        per = idle.get("bytes_per_association")
        lines.append(f"- idle: {idle['established']} of {idle['requested']} associations opened "
                     f"({idle['open_failures']} failed; relay listed {idle['relay_active']} active); "
                     f"{'n/a' if per is None else f'{per / 1024:.1f} KiB'} per association; back to "
                     f"baseline descriptors/tasks after {idle['settle_s']} s")
    if churn := results.get("churn"):
        lines.append(f"- churn: {churn['completed']} of {churn['attempted']} associations completed "
                     f"({churn['failures']} failed, {churn['skipped']} not started at the in-flight cap), "
                     f"{churn['achieved_rate']}/s achieved; set-up+release p50/p99 "
                     f"{churn['latency']['p50_ms']:.2f}/{churn['latency']['p99_ms']:.2f} ms; RSS growth total "
                     f"{churn['rss_growth_total'] / 1024:+.0f} KiB, second half "
                     f"{churn['rss_growth_second_half'] / 1024:+.0f} KiB")
    return "\n".join(lines)


def render_readme(results: dict, plots: list[str], out_dir: Path) -> str:
    parts = [
        "# Benchmarks: our tunnel against direct TCP, `ssh -R` and a stunnel pair",
        "",
        "Generated by `python -m tunnel_bench` from `results.json` in this directory; do not edit by hand "
        "(rerun the benchmark instead).",
        "",
        f"Command: `{results['command']}` ({results['mode']} mode), started {results['started']}, "
        f"took {results['duration_s'] / 60:.1f} min.",
        "",
        "## Machine", "", _machine(results), "",
        "## Run", "", _config(results), "",
    ]
    for title, (headers, rows) in tables(results):
        parts += [f"### {title}", "", markdown_table(headers, rows), ""]
        if title.startswith(SCALE_TITLE) and (notes := _scale_notes(results)):
            parts += [notes, ""]
    parts += ["## Targets (issue 3; the WireGuard row: issue 6)", "",
              markdown_table(*targets_table(results["targets"])), ""]
    if (out_dir / "ANALYSIS.md").exists():
        parts += ["Why a target is missed, with profiles: [ANALYSIS.md](ANALYSIS.md) (hand-written).", ""]
    if plots:
        parts += ["## Plots", ""] + [f"![{name}]({name})" for name in plots] + [""]
    parts += [METHOD]
    return "\n".join(parts)
