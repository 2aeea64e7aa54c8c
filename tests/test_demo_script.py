"""scripts/demo.sh cleans up after itself: its temporary directory (a few hundred MB
after a full run) is removed at the end, also when a step fails, unless asked to keep
it; either way it says where it was. The full demo is the README's; here it fails at
its first step (a testnet of 0 nodes), which runs the same exit path."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run_demo(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "TMPDIR": str(tmp_path), "IOLLM_DEMO_NODES": "0"}
    env.pop("IOLLM_DEMO_DIR", None)
    return subprocess.run(["bash", str(ROOT / "scripts/demo.sh"), *args], capture_output=True,
                          text=True, env=env, timeout=60, cwd=ROOT)


@pytest.mark.timeout(90)
def test_the_demo_removes_its_directory_unless_kept(tmp_path: Path) -> None:
    gone = run_demo(tmp_path)
    assert gone.returncode == 1 and "--nodes must be between 1 and 64" in gone.stderr
    made = gone.stdout.split("--dir ")[1].split()[0]
    assert Path(made).parent == tmp_path
    assert f"removed the demo's directory {made}" in gone.stdout, gone.stdout
    assert list(tmp_path.iterdir()) == []

    kept = run_demo(tmp_path, "--keep")
    (left,) = tmp_path.iterdir()
    assert f"the demo's files are kept in {left}" in kept.stdout, kept.stdout

    bad = run_demo(tmp_path, "--kept")
    assert bad.returncode == 2 and "unknown argument --kept" in bad.stderr
