"""Agent health, measured on the hospital side and carried to the relay in band.

Theory of operation: every ``[health] echo_interval`` seconds the :class:`HealthMonitor` runs one DICOM
C-ECHO (``tunnel_agent.echo``) against each ``[[routes]]`` destination, all at once (pynetdicom is blocking,
so each echo runs in a thread, with every pynetdicom timeout set to ``echo_timeout`` and the thread's result
awaited for a bounded time). Each destination keeps ok, latency, last success, last failure and a short
reason (:func:`echo_reason`). With host metrics (psutil), the tunnel's RTT and reconnects, the agent version
and the certificate's expiry, that makes the version-1 report of ``docs/protocol.md``, a
``tunnel_core.health.HealthReport`` (:func:`build_report`), sent to the relay as a REPORT frame after every
round and once on each new tunnel (the relay forgets the report of a closed tunnel). The relay turns it
into up / degraded / down with ``tunnel_core.health.site_condition``. C-ECHO carries no patient data; the
report holds route names, addresses, numbers and reasons only.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

import psutil

from tunnel_agent.config import AgentRoute, HealthConfig
from tunnel_agent.echo import EchoAttempt, c_echo
from tunnel_core.errors import UsageError
from tunnel_core.health import (
    CertificateReport,
    DestinationReport,
    HealthReport,
    HostReport,
    SpoolReport,
    TunnelReport,
)
from tunnel_link.session import MuxSession

__all__ = [
    "DEFAULT_CALLED_AE",
    "CertificateFacts",
    "DestinationHealth",
    "HealthMonitor",
    "TunnelFacts",
    "build_report",
    "echo_reason",
    "host_metrics",
]

log = logging.getLogger("agent.health")

DEFAULT_CALLED_AE = "ANY-SCP"
SESSION_POLL = 0.5  # seconds between looks for a new tunnel, to report to it at once
ECHO_STAGES = 4  # connect, association, C-ECHO, release: each bounded by echo_timeout
MAX_REPORTED = 64  # destinations in one report (the relay refuses more)
MAX_REASON = 200
MAX_SPOOL_REPORTED = 16  # spool destinations in one report: with 64 destinations it still fits 64 KiB


def echo_reason(attempt: EchoAttempt, timeout: float) -> str:
    """Why the echo failed, in a few words for ops; empty when it succeeded."""
    if attempt.status == 0x0000:
        return ""
    if not attempt.connected:
        return attempt.tcp_error or "connection refused"
    if attempt.rejection:
        return f"association rejected ({attempt.rejection})"
    if not attempt.answered:
        return "association aborted before an answer" if attempt.aborted else f"no answer within {timeout:g} s"
    if not attempt.established:
        return "association aborted (Verification not accepted)"
    if attempt.status is None:
        return "association aborted during the C-ECHO" if attempt.aborted else \
            f"no C-ECHO response within {timeout:g} s"
    return f"C-ECHO status 0x{attempt.status:04X}"


@dataclass
class DestinationHealth:
    """One ``[[routes]]`` destination and what its latest echoes said."""

    route: str
    host: str
    port: int
    called_ae: str
    ok: bool | None = None  # None: not checked yet
    latency_ms: float | None = None
    last_success: float | None = None
    last_failure: float | None = None
    last_failure_reason: str = ""
    checked_at: float | None = None

    @classmethod
    def of(cls, route: AgentRoute) -> DestinationHealth:
        return cls(route.name, route.host, route.port, route.called_ae or DEFAULT_CALLED_AE)

    def record(self, reason: str, latency: float | None, now: float) -> None:
        """Record one echo: ``reason`` empty means it succeeded."""
        self.checked_at = now
        self.ok = not reason
        if self.ok:
            self.last_success = now
            self.latency_ms = round(latency * 1000, 3) if latency is not None else None
        else:
            self.last_failure, self.last_failure_reason = now, reason[:MAX_REASON]
            self.latency_ms = None

    def as_report(self) -> DestinationReport:
        return DestinationReport(self.route, self.host, self.port, self.ok, self.latency_ms, self.last_success,
                                 self.last_failure, self.last_failure_reason, self.checked_at)


def build_report(*, version: str, now: float, interval: float, destinations: list[DestinationHealth],
                 host: HostReport, rtt_ms: float | None, reconnects: int, not_after: float | None,
                 renewal_error: str, spool: tuple[SpoolReport, ...] = ()) -> HealthReport:
    """The version-1 report (``docs/protocol.md`` §3.8); send its ``encode()`` as a REPORT frame."""
    return HealthReport(
        version=version,
        sent_at=now,
        report_interval=interval,
        destinations=tuple(d.as_report() for d in destinations[:MAX_REPORTED]),
        host=host,
        tunnel=TunnelReport(rtt_ms=rtt_ms, reconnects=reconnects),
        certificate=CertificateReport(not_after=not_after, renewal_error=renewal_error[:MAX_REASON]),
        spool=tuple(replace(d, last_error=d.last_error[:MAX_REASON]) for d in spool[:MAX_SPOOL_REPORTED]),
    )


def host_metrics(state_dir: Path, process: psutil.Process) -> HostReport:
    """CPU and memory of the host, free disk where the agent keeps its state, the agent's RSS and fds.

    ``cpu_percent`` is the host's use since the previous call (the first call returns 0.0)."""
    directory = next((p for p in (state_dir, *state_dir.parents) if p.is_dir()), None)
    try:
        disk_free = psutil.disk_usage(str(directory)).free if directory else None
    except OSError:
        disk_free = None
    return HostReport(
        cpu_percent=psutil.cpu_percent(interval=None),
        memory_percent=psutil.virtual_memory().percent,
        disk_free_bytes=disk_free,
        rss_bytes=process.memory_info().rss,
        open_fds=process.num_fds() if hasattr(process, "num_fds") else None,
    )


class TunnelFacts(Protocol):
    """What the monitor reads of the tunnel (``tunnel_agent.tunnel.Tunnel``): the live session, if any,
    and how many tunnels were opened."""

    @property
    def session(self) -> MuxSession | None: ...

    @property
    def connects(self) -> int: ...


class CertificateFacts(Protocol):
    """What the monitor reads of the certificate (``tunnel_agent.renewal.Renewal``)."""

    @property
    def renewal_error(self) -> str: ...

    def certificate_not_after(self) -> float | None: ...


class HealthMonitor:
    """Build with the tunnel, the certificate, the ``[health]`` settings and routes; ``await run()`` until
    cancelled. ``latest`` is the most recent report (None before the first round), for the agent's status."""

    def __init__(self, tunnel: TunnelFacts, certificate: CertificateFacts, config: HealthConfig,
                 routes: list[AgentRoute], *, state_dir: Path, version: str,
                 spool: Callable[[], tuple[SpoolReport, ...]] = tuple,
                 sessions: Callable[[], list[MuxSession]] | None = None) -> None:
        self.tunnel = tunnel
        # Where reports go: every live tunnel (``tunnel_agent.fleet``); default the one tunnel's session.
        self.sessions = sessions or (lambda: [s] if (s := tunnel.session) is not None else [])
        self.spool = spool  # the spool destinations' summary, sent with each report
        self.certificate = certificate
        self.config = config
        self.state_dir = state_dir
        self.version = version
        self.destinations = [DestinationHealth.of(r) for r in routes]
        self.latest: HealthReport | None = None
        self.rounds = 0
        self._process = psutil.Process()
        self._reported_to: set[MuxSession] = set()  # the sessions of the latest send (a bounded set)
        psutil.cpu_percent(interval=None)  # start the measuring window of the first report

    async def run(self) -> None:
        async with asyncio.TaskGroup() as group:
            group.create_task(self._echo_forever())
            group.create_task(self._report_to_new_tunnels())

    async def _echo_forever(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            began = loop.time()
            await self.check_round()
            self.send_report()
            await asyncio.sleep(max(0.0, began + self.config.echo_interval - loop.time()))

    async def _report_to_new_tunnels(self) -> None:
        """The relay drops a closed tunnel's report: tell each new tunnel at once, not a round later."""
        while True:
            if any(session not in self._reported_to for session in self.sessions()):
                self.send_report()
            await asyncio.sleep(SESSION_POLL)

    async def check_round(self) -> None:
        """Echo every destination at once; returns when each has an answer or its time is up."""
        await asyncio.gather(*(self._check(d) for d in self.destinations))
        self.rounds += 1

    async def _check(self, dest: DestinationHealth) -> None:
        timeout = self.config.echo_timeout
        bound = ECHO_STAGES * timeout + 1.0
        try:
            attempt = await asyncio.wait_for(asyncio.to_thread(
                c_echo, dest.host, dest.port, dest.called_ae, self.config.calling_ae, timeout), bound)
            reason = echo_reason(attempt, timeout)
        except TimeoutError:
            attempt, reason = None, f"no answer within {bound:g} s"
        except Exception as exc:  # a pynetdicom surprise must not end the monitor; it is this route's failure
            attempt, reason = None, f"echo failed: {type(exc).__name__}: {exc}"
        was_ok = dest.ok
        dest.record(reason, attempt.latency if attempt else None, time.time())
        if reason and was_ok is not False:
            log.warning("route=%s C-ECHO %s:%d (called AE %s) failed: %s", dest.route, dest.host, dest.port,
                        dest.called_ae, reason)
        elif not reason and was_ok is False:
            log.info("route=%s C-ECHO %s:%d answers again", dest.route, dest.host, dest.port)

    def report(self) -> HealthReport:
        """A fresh report: the latest echo results with the host and tunnel as they are now."""
        session = self.tunnel.session
        rtt = session.rtt if session is not None else None
        return build_report(
            version=self.version, now=time.time(), interval=self.config.echo_interval,
            destinations=self.destinations, host=host_metrics(self.state_dir, self._process),
            rtt_ms=round(rtt * 1000, 3) if rtt is not None else None,
            reconnects=max(0, self.tunnel.connects - 1), not_after=self.certificate.certificate_not_after(),
            renewal_error=self.certificate.renewal_error, spool=self.spool())

    def send_report(self) -> None:
        """Rebuild the report and send it over every tunnel that is up."""
        self.latest = self.report()
        sessions = self.sessions()
        self._reported_to = set(sessions)
        if not sessions:
            return
        payload = self.latest.encode()
        try:
            for session in sessions:
                session.send_report(payload)
        except UsageError as exc:  # larger than a REPORT frame may be: a bug, not a network fault
            log.error("health report not sent: %s", exc)
