"""One daemon per node home (node/homelock.py): a second start is refused with one line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from node.homelock import LOCK_FILE, HomeLocked, hold_home
from tests.netutil import iollm
from tests.test_cli_e2e import wait_for_file


def test_a_held_home_is_refused_and_freed_on_release(tmp_path: Path) -> None:
    with hold_home(tmp_path):
        assert (tmp_path / LOCK_FILE).read_text().strip() == str(os.getpid())
        # flock belongs to the open file: a second open, even in this process, is refused.
        with pytest.raises(HomeLocked, match=rf"pid {os.getpid()}"), hold_home(tmp_path):
            pass
    with hold_home(tmp_path):  # released when the first block ended
        pass


def test_a_second_daemon_on_a_home_exits_with_one_line(tmp_path: Path) -> None:
    home = tmp_path / "home"
    iollm("init", "--home", str(home))
    start = [sys.executable, "-m", "node.cli", "node", "start", "--home", str(home),
             "--listen", "/ip4/127.0.0.1/tcp/0", "--api-port", "0"]
    first = subprocess.Popen(start, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        info = wait_for_file(home / "node.json", first, timeout=60)
        second = subprocess.run(start, capture_output=True, text=True, timeout=60)
        assert second.returncode == 1
        assert second.stderr.strip().splitlines() == [
            f"iollm: error: a daemon is already running on {home} (pid {first.pid}); stop it "
            f"first (kill {first.pid}), or use another --home"], second.stderr
        # The first daemon's node.json is still there and it still answers.
        assert json.loads((home / "node.json").read_text()) == info
        status = json.loads(iollm("status", "--json", "--home", str(home)).stdout)
        assert status["peer_id"] == info["peer_id"]
        # Killed without a chance to clean up, it leaves no lock behind.
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
        (home / "node.json").unlink()  # the killed daemon's stale file
        third = subprocess.Popen(start, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            assert wait_for_file(home / "node.json", third, timeout=60)["pid"] == third.pid
        finally:
            third.send_signal(signal.SIGTERM)
            third.communicate(timeout=30)
    finally:
        if first.poll() is None:
            first.kill()
            first.communicate(timeout=30)
