"""When `relay agent` renews its token in-band, with a FakeClock and a token file."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from relay.agent.renewal import (
    TokenLife,
    renew_at,
    renew_forever,
    retry_delay,
    token_life,
)
from relay.agent.tokens import TokenSource
from relay.protocol.messages import Renewed
from tests.clock import FakeClock
from tests.harness import LogCapture

KEY = Ed25519PrivateKey.generate()


def token(iat: float | None, exp: float | None, sub: str = "agent") -> str:
    claims: dict[str, Any] = {"sub": sub}
    if iat is not None:
        claims["iat"] = int(iat)
    if exp is not None:
        claims["exp"] = int(exp)
    return jwt.encode(claims, KEY, algorithm="EdDSA")


def test_life_is_read_from_the_token_without_verifying_it() -> None:
    assert token_life(token(1000, 4600), obtained_at=1005) == TokenLife(1000.0, 4600.0)
    # No iat (or one in the future): the life starts when the agent got the token.
    assert token_life(token(None, 4600), obtained_at=1005) == TokenLife(1005.0, 4600.0)
    assert token_life(token(9000, 9600), obtained_at=1005) == TokenLife(1005.0, 9600.0)
    assert token_life(token(1000, None), obtained_at=1005).expires_at is None
    assert token_life("not a jwt", obtained_at=1005).expires_at is None


@pytest.mark.parametrize(("iat", "exp", "due"), [
    (0, 3600, 2880),  # an hour: 80 % (48 min) comes before exp - 60 s
    (0, 120, 60),  # two minutes: exp - 60 s is earlier than 80 %
    (0, 100, 50),  # shorter: never in the first half of its life
    (0, 3, 1.5),
])
def test_renewal_is_due_at_80_percent_or_a_minute_before_exp(iat: float, exp: float,
                                                             due: float) -> None:
    assert renew_at(TokenLife(iat, exp)) == due


def test_retries_come_at_a_quarter_of_what_is_left_within_bounds() -> None:
    assert retry_delay(0, 3600) == 30
    assert retry_delay(0, 20) == 5
    assert retry_delay(0, 2) == 1
    assert retry_delay(100, 50) == 1  # already expired: keep trying, the relay closes it


async def test_the_agent_rereads_its_source_and_warns_while_it_gives_the_old_token(
    tmp_path: Path,
) -> None:
    clock = FakeClock(1000.0)
    file = tmp_path / "token"
    old = token(1000, 1100)
    file.write_text(old)
    slept: list[float] = []
    sent: list[str] = []
    fresh = token(1070, 1190)

    async def sleep(seconds: float) -> None:
        slept.append(seconds)
        clock.advance(seconds)
        if len(slept) == 3:
            file.write_text(fresh)  # the token source catches up
        if len(slept) > 4:
            raise asyncio.CancelledError  # the tunnel ended

    async def renew(new: str) -> Renewed | None:
        sent.append(new)
        return Renewed(expires_at=1190)

    with LogCapture() as logs, pytest.raises(asyncio.CancelledError):
        await renew_forever(old, TokenSource(file=str(file)), renew, clock=clock, sleep=sleep)
    assert slept[0] == 50  # half of a 100 s life
    assert slept[1:3] == [12.5, 9.375]  # a quarter of what is left, twice: still the old one
    assert sent == [fresh]
    # Next: the new token's exp - 60 s (1130), from where the clock stood (1071.875).
    assert slept[3] == pytest.approx(58.125)
    out = logs.text
    # Twice before the source caught up, once more when the new token came due.
    assert out.count("agent.renew_same_token") == 3 and f"file {file}" in out


async def test_a_flag_token_cannot_be_renewed_and_says_so() -> None:
    clock = FakeClock(1000.0)
    only = token(1000, 1100)

    async def sleep(seconds: float) -> None:
        clock.advance(seconds)

    async def renew(new: str) -> Renewed | None:
        raise AssertionError("nothing to renew with")

    with LogCapture() as logs:
        await asyncio.wait_for(
            renew_forever(only, TokenSource(token=only), renew, clock=clock, sleep=sleep), 1)
    assert "agent.renew_impossible" in logs.text


async def test_a_deferred_renewal_is_retried_no_sooner_than_the_relay_asks(
    tmp_path: Path,
) -> None:
    clock = FakeClock(1000.0)
    file = tmp_path / "token"
    old, fresh = token(1000, 4600), token(3000, 6600)
    file.write_text(fresh)
    slept: list[float] = []
    answers: list[Renewed | None] = [
        Renewed(error_code="access_unavailable", retry_after_s=45), None, Renewed(expires_at=1)]

    async def sleep(seconds: float) -> None:
        slept.append(seconds)
        clock.advance(seconds)
        if len(slept) > 3:
            raise asyncio.CancelledError

    async def renew(new: str) -> Renewed | None:
        return answers.pop(0)

    with pytest.raises(asyncio.CancelledError):
        await renew_forever(old, TokenSource(file=str(file)), renew, clock=clock, sleep=sleep)
    assert slept[1] == 45  # the relay asked for 45 s; a quarter of what is left is 30 s
    assert slept[2] == 30  # no answer: a quarter of what is left, capped
    assert answers == []
