"""Structured logging: JSON for journald, console for humans, and no token ever written.

Every event passes a redaction processor that replaces anything shaped like a JWT (or a
``token=`` query parameter) before rendering, so a token cannot reach a log line even through
an exception message or a URL someone logged by mistake.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from collections.abc import MutableMapping
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


class AccessLog:
    """One line per proxied exchange, written without structlog's processor chain.

    The access line is the only event logged per request; through the chain (contextvars,
    level, logger name, timestamp, redaction, stdlib record, formatter, renderer) it roughly
    doubled the relay's CPU per small request. This writes the same JSON fields straight to
    the handler ``setup_logging`` installed, redacted the same way. Console format (humans,
    low volume) keeps the full chain.
    """

    __slots__ = ("_direct", "_fallback", "_handler", "_logger", "_name", "_second",
                 "_second_text")

    def __init__(self, name: str) -> None:
        self._name = name
        self._logger = logging.getLogger(name)
        self._fallback = structlog.get_logger(name)
        self._handler: logging.StreamHandler[TextIO] | None = None
        self._direct = False
        self._second = -1
        self._second_text = ""

    def _configure(self, handler: logging.StreamHandler[TextIO] | None, direct: bool) -> None:
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

    def info(self, event: str, **fields: Any) -> None:
        handler = self._handler
        if not self._logger.isEnabledFor(logging.INFO):
            return
        if not self._direct or handler is None:
            self._fallback.info(event, **fields)
            return
        for key, value in fields.items():
            if isinstance(value, str):
                fields[key] = redact_text(value)
        fields["event"] = event
        fields["level"] = "info"
        fields["logger"] = self._name
        fields["timestamp"] = self._timestamp()
        line = json.dumps(fields) + "\n"
        handler.acquire()
        try:
            stream = handler.stream
            stream.write(line)
            stream.flush()
        except Exception:  # a closed or broken log stream must never fail a request
            handler.handleError(logging.makeLogRecord({"msg": event}))
        finally:
            handler.release()


_ACCESS_LOGS: dict[str, AccessLog] = {}
_CURRENT: tuple[logging.StreamHandler[TextIO] | None, bool] = (None, False)


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
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in list(root.handlers):
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
