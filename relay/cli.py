"""Command line: ``relay serve | agent | token | check-config | status``. Entry points only."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Coroutine, Sequence
from typing import Any

from relay.config import Config, load_config, masked
from relay.errors import ConfigError
from relay.logs import setup_logging
from relay.tracing import ENV_ENDPOINT

DEFAULT_CONFIG = "config.toml"


def _run(coro: Coroutine[Any, Any, int]) -> int:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency where it builds
        return asyncio.run(coro)
    return uvloop.run(coro)


def _config_path(args: argparse.Namespace) -> str | None:
    path = args.config or os.environ.get("RELAY_CONFIG")
    if path:
        return str(path)
    return DEFAULT_CONFIG if os.path.exists(DEFAULT_CONFIG) else None


def _load(args: argparse.Namespace) -> tuple[Config, str | None]:
    path = _config_path(args)
    try:
        return load_config(path), path
    except UnicodeDecodeError:
        raise ConfigError(str(path), "-", "not UTF-8 text") from None


def cmd_serve(args: argparse.Namespace) -> int:
    config, path = _load(args)
    setup_logging(config.log.level, config.log.format)
    if config.auth.mode == "dev":
        from relay.auth.devissuer import load_or_create_dev_key

        load_or_create_dev_key(config.dev_state_path)
        cfg = f" --config {path}" if path else ""
        http, ws = ("https", "wss") if config.server.tls_cert_file else ("http", "ws")
        print(
            f"relay (dev mode) on {http}://{config.server.host}:{config.server.port}\n"
            f"  mint a token:     relay token{cfg} --sub me --org acme\n"
            f"  an agent's token: relay token{cfg} --sub me --org acme "
            f"--agent-host acme:laptop\n"
            f"  connect an agent: relay agent --relay {ws}://{config.server.host}:"
            f"{config.server.port} --host-id acme:laptop --upstream http://127.0.0.1:3000 "
            f"--token <agent token>\n"
            f"  call the host:    curl -H 'Authorization: Bearer <token>' "
            f"{http}://{config.server.host}:{config.server.port}/hosts/acme:laptop/",
            file=sys.stderr, flush=True,
        )
    from relay.server.run import serve

    return _run(serve(config, config_path=path))


def cmd_token(args: argparse.Namespace) -> int:
    config, _ = _load(args)
    if config.auth.mode != "dev":
        raise ConfigError(config.source, "auth.mode",
                          'relay token needs the dev issuer (mode = "dev")')
    from relay.auth.devissuer import mint_token

    try:
        token = mint_token(config, args.sub, list(args.org), ttl_s=args.ttl, email=args.email,
                           agent_hosts=list(args.agent_host or ()))
    except ValueError as exc:
        print(f"relay: token: {exc}", file=sys.stderr)
        return 2
    print(token)
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    config, path = _load(args)
    print(json.dumps({"file": path or "<defaults>", **masked(config)}, indent=2))
    return 0


def cmd_agent(args: argparse.Namespace) -> int:
    setup_logging(args.log_level, args.log_format)
    from relay.agent.run import run_agent

    return _run(run_agent(args))


def cmd_status(args: argparse.Namespace) -> int:
    from relay.server.admin_client import print_status

    return _run(print_status(args))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="relay", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the relay")
    serve.add_argument("--config", help="config file (default: ./config.toml, or $RELAY_CONFIG)")
    serve.set_defaults(func=cmd_serve)

    token = sub.add_parser("token", help="mint a token from the dev issuer of a config")
    token.add_argument("--config")
    token.add_argument("--sub", required=True, help="subject (user id)")
    token.add_argument("--org", action="append", required=True, help="organisation (repeatable)")
    token.add_argument("--ttl", type=int, default=3600, help="lifetime in seconds")
    token.add_argument("--email", default=None)
    token.add_argument("--agent-host", action="append", metavar="HOST_ID",
                       help="a host id (<org>:<machine>) or <org>:* this token may serve as an "
                            "agent (repeatable; agents need it to register a tunnel)")
    token.set_defaults(func=cmd_token)

    check = sub.add_parser("check-config", help="validate and print the effective config")
    check.add_argument("--config")
    check.set_defaults(func=cmd_check_config)

    agent = sub.add_parser("agent", help="hold a tunnel and serve a local host service")
    agent.add_argument("--relay", required=True, help="relay URL, ws(s):// or http(s)://")
    agent.add_argument("--host-id", required=True, help="<organizationId>:<machineId>")
    agent.add_argument("--upstream", required=True, help="local origin, e.g. http://127.0.0.1:3000")
    group = agent.add_mutually_exclusive_group(required=True)
    group.add_argument("--token")
    group.add_argument("--token-file", help="re-read on every connect")
    group.add_argument("--token-command", help="run on every connect; its stdout is the token")
    agent.add_argument("--backoff-cap", type=float, default=30.0,
                       help="longest reconnect delay (s)")
    agent.add_argument("--ca-file", default=None,
                       help="trust this CA certificate (PEM) for a wss:// relay with a private CA")
    agent.add_argument("--otlp-endpoint",
                       default=os.environ.get(ENV_ENDPOINT, ""),
                       help="export a span per call to the host service over OTLP/HTTP, e.g. "
                            "http://collector:4318/v1/traces (default: "
                            "$OTEL_EXPORTER_OTLP_TRACES_ENDPOINT; empty = off)")
    agent.add_argument("--log-level", default=os.environ.get("RELAY_LOG_LEVEL", "info"))
    agent.add_argument("--log-format", default=os.environ.get("RELAY_LOG_FORMAT", "json"),
                       choices=["json", "console"])
    agent.set_defaults(func=cmd_agent)

    status = sub.add_parser("status", help="list a relay's tunnels (admin API)")
    status.add_argument("--url", default=os.environ.get("RELAY_ADMIN_URL", "http://127.0.0.1:8080"),
                        help="the relay's own address (default: $RELAY_ADMIN_URL or "
                             "http://127.0.0.1:8080)")
    status.add_argument("--secret", default=None,
                        help="admin secret (default: $RELAY_ADMIN_SECRET)")
    status.add_argument("--json", action="store_true", help="print JSON instead of a table")
    status.set_defaults(func=cmd_status)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Until a command configures logging its own way, log lines go to stderr: stdout carries
    # only a command's output (`TOKEN=$(relay token ...)` must capture the token alone, even
    # on the first run, which logs the creation of the dev key).
    setup_logging("info", "console")
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"relay: config error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
