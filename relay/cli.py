"""``tunnel-relay``: serve, and the minimal certificate tooling (CA, relay certificate, site certificates)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from relay import pki
from relay.config import RelaySettings, load_relay_settings
from tunnel_link.cli_common import run_service, setup_logging
from tunnel_link.config_common import ConfigError
from tunnel_link.tls import TlsConfigError


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"tunnel-relay: configuration error:\n{exc}", file=sys.stderr)
        return 2
    except pki.PkiError as exc:
        print(f"tunnel-relay: {exc}", file=sys.stderr)
        return 1
    except (TlsConfigError, OSError) as exc:  # unreadable certificates, a port already in use
        print(f"tunnel-relay: cannot start: {exc}", file=sys.stderr)
        return 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tunnel-relay", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the relay")
    serve.add_argument("--config", type=Path, required=True, help="relay TOML file")
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
    return parser


def _state_dir_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--config", type=Path, help="relay TOML file (its state_dir is used)")
    group.add_argument("--state-dir", type=Path, help="the relay's state directory")


def _state_dir(args: argparse.Namespace) -> Path:
    return args.state_dir if args.state_dir else load_relay_settings(args.config).state_dir


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
    print(f"CA ready in {state}; fingerprint sha256:{pki.ca_fingerprint(state)}")
    return 0


def _site_cert(args: argparse.Namespace) -> int:
    bundle = pki.issue_site_cert(_state_dir(args), args.name, args.out, days=args.days)
    print(f"issued certificate for site {args.name!r} in {args.out} (valid {args.days} days)")
    del bundle
    return 0


if __name__ == "__main__":
    sys.exit(main())
