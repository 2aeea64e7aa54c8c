"""protocol/ must stay sans-IO: importing it must not pull in any I/O or ML framework."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

FORBIDDEN = ("trio", "libp2p", "aiosqlite", "torch", "asyncio")

# Every module of protocol/ (the test below fails on one that is missing here).
MODULES = ("agentgoal", "agentnl", "agentsearch",
           "capability", "chainwire", "checking", "checks", "consensus", "coordination",
           "envelope", "errors", "feed", "genesis", "hashtree", "jobs", "jobspec", "ledger",
           "mempool", "penalty", "peerid", "scheduling", "smip", "txs", "votes")

CHECK = f"""
import importlib, sys
for name in {MODULES!r}:
    importlib.import_module("protocol." + name)
bad = sorted({{m.split('.')[0] for m in sys.modules}} & set({FORBIDDEN!r}))
assert not bad, f"protocol imported {{bad}}"
"""


def test_every_protocol_module_is_checked() -> None:
    protocol = Path(__file__).parent.parent / "protocol"
    here = ({p.stem for p in protocol.glob("*.py")}
            | {p.parent.name for p in protocol.glob("*/__init__.py")})
    assert here - {"__init__"} == set(MODULES)


@pytest.mark.timeout(90)
def test_protocol_imports_no_io_frameworks() -> None:
    # A fresh interpreter: this test process has pytest (and maybe trio) loaded already.
    result = subprocess.run(
        [sys.executable, "-c", CHECK], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
