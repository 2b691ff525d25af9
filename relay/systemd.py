"""systemd's notify protocol (READY, STATUS, STOPPING, RELOADING, WATCHDOG), stdlib only.

A ``Type=notify`` unit learns that the process is up, what it is doing and that it is still
alive from datagrams the process sends to ``$NOTIFY_SOCKET`` (see ``sd_notify(3)``). Without a
watchdog, systemd can only restart a process that *exits*; a relay with a wedged event loop or an
agent that lost its tunnel and stopped reconnecting is alive but useless, so the watchdog here is
fed only while the process is actually healthy, and systemd restarts it otherwise.

How ``relay serve`` is expected to use it::

    notifier = Notifier.from_env()                     # a silent no-op outside systemd
    await site.start()                                 # listening: only now
    notifier.ready()
    feeder = WatchdogFeeder(
        notifier,
        watchdog_interval(),                           # None without WatchdogSec=
        healthy=lambda: True,                          # the loop-lag check is the health test
        max_loop_lag_s=5.0,
        status_text=lambda: f"{registry.count} tunnels; accepting",
    )
    feeder.start()
    ...                                                # on SIGTERM:
    notifier.stopping()                                # systemd shows "deactivating"
    notifier.status(f"draining: {registry.count} tunnels, {inflight} requests in flight")
    ...                                                # drain, close tunnels with 4503
    await feeder.stop()
    notifier.close()

and on SIGHUP (``ExecReload=/bin/kill -HUP $MAINPID`` in the unit; without a handler the
default action of SIGHUP kills the process): ``notifier.reloading()``, reload, then
``notifier.ready()`` again.

``relay agent`` does the same, with ``ready()`` once the first tunnel is up *or* the first
connect attempt has failed (so ``systemctl start`` does not hang while the relay is down), and
``healthy`` true only while a tunnel is open with recent inbound traffic or a reconnect is really
under way (an attempt started within the backoff ceiling plus the connect timeout). An agent whose
reconnect loop died must stop feeding the watchdog so that systemd restarts it.

The feeder's STATUS text shows in ``systemctl status``; when it withholds a ping, the reason is
appended to it, so the last status before a watchdog restart says why.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Callable, Mapping

import structlog

from relay.aio import cancel_and_wait

__all__ = ["Notifier", "WatchdogFeeder", "watchdog_interval"]

log = structlog.get_logger("relay.systemd")

# The feeder measures loop lag this many times per watchdog interval: one late wake-up in a
# whole interval says little, the worst of several catches a loop blocked most of the time.
_PROBES_PER_TICK = 4
# Without a watchdog, STATUS is still refreshed this often.
_STATUS_ONLY_TICK_S = 5.0


class Notifier:
    """Sends sd_notify datagrams to one address; every method is a no-op when it has none."""

    def __init__(self, address: str | None) -> None:
        self.address: str | None = None
        self._sock: socket.socket | None = None
        self._failure_logged = False
        if not address:
            return
        if address.startswith("@"):
            # Linux abstract namespace: systemd writes it with '@', the kernel wants a NUL.
            address = "\0" + address[1:]
        elif not address.startswith("/"):
            # e.g. "vsock:..." (systemd 254+): not ours to speak; stay silent rather than crash.
            self._log_failure(address, "unsupported NOTIFY_SOCKET address")
            return
        try:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        except OSError as exc:  # out of descriptors, or AF_UNIX filtered: run without systemd
            self._log_failure(address, str(exc))
            return
        # Never block the event loop on a slow or stuck systemd: a full queue drops the message.
        sock.setblocking(False)
        self.address, self._sock = address, sock

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> Notifier:
        # NOTIFY_SOCKET is left in the environment: child processes (the agent's token command)
        # may inherit it, but the units set NotifyAccess=main, so systemd ignores them.
        return cls(env.get("NOTIFY_SOCKET") or None)

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def send(self, **fields: object) -> bool:
        """Send ``KEY=value`` lines in one datagram; True if it was handed to the kernel."""
        if self._sock is None or self.address is None or not fields:
            return False
        # One assignment per line: a newline inside a value would forge another field.
        payload = "\n".join(
            f"{key}={str(value).replace(chr(10), ' ')}" for key, value in fields.items()
        )
        try:
            self._sock.sendto(payload.encode("utf-8"), self.address)
        except OSError as exc:  # no listener, full queue, socket gone: never fatal
            self._log_failure(self.address, str(exc))
            return False
        return True

    def ready(self) -> bool:
        return self.send(READY=1)

    def status(self, text: str) -> bool:
        return self.send(STATUS=text)

    def stopping(self) -> bool:
        return self.send(STOPPING=1)

    def reloading(self) -> bool:
        # MONOTONIC_USEC lets systemd (Type=notify-reload, 253+) match the reload it asked for.
        return self.send(RELOADING=1, MONOTONIC_USEC=time.monotonic_ns() // 1000)

    def watchdog(self) -> bool:
        return self.send(WATCHDOG=1)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _log_failure(self, address: str, error: str) -> None:
        # Once per notifier: a missing listener would otherwise log on every watchdog tick.
        if not self._failure_logged:
            self._failure_logged = True
            log.warning("systemd.notify_failed", address=address.replace("\0", "@"), error=error)


def watchdog_interval(env: Mapping[str, str] = os.environ) -> float | None:
    """Seconds between WATCHDOG=1 pings (half of WATCHDOG_USEC), or None without a watchdog."""
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    pid = env.get("WATCHDOG_PID")
    # WATCHDOG_PID names the process systemd watches; a child that inherited it must not feed.
    if pid and pid != str(os.getpid()):
        return None
    return usec / 2 / 1_000_000


class WatchdogFeeder:
    """A task that pings the watchdog only while the loop is responsive and ``healthy()`` holds.

    Each tick measures event-loop lag (how late its sleeps wake up) and sends WATCHDOG=1 only if
    the worst lag is below ``max_loop_lag_s`` and ``healthy()`` returns True; it also sends
    ``status_text()`` as STATUS when that changes. With ``interval=None`` (no WatchdogSec=) it
    only keeps STATUS current.
    """

    def __init__(
        self,
        notifier: Notifier,
        interval: float | None,
        healthy: Callable[[], bool],
        max_loop_lag_s: float,
        status_text: Callable[[], str] | None = None,
        *,
        name: str = "systemd-watchdog",
    ) -> None:
        if interval is not None and interval <= 0:
            raise ValueError("interval must be positive")
        if max_loop_lag_s <= 0:
            raise ValueError("max_loop_lag_s must be positive")
        self.notifier = notifier
        self.interval = interval
        self.healthy = healthy
        self.max_loop_lag_s = max_loop_lag_s
        self.status_text = status_text
        self.name = name
        self.last_lag_s = 0.0
        self._last_status: str | None = None
        self._withheld_reason: str | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start the feeding task (on the running loop); nothing to do outside systemd."""
        if self._task is not None or not self.notifier.enabled:
            return
        if self.interval is None and self.status_text is None:
            return
        self._task = asyncio.get_running_loop().create_task(self._run(), name=self.name)

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            await cancel_and_wait([task])

    def tick(self, lag_s: float) -> bool:
        """Decide and send one round: STATUS if changed, WATCHDOG=1 if fit. True if fed."""
        self.last_lag_s = lag_s
        reason: str | None = None
        if self.interval is not None:
            if lag_s >= self.max_loop_lag_s:
                reason = f"event loop lagged {lag_s:.1f}s"
            else:
                try:
                    ok = bool(self.healthy())
                except Exception as exc:  # a broken health check is an unhealthy process
                    log.warning("systemd.health_check_failed", error=repr(exc))
                    ok = False
                if not ok:
                    reason = "unhealthy"
        if reason != self._withheld_reason:
            if reason is None:
                log.info("systemd.watchdog_resumed")
            else:
                log.warning("systemd.watchdog_withheld", reason=reason, lag_s=round(lag_s, 3))
            self._withheld_reason = reason
        self._send_status(reason)
        return reason is None and self.interval is not None and self.notifier.watchdog()

    def _send_status(self, withheld: str | None) -> None:
        text = ""
        if self.status_text is not None:
            try:
                text = self.status_text()
            except Exception as exc:
                log.warning("systemd.status_text_failed", error=repr(exc))
                return
        if withheld is not None:
            note = f"watchdog withheld: {withheld}"
            text = f"{text}; {note}" if text else note
        if text and text != self._last_status:
            self._last_status = text
            self.notifier.status(text)

    async def _run(self) -> None:
        tick_s = self.interval if self.interval is not None else _STATUS_ONLY_TICK_S
        step = tick_s / _PROBES_PER_TICK
        self.tick(0.0)  # the loop is running us, so it is live: feed at once after READY
        while True:
            worst = 0.0
            for _ in range(_PROBES_PER_TICK):
                due = time.monotonic() + step
                await asyncio.sleep(step)
                worst = max(worst, time.monotonic() - due)
            self.tick(worst)
