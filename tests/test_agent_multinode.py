"""The agent end to end on real py-libp2p hosts (tests/cluster.py, one trio process): a
tiny search whose branches are ordinary jobs trained by the workers' child processes,
their round records final on the nodes' chain, and the memory a next search would start
from read back from that chain."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from node.config import WorkerSection
from protocol.agentgoal import parse_goal_toml
from protocol.genesis import make_genesis
from tests.cluster import node_peer_id
from tests.test_jobs_multinode import assets, cluster, run, wall_ms  # noqa: F401 (fixture)


def goal_text(model: str, data: str, tasks: int) -> str:
    return f"""
name = "e2e-search"
base_model = "{model}"
dataset = "{data}"
[budget]
tasks = {tasks}
[search]
population = 2
parallel = 2
seed = 1
[space]
lr = {{low = 1e-3, high = 1e-2, log = true}}
inner_steps = [5, 10]
workers_per_round = 1
[train]
batch_size = 8
seq_len = 64
seed = 1
[checks]
eval_batches = 2
reexec_fraction = 0.0
[timeouts]
task_s = 120
"""


# Two real jobs and a chain: 45 s on this 2-core machine when lightly loaded, over 120 s
# under heavy load; beyond the default suite's budget, so it runs with -m slow.
@pytest.mark.slow
@pytest.mark.timeout(400)
def test_a_tiny_search_runs_branches_as_jobs_and_the_chain_remembers(
        tmp_path: Path, assets: dict[str, Path]) -> None:  # noqa: F811
    honest = WorkerSection()
    genesis = make_genesis("test-agent", [node_peer_id(i) for i in range(3)], wall_ms(),
                           block_interval_ms=500)

    async def main() -> None:
        async with cluster(tmp_path, [WorkerSection(enabled=False), honest, honest],
                           genesis) as nodes:
            coordinator = nodes[0]
            agent, jobs, models = coordinator.node.agent, coordinator.jobs, coordinator.models
            assert agent is not None and jobs is not None and models is not None
            model = await models.publish(assets["model"], kind="model", name="gpt-tiny")
            data = await models.publish(assets["data"], kind="dataset", name="stdlib")
            with trio.fail_after(30):
                while len(coordinator.discovery.live_records()) < len(nodes):
                    await trio.sleep(0.05)  # gossip of the workers' records; bounded
            goal = parse_goal_toml(goal_text(model, data, tasks=2))
            sid = await agent.start(goal)
            await agent.ended(sid).wait()
            d = agent.status(sid)
            s = d["search"]
            assert d["status"] == "done" and s["finished"] == "budget spent", d
            # Two fresh branches, each an ordinary job of one round on one worker, at once;
            # the better one's continuation did not fit the budget left.
            branches = [b for b in s["branches"] if b["job"]]
            assert [b["kind"] for b in branches] == ["fresh", "fresh"], s["branches"]
            assert s["branches"][-1]["note"] == "the budget left is too small for its rung"
            assert s["spent"]["tasks"] == 2
            for b in branches:
                status = jobs.status(b["job"])
                assert status["status"] == "done" and status["spec"]["rounds"] == 1
                assert status["spec"]["lr"] == b["params"]["lr"]
                assert status["spec"]["base_model"] == model
                assert b["versions"] == [status["rounds"][0]["version"]]
                assert bytes.fromhex(b["versions"][0]) in models.held
            starts = [jobs.status(b["job"])["rounds"][0]["started_ms"] for b in branches]
            ends = [jobs.status(b["job"])["rounds"][0]["ended_ms"] for b in branches]
            assert max(starts) < min(ends), "the branches ran in parallel"
            # The optimal path: the base, then the best branch's version; the base's loss
            # is the one the coordinator measured before the first round.
            nodes_by = {n["version"]: n for n in s["nodes"]}
            assert s["path"] == [model, s["best"]["version"]]
            assert nodes_by[model]["loss"] > s["best"]["loss"]
            # The chain holds both branches' round records; a next search on this goal
            # starts from the best of them and takes both settings as prior trials.
            chain = coordinator.chain
            assert chain is not None
            with trio.fail_after(60):
                while any(chain.ledger.round_version(bytes.fromhex(b["job"]), 0) is None
                          for b in branches):
                    await chain.wait_height(chain.ledger.height + 1, timeout=30)
            agent.docs.clear()  # forget the node's own store: the chain alone
            memory = agent.memory(goal)
            assert memory.sources["chain_versions"] == 2 and len(memory.priors) == 2
            assert memory.starts[0].version == s["best"]["version"]
            assert memory.starts[0].params is not None
            assert memory.starts[0].params["lr"] == next(
                b["params"]["lr"] for b in branches if b["versions"][0] == s["best"]["version"])

    run(main, timeout=380)
