"""Sizing a round's tasks to its workers' measured throughput: sans-IO (specs/jobs.md,
"Heterogeneous workers").

Workers differ: a CPU next to a GPU, a throttled container next to a free one. A round
whose tasks are all the same size waits for its slowest worker. The coordinator instead

1. measures each worker's throughput from its own past tasks of the job
   (:func:`observe`): tokens the coordinator assigned, over the time the coordinator
   itself saw between the worker taking the task and its result arriving, only for
   results that were checked and accepted. Nothing the worker claims enters it: not the
   ``tflops`` of its capability record, not the ``wall_ms`` of its result;
2. sizes the round (:func:`size_round`): the round's tokens (``workers_per_round *
   inner_steps`` steps of the job's batch) are shared among the worker *slots* (one per
   GPU a node lists, else one; item 4 of issue 19) in proportion to their rates, so
   that the tasks finish together. Batch size and sequence length stay the job's; only
   the number of inner steps of a task differs.

A worker never measured is sized as the median of the measured ones (equal shares in
round 0), so a newcomer neither stalls a round nor takes it over; its first accepted
task measures it. Everything here is exact integer or rational arithmetic: two
coordinators given the same inputs size a round identically.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction

from protocol.capability import EnvReport
from protocol.errors import LocalProtocolError

# The newest accepted task's rate counts this much against the estimate before it: one
# slow task (a fetch that waited, a neighbour's burst) moves the estimate halfway, two
# move it three quarters.
RATE_ALPHA = 0.5
# No task is sized beyond this many times the job's inner_steps. DiLoCo's deltas stay
# comparable in size (a delta of 10x the steps drifts 10x as far and dominates the
# average), and a mis-measured rate cannot hand one worker the whole round.
MAX_SIZE_RATIO = 4
MAX_INNER_STEPS = 1_000_000  # = protocol.jobspec.MAX_INNER_STEPS
MAX_SLOTS = 64  # worker slots of one node (GPUs in one capability record)


@dataclass(frozen=True)
class Rate:
    """A worker's measured throughput: tokens per second per slot, over ``tasks``
    accepted tasks (an exponentially weighted mean, :data:`RATE_ALPHA`)."""

    tokens_per_s: float
    tasks: int

    def __post_init__(self) -> None:
        if not (math.isfinite(self.tokens_per_s) and self.tokens_per_s > 0):
            raise LocalProtocolError(f"tokens_per_s must be finite and > 0, "
                                     f"got {self.tokens_per_s}")
        if self.tasks < 1:
            raise LocalProtocolError("a rate is measured over at least one task")


def observe(old: Rate | None, tokens: int, elapsed_ms: int) -> Rate:
    """The rate after one more accepted task of ``tokens`` tokens that took ``elapsed_ms``
    as the coordinator saw it (from the worker's acceptance to its result)."""
    if tokens < 1:
        raise LocalProtocolError(f"an accepted task has tokens, got {tokens}")
    sample = tokens * 1000 / max(elapsed_ms, 1)  # a result faster than 1 ms is 1 ms
    if old is None:
        return Rate(sample, 1)
    return Rate(RATE_ALPHA * sample + (1 - RATE_ALPHA) * old.tokens_per_s, old.tasks + 1)


def apportion(total: int, weights: Sequence[Fraction], lo: Sequence[int],
              hi: Sequence[int]) -> list[int]:
    """Integers ``a`` with ``sum(a) == total`` and ``lo[i] <= a[i] <= hi[i]``, as close to
    proportional to ``weights`` as the bounds allow: the real shares are
    ``clamp(lam * w, lo, hi)`` with ``lam`` solved exactly, then floors plus one for the
    largest fractional parts (Hamilton's method; ties to the larger weight, then the
    lower index). A larger weight never gets less when its bounds are not smaller."""
    n = len(weights)
    if not (n == len(lo) == len(hi)) or n == 0:
        raise LocalProtocolError("weights and bounds must be non-empty and of one length")
    if any(w <= 0 for w in weights) or any(a > b for a, b in zip(lo, hi, strict=True)):
        raise LocalProtocolError("weights must be > 0 and lo <= hi")
    if not sum(lo) <= total <= sum(hi):
        raise LocalProtocolError(f"{total} does not fit bounds summing to "
                                 f"[{sum(lo)}, {sum(hi)}]")
    shares = _water_fill(Fraction(total), weights, lo, hi)
    floors = [math.floor(s) for s in shares]
    left = total - sum(floors)
    order = sorted(range(n), key=lambda i: (-(shares[i] - floors[i]), -weights[i], i))
    for i in order[:left]:
        floors[i] += 1
    return floors


def _water_fill(total: Fraction, weights: Sequence[Fraction], lo: Sequence[int],
                hi: Sequence[int]) -> list[Fraction]:
    """``clamp(lam * w_i, lo_i, hi_i)`` summing to ``total``: ``lam`` lies between two of
    the breakpoints ``lo_i / w_i``, ``hi_i / w_i``, and on each piece the sum is linear."""
    def at(lam: Fraction) -> list[Fraction]:
        return [min(max(lam * w, Fraction(a)), Fraction(b))
                for w, a, b in zip(weights, lo, hi, strict=True)]

    points = sorted({Fraction(a) / w for w, a in zip(weights, lo, strict=True)}
                    | {Fraction(b) / w for w, b in zip(weights, hi, strict=True)})
    prev = points[0]
    for point in points:
        if sum(at(point)) >= total:
            # Linear between prev and point: solve for lam on that piece.
            s0, s1 = sum(at(prev)), sum(at(point))
            lam = point if s1 == s0 else prev + (point - prev) * (total - s0) / (s1 - s0)
            return at(lam)
        prev = point
    return at(points[-1])  # total == sum(hi)


def slots_of(env: EnvReport, device: str) -> int:
    """A worker's slots for a job whose ``requirements.device`` is ``device``: one per GPU
    its capability record lists (at most :data:`MAX_SLOTS`), or one when it lists none or
    the job trains on the CPU (one CPU task at a time uses every core it is given)."""
    if device == "cpu" or not env.gpus:
        return 1
    return min(len(env.gpus), MAX_SLOTS)


@dataclass(frozen=True)
class Sized:
    """One task of a round: the worker (and its slot) it is sized for, and its steps."""

    worker: str
    slot: int
    steps: int


def rates_for(workers: Sequence[str], measured: Mapping[str, Rate]) -> dict[str, Fraction]:
    """The rate each worker is sized by: its measured rate, or the median of the
    measured ones among ``workers`` (1 when none is measured). Exact fractions."""
    known = sorted(Fraction(measured[w].tokens_per_s) for w in workers if w in measured)
    if known:
        mid = len(known) // 2
        default = known[mid] if len(known) % 2 else (known[mid - 1] + known[mid]) / 2
    else:
        default = Fraction(1)
    return {w: Fraction(measured[w].tokens_per_s) if w in measured else default
            for w in workers}


def size_round(slots: Mapping[str, int], measured: Mapping[str, Rate], *, n_tasks: int,
               inner_steps: int) -> list[Sized]:
    """The round's ``n_tasks`` tasks, sized so that each worker slot's share of the
    round's ``n_tasks * inner_steps`` steps is proportional to its rate (each task at
    least 1 step and at most ``MAX_SIZE_RATIO * inner_steps``).

    ``slots`` maps each candidate worker to its slot count. With at least ``n_tasks``
    slots, the fastest ``n_tasks`` take one task each (ties: by worker id, then slot);
    with fewer, every slot takes one or more, their counts and their steps proportional
    to the rates. Task ``i`` of the result is task ``i`` of the round; tasks are ordered
    by worker id and slot."""
    if not 1 <= n_tasks <= 1024 or not 1 <= inner_steps <= MAX_INNER_STEPS:
        raise LocalProtocolError("n_tasks must be in [1, 1024], inner_steps in [1, 10^6]")
    if not slots or any(not 1 <= k <= MAX_SLOTS for k in slots.values()):
        raise LocalProtocolError(f"at least one worker, each with 1..{MAX_SLOTS} slots")
    rate = rates_for(sorted(slots), measured)
    units = [(w, j) for w in sorted(slots) for j in range(slots[w])]
    total = n_tasks * inner_steps
    cap = min(MAX_INNER_STEPS, MAX_SIZE_RATIO * inner_steps)
    if len(units) >= n_tasks:
        chosen = sorted(sorted(units, key=lambda u: (-rate[u[0]], u))[:n_tasks])
        steps = apportion(total, [rate[w] for w, _ in chosen], [1] * n_tasks,
                          [cap] * n_tasks)
        return [Sized(w, j, s) for (w, j), s in zip(chosen, steps, strict=True)]
    weights = [rate[w] for w, _ in units]
    counts = apportion(n_tasks, weights, [1] * len(units), [n_tasks] * len(units))
    per_unit = apportion(total, weights, counts, [k * cap for k in counts])
    out = []
    for (w, j), k, steps_u in zip(units, counts, per_unit, strict=True):
        base, extra = divmod(steps_u, k)
        out += [Sized(w, j, base + (1 if t < extra else 0)) for t in range(k)]
    return out


def weights_of(tokens: Sequence[int]) -> list[float]:
    """The outer step's weight of each accepted delta: the tokens behind it, as a
    fraction of the round's accepted tokens (they sum to 1)."""
    if not tokens or any(t < 1 for t in tokens):
        raise LocalProtocolError("weights need at least one delta, each with tokens")
    whole = sum(tokens)
    return [t / whole for t in tokens]
