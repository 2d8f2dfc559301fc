"""Reading a few top-level elements from the start of a dataset, without decoding it.

Theory of operation: the spool needs a study's identity (Study Instance UID, (0020,000D)) to group the
instances it holds, and the dataset of a C-STORE arrives in fragments that are never held whole. The
elements a store needs sit near the start (group 0020 comes before the pixel data in group 7FE0), so
:func:`peek_elements` walks the top-level elements of the bytes received so far, in the transfer syntax
the association negotiated, and returns the values of the wanted tags it passed. It stops as soon as it
reaches a tag above the highest one wanted (top-level tags ascend, PS3.5 §7.1), or the end of the bytes.

The walk skips values it does not want by their length; an undefined-length value (a sequence, or an
encapsulated value) is skipped by walking its items and nested elements down to their delimiters, with
the nesting depth bounded. Nothing is copied but the wanted values, and nothing is allocated from a length
read off the wire.

What the caller gets is a :class:`Peek`: the values found, and ``complete`` — True when the walk got past
every wanted tag (so a tag missing from ``values`` is not in the dataset), False when the bytes ran out
first (feed a longer prefix, or give up at the caller's own bound). Bytes that are not a well-formed
dataset raise :class:`~tunnel_core.errors.DatasetError`, and only that. A deflated transfer syntax cannot
be walked without inflating it: :func:`peek_elements` raises ``DatasetError`` for it up front.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass

from tunnel_core.dicom.uids import (
    DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN,
    EXPLICIT_VR_BIG_ENDIAN,
    IMPLICIT_VR_LITTLE_ENDIAN,
)
from tunnel_core.errors import DatasetError

__all__ = ["Peek", "STUDY_INSTANCE_UID", "SERIES_INSTANCE_UID", "peek_elements"]

STUDY_INSTANCE_UID = 0x0020000D
SERIES_INSTANCE_UID = 0x0020000E

ITEM = 0xFFFEE000
ITEM_DELIMITER = 0xFFFEE00D
SEQUENCE_DELIMITER = 0xFFFEE0DD
UNDEFINED_LENGTH = 0xFFFFFFFF
MAX_DEPTH = 16  # nested undefined-length sequences deeper than this are refused, not recursed into

# Explicit VRs whose length field is 4 bytes after 2 reserved ones (PS3.5 §7.1.2, Table 7.1-1).
_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"UC", b"UN", b"UR", b"UT", b"SV", b"UV"})


@dataclass(frozen=True, slots=True)
class Peek:
    values: dict[int, bytes]  # tag -> raw value, trailing NUL and space padding removed
    complete: bool  # the walk passed every wanted tag: one missing from ``values`` is absent


class _Short(Exception):
    """The bytes ran out inside an element: not an error, the caller may feed more."""


def peek_elements(data: bytes | memoryview, transfer_syntax: str, tags: Iterable[int]) -> Peek:
    """The wanted top-level elements among the first bytes of a dataset (see the module docstring)."""
    wanted = frozenset(tags)
    if transfer_syntax == DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN:
        raise DatasetError("a deflated dataset cannot be read without inflating it")
    reader = _Reader(memoryview(data), explicit=transfer_syntax != IMPLICIT_VR_LITTLE_ENDIAN,
                     little=transfer_syntax != EXPLICIT_VR_BIG_ENDIAN)
    last = max(wanted, default=-1)
    values: dict[int, bytes] = {}
    previous = -1
    try:
        while reader.pos < len(reader.data):
            tag, vr, length = reader.header()
            if tag <= previous:
                raise DatasetError(f"element ({tag >> 16:04X},{tag & 0xFFFF:04X}) is out of order")
            previous = tag
            if tag > last:
                return Peek(values, True)
            if length == UNDEFINED_LENGTH:
                if tag in wanted:
                    raise DatasetError("a wanted element has an undefined length")
                reader.skip_undefined(vr, depth=1)
            elif tag in wanted:
                values[tag] = bytes(reader.take(length)).rstrip(b"\x00 ")
            else:
                reader.take(length)
    except _Short:
        return Peek(values, False)
    return Peek(values, False)


class _Reader:
    def __init__(self, data: memoryview, *, explicit: bool, little: bool) -> None:
        self.data = data
        self.pos = 0
        self.explicit = explicit
        self._u16 = struct.Struct("<H" if little else ">H")
        self._u32 = struct.Struct("<I" if little else ">I")

    def take(self, n: int) -> memoryview:
        end = self.pos + n
        if end > len(self.data):
            raise _Short
        value = self.data[self.pos:end]
        self.pos = end
        return value

    def tag(self) -> int:
        group, element = self._u16.unpack(self.take(2))[0], self._u16.unpack(self.take(2))[0]
        return group << 16 | element

    def header(self) -> tuple[int, bytes, int]:
        """(tag, VR or b"", length) of the next element; item tags have no VR in any syntax."""
        tag = self.tag()
        if tag >> 16 == 0xFFFE or not self.explicit:
            return tag, b"", self._u32.unpack(self.take(4))[0]
        vr = bytes(self.take(2))
        if not (65 <= vr[0] <= 90 and 65 <= vr[1] <= 90):
            raise DatasetError(f"element ({tag >> 16:04X},{tag & 0xFFFF:04X}) has no valid VR")
        if vr in _LONG_VRS:
            self.take(2)
            return tag, vr, self._u32.unpack(self.take(4))[0]
        return tag, vr, self._u16.unpack(self.take(2))[0]

    def skip_undefined(self, vr: bytes, *, depth: int) -> None:
        """Skip the items of an undefined-length value, up to and including its sequence delimiter."""
        if depth > MAX_DEPTH:
            raise DatasetError(f"sequences nested deeper than {MAX_DEPTH}")
        if vr not in (b"SQ", b"UN", b"OB", b""):
            raise DatasetError(f"an undefined length on VR {vr.decode('ascii', 'replace')}")
        while True:
            tag, _vr, length = self.header()
            if tag == SEQUENCE_DELIMITER:
                return
            if tag != ITEM:
                raise DatasetError(f"({tag >> 16:04X},{tag & 0xFFFF:04X}) where an item was expected")
            if length != UNDEFINED_LENGTH:
                self.take(length)
            else:
                self._skip_item(depth)

    def _skip_item(self, depth: int) -> None:
        """Skip the elements of an undefined-length item, up to and including its item delimiter."""
        while True:
            tag, vr, length = self.header()
            if tag == ITEM_DELIMITER:
                return
            if length == UNDEFINED_LENGTH:
                self.skip_undefined(vr, depth=depth + 1)
            else:
                self.take(length)
