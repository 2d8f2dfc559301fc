"""One tunnel connection: many streams, each with its own flow control, over one ordered byte channel.

Theory of operation
-------------------
``Mux`` is sans-IO. The adapter feeds it what arrived (``receive_data``) and gets events back; it calls
``open_stream``/``send_data``/``end_stream``/``reset_stream`` and sends whatever ``data_to_send`` returns.

Streams are numbered by the side that opens them: the agent uses odd ids, the relay even ids, each
strictly increasing, so an id can never be reused and "closed" is derivable from "below the highest id".

Flow control is credit based, per stream and per connection, and both are one type,
:class:`tunnel_core.windows.Window`. Every stream and the connection start with ``INITIAL_WINDOW`` of
credit (a protocol constant, so an OPEN can be followed by data at once, without a round trip); the
connection's configured window is announced in the first frame, a stream's as soon as the peer has used
half its initial window. Credit is returned only when the adapter calls ``acknowledge`` — which it does
after the bytes were written onward (to the destination socket), not when they arrived. So a receiver that
stops reading stops its sender, and the memory a connection can hold is bounded by its windows. WINDOW
frames are sent with half-window hysteresis so a steady transfer costs one WINDOW per half window.

Keepalive runs from the mux's own timer (``start_keepalive``): the adapter arms one timer at
``next_deadline()`` and calls ``handle_timer(now)``, which queues the PING when one is due and returns the
verdict on a dead peer (``PeerDead``, ``PeerNotReading``) as an event. Time is always a parameter: pass
``now`` to ``receive_data`` (any message counts as life, a pong gives the RTT) and report a full send
buffer with ``send_blocked(now)`` / ``send_drained()``.

A frame of a type this side does not know is ignored (after its header passed the version and length
checks), so a new frame type never needs a new protocol version. A side that has used its last stream id
sends GOAWAY and refuses further opens (``StreamIdsExhausted``): its adapter then ends the connection
once the open streams have finished, and a new connection starts with fresh ids.

Contract for the adapter: every byte delivered in a ``DataReceived`` must eventually be acknowledged,
whether it was written onward or discarded, or the connection window leaks.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from tunnel_core import frames as fr
from tunnel_core.codes import ErrorCode, FrameFlag, FrameType
from tunnel_core.errors import FlowControlError, ProtocolError, UsageError
from tunnel_core.heartbeat import Heartbeat, PeerDead, PeerNotReading, SendPing
from tunnel_core.limits import MAX_FRAME_PAYLOAD, MAX_REPORT, MAX_STREAM_ID, MuxLimits
from tunnel_core.windows import MAX_WINDOW, Window

__all__ = [
    "MAX_WINDOW", "ConnectionDraining", "DataReceived", "Event", "GoAwayReceived", "Mux", "PeerDead",
    "PeerNotReading", "PingReceived", "PongReceived", "ReportReceived", "Role", "StreamEnded", "StreamGone",
    "StreamIdsExhausted", "StreamInput", "StreamLimitReached", "StreamOpened", "StreamReset", "StreamState",
    "StreamStateError", "UsageError", "WindowUpdated",
]


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


class StreamIdsExhausted(ConnectionDraining):
    """This side has opened a stream with its last id: it sent GOAWAY; open the stream on a new connection."""


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


# ``PeerDead`` and ``PeerNotReading`` (from ``tunnel_core.heartbeat``) come from ``handle_timer`` only.
Event = (StreamOpened | DataReceived | StreamEnded | StreamReset | WindowUpdated | PingReceived
         | PongReceived | GoAwayReceived | ReportReceived | PeerDead | PeerNotReading)


# --- streams --------------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Stream:
    id: int
    window: Window
    state: StreamState = StreamState.OPEN

    def advance(self, what: StreamInput) -> StreamState:
        try:
            self.state = _TRANSITIONS[(self.state, what)]
        except KeyError:
            raise StreamStateError(f"stream {self.id}: {what.value} not allowed in {self.state.value}") from None
        return self.state


class Mux:
    """The sans-IO state of one tunnel connection. See the module docstring for the calling contract."""

    def __init__(self, role: Role, limits: MuxLimits | None = None, *, max_stream_id: int = MAX_STREAM_ID) -> None:
        """``max_stream_id``: the highest id this side opens a stream with (the protocol's u32 maximum;
        lower only to exercise running out of ids without opening four billion streams)."""
        if not 2 <= max_stream_id <= MAX_STREAM_ID:
            raise ValueError(f"max_stream_id must be between 2 and {MAX_STREAM_ID}")
        self.role = role
        self.limits = limits or MuxLimits()
        self._max_stream_id = max_stream_id
        self._parser = fr.FrameParser(MAX_FRAME_PAYLOAD)
        self._out = bytearray()  # encoded frames, back to back
        self._frame_ends: list[int] = []  # offset after each frame in _out, for data_to_send(max_bytes)
        self._streams: dict[int, _Stream] = {}
        self._next_local_id = 1 if role is Role.AGENT else 2
        self._last_remote_id = 0
        self._conn = Window(self.limits.connection_window, return_when_exhausted=True)
        self._heartbeat: Heartbeat | None = None
        self._now: float | None = None  # the ``now`` of the receive_data call in progress
        self.goaway_sent = False
        self.goaway_received = False
        self.stream_ids_exhausted = False
        extra = self._conn.grant_owed()
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
        return max(0, min(stream.window.send, self._conn.send))

    @property
    def connection_send_window(self) -> int:
        return self._conn.send

    @property
    def connection_recv_window(self) -> int:
        return self._conn.recv

    @property
    def connection_unreturned(self) -> int:
        """Bytes consumed whose credit is not yet returned (it goes back in batches, docs/protocol.md §6.2)."""
        return self._conn.unreturned

    @property
    def bytes_held(self) -> int:
        """Bytes delivered to the application and not yet acknowledged, over all streams."""
        return self._conn.held

    @property
    def frames_ignored(self) -> int:
        """Frames of a type this side does not know, received and ignored (a newer peer's extensions)."""
        return self._parser.ignored

    @property
    def rtt(self) -> float | None:
        """The round trip of the latest answered keepalive PING, in seconds (None before the first)."""
        return self._heartbeat.rtt if self._heartbeat is not None else None

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
        """Open a stream and return its id. Data may follow at once, within the initial window.

        Raises ``ConnectionDraining`` after a GOAWAY, ``StreamIdsExhausted`` (a ``ConnectionDraining``) when
        this side's ids are used up — the mux then queues its own GOAWAY — and ``StreamLimitReached``."""
        if self.goaway_sent or self.goaway_received:
            raise ConnectionDraining("connection is draining; open the stream elsewhere")
        if self._next_local_id > self._max_stream_id:
            self.stream_ids_exhausted = True
            self.go_away(ErrorCode.NO_ERROR)
            raise StreamIdsExhausted(f"every stream id up to {self._max_stream_id} was used on this connection")
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
        n = min(len(data), stream.window.send, self._conn.send)
        if n <= 0:
            return 0
        step = self.limits.max_frame_payload
        view = memoryview(data)
        for start in range(0, n, step):
            self._queue(FrameType.DATA, stream_id, view[start:min(n, start + step)])
        stream.window.spend(n)
        self._conn.spend(n)
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

        Checks everything before changing anything, so a refused call leaves no trace. The connection's
        window returns credit also when the peer has less left than we hold back (``Window``'s
        ``return_when_exhausted``): otherwise streams whose receivers stalled could hold more than half the
        connection window, the live streams' acknowledgements would never reach the threshold, and the
        whole tunnel would stop.
        """
        self._conn.check_consume(n)
        stream = self._streams.get(stream_id)
        if stream is not None:
            stream.window.check_consume(n)
        increment = self._conn.consume(n)
        if increment:
            self._grant(0, increment)
        if stream is None:
            return
        # After the peer's FIN it sends no more on this stream: its credit is not returned.
        returning = stream.state not in (StreamState.HALF_CLOSED_REMOTE, StreamState.CLOSED)
        increment = stream.window.consume(n, returning=returning)
        if increment:
            self._grant(stream_id, increment)

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

    # --- keepalive: time is a parameter -----------------------------------------------------------------

    def start_keepalive(self, interval: float, now: float, misses: int = 3) -> None:
        """PING every ``interval`` seconds from now on; the peer is dead after ``misses`` silent intervals
        (or ``misses`` intervals of a send buffer that does not drain). Then arm a timer at
        ``next_deadline()`` and call ``handle_timer`` when it fires."""
        if self._heartbeat is not None:
            raise UsageError("keepalive already started")
        self._heartbeat = Heartbeat(interval, now, misses)

    def next_deadline(self) -> float | None:
        """When ``handle_timer`` must run next (None: no keepalive). Re-read it after every call."""
        return self._heartbeat.next_deadline() if self._heartbeat is not None else None

    def handle_timer(self, now: float) -> list[Event]:
        """The timer fired: queue a PING if one is due; returns ``[PeerDead]`` or ``[PeerNotReading]`` when
        the peer is to be given up (close the transport without waiting on it), else ``[]``."""
        if self._heartbeat is None:
            return []
        action = self._heartbeat.poll(now)
        if isinstance(action, SendPing):
            self.ping(action.opaque)
            return []
        return [action] if action is not None else []

    def send_blocked(self, now: float) -> None:
        """A write found the transport's send buffer full: the peer may have stopped reading."""
        if self._heartbeat is not None:
            self._heartbeat.on_send_blocked(now)

    def send_drained(self) -> None:
        """The send buffer drained again: the peer reads."""
        if self._heartbeat is not None:
            self._heartbeat.on_send_drained()

    # --- input ----------------------------------------------------------------------------------------

    def receive_data(self, data: bytes, now: float | None = None) -> list[Event]:
        """Feed bytes from the peer. Raises ProtocolError (carrying its GOAWAY code) for fatal faults.

        ``now``: when they arrived, for keepalive (anything received counts as life; a pong gives the RTT).
        """
        if now is not None and self._heartbeat is not None:
            self._heartbeat.on_activity(now)
        self._now = now
        events: list[Event] = []
        for frame in self._parser.feed(data):
            handler = _HANDLERS[frame.type]
            handler(self, frame, events)
        return events

    def _on_data(self, frame: fr.Frame, events: list[Event]) -> None:
        n = len(frame.payload)
        self._require_stream_frame(frame)
        conn = self._conn
        if not conn.fits(n):
            raise FlowControlError(f"connection window exceeded by {n - conn.recv} bytes")
        conn.arrived(n)
        stream = self._streams.get(frame.stream_id)
        if stream is None or not n:
            self._discard(n)
            return
        window = stream.window
        if not window.fits(n) or stream.state not in (StreamState.OPEN, StreamState.HALF_CLOSED_LOCAL):
            code = ErrorCode.FLOW_CONTROL_ERROR if not window.fits(n) else ErrorCode.PROTOCOL_ERROR
            self._discard(n)
            self._reset_for_fault(stream, code, events)
            return
        window.arrived(n)
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
            if not self._conn.raise_send(increment):
                raise FlowControlError("connection send window overflow")
            events.append(WindowUpdated(0))
            return
        self._require_stream_frame(frame)
        stream = self._streams.get(frame.stream_id)
        if stream is None:
            return
        if not stream.window.raise_send(increment):
            self._reset_for_fault(stream, ErrorCode.FLOW_CONTROL_ERROR, events)
            return
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
            if self._heartbeat is not None and self._now is not None:
                self._heartbeat.on_pong(frame.payload, self._now)
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
        self._streams[stream_id] = _Stream(stream_id, Window(self.limits.stream_window))

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
        """Arrived bytes nobody will get (the stream is gone or faulted): return their connection credit."""
        if n:
            increment = self._conn.consume(n)
            if increment:
                self._grant(0, increment)

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
