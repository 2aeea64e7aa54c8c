"""Hugging Face causal LMs: any architecture ``transformers`` builds from its config.

A model directory in Hugging Face layout is ``config.json`` (with ``model_type``), one or
more ``*.safetensors`` files, and optionally ``tokenizer.json``. Such a model is an
:class:`HFConfig` (the parsed config) plus a state, exactly as the built-in GPT
(:mod:`node.ml.gpt`): a flat ``dict[str, Tensor]`` of fp32 weights named as
``model.named_parameters()`` names them (a tied output head is held once, under the input
embedding's name, as ``save_pretrained`` writes it). Nothing is downloaded: the network is
never asked, the model comes from its files only (the SMIP content store).

Weights are read memory-mapped (:func:`mmap_safetensors`): the tensors of a file share the
page cache with the content store's copy, nothing is read until used, and no second copy
is made. ``transformers`` is imported on first use (it costs about 2 s).

Public API::

    ARCHS, SIZES, is_hf_config(obj)
    HFConfig.from_json(obj) / .block_size / .vocab_size / .to_json()
    make_config(arch, size, vocab_size, eot_id, block_size=None) -> dict (config.json)
    build(config, state, device) -> CausalLM     # forward(idx, targets) -> (logits, loss)
    module_state(model) / expected_shapes(config) / check_state(config, state)
    init_state(config, seed)
    load_model(dir) -> (HFConfig, state)          # memory-mapped
    mmap_safetensors(path) -> dict[str, Tensor]
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from node.ml import catalog
from node.ml.weights import MappedState, check_shapes, mmap_safetensors

__all__ = [
    "ARCHS",
    "SIZES",
    "CausalLM",
    "HFConfig",
    "build",
    "check_state",
    "expected_shapes",
    "init_state",
    "is_hf_config",
    "load_model",
    "make_config",
    "mmap_safetensors",
    "module_state",
]

ARCHS = catalog.HF_ARCHS
SIZES = catalog.HF_SIZES


def is_hf_config(obj: Any) -> bool:
    return isinstance(obj, dict) and isinstance(obj.get("model_type"), str)


def make_config(arch: str, size: str, vocab_size: int, eot_id: int,
                block_size: int | None = None) -> dict[str, Any]:
    """The config.json of a fresh ``arch`` model of ``size`` (ValueError on unknown)."""
    if arch not in ARCHS:
        raise ValueError(f"arch {arch!r}: one of {', '.join(ARCHS)}")
    if size not in SIZES:
        raise ValueError(f"size {size!r}: one of {', '.join(SIZES)}")
    layers, hidden, heads, kv, inter, ctx = SIZES[size]
    ctx = block_size or ctx
    common = {"vocab_size": vocab_size, "bos_token_id": eot_id, "eos_token_id": eot_id,
              "pad_token_id": eot_id, "tie_word_embeddings": True, "use_cache": True}
    if arch == "gpt2":
        return {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_layer": layers,
                "n_embd": hidden, "n_head": heads, "n_inner": inter, "n_positions": ctx,
                "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, **common}
    cls = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
           "mistral": "MistralForCausalLM"}[arch]
    return {"model_type": ARCHS[arch], "architectures": [cls], "num_hidden_layers": layers,
            "hidden_size": hidden, "num_attention_heads": heads, "num_key_value_heads": kv,
            "intermediate_size": inter, "max_position_embeddings": ctx, "rms_norm_eps": 1e-5,
            "hidden_act": "silu", "attention_dropout": 0.0, **common}


class HFConfig:
    """A parsed config.json of a Hugging Face causal LM (the JSON kept as given)."""

    def __init__(self, obj: dict[str, Any]) -> None:
        self.json = obj
        self.hf = _transformers_config(json.dumps(obj, sort_keys=True))
        self.block_size = int(getattr(self.hf, "max_position_embeddings", 0)
                              or getattr(self.hf, "n_positions", 0) or 1 << 20)
        self.vocab_size = int(self.hf.vocab_size)

    @classmethod
    def from_json(cls, obj: Any) -> HFConfig:
        if not is_hf_config(obj):
            raise ValueError("config.json has no model_type: not a Hugging Face config")
        return cls(obj)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, HFConfig) and self.json == other.json

    def __hash__(self) -> int:
        return hash(json.dumps(self.json, sort_keys=True))


@lru_cache(maxsize=8)
def _transformers_config(text: str) -> Any:
    from transformers import AutoConfig, PretrainedConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    obj = json.loads(text)
    # Refused before anything is built: an encoder or a vision model has no causal LM
    # head. (The name table, not the lazy class mapping, whose lookup imports every model.)
    if obj["model_type"] not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ValueError(f"config.json: model_type {obj['model_type']!r} is not a causal LM "
                         "that transformers knows")
    try:
        cfg = AutoConfig.for_model(obj["model_type"], **{k: v for k, v in obj.items()
                                                          if k != "model_type"})
    except (KeyError, ValueError, TypeError) as e:
        raise ValueError(f"config.json: transformers cannot build {obj['model_type']!r} "
                         f"({e})") from None
    assert isinstance(cfg, PretrainedConfig)
    cfg._attn_implementation = "sdpa"  # fused attention on every device, no extra package
    return cfg


class CausalLM(nn.Module):
    """A transformers causal LM with the built-in GPT's interface: ``forward(idx, targets)``
    -> (logits, mean cross-entropy of ``targets``, already shifted by the caller)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, idx: Tensor, targets: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        logits = self.inner(input_ids=idx, use_cache=False).logits
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))
        return logits, loss


def _new_module(config: HFConfig, device: str | torch.device = "cpu") -> nn.Module:
    from transformers import AutoModelForCausalLM

    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config.hf)  # fp32: torch's default dtype
    assert isinstance(model, nn.Module)
    return model


@lru_cache(maxsize=8)
def _shapes(config: HFConfig) -> tuple[tuple[str, tuple[int, ...]], ...]:
    model = _new_module(config, "meta")
    return tuple((n, tuple(p.shape)) for n, p in model.named_parameters())


def expected_shapes(config: HFConfig) -> dict[str, tuple[int, ...]]:
    """The parameters' names and shapes (tied weights once), from a meta-device model."""
    return dict(_shapes(config))


def check_state(config: HFConfig, state: Mapping[str, Tensor]) -> None:
    check_shapes(expected_shapes(config), state)


def init_state(config: HFConfig, seed: int) -> dict[str, Tensor]:
    """Fresh weights: transformers' own initialisation of the architecture, seeded."""
    torch.manual_seed(int(seed))
    model = _new_module(config)
    return module_state(CausalLM(model))


def build(config: HFConfig, state: Mapping[str, Tensor],
          device: str | torch.device = "cpu") -> CausalLM:
    """A module on ``device`` holding a copy of ``state`` (checked name by name). Made
    on the device and filled in place: buffers (rotary frequencies) come from the config,
    a tied head shares the embedding, and no third copy of the weights is made."""
    check_state(config, state)
    model = _new_module(config, device)
    missing, unexpected = model.load_state_dict(dict(state), strict=False)
    params = dict(model.named_parameters())
    lost = [m for m in missing if m in params]
    if lost or unexpected:
        raise ValueError(f"model weights do not fit the module ({(lost or unexpected)[0]!r})")
    return CausalLM(model)


def module_state(model: nn.Module) -> dict[str, Tensor]:
    """Detached fp32 CPU copies of the parameters (tied ones once), named as in the files."""
    inner = model.inner if isinstance(model, CausalLM) else model
    return {name: p.detach().to("cpu", torch.float32).contiguous().clone()
            for name, p in inner.named_parameters()}


# --------------------------------------------------------------------------- files


def weight_files(d: Path) -> list[Path]:
    return sorted(p for p in d.iterdir() if p.name.endswith(".safetensors") and p.is_file())


def load_model(model_dir: str | os.PathLike[str]) -> tuple[HFConfig, dict[str, Tensor]]:
    """Config and state of a Hugging Face model directory: every ``*.safetensors`` file
    (shards of a checkpoint merged), memory-mapped; fp16/bf16 weights are converted to
    fp32. A tied head saved twice and buffers saved by old checkpoints are dropped; any
    other unknown tensor is an error."""
    d = Path(model_dir)
    try:
        obj = json.loads((d / "config.json").read_bytes())
    except FileNotFoundError:
        raise ValueError(f"{d / 'config.json'}: no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{d / 'config.json'}: not valid JSON ({e})") from None
    config = HFConfig.from_json(obj)
    files = weight_files(d)
    if not files:
        raise ValueError(f"{d}: no .safetensors weights")
    state = MappedState()
    for p in files:
        try:
            part = mmap_safetensors(p)
        except (ValueError, OSError) as e:
            raise ValueError(f"{p}: unreadable safetensors ({e})") from None
        for name, t in part.items():
            if name in state:
                raise ValueError(f"tensor {name!r} is in two weight files")
            if not t.is_floating_point():
                raise ValueError(f"tensor {name!r} is {t.dtype}, expected floating point")
            state[name] = t if t.dtype == torch.float32 else t.to(torch.float32)
        state.adopt(part)
    want = expected_shapes(config)
    for name in [n for n in state if n not in want]:
        if name == "lm_head.weight" or name.endswith((".inv_freq", ".attn.bias",
                                                     ".attn.masked_bias")):
            del state[name]
    check_state(config, state)
    return config, state
