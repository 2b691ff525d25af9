"""relay.protocol.close: one way to build a close, whatever the reason's script."""

from __future__ import annotations

import pytest

from relay.protocol.close import MAX_REASON_BYTES, close_payload, fit_reason, reason_bytes


@pytest.mark.parametrize("char", ["a", "é", "€", "😀"])
def test_reasons_are_cut_by_utf8_bytes_at_a_character_boundary(char: str) -> None:
    reason = char * 200
    fitted = fit_reason(reason)
    raw = fitted.encode()
    assert len(raw) <= MAX_REASON_BYTES
    assert len(raw) > MAX_REASON_BYTES - len(char.encode())
    assert reason.startswith(fitted)


def test_a_120_byte_utf8_reason_is_kept_whole() -> None:
    reason = "é" * 60  # 120 bytes, 60 characters: fits
    assert fit_reason(reason) == reason
    assert len(reason_bytes(reason)) == 120


@pytest.mark.parametrize("observed", [None, 1005, 1006, 1015, 999, 5000, 2000])
def test_codes_that_may_not_be_sent_become_1011(observed: int | None) -> None:
    assert close_payload(observed, "x").code == 1011


@pytest.mark.parametrize("code", [1000, 1001, 1008, 1011, 3000, 4401, 4999])
def test_sendable_codes_pass(code: int) -> None:
    payload = close_payload(code, "ü" * 100)
    assert payload.code == code
    assert len(payload.reason_bytes) <= MAX_REASON_BYTES
