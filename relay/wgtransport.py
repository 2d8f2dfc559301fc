"""The relay's WireGuard transport: one interface, one peer per site, the usual mux WebSocket inside it.

Theory of operation: an agent with ``transport = "wireguard"`` registers its public key over the TLS port
(``POST /enroll/v1/wireguard``, mutual TLS) and gets a tunnel address. The relay adds a peer for that key
whose allowed IP is exactly that address, so WireGuard's cryptokey routing guarantees that a packet from
the address came from the site's key. The agent then opens the same mux WebSocket as always, as plain
``ws://`` to ``tunnel_port`` on the relay's tunnel address *through* WireGuard: the relay names the site
from the source address, and routing, allow-lists and rejects are the WebSocket path's, unchanged. The
agent only ever sends (UDP out, keepalive), so nothing inbound reaches the hospital, not even inside
the tunnel.

Peers follow the registry: ``sync()`` adds missing peers and removes those of revoked sites or replaced
keys, so revoking a site stops its traffic at once. Subprocess work (``tunnel_wireguard.interface``) runs in a
thread, off the event loop.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from contextlib import AsyncExitStack
from functools import partial

from aiohttp import web

from relay import pki
from relay.config import RelaySettings
from relay.registrygate import AsyncRegistry
from relay.status import WireGuardPeerStatus
from tunnel_link.httpserver import serve_tcp
from tunnel_wireguard.errors import WireGuardError
from tunnel_wireguard.interface import WireGuardInterface
from tunnel_wireguard.keys import generate_private_key, public_key_of, validate_key

log = logging.getLogger("relay.wireguard")

KEY_FILE = "wg.key"


class RelayWireGuard:
    """Build with the settings and the open registry; ``await start(stack, app)`` brings the interface up and
    serves ``app`` (the tunnel's WebSocket) on the relay's tunnel address."""

    def __init__(self, settings: RelaySettings, registry: AsyncRegistry) -> None:
        self.settings = settings
        self.registry = registry
        self.config = settings.wireguard
        self.network = ipaddress.ip_interface(self.config.address).network
        self.interface = WireGuardInterface(implementation=self.config.implementation)
        self.public_key = ""
        self.by_address: dict[str, tuple[str, str]] = {}  # tunnel address -> (site, public key)
        self._lock = asyncio.Lock()
        self._handshakes: dict[str, WireGuardPeerStatus] = {}

    async def start(self, stack: AsyncExitStack, app: web.Application) -> tuple[str, int]:
        key_path = self.settings.state_dir / KEY_FILE
        if not key_path.exists():
            generate_private_key(key_path)
        self.public_key = public_key_of(key_path)
        c = self.config
        # no_forward: nothing arriving from one site's peer is routed on, to another site or anywhere.
        await asyncio.to_thread(partial(self.interface.up, c.interface, key_path, c.address, c.listen_port,
                                        no_forward=True))
        stack.push_async_callback(asyncio.to_thread, self.interface.down)
        await self.sync()
        await self.refresh()
        await serve_tcp(stack, app, c.relay_ip, c.tunnel_port,
                        request_timeout=self.settings.tunnel.request_deadline, logger_name="relay.http")
        log.info("wireguard up: interface %s (%s), udp %d, tunnel port %s:%d", c.interface,
                 self.interface.implementation, c.listen_port, c.relay_ip, c.tunnel_port)
        return c.relay_ip, c.tunnel_port

    def endpoint(self) -> str:
        if self.config.endpoint:
            return self.config.endpoint
        names = pki.relay_hostnames(self.settings.state_dir)
        host = names[0] if names else "localhost"
        return f"[{host}]:{self.config.listen_port}" if ":" in host else f"{host}:{self.config.listen_port}"

    async def register(self, site: str, public_key: str) -> dict[str, object]:
        """Record ``site``'s key (registry) and return what its agent needs; call ``sync()`` afterwards."""
        validate_key(public_key)
        network, reserved, now = self.network, {self.config.relay_ip}, time.time()
        address = await self.registry.call(lambda r: r.register_wg_peer(site, public_key, network, reserved, now,
                                                                        actor=f"wireguard:{site}"))
        return {
            "site": site,
            "address_cidr": f"{address}/{self.network.prefixlen}",
            "relay_public_key": self.public_key,
            "relay_address": self.config.relay_ip,
            "endpoint": self.endpoint(),
            "tunnel_url": f"ws://{self.config.relay_ip}:{self.config.tunnel_port}{self.settings.tunnel.path}",
            "persistent_keepalive": self.config.persistent_keepalive,
        }

    async def sync(self) -> None:
        """Make the interface's peers equal to the registry's (unrevoked sites, current keys)."""
        async with self._lock:
            peers = await self.registry.call(lambda r: r.wg_peers())
            wanted = {public_key: (site, address) for site, public_key, address in peers}
            try:
                present = {p.public_key for p in (await asyncio.to_thread(self.interface.dump)).peers}
                for public_key in present - wanted.keys():
                    await asyncio.to_thread(self.interface.remove_peer, public_key)
                    log.info("wireguard peer removed (key %s...)", public_key[:8])
                for public_key, (site, address) in wanted.items():
                    if public_key not in present:
                        await asyncio.to_thread(self.interface.set_peer, public_key, allowed_ips=[f"{address}/32"])
                        log.info("wireguard peer for site=%s at %s", site, address)
            except WireGuardError as exc:
                log.error("wireguard peers not in sync: %s", exc)
            self.by_address = {address: (site, public_key) for public_key, (site, address) in wanted.items()}

    def site_of(self, remote: str | None) -> str | None:
        """The site whose key sent this connection (cryptokey routing pins the address to the key)."""
        entry = self.by_address.get(remote or "")
        return entry[0] if entry else None

    def handshakes(self) -> dict[str, WireGuardPeerStatus]:
        """Per site: latest handshake, bytes and endpoint, as of the last ``refresh()`` (the relay's sweep,
        once a second): status and metrics never run a subprocess on the event loop."""
        return self._handshakes

    async def refresh(self) -> None:
        try:
            dump = await asyncio.to_thread(self.interface.dump)
        except WireGuardError as exc:
            log.warning("wg show dump failed: %s", exc)
            return
        now = time.time()
        sites = {public_key: site for site, public_key in self.by_address.values()}
        result: dict[str, WireGuardPeerStatus] = {}
        for peer in dump.peers:
            site = sites.get(peer.public_key)
            if site is not None:
                age = peer.handshake_age(now)
                result[site] = WireGuardPeerStatus(latest_handshake_age_s=round(age, 1) if age is not None else None,
                                                   rx_bytes=peer.transfer_rx, tx_bytes=peer.transfer_tx,
                                                   endpoint=str(peer.endpoint) if peer.endpoint else None)
        self._handshakes = result
