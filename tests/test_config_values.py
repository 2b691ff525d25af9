"""Config values that are a closed set load as their enum, in any case the operator wrote."""

from __future__ import annotations

from pathlib import Path

import pytest

from relay.config import LogLevel, load_config
from relay.errors import ConfigError
from tests.harness import write_config


@pytest.mark.parametrize("written", ["warning", "WARNING", "Warning"])
def test_log_level_in_any_case_is_the_level(tmp_path: Path, written: str) -> None:
    config = load_config(write_config(tmp_path, {"log": {"level": written}}), env={})
    assert config.log.level is LogLevel.WARNING


def test_log_level_from_the_environment(tmp_path: Path) -> None:
    config = load_config(write_config(tmp_path, {}), env={"RELAY_LOG_LEVEL": "Debug"})
    assert config.log.level is LogLevel.DEBUG


def test_an_unknown_log_level_names_the_levels_there_are(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as refused:
        load_config(write_config(tmp_path, {"log": {"level": "loud"}}), env={})
    message = str(refused.value)
    assert "log.level" in message and "'loud'" in message
    assert all(level.value in message for level in LogLevel)
