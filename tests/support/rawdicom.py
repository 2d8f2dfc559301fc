"""Raw-socket DICOM for tests that must see exact PDUs (rejects, aborts, refusals)."""

from __future__ import annotations

import socket
import time

from tunnel_core.dicom import parse_reject

APP_CONTEXT = b"1.2.840.10008.3.1.1.1"


def associate_rq(called: str, calling: str) -> bytes:
    """A real A-ASSOCIATE-RQ proposing Verification, encoded by pynetdicom (an independent encoder)."""
    from pynetdicom.pdu import A_ASSOCIATE_RQ
    from pynetdicom.pdu_primitives import A_ASSOCIATE, MaximumLengthNotification
    from pynetdicom.presentation import build_context

    primitive = A_ASSOCIATE()
    primitive.application_context_name = APP_CONTEXT.decode()
    primitive.calling_ae_title = calling
    primitive.called_ae_title = called
    max_length = MaximumLengthNotification()
    max_length.maximum_length_received = 16384
    primitive.user_information = [max_length]
    context = build_context("1.2.840.10008.1.1")
    context.context_id = 1
    primitive.presentation_context_definition_list = [context]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(primitive)
    return pdu.encode()


def connect(port: int, timeout: float = 5.0) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def read_until_closed(sock: socket.socket, timeout: float, limit: int = 1 << 20) -> tuple[bytes, float]:
    """Everything the peer sends until it closes (or `timeout`), and how long that took."""
    start = time.monotonic()
    sock.settimeout(timeout)
    data = b""
    try:
        while len(data) < limit:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    except ConnectionResetError:
        pass
    except TimeoutError as exc:
        raise AssertionError(f"peer kept the connection open past {timeout}s") from exc
    return data, time.monotonic() - start


def request_reject(port: int, called: str, calling: str, timeout: float = 5.0) -> tuple[tuple[int, int, int], float]:
    """Send an A-ASSOCIATE-RQ; expect an A-ASSOCIATE-RJ and a close. Returns (result, source, reason), secs."""
    with connect(port) as sock:
        start = time.monotonic()
        sock.sendall(associate_rq(called, calling))
        data, _ = read_until_closed(sock, timeout)
        elapsed = time.monotonic() - start
    assert len(data) == 10, f"expected one A-ASSOCIATE-RJ PDU, got {data[:32].hex()}"
    return parse_reject(data), elapsed


def read_pdu(sock: socket.socket, timeout: float = 5.0) -> bytes:
    """One whole PDU (header and body) from the peer."""
    sock.settimeout(timeout)
    header = _recv_exactly(sock, 6)
    return header + _recv_exactly(sock, int.from_bytes(header[2:6], "big"))


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise AssertionError(f"peer closed after {len(data)} of {n} bytes")
        data += chunk
    return data
