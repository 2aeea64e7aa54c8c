"""The universal environment's benchmark (issue 19): one measurement per function.

    .venv/bin/python bench/environment.py [--only NAME ...] [--cache DIR] [--set F=V ...]

Measurements (each states its goal as a ratio against a baseline of the same run, prints
its absolute figures, and the script exits 1 when one misses):

``throttled`` (bench/environment_hetero.py) four workers, one held to a quarter of a CPU
              by a cgroup: round wall time of the sized rounds at most 0.6x an equal
              split's, collaboration efficiency within 0.02 of the unthrottled run.
``join``      (bench/environment_hetero.py) a fresh worker started during a job: time
              from `node start` to its first accepted task.

The recipe of ``throttled`` is bench/training.py's, shortened by default to 4 rounds of
40 inner steps from a 100-step warm start (`--set steps=160 --set warm_steps=100`; any
`--set` overrides); `--cache DIR` keeps the warm start and (a)/(c) between runs. Needs
root (cgroups).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import environment_hetero  # noqa: E402

MEASUREMENTS = dict(environment_hetero.MEASUREMENTS)
REPORTS = {name: environment_hetero.report for name in environment_hetero.MEASUREMENTS}
DEFAULT_SETS = ["steps=160", "inner_steps=40", "workers=4", "warm_steps=100"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", action="append", choices=sorted(MEASUREMENTS), default=[])
    ap.add_argument("--cache", type=Path, default=None,
                    help="keep the warm start and (a)/(c) here (default: a temporary dir)")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="a training recipe field (bench/training_sim.py Recipe)")
    ap.add_argument("--json", type=Path, default=None, help="write every figure here")
    ap.add_argument("--quota", type=float, default=environment_hetero.QUOTA,
                    help="CPUs the throttled worker gets (default 0.25). On a machine whose "
                         "other load leaves each process less than that, the quota does not "
                         "bind: give a quarter of what the others get")
    args = ap.parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so the testnet and the cgroup are taken down.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    args.set = DEFAULT_SETS + args.set
    with tempfile.TemporaryDirectory() as tmp:
        if args.cache is None:
            args.cache = Path(tmp)
        args.cache.mkdir(parents=True, exist_ok=True)
        figures, missed = {}, []
        for name in args.only or list(MEASUREMENTS):
            figures[name] = MEASUREMENTS[name](args)
            missed += REPORTS[name](name, figures[name])
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1, default=str))
    if missed:
        print(f"GOALS MISSED: {', '.join(missed)}")
        return 1
    print("all goals met")
    return 0


if __name__ == "__main__":
    sys.exit(main())
