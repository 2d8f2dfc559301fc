"""Which HTTP CONNECT proxy, if any, the agent's tunnel to the relay goes through.

Theory of operation: hospital networks often allow outbound traffic only through an HTTP proxy. The
agent then opens a plain TCP connection to the proxy, asks it to ``CONNECT relay-host:port`` (with Basic
credentials when configured), and runs its mutual-TLS session with the relay *inside* that tunnel: the
proxy sees the relay's name and encrypted bytes, never DICOM, and never the agent's certificate.

:func:`choose_proxy` decides once per connection attempt and is pure (the environment is a parameter):

1. ``[proxy] url`` is set: always that proxy. ``NO_PROXY`` does not apply to it.
2. else, when ``use_env`` (the default): ``https_proxy`` / ``HTTPS_PROXY`` (the lower-case name wins,
   like curl) unless ``no_proxy`` / ``NO_PROXY`` matches the relay host (:func:`no_proxy_matches`).
3. else a direct connection.

Once a proxy is chosen there is no fallback: a proxy that refuses or cannot be reached fails the attempt
(:class:`ProxyError`), and the next attempt goes through the proxy again. Credentials: ``username`` and
``password`` from the configuration, or else those inside the environment URL. The password is a
``SecretStr`` and never appears in a message, a ``repr`` or the status.
"""

from __future__ import annotations

import base64
import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Annotated
from urllib.parse import SplitResult, unquote, urlsplit

from pydantic import AfterValidator, ConfigDict, Field, SecretStr, model_validator

from tunnel_runtime.settings import KeyProblem, StrictModel

__all__ = [
    "ENV_PROXY_NAMES",
    "ENV_NO_PROXY_NAMES",
    "ProxyConfig",
    "ProxyError",
    "ProxyRoute",
    "choose_proxy",
    "no_proxy_matches",
]

# Looked up in this order; the first non-empty one counts (curl reads the lower-case name first).
ENV_PROXY_NAMES = ("https_proxy", "HTTPS_PROXY")
ENV_NO_PROXY_NAMES = ("no_proxy", "NO_PROXY")
# curl's default port for a proxy URL without one; only the environment may omit it.
ENV_DEFAULT_PORT = 1080
_PASSWORD_MAX = 1024

_HTTPS_REFUSED = (
    "https:// proxies are not supported; use the proxy's http:// address (the agent only sends CONNECT "
    "in clear, the tunnel inside it is TLS end to end to the relay)"
)


class ProxyError(Exception):
    """The tunnel could not be set up because of the proxy.

    The message is one line that names the proxy (``host:port``, never credentials), what failed and,
    where it helps, what to check. ``status`` is the proxy's HTTP status for a refused CONNECT.
    """

    def __init__(self, message: str, *, address: str, status: int | None = None) -> None:
        super().__init__(message)
        self.address = address
        self.status = status


# --- configuration -------------------------------------------------------------------------------


def _split(url: str) -> SplitResult:
    parts = urlsplit(url.strip())
    try:
        parts.port  # noqa: B018 - raises ValueError for an out-of-range or non-numeric port
    except ValueError as exc:
        raise ValueError("has an invalid port") from exc
    return parts


def _validate_proxy_url(url: str) -> str:
    parts = _split(url)
    scheme = parts.scheme.lower()
    if scheme == "https":
        raise ValueError(_HTTPS_REFUSED)
    if scheme != "http":
        raise ValueError("must be an http:// URL with host and port, e.g. http://proxy.example.org:3128")
    if not parts.hostname:
        raise ValueError("must name the proxy host, e.g. http://proxy.example.org:3128")
    if parts.username is not None or parts.password is not None:
        # Say nothing about the value itself: it holds a password.
        raise ValueError("must not carry credentials; set proxy.username and proxy.password instead")
    if parts.port is None:
        raise ValueError("must name the proxy port, e.g. http://proxy.example.org:3128")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError("must be just http://host:port, without a path or query")
    return f"http://{_address(parts.hostname, parts.port)}"


def _validate_username(name: str) -> str:
    if ":" in name:
        raise ValueError("must not contain ':' (HTTP Basic authentication cannot carry it)")
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in name):
        raise ValueError("must not contain control characters")
    return name


def _validate_password(secret: SecretStr) -> SecretStr:
    # Checked here rather than with Field(max_length=...): pydantic's own errors quote the input value.
    value = secret.get_secret_value()
    if len(value) > _PASSWORD_MAX:
        raise ValueError(f"must be at most {_PASSWORD_MAX} characters")
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in value):
        raise ValueError("must not contain control characters")
    return secret


ProxyUrl = Annotated[str, AfterValidator(_validate_proxy_url)]
ProxyUsername = Annotated[str, Field(min_length=1, max_length=256), AfterValidator(_validate_username)]
ProxyPassword = Annotated[SecretStr, AfterValidator(_validate_password)]


class ProxyConfig(StrictModel):
    """``[proxy]``: the HTTP CONNECT proxy between the agent and the relay (none by default).

    ``url`` is ``http://host:port``. ``username``/``password`` are HTTP Basic credentials for it (or for
    the ``HTTPS_PROXY`` proxy when ``url`` is unset). ``use_env`` honours ``HTTPS_PROXY``/``NO_PROXY``
    when ``url`` is unset.
    """

    # A wrong value here may hold a password: pydantic's error text must not quote it when this model is
    # validated on its own (inside AgentSettings, users only ever see ConfigError, which quotes no value).
    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)

    url: ProxyUrl | None = None
    username: ProxyUsername | None = None
    password: ProxyPassword | None = None
    use_env: bool = True

    @model_validator(mode="after")
    def _credentials_need_a_proxy(self) -> ProxyConfig:
        if self.password is not None and self.username is None:
            raise KeyProblem(("username",), "is required when proxy.password is set")
        if self.username is not None and self.url is None and not self.use_env:
            raise KeyProblem(("username",), "is set but no proxy is used: set proxy.url (or use_env = true)")
        return self


# --- the choice ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProxyRoute:
    """The proxy one connection attempt goes through. ``source`` says where it was configured."""

    host: str
    port: int
    source: str
    username: str | None = None
    password: str = field(default="", repr=False)
    credentials_source: str = ""

    @property
    def address(self) -> str:
        """``host:port`` (IPv6 in brackets): what messages show. Never carries credentials."""
        return _address(self.host, self.port)

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    def authorization(self) -> str | None:
        """The ``Proxy-Authorization`` header value (HTTP Basic, UTF-8), or None without credentials."""
        if self.username is None:
            return None
        token = base64.b64encode(f"{self.username}:{self.password}".encode()).decode("ascii")
        return f"Basic {token}"

    def request_kwargs(self) -> dict[str, object]:
        """What aiohttp's ``request``/``ws_connect`` need to go through this proxy. The credentials go as a
        header on the CONNECT only (never to the relay), not through aiohttp's deprecated BasicAuth."""
        authorization = self.authorization()
        return {"proxy": self.url,
                "proxy_headers": {"Proxy-Authorization": authorization} if authorization is not None else None}

    def connect_request(self, target: str) -> bytes:
        """The raw ``CONNECT target`` request, for code that speaks to the proxy over its own socket."""
        lines = [f"CONNECT {target} HTTP/1.1", f"Host: {target}"]
        if (authorization := self.authorization()) is not None:
            lines.append(f"Proxy-Authorization: {authorization}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode()

    def auth_hint(self) -> str:
        """What to check when the proxy answers 407."""
        if self.username is None:
            return "the proxy wants credentials: set proxy.username and proxy.password"
        return f"check {self.credentials_source}"


def choose_proxy(config: ProxyConfig, relay_url: str, environ: Mapping[str, str]) -> ProxyRoute | None:
    """The proxy for a connection to ``relay_url``, or None for a direct connection.

    Raises :class:`ProxyError` when the environment names a proxy the agent cannot use (fail closed:
    the agent never goes direct instead).
    """
    user = config.username
    password = config.password.get_secret_value() if config.password is not None else ""
    if config.url is not None:
        parts = urlsplit(config.url)
        assert parts.hostname is not None and parts.port is not None  # guaranteed by _validate_proxy_url
        return ProxyRoute(parts.hostname, parts.port, "proxy.url", user, password, "proxy.username/password")
    if not config.use_env:
        return None
    name, value = _first_set(environ, ENV_PROXY_NAMES)
    if value is None:
        return None
    _, no_proxy = _first_set(environ, ENV_NO_PROXY_NAMES)
    relay_host = urlsplit(relay_url).hostname or ""
    if no_proxy and no_proxy_matches(no_proxy, relay_host):
        return None
    route = _parse_env_proxy(name, value)
    if user is not None:  # the configuration's credentials win over those in the environment URL
        return ProxyRoute(route.host, route.port, name, user, password, "proxy.username/password")
    return route


def _first_set(environ: Mapping[str, str], names: tuple[str, ...]) -> tuple[str, str | None]:
    for name in names:
        value = environ.get(name, "").strip()
        if value:
            return name, value
    return names[-1], None


def _parse_env_proxy(name: str, value: str) -> ProxyRoute:
    """An ``HTTPS_PROXY`` value as curl reads it: the scheme defaults to http://, the port to 1080."""
    if "://" not in value:
        value = "http://" + value
    try:
        parts = _split(value)
    except ValueError:
        raise ProxyError(f"{name} has an invalid port; expected http://host:port", address=name) from None
    host = parts.hostname
    if not host:
        raise ProxyError(f"{name} does not name a proxy host; expected http://host:port", address=name)
    port = parts.port or ENV_DEFAULT_PORT
    scheme = parts.scheme.lower()
    if scheme != "http":
        refused = _HTTPS_REFUSED if scheme == "https" else "only http:// proxies are supported"
        raise ProxyError(f"{name} names a {scheme}:// proxy at {_address(host, port)}: {refused}",
                         address=_address(host, port))
    user = unquote(parts.username) if parts.username is not None else None
    if user is not None and ":" in user:
        raise ProxyError(f"the user name in {name} must not contain ':' (HTTP Basic authentication cannot "
                         "carry it)", address=_address(host, port))
    password = unquote(parts.password) if parts.password is not None else ""
    return ProxyRoute(host, port, name, user, password, f"the credentials in {name}")


_NO_PROXY_SEPARATORS = re.compile(r"[,\s]+")


def no_proxy_matches(no_proxy: str, host: str) -> bool:
    """Whether a ``NO_PROXY`` value exempts ``host``, by curl's rules.

    ``*`` matches everything. A name entry matches that host and its subdomains, case-insensitively; a
    leading or trailing dot is ignored (``.example.org`` and ``example.org`` both match
    ``relay.example.org``). For an IP-address host, an entry matches when it is the same address or a
    CIDR range containing it. Entries are separated by commas and/or white space.
    """
    host = host.strip().strip("[]").rstrip(".").lower()
    if not host:
        return False
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        address = None
    for entry in _NO_PROXY_SEPARATORS.split(no_proxy.strip().lower()):
        if entry == "*":
            return True
        if address is not None:
            if _address_matches(address, entry.strip("[]")):
                return True
            continue
        entry = entry.strip(".")
        if entry and (host == entry or host.endswith("." + entry)):
            return True
    return False


def _address_matches(address: ipaddress.IPv4Address | ipaddress.IPv6Address, entry: str) -> bool:
    try:
        network = ipaddress.ip_network(entry, strict=False)
    except ValueError:
        return False
    return address.version == network.version and address in network


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
