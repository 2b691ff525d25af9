"""Process lifecycle around the app: systemd notifications, watchdog, and SIGHUP reload."""

from __future__ import annotations

import asyncio
import dataclasses

import structlog

from relay.auth.tokens import build_verifier
from relay.config import load_config
from relay.errors import ConfigError
from relay.logs import set_level
from relay.server.state import RelayState
from relay.systemd import Notifier, WatchdogFeeder, watchdog_interval

log = structlog.get_logger("relay.server")

# Keys a reload applies in place; any other change needs a restart.
RELOADABLE = frozenset({
    "log.level", "access.allow_ttl_s", "access.deny_ttl_s", "auth.jwks_url",
    "auth.public_key_file", "auth.jwks_cache_s", "auth.jwks_refresh_min_interval_s",
    "admin.secret", "server.drain_grace_s",
})


def changed_keys(old: object, new: object) -> list[str]:
    keys = []
    for section in ("server", "auth", "access", "tunnel", "directory", "admin", "log"):
        a, b = dataclasses.asdict(getattr(old, section)), dataclasses.asdict(getattr(new, section))
        # instance_id and advertise_url get generated defaults; compare what the file says.
        keys += [f"{section}.{k}" for k in a if a[k] != b[k]
                 and f"{section}.{k}" not in {"directory.instance_id"}]
    return keys


class Lifecycle:
    def __init__(self, state: RelayState, config_path: str | None) -> None:
        self.state = state
        self.config_path = config_path
        self._tasks: set[asyncio.Task[None]] = set()
        self.notifier = Notifier.from_env()
        self.feeder = WatchdogFeeder(
            self.notifier, watchdog_interval(), healthy=self.healthy,
            max_loop_lag_s=2.0, status_text=self.status_text, name="relay-watchdog",
        )
        state.notifier = self.notifier

    def healthy(self) -> bool:
        # The feeder itself withholds pings while the loop is unresponsive; a relay whose
        # directory is down still serves its own tunnels, and a restart would not fix Redis.
        return True

    def status_text(self) -> str:
        state = self.state
        mode = "draining" if state.draining else "serving"
        return f"{mode}; {len(state.registry)} tunnels; {state.inflight_http} requests in flight"

    def started(self) -> None:
        self.notifier.ready()
        self.notifier.status(self.status_text())
        self.feeder.start()

    def stopping(self) -> None:
        self.notifier.stopping()
        self.notifier.status(self.status_text())

    def request_reload(self) -> None:
        task = asyncio.ensure_future(self.reload())
        task.set_name("relay-reload")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def reload(self) -> None:
        state = self.state
        self.notifier.reloading()
        try:
            new = load_config(self.config_path)
        except ConfigError as exc:
            log.error("relay.reload_failed", error=str(exc))
            return
        finally:
            self.notifier.ready()
        old = state.config
        new = dataclasses.replace(new, directory=dataclasses.replace(
            new.directory, instance_id=old.directory.instance_id))
        changed = changed_keys(old, new)
        applied = [k for k in changed if k in RELOADABLE]
        needs_restart = [k for k in changed if k not in RELOADABLE]
        if "log.level" in changed:
            set_level(new.log.level)
        if state.access is not None and (
            "access.allow_ttl_s" in changed or "access.deny_ttl_s" in changed
        ):
            state.access.update_ttls(new.access.allow_ttl_s, new.access.deny_ttl_s)
        # Keep the unreloadable parts as they were so the running process stays coherent.
        merged = dataclasses.replace(
            old,
            log=dataclasses.replace(old.log, level=new.log.level),
            access=dataclasses.replace(old.access, allow_ttl_s=new.access.allow_ttl_s,
                                       deny_ttl_s=new.access.deny_ttl_s),
            admin=new.admin,
            server=dataclasses.replace(old.server, drain_grace_s=new.server.drain_grace_s),
            auth=dataclasses.replace(
                old.auth, jwks_url=new.auth.jwks_url, public_key_file=new.auth.public_key_file,
                jwks_cache_s=new.auth.jwks_cache_s,
                jwks_refresh_min_interval_s=new.auth.jwks_refresh_min_interval_s),
        )
        state.config = merged
        if state.verifier is not None:
            try:
                if any(k.startswith("auth.") for k in applied):
                    fresh = build_verifier(merged, state.client, state.metrics)
                    await state.verifier.reload_keys(fresh.key_source)
                else:
                    await state.verifier.reload_keys()  # key files may have changed in place
            except (ConfigError, OSError, ValueError) as exc:
                log.error("relay.reload_keys_failed", error=str(exc))
        log.info("relay.reloaded", applied=applied, needs_restart=needs_restart)

    async def close(self) -> None:
        await self.feeder.stop()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=2)
