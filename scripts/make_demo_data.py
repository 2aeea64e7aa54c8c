"""Write a small model and a small dataset to share over SMIP (scripts/demo.sh, tests).

    python scripts/make_demo_data.py model DIR [--mib 20] [--shards 2] [--seed 0] [--bump K]
    python scripts/make_demo_data.py dataset FILE [--modules json,csv,...]

``model``: DIR gets ``config.json`` and SHARDS safetensors files
``model-0000i-of-0000n.safetensors`` of float32 tensors, about MIB MiB in all, the same
bytes for the same arguments. ``--bump K`` adds 1 to the tensors of shard K only (0-based),
which makes a child version that shares every other shard with the original.

``dataset``: FILE gets the source of a few standard-library modules, concatenated: a real
text corpus present on every machine.
"""

from __future__ import annotations

import argparse
import json
import sys
import sysconfig
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

D_MODEL = 256  # each tensor is (rows, D_MODEL) float32, rows set by the size asked
TENSORS_PER_SHARD = 4
DEFAULT_MODULES = "json,csv,argparse,textwrap,string,difflib"


def write_model(out: Path, mib: float, shards: int, seed: int, bump: int | None) -> None:
    rows = max(1, round(mib * 2**20 / (shards * TENSORS_PER_SHARD * D_MODEL * 4)))
    out.mkdir(parents=True, exist_ok=True)
    layer = 0
    for k in range(shards):
        rng = np.random.default_rng([seed, k])
        tensors = {}
        for _ in range(TENSORS_PER_SHARD):
            weight = rng.standard_normal((rows, D_MODEL), dtype=np.float32) * 0.02
            if bump == k:
                weight += 1.0
            tensors[f"layers.{layer}.weight"] = weight
            layer += 1
        save_file(tensors, str(out / f"model-{k + 1:05d}-of-{shards:05d}.safetensors"),
                  metadata={"format": "np"})
    config = {"architecture": "iollm-demo-mlp", "d_model": D_MODEL, "rows": rows,
              "n_layer": layer, "dtype": "float32", "seed": seed}
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def write_dataset(out: Path, modules: list[str]) -> None:
    lib = Path(sysconfig.get_paths()["stdlib"])
    parts = []
    for name in modules:
        source = lib / f"{name}.py"
        if not source.exists():
            source = lib / name / "__init__.py"
        parts.append(f"# ---- {name}\n" + source.read_text(encoding="utf-8"))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(parts), encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("model", help="a directory of safetensors shards and config.json")
    p.add_argument("out", type=Path, metavar="DIR")
    p.add_argument("--mib", type=float, default=20.0, help="total size in MiB (default 20)")
    p.add_argument("--shards", type=int, default=2, help="number of shards (default 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bump", type=int, metavar="K", help="change shard K (0-based) only")
    p = sub.add_parser("dataset", help="a text file of standard-library source")
    p.add_argument("out", type=Path, metavar="FILE")
    p.add_argument("--modules", default=DEFAULT_MODULES,
                   help=f"comma-separated stdlib modules (default {DEFAULT_MODULES})")
    args = parser.parse_args(argv)
    if args.what == "model":
        if args.shards < 1 or (args.bump is not None and not 0 <= args.bump < args.shards):
            parser.error("--shards must be >= 1 and --bump in [0, shards)")
        write_model(args.out, args.mib, args.shards, args.seed, args.bump)
    else:
        write_dataset(args.out, args.modules.split(","))
    return 0


if __name__ == "__main__":
    sys.exit(main())
