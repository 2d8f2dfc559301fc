"""Mutual TLS inside the WebSocket, so the tunnel keeps its identity and secrecy through a TLS interceptor.

Theory of operation. A hospital's DLP box (or mitmproxy) terminates the outer TLS of the agent's
WebSocket and re-encrypts it with a certificate of its own, so the outer TLS can neither carry the
agent's client certificate to the relay nor keep the tunnel's bytes from the interceptor. Here a second
TLS session runs end to end between agent and relay *inside* the already-open WebSocket: an
``ssl.SSLObject`` over two ``ssl.MemoryBIO``s. Whatever TLS records OpenSSL produces are sent as binary
WebSocket messages; every binary message received is fed to OpenSSL. The interceptor sees ciphertext
only, and the relay identifies the site from the inner client certificate.

Framing is TLS's own: records may be split or coalesced across WebSocket messages in any way (a proxy
may re-frame them), since OpenSSL reassembles the byte stream. Text, ping and pong messages are not part
of it and are ignored.

Handshake: the agent calls :func:`inner_tls_client`, the relay :func:`inner_tls_server`, each bounded by
a timeout. Once the relay has completed its handshake (and so has accepted the agent's certificate) it
sends ``READY`` as the first plaintext bytes, and the agent's handshake waits for them: under TLS 1.3 the
client finishes its handshake before the server has checked the client certificate, and a refusal would
otherwise show up only at the first read. The relay's own check of the certificate (its registry) runs
before READY too (``admit``); a refusal there closes the WebSocket with code 1008 and a reason, which the
agent's error carries as ``close_message``. A failed handshake raises :class:`InnerTlsError` saying what
failed (for a rejected certificate: the verification error and the subject and issuer it presented),
after the TLS alert was sent to the peer and the WebSocket closed.

The returned :class:`InnerTlsWebSocket` looks to :class:`tunnel_link.session.MuxSession` like the aiohttp
WebSocket it wraps (``send_bytes``, ``receive`` yielding BINARY plaintext and passing CLOSE/CLOSED/ERROR
through, ``close``, ``exception``, ``protocol``), plus the inner TLS session's ``getpeercert``,
``cipher``, ``version`` and ``ssl_object``. The session runs it as a
:class:`tunnel_link.transport.QueuedTransport`: through ``send_bytes``.

Bounds: one writer at a time (a lock), each taking at most ``max_message`` plaintext bytes per outgoing
WebSocket message, so records leave in the order OpenSSL made them and the outgoing BIO holds at most
one message. The incoming BIO is fed one WebSocket message at a time and only when OpenSSL has nothing
left to decrypt, so it holds at most one message (bounded by the WebSocket's ``max_msg_size``) plus a
partial record; ``receive`` returns at most ``max_receive`` plaintext bytes at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import aiohttp
from cryptography import x509

from tunnel_link import private_api
from tunnel_link.errors import LinkError
from tunnel_link.transport import selected_subprotocol

__all__ = [
    "READY",
    "InnerTlsError",
    "InnerTlsFailure",
    "InnerTlsWebSocket",
    "PresentedCertificate",
    "inner_tls_client",
    "inner_tls_server",
]

READY = b"dicom-tunnel inner-tls ready 1\n"  # the relay's first plaintext: it accepted the agent
DEFAULT_MAX_MESSAGE = 1024 * 1024  # plaintext bytes per WebSocket message sent (fits a 4 MiB receive limit)
DEFAULT_MAX_RECEIVE = 4 * 1024 * 1024  # plaintext bytes one receive() returns at most
HANDSHAKE_LIMIT = 256 * 1024  # ciphertext bytes the peer may send before the handshake is done
CLOSE_TIMEOUT = 2.0  # seconds for sending a handshake alert, and for the WebSocket close after it
CLOSE_NOTIFY_TIMEOUT = 0.5  # seconds for sending close_notify (MuxSession gives close() 2 s in all)
_READ_SIZE = 64 * 1024
_CAPTURE_LIMIT = 128 * 1024  # largest Certificate handshake message kept for error messages
_CAPTURE_ATTR = "_dicom_tunnel_presented_certificate"  # on our SSLObjects
_CAPTURE_COUNT = "_dicom_tunnel_capturing_handshakes"  # on the SSLContext
_WANT_CAPTURE = b""
_HANDSHAKE = 22  # TLS content type
_CERTIFICATE = 11  # TLS handshake message type
_TRANSPORT_ERRORS = (ConnectionError, RuntimeError, aiohttp.ClientError)


class InnerTlsFailure(enum.Enum):
    """Why the inner TLS session failed, for callers that react differently (hints, backoff)."""

    TIMEOUT = "timeout"  # the handshake did not finish in time
    PEER_CERTIFICATE_REJECTED = "peer-certificate-rejected"  # we refused the peer's certificate
    REFUSED_BY_PEER = "refused-by-peer"  # a TLS alert (it refused ours), or a policy close (1008) saying why
    NOT_ADMITTED = "not-admitted"  # server: our ``admit`` refused the peer after the handshake
    CONNECTION_LOST = "connection-lost"  # the WebSocket closed or failed under the TLS session
    PROTOCOL = "protocol"  # the peer broke this module's rules (no READY, oversized handshake)
    TLS = "tls"  # any other TLS error (bad record MAC, decode error)


@dataclass(frozen=True, slots=True)
class PresentedCertificate:
    """The leaf certificate a peer presented, as far as an error message needs it (not verified)."""

    subject: str
    issuer: str
    authority_key_id: str | None

    def describe(self) -> str:
        key_id = f" (authority key id {self.authority_key_id})" if self.authority_key_id else ""
        return f"subject {self.subject!r} issued by {self.issuer!r}{key_id}"


class InnerTlsError(LinkError):
    """The inner TLS handshake or session failed. ``failure`` says how; ``presented`` is the peer's
    certificate when we rejected it (None if it could not be captured); ``close_message`` is the reason
    of a policy close (1008) that refused the session: the peer's (REFUSED_BY_PEER) or ours (NOT_ADMITTED)."""

    def __init__(self, failure: InnerTlsFailure, message: str, *, verify_message: str | None = None,
                 presented: PresentedCertificate | None = None, close_message: str | None = None) -> None:
        super().__init__(message)
        self.failure = failure
        self.verify_message = verify_message
        self.presented = presented
        self.close_message = close_message


class OuterWebSocket(Protocol):
    """What this module needs from the aiohttp WebSocket it runs over (client or server side)."""

    async def send_bytes(self, data: bytes) -> None: ...
    async def receive(self) -> aiohttp.WSMessage: ...
    async def close(self, *, code: int = ..., message: bytes = ...) -> Any: ...
    def exception(self) -> BaseException | None: ...


async def inner_tls_client(ws: OuterWebSocket, ssl_ctx: ssl.SSLContext, server_hostname: str, timeout: float,
                           *, max_message: int = DEFAULT_MAX_MESSAGE,
                           max_receive: int = DEFAULT_MAX_RECEIVE) -> InnerTlsWebSocket:
    """The agent's side: run the inner handshake over the open ``ws`` and wait for the relay's READY.

    ``ssl_ctx`` is the agent's mutual-TLS context (``tunnel_link.tls.client_context``) and
    ``server_hostname`` the name the relay's inner certificate must carry. Raises :class:`InnerTlsError`
    (the WebSocket is then closed) or returns the session to hand to ``MuxSession`` in place of ``ws``.
    """
    conn = InnerTlsWebSocket(ws, ssl_ctx, server_side=False, server_hostname=server_hostname,
                             max_message=max_message, max_receive=max_receive)
    await conn._establish(timeout)
    return conn


# The relay's verdict on the peer after the handshake: None to accept, else the close message.
Admit = Callable[["InnerTlsWebSocket"], Awaitable[bytes | None]]


async def inner_tls_server(ws: OuterWebSocket, ssl_ctx: ssl.SSLContext, timeout: float,
                           *, max_message: int = DEFAULT_MAX_MESSAGE, max_receive: int = DEFAULT_MAX_RECEIVE,
                           admit: Admit | None = None) -> InnerTlsWebSocket:
    """The relay's side: run the inner handshake over the prepared ``ws``, then send READY.

    ``ssl_ctx`` is the relay's context (``tunnel_link.tls.server_context``, which requires a client
    certificate). Identify the site with
    ``relay.pki.site_from_certificate(conn.getpeercert(binary_form=True))``: in ``admit``, which runs after
    the handshake and before READY, so that a peer that is not accepted never gets READY. ``admit`` (a
    coroutine function, awaited within ``timeout``) returns None to accept, or the reason to refuse, sent
    as the WebSocket close message (code 1008, at most 123 bytes; no close_notify, so the peer reads it as
    the end of its handshake). Raises
    :class:`InnerTlsError` (``NOT_ADMITTED`` for such a refusal; the WebSocket is then closed).
    """
    conn = InnerTlsWebSocket(ws, ssl_ctx, server_side=True, server_hostname=None,
                             max_message=max_message, max_receive=max_receive)
    conn._admit = admit
    await conn._establish(timeout)
    return conn


class InnerTlsWebSocket:
    """A TLS session inside a WebSocket, with the WebSocket's interface for plaintext.

    Made by :func:`inner_tls_client` / :func:`inner_tls_server`. ``send_bytes`` encrypts and sends;
    ``receive`` returns BINARY messages of plaintext (any chunking), or the outer WebSocket's
    CLOSE/CLOSING/CLOSED/ERROR message; a TLS close_notify from the peer is reported as CLOSE and a TLS
    error as ERROR (``exception()`` then returns the :class:`InnerTlsError`). ``close`` sends close_notify,
    then closes the WebSocket.
    """

    def __init__(self, ws: OuterWebSocket, ssl_ctx: ssl.SSLContext, *, server_side: bool,
                 server_hostname: str | None, max_message: int, max_receive: int) -> None:
        if max_message < 1 or max_receive < 1:
            raise ValueError("max_message and max_receive must be positive")
        self._ws = ws
        self._server_side = server_side
        self._peer = "agent" if server_side else "relay"
        self._max_message = max_message
        self._max_receive = max_receive
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._ctx = ssl_ctx
        capturing = _capture_begin(ssl_ctx)  # before wrap_bio: OpenSSL copies the hook into the new session
        try:
            self._tls = ssl_ctx.wrap_bio(self._incoming, self._outgoing, server_side=server_side,
                                         server_hostname=server_hostname)
        except BaseException:
            _capture_end(ssl_ctx, capturing)
            raise
        self._capturing = capturing
        setattr(self._tls, _CAPTURE_ATTR, _WANT_CAPTURE if capturing else None)
        self._send_lock = asyncio.Lock()
        self._pending = b""  # plaintext decrypted during the handshake, not yet returned by receive()
        self._received = 0  # ciphertext bytes received, for the handshake limit and error messages
        self._closing = False
        self._error: InnerTlsError | None = None
        self._admit: Admit | None = None  # server: see inner_tls_server
        self.peer_closed = False  # the peer sent TLS close_notify

    # --- the inner TLS session -----------------------------------------------------------------------

    @property
    def ssl_object(self) -> ssl.SSLObject:
        return self._tls

    def getpeercert(self, binary_form: bool = False) -> Any:
        """The peer's inner certificate (DER with ``binary_form=True``), as ``ssl.SSLObject.getpeercert``."""
        return self._tls.getpeercert(binary_form)

    def cipher(self) -> tuple[str, str, int] | None:
        return self._tls.cipher()

    def version(self) -> str | None:
        return self._tls.version()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        """``ssl_object``, ``peercert`` and ``cipher`` of the inner session; anything else from the outer."""
        inner = {"ssl_object": lambda: self._tls, "peercert": self._tls.getpeercert, "cipher": self._tls.cipher}
        if name in inner:
            return inner[name]()
        outer = getattr(self._ws, "get_extra_info", None)
        return outer(name, default) if callable(outer) else default

    # --- the WebSocket interface ---------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closing or bool(getattr(self._ws, "closed", False))

    @property
    def protocol(self) -> str | None:
        """The WebSocket subprotocol the outer handshake selected (the mux protocol version)."""
        return selected_subprotocol(self._ws)

    def exception(self) -> BaseException | None:
        return self._error if self._error is not None else self._ws.exception()

    async def send_bytes(self, data: bytes | bytearray | memoryview, compress: int | None = None) -> None:
        """Encrypt ``data`` and send it (in messages of at most ``max_message`` plaintext bytes).

        Raises ``ConnectionResetError`` once the session is closing, like aiohttp.
        """
        view = memoryview(data).cast("B")
        async with self._send_lock:
            for start in range(0, len(view), self._max_message):
                self._encrypt(view[start:start + self._max_message])
                await self._send_pending()

    async def receive(self, timeout: float | None = None) -> aiohttp.WSMessage:
        """The next plaintext as a BINARY message, or the message that ended the WebSocket."""
        if self._pending:
            data, self._pending = self._pending, b""
            return aiohttp.WSMessage(aiohttp.WSMsgType.BINARY, data, None)
        if self._error is not None:
            return aiohttp.WSMessage(aiohttp.WSMsgType.ERROR, self._error, None)
        try:
            async with asyncio.timeout(timeout):
                return await self._receive()
        except (ssl.SSLError, InnerTlsError) as exc:
            self._error = self._as_error(exc)
            return aiohttp.WSMessage(aiohttp.WSMsgType.ERROR, self._error, None)

    async def close(self, *, code: int = aiohttp.WSCloseCode.OK, message: bytes = b"") -> bool:
        """Send TLS close_notify (bounded wait), then close the WebSocket."""
        if not self._closing:
            self._closing = True
            with contextlib.suppress(ssl.SSLError):  # SSLWantReadError: the peer's close_notify is not awaited
                self._tls.unwrap()
            if not self._send_lock.locked():  # else the writer holding it sends close_notify after its data
                await self._flush_bounded(CLOSE_NOTIFY_TIMEOUT)
        return await self._ws.close(code=code, message=message)

    def abort(self) -> None:
        """Drop the outer connection at once, with no close_notify and no close handshake."""
        self._closing = True
        private_api.abort_websocket(self._ws)

    # --- internals -------------------------------------------------------------------------------------

    async def _establish(self, timeout: float) -> None:
        try:
            async with asyncio.timeout(timeout):
                await self._handshake()
                if self._server_side:
                    await self._check_admitted()
                    self._encrypt(memoryview(READY))
                    await self._flush()
                else:
                    await self._expect_ready()
        except (InnerTlsError, ssl.SSLError, TimeoutError, *_TRANSPORT_ERRORS) as exc:
            error, cause = self._as_error(exc, timeout=timeout), exc
        else:
            return
        finally:
            setattr(self._tls, _CAPTURE_ATTR, None)
            _capture_end(self._ctx, self._capturing)
            self._capturing = False
        await self._abort(error.close_message.encode() if error.failure is InnerTlsFailure.NOT_ADMITTED
                          and error.close_message else b"inner TLS handshake failed")
        raise error from cause

    async def _check_admitted(self) -> None:
        refusal = await self._admit(self) if self._admit is not None else None
        if refusal is not None:
            text = refusal.decode(errors="replace")
            raise InnerTlsError(InnerTlsFailure.NOT_ADMITTED, f"inner TLS: the agent was not admitted: {text}",
                                close_message=text)

    async def _handshake(self) -> None:
        while True:
            try:
                self._tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                pass
            await self._flush()
            if self._received > HANDSHAKE_LIMIT:
                raise InnerTlsError(InnerTlsFailure.PROTOCOL,
                                    f"inner TLS: the {self._peer} sent over {HANDSHAKE_LIMIT} bytes in the handshake")
            ended = await self._feed_one_message()
            if ended is not None:
                raise self._ended_during_handshake(ended)
        await self._flush()  # our last flight (and, on the relay, TLS 1.3 session tickets)

    async def _expect_ready(self) -> None:
        got = b""
        while len(got) < len(READY):  # READY is a few bytes: at most a few rounds
            data = self._decrypt(self._max_receive)
            await self._flush_post_handshake()
            if data:
                got += data
            elif self.peer_closed:
                raise InnerTlsError(InnerTlsFailure.CONNECTION_LOST,
                                    "inner TLS: the relay ended the session before accepting it")
            elif (ended := await self._feed_one_message()) is not None:
                raise self._ended_during_handshake(ended)
        if not got.startswith(READY):
            raise InnerTlsError(InnerTlsFailure.PROTOCOL,
                                "inner TLS: the relay did not confirm the session (unexpected first bytes)")
        self._pending = got[len(READY):]

    async def _receive(self) -> aiohttp.WSMessage:
        while True:  # each round decrypts what is buffered or feeds one more message
            data = self._decrypt(self._max_receive)
            await self._flush_post_handshake()
            if data:
                return aiohttp.WSMessage(aiohttp.WSMsgType.BINARY, data, None)
            if self.peer_closed:
                return aiohttp.WSMessage(aiohttp.WSMsgType.CLOSE, aiohttp.WSCloseCode.OK,
                                         "inner TLS closed by the peer")
            ended = await self._feed_one_message()
            if ended is not None:
                return ended

    async def _feed_one_message(self) -> aiohttp.WSMessage | None:
        """Give the next binary message to OpenSSL (None), or return the message that ended the WebSocket."""
        while True:  # ignored message types are few: aiohttp answers pings itself
            msg = await self._ws.receive()
            if msg.type is aiohttp.WSMsgType.BINARY:
                self._incoming.write(msg.data)
                self._received += len(msg.data)
                return None
            if msg.type not in (aiohttp.WSMsgType.TEXT, aiohttp.WSMsgType.PING, aiohttp.WSMsgType.PONG):
                return msg

    def _decrypt(self, limit: int) -> bytes:
        """Up to ``limit`` plaintext bytes from what OpenSSL has buffered (b"" if none). Raises ssl.SSLError."""
        pieces: list[bytes] = []
        size = 0
        while size < limit and not self.peer_closed:
            try:
                piece = self._tls.read(min(_READ_SIZE, limit - size))
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:
                piece = b""
            if not piece:  # close_notify
                self.peer_closed = True
                break
            pieces.append(piece)
            size += len(piece)
        return b"".join(pieces)

    def _encrypt(self, data: memoryview) -> None:
        if self._closing or self._error is not None:
            raise ConnectionResetError("the inner TLS session is closing")
        try:
            written = self._tls.write(data)
        except ssl.SSLError as exc:
            raise ConnectionResetError(f"inner TLS write failed: {exc}") from exc
        if written != len(data):  # OpenSSL without partial writes takes all of it into a memory BIO
            raise ConnectionResetError(f"inner TLS took {written} of {len(data)} bytes")

    async def _send_pending(self) -> None:
        """Send every ciphertext byte OpenSSL produced, in order. Hold the send lock."""
        while self._outgoing.pending:  # re-checked after each send: a reader may have queued more meanwhile
            await self._ws.send_bytes(self._outgoing.read())

    async def _flush(self) -> None:
        async with self._send_lock:
            await self._send_pending()

    async def _flush_post_handshake(self) -> None:
        """Send what reading produced (a TLS 1.3 KeyUpdate answer). If a writer holds the lock, it sends
        it: its loop re-checks the BIO after every send, so the reader never waits behind a stalled writer."""
        if self._outgoing.pending and not self._send_lock.locked():
            await self._flush()

    async def _flush_bounded(self, timeout: float) -> None:
        try:
            async with asyncio.timeout(timeout):
                await self._flush()
        except (TimeoutError, *_TRANSPORT_ERRORS):
            pass  # the WebSocket close that follows ends the connection anyway

    async def _abort(self, message: bytes) -> None:
        """After a failed handshake: send the alert OpenSSL queued (so the peer learns why), close the
        WebSocket with ``message``."""
        self._closing = True
        await self._flush_bounded(CLOSE_TIMEOUT)
        try:
            await asyncio.wait_for(self._ws.close(code=aiohttp.WSCloseCode.POLICY_VIOLATION,
                                                  message=message), CLOSE_TIMEOUT)
        except (TimeoutError, *_TRANSPORT_ERRORS):
            pass

    # --- error messages ----------------------------------------------------------------------------------

    def _as_error(self, exc: BaseException, *, timeout: float | None = None) -> InnerTlsError:
        if isinstance(exc, InnerTlsError):
            return exc
        if isinstance(exc, ssl.SSLCertVerificationError):
            presented = _presented_certificate(getattr(self._tls, _CAPTURE_ATTR, None))
            detail = f"; it presented {presented.describe()}" if presented else ""
            return InnerTlsError(InnerTlsFailure.PEER_CERTIFICATE_REJECTED,
                                 f"inner TLS: certificate verify failed for the {self._peer}'s certificate: "
                                 f"{exc.verify_message}{detail}",
                                 verify_message=exc.verify_message, presented=presented)
        if isinstance(exc, ssl.SSLError):
            reason = exc.reason or exc.__class__.__name__
            if "ALERT" in reason:  # OpenSSL's reason code for an alert the peer sent
                return InnerTlsError(InnerTlsFailure.REFUSED_BY_PEER,
                                     f"inner TLS: the {self._peer} refused the session: {_words(reason)}")
            return InnerTlsError(InnerTlsFailure.TLS, f"inner TLS with the {self._peer} failed: {_words(reason)}")
        if isinstance(exc, TimeoutError):
            silent = " (nothing received from it)" if self._received == 0 else ""
            return InnerTlsError(InnerTlsFailure.TIMEOUT,
                                 f"inner TLS: no handshake with the {self._peer} within {timeout:g}s{silent}")
        return InnerTlsError(InnerTlsFailure.CONNECTION_LOST,
                             f"inner TLS: the WebSocket to the {self._peer} failed during the handshake: {exc!r}")

    def _ended_during_handshake(self, msg: aiohttp.WSMessage) -> InnerTlsError:
        if msg.type is aiohttp.WSMsgType.CLOSE and msg.data == aiohttp.WSCloseCode.POLICY_VIOLATION and msg.extra:
            reason = _printable(str(msg.extra), 123)
            return InnerTlsError(InnerTlsFailure.REFUSED_BY_PEER,
                                 f"inner TLS: the {self._peer} refused the session: {reason}", close_message=reason)
        if msg.type is aiohttp.WSMsgType.ERROR:
            detail = f"failed ({self._ws.exception()!r})"
        elif msg.type is aiohttp.WSMsgType.CLOSE:
            detail = f"was closed (code {msg.data}{f': {msg.extra}' if msg.extra else ''})"
        else:
            detail = "was closed"
        return InnerTlsError(InnerTlsFailure.CONNECTION_LOST,
                             f"inner TLS: the WebSocket to the {self._peer} {detail} during the handshake")


def _words(reason: str) -> str:
    """OpenSSL's reason code as words: TLSV1_ALERT_UNKNOWN_CA -> 'tlsv1 alert unknown ca'."""
    return reason.replace("_", " ").lower()


# --- the certificate a rejected peer presented ----------------------------------------------------------
#
# Python 3.11 gives no access to a certificate that failed verification (get_unverified_chain is 3.13), so
# the peer's Certificate handshake message is captured with the context's message callback (a CPython
# debugging hook, reached only through ``tunnel_link.private_api``). It is a per-context hook that costs a
# Python call per TLS record, so it is installed only while one of our handshakes on that context runs
# (counted on the context) and removed after; it records only for our own SSLObjects (marked with an
# attribute). If the hook is missing or someone else's, errors just lack the issuer.


def _capture_begin(ctx: ssl.SSLContext) -> bool:
    """Install the hook on ``ctx`` (or count one more user); False if the hook is unavailable or taken."""
    current = private_api.tls_message_callback(ctx)
    if current is private_api.MISSING or (current is not None and current is not _on_tls_message):
        return False
    count = getattr(ctx, _CAPTURE_COUNT, 0)
    if count == 0 and not private_api.set_tls_message_callback(ctx, _on_tls_message):
        return False
    setattr(ctx, _CAPTURE_COUNT, count + 1)
    return True


def _capture_end(ctx: ssl.SSLContext, capturing: bool) -> None:
    if not capturing:
        return
    count = getattr(ctx, _CAPTURE_COUNT, 1) - 1
    setattr(ctx, _CAPTURE_COUNT, count)
    if count == 0 and private_api.tls_message_callback(ctx) is _on_tls_message:
        private_api.set_tls_message_callback(ctx, None)


def _on_tls_message(conn: object, direction: str, version: object, content_type: object, msg_type: object,
                    data: bytes) -> None:
    # Runs inside OpenSSL for every TLS message of every connection made with the context while the hook is
    # installed: stay trivial, never raise (an exception would fail that connection's handshake).
    if (direction == "read" and content_type == _HANDSHAKE and msg_type == _CERTIFICATE
            and getattr(conn, _CAPTURE_ATTR, None) == _WANT_CAPTURE and len(data) <= _CAPTURE_LIMIT):
        setattr(conn, _CAPTURE_ATTR, (version == ssl.TLSVersion.TLSv1_3, bytes(data)))


def _presented_certificate(captured: object) -> PresentedCertificate | None:
    if not isinstance(captured, tuple):
        return None
    tls13, message = captured
    der = _leaf_der(message, tls13) or _leaf_der(message, not tls13)
    if der is None:
        return None
    try:
        cert = x509.load_der_x509_certificate(der)
        subject, issuer = cert.subject.rfc4514_string(), cert.issuer.rfc4514_string()
    except ValueError:
        return None
    try:
        key_id = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value.key_identifier
    except (x509.ExtensionNotFound, ValueError):
        key_id = None
    return PresentedCertificate(_printable(subject), _printable(issuer),
                                key_id[:8].hex(":") if key_id else None)


def _leaf_der(message: bytes, tls13: bool) -> bytes | None:
    """The first certificate of a Certificate handshake message (RFC 8446 §4.4.2, RFC 5246 §7.4.2)."""
    pos = 4  # handshake type and 24-bit length
    if tls13:
        if len(message) <= pos:
            return None
        pos += 1 + message[pos]  # certificate_request_context
    list_end = pos + 3 + int.from_bytes(message[pos:pos + 3], "big")
    pos += 3
    if pos + 3 > list_end or list_end > len(message):
        return None
    end = pos + 3 + int.from_bytes(message[pos:pos + 3], "big")
    if end > list_end:
        return None
    return message[pos + 3:end]


def _printable(text: str, limit: int = 200) -> str:
    """A peer-supplied name made safe for a log line: printable characters only, bounded length."""
    return "".join(ch if ch.isprintable() else "?" for ch in text[:limit])


async def read_line(conn: InnerTlsWebSocket, limit: int, timeout: float) -> bytes:
    """Bytes up to the first newline from an inner-TLS connection (at most ``limit``)."""
    buffer = bytearray()
    async with asyncio.timeout(timeout):
        while b"\n" not in buffer:
            msg = await conn.receive()
            if msg.type is not aiohttp.WSMsgType.BINARY:
                raise LinkError("connection ended before a whole line")
            buffer += msg.data
            if len(buffer) > limit:
                raise ValueError("line too long")
    return bytes(buffer[:buffer.index(b"\n")])
