"""Structured logging: JSON for journald, console for humans, and no token ever written.

Every event passes a redaction processor that replaces anything shaped like a JWT (or a
``token=`` query parameter) before rendering, so a token cannot reach a log line even through
an exception message or a URL someone logged by mistake.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
import sys
import time
from collections.abc import Callable, MutableMapping
from json.encoder import encode_basestring_ascii
from typing import Any, TextIO

import structlog

# Three base64url segments, the first two starting like JSON objects ("{" -> "eyJ").
_JWT = re.compile(r"eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*")
_TOKEN_PARAM = re.compile(r"((?:^|[?&\s])(?:token|access_token|jwt)=)[^&\s\"']+", re.IGNORECASE)
_BEARER = re.compile(r"(Bearer\s+)[A-Za-z0-9._~+/=-]+", re.IGNORECASE)
REDACTED = "[redacted]"


def redact_text(text: str) -> str:
    if "ey" not in text and "oken" not in text and "earer" not in text:
        return text
    text = _JWT.sub(REDACTED, text)
    text = _TOKEN_PARAM.sub(lambda m: m.group(1) + REDACTED, text)
    return _BEARER.sub(lambda m: m.group(1) + REDACTED, text)


def _redact_value(value: Any) -> Any:
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, dict):
        return {k: _redact_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_redact_value(v) for v in value]
    return value


def redact_processor(
    _logger: Any, _name: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    for key, value in list(event_dict.items()):
        event_dict[key] = _redact_value(value)
    return event_dict


class BufferedStreamHandler(logging.StreamHandler[TextIO]):
    """The root handler: stdlib records as usual, plus access lines written in batches.

    Access lines queue here and go out in one ``write`` + ``flush`` at the end of the event
    loop iteration that produced them (or at once when ``MAX_PENDING_CHARS`` are waiting, or
    when no loop runs). Any other record first writes what is queued, so the stream keeps the
    order events happened in; ``flush`` (called by ``logging.shutdown`` at exit) does too.
    A process killed outright (SIGKILL, a crash in C) loses at most the queued lines.
    """

    MAX_PENDING_CHARS = 64 * 1024

    def __init__(self, stream: TextIO) -> None:
        super().__init__(stream)
        self._pending: list[str] = []
        self._pending_chars = 0
        # The loop a flush is scheduled on; a loop that ended before running it (tests run
        # many loops) does not stop the next one from scheduling its own.
        self._scheduled: asyncio.AbstractEventLoop | None = None

    def enqueue(self, line: str) -> None:
        """Queue one finished line (newline included)."""
        self.acquire()
        try:
            self._pending.append(line)
            self._pending_chars += len(line)
            if self._pending_chars >= self.MAX_PENDING_CHARS:
                self._write_pending()
                return
            scheduled = self._scheduled
            if scheduled is not None and scheduled.is_running():
                # Its flush is coming. Checked first: on Python 3.11 get_running_loop() costs
                # a getpid() system call.
                return
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                self._write_pending()
                return
            if self._scheduled is not loop:
                self._scheduled = loop
                loop.call_soon(self._flush_soon)
        finally:
            self.release()

    def _flush_soon(self) -> None:
        self.acquire()
        try:
            self._scheduled = None
            self._write_pending()
        finally:
            self.release()

    def _write_pending(self) -> None:
        """Write the queue in one call; the caller holds the handler's lock."""
        if not self._pending:
            return
        text = "".join(self._pending)
        self._pending.clear()
        self._pending_chars = 0
        try:
            self.stream.write(text)
            self.stream.flush()
        except Exception:  # a closed or broken log stream must never fail a request
            self.handleError(logging.makeLogRecord({"msg": "http.access"}))

    @property
    def pending_lines(self) -> int:
        return len(self._pending)

    def emit(self, record: logging.LogRecord) -> None:
        if self._pending:
            self._write_pending()
        super().emit(record)

    def flush(self) -> None:
        self.acquire()
        try:
            self._write_pending()
            super().flush()
        finally:
            self.release()


def _json_str(value: str) -> str:
    return encode_basestring_ascii(redact_text(value))


def _json_float(value: float) -> str:
    # What json.dumps writes (it allows NaN and the infinities by default).
    if value != value:
        return "NaN"
    if value in (math.inf, -math.inf):
        return "Infinity" if value > 0 else "-Infinity"
    return float.__repr__(value)


def _json_other(value: Any) -> str:
    return json.dumps(_redact_value(value))


# json.dumps' own text for the types access lines carry; anything else goes through it.
_ENCODERS: dict[type, Callable[[Any], str]] = {
    str: _json_str,
    int: int.__repr__,
    float: _json_float,
    bool: lambda value: "true" if value else "false",
    type(None): lambda _value: "null",
}


class AccessLog:
    """One line per proxied exchange, written without structlog's processor chain.

    The access line is the only event logged per request; through the chain (contextvars,
    level, logger name, timestamp, redaction, stdlib record, formatter, renderer) it roughly
    doubled the relay's CPU per small request, and ``json.dumps`` plus one ``write`` and
    ``flush`` per line still cost a quarter. This renders the same JSON text as the chain
    (same fields, same order, same separators, redacted the same way) by hand and queues it on
    the ``BufferedStreamHandler`` ``setup_logging`` installed. Console format (humans, low
    volume) keeps the full chain.
    """

    __slots__ = ("_direct", "_fallback", "_handler", "_logger", "_name", "_second",
                 "_second_text", "_tail", "_templates")

    def __init__(self, name: str) -> None:
        self._name = name
        self._logger = logging.getLogger(name)
        self._fallback = structlog.get_logger(name)
        self._handler: BufferedStreamHandler | None = None
        self._direct = False
        self._second = -1
        self._second_text = ""
        self._templates: dict[tuple[str, ...], str] = {}  # field names in order -> line
        self._tail = (f', "level": "info", "logger": {encode_basestring_ascii(name)}, '
                      '"timestamp": "')

    def _configure(self, handler: BufferedStreamHandler | None, direct: bool) -> None:
        self._handler, self._direct = handler, direct

    def enabled(self) -> bool:
        return self._logger.isEnabledFor(logging.INFO)

    def _timestamp(self) -> str:
        # The same text as structlog's TimeStamper(fmt="iso", utc=True); the date part is
        # formatted once a second.
        now = time.time()
        second = int(now)
        if second != self._second:
            self._second = second
            self._second_text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self._second_text}.{int((now - second) * 1e6):06d}Z"

    def _template(self, shape: tuple[str, ...]) -> str:
        """``{"k1": %s, ..., "event": %s`` + the fixed fields, for one ordering of keys."""
        if len(self._templates) >= 64:  # field sets are code, but keep the cache bounded
            self._templates.clear()
        text = "{" + "".join(encode_basestring_ascii(key).replace("%", "%%") + ": %s, "
                             for key in shape)
        text += '"event": %s' + self._tail.replace("%", "%%") + '%s"}\n'
        self._templates[shape] = text
        return text

    def render(self, event: str, fields: dict[str, Any]) -> str:
        """The JSON line (newline included) the structlog chain would write for this event."""
        shape = tuple(fields)
        template = self._templates.get(shape) or self._template(shape)
        encoders = _ENCODERS
        values = [encoders.get(type(value), _json_other)(value) for value in fields.values()]
        values.append(_json_str(event))
        values.append(self._timestamp())
        return template % tuple(values)

    def info(self, event: str, **fields: Any) -> None:
        handler = self._handler
        if not self._logger.isEnabledFor(logging.INFO):
            return
        if not self._direct or handler is None or (
            "level" in fields or "logger" in fields or "timestamp" in fields
        ):  # names the chain overwrites in place: let it
            self._fallback.info(event, **fields)
            return
        handler.enqueue(self.render(event, fields))


_ACCESS_LOGS: dict[str, AccessLog] = {}
_CURRENT: tuple[BufferedStreamHandler | None, bool] = (None, False)


def access_log(name: str) -> AccessLog:
    """The access log of ``name``, following whatever ``setup_logging`` configures later."""
    log = _ACCESS_LOGS.get(name)
    if log is None:
        log = _ACCESS_LOGS[name] = AccessLog(name)
        log._configure(*_CURRENT)
    return log


def setup_logging(level: str = "info", fmt: str = "json", stream: TextIO | None = None) -> None:
    """Configure structlog and the stdlib root logger (aiohttp, asyncio) alike."""
    global _CURRENT
    stream = stream or sys.stderr
    level_no = logging.getLevelName(level.upper())
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
        redact_processor,
    ]
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=stream.isatty())
    )
    structlog.configure(
        processors=[structlog.stdlib.filter_by_level, *shared,
                    structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
    )
    handler = BufferedStreamHandler(stream)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in list(root.handlers):
        old.flush()  # queued access lines belong to the stream they were logged for
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level_no)
    _CURRENT = (handler, fmt == "json")
    for access in _ACCESS_LOGS.values():
        access._configure(*_CURRENT)
    # aiohttp's own access log prints raw request lines (with ?token=); relay writes its own.
    logging.getLogger("aiohttp.access").disabled = True


def set_level(level: str) -> None:
    logging.getLogger().setLevel(logging.getLevelName(level.upper()))
