"""One interface over the model kinds a job can train: the built-in GPT (node/ml/gpt.py,
no dependency beyond torch, the default) and any Hugging Face causal LM (node/ml/hf.py).

A model directory says which it is: ``config.json`` with ``"architecture": "gpt"`` is the
built-in GPT, one with ``model_type`` a Hugging Face model. Training code (trainer.py,
taskproc.py) goes through these functions only, so deltas, checks, re-execution and the
outer step work on the state dict of either.

Public API::

    Config = GPTConfig | HFConfig
    load_model(dir) -> (config, state)        # ValueError with a message when bad
    build(config, state, device) -> module    # forward(idx, targets) -> (logits, loss)
    module_state(model) / check_state(config, state) / block_size(config)
    write_version(out_dir, base_dir, state) -> sha256 of the weights
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from node.ml import gpt, hf

__all__ = ["Config", "block_size", "build", "byte_llama", "check_state", "config_json",
           "init_state", "is_hf", "load_model", "module_state", "named_parameters",
           "save_model", "write_version"]

Config = gpt.GPTConfig | hf.HFConfig


def is_hf(config: Config) -> bool:
    return isinstance(config, hf.HFConfig)


def load_model(model_dir: str | os.PathLike[str]) -> tuple[Config, dict[str, Tensor]]:
    d = Path(model_dir)
    try:
        obj: Any = json.loads((d / gpt.CONFIG_FILE).read_bytes())
    except FileNotFoundError:
        raise ValueError(f"{d / gpt.CONFIG_FILE}: no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{d / gpt.CONFIG_FILE}: not valid JSON ({e})") from None
    if hf.is_hf_config(obj):
        return hf.load_model(d)
    return gpt.load_model(d)


def build(config: Config, state: Mapping[str, Tensor],
          device: str | torch.device = "cpu") -> nn.Module:
    if isinstance(config, hf.HFConfig):
        return hf.build(config, state, device)
    return gpt.build(config, state, device)


def module_state(model: nn.Module) -> dict[str, Tensor]:
    if isinstance(model, hf.CausalLM):
        return hf.module_state(model)
    return gpt.module_state(model)


def named_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters by their names in a state (tied ones once)."""
    inner = model.inner if isinstance(model, hf.CausalLM) else model
    return dict(inner.named_parameters())


def config_json(config: Config) -> dict[str, Any]:
    """The config as its config.json holds it (a key for per-model caches)."""
    if isinstance(config, hf.HFConfig):
        return config.json
    return gpt.config_to_json(config)


def check_state(config: Config, state: Mapping[str, Tensor]) -> None:
    if isinstance(config, hf.HFConfig):
        hf.check_state(config, state)
    else:
        gpt.check_state(config, state)


def block_size(config: Config) -> int:
    return int(config.block_size)


def save_model(out_dir: str | os.PathLike[str], config: Config,
               state: Mapping[str, Tensor], tokenizer: Any = None) -> None:
    """A model directory: the built-in GPT's files, or a Hugging Face layout (weights,
    ``tokenizer`` if given (a ``tokenizers.Tokenizer``), config.json last)."""
    if not isinstance(config, hf.HFConfig):
        gpt.save_model(out_dir, config, state)
        return
    from node.ml import tokens

    check_state(config, state)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    gpt.write_state(out / gpt.WEIGHTS_FILE, state)
    if tokenizer is not None:
        tokens.save_tokenizer(tokenizer, out, config.block_size)
    gpt.write_atomic(out / gpt.CONFIG_FILE,
                     (json.dumps(config.json, sort_keys=True, indent=1) + "\n").encode())


def byte_llama(size: str = "tiny", block_size: int | None = None) -> hf.HFConfig:
    """A Llama over the byte tokenizer (ids = byte values): trains on any byte stream,
    as the built-in GPT does (benchmarks compare the two on the same tokens)."""
    return hf.HFConfig.from_json(hf.make_config("llama", size, 257, 256, block_size))


def init_state(config: Config, seed: int) -> dict[str, Tensor]:
    if isinstance(config, hf.HFConfig):
        return hf.init_state(config, seed)
    return gpt.init_state(config, seed)


def write_version(out_dir: Path, base_dir: Path, state: Mapping[str, Tensor]) -> str:
    """A new version beside its base: ``model.safetensors`` (fp32, sorted: a function of
    the state) first, then every other file of the base copied byte for byte (tokenizer,
    generation config), ``config.json`` last, so a directory with a config is complete and
    every peer that computes the same state writes the same files. The base's weight
    files and shard index are not copied: the new weights are one file. Returns the
    sha256 of the weights."""
    out_dir.mkdir(parents=True, exist_ok=True)
    sha = gpt.write_state(out_dir / gpt.WEIGHTS_FILE, state)
    extras = sorted(p for p in base_dir.iterdir() if p.is_file()
                    and not p.name.endswith((".safetensors", ".safetensors.index.json"))
                    and p.name != gpt.CONFIG_FILE)
    for p in extras:
        gpt.write_atomic(out_dir / p.name, p.read_bytes())
    gpt.write_atomic(out_dir / gpt.CONFIG_FILE, (base_dir / gpt.CONFIG_FILE).read_bytes())
    return sha

