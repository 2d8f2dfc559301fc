"""``tunnel-agent diagnose``: check the agent's path to the relay one layer at a time and say where it breaks.

Theory of operation. The answer is a list of :class:`Step` results, each ``ok``, ``warn``, ``fail`` or
``skip`` with a one-line detail and, when something is wrong, a hint for the hospital's on-call person or
network team. The steps follow the tunnel's own layers, so the first failure is where to look:

1. ``config``: relay URL known (config or enrollment), certificate, key and pinned CA readable and
   consistent, the proxy choice valid. ``cert``: certificate validity and the key file's mode.
2. ``DNS``: the relay's name, or the proxy's when one is used (the proxy then resolves the relay).
3. ``TCP``: one connection to the relay, or to the proxy; ``proxy``: ``CONNECT`` to the relay on it.
4. ``TLS``: the handshake on that same connection, verified against the pinned CA with the host name
   checked; on failure the certificate actually presented is fetched (:mod:`tunnel_agent.peek`) and its
   issuer named, which is how a TLS-inspecting proxy shows itself.
5. ``auth`` and ``relay``: the real tunnel (:func:`tunnel_agent.connect.open_tunnel`) and one mux PING.
   A refusal names the relay's reason (``Tunnel-Refused``: revoked site or certificate, unknown, ...)
   and the commands to rejoin (``tunnel_core.refusal``).
   The relay keeps one session per site and a new one replaces the old, so when the local agent's
   status endpoint says it is connected, its word is taken and no second tunnel is opened.
6. ``C-ECHO <route>``: one DICOM verification per ``[[routes]]`` entry, from this host.

A step whose prerequisite did not pass is not attempted: it is a ``skip`` naming the failed step
(:func:`skip_for`). The local C-ECHO steps need no relay and always run. Results hold no secrets: proxies
appear as ``host:port``, never with credentials, and nothing is read from the key but its file mode.

Call :func:`run_diagnosis`, then :func:`format_steps` or :func:`steps_json`, and exit with
:func:`exit_code`. Everything above the ``--- running the checks`` line is pure.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import secrets
import socket
import ssl
import stat
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from enum import StrEnum
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import aiohttp
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.x509.oid import NameOID

from tunnel_agent.connect import _status_hint, open_tunnel, outer_context, refusal_token, target_of
from tunnel_agent.echo import EchoAttempt, c_echo
from tunnel_agent.enroll import RENEW_AT, EnrollError, relay_url_mismatch, with_enrollment
from tunnel_agent.peek import PeekError, describe_certificate, peek_certificate
from tunnel_agent.proxy import ProxyError, ProxyRoute, choose_proxy
from tunnel_core.codes import ErrorCode
from tunnel_core.errors import ProtocolError
from tunnel_core.health import AgentState
from tunnel_core.mux import Mux, PongReceived, Role, StreamOpened
from tunnel_core.refusal import refusal_from_token
from tunnel_link.errors import LinkError
from tunnel_link.tls import TlsConfigError, client_context

if TYPE_CHECKING:
    from tunnel_agent.config import AgentRoute, AgentSettings

__all__ = [
    "CALLING_AE",
    "Outcome",
    "Step",
    "check_certificate",
    "echo_step",
    "exit_code",
    "format_steps",
    "run_diagnosis",
    "skip_for",
    "steps_json",
    "tls_failure_hint",
]

CALLING_AE = "TUNNEL-DIAG"
DEFAULT_CALLED_AE = "ANY-SCP"
ECHO_TIMEOUT = 5.0  # seconds, for each of connect, association and the C-ECHO itself
STATUS_TIMEOUT = 2.0  # seconds to ask the local agent's status endpoint
_MAX_ADDRESSES = 4  # addresses tried in the TCP step
_DETAIL_MAX = 300
_ENROLL_AGAIN = ("enroll again: `tunnel-relay site add NAME` on the relay, then `tunnel-agent enroll --force` "
                 "here with the token it prints")


class Outcome(StrEnum):
    OK = "ok"
    WARN = "warn"  # works, but needs attention soon; does not fail the diagnosis
    FAIL = "fail"
    SKIP = "skip"  # not attempted because a prerequisite did not pass


@dataclass(frozen=True, slots=True)
class Step:
    """One check's result. ``detail`` says what was seen; ``hint`` what to do about it (may be empty)."""

    name: str
    outcome: Outcome
    detail: str
    hint: str = ""

    @property
    def passed(self) -> bool:
        return self.outcome in (Outcome.OK, Outcome.WARN)

    def as_dict(self) -> dict[str, str]:
        return {"name": self.name, "outcome": self.outcome.value, "detail": self.detail, "hint": self.hint}


# --- the result model: pure ----------------------------------------------------------------------------


def skip_for(name: str, done: Sequence[Step], requires: Sequence[str]) -> Step | None:
    """A ``skip`` for step ``name`` if one of ``requires`` did not pass, else None (go ahead).

    A required step that is absent from ``done`` is not needed (the proxy step exists only with a proxy).
    A skip caused by a skip names the original failure: "because DNS failed", all the way down.
    """
    by_name = {step.name: step for step in done}
    for need in requires:
        step = by_name.get(need)
        if step is None or step.passed:
            continue
        detail = step.detail if step.outcome is Outcome.SKIP else f"because {need} failed"
        return Step(name, Outcome.SKIP, detail)
    return None


_LABELS = {Outcome.OK: " OK ", Outcome.WARN: "WARN", Outcome.FAIL: "FAIL", Outcome.SKIP: "SKIP"}


def format_steps(steps: Sequence[Step]) -> str:
    """Human lines: ``[ OK ] DNS        relay.example.org -> 10.0.0.5 (2 ms)``, a hint line under a
    failure or warning, and a last line with the verdict."""
    width = max([10, *(len(step.name) for step in steps)])
    lines = []
    for step in steps:
        lines.append(f"[{_LABELS[step.outcome]}] {step.name:<{width}} {step.detail}".rstrip())
        if step.hint:
            lines.append(f"{'':7}hint: {step.hint}")
    failed = [step.name for step in steps if step.outcome is Outcome.FAIL]
    if failed:
        lines.append(f"FAILED: {', '.join(failed)} (see the hints above)")
    else:
        lines.append(f"all {sum(step.passed for step in steps)} checks passed")
    return "\n".join(lines)


def steps_json(steps: Sequence[Step]) -> str:
    """``{"ok": bool, "steps": [{"name", "outcome", "detail", "hint"}, ...]}``."""
    return json.dumps({"ok": exit_code(steps) == 0, "steps": [step.as_dict() for step in steps]}, indent=2)


def exit_code(steps: Sequence[Step]) -> int:
    """0 when no step failed (warnings pass), else 1."""
    return 1 if any(step.outcome is Outcome.FAIL for step in steps) else 0


def check_certificate(cert: x509.Certificate, key_path: Path, key_mode: int, now: dt.datetime) -> Step:
    """The ``cert`` step: validity window, time left, renewal overdue, and the key file's permissions."""
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    renew_from = start + (end - start) * RENEW_AT
    name = _common_name(cert)
    outcome, details, hints = Outcome.OK, [], []
    if now >= end:
        outcome = Outcome.FAIL
        details.append(f"certificate '{name}' expired on {_utc(end)}")
        hints.append(f"the certificate has expired: {_ENROLL_AGAIN}")
    elif now < start:
        outcome = Outcome.FAIL
        details.append(f"certificate '{name}' is valid only from {_utc(start)}")
        hints.append("this host's clock is behind (or the relay's ahead): check NTP on both")
    elif now >= renew_from:
        outcome = Outcome.WARN
        details.append(f"certificate '{name}' valid until {_utc(end)} ({_left(end - now)} left)")
        hints.append("renewal is overdue (the running agent renews two thirds into the lifetime): see "
                     "renewal_error in `tunnel-agent status`")
    else:
        details.append(f"certificate '{name}' valid until {_utc(end)} ({_left(end - now)} left; renewed "
                       f"automatically from {_utc(renew_from)})")
    if key_mode & 0o077:
        outcome = Outcome.FAIL
        details.append(f"key {key_path} is open to group or others (mode {key_mode:04o})")
        hints.append(f"the private key must be private: chmod 600 {key_path} (and find out who could read it)")
    else:
        details.append(f"key {key_path} mode {key_mode:04o}")
    return Step("cert", outcome, "; ".join(details), "; ".join(hints))


def tls_failure_hint(host: str, presented: bytes | None, ca_pem: bytes, now: dt.datetime) -> str:
    """What to do when the relay's certificate failed verification, from the certificate presented instead.

    Not issued by the pinned CA: a TLS-inspecting proxy (named by its issuer). Issued by it but expired or
    for another name: the relay's or the configuration's problem.
    """
    cert = _parse_der(presented)
    if cert is None:
        return "the server presented no usable certificate: is relay_url's host:port really the relay?"
    ca = x509.load_pem_x509_certificate(ca_pem)
    issuer = cert.issuer.rfc4514_string()
    if not _issued_by(cert, ca):
        return (f"a TLS-inspecting proxy (issuer '{issuer}') is in the path: ask the network team to exempt "
                f"{host} from inspection, or use interception mode")
    if now >= cert.not_valid_after_utc or now < cert.not_valid_before_utc:
        return (f"the relay's certificate is outside its validity ({_utc(cert.not_valid_before_utc)} to "
                f"{_utc(cert.not_valid_after_utc)}): tell the relay operator, and check this host's clock")
    names = _subject_names(cert)
    if host.lower() not in names:
        return (f"the relay's certificate names {', '.join(sorted(names)) or 'no host'}, not {host}: "
                "relay_url must use one of those names")
    return "the relay's certificate does not verify against the pinned CA: tell the relay operator"


def echo_step(route: str, address: str, called_ae: str, result: EchoAttempt) -> Step:
    """The ``C-ECHO <route>`` step for one destination (``result``: ``tunnel_agent.echo.c_echo``)."""
    name = f"C-ECHO {route}"
    who = f"{address} (called AE {called_ae}, calling AE {CALLING_AE})"
    if result.status == 0x0000:
        return Step(name, Outcome.OK, f"{who}: success ({_ms(result.latency or 0.0)})")
    if not result.connected:
        return Step(name, Outcome.FAIL, f"cannot connect to {address}: {result.tcp_error or 'refused'}",
                    f"nothing accepts DICOM connections at {address}: is the destination up, are host and "
                    f"port of [[routes]] '{route}' right, and does a firewall between here and it allow them?")
    if result.rejection:
        return Step(name, Outcome.FAIL, f"{who}: association rejected ({result.rejection})",
                    f"the destination at {address} rejected the association: check that called_ae of route "
                    f"'{route}' is its AE title; a destination that only accepts known calling AEs rejects "
                    f"{CALLING_AE} (then add it there, or ignore this step if real callers work)")
    if not result.answered:
        return Step(name, Outcome.FAIL, f"{who}: no answer to the association request, aborted",
                    f"something at {address} accepts TCP but does not answer DICOM within {ECHO_TIMEOUT:g} s: "
                    "is it the DICOM port of the destination?")
    if not result.established:
        return Step(name, Outcome.FAIL, f"{who}: association aborted (Verification not accepted)",
                    f"the destination at {address} accepted the association but not the Verification SOP "
                    "class (C-ECHO), or aborted it: check its configuration and log")
    status = "no response" if result.status is None else f"status 0x{result.status:04X}"
    return Step(name, Outcome.FAIL, f"{who}: C-ECHO failed ({status})",
                f"the destination at {address} did not confirm the C-ECHO: check its log")


# --- helpers: pure --------------------------------------------------------------------------------------


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms"


def _utc(moment: dt.datetime) -> str:
    return moment.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")


def _left(delta: dt.timedelta) -> str:
    days = delta.total_seconds() / 86400
    return f"{days:.0f} days" if days >= 2 else f"{delta.total_seconds() / 3600:.1f} hours"


def _common_name(cert: x509.Certificate) -> str:
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else cert.subject.rfc4514_string()


def _parse_der(der: bytes | None) -> x509.Certificate | None:
    try:
        return x509.load_der_x509_certificate(der) if der else None
    except ValueError:
        return None


def _issued_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _subject_names(cert: x509.Certificate) -> set[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return set()
    names = {name.lower() for name in san.get_values_for_type(x509.DNSName)}
    return names | {str(address) for address in san.get_values_for_type(x509.IPAddress)}


def _reason(exc: BaseException) -> str:
    """A short, secret-free reason for an exception (OS errors by their strerror)."""
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, OSError) and not isinstance(exc, socket.gaierror | ssl.SSLError) and exc.errno:
        text = os.strerror(exc.errno)  # asyncio's own strerror repeats the address
        return f"{exc.filename}: {text}" if exc.filename else text
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}"[:_DETAIL_MAX] if text else type(exc).__name__


# --- running the checks ---------------------------------------------------------------------------------


async def run_diagnosis(settings: AgentSettings, environ: Mapping[str, str]) -> list[Step]:
    """Run every step in order and return their results. ``environ`` is where ``HTTPS_PROXY`` and
    ``NO_PROXY`` are read (as the agent does). Never raises for what it diagnoses."""
    diagnosis = _Diagnosis(settings, environ)
    try:
        await diagnosis.run()
    finally:
        await diagnosis.close()
    return diagnosis.steps


class _Diagnosis:
    """The steps in order (the module doc), each skipped when what it needs did not pass."""

    def __init__(self, settings: AgentSettings, environ: Mapping[str, str]) -> None:
        self.settings = settings
        self.environ = environ
        self.steps: list[Step] = []
        self.timeout = settings.connect_timeout
        self.ssl_ctx: ssl.SSLContext | None = None
        self.cert: x509.Certificate | None = None
        self.proxy: ProxyRoute | None = None
        self.path: _NetworkPath | None = None

    async def run(self) -> None:
        self._add(self._config())
        self._add(self._guarded("cert", ("config",), self._cert))
        path = self.path = _NetworkPath(self.settings, self.proxy, self.ssl_ctx, self.timeout)
        await self._step("DNS", ("config",), path.dns)
        await self._step("TCP", ("DNS",), path.tcp)
        if self.proxy is not None:
            await self._step("proxy", ("TCP",), path.connect)
        await self._step("TLS", ("TCP", "proxy"), path.tls)
        await self.close()
        await _TunnelCheck(self.settings, self.environ, self.ssl_ctx, self.cert, self.timeout).run(self.steps)
        for route in self.settings.routes:
            self._add(await self._echo(route))
        if not self.settings.routes:
            self._add(Step("C-ECHO", Outcome.SKIP, "no [[routes]] in the configuration: no local destination"))

    def _add(self, step: Step) -> None:
        self.steps.append(step)

    def _guarded(self, name: str, requires: Sequence[str], check: Callable[[], Step]) -> Step:
        return skip_for(name, self.steps, requires) or check()

    async def _step(self, name: str, requires: Sequence[str], check: Callable[[], Awaitable[Step]]) -> None:
        skipped = skip_for(name, self.steps, requires)
        self._add(skipped or await check())

    async def close(self) -> None:
        if self.path is not None:
            await self.path.close()

    # --- config and certificate -------------------------------------------------------------------------

    def _config(self) -> Step:
        explicit = "relay_url" in self.settings.model_fields_set and self.settings.relay_url
        origin = " (set in the config)" if explicit else " (from the enrollment)"
        try:
            self.settings = settings = with_enrollment(self.settings)
        except EnrollError as exc:
            return Step("config", Outcome.FAIL, str(exc),
                        "run `tunnel-agent enroll` with the token from `tunnel-relay site add NAME`, or set relay_url")
        assert settings.relay_url is not None
        files = f"certificate {settings.cert_file}, key {settings.key_file}, pinned CA {settings.ca_file}"
        try:
            self.cert = x509.load_pem_x509_certificate(settings.cert_file.read_bytes())
            ca = x509.load_pem_x509_certificate(settings.ca_file.read_bytes())
            self.ssl_ctx = client_context(settings.cert_file, settings.key_file, settings.ca_file)
        except (OSError, ValueError, TlsConfigError) as exc:
            self.ssl_ctx = None
            return Step("config", Outcome.FAIL, f"cannot use {files}: {_reason(exc)}",
                        "enroll this host (`tunnel-agent enroll`), or fix cert_file/key_file/ca_file")
        if not _issued_by(self.cert, ca):
            self.ssl_ctx = None
            return Step("config", Outcome.FAIL,
                        f"certificate {settings.cert_file} is not issued by the pinned CA {settings.ca_file}",
                        _ENROLL_AGAIN)
        try:
            self.proxy = choose_proxy(settings.proxy, settings.relay_url, self.environ)
        except ProxyError as exc:
            return Step("config", Outcome.FAIL, str(exc), "fix HTTPS_PROXY, or set [proxy] url")
        via = f"; through proxy {self.proxy.address} (from {self.proxy.source})" if self.proxy else "; direct"
        detail = f"relay {settings.relay_url}{origin}{via}; {files}"
        if (mismatch := relay_url_mismatch(settings)) is not None:  # a placeholder copied from an example?
            return Step("config", Outcome.WARN, detail, mismatch)
        return Step("config", Outcome.OK, detail)

    def _cert(self) -> Step:
        assert self.cert is not None
        key = self.settings.key_file
        return check_certificate(self.cert, key, stat.S_IMODE(key.stat().st_mode), dt.datetime.now(dt.UTC))

    # --- local destinations -------------------------------------------------------------------------------

    async def _echo(self, route: AgentRoute) -> Step:
        called = route.called_ae or DEFAULT_CALLED_AE
        result = await asyncio.to_thread(partial(c_echo, route.host, route.port, called, CALLING_AE, ECHO_TIMEOUT,
                                                 explain=_tcp_reason))
        return echo_step(route.name, _hostport(route.host, route.port), called, result)




class _NetworkPath:
    """DNS, TCP, the proxy's CONNECT and TLS, on one connection to the relay (or the proxy), as this host
    reaches it. Each check returns its step; ``close()`` ends the connection."""

    def __init__(self, settings: AgentSettings, proxy: ProxyRoute | None, ssl_ctx: ssl.SSLContext | None,
                 timeout: float) -> None:
        self.settings = settings
        self.proxy = proxy
        self.ssl_ctx = ssl_ctx
        self.timeout = timeout
        self.addresses: list[str] = []
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def close(self) -> None:
        writer, self.writer, self.reader = self.writer, None, None
        if writer is not None:
            writer.close()
            try:
                await asyncio.wait_for(writer.wait_closed(), 2)
            except (OSError, TimeoutError, ssl.SSLError):
                pass

    @property
    def _relay_target(self) -> str:
        return target_of(self.settings.relay_url or "")

    def _peer(self) -> tuple[str, str, int]:
        """What this host connects to: ("relay" or "proxy", host, port)."""
        if self.proxy is not None:
            return "proxy", self.proxy.host, self.proxy.port
        return "relay", self.settings.relay_host, urlsplit(self.settings.relay_url or "").port or 443

    async def dns(self) -> Step:
        role, host, port = self._peer()
        began = time.monotonic()
        try:
            async with asyncio.timeout(self.timeout):
                infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (OSError, TimeoutError) as exc:
            hint = (f"this host cannot resolve the proxy's name {host}: check its DNS servers, or give the proxy "
                    "as an IP address" if role == "proxy" else
                    f"this host cannot resolve {host}: check its DNS servers (or ask the network team); if only "
                    "a proxy may reach the internet, set [proxy] url or HTTPS_PROXY")
            return Step("DNS", Outcome.FAIL, f"{role} {host}: {_reason(exc)}", hint)
        self.addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
        note = f"; the proxy resolves {self._relay_target}" if role == "proxy" else ""
        return Step("DNS", Outcome.OK,
                    f"{role} {host} -> {', '.join(self.addresses)} ({_ms(time.monotonic() - began)}{note})")

    async def tcp(self) -> Step:
        role, host, port = self._peer()
        failures: list[str] = []
        timed_out = False
        began = time.monotonic()
        try:
            async with asyncio.timeout(self.timeout):
                for address in self.addresses[:_MAX_ADDRESSES]:
                    try:
                        self.reader, self.writer = await asyncio.open_connection(address, port)
                    except OSError as exc:
                        failures.append(_reason(exc) if address == host else f"{address}: {_reason(exc)}")
                        continue
                    return Step("TCP", Outcome.OK, f"connected to {role} {_hostport(address, port)} "
                                                   f"({_ms(time.monotonic() - began)})")
        except TimeoutError:
            timed_out = True
            failures.append(f"no answer within {self.timeout:g} s")
        where = _hostport(host, port)
        detail = f"cannot connect to {role} {where}: {'; '.join(failures)}"
        if role == "proxy":
            assert self.proxy is not None
            hint = (f"check the proxy address ({self.proxy.source}) and that the proxy is up; ask the network "
                    f"team whether this host may reach {self.proxy.address}")
        elif timed_out:
            hint = (f"a firewall probably drops outbound TCP to {where}: ask the network team to allow it, or set "
                    "[proxy] url if traffic must go through a proxy")
        else:
            hint = (f"nothing accepts connections at {where}: is the relay up and relay_url's port right? A "
                    f"firewall may also reject it: the hospital's firewall must allow outbound TCP to {where}")
        return Step("TCP", Outcome.FAIL, detail, hint)

    async def connect(self) -> Step:
        """CONNECT to the relay over the TCP connection to the proxy (with the proxy's Basic credentials)."""
        proxy, target = self.proxy, self._relay_target
        assert proxy is not None and self.reader is not None and self.writer is not None
        began = time.monotonic()
        try:
            async with asyncio.timeout(self.timeout):
                self.writer.write(proxy.connect_request(target))
                await self.writer.drain()
                head = await self.reader.readuntil(b"\r\n\r\n")
        except (OSError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
            return Step("proxy", Outcome.FAIL, f"proxy {proxy.address} gave no answer to CONNECT {target}: "
                        f"{_reason(exc)}", f"is {proxy.address} an HTTP proxy? ({proxy.source})")
        fields = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ", 2)
        status = int(fields[1]) if len(fields) > 1 and fields[1].isdigit() else 0
        if status == 200:
            return Step("proxy", Outcome.OK, f"proxy {proxy.address} (from {proxy.source}) accepted CONNECT "
                        f"{target} ({_ms(time.monotonic() - began)})")
        phrase = "".join(ch for ch in (fields[2] if len(fields) > 2 else "") if 0x20 <= ord(ch) < 0x7F)[:80]
        hint = _status_hint(proxy, target, status) or f"ask the network team why {proxy.address} refuses it"
        return Step("proxy", Outcome.FAIL, f"proxy {proxy.address} refused CONNECT {target}: {status} {phrase}",
                    hint)

    async def tls(self) -> Step:
        assert self.writer is not None and self.ssl_ctx is not None
        host = self.settings.relay_host
        if self.settings.tls_mode == "inner":
            return await self._outer_tls(host)
        try:
            await self.writer.start_tls(self.ssl_ctx, server_hostname=host, ssl_handshake_timeout=self.timeout)
        except ssl.SSLCertVerificationError as exc:
            return await self._tls_refused(exc)
        except (ssl.SSLError, OSError, TimeoutError) as exc:
            return Step("TLS", Outcome.FAIL, f"TLS handshake with {self._relay_target} failed: {_reason(exc)}",
                        "the server does not complete a TLS 1.2+ handshake with ECDHE and AEAD ciphers: is "
                        "relay_url's host:port the relay? A middlebox that filters TLS in the path?")
        ssl_object = self.writer.get_extra_info("ssl_object")
        cipher = ssl_object.cipher()[0] if ssl_object.cipher() else "?"
        presented = describe_certificate(ssl_object.getpeercert(binary_form=True))
        return Step("TLS", Outcome.OK, f"{ssl_object.version()} {cipher}; relay certificate {presented} "
                                       "(verified against the pinned CA)")

    async def _outer_tls(self, host: str) -> Step:
        """Inner-TLS mode: the outer handshake is checked against ``outer_ca_file`` (the inspection CA or
        the system store); the pinned mutual TLS is tried inside the tunnel by the auth step."""
        assert self.writer is not None
        trusted = str(self.settings.outer_ca_file) if self.settings.outer_ca_file else "the system store"
        try:
            await self.writer.start_tls(outer_context(self.settings), server_hostname=host,
                                        ssl_handshake_timeout=self.timeout)
        except ssl.SSLCertVerificationError as exc:
            try:
                presented = describe_certificate(
                    await peek_certificate(self.settings.relay_url or "", self.proxy, self.timeout))
            except PeekError as peek_error:
                presented = f"unknown ({peek_error})"
            return Step("TLS", Outcome.FAIL, f"outer TLS (inner mode) for {host} does not verify against "
                        f"{trusted} ({exc.verify_message or _reason(exc)}): {presented}",
                        "set outer_ca_file to the CA bundle of the inspecting proxy (ask the network team)")
        except (ssl.SSLError, OSError, TimeoutError) as exc:
            return Step("TLS", Outcome.FAIL, f"outer TLS handshake with {self._relay_target} failed: {_reason(exc)}")
        ssl_object = self.writer.get_extra_info("ssl_object")
        presented = describe_certificate(ssl_object.getpeercert(binary_form=True))
        return Step("TLS", Outcome.OK, f"outer {ssl_object.version()} verified against {trusted}: {presented}; "
                                       "the pinned mutual TLS runs inside the tunnel (auth step)")

    async def _tls_refused(self, exc: ssl.SSLCertVerificationError) -> Step:
        host = self.settings.relay_host
        try:
            der: bytes | None = await peek_certificate(self.settings.relay_url or "", self.proxy, self.timeout)
            presented = describe_certificate(der)
        except PeekError as peek_error:
            der, presented = None, f"unknown ({peek_error})"
        ca_pem = self.settings.ca_file.read_bytes()
        detail = (f"the certificate presented for {host} does not verify against the pinned CA "
                  f"({exc.verify_message or _reason(exc)}): {presented}")
        return Step("TLS", Outcome.FAIL, detail, tls_failure_hint(host, der, ca_pem, dt.datetime.now(dt.UTC)))


class _TunnelCheck:
    """The ``auth`` and ``relay`` steps: the running agent's word if it is connected, else a tunnel of our
    own and one mux PING through it."""

    def __init__(self, settings: AgentSettings, environ: Mapping[str, str], ssl_ctx: ssl.SSLContext | None,
                 cert: x509.Certificate | None, timeout: float) -> None:
        self.settings = settings
        self.environ = environ
        self.ssl_ctx = ssl_ctx
        self.cert = cert
        self.timeout = timeout
        self.steps: list[Step] = []

    def _add(self, step: Step) -> None:
        self.steps.append(step)

    async def run(self, steps: list[Step]) -> None:
        """Add the two steps to ``steps`` (the ones before them say whether to skip)."""
        self.steps = steps
        skipped = skip_for("auth", self.steps, ("cert", "TLS"))
        if skipped is not None:
            self._add(skipped)
            self._add(Step("relay", Outcome.SKIP, skipped.detail))
            return
        status, status_url = await self._agent_status()
        if status is not None and status.get("state") == AgentState.CONNECTED:
            rtt = status.get("rtt_ms")
            self._add(Step("auth", Outcome.OK, f"the running agent ({status_url}) is connected: the relay "
                                               "accepted this site's certificate"))
            self._add(Step("relay", Outcome.OK, f"the running agent is connected, rtt "
                                                f"{'not measured yet' if rtt is None else f'{rtt:.1f} ms'} (no second "
                                                "tunnel opened: it would replace the agent's session)"))
            return
        note = "" if status is None else (f" (the running agent is {status.get('state')}: "
                                          f"{status.get('last_error') or 'no error'})")
        await self._own_tunnel(note)

    async def _agent_status(self) -> tuple[dict | None, str]:
        host = self.settings.status.host
        host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
        url = f"http://{_hostport(host, self.settings.status.port)}/api/status"
        timeout = aiohttp.ClientTimeout(total=STATUS_TIMEOUT)
        try:
            async with aiohttp.ClientSession(timeout=timeout, trust_env=False) as http, http.get(url) as response:
                status = await response.json() if response.status == 200 else None
        except (aiohttp.ClientError, TimeoutError, ValueError):
            return None, url
        return (status if isinstance(status, dict) else None), url

    async def _own_tunnel(self, note: str) -> None:
        assert self.ssl_ctx is not None
        auth: Step | None = None
        relay: Step | None = None
        began = time.monotonic()
        try:
            async with open_tunnel(self.settings, self.ssl_ctx, environ=self.environ) as ws:
                auth = Step("auth", Outcome.OK, f"the relay accepted this site's certificate "
                                                f"({_ms(time.monotonic() - began)}){note}")
                relay = await self._ping(ws)
        except aiohttp.WSServerHandshakeError as exc:
            auth = self._refusal_step(exc) or _refused(exc, self.settings.relay_url or "")
            auth = replace(auth, detail=auth.detail + note)
        except (ProxyError, aiohttp.ClientError, OSError, TimeoutError, LinkError) as exc:
            if auth is None and (refused := self._refusal_step(exc)) is not None:  # inner TLS: the relay's close
                auth = replace(refused, detail=refused.detail + note)
            elif auth is None:  # else closing the tunnel after the checks failed: nothing to report
                auth = Step("auth", Outcome.FAIL, f"the tunnel to {self.settings.relay_url} failed: "
                                                  f"{_reason(exc)}{note}",
                            "the relay ended the connection: it may refuse this certificate in the TLS handshake "
                            "(expired, another CA): check the relay's log, or " + _ENROLL_AGAIN)
        assert auth is not None
        self._add(auth)
        self._add(relay or skip_for("relay", self.steps, ("auth",)) or Step("relay", Outcome.SKIP, ""))

    def _refusal_step(self, exc: BaseException) -> Step | None:
        """The auth step when the relay refused this site and said why (``tunnel_core.refusal``), else None."""
        token = refusal_token(exc, inner=self.settings.tls_mode == "inner")
        site = _common_name(self.cert) if self.cert is not None else "NAME"
        refusal = refusal_from_token(token, site=site)
        if refusal is None:
            return None
        return Step("auth", Outcome.FAIL, f"{refusal.kind.value} by the relay: {refusal.reason} ({refusal.code})",
                    refusal.hint)

    async def _ping(self, ws: aiohttp.ClientWebSocketResponse) -> Step:
        """One mux PING and its PONG; streams the relay opens meanwhile are refused (no agent serves them)."""
        mux = Mux(Role.AGENT)
        opaque = secrets.token_bytes(8)
        mux.ping(opaque)
        began = time.monotonic()
        try:
            async with asyncio.timeout(self.timeout):
                await ws.send_bytes(bytes(mux.data_to_send()))
                while True:
                    msg = await ws.receive()
                    if msg.type is not aiohttp.WSMsgType.BINARY:
                        return Step("relay", Outcome.FAIL, f"the relay closed the tunnel at once ({msg.type.name})",
                                    "check the relay's log for this site")
                    events = mux.receive_data(msg.data)
                    for event in events:
                        if isinstance(event, StreamOpened):
                            mux.reset_stream(event.stream_id, ErrorCode.GOING_AWAY)
                    if any(isinstance(e, PongReceived) and e.opaque == opaque for e in events):
                        break
                    if mux.has_data_to_send():
                        await ws.send_bytes(bytes(mux.data_to_send()))
                rtt = time.monotonic() - began
                mux.go_away(ErrorCode.NO_ERROR)
                await ws.send_bytes(bytes(mux.data_to_send()))
        except (ProtocolError, aiohttp.ClientError, ConnectionError, TimeoutError) as exc:
            return Step("relay", Outcome.FAIL, f"no answer to a tunnel PING: {_reason(exc)}",
                        "the relay accepted the tunnel but does not speak the tunnel protocol through this path: "
                        "a proxy that buffers WebSockets? Check the relay's log")
        return Step("relay", Outcome.OK, f"the relay answered a tunnel PING, rtt {rtt * 1000:.1f} ms")

def _refused(exc: aiohttp.WSServerHandshakeError, relay_url: str) -> Step:
    if exc.status == 403:
        return Step("auth", Outcome.FAIL, "the relay refused this certificate (403)",
                    "the relay refused this certificate (revoked? unknown?): ask the relay operator "
                    "(`tunnel-relay site list`, the audit log), then " + _ENROLL_AGAIN)
    if exc.status == 404:
        return Step("auth", Outcome.FAIL, f"no tunnel endpoint at {relay_url} (404)",
                    "check the path of relay_url (the one `tunnel-relay site add` printed)")
    return Step("auth", Outcome.FAIL, f"the relay answered the tunnel request with {exc.status}",
                "an HTTP proxy or load balancer in front of the relay may not pass WebSockets: check the relay's log")


def _tcp_reason(error: OSError | None, host: str, timeout: float) -> str:
    """Why a TCP connection to a destination fails, in this command's words (``tunnel_agent.echo`` asks)."""
    return "the connection failed once, then worked" if error is None else _reason(error)
