"""Open the relay's listeners: the public port and, with ``admin.listen``, a separate admin port.

Used by ``relay serve`` and by the tests, so both run the same connection edge
(:mod:`relay.server.httpedge`) and the same timeouts.
"""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from relay.config import Config, parse_listen
from relay.server.app import build_admin_app
from relay.server.httpedge import EdgeLimits, EdgeServer, edge_limits
from relay.server.state import STATE


class EdgeRunner(web.AppRunner):
    """An ``AppRunner`` whose connections are :class:`relay.server.httpedge.EdgeProtocol`."""

    def __init__(self, app: web.Application, *, edge: EdgeLimits, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self._edge = edge

    async def _make_server(self) -> web.Server:
        # AppRunner starts and freezes the app and gathers the handler arguments; only the
        # protocol class differs, so its server is rebuilt around the same pieces.
        base = await super()._make_server()
        return EdgeServer(base.request_handler, request_factory=base.request_factory,
                          handler_cancellation=base.handler_cancellation,
                          loop=asyncio.get_running_loop(), edge=self._edge, **base._kwargs)


def make_runner(app: web.Application, config: Config, **kwargs: Any) -> EdgeRunner:
    return EdgeRunner(
        app,
        edge=edge_limits(config),
        handle_signals=False,
        access_log=None,  # aiohttp's access log would print ?token= query strings
        handler_cancellation=True,  # a client that hangs up cancels its stream at once
        keepalive_timeout=config.server.keepalive_timeout_s,
        **kwargs,
    )


@dataclass
class Listeners:
    """The public runner and the optional admin one; ``cleanup`` undoes whatever ``setup`` did,
    even when it failed half way (the app's cleanup contexts release what was created)."""

    public: EdgeRunner
    admin: EdgeRunner | None = None
    sites: list[web.TCPSite] = field(default_factory=list)
    _set_up: list[EdgeRunner] = field(default_factory=list)

    @classmethod
    def create(cls, app: web.Application, config: Config, *,
               shutdown_timeout: float = 5.0) -> Listeners:
        admin = None
        if config.admin.listen:
            admin = make_runner(build_admin_app(app[STATE]), config,
                                shutdown_timeout=shutdown_timeout)
        return cls(make_runner(app, config, shutdown_timeout=shutdown_timeout), admin)

    async def setup(self) -> None:
        """Start the app (its cleanup contexts run); nothing listens yet."""
        for runner in (self.public, self.admin):
            if runner is not None:
                self._set_up.append(runner)  # cleanup() must run even if setup() raises
                await runner.setup()

    async def start(self, config: Config, *, backlog: int = 128,
                    ssl_context: ssl.SSLContext | None = None) -> None:
        """Listen on the public port (TLS with ``ssl_context``), then the admin port; OSError
        if either is taken."""
        site = web.TCPSite(self.public, config.server.host, config.server.port,
                           backlog=backlog, reuse_address=True, ssl_context=ssl_context)
        await site.start()
        self.sites.append(site)
        if self.admin is not None:
            host, port = parse_listen(config.admin.listen)
            admin_site = web.TCPSite(self.admin, host, port, reuse_address=True)
            await admin_site.start()
            self.sites.append(admin_site)

    async def cleanup(self) -> None:
        # Admin first: it shares the public app's state, which the public cleanup releases.
        for runner in reversed(self._set_up):
            await runner.cleanup()
        self._set_up.clear()
