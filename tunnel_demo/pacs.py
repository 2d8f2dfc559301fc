"""Embedded on-prem PACS for the demo and the tests, built on pynetdicom.

Theory of operation: the PACS keeps an in-memory index of the Part-10 files it serves (their header,
read without pixel data) and reads a file again only when an instance is sent. pynetdicom runs one
thread per association and calls the handlers below:

- C-ECHO: always success.
- C-STORE: the encoded dataset is written unchanged as ``storage_dir/<SOPInstanceUID>.dcm`` (temp
  file + rename) and indexed.
- C-FIND: relational matching over instance headers (single value, ``*``/``?`` wildcards, UID lists,
  DA/TM/DT ranges, empty = universal), grouped by the unique key of the query level; each group
  answers with exactly the requested keys (plus level, character set and Retrieve AE Title).
- C-MOVE / C-GET: the same matching at the requested level, then one C-STORE sub-operation per
  instance. pynetdicom opens the C-MOVE sub-association to the address the handler names and
  produces the pending/final statuses and counts.

Every socket gets TCP_NODELAY from an ``EVT_CONN_OPEN`` handler (pynetdicom has no socket-option
setting of its own). pynetdicom's identifier logging is switched off: identifiers hold PHI.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import signal
import socket
import sys
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, _config, build_context, evt
from pynetdicom import sop_class as sc

LOG = logging.getLogger(__name__)

STORAGE_SOP_CLASSES: tuple[str, ...] = (
    sc.CTImageStorage,
    sc.EnhancedCTImageStorage,
    sc.MRImageStorage,
    sc.EnhancedMRImageStorage,
    sc.SecondaryCaptureImageStorage,
    sc.MultiFrameGrayscaleWordSecondaryCaptureImageStorage,
)
# Explicit VR Little Endian first: pynetdicom, as acceptor, picks the first of *its* syntaxes the
# requestor offers, and explicit VR is what the demo's files are written in.
TRANSFER_SYNTAXES: tuple[str, ...] = (ExplicitVRLittleEndian, ImplicitVRLittleEndian) + tuple(
    ts for ts in ALL_TRANSFER_SYNTAXES if ts not in (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
)
_STUDY_ROOT = {
    sc.StudyRootQueryRetrieveInformationModelFind,
    sc.StudyRootQueryRetrieveInformationModelMove,
    sc.StudyRootQueryRetrieveInformationModelGet,
}
_QR_MODELS = (
    sc.PatientRootQueryRetrieveInformationModelFind,
    sc.PatientRootQueryRetrieveInformationModelMove,
    sc.PatientRootQueryRetrieveInformationModelGet,
    *sorted(_STUDY_ROOT),
)
LEVEL_KEYS = {
    "PATIENT": "PatientID",
    "STUDY": "StudyInstanceUID",
    "SERIES": "SeriesInstanceUID",
    "IMAGE": "SOPInstanceUID",
}
_NOT_MATCHED = {"QueryRetrieveLevel", "SpecificCharacterSet", "RetrieveAETitle", "TimezoneOffsetFromUTC"}
# Derived by _computed() from the instances under a match, not read from any one header.
_COMPUTED_KEYS = frozenset(
    {
        "ModalitiesInStudy",
        "SOPClassesInStudy",
        "NumberOfPatientRelatedStudies",
        "NumberOfPatientRelatedSeries",
        "NumberOfPatientRelatedInstances",
        "NumberOfStudyRelatedSeries",
        "NumberOfStudyRelatedInstances",
        "NumberOfSeriesRelatedInstances",
    }
)
_MAX_REQUESTED_CONTEXTS = 128
_SAFE_UID = re.compile(r"[0-9]+(\.[0-9]+)*")

_PENDING = 0xFF00
_CANCELLED = 0xFE00
_SUCCESS = 0x0000
_IDENTIFIER_MISMATCH = 0xA900
_OUT_OF_RESOURCES = 0xA700
_CANNOT_UNDERSTAND = 0xC210
# Yielded in place of a dataset that can no longer be read: pynetdicom counts a pending yield whose
# dataset is not a Dataset as one failed sub-operation and carries on with the next instance.
_UNREADABLE = "unreadable"

EventHandlers = list[tuple[Any, Callable[..., Any]]]


class PacsError(Exception):
    """Root of the demo peers' errors."""


def enable_nodelay(event: evt.Event) -> None:
    """``EVT_CONN_OPEN`` handler: set TCP_NODELAY on the association's socket (both roles)."""
    sock = event.assoc.dul.socket.socket if event.assoc.dul.socket else None
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def quiet_pynetdicom() -> None:
    """Stop pynetdicom from logging identifiers (PHI) and per-message chatter below WARNING.

    pynetdicom keeps these switches process-wide; the demo peers call this once per construction.
    """
    _config.LOG_REQUEST_IDENTIFIERS = False
    _config.LOG_RESPONSE_IDENTIFIERS = False
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)


def is_safe_uid(uid: str) -> bool:
    """True if ``uid`` is a syntactically valid UID, and so safe to use as a file name."""
    return len(uid) <= 64 and _SAFE_UID.fullmatch(uid) is not None


def write_part10(path: Path, event: evt.Event) -> None:
    """Write a C-STORE request's dataset, bytes unchanged, as a Part-10 file (atomically)."""
    tmp = path.with_name(f".{path.name}.{threading.get_ident()}.part")
    try:
        with open(tmp, "wb") as fh:
            fh.write(event.encoded_dataset(include_meta=True))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@dataclass(frozen=True)
class _Instance:
    path: Path
    header: Dataset
    sop_class_uid: str
    transfer_syntax: str


# ---------------------------------------------------------------------------------------- matching
def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return "\\".join(str(v) for v in value)
    if isinstance(value, bytes):
        return value.decode("ascii", "replace")
    return str(value)


def _value_matcher(vr: str, query: str) -> Callable[[str], bool]:
    """PS3.4 C.2.2.2 matching for one non-empty query value; the result tests one record value."""
    query = query.strip()
    if vr == "UI":
        wanted = {q.strip() for q in query.split("\\")}
        return lambda v: v in wanted
    if vr in ("DA", "TM", "DT") and "-" in query:
        low, _, high = query.partition("-")
        return lambda v: bool(v) and (not low or v >= low) and (not high or v <= high)
    if "*" in query or "?" in query:
        pattern = re.compile(
            "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in query), re.DOTALL
        )
        return lambda v: pattern.fullmatch(v) is not None
    return lambda v: v == query


def _query_terms(identifier: Dataset) -> list[tuple[str, Callable[[str], bool]]]:
    terms = []
    for elem in identifier:
        if not elem.keyword or elem.keyword in _NOT_MATCHED or elem.VR == "SQ":
            continue
        query = _text(elem.value)
        if query.strip() not in ("", "*"):
            terms.append((elem.keyword, _value_matcher(elem.VR, query)))
    return terms


def _record_matches(terms: list[tuple[str, Callable[[str], bool]]], values: Callable[[str], str]) -> bool:
    for keyword, test in terms:
        if not any(test(part.strip()) for part in values(keyword).split("\\")):
            return False
    return True


def _getter(source: Any) -> Callable[[str], str]:
    """Keyword -> matchable text, for a header Dataset or a dict of computed attributes."""
    return lambda keyword: _text(source.get(keyword))


def _computed(members: list[_Instance], level: str) -> dict[str, Any]:
    """Attributes a PACS derives from the instances under one matched entity."""
    series = {_text(m.header.get("SeriesInstanceUID")) for m in members}
    studies = {_text(m.header.get("StudyInstanceUID")) for m in members}
    out: dict[str, Any] = {
        "ModalitiesInStudy": sorted({_text(m.header.get("Modality")) for m in members} - {""}),
        "SOPClassesInStudy": sorted({m.sop_class_uid for m in members}),
    }
    prefix = {"PATIENT": "Patient", "STUDY": "Study", "SERIES": "Series"}.get(level)
    if prefix:
        out[f"NumberOf{prefix}RelatedInstances"] = len(members)
    if level in ("PATIENT", "STUDY"):
        out[f"NumberOf{prefix}RelatedSeries"] = len(series)
    if level == "PATIENT":
        out["NumberOfPatientRelatedStudies"] = len(studies)
    return out


# ---------------------------------------------------------------------------------------- index
class _Index:
    """Thread-safe map SOP Instance UID -> instance; queries work on a snapshot."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._instances: dict[str, _Instance] = {}

    def __len__(self) -> int:
        with self._lock:
            return len(self._instances)

    def add(self, path: Path) -> str:
        """Index one Part-10 file; raises InvalidDicomError/OSError/KeyError if unusable."""
        ds = dcmread(path, stop_before_pixels=True)
        for _ in ds:  # decode every element now, so query threads only ever read the header
            pass
        uid = str(ds.SOPInstanceUID)
        inst = _Instance(Path(path), ds, str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID))
        with self._lock:
            self._instances[uid] = inst
        return uid

    def snapshot(self) -> list[_Instance]:
        with self._lock:
            return list(self._instances.values())

    def match(self, identifier: Dataset, level: str) -> dict[str, list[_Instance]]:
        """Matching instances grouped by the level's unique key, in index order."""
        key = LEVEL_KEYS[level]
        terms = _query_terms(identifier)
        own = [(k, t) for k, t in terms if k not in _COMPUTED_KEYS]
        derived = [(k, t) for k, t in terms if k in _COMPUTED_KEYS]
        everything = self.snapshot()
        groups: dict[str, list[_Instance]] = {}
        for inst in everything:
            if _record_matches(own, _getter(inst.header)):
                groups.setdefault(_text(inst.header.get(key)), []).append(inst)
        if derived:
            related = self._related(everything, key, groups)
            groups = {
                k: v
                for k, v in groups.items()
                if _record_matches(derived, _getter(_computed(related[k], level)))
            }
        return groups

    @staticmethod
    def _related(
        everything: list[_Instance], key: str, groups: dict[str, list[_Instance]]
    ) -> dict[str, list[_Instance]]:
        related: dict[str, list[_Instance]] = {k: [] for k in groups}
        for inst in everything:
            value = _text(inst.header.get(key))
            if value in related:
                related[value].append(inst)
        return related


# ---------------------------------------------------------------------------------------- PACS
class DemoPacs:
    """An on-prem PACS: C-ECHO, C-STORE, C-FIND, C-MOVE and C-GET over pynetdicom.

    Construct (existing ``*.dcm`` under ``storage_dir`` are indexed), ``start()``, then ``stop()``.
    ``move_destinations`` maps a C-MOVE destination AE title to the ``(host, port)`` to send to.
    """

    def __init__(
        self,
        ae_title: str,
        host: str,
        port: int,
        storage_dir: Path,
        move_destinations: dict[str, tuple[str, int]],
        *,
        max_pdu: int = 262_144,
    ) -> None:
        quiet_pynetdicom()
        self.ae_title = ae_title
        self._address = (host, port)
        self._storage_dir = Path(storage_dir)
        self._storage_dir.mkdir(parents=True, exist_ok=True)
        self._destinations = {aet.strip(): dest for aet, dest in move_destinations.items()}
        self._max_pdu = max_pdu
        self._index = _Index()
        self._server: Any = None
        self._ae = self._build_ae()
        self.add_files(sorted(self._storage_dir.rglob("*.dcm")))

    def _build_ae(self) -> AE:
        ae = AE(ae_title=self.ae_title)
        ae.maximum_associations = 64  # a real PACS serves many callers at once; pynetdicom defaults to 10
        ae.maximum_pdu_size = self._max_pdu
        ae.add_supported_context(sc.Verification)
        for uid in _QR_MODELS:
            ae.add_supported_context(uid)
        # scu_role/scp_role True: accept a C-GET requestor's proposal to be the Storage SCP.
        for uid in STORAGE_SOP_CLASSES:
            ae.add_supported_context(uid, list(TRANSFER_SYNTAXES), scu_role=True, scp_role=True)
        return ae

    @property
    def port(self) -> int:
        """The bound port (useful when constructed with port 0); valid after ``start()``."""
        return self._server.server_address[1] if self._server else self._address[1]

    @property
    def instance_count(self) -> int:
        return len(self._index)

    def add_files(self, paths: Iterable[Path]) -> int:
        """Index Part-10 files where they lie (they are not copied); returns how many were added."""
        added = 0
        for path in paths:
            try:
                self._index.add(Path(path))
            except (OSError, InvalidDicomError, AttributeError, KeyError):
                LOG.warning("pacs %s: skipped an unreadable file", self.ae_title)
                continue
            added += 1
        return added

    def start(self) -> None:
        """Listen without blocking; handlers run on pynetdicom's association threads."""
        if self._server is not None:
            raise PacsError("already started")
        handlers = [
            (evt.EVT_CONN_OPEN, enable_nodelay),
            (evt.EVT_C_ECHO, _on_echo),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_C_FIND, self._on_find),
            (evt.EVT_C_MOVE, self._on_move),
            (evt.EVT_C_GET, self._on_get),
        ]
        self._server = self._ae.start_server(self._address, block=False, evt_handlers=handlers)
        LOG.info(
            "pacs %s listening on %s:%d with %d instances",
            self.ae_title,
            self._address[0],
            self.port,
            len(self._index),
        )

    def stop(self) -> None:
        """Abort live associations and close the listener. Safe to call twice."""
        if self._server is None:
            return
        self._ae.shutdown()
        self._server = None

    # ---- handlers (run on association threads) ----
    def _on_store(self, event: evt.Event) -> int:
        uid = str(event.request.AffectedSOPInstanceUID)
        if not is_safe_uid(uid):
            return _CANNOT_UNDERSTAND
        path = self._storage_dir / f"{uid}.dcm"
        try:
            write_part10(path, event)
            self._index.add(path)
        except OSError:
            LOG.warning("pacs %s: could not store an instance", self.ae_title)
            return _OUT_OF_RESOURCES
        except (InvalidDicomError, AttributeError, KeyError):
            return _CANNOT_UNDERSTAND
        return _SUCCESS

    def _on_find(self, event: evt.Event) -> Iterator[tuple[int, Dataset | None]]:
        identifier = event.identifier
        level = _level(identifier, str(event.request.AffectedSOPClassUID))
        if level is None:
            yield _IDENTIFIER_MISMATCH, None
            return
        for members in self._index.match(identifier, level).values():
            if event.is_cancelled:
                yield _CANCELLED, None
                return
            yield _PENDING, self._response(identifier, level, members)

    def _on_move(self, event: evt.Event) -> Iterator[Any]:
        destination = self._destinations.get((event.move_destination or "").strip())
        if destination is None:
            yield None, None  # pynetdicom answers 0xA801 Move Destination Unknown
            return
        identifier = event.identifier
        level = _level(identifier, str(event.request.AffectedSOPClassUID))
        instances = self._retrieve_set(identifier, level)
        contexts = _move_contexts(instances)
        options = {
            "contexts": contexts,
            "max_pdu": self._max_pdu,
            "evt_handlers": [(evt.EVT_CONN_OPEN, enable_nodelay)],
        }
        yield destination[0], destination[1], options
        yield from self._sub_operations(event, level, instances)

    def _on_get(self, event: evt.Event) -> Iterator[Any]:
        identifier = event.identifier
        level = _level(identifier, str(event.request.AffectedSOPClassUID))
        yield from self._sub_operations(event, level, self._retrieve_set(identifier, level))

    def _retrieve_set(self, identifier: Dataset, level: str | None) -> list[_Instance]:
        if level is None:
            return []
        return [inst for members in self._index.match(identifier, level).values() for inst in members]

    @staticmethod
    def _sub_operations(event: evt.Event, level: str | None, instances: list[_Instance]) -> Iterator[Any]:
        """Yield the sub-operation count, then one pending (status, dataset) per instance."""
        if level is None:
            yield 1  # a failure needs a sub-operation slot to be reported; pynetdicom counts it failed
            yield _IDENTIFIER_MISMATCH, None
            return
        yield len(instances)
        for inst in instances:
            if event.is_cancelled:
                yield _CANCELLED, None
                return
            yield _PENDING, _read_instance(inst.path)

    def _response(self, identifier: Dataset, level: str, members: list[_Instance]) -> Dataset:
        first = members[0].header
        computed = _computed(members, level)
        rsp = Dataset()
        if "SpecificCharacterSet" in first:
            rsp.SpecificCharacterSet = first.SpecificCharacterSet
        for elem in identifier:
            kw = elem.keyword
            if kw in ("QueryRetrieveLevel", "SpecificCharacterSet", "RetrieveAETitle"):
                continue
            if kw in computed:
                setattr(rsp, kw, computed[kw])
            elif elem.VR != "SQ" and elem.tag in first:
                rsp[elem.tag] = DataElement(elem.tag, first[elem.tag].VR, first[elem.tag].value)
            else:
                rsp.add_new(elem.tag, elem.VR, [] if elem.VR == "SQ" else None)
        rsp.QueryRetrieveLevel = level
        rsp.RetrieveAETitle = self.ae_title
        return rsp


def _on_echo(event: evt.Event) -> int:
    return _SUCCESS


def _level(identifier: Dataset, model_uid: str) -> str | None:
    """The identifier's Query/Retrieve level, or None if absent or invalid for the model."""
    level = str(identifier.get("QueryRetrieveLevel", "")).strip().upper()
    if level not in LEVEL_KEYS or (level == "PATIENT" and model_uid in _STUDY_ROOT):
        return None
    return level


def _read_instance(path: Path) -> Dataset | str:
    try:
        return dcmread(path)
    except (OSError, InvalidDicomError):
        return _UNREADABLE


def _move_contexts(instances: list[_Instance]) -> list[Any]:
    """Requested contexts for a C-MOVE sub-association: each instance's own syntax, then uncompressed."""
    by_class: dict[str, list[str]] = {}
    for inst in instances:
        syntaxes = by_class.setdefault(inst.sop_class_uid, [])
        if inst.transfer_syntax not in syntaxes:
            syntaxes.append(inst.transfer_syntax)
    contexts = []
    for uid, syntaxes in list(by_class.items())[:_MAX_REQUESTED_CONTEXTS]:
        for ts in (ExplicitVRLittleEndian, ImplicitVRLittleEndian):
            if ts not in syntaxes:
                syntaxes.append(ts)
        contexts.append(build_context(UID(uid), syntaxes))
    return contexts or [build_context(sc.Verification)]


# ---------------------------------------------------------------------------------------- CLI
def parse_destination(text: str) -> tuple[str, tuple[str, int]]:
    """``DEST=host:port`` -> ``("DEST", ("host", port))``; raises ValueError when malformed."""
    aet, sep, address = text.partition("=")
    host, colon, port = address.rpartition(":")
    if not sep or not colon or not aet.strip() or not host or not port.isdigit():
        raise ValueError(f"expected AET=host:port, got {text!r}")
    return aet.strip(), (host, int(port))


def serve_until_signal(peer: Any, ready_line: str) -> int:
    """Start ``peer``, print ``ready_line`` and block until SIGTERM or SIGINT; then stop it."""
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        peer.start()
        print(ready_line.format(port=peer.port), flush=True)
        stop.wait()
    finally:
        peer.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m tunnel_demo.pacs --ae PACS --port 4242 --dir DIR [--move DEST=host:port ...]``."""
    parser = argparse.ArgumentParser(prog="python -m tunnel_demo.pacs", description="Demo on-prem PACS")
    parser.add_argument("--ae", default="PACS")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=4242)
    parser.add_argument("--dir", type=Path, required=True)
    parser.add_argument("--move", action="append", default=[], metavar="DEST=host:port")
    args = parser.parse_args(argv)
    try:
        destinations = dict(parse_destination(item) for item in args.move)
    except ValueError as exc:
        parser.error(str(exc))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    pacs = DemoPacs(args.ae, args.host, args.port, args.dir, destinations)
    return serve_until_signal(pacs, f"pacs {args.ae} ready on {args.host}:{{port}}")


if __name__ == "__main__":
    sys.exit(main())
