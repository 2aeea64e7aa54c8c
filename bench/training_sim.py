"""The training benchmark's recipe and its in-process network simulation (part (b)).

:func:`run_simulated_network` plays a job's rounds with exactly the functions the worker
and the coordinator run inside ``python -m node.jobs.taskproc``: :func:`node.ml.trainer.train_task`,
:func:`~node.ml.trainer.quantize_int8`, :func:`~node.ml.trainer.check_round` and a sampled
re-execution, :func:`~protocol.checking.judge`, :func:`~node.ml.trainer.robust_aggregate`,
:func:`~node.ml.trainer.outer_step`, :func:`~node.ml.trainer.publish_update`, and each worker's
:func:`~node.ml.trainer.apply_update` rebuild (checked byte-identical to the coordinator's).
Deltas and updates are serialized to safetensors bytes, so the byte counts are those of
the real files. Only the transport is missing: ``bench/training.py`` takes any function of
the same signature as :func:`run_simulated_network` for part (b), such as the lead's
``run_network_job``.
"""

from __future__ import annotations

import dataclasses
import math
import random
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from safetensors.torch import load, save

from node.ml import gpt, models, trainer
from protocol import checking

State = dict[str, torch.Tensor]


@dataclasses.dataclass(frozen=True)
class Recipe:
    """Everything that fixes a benchmark run (the defaults are the tuned recipe)."""

    size: str = "tiny"
    arch: str = "gpt"  # or "llama": a transformers Llama over the byte tokenizer
    seed: int = 0
    heldout_fraction: float = 0.05
    seq_len: int = 128
    # Warm start: plain AdamW from the seed's initialisation, with the batch of all
    # workers together (DiLoCo too starts from a pretrained checkpoint).
    warm_steps: int = 300
    warm_lr: float = 2e-3
    warm_warmup: int = 30
    # The comparison: every worker (and (c)) runs `steps` steps of `batch` windows;
    # (a) runs `steps` steps of workers * batch windows.
    workers: int = 4
    steps: int = 800
    batch: int = 8
    lr: float = 1e-3
    # Linear decay of the learning rate over the `steps`, to lr * lr_final (1.0: constant),
    # the same schedule for (a), (c) and, cut into rounds, for the workers of (b).
    lr_final: float = 1.0
    # Data of a task: "per_task", "per_worker", "shared" or "plan_round" (see slice_of).
    slicing: str = "plan_round"
    # The network: rounds of `inner_steps` inner steps, then an outer Nesterov step.
    inner_steps: int = 40
    inner_warmup: int = 0  # linear lr warmup at the start of every task (fresh AdamW)
    outer_lr: float = 0.85
    outer_momentum: float = 0.9
    aggregate: str = "trimmed"
    # Bits a value of the deltas and outer updates on the wire: 8 (int8) or 4 (int4 in
    # groups); int4 halves the bytes, so twice the rounds for the same saving.
    delta_bits: int = 4
    # Checks: windows per measurement, share of tasks re-executed.
    check_windows: int = 8
    check_batch: int = 32
    reexec_fraction: float = 0.01
    # Final held-out evaluation of (a), (b), (c): the same windows for all three.
    eval_windows: int = 512

    @property
    def rounds(self) -> int:
        return self.steps // self.inner_steps


@dataclasses.dataclass
class NetworkResult:
    state: State
    bytes_sent_per_worker: int  # int8 deltas, per worker over the whole run
    bytes_received_per_worker: int  # int8 outer updates
    base_bytes: int  # the initial base model, fetched once (fp32 safetensors)
    data_bytes_per_worker: int  # data slices fetched
    train_wall_s: float  # sum over all tasks
    check_wall_s: float  # loss and similarity checks, sum over rounds
    reexec_wall_s: float  # re-executions, sum
    reexec_count: int
    tasks: int
    rejected: int
    rounds: list[dict[str, Any]]


def log(msg: str) -> None:
    print(f"[training {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def slice_of(recipe: Recipe, train_len: int, rnd: int, worker: int) -> tuple[int, int]:
    """(start, length) of a task's data.

    ``per_worker``: worker w trains on the w-th of ``workers`` equal parts of the training
    split in every round (a new seed, so new windows, each round). ``per_task``: the split
    cut into rounds * workers slices, one per task, interleaved (worker w takes slice
    w * rounds + rnd), so no byte is trained on twice. ``shared``: every task samples the
    whole split. ``plan_round``: what the network's coordinator does
    (protocol.coordination.plan_round: ``per_worker``'s parts, task i of round r taking
    part (i + r) mod workers).
    Small slices hold few files (an 11 MB split in 80 slices: about 8 files each), and a
    worker that trains on eight files drifts towards them: the round's average then covers
    a few dozen files where one data-parallel step samples hundreds.
    """
    if recipe.slicing == "plan_round":
        from protocol.coordination import plan_round

        plans = plan_round(job_seed=recipe.seed, round_=rnd, rounds=recipe.rounds,
                           n_tasks=recipe.workers, train_len=train_len,
                           min_slice=recipe.seq_len + 2)
        return plans[worker].slice_start, plans[worker].slice_len
    if recipe.slicing == "shared":
        return 0, train_len
    if recipe.slicing == "per_worker":
        length = train_len // recipe.workers
        return worker * length, length
    if recipe.slicing != "per_task":
        raise ValueError(f"unknown slicing {recipe.slicing!r}")
    n = recipe.rounds * recipe.workers
    length = train_len // n
    return (worker * recipe.rounds + rnd) * length, length


def lr_range(recipe: Recipe, rnd: int) -> tuple[float, float | None]:
    """(lr, lr_end) of a round's tasks: their segment of the run's linear decay."""
    if recipe.lr_final == 1.0:
        return recipe.lr, None

    def g(t: int) -> float:
        return recipe.lr * (1.0 - (1.0 - recipe.lr_final) * t / max(1, recipe.steps - 1))

    return g(rnd * recipe.inner_steps), g((rnd + 1) * recipe.inner_steps - 1)


def task_seed(recipe: Recipe, rnd: int, worker: int) -> int:
    return recipe.seed * 1_000_003 + 1000 + rnd * 100 + worker


def run_simulated_network(recipe: Recipe, config: models.Config, base: State, tokens: Any,
                          train_len: int, heldout: tuple[int, int],
                          on_round: Callable[[int, State], None] | None = None) -> NetworkResult:
    """Part (b), in one process: ``recipe.rounds`` rounds of ``recipe.workers`` tasks."""
    rng = random.Random(recipe.seed)
    momentum: State | None = None
    residual: State | None = None
    sent = received = data = 0
    train_s = check_s = reexec_s = 0.0
    reexecs = rejected = 0
    rounds: list[dict[str, Any]] = []
    base_bytes = len(gpt.state_bytes(base))
    for rnd in range(recipe.rounds):
        cands: list[trainer.Candidate] = []
        losses = []
        lr, lr_end = lr_range(recipe, rnd)
        for w in range(recipe.workers):
            start, length = slice_of(recipe, train_len, rnd, w)
            seed = task_seed(recipe, rnd, w)
            t0 = time.perf_counter()
            out = trainer.train_task(config, base, tokens, start, length, seed,
                                     recipe.inner_steps, recipe.batch, recipe.seq_len,
                                     lr, warmup=recipe.inner_warmup, lr_end=lr_end)
            train_s += time.perf_counter() - t0
            wire = save(trainer.quantize(out.delta, recipe.delta_bits))  # what it publishes
            sent += len(wire)
            data += length
            losses.append((out.first_loss, out.last_loss))
            cands.append(trainer.Candidate(f"r{rnd}w{w}", trainer.dequantize(load(wire)),
                                           start, length, seed, recipe.inner_steps,
                                           recipe.batch, recipe.seq_len))
        t0 = time.perf_counter()
        metrics = trainer.check_round(config, base, cands, tokens, heldout=heldout,
                                      n_windows=recipe.check_windows,
                                      batch_size=recipe.check_batch, seed=rnd)
        check_s += time.perf_counter() - t0
        accepted = []
        for c in cands:
            m = metrics[c.id]
            m["reexec_match"] = None
            if rng.random() < recipe.reexec_fraction:
                t0 = time.perf_counter()
                again = trainer.train_task(config, base, tokens, c.slice_start, c.slice_len,
                                           c.seed, c.steps, c.batch_size, c.seq_len, lr,
                                           warmup=recipe.inner_warmup, lr_end=lr_end)
                rerun = trainer.dequantize(trainer.quantize(again.delta, recipe.delta_bits))
                m["reexec_diff"] = trainer.reexec_diff(c.delta, rerun)
                m["reexec_match"] = m["reexec_diff"] <= checking.DEFAULT_THRESHOLDS.reexec_tol
                reexec_s += time.perf_counter() - t0
                reexecs += 1
            verdict, reason = checking.judge(m)
            m["verdict"], m["reason"] = verdict, reason
            if verdict == "accept":
                accepted.append(c.delta)
            else:
                rejected += 1
                log(f"round {rnd}: {c.id} rejected: {reason}")
        if accepted:
            avg = trainer.robust_aggregate(accepted, method=recipe.aggregate)
            update, momentum = trainer.outer_step(base, avg, momentum, recipe.outer_lr,
                                                  recipe.outer_momentum)
            q, new_state, residual = trainer.publish_update(base, update, residual,
                                                            recipe.delta_bits)
            wire = save(q)
            received += len(wire)
            rebuilt = trainer.apply_update(base, load(wire))  # what each worker does
            if gpt.state_bytes(rebuilt) != gpt.state_bytes(new_state):
                raise AssertionError("a worker's rebuilt version differs from the published")
            base = new_state
        rounds.append({
            "round": rnd,
            "accepted": len(accepted),
            "train_loss": [round(b, 4) for _, b in losses],
            "heldout_gain": [round(metrics[c.id]["heldout_gain"], 4) for c in cands],
            "own_gain": [round(metrics[c.id]["own_gain"], 4) for c in cands],
            "own_excess": [round(metrics[c.id]["own_gain"] - (metrics[c.id]["other_gain"] or 0),
                                 4) for c in cands],
            "max_cosine": [round(metrics[c.id]["max_cosine"], 3) for c in cands],
            "reexec_match": [metrics[c.id]["reexec_match"] for c in cands],
        })
        if on_round is not None:
            on_round(rnd, base)
    return NetworkResult(
        state=base, bytes_sent_per_worker=sent // recipe.workers,
        bytes_received_per_worker=received, base_bytes=base_bytes,
        data_bytes_per_worker=data // recipe.workers, train_wall_s=train_s,
        check_wall_s=check_s, reexec_wall_s=reexec_s, reexec_count=reexecs,
        tasks=recipe.rounds * recipe.workers, rejected=rejected, rounds=rounds)


# Part (b) of the benchmark: (recipe, config, base state, tokens, train_len, (held-out start,
# length), on_round callback) -> NetworkResult. run_simulated_network is one; the network
# path (the lead's run_network_job, through real daemons) is to be another.
RunNetwork = Callable[[Recipe, models.Config, State, Any, int, tuple[int, int],
                       Callable[[int, State], None] | None], NetworkResult]


def allreduce_bytes_per_worker(n_params: int, workers: int, steps: int) -> int:
    """Ring all-reduce of fp32 gradients: each worker sends (and receives)
    2 (N - 1) / N * 4P bytes a step."""
    return math.floor(2 * (workers - 1) / workers * 4 * n_params * steps)
