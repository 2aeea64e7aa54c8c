"""Training jobs across real py-libp2p hosts on 127.0.0.1, in one trio process: a job of
three workers and two rounds, a worker killed mid-round, and workers that cheat.

Every worker trains in its own child process (node/jobs/taskproc.py), as in the daemon; the
model is the tiny built-in GPT and the data a slice of the standard-library corpus.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import trio

from node.config import DiscoverySection, JobsSection, WorkerSection
from protocol.feed import verify_chain
from protocol.genesis import Genesis, make_genesis
from protocol.jobs import open_receipt
from protocol.ledger import encode_tx, tx_id
from tests.cluster import LocalNode, local_cluster, node_peer_id
from tests.netutil import make_env

CORPUS_BYTES = 1_200_000  # enough for 2 rounds x 7 tasks of disjoint slices, fast to hash


def wall_ms() -> int:
    return int(time.time() * 1000)


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny GPT's initial files and a corpus slice, built once for the module by the
    same child process the daemon uses."""
    root = tmp_path_factory.mktemp("assets")
    for request in ({"op": "init", "arch": "gpt", "size": "tiny", "seed": 0,
                     "out_dir": str(root / "model")},
                    {"op": "corpus", "out": str(root / "corpus.txt")}):
        proc = subprocess.run([sys.executable, "-m", "node.jobs.taskproc"],
                              input=json.dumps(request), capture_output=True, text=True,
                              timeout=300, check=False)
        assert proc.returncode == 0, proc.stderr[-2000:]
    data = (root / "corpus.txt").read_bytes()[:CORPUS_BYTES]
    (root / "data").mkdir()
    (root / "data" / "corpus.txt").write_bytes(data)
    return {"model": root / "model", "data": root / "data" / "corpus.txt"}


def job_toml(model: str, dataset: str, *, rounds: int, workers: int, inner_steps: int = 30,
             **checks: Any) -> str:
    extra = "".join(f"{k} = {v}\n" for k, v in checks.items())
    return f"""
name = "test-job"
base_model = "{model}"
dataset = "{dataset}"
[train]
rounds = {rounds}
workers_per_round = {workers}
inner_steps = {inner_steps}
batch_size = 8
seq_len = 64
lr = 3e-3
outer_lr = 0.7
outer_momentum = 0.9
seed = 1
[data]
heldout_fraction = 0.05
[checks]
eval_batches = 4
{extra}[timeouts]
task_s = 120
"""


async def start_job(nodes: list[LocalNode], assets: dict[str, Path], **kw: Any) -> str:
    coordinator = nodes[0]
    assert coordinator.models is not None and coordinator.jobs is not None
    model = await coordinator.models.publish(assets["model"], kind="model", name="gpt-tiny")
    data = await coordinator.models.publish(assets["data"], kind="dataset", name="stdlib")
    # Wait for every worker's capability record to reach the coordinator's replica set.
    with trio.fail_after(30):
        while len(coordinator.discovery.live_records()) < len(nodes):
            await trio.sleep(0.05)  # eventually-consistent gossip; bounded by fail_after
    return await coordinator.jobs.submit(job_toml(model, data, **kw))


def cluster(tmp_path: Path, workers: list[WorkerSection | None],  # type: ignore[no-untyped-def]
            genesis: Genesis | None = None, tflops: dict[int, float] | None = None,
            jobs: JobsSection | None = None):
    config = DiscoverySection(refresh_interval_s=3600, record_ttl_s=7200, query_timeout_s=5,
                              gossip_interval_s=1)
    (tmp_path / "nodes").mkdir()
    envs = [make_env(tflops=(tflops or {}).get(i, 1.0)) for i in range(len(workers))]
    return local_cluster(tmp_path / "nodes", envs, wall_ms, config,
                         models=True, workers=workers, genesis=genesis, jobs_config=jobs)


def run(fn: Any, timeout: float) -> Any:
    async def main() -> Any:
        with trio.fail_after(timeout):
            return await fn()

    return trio.run(main)


@pytest.mark.timeout(60)
def test_a_job_no_node_can_work_on_fails_after_no_worker_timeout(
        tmp_path: Path, assets: dict[str, Path]) -> None:
    """[jobs] no_worker_timeout_s, set through the cluster (600 s by default): a job that
    no node can take (the only node does not work) fails after it, with a line that says
    why, and not before."""

    async def main() -> None:
        async with cluster(tmp_path, [WorkerSection(enabled=False)],
                           jobs=JobsSection(no_worker_timeout_s=1.0)) as nodes:
            jobs = nodes[0].jobs
            assert jobs is not None
            jid = await start_job(nodes, assets, rounds=1, workers=1)
            submitted = trio.current_time()
            await jobs.ended(jid).wait()
            assert trio.current_time() - submitted >= 1.0
            status = jobs.status(jid)
            assert status["status"] == "failed", status
            assert status["error"] == "no worker meeting the requirements appeared in 1 s", status

    run(main, timeout=40)


@pytest.mark.timeout(200)
def test_three_workers_two_rounds_loss_goes_down(tmp_path: Path, assets: dict[str, Path]) -> None:
    """...and the job's receipts and round records become final on the nodes' chain (all
    four validate), which pays every worker and the designer. One worker claims 1000
    TFLOP/s but delivers at half the others' speed: round 1 gives it the smallest
    task (specs/jobs.md, "Heterogeneous workers")."""
    honest = WorkerSection()
    liar = WorkerSection(adversary="slow")
    genesis = make_genesis("test-jobs", [node_peer_id(i) for i in range(4)], wall_ms(),
                           block_interval_ms=500)

    async def main() -> None:
        async with cluster(tmp_path, [WorkerSection(enabled=False), honest, honest, liar],
                           genesis, tflops={3: 1000.0}) as nodes:
            jobs = nodes[0].jobs
            assert jobs is not None
            jid = await start_job(nodes, assets, rounds=2, workers=3, inner_steps=20,
                                  reexec_fraction=0.34)
            # While it runs, the status shows the round under way: the workers' progress
            # (TaskProgress on /iollm/task/1.1.0) and the round's phases.
            seen: list[dict[str, Any]] = []
            phases: set[str] = set()
            while not jobs.ended(jid).is_set():
                live = jobs.status(jid).get("live")
                if live:
                    phases.add(live["phase"])
                    seen += [t for t in live["tasks"] if t["state"] == "training"
                             and t.get("step") and t.get("loss") is not None]
                await trio.sleep(0.05)  # sampling another task's state; bounded by run()
            assert {"training", "checking"} <= phases, phases
            # (round 0 gives each task 20 steps; round 1 sizes them by measured speed)
            assert seen and all(0 < t["step"] <= t["steps"] <= 60 and t["tokens"] > 0
                                for t in seen), seen
            status = jobs.status(jid)
            assert "live" not in status
            checked = [t for r in status["rounds"] for t in r["tasks"]]
            assert all(any(c.startswith("trained on its slice") for c in t["checks"])
                       for t in checked), checked
            assert status["status"] == "done", status
            rounds = status["rounds"]
            assert [r["accepted"] for r in rounds] == [3, 3], json.dumps(rounds, indent=1)
            assert rounds[1]["heldout_after"] < rounds[0]["heldout_before"]
            # Round 0 is an equal split; round 1 is sized by what each worker delivered.
            slow = nodes[3].peer_id
            steps = [{t["worker"]: t["steps"] for t in r["tasks"]} for r in rounds]
            assert set(steps[0].values()) == {20}, steps
            assert sum(steps[1].values()) == 60
            assert all(steps[1][slow] < s for w, s in steps[1].items() if w != slow), steps
            seen = rounds[0]["workers"]  # published beside the claims
            assert seen[slow]["claimed_tflops"] == 1000.0
            assert all(seen[slow]["tokens_per_s"] < row["tokens_per_s"]
                       for w, row in seen.items() if w != slow), seen
            # Round 1 trains the version round 0 published; the workers rebuilt it from
            # their copy of the base plus the int8 outer update, not by fetching it.
            assert rounds[1]["base"] == rounds[0]["version"]
            assert sum(n.worker.stats.rebuilt for n in nodes[1:]) >= 1  # type: ignore[union-attr]
            # Receipts: six at the coordinator, each worker holds its own, and every
            # node's feed is an unbroken signed chain holding them.
            issued = await nodes[0].storage.list_receipts(jid)
            assert len(issued) == 6
            for n in nodes:
                rows = await n.storage.list_receipts(jid)
                for row in rows:
                    receipt = open_receipt(row.envelope)
                    assert n is nodes[0] or receipt.worker == n.peer_id
                chain = verify_chain([e for _, _, e in await n.storage.feed_entries(n.peer_id)])
                assert len(chain) == len(rows)
            assert {open_receipt(r.envelope).worker for r in issued} == {
                n.peer_id for n in nodes[1:]}
            await check_rewards(nodes, jid, issued, rounds)

    run(main, timeout=180)


async def check_rewards(nodes: list[LocalNode], jid: str, issued: list[Any],
                        rounds: list[dict[str, Any]]) -> None:
    """The job, its 6 receipts and its 2 round records are final on every node's chain;
    every worker and the designer (the coordinator) earned; nothing else was minted."""
    coordinator = nodes[0].chain
    assert coordinator is not None
    row = await nodes[0].storage.get_job(jid)
    assert row is not None
    txs = [tx_id(encode_tx("job", row.envelope))] + [
        tx_id(encode_tx("receipt", r.envelope)) for r in issued]
    final = await coordinator.wait_final(txs, timeout=30)
    assert set(final) == set(txs), f"{len(final)} of {len(txs)} txs final"
    # A round record waits for its receipts (receipts-pending), so it may be a block
    # later: wait for the blocks, each ledger read afresh.
    versions = [bytes.fromhex(r["version"]) for r in rounds]
    with trio.fail_after(30):
        while not all(coordinator.ledger.version_entry(v) for v in versions):
            await coordinator.wait_height(coordinator.ledger.height + 1, timeout=30)
    height = coordinator.ledger.height
    for n in nodes:  # every validator reaches that height, to the same state
        assert n.chain is not None and await n.chain.wait_height(height, timeout=30)
    led = coordinator.ledger
    for r, v in zip(rounds, versions, strict=True):
        entry = led.version_entry(v)
        assert entry is not None and entry.job_id.hex() == jid and entry.round == r["round"]
        assert sorted(x.hex() for x in entry.receipts) == sorted(r["receipts"])
    assert led.receipts_counted == 6
    assert all(led.is_counted(bytes.fromhex(x.receipt_id)) for x in issued)
    job = led.job(bytes.fromhex(jid))
    assert job is not None and job.designer == nodes[0].peer_id
    assert job.designer_share_bps == 2000 and job.best_micro is not None
    balances = led.balances()
    for n in nodes[1:]:
        assert balances.get(n.peer_id, 0) > 0, (n.peer_id, balances)
    # The designer takes 20% of each block's emission for its receipts (and of each
    # breakthrough): at least a fifth, rounded down, of what was minted for receipts.
    g = coordinator.genesis
    receipt_blocks = {led.receipt(bytes.fromhex(x.receipt_id)).height  # type: ignore[union-attr]
                      for x in issued}
    assert balances[nodes[0].peer_id] >= len(receipt_blocks) * g.rewards.emission_per_block // 5
    assert set(balances) == {n.peer_id for n in nodes}
    assert sum(balances.values()) == led.supply == led.emitted  # no allocations, no revenue
    roots = set()
    for n in nodes:
        assert n.chain is not None
        if n.chain.ledger.height == led.height:
            roots.add(n.chain.ledger.state_root())
    assert roots == {led.state_root()}


@pytest.mark.timeout(200)
def test_a_worker_killed_mid_round_has_its_task_reassigned(tmp_path: Path,
                                                           assets: dict[str, Path]) -> None:
    honest = WorkerSection()

    async def main() -> None:
        async with cluster(tmp_path, [WorkerSection(enabled=False)] + [honest] * 4) as nodes:
            jobs, victim = nodes[0].jobs, nodes[1]
            assert jobs is not None and victim.worker is not None
            jid = await start_job(nodes, assets, rounds=1, workers=4)
            await victim.worker.task_accepted.wait()
            victim.kill()
            await jobs.ended(jid).wait()
            status = jobs.status(jid)
            assert status["status"] == "done", status
            (rnd,) = status["rounds"]
            assert rnd["accepted"] == 4, rnd
            assert victim.peer_id not in {t["worker"] for t in rnd["tasks"]}
            assert status["base"] != rnd["base"]  # a new version was published

    run(main, timeout=180)


# Two groups, each with two honest workers beside its cheats. One cluster of all five
# (eight nodes in this one process, seven training children, two cores) failed 5 runs in
# 5 on 2026-12-02: the workers' stream opens to the coordinator timed out (10 s) while
# the process's event loop was busy about 30% of the time, so no task of a round ever
# completed. Not understood yet (see the closing note of that day); the groups pass.
# Each group says how many of its kinds may go untried (their tasks moved to another
# worker): one in all, as when the five ran together.
ADVERSARY_GROUPS = [(["random", "zero", "copy"], 1), (["copy-noise", "wrong-slice"], 0)]


@pytest.mark.timeout(240)
@pytest.mark.parametrize(("adversaries", "may_miss"), ADVERSARY_GROUPS,
                         ids=["+".join(kinds) for kinds, _ in ADVERSARY_GROUPS])
def test_cheating_workers_are_rejected_and_the_job_completes(
        tmp_path: Path, assets: dict[str, Path], adversaries: list[str], may_miss: int
) -> None:
    workers = [WorkerSection(enabled=False), WorkerSection(), WorkerSection()] + [
        WorkerSection(adversary=a) for a in adversaries]

    async def main() -> None:
        async with cluster(tmp_path, workers) as nodes:
            jobs = nodes[0].jobs
            assert jobs is not None
            # Every task re-executed: that is what catches the wrong slice for sure.
            jid = await start_job(nodes, assets, rounds=1, workers=len(nodes) - 1,
                                  inner_steps=20, reexec_fraction=1.0)
            await jobs.ended(jid).wait()
            status = jobs.status(jid)
            assert status["status"] == "done", status
            (rnd,) = status["rounds"]
            # A task may move to another worker (py-libp2p sometimes drops a connection
            # under load, and a worker whose stream breaks is lost for the round), so
            # judge by worker: every task an honest worker did is accepted, every task a
            # cheat did is rejected, and all but ``may_miss`` kinds of cheat were tried.
            tried = set()
            for n, w in zip(nodes[1:], workers[1:], strict=True):
                verdicts = {t["verdict"] for t in rnd["tasks"] if t["worker"] == n.peer_id}
                if w.adversary:
                    assert verdicts <= {"rejected"}, (w.adversary, rnd["tasks"])
                    if verdicts:
                        tried.add(w.adversary)
                else:
                    assert verdicts <= {"accepted"}, rnd["tasks"]
            assert len(tried) >= len(adversaries) - may_miss, (tried, rnd["tasks"])
            receipts = await nodes[0].storage.list_receipts(jid)
            assert receipts and {r.worker for r in receipts} <= {nodes[1].peer_id,
                                                                  nodes[2].peer_id}
            assert rnd["version"] is not None  # the honest deltas made a new version

    run(main, timeout=220)
