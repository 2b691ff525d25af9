"""``relay status``: the admin API's tunnel list as a table for an operator at a terminal."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

import aiohttp

from relay.config import Config, load_config, parse_listen
from relay.connect_errors import connect_error_cause
from relay.errors import ConfigError


def _human_bytes(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


def _age(since: float) -> str:
    seconds = max(0, int(time.time() - since))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def render_table(body: dict[str, Any]) -> str:
    rows = [("HOST", "CONNECTED", "PEER", "STREAMS", "IN", "OUT", "LAST SEEN", "RTT")]
    for t in body.get("tunnels", []):
        rtt = t.get("rtt_ms")
        rows.append((
            t["hostId"], _age(t["connectedSince"]), t["peer"], str(t["streams"]),
            _human_bytes(t["bytes_in"]), _human_bytes(t["bytes_out"]),
            f"{t['lastInboundAgoS']:.1f}s ago", "-" if rtt is None else f"{rtt:.1f} ms",
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
             for row in rows]
    state = "draining" if body.get("draining") else "serving"
    header = f"relay {body.get('instanceId', '?')} ({state}): {len(rows) - 1} tunnels"
    return "\n".join([header, *lines])


def admin_url(config: Config) -> str:
    """Where a relay with this config serves /admin: its admin listener, else the public port."""
    if config.admin.listen:
        host, port = parse_listen(config.admin.listen)
    else:
        host, port = config.server.host, config.server.port
    if host in {"0.0.0.0", "::", ""}:
        host = "127.0.0.1"
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


async def print_status(args: argparse.Namespace) -> int:
    config_secret = ""
    if getattr(args, "config", None):
        try:
            config = load_config(args.config)
        except ConfigError as exc:
            print(f"relay status: {exc}", file=sys.stderr)
            return 2
        config_secret = config.admin.secret
        if not args.url:
            args.url = admin_url(config)
    args.url = args.url or "http://127.0.0.1:8080"
    secret = args.secret or os.environ.get("RELAY_ADMIN_SECRET", "") or config_secret
    if not secret:
        print("relay status: give --secret or set RELAY_ADMIN_SECRET", file=sys.stderr)
        return 2
    url = args.url.rstrip("/") + "/admin/tunnels"
    headers = {"Authorization": f"Bearer {secret}"}
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as client,
            client.get(url, headers=headers) as resp,
        ):
            text = await resp.text(errors="replace")
            status = resp.status
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        print(f"relay status: cannot reach {url}: {connect_error_cause(exc)}", file=sys.stderr)
        return 1
    if status == 404:
        # An unconfigured relay hides its admin API entirely (404 for every /admin route).
        print(f"relay status: {url} answered 404: the relay's admin API is off "
              "(admin.secret is not set in its config), or this is not a relay", file=sys.stderr)
        return 1
    if status != 200:
        print(f"relay status: {url} answered {status}: {_one_line(text)}", file=sys.stderr)
        return 1
    try:
        body = json.loads(text)
        table = render_table(body)
    except (ValueError, KeyError, TypeError, AttributeError):
        print(f"relay status: {url} did not answer with a tunnel list: {_one_line(text)}",
              file=sys.stderr)
        return 1
    print(json.dumps(body, indent=2) if args.json else table)
    return 0


def _one_line(text: str, limit: int = 300) -> str:
    return " ".join(text.split())[:limit]
