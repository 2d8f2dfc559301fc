"""The agent's WireGuard transport: the same mux WebSocket, carried through a WireGuard interface.

Theory of operation
- Registration. The agent sends its WireGuard public key to ``POST /enroll/v1/wireguard`` on the relay's
  TLS port (``relay_url``'s host and port, mutual TLS with the site certificate, through ``[proxy]`` like
  enrollment). The relay answers with this site's tunnel address, its own public key and UDP endpoint,
  and the tunnel URL. :func:`parse_registration` checks the answer (pure); it is cached in
  ``state_dir/wireguard.json`` together with the relay URL and public key it belongs to, and registered
  again when the key changes, when the relay answers the tunnel's WebSocket with 403, and before every
  new try after the WireGuard path failed (the relay may have lost the peer; registering is idempotent).
- Interface. Brought up on first use with the assigned address (a stale interface of the same name that
  a crash left behind is removed first), with one peer: the relay, allowed-ips ``relay_address/32``,
  persistent keepalive. Only the agent sends the first packet, so the hospital firewall needs one
  outbound UDP rule and never accepts an inbound connection. (Inside the tunnel, packets arrive on the
  interface, past that firewall: the interface does not yet refuse new inbound connections itself.) The
  interface stays up across reconnects, is made again when the registration changes, and is removed by
  :meth:`WireGuardTransport.close` when the agent exits.
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

Every ``wg``/``ip`` command runs in a worker thread (``tunnel_wireguard.interface`` blocks), one at a time.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp

from tunnel_agent.connect import proxy_failure, target_of
from tunnel_agent.proxy import choose_proxy
from tunnel_agent.status import TransportStatus, WireGuardStatus
from tunnel_core.codes import ErrorCode
from tunnel_link.aio import cancel_and_wait
from tunnel_link.session import MAX_MESSAGE_IN
from tunnel_link.sockets import tune_socket
from tunnel_link.tls import TlsConfigError, client_context
from tunnel_wireguard.dump import WgPeer
from tunnel_wireguard.errors import InvalidKeyError, WireGuardError
from tunnel_wireguard.interface import WireGuardInterface
from tunnel_wireguard.keys import generate_private_key, public_key_of, validate_key
from tunnel_wireguard.plan import TransportPlan

if TYPE_CHECKING:
    from tunnel_agent.config import AgentSettings
    from tunnel_link.session import MuxSession

__all__ = [
    "REGISTER_PATH",
    "REGISTRATION_FILE",
    "Registration",
    "WireGuardPathError",
    "WireGuardTransport",
    "load_registration",
    "parse_registration",
    "save_registration",
]

log = logging.getLogger("agent")

REGISTER_PATH = "/enroll/v1/wireguard"
REGISTRATION_FILE = "wireguard.json"
DEFAULT_KEEPALIVE = 25  # seconds; also what an answer without one, or with "off", gets
MAX_ANSWER = 64 * 1024  # bytes of the relay's registration answer we are willing to read
PROBE_TIMEOUT = 5.0  # seconds for the probe's TCP connect through the interface
DUMP_INTERVAL = 5.0  # seconds between `wg show dump` refreshes for the status
IDLE_POLL = 1.0  # seconds between looks at the fallback session's streams once WireGuard answers
TRANSPORT_WIREGUARD = "wireguard"
TRANSPORT_FALLBACK = "websocket (fallback)"

WebSocket = aiohttp.ClientWebSocketResponse
Opener = Callable[[], AbstractAsyncContextManager[WebSocket]]


class WireGuardPathError(Exception):
    """The WireGuard path cannot be used now. One line for ops, without secrets.

    ``status`` is the relay's HTTP status when the relay refused (404: no WireGuard there, 403: the
    certificate was not accepted), else None.
    """

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


# --- the relay's answer (pure) ------------------------------------------------------------------------


@dataclass(frozen=True)
class Registration:
    """What the relay assigned this site: see ``POST /enroll/v1/wireguard`` in docs/protocol.md."""

    site: str
    address_cidr: str  # our tunnel address, e.g. 10.99.0.2/24
    relay_public_key: str
    relay_address: str  # e.g. 10.99.0.1; the only address reachable through the interface
    endpoint: str  # host:port of the relay's UDP socket
    tunnel_url: str  # ws://<relay_address>:<port>/tunnel
    persistent_keepalive: int

    @property
    def address(self) -> str:
        """Our tunnel address without the prefix length."""
        return str(ipaddress.ip_interface(self.address_cidr).ip)

    @property
    def tunnel_port(self) -> int:
        return urlsplit(self.tunnel_url).port or 80


def parse_registration(answer: object) -> Registration:
    """Check the relay's JSON answer field by field; raise WireGuardPathError naming the bad field."""
    if not isinstance(answer, dict):
        raise WireGuardPathError("the relay's WireGuard registration answer is not a JSON object")

    def text(name: str) -> str:
        value = answer.get(name)
        if not isinstance(value, str) or not value or len(value) > 512:
            raise WireGuardPathError(f"the relay's WireGuard registration answer lacks a valid {name!r}")
        return value

    def check(name: str, ok: Callable[[str], object]) -> str:
        value = text(name)
        try:
            ok(value)
        except ValueError:
            raise WireGuardPathError(f"the relay's WireGuard registration answer has a malformed {name!r}") from None
        return value

    address = check("address_cidr", _interface_with_prefix)
    relay_address = check("relay_address", ipaddress.ip_address)
    network = ipaddress.ip_interface(address).network
    if ipaddress.ip_address(relay_address) not in network or ipaddress.ip_interface(address).ip == ipaddress.ip_address(
        relay_address
    ):
        raise WireGuardPathError("the relay's WireGuard registration answer puts the relay outside our tunnel network")
    tunnel_url = check("tunnel_url", lambda url: _check_tunnel_url(url, relay_address))
    keepalive = answer.get("persistent_keepalive", DEFAULT_KEEPALIVE)
    if isinstance(keepalive, bool) or not isinstance(keepalive, int) or not 0 <= keepalive <= 65535:
        raise WireGuardPathError("the relay's WireGuard registration answer has a malformed 'persistent_keepalive'")
    return Registration(
        site=text("site"),
        address_cidr=str(ipaddress.ip_interface(address)),
        relay_public_key=check("relay_public_key", validate_key),
        relay_address=str(ipaddress.ip_address(relay_address)),
        endpoint=check("endpoint", _check_endpoint),
        tunnel_url=tunnel_url,
        # Never off: behind the hospital's stateful firewall, only our own packets keep the path open.
        persistent_keepalive=keepalive or DEFAULT_KEEPALIVE,
    )


def _interface_with_prefix(value: str) -> None:
    if "/" not in value:
        raise ValueError("no prefix length")
    ipaddress.ip_interface(value)


def _check_tunnel_url(url: str, relay_address: str) -> None:
    """ws:// to the relay's tunnel address only: anything else would not go through the interface."""
    parts = urlsplit(url)
    if parts.scheme != "ws" or parts.username or parts.password or parts.hostname is None:
        raise ValueError("not ws://host:port/path")
    parts.port  # noqa: B018 - raises ValueError for a bad port
    if ipaddress.ip_address(parts.hostname) != ipaddress.ip_address(relay_address):
        raise ValueError("not the relay's tunnel address")


def _check_endpoint(value: str) -> None:
    host, sep, port = value.rpartition(":")
    if not sep or not host or value.startswith("-") or any(ch.isspace() for ch in value):
        raise ValueError("not host:port")
    if not (port.isascii() and port.isdigit() and 0 < int(port) <= 65535):
        raise ValueError("bad port")


# --- the cache ----------------------------------------------------------------------------------------


def load_registration(path: Path, *, relay_url: str, public_key: str) -> Registration | None:
    """The cached registration if it was made for this relay and this key, else None."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("ignoring %s (%s); registering again", path, type(exc).__name__)
        return None
    if not isinstance(data, dict) or data.get("relay_url") != relay_url or data.get("public_key") != public_key:
        return None
    try:
        return parse_registration(data.get("registration"))
    except WireGuardPathError:
        return None


def save_registration(path: Path, registration: Registration, *, relay_url: str, public_key: str) -> None:
    """Write the cache atomically (temporary file, then rename), mode 0600."""
    record = {"relay_url": relay_url, "public_key": public_key, "registration": asdict(registration),
              "written_at": time.time()}
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.urandom(6).hex()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(record, fh, indent=2)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# --- which transport the next attempt uses (pure) ------------------------------------------------------


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
        self.iface = WireGuardInterface(implementation=self.config.implementation)
        self.current: str | None = None  # the transport of the live (or last) connection
        self.registration: Registration | None = None
        self.last_error = ""
        self._session = session
        self._environ = os.environ if environ is None else environ
        self._clock = clock
        self._stale = False  # register again before the next use
        self._reset_peer = False  # remove and re-add the relay peer (a fresh handshake) before the next use
        self._applied: tuple[Registration, str] | None = None  # what the interface is configured with
        self._lock = threading.Lock()  # one wg/ip command sequence at a time, even after a cancelled await
        self._peer: WgPeer | None = None
        self._peer_at: float | None = None

    # --- the agent's entry points -------------------------------------------------------------------

    @asynccontextmanager
    async def open(self, fallback: Opener) -> AsyncIterator[WebSocket]:
        """Yield the tunnel's WebSocket for one connection; see the class doc."""
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
        await asyncio.to_thread(self._locked, self.iface.down)
        self._applied = None

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
        await self._apply(reg)
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
            reason = self._failure_reason(exc)
        self._path_failed()
        self.last_error = reason
        self.plan.wireguard_failed(self._clock(), reason)
        log.warning("WireGuard transport unavailable, using the WebSocket fallback (retry in %.0f s): %s",
                    self.config.retry_interval, reason)
        return None

    def _failure_reason(self, exc: BaseException) -> str:
        if isinstance(exc, TimeoutError):
            endpoint = self.registration.endpoint if self.registration else "the relay"
            return (f"no tunnel over WireGuard within {self.config.fallback_after:g} s "
                    f"(is outbound UDP to {endpoint} blocked?)")
        if isinstance(exc, WireGuardPathError | WireGuardError):
            return str(exc)
        return f"tunnel over WireGuard failed: {_describe(exc)}"

    async def _connect(self, stack: AsyncExitStack, deadline: float) -> WebSocket:
        reg = await self._registered(deadline)
        await self._apply(reg)
        try:
            return await self._ws_connect(stack, reg, deadline)
        except aiohttp.WSServerHandshakeError as exc:
            if exc.status != 403:
                raise
            log.warning("the relay refused the tunnel from our WireGuard address (403); registering again")
        self._path_failed()
        reg = await self._registered(deadline)
        await self._apply(reg)
        return await self._ws_connect(stack, reg, deadline)

    async def _ws_connect(self, stack: AsyncExitStack, reg: Registration, deadline: float) -> WebSocket:
        # Bound to our tunnel address: the relay knows the site by it. No proxy: this is inside WireGuard.
        connector = aiohttp.TCPConnector(local_addr=(reg.address, 0), use_dns_cache=False, force_close=True,
                                         limit=1)
        http = await stack.enter_async_context(
            aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None), trust_env=False))
        async with asyncio.timeout_at(deadline):
            ws = await http.ws_connect(reg.tunnel_url, compress=0, max_msg_size=MAX_MESSAGE_IN,
                                       autoping=True, autoclose=True)
        tune_socket(ws.get_extra_info("socket"))
        return ws

    # --- registration -------------------------------------------------------------------------------

    async def _registered(self, deadline: float) -> Registration:
        """The registration for our current key: from memory or the cache, else from the relay."""
        public_key = await asyncio.to_thread(self._public_key)
        reg = self.registration
        if reg is None and not self._stale:
            reg = load_registration(self._cache_path, relay_url=self.settings.relay_url, public_key=public_key)
        if reg is None or self._stale or self._applied_key_changed(public_key):
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
        self._stale = self._reset_peer = True

    def _applied_key_changed(self, public_key: str) -> bool:
        return self._applied is not None and self._applied[1] != public_key

    @property
    def _cache_path(self) -> Path:
        return self.settings.state_dir / REGISTRATION_FILE

    def _public_key(self) -> str:
        """Our public key; the private key file is made (0600) on first use."""
        path = self.config.key_file
        try:
            return public_key_of(path)
        except InvalidKeyError:
            if path.exists() or path.is_symlink():
                raise  # a bad or too-open key file is the operator's to fix, never overwritten
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            public = generate_private_key(path)
        except FileExistsError:  # made meanwhile by someone else: use theirs
            return public_key_of(path)
        log.info("made a new WireGuard key in %s", path)
        return public

    async def _register(self, public_key: str, deadline: float) -> Registration:
        """POST our public key to the relay (mutual TLS with the site certificate, through [proxy])."""
        s = self.settings
        parts = urlsplit(s.relay_url)
        url = urlunsplit(("https", parts.netloc, REGISTER_PATH, "", ""))
        try:
            ctx = client_context(s.cert_file, s.key_file, s.ca_file)
        except TlsConfigError as exc:
            raise WireGuardPathError(f"cannot register with the relay's WireGuard: {exc}") from None
        proxy = choose_proxy(s.proxy, s.relay_url, self._environ)
        via = proxy.request_kwargs() if proxy is not None else {}
        connector = aiohttp.TCPConnector(ssl=ctx, use_dns_cache=False, force_close=True)
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=s.connect_timeout)
        try:
            async with (
                asyncio.timeout_at(deadline),
                aiohttp.ClientSession(connector=connector, timeout=timeout, trust_env=False) as http,
                http.post(url, json={"public_key": public_key}, **via) as response,
            ):
                status, body = response.status, await _read_bounded(response)
        except (aiohttp.ClientError, TimeoutError) as exc:
            failure = proxy_failure(proxy, target_of(s.relay_url), exc, s.connect_timeout) if proxy else None
            where = f"cannot register with the relay's WireGuard at {url}"
            raise WireGuardPathError(str(failure) if failure else f"{where}: {_describe(exc)}") from None
        if status != 200:
            raise WireGuardPathError(_refusal(status, body), status=status)
        try:
            answer = json.loads(body)
        except ValueError:
            raise WireGuardPathError("the relay's WireGuard registration answer is not JSON") from None
        return parse_registration(answer)

    # --- the interface ------------------------------------------------------------------------------

    async def _apply(self, reg: Registration) -> None:
        await asyncio.to_thread(self._locked, self._apply_now, reg)

    def _apply_now(self, reg: Registration) -> None:
        """(In a worker thread, locked.) Bring the interface up for ``reg`` and set the relay peer."""
        public_key = public_key_of(self.config.key_file)
        crashed = self.iface.implementation == "userspace" and self.iface.wireguard_go_pid is None
        if self.iface.name is not None and (self._applied != (reg, public_key) or crashed):
            if crashed:
                log.warning("wireguard-go for %s exited; bringing the interface up again", self.config.interface)
            self.iface.down()
            self._applied = None
        if self.iface.name is None:
            # Recovers a stale one; replies_only: the relay can reach nothing on this host through the tunnel.
            self.iface.up(self.config.interface, self.config.key_file, reg.address_cidr, replies_only=True)
            log.info("WireGuard interface %s up (%s), address %s", self.config.interface,
                     self.iface.implementation, reg.address_cidr)
        elif self._reset_peer:
            self.iface.remove_peer(reg.relay_public_key)
        self._reset_peer = False
        # Every time: `wg set` resolves a host name in the endpoint again.
        self.iface.set_peer(reg.relay_public_key, allowed_ips=[f"{reg.relay_address}/32"], endpoint=reg.endpoint,
                            persistent_keepalive=reg.persistent_keepalive)
        self._applied = (reg, public_key)

    def _locked(self, action: Callable[..., Any], *args: Any) -> Any:
        with self._lock:
            return action(*args)

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
            dump = await asyncio.to_thread(self._locked, self.iface.dump)
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
            if await self._close_fallback_when_idle():
                return
            # Busy for a whole retry_interval: probe again (WireGuard may have gone meanwhile), then wait again.

    async def _close_fallback_when_idle(self) -> bool:
        for _ in range(int(self.config.retry_interval / IDLE_POLL) + 1):
            session = self._session()
            if session is None:
                return True
            if session.active_streams == 0:
                await session.close(ErrorCode.GOING_AWAY, "moving the tunnel to WireGuard")
                return True
            await asyncio.sleep(IDLE_POLL)
        return False


@asynccontextmanager
async def _watching(*coroutines: Any) -> AsyncIterator[None]:
    """Run ``coroutines`` as tasks for the duration of the block; cancel and await them at its end."""
    tasks = [asyncio.create_task(coro) for coro in coroutines]
    try:
        yield
    finally:
        for task in tasks:
            await cancel_and_wait(task)


async def _read_bounded(response: aiohttp.ClientResponse) -> bytes:
    if response.content_length is not None and response.content_length > MAX_ANSWER:
        raise WireGuardPathError(f"the relay's WireGuard registration answer is larger than {MAX_ANSWER} bytes")
    body = bytearray()
    async for chunk in response.content.iter_chunked(16 * 1024):
        body += chunk
        if len(body) > MAX_ANSWER:
            raise WireGuardPathError(f"the relay's WireGuard registration answer is larger than {MAX_ANSWER} bytes")
    return bytes(body)


def _refusal(status: int, body: bytes) -> str:
    try:
        error = json.loads(body).get("error", "")
    except (ValueError, AttributeError):
        error = ""
    detail = "".join(ch for ch in str(error) if 0x20 <= ord(ch) < 0x7F)[:200]
    detail = f": {detail}" if detail else ""
    if status == 404:
        return f"the relay does not offer WireGuard (404{detail})"
    if status == 403:
        return f"the relay refused this site's certificate for WireGuard (403{detail})"
    return f"the relay refused the WireGuard registration ({status}{detail})"


def _describe(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}"[:300] if text else type(exc).__name__


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 1)
