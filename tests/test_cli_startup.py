"""A CLI command that only talks to the daemon must not load the daemon's code.

Every ``iollm`` call used to cost about 1.4 s of CPU before it did anything, importing
torch, py-libp2p and trio through the ledger and API modules. Commands that only call
the node's API now import the standard-library client (node/api/client.py) and their own
formatting. This checks what a command loaded (sys.modules after it ran, in a fresh
interpreter), which fails on the first eager import and does not depend on the machine's
speed; ``bench/cli_startup.py`` measures the time.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

# Modules that only the daemon or a torch child process needs; any of them in a
# daemon-only command's sys.modules costs 0.1-1 s of start-up.
HEAVY = ("torch", "numpy", "libp2p", "multiaddr", "trio", "h11", "prometheus_client",
         "aiosqlite", "safetensors", "node.p2p", "node.chain", "node.daemon", "node.ml",
         "node.api.server")

# Torch-free by design: the architectures and sizes `model init` offers, which the
# parser lists as choices (node/ml/catalog.py), and the package that holds it.
LIGHT = ("node.ml", "node.ml.catalog")

# Each command that only talks to a running node, as a user types it.
DAEMON_ONLY = [
    ["status"], ["peers"], ["gpus", "--min-vram", "8"], ["model", "list"],
    ["dataset", "list"], ["model", "show", "ab" * 8], ["job", "list"],
    ["job", "status", "ab" * 8], ["receipts"], ["ledger", "balance", "--all"],
    ["ledger", "blocks"], ["ledger", "status"], ["revenue", "record", "ab" * 8, "5"],
]

_PROBE = """
import json, sys
from node.cli.app import main
rc = main(sys.argv[1:])
heavy = sorted({m for m in sys.modules for h in json.loads(HEAVY)
                if (m == h or m.startswith(h + ".")) and m not in json.loads(LIGHT)})
print("LOADED " + json.dumps(heavy), file=sys.stderr)
sys.exit(rc)
"""


def run_probed(*argv: str, timeout: float = 60) -> tuple[subprocess.CompletedProcess[str],
                                                         list[str]]:
    """Run ``iollm ARGV`` in a fresh interpreter; its result and the heavy modules it
    loaded by the time it returned."""
    code = _PROBE.replace("HEAVY", repr(json.dumps(HEAVY))).replace(
        "LIGHT", repr(json.dumps(LIGHT)))
    proc = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True,
                          text=True, timeout=timeout)
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("LOADED ")]
    assert lines, f"iollm {' '.join(argv)} did not return:\n{proc.stdout}\n{proc.stderr}"
    return proc, json.loads(lines[-1][len("LOADED "):])


@pytest.mark.timeout(60)
@pytest.mark.parametrize("argv", DAEMON_ONLY, ids=lambda a: " ".join(a[:2]))
def test_daemon_only_commands_load_no_daemon_code(tmp_path: Path, argv: list[str]) -> None:
    # A home whose node "runs" on a port nothing listens on: the command goes all the way
    # to its API call, then fails with one line.
    home = tmp_path / "home"
    home.mkdir()
    (home / "node.json").write_text(json.dumps({"api": "http://127.0.0.1:9", "pid": 1}))
    (home / "api.token").write_text("t0ken\n")
    proc, loaded = run_probed(*argv, "--home", str(home))
    assert proc.returncode == 1
    assert "cannot reach the node" in proc.stderr
    assert loaded == [], f"iollm {' '.join(argv)} imported {loaded}"


def test_the_probe_sees_a_heavy_import(tmp_path: Path) -> None:
    # The check can fail: `ledger verify` replays the chain here, so it loads its code.
    home = tmp_path / "home"
    home.mkdir()
    proc, loaded = run_probed("ledger", "verify", "--home", str(home))
    assert proc.returncode == 1 and "follows no chain" in proc.stderr
    assert "node.chain" in loaded
