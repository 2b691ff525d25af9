"""``make demo`` as a person (or a CI log) sees it: real processes, plain text off a terminal."""

from __future__ import annotations

import os
import subprocess

from relay.demo import use_colour
from tests.harness import PYTHON, REPO


def test_demo_runs_and_prints_no_escapes_when_not_on_a_terminal() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    env.pop("NO_COLOR", None)
    result = subprocess.run([PYTHON, "-m", "relay.demo"], cwd=str(REPO), env=env,
                            stdin=subprocess.DEVNULL, capture_output=True, text=True,
                            timeout=90, check=False)
    assert result.returncode == 0, (result.stdout, result.stderr)
    out = result.stdout
    assert "\x1b" not in out  # piped: no colour escapes
    assert "==> done" in out
    assert "/hosts/acme:demo-laptop/page?token=" in out  # the URL to open in a browser
    assert "GET /page -> 200 text/html: 'devhost page'" in out
    assert "GET /etag with If-None-Match -> 304" in out
    assert "--token-file" in out and "Traceback" not in result.stderr


def test_colour_only_on_a_terminal_and_never_with_no_color(tmp_path: object) -> None:
    leader, follower = os.openpty()
    try:
        with os.fdopen(follower, "w", closefd=False) as tty:
            assert use_colour(tty, {}) is True
            assert use_colour(tty, {"NO_COLOR": "1"}) is False
            assert use_colour(tty, {"NO_COLOR": ""}) is True  # set but empty does not count
    finally:
        os.close(leader)
        os.close(follower)
    with open(os.devnull, "w") as not_a_tty:
        assert use_colour(not_a_tty, {}) is False
