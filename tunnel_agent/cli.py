"""``tunnel-agent``: enroll this host as a site, run the agent, or show the status of a running one."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from tunnel_agent.config import load_agent_settings
from tunnel_agent.spool.errors import SpoolError
from tunnel_core.health import AgentState
from tunnel_link.tls import TlsConfigError, client_context
from tunnel_runtime.service import run_service, setup_logging
from tunnel_runtime.settings import ConfigError


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"tunnel-agent: configuration error:\n{exc}", file=sys.stderr)
        return 2
    except (TlsConfigError, OSError, SpoolError) as exc:  # unreadable certificates, a port in use, the spool
        print(f"tunnel-agent: cannot start: {exc}", file=sys.stderr)
        return 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tunnel-agent", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the agent")
    run.add_argument("--config", type=Path, required=True, help="agent TOML file")
    run.add_argument("-v", "--verbose", action="store_true")
    run.set_defaults(func=_run)
    status = sub.add_parser("status", help="show the status of the running agent")
    status.add_argument("--config", type=Path, required=True, help="agent TOML file (for the status port)")
    status.add_argument("--json", action="store_true", help="print the raw JSON")
    status.set_defaults(func=_status)
    enroll = sub.add_parser("enroll", help="join a relay with the one-line token from `tunnel-relay site add`",
                            description="Reads the token from --token-file, else from the environment variable "
                                        f"{TOKEN_ENV}, else from standard input (never from the command line, "
                                        "where other users could read it).")
    enroll.add_argument("--config", type=Path, help="agent TOML file (for state_dir, file paths and [proxy])")
    enroll.add_argument("--token-file", type=Path, help="file holding the token")
    enroll.add_argument("--force", action="store_true", help="replace an existing enrollment")
    enroll.set_defaults(func=_enroll)
    diagnose = sub.add_parser("diagnose", help="check DNS, TCP, proxy, TLS, authentication, relay and the local "
                              "destinations step by step, with a hint for each failure")
    diagnose.add_argument("--config", type=Path, required=True, help="agent TOML file")
    diagnose.add_argument("--json", action="store_true", help="print the steps as JSON")
    diagnose.set_defaults(func=_diagnose)
    return parser


TOKEN_ENV = "TUNNEL_AGENT_ENROLL_TOKEN"


def _enroll(args: argparse.Namespace) -> int:
    import asyncio

    from tunnel_agent.enroll import EnrollError, enroll, load_enrollment
    from tunnel_core.token import EnrollmentToken, TokenFormatError

    settings = load_agent_settings(args.config)
    try:
        existing = load_enrollment(settings.state_dir)
    except EnrollError:
        existing = None
    if (existing or settings.cert_file.exists()) and not args.force:
        print(f"tunnel-agent: this host is already enrolled ({settings.cert_file}); use --force to replace it",
              file=sys.stderr)
        return 1
    try:
        token = EnrollmentToken.decode(_read_token(args))
    except TokenFormatError as exc:
        print(f"tunnel-agent: not an enrollment token: {exc}", file=sys.stderr)
        return 2
    try:
        enrollment = asyncio.run(enroll(settings, token))
    except EnrollError as exc:
        print(f"tunnel-agent: enrollment failed: {exc}", file=sys.stderr)
        return 1
    expires = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(enrollment.not_after))
    print(f"enrolled as site {enrollment.site!r} at {enrollment.relay_url}; certificate valid until {expires} "
          f"(renewed automatically); key {settings.key_file} (0600)")
    return 0


def _read_token(args: argparse.Namespace) -> str:
    import getpass
    import os

    if args.token_file:
        return args.token_file.read_text()
    if os.environ.get(TOKEN_ENV):
        return os.environ[TOKEN_ENV]
    if sys.stdin.isatty():
        return getpass.getpass("enrollment token: ")
    return sys.stdin.readline()


def _run(args: argparse.Namespace) -> int:
    from tunnel_agent.agent import Agent  # aiohttp is only needed to run
    from tunnel_agent.enroll import EnrollError, with_enrollment

    try:
        settings = with_enrollment(load_agent_settings(args.config))
    except EnrollError as exc:
        print(f"tunnel-agent: {exc}", file=sys.stderr)
        return 2
    # Certificates are re-read on every connection attempt (renewal); a missing one is a set-up error,
    # not a transient failure, so say so now instead of retrying forever.
    client_context(settings.cert_file, settings.key_file, settings.ca_file)
    setup_logging(args.verbose)
    # The health C-ECHOs run through pynetdicom, which logs every association at INFO and every failed one
    # at ERROR, each round, without the route; the monitor logs once when a destination stops or starts
    # answering, and the reason is in the status.
    logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)
    agent = Agent(settings)
    return run_service(agent.run, agent.stop)


def _status(args: argparse.Namespace) -> int:
    settings = load_agent_settings(args.config)
    host = settings.status.host if settings.status.host not in ("0.0.0.0", "::") else "127.0.0.1"
    url = f"http://{host}:{settings.status.port}/api/status"
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            status = json.load(response)
    except (urllib.error.URLError, OSError) as exc:
        print(f"tunnel-agent: the agent is not running or its status port is closed ({url}): {exc}",
              file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(status, indent=2))
    else:
        print(_human(status))
    return 0 if status.get("state") == AgentState.CONNECTED else 3


# What a state means for the on-call person, when the state's name alone does not say it.
_STATE_NOTES = {
    AgentState.REVOKED: "the relay revoked this site (or its certificate): it refuses the tunnel; see last error for "
               "what to do",
    AgentState.REFUSED: "the relay refuses this site's certificate; see last error for what to do",
}


def _human(status: dict) -> str:
    state = status["state"]
    note = f" ({_STATE_NOTES[state]})" if state in _STATE_NOTES else ""
    lines = [f"state:        {state}{note}", f"relay:        {status['relay_url']}"]
    if status.get("connected_since"):
        lines.append(f"connected:    {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(status['connected_since']))}")
    if status.get("rtt_ms") is not None:
        lines.append(f"rtt:          {status['rtt_ms']:.2f} ms")
    lines.append(f"reconnects:   {status['reconnects']}")
    if status.get("last_error"):
        lines.append(f"last error:   {status['last_error']}")
    if status.get("next_attempt"):
        lines.append(f"next attempt: {_next_attempt(status['next_attempt'], time.time(), state in _STATE_NOTES)}")
    lines += _tunnel_lines(status.get("tunnels") or [])
    lines.append(f"routes:       {', '.join(status['routes']) or '-'}")
    lines.append(f"listener:     {status.get('listener') or 'disabled'}")
    lines.append(f"associations: {len(status['associations'])} active")
    for a in status["associations"]:
        lines.append(f"  {a['id']} {a['direction']} {a['calling_ae']} -> {a['called_ae']} "
                     f"in={a['bytes_from_caller']} out={a['bytes_to_caller']}")
    lines += _health_lines(status.get("health"))
    return "\n".join(lines)


def _tunnel_lines(tunnels: list[dict]) -> list[str]:
    """One line per tunnel (the primary to relay_url first), when there is more than the primary."""
    if len(tunnels) < 2:
        return []
    lines = [f"tunnels:      {sum(1 for t in tunnels if t['state'] == AgentState.CONNECTED)} live"]
    for t in tunnels:
        name = f"{t['relay']} -> {t['reached']}" if t.get("reached") else t["relay"]
        error = f", last error: {t['last_error']}" if t["last_error"] else ""
        lines.append(f"  {name:<28} {t['host']:<24} {t['state']}, {t['connects']} connects, "
                     f"{t['active_streams']} streams{error}")
    return lines


def _next_attempt(at: float, now: float, refused: bool) -> str:
    """``14:03:12 (in 59 min)``; after a refusal, also that a re-enrollment is tried at once."""
    left = max(0.0, at - now)
    wait = f"{left:.0f} s" if left < 120 else f"{left / 60:.0f} min"
    when = f"{time.strftime('%H:%M:%S', time.localtime(at))} (in {wait})"
    return f"{when}, or as soon as a new certificate is in place (`tunnel-agent enroll --force`)" if refused else when


def _health_lines(health: dict | None) -> list[str]:
    """One line per destination's latest C-ECHO, and one for the host."""
    if not health:
        return ["health:       no C-ECHO round yet"]
    lines = [f"health:       C-ECHO every {health['report_interval']:g} s"]
    for d in health["destinations"]:
        address = f"{d['host']}:{d['port']}"
        if d["ok"] is None:
            result = "not checked yet"
        elif d["ok"]:
            result = f"ok  {d['latency_ms']:.1f} ms" if d["latency_ms"] is not None else "ok"
        else:
            since = time.strftime("%H:%M:%S", time.localtime(d["last_failure"]))
            result = f"FAILED: {d['last_failure_reason']} (at {since})"
        lines.append(f"  {d['route']:<12} {address:<24} {result}")
    h = health["host"]
    disk = f"{h['disk_free_bytes'] / 2**30:.1f} GiB" if h["disk_free_bytes"] is not None else "?"
    lines.append(f"host:         cpu {h['cpu_percent']:.0f}%  memory {h['memory_percent']:.0f}%  "
                 f"disk free {disk}  rss {h['rss_bytes'] / 2**20:.0f} MiB  fds {h['open_fds']}")
    return lines


def _diagnose(args: argparse.Namespace) -> int:
    import asyncio
    import os

    from tunnel_agent.diagnose import exit_code, format_steps, run_diagnosis, steps_json

    settings = load_agent_settings(args.config)
    steps = asyncio.run(run_diagnosis(settings, os.environ))
    print(steps_json(steps) if args.json else format_steps(steps))
    return exit_code(steps)


if __name__ == "__main__":
    sys.exit(main())
