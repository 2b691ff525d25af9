"""In-band credential renewal (protocol v2): when `relay agent` re-reads its token source and
sends RENEW, so its tunnel is never closed for an expired token.

The agent reads ``exp`` (and ``iat``) from its own token without verifying it: it is the
agent's token, and the relay is the one that verifies. Renewal is due at 80 % of the token's
life or 60 s before ``exp``, whichever is earlier, but never in the first half of its life (a
token shorter than two minutes is not renewed the moment it arrives).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import jwt
import structlog

from relay.agent.tokens import TokenSource, TokenUnavailable
from relay.protocol.messages import Renewed

log = structlog.get_logger("relay.agent")

RENEW_FRACTION = 0.8
RENEW_MARGIN_S = 60.0
ANSWER_TIMEOUT_S = 10.0
MIN_RETRY_S = 1.0
MAX_RETRY_S = 30.0


@dataclass(frozen=True, slots=True)
class TokenLife:
    issued_at: float
    expires_at: float | None  # None: no (readable) exp, nothing to renew


def token_life(token: str, obtained_at: float) -> TokenLife:
    """``iat``/``exp`` of the agent's own token, read without verifying it."""
    try:
        claims = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError:
        return TokenLife(obtained_at, None)
    exp, iat = claims.get("exp"), claims.get("iat")
    if not isinstance(exp, int | float) or isinstance(exp, bool):
        return TokenLife(obtained_at, None)
    issued = float(iat) if isinstance(iat, int | float) and not isinstance(iat, bool) else None
    if issued is None or issued > obtained_at or issued >= exp:
        issued = min(obtained_at, float(exp))  # no usable iat: its life started when we got it
    return TokenLife(issued, float(exp))


def renew_at(life: TokenLife) -> float | None:
    """When to renew a token of this life (wall clock); None when it never expires."""
    if life.expires_at is None:
        return None
    span = life.expires_at - life.issued_at
    due = min(life.issued_at + RENEW_FRACTION * span, life.expires_at - RENEW_MARGIN_S)
    return max(due, life.issued_at + span / 2)


def retry_delay(now: float, expires_at: float | None) -> float:
    """How long to wait before trying again: a quarter of what is left, within bounds."""
    left = MAX_RETRY_S * 4 if expires_at is None else expires_at - now
    return min(MAX_RETRY_S, max(MIN_RETRY_S, left / 4))


Renew = Callable[[str], Awaitable[Renewed | None]]


async def renew_forever(
    token: str,
    tokens: TokenSource,
    renew: Renew,
    *,
    clock: Callable[[], float] = time.time,
    sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
) -> None:
    """Keep the tunnel's credential fresh until cancelled (the tunnel ends).

    ``renew(token)`` sends RENEW and returns the relay's RENEWED body (None on no answer). A
    refused renewal is a close from the relay, which ends the tunnel and cancels this.
    """
    life = token_life(token, clock())
    while True:
        due = renew_at(life)
        if due is None:
            log.info("agent.renew_not_needed", reason="token has no exp")
            return
        await sleep(max(0.0, due - clock()))
        while True:
            try:
                fresh = await tokens.get()
            except TokenUnavailable as exc:
                log.warning("agent.renew_token_unavailable", source=tokens.describe(),
                            error=str(exc))
                await sleep(retry_delay(clock(), life.expires_at))
                continue
            if fresh == token:
                if tokens.describe() == "flag":
                    log.warning("agent.renew_impossible", source="flag",
                                hint="a token given as a flag cannot be renewed; use "
                                     "--token-file or --token-command")
                    return
                left = None if life.expires_at is None else round(life.expires_at - clock(), 1)
                log.warning("agent.renew_same_token", source=tokens.describe(), expires_in_s=left)
                await sleep(retry_delay(clock(), life.expires_at))
                continue
            answer = await renew(fresh)
            if answer is not None and answer.expires_at is not None:
                token, life = fresh, token_life(fresh, clock())
                log.info("agent.renewed", expires_at=answer.expires_at)
                break
            error = answer.error_code or answer.error_message if answer else "no answer"
            log.warning("agent.renew_failed", source=tokens.describe(), error=str(error)[:200])
            wait = retry_delay(clock(), life.expires_at)
            if answer is not None:
                wait = max(wait, answer.retry_after_s)
            await sleep(wait)
