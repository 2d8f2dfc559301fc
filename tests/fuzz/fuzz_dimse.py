"""Fuzz target: ``decode_command`` lets only ``DimseError`` escape, and what it accepts re-encodes to itself.

Run it with atheris for a while (libFuzzer flags pass through)::

    .venv/bin/python tests/fuzz/fuzz_dimse.py -max_total_time=60

``one_input`` is the body; tests/test_dimse.py imports it and runs it over a few thousand generated inputs
so CI exercises the same assertions without atheris. Each input is tried twice: as raw bytes, and spliced
into one of the valid command sets of ``SEEDS`` (its first bytes pick the seed, an offset and an
operation), so the fuzzer reaches the element-level checks without having to find a group length first.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from tunnel_core.dicom import dimse  # noqa: E402
from tunnel_core.dicom.uids import VERIFICATION  # noqa: E402
from tunnel_core.errors import DimseError  # noqa: E402

CT = "1.2.840.10008.5.1.4.1.1.2"
STUDY_MOVE = "1.2.840.10008.5.1.4.1.2.2.2"
COMMITMENT = "1.2.840.10008.1.20.1"

SEEDS = tuple(dimse.encode_command(command) for command in (
    dimse.CEchoRQ(1),
    dimse.CEchoRSP(1, 0x0000, VERIFICATION),
    dimse.CStoreRQ(7, CT, "1.2.3.4.5", dimse.Priority.HIGH, "MOVESCU", 3),
    dimse.CStoreRSP(7, 0xB000, CT, "1.2.3.4.5", error_comment="Coerced", offending_element=(0x00100010,)),
    dimse.CFindRQ(2, STUDY_MOVE),
    dimse.CFindRSP(2, 0xFF00, True, STUDY_MOVE),
    dimse.CGetRQ(4, STUDY_MOVE, dimse.Priority.LOW),
    dimse.CGetRSP(4, 0xB000, True, STUDY_MOVE, 0, 3, 1, 0, error_id=2),
    dimse.CMoveRQ(3, STUDY_MOVE, "ARCHIVE"),
    dimse.CMoveRSP(3, 0xFF00, False, STUDY_MOVE, 5, 2, 1, 0),
    dimse.CCancelRQ(2),
    dimse.NActionRQ(10, COMMITMENT, COMMITMENT + ".1", 1, True),
    dimse.NActionRSP(10, 0x0000, False, COMMITMENT, COMMITMENT + ".1", 1),
    dimse.NEventReportRQ(9, COMMITMENT, COMMITMENT + ".1", 1, True),
    dimse.NEventReportRSP(9, 0x0110, False, COMMITMENT, COMMITMENT + ".1", 2, error_comment="no"),
))


def check(data: bytes) -> None:
    """The property: ``DimseError`` or a message that re-encodes to bytes decoding to the same message."""
    try:
        command = dimse.decode_command(data)
    except DimseError:
        return
    again = dimse.encode_command(command)  # a decoded message is always encodable (no ValueError)
    assert dimse.decode_command(again) == command, (data.hex(), command)
    assert dimse.encode_command(dimse.decode_command(again)) == again
    command.describe()


def splice(data: bytes) -> bytes:
    """A seed command set changed by ``data``: byte 0 picks the seed, bytes 1-2 an offset, byte 3 the
    operation (overwrite, insert, truncate, or overwrite and fix the group length), the rest is the patch."""
    if len(data) < 4:
        return data
    seed = SEEDS[data[0] % len(SEEDS)]
    at = int.from_bytes(data[1:3], "little") % (len(seed) + 1)
    op, patch = data[3] % 4, data[4:]
    if op == 0:
        out = seed[:at] + patch + seed[at + len(patch):]
    elif op == 1:
        out = seed[:at] + patch + seed[at:]
    elif op == 2:
        out = seed[:at]
    else:
        out = seed[:at] + patch + seed[at + len(patch):]
        if len(out) >= 12:  # keep the group length in step, so the checks behind it are reached
            out = out[:8] + (len(out) - 12).to_bytes(4, "little") + out[12:]
    return out


def one_input(data: bytes) -> None:
    check(data)
    check(splice(data))


def main() -> None:
    import atheris  # only the fuzzing run needs it

    atheris.instrument_all()
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
