"""The agent's one DICOM C-ECHO client: what the health monitor runs every round and ``diagnose`` runs once.

Theory of operation: :func:`c_echo` opens one association with pynetdicom (blocking: run it in a thread),
asks for a C-ECHO, releases, and returns what it saw as an :class:`EchoAttempt`; every pynetdicom wait is
bounded by ``timeout``. pynetdicom does not say why a TCP connection failed, so when it did, one plain
connect (:func:`probe_tcp`) finds out, unless the attempt already used up its time; ``explain`` turns
that into the caller's words (the monitor's short reason by default, :func:`tcp_reason`). C-ECHO carries
no patient data, and nothing here logs.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["EchoAttempt", "Explain", "c_echo", "probe_tcp", "tcp_reason"]

# Why the TCP connection failed, in the caller's words: the error of one more connect (None: it worked
# that time), the host and the timeout.
Explain = Callable[[OSError | None, str, float], str]


@dataclass(frozen=True, slots=True)
class EchoAttempt:
    """What one C-ECHO association saw (filled by :func:`c_echo`)."""

    connected: bool
    answered: bool = False  # an A-ASSOCIATE-AC or -RJ came back
    established: bool = False
    status: int | None = None  # the C-ECHO response status
    rejection: str = ""  # "result, source: reason" of an A-ASSOCIATE-RJ
    aborted: bool = False  # an A-ABORT (or the connection closing) came instead of an answer
    tcp_error: str = ""  # why the TCP connection failed
    latency: float | None = None  # seconds from the association request to the C-ECHO response


def tcp_reason(error: OSError | None, host: str, timeout: float) -> str:
    """A few words for ops on why a TCP connection failed (the health report's ``last_failure_reason``)."""
    if error is None:
        return "TCP connection failed (a second attempt connected)"  # it came up meanwhile
    if isinstance(error, ConnectionRefusedError):
        return "connection refused"
    if isinstance(error, socket.gaierror):
        return f"cannot resolve {host}: {error.strerror}"
    if isinstance(error, TimeoutError):
        return f"no TCP connection within {timeout:g} s"
    return (error.strerror or type(error).__name__).lower()


def probe_tcp(host: str, port: int, timeout: float) -> OSError | None:
    """One plain TCP connect: its error, or None when it connects (then closed at once)."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as exc:  # TimeoutError and socket.gaierror are OSErrors
        return exc


def c_echo(host: str, port: int, called_ae: str, calling_ae: str, timeout: float, *,
           explain: Explain = tcp_reason) -> EchoAttempt:
    """One association with one C-ECHO (blocking: run it in a thread). Every wait is bounded by ``timeout``."""
    from pynetdicom import AE, evt
    from pynetdicom.pdu_primitives import A_ABORT, A_ASSOCIATE, A_P_ABORT
    from pynetdicom.sop_class import Verification

    seen: set[str] = set()
    rejection: list[str] = []

    def on_open(_event: evt.Event) -> None:
        seen.add("connected")

    def on_acse(event: evt.Event) -> None:
        primitive = getattr(event, "primitive", None)
        if isinstance(primitive, A_ASSOCIATE) and primitive.result is not None:
            seen.add("answered")
            if primitive.result in (0x01, 0x02):
                rejection.append(f"{primitive.result_str}, {primitive.source_str}: {primitive.reason_str}")
        elif isinstance(primitive, A_ABORT | A_P_ABORT):
            seen.add("aborted")

    ae = AE(ae_title=calling_ae)
    ae.add_requested_context(Verification)
    ae.connection_timeout = ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    began = time.perf_counter()
    try:
        try:
            assoc = ae.associate(host, port, ae_title=called_ae,
                                 evt_handlers=[(evt.EVT_CONN_OPEN, on_open), (evt.EVT_ACSE_RECV, on_acse)])
        except socket.gaierror as exc:  # pynetdicom resolves the name before connecting, and lets this escape
            return EchoAttempt(connected=False, tcp_error=explain(exc, host, timeout))
        established, status, latency = assoc.is_established, None, None
        try:
            if established:
                response = assoc.send_c_echo()
                latency = time.perf_counter() - began
                status = int(response.Status) if "Status" in response else None
        finally:
            if assoc.is_established:
                assoc.release()
    finally:
        ae.shutdown()
    tcp_error = ""
    if "connected" not in seen:  # a quick failure is probed once; a hung one already took its time
        hung = time.perf_counter() - began >= timeout
        tcp_error = explain(TimeoutError() if hung else probe_tcp(host, port, timeout), host, timeout)
    return EchoAttempt(connected="connected" in seen, answered="answered" in seen, established=established,
                       status=status, rejection=rejection[0] if rejection else "", aborted="aborted" in seen,
                       tcp_error=tcp_error, latency=latency)
