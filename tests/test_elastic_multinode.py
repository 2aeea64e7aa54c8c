"""Worker slots and elastic jobs on real py-libp2p hosts on 127.0.0.1 (one trio process).

A node whose capability record lists two GPUs gets two slots and trains two tasks at once.
On this CPU machine the GPUs are *simulated*: the record lists two test GPUs (as
`iollm testnet up --simulate-gpus` does) and the node's `[worker] devices` are two "cpu"
entries, so both slots train on the CPU; the slot logic is what is tested, not CUDA. A
worker that joins in the middle of round 0 is hinted to prefetch the round's base, takes
no task of round 0 (each was sized for the slotted node), and trains in round 1.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import trio

from node.config import DiscoverySection, WorkerSection
from tests.cluster import local_cluster
from tests.netutil import make_env
from tests.test_jobs_multinode import assets, job_toml, run  # noqa: F401 - assets: fixture


def wall_ms() -> int:
    return int(time.time() * 1000)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_slots_train_at_once_and_a_late_worker_joins_the_next_round(
        tmp_path: Path, assets: dict[str, Path]) -> None:  # noqa: F811 - the fixture
    slotted = WorkerSection(devices=["cpu", "cpu"])
    late = WorkerSection()
    envs = [make_env(), make_env(gpu_gib=(24, 24)), make_env()]  # node 1: 2 simulated GPUs
    config = DiscoverySection(refresh_interval_s=3600, record_ttl_s=7200, query_timeout_s=5,
                              gossip_interval_s=1)

    async def main() -> None:
        async with local_cluster(tmp_path, envs, wall_ms, config, models=True,
                                 workers=[WorkerSection(enabled=False), slotted, late],
                                 start=2) as nodes:
            coord, two = nodes[0], nodes[1]
            assert coord.jobs is not None and coord.models is not None
            assert two.worker is not None
            model = await coord.models.publish(assets["model"], kind="model", name="gpt-tiny")
            data = await coord.models.publish(assets["data"], kind="dataset", name="stdlib")
            with trio.fail_after(30):
                while len(coord.discovery.live_records()) < 2:
                    await trio.sleep(0.05)  # eventually-consistent gossip, bounded
            jid = await coord.jobs.submit(job_toml(model, data, rounds=2, workers=3,
                                                   inner_steps=10))
            await two.worker.task_accepted.wait()
            started = time.monotonic()
            newcomer = await nodes.restart(2)
            assert newcomer.worker is not None
            await coord.jobs.ended(jid).wait()
            status = coord.jobs.status(jid)
            assert status["status"] == "done", status
            r0, r1 = status["rounds"]
            assert {t["worker"] for t in r0["tasks"]} == {two.peer_id}  # sized for it
            assert r0["accepted"] == 3 and r1["accepted"] == 3, status["rounds"]
            assert newcomer.worker.stats.prefetched == 1  # hinted during round 0
            mine = [t for t in r1["tasks"] if t["worker"] == newcomer.peer_id]
            assert len(mine) == 1 and mine[0]["verdict"] == "accepted", r1["tasks"]
            # Round 1: one task a slot, the newcomer sized as the median of the measured.
            assert sorted(t["worker"] for t in r1["tasks"]) == sorted(
                [two.peer_id, two.peer_id, newcomer.peer_id])
            rows = await newcomer.storage.list_receipts(jid)
            assert len(rows) == 1
            print(f"late worker: first accepted task {time.monotonic() - started:.1f} s "
                  f"after it started (in-process node)")

    run(main, timeout=280)
