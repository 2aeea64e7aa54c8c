"""Txs on the validator streams (node/chain/links.py, specs/consensus.md "Validator
streams"): a validator sends the txs it admits straight to the other validators instead of
gossiping them, and a validator checks every tx that comes that way as it checks gossiped
ones: a stream from another validator is no reason to trust its txs.
"""

from __future__ import annotations

import time
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import pytest
import trio
from nacl.signing import SigningKey

import node.chain.txgossip
from node.chain.network import CONSENSUS_PROTOCOL, chain_topics
from node.chain.service import Chain
from node.config import DiscoverySection
from node.daemon import build_node
from node.p2p import Network, open_network
from node.p2p.framing import write_frame
from node.p2p.host import peer_info_from_multiaddr
from protocol.chainwire import ConsensusFrame, decode_tx_batch, encode_tx_batch
from protocol.genesis import make_genesis
from protocol.jobs import Job, seal_job
from protocol.jobspec import spec_with_defaults
from protocol.ledger import encode_tx, tx_id
from protocol.peerid import peer_id_from_public_key
from tests.cluster import local_cluster, node_key, node_peer_id
from tests.netutil import make_env, wait_until
from tests.test_chain_gossip import LOOPBACK, victim_spec


def wall_ms() -> int:
    return int(time.time() * 1000)


def job_tx(key: SigningKey, name: str) -> bytes:
    """A job tx signed by ``key``: it checks, and applies on any ledger."""
    spec = spec_with_defaults(name=name, base_model=b"\x01" * 32, dataset=b"\x02" * 32,
                              rounds=1, workers_per_round=1, inner_steps=1)
    who = peer_id_from_public_key(bytes(key.verify_key))
    return encode_tx("job", seal_job(key, Job(spec, who, wall_ms())))


def chain_of(node: Any) -> Chain:
    assert node.chain is not None
    return node.chain


@pytest.mark.timeout(60)
def test_a_validators_txs_go_to_the_others_on_its_streams_not_gossip(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    genesis = make_genesis("txstreams", [node_peer_id(0), node_peer_id(1)], wall_ms(),
                           block_interval_ms=200, propose_ms=800, prevote_ms=400,
                           precommit_ms=400, delta_ms=300)
    gossiped: list[bytes] = []  # tx batches validator 0 published on the tx topic
    publish = node.chain.txgossip.publish

    async def recording_publish(net: Network, topic: str, data: bytes) -> None:
        if topic == chain_topics(genesis.chain_id).txs:
            gossiped.append(data)
        await publish(net, topic, data)

    monkeypatch.setattr(node.chain.txgossip, "publish", recording_publish)
    config = DiscoverySection(refresh_interval_s=3600, record_ttl_s=7200, query_timeout_s=5,
                              gossip_interval_s=1)

    async def main() -> None:
        async with local_cluster(tmp_path, [make_env(), make_env()], wall_ms, config,
                                 genesis=genesis) as nodes:
            sender, receiver = chain_of(nodes[0]), chain_of(nodes[1])
            assert receiver.links is not None and sender.links is not None
            took: list[bytes] = []  # txs that reached validator 1 on a stream
            take = receiver.links.take_txs

            async def recording_take(data: bytes, peer: Any) -> None:
                took.extend(decode_tx_batch(data, len(data)))
                await take(data, peer)

            receiver.links.take_txs = recording_take
            # The first batch opens the txs stream (and is gossiped: it was not open yet).
            first = [job_tx(node_key(0), "first")]
            await sender.submit_many(first)
            await wait_until(lambda: _true(bool(sender.links and sender.links._tx_open)), 20)
            gossiped_before = len(gossiped)
            txs = [job_tx(node_key(0), f"job-{i}") for i in range(5)]
            ids = await sender.submit_many(txs)
            await wait_until(lambda: _true(all(t in took for t in txs)), 20)
            assert len(gossiped) == gossiped_before, "a batch was gossiped with the streams open"
            final = await receiver.wait_final([tx_id(t) for t in first] + ids, timeout=30)
            assert len(final) == 6

    async def bounded() -> None:
        with trio.fail_after(55):
            await main()

    trio.run(bounded)


async def _true(value: bool) -> bool:
    return value


@pytest.mark.timeout(60)
def test_txs_from_a_validator_stream_are_checked_like_gossiped_ones(tmp_path: Path) -> None:
    """Another validator's stream brings garbage, a forged tx, a batch over the cap and a
    valid tx: only the valid one enters the mempool, and the stream stays open."""
    victim_key, other = SigningKey.generate(), SigningKey.generate()
    spec = victim_spec(tmp_path, victim_key, [victim_key, other])  # 1 of 2: no blocks
    valid, in_oversized = job_tx(other, "valid"), job_tx(other, "in-oversized")
    forged = bytearray(job_tx(other, "forged"))
    forged[-5] ^= 1  # the body changed after signing
    oversized = encode_tx_batch([in_oversized, bytes(300_000)])

    async def scenario() -> None:
        async with AsyncExitStack() as stack:
            victim = await stack.enter_async_context(build_node(spec))
            net: Network = await stack.enter_async_context(open_network(other, LOOPBACK, {}))
            await net.connect(peer_info_from_multiaddr(victim.net.listen_addrs()[0]))
            stream = await net.host.new_stream(victim.net.peer_id, [CONSENSUS_PROTOCOL])
            for batch in (b"\xff\xfe garbage", encode_tx_batch([bytes(forged), b"\x01"]),
                          oversized, encode_tx_batch([valid])):
                await write_frame(stream, ConsensusFrame("txs", batch).encode(), 10)
            pool = chain_of(victim).mempool
            await wait_until(lambda: _true(tx_id(valid) in pool), 20)
            assert len(pool) == 1
            assert tx_id(bytes(forged)) not in pool and tx_id(in_oversized) not in pool

    async def main() -> None:
        with trio.fail_after(50):
            await scenario()

    trio.run(main)
