"""Copying one association between its TCP socket and its tunnel stream, both ways, from callbacks.

Why callbacks and not two pump tasks: each task hop is an event-loop turn, and a request/response
protocol like DICOM pays every hop on every turn (C-STORE waits for each response). Here bytes from the
socket go into the mux and out to the WebSocket within the socket's own ``data_received``, and bytes from
the stream go to the socket within the session's read loop.

Flow control, end to end:
- socket → stream: what the stream's window does not take waits in ``_pending`` and the socket stops
  reading until credit comes back; the socket also pauses while the WebSocket's buffer is congested.
- stream → socket: credit is returned once the bytes were handed to the socket's transport and that
  transport is below its high-water mark; while it is above, credit waits for ``socket_writable``.
A reset before the far end answered becomes an A-ASSOCIATE-RJ for the caller, after that an A-ABORT.
"""

from __future__ import annotations

import asyncio

from tunnel_core import dicom
from tunnel_core import mux as m
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
        self._mux = stream.session.mux
        self._pending = b""
        self._socket_eof = False  # EOF from the socket, FIN not yet sent (waits for _pending)
        self._up_done = False  # socket → stream finished (FIN sent)
        self._down_done = False  # stream → socket finished (EOF written)
        self._unacked = 0  # written to the socket, credit not yet returned
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
        else:
            self._push(data)

    def _push(self, data: bytes | memoryview) -> None:
        try:
            n = self._mux.send_data(self.stream.id, data)
        except m.UsageError:
            return  # the stream is gone; its reset is being delivered
        if n < len(data):
            self._pending = bytes(memoryview(data)[n:])
            self.pipe.pause()
        self.stream.session.flush_nowait()
        if self.stream.session.congested and not self._pending:
            self.pipe.pause()
            self.stream.session.when_drained(self._ws_drained)

    def stream_credit(self) -> None:
        if not self._pending or self._done.done():
            return
        data, self._pending = self._pending, b""
        self._push(data)
        if not self._pending:
            self.pipe.resume()
            if self._socket_eof:
                self._send_fin()

    def _ws_drained(self) -> None:
        if not self._pending and not self._done.done():
            self.pipe.resume()

    def socket_eof(self) -> None:
        self._socket_eof = True
        if not self._pending:
            self._send_fin()

    def _send_fin(self) -> None:
        if self._up_done or self._done.done():
            return
        self._up_done = True
        try:
            self._mux.end_stream(self.stream.id)
        except m.UsageError:
            return
        self.stream.session.flush_nowait()
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
            self._mux.acknowledge(self.stream.id, len(data))  # discarded: return the credit
            return
        self.answered = True
        self.to_socket += len(data)
        try:
            self.pipe.write(data)
        except ConnectionError:
            self._mux.acknowledge(self.stream.id, len(data))
            return
        self._written(len(data))

    def _written(self, n: int) -> None:
        """``n`` stream bytes are in the socket's transport: return their credit unless it is congested."""
        self._unacked += n
        if not self.pipe.write_congested and self._unacked:
            n, self._unacked = self._unacked, 0
            self._mux.acknowledge(self.stream.id, n)
            self.stream.session.flush_nowait()

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
