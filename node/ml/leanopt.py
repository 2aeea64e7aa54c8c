"""The "lean" memory mode of training (job spec ``train.memory = "lean"``, specs/jobs.md).

Two changes to the inner AdamW, both part of the training maths (a re-execution must use
the same mode, which is why the mode is a job spec field and not a worker's choice):

1. The optimizer step is fused into the backward pass: each parameter is stepped from its
   ``register_post_accumulate_grad_hook`` as soon as its gradient is complete, and the
   gradient is freed at once, so the gradients of the whole model never exist together
   (PyTorch's recipe "How to save memory by fusing the optimizer step into the backward
   pass"). The global gradient-norm clip needs every gradient at once; it becomes a
   per-tensor clip (each parameter's gradient scaled to norm at most GRAD_CLIP).
   With micro-batches the hooks are armed only for the last micro-batch's backward: the
   earlier ones accumulate into ``.grad`` as usual, so the step sees the batch's gradient.
2. AdamW's two moments are kept in bf16 (half the bytes of fp32). Each step computes in
   fp32 (the stored moments widened, updated, then rounded to nearest-even back into bf16:
   deterministic on every device) and moves the weight with the fp32 values.

Weights stay fp32. Together: weights 1x + moments 1x instead of weights 1x + gradients 1x +
moments 2x of the fp32 model.

The step is written here rather than taken from torch.optim.AdamW because torch keeps the
state in the parameter's dtype; with fp32 moments :func:`adamw_step` computes exactly what
torch's per-parameter AdamW loop (``foreach=False``) computes, bit for bit (tested).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from protocol.jobspec import MEMORY_MODES  # the job spec's train.memory choices

__all__ = ["MEMORY_MODES", "LeanAdamW", "adamw_step"]

MOMENT_DTYPE = torch.bfloat16


@torch.no_grad()
def adamw_step(p: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, step: int,
               lr: float, betas: tuple[float, float], eps: float,
               weight_decay: float) -> None:
    """One decoupled-weight-decay Adam step of ``p`` (torch's formulas, in their order).
    Moments of another dtype than ``p`` are widened to it for the step and rounded back."""
    beta1, beta2 = betas
    m = exp_avg.to(p.dtype)  # the state itself when the dtypes agree: updated in place
    v = exp_avg_sq.to(p.dtype)
    if weight_decay != 0:
        p.mul_(1 - lr * weight_decay)
    m.lerp_(grad, 1 - beta1)
    v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    if m is not exp_avg:
        exp_avg.copy_(m)
        exp_avg_sq.copy_(v)
    step_size = lr / (1 - beta1**step)
    denom = (v.sqrt() / (1 - beta2**step) ** 0.5).add_(eps)
    p.addcdiv_(m, denom, value=-step_size)


class LeanAdamW:
    """AdamW stepped parameter by parameter inside the backward pass (bf16 moments).

    Call :meth:`arm` before the backward pass of a step's last micro-batch (it advances
    the step count and sets the learning rate); the hooks then clip, step and free each
    gradient as it is completed; :meth:`disarm` after that pass. :meth:`close`
    removes the hooks and frees the moments.
    """

    def __init__(self, params: Mapping[str, Tensor], *, betas: tuple[float, float],
                 eps: float, weight_decay: float, clip: float) -> None:
        self.betas, self.eps, self.clip = betas, eps, clip
        self.lr = 0.0
        self.step = 0
        self.armed = False
        # Decoupled weight decay on matrices and embeddings only, as the standard mode.
        self._decay = {id(p): weight_decay if p.dim() >= 2 else 0.0 for p in params.values()}
        self._state: dict[int, tuple[Tensor, Tensor]] = {}
        self._handles = [p.register_post_accumulate_grad_hook(self._hook)
                         for p in params.values() if p.requires_grad]
        self.stepped = 0  # parameters stepped in the current armed pass

    def arm(self, lr: float) -> None:
        self.step += 1
        self.lr = lr
        self.armed = True
        self.stepped = 0

    def disarm(self) -> None:
        self.armed = False

    def _hook(self, p: Tensor) -> None:
        if not self.armed or p.grad is None:
            return  # an earlier micro-batch: the gradient keeps accumulating
        grad = p.grad
        # Per-tensor clip: the global norm would need every gradient at once.
        torch.nn.utils.clip_grad_norm_([p], self.clip, foreach=False)
        state = self._state.get(id(p))
        if state is None:
            state = (torch.zeros_like(p, dtype=MOMENT_DTYPE, memory_format=torch.preserve_format),
                     torch.zeros_like(p, dtype=MOMENT_DTYPE, memory_format=torch.preserve_format))
            self._state[id(p)] = state
        adamw_step(p, grad, state[0], state[1], self.step, self.lr, self.betas, self.eps,
                   self._decay[id(p)])
        p.grad = None  # the point of the mode: this gradient's memory goes now
        self.stepped += 1

    def state_bytes(self) -> int:
        return sum(m.nbytes + v.nbytes for m, v in self._state.values())

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._state.clear()

