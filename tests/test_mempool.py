"""protocol/mempool.py: admission and expiry, checked against a plain model of
specs/consensus.md "Mempool and blocks" over random sequences of events."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.mempool import (
    FINALITY_BUDGET_MS,
    MAX_RETRY_AFTER_S,
    Admission,
    Mempool,
    budget_for,
)
from protocol.txs import CheckedTx, TxRefused

MAX, TTL = 4, 1000


def tx(n: int) -> CheckedTx:
    return CheckedTx(id=bytes([n]) * 32, kind="receipt", data=bytes([n]), record=None,
                     ref=bytes(32))


ids = st.integers(0, 9)
events = st.one_of(
    st.tuples(st.just("add"), ids, st.booleans()),
    st.tuples(st.just("drop"), st.lists(ids, max_size=3)),
    st.tuples(st.just("refused"), st.lists(st.tuples(ids, st.booleans()), max_size=4)),
    st.tuples(st.just("wait"), st.integers(0, 700)),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(events, max_size=40))
def test_matches_the_model(steps: list[tuple]) -> None:  # type: ignore[type-arg]
    pool = Mempool(max_txs=MAX, retry_ttl_ms=TTL)
    model: dict[int, tuple[int, bool]] = {}  # arrival order: dicts keep insertion order
    now = 0
    for step in steps:
        if step[0] == "add":
            _, n, own = step
            expected = n not in model and (len(model) < MAX or own)
            if n in model:
                model[n] = (model[n][0], model[n][1] or own)
            elif expected:
                model[n] = (now, own)
            assert pool.add(tx(n), now, own=own) == expected
        elif step[0] == "drop":
            pool.drop(tx(n).id for n in step[1])
            for n in step[1]:
                model.pop(n, None)
        elif step[0] == "refused":
            refusals = [(tx(n), TxRefused("r", "why", retry)) for n, retry in step[1]]
            gone = {n for n, retry in step[1]
                    if n in model and (not retry or now - model[n][0] > TTL)}
            assert {i[0] for i in pool.refused(refusals, now)} == gone
            for n in gone:
                del model[n]
        else:
            now += step[1]
        assert [c.id[0] for c in pool.candidates()] == list(model)  # arrival order
        assert {w.tx.id[0] for w in pool.own()} == {n for n, (_, own) in model.items() if own}
        assert len(pool) == len(model)
        others = [n for n, (_, own) in model.items() if not own]
        assert len(others) <= MAX  # others' txs never take the pool past its bound


def test_a_full_pool_refuses_others_and_takes_its_own() -> None:
    pool = Mempool(max_txs=2)
    assert pool.add(tx(1), 0) and pool.add(tx(2), 0)
    assert pool.is_full() and not pool.is_full(0)
    assert not pool.add(tx(3), 0)
    assert pool.add(tx(4), 0, own=True) and len(pool) == 3
    assert not pool.add(tx(1), 0, own=True)  # held already: now it is own too
    assert {w.tx.id[0] for w in pool.own()} == {1, 4}


# -- the finality budget --------------------------------------------------------------------

BUDGET, WINDOW, FLOOR = 1000, 5000, 10


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3000), st.integers(0, 2000)), max_size=30),
       st.integers(0, 5000), st.integers(1, 500))
def test_admission_takes_what_drains_within_the_budget(blocks: list[tuple[int, int]],
                                                      held: int, adding: int) -> None:
    """Blocks of ``txs`` final ``gap`` ms apart: the limit is what the last WINDOW ms
    finalized, per second, times the budget, never under the floor; an empty pool takes
    any batch; a refused pool is told to come back once enough would have drained,
    within 1..MAX_RETRY_AFTER_S."""
    a = Admission(budget_ms=BUDGET, window_ms=WINDOW, floor=FLOOR)
    now, history = 0, []
    for gap, txs in blocks:
        now += gap
        a.finalized(txs, now)
        history.append((now, txs))
    rate = sum(txs for at, txs in history if at > now - WINDOW) * 1000 / WINDOW
    assert a.rate(now) == rate
    limit = max(FLOOR, int(rate * BUDGET / 1000))
    assert a.limit(now) == limit
    assert a.limit(now, budgets=2) == max(FLOOR, int(rate * 2 * BUDGET / 1000))
    assert a.admits(held, adding, now) == (held == 0 or held + adding <= limit)
    after = a.retry_after_s(held, adding, now)
    assert 1 <= after <= MAX_RETRY_AFTER_S
    if rate == 0:
        assert after == MAX_RETRY_AFTER_S  # nothing drains: come back much later
    elif not a.admits(held, adding, now):
        # By then the pool has drained to what may be held with the batch added.
        assert after * rate >= held - max(0, limit - adding) or after == MAX_RETRY_AFTER_S


def test_an_idle_chain_takes_the_floor_and_a_busy_one_its_rate() -> None:
    a = Admission(budget_ms=1000, window_ms=5000, floor=500)
    assert a.admits(0, 500, 0) and not a.admits(1, 500, 0)  # no rate yet: the floor
    assert a.admits(0, 900, 0)  # an empty pool takes any batch: waiting would not help
    for i in range(50):  # 100 ms blocks of 200 txs: 2,000 finalized a second
        a.finalized(200, i * 100)
    assert a.rate(4900) == 2000 and a.limit(4900) == 2000
    assert a.admits(1900, 100, 4900) and not a.admits(1901, 100, 4900)
    assert a.retry_after_s(3000, 100, 4900) == 1  # 1,100 to drain at 2,000/s
    assert a.limit(4900 + 5000) == 500  # the chain went quiet: back to the floor


def intake_after(budget_ms: int, interval_ms: int, blocks: int) -> int:
    """A chain whose every block takes all that its pool admitted, the pool taking its
    limit between blocks: the size of the last block."""
    a = Admission(budget_ms=budget_ms, window_ms=5000, floor=500)
    block = 2000
    for i in range(blocks):
        a.finalized(block, i * interval_ms)
        block = a.limit(i * interval_ms)
    return block


def test_slow_blocks_do_not_shrink_the_intake_to_the_floor() -> None:
    """The limit follows the rate and the rate what was admitted: with blocks 2 s apart
    and a 1 s budget each block would halve the next (down to the floor); the budget of
    a chain is at least two of its block intervals."""
    assert budget_for(100) == FINALITY_BUDGET_MS and budget_for(2000) == 4000
    assert intake_after(1000, 2000, 20) == 500  # what a fixed 1 s budget did
    assert intake_after(budget_for(2000), 2000, 20) >= 2000
    assert intake_after(budget_for(100), 100, 100) >= 2000
