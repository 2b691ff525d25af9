"""The operator API under ``/admin``: list and disconnect tunnels, revoke cached access.

Behind ``admin.secret`` (a bearer secret compared in constant time). With no secret set, every
``/admin`` route answers 404, so an unconfigured relay does not even reveal the API exists.
Wrong secrets are throttled per peer address: after ``admin.max_failures`` within
``admin.failure_window_s`` that address gets 429 (with ``Retry-After``) for ``admin.lockout_s``,
the right secret included, so guessing costs time while other operators are unaffected.
"""

from __future__ import annotations

import hmac
import json
import time
from collections.abc import Awaitable, Callable

import structlog
from aiohttp import web

from relay.auth.hostid import parse_host_id
from relay.errors import (
    BadRequest,
    CloseCode,
    DirectoryUnavailable,
    NotFound,
    TooManyRequests,
    Unauthorized,
)
from relay.metrics import DisconnectReason
from relay.server.forwarded import throttle_address
from relay.server.state import STATE, RelayState
from relay.server.throttle import FailureThrottle

log = structlog.get_logger("relay.admin")

AdminHandler = Callable[[web.Request, RelayState], Awaitable[web.StreamResponse]]


def admin_throttle(state: RelayState) -> FailureThrottle:
    if state.admin_throttle is None:
        admin = state.config.admin
        state.admin_throttle = FailureThrottle(
            max_failures=admin.max_failures, window_s=admin.failure_window_s,
            lockout_s=admin.lockout_s, clock=time.monotonic,
        )
    return state.admin_throttle


def _guard(handler: AdminHandler) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def guarded(request: web.Request) -> web.StreamResponse:
        state = request.app[STATE]
        secret = state.config.admin.secret
        if not secret:
            raise NotFound()
        throttle = admin_throttle(state)
        peer = throttle_address(request, state.config.server.trust_forwarded)
        wait = throttle.retry_after(peer)
        if wait is not None:
            raise TooManyRequests("too many wrong admin secrets from this address; retry later",
                                  retry_after_s=wait)
        given = request.headers.get("Authorization", "")
        scheme, _, value = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            value.strip().encode(), secret.encode()
        ):
            lockout = throttle.failed(peer)
            if lockout is not None:
                log.warning("admin.locked_out", peer=peer, lockout_s=lockout,
                            tracked_peers=len(throttle))
                raise TooManyRequests(
                    "too many wrong admin secrets from this address; retry later",
                    retry_after_s=lockout,
                )
            log.warning("admin.unauthorized", path=request.path, peer=peer)
            raise Unauthorized("admin secret required")
        throttle.succeeded(peer)
        return await handler(request, state)

    return guarded


async def list_tunnels(request: web.Request, state: RelayState) -> web.Response:
    tunnels = sorted((t.describe() for t in state.registry), key=lambda t: t["hostId"])
    return web.json_response({
        "instanceId": state.config.directory.instance_id,
        "draining": state.draining,
        "tunnels": tunnels,
    })


async def disconnect_tunnel(request: web.Request, state: RelayState) -> web.Response:
    host_id = request.match_info["host_id"]
    tunnel = state.registry.get(host_id)
    if tunnel is None:
        raise NotFound(f"no tunnel for {host_id} on this relay")
    tunnel.close(int(CloseCode.GOING_AWAY), "disconnected by an operator",
                 label=DisconnectReason.OPERATOR)
    log.info("admin.disconnected", host_id=host_id)
    return web.json_response({"disconnected": host_id})


async def revoke(request: web.Request, state: RelayState) -> web.Response:
    try:
        body = json.loads(await request.read() or b"{}")
    except ValueError:
        raise BadRequest("body must be JSON") from None
    if not isinstance(body, dict):
        raise BadRequest("body must be a JSON object")
    sub, host = body.get("sub"), body.get("hostId")
    if not isinstance(sub, str | None) or not isinstance(host, str | None):
        raise BadRequest("sub and hostId must be strings")
    if not sub and not host:
        raise BadRequest("give sub, hostId or both")
    if host:
        host = str(parse_host_id(host))  # a typo must not "revoke" nothing and answer 200
    assert state.access is not None
    revoked = state.access.revoke(sub=sub or None, host=host or None)
    log.info("admin.revoked", sub=sub, host_id=host, entries=revoked)
    # Other relays hold their own caches: the directory fans the revocation out to them.
    if state.directory is not None:
        try:
            await state.directory.publish_revocation(sub or None, host or None)
        except DirectoryUnavailable:
            raise DirectoryUnavailable(
                "revoked on this relay, but the directory is unavailable so the other relays "
                "were not told; retry"
            ) from None
    return web.json_response({"revoked": revoked, "sub": sub, "hostId": host})


async def not_found(request: web.Request, state: RelayState) -> web.Response:
    raise NotFound()


def add_admin_routes(app: web.Application) -> None:
    app.router.add_get("/admin/tunnels", _guard(list_tunnels))
    app.router.add_delete("/admin/tunnels/{host_id}", _guard(disconnect_tunnel))
    app.router.add_post("/admin/revoke", _guard(revoke))
    app.router.add_route("*", "/admin/{tail:.*}", _guard(not_found))
