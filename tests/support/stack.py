"""A real relay and real agents as processes, for tests: the dev kit's (``devkit.stack``), re-exported."""

from __future__ import annotations

from devkit.programs import AGENT, RELAY
from devkit.stack import (
    AgentHandle,
    AgentRoute,
    ListenerRoute,
    RelayHandle,
    SiteDest,
    enroll,
    enroll_agent,
    http_json,
    make_agent,
    make_relay,
    site_add,
    start_agent,
    start_relay,
)
from devkit.stack import cli as _cli

__all__ = [
    "AGENT",
    "RELAY",
    "AgentHandle",
    "AgentRoute",
    "ListenerRoute",
    "RelayHandle",
    "SiteDest",
    "_cli",
    "http_json",
    "enroll",
    "enroll_agent",
    "make_agent",
    "make_relay",
    "site_add",
    "start_agent",
    "start_relay",
]
