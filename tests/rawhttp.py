"""A misbehaving HTTP client as real bytes on a real socket: trickled heads, malformed requests,
bodies the relay should never read. Every wait is bounded."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from typing import Any


@dataclass
class RawResponse:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def parse_responses(data: bytes) -> list[RawResponse]:
    """Every complete response in ``data`` (interim 1xx ones included), in order."""
    out: list[RawResponse] = []
    while data:
        head, sep, rest = data.partition(b"\r\n\r\n")
        if not sep:
            break
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ")[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0")) if status >= 200 else 0
        if len(rest) < length:
            break  # not all here yet
        out.append(RawResponse(status, headers, rest[:length]))
        data = rest[length:]
    return out


class RawClient:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def connect(cls, port: int, host: str = "127.0.0.1",
                      local_addr: tuple[str, int] | None = None) -> RawClient:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(host, port, local_addr=local_addr), 5)
        return cls(reader, writer)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await asyncio.wait_for(self.writer.drain(), 5)

    async def read_until_closed(self, timeout: float = 5.0) -> bytes:
        """Everything the server sends until it closes (EOF or reset), bounded by ``timeout``."""
        chunks: list[bytes] = []
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                got = b"".join(chunks)
                raise AssertionError(f"server did not close in {timeout}s; got {got!r}")
            try:
                chunk = await asyncio.wait_for(self.reader.read(65536), left)
            except (ConnectionResetError, BrokenPipeError):
                break
            except TimeoutError:
                continue
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)

    async def read_response(self, timeout: float = 5.0) -> RawResponse:
        """One final (non-1xx) response from the stream, leaving the connection open."""
        buffer = b""
        deadline = time.monotonic() + timeout
        while True:
            final = [r for r in parse_responses(buffer) if r.status >= 200]
            if final:
                return final[0]
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no response in {timeout}s; got {buffer!r}")
            chunk = await asyncio.wait_for(self.reader.read(65536), left)
            if not chunk:
                raise AssertionError(f"closed before a response; got {buffer!r}")
            buffer += chunk

    def close(self) -> None:
        self.writer.transport.abort()
