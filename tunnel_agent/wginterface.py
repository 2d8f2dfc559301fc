"""The agent's WireGuard interface: brought up for a registration, with the relay as its one peer.

Brought up on first use with the assigned address (a stale interface of the same name that a crash left
behind is removed first), with one peer: the relay, allowed-ips ``relay_address/32``, persistent
keepalive. It stays up across reconnects, is made again when the registration or our key changes (or
``wireguard-go`` died), and is removed by :meth:`AgentInterface.down` when the agent exits. Every
``wg``/``ip`` command runs in a worker thread (``tunnel_wireguard.interface`` blocks), one sequence at a
time, even after a cancelled await.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from typing import Any

from tunnel_agent.config import WireGuardAgentConfig
from tunnel_agent.wgregistration import Registration
from tunnel_wireguard.dump import WgDump
from tunnel_wireguard.interface import WireGuardInterface
from tunnel_wireguard.keys import public_key_of

__all__ = ["AgentInterface"]

log = logging.getLogger("agent")


class AgentInterface:
    """Build with ``[wireguard]``; ``await apply(reg)`` before each use, ``await down()`` at exit.
    Set ``reset_peer`` to remove and re-add the relay peer (a fresh handshake) at the next ``apply``."""

    def __init__(self, config: WireGuardAgentConfig) -> None:
        self.config = config
        self.iface = WireGuardInterface(implementation=config.implementation)
        self.reset_peer = False
        self._applied: tuple[Registration, str] | None = None  # what the interface is configured with
        self._lock = threading.Lock()

    async def apply(self, reg: Registration) -> None:
        await asyncio.to_thread(self._locked, self._apply_now, reg)

    async def down(self) -> None:
        """Remove the interface (idempotent)."""
        await asyncio.to_thread(self._locked, self.iface.down)
        self._applied = None

    async def dump(self) -> WgDump:
        """``wg show <interface> dump``, parsed; raises ``WireGuardError``."""
        return await asyncio.to_thread(self._locked, self.iface.dump)

    def key_changed(self, public_key: str) -> bool:
        """Whether the interface runs with another key than ``public_key`` (the key file was replaced)."""
        return self._applied is not None and self._applied[1] != public_key

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
        elif self.reset_peer:
            self.iface.remove_peer(reg.relay_public_key)
        self.reset_peer = False
        # Every time: `wg set` resolves a host name in the endpoint again.
        self.iface.set_peer(reg.relay_public_key, allowed_ips=[f"{reg.relay_address}/32"], endpoint=reg.endpoint,
                            persistent_keepalive=reg.persistent_keepalive)
        self._applied = (reg, public_key)

    def _locked(self, action: Callable[..., Any], *args: Any) -> Any:
        with self._lock:
            return action(*args)
