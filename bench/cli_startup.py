"""CLI start-up: how long a command that only talks to the daemon takes before it does so.

    .venv/bin/python bench/cli_startup.py [--runs 15]

For each command below, run as a user runs it (``python -m node.cli ... --home H``, H a
home whose node.json names a port nothing listens on, so the command goes as far as its
API call and stops at once), the median wall time over RUNS fresh processes. Baseline,
in the same run: the bare interpreter (``python -c pass``) and the imports such a command
paid before it imported lazily (node.api.server and node.api.ledger: trio, py-libp2p,
torch's neighbours).

Goals (exit 1 when one is missed): every command's median under 0.3 s (issue 20), and at
most 0.5x the eager-import baseline.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GOAL_S = 0.3
GOAL_RATIO = 0.5
COMMANDS = [["status"], ["gpus", "--min-vram", "8"], ["model", "list"], ["job", "list"],
            ["ledger", "balance", "--all"]]


def median_wall(argv: list[str], runs: int) -> float:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run(argv, capture_output=True, check=False)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=15)
    args = ap.parse_args()
    py = sys.executable
    with tempfile.TemporaryDirectory(prefix="iollm-cli-bench-") as tmp:
        home = Path(tmp)
        (home / "node.json").write_text(json.dumps({"api": "http://127.0.0.1:9", "pid": 1}))
        (home / "api.token").write_text("t0ken\n")
        bare = median_wall([py, "-c", "pass"], args.runs)
        eager = median_wall([py, "-c", "import node.api.server, node.api.ledger"], args.runs)
        print(f"baseline: bare interpreter {bare * 1000:.0f} ms; the eager imports "
              f"{eager * 1000:.0f} ms (median of {args.runs})")
        missed = False
        for cmd in COMMANDS:
            t = median_wall([py, "-m", "node.cli", *cmd, "--home", str(home)], args.runs)
            ok = t < GOAL_S and t <= GOAL_RATIO * eager
            missed |= not ok
            print(f"iollm {' '.join(cmd):<24} {t * 1000:5.0f} ms  {t / eager:.2f}x eager  "
                  f"{t - bare:+.3f} s over the bare interpreter  {'ok' if ok else 'MISSED'}")
    print(f"goals: under {GOAL_S} s and at most {GOAL_RATIO}x the eager imports: "
          + ("missed" if missed else "met"))
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
