"""The agent: hold one tunnel to the relay, serve its streams, and never stay offline.

Reconnects with jittered exponential backoff; the relay's close code decides how (the close
code table in docs/protocol.md). A watchdog abandons a socket that has gone silent without
waiting for a close handshake, because on a black-holed TCP path that handshake never completes.
On a v2 tunnel the agent renews its token in-band before it expires (relay.agent.renewal).

The tunnel is dialled by hand (relay.tunnel.dial: the upgrade written, its 101 checked) and
served by a client TunnelSocket whose callbacks feed the session (relay.agent.relay_socket):
no aiohttp client WebSocket, reader task or queue per tunnel.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import structlog
from yarl import URL

from relay.agent.backoff import Backoff
from relay.agent.relay_socket import RelaySocket
from relay.agent.renewal import ANSWER_TIMEOUT_S, renew_forever
from relay.agent.tokens import TokenSource, TokenUnavailable, expiry_hint
from relay.agent.upstream import LocalOrigin
from relay.connect_errors import connect_error_cause, connect_error_name
from relay.errors import CloseCode
from relay.protocol import defaults
from relay.protocol.frames import HEADER_SIZE, SUPPORTED_VERSIONS
from relay.protocol.messages import Drain, Hello, Open, Renew, Renewed
from relay.tunnel.dial import HandshakeRefused, dial
from relay.tunnel.session import Channel, Role, SessionSettings, TunnelSession

if TYPE_CHECKING:
    from relay.tracing import Tracing

log = structlog.get_logger("relay.agent")

T = TypeVar("T")

CONNECT_TIMEOUT_S = 10.0
MAX_TUNNEL_FRAME = 1 << 24  # the largest tunnel.max_frame_bytes a relay may configure
# The largest WebSocket message taken from the relay; one past it is refused (1009).
MAX_MESSAGE = MAX_TUNNEL_FRAME + 64 * 1024 + HEADER_SIZE
HELLO_TIMEOUT_S = 10.0
# After a DRAIN, streams in flight get this long on the old tunnel before the agent leaves it
# (the relay closes it sooner, after its own grace period, when it is still alive to do so).
DRAIN_LINGER_S = 30.0


@dataclass(frozen=True, slots=True)
class AgentOptions:
    relay_url: str
    host_id: str
    upstream: str
    max_frame: int = defaults.MAX_FRAME
    max_ws_message: int = defaults.MAX_WS_MESSAGE
    max_streams: int = defaults.MAX_STREAMS
    backoff_base_s: float = 0.5
    backoff_cap_s: float = 30.0
    # Until the relay's HELLO says otherwise, assume the defaults for liveness.
    ping_interval_s: float = defaults.PING_INTERVAL_S
    keepalive_misses: int = defaults.KEEPALIVE_MISSES
    # Protocol versions offered in ``v``; the relay picks the highest it speaks too.
    versions: tuple[int, ...] = tuple(sorted(SUPPORTED_VERSIONS))
    ca_file: str | None = None  # trust this CA (PEM) for a wss:// relay with a private cert


def client_ssl_context(ca_file: str | None) -> ssl.SSLContext | None:
    """Verification against ``ca_file`` (system trust is the default when None)."""
    if not ca_file:
        return None
    try:
        return ssl.create_default_context(cafile=ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(f"cannot load CA file {ca_file!r}: {exc}") from None


def tunnel_url(relay_url: str, host_id: str, versions: tuple[int, ...] = (1,)) -> URL:
    url = URL(relay_url)
    if url.scheme in {"http", "https"}:
        url = url.with_scheme("wss" if url.scheme == "https" else "ws")
    if url.scheme not in {"ws", "wss"}:
        raise ValueError(f"relay URL must be ws(s):// or http(s)://, got {relay_url!r}")
    path = url.path.rstrip("/")
    if not path.endswith("/tunnel"):
        path += "/tunnel"
    offered = ",".join(str(v) for v in versions)
    return url.with_path(path).with_query({"hostId": host_id, "v": offered})


async def _unless_stopped(work: Awaitable[T], stop: asyncio.Event) -> T | None:
    """``work``'s result, or None (with ``work`` cancelled) when ``stop`` is set first."""
    task = asyncio.ensure_future(work)
    stopper = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        task.cancel()
        raise
    finally:
        stopper.cancel()
    if task.done():
        return task.result()
    task.cancel()
    await asyncio.wait({task})  # let it clean up (a token command is killed, a socket closed)
    if not task.cancelled():
        task.exception()  # finished meanwhile; we are stopping, so its result is moot
    return None


def _relay_max_frame(hello: Hello, default: int) -> int:
    """The relay decides the largest DATA frame; the agent must not send bigger ones."""
    if 1024 <= hello.max_frame <= MAX_TUNNEL_FRAME:
        return hello.max_frame
    return default


@dataclass(slots=True)
class Outcome:
    """How one connection ended, which decides the next delay."""

    code: int | None
    reason: str
    hello: bool = False
    drained: bool = False
    abandoned: bool = False
    close_reason: str = ""  # what the relay's close frame said (e.g. why a 4403)


@dataclass(slots=True)
class _Attempt:
    """One connection's state between the socket's callbacks and the loop."""

    outcome: Outcome
    hello: asyncio.Future[Hello]
    renewed: list[asyncio.Future[Renewed]] = field(default_factory=list)  # the RENEW in flight


class Agent:
    def __init__(
        self,
        options: AgentOptions,
        tokens: TokenSource,
        *,
        backoff: Backoff | None = None,
        on_state: Callable[[Agent], None] | None = None,
        tracing: Tracing | None = None,
        renew_clock: Callable[[], float] = time.time,
        renew_sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
    ) -> None:
        self.options = options
        # The in-band renewal's wall clock and wait (relay.agent.renewal): a test moves them
        # to a renewal's due time instead of waiting half a token's life.
        self._renew_clock, self._renew_sleep = renew_clock, renew_sleep
        self.tokens = tokens
        self.tracing = tracing
        self._ssl = client_ssl_context(options.ca_file)
        self.backoff = backoff or Backoff(options.backoff_base_s, options.backoff_cap_s)
        self.url = tunnel_url(options.relay_url, options.host_id, options.versions)
        self._on_state = on_state
        self.connected = False
        self.door_refusals = 0  # consecutive 4503 refusals before HELLO
        self.connects = 0
        self.attempts = 0
        self.last_progress = time.monotonic()
        self.next_attempt_at: float | None = None
        self.last_outcome: Outcome | None = None
        self.session: TunnelSession | None = None
        self._origin: LocalOrigin | None = None
        self.first_attempt_done = asyncio.Event()
        self.connected_event = asyncio.Event()

    # -- health, for the service manager -----------------------------------------------------
    def healthy(self) -> bool:
        """Up, or really trying: a wedged reconnect loop must look unhealthy to the watchdog."""
        if self.connected:
            return True
        now = time.monotonic()
        if self.next_attempt_at is not None:
            return now < self.next_attempt_at + CONNECT_TIMEOUT_S + HELLO_TIMEOUT_S
        return now - self.last_progress < self.options.backoff_cap_s + CONNECT_TIMEOUT_S * 3

    def status_text(self) -> str:
        if self.connected and self.session is not None:
            return f"connected to {self.url.host}; {len(self.session.channels)} streams"
        last = self.last_outcome
        why = (f" (last close {last.code} {last.close_reason or last.reason})"
               if last and last.code else "")
        return f"reconnecting{why}"

    def _changed(self) -> None:
        self.last_progress = time.monotonic()
        if self._on_state is not None:
            self._on_state(self)

    # -- the loop ------------------------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        # Plain HTTP exchanges go through the origin's own pooled HTTP/1.1 client
        # (relay.agent.http1) and WebSocket channels are dialled by hand; LocalOrigin owns both.
        self._origin = LocalOrigin(self.options.upstream,
                                   max_ws_message=self.options.max_ws_message,
                                   tracing=self.tracing)
        try:
            while not stop.is_set():
                outcome = await self._attempt(stop)
                self.last_outcome = outcome
                self.first_attempt_done.set()
                if stop.is_set():
                    break
                delay = self._delay_after(outcome)
                # The relay's own words ("token expired; get a fresh token and retry")
                # say more than "closed".
                log.info("agent.reconnecting", delay_s=round(delay, 2), code=outcome.code,
                         reason=outcome.close_reason or outcome.reason)
                self.next_attempt_at = time.monotonic() + delay
                self._changed()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
        finally:
            await self._origin.close()

    def _delay_after(self, outcome: Outcome) -> float:
        code = outcome.code
        if outcome.drained or code == CloseCode.DRAINING:
            if outcome.hello:
                # The relay we were on is going away: come back at once (a crowd of agents
                # still spreads a little).
                self.door_refusals = 0
                self.backoff.reset()
                return self.backoff.next_delay() / 4
            # Refused at the door by a draining relay: the first refusal reconnects at once with
            # the backoff reset (SPEC), since a balancer will likely send us elsewhere; repeated
            # refusals back off so an agent never hot-loops against a relay while it drains.
            self.door_refusals += 1
            if self.door_refusals == 1:
                self.backoff.reset()
                return self.backoff.next_delay() / 4
            return self.backoff.next_delay()
        self.door_refusals = 0
        if code == CloseCode.KEEPALIVE_MISSED or outcome.abandoned:
            if outcome.hello:
                self.backoff.reset()
            return self.backoff.next_delay()
        if code in (CloseCode.REPLACED, CloseCode.FORBIDDEN, CloseCode.BAD_REQUEST):
            return self.backoff.slow()  # retrying fast cannot fix these; do not fight
        if outcome.hello and code not in (CloseCode.UNAUTHORIZED,):
            self.backoff.reset()
        return self.backoff.next_delay()

    def _tls(self) -> ssl.SSLContext | None:
        """The context for a wss:// relay: the CA file's, or system trust (made once, since
        loading the system's certificates is not free)."""
        if self.url.scheme != "wss":
            return None
        if self._ssl is None:
            self._ssl = ssl.create_default_context()
        return self._ssl

    async def _attempt(self, stop: asyncio.Event) -> Outcome:
        self.attempts += 1
        self.next_attempt_at = None
        self._changed()
        # A token command or a connect can each take many seconds; a stop cuts them short.
        try:
            token = await _unless_stopped(self.tokens.get(), stop)
        except TokenUnavailable as exc:
            log.warning("agent.token_unavailable", error=str(exc))
            return Outcome(None, "token_unavailable")
        if token is None:
            return Outcome(None, "stopped")
        attempt = _Attempt(Outcome(None, "closed"), asyncio.get_running_loop().create_future())
        relay = RelaySocket(lambda relay: self._new_session(relay, attempt))
        try:
            opened = await _unless_stopped(asyncio.wait_for(
                dial(str(self.url), {"Authorization": f"Bearer {token}"}, relay,
                     max_message=MAX_MESSAGE + 1,  # the socket refuses a message *at* its limit
                     start=relay.start, ssl_context=self._tls()),
                CONNECT_TIMEOUT_S,
            ), stop)
        except (HandshakeRefused, OSError, TimeoutError, ValueError) as exc:
            relay.abort()  # the dial hung up already unless it had just finished
            await self._discard(relay)
            log.info("agent.connect_failed", relay=str(self.url.origin()),
                     address=f"{self.url.host}:{self.url.port}", error=connect_error_name(exc),
                     cause=connect_error_cause(exc))
            return Outcome(None, "connect_failed")
        except BaseException:
            relay.abort()  # the dial hung up already unless it had just finished
            raise
        if opened is None:
            relay.abort()  # stopped; the dial may have finished just before
            await self._discard(relay)
            return Outcome(None, "stopped")
        try:
            outcome = await self._serve(relay, attempt, stop, token)
            if outcome.code == CloseCode.UNAUTHORIZED:
                hint = expiry_hint(token, self.tokens.describe())
                if hint is not None:
                    log.warning("agent.token_expired", **hint)
            return outcome
        finally:
            self.connected = False
            self.connected_event.clear()
            self._changed()
            if not relay.closed:
                relay.abort()

    @staticmethod
    async def _discard(relay: RelaySocket) -> None:
        """A connection given up before it was served: its session (if the upgrade went through
        at all) ends with it."""
        if relay.session is not None:
            await relay.session.close(int(CloseCode.GOING_AWAY), "tunnel closed")

    def _new_session(self, relay: RelaySocket, attempt: _Attempt) -> TunnelSession:
        """The session on a socket whose upgrade just went through (called by the dial, before
        the first frame is read); its callbacks run from the socket's and the session's."""
        settings = SessionSettings(
            window=defaults.WINDOW, max_frame=self.options.max_frame,
            max_streams=self.options.max_streams,
            max_ws_message=self.options.max_ws_message,
            ping_interval_s=self.options.ping_interval_s,
            keepalive_misses=self.options.keepalive_misses,
        )
        outcome, hello = attempt.outcome, attempt.hello

        def on_hello(body: Hello) -> None:
            if not hello.done():
                hello.set_result(body)

        def on_drain(body: Drain) -> None:
            outcome.drained = True
            self.backoff.reset()
            log.info("agent.drain_received", reason=body.reason)
            # The relay's close frame often never arrives once it is going away: leave on the
            # in-band notice itself, as soon as the streams in flight are done.
            session.spawn(self._leave_drained(relay, session),
                          f"agent-drain:{self.options.host_id}")

        def on_silence() -> None:
            outcome.abandoned = True
            log.warning("agent.watchdog_abandon", silent_s=round(session.silent_for(), 1))
            relay.abort()

        def on_backlog(reason: str) -> None:
            # The relay stopped reading what we send: as dead as a silent one.
            outcome.abandoned = True
            log.warning("agent.relay_not_reading", reason=reason)
            relay.abort()

        def on_renewed(body: Renewed) -> None:
            renewed = attempt.renewed
            if renewed and not renewed[-1].done():
                renewed[-1].set_result(body)

        assert relay.socket is not None
        session = TunnelSession(relay.socket, settings, role=Role.AGENT,
                                name=self.options.host_id, on_open=self._on_open,
                                on_drain=on_drain, on_silence=on_silence, on_hello=on_hello,
                                on_backlog=on_backlog, on_renewed=on_renewed,
                                version=max(self.options.versions))
        return session

    async def _serve(self, relay: RelaySocket, attempt: _Attempt, stop: asyncio.Event,
                     token: str) -> Outcome:
        assert relay.session is not None
        session: TunnelSession = relay.session
        loop = asyncio.get_running_loop()
        outcome, hello, renewed = attempt.outcome, attempt.hello, attempt.renewed

        async def renew(fresh: str) -> Renewed | None:
            answer: asyncio.Future[Renewed] = loop.create_future()
            renewed[:] = [answer]
            session.send_renew(Renew(fresh))
            try:
                return await asyncio.wait_for(answer, ANSWER_TIMEOUT_S)
            except TimeoutError:
                return None

        stopper = asyncio.ensure_future(stop.wait())
        try:
            first: set[asyncio.Future[Any]] = {hello, relay.over, stopper}
            await asyncio.wait(first, timeout=HELLO_TIMEOUT_S, return_when=asyncio.FIRST_COMPLETED)
            if not hello.done():
                if relay.over.done() or stopper.done():
                    return await self._closed_outcome(relay, outcome)
                log.warning("agent.hello_timeout")
                outcome.abandoned = True
                outcome.reason = "hello_timeout"
                return outcome
            body = hello.result()
            outcome.hello = True
            session = self._adopt_hello(session, body)
            version = body.version
            if version not in self.options.versions:
                log.warning("agent.protocol_violation",
                            error=f"HELLO picked version {version!r}, which was not offered")
                relay.close(int(CloseCode.PROTOCOL_ERROR), b"", within=2.0)
                await relay.finish()
                outcome.reason = "protocol_violation"
                return outcome
            session.version = version
            session.start()
            if version >= 2 and body.renew:
                session.spawn(renew_forever(token, self.tokens, renew, clock=self._renew_clock,
                                            sleep=self._renew_sleep),
                              f"agent-renew:{self.options.host_id}")
            self.session = session
            self.connected = True
            self.connects += 1
            self.connected_event.set()
            self._changed()
            log.info("agent.connected", relay=str(self.url.origin()), host_id=self.options.host_id,
                     version=body.version)
            served: set[asyncio.Future[Any]] = {relay.over, stopper}
            await asyncio.wait(served, return_when=asyncio.FIRST_COMPLETED)
            if stopper.done() and not relay.over.done():
                relay.close(int(CloseCode.GOING_AWAY), b"", within=2.0)
                await relay.finish()
                outcome.reason = "stopped"
                return outcome
            return await self._closed_outcome(relay, outcome)
        finally:
            stopper.cancel()
            await session.close(int(CloseCode.GOING_AWAY), "tunnel closed")
            self.session = None

    @staticmethod
    async def _leave_drained(relay: RelaySocket, session: TunnelSession) -> None:
        await session.wait_idle(DRAIN_LINGER_S)
        log.info("agent.leaving_drained_relay", streams_left=len(session.channels))
        # No wait for the relay's answer: one going away often never sends it.
        relay.close(int(CloseCode.GOING_AWAY), b"relay draining", within=0.0)

    @staticmethod
    def _adopt_hello(session: TunnelSession, body: Hello) -> TunnelSession:
        """Take the relay's settings so both ends agree on windows, frames and when silence
        is death (HELLO was validated when decoded; missing fields are the defaults)."""
        session.settings = SessionSettings(
            window=body.window,
            max_frame=_relay_max_frame(body, session.settings.max_frame),
            max_streams=session.settings.max_streams,
            max_ws_message=min(body.max_ws_message, session.settings.max_ws_message),
            ping_interval_s=body.ping_interval_s,
            keepalive_misses=body.keepalive_misses,
        )
        return session

    @staticmethod
    async def _closed_outcome(relay: RelaySocket, outcome: Outcome) -> Outcome:
        """Nothing more is read: once our CLOSE (if we sent one) had its answer, the relay's
        code and reason (the reason says what to do, e.g. "mint an agent token")."""
        over = relay.over.done()  # not when we stopped waiting for a HELLO
        await relay.finish()
        outcome.code = relay.code() if over else None
        outcome.close_reason = relay.close_reason() if over else ""
        log.info("agent.disconnected", code=outcome.code, close_reason=outcome.close_reason,
                 abandoned=outcome.abandoned, drained=outcome.drained)
        return outcome

    def _on_open(self, channel: Channel, head: Open) -> None:
        assert self._origin is not None
        channel.session.spawn(self._origin.serve(channel, head),
                              f"agent-stream:{channel.session.name}:{channel.id}")
