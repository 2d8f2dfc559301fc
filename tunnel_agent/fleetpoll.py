"""The fleet list on demand: ``GET /fleet/v1/relays`` through ``relay_url``, for an agent whose lists went stale.

Theory of operation (``docs/protocol.md`` §1.3). Every tunnel upgrade brings the fleet's list
(``Tunnel-Fleet``), but while the agent's tunnels stay up no upgrade happens: a relay it saw draining may
have restarted (a new ``since``) and the agent, short of ``[fleet] tunnels`` relays, would never learn it.
So, while :class:`FleetPoll`'s ``short()`` says so (fewer live, non-draining tunnels on distinct relays than
wanted, and a fleet known), it fetches the list every :data:`FLEET_POLL` seconds from the relay
``relay_url`` reaches (usually through the fleet's load balancer) and hands it to ``heard`` — the same
choice as an upgrade's list. :func:`fetch_fleet` is one such request: mutual TLS with the agent's
certificate and pinned CA, the relay's certificate checked against ``relay_url``'s host, the tunnel's proxy
rules, within ``connect_timeout``; the answer is read up to the list's size limit and parsed with
``parse_fleet``. In inner-TLS mode the outer TLS carries no client certificate, and with ``tunnels = 1``
there is nothing to choose: no poll then. A failure is logged once per streak, and tried again next period.
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
from collections.abc import Callable, Coroutine, Mapping
from http import HTTPStatus
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp

from tunnel_agent.config import AgentSettings
from tunnel_agent.connect import proxy_failure, target_of
from tunnel_agent.proxy import choose_proxy
from tunnel_core.discovery import FLEET_LIST_PATH, MAX_HEADER_BYTES, DiscoveryError, FleetEntry, parse_fleet
from tunnel_core.refusal import REFUSED_HEADER
from tunnel_link.tls import client_context

__all__ = ["FLEET_POLL", "FleetListError", "FleetPoll", "fetch_fleet", "fleet_list_url"]

log = logging.getLogger("agent")

FLEET_POLL = 2.0  # seconds between fetches of the fleet's list while the agent holds fewer tunnels than it wants
_ANSWERS = {
    HTTPStatus.FORBIDDEN: "the relay refuses this certificate",
    HTTPStatus.NOT_FOUND: "the relay gives agents no list",
    HTTPStatus.SERVICE_UNAVAILABLE: "the relay's registry is down",
}

Fetch = Callable[[AgentSettings], Coroutine[Any, Any, list[FleetEntry]]]


class FleetListError(Exception):
    """The fleet's list could not be fetched; the message is one secret-free line saying why."""


def fleet_list_url(relay_url: str) -> str:
    """``https://<relay_url's host:port>/fleet/v1/relays``."""
    return urlunsplit(("https", urlsplit(relay_url).netloc, FLEET_LIST_PATH, "", ""))


async def fetch_fleet(settings: AgentSettings, *, environ: Mapping[str, str] | None = None) -> list[FleetEntry]:
    """The fleet's list from the relay ``relay_url`` reaches, within ``connect_timeout``.

    Raises :class:`FleetListError` for every failure (unreachable, TLS, the proxy, a status other than 200,
    a body over the list's limit or malformed)."""
    url = fleet_list_url(settings.relay_url or "")
    proxy = choose_proxy(settings.proxy, settings.relay_url or "", os.environ if environ is None else environ)
    try:
        ctx = client_context(settings.cert_file, settings.key_file, settings.ca_file)
        connector = aiohttp.TCPConnector(ssl=ctx, use_dns_cache=False, force_close=True, limit=1)
        async with asyncio.timeout(settings.connect_timeout), aiohttp.ClientSession(
                connector=connector, trust_env=False) as http, http.get(
                url, server_hostname=settings.relay_host, allow_redirects=False,
                **(proxy.request_kwargs() if proxy is not None else {})) as response:
            if response.status != HTTPStatus.OK:
                raise FleetListError(_answer(response))
            body = await _read_limited(response.content, MAX_HEADER_BYTES)
        return parse_fleet(body.decode("ascii"))
    except FleetListError:
        raise
    except (DiscoveryError, UnicodeDecodeError) as exc:
        raise FleetListError(f"the relay's list is not well-formed ({exc})") from exc
    except TimeoutError as exc:
        raise FleetListError(f"no answer within {settings.connect_timeout:g} s") from exc
    except (aiohttp.ClientError, OSError, ssl.SSLError) as exc:
        failure = proxy_failure(proxy, target_of(url), exc, settings.connect_timeout) if proxy else None
        text = str(failure or exc).splitlines()[0] if str(failure or exc) else ""
        raise FleetListError(f"{type(failure or exc).__name__}: {text}"[:300]) from exc


def _answer(response: aiohttp.ClientResponse) -> str:
    status = response.status
    why = _ANSWERS.get(status, "")
    token = response.headers.get(REFUSED_HEADER) if status == HTTPStatus.FORBIDDEN else None
    return f"HTTP {status}" + (f": {why}" if why else "") + (f" ({token})" if token else "")


async def _read_limited(content: aiohttp.StreamReader, limit: int) -> bytes:
    """The body, or FleetListError as soon as it is over ``limit`` bytes (never buffered beyond that)."""
    body = b""
    while chunk := await content.read(limit + 1 - len(body)):
        body += chunk
        if len(body) > limit:
            raise FleetListError(f"the relay's list is over {limit} bytes")
    return body


class FleetPoll:
    """Build with the settings, ``short`` (True while the agent wants a fresh list: see the module doc) and
    ``heard`` (called with each list fetched); ``await run()`` until cancelled."""

    def __init__(self, settings: AgentSettings, *, short: Callable[[], bool],
                 heard: Callable[[list[FleetEntry]], None], fetch: Fetch = fetch_fleet,
                 period: float = FLEET_POLL) -> None:
        self.settings = settings
        self.fetches = 0  # lists asked for, for tests and logs
        self._short = short
        self._heard = heard
        self._fetch = fetch
        self._period = period

    @property
    def enabled(self) -> bool:
        """No poll with one tunnel, nor in inner-TLS mode (no client certificate on the outer TLS)."""
        return self.settings.fleet.tunnels > 1 and self.settings.tls_mode != "inner"

    async def run(self) -> None:
        """Every period while ``short()``: fetch the list and hand it to ``heard``."""
        if not self.enabled:
            return
        failing = False
        while True:
            await asyncio.sleep(self._period)
            if not self._short():
                continue
            self.fetches += 1
            try:
                entries = await self._fetch(self.settings)
            except FleetListError as exc:
                if not failing:
                    log.info("fleet list from %s failed: %s; trying again every %.0f s while short of tunnels",
                             fleet_list_url(self.settings.relay_url or ""), exc, self._period)
                failing = True
                continue
            if failing:
                log.info("fleet list from %s fetched again", fleet_list_url(self.settings.relay_url or ""))
            failing = False
            self._heard(entries)
