"""DiLoCo-style training as pure torch functions: inner training, deltas, checks, outer step.

One round of a job, from the base version ``base`` (a state, see :mod:`node.ml.gpt`):

1. each worker runs :func:`train_task` on its data slice: ``steps`` inner AdamW steps from
   ``base``, a fresh optimizer per task, and returns ``delta = trained - base`` (fp32),
   which goes on the wire as :func:`quantize_int8` (about 1 byte a parameter);
2. the coordinator checks every delta (:func:`check_delta`, then protocol/checking.py's
   ``judge``): held-out loss of ``base + delta``, gain on the worker's own slice against
   gain on other training data, cosine against the round's earlier deltas, and for a
   sample of tasks a re-execution;
3. it combines the accepted deltas with :func:`robust_aggregate`, takes a Nesterov outer
   step (:func:`outer_step`, the outer gradient is ``-avg_delta``), quantizes the update
   to int8 (:func:`publish_update`, with error feedback) and publishes the next version,
   which is exactly ``apply_update(base, q_update)``: a worker holding ``base`` rebuilds the
   identical bytes from the small update file.

No IO here beyond the tensors passed in. All maths of the published version is fp32 on the
CPU (elementwise add and multiply, correctly rounded everywhere), so the coordinator and
every worker compute the same bits whatever their thread counts.

Public API::

    train_task(config, base_state, tokens, slice_start, slice_len, seed, steps, batch_size,
               seq_len, lr, device="cpu", *, warmup=0, lr_end=None) -> TaskOutput
    evaluate(config, state, tokens, start, length, n_batches, batch_size, seq_len, seed)
    quantize_int8(delta) / dequantize(q) / payload_bytes(q)
    cosine(a, b) / robust_aggregate(deltas, method="trimmed"|"clip", trim=0.25)
    outer_step(base, avg_delta, momentum_buf, outer_lr, momentum) -> (update, new_momentum)
    publish_update(base, update, residual) -> (q_update, new_state, new_residual)
    apply_update(base, q_update) -> new_state
    check_round(config, base, candidates, tokens, ...) -> metrics by id
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from node.ml import device as devmod
from node.ml import heap, leanopt, models

__all__ = [
    "ADAM_BETAS",
    "ADAM_EPS",
    "GRAD_CLIP",
    "SCALE_SUFFIX",
    "WEIGHT_DECAY",
    "Candidate",
    "TaskOutput",
    "apply_update",
    "check_round",
    "cosine",
    "dequantize",
    "evaluate",
    "max_cosine",
    "outer_step",
    "payload_bytes",
    "publish_update",
    "quantize_int8",
    "reexec_diff",
    "robust_aggregate",
    "train_task",
]

State = dict[str, Tensor]

# Inner optimizer, fixed for every task so a re-execution needs no more than the request:
# AdamW with nanoGPT's settings (beta2 0.95 for short, noisy runs; decoupled weight decay
# 0.1 on matrices and embeddings only, none on biases and LayerNorm gains).
ADAM_BETAS = (0.9, 0.95)
ADAM_EPS = 1e-8
WEIGHT_DECAY = 0.1
GRAD_CLIP = 1.0  # global gradient-norm clip, as nanoGPT

SCALE_SUFFIX = ".__scale"
SHAPE_SUFFIX = ".__shape"  # int4 tensors only: the unpacked tensor's shape
INT8_MAX = 127  # symmetric range [-127, 127]: -128 unused so that q and -q both exist
INT4_MAX = 7  # likewise [-7, 7]
INT4_GROUP = 128  # values per int4 scale: 4 bytes of scale per 64 bytes of values


# --------------------------------------------------------------------------- data


def _as_numpy(tokens: Any) -> np.ndarray:
    if isinstance(tokens, torch.Tensor):
        return tokens.detach().cpu().numpy()
    return tokens  # a numpy array or memmap of uint8


def _window_range(start: int, length: int, seq_len: int, n_tokens: int) -> tuple[int, int]:
    """Inclusive range of window starts inside [start, start+length) that leave room for
    seq_len inputs and the next-byte target."""
    if start < 0 or length <= 0 or start + length > n_tokens:
        raise ValueError(f"range [{start}, {start + length}) outside the data (0..{n_tokens})")
    lo, hi = start, start + length - seq_len - 1
    if hi < lo:
        raise ValueError(f"range of {length} bytes is too short for seq_len {seq_len}")
    return lo, hi


def _batch(tokens: np.ndarray, starts: Tensor, seq_len: int, device: str) -> tuple[Tensor, Tensor]:
    """Inputs and targets (B, T) for windows at ``starts``."""
    idx = starts.numpy()[:, None] + np.arange(seq_len + 1)[None, :]  # (B, T+1)
    buf = torch.from_numpy(np.asarray(tokens[idx], dtype=np.int64))
    if device != "cpu":
        buf = buf.pin_memory().to(device, non_blocking=True)
    return buf[:, :-1], buf[:, 1:]


@contextlib.contextmanager
def _determinism(device: str) -> Iterator[None]:
    """Deterministic kernels on the CPU (restored afterwards). On CUDA bitwise determinism
    would need CUBLAS_WORKSPACE_CONFIG and slower kernels; a re-execution there is
    compared with a tolerance anyway."""
    prev = torch.are_deterministic_algorithms_enabled()
    if device == "cpu":
        torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(prev)


def _autocast(device: str) -> contextlib.AbstractContextManager[Any]:
    return devmod.autocast(device, devmod.precision(device))


# --------------------------------------------------------------------------- training


@dataclasses.dataclass
class TaskOutput:
    delta: State  # trained - base, fp32 on the CPU
    first_loss: float  # training loss of the first batch (before any step)
    last_loss: float  # mean training loss over the last tenth of the steps
    tokens_processed: int  # steps * batch_size * seq_len
    micro_batch: int = 0  # sequences per forward pass (gradients accumulated to the batch)


def lr_at(step: int, steps: int, lr: float, warmup: int, lr_end: float | None) -> float:
    """Linear warmup over ``warmup`` steps, then constant (``lr_end`` None) or a straight
    line from ``lr`` down to ``lr_end`` at the last step. Linear on purpose: a job's global
    linear decay cut into rounds is exactly a sequence of tasks' linear segments."""
    if warmup and step < warmup:
        return lr * (step + 1) / warmup
    if lr_end is None:
        return lr
    span = max(1, steps - 1 - warmup)
    frac = min(1.0, (step - warmup) / span)
    return lr + (lr_end - lr) * frac


def train_task(config: models.Config, base_state: Mapping[str, Tensor], tokens: Any,
               slice_start: int, slice_len: int, seed: int, steps: int, batch_size: int,
               seq_len: int, lr: float, device: str = "cpu", *, warmup: int = 0,
               lr_end: float | None = None,
               on_step: Callable[[int, Tensor], None] | None = None,
               micro_batch: int | None = None, compile_model: bool = False,
               grad_checkpointing: bool = False,
               micro_batch_cache: Any = None, memory: str = "standard") -> TaskOutput:
    """Train ``steps`` AdamW steps from ``base_state`` on windows drawn (torch.Generator
    seeded by ``seed``) from [slice_start, slice_start + slice_len) and return the delta.

    Each step's ``batch_size`` windows are drawn at once, then run in micro-batches of
    ``micro_batch`` (default: all of them on the CPU, the largest that fits elsewhere,
    node/ml/device.py) whose gradients add up to the batch's: the same windows, the same
    step, whatever the card. Precision: bf16 autocast where the device has it, fp16 with
    a gradient scaler where it has only fp16, fp32 on the CPU. ``compile_model`` runs the
    model through torch.compile; ``grad_checkpointing`` recomputes a Hugging Face model's
    activations in the backward pass (less memory, about a third more compute; always on
    in the lean memory mode).

    ``memory`` (the job spec's ``train.memory``): "standard" is AdamW with a global
    gradient-norm clip; "lean" steps each parameter inside the backward pass with bf16
    moments and a per-tensor clip (node/ml/leanopt.py): about half the memory, different
    maths, so a re-execution must use the same mode.

    Deterministic on the CPU: the same inputs, micro-batch and thread count give a
    bit-identical delta. Across thread counts (a different reduction order in matmuls)
    the bits may differ. ``on_step(step, loss)`` is called after every step (progress
    reports; reading the loss tensor is a device sync point, so a caller should do it
    only now and then).
    """
    if steps <= 0 or batch_size <= 0:
        raise ValueError("steps and batch_size must be positive")
    if not 0 < seq_len <= models.block_size(config):
        raise ValueError(f"seq_len {seq_len} outside 1..{models.block_size(config)}")
    if micro_batch is not None and not 1 <= micro_batch <= batch_size:
        raise ValueError(f"micro_batch {micro_batch} outside 1..{batch_size}")
    if memory not in leanopt.MEMORY_MODES:
        raise ValueError(f"memory {memory!r}: one of {', '.join(leanopt.MEMORY_MODES)}")
    data = _as_numpy(tokens)
    lo, hi = _window_range(slice_start, slice_len, seq_len, len(data))
    gen = torch.Generator().manual_seed(int(seed))
    devmod.setup(device)
    prec = devmod.precision(device)
    lean = memory == "lean"
    if lean and prec.scaler:
        # fp16's loss scaler skips a whole step on an overflow, which a step already
        # half taken inside the backward pass cannot do.
        raise ValueError(f"memory 'lean' needs bf16 or fp32 training; {device} has fp16 only")
    with _determinism(device):
        torch.manual_seed(int(seed))  # dropout, if a config has any
        model = models.build(config, base_state, device)
        release = getattr(base_state, "release", None)
        if release is not None:
            release()  # the base's pages are not needed until the delta is taken
        heap.trim()  # the tokenizer's and the model build's garbage
        # The lean mode is for models too large for the standard one: it also recomputes
        # activations in the backward pass (the same values, so no change to the maths;
        # a worker and a re-execution of a lean job both do it).
        if (grad_checkpointing or lean) and models.is_hf(config):
            inner: Any = model.inner
            kwargs = {"use_reentrant": False}
            if hasattr(inner, "activation_checkpointing_enable"):  # transformers >= 5.x
                inner.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:  # the older name (deprecated in 5.x), from the 4.45 this project allows
                inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        model.train()
        run = torch.compile(model) if compile_model else model
        params = models.named_parameters(model)
        decay = [p for p in params.values() if p.dim() >= 2]
        no_decay = [p for p in params.values() if p.dim() < 2]
        opt: torch.optim.AdamW | None = None
        lean_opt: leanopt.LeanAdamW | None = None
        if lean:
            lean_opt = leanopt.LeanAdamW(params, betas=ADAM_BETAS, eps=ADAM_EPS,
                                         weight_decay=WEIGHT_DECAY, clip=GRAD_CLIP)
        else:
            opt = torch.optim.AdamW(
                [{"params": decay, "weight_decay": WEIGHT_DECAY},
                 {"params": no_decay, "weight_decay": 0.0}],
                lr=lr, betas=ADAM_BETAS, eps=ADAM_EPS, **devmod.adamw_kwargs(device))
        scaler = torch.amp.GradScaler(device.split(":")[0]) if prec.scaler else None

        def trial(m: int) -> None:
            """One forward and backward pass of m windows: does it fit?"""
            x, y = _batch(data, torch.full((m,), lo), seq_len, device)
            with devmod.autocast(device, prec):
                _, loss = run(x, y)
            assert loss is not None
            loss.backward()
            model.zero_grad(set_to_none=True)

        if micro_batch is None:
            key = json.dumps(models.config_json(config), sort_keys=True)
            micro_batch = devmod.micro_batch(key, device, batch_size, seq_len, trial,
                                             micro_batch_cache)
        tail = max(1, steps // 10)
        losses: list[Tensor] = []
        first = math.nan
        for step in range(steps):
            step_lr = lr_at(step, steps, lr, warmup, lr_end)
            starts = torch.randint(lo, hi + 1, (batch_size,), generator=gen)
            if lean_opt is not None:
                # The step happens inside the last micro-batch's backward pass. A gradient
                # left from a step whose last pass did not reach its parameter is dropped,
                # as the standard mode's zero_grad drops it.
                model.zero_grad(set_to_none=True)
                loss = _accumulate(run, data, starts, seq_len, device, prec, micro_batch,
                                   None, before_last=functools.partial(lean_opt.arm, step_lr))
                lean_opt.disarm()
            else:
                assert opt is not None
                for group in opt.param_groups:
                    group["lr"] = step_lr
                opt.zero_grad(set_to_none=True)
                loss = _accumulate(run, data, starts, seq_len, device, prec, micro_batch,
                                   scaler)
                if scaler is not None:
                    scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(list(params.values()), GRAD_CLIP, foreach=False)
                if scaler is not None:
                    scaler.step(opt)
                    scaler.update()
                else:
                    opt.step()
            if step == 0:
                first = float(loss)  # a device sync point, once
            if step >= steps - tail:
                losses.append(loss)
            if on_step is not None:
                on_step(step, loss)
        last = float(torch.stack(losses).mean())  # one sync for the tail
        # AdamW's state (twice the weights, or once in bf16) goes before the delta is made.
        if opt is not None:
            opt.state.clear()
        if lean_opt is not None:
            lean_opt.close()
        model.zero_grad(set_to_none=True)
        del loss, losses
        heap.trim()  # the freed state and activations, before the base's pages come in
        delta: State = {}
        for name, p in params.items():
            # One tensor at a time, in place where the weight is already an fp32 CPU
            # tensor: the trained weights become the delta, no full copy beside it.
            w = p.detach().to("cpu", torch.float32)
            delta[name] = w.sub_(base_state[name].to(torch.float32)).contiguous()
            p.data = torch.empty(0)
            if release is not None:
                release()  # the base's pages just read: a whole second copy otherwise
    return TaskOutput(delta=delta, first_loss=first, last_loss=last,
                      tokens_processed=steps * batch_size * seq_len, micro_batch=micro_batch)


def _accumulate(run: Callable[..., tuple[Tensor, Tensor | None]], data: np.ndarray,
                starts: Tensor, seq_len: int, device: str, prec: devmod.Precision,
                micro: int, scaler: Any,
                before_last: Callable[[], None] | None = None) -> Tensor:
    """Forward and backward passes over ``starts`` in chunks of ``micro``: each chunk's
    mean loss weighted by its share of the batch, so the gradients add up to those of
    the batch's mean loss. Returns that mean loss (detached). ``before_last`` is called
    just before the last chunk's backward pass (the lean mode steps inside it)."""
    total = len(starts)
    out = torch.zeros((), device=device)
    for i in range(0, total, micro):
        part = starts[i:i + micro]
        x, y = _batch(data, part, seq_len, device)
        with devmod.autocast(device, prec):
            _, loss = run(x, y)
        assert loss is not None
        scaled = loss if len(part) == total else loss * (len(part) / total)
        if before_last is not None and i + micro >= total:
            before_last()
        (scaler.scale(scaled) if scaler is not None else scaled).backward()
        out = out + scaled.detach()
    return out


@torch.no_grad()
def evaluate_model(model: torch.nn.Module, tokens: Any, start: int, length: int,
                   n_batches: int, batch_size: int, seq_len: int, seed: int,
                   device: str = "cpu") -> float:
    """Mean loss of a built model over ``n_batches`` windows batches sampled (seeded) from
    [start, start + length). The same seed gives the same windows: a gain measured as
    loss(base) - loss(new) on one seed is a paired difference, far less noisy than either."""
    data = _as_numpy(tokens)
    lo, hi = _window_range(start, length, seq_len, len(data))
    gen = torch.Generator().manual_seed(int(seed))
    was_training = model.training
    model.eval()
    total = 0.0
    for _ in range(n_batches):
        starts = torch.randint(lo, hi + 1, (batch_size,), generator=gen)
        x, y = _batch(data, starts, seq_len, device)
        with _autocast(device):
            _, loss = model(x, y)
        assert loss is not None
        total += float(loss)
    model.train(was_training)
    return total / n_batches


def evaluate(config: models.Config, state: Mapping[str, Tensor], tokens: Any, start: int,
             length: int, n_batches: int, batch_size: int, seq_len: int, seed: int,
             device: str = "cpu") -> float:
    """Mean loss (nats per byte) of ``state`` on seeded windows of [start, start+length)."""
    model = models.build(config, state, device)
    return evaluate_model(model, tokens, start, length, n_batches, batch_size, seq_len, seed,
                          device)


# --------------------------------------------------------------------------- int8 deltas


def quantize_int8(delta: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Symmetric absmax int8: a tensor ``w`` becomes ``w`` (int8, same shape) and
    ``w.__scale`` (fp32): one scale per row (first dimension) for matrices, one per tensor
    for vectors, shape (1,). ``w ~= q * scale`` with error at most scale / 2. About one
    byte a parameter plus 4 bytes a row: 1.03 bytes/parameter for the tiny GPT."""
    out: dict[str, Tensor] = {}
    for name in sorted(delta):
        if name.endswith(SCALE_SUFFIX):
            raise ValueError(f"tensor name {name!r} ends with the reserved {SCALE_SUFFIX!r}")
        t = delta[name].detach().to("cpu", torch.float32)
        if not torch.isfinite(t).all():
            raise ValueError(f"tensor {name!r} has non-finite values")
        rows = t.reshape(t.shape[0], -1) if t.dim() >= 2 else t.reshape(1, -1)
        scale = rows.abs().amax(dim=1) / INT8_MAX  # (rows,)
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))  # zero rows stay zero
        q = torch.round(rows / safe[:, None]).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
        out[name] = q.reshape(t.shape).contiguous()
        out[name + SCALE_SUFFIX] = scale.contiguous()
    return out


def quantize_int4(delta: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Symmetric absmax int4 in groups: a tensor ``w`` (R rows, the first dimension; one
    row for a vector; C values a row) becomes ``w`` (uint8, shape (R, Cp / 2): two values a
    byte, the even column in the low nibble, each stored as q + 8 with q in [-7, 7]; Cp is C
    rounded up to a multiple of INT4_GROUP, the padding zero), ``w.__scale`` (fp32, shape
    (R, Cp / INT4_GROUP): one scale per group of INT4_GROUP values of a row) and
    ``w.__shape`` (int64, the tensor's shape). ``w ~= q * scale`` with error at most
    scale / 2. About 0.53 bytes a parameter: half of int8, which lets a job take twice
    the outer rounds for the same bytes."""
    out: dict[str, Tensor] = {}
    for name in sorted(delta):
        if name.endswith((SCALE_SUFFIX, SHAPE_SUFFIX)):
            raise ValueError(f"tensor name {name!r} ends with a reserved suffix")
        t = delta[name].detach().to("cpu", torch.float32)
        if not torch.isfinite(t).all():
            raise ValueError(f"tensor {name!r} has non-finite values")
        rows = t.reshape(t.shape[0], -1) if t.dim() >= 2 else t.reshape(1, -1)
        n_rows, n_cols = rows.shape
        padded = -(-max(n_cols, 1) // INT4_GROUP) * INT4_GROUP
        groups = torch.nn.functional.pad(rows, (0, padded - n_cols)).reshape(
            n_rows, padded // INT4_GROUP, INT4_GROUP)
        scale = groups.abs().amax(dim=2) / INT4_MAX  # (R, groups)
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        q = torch.round(groups / safe[:, :, None]).clamp_(-INT4_MAX, INT4_MAX)
        nib = (q.reshape(n_rows, padded) + 8).to(torch.uint8)
        out[name] = (nib[:, 0::2] | (nib[:, 1::2] << 4)).contiguous()
        out[name + SCALE_SUFFIX] = scale.contiguous()
        out[name + SHAPE_SUFFIX] = torch.tensor(list(t.shape), dtype=torch.int64)
    return out


def quantize(delta: Mapping[str, Tensor], bits: int) -> dict[str, Tensor]:
    """The wire form of a delta or an outer update at ``bits`` (8 or 4) bits a value."""
    if bits == 8:
        return quantize_int8(delta)
    if bits == 4:
        return quantize_int4(delta)
    raise ValueError(f"delta bits must be 8 or 4, got {bits}")


def _dequantize_int4(name: str, t: Tensor, s: Tensor, shape: Tensor | None) -> Tensor:
    if shape is None or shape.dtype != torch.int64 or shape.dim() != 1:
        raise ValueError(f"tensor {name!r} has no int64 {SHAPE_SUFFIX} vector")
    dims = [int(d) for d in shape.tolist()]
    if any(d < 0 for d in dims) or len(dims) > 8:
        raise ValueError(f"shape of {name!r} is not a tensor shape: {dims}")
    n_rows = dims[0] if len(dims) >= 2 else 1
    n_cols = math.prod(dims) // n_rows if n_rows else 0
    padded = -(-max(n_cols, 1) // INT4_GROUP) * INT4_GROUP
    if tuple(t.shape) != (n_rows, padded // 2):
        raise ValueError(f"tensor {name!r} has shape {list(t.shape)}, expected "
                         f"[{n_rows}, {padded // 2}] for shape {dims}")
    if tuple(s.shape) != (n_rows, padded // INT4_GROUP):
        raise ValueError(f"scale of {name!r} has shape {list(s.shape)}, expected "
                         f"[{n_rows}, {padded // INT4_GROUP}]")
    nib = torch.stack(((t & 15), (t >> 4)), dim=2).reshape(n_rows, padded).to(torch.int16)
    if (nib == 0).any():
        raise ValueError(f"tensor {name!r} holds the unused int4 code -8")
    q = (nib - 8).to(torch.float32).reshape(n_rows, padded // INT4_GROUP, INT4_GROUP)
    values = (q * s[:, :, None]).reshape(n_rows, padded)[:, :n_cols]
    return values.reshape(dims).contiguous()


def dequantize(q: Mapping[str, Tensor]) -> State:
    """fp32 tensors of an int8 file from :func:`quantize_int8`. ValueError on any malformed
    entry (a file from a peer is data, not trusted): missing or extra scales, wrong dtypes
    or shapes, non-finite scales."""
    return dict(dequantized(q))


def quantized_names(q: Mapping[str, Tensor]) -> list[str]:
    """The tensors of a quantized file, sorted (ValueError on a scale or shape entry that
    belongs to no tensor)."""
    names = [k for k in q if not k.endswith((SCALE_SUFFIX, SHAPE_SUFFIX))]
    extra = {k for k in q if k.endswith((SCALE_SUFFIX, SHAPE_SUFFIX))} - {
        k + suffix for k in names for suffix in (SCALE_SUFFIX, SHAPE_SUFFIX)}
    if extra:
        raise ValueError(f"{sorted(extra)[0]!r} has no tensor")
    return sorted(names)


def dequantized(q: Mapping[str, Tensor]) -> Iterator[tuple[str, Tensor]]:
    """:func:`dequantize` one tensor at a time, by name: only one fp32 tensor need exist."""
    for name in quantized_names(q):
        t, s = q[name], q.get(name + SCALE_SUFFIX)
        if s is None:
            raise ValueError(f"tensor {name!r} has no scale")
        if s.dtype != torch.float32 or not torch.isfinite(s).all() or (s < 0).any():
            raise ValueError(f"scale of {name!r} is not float32, negative or not finite")
        if t.dtype == torch.uint8:  # int4, two values a byte
            yield name, _finite(name, _dequantize_int4(name, t, s, q.get(name + SHAPE_SUFFIX)))
            continue
        if name + SHAPE_SUFFIX in q:
            raise ValueError(f"tensor {name!r}: a shape belongs to int4 tensors only")
        if t.dtype != torch.int8:
            raise ValueError(f"tensor {name!r}: expected int8 or packed int4 (uint8) values")
        n_rows = t.shape[0] if t.dim() >= 2 else 1
        if tuple(s.shape) != (n_rows,):
            raise ValueError(f"scale of {name!r} has shape {list(s.shape)}, expected [{n_rows}]")
        rows = t.reshape(n_rows, -1).to(torch.float32)
        yield name, _finite(name, (rows * s[:, None]).reshape(t.shape).contiguous())


def _finite(name: str, values: Tensor) -> Tensor:
    # A finite scale near float32's largest value still overflows once multiplied by a
    # code (7 x 4.9e37 is inf): no honest quantizer writes one, so the file is refused.
    if not torch.isfinite(values).all():
        raise ValueError(f"tensor {name!r} overflows float32 once scaled")
    return values


def payload_bytes(q: Mapping[str, Tensor]) -> int:
    """Bytes of tensor data in a quantized file (the safetensors header comes on top)."""
    return sum(t.numel() * t.element_size() for t in q.values())


# --------------------------------------------------------------------------- aggregation


def _flat(state: Mapping[str, Tensor], names: Sequence[str]) -> Tensor:
    return torch.cat([state[k].reshape(-1).to(torch.float32) for k in names])


def _unflat(vec: Tensor, like: Mapping[str, Tensor], names: Sequence[str]) -> State:
    out: State = {}
    offset = 0
    for k in names:
        n = like[k].numel()
        out[k] = vec[offset:offset + n].reshape(like[k].shape).contiguous()
        offset += n
    return out


def _same_names(deltas: Sequence[Mapping[str, Tensor]]) -> list[str]:
    names = sorted(deltas[0])
    for d in deltas[1:]:
        if sorted(d) != names:
            raise ValueError("deltas have different tensor names")
        for k in names:
            if d[k].shape != deltas[0][k].shape:
                raise ValueError(f"deltas disagree on the shape of {k!r}")
    return names


def cosine(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> float:
    """Cosine similarity of two states flattened into one vector each (fp64 sums); 0.0 when
    either is all zeros."""
    names = _same_names([a, b])
    dot = na = nb = 0.0
    for k in names:
        x, y = a[k].double().reshape(-1), b[k].double().reshape(-1)
        dot += float(x @ y)
        na += float(x @ x)
        nb += float(y @ y)
    if na == 0.0 or nb == 0.0:
        return 0.0
    return dot / math.sqrt(na * nb)


def norm(a: Mapping[str, Tensor]) -> float:
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in a.values()))


def robust_aggregate(deltas: Sequence[Mapping[str, Tensor]], method: str = "trimmed",
                     trim: float = 0.25, clip_iters: int = 3,
                     clip_radius: float | None = None,
                     weights: Sequence[float] | None = None) -> State:
    """Combine a round's accepted deltas so that one bad delta has bounded influence.

    ``trimmed``: coordinate-wise trimmed mean, dropping the k = ceil(trim * n) largest and
    k smallest values of every coordinate, k capped at (n - 1) // 2. With one bad delta out
    of n >= 3 every coordinate of the result lies within the range of the honest values.
    With n <= 2 nothing can be dropped: it degrades to the plain mean (no protection; the
    checks are then the only defence).

    ``clip``: centered clipping (Karimireddy, He and Jaggi 2021, "Learning from history for
    Byzantine robust optimization"): from a start point v (the trimmed mean),
    v += mean_i(clip_radius(x_i - v)) for ``clip_iters`` iterations, each difference
    scaled down to at most the radius (by default the median distance to v). One delta,
    however large, moves v by at most radius / n an iteration.

    ``weights`` (the tokens behind each delta, specs/jobs.md "Heterogeneous workers"):
    every mean above becomes a weighted mean. Trimming still drops k values by count at
    each coordinate, whatever their weights, so the robustness bound is unchanged; with
    clipping a delta moves v by at most radius * w_i / sum(w) an iteration. Equal or
    absent weights take the unweighted code path (the same bits as before).
    """
    if not deltas:
        raise ValueError("no deltas to aggregate")
    names = _same_names(deltas)
    n = len(deltas)
    stack = torch.stack([_flat(d, names) for d in deltas])  # (n, P)
    if method not in ("trimmed", "clip"):
        raise ValueError(f"unknown aggregate {method!r}")
    if weights is not None and (len(weights) != n or not all(
            math.isfinite(w) and w > 0 for w in weights)):
        raise ValueError("weights: one finite positive weight per delta")
    w = None if weights is None or len(set(weights)) == 1 else \
        torch.tensor(list(weights), dtype=torch.float64)
    k = 0 if n <= 2 else min((n - 1) // 2, math.ceil(trim * n))
    if w is not None:
        order = stack.argsort(dim=0)  # (n, P): per coordinate, which delta is where
        srt = stack.gather(0, order)[k:n - k].double()
        ws = w[order[k:n - k]]  # (n - 2k, P): each kept value's weight
        center = ((srt * ws).sum(dim=0) / ws.sum(dim=0)).to(stack.dtype)
    elif k:
        srt = stack.sort(dim=0).values
        center = srt[k:n - k].mean(dim=0)
    else:
        center = stack.mean(dim=0)
    if method == "clip":
        for _ in range(clip_iters):
            diff = stack - center  # (n, P)
            dist = diff.norm(dim=1)  # (n,)
            radius = float(dist.median()) if clip_radius is None else clip_radius
            factor = torch.where(dist > radius, radius / dist.clamp_min(1e-30),
                                 torch.ones_like(dist))
            if w is None:
                center = center + (diff * factor[:, None]).mean(dim=0)
            else:
                share = (w / w.sum()).to(stack.dtype)
                center = center + (diff * (factor * share)[:, None]).sum(dim=0)
    return _unflat(center, deltas[0], names)


# --------------------------------------------------------------------------- outer step


def outer_step(base: Mapping[str, Tensor], avg_delta: Mapping[str, Tensor],
               momentum_buf: Mapping[str, Tensor] | None, outer_lr: float,
               momentum: float) -> tuple[State, State]:
    """DiLoCo's outer Nesterov step. The outer gradient is g = -avg_delta;
    m' = momentum * m + g; update = -outer_lr * (g + momentum * m'); the new parameters are
    base + update. With outer_lr 1 and momentum 0 it is plain averaging (FedAvg).
    ``base`` only fixes the names and shapes."""
    names = sorted(base)
    if sorted(avg_delta) != names:
        raise ValueError("avg_delta does not match the base's tensors")
    update: State = {}
    new_m: State = {}
    for k in names:
        g = -avg_delta[k].to(torch.float32)
        m = g.clone() if momentum_buf is None else momentum * momentum_buf[k] + g
        new_m[k] = m.contiguous()
        update[k] = (-outer_lr * (g + momentum * m)).contiguous()
    return update, new_m


def apply_update(base: Mapping[str, Tensor], q_update: Mapping[str, Tensor]) -> State:
    """The next version: base + dequantize(q_update), fp32 on the CPU. What the
    coordinator publishes and what every worker rebuilds, bit for bit. One tensor at a
    time: beside the base and the result only one dequantized tensor exists, and a
    memory-mapped base's pages are dropped as soon as they are read."""
    if quantized_names(q_update) != sorted(base):
        raise ValueError("update does not match the base's tensors")
    release = getattr(base, "release", None)
    out: State = {}
    for k, d in dequantized(q_update):
        b = base[k].to("cpu", torch.float32)
        if d.shape != b.shape:
            raise ValueError(f"update of {k!r} has shape {list(d.shape)}")
        out[k] = (b + d).contiguous()
        if release is not None:
            release()
    return out


def publish_update(base: Mapping[str, Tensor], update: Mapping[str, Tensor],
                   residual: Mapping[str, Tensor] | None,
                   bits: int = 8) -> tuple[dict[str, Tensor], State, State]:
    """Quantize the outer update with error feedback: u = update + residual is sent as
    int8 (or int4: ``bits``), and what it could not carry (u - dequantize(q)) becomes the
    next residual, so the quantization error is delayed by one round, never lost. Returns (q_update,
    new_state, new_residual); new_state is exactly apply_update(base, q_update)."""
    u = {k: update[k] + (residual[k] if residual is not None else 0.0) for k in update}
    q = quantize(u, bits)
    deq = dequantize(q)
    new_residual = {k: (u[k] - deq[k]).contiguous() for k in u}
    return q, apply_update(base, q), new_residual


# --------------------------------------------------------------------------- checks


def cosine_matrix(deltas: Sequence[Mapping[str, Tensor]]) -> Tensor:
    """All pairwise cosines (n, n) in one Gram matrix (fp64): one pass over the data
    instead of n^2 calls of :func:`cosine`."""
    names = _same_names(deltas)
    flat = torch.stack([_flat(d, names) for d in deltas]).double()  # (n, P)
    gram = flat @ flat.T
    nrm = gram.diagonal().sqrt()
    denom = nrm[:, None] * nrm[None, :]
    return torch.where(denom > 0, gram / denom.clamp_min(1e-300), torch.zeros_like(gram))


def max_cosine(delta: Mapping[str, Tensor],
               others: Mapping[str, Mapping[str, Tensor]]) -> tuple[float, str | None]:
    """Largest cosine of ``delta`` with any of ``others`` (by id) and that id."""
    best, who = -1.0, None
    for oid in sorted(others):
        c = cosine(delta, others[oid])
        if c > best:
            best, who = c, oid
    return (best, who) if who is not None else (0.0, None)


def reexec_diff(claimed: Mapping[str, Tensor], rerun: Mapping[str, Tensor]) -> float:
    """Relative L2 difference ||claimed - rerun|| / max(||claimed||, ||rerun||), both
    dequantized deltas: 0.0 when bit-identical, about 1.4 for unrelated deltas."""
    names = _same_names([claimed, rerun])
    diff = math.sqrt(sum(float((claimed[k].double() - rerun[k].double()).pow(2).sum())
                         for k in names))
    scale = max(norm(claimed), norm(rerun))
    return 0.0 if scale == 0.0 else diff / scale


def add(base: Mapping[str, Tensor], delta: Mapping[str, Tensor]) -> State:
    return {k: (base[k] + delta[k]).contiguous() for k in base}


@dataclasses.dataclass
class Candidate:
    """One delta to check, with the task it claims to be: the training inputs let the
    checker regenerate the exact windows the worker trained on (train_task's generator)."""

    id: str
    delta: State  # dequantized, fp32
    slice_start: int
    slice_len: int
    seed: int
    steps: int
    batch_size: int
    seq_len: int


def task_windows(c: Candidate, n: int, pick_seed: int, n_tokens: int) -> Tensor:
    """``n`` window starts drawn (seeded by ``pick_seed``) from the windows the task's
    training run used, across all its steps. Replays train_task's generator: cheap (integers
    only), and exact, so the check asks "did the loss fall on the very bytes you were told
    to train on", a far sharper question than one about random windows of the slice."""
    lo, hi = _window_range(c.slice_start, c.slice_len, c.seq_len, n_tokens)
    gen = torch.Generator().manual_seed(int(c.seed))
    starts = torch.cat([torch.randint(lo, hi + 1, (c.batch_size,), generator=gen)
                        for _ in range(c.steps)])
    pick = torch.randperm(len(starts), generator=torch.Generator().manual_seed(pick_seed))
    return starts[pick[:n]]


@torch.no_grad()
def windows_loss(model: torch.nn.Module, tokens: Any, starts: Tensor, seq_len: int,
                 batch_size: int, device: str = "cpu") -> float:
    """Mean loss of ``model`` over explicit window starts, in batches of ``batch_size``."""
    data = _as_numpy(tokens)
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(starts), batch_size):
        part = starts[i:i + batch_size]
        x, y = _batch(data, part, seq_len, device)
        with _autocast(device):
            _, loss = model(x, y)
        assert loss is not None
        total += float(loss) * len(part)
        count += len(part)
    return total / count


def heldout_windows(start: int, length: int, n: int, seq_len: int, seed: int,
                    n_tokens: int) -> Tensor:
    lo, hi = _window_range(start, length, seq_len, n_tokens)
    return torch.randint(lo, hi + 1, (n,), generator=torch.Generator().manual_seed(seed))


def check_round(config: models.Config, base: Mapping[str, Tensor],
                candidates: Sequence[Candidate], tokens: Any, *, heldout: tuple[int, int],
                n_windows: int, batch_size: int, seed: int, seq_len: int | None = None,
                window_seed: int | None = None,
                device: str = "cpu") -> dict[str, dict[str, Any]]:
    """Loss and similarity checks of a round's deltas (in arrival order), by id.

    ``seed`` draws the held-out windows (a fixed seed keeps rounds comparable);
    ``window_seed`` (default ``seed``) picks which of each task's training windows are
    measured: it must be unpredictable to workers (drawn after the deltas are in), or a
    lazy worker could train on just those windows. ``seq_len`` is that of the held-out
    windows (default: the first candidate's).

    Costs (forward passes of ``n_windows`` windows each): 1 for the base on held-out, 1 for
    the base on each candidate's own windows, and 3 per candidate (held-out, own windows,
    other windows). Every gain is a paired difference, base and new on the same windows.

    Per id: ``heldout_base``, ``heldout_new``, ``heldout_gain`` (base - new); ``own_gain``
    on windows the task trained on; ``other_gain`` on the trained windows of the candidate
    whose slice lies farthest away (another worker's data, also training data);
    ``max_cosine``/``max_cosine_with`` against every other delta and
    ``max_cosine_earlier``/``..._with`` against earlier ones only (what ``judge`` in
    protocol/checking.py uses: of a copy and its original, only the later arrival is the
    copy); ``rel_norm``
    (||delta|| / ||base||).
    """
    if not candidates:
        return {}
    ids = [c.id for c in candidates]
    if len(set(ids)) != len(ids):
        raise ValueError("candidate ids are not unique")
    if seq_len is None:
        seq_len = candidates[0].seq_len
    n_tok = len(_as_numpy(tokens))
    base_model = models.build(config, base, device)
    base_norm = max(norm(base), 1e-30)
    h_starts = heldout_windows(heldout[0], heldout[1], n_windows, seq_len, seed, n_tok)
    heldout_base = windows_loss(base_model, tokens, h_starts, seq_len, batch_size, device)
    wseed = seed if window_seed is None else window_seed
    own = [task_windows(c, n_windows, wseed + 1 + i, n_tok) for i, c in enumerate(candidates)]
    own_base = [windows_loss(base_model, tokens, w, c.seq_len, batch_size, device)
                for w, c in zip(own, candidates, strict=True)]
    del base_model

    def other_of(i: int) -> int | None:
        """The candidate whose slice lies farthest from i's (ties: the next in order):
        adjacent slices can share a long file, and a shared file would make the other
        gain look like the own gain."""
        ci = candidates[i]
        best, best_gap = None, 0
        for step in range(1, len(candidates)):
            j = (i + step) % len(candidates)
            cj = candidates[j]
            gap = max(cj.slice_start - (ci.slice_start + ci.slice_len),
                      ci.slice_start - (cj.slice_start + cj.slice_len))
            if gap >= 0 and (best is None or gap > best_gap):
                best, best_gap = j, gap
        return best

    cos_m = cosine_matrix([c.delta for c in candidates])
    out: dict[str, dict[str, Any]] = {}
    for i, c in enumerate(candidates):
        new_model = models.build(config, add(base, c.delta), device)
        h_new = windows_loss(new_model, tokens, h_starts, seq_len, batch_size, device)
        own_new = windows_loss(new_model, tokens, own[i], c.seq_len, batch_size, device)
        j = other_of(i)
        if j is None:
            other_gain = None  # a lone delta (or all on one slice): nothing to compare with
        else:
            other_new = windows_loss(new_model, tokens, own[j], candidates[j].seq_len,
                                     batch_size, device)
            other_gain = own_base[j] - other_new
        row = [(float(cos_m[i, j]), candidates[j].id) for j in range(len(candidates)) if j != i]
        cos, cos_with = max(row) if row else (0.0, None)
        cos_e, cos_e_with = max(row[:i]) if i else (0.0, None)
        out[c.id] = {
            "heldout_base": heldout_base,
            "heldout_new": h_new,
            "heldout_gain": heldout_base - h_new,
            "own_gain": own_base[i] - own_new,
            "other_gain": other_gain,
            "other_with": None if j is None else candidates[j].id,
            "max_cosine": cos,
            "max_cosine_with": cos_with,
            "max_cosine_earlier": cos_e if cos_e_with is not None else None,
            "max_cosine_earlier_with": cos_e_with,
            "rel_norm": norm(c.delta) / base_norm,
        }
    return out
