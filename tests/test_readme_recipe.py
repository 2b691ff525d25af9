"""The README's "In a second terminal" block, extracted from README.md and run as written with
bash, against a relay started from the embedded default config in a fresh folder.

The folder holds a copy of config.toml and a link to the venv, so the recipe's relative paths
(``.venv/bin/relay``, ``state/token``) mean what they mean in a fresh clone; the relay's port and
the host service's port come from the ``RELAY`` and ``HOST_PORT`` variables the recipe reads.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import time
from pathlib import Path

from tests.harness import PYTHON, REPO, free_port

HEADING = "### In a second terminal"


def recipe() -> str:
    text = (REPO / "README.md").read_text()
    after = text[text.index(HEADING) + len(HEADING):]
    match = re.search(r"^```sh\n(.*?)^```", after, re.S | re.M)
    assert match, f"no ```sh block after {HEADING!r}"
    return match.group(1)


def wait_listening(port: int, proc: subprocess.Popen[bytes], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, "the relay exited"
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            assert time.monotonic() < deadline, "the relay did not listen"
            time.sleep(0.1)


def refused(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return False
    except OSError:
        return True


def processes_in(folder: Path) -> list[int]:
    """Processes whose working folder is ``folder`` (what the recipe started, if left behind)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if Path(os.readlink(entry / "cwd")) == folder:
                    found.append(int(entry.name))
            except OSError:
                continue  # gone meanwhile, or not ours to read
    return found


def test_the_recipe_block_runs_as_written_and_cleans_up(tmp_path: Path) -> None:
    block = recipe()
    assert "--token-file" in block and "--token " not in block  # no token on a command line
    shutil.copy(REPO / "config.toml", tmp_path / "config.toml")
    (tmp_path / ".venv").symlink_to(Path(PYTHON).parent.parent)
    relay_port, host_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    relay = subprocess.Popen(
        [".venv/bin/relay", "serve", "--config", "config.toml"], cwd=tmp_path,
        env={**env, "RELAY_SERVER_PORT": str(relay_port)},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        wait_listening(relay_port, relay)
        assert not (tmp_path / "state" / "token").exists()  # fresh state folder
        # Output to files, not pipes: a background job the recipe forgot to stop would hold a
        # pipe open and turn a clear failure into a timeout.
        with open(tmp_path / "out", "w") as out, open(tmp_path / "err", "w") as err:
            returncode = subprocess.run(
                ["bash", "-c", block], cwd=tmp_path, stdout=out, stderr=err, timeout=60,
                env={**env, "RELAY": f"http://127.0.0.1:{relay_port}",
                     "HOST_PORT": str(host_port)},
                check=False,
            ).returncode
        stdout, stderr = (tmp_path / "out").read_text(), (tmp_path / "err").read_text()
        assert returncode == 0, (stdout, stderr)
        assert stdout.strip().endswith('{"hello": "from the host service"}'), stdout
        assert "Traceback" not in stderr
    finally:
        relay.send_signal(signal.SIGTERM)
        relay.wait(timeout=30)
    token = tmp_path / "state" / "token"
    assert stat.S_IMODE(token.stat().st_mode) == 0o600
    # The clean-up ran: the host service no longer listens, and nothing the recipe started
    # (agent, devhost) is still running in the folder.
    folder = tmp_path.resolve()
    deadline = time.monotonic() + 10
    try:
        while not refused(host_port) or processes_in(folder):
            assert time.monotonic() < deadline, f"left running: {processes_in(folder)}"
            time.sleep(0.1)
    finally:
        for pid in processes_in(folder):  # only what this test's recipe started
            os.kill(pid, signal.SIGKILL)
