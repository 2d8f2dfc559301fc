"""An Orthanc PACS of the test's own: free ports, config and storage in the test's tmp dir.

Orthanc 1.10 (Debian 12) has no option to bind its HTTP or DICOM listener to one address: both listen
on all interfaces. `RemoteAccessAllowed: false` makes its REST API answer only loopback callers, and
tests only ever connect to 127.0.0.1. The system Orthanc the Debian package may run (4242/8042) is
never used; scripts/bootstrap.sh stops it.

Configured permissively for tests: any calling AE may echo/store/find/move/get
(`DicomAlwaysAllow*`), the called AE is not checked, no authentication, no plugins. C-MOVE
destinations must be listed in `modalities` ({name: (aet, host, port)}).
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence as DicomSequence

from .dcmtk import require_binary
from .ports import free_ports
from .procs import ManagedProcess, ProcessTracker, require_loopback, wait_for_port, wait_until

__all__ = ["OrthancError", "OrthancHandle", "normalize_find", "orthanc_config", "start_orthanc"]

LOOPBACK = "127.0.0.1"
Modalities = Mapping[str, tuple[str, str, int]]

# Never route the REST calls through an http_proxy from the environment (squid tests set one).
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class OrthancError(Exception):
    """Orthanc did not start, or its REST API refused a request."""


@dataclass(frozen=True)
class OrthancHandle:
    """A running Orthanc: its DICOM AE/port, REST port and process (ended by the `procs` fixture)."""

    process: ManagedProcess
    aet: str
    dicom_port: int
    http_port: int
    config_path: Path
    host: str = LOOPBACK

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        *,
        content_type: str | None = None,
        timeout: float = 30.0,
    ) -> bytes:
        """One REST call; returns the body or raises OrthancError with status and body."""
        require_loopback(self.host)
        req = urllib.request.Request(self.base_url + path, data=body, method=method)
        if content_type:
            req.add_header("Content-Type", content_type)
        try:
            with _OPENER.open(req, timeout=timeout) as response:
                return response.read()
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")[:2000]
            raise OrthancError(f"{method} {path} -> HTTP {exc.code}: {detail}") from exc
        except (urllib.error.URLError, OSError) as exc:
            raise OrthancError(f"{method} {path} failed: {exc}") from exc

    def get_json(self, path: str) -> Any:
        return json.loads(self.request("GET", path))

    def post_json(self, path: str, payload: Any) -> Any:
        body = json.dumps(payload).encode()
        return json.loads(self.request("POST", path, body, content_type="application/json"))

    def upload(self, files: Iterable[str | os.PathLike[str]]) -> list[str]:
        """Store each DICOM file through REST POST /instances; returns the Orthanc instance IDs."""
        ids: list[str] = []
        for path in files:
            answer = json.loads(
                self.request("POST", "/instances", Path(path).read_bytes(), content_type="application/dicom")
            )
            if answer.get("Status") not in {"Success", "AlreadyStored"}:
                raise OrthancError(f"upload of {path} answered {answer!r}")
            ids.append(answer["ID"])
        return ids

    def instances_count(self) -> int:
        return int(self.get_json("/statistics")["CountInstances"])

    def studies_count(self) -> int:
        return int(self.get_json("/statistics")["CountStudies"])

    def system_answers(self) -> bool:
        """True once GET /system answers (the REST API is up)."""
        try:
            return "DicomAet" in self.get_json("/system")
        except OrthancError:
            return False


def orthanc_config(
    work_dir: Path,
    *,
    aet: str,
    dicom_port: int,
    http_port: int,
    modalities: Modalities,
) -> dict[str, Any]:
    """The JSON config for a test Orthanc whose storage and index live under `work_dir`."""
    return {
        "Name": f"test-{aet}",
        "StorageDirectory": str(work_dir / "storage"),
        "IndexDirectory": str(work_dir / "index"),
        "Plugins": [],
        "HttpServerEnabled": True,
        "HttpPort": http_port,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "SslEnabled": False,
        "OrthancExplorerEnabled": False,
        "WebDavEnabled": False,
        "DicomServerEnabled": True,
        "DicomAet": aet,
        "DicomPort": dicom_port,
        "DicomCheckCalledAet": False,
        "DicomCheckModalityHost": False,
        "DicomAlwaysAllowEcho": True,
        "DicomAlwaysAllowStore": True,
        "DicomAlwaysAllowFind": True,
        "DicomAlwaysAllowMove": True,
        "DicomAlwaysAllowGet": True,
        "DicomModalities": {name: [ae, host, port] for name, (ae, host, port) in modalities.items()},
        "DicomModalitiesInDatabase": False,
        "OrthancPeers": {},
        "UnknownSopClassAccepted": True,
        "DicomScuTimeout": 10,
        "DicomAssociationCloseDelay": 0,  # close C-MOVE sub-associations at once, not after 5 s
        "SynchronousCMove": True,
        "SaveJobs": False,
        "TcpNoDelay": True,
        "DeidentifyLogs": True,
        "LimitFindResults": 0,
        "LimitFindInstances": 0,
    }


def start_orthanc(
    procs: ProcessTracker,
    tmp_path: Path,
    *,
    aet: str = "ORTHANC",
    dicom_port: int | None = None,
    http_port: int | None = None,
    modalities: Modalities | None = None,
    extra_config: Mapping[str, Any] | None = None,
    startup_timeout: float = 30.0,
) -> OrthancHandle:
    """Start Orthanc (tracked by `procs`) and return once its REST API and DICOM port answer.

    Ports default to free ones on 127.0.0.1. `extra_config` overrides/extends the generated config.
    """
    binary = require_binary("Orthanc")
    for _, host, _ in (modalities or {}).values():
        require_loopback(host)
    if dicom_port is None or http_port is None:
        spare = free_ports(2)
        dicom_port = dicom_port or spare[0]
        http_port = http_port or spare[1]
    work_dir = Path(tmp_path) / f"orthanc-{aet}-{dicom_port}"
    work_dir.mkdir(parents=True, exist_ok=True)
    config = orthanc_config(
        work_dir, aet=aet, dicom_port=dicom_port, http_port=http_port, modalities=modalities or {}
    )
    config.update(extra_config or {})
    config_path = work_dir / "orthanc.json"
    config_path.write_text(json.dumps(config, indent=2))
    proc = procs.spawn([binary, str(config_path)], name=f"orthanc-{aet}")
    handle = OrthancHandle(
        process=proc, aet=aet, dicom_port=dicom_port, http_port=http_port, config_path=config_path
    )
    _wait_started(handle, startup_timeout)
    return handle


def _wait_started(handle: OrthancHandle, timeout: float) -> None:
    proc = handle.process

    def api_up() -> bool:
        if not proc.running:
            raise OrthancError(f"Orthanc exited during start-up:\n{proc.describe()}")
        return handle.system_answers()

    wait_until(api_up, timeout, interval=0.05, message=lambda: f"Orthanc REST API\n{proc.describe()}")
    wait_for_port(LOOPBACK, handle.dicom_port, timeout, proc=proc)


def _normalize_value(value: Any) -> Any:
    if isinstance(value, DicomSequence):
        return [_normalize_dataset(item, None) for item in value]
    if isinstance(value, MultiValue):
        return "\\".join(str(item) for item in value)
    if isinstance(value, bytes):
        return value.hex()
    return "" if value is None else str(value)


def _normalize_dataset(ds: Dataset, keys: Sequence[str] | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for elem in ds:
        name = elem.keyword or str(elem.tag)
        if keys is None or name in keys:
            out[name] = _normalize_value(elem.value)
    return out


def normalize_find(datasets: Iterable[Dataset], keys: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """C-FIND identifiers as plain dicts {keyword: str}, sorted, for order-independent comparison.

    With `keys`, only those keywords are kept (e.g. to compare two SCPs that add different extras).
    """
    rows = [_normalize_dataset(ds, keys) for ds in datasets]
    return sorted(rows, key=lambda row: json.dumps(row, sort_keys=True))
