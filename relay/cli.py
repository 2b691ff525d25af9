"""The ``relay`` command: parse the command line, load the config, hand over to a subsystem.

Usage errors and bad configuration end with one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
from collections.abc import Coroutine, Sequence
from typing import Any

from relay import __version__
from relay.config import Config, load_config, masked
from relay.errors import ConfigError
from relay.logs import setup_logging
from relay.tracing import ENV_ENDPOINT

DEFAULT_CONFIG = "config.toml"

DESCRIPTION = """\
A WebSocket relay: desktop agents hold a tunnel to it, and clients reach each desktop's local
host service through /hosts/<org>:<machine>/<path>.
"""

EPILOG = """\
first steps:
  relay serve --config config.toml          run the relay (dev mode: it issues its own tokens)
  relay token --sub me --org acme --agent-host acme:laptop > token
                                            mint a token that may call and serve acme:laptop
  relay agent --relay ws://127.0.0.1:8080 --host-id acme:laptop \\
      --upstream http://127.0.0.1:3000 --token-file token
  relay <command> --help                    the options of one command

Every config key can be overridden as RELAY_<SECTION>_<KEY> (e.g. RELAY_SERVER_PORT=9000).
"""


class UsageError(Exception):
    """A command line that cannot work; printed as one line, exit status 2."""


def _run(coro: Coroutine[Any, Any, int]) -> int:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency where it builds
        return asyncio.run(coro)
    return uvloop.run(coro)


def _config_path(args: argparse.Namespace) -> str:
    path = args.config or os.environ.get("RELAY_CONFIG")
    if path:
        return str(path)
    if os.path.exists(DEFAULT_CONFIG):
        return DEFAULT_CONFIG
    # Running on built-in defaults would quietly create ./state here and mint tokens no other
    # relay accepts: say which file was wanted instead.
    raise ConfigError(os.path.abspath(DEFAULT_CONFIG), "-",
                      "file not found; give one with --config PATH or RELAY_CONFIG "
                      "(the repository's config.toml is a working dev default)")


def _load(args: argparse.Namespace) -> tuple[Config, str]:
    path = _config_path(args)
    try:
        return load_config(path), path
    except UnicodeDecodeError:
        raise ConfigError(str(path), "-", "not UTF-8 text") from None


def _display_path(path: str) -> str:
    """``path`` relative to the working folder when it is inside it, else absolute."""
    absolute = os.path.abspath(path)
    relative = os.path.relpath(absolute)
    return absolute if relative.startswith("..") else relative


def self_command(argv0: str | None = None) -> str:
    """How to run this same ``relay`` again from the user's shell (for the banner).

    ``make run`` starts ``.venv/bin/relay``, which is not on PATH: printing a bare ``relay``
    would answer "command not found".
    """
    argv0 = sys.argv[0] if argv0 is None else argv0
    if os.path.basename(argv0) == "__main__.py":  # python -m relay
        return f"{_display_path(sys.executable)} -m relay"
    name = os.path.basename(argv0)
    found = shutil.which(name)
    if found and os.path.exists(argv0) and os.path.samefile(found, argv0):
        return name
    return _display_path(argv0)


def dev_banner(config: Config, path: str) -> str:
    relay = self_command()
    base = f"{config.server.host}:{config.server.port}"
    http, ws = ("https", "wss") if config.server.tls_cert_file else ("http", "ws")
    return (
        f"relay (dev mode) listening on {http}://{base}\n"
        f"  mint a token:     (umask 077; {relay} token --config {path} --sub me --org acme "
        f"--agent-host acme:laptop > token)\n"
        f"  connect an agent: {relay} agent --relay {ws}://{base} --host-id acme:laptop "
        f"--upstream http://127.0.0.1:3000 --token-file token\n"
        f"  call the host:    curl -H \"Authorization: Bearer $(cat token)\" "
        f"{http}://{base}/hosts/acme:laptop/\n"
        f"  (README.md, \"In a second terminal\": all of it in one block to paste)"
    )


def cmd_serve(args: argparse.Namespace) -> int:
    config, path = _load(args)
    setup_logging(config.log.level, config.log.format)
    banner = None
    if config.auth.mode == "dev":
        from relay.auth.devissuer import load_or_create_dev_key

        load_or_create_dev_key(config.dev_state_path)
        banner = dev_banner(config, path)
    from relay.probe import probe_services
    from relay.server.run import serve

    return _run(serve(config, config_path=path, banner=banner,
                      services=probe_services(config)))


def cmd_token(args: argparse.Namespace) -> int:
    if args.ttl <= 0:
        raise UsageError(f"relay token: --ttl must be a positive number of seconds, got {args.ttl}")
    config, _ = _load(args)
    if config.auth.mode != "dev":
        raise ConfigError(config.source, "auth.mode",
                          'relay token needs the dev issuer (mode = "dev")')
    from relay.auth.devissuer import mint_token

    try:
        token = mint_token(config, args.sub, list(args.org), ttl_s=args.ttl, email=args.email,
                           agent_hosts=list(args.agent_host or ()))
    except ValueError as exc:
        raise UsageError(f"relay token: {exc}") from None
    print(token)
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    config, path = _load(args)
    print(json.dumps({"file": path, **masked(config)}, indent=2))
    return 0


def cmd_agent(args: argparse.Namespace) -> int:
    setup_logging(args.log_level, args.log_format)
    from relay.agent.run import run_agent

    return _run(run_agent(args))


def cmd_status(args: argparse.Namespace) -> int:
    from relay.server.admin_client import print_status

    return _run(print_status(args))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="relay", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"relay {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="<command>")

    config_help = "config file (default: $RELAY_CONFIG, else ./config.toml; one is required)"
    serve = sub.add_parser(
        "serve", help="run the relay",
        description="Run the relay until SIGTERM/SIGINT (which drain it first); SIGHUP reloads "
                    "the config file.")
    serve.add_argument("--config", help=config_help)
    serve.set_defaults(func=cmd_serve)

    token = sub.add_parser(
        "token", help="mint a token from the dev issuer of a config",
        description="Print a token signed by the dev issuer of a config (auth.mode = \"dev\"). "
                    "Write it to a file the agent reads with --token-file rather than putting "
                    "it on a command line, where ps shows it.")
    token.add_argument("--config", help=config_help)
    token.add_argument("--sub", required=True, help="subject (user id)")
    token.add_argument("--org", action="append", required=True, help="organisation (repeatable)")
    token.add_argument("--ttl", type=int, default=3600,
                       help="lifetime in seconds (default 3600); an agent whose token has "
                            "expired is refused with 4401 until it gets a fresh one")
    token.add_argument("--email", default=None)
    token.add_argument("--agent-host", action="append", metavar="HOST_ID",
                       help="a host id (<org>:<machine>) or <org>:* this token may serve as an "
                            "agent (repeatable; agents need it to register a tunnel)")
    token.set_defaults(func=cmd_token)

    check = sub.add_parser(
        "check-config", help="validate and print the effective config",
        description="Validate a config (with its RELAY_* overrides) and print the effective "
                    "values as JSON, secrets masked.")
    check.add_argument("--config", help=config_help)
    check.set_defaults(func=cmd_check_config)

    agent = sub.add_parser(
        "agent", help="hold a tunnel and serve a local host service",
        description="Hold one tunnel to a relay and serve its requests from a local origin; "
                    "reconnects by itself and reads a fresh token on every connect.")
    agent.add_argument("--relay", required=True, help="relay URL, ws(s):// or http(s)://")
    agent.add_argument("--host-id", required=True, help="<organizationId>:<machineId>")
    agent.add_argument("--upstream", required=True, help="local origin, e.g. http://127.0.0.1:3000")
    group = agent.add_mutually_exclusive_group(required=True)
    group.add_argument("--token", help="the token itself (visible in ps; prefer --token-file)")
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

    status = sub.add_parser(
        "status", help="list a relay's tunnels (admin API)",
        description="List the tunnels of a running relay through its admin API "
                    "(needs admin.secret set in the relay's config).")
    status.add_argument("--url", default=os.environ.get("RELAY_ADMIN_URL"),
                        help="the relay's admin address (default: $RELAY_ADMIN_URL, else "
                             "admin.listen or the server address of --config, else "
                             "http://127.0.0.1:8080)")
    status.add_argument("--config", default=None,
                        help="read the admin address and secret from this relay config")
    status.add_argument("--secret", default=None,
                        help="admin secret (default: $RELAY_ADMIN_SECRET, else admin.secret "
                             "of --config)")
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
    except UsageError as exc:
        print(exc, file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
