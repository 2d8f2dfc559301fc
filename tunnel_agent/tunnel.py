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
- One ``Tunnel`` is one relay connection kept up: the primary, to ``relay_url``, or (``url``) one of the
  fleet's other relays (``tunnel_agent.fleet``). ``on_upgrade`` hears each upgrade's response headers,
  ``on_goaway`` each GOAWAY the relay sends, before the tunnel connects again. A connection told GOAWAY
  finishes its streams until the relay closes it (at most ``DRAIN_MAX``): dialing the same relay again
  meanwhile would replace it there (a relay keeps one tunnel per agent name), so the fleet supervisor
  opens the replacement elsewhere. ``failures`` counts the attempts in a row that did not connect (a
  refusal is not counted: it is the registry's answer, the same on every relay), ``down_since`` is when
  that streak began (the connection's end, or the first attempt), and ``on_failed`` hears each one: the
  fleet supervisor gives up an extra tunnel whose relay is gone without a word.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable, Mapping
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
from tunnel_link.aio import cancel_and_wait
from tunnel_link.session import MuxSession, TunnelStream
from tunnel_link.tls import client_context

__all__ = ["CERTIFICATE_WATCH", "DRAIN_MAX", "PRIMARY", "Tunnel"]

log = logging.getLogger("agent")

CERTIFICATE_WATCH = 2.0  # seconds between looks at cert_file while refused: a re-enrollment is tried at once
_REFUSED_STATE = {RefusalKind.REVOKED: AgentState.REVOKED, RefusalKind.REFUSED: AgentState.REFUSED}
PRIMARY = "relay_url"  # the name of the tunnel to relay_url
GOAWAY_POLL = 0.1  # seconds between looks at a live session for a GOAWAY from the relay
DRAIN_MAX = 3660.0  # seconds a connection that was told GOAWAY may go on (the relay's drain_deadline is 3600 at most)
UpgradeHook = Callable[["Tunnel", Mapping[str, str]], None]
GoAwayHook = Callable[["Tunnel", MuxSession], None]
FailedHook = Callable[["Tunnel"], None]


class Tunnel:
    """Build with the settings, the handler of streams the relay opens, where the site's name comes from (for
    a refusal's hint) and the WireGuard transport if any; ``await run()`` until ``stopping`` is set.

    ``state``, ``session`` (the live one, or None), ``connects``, ``last_error`` and ``next_attempt`` are
    for the status; ``next_attempt`` means something only while ``state.waiting``. ``relay`` is the fleet
    name of the relay the latest connection reached (the first ``Tunnel-Fleet`` entry), when known, and
    ``relay_since`` that entry's ``since`` (the relay's run; "" when unknown).

    ``url`` (default: ``relay_url``) is where to connect, ``server_hostname`` the name the relay's
    certificate must carry (default: ``url``'s host), ``name`` the tunnel's name in logs and status.
    ``failures`` and ``down_since`` (on ``clock``; None while connected or after a refusal) are the streak
    of attempts that did not connect (see the module doc)."""

    def __init__(self, settings: AgentSettings, *, on_stream: Callable[[TunnelStream], Awaitable[None]],
                 site_name: Callable[[], str], stopping: asyncio.Event,
                 wireguard: WireGuardTransport | None = None, rand: Callable[[], float] = random.random,
                 url: str | None = None, server_hostname: str | None = None, name: str = PRIMARY,
                 on_upgrade: UpgradeHook | None = None, on_goaway: GoAwayHook | None = None,
                 on_failed: FailedHook | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self.url = url
        self.server_hostname = server_hostname
        self.name = name
        self.relay: str | None = None
        self.relay_since = ""
        self._on_upgrade = on_upgrade
        self._on_goaway = on_goaway
        self._on_failed = on_failed
        self._clock = clock
        self.failures = 0
        self.down_since: float | None = None
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

    @property
    def target(self) -> str:
        """The URL this tunnel dials."""
        return self.url or self.settings.relay_url or ""

    async def run(self) -> None:
        """Connect, serve and reconnect until ``stopping``: after a failure the backoff, after a refusal by
        the relay (see the module doc) ``revoked_retry`` / ``refused_retry``."""
        while not self._stopping.is_set():
            self.state = AgentState.CONNECTING
            if self.down_since is None:
                self.down_since = self._clock()
            connects = self.connects
            refusal: Refusal | None = None
            try:
                refusal = await self._connect_once()
            except asyncio.CancelledError:
                raise
            except aiohttp.ClientConnectorCertificateError as exc:
                # Fail closed, and say who is in the way: usually a TLS-inspecting proxy.
                self.last_error = await explain_untrusted_relay(self.settings, exc)
                log.error("tunnel %s to relay refused: %s", self.name, self.last_error)
            except Exception as exc:  # the supervisor must survive anything transient; say what it was
                token = refusal_token(exc, inner=self.settings.tls_mode == "inner")
                refusal = refusal_from_token(token, site=self._site_name())
                if refusal is None:
                    self.last_error = _describe(exc)
                    log.warning("tunnel %s to relay failed: %s", self.name, self.last_error)
            if self._stopping.is_set():
                return
            self._count(refusal, connected=self.connects > connects)
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

    def _count(self, refusal: Refusal | None, *, connected: bool) -> None:
        """Keep ``failures`` and ``down_since`` after an attempt; tell ``on_failed`` of one more failure."""
        if refusal is not None:
            self.failures, self.down_since = 0, None
        elif not connected:
            self.failures += 1
            if self._on_failed is not None:
                self._on_failed(self)

    def stop(self) -> None:
        """Connect no more once the live connection ends (it is not closed: see :meth:`close`)."""
        self._stopping.set()

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
        heard: list[Mapping[str, str]] = []

        def opener():
            return open_tunnel(s, ssl_ctx, url=self.url, server_hostname=self.server_hostname,
                               on_upgrade=heard.append)

        wireguard = self._wireguard
        async with wireguard.open(opener, on_upgrade=heard.append) if wireguard else opener() as ws:
            if heard and self._on_upgrade is not None:
                self._on_upgrade(self, heard[-1])
            session = MuxSession(ws, Mux(Role.AGENT, self.limits), heartbeat_interval=s.heartbeat_interval,
                                 on_stream=self._on_stream, label="relay" if self.name == PRIMARY else self.name)
            self.session, self.state, self.last_error = session, AgentState.CONNECTED, ""
            self.connects += 1
            self.failures, self.down_since = 0, None
            self.backoff.reset()
            log.info("tunnel %s to relay connected (%s)", self.name, self.target)
            served = asyncio.create_task(session.run())
            try:
                await self._serve(session, served)
            finally:
                await cancel_and_wait(served)  # at once when it ended; on cancellation, the session's end
                self.session = None
                self.down_since = self._clock()
                self.state = AgentState.DISCONNECTED
                self.last_error = session.close_reason or "closed"
                log.info("tunnel %s to relay closed: %s", self.name, self.last_error)
        return refusal_from_goaway(session.goaway_code, site=self._site_name())

    async def _serve(self, session: MuxSession, served: asyncio.Task[None]) -> None:
        """Wait for ``served`` (the session's run) to end, reporting a GOAWAY from the relay to ``on_goaway``
        as soon as it is seen (and before this returns); a connection that was told to go away is closed
        ``DRAIN_MAX`` after, if the relay has not closed it by then."""
        told_at: float | None = None
        while not served.done():
            await asyncio.wait({served}, timeout=GOAWAY_POLL)
            if session.goaway_code is None:
                continue
            if told_at is None:
                told_at = time.monotonic()
                if self._on_goaway is not None:
                    self._on_goaway(self, session)
            elif time.monotonic() - told_at > DRAIN_MAX and not served.done():
                await session.close(ErrorCode.GOING_AWAY, "the relay did not end its drain")
        await served


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
