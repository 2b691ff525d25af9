"""Run the relay as a process: listen, report to systemd, drain on SIGTERM, reload on SIGHUP."""

from __future__ import annotations

import asyncio
import signal

import structlog
from aiohttp import web

from relay.config import Config
from relay.server.app import build_app, drain
from relay.server.lifecycle import Lifecycle
from relay.server.state import STATE

log = structlog.get_logger("relay.server")


async def serve(config: Config, *, config_path: str | None = None) -> int:
    app = build_app(config)
    state = app[STATE]
    runner = web.AppRunner(
        app,
        handle_signals=False,
        access_log=None,  # aiohttp's access log would print ?token= query strings
        handler_cancellation=True,  # a client that hangs up cancels its stream at once
        shutdown_timeout=5.0,
    )
    await runner.setup()
    site = web.TCPSite(runner, config.server.host, config.server.port, backlog=2048,
                       reuse_address=True)
    try:
        await site.start()
    except OSError as exc:
        log.error("relay.listen_failed", host=config.server.host, port=config.server.port,
                  error=exc.strerror)
        await runner.cleanup()
        return 1
    log.info("relay.listening", url=f"http://{config.server.host}:{config.server.port}",
             auth_mode=config.auth.mode, access_backend=config.access.backend,
             directory=config.directory.backend, instance_id=config.directory.instance_id)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    lifecycle = Lifecycle(state, config_path)
    loop.add_signal_handler(signal.SIGHUP, lifecycle.request_reload)
    lifecycle.started()
    try:
        await stop.wait()
        lifecycle.stopping()
        await drain(state, config.server.drain_grace_s)
    finally:
        await lifecycle.close()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
        await runner.cleanup()
    log.info("relay.stopped")
    return 0
