"""The chain service across a restart (node/chain/service.py): what a node knows of its final
transactions must not depend on whether they became final before or after it started."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import trio

from node.config import DiscoverySection
from protocol.genesis import make_genesis
from protocol.jobs import Job, seal_job
from protocol.jobspec import spec_with_defaults
from tests.cluster import local_cluster, node_key, node_peer_id
from tests.netutil import make_env


def wall_ms() -> int:
    return int(time.time() * 1000)


@pytest.mark.timeout(60)
def test_a_tx_final_before_a_restart_is_final_after_it(tmp_path: Path) -> None:
    # One validator: it decides alone, so the test needs no other node.
    genesis = make_genesis("restart-chain", [node_peer_id(0)], wall_ms(),
                           block_interval_ms=100, propose_ms=500)
    config = DiscoverySection(refresh_interval_s=3600, record_ttl_s=7200, query_timeout_s=5)
    spec = spec_with_defaults(name="t", base_model=b"\x01" * 32, dataset=b"\x02" * 32,
                              rounds=1, workers_per_round=1, inner_steps=1)
    job = seal_job(node_key(0), Job(spec, node_peer_id(0), wall_ms()))

    async def main() -> None:
        async with local_cluster(tmp_path, [make_env()], wall_ms, config,
                                 genesis=genesis) as nodes:
            chain = nodes[0].chain
            assert chain is not None
            tid = await chain.submit("job", job)
            height = (await chain.wait_final([tid], timeout=20)).get(tid)
            assert height is not None
            nodes[0].kill()
            chain = (await nodes.restart(0)).chain
            assert chain is not None and chain.ledger.height >= height  # replayed
            assert len(chain.ledger.jobs()) == 1  # the ledger holds the job...
            # ...and the node still knows that its tx is final (the stored tx index):
            assert await chain.final_height(tid) == height
            assert await chain.wait_final([tid], timeout=2) == {tid: height}

    async def bounded() -> None:
        with trio.fail_after(50):
            await main()

    trio.run(bounded)
