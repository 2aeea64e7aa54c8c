"""protocol/scheduling.py: throughput estimates and task sizing, without any network."""

from __future__ import annotations

import subprocess
import sys
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.errors import LocalProtocolError
from protocol.scheduling import (
    MAX_SIZE_RATIO,
    Rate,
    apportion,
    observe,
    rates_for,
    size_round,
    weights_of,
)


def test_protocol_scheduling_imports_no_io() -> None:
    code = ("import sys, protocol.scheduling; "
            "bad = {'trio', 'torch', 'libp2p', 'aiosqlite'} & set(sys.modules); "
            "sys.exit(f'imported {bad}' if bad else 0)")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


rates = st.floats(min_value=0.01, max_value=1e6, allow_nan=False, allow_infinity=False)
peers = st.sampled_from([f"w{i}" for i in range(12)])


@st.composite
def rounds(draw: st.DrawFn) -> tuple[dict[str, int], dict[str, Rate], int, int]:
    workers = draw(st.lists(peers, min_size=1, max_size=8, unique=True))
    slots = {w: draw(st.integers(1, 3)) for w in workers}
    measured = {w: Rate(draw(rates), 1) for w in workers if draw(st.booleans())}
    return slots, measured, draw(st.integers(1, 12)), draw(st.integers(1, 500))


@settings(max_examples=120, deadline=None)
@given(rounds())
def test_sizes_sum_to_the_rounds_steps_and_respect_the_bounds(
        case: tuple[dict[str, int], dict[str, Rate], int, int]) -> None:
    slots, measured, n, steps = case
    sized = size_round(slots, measured, n_tasks=n, inner_steps=steps)
    assert len(sized) == n
    assert sum(s.steps for s in sized) == n * steps
    assert all(1 <= s.steps <= MAX_SIZE_RATIO * steps for s in sized)
    assert all(s.worker in slots and 0 <= s.slot < slots[s.worker] for s in sized)
    if sum(slots.values()) >= n:  # one task a slot when there are slots enough
        assert len({(s.worker, s.slot) for s in sized}) == n
    else:  # every slot works
        assert len({(s.worker, s.slot) for s in sized}) == sum(slots.values())
    again = size_round(dict(reversed(list(slots.items()))), measured, n_tasks=n,
                       inner_steps=steps)
    assert again == sized  # a pure function of its inputs, whatever their order


def _per_slot(sized: list) -> dict[tuple[str, int], int]:  # type: ignore[type-arg]
    out: dict[tuple[str, int], int] = {}
    for s in sized:
        out[(s.worker, s.slot)] = out.get((s.worker, s.slot), 0) + s.steps
    return out


@settings(max_examples=120, deadline=None)
@given(rounds())
def test_a_faster_slot_never_gets_fewer_tokens(
        case: tuple[dict[str, int], dict[str, Rate], int, int]) -> None:
    slots, measured, n, steps = case
    rate = rates_for(sorted(slots), measured)
    per = _per_slot(size_round(slots, measured, n_tasks=n, inner_steps=steps))
    units = [(w, j) for w in slots for j in range(slots[w])]
    for a in units:
        for b in units:
            if rate[a[0]] > rate[b[0]]:
                assert per.get(a, 0) >= per.get(b, 0), (a, b, per)


@settings(max_examples=100, deadline=None)
@given(rounds(), st.dictionaries(peers, st.floats(0, 1e4)))
def test_claimed_tflops_have_no_say(case: tuple[dict[str, int], dict[str, Rate], int, int],
                                    claims: dict[str, float]) -> None:
    """Sizing takes measured rates only: there is no way to pass a claim in, and a worker
    that claims much but delivers little is sized by what it delivers."""
    slots, measured, n, steps = case
    assert "claim" not in " ".join(size_round.__code__.co_varnames)
    liar = sorted(slots)[0]
    honest = dict(measured, **{w: Rate(1000.0, 3) for w in slots if w != liar})
    slow = dict(honest, **{liar: Rate(1.0, 3)})  # measured at a thousandth of the others
    per = _per_slot(size_round(slots, slow, n_tasks=n, inner_steps=steps))
    mine = [v for (w, _), v in per.items() if w == liar]
    others = [v for (w, _), v in per.items() if w != liar]
    assert not mine or not others or max(mine) <= min(others)


def test_a_quarter_speed_worker_gets_a_quarter_of_a_fast_ones_share() -> None:
    measured = {"a": Rate(100.0, 2), "b": Rate(100.0, 2), "c": Rate(100.0, 2),
                "d": Rate(25.0, 2)}
    sized = size_round(dict.fromkeys(measured, 1), measured, n_tasks=4, inner_steps=40)
    assert [s.steps for s in sized] == [49, 49, 49, 13]  # 160 steps, shares 4:4:4:1
    # Each finishes after steps / rate: 0.49 s or 0.52 s, against 1.6 s for the slow
    # worker's 40 steps of an equal split.
    assert max(s.steps / measured[s.worker].tokens_per_s for s in sized) < 0.6


def test_a_newcomer_is_sized_as_the_median_and_round_zero_is_an_equal_split() -> None:
    assert [s.steps for s in size_round({"a": 1, "b": 1, "c": 1}, {}, n_tasks=3,
                                        inner_steps=40)] == [40, 40, 40]
    measured = {"a": Rate(10.0, 1), "b": Rate(30.0, 1)}
    assert rates_for(["a", "b", "new"], measured)["new"] == 20
    sized = size_round({"a": 1, "b": 1, "new": 1}, measured, n_tasks=3, inner_steps=60)
    assert [s.steps for s in sized] == [30, 90, 60]


def test_more_slots_than_tasks_takes_the_fastest_and_fewer_shares_by_count() -> None:
    measured = {"a": Rate(1.0, 1), "b": Rate(5.0, 1), "c": Rate(9.0, 1)}
    sized = size_round(dict.fromkeys(measured, 1), measured, n_tasks=2, inner_steps=10)
    assert [(s.worker, s.steps) for s in sized] == [("b", 7), ("c", 13)]
    sized = size_round({"a": 1, "b": 1}, {"a": Rate(3.0, 1), "b": Rate(1.0, 1)},
                       n_tasks=4, inner_steps=10)  # a takes 3 tasks in turn, b one
    assert [(s.worker, s.steps) for s in sized] == [("a", 10), ("a", 10), ("a", 10),
                                                    ("b", 10)]
    sized = size_round({"gpu-node": 2, "cpu": 1}, {"gpu-node": Rate(8.0, 1),
                                                  "cpu": Rate(1.0, 1)},
                       n_tasks=3, inner_steps=17)  # one task a GPU slot
    assert [(s.worker, s.slot) for s in sized] == [("cpu", 0), ("gpu-node", 0),
                                                   ("gpu-node", 1)]
    assert [s.steps for s in sized] == [3, 24, 24]  # 51 steps, 1:8:8


def test_one_fast_worker_cannot_take_the_round() -> None:
    sized = size_round({"fast": 1, "slow": 1}, {"fast": Rate(1e6, 1), "slow": Rate(1.0, 1)},
                       n_tasks=2, inner_steps=10)
    assert [s.steps for s in sized] == [19, 1]  # the slow one keeps one step
    measured = {w: Rate(1e6 if w == "a" else 1.0, 1) for w in "abcdefgh"}
    sized = size_round(dict.fromkeys(measured, 1), measured, n_tasks=8, inner_steps=10)
    assert sized[0].steps == MAX_SIZE_RATIO * 10 and sum(s.steps for s in sized) == 80


@settings(max_examples=120, deadline=None)
@given(st.lists(st.fractions(min_value=Fraction(1, 1000), max_value=1000), min_size=1,
                max_size=10), st.data())
def test_apportion_is_exact_bounded_and_monotone(weights: list[Fraction],
                                                 data: st.DataObject) -> None:
    n = len(weights)
    lo = [1] * n
    hi = [data.draw(st.integers(1, 50)) for _ in range(n)]
    hi = [max(h, 1) for h in hi]
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


def test_observe_is_a_moving_average_of_coordinator_measured_rates() -> None:
    r = observe(None, 1000, 2000)
    assert r == Rate(500.0, 1)
    r = observe(r, 1000, 1000)
    assert r == Rate(750.0, 2)
    assert observe(None, 10, 0).tokens_per_s == 10_000  # under 1 ms counts as 1 ms
    with pytest.raises(LocalProtocolError):
        observe(r, 0, 10)


def test_misuse_is_a_local_error() -> None:
    for bad in (lambda: size_round({}, {}, n_tasks=1, inner_steps=1),
                lambda: size_round({"a": 0}, {}, n_tasks=1, inner_steps=1),
                lambda: size_round({"a": 1}, {}, n_tasks=0, inner_steps=1),
                lambda: apportion(5, [Fraction(1)], [1], [4]),
                lambda: apportion(1, [Fraction(0)], [1], [4]),
                lambda: Rate(float("nan"), 1),
                lambda: Rate(1.0, 0),
                lambda: weights_of([]),
                lambda: weights_of([3, 0])):
        with pytest.raises(LocalProtocolError):
            bad()
    assert weights_of([30, 10]) == [0.75, 0.25]
