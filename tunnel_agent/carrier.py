"""The agent's two DICOM edges: what the relay may reach here, and how local callers reach the relay.

- A stream the relay opens names a route; the route maps to a destination in *this* config and nothing
  else can be dialed, whatever the relay asks (``tunnel_core.routing.decide_destination``).
- The local DICOM listener carries associations from modalities and the PACS out to the relay, routed
  there by called AE among this site's cloud destinations; without a live tunnel the caller hears the
  site-offline reject. A called AE title of a ``mode = "spool"`` destination is answered here instead, by
  the spool's ingest (``tunnel_agent.spool.ingest``), tunnel or not.
"""

from __future__ import annotations

from collections.abc import Callable

from tunnel_agent.config import AgentSettings
from tunnel_agent.spool.ingest import Ingest
from tunnel_core.codes import ErrorCode, TargetKind
from tunnel_core.dicom import AssociateRequest, RejectReason
from tunnel_core.frames import OpenPayload
from tunnel_core.mux import ConnectionDraining, StreamLimitReached
from tunnel_core.routing import Destination, decide_destination
from tunnel_link.associations import (
    Association,
    AssociationTracker,
    Decision,
    IngressLimits,
    LocalAnswer,
    serve_caller,
    serve_stream,
)
from tunnel_link.errors import LinkError
from tunnel_link.pipe import Pipe
from tunnel_link.session import MuxSession, TunnelStream

__all__ = ["Carrier"]


class Carrier:
    """Build with the settings, the tracker and where the live session is; hand :meth:`relay_stream` to the
    tunnel as its stream handler and :meth:`local_caller` to the listener's ``PipeServer``."""

    def __init__(self, settings: AgentSettings, tracker: AssociationTracker, *,
                 session: Callable[[], MuxSession | None], ingest: Callable[[], Ingest | None] = lambda: None) -> None:
        self.routes = {r.name: Destination(r.name, r.host, r.port, r.called_ae) for r in settings.routes}
        self.limits = IngressLimits(settings.listener.artim_timeout, settings.listener.max_associate_rq)
        self.connect_timeout = settings.connect_timeout
        self.tracker = tracker
        self._session = session
        self._ingest = ingest

    async def relay_stream(self, stream: TunnelStream) -> None:
        """The relay opened a stream: it may only name one of our routes."""
        def choose(req: AssociateRequest) -> Destination | ErrorCode:
            if stream.open.kind is not TargetKind.ROUTE:
                return ErrorCode.UNKNOWN_ROUTE
            return decide_destination(self.routes, stream.open.target, req.calling_ae)

        await serve_stream(stream, limits=self.limits, choose=choose, connect_timeout=self.connect_timeout,
                           tracker=self.tracker, direction="cloud-to-site")

    async def local_caller(self, pipe: Pipe) -> None:
        """A modality or the PACS connected to the local listener."""
        await serve_caller(pipe, limits=self.limits, decide=self._to_relay, tracker=self.tracker,
                           direction="site-to-cloud")

    async def _to_relay(self, req: AssociateRequest, assoc: Association) -> Decision:
        ingest = self._ingest()
        if ingest is not None and ingest.wants(req.called_ae):
            return LocalAnswer(ingest.serve, route=f"spool:{ingest.destinations[req.called_ae].name}")
        session = self._session()
        if session is None or session.draining:
            return RejectReason.SITE_OFFLINE
        try:
            return await session.open_stream(OpenPayload(TargetKind.CALLED_AE, req.called_ae, req.calling_ae))
        except StreamLimitReached:
            return RejectReason.CAPACITY
        except (ConnectionDraining, LinkError):
            return RejectReason.SITE_OFFLINE
