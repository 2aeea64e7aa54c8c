"""protocol/ must stay sans-IO: importing it must not pull in any I/O or ML framework."""

from __future__ import annotations

import subprocess
import sys

FORBIDDEN = ("trio", "libp2p", "aiosqlite", "torch", "asyncio")

CHECK = f"""
import sys
import protocol.capability, protocol.envelope, protocol.peerid, protocol.errors
bad = sorted({{m.split('.')[0] for m in sys.modules}} & set({FORBIDDEN!r}))
assert not bad, f"protocol imported {{bad}}"
"""


def test_protocol_imports_no_io_frameworks() -> None:
    # A fresh interpreter: this test process has pytest (and maybe trio) loaded already.
    result = subprocess.run(
        [sys.executable, "-c", CHECK], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
