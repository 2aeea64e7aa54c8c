"""Every shell snippet of the README works as written.

Each ```sh block is preceded by a marker saying how it is tested:

    <!-- readme-snippet: cheap -->          run here, in the default suite
    <!-- readme-snippet: slow (why) -->     run here behind ``-m slow`` (it brings up its
                                            own testnet: minutes)
    <!-- readme-snippet: manual (why) -->   not runnable as written (a daemon in the
                                            foreground, addresses or files of your own, the
                                            suite itself); each of its ``iollm`` lines
                                            must still parse with the CLI's parser

A block without a marker fails the test, so a new snippet cannot go untested silently.
Snippets run with ``bash -euo pipefail`` from a scratch directory holding a link to the
repository's ``bootstrap/`` (so relative paths work as from the top directory), with
``.venv/bin`` first on PATH (as ``source scripts/setup.sh`` leaves it) and HOME in the
scratch directory.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from node.cli.app import build_parser

ROOT = Path(__file__).resolve().parent.parent
MARKER = re.compile(r"<!-- readme-snippet: (cheap|slow|manual)\b(?: \((.+?)\))? -->")
BLOCK = re.compile(r"```sh\n(.*?)```", re.S)


def snippets() -> list[tuple[str, str, int]]:
    """(kind, code, line) of every sh block; kind "" when it has no marker."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    out = []
    for m in BLOCK.finditer(text):
        before = text[:m.start()].rstrip().splitlines()[-1]
        marker = MARKER.fullmatch(before.strip())
        out.append((marker[1] if marker else "", m[1], text[:m.start()].count("\n") + 1))
    return out


def iollm_commands(code: str) -> list[list[str]]:
    """The argv of each ``iollm`` call in a snippet: continuation lines joined, comments
    dropped, calls inside ``$(...)`` included."""
    joined = code.replace("\\\n", " ")
    calls = []
    for line in joined.splitlines():
        words = shlex.split(line, comments=True)
        for i, w in enumerate(words):
            if w.lstrip("$(") == "iollm" and (i == 0 or words[i - 1].endswith("=")
                                                or w.startswith("$(")):
                argv = [a.rstrip(")") for a in words[i + 1:]]
                calls.append([a for a in argv if a])
        inner = re.findall(r"\$\(iollm ([^)]*)\)", line)
        calls += [shlex.split(c) for c in inner]
    return calls


def test_every_snippet_says_how_it_is_tested() -> None:
    found = snippets()
    assert len(found) >= 6
    unmarked = [line for kind, _, line in found if not kind]
    assert not unmarked, f"README.md sh blocks at lines {unmarked} have no readme-snippet marker"
    assert {kind for kind, _, _ in found} == {"cheap", "slow", "manual"}


def test_every_iollm_line_parses() -> None:
    parser = build_parser()
    checked = 0
    for _, code, line in snippets():
        for argv in iollm_commands(code):
            try:
                parser.parse_args(argv)
            except SystemExit as exc:
                if exc.code != 0:  # --help exits 0
                    raise AssertionError(f"README line {line}: iollm {' '.join(argv)}") from None
            checked += 1
    assert checked >= 15


def run_snippet(code: str, tmp_path: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    (tmp_path / "bootstrap").symlink_to(ROOT / "bootstrap")
    env = {**os.environ, "HOME": str(tmp_path),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("IOLLM_HOME", None)
    proc = subprocess.run(["bash", "-euo", "pipefail", "-c", code], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{code}\nexit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.mark.timeout(60)
def test_cheap_snippets_run_as_written(tmp_path: Path) -> None:
    cheap = [code for kind, code, _ in snippets() if kind == "cheap"]
    assert cheap
    for i, code in enumerate(cheap):
        (tmp_path / str(i)).mkdir()
        out = run_snippet(code, tmp_path / str(i), 50).stdout
        assert "usage: iollm" in out


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_slow_snippets_run_as_written(tmp_path: Path) -> None:
    """The walk-through: a testnet, a model trained on it, its receipts and balances."""
    slow = [code for kind, code, _ in snippets() if kind == "slow"]
    assert slow
    for i, code in enumerate(slow):
        home = tmp_path / str(i)
        home.mkdir()
        try:
            proc = run_snippet(code, home, 1400)
        finally:
            if (home / "testnet" / "testnet.json").exists():
                subprocess.run([sys.executable, "-m", "node.cli", "testnet", "down", "--dir",
                                str(home / "testnet")], capture_output=True, timeout=60)
        if "job submit" in code:
            assert "round 2/2" in proc.stderr and "node-1" in proc.stdout, proc.stderr
