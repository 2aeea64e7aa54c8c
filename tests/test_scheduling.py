"""protocol/scheduling.py: fitted task times and task sizing, without any network."""

from __future__ import annotations

import itertools
import subprocess
import sys
from fractions import Fraction

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from protocol.errors import LocalProtocolError
from protocol.scheduling import (
    MAX_SIZE_RATIO,
    RETRY_ROUNDS,
    WINDOW,
    Fit,
    RoundSizes,
    Sample,
    apportion,
    fit,
    fits_for,
    record,
    size_round,
    weights_of,
)

TPS = 1024  # tokens per step: batch 8 x 128


def test_protocol_scheduling_imports_no_io() -> None:
    code = ("import sys, protocol.scheduling; "
            "bad = {'trio', 'torch', 'libp2p', 'aiosqlite'} & set(sys.modules); "
            "sys.exit(f'imported {bad}' if bad else 0)")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def line(overhead_ms: int, ms_per_step: int, *steps: int) -> list[Sample]:
    """Samples of a worker whose tasks take exactly overhead + steps * ms_per_step."""
    return [Sample(s * TPS, overhead_ms + s * ms_per_step) for s in steps]


peers = st.sampled_from([f"w{i}" for i in range(12)])
samples = st.lists(st.builds(Sample, st.integers(1, 10**7), st.integers(0, 10**7)),
                   min_size=1, max_size=WINDOW)


@st.composite
def rounds(draw: st.DrawFn) -> tuple[dict[str, int], dict[str, list[Sample]], int, int,
                                     dict[str, int]]:
    workers = draw(st.lists(peers, min_size=1, max_size=6, unique=True))
    slots = {w: draw(st.integers(1, 3)) for w in workers}
    measured = {w: draw(samples) for w in workers if draw(st.booleans())}
    out = {w: draw(st.integers(0, RETRY_ROUNDS)) for w in workers if draw(st.booleans())}
    return slots, measured, draw(st.integers(1, 12)), draw(st.integers(1, 300)), out


@settings(max_examples=150, deadline=None)
@given(rounds())
def test_sizes_sum_to_the_rounds_steps_and_respect_the_bounds(case: tuple) -> None:  # type: ignore[type-arg]
    slots, measured, n, steps, out = case
    plan = size_round(slots, measured, n_tasks=n, inner_steps=steps, tokens_per_step=TPS,
                      out_rounds=out)
    sized = plan.tasks
    assert sum(s.steps for s in sized) == n * steps  # the round's tokens, whoever is out
    assert all(1 <= s.steps <= MAX_SIZE_RATIO * steps for s in sized)
    assert all(s.worker in slots and 0 <= s.slot < slots[s.worker] for s in sized)
    assert sized == sorted(sized, key=lambda s: (s.worker, s.slot))
    units = {(s.worker, s.slot) for s in sized}
    if sum(slots.values()) >= n:  # at most one task a slot when there are slots enough
        assert len(units) == len(sized) <= n
        assert len(sized) + len(plan.left_out) == n and not units & set(plan.left_out)
        # A slot out RETRY_ROUNDS rounds in a row is not left out again.
        assert all(out.get(w, 0) < RETRY_ROUNDS for w, _ in plan.left_out)
    else:  # every slot works
        assert len(sized) == n and len(units) == sum(slots.values()) and not plan.left_out
    again = size_round(dict(reversed(list(slots.items()))), measured, n_tasks=n,
                       inner_steps=steps, tokens_per_step=TPS, out_rounds=out)
    assert again == plan  # a pure function of its inputs, whatever their order


def _end(units: list[tuple[Fraction, Fraction]], total: int, cap: int) -> float:
    """The soonest all of ``units`` (overhead, time per step) can end ``total`` steps,
    each at least 1 and at most ``cap``: by bisection, independently of the module."""
    if len(units) * cap < total:
        return float("inf")
    lo, hi = 0.0, float(max(a + c * cap for a, c in units)) + 1.0
    for _ in range(200):
        mid = (lo + hi) / 2
        got = sum(min(max((mid - float(a)) / float(c), 1.0), cap) for a, c in units)
        lo, hi = (mid, hi) if got < total else (lo, mid)
    return max(hi, *(float(a + c) for a, c in units))


@settings(max_examples=150, deadline=None)
@given(st.lists(samples, min_size=1, max_size=5), st.integers(1, 60), st.data())
def test_the_round_ends_as_soon_as_any_choice_of_workers_allows(
        windows: list[list[Sample]], steps: int, data: st.DataObject) -> None:
    """Against every subset of the workers (the forced ones always in): no choice of
    whom to leave out ends the round sooner, and no task (but a forced one) is
    predicted to end later than the target by more than the one step rounding adds."""
    workers = [f"w{i}" for i in range(len(windows))]
    measured = dict(zip(workers, windows, strict=True))
    out = {w: data.draw(st.integers(0, RETRY_ROUNDS)) for w in workers}
    n = len(workers)
    plan = size_round(dict.fromkeys(workers, 1), measured, n_tasks=n, inner_steps=steps,
                      tokens_per_step=TPS, out_rounds=out)
    fits = fits_for(workers, measured)
    cost = {w: (f.overhead_ms, f.ms_per_token * TPS) for w, f in fits.items()}
    forced = [w for w in workers if out[w] >= RETRY_ROUNDS]
    free = [w for w in workers if w not in forced]
    best = min(_end([cost[w] for w in forced + list(k)], n * steps, MAX_SIZE_RATIO * steps)
               for r in range(len(free) + 1) for k in itertools.combinations(free, r)
               if forced or k)
    assert float(plan.target_ms) <= best * (1 + 1e-9) + 1e-6
    assert float(plan.target_ms) >= best * (1 - 1e-9) - 1e-6
    for s in plan.tasks:
        a, c = cost[s.worker]
        if s.worker not in forced and s.steps > 1:
            assert a + c * (s.steps - 1) <= plan.target_ms
        if s.steps == 1 and s.worker not in forced:
            assert a + c <= plan.target_ms  # one step by the target, or left out


@settings(max_examples=100, deadline=None)
@given(rounds())
def test_a_worker_no_slower_in_either_respect_never_gets_fewer_steps(case: tuple) -> None:  # type: ignore[type-arg]
    slots, measured, n, steps, _ = case
    per: dict[str, int] = {}
    for s in size_round(slots, measured, n_tasks=n, inner_steps=steps,
                        tokens_per_step=TPS).tasks:
        per[s.worker] = max(per.get(s.worker, 0), s.steps)
    fits = fits_for(sorted(slots), measured)
    if sum(slots.values()) < n:
        return  # counts per slot, compared by speed at the job's task size elsewhere
    for u in slots:
        for v in slots:
            fu, fv = fits[u], fits[v]
            if (fu.overhead_ms <= fv.overhead_ms and fu.ms_per_token <= fv.ms_per_token
                    and fu != fv and v in per and slots[u] >= slots[v]):
                assert per.get(u, 0) >= per[v], (u, v, per, fits)


@settings(max_examples=100, deadline=None)
@given(rounds(), st.dictionaries(peers, st.floats(0, 1e4)))
def test_claimed_tflops_have_no_say(case: tuple, claims: dict[str, float]) -> None:  # type: ignore[type-arg]
    """Sizing takes measured times only: there is no way to pass a claim in, and a worker
    that claims much but delivers little is sized by what it delivers."""
    slots, measured, n, steps, _ = case
    assert not any("claim" in v or "tflops" in v for v in size_round.__code__.co_varnames)
    liar = sorted(slots)[0]
    honest = dict(measured, **{w: line(100, 10, 20, 40) for w in slots if w != liar})
    slow = dict(honest, **{liar: line(100, 10_000, 20, 40)})  # a thousandth of the others
    per: dict[str, list[int]] = {}
    for s in size_round(slots, slow, n_tasks=n, inner_steps=steps, tokens_per_step=TPS).tasks:
        per.setdefault(s.worker, []).append(s.steps)
    mine = per.get(liar, [])
    others = [x for w, xs in per.items() if w != liar for x in xs]
    assert not mine or not others or max(mine) <= min(others)


def test_a_fixed_cost_is_fitted_and_one_odd_task_moves_nothing() -> None:
    exact = fit(line(20_000, 3_750, 40, 10, 5, 8))
    assert exact == Fit(Fraction(20_000), Fraction(3_750, TPS))
    odd = [*line(20_000, 3_750, 40, 10, 5, 8), Sample(12 * TPS, 400_000)]
    assert fit(odd) == exact  # repeated medians: one sample may be anything
    assert fit(record(odd, 6 * TPS, 42_500)) == exact  # the window moves on
    assert float(exact.ms(10 * TPS)) == 57_500  # type: ignore[union-attr]


@settings(max_examples=150, deadline=None)
@given(st.integers(0, 10**6), st.integers(1, 10**5),
       st.lists(st.integers(1, 400), min_size=4, max_size=WINDOW - 1, unique=True),
       st.integers(1, 10**5), st.integers(0, 10**8))
def test_repeated_medians_ignore_any_one_sample(overhead: int, per_step: int,
                                                steps: list[int], odd_steps: int,
                                                odd_ms: int) -> None:
    assume(max(steps) >= 2 * min(steps))
    clean = line(overhead, per_step, *steps)
    got = fit([*clean, Sample(odd_steps * TPS, odd_ms)])
    assert got == Fit(Fraction(overhead), Fraction(per_step, TPS))


def test_sizes_too_close_or_an_unphysical_line_fit_as_proportional() -> None:
    # 40 and 50 steps: within MIN_SPREAD, the intercept would be noise.
    close = line(30_000, 1_000, 40, 50)
    assert fit(close) == Fit(Fraction(0), _median_ratio(close))
    # Time falling as tokens grow (noise), or a negative overhead: proportional.
    falling = [Sample(10 * TPS, 50_000), Sample(40 * TPS, 40_000)]
    assert fit(falling) == Fit(Fraction(0), _median_ratio(falling))
    steep = [Sample(10 * TPS, 1_000), Sample(40 * TPS, 40_000)]
    assert fit(steep) == Fit(Fraction(0), _median_ratio(steep))
    assert fit([]) is None
    assert fit([Sample(5, 0)]) == Fit(Fraction(0), Fraction(1, 10**9))  # a 0 ms task


def test_two_sizes_fit_as_proportional_a_lone_slow_one_makes_no_overhead() -> None:
    # 1 s + 1 s a step; the one 10-step task was 20 s slow. A line through two sizes
    # would run through it (an overhead of about 28 s, enough to leave the worker out).
    samples = [*line(1_000, 1_000, 40, 40, 40), Sample(10 * TPS, 31_000)]
    got = fit(samples)
    assert got is not None and got.overhead_ms == 0
    assert got == Fit(Fraction(0), _median_ratio(samples))
    # A third size, and the fit separates the overhead again.
    assert fit(line(1_000, 1_000, 40, 20, 10)) == Fit(Fraction(1_000), Fraction(1_000, TPS))


def _median_ratio(xs: list[Sample]) -> Fraction:
    r = sorted(Fraction(s.elapsed_ms, s.tokens) for s in xs)
    return r[len(r) // 2] if len(r) % 2 else (r[len(r) // 2 - 1] + r[len(r) // 2]) / 2


def test_a_worker_whose_fixed_cost_exceeds_the_round_is_left_out_and_retried() -> None:
    """bench/environment.py's case: three workers about 1 s a step, the fourth throttled
    to a quarter (its measured tasks: 40 steps in 170 s, 10 in 57.5 s, 5 in 38.75 s: 20 s of fixed
    cost, 3.75 s a step)."""
    fast = {w: line(1_000, 1_100, 40) for w in "abc"}
    measured = {**fast, "d": line(20_000, 3_750, 40, 10, 5)}
    plan = size_round(dict.fromkeys(measured, 1), measured, n_tasks=4, inner_steps=40,
                      tokens_per_step=TPS)
    # Sized in: 10 steps end by the target (57.5 s) with the others' 50.
    assert [(s.worker, s.steps) for s in plan.tasks] == [("a", 50), ("b", 50), ("c", 50),
                                                         ("d", 10)]
    assert plan.target_ms < 58_000 and not plan.left_out
    # Its fixed cost alone 60 s: the others end sooner without it, 160 steps among three.
    measured["d"] = line(60_000, 3_750, 40, 10, 5)
    plan = size_round(dict.fromkeys(measured, 1), measured, n_tasks=4, inner_steps=40,
                      tokens_per_step=TPS)
    assert [(s.worker, s.steps) for s in plan.tasks] == [("a", 54), ("b", 53), ("c", 53)]
    assert plan.left_out == [("d", 0)] and plan.target_ms == 160 * 1_125 // 3  # 60 s
    # Out RETRY_ROUNDS rounds in a row, it gets a task again, sized by its fit: one step.
    plan = size_round(dict.fromkeys(measured, 1), measured, n_tasks=4, inner_steps=40,
                      tokens_per_step=TPS, out_rounds={"d": RETRY_ROUNDS})
    assert ("d", 1) in [(s.worker, s.steps) for s in plan.tasks] and not plan.left_out
    # Recovered (its new tasks fast): sized in again once its window says so.
    for _ in range(3):
        measured["d"] = record(measured["d"], 5 * TPS, 1_000 + 5 * 1_100)
    assert fit(measured["d"]) is not None
    plan = size_round(dict.fromkeys(measured, 1), measured, n_tasks=4, inner_steps=40,
                      tokens_per_step=TPS)
    assert not plan.left_out and len(plan.tasks) == 4


def test_a_newcomer_is_sized_as_the_median_and_round_zero_is_an_equal_split() -> None:
    plan = size_round({"a": 1, "b": 1, "c": 1}, {}, n_tasks=3, inner_steps=40)
    assert [s.steps for s in plan.tasks] == [40, 40, 40] and not plan.left_out
    measured = {"a": line(0, 100, 40), "b": line(0, 300, 40)}
    assert fits_for(["a", "b", "new"], measured)["new"] == Fit(Fraction(0), Fraction(200, TPS))
    sized = size_round({"a": 1, "b": 1, "new": 1}, measured, n_tasks=3, inner_steps=60,
                       tokens_per_step=TPS).tasks
    assert [s.steps for s in sized] == [98, 33, 49]  # 1 : 1/3 : 1/2


def test_more_slots_than_tasks_takes_the_soonest_and_fewer_shares_by_speed() -> None:
    measured = {"a": line(0, 9, 10), "b": line(0, 2, 10), "c": line(0, 1, 10)}
    sized = size_round(dict.fromkeys(measured, 1), measured, n_tasks=2, inner_steps=10,
                       tokens_per_step=TPS).tasks
    assert [(s.worker, s.steps) for s in sized] == [("b", 7), ("c", 13)]
    sized = size_round({"a": 1, "b": 1}, {"a": line(0, 1, 10), "b": line(0, 3, 10)},
                       n_tasks=4, inner_steps=10, tokens_per_step=TPS).tasks
    assert [(s.worker, s.steps) for s in sized] == [("a", 10), ("a", 10), ("a", 10),
                                                    ("b", 10)]  # a takes 3 tasks in turn
    sized = size_round({"gpu-node": 2, "cpu": 1}, {"gpu-node": line(0, 1, 10),
                                                  "cpu": line(0, 8, 10)},
                       n_tasks=3, inner_steps=17, tokens_per_step=TPS).tasks
    assert [(s.worker, s.slot) for s in sized] == [("cpu", 0), ("gpu-node", 0),
                                                   ("gpu-node", 1)]
    assert [s.steps for s in sized] == [3, 24, 24]  # 51 steps, 1:8:8


def test_one_fast_worker_cannot_take_the_round() -> None:
    plan = size_round({"fast": 1, "slow": 1}, {"fast": line(0, 1, 10),
                                               "slow": line(0, 10**6, 10)},
                      n_tasks=2, inner_steps=10, tokens_per_step=TPS)
    # The slow one's single step would take longer than the round: it is left out, and
    # the fast one's task is capped at MAX_SIZE_RATIO times the job's steps... which
    # here still holds the round's 20.
    assert [(s.worker, s.steps) for s in plan.tasks] == [("fast", 20)]
    measured = {w: line(0, 1 if w == "a" else 10**6, 10) for w in "abcdefgh"}
    plan = size_round(dict.fromkeys(measured, 1), measured, n_tasks=8, inner_steps=10,
                      tokens_per_step=TPS)
    assert plan.tasks[0].steps == MAX_SIZE_RATIO * 10
    # The 40 steps a cannot take are spread over all the slow ones: the round ends
    # after 6 slow steps rather than 40.
    assert [s.steps for s in plan.tasks] == [40, 6, 6, 6, 6, 6, 5, 5]


@settings(max_examples=120, deadline=None)
@given(st.lists(st.fractions(min_value=Fraction(1, 1000), max_value=1000), min_size=1,
                max_size=10), st.data())
def test_apportion_is_exact_bounded_and_monotone(weights: list[Fraction],
                                                 data: st.DataObject) -> None:
    n = len(weights)
    lo = [1] * n
    hi = [data.draw(st.integers(1, 50)) for _ in range(n)]
    total = data.draw(st.integers(sum(lo), sum(hi)))
    got = apportion(total, weights, lo, [max(hi)] * n)
    assert sum(got) == total and all(1 <= g <= max(hi) for g in got)
    for i in range(n):
        for j in range(n):
            if weights[i] > weights[j]:
                assert got[i] >= got[j]
    scaled = apportion(total, [w * 7 for w in weights], lo, [max(hi)] * n)
    assert scaled == got  # only the proportions count
    bounded = apportion(total, weights, lo, hi)
    assert sum(bounded) == total and all(1 <= g <= h for g, h in zip(bounded, hi, strict=True))


def test_a_large_round_is_sized_quickly() -> None:
    """1024 tasks (MAX_TASKS_PER_ROUND) of workers of 1024 different speeds: bisection,
    not a scan of every prefix."""
    measured = {f"w{i:04}": line(i * 10, 1 + i % 7, 10, 40) for i in range(1024)}
    plan = size_round(dict.fromkeys(measured, 1), measured, n_tasks=1024, inner_steps=40,
                      tokens_per_step=TPS)
    assert isinstance(plan, RoundSizes) and sum(s.steps for s in plan.tasks) == 1024 * 40


def test_record_keeps_a_window_and_misuse_is_a_local_error() -> None:
    window: list[Sample] = []
    for i in range(WINDOW + 3):
        window = record(window, 100 + i, 0 if i == 0 else 50)
    assert len(window) == WINDOW and window[-1] == Sample(100 + WINDOW + 2, 50)
    assert record([], 10, 0) == [Sample(10, 1)]  # under 1 ms counts as 1 ms
    for bad in (lambda: size_round({}, {}, n_tasks=1, inner_steps=1),
                lambda: size_round({"a": 0}, {}, n_tasks=1, inner_steps=1),
                lambda: size_round({"a": 1}, {}, n_tasks=0, inner_steps=1),
                lambda: size_round({"a": 1}, {}, n_tasks=1, inner_steps=1, tokens_per_step=0),
                lambda: apportion(5, [Fraction(1)], [1], [4]),
                lambda: apportion(1, [Fraction(0)], [1], [4]),
                lambda: Sample(0, 10),
                lambda: Sample(10, -1),
                lambda: record([], 0, 10),
                lambda: weights_of([]),
                lambda: weights_of([3, 0])):
        with pytest.raises(LocalProtocolError):
            bad()
    assert weights_of([30, 10]) == [0.75, 0.25]
