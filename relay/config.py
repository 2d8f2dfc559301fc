"""Settings of the ``tunnel-relay`` program: a TOML file plus ``TUNNEL_RELAY_*`` environment overrides.

Load once at start-up with :func:`load_relay_settings` and pass the frozen result down. The schema is
documented, key by key, in ``deploy/relay.example.toml``. Cross-checks done here so that a bad file fails
at start-up rather than on the first association: every listener route names a configured site, called
AE titles are unique per listener and per site, names are unique, and no two sockets share a port.
"""

from __future__ import annotations

import ipaddress
import socket
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BeforeValidator, Field, field_validator, model_validator
from pydantic_settings import SettingsConfigDict

from relay.engines import PostgresTarget
from relay.pki import CA_CERT, RELAY_CERT, RELAY_KEY
from relay.registryerrors import RegistryError
from tunnel_core.admission import AdmissionLimits
from tunnel_core.ratelimit import RateLimits
from tunnel_runtime.settings import (
    AETitle,
    CallingAEList,
    DicomIngressConfig,
    EndpointConfig,
    KeyProblem,
    MuxConfig,
    Name,
    Port,
    Seconds,
    StrictModel,
    TomlSettings,
    hosts_overlap,
    load_toml_settings,
    require_unique,
)

__all__ = [
    "AdminConfig",
    "DestinationConfig",
    "EnrollmentConfig",
    "EnrollmentRateLimit",
    "FleetConfig",
    "LoginRateLimit",
    "RateLimitConfig",
    "WireGuardConfig",
    "ListenerConfig",
    "ListenerRoute",
    "RelaySettings",
    "SiteConfig",
    "TunnelConfig",
    "load_relay_settings",
]


def _empty_is_none(value: object) -> object:
    """TOML has no null: ``cert_file = ""`` means "use the default in state_dir"."""
    return None if value == "" else value


OptionalPath = Annotated[Path | None, BeforeValidator(_empty_is_none)]
PublicUrl = Annotated[str, Field(pattern=r"^wss://[^/\s@]+(/[A-Za-z0-9._~/-]*)?$")]


class TunnelConfig(StrictModel):
    """``[tunnel]``: the agent-facing HTTPS/WebSocket endpoint (mutual TLS)."""

    host: Annotated[str, Field(min_length=1)] = "0.0.0.0"
    port: Port = 8443
    path: Annotated[str, Field(pattern=r"^/[A-Za-z0-9._~/-]*$")] = "/tunnel"
    cert_file: OptionalPath = None
    key_file: OptionalPath = None
    ca_file: OptionalPath = None
    heartbeat_interval: Seconds = 10.0
    # Connections that have not authenticated (tunnel_link.gate): the TLS handshake, and the wait for a
    # (first or next) HTTP request, each within a deadline (default: one heartbeat interval); at most so
    # many of them per source address and in all.
    handshake_timeout: Annotated[Seconds | None, BeforeValidator(_empty_is_none)] = None
    request_timeout: Annotated[Seconds | None, BeforeValidator(_empty_is_none)] = None
    max_unauthenticated: Annotated[int, Field(ge=1, le=1_000_000)] = 1024
    max_unauthenticated_per_source: Annotated[int, Field(ge=1, le=1_000_000)] = 128
    # What enrollment tokens tell agents to dial; empty: wss://<first name in relay.crt>:<port><path>.
    public_url: Annotated[PublicUrl | None, BeforeValidator(_empty_is_none)] = None

    @property
    def handshake_deadline(self) -> float:
        return self.handshake_timeout if self.handshake_timeout is not None else self.heartbeat_interval

    @property
    def request_deadline(self) -> float:
        return self.request_timeout if self.request_timeout is not None else self.heartbeat_interval

    def admission_limits(self) -> AdmissionLimits:
        return AdmissionLimits(max_total=self.max_unauthenticated,
                               max_per_source=min(self.max_unauthenticated_per_source, self.max_unauthenticated))

    @property
    def inner_path(self) -> str:
        """Where agents in inner-TLS mode connect (``tls_mode = "inner"``): ``<path>/inner``."""
        return self.path.rstrip("/") + "/inner"

    def cert_path(self, state_dir: Path) -> Path:
        return self.cert_file or state_dir / RELAY_CERT

    def key_path(self, state_dir: Path) -> Path:
        return self.key_file or state_dir / RELAY_KEY

    def ca_path(self, state_dir: Path) -> Path:
        return self.ca_file or state_dir / CA_CERT


class RateLimitConfig(StrictModel):
    """A token bucket per source (IPv4 address, IPv6 /64) and one shared by all sources; see
    ``tunnel_core.ratelimit``. Attempts beyond it are answered 429 without being processed."""

    per_source_burst: Annotated[int, Field(ge=1, le=100_000)]
    per_source_per_minute: Annotated[float, Field(gt=0, le=600_000)]
    total_burst: Annotated[int, Field(ge=1, le=1_000_000)]
    total_per_minute: Annotated[float, Field(gt=0, le=6_000_000)]
    max_sources: Annotated[int, Field(ge=1, le=1_000_000)] = 10_000  # tracked at once; the oldest is forgotten
    report_interval: Seconds = 60.0  # at most one log line per throttled source per interval

    def to_limits(self) -> RateLimits:
        return RateLimits(per_source_burst=self.per_source_burst, per_source_rate=self.per_source_per_minute / 60,
                          total_burst=self.total_burst, total_rate=self.total_per_minute / 60,
                          max_sources=self.max_sources, report_interval=self.report_interval)


class EnrollmentRateLimit(RateLimitConfig):
    """``[enrollment.rate_limit]``: every request to /enroll/v1/certificate, /renew, /wireguard and /inner counts."""

    per_source_burst: Annotated[int, Field(ge=1, le=100_000)] = 20
    per_source_per_minute: Annotated[float, Field(gt=0, le=600_000)] = 6.0
    total_burst: Annotated[int, Field(ge=1, le=1_000_000)] = 200
    total_per_minute: Annotated[float, Field(gt=0, le=6_000_000)] = 120.0


class LoginRateLimit(RateLimitConfig):
    """``[admin.login_rate_limit]``: wrong admin tokens (dashboard login, API bearer); a right one never counts."""

    per_source_burst: Annotated[int, Field(ge=1, le=100_000)] = 10
    per_source_per_minute: Annotated[float, Field(gt=0, le=600_000)] = 2.0
    total_burst: Annotated[int, Field(ge=1, le=1_000_000)] = 50
    total_per_minute: Annotated[float, Field(gt=0, le=6_000_000)] = 10.0


class EnrollmentConfig(StrictModel):
    """``[enrollment]``: one-line site enrollment (``tunnel-relay site add``) and certificate renewal."""

    token_ttl: Annotated[float, Field(gt=0, le=30 * 86400)] = 86400.0  # seconds a token stays redeemable
    certificate_days: Annotated[int, Field(ge=1, le=30)] = 30  # lifetime of each issued site certificate
    rate_limit: EnrollmentRateLimit = Field(default_factory=EnrollmentRateLimit)


class WireGuardConfig(StrictModel):
    """``[wireguard]``: the WireGuard transport. Agents with ``transport = "wireguard"`` register a key over
    the TLS port, then reach ``tunnel_port`` on ``address`` through the tunnel (only outbound UDP for them)."""

    enabled: bool = False
    interface: Annotated[str, Field(pattern=r"^[A-Za-z0-9_=+.][A-Za-z0-9_=+.-]{0,14}$")] = "wgrelay0"
    listen_port: Port = 51820
    address: Annotated[str, Field(pattern=r"^\d+\.\d+\.\d+\.\d+/\d+$")] = "10.99.0.1/24"
    tunnel_port: Port = 8444
    # What agents dial (host:port). Empty: the first name in relay.crt and listen_port.
    endpoint: Annotated[str | None, BeforeValidator(_empty_is_none)] = None
    persistent_keepalive: Annotated[int, Field(ge=0, le=3600)] = 25
    implementation: Literal["auto", "kernel", "userspace"] = "auto"

    @model_validator(mode="after")
    def _address_in_network(self) -> WireGuardConfig:
        iface = ipaddress.ip_interface(self.address)
        if iface.network.num_addresses < 4 or iface.ip in (iface.network.network_address,
                                                           iface.network.broadcast_address):
            raise KeyProblem(("address",), "needs a host address in a network with room for sites, e.g. 10.99.0.1/24")
        return self

    @property
    def relay_ip(self) -> str:
        return str(ipaddress.ip_interface(self.address).ip)


HostName = Annotated[str, Field(pattern=r"^(?:[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?\.?)+$",
                                 max_length=253)]


class FleetConfig(StrictModel):
    """``[fleet]``: this relay among the relays that share the registry (``relay.presence``)."""

    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")] = Field(
        default_factory=lambda: _hostname())
    zone: Annotated[str, Field(pattern=r"^[A-Za-z0-9._-]{0,63}$")] = ""
    lease: Annotated[float, Field(ge=3.0, le=300.0)] = 15.0  # seconds; renewed every third of it
    # On SIGTERM (or POST /api/drain): how long cloud associations already in flight may take to finish
    # after the relay stopped taking new ones; the rest are then aborted and the relay exits.
    drain_deadline: Annotated[float, Field(ge=0.0, le=3600.0)] = 30.0
    # Where the other relays reach this relay's tunnel port to carry it a caller whose site's tunnel it
    # holds ("host:port", any address: the peers check the fleet's shared relay.crt, by its first name).
    # Empty: it takes no hops (it still carries its own callers to relays that do).
    address: Annotated[str, Field(pattern=r"^(|[A-Za-z0-9.-]+:[0-9]{1,5}|\[[0-9A-Fa-f:.]+\]:[0-9]{1,5})$")] = ""
    # The URL agents dial to reach this relay itself, not the balancer in front of the fleet
    # ("wss://relay-1.example.org:8443/tunnel"). Each relay lists the fleet's on every tunnel upgrade
    # (Tunnel-Fleet, docs/protocol.md §1.3), so an agent keeps tunnels to [fleet] tunnels of them.
    # Agents check the relay's certificate against the name they enrolled with: list relays that
    # share the fleet's relay.crt. Empty: agents are not told of this relay.
    tunnel_url: Annotated[str, Field(pattern=r"^(|wss://[\x21-\x7e]{1,500})$")] = ""


def _hostname() -> str:
    """The machine's name as a fleet name: its first label, in the characters a fleet name allows."""
    label = socket.gethostname().split(".")[0]
    cleaned = "".join(ch if ch.isascii() and (ch.isalnum() or ch in "._-") else "-" for ch in label)[:63]
    return cleaned if cleaned[:1].isalnum() else f"relay-{cleaned}"[:63]


class AdminConfig(EndpointConfig):
    """``[admin]``: the JSON status API and dashboard (plain HTTP, loopback by default).

    The port answers only to ``localhost``, IP literals, ``host`` and ``allowed_hosts`` (a DNS-rebinding
    defence, ``relay.guard``): add the names browsers and scrapers use to reach it."""

    port: Port = 8081
    allowed_hosts: list[HostName] = Field(default_factory=list)
    login_rate_limit: LoginRateLimit = Field(default_factory=LoginRateLimit)

    def host_names(self) -> list[str]:
        """The names the admin port answers to besides localhost and IP literals."""
        return [*self.allowed_hosts, *([] if self.host in ("0.0.0.0", "::", "") else [self.host])]


class ListenerRoute(StrictModel):
    """``[[listeners.routes]]``: a called AE title on this listener leads to ``route`` at ``site``."""

    called_ae: AETitle
    site: Name
    route: Name
    allowed_calling_aes: CallingAEList


class ListenerConfig(DicomIngressConfig):
    """``[[listeners]]``: a DICOM ingress for cloud callers."""

    name: Name
    routes: list[ListenerRoute] = Field(default_factory=list)

    @model_validator(mode="after")
    def _called_aes_unique(self) -> ListenerConfig:
        require_unique(self.routes, "called_ae", ("routes",), "called AE title")
        return self


class DestinationConfig(StrictModel):
    """``[[sites.destinations]]``: a cloud SCP the site's agent may send to."""

    called_ae: AETitle
    host: Annotated[str, Field(min_length=1)]
    port: Port
    allowed_calling_aes: CallingAEList


class SiteConfig(StrictModel):
    """``[[sites]]``: one hospital; ``name`` must equal the CN of the site's certificate."""

    name: Name
    destinations: list[DestinationConfig] = Field(default_factory=list)

    @model_validator(mode="after")
    def _called_aes_unique(self) -> SiteConfig:
        require_unique(self.destinations, "called_ae", ("destinations",), "called AE title")
        return self

    def destination(self, called_ae: str) -> DestinationConfig | None:
        return next((d for d in self.destinations if d.called_ae == called_ae), None)


class RelaySettings(TomlSettings):
    """The whole relay configuration. Build with :func:`load_relay_settings`."""

    model_config = SettingsConfigDict(env_prefix="TUNNEL_RELAY_")

    state_dir: Path = Path("/var/lib/tunnel-relay")
    # The registry: empty, the SQLite file in state_dir; "postgresql://user@host:5432/database", a database
    # that every relay of a fleet shares (never a password in it: registry_password_file, or the
    # TUNNEL_RELAY_REGISTRY_PASSWORD environment variable).
    registry_url: str = ""
    registry_password_file: OptionalPath = None
    tunnel: TunnelConfig = Field(default_factory=TunnelConfig)
    mux: MuxConfig = Field(default_factory=MuxConfig)
    admin: AdminConfig = Field(default_factory=AdminConfig)
    enrollment: EnrollmentConfig = Field(default_factory=EnrollmentConfig)
    fleet: FleetConfig = Field(default_factory=FleetConfig)
    wireguard: WireGuardConfig = Field(default_factory=WireGuardConfig)
    listeners: list[ListenerConfig] = Field(default_factory=list)
    sites: list[SiteConfig] = Field(default_factory=list)

    @field_validator("registry_url")
    @classmethod
    def _check_registry_url(cls, value: str) -> str:
        if value:
            try:
                PostgresTarget.from_url(value)
            except RegistryError as exc:
                raise ValueError(str(exc)) from None
        return value

    @model_validator(mode="after")
    def _cross_checks(self) -> RelaySettings:
        require_unique(self.sites, "name", ("sites",), "site name")
        require_unique(self.listeners, "name", ("listeners",), "listener name")
        self._check_route_sites()
        self._check_ports()
        return self

    def _check_route_sites(self) -> None:
        known = {site.name for site in self.sites}
        for li, listener in enumerate(self.listeners):
            for ri, route in enumerate(listener.routes):
                if route.site not in known:
                    loc = ("listeners", li, "routes", ri, "site")
                    raise KeyProblem(loc, f"unknown site {route.site!r} (not in [[sites]])")

    def _check_ports(self) -> None:
        sockets: list[tuple[tuple[str | int, ...], str, int]] = [
            (("tunnel", "port"), self.tunnel.host, self.tunnel.port),
            (("admin", "port"), self.admin.host, self.admin.port),
        ]
        sockets += [(("listeners", i, "port"), li.host, li.port) for i, li in enumerate(self.listeners)]
        for index, (loc, host, port) in enumerate(sockets):
            for other_loc, other_host, other_port in sockets[:index]:
                if port == other_port and hosts_overlap(host, other_host):
                    where = ".".join(str(p) for p in other_loc)
                    raise KeyProblem(loc, f"port {port} is already used by {where}")

    # --- convenience -------------------------------------------------------------------------

    @property
    def tunnel_cert_path(self) -> Path:
        return self.tunnel.cert_path(self.state_dir)

    @property
    def tunnel_key_path(self) -> Path:
        return self.tunnel.key_path(self.state_dir)

    @property
    def tunnel_ca_path(self) -> Path:
        return self.tunnel.ca_path(self.state_dir)

    def site(self, name: str) -> SiteConfig | None:
        return next((s for s in self.sites if s.name == name), None)

    def listener(self, name: str) -> ListenerConfig | None:
        return next((li for li in self.listeners if li.name == name), None)


def load_relay_settings(path: Path | None) -> RelaySettings:
    """Load and validate the relay configuration; raises ``ConfigError`` naming each wrong key."""
    return load_toml_settings(RelaySettings, path)
