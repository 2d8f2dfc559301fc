"""Cloud-side Storage SCP for the demo and the tests, built on pynetdicom.

Accepts C-ECHO and C-STORE for the demo's storage SOP classes in any transfer syntax and writes each
instance as ``storage_dir/<SOPInstanceUID>.dcm``: a preamble, file meta built from the association,
then the dataset bytes exactly as they arrived (never decoded and re-encoded), so a test can compare
them with the source byte for byte. Files appear atomically (temp file + rename).
"""

from __future__ import annotations

import argparse
import logging
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pynetdicom import AE, evt
from pynetdicom import sop_class as sc

from tunnel_demo.pacs import (
    STORAGE_SOP_CLASSES,
    TRANSFER_SYNTAXES,
    PacsError,
    enable_nodelay,
    is_safe_uid,
    quiet_pynetdicom,
    serve_until_signal,
    write_part10,
)

LOG = logging.getLogger(__name__)

_SUCCESS = 0x0000
_OUT_OF_RESOURCES = 0xA700
_CANNOT_UNDERSTAND = 0xC210


class StoreScp:
    """A Storage SCP: construct, ``start()``, read ``received``, ``stop()``."""

    def __init__(
        self, ae_title: str, host: str, port: int, storage_dir: Path, *, max_pdu: int = 262_144
    ) -> None:
        quiet_pynetdicom()
        self.ae_title = ae_title
        self._address = (host, port)
        self._storage_dir = Path(storage_dir)
        self._storage_dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._received: list[Path] = []
        self._server: Any = None
        self._ae = AE(ae_title=ae_title)
        self._ae.maximum_associations = 64
        self._ae.maximum_pdu_size = max_pdu
        self._ae.add_supported_context(sc.Verification)
        for uid in STORAGE_SOP_CLASSES:
            self._ae.add_supported_context(uid, list(TRANSFER_SYNTAXES))

    @property
    def received(self) -> list[Path]:
        """Paths written so far, in arrival order (a copy; a re-sent instance appears again)."""
        with self._lock:
            return list(self._received)

    @property
    def port(self) -> int:
        """The bound port (useful when constructed with port 0); valid after ``start()``."""
        return self._server.server_address[1] if self._server else self._address[1]

    def start(self) -> None:
        """Listen without blocking; C-STOREs are handled on pynetdicom's association threads."""
        if self._server is not None:
            raise PacsError("already started")
        handlers = [
            (evt.EVT_CONN_OPEN, enable_nodelay),
            (evt.EVT_C_ECHO, lambda event: _SUCCESS),
            (evt.EVT_C_STORE, self._on_store),
        ]
        self._server = self._ae.start_server(self._address, block=False, evt_handlers=handlers)
        LOG.info("store-scp %s listening on %s:%d", self.ae_title, self._address[0], self.port)

    def stop(self) -> None:
        """Abort live associations and close the listener. Safe to call twice."""
        if self._server is None:
            return
        self._ae.shutdown()
        self._server = None

    def _on_store(self, event: evt.Event) -> int:
        uid = str(event.request.AffectedSOPInstanceUID)
        if not is_safe_uid(uid):
            return _CANNOT_UNDERSTAND
        path = self._storage_dir / f"{uid}.dcm"
        try:
            write_part10(path, event)
        except OSError:
            LOG.warning("store-scp %s: could not write an instance", self.ae_title)
            return _OUT_OF_RESOURCES
        with self._lock:
            self._received.append(path)
        return _SUCCESS


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m tunnel_demo.store_scp --ae STORE --port 11113 --dir DIR``; stops on SIGTERM/SIGINT."""
    parser = argparse.ArgumentParser(prog="python -m tunnel_demo.store_scp", description="Demo Storage SCP")
    parser.add_argument("--ae", default="STORE")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=11113)
    parser.add_argument("--dir", type=Path, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    scp = StoreScp(args.ae, args.host, args.port, args.dir)
    return serve_until_signal(scp, f"store-scp {args.ae} ready on {args.host}:{{port}}")


if __name__ == "__main__":
    sys.exit(main())
