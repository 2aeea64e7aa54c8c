"""The device a task runs on, its precision, and the micro-batch that fits it.

- :func:`choose` picks CUDA (ROCm builds of torch answer as CUDA too), Apple's MPS or the
  CPU, from what torch finds and what the job asks for.
- :func:`precision` says how to train there: bf16 autocast where the device has bf16,
  fp16 autocast with a gradient scaler where it has only fp16, fp32 on the CPU (bf16 on a
  CPU is slow, and fp32 keeps re-execution there bit-exact).
- :func:`setup` turns on TF32 matmuls on CUDA; :func:`adamw_kwargs` asks for the fused
  AdamW kernel there.
- :func:`micro_batch`: the largest micro-batch that fits, found once per (model, device)
  by halving on out-of-memory and cached in a small JSON file; the trainer accumulates
  gradients over micro-batches up to the job's batch, so a job's result does not depend on
  the card that ran it (only the summation order of a batch's gradient changes).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

__all__ = ["DEVICES", "Precision", "adamw_kwargs", "choose", "is_oom", "micro_batch",
           "precision", "search_micro_batch", "setup"]

DEVICES = ("auto", "cpu", "cuda", "mps")


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def choose(requested: str) -> str:
    """The torch device for a request's ``device``: ``auto`` takes the best one present;
    ``cuda:N`` is one GPU of several (a worker slot, ``[worker] devices``). ValueError
    naming the problem when the one asked for is not there."""
    if requested.startswith("cuda:") and requested[5:].isdigit():
        if int(requested[5:]) >= torch.cuda.device_count():
            raise ValueError(f"device {requested!r}: this machine has "
                             f"{torch.cuda.device_count()} CUDA devices")
        return requested
    if requested not in DEVICES:
        raise ValueError(f"device {requested!r}: one of {', '.join(DEVICES)}, cuda:N")
    if requested == "auto":
        if torch.cuda.is_available():
            return "cuda"
        return "mps" if _mps_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but CUDA is not available")
    if requested == "mps" and not _mps_available():
        raise ValueError("device 'mps' requested but MPS is not available")
    return requested


@dataclasses.dataclass(frozen=True)
class Precision:
    dtype: torch.dtype | None  # autocast dtype; None: fp32, no autocast
    scaler: bool  # fp16 needs loss scaling against gradient underflow

    @property
    def name(self) -> str:
        return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(self.dtype, "fp32")  # type: ignore[arg-type]


def _bf16_supported(device: str) -> bool:
    if device.startswith("cuda"):
        return bool(torch.cuda.is_bf16_supported())
    if device == "mps":
        try:  # MPS has bf16 from macOS 14 on; asking is the reliable test
            torch.ones(1, dtype=torch.bfloat16, device="mps")
            return True
        except (RuntimeError, TypeError):
            return False
    return False


def precision(device: str) -> Precision:
    if device == "cpu":
        return Precision(None, False)
    if _bf16_supported(device):
        return Precision(torch.bfloat16, False)
    return Precision(torch.float16, True)


def autocast(device: str, prec: Precision) -> contextlib.AbstractContextManager[Any]:
    if prec.dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.split(":")[0], dtype=prec.dtype)


def setup(device: str) -> None:
    """Process-wide settings for ``device``: TF32 tensor cores for fp32 matmuls on CUDA
    (about 8x an fp32 matmul on Ampere and later, 10 bits of mantissa, which training
    tolerates)."""
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def adamw_kwargs(device: str) -> dict[str, Any]:
    """The fused AdamW kernel on CUDA (one launch for all parameters); the per-parameter
    loop on the CPU, whose result does not depend on how tensors are grouped."""
    if device.startswith("cuda"):
        return {"fused": True}
    return {"foreach": False}


def is_oom(exc: BaseException) -> bool:
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def search_micro_batch(batch_size: int, fits: Callable[[int], bool]) -> int:
    """The largest micro-batch that ``fits`` among batch_size, batch_size/2, ... (each a
    divisor of batch_size when batch_size is a power of two; else the last chunk is
    smaller). ValueError when not even 1 fits."""
    m = batch_size
    while m >= 1:
        if fits(m):
            return m
        m //= 2
    raise ValueError("not even a micro-batch of 1 sequence fits in the device's memory")


def _cache_file(cache_dir: Path, model_key: str, device: str, seq_len: int) -> Path:
    name = torch.cuda.get_device_name(device) if device.startswith("cuda") else device
    h = hashlib.sha256(json.dumps([model_key, name, seq_len, torch.__version__]).encode())
    return cache_dir / f"{h.hexdigest()[:32]}.json"


def micro_batch(model_key: str, device: str, batch_size: int, seq_len: int,
                trial: Callable[[int], None], cache_dir: Path | None) -> int:
    """The micro-batch to train ``batch_size`` sequences of ``seq_len`` with on
    ``device``: ``batch_size`` on the CPU (memory there is bounded by the machine, not a
    card, and an allocation failure is the kernel's OOM killer, not an exception);
    elsewhere the largest that ``trial`` (a forward and backward pass) runs without
    running out of memory, cached per (model, device, seq_len) in ``cache_dir``."""
    if device == "cpu":
        return batch_size
    path = _cache_file(cache_dir, model_key, device, seq_len) if cache_dir else None
    if path is not None and path.is_file():
        with contextlib.suppress(ValueError, OSError, KeyError, TypeError):
            known = json.loads(path.read_text())
            best, tried = int(known["micro_batch"]), int(known["batch_size"])
            if 1 <= best < tried:  # a bound found by running out of memory
                return min(best, batch_size)
            if batch_size <= tried:  # everything tried fitted
                return batch_size

    def fits(m: int) -> bool:
        try:
            trial(m)
            return True
        except Exception as exc:  # only out-of-memory means "smaller"
            if not is_oom(exc):
                raise
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
            return False

    best = search_micro_batch(batch_size, fits)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        tmp.write_text(json.dumps({"micro_batch": best, "batch_size": batch_size,
                                   "seq_len": seq_len, "device": device}))
        os.replace(tmp, path)
    return best
