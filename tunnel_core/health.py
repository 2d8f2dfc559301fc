"""How healthy a site is, and whether a program is ready: pure decisions from observed facts.

Theory of operation: the agent measures (a periodic DICOM C-ECHO of each local destination, host metrics,
its certificate) and sends the result to the relay as a REPORT frame (``docs/protocol.md`` §3.8, a JSON
object). The relay decides a site's condition from what it knows — is the tunnel up, how old is the
latest report, what does it say — with :func:`site_condition`; the dashboard, the metrics and
``tunnel-relay sites`` all show that one decision. Readiness (``/readyz``) is decided the same way, by
:func:`relay_readiness` and :func:`agent_readiness`. No clock is read here: ``now`` is a parameter.

The report is typed on both ends: the agent builds a :class:`HealthReport` and sends
:meth:`HealthReport.encode`; the relay reads one back with :func:`parse_report`, and its status API shows
:meth:`HealthReport.as_dict`, the same JSON object. The report is data from the network: :func:`parse_report`
accepts only the documented shape, with bounded strings, so nothing the agent sends can grow the relay's
memory or inject markup into a page.
Its only failure is :class:`ReportError`, whatever the bytes (the mux has already capped them at 64 KiB):
the UTF-8, the nesting depth and the length of every integer are checked before or while the JSON is
decoded, so a nesting bomb (``[`` * 60000) cannot reach the decoder's recursion and a 400-digit number
cannot overflow a float.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, fields
from enum import Enum, StrEnum
from typing import Any

__all__ = [
    "REPORT_VERSION",
    "CERT_WARNING_DAYS",
    "AgentState",
    "CertificateReport",
    "Condition",
    "DestinationReport",
    "SpoolReport",
    "HealthReport",
    "HostReport",
    "Readiness",
    "ReportError",
    "SiteHealth",
    "TunnelReport",
    "agent_readiness",
    "parse_report",
    "relay_readiness",
    "site_condition",
]

REPORT_VERSION = 1
CERT_WARNING_DAYS = 7  # a certificate this close to expiry, with renewal failing, degrades the site
STALE_REPORTS = 2.5  # a report older than this many report intervals is stale
_MAX_TEXT = 300
MAX_REPORT_DEPTH = 8  # arrays and objects inside one another; the documented report nests 3 deep
MAX_INT_DIGITS = 20  # an integer literal this long still converts to a finite float (< 1e20)
_MAX_DESTINATIONS = 64


class Condition(Enum):
    UP = "up"
    DEGRADED = "degraded"
    DOWN = "down"


@dataclass(frozen=True, slots=True)
class SiteHealth:
    condition: Condition
    reason: str


@dataclass(frozen=True, slots=True)
class Readiness:
    ready: bool
    reason: str


class AgentState(StrEnum):
    """Where the agent's tunnel to the relay stands (its status API shows the value)."""

    STARTING = "starting"
    CONNECTING = "connecting"
    CONNECTED = "connected"
    DISCONNECTED = "disconnected"
    BACKOFF = "backoff"  # after a failure, waiting out the backoff
    REVOKED = "revoked"  # the relay said this site or its certificate is revoked (tunnel_core.refusal)
    REFUSED = "refused"  # the relay refused this site's certificate for another reason

    @property
    def waiting(self) -> bool:
        """The states that have a next attempt (after a failure, or a refusal by the relay)."""
        return self in (AgentState.BACKOFF, AgentState.REVOKED, AgentState.REFUSED)

    @property
    def refused_by_relay(self) -> bool:
        return self in (AgentState.REVOKED, AgentState.REFUSED)


# --- the REPORT (docs/protocol.md §3.8) ------------------------------------------------------------------
# Numbers are ``float | None`` in the relay's reading; the agent builds them from ints where it has ints
# (a port, a count of bytes), and each end shows what it holds.


@dataclass(frozen=True, slots=True)
class DestinationReport:
    """One ``[[routes]]`` destination of the agent and its latest C-ECHO. ``ok`` None: not checked yet."""

    route: str = ""
    host: str = ""
    port: int | None = None
    ok: bool | None = None
    latency_ms: float | None = None
    last_success: float | None = None
    last_failure: float | None = None
    last_failure_reason: str = ""
    checked_at: float | None = None


@dataclass(frozen=True, slots=True)
class HostReport:
    """The agent's host: CPU and memory use, free disk where it keeps its state, its own RSS and fds."""

    cpu_percent: float | None = None
    memory_percent: float | None = None
    disk_free_bytes: float | None = None
    rss_bytes: float | None = None
    open_fds: float | None = None


@dataclass(frozen=True, slots=True)
class TunnelReport:
    rtt_ms: float | None = None
    reconnects: float | None = None


@dataclass(frozen=True, slots=True)
class CertificateReport:
    not_after: float | None = None
    renewal_error: str = ""


@dataclass(frozen=True, slots=True)
class SpoolReport:
    """One ``mode = "spool"`` destination of the agent: what it holds and how forwarding goes. Counts,
    bytes and ages only: never a study or an instance."""

    name: str = ""
    called_ae: str = ""
    instances: float | None = None
    bytes: float | None = None
    oldest_age: float | None = None  # seconds since the oldest instance held arrived
    forwarded: float | None = None
    quarantined: float | None = None
    last_error: str = ""


@dataclass(frozen=True, slots=True)
class HealthReport:
    """A version-1 health report. The agent builds one and sends :meth:`encode`; :func:`parse_report`
    reads one back; :meth:`as_dict` is the JSON object both status APIs show."""

    version: str
    sent_at: float | None
    report_interval: float | None
    destinations: tuple[DestinationReport, ...]
    host: HostReport
    tunnel: TunnelReport
    certificate: CertificateReport
    spool: tuple[SpoolReport, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        """The report's JSON object, keys in the order of ``docs/protocol.md`` §3.8 (``spool`` only when the
        agent has spool destinations)."""
        answer = {
            "v": REPORT_VERSION,
            "version": self.version,
            "sent_at": self.sent_at,
            "report_interval": self.report_interval,
            "destinations": [asdict(d) for d in self.destinations],
            "host": asdict(self.host),
            "tunnel": asdict(self.tunnel),
            "certificate": asdict(self.certificate),
        }
        if self.spool:
            answer["spool"] = [asdict(d) for d in self.spool]
        return answer

    def encode(self) -> bytes:
        """The REPORT frame's payload."""
        return json.dumps(self.as_dict()).encode()


class ReportError(ValueError):
    """A REPORT payload is not a report of a version we understand."""


def parse_report(payload: bytes, *, max_depth: int = MAX_REPORT_DEPTH,
                 max_int_digits: int = MAX_INT_DIGITS) -> HealthReport:
    """The report, with only known keys, bounded strings and finite numbers (NaN, infinities and values of
    the wrong type read as None). Raises ``ReportError``, and nothing else, for anything else: not UTF-8
    JSON, arrays or objects nested deeper than ``max_depth``, an integer literal of more than
    ``max_int_digits`` digits, not a version-1 object. Its cost is linear in ``len(payload)``."""
    raw = _decode(payload, max_depth=max_depth, max_int_digits=max_int_digits)
    if not isinstance(raw, dict) or type(raw.get("v")) is not int or raw["v"] != REPORT_VERSION:  # not True
        raise ReportError(f"report is not a version {REPORT_VERSION} object")
    destinations = raw.get("destinations")
    if not isinstance(destinations, list) or len(destinations) > _MAX_DESTINATIONS:
        raise ReportError("report destinations must be a list")
    host, tunnel, certificate = (_dict(raw.get(k)) for k in ("host", "tunnel", "certificate"))
    spool = raw.get("spool")
    spool = spool[:_MAX_DESTINATIONS] if isinstance(spool, list) else []  # optional: older agents send none
    return HealthReport(
        version=_text(raw.get("version")),
        sent_at=_number(raw.get("sent_at")),
        report_interval=_number(raw.get("report_interval")),
        destinations=tuple(_destination(d) for d in destinations),
        host=HostReport(**{f.name: _number(host.get(f.name)) for f in fields(HostReport)}),
        tunnel=TunnelReport(rtt_ms=_number(tunnel.get("rtt_ms")), reconnects=_number(tunnel.get("reconnects"))),
        certificate=CertificateReport(not_after=_number(certificate.get("not_after")),
                                      renewal_error=_text(certificate.get("renewal_error"))),
        spool=tuple(_spool(d) for d in spool),
    )


def site_condition(*, connected: bool, disconnect_reason: str, report: HealthReport | None,
                   report_at: float | None, now: float) -> SiteHealth:
    """Up, degraded or down, with the one reason ops should read first."""
    if not connected:
        return SiteHealth(Condition.DOWN, disconnect_reason or "never connected")
    if report is None or report_at is None:
        return SiteHealth(Condition.DEGRADED, "connected, no health report from the agent yet")
    interval = report.report_interval or 30.0
    age = now - report_at
    if age > interval * STALE_REPORTS:
        return SiteHealth(Condition.DEGRADED, f"no health report for {age:.0f} s")
    failing = [d for d in report.destinations if d.ok is False]
    if failing:
        first = failing[0]
        more = f" (and {len(failing) - 1} more)" if len(failing) > 1 else ""
        return SiteHealth(Condition.DEGRADED, f"C-ECHO {first.route} ({first.host}:{first.port}) "
                                              f"failed: {first.last_failure_reason or 'no answer'}{more}")
    cert = report.certificate
    if cert.not_after is not None:
        days = (cert.not_after - now) / 86400
        if days < CERT_WARNING_DAYS and cert.renewal_error:
            return SiteHealth(Condition.DEGRADED, f"certificate expires in {days:.1f} days and renewal fails: "
                                                  f"{cert.renewal_error}")
    return SiteHealth(Condition.UP, "ok")


def relay_readiness(*, started: bool, registry_ok: bool, registry_shared: bool = False,
                    draining: bool = False) -> Readiness:
    """The relay can take traffic once every port is bound and the registry answers. A registry that every
    relay of a fleet shares (PostgreSQL) being down does not make the relay unready: every relay would
    leave the balancer at once, while each can still serve its tunnels and routes from what it holds. A
    draining relay is not ready, whatever else holds."""
    if not started:
        return Readiness(False, "starting")
    if draining:  # first of all, so that balancers send new callers elsewhere
        return Readiness(False, "draining")
    if not registry_ok and registry_shared:
        return Readiness(True, "ready; the shared registry is unavailable: serving from what this relay holds")
    if not registry_ok:
        return Readiness(False, "registry unavailable")
    return Readiness(True, "ready")


def agent_readiness(*, state: AgentState, last_error: str) -> Readiness:
    """The agent is ready when its tunnel to the relay is up. Refused by the relay (revoked or refused),
    the reason is ``last_error`` as it stands: it already says so ("revoked by the relay: ...")."""
    if state is AgentState.CONNECTED:
        return Readiness(True, "ready")
    if state.refused_by_relay and last_error:
        return Readiness(False, last_error)
    return Readiness(False, f"tunnel {state.value}" + (f": {last_error}" if last_error else ""))


# --- validation helpers ----------------------------------------------------------------------------------

# A JSON string (escapes included), and everything that is not a bracket: what _too_deep removes first.
_JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")


def _decode(payload: bytes, *, max_depth: int, max_int_digits: int) -> object:
    """The JSON value of ``payload``, after the checks that keep the decoder's cost bounded."""
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ReportError("report is not UTF-8") from exc
    if _too_deep(text, max_depth):
        raise ReportError(f"report nests deeper than {max_depth} levels")

    def bounded_int(literal: str) -> int:
        if len(literal.lstrip("-")) > max_int_digits:
            raise ReportError(f"report holds an integer of {len(literal.lstrip('-'))} digits")
        return int(literal)

    try:
        return json.loads(text, parse_int=bounded_int)
    except ReportError:
        raise
    except ValueError as exc:  # json.JSONDecodeError is one
        raise ReportError("report is not JSON") from exc


def _too_deep(text: str, limit: int) -> bool:
    """Whether arrays and objects nest more than ``limit`` deep in JSON ``text`` (brackets inside strings do
    not count). The count stops at the first bracket too deep, so a bomb costs ``limit`` steps after two
    linear regex passes. Up to the first error in malformed text it counts what the decoder would reach."""
    depth = 0
    for bracket in _NOT_BRACKET.sub("", _JSON_STRING.sub("", text)):
        depth += 1 if bracket in "[{" else -1
        if depth > limit:
            return True
    return False


def _destination(raw: object) -> DestinationReport:
    d = _dict(raw)
    ok = d.get("ok")
    port = _number(d.get("port"))
    return DestinationReport(
        route=_text(d.get("route")),
        host=_text(d.get("host")),
        port=int(port) if port is not None and 0 <= port <= 65535 else None,  # never a 300-digit int
        ok=ok if isinstance(ok, bool) else None,  # None: not checked yet
        latency_ms=_number(d.get("latency_ms")),
        last_success=_number(d.get("last_success")),
        last_failure=_number(d.get("last_failure")),
        last_failure_reason=_text(d.get("last_failure_reason")),
        checked_at=_number(d.get("checked_at")),
    )


def _spool(raw: object) -> SpoolReport:
    d = _dict(raw)
    texts = {f.name for f in fields(SpoolReport) if f.type == "str"}
    return SpoolReport(**{f.name: (_text if f.name in texts else _number)(d.get(f.name)) for f in fields(SpoolReport)})


def _dict(value: object) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _text(value: object) -> str:
    if not isinstance(value, str):
        return ""
    return "".join(ch if ch.isprintable() else "?" for ch in value[:_MAX_TEXT])


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        number = float(value)  # an int too large for a float raises OverflowError (parse_report bounds them)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None
