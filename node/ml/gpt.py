"""The built-in model: a small byte-level GPT after nanoGPT (vocabulary of 256 byte values).

A model is a :class:`GPTConfig` plus a *state*: a flat ``dict[str, Tensor]`` of fp32
weights. Training code works on states (they are what deltas, averages and outer steps are
made of); :func:`build` wraps a state in an ``nn.Module`` to run it.

The token embedding and the output head are tied (one matrix), and a state holds it once,
as ``wte.weight``: it is what saves a quarter of the tiny model's bytes on the wire.

On disk a model is the Hugging Face layout, ``config.json`` (sorted keys, with
``"architecture": "gpt"``) next to ``model.safetensors``. Both files are a pure function of
(config, state): same weights, same bytes, so a version id (a hash of the files) can be
rebuilt by any peer that recomputes the weights.

Public API::

    GPTConfig, SIZES, ARCHITECTURE
    init_state(config, seed) -> dict[str, Tensor]
    build(config, state) -> GPT                  # nn.Module holding a copy of the state
    module_state(model) -> dict[str, Tensor]     # back from a module (detached fp32 copies)
    n_params(state) -> int
    save_model(out_dir, config, state)           # config.json + model.safetensors
    load_model(model_dir) -> (config, state)     # memory-mapped; ValueError when bad
    config_to_json(config) -> dict; config_from_json(dict) -> GPTConfig
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save, save_file
from torch import Tensor, nn
from torch.nn import functional as F

from node.ml.weights import check_shapes, mmap_safetensors

__all__ = [
    "ARCHITECTURE",
    "CONFIG_FILE",
    "SIZES",
    "VOCAB_SIZE",
    "WEIGHTS_FILE",
    "GPTConfig",
    "build",
    "config_from_json",
    "config_to_json",
    "expected_shapes",
    "init_state",
    "load_model",
    "module_state",
    "n_params",
    "save_model",
]

ARCHITECTURE = "gpt"
VOCAB_SIZE = 256  # byte-level: a token is one raw byte, no tokenizer to ship or trust
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INIT_STD = 0.02  # nanoGPT / GPT-2 initialisation


@dataclasses.dataclass(frozen=True)
class GPTConfig:
    """Shape of the network. ``vocab_size`` is fixed at 256 (bytes)."""

    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    block_size: int = 128
    dropout: float = 0.0
    bias: bool = True
    vocab_size: int = VOCAB_SIZE

    def __post_init__(self) -> None:
        for name in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"GPTConfig.{name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be a multiple of n_head ({self.n_head})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if not isinstance(self.bias, bool):
            raise ValueError(f"bias must be a boolean, got {self.bias!r}")


SIZES: dict[str, GPTConfig] = {
    # 0.82M parameters (embedding counted once): fast enough to train on one CPU core.
    "tiny": GPTConfig(n_layer=4, n_head=4, n_embd=128, block_size=128),
    # 4.8M parameters: the smallest size that is worth a GPU.
    "small": GPTConfig(n_layer=6, n_head=8, n_embd=256, block_size=256),
}


# --------------------------------------------------------------------------- the network


class CausalSelfAttention(nn.Module):
    def __init__(self, c: GPTConfig) -> None:
        super().__init__()
        self.n_head = c.n_head
        self.dropout = c.dropout
        self.c_attn = nn.Linear(c.n_embd, 3 * c.n_embd, bias=c.bias)
        self.c_proj = nn.Linear(c.n_embd, c.n_embd, bias=c.bias)
        self.resid_dropout = nn.Dropout(c.dropout)

    def forward(self, x: Tensor) -> Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        # (B, nh, T, hs)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, c: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(c.n_embd, 4 * c.n_embd, bias=c.bias)
        self.c_proj = nn.Linear(4 * c.n_embd, c.n_embd, bias=c.bias)
        self.dropout = nn.Dropout(c.dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, c: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(c.n_embd, bias=c.bias)
        self.attn = CausalSelfAttention(c)
        self.ln_2 = nn.LayerNorm(c.n_embd, bias=c.bias)
        self.mlp = MLP(c)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """nanoGPT's model with flat parameter names (``wte.weight``, ``h.0.attn.c_attn.weight``)."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.h = nn.ModuleList([Block(config) for _ in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(config.n_embd, bias=config.bias)

    def forward(self, idx: Tensor, targets: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """Logits (B, T, vocab) and, given targets (B, T), the mean cross-entropy."""
        _, T = idx.shape
        if self.config.block_size < T:
            raise ValueError(f"sequence of {T} longer than block_size {self.config.block_size}")
        pos = torch.arange(T, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))  # (B, T, C)
        for block in self.h:
            x = block(x)
        x = self.ln_f(x)
        logits = F.linear(x, self.wte.weight)  # tied head, (B, T, vocab)
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))
        return logits, loss


# --------------------------------------------------------------------------- states


def expected_shapes(config: GPTConfig) -> dict[str, tuple[int, ...]]:
    """The tensor names and shapes a state of this config must have, without building a
    module (a meta-device module would be shorter, but its first use imports torch's
    compiler stack: 1.3 s in every child process). A test checks it against GPT()."""
    C, V = config.n_embd, config.vocab_size
    out: dict[str, tuple[int, ...]] = {"wte.weight": (V, C), "wpe.weight": (config.block_size, C)}

    def linear(name: str, n_in: int, n_out: int) -> None:
        out[f"{name}.weight"] = (n_out, n_in)
        if config.bias:
            out[f"{name}.bias"] = (n_out,)

    def norm(name: str) -> None:
        out[f"{name}.weight"] = (C,)
        if config.bias:
            out[f"{name}.bias"] = (C,)

    for i in range(config.n_layer):
        norm(f"h.{i}.ln_1")
        linear(f"h.{i}.attn.c_attn", C, 3 * C)
        linear(f"h.{i}.attn.c_proj", C, C)
        norm(f"h.{i}.ln_2")
        linear(f"h.{i}.mlp.c_fc", C, 4 * C)
        linear(f"h.{i}.mlp.c_proj", 4 * C, C)
    norm("ln_f")
    return out


def init_state(config: GPTConfig, seed: int) -> dict[str, Tensor]:
    """Fresh weights, a pure function of (config, seed): GPT-2 initialisation (normal 0.02,
    residual projections scaled by 1/sqrt(2 n_layer)), drawn in sorted-name order from one
    CPU generator so the result does not depend on module construction order or device."""
    gen = torch.Generator().manual_seed(int(seed))
    shapes = expected_shapes(config)
    state: dict[str, Tensor] = {}
    for name in sorted(shapes):
        shape = shapes[name]
        if name.endswith(".bias"):
            t = torch.zeros(shape)
        elif "ln_" in name:  # LayerNorm gains
            t = torch.ones(shape)
        else:
            std = INIT_STD
            if name.endswith("c_proj.weight"):
                std = INIT_STD / math.sqrt(2 * config.n_layer)
            t = torch.randn(shape, generator=gen) * std
        state[name] = t.contiguous()
    return state


def build(config: GPTConfig, state: Mapping[str, Tensor],
          device: str | torch.device = "cpu") -> GPT:
    """A GPT module on ``device`` holding a copy of ``state`` (checked name by name)."""
    check_state(config, state)
    model = GPT(config)
    model.load_state_dict({k: v.to(torch.float32) for k, v in state.items()}, strict=True)
    return model.to(device)


def module_state(model: nn.Module) -> dict[str, Tensor]:
    """The module's weights as a state: detached fp32 CPU copies, contiguous."""
    return {name: p.detach().to("cpu", torch.float32).contiguous().clone()
            for name, p in model.named_parameters()}


def n_params(state: Mapping[str, Tensor]) -> int:
    return sum(t.numel() for t in state.values())


def check_state(config: GPTConfig, state: Mapping[str, Tensor]) -> None:
    """ValueError naming the first missing, unexpected or misshapen tensor."""
    check_shapes(expected_shapes(config), state)


# --------------------------------------------------------------------------- files


def config_to_json(config: GPTConfig) -> dict[str, Any]:
    return {"architecture": ARCHITECTURE, **dataclasses.asdict(config)}


def config_from_json(obj: Any) -> GPTConfig:
    """The config of a parsed ``config.json``; ValueError when it is not one of ours."""
    if not isinstance(obj, dict):
        raise ValueError("config.json is not a JSON object")
    if obj.get("architecture") != ARCHITECTURE:
        raise ValueError(f"config.json: architecture {obj.get('architecture')!r}, "
                         f"expected {ARCHITECTURE!r}")
    fields = {f.name for f in dataclasses.fields(GPTConfig)}
    unknown = sorted(set(obj) - fields - {"architecture"})
    if unknown:
        raise ValueError(f"config.json: unknown field {unknown[0]!r}")
    try:
        return GPTConfig(**{k: v for k, v in obj.items() if k in fields})
    except (TypeError, ValueError) as e:
        raise ValueError(f"config.json: {e}") from None


def config_bytes(config: GPTConfig) -> bytes:
    return (json.dumps(config_to_json(config), sort_keys=True, indent=1) + "\n").encode()


STATE_METADATA = {"format": "pt"}  # what transformers' loaders expect of a torch file


def _canonical(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A state as its file holds it: fp32, contiguous, names sorted (safetensors itself
    orders tensors by dtype then name; sorting here costs nothing and keeps the order
    explicit)."""
    return {k: state[k].detach().to("cpu", torch.float32).contiguous() for k in sorted(state)}


def state_bytes(state: Mapping[str, Tensor]) -> bytes:
    """safetensors bytes of a state: :func:`_canonical`, fixed metadata."""
    return save(_canonical(state), metadata=STATE_METADATA)


def write_state(path: Path, state: Mapping[str, Tensor]) -> str:
    """``state_bytes(state)`` written atomically to ``path`` without those bytes ever being
    in memory (safetensors' save_file writes the tensors' own memory; ``save`` builds the
    file twice over, in Rust and as Python bytes: two more copies of a model). Returns
    the file's sha256, read back in chunks."""
    tmp = _tmp_beside(path)
    save_file(_canonical(state), str(tmp), metadata=STATE_METADATA)
    digest = hashlib.sha256()
    with open(tmp, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return digest.hexdigest()


def _tmp_beside(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def write_atomic(path: Path, data: bytes) -> None:
    """Write to a temporary name beside ``path`` and rename: a crash leaves no half file."""
    tmp = _tmp_beside(path)
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_model(out_dir: str | os.PathLike[str], config: GPTConfig,
               state: Mapping[str, Tensor]) -> None:
    """Write ``config.json`` and ``model.safetensors`` into ``out_dir`` (created if needed).
    The bytes are a pure function of (config, state). The weights go first and the config
    last, each renamed into place, so a directory with a config holds complete weights."""
    check_state(config, state)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_state(out / WEIGHTS_FILE, state)
    write_atomic(out / CONFIG_FILE, config_bytes(config))


def load_model(model_dir: str | os.PathLike[str]) -> tuple[GPTConfig, dict[str, Tensor]]:
    """Read a model directory written by :func:`save_model` (or any peer's identical one).
    ValueError with a message on a missing or bad config, unreadable weights, or a tensor
    name, shape or dtype that does not match the config."""
    d = Path(model_dir)
    cfg_path = d / CONFIG_FILE
    try:
        raw = cfg_path.read_bytes()
    except FileNotFoundError:
        raise ValueError(f"{cfg_path}: no such file") from None
    try:
        obj = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{cfg_path}: not valid JSON ({e})") from None
    config = config_from_json(obj)
    w_path = d / WEIGHTS_FILE
    if not w_path.is_file():
        raise ValueError(f"{w_path}: no such file")
    try:
        state = mmap_safetensors(w_path)
    except (OSError, ValueError) as e:
        raise ValueError(f"{w_path}: unreadable safetensors ({e})") from None
    for name, t in state.items():
        if t.dtype != torch.float32:
            raise ValueError(f"tensor {name!r} is {t.dtype}, expected float32")
    check_state(config, state)
    return config, state
