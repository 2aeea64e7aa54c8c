"""Breakthrough rewards across jobs on one evaluation set (protocol/ledger.py,
specs/rewards.md "Breakthrough"): the branches of an agent's search compete with each
other, so the rounds on the optimal path are paid and a branch that only beats its own
parent is not."""

from __future__ import annotations

from protocol.jobs import Job, seal_job
from protocol.jobspec import spec_with_defaults
from protocol.ledger import Ledger, encode_tx, eval_set_id
from protocol.txs import check_tx
from tests.test_ledger import (
    BASE,
    COORD,
    KEYS,
    PEERS,
    W1,
    W2,
    W3,
    Chain,
    G,
    receipt_tx,
    rid,
    round_tx,
)

DATA = b"\x02" * 32


def branch_job(name: str, base: bytes, seq_len: int = 64) -> tuple[bytes, bytes, bytes]:
    """(tx, job id, eval set) of a one-round branch job from ``base``."""
    spec = spec_with_defaults(name=name, base_model=base, dataset=DATA, rounds=1,
                              workers_per_round=1, inner_steps=1, seq_len=seq_len)
    tx = encode_tx("job", seal_job(KEYS[COORD], Job(spec, PEERS[COORD], 1)))
    return tx, check_tx(G, tx).ref, eval_set_id(spec)


def test_branches_on_one_eval_set_compete_and_the_optimal_path_is_paid() -> None:
    c = Chain()
    va, vb, vc = b"\xa1" * 32, b"\xb1" * 32, b"\xc1" * 32
    (ja_tx, ja, key), (jb_tx, jb, key_b) = branch_job("a", BASE), branch_job("b", BASE)
    assert key == key_b
    ra, rb = receipt_tx(ja, W1, "t1"), receipt_tx(jb, W2, "t1")
    c.block(ja_tx, jb_tx, ra, rb)
    start = c.ledger.balances()
    # Branch a: 5.0 -> 3.0, the first result on this evaluation set: a breakthrough.
    c.block(round_tx(ja, 0, va, BASE, 3_000_000, 5_000_000, [rid(ra)]))
    paid_a = c.ledger.balance(PEERS[W1]) - start.get(PEERS[W1], 0)
    assert paid_a == 8_000 and c.ledger.eval_best(key) == 3_000_000
    # Branch b: 5.0 -> 3.5 beats its parent but not branch a: nothing minted.
    before_b = c.ledger.balances()
    c.block(round_tx(jb, 0, vb, BASE, 3_500_000, 5_000_000, [rid(rb)]))
    assert c.ledger.balances() == before_b
    assert c.ledger.job(jb).best_micro == 3_500_000 and c.ledger.eval_best(key) == 3_000_000
    # Branch c continues from a's version: 3.0 -> 2.9, a new best: paid.
    jc_tx, jc, _ = branch_job("c", va)
    rc = receipt_tx(jc, W3, "t1")
    c.block(jc_tx, rc)
    before_c = c.ledger.balances()
    c.block(round_tx(jc, 0, vc, va, 2_900_000, 3_000_000, [rid(rc)]))
    assert c.ledger.balance(PEERS[W3]) - before_c.get(PEERS[W3], 0) == 8_000
    assert c.ledger.eval_best(key) == 2_900_000
    # The path base -> a -> c holds both paid rounds; the ledger's lineage runs across
    # the two jobs.
    assert [v for v, _ in c.ledger.lineage(vc)] == [vc, va]
    # The bests survive a snapshot (derived from the jobs' bests).
    assert Ledger.decode(c.ledger.encode()).eval_best(key) == 2_900_000


def test_another_eval_set_is_judged_on_its_own() -> None:
    c = Chain()
    (ja_tx, ja, key_a), (jd_tx, jd, key_d) = branch_job("a", BASE), \
        branch_job("d", BASE, seq_len=32)
    assert key_a != key_d
    ra, rd = receipt_tx(ja, W1, "t1"), receipt_tx(jd, W2, "t1")
    c.block(ja_tx, jd_tx, ra, rd)
    c.block(round_tx(ja, 0, b"\xa1" * 32, BASE, 2_000_000, 5_000_000, [rid(ra)]))
    before = c.ledger.balances()
    # 5.0 -> 4.0 on windows of 32 bytes: no comparison with the 64-byte windows' 2.0.
    c.block(round_tx(jd, 0, b"\xd1" * 32, BASE, 4_000_000, 5_000_000, [rid(rd)]))
    assert c.ledger.balance(PEERS[W2]) - before.get(PEERS[W2], 0) == 8_000
    assert c.ledger.eval_best(key_d) == 4_000_000 and c.ledger.eval_best(key_a) == 2_000_000
