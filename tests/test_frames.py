"""tunnel_core.frames: the mux wire format, byte by byte.

The expected bytes below are written by hand from the header layout (docs/protocol.md §3):
version(1) type(1) flags(1) reserved(1) stream-id(4, big-endian) length(4, big-endian) payload.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests import protocol_doc
from tunnel_core import frames as fr
from tunnel_core.codes import ErrorCode, FrameFlag, FrameType, TargetKind
from tunnel_core.errors import FrameTooLarge, ProtocolError
from tunnel_core.limits import MAX_FRAME_PAYLOAD


def h(text: str) -> bytes:
    """Hex with spaces and `|` separators allowed, so vectors can be annotated field by field."""
    return bytes.fromhex(text.replace("|", " "))


# (frame, expected wire bytes)
VECTORS = [
    pytest.param(
        fr.Frame(FrameType.DATA, 1, b"hi"),
        #   ver  type flags rsvd | stream id   | length      | payload "hi"
        h("01   00   00    00   | 00 00 00 01 | 00 00 00 02 | 68 69"),
        id="DATA",
    ),
    pytest.param(
        fr.Frame(FrameType.OPEN, 2, fr.encode_open(fr.OpenPayload(TargetKind.ROUTE, "pacs", "CT1"))),
        # header: OPEN on stream 2, 10-byte payload
        h("01 01 00 00 | 00 00 00 02 | 00 00 00 0a"
          # kind=ROUTE | target len 4, "pacs" | calling len 3, "CT1"
          "| 01        | 04 70 61 63 73        | 03 43 54 31"),
        id="OPEN-route",
    ),
    pytest.param(
        fr.Frame(FrameType.OPEN, 3, fr.encode_open(fr.OpenPayload(TargetKind.CALLED_AE, "STORE"))),
        # kind=CALLED_AE | len 5 "STORE" | empty calling AE
        h("01 01 00 00 | 00 00 00 03 | 00 00 00 08 | 02 | 05 53 54 4f 52 45 | 00"),
        id="OPEN-called-ae",
    ),
    pytest.param(
        fr.Frame(FrameType.WINDOW, 3, fr.encode_window(0x40000)),
        # increment 256 KiB, u32
        h("01 02 00 00 | 00 00 00 03 | 00 00 00 04 | 00 04 00 00"),
        id="WINDOW",
    ),
    pytest.param(
        fr.Frame(FrameType.WINDOW, 0, fr.encode_window(0x7FFFFFFF)),
        # connection-level WINDOW (stream 0), the largest increment
        h("01 02 00 00 | 00 00 00 00 | 00 00 00 04 | 7f ff ff ff"),
        id="WINDOW-connection",
    ),
    pytest.param(
        fr.Frame(FrameType.FIN, 5),
        h("01 03 00 00 | 00 00 00 05 | 00 00 00 00"),
        id="FIN",
    ),
    pytest.param(
        fr.Frame(FrameType.RESET, 7, fr.encode_reset(ErrorCode.CAPACITY)),
        # code CAPACITY = 7, u16
        h("01 04 00 00 | 00 00 00 07 | 00 00 00 02 | 00 07"),
        id="RESET",
    ),
    pytest.param(
        fr.Frame(FrameType.PING, 0, bytes(range(1, 9))),
        h("01 05 00 00 | 00 00 00 00 | 00 00 00 08 | 01 02 03 04 05 06 07 08"),
        id="PING",
    ),
    pytest.param(
        fr.Frame(FrameType.PING, 0, bytes(range(1, 9)), FrameFlag.ACK),
        # the pong: same payload, flags = ACK (0x01)
        h("01 05 01 00 | 00 00 00 00 | 00 00 00 08 | 01 02 03 04 05 06 07 08"),
        id="PONG",
    ),
    pytest.param(
        fr.Frame(FrameType.GOAWAY, 0, fr.encode_goaway(9, ErrorCode.GOING_AWAY)),
        # last stream id 9 (u32) | code GOING_AWAY = 8 (u16)
        h("01 06 00 00 | 00 00 00 00 | 00 00 00 06 | 00 00 00 09 | 00 08"),
        id="GOAWAY",
    ),
]


@pytest.mark.parametrize(("frame", "wire"), VECTORS)
def test_encode_matches_hand_written_bytes(frame: fr.Frame, wire: bytes) -> None:
    assert fr.encode(frame.type, frame.stream_id, frame.payload, frame.flags) == wire


@pytest.mark.parametrize(("frame", "wire"), VECTORS)
def test_parse_whole(frame: fr.Frame, wire: bytes) -> None:
    parser = fr.FrameParser(MAX_FRAME_PAYLOAD)
    assert parser.feed(wire) == [frame]
    assert parser.buffered == 0


@pytest.mark.parametrize(("frame", "wire"), VECTORS)
def test_parse_one_byte_at_a_time(frame: fr.Frame, wire: bytes) -> None:
    parser = fr.FrameParser(MAX_FRAME_PAYLOAD)
    for i, byte in enumerate(wire[:-1]):
        assert parser.feed(bytes([byte])) == []
        assert parser.buffered == i + 1
    assert parser.feed(wire[-1:]) == [frame]
    assert parser.buffered == 0


@pytest.mark.parametrize(("frame", "wire"), VECTORS)
def test_parse_with_trailing_partial_frame(frame: fr.Frame, wire: bytes) -> None:
    parser = fr.FrameParser(MAX_FRAME_PAYLOAD)
    following = fr.encode(FrameType.DATA, 11, b"tail")
    assert parser.feed(wire + following[:5]) == [frame]
    assert parser.buffered == 5
    assert parser.feed(following[5:]) == [fr.Frame(FrameType.DATA, 11, b"tail")]
    assert parser.buffered == 0


def test_one_chunk_may_hold_every_frame() -> None:
    parser = fr.FrameParser(MAX_FRAME_PAYLOAD)
    wire = b"".join(p.values[1] for p in VECTORS)
    assert parser.feed(wire) == [p.values[0] for p in VECTORS]


def test_pong_flag() -> None:
    assert fr.is_pong(fr.Frame(FrameType.PING, 0, bytes(8), FrameFlag.ACK))
    assert not fr.is_pong(fr.Frame(FrameType.PING, 0, bytes(8)))


def test_reserved_byte_and_unknown_flags_are_ignored_on_receipt() -> None:
    wire = h("01 00 fe 5a | 00 00 00 01 | 00 00 00 01 | 41")
    assert fr.FrameParser(16).feed(wire) == [fr.Frame(FrameType.DATA, 1, b"A", 0xFE)]


# --- limits and header faults ---------------------------------------------------------------------------


def test_four_gib_length_refused_from_the_header_alone() -> None:
    parser = fr.FrameParser(MAX_FRAME_PAYLOAD)
    header = h("01 00 00 00 | 00 00 00 01 | ff ff ff ff")
    with pytest.raises(FrameTooLarge) as info:
        parser.feed(header)
    assert info.value.code is ErrorCode.FRAME_SIZE_ERROR
    assert parser.buffered <= fr.HEADER_SIZE  # at most the header, never the announced payload


def test_oversize_detected_on_the_twelfth_byte_not_before() -> None:
    parser = fr.FrameParser(100)
    header = fr.HEADER.pack(fr.VERSION, FrameType.DATA, 0, 0, 1, 101)
    for byte in header[:-1]:
        assert parser.feed(bytes([byte])) == []
    with pytest.raises(FrameTooLarge):
        parser.feed(header[-1:])


def test_payload_exactly_at_the_limit_is_accepted() -> None:
    parser = fr.FrameParser(100)
    wire = fr.encode(FrameType.DATA, 1, bytes(100))
    assert parser.feed(wire) == [fr.Frame(FrameType.DATA, 1, bytes(100))]


@pytest.mark.parametrize("version", [0, 2, 0xFF])
def test_bad_version_is_a_protocol_error(version: int) -> None:
    wire = bytes([version]) + fr.encode(FrameType.FIN, 1)[1:]
    with pytest.raises(ProtocolError) as info:
        fr.FrameParser(16).feed(wire)
    assert type(info.value) is ProtocolError
    assert info.value.code is ErrorCode.PROTOCOL_ERROR


# An unknown frame type is ignored once its header passed the checks every header passes (docs/protocol.md
# §2.2): a newer peer may add frame types without a new protocol version. (It used to be a connection
# error, which is why adding REPORT needed relays upgraded first.)


@pytest.mark.parametrize("ftype", [8, 0x10, 0xFF])
@pytest.mark.parametrize("length", [0, 1, 16])
def test_unknown_frame_type_is_ignored_between_known_frames(ftype: int, length: int) -> None:
    unknown = fr.HEADER.pack(fr.VERSION, ftype, 0xFF, 0xFF, 0xFFFFFFFF, length) + bytes(range(length))
    before, after = fr.encode(FrameType.DATA, 1, b"a"), fr.encode(FrameType.FIN, 1)
    wire = before + unknown + after
    parser = fr.FrameParser(16)
    assert parser.feed(wire) == [fr.Frame(FrameType.DATA, 1, b"a"), fr.Frame(FrameType.FIN, 1)]
    assert parser.ignored == 1 and parser.buffered == 0
    # and with any chunking: one byte at a time
    parser = fr.FrameParser(16)
    got: list[fr.Frame] = []
    for byte in wire:
        got += parser.feed(bytes([byte]))
    assert got == [fr.Frame(FrameType.DATA, 1, b"a"), fr.Frame(FrameType.FIN, 1)]
    assert parser.ignored == 1 and parser.buffered == 0


@pytest.mark.parametrize("ftype", [8, 0xFF])
def test_unknown_frame_type_still_has_its_length_checked_from_the_header(ftype: int) -> None:
    parser = fr.FrameParser(MAX_FRAME_PAYLOAD)
    header = fr.HEADER.pack(fr.VERSION, ftype, 0, 0, 0, MAX_FRAME_PAYLOAD + 1)
    with pytest.raises(FrameTooLarge) as info:
        parser.feed(header)
    assert info.value.code is ErrorCode.FRAME_SIZE_ERROR
    assert parser.buffered <= fr.HEADER_SIZE and parser.ignored == 0


def test_unknown_frame_type_with_a_bad_version_is_still_a_protocol_error() -> None:
    with pytest.raises(ProtocolError) as info:
        fr.FrameParser(16).feed(fr.HEADER.pack(2, 9, 0, 0, 0, 0))
    assert type(info.value) is ProtocolError
    assert info.value.code is ErrorCode.PROTOCOL_ERROR


def test_a_split_unknown_frame_is_bounded_by_max_payload_and_then_dropped() -> None:
    parser = fr.FrameParser(100)
    wire = fr.HEADER.pack(fr.VERSION, 0x42, 0, 0, 3, 100) + bytes(100) + fr.encode(FrameType.FIN, 3)
    assert parser.feed(wire[:50]) == []
    assert parser.buffered == 50
    assert parser.feed(wire[50:]) == [fr.Frame(FrameType.FIN, 3)]
    assert parser.ignored == 1 and parser.buffered == 0


def test_bad_header_fails_even_when_its_payload_is_still_missing() -> None:
    # The header is judged as soon as its 12 bytes are in; the parser does not wait for a payload first.
    wire = fr.HEADER.pack(2, FrameType.DATA, 0, 0, 1, 50)
    with pytest.raises(ProtocolError):
        fr.FrameParser(100).feed(wire)


# --- payload codecs -------------------------------------------------------------------------------------


def test_open_round_trip_and_bytes() -> None:
    p = fr.OpenPayload(TargetKind.CALLED_AE, "A" * 64, "B" * 64)
    raw = fr.encode_open(p)
    assert raw == b"\x02\x40" + b"A" * 64 + b"\x40" + b"B" * 64
    assert fr.decode_open(raw) == p


def test_open_listener_kind_bytes() -> None:
    """Kind 3 (relay peering, docs/protocol.md §12.1): the listener "cloud", calling AE "CT1"."""
    p = fr.OpenPayload(TargetKind.LISTENER, "cloud", "CT1")
    assert fr.encode_open(p) == h("03 05 63 6c 6f 75 64 03 43 54 31")
    assert fr.decode_open(h("03 05 63 6c 6f 75 64 03 43 54 31")) == p


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(b"", id="empty"),
        pytest.param(h("00 01 41 00"), id="kind-0"),
        pytest.param(h("04 01 41 00"), id="kind-4"),
        pytest.param(h("01 00 00"), id="empty-target"),
        pytest.param(h("01 05 41 42"), id="target-truncated"),
        pytest.param(h("01 01 41"), id="calling-length-missing"),
        pytest.param(h("01 01 41 03 42"), id="calling-truncated"),
        pytest.param(h("01 01 41 00 00"), id="trailing-byte"),
        pytest.param(h("01 02 41 0a 00"), id="target-control-char"),
        pytest.param(h("01 01 7f 00"), id="target-DEL"),
        pytest.param(h("01 01 c3 00"), id="target-non-ascii"),
        pytest.param(h("01 01 41 01 00"), id="calling-NUL"),
    ],
)
def test_open_malformed(payload: bytes) -> None:
    with pytest.raises(ProtocolError) as info:
        fr.decode_open(payload)
    assert info.value.code is ErrorCode.PROTOCOL_ERROR


@pytest.mark.parametrize(
    "p",
    [
        pytest.param(fr.OpenPayload(TargetKind.ROUTE, ""), id="empty-target"),
        pytest.param(fr.OpenPayload(TargetKind.ROUTE, "x" * 65), id="target-65"),
        pytest.param(fr.OpenPayload(TargetKind.ROUTE, "x", "y" * 65), id="calling-65"),
        pytest.param(fr.OpenPayload(TargetKind.ROUTE, "pacsé"), id="non-ascii"),
    ],
)
def test_open_encoder_refuses_what_no_peer_may_receive(p: fr.OpenPayload) -> None:
    with pytest.raises(ValueError):
        fr.encode_open(p)


@pytest.mark.parametrize("name", ["tab\there", "new\nline", "del\x7f"])
def test_open_encoder_refuses_control_characters(name: str) -> None:
    """The peer's decode_open refuses them with a connection-fatal ProtocolError: one badly named route
    would tear down every association on the tunnel, so the encoder refuses it locally instead."""
    with pytest.raises(ValueError):
        fr.encode_open(fr.OpenPayload(TargetKind.ROUTE, name))
    with pytest.raises(ValueError):
        fr.encode_open(fr.OpenPayload(TargetKind.ROUTE, "ok", name))


@pytest.mark.parametrize("increment", [1, 0x40000, 2**31 - 1])
def test_window_round_trip(increment: int) -> None:
    assert fr.decode_window(fr.encode_window(increment)) == increment


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(h("00 00 00 00"), id="zero"),
        pytest.param(h("80 00 00 00"), id="2**31"),
        pytest.param(h("ff ff ff ff"), id="2**32-1"),
        pytest.param(h("00 00 01"), id="3-bytes"),
        pytest.param(h("00 00 00 01 00"), id="5-bytes"),
        pytest.param(b"", id="empty"),
    ],
)
def test_window_malformed(payload: bytes) -> None:
    with pytest.raises(ProtocolError):
        fr.decode_window(payload)


@pytest.mark.parametrize("code", list(ErrorCode))
def test_reset_round_trip(code: ErrorCode) -> None:
    assert fr.encode_reset(code) == code.to_bytes(2, "big")
    assert fr.decode_reset(fr.encode_reset(code)) is code


def test_reset_unknown_code_from_a_newer_peer_reads_as_internal_error() -> None:
    assert fr.decode_reset(h("03 e7")) is ErrorCode.INTERNAL_ERROR


@pytest.mark.parametrize("payload", [b"", h("00"), h("00 00 00")])
def test_reset_malformed(payload: bytes) -> None:
    with pytest.raises(ProtocolError):
        fr.decode_reset(payload)


def test_goaway_round_trip_and_unknown_code() -> None:
    assert fr.decode_goaway(fr.encode_goaway(0xFFFFFFFF, ErrorCode.NO_ERROR)) == (0xFFFFFFFF, ErrorCode.NO_ERROR)
    assert fr.decode_goaway(h("00 00 00 04 | ff ff")) == (4, ErrorCode.INTERNAL_ERROR)


@pytest.mark.parametrize("payload", [b"", h("00 00 00 04 00"), h("00 00 00 04 00 00 00")])
def test_goaway_malformed(payload: bytes) -> None:
    with pytest.raises(ProtocolError):
        fr.decode_goaway(payload)


# --- properties -----------------------------------------------------------------------------------------

frame_strategy = st.builds(
    fr.Frame,
    type=st.sampled_from(FrameType),
    stream_id=st.integers(0, 2**32 - 1),
    payload=st.binary(max_size=300),
    flags=st.integers(0, 255),
)


@settings(max_examples=200, deadline=None)
@given(frames=st.lists(frame_strategy, max_size=12), data=st.data())
def test_round_trip_under_random_chunking(frames: list[fr.Frame], data: st.DataObject) -> None:
    wire = b"".join(fr.encode(f.type, f.stream_id, f.payload, f.flags) for f in frames)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=20)))
    parser = fr.FrameParser(300)
    got: list[fr.Frame] = []
    for start, end in zip([0, *cuts], [*cuts, len(wire)], strict=True):
        got += parser.feed(wire[start:end])
        assert parser.buffered <= fr.HEADER_SIZE + 300
    assert got == frames
    assert parser.buffered == 0


@settings(max_examples=200, deadline=None)
@given(frames=st.lists(st.one_of(frame_strategy, st.tuples(st.integers(8, 255), st.binary(max_size=300))),
                       max_size=12), data=st.data())
def test_unknown_frames_vanish_under_random_chunking(frames: list, data: st.DataObject) -> None:
    """Known frames come out exactly as sent, whatever unknown ones stand between them and however cut."""
    wire = b"".join(fr.encode(f.type, f.stream_id, f.payload, f.flags) if isinstance(f, fr.Frame)
                    else fr.HEADER.pack(fr.VERSION, f[0], 0, 0, 0, len(f[1])) + f[1] for f in frames)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=20)))
    parser = fr.FrameParser(300)
    got: list[fr.Frame] = []
    for start, end in zip([0, *cuts], [*cuts, len(wire)], strict=True):
        got += parser.feed(wire[start:end])
    assert got == [f for f in frames if isinstance(f, fr.Frame)]
    assert parser.ignored == sum(not isinstance(f, fr.Frame) for f in frames)
    assert parser.buffered == 0


PRINTABLE = st.characters(min_codepoint=0x20, max_codepoint=0x7E)


@settings(max_examples=200, deadline=None)
@given(kind=st.sampled_from(TargetKind), target=st.text(PRINTABLE, min_size=1, max_size=64),
       calling=st.text(PRINTABLE, max_size=64))
def test_open_round_trip(kind: TargetKind, target: str, calling: str) -> None:
    p = fr.OpenPayload(kind, target, calling)
    assert fr.decode_open(fr.encode_open(p)) == p


@settings(max_examples=300, deadline=None)
@given(payload=st.binary(max_size=140))
def test_payload_decoders_raise_only_protocol_error(payload: bytes) -> None:
    for decode in (fr.decode_open, fr.decode_window, fr.decode_reset, fr.decode_goaway):
        try:
            decode(payload)
        except ProtocolError:
            pass


# --- reassembly cost: linear in bytes however a peer splits its frames (issue 10) -----------------------


def _drip(parser: fr.FrameParser, wire: bytes, step: int) -> list[fr.Frame]:
    frames: list[fr.Frame] = []
    for i in range(0, len(wire), step):
        frames += parser.feed(wire[i:i + step])
    return frames


@pytest.mark.parametrize("ftype", [FrameType.DATA, FrameType.REPORT])
def test_a_one_byte_drip_of_a_full_size_frame_copies_each_byte_a_bounded_number_of_times(ftype) -> None:
    payload = bytes(range(256)) * (MAX_FRAME_PAYLOAD // 256)
    wire = fr.encode(ftype, 1, payload)
    parser = fr.FrameParser(MAX_FRAME_PAYLOAD)
    (frame,) = _drip(parser, wire, 1)
    assert bytes(frame.payload) == payload
    # Appending each byte once and copying the whole frame out once: about 2 copies per byte. A parser that
    # re-joins its partial buffer on every chunk copies ~len(wire)**2 / 2 bytes (5 * 10**11 here).
    assert parser.copied <= 3 * len(wire)
    assert parser.buffered == 0


def test_reassembly_cost_stays_linear_across_many_frames_and_odd_chunk_sizes() -> None:
    wire = b"".join(fr.encode(FrameType.DATA, 1, bytes([i]) * (40_000 + i)) for i in range(20))
    parser = fr.FrameParser(MAX_FRAME_PAYLOAD)
    frames = _drip(parser, wire, 7)
    assert [len(f.payload) for f in frames] == [40_000 + i for i in range(20)]
    assert parser.copied <= 3 * len(wire)



# --- the vectors of docs/protocol.md (Appendix A.1): the document cannot drift from the code ---------------

DOC_VECTORS = {
    "data": fr.encode(FrameType.DATA, 1, b"hi"),
    "open": fr.encode(FrameType.OPEN, 2, fr.encode_open(fr.OpenPayload(TargetKind.ROUTE, "pacs", "CT1"))),
    "window": fr.encode(FrameType.WINDOW, 0, fr.encode_window(64 * 1024 * 1024 - 256 * 1024)),
    "fin": fr.encode(FrameType.FIN, 5),
    "reset": fr.encode(FrameType.RESET, 2, fr.encode_reset(ErrorCode.UNKNOWN_ROUTE)),
    "ping": fr.encode(FrameType.PING, 0, bytes(range(1, 9))),
    "pong": fr.encode(FrameType.PING, 0, bytes(range(1, 9)), FrameFlag.ACK),
    "goaway": fr.encode(FrameType.GOAWAY, 0, fr.encode_goaway(9, ErrorCode.GOING_AWAY)),
    "goaway-revoked": fr.encode(FrameType.GOAWAY, 0, fr.encode_goaway(0, ErrorCode.REVOKED)),
    "report": fr.encode(FrameType.REPORT, 0, b'{"v":1}'),
}


def test_the_document_has_exactly_the_checked_vectors() -> None:
    assert set(protocol_doc.blocks("vector")) == {*DOC_VECTORS, "unknown-type"}


@pytest.mark.parametrize("name", sorted(DOC_VECTORS))
def test_each_documented_vector_is_what_the_encoder_sends_and_the_parser_reads(name: str) -> None:
    wire = protocol_doc.vector(protocol_doc.blocks("vector")[name])
    assert wire == DOC_VECTORS[name]
    (frame,) = fr.FrameParser(MAX_FRAME_PAYLOAD).feed(wire)
    assert fr.encode(frame.type, frame.stream_id, frame.payload, frame.flags) == wire


def test_the_documented_unknown_frame_is_ignored() -> None:
    wire = protocol_doc.vector(protocol_doc.blocks("vector")["unknown-type"])
    assert wire[1] not in {int(t) for t in FrameType}
    parser = fr.FrameParser(MAX_FRAME_PAYLOAD)
    assert parser.feed(wire + DOC_VECTORS["fin"]) == [fr.Frame(FrameType.FIN, 5)]
    assert parser.ignored == 1
