"""One tunnel connection: many streams, each with its own flow control, over one ordered byte channel.

Theory of operation
-------------------
``Mux`` is sans-IO. The adapter feeds it what arrived (``receive_data``) and gets events back; it calls
``open_stream``/``send_data``/``end_stream``/``reset_stream`` and sends whatever ``data_to_send`` returns.

Streams are numbered by the side that opens them: the agent uses odd ids, the relay even ids, each
strictly increasing, so an id can never be reused and "closed" is derivable from "below the highest id".

Flow control is credit based, per stream and per connection. Every stream and the connection start with
``INITIAL_WINDOW`` of credit (a protocol constant, so an OPEN can be followed by data at once, without a
round trip); the receiving side immediately raises that to its configured window with a WINDOW frame.
Credit is returned only when the adapter calls ``acknowledge`` — which it does after the bytes were written
onward (to the destination socket), not when they arrived. So a receiver that stops reading stops its
sender, and the memory a connection can hold is bounded by its windows. WINDOW frames are sent with
half-window hysteresis so a steady transfer costs one WINDOW per half window.

Contract for the adapter: every byte delivered in a ``DataReceived`` must eventually be acknowledged,
whether it was written onward or discarded, or the connection window leaks.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from tunnel_core import frames as fr
from tunnel_core.codes import ErrorCode, FrameFlag, FrameType
from tunnel_core.errors import FlowControlError, ProtocolError, UsageError
from tunnel_core.limits import INITIAL_WINDOW, MAX_FRAME_PAYLOAD, MAX_REPORT, MuxLimits

MAX_WINDOW = 2**31 - 1


class Role(Enum):
    AGENT = 1  # opens odd stream ids
    RELAY = 2  # opens even stream ids


class StreamState(Enum):
    OPEN = "open"
    HALF_CLOSED_LOCAL = "half-closed-local"  # we sent FIN
    HALF_CLOSED_REMOTE = "half-closed-remote"  # the peer sent FIN
    CLOSED = "closed"


class StreamInput(Enum):
    SEND_DATA = "send-data"
    SEND_FIN = "send-fin"
    RECV_DATA = "recv-data"
    RECV_FIN = "recv-fin"


_S, _I = StreamState, StreamInput
_TRANSITIONS: dict[tuple[StreamState, StreamInput], StreamState] = {
    (_S.OPEN, _I.SEND_DATA): _S.OPEN,
    (_S.OPEN, _I.RECV_DATA): _S.OPEN,
    (_S.OPEN, _I.SEND_FIN): _S.HALF_CLOSED_LOCAL,
    (_S.OPEN, _I.RECV_FIN): _S.HALF_CLOSED_REMOTE,
    (_S.HALF_CLOSED_LOCAL, _I.RECV_DATA): _S.HALF_CLOSED_LOCAL,
    (_S.HALF_CLOSED_LOCAL, _I.RECV_FIN): _S.CLOSED,
    (_S.HALF_CLOSED_REMOTE, _I.SEND_DATA): _S.HALF_CLOSED_REMOTE,
    (_S.HALF_CLOSED_REMOTE, _I.SEND_FIN): _S.CLOSED,
}


class StreamStateError(UsageError):
    """``(state, input)`` has no transition: e.g. data after our own FIN."""


class StreamGone(UsageError):
    """The stream was reset or fully closed; the adapter lost a race with the peer and should stop."""


class StreamLimitReached(UsageError):
    """``max_streams`` streams are open; refuse the new association with 2/3/2."""


class ConnectionDraining(UsageError):
    """A GOAWAY was sent or received: no new streams on this connection."""


# --- events ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StreamOpened:
    stream_id: int
    open: fr.OpenPayload


@dataclass(frozen=True, slots=True)
class DataReceived:
    """``data`` may be a memoryview into the received message: consume it, or copy it to keep it."""

    stream_id: int
    data: bytes | memoryview


@dataclass(frozen=True, slots=True)
class StreamEnded:
    """The peer half-closed: it will send no more data on this stream."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class StreamReset:
    """The stream is gone. ``by_peer`` is False when the mux reset it itself for a peer's fault."""

    stream_id: int
    code: ErrorCode
    by_peer: bool = True


@dataclass(frozen=True, slots=True)
class WindowUpdated:
    """Send credit grew on ``stream_id`` (0: the connection). Wake senders waiting for credit."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class PingReceived:
    opaque: bytes


@dataclass(frozen=True, slots=True)
class PongReceived:
    opaque: bytes


@dataclass(frozen=True, slots=True)
class GoAwayReceived:
    last_stream_id: int
    code: ErrorCode


@dataclass(frozen=True, slots=True)
class ReportReceived:
    """The agent's health report (relay side only): opaque bytes here, JSON to the application."""

    payload: bytes


Event = (StreamOpened | DataReceived | StreamEnded | StreamReset | WindowUpdated | PingReceived
         | PongReceived | GoAwayReceived | ReportReceived)


# --- streams --------------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Stream:
    id: int
    state: StreamState = StreamState.OPEN
    send_window: int = INITIAL_WINDOW  # credit the peer gave us
    recv_window: int = INITIAL_WINDOW  # credit we gave the peer, not yet used
    delivered: int = 0  # bytes handed to the adapter and not yet acknowledged
    unacked_credit: int = 0  # acknowledged bytes not yet returned as a WINDOW frame
    owed: int = 0  # configured window above INITIAL_WINDOW, not yet granted

    def advance(self, what: StreamInput) -> StreamState:
        try:
            self.state = _TRANSITIONS[(self.state, what)]
        except KeyError:
            raise StreamStateError(f"stream {self.id}: {what.value} not allowed in {self.state.value}") from None
        return self.state


class Mux:
    """The sans-IO state of one tunnel connection. See the module docstring for the calling contract."""

    def __init__(self, role: Role, limits: MuxLimits | None = None) -> None:
        self.role = role
        self.limits = limits or MuxLimits()
        self._parser = fr.FrameParser(MAX_FRAME_PAYLOAD)
        self._out = bytearray()  # encoded frames, back to back
        self._frame_ends: list[int] = []  # offset after each frame in _out, for data_to_send(max_bytes)
        self._streams: dict[int, _Stream] = {}
        self._next_local_id = 1 if role is Role.AGENT else 2
        self._last_remote_id = 0
        self._conn_send_window = INITIAL_WINDOW
        self._conn_recv_window = self.limits.connection_window
        self._conn_delivered = 0
        self._conn_unacked_credit = 0
        self.goaway_sent = False
        self.goaway_received = False
        extra = self.limits.connection_window - INITIAL_WINDOW
        if extra:
            self._queue(FrameType.WINDOW, 0, fr.encode_window(extra))

    # --- queries --------------------------------------------------------------------------------------

    @property
    def stream_count(self) -> int:
        return len(self._streams)

    def stream_ids(self) -> list[int]:
        return list(self._streams)

    def stream_state(self, stream_id: int) -> StreamState:
        stream = self._streams.get(stream_id)
        return stream.state if stream else StreamState.CLOSED

    def send_window(self, stream_id: int) -> int:
        """Bytes ``send_data`` would accept now on ``stream_id`` (0 if the stream is gone)."""
        stream = self._streams.get(stream_id)
        if stream is None:
            return 0
        return max(0, min(stream.send_window, self._conn_send_window))

    @property
    def connection_send_window(self) -> int:
        return self._conn_send_window

    @property
    def connection_recv_window(self) -> int:
        return self._conn_recv_window

    def has_data_to_send(self) -> bool:
        return bool(self._out)

    def data_to_send(self, max_bytes: int | None = None) -> bytearray:
        """Queued frames for the peer, in order, removed from the queue. The caller owns the bytearray.

        With ``max_bytes``, returns whole frames up to about that size (always at least one frame), so an
        adapter can keep each transport message bounded; call again while ``has_data_to_send()``.
        """
        if max_bytes is None or len(self._out) <= max_bytes:
            out = self._out
            self._out = bytearray()
            self._frame_ends.clear()
            return out
        cut = self._frame_ends[0]
        for end in self._frame_ends:
            if end > max_bytes:
                break
            cut = end
        out = self._out[:cut]
        del self._out[:cut]
        self._frame_ends = [end - cut for end in self._frame_ends if end > cut]
        return out

    # --- local actions --------------------------------------------------------------------------------

    def open_stream(self, open_payload: fr.OpenPayload) -> int:
        """Open a stream and return its id. Data may follow at once, within the initial window."""
        if self.goaway_sent or self.goaway_received:
            raise ConnectionDraining("connection is draining; open the stream elsewhere")
        if len(self._streams) >= self.limits.max_streams:
            raise StreamLimitReached(f"{self.limits.max_streams} streams already open")
        payload = fr.encode_open(open_payload)
        stream_id = self._next_local_id
        self._next_local_id += 2
        self._queue(FrameType.OPEN, stream_id, payload)
        self._add_stream(stream_id)
        return stream_id

    def send_data(self, stream_id: int, data: bytes | memoryview) -> int:
        """Queue as much of ``data`` as the windows allow; return how many bytes were taken."""
        stream = self._live(stream_id)
        stream.advance(StreamInput.SEND_DATA)
        n = min(len(data), stream.send_window, self._conn_send_window)
        if n <= 0:
            return 0
        step = self.limits.max_frame_payload
        view = memoryview(data)
        for start in range(0, n, step):
            self._queue(FrameType.DATA, stream_id, view[start:min(n, start + step)])
        stream.send_window -= n
        self._conn_send_window -= n
        return n

    def end_stream(self, stream_id: int) -> None:
        """Half-close: we send no more data. The stream closes when the peer has half-closed too."""
        stream = self._live(stream_id)
        state = stream.advance(StreamInput.SEND_FIN)
        self._queue(FrameType.FIN, stream_id)
        if state is StreamState.CLOSED:
            self._remove(stream)

    def reset_stream(self, stream_id: int, code: ErrorCode) -> None:
        """Abort the stream in both directions. A no-op if it is already gone."""
        stream = self._streams.get(stream_id)
        if stream is None:
            return
        self._queue(FrameType.RESET, stream_id, fr.encode_reset(code))
        self._remove(stream)

    def acknowledge(self, stream_id: int, n: int) -> None:
        """``n`` delivered bytes of ``stream_id`` were written onward (or discarded): return the credit.

        Checks everything before changing anything, so a refused call leaves no trace.
        """
        if n < 0 or n > self._conn_delivered:
            raise UsageError(f"acknowledged {n} bytes but only {self._conn_delivered} are outstanding")
        stream = self._streams.get(stream_id)
        if stream is not None and n > stream.delivered:
            raise UsageError(f"stream {stream_id}: acknowledged {n} of {stream.delivered} bytes")
        self._conn_delivered -= n
        self._conn_unacked_credit += n
        self._return_connection_credit()
        if stream is None:
            return
        stream.delivered -= n
        if stream.state in (StreamState.HALF_CLOSED_REMOTE, StreamState.CLOSED):
            return  # the peer sends no more; no credit needed
        stream.unacked_credit += n
        owed_now = stream.owed and stream.recv_window < INITIAL_WINDOW // 2
        if stream.unacked_credit >= self.limits.stream_window // 2 or owed_now:
            credit = stream.unacked_credit + stream.owed
            self._grant(stream_id, credit)
            stream.recv_window += credit
            stream.unacked_credit = stream.owed = 0

    def _return_connection_credit(self) -> None:
        """Half-window hysteresis, except when the peer has less credit left than we hold back.

        Without the exception, streams whose receivers stalled can hold more than half the connection
        window, the live streams' acknowledgements never reach the threshold, and the whole tunnel stops.
        """
        half = self.limits.connection_window // 2
        credit = self._conn_unacked_credit
        if credit and (credit >= half or credit >= self._conn_recv_window):
            self._grant(0, credit)
            self._conn_recv_window += credit
            self._conn_unacked_credit = 0

    def ping(self, opaque: bytes) -> None:
        if len(opaque) != fr.PING_PAYLOAD_SIZE:
            raise UsageError("ping payload must be 8 bytes")
        self._queue(FrameType.PING, 0, opaque)

    def send_report(self, payload: bytes) -> None:
        """Queue a REPORT (agent only): the agent's health as a JSON object of at most MAX_REPORT bytes."""
        if self.role is not Role.AGENT:
            raise UsageError("only the agent sends REPORT frames")
        if len(payload) > MAX_REPORT:
            raise UsageError(f"a report is at most {MAX_REPORT} bytes, not {len(payload)}")
        self._queue(FrameType.REPORT, 0, payload)

    def go_away(self, code: ErrorCode = ErrorCode.NO_ERROR) -> None:
        """Announce drain: the peer opens no new streams here; open ones may finish."""
        if not self.goaway_sent:
            self.goaway_sent = True
            self._queue(FrameType.GOAWAY, 0, fr.encode_goaway(self._last_remote_id, code))

    # --- input ----------------------------------------------------------------------------------------

    def receive_data(self, data: bytes) -> list[Event]:
        """Feed bytes from the peer. Raises ProtocolError (carrying its GOAWAY code) for fatal faults."""
        events: list[Event] = []
        for frame in self._parser.feed(data):
            handler = _HANDLERS[frame.type]
            handler(self, frame, events)
        return events

    def _on_data(self, frame: fr.Frame, events: list[Event]) -> None:
        n = len(frame.payload)
        self._require_stream_frame(frame)
        if n > self._conn_recv_window:
            raise FlowControlError(f"connection window exceeded by {n - self._conn_recv_window} bytes")
        self._conn_recv_window -= n
        stream = self._streams.get(frame.stream_id)
        if stream is None or not n:
            self._discard(n)
            return
        if n > stream.recv_window or stream.state not in (StreamState.OPEN, StreamState.HALF_CLOSED_LOCAL):
            code = ErrorCode.FLOW_CONTROL_ERROR if n > stream.recv_window else ErrorCode.PROTOCOL_ERROR
            self._discard(n)
            self._reset_for_fault(stream, code, events)
            return
        stream.recv_window -= n
        stream.delivered += n
        self._conn_delivered += n
        events.append(DataReceived(stream.id, frame.payload))

    def _on_open(self, frame: fr.Frame, events: list[Event]) -> None:
        sid = frame.stream_id
        if sid == 0 or (sid % 2 == 1) != (self.role is Role.RELAY) or sid <= self._last_remote_id:
            raise ProtocolError(f"OPEN with invalid stream id {sid}")
        self._last_remote_id = sid
        payload = fr.decode_open(frame.payload)
        if self.goaway_sent:
            self._queue(FrameType.RESET, sid, fr.encode_reset(ErrorCode.GOING_AWAY))
        elif len(self._streams) >= self.limits.max_streams:
            self._queue(FrameType.RESET, sid, fr.encode_reset(ErrorCode.CAPACITY))
        else:
            self._add_stream(sid)
            events.append(StreamOpened(sid, payload))

    def _on_window(self, frame: fr.Frame, events: list[Event]) -> None:
        increment = fr.decode_window(frame.payload)
        if frame.stream_id == 0:
            if self._conn_send_window + increment > MAX_WINDOW:
                raise FlowControlError("connection send window overflow")
            self._conn_send_window += increment
            events.append(WindowUpdated(0))
            return
        self._require_stream_frame(frame)
        stream = self._streams.get(frame.stream_id)
        if stream is None:
            return
        if stream.send_window + increment > MAX_WINDOW:
            self._reset_for_fault(stream, ErrorCode.FLOW_CONTROL_ERROR, events)
            return
        stream.send_window += increment
        events.append(WindowUpdated(stream.id))

    def _on_fin(self, frame: fr.Frame, events: list[Event]) -> None:
        self._require_stream_frame(frame)
        stream = self._streams.get(frame.stream_id)
        if stream is None:
            return
        try:
            state = stream.advance(StreamInput.RECV_FIN)
        except StreamStateError:
            self._reset_for_fault(stream, ErrorCode.PROTOCOL_ERROR, events)
            return
        events.append(StreamEnded(stream.id))
        if state is StreamState.CLOSED:
            self._remove(stream)

    def _on_reset(self, frame: fr.Frame, events: list[Event]) -> None:
        self._require_stream_frame(frame)
        code = fr.decode_reset(frame.payload)
        stream = self._streams.get(frame.stream_id)
        if stream is not None:
            self._remove(stream)
            events.append(StreamReset(stream.id, code, by_peer=True))

    def _on_ping(self, frame: fr.Frame, events: list[Event]) -> None:
        if frame.stream_id != 0 or len(frame.payload) != fr.PING_PAYLOAD_SIZE:
            raise ProtocolError("PING must be on stream 0 with an 8-byte payload")
        if fr.is_pong(frame):
            events.append(PongReceived(frame.payload))
        else:
            self._queue(FrameType.PING, 0, frame.payload, FrameFlag.ACK)
            events.append(PingReceived(frame.payload))

    def _on_goaway(self, frame: fr.Frame, events: list[Event]) -> None:
        if frame.stream_id != 0:
            raise ProtocolError("GOAWAY must be on stream 0")
        last, code = fr.decode_goaway(frame.payload)
        self.goaway_received = True
        events.append(GoAwayReceived(last, code))

    def _on_report(self, frame: fr.Frame, events: list[Event]) -> None:
        if frame.stream_id != 0:
            raise ProtocolError("REPORT must be on stream 0")
        if self.role is not Role.RELAY:
            raise ProtocolError("REPORT is sent by the agent only")
        if len(frame.payload) > MAX_REPORT:
            raise ProtocolError(f"REPORT of {len(frame.payload)} bytes exceeds {MAX_REPORT}")
        events.append(ReportReceived(bytes(frame.payload)))

    # --- helpers --------------------------------------------------------------------------------------

    def _require_stream_frame(self, frame: fr.Frame) -> None:
        sid = frame.stream_id
        if sid == 0:
            raise ProtocolError(f"{frame.type.name} frame on stream 0")
        local = (sid % 2 == 1) == (self.role is Role.AGENT)
        opened = sid < self._next_local_id if local else sid <= self._last_remote_id
        if not opened:
            raise ProtocolError(f"{frame.type.name} frame on stream {sid}, which was never opened")

    def _add_stream(self, stream_id: int) -> None:
        # The credit above INITIAL_WINDOW is owed, not sent: it goes out with the first WINDOW, once the
        # peer has used half the initial window. A request/response exchange (C-ECHO, C-FIND) then never
        # costs a WINDOW frame, and a bulk transfer gets the full window before it can stall.
        self._streams[stream_id] = _Stream(stream_id, owed=self.limits.stream_window - INITIAL_WINDOW)

    def _live(self, stream_id: int) -> _Stream:
        stream = self._streams.get(stream_id)
        if stream is None:
            raise StreamGone(f"stream {stream_id} is closed or was reset")
        return stream

    def _remove(self, stream: _Stream) -> None:
        stream.state = StreamState.CLOSED
        del self._streams[stream.id]

    def _reset_for_fault(self, stream: _Stream, code: ErrorCode, events: list[Event]) -> None:
        self.reset_stream(stream.id, code)
        events.append(StreamReset(stream.id, code, by_peer=False))

    def _discard(self, n: int) -> None:
        """Bytes for a stream that is gone: return their connection credit at once."""
        if n:
            self._conn_delivered += n
            self.acknowledge(0, n)

    def _grant(self, stream_id: int, increment: int) -> None:
        self._queue(FrameType.WINDOW, stream_id, fr.encode_window(increment))

    def _queue(self, frame_type: FrameType, stream_id: int, payload: bytes | memoryview = b"", flags: int = 0) -> None:
        out = self._out
        out += fr.HEADER.pack(fr.VERSION, frame_type, flags, 0, stream_id, len(payload))
        out += payload  # the one copy of the payload on the sending side
        self._frame_ends.append(len(out))


_HANDLERS = {
    FrameType.DATA: Mux._on_data,
    FrameType.OPEN: Mux._on_open,
    FrameType.WINDOW: Mux._on_window,
    FrameType.FIN: Mux._on_fin,
    FrameType.RESET: Mux._on_reset,
    FrameType.PING: Mux._on_ping,
    FrameType.GOAWAY: Mux._on_goaway,
    FrameType.REPORT: Mux._on_report,
}
