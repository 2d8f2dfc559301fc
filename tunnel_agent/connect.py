"""Opening the agent's tunnel: the mutual-TLS WebSocket to the relay, directly or through an HTTP proxy.

Call :func:`open_tunnel` once per connection attempt; it yields the connected WebSocket, and leaving the
block closes it and its HTTP session. Every attempt builds a fresh connector without a DNS cache, so a
relay (or proxy) that moved is found again.

With a proxy (:mod:`tunnel_agent.proxy` chooses it), aiohttp connects to the proxy only, sends
``CONNECT relay:port`` with the Basic credentials, and starts TLS with the relay inside the tunnel. The
relay's name is resolved by the proxy, never here, and nothing is ever sent to the relay directly. The
proxy's own failures (refused CONNECT, unreachable, silent) become :class:`ProxyError` with a one-line,
secret-free reason; failures past the proxy (TLS with the relay, the WebSocket handshake) pass through.

Every upgrade request names the agent (``Tunnel-Agent``, ``tunnel_core.discovery``); ``on_upgrade`` gets the
relay's ``101`` headers (its ``Tunnel-Fleet``) once the tunnel is open. Another relay of the fleet is dialed
at its own ``url`` with the same certificate, pinned CA and proxy rules, its certificate checked against
``server_hostname`` (the host of ``relay_url``: a fleet's relays share one server certificate).
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from http import HTTPStatus
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import aiohttp

from tunnel_agent.proxy import ProxyError, ProxyRoute, choose_proxy
from tunnel_core.discovery import AGENT_HEADER
from tunnel_core.refusal import REFUSED_HEADER, token_of_close_message
from tunnel_link.innertls import InnerTlsError, InnerTlsFailure, inner_tls_client
from tunnel_link.session import MAX_MESSAGE_IN
from tunnel_link.sockets import tune_socket
from tunnel_link.transport import SUBPROTOCOLS

if TYPE_CHECKING:
    from tunnel_agent.config import AgentSettings

__all__ = ["ProxyError", "UpgradeHeaders", "open_tunnel", "proxy_failure", "refusal_token", "upgrade_trace"]

log = logging.getLogger("agent")

_REASON_MAX = 80

UpgradeHeaders = Callable[[Mapping[str, str]], None]


@asynccontextmanager
async def open_tunnel(
    settings: AgentSettings, ssl_ctx: ssl.SSLContext, *, environ: Mapping[str, str] | None = None,
    url: str | None = None, server_hostname: str | None = None, on_upgrade: UpgradeHeaders | None = None,
) -> AsyncIterator[aiohttp.ClientWebSocketResponse]:
    """Connect to ``url`` (default ``settings.relay_url``) within ``settings.connect_timeout`` and yield the
    WebSocket.

    ``ssl_ctx`` is the client context for the relay (certificate and pinned CA); ``server_hostname``, if
    given, is the name the relay's certificate is checked against instead of ``url``'s host. ``environ``
    (default ``os.environ``) is where ``HTTPS_PROXY``/``NO_PROXY`` are read when ``[proxy] url`` is unset.
    ``on_upgrade`` is called with the relay's upgrade response headers once the tunnel is open.
    Raises :class:`ProxyError` for the proxy's failures; other errors are aiohttp's or ``TimeoutError``.
    """
    target = url or settings.relay_url or ""
    proxy = choose_proxy(settings.proxy, target, os.environ if environ is None else environ)
    inner = settings.tls_mode == "inner"
    # In inner mode the outer TLS may end at an inspecting proxy: it trusts the configured corporate CA
    # (or the system store) and presents no certificate; the pinned mutual TLS runs inside the WebSocket.
    outer_ctx = outer_context(settings) if inner else ssl_ctx
    # No DNS cache: every attempt re-resolves, so a relay that moved is found again.
    connector = aiohttp.TCPConnector(ssl=outer_ctx, use_dns_cache=False, force_close=True, limit=1)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=settings.connect_timeout)
    heard: list[Mapping[str, str]] = []
    # trust_env=False: the proxy is chosen above, explicitly; aiohttp must not pick another one.
    async with aiohttp.ClientSession(connector=connector, timeout=timeout, trust_env=False,
                                     trace_configs=[upgrade_trace(heard.append)]) as http:
        via = {"server_hostname": server_hostname} if server_hostname else {}
        if proxy is None:
            ws = await _handshake(http, settings, target, via)
        else:
            log.info("connecting to the relay through proxy %s (from %s)", proxy.address, proxy.source)
            try:
                ws = await _handshake(http, settings, target, {**via, **proxy.request_kwargs()})
            except (aiohttp.ClientError, TimeoutError) as exc:
                failure = proxy_failure(proxy, target_of(target), exc, settings.connect_timeout)
                if failure is None:
                    raise
                raise failure from exc
        tune_socket(ws.get_extra_info("socket"))
        opened = await inner_tls_client(ws, ssl_ctx, settings.relay_host, settings.connect_timeout) if inner else ws
        if on_upgrade is not None and heard:
            on_upgrade(heard[-1])
        yield opened


def upgrade_trace(record: UpgradeHeaders) -> aiohttp.TraceConfig:
    """An aiohttp trace that hands ``record`` the headers of every ``101 Switching Protocols`` answer (the
    public way to read a WebSocket upgrade's response headers)."""
    async def request_end(_session: object, _context: object, params: aiohttp.TraceRequestEndParams) -> None:
        if params.response.status == HTTPStatus.SWITCHING_PROTOCOLS:
            record(params.response.headers)

    trace = aiohttp.TraceConfig()
    trace.on_request_end.append(request_end)
    trace.freeze()
    return trace


def refusal_token(exc: BaseException, *, inner: bool) -> str | None:
    """The relay's reason for refusing this tunnel, as it said it on the wire (``docs/protocol.md`` §1): the
    ``Tunnel-Refused`` header of a 403 to the tunnel request, or, in inner-TLS mode (``inner``), the token
    of the relay's policy close after the inner handshake. None for every other failure, including a 403
    without the header (an older relay). In inner-TLS mode the relay never answers 403 (it checks the
    certificate inside), so a 403 there is the inspecting proxy's, whatever its headers say.
    Turn the token into words with ``tunnel_core.refusal.refusal_from_token``."""
    if isinstance(exc, aiohttp.WSServerHandshakeError) and exc.status == HTTPStatus.FORBIDDEN and not inner:
        return exc.headers.get(REFUSED_HEADER) if exc.headers is not None else None
    if isinstance(exc, InnerTlsError) and exc.failure is InnerTlsFailure.REFUSED_BY_PEER and inner:
        return token_of_close_message(exc.close_message)
    return None


def outer_context(settings: AgentSettings) -> ssl.SSLContext:
    """The outer TLS of inner-TLS mode: server authentication against ``outer_ca_file`` (the inspection
    proxy's CA bundle) or the system store, host name checked, TLS 1.2 at least, no client certificate."""
    ctx = ssl.create_default_context(cafile=str(settings.outer_ca_file) if settings.outer_ca_file else None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def tunnel_url(settings: AgentSettings, url: str | None = None) -> str:
    """The WebSocket URL for the configured mode: ``url`` (default ``relay_url``), or its ``/inner`` path in
    inner-TLS mode."""
    url = url or settings.relay_url or ""
    if settings.tls_mode != "inner":
        return url
    parts = urlsplit(url)
    return parts._replace(path=parts.path.rstrip("/") + "/inner").geturl()


async def _handshake(http: aiohttp.ClientSession, settings: AgentSettings, url: str,
                     via: Mapping[str, object]) -> aiohttp.ClientWebSocketResponse:
    async with asyncio.timeout(settings.connect_timeout):
        return await http.ws_connect(tunnel_url(settings, url), compress=0, max_msg_size=MAX_MESSAGE_IN,
                                     autoping=True, autoclose=True, protocols=SUBPROTOCOLS,
                                     headers={AGENT_HEADER: settings.agent_name}, **via)


def proxy_failure(proxy: ProxyRoute, target: str, exc: BaseException, timeout: float) -> ProxyError | None:
    """The :class:`ProxyError` for ``exc`` raised while tunnelling to ``target`` through ``proxy``.

    None when the failure is not the proxy's (TLS with the relay, the relay's HTTP answer): the caller
    re-raises those unchanged.
    """
    where = f"proxy {proxy.address}"
    if isinstance(exc, aiohttp.ClientHttpProxyError):
        status = exc.status
        text = f"{where} refused CONNECT to {target}: {status} {_reason(status, exc.message)}"
        hint = _status_hint(proxy, target, status)
        return ProxyError(f"{text} ({hint})" if hint else text, address=proxy.address, status=status)
    if isinstance(exc, aiohttp.ClientSSLError):
        return None  # TLS with the relay, inside the tunnel: the proxy did its part
    if isinstance(exc, aiohttp.ClientConnectorError) and (exc.host, exc.port) == (proxy.host, proxy.port):
        # Through a proxy, the only TCP connection (and name lookup) this process makes is to the proxy;
        # an error keyed by the relay's address happened later, in the TLS handshake inside the tunnel.
        reason = exc.strerror or type(exc.os_error).__name__
        return ProxyError(f"cannot reach {where}: {reason}", address=proxy.address)
    if isinstance(exc, TimeoutError):
        return ProxyError(f"no tunnel to {target} through {where} within {timeout:g} s "
                          "(the proxy or, behind it, the relay did not answer)", address=proxy.address)
    return None


def _status_hint(proxy: ProxyRoute, target: str, status: int) -> str:
    if status == HTTPStatus.PROXY_AUTHENTICATION_REQUIRED:
        return proxy.auth_hint()
    if status == HTTPStatus.FORBIDDEN:
        return f"the proxy's policy does not allow CONNECT to {target}; ask the network team to allow it"
    if status in (HTTPStatus.BAD_GATEWAY, HTTPStatus.SERVICE_UNAVAILABLE, HTTPStatus.GATEWAY_TIMEOUT):
        return f"the proxy could not reach the relay at {target}"
    return ""


def _reason(status: int, message: str | None) -> str:
    """The standard reason phrase; the proxy's own text only for codes outside the standard."""
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        text = "".join(ch for ch in (message or "") if 0x20 <= ord(ch) < 0x7F)
        return text[:_REASON_MAX]


def target_of(relay_url: str) -> str:
    """``host:port`` of the relay, as the proxy is asked to CONNECT to it."""
    parts = urlsplit(relay_url)
    host = parts.hostname or ""
    port = parts.port or 443
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def explain_untrusted_relay(settings: AgentSettings, exc: aiohttp.ClientConnectorCertificateError,
                                  *, environ: Mapping[str, str] | None = None) -> str:
    """One line for ops when the relay's certificate does not verify against the pinned CA: what was
    presented instead and by whom, and what to ask the network team. The connection stays refused."""
    from tunnel_agent.peek import PeekError, describe_certificate, peek_certificate

    proxy = choose_proxy(settings.proxy, settings.relay_url, os.environ if environ is None else environ)
    host = urlsplit(settings.relay_url).hostname
    try:
        presented = describe_certificate(await peek_certificate(settings.relay_url, proxy, settings.connect_timeout))
    except PeekError as peek_exc:
        presented = f"a certificate that could not be fetched again ({peek_exc})"
    why = getattr(exc.certificate_error, "verify_message", None) or exc.certificate_error
    if settings.tls_mode == "inner":
        return (f"outer TLS verification failed ({why}); the relay address presented {presented}. In "
                "inner-TLS mode set outer_ca_file to the CA bundle of the inspecting proxy (ask the network "
                "team for it).")
    return (f"TLS verification of the relay failed ({why}); "
            f"the relay address presented {presented}. If that issuer is your organisation's TLS inspection "
            f"proxy, ask the network team to exempt {host} from TLS inspection, or set tls_mode = "
            "\"inner\" (see README). The agent does not connect through an untrusted certificate.")
