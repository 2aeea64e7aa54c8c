"""Per-task child start latency: a task child forked from the warm parent against a fresh
``python -m node.jobs.taskproc`` (node/jobs/warmchild.py).

    .venv/bin/python bench/task_start.py [--runs 5]

Each run times ``run_taskproc`` as the daemon calls it, for two requests on a 1-layer GPT:
``init`` (start-up plus almost nothing) and ``train`` of one step (what a micro-task pays
before its first step: torch.use_deterministic_algorithms imports torch._dynamo on first
call). Fresh and warm runs alternate, so both see the same machine; the warm parent is
started (and timed) before the first run. Also printed: the CPU time per task of each
kind (fresh children are this process's, warm ones the fork server's children) and the
warm parent's resident memory.

Goal (exit 1 when missed): the median warm task takes at most 0.2x the median fresh one,
for both requests.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

import psutil
import trio

from node.jobs import warmchild
from node.jobs.taskrun import run_taskproc

GOAL = 0.2
CONFIG = {"n_layer": 1, "n_head": 2, "n_embd": 16, "block_size": 8}


def children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def warm_parent() -> psutil.Process:
    (server,) = [c for c in psutil.Process().children()
                 if "multiprocessing.forkserver" in " ".join(c.cmdline())]
    return server


def warm_children_cpu(server: psutil.Process) -> float:
    t = server.cpu_times()  # of the children it reaped: the warm task children
    return float(t.children_user + t.children_system)


def timed(req: dict[str, Any]) -> float:
    t0 = time.perf_counter()
    trio.run(partial(run_taskproc, req, timeout_s=120, what=req["op"]))
    return time.perf_counter() - t0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    d = Path(tempfile.mkdtemp(prefix="task-start-"))
    (d / "data").write_bytes(bytes(range(256)) * 100)
    reqs = {
        "init": {"op": "init", "arch": "gpt", "config": CONFIG, "seed": 0,
                 "out_dir": str(d / "m")},
        "train": {"op": "train", "model_dir": str(d / "m"), "data_files": [str(d / "data")],
                  "slice_start": 0, "slice_len": 20_000, "seed": 1, "steps": 1,
                  "batch_size": 2, "seq_len": 8, "lr": 1e-3, "threads": 1,
                  "out_dir": str(d / "o")},
    }
    print(f"load average {os.getloadavg()[0]:.2f}, {os.cpu_count()} cores")
    first = timed(reqs["init"])
    print(f"first warm task (the warm parent starts and imports): {first:.2f} s")
    server = warm_parent()
    times: dict[tuple[str, str], list[float]] = {}
    fresh_cpu = warm_cpu = 0.0
    for _ in range(args.runs):
        for op, req in reqs.items():
            warmchild.set_fresh_children(True)
            cpu0 = children_cpu()
            times.setdefault(("fresh", op), []).append(timed(req))
            fresh_cpu += children_cpu() - cpu0
            warmchild.set_fresh_children(False)
            cpu0 = warm_children_cpu(server)
            times.setdefault(("warm", op), []).append(timed(req))
            warm_cpu += warm_children_cpu(server) - cpu0
    ok = True
    for op in reqs:
        fresh = statistics.median(times[("fresh", op)])
        warm = statistics.median(times[("warm", op)])
        ratio = warm / fresh
        met = ratio <= GOAL
        ok &= met
        print(f"{op:6s} median of {args.runs}: fresh {fresh:.3f} s, warm {warm:.3f} s, "
              f"ratio {ratio:.3f} (goal <= {GOAL}) {'met' if met else 'MISSED'}")
    n = len(reqs) * args.runs
    print(f"CPU per task: fresh {fresh_cpu / n:.3f} s, warm {warm_cpu / n:.3f} s")
    print(f"warm parent resident: {server.memory_info().rss / 2**20:.0f} MiB")
    print(f"load average {os.getloadavg()[0]:.2f}")
    print("all goals met" if ok else "goal missed")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
