"""The agent's tunnel to the relay: one outbound mutual-TLS WebSocket, kept up.

- The loop never gives up on a transient failure: each attempt re-resolves DNS and rebuilds the TLS context
  (so renewed certificates are used), and failures wait a full-jitter exponential backoff. A dead relay is
  noticed within three heartbeat intervals of silence.
- A refusal by the relay is not transient (``tunnel_core.refusal``): revoked (a 403 saying so, or GOAWAY
  REVOKED ending the live tunnel), the state becomes ``AgentState.REVOKED``, ``last_error`` says so and what
  to do, and the next attempt waits ``revoked_retry`` (other refusals: ``REFUSED``, ``refused_retry``), or
  until a new certificate is in place (a re-enrollment), whichever comes first.
- With ``transport = "wireguard"`` the WebSocket goes through the WireGuard interface, with the ordinary
  transport as its fallback (``tunnel_agent.wgtransport``).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp

from tunnel_agent.config import AgentSettings
from tunnel_agent.connect import explain_untrusted_relay, open_tunnel, refusal_token
from tunnel_agent.wgtransport import WireGuardTransport
from tunnel_core.backoff import Backoff
from tunnel_core.codes import ErrorCode
from tunnel_core.health import AgentState
from tunnel_core.mux import Mux, Role
from tunnel_core.refusal import Refusal, RefusalKind, refusal_from_goaway, refusal_from_token, retry_delay
from tunnel_link.session import MuxSession, TunnelStream
from tunnel_link.tls import client_context

__all__ = ["CERTIFICATE_WATCH", "Tunnel"]

log = logging.getLogger("agent")

CERTIFICATE_WATCH = 2.0  # seconds between looks at cert_file while refused: a re-enrollment is tried at once
_REFUSED_STATE = {RefusalKind.REVOKED: AgentState.REVOKED, RefusalKind.REFUSED: AgentState.REFUSED}


class Tunnel:
    """Build with the settings, the handler of streams the relay opens, where the site's name comes from (for
    a refusal's hint) and the WireGuard transport if any; ``await run()`` until ``stopping`` is set.

    ``state``, ``session`` (the live one, or None), ``connects``, ``last_error`` and ``next_attempt`` are
    for the status; ``next_attempt`` means something only while ``state.waiting``."""

    def __init__(self, settings: AgentSettings, *, on_stream: Callable[[TunnelStream], Awaitable[None]],
                 site_name: Callable[[], str], stopping: asyncio.Event,
                 wireguard: WireGuardTransport | None = None, rand: Callable[[], float] = random.random) -> None:
        self.settings = settings
        self.limits = settings.mux.to_limits()
        self.backoff = Backoff(settings.backoff_initial, settings.backoff_max, rand)
        self.session: MuxSession | None = None
        self.state = AgentState.STARTING
        self.connects = 0
        self.last_error = ""
        self.next_attempt: float | None = None
        self._on_stream = on_stream
        self._site_name = site_name
        self._stopping = stopping
        self._wireguard = wireguard

    async def run(self) -> None:
        """Connect, serve and reconnect until ``stopping``: after a failure the backoff, after a refusal by
        the relay (see the module doc) ``revoked_retry`` / ``refused_retry``."""
        while not self._stopping.is_set():
            self.state = AgentState.CONNECTING
            refusal: Refusal | None = None
            try:
                refusal = await self._connect_once()
            except asyncio.CancelledError:
                raise
            except aiohttp.ClientConnectorCertificateError as exc:
                # Fail closed, and say who is in the way: usually a TLS-inspecting proxy.
                self.last_error = await explain_untrusted_relay(self.settings, exc)
                log.error("tunnel to relay refused: %s", self.last_error)
            except Exception as exc:  # the supervisor must survive anything transient; say what it was
                token = refusal_token(exc, inner=self.settings.tls_mode == "inner")
                refusal = refusal_from_token(token, site=self._site_name())
                if refusal is None:
                    self.last_error = _describe(exc)
                    log.warning("tunnel to relay failed: %s", self.last_error)
            if refusal is None:
                delay = self.backoff.next_delay()
                self.state = AgentState.BACKOFF
                log.info("reconnecting in %.2fs (attempt %d)", delay, self.backoff.attempt)
            else:
                delay = retry_delay(refusal, revoked_retry=self.settings.revoked_retry,
                                    refused_retry=self.settings.refused_retry)
                self.state, self.last_error = _REFUSED_STATE[refusal.kind], refusal.describe()
                log.error("%s; next attempt in %.0fs, or as soon as a new certificate is in place",
                          self.last_error, delay)
            self.next_attempt = time.time() + delay
            await self._wait(delay, watch_certificate=refusal is not None)

    async def close(self, reason: str) -> None:
        """End the live tunnel, if any, with GOAWAY ``GOING_AWAY`` (bounded by the session's close timeout)."""
        if self.session is not None:
            await self.session.close(ErrorCode.GOING_AWAY, reason)

    async def _wait(self, delay: float, *, watch_certificate: bool) -> None:
        """Wait ``delay`` seconds, or until ``stopping``; with ``watch_certificate`` also until ``cert_file``
        is replaced (``tunnel-agent enroll --force`` after the site was reinstated)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + delay
        stamp = _file_stamp(self.settings.cert_file)
        while (left := deadline - loop.time()) > 0:
            try:
                await asyncio.wait_for(self._stopping.wait(),
                                       timeout=min(left, CERTIFICATE_WATCH) if watch_certificate else left)
                return
            except TimeoutError:
                pass
            if watch_certificate and _file_stamp(self.settings.cert_file) != stamp:
                log.info("a new certificate is in place (%s): connecting now", self.settings.cert_file)
                return

    async def _connect_once(self) -> Refusal | None:
        """One tunnel, served until it ends. Returns the refusal its end carried (GOAWAY REVOKED), if any."""
        s = self.settings
        ssl_ctx = client_context(s.cert_file, s.key_file, s.ca_file)
        # Direct or through the configured HTTP proxy; a proxy's failure is a one-line ProxyError. With
        # transport = "wireguard", through the WireGuard interface, with that as its fallback.
        wireguard = self._wireguard
        opening = wireguard.open(lambda: open_tunnel(s, ssl_ctx)) if wireguard else open_tunnel(s, ssl_ctx)
        async with opening as ws:
            session = MuxSession(ws, Mux(Role.AGENT, self.limits), heartbeat_interval=s.heartbeat_interval,
                                 on_stream=self._on_stream, label="relay")
            self.session, self.state, self.last_error = session, AgentState.CONNECTED, ""
            self.connects += 1
            self.backoff.reset()
            log.info("tunnel to relay connected (%s)", s.relay_url)
            try:
                await session.run()
            finally:
                self.session = None
                self.state = AgentState.DISCONNECTED
                self.last_error = session.close_reason or "closed"
                log.info("tunnel to relay closed: %s", self.last_error)
        return refusal_from_goaway(session.goaway_code, site=self._site_name())


def _file_stamp(path: Path) -> tuple[int, int, int] | None:
    """What changes when a file is replaced (enrollment renames a new one into place)."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


def _describe(exc: BaseException) -> str:
    """A one-line, secret-free reason for ops."""
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}"[:300]
