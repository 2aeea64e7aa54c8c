"""Sizing a round's tasks to its workers' measured speed: sans-IO (specs/jobs.md,
"Heterogeneous workers").

Workers differ: a CPU next to a GPU, a throttled container next to a free one. A round
whose tasks are all the same size waits for its slowest worker. The coordinator instead

1. measures each worker from its own past tasks of the job (:func:`record`, :func:`fit`):
   the tokens the coordinator assigned, against the time the coordinator itself saw
   between the worker taking the task and its result arriving, only for results that
   were checked and accepted. Nothing the worker claims enters it: not the ``tflops`` of
   its capability record, not the ``wall_ms`` of its result. From its last
   :data:`WINDOW` tasks a worker's time is fitted as ``overhead + tokens / rate``
   (Siegel's repeated medians: one odd task among four of distinct sizes moves
   nothing): a task has a fixed cost
   (starting its processes, loading and rebuilding the model, publishing the delta)
   that fewer tokens do not shorten;
2. sizes the round (:func:`size_round`): the round's steps (``workers_per_round *
   inner_steps``) are shared among the worker *slots* (one per GPU a node lists, else
   one; item 4 of issue 19) so that every task is predicted to end at one target time,
   the earliest the fits allow. A slot whose overhead alone (plus one step) exceeds that
   target is left out of the round: it would only make the round wait. It is sized in
   again after :data:`RETRY_ROUNDS` rounds out, so that a worker that got faster can show
   it. Batch size and sequence length stay the job's; only a task's inner steps differ.

A worker never measured is sized as the median of the measured ones (equal shares in
round 0), so a newcomer neither stalls a round nor takes it over; its first accepted
task measures it. Everything here is exact integer or rational arithmetic: two
coordinators given the same inputs size a round identically.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction

from protocol.capability import EnvReport
from protocol.errors import LocalProtocolError

# A worker's fit uses its last this many accepted tasks: enough that one odd task (a
# fetch that waited, a neighbour's burst) is outvoted (repeated medians need four), few
# enough that a worker whose speed changed is measured anew within a few rounds.
WINDOW = 5
# The overhead is only fitted from tasks whose sizes differ at least this much (the
# largest over the smallest): an intercept extrapolated from sizes within 2x of each
# other is mostly the noise of a loaded machine (tens of percent from round to round).
# Tasks all of one size are fitted as proportional, ``time = tokens / rate``.
MIN_SPREAD = 2
# ... and only from at least this many distinct sizes: with two, the line runs through a
# size's lone sample whatever it is ([40, 40, 40, 10] steps with the 10-step task slow
# gives a large overhead, which could leave the worker out).
MIN_SIZES = 3
# A slot left out of this many rounds in a row is sized into the next one anyway (by
# its fit, so its task is short): its new time is the only way to see it recover.
RETRY_ROUNDS = 3
# No task is sized beyond this many times the job's inner_steps. DiLoCo's deltas stay
# comparable in size (a delta of 10x the steps drifts 10x as far and dominates the
# average), and a mis-measured worker cannot be handed the whole round.
MAX_SIZE_RATIO = 4
MAX_INNER_STEPS = 1_000_000  # = protocol.jobspec.MAX_INNER_STEPS
MAX_SLOTS = 64  # worker slots of one node (GPUs in one capability record)
MAX_SAMPLE_MS = 2**53  # a sample's time; a task's deadline is far shorter


@dataclass(frozen=True)
class Sample:
    """One accepted task of a worker: the tokens it was assigned and the milliseconds the
    coordinator saw from the worker's acceptance to its result."""

    tokens: int
    elapsed_ms: int

    def __post_init__(self) -> None:
        if not (1 <= self.tokens <= 2**63 - 1 and 0 <= self.elapsed_ms <= MAX_SAMPLE_MS):
            raise LocalProtocolError(f"a sample has tokens >= 1 and a time in "
                                     f"[0, 2^53] ms, got {self.tokens}, {self.elapsed_ms}")


def record(samples: Sequence[Sample], tokens: int, elapsed_ms: int) -> list[Sample]:
    """The window after one more accepted task (the last :data:`WINDOW` kept). A result
    faster than 1 ms counts as 1 ms."""
    return [*samples, Sample(tokens, max(elapsed_ms, 1))][-WINDOW:]


@dataclass(frozen=True)
class Fit:
    """A worker slot's predicted task time, ``overhead_ms + tokens * ms_per_token``."""

    overhead_ms: Fraction  # >= 0
    ms_per_token: Fraction  # > 0

    def ms(self, tokens: int) -> Fraction:
        return self.overhead_ms + self.ms_per_token * tokens

    @property
    def tokens_per_s(self) -> float:
        return float(1000 / self.ms_per_token)


def _median(xs: Sequence[Fraction]) -> Fraction:
    v = sorted(xs)
    mid = len(v) // 2
    return v[mid] if len(v) % 2 else (v[mid - 1] + v[mid]) / 2


def fit(samples: Sequence[Sample]) -> Fit | None:
    """``time = overhead + tokens / rate`` through a worker's samples, None without any.

    Siegel's repeated median: the slope is the median over samples ``i`` of the median
    slope from ``i`` to the others (of another size), the overhead the median of
    ``time - slope * tokens``; with four samples or more of distinct sizes one of them
    may be anything and the fit is still that of the others (with repeated sizes a
    lone one weighs more). Proportional (``overhead = 0``, the median of ``time /
    tokens``) when the sizes are too close or too few to separate the two
    (:data:`MIN_SPREAD`, :data:`MIN_SIZES`) or the line is not a physical one (a slope
    not above 0: the time did not grow with the tokens; an overhead below 0)."""
    if not samples:
        return None
    xs = [Fraction(s.tokens) for s in samples]
    ys = [Fraction(s.elapsed_ms) for s in samples]
    proportional = Fit(Fraction(0), max(_median([y / x for x, y in zip(xs, ys, strict=True)]),
                                        Fraction(1, 10**9)))
    if max(xs) < MIN_SPREAD * min(xs) or len(set(xs)) < MIN_SIZES:
        return proportional
    per_point = []
    for i, (xi, yi) in enumerate(zip(xs, ys, strict=True)):
        slopes = [(yj - yi) / (xj - xi) for j, (xj, yj) in enumerate(zip(xs, ys, strict=True))
                  if j != i and xj != xi]
        if slopes:
            per_point.append(_median(slopes))
    slope = _median(per_point)
    overhead = _median([y - slope * x for x, y in zip(xs, ys, strict=True)])
    if slope <= 0 or overhead < 0:
        return proportional
    return Fit(overhead, slope)


def apportion(total: int, weights: Sequence[Fraction], lo: Sequence[int],
              hi: Sequence[int]) -> list[int]:
    """Integers ``a`` with ``sum(a) == total`` and ``lo[i] <= a[i] <= hi[i]``, as close to
    proportional to ``weights`` as the bounds allow: the real shares are
    ``clamp(lam * w, lo, hi)`` with ``lam`` solved exactly, then floors plus one for the
    largest fractional parts (Hamilton's method; ties to the larger weight, then the
    lower index). A larger weight never gets less when its bounds are not smaller."""
    n = len(weights)
    _check_bounds(total, weights, lo, hi)
    shares = _water_fill(Fraction(total), weights, [Fraction(0)] * n, lo, hi)
    return _hamilton(total, shares, [(-w,) for w in weights])


def _check_bounds(total: int, weights: Sequence[Fraction], lo: Sequence[int],
                  hi: Sequence[int]) -> None:
    if not (len(weights) == len(lo) == len(hi)) or not weights:
        raise LocalProtocolError("weights and bounds must be non-empty and of one length")
    if any(w <= 0 for w in weights) or any(a > b for a, b in zip(lo, hi, strict=True)):
        raise LocalProtocolError("weights must be > 0 and lo <= hi")
    if not sum(lo) <= total <= sum(hi):
        raise LocalProtocolError(f"{total} does not fit bounds summing to "
                                 f"[{sum(lo)}, {sum(hi)}]")


def _hamilton(total: int, shares: Sequence[Fraction],
              ties: Sequence[tuple[Fraction, ...]]) -> list[int]:
    """Integers summing to ``total`` (the shares' sum): the floors, plus one for the
    largest fractional parts, ties by ``ties`` (smaller first), then the lower index.
    Each stays within the integers around its share, so integer bounds of the shares
    hold for the result."""
    floors = [math.floor(x) for x in shares]
    left = total - sum(floors)
    order = sorted(range(len(shares)), key=lambda i: (-(shares[i] - floors[i]), ties[i], i))
    for i in order[:left]:
        floors[i] += 1
    return floors


def _water_fill(total: Fraction, weights: Sequence[Fraction], offsets: Sequence[Fraction],
                lo: Sequence[int], hi: Sequence[int]) -> list[Fraction]:
    """``clamp(lam * w_i - o_i, lo_i, hi_i)`` summing to ``total``: ``lam`` lies between
    two of the breakpoints ``(lo_i + o_i) / w_i``, ``(hi_i + o_i) / w_i``, and on each
    piece the sum is linear (and non-decreasing in ``lam``)."""
    return _at(_level(total, weights, offsets, lo, hi), weights, offsets, lo, hi)


def _at(lam: Fraction, weights: Sequence[Fraction], offsets: Sequence[Fraction],
        lo: Sequence[int], hi: Sequence[int]) -> list[Fraction]:
    return [min(max(lam * w - o, Fraction(a)), Fraction(b))
            for w, o, a, b in zip(weights, offsets, lo, hi, strict=True)]


def _level(total: Fraction, weights: Sequence[Fraction], offsets: Sequence[Fraction],
           lo: Sequence[int], hi: Sequence[int]) -> Fraction:
    """The smallest ``lam`` at which the clamped shares sum to ``total``."""
    points = sorted({(Fraction(a) + o) / w for w, o, a in zip(weights, offsets, lo, strict=True)}
                    | {(Fraction(b) + o) / w
                       for w, o, b in zip(weights, offsets, hi, strict=True)})
    # The first breakpoint at which the sum reaches total, by bisection (the sum is
    # non-decreasing): O(n log n), for rounds of up to MAX_TASKS_PER_ROUND tasks.
    i = bisect.bisect_left(points, True,
                           key=lambda p: sum(_at(p, weights, offsets, lo, hi)) >= total)
    if i == len(points):
        return points[-1]  # total == sum(hi)
    point, prev = points[i], points[max(i - 1, 0)]
    s0, s1 = (sum(_at(x, weights, offsets, lo, hi)) for x in (prev, point))
    # Linear between prev and point: solve for lam on that piece.
    return point if s1 == s0 else prev + (point - prev) * (total - s0) / (s1 - s0)


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


@dataclass(frozen=True)
class RoundSizes:
    """A sized round: its tasks (task ``i`` of the round is ``tasks[i]``), the worker
    slots left out of it, and the time every task is predicted to end by (``target_ms``,
    from the workers' fits; meaningless while none is measured)."""

    tasks: list[Sized]
    left_out: list[tuple[str, int]]
    target_ms: Fraction


def fits_for(workers: Sequence[str], measured: Mapping[str, Sequence[Sample]]
             ) -> dict[str, Fit]:
    """The fit each worker is sized by: its own, or, for one without samples, the median
    overhead and the median time per token of the others' fits (0 and 1 when none is
    measured: every worker alike)."""
    own = {w: f for w in workers if (f := fit(measured.get(w, ()))) is not None}
    default = (Fit(_median([f.overhead_ms for f in own.values()]),
                   _median([f.ms_per_token for f in own.values()]))
               if own else Fit(Fraction(0), Fraction(1)))
    return {w: own.get(w, default) for w in workers}


def size_round(slots: Mapping[str, int], measured: Mapping[str, Sequence[Sample]], *,
               n_tasks: int, inner_steps: int, tokens_per_step: int = 1,
               out_rounds: Mapping[str, int] | None = None) -> RoundSizes:
    """The round's tasks, sized so that they are predicted to end together, their steps
    summing to the round's ``n_tasks * inner_steps`` (each task at least 1 step and at
    most ``MAX_SIZE_RATIO * inner_steps``).

    ``slots`` maps each candidate worker to its slot count, ``measured`` a worker to its
    samples (``tokens_per_step`` converts a sample's tokens to steps), ``out_rounds`` a
    worker to the rounds in a row it was left out of (:data:`RETRY_ROUNDS` of them and it
    is not left out again). With at least ``n_tasks`` slots, the ``n_tasks`` predicted
    to run a task of ``inner_steps`` soonest are considered (ties: by worker id, then
    slot), and those that would make the round later than it is without them are left
    out (:func:`_choose`): the round then has fewer, larger tasks. With fewer, every slot
    takes one or more tasks, their counts and steps in proportion to the slots' speeds
    at the job's task size. Tasks are ordered by worker id and slot."""
    if not 1 <= n_tasks <= 1024 or not 1 <= inner_steps <= MAX_INNER_STEPS:
        raise LocalProtocolError("n_tasks must be in [1, 1024], inner_steps in [1, 10^6]")
    if not slots or any(not 1 <= k <= MAX_SLOTS for k in slots.values()):
        raise LocalProtocolError(f"at least one worker, each with 1..{MAX_SLOTS} slots")
    if not 1 <= tokens_per_step <= 2**40:
        raise LocalProtocolError(f"tokens_per_step must be in [1, 2^40], got {tokens_per_step}")
    fits = fits_for(sorted(slots), measured)
    # Per slot and step: the overhead, and the time of one step.
    step = {w: (f.overhead_ms, f.ms_per_token * tokens_per_step) for w, f in fits.items()}
    units = [(w, j) for w in sorted(slots) for j in range(slots[w])]
    total = n_tasks * inner_steps
    cap = min(MAX_INNER_STEPS, MAX_SIZE_RATIO * inner_steps)
    if len(units) >= n_tasks:
        def at_h(u: tuple[str, int]) -> tuple[Fraction, tuple[str, int]]:
            return step[u[0]][0] + step[u[0]][1] * inner_steps, u

        considered = sorted(units, key=at_h)[:n_tasks]
        forced = {u for u in considered
                  if (out_rounds or {}).get(u[0], 0) >= RETRY_ROUNDS}
        chosen, target = _choose(considered, forced, step, total, cap)
        chosen = sorted(chosen)
        a = [step[w][0] for w, _ in chosen]
        c = [step[w][1] for w, _ in chosen]
        shares = _at(target, [1 / x for x in c], [o / x for o, x in zip(a, c, strict=True)],
                     [1] * len(chosen), [cap] * len(chosen))
        steps = _hamilton(total, shares, [(x, o) for o, x in zip(a, c, strict=True)])
        left = sorted(set(considered) - set(chosen))
        return RoundSizes([Sized(w, j, s) for (w, j), s in zip(chosen, steps, strict=True)],
                          left, max(target, *(o + x for o, x in zip(a, c, strict=True))))
    # Fewer slots than tasks: each slot runs several tasks in turn, paying its overhead
    # for each; shared by speed at the job's task size (steps per ms of such a task).
    weights = [inner_steps / (step[w][0] + step[w][1] * inner_steps) for w, _ in units]
    counts = apportion(n_tasks, weights, [1] * len(units), [n_tasks] * len(units))
    per_unit = apportion(total, weights, counts, [k * cap for k in counts])
    out = []
    finish = []
    for (w, j), k, steps_u in zip(units, counts, per_unit, strict=True):
        base, extra = divmod(steps_u, k)
        out += [Sized(w, j, base + (1 if t < extra else 0)) for t in range(k)]
        finish.append(k * step[w][0] + steps_u * step[w][1])
    return RoundSizes(out, [], max(finish))


def _choose(considered: Sequence[tuple[str, int]], forced: set[tuple[str, int]],
            step: Mapping[str, tuple[Fraction, Fraction]], total: int, cap: int
            ) -> tuple[list[tuple[str, int]], Fraction]:
    """The slots that make the round end soonest, and their water level ``T``: where
    ``sum(clamp((T - a_u) / c_u, 1, cap)) == total`` over them.

    With slots ``K`` the round ends at ``max(T_K, M_K)``, ``M_K`` the largest
    ``a_u + c_u`` (overhead and one step) in ``K``: a slot that cannot do one step by
    ``T_K`` makes the round wait for it. For a given end every slot that can do a step by
    then only helps, so the best ``K`` is a prefix of the slots by ``a_u + c_u`` (the
    forced ones always in). Along the prefixes ``T`` falls and ``M`` rises, so the
    soonest end is at their crossing: the longest prefix with ``M <= T``, or the one
    after it; ties to the longer (more deltas to average)."""
    free = sorted((u for u in considered if u not in forced),
                  key=lambda u: (step[u[0]][0] + step[u[0]][1], u))

    def prefix(k: int) -> list[tuple[str, int]]:
        return sorted(forced) + free[:k]

    def level(k: int) -> Fraction | None:  # None: these slots cannot take the round
        units = prefix(k)
        if not units or len(units) * cap < total:
            return None
        c = [step[w][1] for w, _ in units]
        return _level(Fraction(total), [1 / x for x in c],
                      [step[w][0] / x for (w, _), x in zip(units, c, strict=True)],
                      [1] * len(units), [cap] * len(units))

    def worst(k: int) -> Fraction:
        return max(step[w][0] + step[w][1] for w, _ in prefix(k))

    def end(k: int) -> Fraction | None:
        t = level(k)
        return None if t is None else max(t, worst(k))

    # The longest prefix whose slots all make a step by its level (infeasible ones: by
    # any time); at least the forced ones, or one slot.
    first = 0 if forced else 1

    def crossed(k: int) -> bool:
        t = level(k)
        return t is not None and worst(k) > t

    k = bisect.bisect_left(range(first, len(free) + 1), True, key=crossed) + first - 1
    options = [j for j in (k, k + 1) if first <= j <= len(free) and end(j) is not None]
    best = min(options, key=lambda j: (end(j), -j))
    if crossed(best):  # longer prefixes whose slots add no later end (ties) are taken too
        limit = worst(best)
        best += bisect.bisect_left(range(best + 1, len(free) + 1), True,
                                   key=lambda j: worst(j) > limit)
    t = level(best)
    assert t is not None
    return prefix(best), t


def weights_of(tokens: Sequence[int]) -> list[float]:
    """The outer step's weight of each accepted delta: the tokens behind it, as a
    fraction of the round's accepted tokens (they sum to 1)."""
    if not tokens or any(t < 1 for t in tokens):
        raise LocalProtocolError("weights need at least one delta, each with tokens")
    whole = sum(tokens)
    return [t / whole for t in tokens]
