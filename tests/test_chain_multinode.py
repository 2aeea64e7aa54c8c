"""The chain on real py-libp2p hosts on 127.0.0.1 (node/chain/service.py): four validators
finalize blocks of receipts; one down, the chain goes on; two of four down, it halts
without forking and resumes when they return; a validator that signs two votes in one
round cannot cause conflicting finality and is recorded; a fresh node replays the chain
to the same state root.

The default suite keeps the double-voting test here (real sockets, end to end); the others
run with ``-m slow``: tests/test_chain_memnet.py runs their logic on the in-memory network
and trio's MockClock in a few seconds."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import trio

from node.chain.consensus import Consensus
from node.chain.network import publish
from node.chain.service import Chain, ChainBusy
from node.config import ChainSection, DiscoverySection
from protocol.consensus import PRECOMMIT, PREVOTE, Broadcast, Vote, open_vote, seal_vote
from protocol.errors import RemoteProtocolError
from protocol.feed import ForkEvidence, next_entry
from protocol.genesis import Genesis, make_genesis
from protocol.jobs import Job, TaskResult, issue_receipt, seal_job, seal_task_result
from protocol.jobs import job_id as compute_job_id
from protocol.jobspec import spec_with_defaults
from protocol.ledger import encode_tx
from protocol.mempool import Admission
from tests.cluster import Cluster, local_cluster, node_key, node_peer_id
from tests.netutil import make_env

VALIDATORS = 4


def wall_ms() -> int:
    return int(time.time() * 1000)


def genesis(n_validators: int = VALIDATORS) -> Genesis:
    return make_genesis("test-chain", [node_peer_id(i) for i in range(n_validators)],
                        wall_ms(), block_interval_ms=200, propose_ms=800, prevote_ms=400,
                        precommit_ms=400, delta_ms=300)


def cluster(tmp_path: Path, n: int, g: Genesis, *, start: int | None = None,
            chain_classes: list[type[Chain]] | None = None,
            chain_config: ChainSection | None = None) -> Any:
    config = DiscoverySection(refresh_interval_s=3600, record_ttl_s=7200, query_timeout_s=5,
                              gossip_interval_s=1)
    return local_cluster(tmp_path, [make_env() for _ in range(n)], wall_ms, config,
                         genesis=g, start=start, chain_classes=chain_classes,
                         chain_config=chain_config)


def run(fn: Callable[[], Awaitable[None]], timeout: float) -> None:
    async def main() -> None:
        with trio.fail_after(timeout):
            await fn()

    trio.run(main)


def chain_of(node: Any) -> Chain:
    assert node.chain is not None
    return node.chain


def job_and_receipts(coordinator: int, workers: list[int], n: int, *, issued_ms: int = 7,
                     job: bytes | None = None) -> tuple[bytes, list[bytes]]:
    """A job signed by node ``coordinator`` (or ``job``) and ``n`` receipts for it, one
    per task, the workers taking turns."""
    if job is None:
        spec = spec_with_defaults(name="t", base_model=b"\x01" * 32, dataset=b"\x02" * 32,
                                  rounds=2, workers_per_round=len(workers), inner_steps=1)
        job = seal_job(node_key(coordinator), Job(spec, node_peer_id(coordinator), wall_ms()))
    jid = compute_job_id(job)
    receipts = []
    for i in range(n):
        w = workers[i % len(workers)]
        result = seal_task_result(node_key(w), TaskResult(
            jid, 0, f"r0-t{i}", node_peer_id(w), bytes([i]) * 32, 3.0, 2.0, 1000 + i, 5))
        receipts.append(issue_receipt(node_key(coordinator), result,
                                      metrics={"own_gain": 0.1}, issued_ms=issued_ms))
    return job, receipts


async def same_blocks(nodes: list[Any], upto: int) -> None:
    """Every node holds the same block at every height up to ``upto``: no fork."""
    ids = []
    for n in nodes:
        rows = await n.storage.get_blocks(1, upto)
        assert [h for h, _, _ in rows] == list(range(1, upto + 1))
        ids.append([b for _, b, _ in rows])
    assert all(i == ids[0] for i in ids)


async def finalize_once_and_replay(nodes: Cluster) -> None:
    """Four validators (nodes 0-3) and a follower (4) running, node 5 not started: the
    follower's receipts are final once each, forged ones refused, evidence recorded; one
    validator down, the other three go on; node 5, knowing nothing, replays to the same
    state. The same scenario on 127.0.0.1 (below) and on memnet (test_chain_memnet.py)."""
    follower = chain_of(nodes[4])
    job, receipts = job_and_receipts(4, [1, 2, 3], 12)
    ids = await follower.submit_many([encode_tx("job", job)] +
                                     [encode_tx("receipt", r) for r in receipts])
    # The same receipt again is one tx; a re-issue for the same task (another
    # issued_ms, so other bytes) must not count twice either.
    again = await follower.submit("receipt", receipts[0])
    assert again == ids[1]
    _, reissued = job_and_receipts(4, [1, 2, 3], 1, issued_ms=8, job=job)
    reissued_id = await follower.submit("receipt", reissued[0])
    forged = bytearray(receipts[1])
    forged[-5] ^= 1
    with pytest.raises(RemoteProtocolError):
        await follower.submit("receipt", bytes(forged))

    # Node 2 signed two different feed entries at one position: anyone may send
    # the pair, and the chain records it against node 2.
    a = next_entry(node_key(2), None, None, "receipt", b"one", 1)
    b = next_entry(node_key(2), None, None, "receipt", b"two", 1)
    ids.append(await follower.submit("feed-fork",
                                     ForkEvidence(node_peer_id(2), 1, a, b).encode()))

    final = await follower.wait_final(ids, timeout=40)
    assert set(final) == set(ids)
    for n in nodes[:5]:
        assert await chain_of(n).wait_height(max(final.values()), timeout=20)
    led = follower.ledger
    assert led.receipts_counted == 12
    assert await follower.final_height(reissued_id) is None
    # Workers were paid, the designer took its share, nothing created from air.
    assert all(led.balance(node_peer_id(w)) > 0 for w in (1, 2, 3))
    assert led.balance(node_peer_id(4)) > 0
    assert sum(led.balances().values()) == led.supply
    assert [(e.kind, e.offender) for e in led.evidence()] == [
        ("feed-fork", node_peer_id(2))]

    # One validator down: the other three go on.
    h = led.height
    nodes[3].kill()
    for c in (chain_of(n) for n in nodes[:3]):
        assert await c.wait_height(h + 2, timeout=30), "3 of 4 validators stopped"
    top = min(chain_of(n).ledger.height for n in nodes[:3])
    await same_blocks(nodes[:3], top)

    # A fresh node catches up, verifying every certificate, to the same root.
    fresh = chain_of(await nodes.restart(5))
    assert await fresh.wait_height(top, timeout=30)
    await same_blocks([nodes[0], nodes[5]], top)
    ref = chain_of(nodes[0])
    assert await ref.wait_height(fresh.ledger.height, timeout=10)
    rows = await nodes[0].storage.get_blocks(fresh.ledger.height, 1)
    assert rows[0][1] == (await nodes[5].storage.get_blocks(fresh.ledger.height, 1))[0][1]
    assert fresh.ledger.receipts_counted == 12
    if ref.ledger.height == fresh.ledger.height:
        assert ref.ledger.state_root() == fresh.ledger.state_root()
    assert fresh.ledger.balances() == {k: v for k, v in
                                        follower.ledger.balances().items()}


@pytest.mark.slow  # its logic runs on memnet in the default suite: tests/test_chain_memnet.py
@pytest.mark.timeout(150)
def test_four_validators_finalize_receipts_once_and_a_fresh_node_replays(tmp_path: Path) -> None:
    g = genesis()

    async def main() -> None:
        # Four validators and a follower; node 5 joins later, knowing nothing.
        async with cluster(tmp_path, 6, g, start=5) as nodes:
            await finalize_once_and_replay(nodes)

    run(main, timeout=140)


async def two_down_halts_and_resumes(nodes: Cluster, halt_s: float) -> None:
    """Four validators: a full mempool and a closed finality budget refuse load (the API's
    503); with two of four down nothing is final for ``halt_s`` (half the power cannot
    reach two thirds), and nothing forks; they come back, catch up, and the four go on.
    On 127.0.0.1 (below) and on memnet (test_chain_memnet.py, a minute of protocol time)."""
    c0 = chain_of(nodes[0])
    job, receipts = job_and_receipts(0, [1, 2], 4)
    await c0.submit_many([encode_tx("job", job)] +
                         [encode_tx("receipt", r) for r in receipts[:2]])
    assert await c0.wait_height(2, timeout=40)
    # A full mempool refuses load from outside before checking it (the API's 503).
    room, c0.mempool.max_txs = c0.mempool.max_txs, len(c0.mempool)
    with pytest.raises(ChainBusy):
        await c0.submit_many([encode_tx("receipt", receipts[2])], refuse_when_busy=True)
    c0.mempool.max_txs = room
    # So does one over the finality budget, and it says when to come back.
    budget, c0.mempool.admission = c0.mempool.admission, Closed()
    with pytest.raises(ChainBusy) as busy:
        await c0.submit_many([encode_tx("receipt", receipts[2])], refuse_when_busy=True)
    assert busy.value.retry_after_s is not None and busy.value.retry_after_s >= 1
    c0.mempool.admission = budget
    nodes[2].kill()
    nodes[3].kill()
    # Whatever was in flight finishes; from then on nothing is final (with three of
    # four up, these txs are final within seconds).
    await trio.sleep(0)  # let the kills land
    halted = max(chain_of(n).ledger.height for n in nodes[:2]) + 1
    late = await c0.submit_many([encode_tx("receipt", r) for r in receipts[2:]])
    assert await c0.wait_final(late, timeout=halt_s) == {}, "finalized without 2/3"
    assert not await c0.wait_height(halted + 1, timeout=1)
    stuck = [chain_of(n).ledger.height for n in nodes[:2]]
    await same_blocks(list(nodes[:2]), min(stuck))
    # They come back: they catch up and the four go on.
    await nodes.restart(2)
    await nodes.restart(3)
    final = await c0.wait_final(late, timeout=60)
    assert set(final) == set(late)
    top = max(final.values())
    for n in nodes:
        assert await chain_of(n).wait_height(top, timeout=30)
    await same_blocks(list(nodes), top)
    assert top > max(stuck)
    assert c0.ledger.receipts_counted == 4


@pytest.mark.slow  # its logic runs on memnet in the default suite: tests/test_chain_memnet.py
@pytest.mark.timeout(150)
def test_two_of_four_down_halts_without_forking_and_resumes(tmp_path: Path) -> None:
    g = genesis()

    async def main() -> None:
        async with cluster(tmp_path, VALIDATORS, g) as nodes:
            await two_down_halts_and_resumes(nodes, halt_s=6)

    run(main, timeout=140)


class Closed(Admission):
    """A finality budget spent: the mempool takes nothing from outside or from gossip."""

    def admits(self, held: int, adding: int, now_ms: int, budgets: int = 1) -> bool:
        return False


class DoubleVoting(Consensus):
    """A validator that signs, next to each vote it sends, another one for a different
    block in the same round (the vote an attacker would show the other half)."""

    async def act(self, actions: Any, *, gossip: bool = False) -> None:
        await super().act(actions, gossip=gossip)
        for a in actions:
            if isinstance(a, Broadcast) and a.kind == "vote":
                v = open_vote(a.data)
                # Its own votes only: a rebroadcast also carries the votes of others
                # (a round's precommits, a decided block's), which it cannot sign.
                if v.kind in (PREVOTE, PRECOMMIT) and v.validator == self.peer_id:
                    other = Vote(v.chain_id, v.height, v.round, v.kind,
                                 None if v.block_id is not None else b"\x66" * 32, v.validator)
                    await self._publish_vote(seal_vote(self.key, other))

    async def _publish_vote(self, data: bytes) -> None:
        from protocol.checks import packb

        await publish(self.net, self.topic, packb(["vote", data]))


class DoubleVoter(Chain):
    consensus_class = DoubleVoting


@pytest.mark.timeout(150)
def test_a_double_voting_validator_is_recorded_and_cannot_fork(tmp_path: Path) -> None:
    g = genesis()
    classes: list[type[Chain]] = [Chain, Chain, Chain, DoubleVoter]

    async def main() -> None:
        async with cluster(tmp_path, VALIDATORS, g, chain_classes=classes) as nodes:
            c0 = chain_of(nodes[0])
            job, receipts = job_and_receipts(0, [1, 2], 6)
            ids = await c0.submit_many([encode_tx("job", job)] +
                                       [encode_tx("receipt", r) for r in receipts])
            final = await c0.wait_final(ids, timeout=60)
            assert set(final) == set(ids)

            async def recorded() -> bool:
                return any(e.offender == node_peer_id(3) and e.kind == "double-vote"
                           for e in c0.ledger.evidence())

            with trio.fail_after(60):
                while not await recorded():
                    await c0.wait_height(c0.ledger.height + 1, timeout=5)
            top = min(chain_of(n).ledger.height for n in nodes[:3])
            await same_blocks(list(nodes[:3]), top)
            assert c0.ledger.receipts_counted == 6

    run(main, timeout=140)


async def over_budget_txs_are_sent_again(nodes: Cluster, closed_s: float) -> None:
    """Four validators and a follower (node 4, resubmitting every second): with every
    validator's finality budget closed for ``closed_s`` the follower's txs are dropped
    unchecked; once open, its outbox gets them all final. On 127.0.0.1 (below) and on
    memnet (test_chain_memnet.py)."""
    validators = [chain_of(n) for n in nodes[:4]]
    follower = chain_of(nodes[4])
    budgets = [v.mempool.admission for v in validators]
    for v in validators:
        v.mempool.admission = Closed()
    job, receipts = job_and_receipts(4, [1, 2], 2)
    ids = await follower.submit_many([encode_tx("job", job)] +
                                     [encode_tx("receipt", r) for r in receipts])
    assert await follower.wait_final(ids, timeout=closed_s) == {}
    assert all(len(v.mempool) == 0 for v in validators)  # dropped, unchecked
    for v, budget in zip(validators, budgets, strict=True):
        v.mempool.admission = budget
    final = await follower.wait_final(ids, timeout=40)
    assert set(final) == set(ids)
    assert validators[0].ledger.receipts_counted == 2


@pytest.mark.slow  # its logic runs on memnet in the default suite: tests/test_chain_memnet.py
@pytest.mark.timeout(120)
def test_txs_validators_drop_over_their_budget_are_sent_again(tmp_path: Path) -> None:
    """Validators over their finality budget drop gossiped txs before checking them; the
    node that submitted them keeps them in its outbox and gossips them again, so an
    overload loses none of a coordinator's receipts."""
    g = genesis()

    async def main() -> None:
        async with cluster(tmp_path, 5, g, chain_config=ChainSection(resubmit_s=1.0)) as nodes:
            await over_budget_txs_are_sent_again(nodes, closed_s=3)

    run(main, timeout=110)
