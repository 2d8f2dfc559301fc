"""The agent's WireGuard transport: the same mux WebSocket, carried through a WireGuard interface.

Theory of operation
- Registration (``tunnel_agent.wgregistration``): the agent sends its WireGuard public key to the relay's
  TLS port and gets its tunnel address, the relay's key and endpoint, and the tunnel URL; the answer is
  cached in ``state_dir/wireguard.json``, and registered again when the key changes, when the relay
  answers the tunnel's WebSocket with 403, and before every new try after the WireGuard path failed (the
  relay may have lost the peer; registering is idempotent).
- Interface (``tunnel_agent.wginterface``): up on first use with the assigned address and one peer, the
  relay. Only the agent sends the first packet, so the hospital firewall needs one outbound UDP rule and
  never accepts an inbound connection. (Inside the tunnel, packets arrive on the interface, past that
  firewall: the interface does not yet refuse new inbound connections itself.) :meth:`WireGuardTransport.close`
  removes it when the agent exits.
- Connection. ``ws://<relay address>:<port>/tunnel`` through the interface, the socket bound to our
  tunnel address. WireGuard authenticates and encrypts it; the relay knows the site by that source
  address, which cryptokey routing pins to our key. The mux on top is the one the WebSocket transport
  runs, so routing, allow-lists and rejects are the same.
- Fallback (:class:`TransportPlan`, pure, time as a parameter). When registration is refused, the
  interface cannot come up, or no WebSocket is up over WireGuard within ``fallback_after`` seconds (UDP
  blocked, say), the attempt connects over the ordinary ``wss://`` transport instead and the status
  says why. Every ``retry_interval`` a probe re-checks WireGuard (a TCP connect to the relay's tunnel
  port through the interface); when it answers and the fallback session carries no association, that
  session is closed and the agent's connection loop comes back over WireGuard.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp

from tunnel_agent.connect import UpgradeHeaders, upgrade_trace
from tunnel_agent.status import TransportStatus, WireGuardStatus
from tunnel_agent.wginterface import AgentInterface
from tunnel_agent.wgregistration import (
    REGISTRATION_FILE,
    Registration,
    WireGuardPathError,
    ensure_key,
    load_registration,
    register,
    save_registration,
)
from tunnel_core.codes import ErrorCode
from tunnel_core.discovery import AGENT_HEADER
from tunnel_link.aio import cancel_and_wait
from tunnel_link.session import MAX_MESSAGE_IN
from tunnel_link.sockets import tune_socket
from tunnel_link.transport import SUBPROTOCOLS
from tunnel_wireguard.dump import WgPeer
from tunnel_wireguard.errors import WireGuardError
from tunnel_wireguard.plan import TransportPlan

if TYPE_CHECKING:
    from tunnel_agent.config import AgentSettings
    from tunnel_link.session import MuxSession

__all__ = ["TRANSPORT_FALLBACK", "TRANSPORT_WIREGUARD", "WireGuardTransport"]

log = logging.getLogger("agent")

PROBE_TIMEOUT = 5.0  # seconds for the probe's TCP connect through the interface
DUMP_INTERVAL = 5.0  # seconds between `wg show dump` refreshes for the status
IDLE_POLL = 1.0  # seconds between looks at the fallback session's streams once WireGuard answers
TRANSPORT_WIREGUARD = "wireguard"
TRANSPORT_FALLBACK = "websocket (fallback)"

WebSocket = aiohttp.ClientWebSocketResponse
Opener = Callable[[], AbstractAsyncContextManager[WebSocket]]


# --- the transport ------------------------------------------------------------------------------------


class WireGuardTransport:
    """The agent's ``transport = "wireguard"``.

    Call :meth:`open` once per connection attempt: an async context manager yielding the tunnel's
    WebSocket, over WireGuard or (see the module doc) over the ``fallback`` opener. ``session`` returns
    the agent's live MuxSession (or None); the fallback watcher closes it to move back to WireGuard.
    Call :meth:`close` once when the agent exits: it removes the interface. :meth:`status` is cheap.
    """

    def __init__(self, settings: AgentSettings, *, session: Callable[[], MuxSession | None],
                 environ: Mapping[str, str] | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self.config = settings.wireguard
        self.plan = TransportPlan(self.config.retry_interval)
        self.link = AgentInterface(self.config)
        self.iface = self.link.iface
        self.current: str | None = None  # the transport of the live (or last) connection
        self.registration: Registration | None = None
        self.last_error = ""
        self._session = session
        self._environ = os.environ if environ is None else environ
        self._clock = clock
        self._stale = False  # register again before the next use
        self._peer: WgPeer | None = None
        self._peer_at: float | None = None
        self._on_upgrade: UpgradeHeaders | None = None

    # --- the agent's entry points -------------------------------------------------------------------

    @asynccontextmanager
    async def open(self, fallback: Opener, *, on_upgrade: UpgradeHeaders | None = None) -> AsyncIterator[WebSocket]:
        """Yield the tunnel's WebSocket for one connection; see the class doc. ``on_upgrade`` gets the relay's
        upgrade response headers of a connection over WireGuard (the fallback opener reports its own)."""
        self._on_upgrade = on_upgrade  # one connection at a time: read by _ws_connect
        if self.plan.use_wireguard(self._clock()):
            async with AsyncExitStack() as stack:
                ws = await self._try_wireguard(stack)
                if ws is not None:
                    self.plan.wireguard_up()
                    self.current = TRANSPORT_WIREGUARD
                    async with _watching(self._refresh_forever()):
                        yield ws
                    return
        async with fallback() as ws:
            self.current = TRANSPORT_FALLBACK
            log.info("tunnel over the WebSocket fallback (WireGuard: %s)", self.plan.reason)
            async with _watching(self._refresh_forever(), self._retry_wireguard()):
                yield ws

    async def close(self) -> None:
        """Remove the interface (idempotent); for the agent's AsyncExitStack."""
        await self.link.down()

    def status(self) -> TransportStatus:
        """Which transport carries the tunnel, why, and the interface's health from the latest dump."""
        reg, peer, now = self.registration, self._peer, time.time()
        retry_in = None if self.plan.retry_at is None else max(0.0, self.plan.retry_at - self._clock())
        return TransportStatus(self.current, self.plan.reason, WireGuardStatus(
            interface=self.config.interface,
            up=self.iface.name is not None,
            implementation=self.iface.implementation,
            address=reg.address_cidr if reg else None,
            relay_address=reg.relay_address if reg else None,
            endpoint=str(peer.endpoint) if peer and peer.endpoint else (reg.endpoint if reg else None),
            latest_handshake_age_s=_rounded(peer.handshake_age(now)) if peer else None,
            rx_bytes=peer.transfer_rx if peer else None,
            tx_bytes=peer.transfer_tx if peer else None,
            checked_at=self._peer_at,
            retry_in_s=_rounded(retry_in),
            last_error=self.last_error,
        ))

    async def probe(self) -> None:
        """Raise WireGuardPathError unless the relay's tunnel port answers a TCP connect through WireGuard."""
        deadline = asyncio.get_running_loop().time() + self.config.fallback_after
        reg = await self._registered(deadline)
        await self.link.apply(reg)
        try:
            async with asyncio.timeout(PROBE_TIMEOUT):
                _, writer = await asyncio.open_connection(reg.relay_address, reg.tunnel_port,
                                                          local_addr=(reg.address, 0))
        except (OSError, TimeoutError) as exc:
            self._path_failed()
            raise WireGuardPathError(
                f"no answer through WireGuard ({self.config.interface}) from {reg.relay_address}:{reg.tunnel_port} "
                f"within {PROBE_TIMEOUT:g} s ({_describe(exc)}; is outbound UDP to {reg.endpoint} blocked?)") from None
        writer.close()
        try:
            async with asyncio.timeout(PROBE_TIMEOUT):
                await writer.wait_closed()
        except (OSError, TimeoutError):
            pass

    # --- connecting ---------------------------------------------------------------------------------

    async def _try_wireguard(self, stack: AsyncExitStack) -> WebSocket | None:
        """The WebSocket over WireGuard, or None after recording why not in the plan."""
        deadline = asyncio.get_running_loop().time() + self.config.fallback_after
        try:
            return await self._connect(stack, deadline)
        except Exception as exc:  # whatever broke the WireGuard path, the fallback must still be tried
            reason = _failure_reason(exc, self.registration, self.config.fallback_after)
        self._path_failed()
        self.last_error = reason
        self.plan.wireguard_failed(self._clock(), reason)
        log.warning("WireGuard transport unavailable, using the WebSocket fallback (retry in %.0f s): %s",
                    self.config.retry_interval, reason)
        return None

    async def _connect(self, stack: AsyncExitStack, deadline: float) -> WebSocket:
        reg = await self._registered(deadline)
        await self.link.apply(reg)
        try:
            return await self._ws_connect(stack, reg, deadline)
        except aiohttp.WSServerHandshakeError as exc:
            if exc.status != 403:
                raise
            log.warning("the relay refused the tunnel from our WireGuard address (403); registering again")
        self._path_failed()
        reg = await self._registered(deadline)
        await self.link.apply(reg)
        return await self._ws_connect(stack, reg, deadline)

    async def _ws_connect(self, stack: AsyncExitStack, reg: Registration, deadline: float) -> WebSocket:
        return await _websocket_through(stack, reg, deadline, self.settings.agent_name, self._on_upgrade)

    # --- registration -------------------------------------------------------------------------------

    async def _registered(self, deadline: float) -> Registration:
        """The registration for our current key: from memory or the cache, else from the relay."""
        public_key = await asyncio.to_thread(ensure_key, self.config.key_file)
        reg = self.registration
        if reg is None and not self._stale:
            reg = load_registration(self._cache_path, relay_url=self.settings.relay_url, public_key=public_key)
        if reg is None or self._stale or self.link.key_changed(public_key):
            reg = await self._register(public_key, deadline)
            await asyncio.to_thread(save_registration, self._cache_path, reg,
                                    relay_url=self.settings.relay_url, public_key=public_key)
            self._stale = False
            log.info("registered with the relay's WireGuard: tunnel address %s, relay %s at %s",
                     reg.address_cidr, reg.relay_address, reg.endpoint)
        self.registration = reg
        return reg

    def _path_failed(self) -> None:
        """Before WireGuard is used again: register again (the relay may have lost our peer; registering is
        idempotent) and start a fresh handshake (WireGuard itself would wait up to 15 s more)."""
        self._stale = self.link.reset_peer = True

    @property
    def _cache_path(self) -> Path:
        return self.settings.state_dir / REGISTRATION_FILE

    async def _register(self, public_key: str, deadline: float) -> Registration:
        return await register(self.settings, public_key, deadline, self._environ)

    # --- watchers, one set per connection -----------------------------------------------------------

    async def _refresh_forever(self) -> None:
        """Keep the status's WireGuard health fresh while a connection lasts."""
        while True:
            await self._refresh()
            await asyncio.sleep(DUMP_INTERVAL)

    async def _refresh(self) -> None:
        reg = self.registration
        if reg is None or self.iface.name is None:
            return
        try:
            dump = await self.link.dump()
        except WireGuardError as exc:
            self.last_error = str(exc)
            return
        self._peer, self._peer_at = dump.peer(reg.relay_public_key), time.time()

    async def _retry_wireguard(self) -> None:
        """On the fallback: probe WireGuard every retry_interval; once it answers, end the fallback session
        as soon as it carries no association, so the connection loop comes back over WireGuard."""
        while True:
            retry_at = self.plan.retry_at if self.plan.retry_at is not None else self._clock()
            await asyncio.sleep(max(0.0, retry_at - self._clock()))
            try:
                await self.probe()
            except Exception as exc:  # the watcher must outlive any failure of the path it watches
                reason = str(exc) if isinstance(exc, WireGuardPathError | WireGuardError) else _describe(exc)
                self.last_error = reason
                self.plan.wireguard_failed(self._clock(), reason)
                log.info("WireGuard still unavailable (next try in %.0f s): %s", self.config.retry_interval, reason)
                continue
            self.plan.probe_answered(self._clock())
            log.info("WireGuard answers again; moving the tunnel onto it once no association is in flight")
            if await _close_when_idle(self._session, self.config.retry_interval):
                return
            # Busy for a whole retry_interval: probe again (WireGuard may have gone meanwhile), then wait again.

async def _websocket_through(stack: AsyncExitStack, reg: Registration, deadline: float, agent_name: str,
                             on_upgrade: UpgradeHeaders | None) -> WebSocket:
    """The tunnel's WebSocket through the WireGuard interface, its HTTP session closed with ``stack``."""
    # Bound to our tunnel address: the relay knows the site by it. No proxy: this is inside WireGuard.
    connector = aiohttp.TCPConnector(local_addr=(reg.address, 0), use_dns_cache=False, force_close=True, limit=1)
    heard: list[Mapping[str, str]] = []
    http = await stack.enter_async_context(
        aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None), trust_env=False,
                              trace_configs=[upgrade_trace(heard.append)]))
    async with asyncio.timeout_at(deadline):
        ws = await http.ws_connect(reg.tunnel_url, compress=0, max_msg_size=MAX_MESSAGE_IN, autoping=True,
                                   autoclose=True, protocols=SUBPROTOCOLS, headers={AGENT_HEADER: agent_name})
    tune_socket(ws.get_extra_info("socket"))
    if on_upgrade is not None and heard:
        on_upgrade(heard[-1])
    return ws


@asynccontextmanager
async def _watching(*coroutines: Any) -> AsyncIterator[None]:
    """Run ``coroutines`` as tasks for the duration of the block; cancel and await them at its end."""
    tasks = [asyncio.create_task(coro) for coro in coroutines]
    try:
        yield
    finally:
        for task in tasks:
            await cancel_and_wait(task)


async def _close_when_idle(session: Callable[[], MuxSession | None], within: float) -> bool:
    """Close the live session as soon as it carries no association (True), or give up after ``within`` s."""
    for _ in range(int(within / IDLE_POLL) + 1):
        live = session()
        if live is None:
            return True
        if live.active_streams == 0:
            await live.close(ErrorCode.GOING_AWAY, "moving the tunnel to WireGuard")
            return True
        await asyncio.sleep(IDLE_POLL)
    return False


def _failure_reason(exc: BaseException, registration: Registration | None, fallback_after: float) -> str:
    if isinstance(exc, TimeoutError):
        endpoint = registration.endpoint if registration else "the relay"
        return (f"no tunnel over WireGuard within {fallback_after:g} s "
                f"(is outbound UDP to {endpoint} blocked?)")
    if isinstance(exc, WireGuardPathError | WireGuardError):
        return str(exc)
    return f"tunnel over WireGuard failed: {_describe(exc)}"


def _describe(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}"[:300] if text else type(exc).__name__


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 1)
