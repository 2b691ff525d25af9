"""The asyncio habits every layer shares, written once: owned tasks, bounded cancellation,
single-flight calls.

Nothing here knows about tunnels or HTTP. Any task the relay or the agent starts belongs to a
:class:`TaskOwner` (or a named group of one), so shutdown and drain find their work by the group
it was started in, never by a task-name prefix, and every stop is "cancel, then wait with a
bound".
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from typing import Any, Generic, TypeVar

T = TypeVar("T")
K = TypeVar("K")

DEFAULT_CANCEL_TIMEOUT_S = 5.0


async def cancel_and_wait(
    tasks: Iterable[asyncio.Future[Any]], timeout: float = DEFAULT_CANCEL_TIMEOUT_S
) -> None:
    """Cancel ``tasks`` and wait, at most ``timeout`` seconds, until they end.

    Their errors count as seen: a pump that failed before the cancel is expected here, and
    asyncio must not report its exception as never retrieved.
    """
    tasks = list(tasks)
    for task in tasks:
        task.cancel()
    live = [t for t in tasks if not t.done()]
    if live:
        await asyncio.wait(live, timeout=timeout)
    for task in tasks:
        if task.done() and not task.cancelled():
            task.exception()


class TaskGroup:
    """A named set of owned tasks: each removes itself when it ends."""

    __slots__ = ("_tasks", "name")

    def __init__(self, name: str) -> None:
        self.name = name
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Coroutine[Any, Any, T], name: str | None = None) -> asyncio.Task[T]:
        task = asyncio.ensure_future(coro)
        task.set_name(name or self.name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def __len__(self) -> int:
        return len(self._tasks)

    def tasks(self) -> list[asyncio.Task[Any]]:
        return list(self._tasks)

    async def wait(self, timeout: float) -> bool:
        """Wait (bounded) for every task in the group to end; True when they all did."""
        live = [t for t in self._tasks if not t.done()]
        if not live:
            return True
        _, pending = await asyncio.wait(live, timeout=timeout)
        return not pending

    async def cancel(self, timeout: float = DEFAULT_CANCEL_TIMEOUT_S) -> None:
        """Cancel every task but the caller's own, and wait for them with a bound."""
        current = asyncio.current_task()
        await cancel_and_wait([t for t in self._tasks if t is not current], timeout)


class TaskOwner:
    """The task groups of one component (a relay, an agent, a tunnel)."""

    __slots__ = ("_groups",)

    def __init__(self) -> None:
        self._groups: dict[str, TaskGroup] = {}

    def group(self, name: str) -> TaskGroup:
        group = self._groups.get(name)
        if group is None:
            group = self._groups[name] = TaskGroup(name)
        return group

    def spawn(
        self, group: str, coro: Coroutine[Any, Any, T], name: str | None = None
    ) -> asyncio.Task[T]:
        return self.group(group).spawn(coro, name)

    def tasks(self) -> list[asyncio.Task[Any]]:
        return [task for group in self._groups.values() for task in group.tasks()]

    async def cancel(self, timeout: float = DEFAULT_CANCEL_TIMEOUT_S) -> None:
        current = asyncio.current_task()
        await cancel_and_wait([t for t in self.tasks() if t is not current], timeout)


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


class SingleFlight(Generic[T]):
    """At most one call of ``fetch`` in flight; concurrent callers share its result.

    A failure is shared by the callers that were waiting and is not remembered: the next call
    starts a fresh fetch.
    """

    __slots__ = ("_fetch", "_inflight")

    def __init__(self, fetch: Callable[[], Awaitable[T]]) -> None:
        self._fetch = fetch
        self._inflight: asyncio.Future[T] | None = None

    @property
    def running(self) -> bool:
        return self._inflight is not None

    def start(self) -> asyncio.Future[T]:
        """Start a call (or join the one in flight) without waiting for it: a refresh in the
        background. The future is owned here; :meth:`cancel` ends it."""
        if self._inflight is None:
            self._inflight = asyncio.ensure_future(self._run())
            # Every waiter may have been cancelled: the error is then seen here, not lost.
            self._inflight.add_done_callback(_retrieve)
        return self._inflight

    async def __call__(self) -> T:
        # shield: one caller's cancellation must not cancel the fetch the others wait for.
        return await asyncio.shield(self.start())

    async def cancel(self, timeout: float = DEFAULT_CANCEL_TIMEOUT_S) -> None:
        """Cancel the call in flight, if any, and wait for it with a bound (shutdown)."""
        inflight, self._inflight = self._inflight, None
        if inflight is not None:
            await cancel_and_wait([inflight], timeout)

    async def _run(self) -> T:
        try:
            return await self._fetch()
        finally:
            # A cancelled call may end after a newer one started: leave that one in place.
            if self._inflight is asyncio.current_task():
                self._inflight = None


class KeyedSingleFlight(Generic[K, T]):
    """At most one call in flight per key; concurrent callers for that key share its result.

    Like :class:`SingleFlight`, a failure is shared by its waiters and not remembered. A call
    can be *detached* (:meth:`detach`): it runs on for the callers already waiting, but a new
    caller for its key starts a fresh one (a revocation must not be answered by a call that
    began before it).
    """

    __slots__ = ("_inflight", "_name")

    def __init__(self, name: str) -> None:
        self._name = name
        self._inflight: dict[K, asyncio.Future[T]] = {}

    def __len__(self) -> int:
        return len(self._inflight)

    async def __call__(self, key: K, fetch: Callable[[], Awaitable[T]]) -> T:
        call = self._inflight.get(key)
        if call is None:
            call = asyncio.ensure_future(fetch())
            if isinstance(call, asyncio.Task):
                call.set_name(f"{self._name}:{key}")
            self._inflight[key] = call
            call.add_done_callback(lambda done: self._done(key, done))
        # shield: one caller's cancellation must not cancel the call the others wait for.
        return await asyncio.shield(call)

    def _done(self, key: K, call: asyncio.Future[T]) -> None:
        if self._inflight.get(key) is call:  # not detached and replaced meanwhile
            del self._inflight[key]
        _retrieve(call)

    def detach(self, matches: Callable[[K], bool]) -> None:
        for key in [key for key in self._inflight if matches(key)]:
            del self._inflight[key]

    async def cancel(self, timeout: float = DEFAULT_CANCEL_TIMEOUT_S) -> None:
        """Cancel every call in flight and wait for them with a bound (shutdown)."""
        calls = list(self._inflight.values())
        self._inflight.clear()
        await cancel_and_wait(calls, timeout)
