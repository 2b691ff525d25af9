"""Process lifecycle around the app: systemd notifications, watchdog, and SIGHUP reload."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

import structlog

from relay.aio import TaskGroup
from relay.auth.tokens import build_verifier
from relay.config import SECTIONS as CONFIG_SECTIONS
from relay.config import Config, load_config
from relay.errors import ConfigError
from relay.logs import set_level
from relay.server.state import RelayState
from relay.server.tls import reload_tls
from relay.systemd import Notifier, WatchdogFeeder, watchdog_interval

log = structlog.get_logger("relay.server")

# Keys a reload applies in place; any other change needs a restart. Each of these is read from
# ``state.config`` at the moment it is used (or pushed to its owner by ``Lifecycle.reload``).
RELOADABLE = frozenset({
    "log.level", "log.access_log",
    "access.allow_ttl_s", "access.deny_ttl_s",
    "auth.jwks_url", "auth.public_key_file", "auth.jwks_cache_s",
    "auth.jwks_refresh_min_interval_s",
    "admin.secret",
    "server.drain_grace_s",
    "tunnel.request_timeout_s", "tunnel.open_timeout_s",
    # Only while the relay serves TLS: it cannot start or stop serving it in place.
    "server.tls_cert_file", "server.tls_key_file",
})
TLS_KEYS = ("server.tls_cert_file", "server.tls_key_file")
SECTIONS = tuple(CONFIG_SECTIONS)
# Filled in with generated defaults when the file leaves them empty; compare what the file says.
_GENERATED = frozenset({"directory.instance_id"})


def changed_keys(old: Config, new: Config) -> list[str]:
    keys = []
    for section in SECTIONS:
        a, b = dataclasses.asdict(getattr(old, section)), dataclasses.asdict(getattr(new, section))
        keys += [f"{section}.{k}" for k in a if a[k] != b[k] and f"{section}.{k}" not in _GENERATED]
    return keys


def merge(old: Config, new: Config, keys: list[str]) -> Config:
    """``old`` with the values of ``keys`` (``section.key``) taken from ``new``."""
    updates: dict[str, dict[str, Any]] = {}
    for key in keys:
        section, name = key.split(".", 1)
        updates.setdefault(section, {})[name] = getattr(getattr(new, section), name)
    return dataclasses.replace(old, **{
        section: dataclasses.replace(getattr(old, section), **values)
        for section, values in updates.items()
    })


class Lifecycle:
    def __init__(self, state: RelayState, config_path: str | None) -> None:
        self.state = state
        self.config_path = config_path
        self._tasks = TaskGroup("relay-reload")
        self._reload_lock = asyncio.Lock()
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
        self._tasks.spawn(self.reload())

    async def reload(self) -> None:
        """Re-read the config file; apply the RELOADABLE keys, report the others (SIGHUP)."""
        async with self._reload_lock:  # two quick SIGHUPs apply one after the other
            self.notifier.reloading()
            try:
                await self._reload()
            finally:
                self.notifier.ready()
                self.notifier.status(self.status_text())

    async def _reload(self) -> None:
        state = self.state
        try:
            new = load_config(self.config_path)
        except ConfigError as exc:
            log.error("relay.reload_failed", error=str(exc))
            return
        except Exception as exc:  # e.g. a file that is not UTF-8: still keep running
            log.error("relay.reload_failed", error=f"{self.config_path}: {exc}")
            return
        old = state.config
        changed = changed_keys(old, new)
        applied = [k for k in changed if k in RELOADABLE]
        needs_restart = [k for k in changed if k not in RELOADABLE]
        if state.tls is None or not new.server.tls_cert_file:
            needs_restart += [k for k in applied if k in TLS_KEYS]
            applied = [k for k in applied if k not in TLS_KEYS]
        merged = merge(old, new, applied)
        failed: list[str] = []
        # Certificates are re-read on every reload: renewal tools rewrite them in place.
        if state.tls is not None and not reload_tls(state.tls, merged):
            failed += [k for k in applied if k in TLS_KEYS]
            applied = [k for k in applied if k not in TLS_KEYS]
            merged = merge(merged, old, failed)
        if state.verifier is not None:
            auth_keys = [k for k in applied if k.startswith("auth.")]
            try:
                if auth_keys:
                    fresh = build_verifier(merged, state.client, state.metrics)
                    await state.verifier.reload_keys(fresh.key_source)
                else:
                    await state.verifier.reload_keys()  # key files may have changed in place
            except Exception as exc:  # the old keys stay in use; so do the old auth settings
                log.error("relay.reload_keys_failed", error=str(exc) or type(exc).__name__)
                failed += auth_keys
                applied = [k for k in applied if k not in failed]
                merged = merge(merged, old, failed)
        if "log.level" in applied:
            set_level(new.log.level)
        if state.access is not None and (
            "access.allow_ttl_s" in applied or "access.deny_ttl_s" in applied
        ):
            state.access.update_ttls(new.access.allow_ttl_s, new.access.deny_ttl_s)
        state.config = merged
        log.info("relay.reloaded", applied=applied, needs_restart=needs_restart, failed=failed)
        if needs_restart:
            log.warning("relay.restart_required", keys=needs_restart)

    async def close(self) -> None:
        await self.feeder.stop()
        await self._tasks.cancel(timeout=2)
