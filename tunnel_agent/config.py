"""Settings of the ``tunnel-agent`` program: a TOML file plus ``TUNNEL_AGENT_*`` environment overrides.

Load once at start-up with :func:`load_agent_settings` and pass the frozen result down. The schema is
documented, key by key, in ``deploy/agent.example.toml``. ``[[routes]]`` is the agent's allow-list: the
relay names a route, and only these entries map a name to a host and port. Nothing the relay sends can
make the agent dial anywhere else.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import AfterValidator, Field, model_validator
from pydantic_settings import SettingsConfigDict

from tunnel_agent.proxy import ProxyConfig
from tunnel_core.dicom.uids import COMMON_STORAGE_SOP_CLASSES, DEFAULT_TRANSFER_SYNTAXES, is_uid
from tunnel_runtime.settings import (
    AETitle,
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
    "AgentDestination",
    "AgentFleetConfig",
    "AgentListenerConfig",
    "AgentRoute",
    "AgentSettings",
    "HealthConfig",
    "SpoolConfig",
    "StatusConfig",
    "WireGuardAgentConfig",
    "load_agent_settings",
]


def _validate_relay_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme == "ws":
        raise ValueError("ws:// is refused: the tunnel must be encrypted and authenticated, use wss://")
    if parts.scheme != "wss":
        raise ValueError("must be a wss:// URL, e.g. wss://relay.example.org:8443/tunnel")
    if not parts.hostname:
        raise ValueError("must name the relay host, e.g. wss://relay.example.org:8443/tunnel")
    if parts.username or parts.password:
        raise ValueError("must not carry credentials; the agent authenticates with its certificate")
    try:
        parts.port  # noqa: B018 - raises ValueError for an out-of-range or non-numeric port
    except ValueError as exc:
        raise ValueError("has an invalid port") from exc
    return url


RelayUrl = Annotated[str, AfterValidator(_validate_relay_url)]
AgentName = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")]
DEFAULT_STATE_DIR = Path("/var/lib/tunnel-agent")


class StatusConfig(EndpointConfig):
    """``[status]``: the local JSON status endpoint read by ``tunnel-agent status``."""

    port: Port = 8082


class AgentListenerConfig(DicomIngressConfig):
    """``[listener]``: local DICOM ingress for modalities and the PACS, carried out to the cloud."""

    enabled: bool = True


class HealthConfig(StrictModel):
    """``[health]``: the periodic C-ECHO of each ``[[routes]]`` destination, reported to the relay."""

    echo_interval: Seconds = 30.0  # seconds between rounds; also the report interval the relay expects
    echo_timeout: Seconds = 5.0  # bounds each of connect, association, C-ECHO and release
    calling_ae: AETitle = "TUNNEL-HEALTH"


class WireGuardAgentConfig(StrictModel):
    """``[wireguard]``: the WireGuard transport, used when ``transport = "wireguard"``.

    The agent registers its public key with the relay (mutual TLS on the relay's port), brings up
    ``interface`` with the address the relay assigns, and opens the usual tunnel WebSocket through it.
    """

    # Userspace (wireguard-go) interface names must be unique on the host, not only in a namespace.
    interface: Annotated[str, Field(pattern=r"^[A-Za-z0-9_=+.][A-Za-z0-9_=+.-]{0,14}$")] = "wgtunnel0"
    key_file: Path = Path()  # empty: {state_dir}/wg.key (made on first use, 0600, never sent)
    fallback_after: Seconds = 15.0  # no tunnel over WireGuard within this: use the WebSocket transport
    retry_interval: Seconds = 60.0  # while on the fallback, seconds between WireGuard probes
    implementation: Literal["auto", "kernel", "userspace"] = "auto"  # auto: kernel, else wireguard-go


class AgentFleetConfig(StrictModel):
    """``[fleet]``: how many relays of the fleet the agent holds tunnels to (docs/protocol.md §1.3).

    The first tunnel goes to ``relay_url`` (usually the fleet's load balancer); with ``tunnels`` above 1
    the agent also dials ``tunnels - 1`` other relays directly, from the list the relays send
    (``Tunnel-Fleet``), in other zones when it can. 1: one tunnel, to ``relay_url`` only."""

    tunnels: Annotated[int, Field(ge=1, le=8)] = 2


class AgentRoute(StrictModel):
    """``[[routes]]``: one destination the agent may dial. ``called_ae`` rewrites the called AE title."""

    name: Name
    host: Annotated[str, Field(min_length=1, max_length=253)]
    port: Port
    called_ae: AETitle | None = None


Bytes = Annotated[int, Field(ge=0)]


def _validate_uids(values: list[str]) -> list[str]:
    bad = [v for v in values if not is_uid(v)]
    if bad:
        raise ValueError(f"not UIDs: {', '.join(repr(v[:70]) for v in bad[:3])}")
    if len(set(values)) != len(values):
        raise ValueError("lists a UID twice")
    return values


UidList = Annotated[list[str], Field(min_length=1), AfterValidator(_validate_uids)]


class SpoolConfig(StrictModel):
    """``[spool]``: where and how much the agent may hold for ``mode = "spool"`` destinations."""

    directory: Path = Path()  # empty: {state_dir}/spool (0700; it holds patient data)
    max_bytes: Bytes = 10 * 1024**3  # all destinations together; a full spool answers 0xA700
    min_free_bytes: Bytes = 1024**3  # refuse new instances while the filesystem has less free than this
    learn_interval: Seconds = 3600.0  # seconds between negotiations that learn what a destination accepts


class AgentDestination(StrictModel):
    """``[[destinations]]``: a cloud destination modalities send to through the agent (by ``called_ae``).

    ``mode = "passthrough"`` (the default, and what an AE title without an entry gets) splices the
    association to the cloud as it is. ``mode = "spool"``: the agent accepts the association itself, stores
    each instance durably before answering, and forwards from the spool over ``parallel`` associations.
    """

    name: Name
    called_ae: AETitle
    mode: Literal["passthrough", "spool"] = "passthrough"
    parallel: Annotated[int, Field(ge=1, le=64)] = 8
    max_bytes: Bytes = 0  # 0: only [spool] max_bytes applies
    retry_initial: Seconds = 1.0  # first retry delay of an instance (full-jitter exponential backoff)
    retry_max: Seconds = 300.0
    max_attempts: Annotated[int, Field(ge=1, le=1000)] = 10  # transient DIMSE failures before quarantine
    # What the agent accepts from modalities until it has learned what the cloud destination accepts
    # (a cold start with the relay offline), and what it asks the destination about when it learns.
    sop_classes: UidList = Field(default_factory=lambda: list(COMMON_STORAGE_SOP_CLASSES.values()))
    transfer_syntaxes: UidList = Field(default_factory=lambda: list(DEFAULT_TRANSFER_SYNTAXES))


class AgentSettings(TomlSettings):
    """The whole agent configuration. Build with :func:`load_agent_settings`."""

    model_config = SettingsConfigDict(env_prefix="TUNNEL_AGENT_")

    # Where enrollment writes the key, certificates and enrollment.json; the defaults of the paths below.
    state_dir: Path = DEFAULT_STATE_DIR
    # Unset: the URL from the enrollment token, recorded by `tunnel-agent enroll` (state_dir/enrollment.json).
    # Set (in the file or TUNNEL_AGENT_RELAY_URL), it wins over the enrollment's: only for a relay that moved.
    relay_url: RelayUrl | None = None
    # This agent's name among the site's agents (the Tunnel-Agent header): a relay keeps one tunnel per
    # agent of a site, a newer one from the same name replacing the older. Default: the host name.
    agent_name: AgentName = Field(default_factory=lambda: _hostname())
    cert_file: Path = Path()  # empty: {state_dir}/agent.crt
    key_file: Path = Path()  # empty: {state_dir}/agent.key (0600, made on this host, never sent)
    ca_file: Path = Path()  # empty: {state_dir}/ca.crt (the pinned relay CA)
    # "direct": mutual TLS with the relay end to end (a TLS-inspecting proxy makes it fail closed).
    # "inner": for networks that inspect TLS: the outer TLS trusts outer_ca_file (or the system store)
    # and may end at the proxy; the mutual TLS with the pinned relay CA runs inside the WebSocket.
    tls_mode: Literal["direct", "inner"] = "direct"
    outer_ca_file: Path | None = None
    # "websocket": the mutual-TLS WebSocket to relay_url. "wireguard": the same tunnel through a WireGuard
    # interface to the relay (only outbound UDP), falling back to "websocket" while that does not work.
    transport: Literal["websocket", "wireguard"] = "websocket"
    heartbeat_interval: Seconds = 10.0
    backoff_initial: Seconds = 0.5
    backoff_max: Seconds = 30.0
    connect_timeout: Seconds = 10.0
    # Seconds before asking again once the relay refused this site (docs/protocol.md §1, §10); not the
    # backoff, since asking sooner gets the same answer. revoked_retry: the site or its certificate was
    # revoked (a new certificate in place, from `tunnel-agent enroll --force`, is tried at once).
    # refused_retry: any other refusal (certificate unknown to the relay's registry, another site's, none).
    revoked_retry: Seconds = 3600.0
    refused_retry: Seconds = 300.0
    mux: MuxConfig = Field(default_factory=MuxConfig)
    status: StatusConfig = Field(default_factory=StatusConfig)
    listener: AgentListenerConfig = Field(default_factory=AgentListenerConfig)
    proxy: ProxyConfig = Field(default_factory=ProxyConfig)
    health: HealthConfig = Field(default_factory=HealthConfig)
    wireguard: WireGuardAgentConfig = Field(default_factory=WireGuardAgentConfig)
    routes: list[AgentRoute] = Field(default_factory=list)
    spool: SpoolConfig = Field(default_factory=SpoolConfig)
    destinations: list[AgentDestination] = Field(default_factory=list)
    fleet: AgentFleetConfig = Field(default_factory=AgentFleetConfig)

    @model_validator(mode="before")
    @classmethod
    def _paths_default_to_state_dir(cls, data: object) -> object:
        if isinstance(data, dict):
            state_dir = Path(data.get("state_dir") or DEFAULT_STATE_DIR)
            defaults = {"cert_file": "agent.crt", "key_file": "agent.key", "ca_file": "ca.crt"}
            data = {**data, **{k: state_dir / name for k, name in defaults.items() if not data.get(k)}}
            wireguard = data.get("wireguard")
            if isinstance(wireguard, dict) and not wireguard.get("key_file"):
                data["wireguard"] = {**wireguard, "key_file": state_dir / "wg.key"}
            elif isinstance(wireguard, WireGuardAgentConfig) and wireguard.key_file == Path():
                data["wireguard"] = wireguard.model_copy(update={"key_file": state_dir / "wg.key"})
            elif wireguard is None:
                data["wireguard"] = {"key_file": state_dir / "wg.key"}
            spool = data.get("spool")
            if spool is None or (isinstance(spool, dict) and not spool.get("directory")):
                data["spool"] = {**(spool or {}), "directory": state_dir / "spool"}
            elif isinstance(spool, SpoolConfig) and spool.directory == Path():
                data["spool"] = spool.model_copy(update={"directory": state_dir / "spool"})
        return data

    @model_validator(mode="after")
    def _cross_checks(self) -> AgentSettings:
        if self.backoff_initial > self.backoff_max:
            raise KeyProblem(("backoff_initial",), "must not exceed backoff_max")
        require_unique(self.routes, "name", ("routes",), "route name")
        require_unique(self.destinations, "name", ("destinations",), "destination name")
        require_unique(self.destinations, "called_ae", ("destinations",), "destination called_ae")
        listener, status = self.listener, self.status
        if listener.enabled and listener.port == status.port and hosts_overlap(listener.host, status.host):
            raise KeyProblem(("status", "port"), f"port {status.port} is already used by listener.port")
        if self.transport == "wireguard" and self.tls_mode == "inner":
            raise KeyProblem(("transport",), 'wireguard registers over direct mutual TLS; it needs tls_mode = "direct"')
        return self

    @property
    def relay_host(self) -> str:
        """The relay's host name as it must appear in the relay's certificate."""
        host = urlsplit(self.relay_url or "").hostname
        assert host is not None  # guaranteed by _validate_relay_url
        return host

    def spooled(self) -> list[AgentDestination]:
        """The destinations in spool mode."""
        return [d for d in self.destinations if d.mode == "spool"]

    def route(self, name: str) -> AgentRoute | None:
        return next((r for r in self.routes if r.name == name), None)


def _hostname() -> str:
    """The machine's name as an agent name: its first label, in the characters an agent name allows."""
    label = socket.gethostname().split(".")[0]
    cleaned = "".join(ch if ch.isascii() and (ch.isalnum() or ch in "._-") else "-" for ch in label)[:63]
    if not cleaned:
        return "agent"
    return cleaned if cleaned[:1].isalnum() else f"agent-{cleaned}"[:63]


def load_agent_settings(path: Path | None) -> AgentSettings:
    """Load and validate the agent configuration; raises ``ConfigError`` naming each wrong key."""
    return load_toml_settings(AgentSettings, path)
