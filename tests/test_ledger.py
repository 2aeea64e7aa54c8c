"""protocol.ledger and protocol.txs: every transaction kind accepted and refused for each
reason, exact splits, breakthroughs, revenue along lineages, block checks, snapshots, and
properties (the supply invariant, identical roots from identical blocks)."""

from __future__ import annotations

import dataclasses
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nacl.signing import SigningKey

from protocol.errors import LocalProtocolError, RemoteProtocolError
from protocol.feed import ForkEvidence, next_entry
from protocol.genesis import Genesis, make_genesis
from protocol.jobs import (
    Job,
    TaskResult,
    issue_receipt,
    seal_job,
    seal_task_result,
    spec_with_defaults,
)
from protocol.ledger import (
    Block,
    CheckedTx,
    Ledger,
    ReceiptEntry,
    Revenue,
    RoundRecord,
    TxRefused,
    check_tx,
    encode_tx,
    quality_bps,
    split,
)
from protocol.peerid import peer_id_from_public_key
from protocol.txs import votes_payload

KEYS = [SigningKey(bytes([i]) * 32) for i in range(1, 11)]
PEERS = [peer_id_from_public_key(bytes(k.verify_key)) for k in KEYS]
VALIDATORS = PEERS[:4]
COORD, OTHER, W1, W2, W3, PAYER = 4, 5, 6, 7, 8, 9  # indices into KEYS / PEERS
BASE = b"\xba" * 32
CHAIN = "test-chain"


def genesis(**overrides: object) -> Genesis:
    params: dict[str, object] = {"emission_per_block": 1000, "breakthrough_reward": 10_000,
                                 "breakthrough_margin_micro": 10_000,
                                 "quality_ref_micro": 100_000}
    params.update(overrides)
    return make_genesis(CHAIN, VALIDATORS, 1000, **params)


G = genesis()


def job_tx(coord: int = COORD, *, rounds: int = 3, share: float = 0.2, name: str = "j",
           base: bytes = BASE) -> tuple[bytes, bytes]:
    """(tx, job id)."""
    spec = spec_with_defaults(name=name, base_model=base, dataset=b"\x02" * 32,
                              rounds=rounds, workers_per_round=2, inner_steps=1,
                              designer_share_bps=round(share * 10000))
    data = seal_job(KEYS[coord], Job(spec, PEERS[coord], 1))
    return encode_tx("job", data), check_tx(G, encode_tx("job", data)).ref


def receipt_tx(job_id: bytes, worker: int, task: str, *, rnd: int = 0, tokens: int = 100,
               coord: int = COORD, gain: float | None = None, issued_ms: int = 7) -> bytes:
    result = seal_task_result(KEYS[worker], TaskResult(job_id, rnd, task, PEERS[worker],
                                                       b"\x04" * 32, 3.0, 2.0, tokens, 5))
    metrics = {} if gain is None else {"own_gain": gain}
    return encode_tx("receipt", issue_receipt(KEYS[coord], result, metrics=metrics,
                                              issued_ms=issued_ms))


def round_tx(job_id: bytes, rnd: int, version: bytes, parent: bytes, loss: int,
             parent_loss: int, receipts: list[bytes], *, coord: int = COORD,
             chain: str = CHAIN) -> bytes:
    rec = RoundRecord(chain, job_id, rnd, PEERS[coord], version, parent, loss, parent_loss,
                      tuple(receipts))
    return encode_tx("round", rec.seal(KEYS[coord]))


def revenue_tx(model: bytes, amount: int, nonce: int, *, payer: int = PAYER,
               chain: str = CHAIN) -> bytes:
    rev = Revenue(chain, PEERS[payer], model, amount, nonce, "api fees")
    return encode_tx("revenue", rev.seal(KEYS[payer]))


def rid(tx: bytes) -> bytes:
    return check_tx(G, tx).ref


class Chain:
    """A ledger driven by build_block; every block also re-applied on a snapshot copy."""

    def __init__(self, g: Genesis = G) -> None:
        self.g = g
        self.ledger = Ledger.from_genesis(g)
        self.time = g.genesis_time_ms

    def block(self, *txs: bytes, strict: bool = True) -> list[tuple[CheckedTx, TxRefused]]:
        checked = [check_tx(self.g, t) for t in txs]
        self.time += 1000
        block, refused = self.ledger.build_block(checked, time_ms=self.time,
                                                 proposer=VALIDATORS[0], max_bytes=1 << 20)
        if strict:
            assert not refused, refused
        copy = Ledger.decode(self.ledger.encode())
        kept = [check_tx(self.g, t) for t in block.txs]
        again = copy.apply_block(block, kept)
        self.ledger = self.ledger.apply_block(block, kept)
        assert again.state_root() == self.ledger.state_root() == block.state_root
        assert sum(self.ledger.balances().values()) == self.ledger.supply
        return refused

    def refused(self, tx: bytes) -> TxRefused:
        refusals = self.block(tx, strict=False)
        assert len(refusals) == 1
        return refusals[0][1]


# --- splits and quality ------------------------------------------------------------------------


@given(st.integers(0, 10**12),
       st.dictionaries(st.sampled_from(PEERS), st.integers(0, 10**9), max_size=10))
def test_split_is_exact_and_proportional(total: int, weights: dict[str, int]) -> None:
    out = split(total, weights)
    whole = sum(weights.values())
    if whole == 0 or total == 0:
        assert out == {}
        return
    assert sum(out.values()) == total
    for peer, w in weights.items():
        assert abs(out.get(peer, 0) - total * w / whole) < 1 + 1e-6 * total


def test_split_ties_go_to_the_smaller_peer_id() -> None:
    a, b, c = sorted(PEERS[:3])
    assert split(2, {c: 1, b: 1, a: 1}) == {a: 1, b: 1}
    assert split(10, {a: 1, b: 2}) == {a: 3, b: 7}  # remainders 1/3 vs 2/3: b first


def test_quality_from_own_gain() -> None:
    r = G.rewards
    assert quality_bps({}, r) == 10000
    assert quality_bps({"own_gain": 0.1}, r) == 10000
    assert quality_bps({"own_gain": 0.05}, r) == 5000
    assert quality_bps({"own_gain": -3.0}, r) == 1000
    assert quality_bps({"own_gain": 0.001}, r) == 1000
    assert quality_bps({"own_gain": 5.0}, r) == 20000


# --- transactions ------------------------------------------------------------------------------


def test_job_registered_once() -> None:
    c = Chain()
    tx, jid = job_tx()
    c.block(tx)
    job = c.ledger.job(jid)
    assert job is not None and job.designer == PEERS[COORD]
    assert (job.designer_share_bps, job.rounds, job.best_micro) == (2000, 3, None)
    assert c.refused(tx).reason == "duplicate"


def test_receipt_counts_once_and_mints_emission_split_designer_and_worker() -> None:
    c = Chain()
    jtx, jid = job_tx()
    r1 = receipt_tx(jid, W1, "t1", tokens=100)
    r2 = receipt_tx(jid, W2, "t2", tokens=300, gain=0.05)  # quality 0.5: weight 150
    c.block(jtx, r1, r2)
    assert c.ledger.is_counted(rid(r1)) and c.ledger.receipts_counted == 2
    # weights: W1 100*10000, W2 300*5000; designer 20% of each.
    assert c.ledger.balance(PEERS[W1]) + c.ledger.balance(PEERS[W2]) == 800
    assert c.ledger.balance(PEERS[COORD]) == 200
    assert c.ledger.emitted == 1000
    # Twice in one block: the second is refused; in a later block: refused.
    refusals = c.block(r1, r1, strict=False)
    assert [x.reason for _, x in refusals] == ["duplicate", "duplicate"]
    assert c.ledger.emitted == 1000  # a block without receipts mints nothing
    c2 = Chain()
    refusals = c2.block(jtx, r1, r1, strict=False)
    assert [x.reason for _, x in refusals] == ["duplicate"]
    assert c2.ledger.receipts_counted == 1


def test_same_task_re_receipted_counts_once() -> None:
    c = Chain()
    jtx, jid = job_tx()
    c.block(jtx, receipt_tx(jid, W1, "t1"))
    again = receipt_tx(jid, W1, "t1", issued_ms=99)  # another receipt id, same task
    assert c.refused(again).reason == "duplicate-task"


def test_receipt_refusals() -> None:
    c = Chain()
    jtx, jid = job_tx()
    unknown = c.refused(receipt_tx(jid, W1, "t1"))
    assert (unknown.reason, unknown.retry) == ("unknown-job", True)
    c.block(jtx)
    forged = c.refused(receipt_tx(jid, W1, "t1", coord=OTHER))
    assert (forged.reason, forged.retry) == ("not-coordinator", False)
    assert c.refused(receipt_tx(jid, W1, "t1", rnd=3)).reason == "bad-round"
    tampered = bytearray(receipt_tx(jid, W1, "t1"))
    tampered[-3] ^= 1
    with pytest.raises(TxRefused) as exc:
        check_tx(G, bytes(tampered))
    assert exc.value.reason == "bad-signature" and not exc.value.retry
    with pytest.raises(TxRefused):
        check_tx(G, b"\x92\xa3job\xc4\x01x")  # a job payload that is not an envelope
    with pytest.raises(TxRefused):
        check_tx(G, b"garbage")


def test_round_record_breakthrough_with_and_without_margin() -> None:
    c = Chain()
    jtx, jid = job_tx(share=0.2)
    r1, r2 = receipt_tx(jid, W1, "t1", tokens=100), receipt_tx(jid, W2, "t2", tokens=300)
    c.block(jtx, r1, r2)
    before = c.ledger.balances()
    v1, v2, v3 = b"\x11" * 32, b"\x12" * 32, b"\x13" * 32
    # 2.0 -> 1.995 nats: below the 0.01 margin, no breakthrough; best becomes 1.995.
    c.block(round_tx(jid, 0, v1, BASE, 1_995_000, 2_000_000, [rid(r1), rid(r2)]))
    assert c.ledger.balances() == before and c.ledger.job(jid).best_micro == 1_995_000
    # 1.985 <= 1.995 - 0.01: breakthrough of 10000; 2000 to the designer, 8000 by weight.
    r3 = receipt_tx(jid, W3, "t3", rnd=1)
    c.block(r3)
    mid = c.ledger.balances()
    c.block(round_tx(jid, 1, v2, v1, 1_985_000, 1_995_000, [rid(r3)]))
    after = c.ledger.balances()
    assert after[PEERS[COORD]] - mid[PEERS[COORD]] == 2000
    assert after[PEERS[W3]] - mid[PEERS[W3]] == 8000
    # No listed receipts: the whole breakthrough goes to the designer.
    c.block(round_tx(jid, 2, v3, v2, 1_000_000, 1_985_000, []))
    assert c.ledger.balance(PEERS[COORD]) - after[PEERS[COORD]] == 10_000
    assert c.ledger.job(jid).best_micro == 1_000_000
    assert [v for v, _ in c.ledger.lineage(v3)] == [v3, v2, v1]


def test_round_record_refusals() -> None:
    c = Chain()
    jtx, jid = job_tx()
    r1 = receipt_tx(jid, W1, "t1")
    v1 = b"\x11" * 32
    pending = c.refused(round_tx(jid, 0, v1, BASE, 1, 2, []))
    assert (pending.reason, pending.retry) == ("unknown-job", True)
    c.block(jtx)
    waits = c.refused(round_tx(jid, 0, v1, BASE, 1, 2, [rid(r1)]))
    assert (waits.reason, waits.retry) == ("receipts-pending", True)
    assert c.refused(round_tx(jid, 0, v1, BASE, 1, 2, [], coord=OTHER)).reason == \
        "not-coordinator"
    assert c.refused(round_tx(jid, 0, v1, b"\x99" * 32, 1, 2, [])).reason == "bad-parent"
    with pytest.raises(TxRefused) as exc:
        check_tx(G, round_tx(jid, 0, v1, BASE, 1, 2, [], chain="other-chain"))
    assert (exc.value.reason, exc.value.retry) == ("wrong-chain", False)
    c.block(r1, round_tx(jid, 0, v1, BASE, 1, 2, [rid(r1)]))
    assert c.refused(round_tx(jid, 0, b"\x22" * 32, BASE, 1, 2, [])).reason == "duplicate"
    assert c.refused(round_tx(jid, 1, v1, v1 * 0 + b"\x33" * 32, 1, 2, [])).reason == \
        "known-version"
    r2 = receipt_tx(jid, W2, "t2", rnd=1)
    c.block(r2)
    assert c.refused(round_tx(jid, 2, b"\x44" * 32, v1, 1, 2, [rid(r2)])).reason == \
        "receipt-mismatch"


def test_revenue_split_along_lineage_across_two_rounds_and_two_jobs() -> None:
    c = Chain()
    ja, a = job_tx(share=0.1, rounds=2, name="a")
    v1, v2, v3 = b"\x11" * 32, b"\x12" * 32, b"\x13" * 32
    jb, b = job_tx(coord=OTHER, share=0.5, rounds=1, name="b", base=v2)
    ra0 = receipt_tx(a, W1, "t0", tokens=100)
    ra1 = receipt_tx(a, W2, "t1", rnd=1, tokens=100)
    rb0 = receipt_tx(b, W3, "t0", coord=OTHER, tokens=200)
    c.block(ja, jb, ra0, ra1, rb0)
    c.block(round_tx(a, 0, v1, BASE, 5, 5, [rid(ra0)]),
            round_tx(a, 1, v2, v1, 5, 5, [rid(ra1)]),
            round_tx(b, 0, v3, v2, 5, 5, [rid(rb0)], coord=OTHER))
    before = c.ledger.balances()
    c.block(revenue_tx(v3, 10_000, 1))
    gain = {p: c.ledger.balance(p) - before.get(p, 0) for p in PEERS}
    # Job b produced v3: its designer takes 50%; the rest by weight 100:100:200.
    assert gain[PEERS[OTHER]] == 5000
    assert (gain[PEERS[W1]], gain[PEERS[W2]], gain[PEERS[W3]]) == (1250, 1250, 2500)
    assert gain[PEERS[COORD]] == 0 and c.ledger.revenue == 10_000
    # Revenue for v1 reaches round 0 of job a only.
    before = c.ledger.balances()
    c.block(revenue_tx(v1, 1000, 2))
    assert c.ledger.balance(PEERS[COORD]) - before[PEERS[COORD]] == 100
    assert c.ledger.balance(PEERS[W1]) - before[PEERS[W1]] == 900


def test_revenue_refusals() -> None:
    c = Chain()
    jtx, jid = job_tx()
    v1 = b"\x11" * 32
    unknown = c.refused(revenue_tx(v1, 10, 1))
    assert (unknown.reason, unknown.retry) == ("unknown-model", True)
    c.block(jtx, round_tx(jid, 0, v1, BASE, 1, 1, []), revenue_tx(v1, 10, 1))
    replay = c.refused(revenue_tx(v1, 10, 1))
    assert (replay.reason, replay.retry) == ("replayed", False)
    gap = c.refused(revenue_tx(v1, 10, 3))
    assert (gap.reason, gap.retry) == ("nonce-gap", True)
    with pytest.raises(TxRefused) as exc:
        check_tx(G, revenue_tx(v1, 10, 2, chain="other-chain"))
    assert exc.value.reason == "wrong-chain"
    rev = Revenue(CHAIN, PEERS[PAYER], v1, 10, 2)
    with pytest.raises(LocalProtocolError):
        rev.seal(KEYS[W1])  # only the payer signs its revenue


def test_feed_fork_evidence_recorded_once() -> None:
    c = Chain()
    a = next_entry(KEYS[W1], None, None, "receipt", b"a", 1)
    b = next_entry(KEYS[W1], None, None, "receipt", b"b", 1)
    tx = encode_tx("feed-fork", ForkEvidence(PEERS[W1], 1, a, b).encode())
    c.block(tx)
    [ev] = c.ledger.evidence()
    assert (ev.kind, ev.offender, ev.key) == ("feed-fork", PEERS[W1], (PEERS[W1], 1))
    assert c.refused(tx).reason == "duplicate"
    with pytest.raises(TxRefused) as exc:
        check_tx(G, encode_tx("feed-fork", ForkEvidence(PEERS[W1], 1, a, a).encode()))
    assert exc.value.reason == "bad-evidence"


# --- blocks ------------------------------------------------------------------------------------


def _block_and_checked(c: Chain, *txs: bytes) -> tuple[Block, list[CheckedTx]]:
    checked = [check_tx(G, t) for t in txs]
    block, refused = c.ledger.build_block(checked, time_ms=c.time + 1000,
                                          proposer=VALIDATORS[1], max_bytes=1 << 20)
    assert not refused
    return block, checked


def test_apply_block_refuses_wrong_header_root_or_tx() -> None:
    c = Chain()
    jtx, jid = job_tx()
    c.block(jtx)
    block, checked = _block_and_checked(c, receipt_tx(jid, W1, "t1"))
    fresh = Ledger.decode(c.ledger.encode())  # no cached build: really applies
    root = c.ledger.state_root()
    bad = {
        "wrong-chain": dataclasses.replace(block, chain_id="other"),
        "bad-height": dataclasses.replace(block, height=3),
        "bad-prev": dataclasses.replace(block, prev_id=b"\x01" * 32),
        "bad-time": dataclasses.replace(block, time_ms=c.time - 1),
        "not-validator": dataclasses.replace(block, proposer=PEERS[W1]),
        "bad-state-root": dataclasses.replace(block, state_root=b"\x05" * 32),
    }
    for reason, b in bad.items():
        with pytest.raises(RemoteProtocolError) as exc:
            fresh.apply_block(b, checked)
        assert exc.value.reason == reason
    dup = receipt_tx(jid, W1, "t9")
    twice = dataclasses.replace(block, txs=(dup, dup))
    with pytest.raises(TxRefused) as exc:
        fresh.apply_block(twice, [check_tx(G, dup)] * 2)
    assert exc.value.reason == "duplicate"
    with pytest.raises(LocalProtocolError):
        fresh.apply_block(block, [])
    assert fresh.state_root() == root and c.ledger.state_root() == root
    assert fresh.apply_block(block, checked).state_root() == block.state_root
    assert Block.decode(block.encode(), G.max_block_bytes) == block
    with pytest.raises(RemoteProtocolError) as exc:
        Block.decode(block.encode(), 100)
    assert exc.value.reason == "oversized"


def test_build_block_respects_max_bytes_and_leaves_the_rest() -> None:
    c = Chain()
    jtx, jid = job_tx()
    c.block(jtx)
    txs = [check_tx(G, receipt_tx(jid, W1, f"t{i}")) for i in range(30)]
    cap = len(txs[0].data) * 10
    block, refused = c.ledger.build_block(txs, time_ms=c.time + 1, proposer=VALIDATORS[0],
                                          max_bytes=cap)
    assert not refused and 5 < len(block.txs) < 10 and len(block.encode()) <= cap


def test_stale_states_are_refused_after_another_branch_is_folded() -> None:
    c = Chain()
    jtx, jid = job_tx()
    c.block(jtx)
    parent = c.ledger
    a, ca = _block_and_checked(c, receipt_tx(jid, W1, "a"))
    la = Ledger.decode(parent.encode()).apply_block(a, ca)  # independent copy
    lb = parent.apply_block(*_block_and_checked(c, receipt_tx(jid, W2, "b")))
    assert parent.height == 1 and lb.height == 2 and la.height == 2
    lb2 = lb.build_block([], time_ms=c.time + 5000, proposer=VALIDATORS[0], max_bytes=1 << 20)
    assert lb2[0].height == 3
    with pytest.raises(LocalProtocolError):
        parent.balances()  # lb was folded into the shared store


# --- properties --------------------------------------------------------------------------------

_J1, _JID1 = job_tx(name="p1")
_J2, _JID2 = job_tx(coord=OTHER, name="p2", share=0.33)
_POOL = [_J1, _J2]
for _i in range(6):
    _POOL.append(receipt_tx(_JID1, W1 + _i % 3, f"t{_i}", rnd=_i % 2, tokens=50 + _i,
                            gain=0.03 * _i))
    _POOL.append(receipt_tx(_JID2, W1 + _i % 3, f"t{_i}", coord=OTHER, tokens=70 * _i))
_RID = [rid(t) for t in _POOL[2:]]
_POOL += [round_tx(_JID1, 0, b"\x11" * 32, BASE, 900_000, 1_000_000, [_RID[0], _RID[4]]),
          round_tx(_JID1, 1, b"\x12" * 32, b"\x11" * 32, 800_000, 900_000, [_RID[2]]),
          round_tx(_JID2, 0, b"\x21" * 32, BASE, 1, 5, [_RID[1], _RID[3]], coord=OTHER),
          revenue_tx(b"\x12" * 32, 777, 1), revenue_tx(b"\x21" * 32, 10**6, 2),
          revenue_tx(b"\x11" * 32, 3, 3)]
_CHECKED = {t: check_tx(G, t) for t in _POOL}


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.lists(st.sampled_from(_POOL), max_size=8), min_size=1, max_size=6))
def test_any_tx_sequence_keeps_the_supply_invariant_and_roots_agree(
        blocks: list[list[bytes]]) -> None:
    one, two = Ledger.from_genesis(G), Ledger.from_genesis(G)
    t = G.genesis_time_ms
    for txs in blocks:
        t += 1
        block, _ = one.build_block([_CHECKED[x] for x in txs], time_ms=t,
                                   proposer=VALIDATORS[2], max_bytes=1 << 20)
        checked = [_CHECKED[x] for x in block.txs]
        one = one.apply_block(block, checked)
        two = two.apply_block(block, checked)
        assert one.state_root() == two.state_root() == block.state_root
        assert sum(one.balances().values()) == one.supply == \
            one.allocated + one.emitted + one.revenue
    assert Ledger.decode(one.encode()).state_root() == one.state_root()


def test_snapshot_round_trip_and_tamper() -> None:
    c = Chain(genesis(allocations={PEERS[PAYER]: 5}))
    jtx, jid = job_tx()
    c.block(jtx, receipt_tx(jid, W1, "t1"))
    copy = Ledger.decode(c.ledger.encode())
    assert copy.state_root() == c.ledger.state_root() and copy.balances() == \
        c.ledger.balances() and copy.allocated == 5
    data = bytearray(c.ledger.encode())
    amount = c.ledger.balance(PEERS[W1])
    j = data.index(PEERS[W1].encode() + bytes([0xCD]) + amount.to_bytes(2, "big"))
    data[j + len(PEERS[W1]) + 2] ^= 1
    with pytest.raises(RemoteProtocolError) as exc:
        Ledger.decode(bytes(data))
    assert exc.value.reason == "bad-snapshot"


# --- performance -------------------------------------------------------------------------------


def test_build_and_apply_of_a_1000_receipt_block_on_a_big_ledger_are_fast() -> None:
    """1000 checked receipts (832 bytes each: a 768 KiB block holds ~940, hence the larger
    cap) on a ledger that already counted 100,000: neither build nor apply walks them."""
    g = genesis(max_block_bytes=1024 * 1024 - 8192)
    ledger = Ledger.from_genesis(g)
    jtx, jid = job_tx(rounds=10_000)
    first, _ = ledger.build_block([check_tx(g, jtx)], time_ms=2000, proposer=VALIDATORS[0],
                                  max_bytes=1 << 20)
    ledger = ledger.apply_block(first, [check_tx(g, jtx)])
    maps = ledger._store.maps
    for i in range(100_000):  # counted before: straight into the shared store
        key = i.to_bytes(32, "big")
        maps["receipts"][key] = ReceiptEntry(jid, 9999, f"old{i}", PEERS[W1], 1, 1, 1)
        maps["tasks"][(jid, 9999, f"old{i}")] = key
    checked = [check_tx(g, receipt_tx(jid, W1 + i % 3, f"t{i}", rnd=i % 100, gain=0.07))
               for i in range(1000)]
    started = time.perf_counter()
    block, refused = ledger.build_block(checked, time_ms=3000, proposer=VALIDATORS[0],
                                        max_bytes=1 << 20)
    built = time.perf_counter() - started
    assert not refused and len(block.txs) == 1000
    ledger._built = None  # make apply_block really apply
    started = time.perf_counter()
    new = ledger.apply_block(block, checked)
    applied = time.perf_counter() - started
    assert new.receipts_counted == 1000 and new.emitted == 1000
    assert built < 0.5 and applied < 0.5, (built, applied)  # ~10 ms each when idle


def test_double_vote_recorded_once_per_slot() -> None:
    from protocol.consensus import Vote, seal_vote

    def vote(block: bytes | None, validator: int = 0, rnd: int = 0) -> bytes:
        return seal_vote(KEYS[validator], Vote(CHAIN, 5, rnd, "precommit", block,
                                               PEERS[validator]))

    c = Chain()
    tx = encode_tx("double-vote", votes_payload(vote(b"\x01" * 32), vote(b"\x02" * 32)))
    c.block(tx)
    [ev] = c.ledger.evidence()
    assert (ev.kind, ev.key) == ("double-vote", (PEERS[0], 5, 0, "precommit"))
    other_pair = encode_tx("double-vote", votes_payload(vote(b"\x03" * 32),
                                                        vote(None)))
    assert c.refused(other_pair).reason == "duplicate"  # the same slot, other votes
    c.block(encode_tx("double-vote", votes_payload(vote(b"\x01" * 32, rnd=1),
                                                   vote(b"\x02" * 32, rnd=1))))
    assert len(c.ledger.evidence()) == 2
    with pytest.raises(TxRefused):  # agreeing votes prove nothing
        check_tx(G, encode_tx("double-vote", votes_payload(vote(None), vote(None))))
    with pytest.raises(TxRefused):  # not a validator
        check_tx(G, encode_tx("double-vote", votes_payload(vote(None, W1),
                                                           vote(b"\x01" * 32, W1))))
