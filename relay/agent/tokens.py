"""Where the agent's bearer token comes from: a flag, a file re-read per connect, or a command."""

from __future__ import annotations

import asyncio
import contextlib
import shlex
import time
from pathlib import Path

import jwt
import structlog

log = structlog.get_logger("relay.agent")

COMMAND_TIMEOUT_S = 30.0
MAX_TOKEN_BYTES = 16384


def unverified_expiry(token: str) -> int | None:
    """The token's ``exp`` claim, read without checking the signature (the agent has no key).

    Only for explaining a 4401 to the operator; never for deciding anything.
    """
    try:
        claims = jwt.decode(token, options={"verify_signature": False, "verify_exp": False})
    except jwt.PyJWTError:
        return None
    exp = claims.get("exp")
    return exp if isinstance(exp, int) and not isinstance(exp, bool) else None


def expiry_hint(token: str, source: str, now: float | None = None) -> dict[str, object] | None:
    """Log fields explaining a 4401 when the token has expired, else None."""
    exp = unverified_expiry(token)
    now = time.time() if now is None else now
    if exp is None or exp > now:
        return None
    if source == "flag":
        how = ("a --token never changes: use --token-file (rewritten by whatever renews it) or "
               "--token-command (run on every connect), or mint a longer-lived token "
               "(relay token --ttl SECONDS)")
    else:
        how = (f"the token from the {source.split(' ')[0]} is stale: renew it there, or mint a "
               "longer-lived one (relay token --ttl SECONDS)")
    return {
        "exp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(exp)),
        "expired_s_ago": int(now - exp),
        "hint": how,
    }


class TokenUnavailable(Exception):
    """No token could be obtained right now; the agent retries with backoff."""


class TokenSource:
    def __init__(self, *, token: str | None = None, file: str | None = None,
                 command: str | None = None) -> None:
        given = [v for v in (token, file, command) if v]
        if len(given) != 1:
            raise ValueError("exactly one of --token, --token-file or --token-command is required")
        self._token, self._file, self._command = token, file, command

    def describe(self) -> str:
        if self._file:
            return f"file {self._file}"
        if self._command:
            return "command"
        return "flag"

    async def get(self) -> str:
        """A token for the next connect: files and commands are read afresh every time."""
        if self._token:
            return self._token
        if self._file:
            return self._read_file(Path(self._file))
        assert self._command is not None
        return await self._run_command(self._command)

    @staticmethod
    def _read_file(path: Path) -> str:
        try:
            raw = path.read_bytes()[:MAX_TOKEN_BYTES]
        except OSError as exc:
            raise TokenUnavailable(f"cannot read token file {path}: {exc.strerror}") from None
        token = raw.decode(errors="replace").strip()
        if not token:
            raise TokenUnavailable(f"token file {path} is empty")
        return token

    @staticmethod
    async def _run_command(command: str) -> str:
        try:
            proc = await asyncio.create_subprocess_exec(
                *shlex.split(command),
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
        except OSError as exc:
            raise TokenUnavailable(f"cannot run token command: {exc.strerror}") from None
        try:
            stdout, _ = await asyncio.wait_for(proc.communicate(), COMMAND_TIMEOUT_S)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise TokenUnavailable("token command timed out") from None
        except asyncio.CancelledError:
            # The agent is stopping: do not leave the command running behind it.
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            raise
        if proc.returncode != 0:
            raise TokenUnavailable(f"token command exited with {proc.returncode}")
        token = stdout[:MAX_TOKEN_BYTES].decode(errors="replace").strip()
        if not token:
            raise TokenUnavailable("token command printed nothing")
        return token
