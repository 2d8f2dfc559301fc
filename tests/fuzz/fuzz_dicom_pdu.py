"""atheris fuzz target: the DICOM upper layer (``pdu.decode``, ``PduReader``, ``Association``) fed any bytes.

Only ``DicomError`` may escape; anything else is a finding. Beyond that the target checks what must hold
for every input: a decoded PDU encodes and decodes back to itself, the reader's outcome does not depend on
the chunking, and an acceptor that answers every event the way a real peer would never hits a
``UsageError`` (which would be the machine contradicting itself).

Run: ``.venv/bin/python tests/fuzz/fuzz_dicom_pdu.py [corpus_dir] -max_total_time=60``. The seeds below
are written to the corpus directory when it is empty. ``tests/test_dicom_codec.py`` runs ``fuzz_one`` over
generated inputs, so CI exercises the same body without atheris.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

if __name__ == "__main__":  # run as a script: the repository root is not on the path yet
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tunnel_core.dicom import pdu  # noqa: E402
from tunnel_core.dicom.association import (  # noqa: E402
    AssociateRequested,
    Association,
    CommandReceived,
    Event,
    ReleaseRequested,
    Role,
    State,
)
from tunnel_core.errors import DicomError  # noqa: E402

VERIFICATION, CT = "1.2.840.10008.1.1", "1.2.840.10008.5.1.4.1.1.2"
IMPLICIT, EXPLICIT = "1.2.840.10008.1.2", "1.2.840.10008.1.2.1"

REQUEST = pdu.AssociateRQ(
    "PACS", "MODALITY",
    (pdu.PresentationContext(1, VERIFICATION, (IMPLICIT,)), pdu.PresentationContext(3, CT, (EXPLICIT, IMPLICIT))),
    pdu.UserInformation(max_pdu_length=1024, implementation_class_uid="1.2.3.4", implementation_version_name="FUZZ",
                        async_window=pdu.AsyncOperationsWindow(1, 1), roles=(pdu.RoleSelection(CT, True, False),),
                        user_identity=pdu.UserIdentity(2, True, b"user", b"pass"), unknown=((0x7F, b"x"),)),
)
ANSWER = pdu.AssociateAC(
    "PACS", "MODALITY",
    (pdu.PresentationContextResult(1, pdu.ContextResult.ACCEPTANCE, IMPLICIT),
     pdu.PresentationContextResult(3, pdu.ContextResult.USER_REJECTION, "")),
    pdu.UserInformation(max_pdu_length=0, implementation_class_uid="1.2.3.4",
                        user_identity_response=pdu.UserIdentityResponse(b"ok")),
)
_COMMAND = pdu.encode_pdv(1, True, True, bytes(20))
_DATA = pdu.encode(pdu.PDataTF((pdu.PDV(1, True, False, b"cmd"), pdu.PDV(1, True, True, b"set"),
                                pdu.PDV(1, False, False, b"data"), pdu.PDV(1, False, True, b"end"))))
_RELEASE_RQ, _RELEASE_RP = pdu.encode(pdu.ReleaseRQ()), pdu.encode(pdu.ReleaseRP())
SEEDS: list[bytes] = [
    pdu.encode(REQUEST), pdu.encode(ANSWER), pdu.encode(pdu.AssociateRJ(1, 1, 7)), _COMMAND, _DATA,
    _RELEASE_RQ, _RELEASE_RP, pdu.encode(pdu.Abort(2, 6)),
    _COMMAND + _DATA + _RELEASE_RQ,  # what a requestor sends once established
    pdu.encode(REQUEST) + _COMMAND,  # P-DATA before the answer
]


def fuzz_one(data: bytes) -> None:
    """One input through every reader of the upper layer. Raises only on a finding."""
    _decode(data)
    _reader(data)
    _acceptor(data)
    _established(Role.ACCEPTOR, data)
    _established(Role.REQUESTOR, data)


def _decode(data: bytes) -> None:
    try:
        decoded = pdu.decode(data)
    except DicomError:
        return
    assert pdu.decode(pdu.encode(decoded)) == decoded


def _read(reader: pdu.PduReader, chunks: list[bytes]) -> tuple[list[pdu.Pdu], type | None]:
    """The PDUs read before the first error (``pdus`` yields them one by one), and that error's type."""
    got: list[pdu.Pdu] = []
    try:
        for chunk in chunks:
            got.extend(reader.pdus(chunk))
    except DicomError as exc:
        return got, type(exc)
    return got, None


def _reader(data: bytes) -> None:
    whole = _read(pdu.PduReader(4096, 8192), [data])
    step = (data[0] % 7 + 1) if data else 1
    pieces = _read(pdu.PduReader(4096, 8192), [data[i:i + step] for i in range(0, len(data), step)])
    assert whole == pieces, (whole, pieces)


def _answer(association: Association, events: list[Event]) -> None:
    """Answer as a well-behaved peer: accept every context with its first transfer syntax, echo commands,
    grant releases; nothing once the batch has closed the association (a command, then an A-ABORT)."""
    for event in events:
        if association.state is State.CLOSED:
            break
        match event:
            case AssociateRequested(rq=rq):
                results = tuple(pdu.PresentationContextResult(cx.id, pdu.ContextResult.ACCEPTANCE,
                                                              cx.transfer_syntaxes[0]) for cx in rq.contexts)
                association.accept(pdu.AssociateAC(rq.called_ae, rq.calling_ae, results))
            case CommandReceived(context_id=context_id):
                association.send_command(context_id, bytes(12))
            case ReleaseRequested():
                association.release_response()
    association.data_to_send()


def _feed(association: Association, chunks: list[bytes]) -> None:
    try:
        for chunk in chunks:
            _answer(association, association.receive_data(chunk))
    except DicomError:
        pass


def _acceptor(data: bytes) -> None:
    _feed(Association(Role.ACCEPTOR, max_pdu_receive=4096, max_associate_pdu=8192, max_command_bytes=256), [data])


def _established(role: Role, data: bytes) -> None:
    """An association established from canned PDUs, then fed ``data`` in two pieces."""
    association = Association(role, max_pdu_receive=4096, max_command_bytes=256)
    if role is Role.ACCEPTOR:
        _answer(association, association.receive_data(pdu.encode(REQUEST)))
    else:
        association.request(replace(REQUEST, user=replace(REQUEST.user, max_pdu_length=None)))  # filled in
        association.receive_data(pdu.encode(ANSWER))
    cut = len(data) // 2
    _feed(association, [data[:cut], data[cut:]])


def main() -> None:
    import atheris

    corpus = next((Path(arg) for arg in sys.argv[1:] if not arg.startswith("-")), None)
    if corpus is not None and corpus.is_dir() and not any(corpus.iterdir()):
        for i, seed in enumerate(SEEDS):
            (corpus / f"seed-{i}").write_bytes(seed)
    atheris.instrument_all()
    atheris.Setup(sys.argv, fuzz_one)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
