"""One DICOM association driven over a byte channel: the sans-IO machine, deadlines, and writes.

``tunnel_core.dicom.association.Association`` decides everything; this adapter only moves bytes. It feeds
what the channel read into the machine, hands the events out one at a time, and writes what the machine
queued. Every await on the peer has a deadline (``timeout`` on :meth:`next_event`); when the peer breaks
the protocol, the machine's A-ABORT is written (best effort, bounded) and the channel aborted before the
:class:`~tunnel_core.errors.AssociationError` reaches the caller.

Outcomes a caller handles, all of them documented exceptions: ``TimeoutError`` (the peer was silent past
the read deadline, or left our bytes untaken for ``write_timeout``: abort and end),
:class:`~tunnel_link.channels.ChannelClosed` (the connection broke, the
stream was reset, or the peer ended without releasing), ``AssociationError`` (the peer broke the protocol;
already aborted here).
"""

from __future__ import annotations

import asyncio
import collections

from tunnel_core.dicom.association import Association, Event, State
from tunnel_core.errors import AssociationError
from tunnel_link.channels import ByteChannel, ChannelClosed

__all__ = ["ABORT_WRITE_TIMEOUT", "WRITE_TIMEOUT", "DicomConnection"]

ABORT_WRITE_TIMEOUT = 2.0  # seconds an A-ABORT may take to leave before the channel is cut anyway
WRITE_TIMEOUT = 60.0  # seconds a peer may leave what we queued for it untaken (a full window, no credit)


class DicomConnection:
    """Build with the channel and a fresh ``Association``; ``feed`` any bytes already read (a sniffed
    A-ASSOCIATE-RQ), then loop on :meth:`next_event`, act on the association, and :meth:`flush`."""

    def __init__(self, channel: ByteChannel, association: Association, *,
                 write_timeout: float = WRITE_TIMEOUT) -> None:
        self.channel = channel
        self.write_timeout = write_timeout
        self.association = association
        self.bytes_in = 0
        self.bytes_out = 0
        self._events: collections.deque[Event] = collections.deque()

    def feed(self, data: bytes) -> None:
        """Bytes from the peer that were read elsewhere; their events come out of :meth:`next_event`."""
        self.bytes_in += len(data)
        self._events.extend(self.association.receive_data(data))

    async def next_event(self, timeout: float) -> Event:
        """The next event, reading the peer for at most ``timeout`` seconds per read."""
        while not self._events:
            async with asyncio.timeout(timeout):
                data = await self.channel.read()
            if not data:
                raise ChannelClosed("the peer closed the connection without releasing")
            try:
                self.feed(data)
            except AssociationError as exc:
                await self._send_abort(exc.abort_pdu)
                raise
        return self._events.popleft()

    async def flush(self) -> None:
        """Write what the association queued, waiting at most ``write_timeout`` for the channel to take it."""
        data = self.association.data_to_send()
        if data:
            self.bytes_out += len(data)
            async with asyncio.timeout(self.write_timeout):
                await self.channel.write(data)

    async def abort(self, source: int = 2, reason: int = 0) -> None:
        """A-ABORT the association (bounded), then cut the channel; a closed association only cuts it."""
        if self.association.state is State.CLOSED:
            self.channel.abort()
            return
        self.association.abort(source, reason)
        await self._send_abort(self.association.data_to_send())

    async def _send_abort(self, pdu: bytes) -> None:
        try:
            async with asyncio.timeout(ABORT_WRITE_TIMEOUT):
                await self.channel.write(pdu)
        except (TimeoutError, ChannelClosed):
            pass
        self.channel.abort()
