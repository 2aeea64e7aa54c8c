"""Universal-environment benchmark (issue 19): one function per measurement.

    .venv/bin/python bench/environment.py [--only NAME ...] [--threads N] [--json OUT]
        [--cache DIR] [--set FIELD=VALUE ...] [--quota CPUS]

Measurements (each prints absolute numbers and its goal as a ratio; exit 1 when one is
missed):

``llama_efficiency``
    bench/training.py with ``--set arch=llama``: the training benchmark (collaboration
    efficiency >= 0.8, >= 400x fewer bytes than all-reduce, checking < 5% of training)
    with a transformers Llama of the tiny GPT's shape (4 x 128, 0.837M parameters) over
    the byte tokenizer instead of the built-in GPT, part (b) through a local testnet.
    Measured: efficiency 0.837, 431x, checking 3.99% + 1% (bench/RESULTS.md). Long: part
    (b) took 10 minutes on a quiet 2-core machine, the warm start and (a)/(c) 35 more
    under load; ``--cache DIR`` keeps those between runs (a ``bench/training.py --sim
    --set arch=llama --cache DIR`` run fills it).
    ``--llama-set FIELD=VALUE`` passes recipe fields through.
``worker_memory``
    A worker's training child (python -m node.jobs.taskproc, op train, exactly as a node
    runs it) on a ~125M-parameter Llama (``model init --arch llama --size 125m``, byte
    tokenizer: 12 x 768, 4x MLP) on the CPU at batch 8, seq 256, two steps, the job
    spec's ``train.memory = "lean"`` (``--memory-mode``: the AdamW step fused into the
    backward pass, bf16 moments, activations recomputed in it): its peak resident memory against
    the model's fp32 size. Goal: <= 4x (weights, AdamW's moments, activations and the
    runtime).

``throttled`` (bench/environment_hetero.py)
    Four workers, one held to a quarter of a CPU by a cgroup (root): round wall time of
    the sized rounds at most 0.6x an equal split's, collaboration efficiency within 0.02
    of the unthrottled run. The recipe is bench/training.py's, shortened by default to 4
    rounds of 40 inner steps from a 100-step warm start (``--set`` overrides; ``--cache
    DIR`` keeps the warm start and (a)/(c) between runs).
``join`` (bench/environment_hetero.py)
    A fresh worker started during a job: time from ``node start`` to its first accepted
    task.

A measurement is a function ``measure_x(args) -> Result`` registered in MEASUREMENTS.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MEMORY_GOAL_RATIO = 4.0  # peak RSS / fp32 model bytes


@dataclasses.dataclass
class Result:
    name: str
    ok: bool
    summary: str  # one line: the figure against its goal
    figures: dict[str, Any]


def log(msg: str) -> None:
    print(f"[environment {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def taskproc(request: dict[str, Any], threads: int, timeout: float = 3600) -> dict[str, Any]:
    """One op in a child process, as a node runs it; its answer (progress to stderr)."""
    import os

    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    proc = subprocess.run([sys.executable, "-m", "node.jobs.taskproc"],
                          input=json.dumps({**request, "threads": threads}), text=True,
                          capture_output=True, timeout=timeout, check=False, env=env,
                          cwd=ROOT)
    lines = proc.stdout.strip().splitlines()
    answer = json.loads(lines[-1]) if lines else {}
    if not answer.get("ok"):
        raise SystemExit(f"taskproc {request['op']} failed: {answer.get('error')} "
                         f"{proc.stderr[-1500:]}")
    return dict(answer)


# --------------------------------------------------------------------------- item 1


def measure_llama_efficiency(args: argparse.Namespace) -> Result:
    from bench import training

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "figures.json"
        argv = ["--set", "arch=llama", "--json", str(out), "--threads", str(args.threads),
                "--cache", str(args.cache)]
        for item in args.llama_set:
            argv += ["--set", item]
        code = training.main(argv)
        figures = json.loads(out.read_text()) if out.is_file() else {}
    eff = figures.get("efficiency", float("nan"))
    return Result("llama_efficiency", code == 0,
                  f"tiny Llama: efficiency {eff:.3f} (goal >= 0.8), "
                  f"{figures.get('ratio_sent', 0):.0f}x fewer bytes (goal >= 400x), checking "
                  f"{figures.get('check_fraction', 0):.2%} (goal < 5%)", figures)


# --------------------------------------------------------------------------- item 3


def measure_worker_memory(args: argparse.Namespace) -> Result:
    size, batch, seq = args.memory_size, 8, 256
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        log(f"initialising a Llama of size {size} (byte tokenizer)")
        init = taskproc({"op": "init", "arch": "llama", "size": size, "tokenizer": "byte",
                         "seed": 0, "out_dir": str(root / "model")}, args.threads)
        params = int(init["params"])
        data = root / "data.txt"
        import sysconfig

        src = Path(sysconfig.get_paths()["stdlib"])
        with open(data, "wb") as f:
            for p in sorted(src.glob("*.py"))[:200]:
                f.write(p.read_bytes())
        n = data.stat().st_size
        log(f"{params} parameters ({4 * params / 2**20:.0f} MiB fp32); training "
            f"{args.memory_steps} step(s) of batch {batch} x {seq} on the CPU")
        t0 = time.perf_counter()
        ans = taskproc({"op": "train", "model_dir": str(root / "model"),
                        "data_files": [str(data)], "slice_start": 0, "slice_len": n,
                        "seed": 1, "steps": args.memory_steps, "batch_size": batch,
                        "seq_len": seq, "lr": 1e-4, "device": "cpu",
                        "memory": args.memory_mode,
                        "token_cache": str(root / "tokens"),
                        "out_dir": str(root / "out")}, args.threads)
        wall = time.perf_counter() - t0
        # The floor in the same run: a child that loads the same model and answers.
        floor = taskproc({"op": "apply", "model_dir": str(root / "model"),
                          "update": str(root / "out" / "delta.safetensors"),
                          "out_model_dir": str(root / "applied")}, args.threads)
    fp32 = 4 * params
    peak = int(ans["peak_rss_bytes"])
    ratio = peak / fp32
    figures = {"size": size, "params": params, "fp32_bytes": fp32, "peak_rss_bytes": peak,
               "ratio": ratio, "batch": batch, "seq_len": seq, "steps": args.memory_steps,
               "train_wall_s": wall, "memory": args.memory_mode,
               "apply_peak_rss_bytes": int(floor["peak_rss_bytes"]),
               "threads": args.threads}
    return Result("worker_memory", ratio <= MEMORY_GOAL_RATIO,
                  f"Llama {size}, {params / 1e6:.1f}M parameters ({fp32 / 2**20:.0f} MiB "
                  f"fp32), batch {batch} x {seq} on the CPU, train.memory "
                  f"{args.memory_mode!r}, {args.memory_steps} step(s): worker peak RSS "
                  f"{peak / 2**20:.0f} MiB = {ratio:.2f}x the fp32 model (goal <= "
                  f"{MEMORY_GOAL_RATIO:g}x); applying an update to it: "
                  f"{int(floor['peak_rss_bytes']) / 2**20:.0f} MiB; {wall:.0f} s", figures)


def _hetero(name: str) -> Callable[[argparse.Namespace], Result]:
    """bench/environment_hetero.py's measurement ``name`` as a Result (it prints its own
    figures and says which goals it missed)."""
    from bench import environment_hetero

    def measure(args: argparse.Namespace) -> Result:
        figures = environment_hetero.MEASUREMENTS[name](
            argparse.Namespace(**{**vars(args), "set": HETERO_DEFAULT_SETS + args.set}))
        missed = environment_hetero.report(name, figures)
        summary = f"goals missed: {', '.join(missed)}" if missed else "goals met"
        return Result(name, not missed, summary, figures)

    return measure


HETERO_DEFAULT_SETS = ["steps=160", "inner_steps=40", "workers=4", "warm_steps=100"]

MEASUREMENTS: dict[str, Callable[[argparse.Namespace], Result]] = {
    "worker_memory": measure_worker_memory,
    "llama_efficiency": measure_llama_efficiency,
    "throttled": _hetero("throttled"),
    "join": _hetero("join"),
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", action="append", choices=list(MEASUREMENTS),
                    help="run only these measurements (default: all)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    ap.add_argument("--json", type=Path, help="write every figure here")
    ap.add_argument("--memory-size", default="125m", choices=["tiny", "small", "125m"])
    ap.add_argument("--memory-steps", type=int, default=2,
                    help="training steps in worker_memory (default 2: in the lean mode "
                         "the moments are made during the first step's backward pass, so "
                         "the second is the first to hold both moments and activations)")
    ap.add_argument("--memory-mode", default="lean", choices=["standard", "lean"],
                    help="worker_memory: the job's train.memory (default lean: the AdamW "
                         "step fused into the backward pass, bf16 moments)")
    ap.add_argument("--llama-set", action="append", default=[], metavar="FIELD=VALUE",
                    help="a recipe field for llama_efficiency (bench/training.py --set)")
    ap.add_argument("--cache", type=Path, default=None,
                    help="throttled, llama_efficiency: keep the warm start and (a)/(c) here "
                         "(default: a temporary dir)")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="throttled: a training recipe field (bench/training_sim.py Recipe)")
    ap.add_argument("--quota", type=float, default=0.25,
                    help="throttled: CPUs the throttled worker gets (default 0.25). On a "
                         "machine whose other load leaves each process less than that, the "
                         "quota does not bind: give a quarter of what the others get")
    args = ap.parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so a testnet and a cgroup are taken down.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        if args.cache is None:
            args.cache = Path(tmp)
        args.cache.mkdir(parents=True, exist_ok=True)
        for name in args.only or list(MEASUREMENTS):
            log(f"== {name}")
            results.append(MEASUREMENTS[name](args))
            print(f"{name}: {results[-1].summary}", flush=True)
    if args.json:
        args.json.write_text(json.dumps({r.name: r.figures for r in results}, indent=1))
    missed = [r.name for r in results if not r.ok]
    print("GOALS MISSED: " + ", ".join(missed) if missed else "all goals met")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
