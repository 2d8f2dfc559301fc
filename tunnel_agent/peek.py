"""Look at the certificate a TLS server presents, without trusting it: to name a TLS-intercepting proxy.

When the relay's certificate fails verification against the pinned CA, the useful message for a hospital
network team is *who* issued what the agent was shown instead ("CN=Fortinet CA SSL, O=Fortinet" means
their inspection box). :func:`peek_certificate` makes one extra connection the same way the tunnel does
(directly, or ``CONNECT`` through the configured proxy), completes a handshake that verifies nothing and
sends nothing after it, and returns the leaf certificate. :func:`describe_certificate` turns it into one
line.
"""

from __future__ import annotations

import asyncio
import ssl
from urllib.parse import urlsplit

from cryptography import x509

from tunnel_agent.proxy import ProxyRoute

__all__ = ["PeekError", "describe_certificate", "peek_certificate"]

class PeekError(Exception):
    """The certificate could not be fetched (unreachable, proxy refused, not TLS)."""


async def peek_certificate(url: str, proxy: ProxyRoute | None, timeout: float) -> bytes:
    """DER of the leaf certificate presented at ``url``'s host and port (through ``proxy`` if given)."""
    parts = urlsplit(url)
    host, port = parts.hostname or "", parts.port or 443
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # we only look; nothing is sent after the handshake
    try:
        async with asyncio.timeout(timeout):
            if proxy is None:
                reader, writer = await asyncio.open_connection(host, port, ssl=ctx, server_hostname=host)
            else:
                reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
                await _connect_through(reader, writer, proxy, host, port)
                await writer.start_tls(ctx, server_hostname=host)
            try:
                ssl_object = writer.get_extra_info("ssl_object")
                der = ssl_object.getpeercert(binary_form=True) if ssl_object else None
            finally:
                writer.close()
    except (OSError, TimeoutError, ssl.SSLError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
        raise PeekError(f"cannot fetch the certificate at {host}:{port}: {type(exc).__name__}: {exc}") from None
    if not der:
        raise PeekError(f"{host}:{port} presented no certificate")
    return der


async def _connect_through(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, proxy: ProxyRoute,
                           host: str, port: int) -> None:
    target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    writer.write(proxy.connect_request(target))
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    status = head.split(b"\r\n", 1)[0].split()
    if len(status) < 2 or status[1] != b"200":
        raise PeekError(f"proxy {proxy.address} refused CONNECT: {b' '.join(status[1:3]).decode(errors='replace')}")


def describe_certificate(der: bytes | None) -> str:
    """``"subject 'CN=a', issued by 'CN=b, O=c'"`` for messages (certificates hold no secrets)."""
    if not der:
        return "no certificate"
    try:
        cert = x509.load_der_x509_certificate(der)
    except ValueError:
        return "an unparseable certificate"
    return f"subject '{cert.subject.rfc4514_string()}', issued by '{cert.issuer.rfc4514_string()}'"
