"""The chain service on tests/memnet.py and trio's MockClock: the nodes are built by the
daemon's own wiring (tests/cluster.py -> node.daemon.build_node), only the network is in
memory, and minutes of consensus rounds run in seconds. The logic of the real-socket
tests of tests/test_chain_multinode.py: four validators finalize, one down the others go
on and a fresh node replays to the same state; two of four down halt without forking
and resume; txs that validators drop over their budget are sent again."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import pytest
import trio

import node.chain.sync as chain_sync
from node.chain.consensus import Consensus
from node.chain.network import HEAD_TOPIC
from node.chain.service import Chain
from node.config import ChainSection, DiscoverySection
from protocol.chainwire import Head
from protocol.genesis import Genesis, make_genesis
from protocol.ledger import Block, encode_tx
from tests.cluster import Cluster, memnet_cluster, node_peer_id
from tests.memnet import MemNode, mock_clock_ms, run_on_mock_clock
from tests.netutil import make_env
from tests.test_chain_multinode import (
    chain_of,
    finalize_once_and_replay,
    job_and_receipts,
    over_budget_txs_are_sent_again,
    same_blocks,
    two_down_halts_and_resumes,
)

VALIDATORS = 4
pytestmark = pytest.mark.timeout(60)


def genesis(clock_ms: Callable[[], int]) -> Genesis:
    return make_genesis("test-chain", [node_peer_id(i) for i in range(VALIDATORS)],
                        clock_ms(), block_interval_ms=200, propose_ms=800, prevote_ms=400,
                        precommit_ms=400, delta_ms=300)


def mem_cluster(tmp_path: Path, n: int, **options: Any) -> AbstractAsyncContextManager[Cluster]:
    config = DiscoverySection(refresh_interval_s=3600, record_ttl_s=7200, query_timeout_s=5,
                              gossip_interval_s=1)
    return memnet_cluster(tmp_path, [make_env() for _ in range(n)], config,
                          genesis=genesis(mock_clock_ms()), **options)


def run(fn: Callable[[], Awaitable[None]], virtual_s: float = 600) -> None:
    """Run on the MockClock; ``virtual_s`` bounds the scenario's protocol time."""
    async def main() -> None:
        with trio.fail_after(virtual_s):
            await fn()

    run_on_mock_clock(main)


def test_four_validators_finalize_one_down_goes_on_and_a_fresh_node_replays(
        tmp_path: Path) -> None:
    async def main() -> None:
        async with mem_cluster(tmp_path, 6, start=5) as nodes:
            await finalize_once_and_replay(nodes)

    run(main)


def test_two_of_four_down_halts_without_forking_and_resumes(tmp_path: Path) -> None:
    async def main() -> None:
        async with mem_cluster(tmp_path, VALIDATORS) as nodes:
            await two_down_halts_and_resumes(nodes, halt_s=60)

    run(main)


def test_txs_validators_drop_over_their_budget_are_sent_again(tmp_path: Path) -> None:
    async def main() -> None:
        async with mem_cluster(tmp_path, 5, chain_config=ChainSection(resubmit_s=1.0)) as nodes:
            # Ten seconds of protocol time with closed budgets.
            await over_budget_txs_are_sent_again(nodes, closed_s=10)

    run(main)


def test_a_txs_stream_idle_for_long_is_ended_by_its_sender_and_the_next_batch_arrives(
        tmp_path: Path) -> None:
    """The reader resets a validator stream idle for direct_idle_timeout_s; the writer,
    waiting for its next message, would not see it and would lose that message on the
    dead stream. The writer ends it first (half the deadline) and the next batch goes on
    a fresh stream, or on gossip while none is open."""
    idle_s = 4.0
    async def main() -> None:
        tunables = ChainSection(direct_idle_timeout_s=idle_s, resubmit_s=300.0)
        async with mem_cluster(tmp_path, VALIDATORS, chain_config=tunables) as nodes:
            sender, others = chain_of(nodes[0]), [chain_of(n) for n in nodes[1:]]
            assert sender.links is not None
            job, _ = job_and_receipts(4, [1], 0)
            first = await sender.submit("job", job)
            assert set(await sender.wait_final([first], timeout=20)) == {first}
            peers = {node_peer_id(i) for i in range(1, VALIDATORS)}
            assert sender.links._tx_open == peers  # the txs' streams were used
            await trio.sleep(idle_s)  # no txs: each txs stream idles past half the deadline
            assert sender.links._tx_open == set()
            _, receipts = job_and_receipts(4, [1], 1, job=job)
            tx = await sender.submit("receipt", receipts[0])
            # Each other validator holds it (or has it final) within a second, not after
            # the sender's resubmission (300 s here).
            async def holds(v: Any) -> bool:
                return tx in v.mempool or await v.final_height(tx) is not None

            with trio.fail_after(1.0):
                while not all([await holds(v) for v in others]):
                    await trio.sleep(0.05)

    run(main)


def test_a_follower_stays_off_the_consensus_topic_and_follows_from_heads(
        tmp_path: Path) -> None:
    """Votes concern validators only: a follower does not join the consensus topic (each
    vote would cost it a read, a check and a relay), and still reaches every final block
    from the validators' heads."""
    async def main() -> None:
        async with mem_cluster(tmp_path, VALIDATORS + 1) as nodes:
            follower = nodes[VALIDATORS]
            topics = chain_of(follower).topics
            assert topics.consensus not in mem(follower).topics
            assert {topics.txs, topics.heads} <= set(mem(follower).topics)
            assert all(topics.consensus in mem(v).topics for v in nodes[:VALIDATORS])
            leader = chain_of(nodes[0])
            assert await leader.wait_height(5, timeout=60)
            assert await chain_of(follower).wait_height(5, timeout=10)

    run(main)


def heads_published(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    """(publisher, height) of each head the chain services publish from now on."""
    published: list[tuple[str, int]] = []
    library_publish = chain_sync.publish

    async def spy(net: Any, topic: str, data: bytes) -> None:
        if topic.startswith(HEAD_TOPIC):
            published.append((net.peer_id.to_base58(), Head.decode(data).height))
        await library_publish(net, topic, data)

    monkeypatch.setattr(chain_sync, "publish", spy)
    return published


def test_each_block_is_announced_by_its_proposer_alone_and_followers_follow(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With the periodic heads out of the way (head_every_s longer than the scenario), the
    heads published are one per final block, by the validator that proposed it; a
    follower still takes every block (its receipts' wait ends on its own ledger)."""
    published = heads_published(monkeypatch)

    async def main() -> None:
        tunables = ChainSection(head_every_s=3600.0)
        async with mem_cluster(tmp_path, VALIDATORS + 1, chain_config=tunables) as nodes:
            follower = chain_of(nodes[VALIDATORS])
            job, receipts = job_and_receipts(VALIDATORS, [1, 2], 6)
            ids = await follower.submit_many([encode_tx("job", job)] +
                                             [encode_tx("receipt", r) for r in receipts])
            assert set(await follower.wait_final(ids, timeout=60)) == set(ids)
            top = follower.ledger.height
            blocks = {h: Block.decode(data, 1 << 21) for h, data, _ in
                      await follower.storage.get_blocks(1, top)}
            assert published
            assert all(blocks[h].proposer == who for who, h in published if h <= top)
            assert len({h for _, h in published}) == len(published)  # one head a block

    run(main)


def test_periodic_heads_are_sent_only_when_no_head_as_high_was_heard(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An idle chain at the default head_every_s (2 s): the heads that go out are about
    one a block (its proposer's), not one per validator every 2 s (which would be 4 x
    the scenario's seconds / 2), and a follower still has every block."""
    published = heads_published(monkeypatch)

    async def main() -> None:
        async with mem_cluster(tmp_path, VALIDATORS + 1,
                               chain_config=ChainSection(head_every_s=2.0)) as nodes:
            leader, follower = chain_of(nodes[0]), chain_of(nodes[VALIDATORS])
            start = trio.current_time()
            assert await leader.wait_height(6, timeout=120)
            seconds = trio.current_time() - start
            assert await follower.wait_height(6, timeout=10)
            top = leader.ledger.height
            assert seconds > 10  # idle: empty blocks, seconds apart
            assert len(published) <= top + VALIDATORS, (published, seconds)
            assert len(published) < VALIDATORS * seconds / 2

    run(main)


def test_a_forged_high_head_does_not_silence_the_validators(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A non-validator signs heads of a height nobody has (any peer may), every 2 s: the
    validators still announce each block (a head that high, heard, suppressed them all
    before), and a follower keeps following."""
    published = heads_published(monkeypatch)

    async def main() -> None:
        async with mem_cluster(tmp_path, VALIDATORS + 2,
                               chain_config=ChainSection(head_every_s=2.0)) as nodes:
            leader, follower = chain_of(nodes[0]), chain_of(nodes[VALIDATORS])
            forger = mem(nodes[VALIDATORS + 1])
            validators = {n.net.peer_id.to_base58() for n in nodes[:VALIDATORS]}
            forged = Head(leader.genesis.chain_id, 10**9).encode()

            async def forge() -> None:
                while True:
                    await forger.publish(leader.topics.heads, forged)
                    await trio.sleep(2)

            assert await leader.wait_height(2, timeout=60)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(forge)
                await trio.sleep(5)  # the forged heads have reached everyone
                top = leader.ledger.height
                before = sum(who in validators for who, _ in published)
                assert await leader.wait_height(top + 3, timeout=60)
                assert await follower.wait_height(top + 3, timeout=10)
                after = sum(who in validators for who, _ in published)
                nursery.cancel_scope.cancel()
            assert after - before >= 3  # one head a block at least

    run(main)


class StalledConsensus(Consensus):
    async def run(self) -> None:  # a validator whose consensus never decides a block
        await trio.sleep_forever()


class StalledValidator(Chain):
    consensus_class = StalledConsensus


def test_a_validator_that_does_not_decide_a_block_takes_it_by_sync_after_a_wait(
        tmp_path: Path) -> None:
    """A validator takes a head one block ahead of it as a sign it is behind only after
    head_every_s (its consensus usually decides that block meanwhile): one whose
    consensus never decides still follows the chain, block by block, through sync."""
    async def main() -> None:
        tunables = ChainSection(head_every_s=2.0)
        classes = [Chain] * (VALIDATORS - 1) + [StalledValidator]
        async with mem_cluster(tmp_path, VALIDATORS, chain_config=tunables,
                               chain_classes=classes) as nodes:
            live, stalled = chain_of(nodes[0]), chain_of(nodes[VALIDATORS - 1])
            job, receipts = job_and_receipts(0, [1, 2], 6)
            ids = await live.submit_many([encode_tx("job", job)] +
                                         [encode_tx("receipt", r) for r in receipts])
            assert set(await live.wait_final(ids, timeout=60)) == set(ids)
            assert await stalled.wait_height(live.ledger.height, timeout=30)
            await same_blocks(list(nodes), live.ledger.height)

    run(main)


def mem(node: Any) -> MemNode:
    assert isinstance(node.net, MemNode)
    return node.net
