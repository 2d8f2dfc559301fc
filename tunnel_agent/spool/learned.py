"""What each spool destination accepted when it was last asked, kept on disk with its age.

The ingest accepts from a modality only the presentation contexts its cloud destination accepts, because
an instance goes on in the transfer syntax it arrived in. The forwarder asks the destination (a probe
association proposing every configured pair, ``tunnel_core.dicom.negotiation.probe_contexts``) at each
tunnel connect when the last answer is older than ``learn_interval``, and records the answer here; until
a first answer exists (a cold start with the relay offline) the configured pairs stand in. A pair the
destination refuses in a forwarding association is dropped at once, so the ingest stops accepting it.

One small JSON file per destination, ``<spool root>/.accepted-<name>.json`` (0600, written to a temporary
file, fsynced and renamed): ``{"learned_at": <epoch seconds>, "accepted": {abstract: [transfer, ...]}}``.
SOP class and transfer syntax UIDs only: no patient data. A file that cannot be read counts as no answer.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Iterable
from pathlib import Path

from tunnel_agent.config import AgentDestination
from tunnel_core.dicom.negotiation import Acceptable, configured_pairs
from tunnel_core.dicom.uids import is_uid

__all__ = ["LearnedContexts"]

log = logging.getLogger("agent.spool")
_MAX_FILE = 1024 * 1024


class LearnedContexts:
    def __init__(self, root: Path, destinations: Iterable[AgentDestination]) -> None:
        self.root = root
        self._lock = threading.Lock()
        self._configured = {d.name: configured_pairs(d.sop_classes, d.transfer_syntaxes) for d in destinations}
        self._learned: dict[str, dict[str, tuple[str, ...]]] = {}
        self._learned_at: dict[str, float] = {}
        for name in self._configured:
            self._load(name)

    def acceptable(self, name: str) -> Acceptable:
        """The pairs the ingest may accept for destination ``name`` now."""
        with self._lock:
            return self._learned.get(name) or self._configured[name]

    def configured(self, name: str) -> dict[str, tuple[str, ...]]:
        return self._configured[name]

    def learned_at(self, name: str) -> float | None:
        """When the destination last answered a probe (epoch seconds), or None: never."""
        return self._learned_at.get(name)

    def record(self, name: str, accepted: dict[str, tuple[str, ...]], now: float) -> None:
        """A probe's answer: replaces what was known, on disk first."""
        self._write(name, accepted, now)
        with self._lock:
            self._learned[name] = dict(accepted)
            self._learned_at[name] = now

    def refused(self, name: str, abstract: str, transfer_syntax: str) -> None:
        """The destination refused this pair in a forwarding association: stop accepting it."""
        with self._lock:
            current = dict(self._learned.get(name) or self._configured[name])
            kept = tuple(ts for ts in current.get(abstract, ()) if ts != transfer_syntax)
            if kept:
                current[abstract] = kept
            else:
                current.pop(abstract, None)
            self._learned[name] = current
            at = self._learned_at.get(name, 0.0)
        self._write(name, current, at)

    def _path(self, name: str) -> Path:
        return self.root / f".accepted-{name}.json"

    def _load(self, name: str) -> None:
        try:
            with open(self._path(name), "rb") as f:
                data = json.loads(f.read(_MAX_FILE))
            accepted = {str(a): tuple(str(t) for t in ts) for a, ts in data["accepted"].items()
                        if is_uid(a) and all(is_uid(t) for t in ts)}
            self._learned[name], self._learned_at[name] = accepted, float(data["learned_at"])
        except FileNotFoundError:
            return
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            log.warning("spool destination %s: what it accepts could not be read (%s); using the configured "
                        "contexts until it is asked again", name, type(exc).__name__)

    def _write(self, name: str, accepted: dict[str, tuple[str, ...]], now: float) -> None:
        path = self._path(name)
        temporary = path.with_suffix(".tmp")
        body = json.dumps({"learned_at": now, "accepted": {a: list(ts) for a, ts in accepted.items()}}).encode()
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, body)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temporary, path)
        directory = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
