"""Copying one association between its TCP socket and its tunnel stream, both ways, from callbacks.

Why callbacks and not two pump tasks: each task hop is an event-loop turn, and a request/response
protocol like DICOM pays every hop on every turn (C-STORE waits for each response). Here bytes from the
socket go into the mux and out to the WebSocket within the socket's own ``data_received``, and bytes from
the stream go to the socket within the session's read loop.

The splice talks to the stream alone (``TunnelStream.send/end/consumed/reset_nowait``), which keeps the
credit accounting; what the splice decides is *when* bytes count as consumed. Flow control, end to end:
- socket → stream: what the stream's credit does not take waits in ``_pending`` and the socket stops
  reading; it also pauses while the tunnel's send buffer is congested. ``stream_writable`` resumes it.
- stream → socket: bytes are consumed once they were handed to the socket's transport and that
  transport is below its high-water mark; while it is above, they wait for ``socket_writable``.
A reset before the far end answered becomes an A-ASSOCIATE-RJ for the caller, after that an A-ABORT.
"""

from __future__ import annotations

import asyncio

from tunnel_core import dicom
from tunnel_core.codes import ErrorCode
from tunnel_core.routing import reject_for_reset
from tunnel_link.pipe import Pipe
from tunnel_link.session import TunnelStream


class Splice:
    """Create, then ``await run(first)``; returns the outcome for the association's log line."""

    def __init__(self, stream: TunnelStream, pipe: Pipe, *, ingress: bool) -> None:
        self.stream = stream
        self.pipe = pipe
        self.ingress = ingress  # the socket is the caller's (else: the destination's)
        self.answered = not ingress  # has the far end sent anything yet? (egress: the RQ went out)
        self.from_socket = 0
        self.to_socket = 0
        self._pending = b""
        self._socket_eof = False  # EOF from the socket, FIN not yet sent (waits for _pending)
        self._up_done = False  # socket → stream finished (FIN sent)
        self._down_done = False  # stream → socket finished (EOF written)
        self._unconsumed = 0  # written to the socket, not yet consumed (the socket is congested)
        self._outcome = "completed"
        self._done: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    async def run(self, first: bytes, first_credit: int = 0) -> str:
        """``first``: the sniffed A-ASSOCIATE-RQ (and any bytes after it), sent before anything else —
        into the stream on the ingress side, to the socket on the egress side, where ``first_credit``
        stream bytes it came from are acknowledged."""
        if self.ingress:
            self.socket_data(first)
        else:
            self.pipe.write(first)
            self._written(first_credit)
        self.stream.attach(self)
        self.pipe.attach(self)
        try:
            return await self._done
        finally:
            self.pipe.close()

    # --- socket → stream ---------------------------------------------------------------------------------

    def socket_data(self, data: bytes) -> None:
        if self._done.done():
            return
        self.from_socket += len(data)
        if self._pending:
            self._pending += data
            self.pipe.pause()  # still waiting for credit (a resume of the pipe may have let this in)
        else:
            self._push(data)

    def _push(self, data: bytes | memoryview) -> None:
        n = self.stream.send(data)
        if n < len(data):
            self._pending = bytes(memoryview(data)[n:])
        if self._pending or not self.stream.writable:
            self.pipe.pause()  # stream_writable() follows

    def stream_writable(self) -> None:
        """More credit arrived, or the tunnel's send buffer drained."""
        if self._done.done():
            return
        if self._pending:
            data, self._pending = self._pending, b""
            self._push(data)
        if self._pending or not self.stream.writable:
            return
        self.pipe.resume()
        if self._socket_eof:
            self._send_fin()

    def socket_eof(self) -> None:
        self._socket_eof = True
        if not self._pending:
            self._send_fin()

    def _send_fin(self) -> None:
        if self._up_done or self._done.done():
            return
        self._up_done = True
        if self.stream.end():
            self._maybe_complete()

    def socket_lost(self, exc: BaseException | None) -> None:
        if self._done.done():
            return
        if exc is not None or not (self._up_done and self._down_done):
            self._finish("aborted:socket-error" if exc is not None else "aborted:socket-closed")
            self.stream.reset_nowait(ErrorCode.ABORTED)

    # --- stream → socket ---------------------------------------------------------------------------------

    def stream_data(self, data: bytes | memoryview) -> None:
        if self._done.done():
            self.stream.consumed(len(data))  # dropped
            return
        self.answered = True
        self.to_socket += len(data)
        try:
            self.pipe.write(data)
        except ConnectionError:
            self.stream.consumed(len(data))  # dropped
            return
        self._written(len(data))

    def _written(self, n: int) -> None:
        """``n`` stream bytes are in the socket's transport: consumed, unless that transport is congested."""
        self._unconsumed += n
        if not self.pipe.write_congested and self._unconsumed:
            n, self._unconsumed = self._unconsumed, 0
            self.stream.consumed(n)

    def socket_writable(self) -> None:
        self._written(0)

    def stream_eof(self) -> None:
        self._down_done = True
        self.pipe.write_eof()
        self._maybe_complete()

    def stream_reset(self, code: ErrorCode) -> None:
        if self._done.done():
            return
        if not self.pipe.is_closing():
            rejected = self.ingress and not self.answered
            self.pipe.write(dicom.associate_reject(reject_for_reset(code)) if rejected else dicom.abort())
        self._finish(f"reset:{code.name.lower()}")

    # --- ending ------------------------------------------------------------------------------------------

    def _maybe_complete(self) -> None:
        if self._up_done and self._down_done:
            self._finish("completed")

    def _finish(self, outcome: str) -> None:
        if not self._done.done():
            self._done.set_result(outcome)
