"""``tunnel-relay``: serve; the CA; sites (add with a one-line enrollment token, list, revoke); certificates;
the fleet of relays sharing a registry.

``ca init`` and ``site cert`` work on the state directory directly (no relay needed). ``site add``,
``site list``, ``site revoke`` and ``cert revoke`` talk to the running relay's admin API with the token
from ``{state_dir}/admin.token``, so the relay acts on them at once (a revoked site's tunnel is closed
before the command returns).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import quote

from relay import pki
from relay.admintoken import admin_token
from relay.config import RelaySettings, load_relay_settings
from relay.registry import Registry, RegistryError, open_registry, serial_hex
from tunnel_link.tls import TlsConfigError
from tunnel_runtime.service import run_service, setup_logging
from tunnel_runtime.settings import ConfigError


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"tunnel-relay: configuration error:\n{exc}", file=sys.stderr)
        return 2
    except (pki.PkiError, RegistryError, AdminApiError) as exc:
        print(f"tunnel-relay: {exc}", file=sys.stderr)
        return 1
    except (TlsConfigError, OSError) as exc:  # unreadable certificates, a port already in use
        print(f"tunnel-relay: cannot start: {exc}", file=sys.stderr)
        return 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tunnel-relay", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the relay")
    _config_arg(serve)
    serve.add_argument("-v", "--verbose", action="store_true")
    serve.set_defaults(func=_serve)

    ca = sub.add_parser("ca", help="the relay's certificate authority")
    ca_sub = ca.add_subparsers(dest="ca_command", required=True)
    init = ca_sub.add_parser("init", help="create the CA (once) and the relay's TLS certificate")
    _state_dir_args(init)
    init.add_argument("--hostname", action="append", required=True,
                      help="DNS name or IP address agents use to reach the relay (repeatable)")
    init.set_defaults(func=_ca_init)

    site = sub.add_parser("site", help="sites")
    site_sub = site.add_subparsers(dest="site_command", required=True)
    cert = site_sub.add_parser("cert", help="issue a client certificate for a site's agent")
    cert.add_argument("name", help="site name (becomes the certificate CN)")
    _state_dir_args(cert)
    cert.add_argument("--out", type=Path, required=True, help="directory for agent.key, agent.crt, ca.crt")
    cert.add_argument("--days", type=int, default=30)
    cert.set_defaults(func=_site_cert)

    add = site_sub.add_parser("add", help="register a site and print its one-line enrollment token")
    add.add_argument("name", help="site name (a-z, 0-9, '-')")
    _config_arg(add)
    add.add_argument("--ttl", type=float, help="seconds the token stays valid (default: enrollment.token_ttl)")
    add.add_argument("--json", action="store_true")
    add.set_defaults(func=_site_add)

    listing = site_sub.add_parser("list", help="list the registered sites")
    _config_arg(listing)
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(func=_site_list)

    revoke = site_sub.add_parser("revoke", help="revoke a site and its certificates; ends its tunnel")
    revoke.add_argument("name")
    _config_arg(revoke)
    revoke.add_argument("--reason", default="", help="recorded in the audit trail")
    revoke.add_argument("--json", action="store_true")
    revoke.set_defaults(func=_site_revoke)

    dest = site_sub.add_parser("destination", help="cloud SCPs a site's agent may send to")
    dest_sub = dest.add_subparsers(dest="destination_command", required=True)
    dest_add = dest_sub.add_parser("add", help="let SITE's agent reach HOST:PORT as CALLED_AE")
    dest_add.add_argument("site")
    dest_add.add_argument("called_ae")
    dest_add.add_argument("--host", required=True)
    dest_add.add_argument("--port", type=int, required=True)
    _allow_arg(dest_add)
    _config_arg(dest_add)
    dest_add.set_defaults(func=_destination_add)
    dest_rm = dest_sub.add_parser("remove", help="remove a destination added with `destination add`")
    dest_rm.add_argument("site")
    dest_rm.add_argument("called_ae")
    _config_arg(dest_rm)
    dest_rm.set_defaults(func=_destination_remove)

    route = sub.add_parser("route", help="listener routes: called AE on a relay listener -> site route")
    route_sub = route.add_subparsers(dest="route_command", required=True)
    route_add = route_sub.add_parser("add", help="route CALLED_AE on LISTENER to ROUTE at SITE")
    route_add.add_argument("listener")
    route_add.add_argument("called_ae")
    route_add.add_argument("--site", required=True)
    route_add.add_argument("--route", required=True, help="a [[routes]] name in the site's agent config")
    _allow_arg(route_add)
    _config_arg(route_add)
    route_add.set_defaults(func=_route_add)
    route_rm = route_sub.add_parser("remove", help="remove a route added with `route add`")
    route_rm.add_argument("listener")
    route_rm.add_argument("called_ae")
    _config_arg(route_rm)
    route_rm.set_defaults(func=_route_remove)
    route_list = route_sub.add_parser("list", help="listener routes and site destinations")
    _config_arg(route_list)
    route_list.add_argument("--json", action="store_true")
    route_list.set_defaults(func=_route_list)

    sites = sub.add_parser("sites", help="each site's condition (up / degraded / down) and why, from the running "
                           "relay: transport, RTT, associations, PACS C-ECHO, certificate expiry")
    _config_arg(sites)
    sites.add_argument("--json", action="store_true", help="print the sites of GET /api/status as JSON")
    sites.set_defaults(func=_sites)

    fleet = sub.add_parser("fleet", help="the relays sharing this relay's registry: state (serving, draining, "
                           "gone), zone, sites held")
    _config_arg(fleet)
    fleet.add_argument("--json", action="store_true", help="print GET /api/fleet as JSON")
    fleet.set_defaults(func=_fleet)

    certs = sub.add_parser("cert", help="issued certificates")
    cert_sub = certs.add_subparsers(dest="cert_command", required=True)
    cert_list = cert_sub.add_parser("list", help="list issued certificates")
    _config_arg(cert_list)
    cert_list.add_argument("--site")
    cert_list.add_argument("--json", action="store_true")
    cert_list.set_defaults(func=_cert_list)
    cert_revoke = cert_sub.add_parser("revoke", help="revoke one certificate by serial (hex)")
    cert_revoke.add_argument("serial")
    _config_arg(cert_revoke)
    cert_revoke.add_argument("--reason", default="")
    cert_revoke.add_argument("--json", action="store_true")
    cert_revoke.set_defaults(func=_cert_revoke)
    return parser


def _config_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, required=True, help="relay TOML file")


def _allow_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--allow", action="append", required=True, metavar="CALLING_AE",
                        help="calling AE title allowed (repeatable; '*' for any)")


class AdminApiError(Exception):
    """The admin API could not be reached or refused the request."""


def _admin_call(config: Path, method: str, path: str, body: dict | None = None) -> dict:
    settings = load_relay_settings(config)
    host = settings.admin.host if settings.admin.host not in ("0.0.0.0", "::") else "127.0.0.1"
    host = f"[{host}]" if ":" in host else host
    url = f"http://{host}:{settings.admin.port}{path}"
    try:
        token = admin_token(settings.state_dir)
    except OSError as exc:
        raise AdminApiError(f"cannot read the admin token in {settings.state_dir}: {exc.strerror}") from exc
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method, headers={
        "Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.load(response)
    except urllib.error.HTTPError as exc:
        try:
            message = json.load(exc).get("error", exc.reason)
        except ValueError:
            message = exc.reason
        raise AdminApiError(f"the relay refused: {message}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise AdminApiError(f"the relay is not running or its admin port is closed ({url}): {exc}") from None


def _site_add(args: argparse.Namespace) -> int:
    body: dict[str, object] = {"name": args.name}
    if args.ttl is not None:
        body["token_ttl"] = args.ttl
    answer = _admin_call(args.config, "POST", "/api/sites", body)
    if args.json:
        print(json.dumps(answer, indent=2))
        return 0
    expires = dt.datetime.fromtimestamp(answer["expires_at"], dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    print(f"site {answer['site']!r} {answer['outcome']}; enrollment token (single use, expires {expires}):",
          file=sys.stderr)
    print(answer["token"])
    print("on the hospital host: tunnel-agent enroll --config /etc/tunnel-agent/agent.toml  (paste the token)",
          file=sys.stderr)
    if not answer["configured_routes"]:
        print(f"note: nothing is routed to or from {answer['site']!r} yet: add routes with `tunnel-relay route "
              "add` and `tunnel-relay site destination add`, or in the relay config", file=sys.stderr)
    return 0


def _site_list(args: argparse.Namespace) -> int:
    sites = _admin_call(args.config, "GET", "/api/sites")["sites"]
    if args.json:
        print(json.dumps(sites, indent=2))
        return 0
    print(f"{'SITE':<24} {'STATE':<10} {'CONNECTED':<10} {'CERTS':>5}  CERT EXPIRES")
    for site in sites:
        state = "revoked" if site["revoked"] else ("enrolled" if site["certificates"] else "pending")
        expires = _when(site["latest_not_after"]) if site["latest_not_after"] else "-"
        print(f"{site['name']:<24} {state:<10} {'yes' if site['connected'] else 'no':<10} "
              f"{site['certificates']:>5}  {expires}")
    return 0


def _sites(args: argparse.Namespace) -> int:
    sites = _admin_call(args.config, "GET", "/api/status")["sites"]
    if args.json:
        print(json.dumps(sites, indent=2))
        return 0
    paths = _admin_call(args.config, "GET", "/api/fleet")["paths"]
    now = time.time()
    print(f"{'SITE':<20} {'CONDITION':<9} {'TRANSPORT':<20} {'CONNECTED SINCE':<20} {'RTT':>9} {'ASSOC':>5} "
          f"{'ECHO OK':>7} {'CERT':>6}  {'TUNNELS ON':<24} REASON")
    for site in sites:
        health = site.get("health") or {}
        dests = health.get("destinations") or []
        echo = f"{sum(1 for d in dests if d['ok'])}/{len(dests)}" if health else "-"
        not_after = site.get("certificate_not_after") or (health.get("certificate") or {}).get("not_after")
        cert = f"{(not_after - now) / 86400:.0f} d" if not_after else "-"
        rtt = f"{site['rtt_ms']:.1f} ms" if site.get("rtt_ms") is not None else "-"
        since = _when(site["connected_since"]) if site.get("connected_since") else "-"
        print(f"{site['name']:<20} {site['condition']:<9} {site.get('transport') or '-':<20} {since:<20} "
              f"{rtt:>9} {site['active_streams']:>5} {echo:>7} {cert:>6}  "
              f"{_paths(paths.get(site['name'], [])):<24} {site['reason']}")
    return 0


def _paths(held: list[dict]) -> str:
    """A site's paths, ``relay/agent`` each (just the relay for an agent without a name); one alone is
    flagged: it is the site's single path (dashboard.js says the same)."""
    pairs = [f"{h['relay']}/{agent}" if agent else h["relay"] for h in held for agent in (h["agents"] or [""])]
    if not pairs:
        return "-"
    return f"{pairs[0]} (single path)" if len(pairs) == 1 else ", ".join(pairs)


def _fleet(args: argparse.Namespace) -> int:
    answer = _admin_call(args.config, "GET", "/api/fleet")
    if args.json:
        print(json.dumps(answer, indent=2))
        return 0
    now = time.time()
    print(f"{'RELAY':<24} {'ZONE':<12} {'STATE':<9} {'SITES':>5}  {'UP SINCE':<20} LEASE")
    for relay in answer["relays"]:
        lease = "expired" if relay["state"] == "gone" else f"{relay['lease_until'] - now:.0f} s left"
        me = "  (this relay)" if relay["name"] == answer["relay"] else ""
        print(f"{relay['name']:<24} {relay['zone'] or '-':<12} {relay['state']:<9} {relay['sites']:>5}  "
              f"{_when(relay['started_at']):<20} {lease}{me}")
    return 0


def _site_revoke(args: argparse.Namespace) -> int:
    answer = _admin_call(args.config, "POST", f"/api/sites/{args.name}/revoke", {"reason": args.reason})
    if args.json:
        print(json.dumps(answer, indent=2))
    else:
        print(f"site {args.name!r} revoked ({len(answer['revoked_certificates'])} certificates); "
              f"tunnel {'closed' if answer['closed_sessions'] else 'was not connected'}")
    return 0


def _cert_list(args: argparse.Namespace) -> int:
    path = "/api/certificates" + (f"?site={args.site}" if args.site else "")
    certs = _admin_call(args.config, "GET", path)["certificates"]
    if args.json:
        print(json.dumps(certs, indent=2))
        return 0
    print(f"{'SERIAL':<42} {'SITE':<24} {'KIND':<7} {'REVOKED':<8} EXPIRES")
    for c in certs:
        print(f"{c['serial']:<42} {c['site']:<24} {c['kind']:<7} {'yes' if c['revoked'] else 'no':<8} "
              f"{_when(c['not_after'])}")
    return 0


def _cert_revoke(args: argparse.Namespace) -> int:
    answer = _admin_call(args.config, "POST", f"/api/certificates/{args.serial.lower()}/revoke",
                         {"reason": args.reason})
    if args.json:
        print(json.dumps(answer, indent=2))
    else:
        print(f"certificate {answer['serial']} of site {answer['site']!r} revoked; "
              f"tunnel {'closed' if answer['closed_sessions'] else 'not affected'}")
    return 0


def _route_add(args: argparse.Namespace) -> int:
    _admin_call(args.config, "POST", "/api/routes", {
        "listener": args.listener, "called_ae": args.called_ae, "site": args.site, "route": args.route,
        "allowed_calling_aes": args.allow})
    print(f"listener {args.listener!r}: called AE {args.called_ae!r} -> route {args.route!r} at site {args.site!r}")
    return 0


def _route_remove(args: argparse.Namespace) -> int:
    _admin_call(args.config, "DELETE", f"/api/routes/{quote(args.listener, safe='')}/{quote(args.called_ae, safe='')}")
    print(f"listener {args.listener!r}: called AE {args.called_ae!r} removed")
    return 0


def _destination_add(args: argparse.Namespace) -> int:
    _admin_call(args.config, "POST", f"/api/sites/{quote(args.site, safe='')}/destinations", {
        "called_ae": args.called_ae, "host": args.host, "port": args.port, "allowed_calling_aes": args.allow})
    print(f"site {args.site!r} may now send to {args.called_ae!r} at {args.host}:{args.port}")
    return 0


def _destination_remove(args: argparse.Namespace) -> int:
    _admin_call(args.config, "DELETE",
                f"/api/sites/{quote(args.site, safe='')}/destinations/{quote(args.called_ae, safe='')}")
    print(f"site {args.site!r}: destination {args.called_ae!r} removed")
    return 0


def _route_list(args: argparse.Namespace) -> int:
    answer = _admin_call(args.config, "GET", "/api/routes")
    if args.json:
        print(json.dumps(answer, indent=2))
        return 0
    print(f"{'LISTENER':<12} {'CALLED AE':<17} {'SITE':<20} {'ROUTE':<12} {'SOURCE':<7} ALLOWED CALLERS")
    for r in answer["listener_routes"]:
        print(f"{r['listener']:<12} {r['called_ae']:<17} {r['site']:<20} {r['route']:<12} {r['source']:<7} "
              f"{', '.join(r['allowed_calling_aes'])}")
    print(f"\n{'SITE':<20} {'CALLED AE':<17} {'DESTINATION':<28} {'SOURCE':<7} ALLOWED CALLERS")
    for d in answer["destinations"]:
        print(f"{d['site']:<20} {d['called_ae']:<17} {d['host'] + ':' + str(d['port']):<28} {d['source']:<7} "
              f"{', '.join(d['allowed_calling_aes'])}")
    return 0


def _when(timestamp: float) -> str:
    return dt.datetime.fromtimestamp(timestamp, dt.UTC).strftime("%Y-%m-%d %H:%M UTC")


def _state_dir_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--config", type=Path, help="relay TOML file (its state_dir is used)")
    group.add_argument("--state-dir", type=Path, help="the relay's state directory")


def _state_dir(args: argparse.Namespace) -> Path:
    return args.state_dir if args.state_dir else load_relay_settings(args.config).state_dir


def _registry(args: argparse.Namespace) -> Registry:
    """The registry the config names (``--config``: SQLite or PostgreSQL), or the file in ``--state-dir``."""
    if args.state_dir:
        return Registry.open(args.state_dir)
    settings = load_relay_settings(args.config)
    return open_registry(settings.state_dir, settings.registry_url, settings.registry_password_file)


def _serve(args: argparse.Namespace) -> int:
    from relay.server import Relay  # aiohttp is only needed to serve

    settings: RelaySettings = load_relay_settings(args.config)
    setup_logging(args.verbose)
    relay = Relay(settings)
    return run_service(relay.run, relay.stop)


def _ca_init(args: argparse.Namespace) -> int:
    state = _state_dir(args)
    pki.init_ca(state)
    pki.issue_server_cert(state, args.hostname)
    admin_token(state)
    _registry(args).close()
    print(f"CA ready in {state}; fingerprint sha256:{pki.ca_fingerprint(state)}")
    return 0


def _site_cert(args: argparse.Namespace) -> int:
    state = _state_dir(args)
    bundle = pki.issue_site_cert(state, args.name, args.out, days=args.days)
    registry = _registry(args)
    try:
        registry.record_certificate(serial_hex(bundle.serial), args.name, "manual", time.time(),
                                    bundle.not_after.timestamp(), actor="cli")
    finally:
        registry.close()
    print(f"issued certificate {serial_hex(bundle.serial)} for site {args.name!r} in {args.out} "
          f"(valid {args.days} days)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
