"""The relay's DICOM listeners: where cloud callers connect, as if to the hospital's PACS.

Each ``[[listeners]]`` entry is one port. The A-ASSOCIATE-RQ is read (``tunnel_link.associations``),
routed by called AE within that listener's own table (``tunnel_core.routing.decide_ingress``), the calling
AE checked, and a stream opened to the site's agent carrying the request; refusals are A-ASSOCIATE-RJs
the caller's DICOM tool understands. The table is looked up per association, so a route added or removed
through the registry applies to the next association at once. A site whose tunnel another relay of the
fleet holds instead is reached through that relay, one hop (``relay.peering``).
"""

from __future__ import annotations

from contextlib import AsyncExitStack
from typing import Protocol

from relay.config import ListenerConfig
from relay.sites import SiteTable
from tunnel_core.codes import TargetKind
from tunnel_core.dicom import AssociateRequest, RejectReason
from tunnel_core.frames import OpenPayload
from tunnel_core.mux import ConnectionDraining, StreamLimitReached
from tunnel_core.routing import Accept, Reject, decide_ingress
from tunnel_link.associations import Association, AssociationTracker, IngressLimits, serve_caller
from tunnel_link.errors import LinkError
from tunnel_link.pipe import Pipe, PipeServer
from tunnel_link.session import TunnelStream

__all__ = ["Hops", "route_caller", "serve_listener"]


class Hops(Protocol):
    """The other relays of the fleet, for a site whose tunnel this relay does not hold (``relay.peering``)."""

    def elsewhere(self) -> set[str]: ...

    async def look_again(self) -> None: ...

    async def carry(self, site: str, listener: str, req: AssociateRequest) -> TunnelStream | None: ...


async def serve_listener(stack: AsyncExitStack, listener: ListenerConfig, sites: SiteTable,
                         tracker: AssociationTracker, hops: Hops | None = None) -> tuple[tuple[str, int], PipeServer]:
    """Bind ``listener``'s port (closed with ``stack``); returns the address bound and the server (a drain
    stops it accepting while its associations finish)."""
    limits = IngressLimits(listener.artim_timeout, listener.max_associate_rq)

    async def on_caller(pipe: Pipe) -> None:
        async def decide(req: AssociateRequest, assoc: Association) -> TunnelStream | RejectReason:
            return await route_caller(sites, listener.name, req, assoc, hops)
        await serve_caller(pipe, limits=limits, decide=decide, tracker=tracker, direction="cloud-to-site")

    server = PipeServer(on_caller)
    bound = await server.start(listener.host, listener.port)
    stack.push_async_callback(server.close)
    return bound, server


async def route_caller(sites: SiteTable, listener: str, req: AssociateRequest, assoc: Association,
                       hops: Hops | None = None) -> TunnelStream | RejectReason:
    """A stream to the site the called AE names on ``listener``, carrying the request: on this relay's own
    tunnel to the site, else (with ``hops``) through a relay that holds one; else the reject."""
    table = sites.tables.get(listener, {})
    online = sites.online()
    if hops is not None:
        online |= hops.elsewhere()
    decision = decide_ingress(table, req.called_ae, req.calling_ae, online)
    if hops is not None and isinstance(decision, Reject) and decision.reason is RejectReason.SITE_OFFLINE:
        await hops.look_again()  # its tunnel may have come up on another relay since the last read
        decision = decide_ingress(table, req.called_ae, req.calling_ae, sites.online() | hops.elsewhere())
    if not isinstance(decision, Accept):
        return decision.reason
    assoc.site, assoc.route = decision.site, decision.route
    here = await _open_here(sites, decision, req)
    if here is not RejectReason.SITE_OFFLINE or hops is None:
        return here
    carried = await hops.carry(decision.site, listener, req)
    return carried if carried is not None else RejectReason.SITE_OFFLINE


async def _open_here(sites: SiteTable, decision: Accept, req: AssociateRequest) -> TunnelStream | RejectReason:
    site = sites.sites.get(decision.site)
    session = site.pick(decision.route) if site is not None else None
    if session is None:
        return RejectReason.SITE_OFFLINE
    try:
        return await session.open_stream(OpenPayload(TargetKind.ROUTE, decision.route, req.calling_ae))
    except StreamLimitReached:
        return RejectReason.CAPACITY
    except (ConnectionDraining, LinkError):
        return RejectReason.SITE_OFFLINE
