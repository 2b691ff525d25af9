"""Run the relay as a process: listen, report to systemd, drain on SIGTERM, reload on SIGHUP."""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import Sequence

import structlog

from relay.config import Config
from relay.server.app import Service, build_app
from relay.server.drain import drain
from relay.server.lifecycle import Lifecycle
from relay.server.listen import Listeners
from relay.server.state import STATE

log = structlog.get_logger("relay.server")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


async def serve(config: Config, *, config_path: str | None = None,
                banner: str | None = None, services: Sequence[Service] = ()) -> int:
    """Run until a stop signal. ``banner`` goes to stderr once the port is bound, not before:
    a relay that cannot listen must not first tell the user how to use it."""
    app = build_app(config, services=services)
    state = app[STATE]
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def on_stop_signal(sig: signal.Signals) -> None:
        if not stop.is_set():
            log.info("relay.signal", signal=sig.name)
            stop.set()
        elif state.draining:
            # A second SIGTERM / Ctrl-C: the operator does not want to wait for the grace.
            # In-flight exchanges are cut now; agents still get DRAIN and 4503.
            log.warning("relay.drain_forced", signal=sig.name, inflight=state.inflight_http)
            state.idle.set()

    # Handlers first: a SIGTERM during start-up must still end in a clean exit, and SIGHUP's
    # default action would kill the process.
    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, on_stop_signal, sig)
    lifecycle = Lifecycle(state, config_path)
    loop.add_signal_handler(signal.SIGHUP, lifecycle.request_reload)
    listeners = Listeners.create(app, config, shutdown_timeout=5.0)
    try:
        await listeners.setup()
        tls = state.tls.context if state.tls is not None else None
        try:
            await listeners.start(config, backlog=2048, ssl_context=tls)
        except OSError as exc:
            log.error("relay.listen_failed", host=config.server.host, port=config.server.port,
                      admin_listen=config.admin.listen or None, error=exc.strerror)
            return 1
        scheme = "https" if tls is not None else "http"
        log.info("relay.listening", url=f"{scheme}://{config.server.host}:{config.server.port}",
                 admin=f"http://{config.admin.listen}" if config.admin.listen else None,
                 auth_mode=config.auth.mode, access_backend=config.access.backend,
                 directory=config.directory.backend, instance_id=config.directory.instance_id)
        if banner:
            print(banner, file=sys.stderr, flush=True)
        lifecycle.started()
        await stop.wait()
        lifecycle.stopping()
        # The grace is read now, not at start-up: a SIGHUP may have changed it.
        await drain(state, state.config.server.drain_grace_s)
        lifecycle.notifier.status(lifecycle.status_text())  # what is left after the drain
    finally:
        await lifecycle.close()
        for sig in (*STOP_SIGNALS, signal.SIGHUP):
            loop.remove_signal_handler(sig)
        await listeners.cleanup()
    log.info("relay.stopped")
    return 0
