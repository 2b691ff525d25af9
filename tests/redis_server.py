"""A throwaway redis-server for tests: own port, own temp dir, stoppable, killable, restartable.

Never touches the system Redis on 6379: every instance binds 127.0.0.1 on a free port and keeps
no data on disk (``--save "" --appendonly no``), so a restart comes back empty, like a crashed
Redis without persistence.

Usage::

    from tests.redis_server import RedisServer

    async with RedisServer() as server:      # started, answers PING
        url = server.url                     # "redis://127.0.0.1:<port>/0"
        await server.kill()                  # SIGKILL (a crash); same port stays reserved
        await server.start()                 # back on the same port, empty
        await server.pause()                 # SIGSTOP: connects succeed, nothing answers
        await server.resume()                # SIGCONT: answers again, data intact
        await server.stop()                  # SIGTERM, waits for the exit
    # leaving the block stops it (if running) and removes the temp dir

or as a pytest fixture::

    @pytest.fixture
    async def redis_server():
        async with RedisServer() as server:
            yield server

Every wait is bounded (``timeout_s`` arguments); on failure the server log is in the message.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import socket
import tempfile
from asyncio.subprocess import DEVNULL
from pathlib import Path
from types import TracebackType

__all__ = ["RedisServer", "free_port"]

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer:
    """One redis-server child process on ``127.0.0.1:port``.

    ``port`` defaults to a free port chosen once, so :meth:`start` after :meth:`stop` or
    :meth:`kill` reuses it (clients configured with :attr:`url` reconnect to the new process).
    """

    def __init__(self, port: int | None = None, *, binary: str = REDIS_SERVER) -> None:
        self.port = port if port is not None else free_port()
        self.host = "127.0.0.1"
        self._binary = binary
        self._dir: Path | None = None
        self._proc: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.returncode is None

    @property
    def log_path(self) -> Path | None:
        return None if self._dir is None else self._dir / "redis.log"

    async def start(self, timeout_s: float = 5.0) -> None:
        """Start the server (no-op when running) and wait until it answers PING."""
        if self.running:
            return
        if self._dir is None:
            self._dir = Path(tempfile.mkdtemp(prefix="relay-redis-"))
        args = [
            self._binary,
            "--port", str(self.port),
            "--bind", self.host,
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self._dir),
            "--logfile", str(self.log_path),
            "--daemonize", "no",
        ]
        self._proc = proc = await asyncio.create_subprocess_exec(
            *args, stdin=DEVNULL, stdout=DEVNULL, stderr=DEVNULL
        )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while loop.time() < deadline:
            if proc.returncode is not None:
                raise RuntimeError(f"redis-server exited with {proc.returncode}: {self._log()}")
            if await self.ping(timeout_s=0.2):
                return
            await asyncio.sleep(0.02)
        await self.kill()
        raise RuntimeError(f"redis-server on port {self.port} did not answer PING: {self._log()}")

    async def stop(self, timeout_s: float = 5.0) -> None:
        """Graceful stop (SIGTERM), then SIGKILL if it has not exited within ``timeout_s``."""
        await self._signal(signal.SIGTERM, timeout_s)

    async def kill(self, timeout_s: float = 5.0) -> None:
        """Crash it (SIGKILL) and wait until the process is gone."""
        await self._signal(signal.SIGKILL, timeout_s)

    async def pause(self) -> None:
        """Freeze the process (SIGSTOP): the kernel still accepts connections, but no command
        is answered — how a hung or black-holed Redis looks to a client."""
        if self._proc is not None and self._proc.returncode is None:
            self._proc.send_signal(signal.SIGSTOP)

    async def resume(self, timeout_s: float = 5.0) -> None:
        """Unfreeze a paused server (SIGCONT) and wait until it answers PING."""
        if self._proc is None or self._proc.returncode is not None:
            return
        self._proc.send_signal(signal.SIGCONT)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while not await self.ping(timeout_s=0.2):
            if loop.time() >= deadline:
                raise RuntimeError(f"redis-server on port {self.port} did not resume")
            await asyncio.sleep(0.02)

    async def restart(self, timeout_s: float = 5.0) -> None:
        """Stop (gracefully) and start again on the same port; the data is gone."""
        await self.stop(timeout_s)
        await self.start(timeout_s)

    async def ping(self, timeout_s: float = 1.0) -> bool:
        """True when the server answers PING within ``timeout_s`` (raw RESP, no client lib)."""
        writer = None
        try:
            async with asyncio.timeout(timeout_s):
                reader, writer = await asyncio.open_connection(self.host, self.port)
                writer.write(b"*1\r\n$4\r\nPING\r\n")
                await writer.drain()
                return (await reader.readline()) == b"+PONG\r\n"
        except (OSError, TimeoutError):
            return False
        finally:
            if writer is not None:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()

    async def cleanup(self) -> None:
        """Stop the server if running and remove its temp dir."""
        await self.kill()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    async def __aenter__(self) -> RedisServer:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.cleanup()

    async def _signal(self, sig: signal.Signals, timeout_s: float) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.returncode is not None:
            return
        proc.send_signal(sig)
        if sig != signal.SIGKILL:
            proc.send_signal(signal.SIGCONT)  # a paused server only sees SIGTERM once resumed
        try:
            await asyncio.wait_for(proc.wait(), timeout_s)
        except TimeoutError:
            proc.kill()
            # SIGKILL cannot be ignored; this wait is short and bounded all the same.
            await asyncio.wait_for(proc.wait(), timeout_s)

    def _log(self) -> str:
        path = self.log_path
        if path is None or not path.exists():
            return "(no log)"
        return path.read_text(errors="replace")[-2000:]
