"""tunnel_core.dicom.association: the upper-layer protocol machine, a requestor and an acceptor wired to
each other in memory, every peer fault it must catch, every local call out of order, and what it puts on
the wire read back by pynetdicom."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pynetdicom import pdu as pn

from tunnel_core.codes import RejectReason
from tunnel_core.dicom import pdu, sniffer
from tunnel_core.dicom.association import (
    DEFAULT_MAX_PDU_RECEIVE,
    TRANSITIONS,
    Aborted,
    AssociateAccepted,
    AssociateRejected,
    AssociateRequested,
    Association,
    CommandReceived,
    DatasetFragment,
    Event,
    Input,
    ReleaseConfirmed,
    ReleaseRequested,
    Role,
    State,
)
from tunnel_core.dicom.pdu import (
    PDV,
    Abort,
    AssociateAC,
    AssociateRJ,
    AssociateRQ,
    ContextResult,
    PDataTF,
    PresentationContext,
    PresentationContextResult,
    ReleaseRP,
    ReleaseRQ,
    UserInformation,
)
from tunnel_core.errors import AssociationError, DicomError, InvalidAeTitle, UsageError

VERIFICATION, CT, MR = "1.2.840.10008.1.1", "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.4"
IMPLICIT, EXPLICIT = "1.2.840.10008.1.2", "1.2.840.10008.1.2.1"
ECHO_RQ = bytes(range(60))  # the machine does not read command sets: any bytes stand for one
ECHO_RSP = bytes(range(60, 130))

REQUEST = AssociateRQ("PACS", "MODALITY", (
    PresentationContext(1, VERIFICATION, (IMPLICIT,)),
    PresentationContext(3, CT, (EXPLICIT, IMPLICIT)),
    PresentationContext(5, MR, (EXPLICIT,)),
), UserInformation(implementation_class_uid="1.2.3.4", implementation_version_name="TEST"))
ANSWER = AssociateAC("PACS", "MODALITY", (
    PresentationContextResult(1, ContextResult.ACCEPTANCE, IMPLICIT),
    PresentationContextResult(3, ContextResult.ACCEPTANCE, EXPLICIT),
    PresentationContextResult(5, ContextResult.ABSTRACT_SYNTAX_NOT_SUPPORTED, ""),
), UserInformation(implementation_class_uid="1.2.3.4"))


def pump(a: Association, b: Association) -> tuple[list[Event], list[Event]]:
    """Carry bytes both ways until neither side has any to send; the events each side got."""
    got_a: list[Event] = []
    got_b: list[Event] = []
    while True:
        to_b, to_a = a.data_to_send(), b.data_to_send()
        if not to_a and not to_b:
            return got_a, got_b
        got_b += b.receive_data(to_b)
        got_a += a.receive_data(to_a)


def pair(requestor_max: int = DEFAULT_MAX_PDU_RECEIVE, acceptor_max: int = DEFAULT_MAX_PDU_RECEIVE,
         **acceptor_limits: int) -> tuple[Association, Association]:
    """A requestor and an acceptor, associated: contexts 1 and 3 accepted, 5 refused."""
    requestor = Association(Role.REQUESTOR, max_pdu_receive=requestor_max)
    acceptor = Association(Role.ACCEPTOR, max_pdu_receive=acceptor_max, **acceptor_limits)
    requestor.request(REQUEST)
    _, got = pump(requestor, acceptor)
    assert got == [AssociateRequested(replace(REQUEST, user=replace(REQUEST.user, max_pdu_length=requestor_max)))]
    acceptor.accept(ANSWER)
    got, _ = pump(requestor, acceptor)
    assert [type(e) for e in got] == [AssociateAccepted]
    return requestor, acceptor


def pdus_of(wire: bytes) -> list[pdu.Pdu]:
    return pdu.PduReader(0xFFFFFFFF, 0xFFFFFFFF).receive_data(wire)


# --- the happy paths ------------------------------------------------------------------------------------


def test_associate_echo_stream_a_large_dataset_release() -> None:
    requestor, acceptor = pair(acceptor_max=4096)
    assert requestor.state is acceptor.state is State.ESTABLISHED
    assert dict(requestor.accepted_contexts) == dict(acceptor.accepted_contexts) == {1: IMPLICIT, 3: EXPLICIT}
    assert requestor.max_send_pdu == 4096 and acceptor.max_send_pdu == DEFAULT_MAX_PDU_RECEIVE

    requestor.send_command(1, ECHO_RQ)
    _, got = pump(requestor, acceptor)
    assert got == [CommandReceived(1, ECHO_RQ)]
    acceptor.send_command(1, ECHO_RSP)
    got, _ = pump(requestor, acceptor)
    assert got == [CommandReceived(1, ECHO_RSP)]

    dataset = bytes(i % 251 for i in range(100_000))
    requestor.send_command(3, b"C-STORE-RQ")
    requestor.send_dataset(3, memoryview(dataset)[:30_000], last=False)
    requestor.send_dataset(3, memoryview(dataset)[30_000:], last=True)
    wire = requestor.data_to_send()
    sent = pdus_of(wire)
    assert all(len(pdu.encode(p)) <= 4096 + 6 for p in sent)  # the acceptor's maximum length, header aside
    assert all(isinstance(p, PDataTF) and len(p.pdvs) == 1 for p in sent)
    got = acceptor.receive_data(wire)
    assert got[0] == CommandReceived(3, b"C-STORE-RQ")
    fragments = got[1:]
    assert all(isinstance(f, DatasetFragment) and f.context_id == 3 for f in fragments)
    assert b"".join(f.data for f in fragments) == dataset  # type: ignore[union-attr]
    assert [f.last for f in fragments] == [False] * (len(fragments) - 1) + [True]  # type: ignore[union-attr]
    assert len(fragments) == math.ceil(30_000 / 4090) + math.ceil(70_000 / 4090)

    requestor.release()
    _, got = pump(requestor, acceptor)
    assert got == [ReleaseRequested()]
    acceptor.release_response()
    assert acceptor.state is State.CLOSED
    got, _ = pump(requestor, acceptor)
    assert got == [ReleaseConfirmed()]
    assert requestor.state is State.CLOSED


def test_a_dataset_is_streamed_one_event_per_pdu_as_it_arrives() -> None:
    requestor, acceptor = pair(acceptor_max=1024)
    requestor.send_command(3, b"cmd")
    requestor.send_dataset(3, bytes(10_000), last=True)
    sent = pdus_of(requestor.data_to_send())
    assert acceptor.receive_data(pdu.encode(sent[0])) == [CommandReceived(3, b"cmd")]
    for p in sent[1:]:
        wire = pdu.encode(p)
        assert acceptor.receive_data(wire[:-1]) == []  # nothing before the PDU is whole
        [fragment] = acceptor.receive_data(wire[-1:])
        assert isinstance(fragment, DatasetFragment) and len(fragment.data) == len(wire) - 12


def test_a_whole_conversation_fed_one_byte_at_a_time() -> None:
    """The acceptor side of associate, echo, a dataset and release, every byte in its own call: the same
    events as the whole wire in one call, each on the byte that completes its PDU."""
    requestor = Association(Role.REQUESTOR)
    requestor.request(REQUEST)
    wire = first = requestor.data_to_send()
    requestor.receive_data(pdu.encode(replace(ANSWER, user=UserInformation(max_pdu_length=100))))
    requestor.send_command(1, ECHO_RQ)
    requestor.send_command(3, b"store")
    requestor.send_dataset(3, bytes(range(250)), last=True)
    requestor.release()
    wire += requestor.data_to_send()
    whole = Association(Role.ACCEPTOR)
    expected = whole.receive_data(first)
    whole.accept(ANSWER)
    expected += whole.receive_data(wire[len(first):])
    acceptor = Association(Role.ACCEPTOR)
    got: list[Event] = []
    for i in range(len(wire)):
        events = acceptor.receive_data(wire[i:i + 1])
        if any(isinstance(e, AssociateRequested) for e in events):
            acceptor.accept(ANSWER)
        got += events
    assert got == expected
    assert [type(e) for e in got] == [AssociateRequested, CommandReceived, CommandReceived] + [DatasetFragment] * 3 + [
        ReleaseRequested]


def test_bytes_after_a_final_pdu_are_not_read() -> None:
    """After A-RELEASE-RP (or A-ABORT) the association is over: what follows in the same chunk, even
    garbage, is left unread instead of turning a clean release into an abort."""
    requestor, acceptor = pair()
    requestor.release()
    acceptor.receive_data(requestor.data_to_send())
    acceptor.release_response()
    assert requestor.receive_data(acceptor.data_to_send() + b"\xff garbage") == [ReleaseConfirmed()]
    assert requestor.state is State.CLOSED


def test_an_unlimited_peer_gets_pdus_capped_at_our_own_maximum() -> None:
    requestor = Association(Role.REQUESTOR, max_pdu_send=2000)
    requestor.request(REQUEST)
    requestor.data_to_send()
    requestor.receive_data(pdu.encode(replace(ANSWER, user=UserInformation(max_pdu_length=0))))
    assert requestor.max_send_pdu == 2000
    requestor.send_command(1, bytes(5000))
    assert [len(pdu.encode(p)) for p in pdus_of(requestor.data_to_send())] == [2006, 2006, 1024]


@settings(max_examples=60, deadline=None)
@given(messages=st.lists(st.tuples(st.sampled_from([1, 3]), st.integers(0, 300), st.lists(st.integers(0, 3000),
                                                                                        max_size=3)),
                         min_size=1, max_size=5),
       peer_max=st.integers(7, 600), data=st.data())
def test_any_messages_under_any_chunking_arrive_as_sent(messages: list[tuple[int, int, list[int]]], peer_max: int,
                                                       data: st.DataObject) -> None:
    """Commands and datasets of any size, any peer maximum length, the wire cut anywhere: the acceptor's
    events give back each command whole and each dataset in order, with ``last`` on its final fragment."""
    requestor, acceptor = pair(acceptor_max=peer_max)
    expected: list[tuple[str, int, bytes]] = []
    for n, (context_id, command_size, parts) in enumerate(messages):
        command = bytes([n]) * command_size
        requestor.send_command(context_id, command)
        expected.append(("command", context_id, command))
        for i, size in enumerate(parts):
            part = bytes([n + i + 1]) * size
            requestor.send_dataset(context_id, part, last=i == len(parts) - 1)
            expected.append(("data", context_id, part))
    wire = requestor.data_to_send()
    assert all(len(pdu.encode(p)) <= peer_max + 6 for p in pdus_of(wire))
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=10)))
    events: list[Event] = []
    for start, end in zip([0, *cuts], [*cuts, len(wire)], strict=True):
        events += acceptor.receive_data(wire[start:end])
    commands = [("command", e.context_id, e.command) for e in events if isinstance(e, CommandReceived)]
    assert commands == [x for x in expected if x[0] == "command"]
    datasets = b"".join(e.data for e in events if isinstance(e, DatasetFragment))
    assert datasets == b"".join(x[2] for x in expected if x[0] == "data")
    lasts = sum(1 for e in events if isinstance(e, DatasetFragment) and e.last)
    assert lasts == sum(1 for _, _, parts in messages if parts)


def test_reject() -> None:
    requestor = Association(Role.REQUESTOR)
    acceptor = Association(Role.ACCEPTOR)
    requestor.request(REQUEST)
    pump(requestor, acceptor)
    acceptor.reject(AssociateRJ.from_reason(RejectReason.CALLED_AE_UNKNOWN))
    assert acceptor.state is State.CLOSED
    wire = acceptor.data_to_send()
    theirs = pn.A_ASSOCIATE_RJ()
    theirs.decode(wire)
    assert (theirs.result, theirs.source, theirs.reason_diagnostic) == (1, 1, 7)
    assert requestor.receive_data(wire) == [AssociateRejected(AssociateRJ(1, 1, 7))]
    assert requestor.state is State.CLOSED


@pytest.mark.parametrize("who", ["requestor", "acceptor"])
def test_abort_either_way(who: str) -> None:
    requestor, acceptor = pair()
    side, other = (requestor, acceptor) if who == "requestor" else (acceptor, requestor)
    side.send_command(1, ECHO_RQ)  # queued, then dropped by the abort
    side.abort()
    assert side.state is State.CLOSED
    wire = side.data_to_send()
    assert wire == bytes.fromhex("07 00 00000004 00 00 00 00")
    assert other.receive_data(wire + pdu.encode_pdv(1, True, True, b"late")) == [Aborted(0, 0)]
    assert other.state is State.CLOSED
    assert other.receive_data(b"anything at all") == []  # closed: ignored
    with pytest.raises(UsageError):
        other.send_command(1, ECHO_RQ)
    with pytest.raises(UsageError):
        side.abort()


def test_a_provider_abort_with_a_reason() -> None:
    requestor, _ = pair()
    requestor.abort(2, 6)
    theirs = pn.A_ABORT_RQ()
    theirs.decode(requestor.data_to_send())
    assert (theirs.source, theirs.reason_diagnostic) == (2, 6)


def test_the_peer_may_finish_sending_after_a_release_request() -> None:
    """PS3.8 Sta7/Sta8: the side that asked to release still receives; the side asked may still send."""
    requestor, acceptor = pair()
    requestor.release()
    acceptor.receive_data(requestor.data_to_send())
    acceptor.send_command(3, b"late response")
    acceptor.send_dataset(3, b"its data", last=True)
    acceptor.release_response()
    got = requestor.receive_data(acceptor.data_to_send())
    assert got == [CommandReceived(3, b"late response"), DatasetFragment(3, b"its data", True), ReleaseConfirmed()]
    assert requestor.state is acceptor.state is State.CLOSED


@pytest.mark.parametrize("acceptor_waits", [False, True])
def test_release_collision(acceptor_waits: bool) -> None:
    """PS3.8 §9.2.3: both ask. Each is told (collision), each responds; the requestor's A-RELEASE-RP goes
    first, the acceptor's only after it (held back if the acceptor responds early)."""
    requestor, acceptor = pair()
    requestor.release()
    acceptor.release()
    to_acceptor, to_requestor = requestor.data_to_send(), acceptor.data_to_send()
    assert requestor.receive_data(to_requestor) == [ReleaseRequested(collision=True)]
    assert acceptor.receive_data(to_acceptor) == [ReleaseRequested(collision=True)]
    assert requestor.state is State.COLLISION_REQUESTOR_TO_RESPOND
    assert acceptor.state is State.COLLISION_ACCEPTOR_AWAITING_RP
    if not acceptor_waits:
        acceptor.release_response()
        assert acceptor.data_to_send() == b""  # held until the requestor's RP is in
    requestor.release_response()
    rp = requestor.data_to_send()
    assert pdus_of(rp) == [ReleaseRP()]
    assert acceptor.receive_data(rp) == [ReleaseConfirmed()]
    if acceptor_waits:
        assert acceptor.state is State.COLLISION_ACCEPTOR_TO_RESPOND
        acceptor.release_response()
    assert acceptor.state is State.CLOSED
    assert requestor.receive_data(acceptor.data_to_send()) == [ReleaseConfirmed()]
    assert requestor.state is State.CLOSED


# --- what goes on the wire, read by pynetdicom ------------------------------------------------------------


def test_requestor_bytes_read_by_pynetdicom() -> None:
    requestor = Association(Role.REQUESTOR, max_pdu_receive=32768)
    acceptor = Association(Role.ACCEPTOR, max_pdu_receive=1000)
    requestor.request(REQUEST)
    wire = requestor.data_to_send()
    rq = pn.A_ASSOCIATE_RQ()
    rq.decode(wire)
    assert (rq.called_ae_title, rq.calling_ae_title) == ("PACS", "MODALITY")
    assert [(cx.context_id, str(cx.abstract_syntax), [str(t) for t in cx.transfer_syntax])
            for cx in rq.presentation_context] == [(1, VERIFICATION, [IMPLICIT]), (3, CT, [EXPLICIT, IMPLICIT]),
                                                   (5, MR, [EXPLICIT])]
    assert rq.user_information is not None and rq.user_information.maximum_length == 32768
    acceptor.receive_data(wire)
    acceptor.accept(ANSWER)
    ac = pn.A_ASSOCIATE_AC()
    ac_wire = acceptor.data_to_send()
    ac.decode(ac_wire)
    assert [(cx.context_id, cx.result) for cx in ac.presentation_context] == [(1, 0), (3, 0), (5, 3)]
    assert ac.user_information is not None and ac.user_information.maximum_length == 1000
    requestor.receive_data(ac_wire)

    requestor.send_command(1, ECHO_RQ)
    requestor.send_command(3, b"store")
    requestor.send_dataset(3, bytes(2500), last=True)
    requestor.release()
    wire = requestor.data_to_send()
    pieces = [pdu.encode(p) for p in pdus_of(wire)]
    assert b"".join(pieces) == wire
    pdvs = []
    for piece in pieces[:-1]:
        pdata = pn.P_DATA_TF()
        pdata.decode(piece)
        pdvs += [(v.context_id, v.data[0], len(v.data) - 1) for v in pdata.presentation_data_value_items]
    assert pdvs == [(1, 0x03, 60), (3, 0x03, 5), (3, 0x00, 994), (3, 0x00, 994), (3, 0x02, 512)]
    release = pn.A_RELEASE_RQ()
    release.decode(pieces[-1])
    assert release.pdu_type == 0x05


# --- the peer's faults: AssociationError with the A-ABORT to send ----------------------------------------


def _fresh_acceptor(**limits: int) -> Association:
    return Association(Role.ACCEPTOR, **limits)


def _waiting_requestor() -> Association:
    requestor = Association(Role.REQUESTOR)
    requestor.request(REQUEST)
    requestor.data_to_send()
    return requestor


def _established_acceptor(**limits: int) -> Association:
    _, acceptor = pair(**limits)
    return acceptor


def _cmd(context_id: int, data: bytes = b"c", last: bool = True) -> bytes:
    return pdu.encode_pdv(context_id, True, last, data)


def _data(context_id: int, data: bytes = b"d", last: bool = True) -> bytes:
    return pdu.encode_pdv(context_id, False, last, data)


def _with_item(wire: bytes, item: bytes) -> bytes:
    """The PDU with ``item`` appended to its variable items (its length field grown to match)."""
    body = wire[6:] + item
    return wire[:2] + len(body).to_bytes(4, "big") + body


_RQ = pdu.encode(REQUEST)
FAULTS = [
    ("p-data-before-rq", _fresh_acceptor, _cmd(1), 2),
    ("release-before-rq", _fresh_acceptor, pdu.encode(ReleaseRQ()), 2),
    ("p-data-before-ac", _waiting_requestor, _cmd(1), 2),
    ("rq-to-a-requestor", _waiting_requestor, _RQ, 2),
    ("second-rq", _established_acceptor, _RQ, 2),
    ("release-rp-unasked", _established_acceptor, pdu.encode(ReleaseRP()), 2),
    ("unknown-pdu-type", _established_acceptor, bytes.fromhex("09 00 00000004 00000000"), 1),
    ("unrecognized-item", _fresh_acceptor, _with_item(_RQ, bytes.fromhex("60 00 0000")), 4),
    ("malformed-rq", _fresh_acceptor, _RQ[:-1] + b"\xff", 6),  # the version name "TES\xff"
    ("pdv-on-a-refused-context", _established_acceptor, _cmd(5), 6),
    ("pdv-on-an-unknown-context", _established_acceptor, _cmd(7), 6),
    ("dataset-without-command", _established_acceptor, _data(1), 5),
    ("dataset-before-command-ended", _established_acceptor, _cmd(1, last=False) + _data(1), 5),
    ("command-switches-context", _established_acceptor, _cmd(1, last=False) + _cmd(3), 5),
    ("dataset-on-another-context", _established_acceptor, _cmd(1) + _data(3), 5),
    ("command-inside-a-dataset", _established_acceptor, _cmd(1) + _data(1, last=False) + _cmd(1), 5),
    ("dataset-switches-context", _established_acceptor, _cmd(1) + _data(1, last=False) + _data(3), 5),
    ("release-inside-a-command", _established_acceptor, _cmd(1, last=False) + pdu.encode(ReleaseRQ()), 2),
    ("release-inside-a-dataset", _established_acceptor, _cmd(1) + _data(1, last=False) + pdu.encode(ReleaseRQ()), 2),
    ("pdv-shorter-than-2", _established_acceptor, bytes.fromhex("04 00 00000006 00000001 0100"), 6),
    ("p-data-above-our-maximum", _established_acceptor, bytes.fromhex("04 00 00040001"), 6),  # the header only
    ("associate-rq-above-the-cap", lambda: _fresh_acceptor(max_associate_pdu=100), _RQ, 6),
]


@pytest.mark.parametrize(("name", "make", "wire", "reason"), FAULTS, ids=[f[0] for f in FAULTS])
def test_peer_faults_abort_with_the_right_reason(name: str, make: object, wire: bytes, reason: int) -> None:
    association = make()  # type: ignore[operator]
    with pytest.raises(AssociationError) as info:
        association.receive_data(wire)
    exc = info.value
    assert (exc.source, exc.reason) == (2, reason)
    assert exc.abort_pdu == sniffer.abort(2, reason)
    assert association.state is State.CLOSED
    assert association.data_to_send() == b""
    assert association.receive_data(wire) == []  # closed: the rest is ignored
    assert str(exc).isprintable()


def test_command_limit_is_checked_before_each_fragment_is_kept() -> None:
    acceptor = _established_acceptor(max_command_bytes=100)
    assert acceptor.receive_data(_cmd(1, bytes(60), last=False)) == []
    with pytest.raises(AssociationError) as info:
        acceptor.receive_data(_cmd(1, bytes(41)))
    assert info.value.reason == 6
    acceptor = _established_acceptor(max_command_bytes=100)
    got = acceptor.receive_data(_cmd(1, bytes(60), last=False) + _cmd(1, bytes(40)))
    assert got == [CommandReceived(1, bytes(100))]


def test_a_command_may_follow_a_command_and_datasets_need_not_be_announced() -> None:
    """The documented contract: the machine does not read (0000,0800); the DIMSE layer does."""
    acceptor = _established_acceptor()
    got = acceptor.receive_data(_cmd(1) + _cmd(3, b"x") + _data(3, b"y"))
    assert got == [CommandReceived(1, b"c"), CommandReceived(3, b"x"), DatasetFragment(3, b"y", True)]


def _answering(*contexts: PresentationContextResult) -> AssociateAC:
    return replace(ANSWER, contexts=contexts)


@pytest.mark.parametrize(("name", "answer"), [
    ("unproposed-context", _answering(PresentationContextResult(7, ContextResult.ACCEPTANCE, IMPLICIT))),
    ("syntax-not-offered", _answering(PresentationContextResult(1, ContextResult.ACCEPTANCE, EXPLICIT))),
    ("tiny-maximum-length", replace(ANSWER, user=UserInformation(max_pdu_length=6))),
])
def test_an_answer_that_does_not_answer_the_request(name: str, answer: AssociateAC) -> None:
    requestor = _waiting_requestor()
    with pytest.raises(AssociationError) as info:
        requestor.receive_data(pdu.encode(answer))
    assert info.value.reason == 6


def test_an_invalid_ae_title_in_the_first_pdu_is_answered_with_a_reject() -> None:
    acceptor = _fresh_acceptor()
    wire = _RQ[:10] + b"\x00PACS".ljust(16) + _RQ[26:]
    with pytest.raises(InvalidAeTitle) as info:
        acceptor.receive_data(wire)
    assert info.value.reason is RejectReason.CALLED_AE_UNKNOWN
    assert acceptor.state is State.CLOSED


def test_a_pdu_above_the_cap_is_refused_on_its_header_alone() -> None:
    acceptor = _established_acceptor(acceptor_max=4096)
    assert acceptor.receive_data(bytes.fromhex("04 00 0000")) == []
    with pytest.raises(AssociationError) as info:
        acceptor.receive_data(bytes.fromhex("10 01"))  # 4097: one byte above what we advertised
    assert info.value.reason == 6


# --- local calls out of order: UsageError, nothing changed ---------------------------------------------


def _requestor() -> Association:
    return Association(Role.REQUESTOR)


def _mid_dataset() -> Association:
    requestor, _ = pair()
    requestor.send_command(3, b"cmd")
    requestor.send_dataset(3, b"part", last=False)
    return requestor


def _released() -> Association:
    requestor, _ = pair()
    requestor.release()
    return requestor


def _asked_to_release() -> Association:
    requestor, acceptor = pair()
    requestor.release()
    pump(requestor, acceptor)
    return acceptor


MISUSE = [
    ("accept-as-requestor", _requestor, lambda a: a.accept(ANSWER)),
    ("reject-as-requestor", _requestor, lambda a: a.reject(AssociateRJ(1, 1, 7))),
    ("send-before-established", _waiting_requestor, lambda a: a.send_command(1, b"c")),
    ("release-before-established", _waiting_requestor, lambda a: a.release()),
    ("request-twice", _waiting_requestor, lambda a: a.request(REQUEST)),
    ("request-as-acceptor", _fresh_acceptor, lambda a: a.request(REQUEST)),
    ("accept-before-rq", _fresh_acceptor, lambda a: a.accept(ANSWER)),
    ("release-response-unasked", lambda: pair()[0], lambda a: a.release_response()),
    ("send-on-a-refused-context", lambda: pair()[0], lambda a: a.send_command(5, b"c")),
    ("dataset-without-command", lambda: pair()[0], lambda a: a.send_dataset(1, b"d", last=True)),
    ("command-inside-a-dataset", _mid_dataset, lambda a: a.send_command(3, b"c")),
    ("dataset-on-another-context", _mid_dataset, lambda a: a.send_dataset(1, b"d", last=True)),
    ("release-inside-a-dataset", _mid_dataset, lambda a: a.release()),
    ("send-after-release", _released, lambda a: a.send_command(1, b"c")),
    ("release-twice", _released, lambda a: a.release()),
    ("respond-inside-a-dataset", _asked_to_release, lambda a: (a.send_command(1, b"c"), a.send_dataset(1, b"d",
                                                                                                         last=False),
                                                               a.release_response())),
    ("abort-bad-source", lambda: pair()[0], lambda a: a.abort(1, 0)),
    ("abort-user-with-reason", lambda: pair()[0], lambda a: a.abort(0, 2)),
    ("abort-reserved-reason", lambda: pair()[0], lambda a: a.abort(2, 3)),
    ("request-another-maximum", _requestor,
     lambda a: a.request(replace(REQUEST, user=UserInformation(max_pdu_length=1)))),
    ("request-without-context", _requestor, lambda a: a.request(replace(REQUEST, contexts=()))),
]


@pytest.mark.parametrize(("name", "make", "call"), MISUSE, ids=[m[0] for m in MISUSE])
def test_local_calls_out_of_order_raise_usage_error_and_change_nothing(name: str, make: object, call: object) -> None:
    association = make()  # type: ignore[operator]
    association.data_to_send()
    before = association.state
    with pytest.raises((UsageError, ValueError)):
        call(association)  # type: ignore[operator]
    assert association.state is before


def test_accept_must_answer_the_request() -> None:
    acceptor = _fresh_acceptor()
    acceptor.receive_data(_RQ)
    for answer in [replace(ANSWER, contexts=(PresentationContextResult(9, ContextResult.ACCEPTANCE, IMPLICIT),)),
                   replace(ANSWER, contexts=(PresentationContextResult(5, ContextResult.ACCEPTANCE, IMPLICIT),)),
                   replace(ANSWER, contexts=ANSWER.contexts[:1] * 2)]:
        with pytest.raises(UsageError):
            acceptor.accept(answer)
    assert acceptor.state is State.AWAITING_LOCAL_RESPONSE and acceptor.data_to_send() == b""


def test_bad_limits_are_refused() -> None:
    for kwargs in [{"max_pdu_receive": 6}, {"max_pdu_send": 0}, {"max_pdu_receive": 1 << 32}]:
        with pytest.raises(ValueError):
            Association(Role.ACCEPTOR, **kwargs)


# --- the table ------------------------------------------------------------------------------------------


def test_every_state_but_closed_can_abort_and_closed_is_final() -> None:
    for role, table in TRANSITIONS.items():
        states = {source for source, _what in table}
        assert State.CLOSED not in states, role
        for state in states:
            assert table[(state, Input.ABORT)] is table[(state, Input.RECV_ABORT)] is State.CLOSED


def test_no_state_is_unreachable_or_a_dead_end() -> None:
    for role, table in TRANSITIONS.items():
        start = State.IDLE if role is Role.REQUESTOR else State.AWAITING_ASSOCIATE_RQ
        seen, todo = {start}, [start]
        while todo:
            state = todo.pop()
            for (source, _what), target in table.items():
                if source is state and target not in seen:
                    seen.add(target)
                    todo.append(target)
        used = {source for source, _what in table} | set(table.values())
        assert used <= seen, (role, used - seen)
        assert State.CLOSED in seen


def test_only_dicom_errors_escape_receive_data_on_garbage() -> None:
    for make in (_fresh_acceptor, _waiting_requestor, _established_acceptor):
        for wire in [b"\x01" + bytes(9), bytes(range(256)), b"\x04\x00\x00\x00\x00\x02\x00\x00"]:
            try:
                make().receive_data(wire)
            except DicomError:
                pass


def test_events_keep_patient_data_out_of_repr() -> None:
    assert "secret" not in repr(DatasetFragment(1, b"secret", True))
    assert "secret" not in repr(CommandReceived(1, b"secret"))
    assert "secret" not in repr(PDV(1, False, True, b"secret"))
    assert Abort(2, 6) == pdu.decode(sniffer.abort(2, 6))
