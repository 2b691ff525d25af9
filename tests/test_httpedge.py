"""The edge's refusals for aiohttp's parser errors: status, code, and never the request bytes."""

from __future__ import annotations

import pytest
from aiohttp.http_exceptions import (
    BadHttpMessage,
    BadHttpMethod,
    BadStatusLine,
    InvalidHeader,
    InvalidURLError,
    LineTooLong,
    TransferEncodingError,
)

from relay.server.httpedge import MAX_REQUEST_LINE_BYTES, EdgeLimits, raw_response, refusal_for

SECRET = "eyJhbGciOi.secret-token.bytes"
LIMITS = EdgeLimits(max_header_bytes=16384)


@pytest.mark.parametrize(("exc", "status", "code"), [
    (LineTooLong(SECRET.encode(), 16384), 431, "headers_too_large"),
    (LineTooLong(SECRET.encode(), MAX_REQUEST_LINE_BYTES), 414, "uri_too_long"),
    (BadHttpMessage("Too many headers received"), 431, "headers_too_large"),
    (BadHttpMethod(SECRET), 400, "bad_request"),
    (BadStatusLine(SECRET), 400, "bad_request"),
    (InvalidURLError(f"Invalid URL:\n\n  {SECRET!r}"), 400, "bad_request"),
    (InvalidHeader(SECRET.encode()), 400, "bad_request"),
    (TransferEncodingError(f"Invalid character in chunk size:\n\n  {SECRET}"), 400,
     "bad_request"),
    (BadHttpMessage(SECRET), 400, "bad_request"),
    (None, 400, "bad_request"),
])
def test_each_parser_error_maps_to_our_refusal(exc: Exception | None, status: int,
                                               code: str) -> None:
    error = refusal_for(exc, LIMITS)
    assert (error.status, str(error.code)) == (status, code)
    assert "secret" not in error.message and SECRET not in raw_response(error).decode()


def test_llhttp_descriptions_are_kept_without_the_bytes() -> None:
    error = refusal_for(TransferEncodingError(f"Invalid character in chunk size:\n\n  b'{SECRET}'"),
                        LIMITS)
    assert error.message == "malformed request: Invalid character in chunk size"


def test_a_raw_answer_is_complete_and_closes() -> None:
    answer = raw_response(refusal_for(None, LIMITS))
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert b"Connection: close" in head and f"Content-Length: {len(body)}".encode() in head
