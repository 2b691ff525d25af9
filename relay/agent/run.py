"""Run the agent as a process: signals, systemd notifications and the watchdog."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal

import structlog

from relay.agent.backoff import Backoff
from relay.agent.client import Agent, AgentOptions
from relay.agent.tokens import TokenSource
from relay.agent.upstream import parse_origin
from relay.auth.hostid import parse_host_id
from relay.errors import InvalidHost
from relay.tracing import ENV_SERVICE_NAME, Tracing, TracingSettings

log = structlog.get_logger("relay.agent")


async def run_agent(args: argparse.Namespace) -> int:
    try:
        parse_host_id(args.host_id)
    except InvalidHost as exc:
        log.error("agent.bad_host_id", error=exc.message)
        return 2
    tokens = TokenSource(token=args.token, file=args.token_file, command=args.token_command)
    options = AgentOptions(relay_url=args.relay, host_id=args.host_id, upstream=args.upstream,
                           backoff_cap_s=args.backoff_cap, ca_file=args.ca_file)
    tracing = agent_tracing(args.otlp_endpoint)
    try:
        parse_origin(args.upstream)  # checked now: the agent only builds its client later
        agent = Agent(options, tokens, backoff=Backoff(cap=args.backoff_cap), tracing=tracing)
    except ValueError as exc:
        log.error("agent.bad_option", error=str(exc))
        if tracing is not None:
            await tracing.shutdown(timeout_s=1.0)
        return 2
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    from relay.systemd import Notifier, WatchdogFeeder, watchdog_interval

    notifier = Notifier.from_env()
    interval = watchdog_interval()
    feeder = None
    if interval is not None:
        feeder = WatchdogFeeder(notifier, interval, healthy=agent.healthy,
                                max_loop_lag_s=max(1.0, interval / 2),
                                status_text=agent.status_text)
        feeder.start()

    async def announce_ready() -> None:
        await agent.first_attempt_done.wait()
        notifier.ready()
        notifier.status(agent.status_text())

    ready_task = asyncio.ensure_future(announce_ready())
    ready_task.set_name("agent-ready")
    log.info("agent.starting", relay=args.relay, host_id=args.host_id, upstream=args.upstream,
             token_source=tokens.describe())
    try:
        await agent.run(stop)
    finally:
        notifier.stopping()
        ready_task.cancel()
        with contextlib.suppress(BaseException):
            await ready_task
        if feeder is not None:
            await feeder.stop()
        if tracing is not None:
            await tracing.shutdown(timeout_s=3.0)
            if tracing.dropped:
                log.warning("agent.trace_spans_dropped", count=tracing.dropped)
    return 0


def agent_tracing(endpoint: str) -> Tracing | None:
    """The agent's tracing (service name from $OTEL_SERVICE_NAME, default relay-agent)."""
    if not endpoint:
        return None
    return Tracing(TracingSettings(endpoint=endpoint,
                                   service_name=os.environ.get(ENV_SERVICE_NAME) or "relay-agent"))
