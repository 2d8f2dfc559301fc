"""Mux frame codec: a fixed 12-byte header and a bounded payload.

Theory of operation: frames are carried in WebSocket binary messages, but the parser treats its input as
a byte stream, so a message may hold several frames and a frame may, in principle, span messages. The
header is read first; its length is checked against ``max_payload`` *before* any payload is buffered, so a
hostile 4 GiB length costs nothing. ``FrameParser.feed`` accepts any chunking and returns complete frames;
a frame split into many chunks is appended to one buffer, never re-joined per chunk, so a peer that drips
bytes pays for them linearly.

A frame whose type this side does not know is checked like any other (version, length against
``max_payload``) and then dropped, counted in ``ignored``: a newer peer may add frame types that an older
one safely ignores (docs/protocol.md §2.2), so a new frame type needs no new protocol version.

Header (network byte order)::

    0       1       2       3       4               8              12
    +-------+-------+-------+-------+---------------+---------------+-----------
    |version| type  | flags | rsvd  |  stream id    |  length       | payload…
    +-------+-------+-------+-------+---------------+---------------+-----------
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from tunnel_core.codes import ErrorCode, FrameFlag, FrameType, TargetKind
from tunnel_core.errors import FrameTooLarge, ProtocolError

VERSION = 1
HEADER = struct.Struct("!BBBBII")
HEADER_SIZE = HEADER.size
_U32 = struct.Struct("!I")
_RESET = struct.Struct("!H")
_GOAWAY = struct.Struct("!IH")
PING_PAYLOAD_SIZE = 8
MAX_NAME = 64


@dataclass(frozen=True, slots=True)
class Frame:
    type: FrameType
    stream_id: int
    payload: bytes | memoryview = b""
    flags: int = 0


def encode(frame_type: FrameType, stream_id: int, payload: bytes | memoryview = b"", flags: int = 0) -> bytes:
    """Header plus payload as one bytes object, ready to be sent (the payload is copied once, here)."""
    return HEADER.pack(VERSION, frame_type, flags, 0, stream_id, len(payload)) + payload


class FrameParser:
    """Incremental parser. Call ``feed(data)`` with any chunk; it returns the frames completed by it.

    DATA payloads are zero-copy ``memoryview`` slices of the chunk they arrived in (the usual case is one
    whole frame per WebSocket message); other payloads are small ``bytes``. A frame split across chunks is
    collected by appending to one buffer and copied out once when it completes, so the cost stays linear
    in the bytes received however finely a peer splits its frames (``copied`` counts those bytes).
    """

    def __init__(self, max_payload: int) -> None:
        self._max_payload = max_payload
        self._partial = bytearray()  # the start of a frame that has not completed yet
        self._need = HEADER_SIZE  # bytes ``_partial`` must hold before parsing can move on
        self.copied = 0  # bytes copied while reassembling split frames (linear in bytes received)
        self.ignored = 0  # frames of an unknown type, dropped after their header was checked

    @property
    def buffered(self) -> int:
        return len(self._partial)

    def feed(self, data: bytes | bytearray | memoryview) -> list[Frame]:
        if self._partial:
            self._partial += data
            self.copied += len(data)
            if len(self._partial) >= HEADER_SIZE and self._need == HEADER_SIZE:
                self._need = HEADER_SIZE + self._header_length(self._partial, 0)
            if len(self._partial) < self._need:
                return []
            data = bytes(self._partial)
            self.copied += len(data)
            self._partial = bytearray()
            self._need = HEADER_SIZE
        return self._parse(data)

    def _parse(self, data: bytes | bytearray | memoryview) -> list[Frame]:
        view = memoryview(data)
        frames: list[Frame] = []
        pos = 0
        end = len(view)
        while end - pos >= HEADER_SIZE:
            length = self._header_length(view, pos)
            start = pos + HEADER_SIZE
            if end - start < length:
                self._need = HEADER_SIZE + length
                break
            _version, ftype, flags, _rsvd, stream_id, _length = HEADER.unpack_from(view, pos)
            pos = start + length
            if ftype == FrameType.DATA:
                frames.append(Frame(FrameType.DATA, stream_id, view[start:pos], flags))
            elif ftype in _KNOWN_TYPES:
                frames.append(Frame(FrameType(ftype), stream_id, bytes(view[start:pos]), flags))
            else:
                self.ignored += 1
        if pos < end:
            self._partial = bytearray(view[pos:])
            self.copied += end - pos
        return frames

    def _header_length(self, buf: bytes | bytearray | memoryview, pos: int) -> int:
        """The payload length of the header at ``pos``, checked before any of the payload is buffered."""
        version, ftype, _flags, _rsvd, _sid, length = HEADER.unpack_from(buf, pos)
        _check_header(version, ftype, length, self._max_payload)
        return length


def _check_header(version: int, ftype: int, length: int, max_payload: int) -> None:
    """What every header must pass, whatever its type (an unknown type is no fault: see the module doc)."""
    if version != VERSION:
        raise ProtocolError(f"unsupported mux version {version}")
    if length > max_payload:
        raise FrameTooLarge(length, max_payload)


_KNOWN_TYPES = frozenset(int(t) for t in FrameType)


# --- payload codecs -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class OpenPayload:
    """What a new stream is for: a route name (relay → agent) or a called AE (agent → relay).

    ``calling_ae`` is informational (logs, status); the receiver makes its decisions from the
    A-ASSOCIATE-RQ that follows on the stream, never from this claim.
    """

    kind: TargetKind
    target: str
    calling_ae: str = ""


def encode_open(p: OpenPayload) -> bytes:
    """Refuses locally what the peer's ``decode_open`` would treat as a connection-fatal fault."""
    target = p.target.encode("ascii")
    calling = p.calling_ae.encode("ascii")
    if not 1 <= len(target) <= MAX_NAME or len(calling) > MAX_NAME:
        raise ValueError("OPEN target must be 1-64 ASCII bytes and calling AE at most 64")
    if not _printable(target) or not _printable(calling):
        raise ValueError("OPEN names must be printable ASCII")
    return bytes([p.kind, len(target)]) + target + bytes([len(calling)]) + calling


def decode_open(payload: bytes) -> OpenPayload:
    try:
        kind = TargetKind(payload[0])
        tlen = payload[1]
        target = payload[2:2 + tlen]
        clen = payload[2 + tlen]
        calling = payload[3 + tlen:3 + tlen + clen]
    except (IndexError, ValueError) as exc:
        raise ProtocolError("malformed OPEN payload") from exc
    if (len(target) != tlen or len(calling) != clen or not 1 <= tlen <= MAX_NAME or clen > MAX_NAME
            or len(payload) != 3 + tlen + clen):
        raise ProtocolError("malformed OPEN payload")
    return OpenPayload(kind, _ascii(target), _ascii(calling))


def _printable(raw: bytes) -> bool:
    return all(0x20 <= b < 0x7F for b in raw)


def _ascii(raw: bytes) -> str:
    if not _printable(raw):
        raise ProtocolError("OPEN names must be printable ASCII")
    return raw.decode("ascii")


def encode_window(increment: int) -> bytes:
    return _U32.pack(increment)


def decode_window(payload: bytes) -> int:
    if len(payload) != 4:
        raise ProtocolError("WINDOW payload must be 4 bytes")
    (increment,) = _U32.unpack(payload)
    if increment == 0 or increment >= 2**31:
        raise ProtocolError(f"WINDOW increment {increment} out of range")
    return increment


def encode_reset(code: ErrorCode) -> bytes:
    return _RESET.pack(code)


def decode_reset(payload: bytes) -> ErrorCode:
    if len(payload) != 2:
        raise ProtocolError("RESET payload must be 2 bytes")
    return ErrorCode.from_wire(_RESET.unpack(payload)[0])


def encode_goaway(last_stream_id: int, code: ErrorCode) -> bytes:
    return _GOAWAY.pack(last_stream_id, code)


def decode_goaway(payload: bytes) -> tuple[int, ErrorCode]:
    if len(payload) != 6:
        raise ProtocolError("GOAWAY payload must be 6 bytes")
    last, code = _GOAWAY.unpack(payload)
    return last, ErrorCode.from_wire(code)


def is_pong(frame: Frame) -> bool:
    return bool(frame.flags & FrameFlag.ACK)
