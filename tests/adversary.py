"""The deltas a cheating worker sends (``worker.adversary``, node/jobs/worker.py): test code,
outside the installed package, loaded by the task child's ``forge`` op only when a worker
is configured to cheat (node/jobs/taskproc.py, ``op_forge``).

The coordinator's checks (specs/jobs.md, "Checking") are only as good as the attacks they
are tried against, so the test suite runs real workers that cheat in the ways the issue
names: a random delta, a zero delta (a lazy worker), another worker's delta copied
exactly or with small noise, and (in node/jobs/worker.py) honest training on the wrong slice.
Never used by an honest node.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from node.ml import gpt, trainer

RANDOM_STD = 0.02  # about an honest delta's size after a few dozen AdamW steps
NOISE_FRACTION = 0.05  # "small noise": 5% of each tensor's own spread


def forge(request: dict[str, Any]) -> dict[str, Any]:
    """Write a forged int8 delta to ``request["out"]``; modes random, zero, copy, noise."""
    mode, out = request["mode"], Path(request["out"])
    if mode == "copy":
        shutil.copyfile(request["source"], out)
        return {"mode": mode}
    gen = torch.Generator().manual_seed(int(request.get("seed", 0)) % 2**63)
    if mode == "noise":
        delta = trainer.dequantize(load_file(request["source"]))
        delta = {k: v + torch.randn(v.shape, generator=gen) * NOISE_FRACTION * float(v.std())
                 for k, v in delta.items()}
    else:
        _, base = gpt.load_model(request["model_dir"])
        if mode == "zero":
            delta = {k: torch.zeros_like(v) for k, v in base.items()}
        elif mode == "random":
            delta = {k: torch.randn(v.shape, generator=gen) * RANDOM_STD for k, v in base.items()}
        else:
            raise ValueError(f"unknown forge mode {mode!r}")
    tmp = out.with_name(out.name + ".tmp")
    save_file(trainer.quantize_int8(delta), str(tmp))
    tmp.replace(out)
    return {"mode": mode}
