"""The GPU check (scripts/gpu-check.sh runs this): what a CUDA worker does, measured.

    .venv/bin/python bench/gpu_check.py [--steps N] [--json OUT]

1. the probe (``iollm env --json``): the GPU, its memory, a bf16 matmul benchmark;
2. the bf16 path: the precision a CUDA task trains in (bf16 autocast, or fp16 with a
   gradient scaler on a card without bf16), TF32 and fused AdamW on;
3. the automatic micro-batch: a ~125M Llama at batch 64 x 1024 searched by out-of-memory
   back-off, then found again in the cache;
4. a short training task of that model on CUDA (the train op a worker runs): tokens per
   second and model FLOPs utilisation (6 N + 12 L d T FLOPs a token, against the card's
   dense bf16 peak from its datasheet when the name is known, and against the probe's
   measured matmul rate);
5. CPU-vs-GPU loss parity on the tiny Llama: the same task on both, the first and the
   last losses compared (fp32 on the CPU, bf16 on the GPU).

Without CUDA it prints one line saying so and exits 2: nothing is measured, nothing is
made up. Goals (exit 1 when missed): MFU >= 35% on an H100-class card; losses within
0.02 (first) and 0.05 (last) between CPU and GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# Dense bf16 tensor-core peaks from the vendors' datasheets, TFLOP/s (no sparsity).
PEAK_BF16_TFLOPS = {"H100 80GB HBM3": 989.0, "H100 SXM": 989.0, "H100 PCIe": 756.0,
                    "H100 NVL": 835.0, "H200": 989.0, "GH200": 989.0, "A100": 312.0,
                    "L40S": 362.0, "L4": 121.0, "A10": 125.0, "RTX 4090": 165.0,
                    "RTX 3090": 71.0}
MFU_GOAL_H100 = 0.35
PARITY_FIRST, PARITY_LAST = 0.02, 0.05


def log(msg: str) -> None:
    print(f"[gpu-check {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def peak_tflops(name: str) -> float | None:
    for key in sorted(PEAK_BF16_TFLOPS, key=len, reverse=True):  # the longest name first
        if key in name:
            return PEAK_BF16_TFLOPS[key]
    return None


def flops_per_token(params: int, layers: int, hidden: int, seq: int) -> float:
    """Training FLOPs a token: 6 N for the matmuls of forward and backward, plus the
    attention scores and values, 12 L d T (PaLM's appendix B)."""
    return 6.0 * params + 12.0 * layers * hidden * seq


def taskproc(request: dict[str, Any], timeout: float = 1800) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, "-m", "node.jobs.taskproc"],
                          input=json.dumps(request), text=True, capture_output=True,
                          timeout=timeout, check=False, cwd=ROOT)
    lines = proc.stdout.strip().splitlines()
    answer = json.loads(lines[-1]) if lines else {}
    if not answer.get("ok"):
        raise SystemExit(f"gpu-check: {request['op']} failed: {answer.get('error')}\n"
                         f"{proc.stderr[-2000:]}")
    return dict(answer)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=20, help="training steps of the 125M task")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--compile", action="store_true", help="also run with torch.compile")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        print(f"gpu-check: no CUDA device visible to torch {torch.__version__} "
              f"(CUDA build: {torch.version.cuda or 'none'}); nothing to check here",
              file=sys.stderr)
        return 2
    from node.ml import device

    figures: dict[str, Any] = {}
    log("1. the probe")
    iollm = str(Path(sys.executable).parent / "iollm")
    env = json.loads(subprocess.run([iollm, "env", "--json"],
                                    capture_output=True, text=True, check=True, cwd=ROOT,
                                    timeout=300).stdout)
    gpu = env["gpus"][0] if env.get("gpus") else {}
    name = str(gpu.get("name") or torch.cuda.get_device_name(0))
    figures["probe"] = {"gpu": name, "gpus": len(env.get("gpus", [])),
                        "tflops": env.get("tflops"), "tflops_dtype": env.get("tflops_dtype")}
    print(f"GPU: {name}; probe: {env.get('tflops')} TFLOP/s ({env.get('tflops_dtype')})")

    log("2. the bf16 path")
    prec = device.precision("cuda")
    figures["precision"] = prec.name
    print(f"precision on this card: {prec.name} autocast"
          f"{' with a gradient scaler' if prec.scaler else ''}; TF32 and fused AdamW on")

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = root / "data.txt"
        import sysconfig

        with open(data, "wb") as f:
            for p in sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py"))[:800]:
                f.write(p.read_bytes())
        n = data.stat().st_size
        cache = root / "micro-batch"
        init = taskproc({"op": "init", "arch": "llama", "size": "125m", "tokenizer": "byte",
                         "seed": 0, "block_size": max(args.seq, 1024),
                         "out_dir": str(root / "m125")})
        params = int(init["params"])
        base = {"op": "train", "model_dir": str(root / "m125"), "data_files": [str(data)],
                "slice_start": 0, "slice_len": n, "seed": 1, "batch_size": args.batch,
                "seq_len": args.seq, "lr": 3e-4, "device": "cuda",
                "micro_batch_cache": str(cache), "token_cache": str(root / "tokens")}
        log(f"3. the automatic micro-batch ({params / 1e6:.0f}M parameters, batch "
            f"{args.batch} x {args.seq})")
        t0 = time.perf_counter()
        first = taskproc({**base, "steps": 1, "out_dir": str(root / "o1")})
        search_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        again = taskproc({**base, "steps": 1, "out_dir": str(root / "o2")})
        cached_s = time.perf_counter() - t0
        figures["micro_batch"] = {"found": first["micro_batch"], "cached": again["micro_batch"],
                                  "first_task_s": search_s, "second_task_s": cached_s}
        print(f"micro-batch: {first['micro_batch']} of {args.batch} (search + 1 step "
              f"{search_s:.1f} s; from the cache {again['micro_batch']}, {cached_s:.1f} s)")

        log(f"4. a training task of {args.steps} steps on CUDA")
        runs = [("eager", False)] + ([("compiled", True)] if args.compile else [])
        fpt = flops_per_token(params, 12, 768, args.seq)
        peak = peak_tflops(name)
        for label, comp in runs:
            ans = taskproc({**base, "steps": args.steps, "compile": comp,
                            "out_dir": str(root / f"t-{label}")})
            tps = ans["tokens"] / ans["wall_s"]
            achieved = tps * fpt / 1e12
            mfu = achieved / peak if peak else None
            mfu_probe = achieved / env["tflops"] if env.get("tflops") else None
            figures[f"train_{label}"] = {"tokens_per_s": tps, "tflops": achieved, "mfu": mfu,
                                         "mfu_vs_probe": mfu_probe, "wall_s": ans["wall_s"],
                                         "loss": [ans["first_loss"], ans["last_loss"]],
                                         "peak_rss_bytes": ans["peak_rss_bytes"]}
            print(f"{label}: {tps:,.0f} tokens/s = {achieved:.1f} TFLOP/s; MFU "
                  f"{'unknown card' if mfu is None else f'{mfu:.1%}'} of the datasheet's "
                  f"{peak} bf16, {'-' if mfu_probe is None else f'{mfu_probe:.1%}'} of the "
                  f"probe's; loss {ans['first_loss']:.3f} -> {ans['last_loss']:.3f}")

        log("5. CPU-vs-GPU loss parity on the tiny Llama")
        taskproc({"op": "init", "arch": "llama", "size": "tiny", "tokenizer": "byte",
                  "seed": 0, "out_dir": str(root / "tiny")})
        tiny = {"op": "train", "model_dir": str(root / "tiny"), "data_files": [str(data)],
                "slice_start": 0, "slice_len": min(n, 2_000_000), "seed": 2, "steps": 30,
                "batch_size": 8, "seq_len": 128, "lr": 3e-3,
                "token_cache": str(root / "tokens"), "threads": os.cpu_count() or 1}
        cpu = taskproc({**tiny, "device": "cpu", "out_dir": str(root / "pc")})
        gpu_ans = taskproc({**tiny, "device": "cuda", "out_dir": str(root / "pg")})
        d_first = abs(cpu["first_loss"] - gpu_ans["first_loss"])
        d_last = abs(cpu["last_loss"] - gpu_ans["last_loss"])
        figures["parity"] = {"cpu": [cpu["first_loss"], cpu["last_loss"]],
                             "gpu": [gpu_ans["first_loss"], gpu_ans["last_loss"]],
                             "d_first": d_first, "d_last": d_last}
        print(f"parity: CPU {cpu['first_loss']:.4f} -> {cpu['last_loss']:.4f}, GPU "
              f"{gpu_ans['first_loss']:.4f} -> {gpu_ans['last_loss']:.4f} (differences "
              f"{d_first:.4f}, {d_last:.4f}; goals < {PARITY_FIRST}, < {PARITY_LAST})")

    if args.json:
        args.json.write_text(json.dumps(figures, indent=1))
    missed = []
    if d_first >= PARITY_FIRST or d_last >= PARITY_LAST:
        missed.append("CPU-vs-GPU parity")
    mfu = figures["train_eager"]["mfu"]
    if "H100" in name or "H200" in name:
        best = max(v["mfu"] for k, v in figures.items() if k.startswith("train_"))
        if best < MFU_GOAL_H100:
            missed.append(f"MFU {best:.1%} < {MFU_GOAL_H100:.0%}")
    elif mfu is None:
        log("MFU goal not judged: the card's datasheet peak is not in the table")
    print("GOALS MISSED: " + ", ".join(missed) if missed else "all goals met")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
