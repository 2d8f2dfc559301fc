"""The spool's entry file: one file per instance, a small header and then the dataset bytes as received.

Theory of operation: an entry is committed by one rename, so everything that belongs to it is in one file.
The header comes first and is written when the entry is begun, except for two fields only known at the
end — the dataset's length and the header's CRC — which are written in place at commit, before the
fsync. A file whose length field still says "being written" was never committed.

Format, version 1 (all integers big-endian)::

    offset  size  field
    0       4     magic  89 53 50 4C  ("\\x89SPL": not text, so no tool mistakes it for one)
    4       2     format version, 1
    6       2     N, the record's length in bytes, 2..MAX_RECORD
    8       8     the dataset's length in bytes; FF..FF while the entry is being written
    16      4     CRC-32 of bytes 0..15 followed by the N record bytes; 0 while being written
    20      N     the record: a UTF-8 JSON object, every SpoolRecord field but ``size`` (which is the
                  dataset length above), compact, keys sorted
    20+N    ...   the dataset, exactly as received; the file ends with it (20 + N + length bytes)

:func:`read_header` checks all of it (magic, version, lengths against the file's size, CRC, every field's
type) and raises :class:`CorruptEntry` with a PHI-free reason for anything else. The dataset bytes carry
no checksum: verifying one would mean reading every byte at replay, and DICOM receivers check nothing
either; the file's length must match exactly.

Entry names are ``<16 hex digits: a sequence number>-<8 random hex digits>``: they sort in the order the
entries were begun (the spool numbers them by receive time in microseconds, kept increasing) and say
nothing about the patient. A quarantined entry has a ``<name>.reason`` JSON
file beside it (:func:`encode_reason`).
"""

from __future__ import annotations

import json
import math
import os
import re
import secrets
import struct
import zlib
from dataclasses import dataclass, fields, replace

__all__ = [
    "CorruptEntry",
    "EntryHeader",
    "FIXED_HEADER",
    "MAX_REASON_FILE",
    "MAX_RECORD",
    "REASON_SUFFIX",
    "SpoolRecord",
    "decode_reason",
    "encode_header",
    "encode_reason",
    "entry_name",
    "entry_sequence",
    "read_header",
    "seal",
    "validate_destination",
]

MAGIC = b"\x89SPL"
VERSION = 1
FIXED_HEADER = 20
MAX_RECORD = 16 * 1024  # AE titles, UIDs and a study key: far less; anything longer is refused, not read
REASON_SUFFIX = ".reason"
MAX_REASON_FILE = 64 * 1024
_UNSEALED = 0xFFFF_FFFF_FFFF_FFFF
_PREFIX = struct.Struct(">4sHH")  # magic, version, N
_SEAL = struct.Struct(">QI")  # dataset length, CRC-32 (at offset 8)
_NAME = re.compile(r"[0-9a-f]{16}-[0-9a-f]{8}")
_DESTINATION = re.compile(r"[a-z0-9-]{1,63}")


class CorruptEntry(Exception):
    """An entry file that is not a committed entry of this format; ``str()`` says why, PHI-free."""


@dataclass(frozen=True, slots=True)
class SpoolRecord:
    """What the spool keeps about one instance besides its bytes. ``received`` is the caller's clock
    (epoch seconds) when the instance began to arrive; ``size`` is the dataset's length, filled in by the
    spool at commit (whatever the caller passes is ignored); ``study_key`` is the caller's opaque grouping
    key. The identifiers are PHI-adjacent: the spool never logs them or puts them in a file name."""

    destination: str
    calling_ae: str
    called_ae: str
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: str
    study_key: str
    received: float
    size: int = 0


_RECORD_FIELDS = tuple(f.name for f in fields(SpoolRecord) if f.name != "size")  # what the JSON holds
_STR_FIELDS = tuple(f.name for f in fields(SpoolRecord) if f.type == "str")


@dataclass(frozen=True, slots=True)
class EntryHeader:
    record: SpoolRecord  # with ``size`` set from the header's dataset length
    dataset_offset: int  # where the dataset starts in the file (FIXED_HEADER + N)


def validate_destination(name: str) -> str:
    """``name`` if it is a destination name (``[a-z0-9-]{1,63}``); ValueError otherwise."""
    if not isinstance(name, str) or not _DESTINATION.fullmatch(name):
        raise ValueError(f"not a destination name: {name!r:.80}")
    return name


def entry_name(sequence: int) -> str:
    """A new entry's file name: the sequence number (it sorts) and a random suffix."""
    return f"{sequence:016x}-{secrets.token_hex(4)}"


def entry_sequence(name: str) -> int | None:
    """The sequence number in an entry file name, or None when ``name`` is not one."""
    return int(name[:16], 16) if _NAME.fullmatch(name) else None


def encode_header(record: SpoolRecord) -> bytes:
    """The header of a new entry, unsealed (see :func:`seal`). ValueError for a record that is not one."""
    _check_record(record)
    body = json.dumps(_fields_of(record), separators=(",", ":"), sort_keys=True, ensure_ascii=False)
    encoded = body.encode()
    if len(encoded) > MAX_RECORD:
        raise ValueError(f"record of {len(encoded)} bytes exceeds {MAX_RECORD}")
    return _PREFIX.pack(MAGIC, VERSION, len(encoded)) + _SEAL.pack(_UNSEALED, 0) + encoded


def seal(header: bytes, dataset_length: int) -> tuple[int, bytes]:
    """``(offset, bytes)`` to write in place at commit: the dataset length and the header CRC."""
    crc = zlib.crc32(header[FIXED_HEADER:], zlib.crc32(header[:8] + struct.pack(">Q", dataset_length)))
    return 8, _SEAL.pack(dataset_length, crc)


def read_header(fd: int, file_size: int) -> EntryHeader:
    """Read and check the header of the entry file open as ``fd`` (``file_size`` bytes long)."""
    fixed = os.pread(fd, FIXED_HEADER, 0)
    if len(fixed) < FIXED_HEADER:
        raise CorruptEntry(f"shorter than the {FIXED_HEADER}-byte header")
    magic, version, length = _PREFIX.unpack_from(fixed)
    dataset_length, crc = _SEAL.unpack_from(fixed, 8)
    if magic != MAGIC:
        raise CorruptEntry("not a spool entry (bad magic)")
    if version != VERSION:
        raise CorruptEntry(f"unknown format version {version}")
    if dataset_length == _UNSEALED:
        raise CorruptEntry("never sealed (written but not committed)")
    if not 2 <= length <= MAX_RECORD or FIXED_HEADER + length + dataset_length != file_size:
        raise CorruptEntry("lengths do not match the file size")
    body = os.pread(fd, length, FIXED_HEADER)
    if len(body) != length or zlib.crc32(body, zlib.crc32(fixed[:16])) != crc:
        raise CorruptEntry("header CRC mismatch")
    return EntryHeader(_decode_record(body, dataset_length), FIXED_HEADER + length)


def encode_reason(reason: str, attempts: int) -> bytes:
    return json.dumps({"attempts": attempts, "reason": reason}, ensure_ascii=False).encode()


def decode_reason(data: bytes) -> tuple[str, int]:
    """``(reason, attempts)`` from a reason file; a placeholder reason when it cannot be read."""
    try:
        value = json.loads(data[:MAX_REASON_FILE])
        reason, attempts = value["reason"], value["attempts"]
        if isinstance(reason, str) and isinstance(attempts, int):
            return reason, attempts
    except (ValueError, TypeError, KeyError):
        pass
    return "unreadable reason file", 0


def _fields_of(record: SpoolRecord) -> dict[str, object]:
    return {name: getattr(record, name) for name in _RECORD_FIELDS}


def _check_record(record: SpoolRecord) -> None:
    validate_destination(record.destination)
    bad = [name for name in _STR_FIELDS if not isinstance(getattr(record, name), str)]
    if bad:
        raise ValueError(f"record fields are not strings: {', '.join(bad)}")
    if not isinstance(record.received, int | float) or not math.isfinite(record.received):
        raise ValueError("record.received is not a finite number")


def _decode_record(body: bytes, size: int) -> SpoolRecord:
    try:
        values = json.loads(body)
    except ValueError:
        raise CorruptEntry("record is not JSON") from None
    if not isinstance(values, dict) or set(values) != set(_RECORD_FIELDS):
        raise CorruptEntry("record fields do not match")
    try:
        record = SpoolRecord(**values, size=size)
        _check_record(record)
    except (TypeError, ValueError):
        raise CorruptEntry("record field of the wrong type") from None
    return replace(record, received=float(record.received))
