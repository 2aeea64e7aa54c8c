"""protocol/coordination.py: task plans and the round machine, without any network."""

from __future__ import annotations

import itertools
import random
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.coordination import (
    TRANSITIONS,
    IllegalTransition,
    RoundMachine,
    TaskStatus,
    plan_round,
    task_seed,
)
from protocol.errors import LocalProtocolError

OFFER, TASK = 1_000, 10_000


def machine(n_tasks: int = 3, workers: tuple[str, ...] = ("a", "b", "c"), **kw: int
            ) -> RoundMachine:
    tasks = plan_round(job_seed=1, round_=0, rounds=2, n_tasks=n_tasks, train_len=10_000,
                       min_slice=65)
    return RoundMachine(tasks, workers, offer_timeout_ms=OFFER, task_timeout_ms=TASK, **kw)


def test_protocol_coordination_imports_no_io() -> None:
    code = ("import sys, protocol.coordination; "
            "bad = {'trio', 'torch', 'libp2p', 'aiosqlite'} & set(sys.modules); "
            "sys.exit(f'imported {bad}' if bad else 0)")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_plan_round_slices_cover_the_split_disjointly_and_move_on_each_round() -> None:
    by_round = []
    for r in range(3):
        tasks = plan_round(job_seed=7, round_=r, rounds=3, n_tasks=4, train_len=100_000,
                           min_slice=65)
        spans = sorted((t.slice_start, t.slice_start + t.slice_len) for t in tasks)
        assert all(a[1] <= b[0] for a, b in itertools.pairwise(spans))
        assert spans[0][0] == 0 and spans[-1][1] == 100_000  # the whole split, in 4 parts
        by_round.append([t.slice_start for t in tasks])
    assert by_round[0] != by_round[1] != by_round[2]  # task i moves to another part
    assert by_round[0][1:] == by_round[1][:-1]
    assert len({task_seed(7, r, i) for r in range(3) for i in range(4)}) == 12


@settings(max_examples=100, deadline=None)
@given(first=st.integers(0, 50), round_=st.integers(0, 20), n=st.integers(1, 8),
       sized=st.booleans())
def test_first_round_continues_the_schedule_under_the_jobs_own_round_numbers(
        first: int, round_: int, n: int, sized: bool) -> None:
    steps = [3 + i for i in range(n)] if sized else None
    common = {"job_seed": 5, "n_tasks": n, "train_len": 50_000, "min_slice": 65, "steps": steps}
    shifted = plan_round(round_=round_, rounds=21, first_round=first, **common)
    whole = plan_round(round_=first + round_, rounds=first + 21, **common)
    # The data (slices, seeds, sizes) of schedule round first + r ...
    assert [(t.index, t.slice_start, t.slice_len, t.seed, t.steps) for t in shifted] == \
        [(t.index, t.slice_start, t.slice_len, t.seed, t.steps) for t in whole]
    # ... under the job's own round: task ids and rounds as the assignments carry them.
    assert [(t.task_id, t.round) for t in shifted] == \
        [(f"r{round_}-t{i}", round_) for i in range(n)]
    with pytest.raises(LocalProtocolError):
        plan_round(round_=round_, rounds=21, first_round=-1, **common)


@settings(max_examples=100, deadline=None)
@given(steps=st.lists(st.integers(1, 400), min_size=1, max_size=8),
       round_=st.integers(0, 20), train_len=st.integers(65, 200_000))
def test_sized_slices_follow_the_steps_and_stay_in_the_split(steps: list[int], round_: int,
                                                             train_len: int) -> None:
    n = len(steps)
    tasks = plan_round(job_seed=3, round_=round_, rounds=21, n_tasks=n, train_len=train_len,
                       min_slice=65, steps=steps)
    assert [t.steps for t in tasks] == steps
    assert all(t.slice_start >= 0 and t.slice_start + t.slice_len <= train_len
               and t.slice_len >= 65 for t in tasks)
    if train_len // n >= 65 and min(train_len * s // sum(steps) for s in steps) >= 65:
        spans = sorted((t.slice_start, t.slice_start + t.slice_len) for t in tasks)
        assert all(a[1] <= b[0] for a, b in itertools.pairwise(spans))  # disjoint
        for a, b in itertools.combinations(tasks, 2):  # more steps, at least as many bytes
            if a.steps is not None and b.steps is not None and a.steps > b.steps:
                assert a.slice_len >= b.slice_len
    equal = plan_round(job_seed=3, round_=round_, rounds=21, n_tasks=n, train_len=train_len,
                       min_slice=65)
    same = plan_round(job_seed=3, round_=round_, rounds=21, n_tasks=n, train_len=train_len,
                      min_slice=65, steps=[7] * n)
    assert [(t.slice_start, t.slice_len, t.seed) for t in same] == \
        [(t.slice_start, t.slice_len, t.seed) for t in equal]  # equal steps: the old plan


def test_plan_round_small_split_shares_it_and_refuses_a_split_under_one_sequence() -> None:
    tasks = plan_round(job_seed=0, round_=5, rounds=8, n_tasks=32, train_len=1_000,
                       min_slice=65)
    assert {t.slice_len for t in tasks} == {65}  # 1000 // 32 is under one sequence
    assert all(t.slice_start + t.slice_len <= 1_000 for t in tasks)
    with pytest.raises(LocalProtocolError, match="shorter than one sequence"):
        plan_round(job_seed=0, round_=0, rounds=1, n_tasks=1, train_len=10, min_slice=65)


def test_every_task_is_offered_once_to_distinct_workers() -> None:
    m = machine()
    offers = m.start(0)
    assert sorted(a.task.task_id for a in offers) == ["r0-t0", "r0-t1", "r0-t2"]
    assert sorted(a.worker for a in offers) == ["a", "b", "c"]
    assert all(a.deadline_ms == OFFER + TASK for a in offers)


def test_refusal_moves_the_task_and_never_offers_it_back_to_the_refuser() -> None:
    m = machine(n_tasks=1)
    (first,) = m.start(0)
    (second,) = m.on_refused(first.task.task_id, first.worker, 5)
    assert second.worker != first.worker and second.attempt == 2
    (third,) = m.on_refused(second.task.task_id, second.worker, 6)
    assert third.worker not in (first.worker, second.worker)
    assert m.on_refused(third.task.task_id, third.worker, 7) == []
    assert m.failed() == ["r0-t0"] and m.done


def test_a_lost_worker_gets_nothing_more_and_its_task_goes_elsewhere() -> None:
    m = machine(n_tasks=2, workers=("a", "b", "c"))
    offers = m.start(0)
    for a in offers:
        m.on_accepted(a.task.task_id, a.worker, 1)
    victim = offers[0]
    (re,) = m.on_lost(victim.task.task_id, victim.worker, 2)
    assert re.task == victim.task and re.worker not in (victim.worker, offers[1].worker)
    assert victim.worker in m.lost
    # A late result from the lost worker is stale, not accepted.
    assert m.on_submitted(victim.task.task_id, victim.worker, "late", 3) == []
    assert m.status(victim.task.task_id) is TaskStatus.OFFERED and m.stale == 1


def test_deadline_reassigns_a_frozen_worker_and_next_deadline_tracks_it() -> None:
    m = machine(n_tasks=1, workers=("a", "b"))
    (a,) = m.start(0)
    assert m.next_deadline() == OFFER
    m.on_accepted(a.task.task_id, a.worker, 10)
    assert m.next_deadline() == 10 + TASK
    assert m.on_tick(10 + TASK - 1) == []
    (b,) = m.on_tick(10 + TASK)
    assert b.worker != a.worker
    m.on_submitted(b.task.task_id, b.worker, "ok", 20 + TASK)
    assert m.done and m.submitted() == {"r0-t0": (b.worker, "ok")}
    assert m.next_deadline() is None


def test_fewer_workers_than_tasks_take_them_one_after_another() -> None:
    m = machine(n_tasks=3, workers=("a",))
    (first,) = m.start(0)
    m.on_accepted(first.task.task_id, "a", 1)
    (second,) = m.on_submitted(first.task.task_id, "a", 1, 2)
    assert second.worker == "a" and second.task != first.task


def test_a_worker_joining_mid_round_takes_a_waiting_task() -> None:
    m = machine(n_tasks=2, workers=("a",))
    m.start(0)
    (offer,) = m.add_worker("z", 5)
    assert offer.worker == "z"


def test_a_sized_task_waits_for_its_worker_and_goes_elsewhere_only_when_it_is_gone() -> None:
    tasks = plan_round(job_seed=1, round_=0, rounds=2, n_tasks=3, train_len=10_000,
                       min_slice=65, steps=[30, 30, 10])
    m = RoundMachine(tasks, ["fast", "slow"], offer_timeout_ms=OFFER, task_timeout_ms=TASK,
                     preferred={"r0-t0": "fast", "r0-t1": "fast", "r0-t2": "slow"})
    offers = m.start(0)
    assert sorted((a.task.task_id, a.worker) for a in offers) == [("r0-t0", "fast"),
                                                                  ("r0-t2", "slow")]
    assert m.add_worker("new", 1) == []  # r0-t1 waits for "fast", sized for it
    m.on_accepted("r0-t2", "slow", 2)
    assert m.on_submitted("r0-t2", "slow", "ok", 3) == []  # slow is free, but not its task
    m.on_accepted("r0-t0", "fast", 2)
    # fast leaves: it costs its current task, and the one waiting for it goes elsewhere
    offers = m.on_lost("r0-t0", "fast", 4)
    assert sorted((a.task.task_id, a.worker) for a in offers) == [("r0-t0", "new"),
                                                                  ("r0-t1", "slow")]


def test_a_worker_with_two_slots_takes_two_tasks_at_once() -> None:
    m = machine(n_tasks=3, workers=("gpus", "cpu"), capacity={"gpus": 2, "cpu": 1})
    offers = m.start(0)
    assert sorted(a.worker for a in offers) == ["cpu", "gpus", "gpus"]


def test_misuse_is_a_local_error() -> None:
    tasks = plan_round(job_seed=0, round_=0, rounds=1, n_tasks=2, train_len=1000,
                       min_slice=10)
    with pytest.raises(LocalProtocolError):
        RoundMachine([tasks[0], tasks[0]], ["a"], offer_timeout_ms=1, task_timeout_ms=1)
    with pytest.raises(LocalProtocolError):
        RoundMachine([], ["a"], offer_timeout_ms=1, task_timeout_ms=1)
    with pytest.raises(LocalProtocolError):
        RoundMachine(tasks, ["a"], offer_timeout_ms=1, task_timeout_ms=1, capacity={"a": 0})
    with pytest.raises(LocalProtocolError):
        RoundMachine(tasks, ["a"], offer_timeout_ms=1, task_timeout_ms=1,
                     preferred={"r9-t9": "a"})
    with pytest.raises(LocalProtocolError):
        plan_round(job_seed=0, round_=0, rounds=1, n_tasks=2, train_len=1000, min_slice=10,
                   steps=[1])
    m = machine(n_tasks=1)
    task = m.tasks["r0-t0"]
    with pytest.raises(IllegalTransition):
        m._move(task, "submitted")  # pending -> submitted is not an edge


EVENTS = st.lists(st.tuples(st.sampled_from(["accepted", "refused", "busy", "lost",
                                             "submitted", "tick", "join"]),
                            st.integers(0, 5), st.integers(0, 5), st.integers(0, 3_000)),
                  max_size=60)


@settings(max_examples=300, deadline=None)
@given(events=EVENTS, n_tasks=st.integers(1, 5), n_workers=st.integers(1, 5),
       capacity=st.integers(1, 2), seed=st.integers(0, 2**16), sized=st.booleans())
def test_any_event_order_keeps_the_invariants(events: list[tuple[str, int, int, int]],
                                              n_tasks: int, n_workers: int, capacity: int,
                                              seed: int, sized: bool) -> None:
    workers = [f"w{i}" for i in range(n_workers)]
    # sized: each task sized for a worker, slots per worker differing (1 or 2)
    caps = {w: 1 + (i + capacity) % 2 for i, w in enumerate(workers)}
    extra = {"capacity": caps, "preferred": {f"r0-t{i}": workers[(i * seed) % n_workers]
                                             for i in range(n_tasks)}} if sized else {}
    m = machine(n_tasks=n_tasks, workers=tuple(workers),
                **({"capacity": capacity} | extra),  # type: ignore[arg-type]
                rng=random.Random(seed))
    now = 0
    offers = m.start(now)
    task_ids = sorted(m.tasks)
    for kind, ti, wi, dt in events:
        now += dt
        tid, worker = task_ids[ti % len(task_ids)], f"w{wi}"
        if kind == "accepted":
            offers = m.on_accepted(tid, worker, now)
        elif kind == "refused":
            offers = m.on_refused(tid, worker, now)
        elif kind == "busy":
            offers = m.on_refused(tid, worker, now, busy=True)
        elif kind == "lost":
            offers = m.on_lost(tid, worker, now)
        elif kind == "submitted":
            offers = m.on_submitted(tid, worker, (tid, worker), now)
        elif kind == "tick":
            offers = m.on_tick(now)
        else:
            offers = m.add_worker(worker, now)
        for a in offers:
            assert a.worker not in m.lost and m.holder(a.task.task_id) == a.worker
        loads: dict[str, int] = {}
        for t in m.tasks.values():
            if t.status in (TaskStatus.OFFERED, TaskStatus.TRAINING):
                assert t.worker is not None and t.worker not in m.lost
                loads[t.worker] = loads.get(t.worker, 0) + 1
            if t.status is TaskStatus.SUBMITTED:
                assert t.result == (t.plan.task_id, t.worker)
            assert t.attempts <= 3
        assert all(n <= (caps.get(w, 1) if sized else capacity) for w, n in loads.items())
    # Driving every outstanding task to an end always terminates the round.
    for _ in range(4 * n_tasks + 4):
        if m.done:
            break
        now += OFFER + TASK
        for a in m.on_tick(now):  # every offer refused from here on: the round must end
            m.on_refused(a.task.task_id, a.worker, now)
    assert m.done


def test_transition_table_has_no_edge_out_of_a_final_state() -> None:
    assert not [k for k in TRANSITIONS if k[0] in (TaskStatus.SUBMITTED, TaskStatus.FAILED)]


def test_a_busy_worker_is_asked_again_later_and_it_costs_no_attempt() -> None:
    m = machine(n_tasks=1, workers=("a",))
    (first,) = m.start(0)
    assert m.on_refused(first.task.task_id, "a", 10, busy=True) == []
    assert m.next_deadline() == 10 + 2_000 and m.on_tick(10 + 1_999) == []
    (again,) = m.on_tick(10 + 2_000)
    assert again.worker == "a" and again.attempt == 1
    m.on_refused(again.task.task_id, "a", 3_000)  # a real refusal: the task fails
    assert m.done and m.failed() == ["r0-t0"]
