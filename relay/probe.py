"""The relay checks itself end to end, the way an agent and a client would reach it.

Every ``probe.interval_s`` an in-process agent (the real :class:`relay.agent.client.Agent`) opens
a tunnel through ``probe.public_url`` — through the load balancer, TLS and all — for the reserved
host id ``relay-probe:<instance_id>`` (see :mod:`relay.server.probe_guard`), one request goes
through it to a tiny host service on loopback, and the tunnel is torn down. The result is the
``relay_probe_success`` gauge, ``relay_probe_duration_seconds``, one ``relay.probe_failed`` log
line with a ``reason`` per failure and ``relay.probe_ok`` at debug. The whole probe is bounded by
``probe.timeout_s`` (less than the interval), and the task is the relay's, cancelled at stop.

It lives outside relay.server because it runs an agent: the relay and the agent never import
each other, and the layers that assemble a relay (relay.cli, the tests' harness) pass
:func:`probe_services` to ``relay.server.app.build_app``.
"""

from __future__ import annotations

import asyncio
import functools
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import structlog
from aiohttp import web
from yarl import URL

from relay.agent.backoff import Backoff
from relay.agent.client import Agent, AgentOptions, client_ssl_context
from relay.agent.tokens import TokenSource, TokenUnavailable
from relay.aio import cancel_and_wait
from relay.config import Config
from relay.metrics import ProbeRun
from relay.server.app import Service
from relay.server.probe_guard import PROBE_ORG, probe_host_id
from relay.server.state import RelayState

log = structlog.get_logger("relay.probe")

ANSWER_LIMIT = 1024
STOP_TIMEOUT_S = 1.0  # then the probe agent is cancelled: a probe ends by timeout_s + 1 s


@dataclass(frozen=True, slots=True)
class ProbeResult:
    ok: bool
    reason: str
    duration_s: float


def public_http_url(public_url: str) -> URL:
    """The ``http(s)`` base a client would use for the relay agents reach at ``public_url``."""
    url = URL(public_url)
    scheme = {"ws": "http", "wss": "https"}.get(url.scheme, url.scheme)
    return url.with_scheme(scheme).with_path(url.path.rstrip("/")).with_query(None)


def _host_app() -> web.Application:
    async def answer(request: web.Request) -> web.Response:
        return web.Response(text=request.match_info["nonce"])

    app = web.Application()
    app.router.add_get("/probe/{nonce}", answer)
    return app


class Probe:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.host_id = probe_host_id(config.directory.instance_id)
        self._dev_key: Any = None
        self.ca_file = (str(config.resolve_path(config.probe.ca_file))
                        if config.probe.ca_file else None)
        self.ssl = client_ssl_context(self.ca_file)

    async def _token(self) -> str:
        config = self.config
        if config.auth.mode == "dev":
            from relay.auth.devissuer import load_or_create_dev_key, mint_token

            if self._dev_key is None:
                self._dev_key = load_or_create_dev_key(config.dev_state_path)
            # The agent claim lets it serve its host id; it calls that host with the same token.
            return mint_token(config, config.probe.subject, [PROBE_ORG],
                              ttl_s=max(300.0, config.probe.timeout_s * 2),
                              agent_hosts=[self.host_id], key=self._dev_key)
        # Re-read every time, like an agent's --token-file: the operator rotates it in place.
        return await TokenSource(file=str(config.resolve_path(config.probe.token_file))).get()

    async def check(self, host_url: str, client: aiohttp.ClientSession) -> ProbeResult:
        """One probe, bounded by ``probe.timeout_s``; never raises (but for cancellation)."""
        started = time.monotonic()
        stage = ["token"]
        try:
            async with asyncio.timeout(self.config.probe.timeout_s):
                reason = await self._attempt(host_url, client, stage)
        except TimeoutError:
            reason = f"timeout_{stage[0]}"
        except TokenUnavailable:
            reason = "token_unavailable"
        except (aiohttp.ClientError, OSError) as exc:
            reason = f"{stage[0]}_failed_{type(exc).__name__}"
        return ProbeResult(reason == "ok", reason, time.monotonic() - started)

    async def _attempt(self, host_url: str, client: aiohttp.ClientSession,
                       stage: list[str]) -> str:
        token = await self._token()
        stage[0] = "tunnel"
        options = AgentOptions(relay_url=self.config.probe.public_url, host_id=self.host_id,
                               upstream=host_url, max_streams=4, ca_file=self.ca_file)
        agent = Agent(options, TokenSource(token=token), backoff=Backoff(base=0.2, cap=1.0))
        stop = asyncio.Event()
        runner = asyncio.ensure_future(agent.run(stop))
        runner.set_name(f"relay-probe-agent:{self.host_id}")
        try:
            connected = asyncio.ensure_future(agent.connected_event.wait())
            first_done = asyncio.ensure_future(agent.first_attempt_done.wait())
            try:
                await asyncio.wait({connected, first_done, runner},
                                   return_when=asyncio.FIRST_COMPLETED)
            finally:
                await cancel_and_wait([connected, first_done])
            if not agent.connected:
                outcome = agent.last_outcome
                if outcome is None:
                    return "agent_stopped"
                if outcome.code:
                    return f"tunnel_closed_{outcome.code}"
                return outcome.reason
            stage[0] = "request"
            nonce = secrets.token_hex(8)
            url = public_http_url(self.config.probe.public_url)
            target = URL(f"{url}/hosts/{self.host_id}/probe/{nonce}", encoded=True)
            async with client.get(target, headers={"Authorization": f"Bearer {token}"},
                                  allow_redirects=False) as response:
                body = await response.content.read(ANSWER_LIMIT)
                if response.status != 200:
                    return f"http_{response.status}"
                if body != nonce.encode():
                    return "wrong_answer"
            return "ok"
        finally:
            stop.set()
            # A clean stop first (the agent closes its tunnel), then the bounded cancel.
            try:
                await asyncio.wait({runner}, timeout=STOP_TIMEOUT_S)
            finally:
                await cancel_and_wait([runner])


Sleep = Callable[[float], Awaitable[Any]]


def probe_services(config: Config, *, sleep: Sleep = asyncio.sleep) -> tuple[Service, ...]:
    """The probe as a service of the relay, when ``probe.public_url`` asks for one.

    ``sleep`` is the loop's wait between probes (tests replace it to run probes one at a time).
    """
    if not config.probe.public_url:
        return ()
    return (Service("relay-probe", functools.partial(run_probe, sleep=sleep)),)


async def run_probe(state: RelayState, *, sleep: Sleep = asyncio.sleep) -> None:
    """The probe loop: owned by the relay (``relay-probe`` task), cancelled when it stops."""
    config = state.config
    metrics = state.metrics
    metrics.probe_success.set(0)
    try:
        probe = Probe(config)
    except ValueError as exc:  # a CA file that exists but does not load
        log.error("relay.probe_failed", reason="ca_file_unusable", error=str(exc),
                  url=config.probe.public_url)
        return
    runner = web.AppRunner(_host_app(), access_log=None, handle_signals=False,
                           shutdown_timeout=1.0)
    await runner.setup()
    client = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(ssl=probe.ssl) if probe.ssl else None,
        timeout=aiohttp.ClientTimeout(total=None, connect=5), cookie_jar=aiohttp.DummyCookieJar(),
    )
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        address = runner.addresses[0]
        host_url = f"http://127.0.0.1:{address[1]}"
        log.info("relay.probe_started", url=config.probe.public_url, host_id=probe.host_id,
                 interval_s=config.probe.interval_s)
        # The relay starts listening only after its resources are up: give it a moment.
        await sleep(min(config.probe.interval_s, 1.0))
        while True:
            if not state.draining:  # a draining relay refuses tunnels by design
                try:
                    result = await probe.check(host_url, client)
                except Exception:  # a bug must not end the probing: report it, keep going
                    log.exception("relay.probe_crashed")
                    result = ProbeResult(False, "crashed", 0.0)
                record(state, result)
            await sleep(config.probe.interval_s)
    finally:
        await client.close()
        await runner.cleanup()


def record(state: RelayState, result: ProbeResult) -> None:
    metrics = state.metrics
    metrics.probe_success.set(1 if result.ok else 0)
    metrics.probe_duration_seconds.set(result.duration_s)
    metrics.probe_runs_total.labels(result=ProbeRun.OK if result.ok else ProbeRun.FAILED).inc()
    duration_ms = round(result.duration_s * 1000, 2)
    if result.ok:
        log.debug("relay.probe_ok", duration_ms=duration_ms)
    else:
        log.warning("relay.probe_failed", reason=result.reason, duration_ms=duration_ms,
                    url=state.config.probe.public_url)
