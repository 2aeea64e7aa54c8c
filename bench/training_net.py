"""Part (b) of the training benchmark through the real network: a job on a local cluster.

:func:`run_network_job` has the signature of ``training_sim.run_simulated_network`` and
returns the same figures, but nothing is simulated: one coordinator and ``recipe.workers``
worker nodes run in one trio process on 127.0.0.1 (real py-libp2p hosts, DHT, gossip,
SMIP), the base model and the corpus are published through SMIP, the job is submitted as
a user would (a TOML spec), every worker trains in its own ``python -m node.jobs.taskproc``
child, the coordinator checks and merges in its own, and the final version is read back
from the coordinator's content store. Bytes are what SMIP moved: per worker, the payload
of the deltas it published (the coordinator fetches each once) and everything it fetched,
less the base model and the dataset (fetched once, reported apart).
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import trio

from bench.training_sim import NetworkResult, Recipe
from node.config import DiscoverySection, WorkerSection
from node.ml import models
from protocol.capability import EnvReport
from tests.cluster import LocalNode, local_cluster

State = dict[str, torch.Tensor]
JOB_TIMEOUT_S = 3 * 3600.0


def _env() -> EnvReport:
    return EnvReport(os="bench", python="3.11", torch=torch.__version__, cuda="", gpus=(),
                     cpu_cores=1, ram_bytes=1 << 34, disk_free_bytes=1 << 40, tflops=0.1,
                     tflops_dtype="fp32", tflops_device="cpu")


def job_toml(recipe: Recipe, model: str, dataset: str) -> str:
    return f"""
name = "bench"
base_model = "{model}"
dataset = "{dataset}"
[train]
rounds = {recipe.rounds}
workers_per_round = {recipe.workers}
inner_steps = {recipe.inner_steps}
batch_size = {recipe.batch}
seq_len = {recipe.seq_len}
lr = {recipe.lr!r}
outer_lr = {recipe.outer_lr!r}
outer_momentum = {recipe.outer_momentum!r}
seed = {recipe.seed}
delta_bits = {recipe.delta_bits}
[data]
heldout_fraction = {recipe.heldout_fraction!r}
[checks]
eval_batches = {max(1, math.ceil(recipe.check_windows / recipe.batch))}
reexec_fraction = {recipe.reexec_fraction!r}
[timeouts]
task_s = 3600
"""


def _fetched(n: LocalNode) -> int:
    assert n.models is not None
    return int(n.models.metrics.fetched._value.get())


def run_network_job(recipe: Recipe, config: models.Config, base: State, tokens: Any,
                    train_len: int, heldout: tuple[int, int],
                    on_round: Callable[[int, State], None] | None = None) -> NetworkResult:
    unsupported = {k: v for k, v in (("lr_final", recipe.lr_final != 1.0),
                                      ("inner_warmup", recipe.inner_warmup != 0),
                                      ("aggregate", recipe.aggregate != "trimmed")) if v}
    if unsupported:
        raise SystemExit(f"the job spec has no field for {', '.join(unsupported)}: run the "
                         "network with their defaults, or --sim")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        tok = None
        if models.is_hf(config):  # a byte-level model: its tokens are the bytes
            from node.ml import tokens as toks

            tok = toks.byte_tokenizer()
        models.save_model(root / "base", config, base, tok)
        (root / "data").mkdir()
        np.asarray(tokens, dtype=np.uint8).tofile(root / "data" / "corpus.txt")
        return trio.run(_run, recipe, root, on_round)


async def _run(recipe: Recipe, root: Path,
               on_round: Callable[[int, State], None] | None) -> NetworkResult:
    discovery = DiscoverySection(refresh_interval_s=3600, record_ttl_s=7200,
                                 query_timeout_s=10, gossip_interval_s=2)
    workers = [WorkerSection(enabled=False)] + [WorkerSection()] * recipe.workers
    (root / "nodes").mkdir()
    with trio.fail_after(JOB_TIMEOUT_S):
        async with local_cluster(root / "nodes", [_env() for _ in workers],
                                 lambda: int(time.time() * 1000), discovery, models=True,
                                 workers=workers) as nodes:
            coord = nodes[0]
            assert coord.models is not None and coord.jobs is not None
            model = await coord.models.publish(root / "base", kind="model", name="bench-base")
            data = await coord.models.publish(root / "data" / "corpus.txt", kind="dataset",
                                              name="stdlib")
            while len(coord.discovery.live_records()) < len(nodes):
                await trio.sleep(0.1)  # gossip of capability records; bounded by fail_after
            jid = await coord.jobs.submit(job_toml(recipe, model, data))
            seen = 0
            while not coord.jobs.ended(jid).is_set():
                with trio.move_on_after(1.0):
                    await coord.jobs.ended(jid).wait()
                rounds = coord.jobs.status(jid).get("rounds", [])
                for rd in rounds[seen:]:
                    if on_round is not None and rd.get("version"):
                        # In a thread: the five nodes share this event loop, and a held-out
                        # evaluation run on it stalls their streams (on a loaded machine,
                        # long enough for tasks to time out and rounds to be lost).
                        state = _load(coord, rd["version"])
                        await trio.to_thread.run_sync(on_round, rd["round"], state)
                seen = len(rounds)
            status = coord.jobs.status(jid)
            if status["status"] != "done":
                raise RuntimeError(f"the job ended {status['status']}: {status.get('error')}")
            held = {v: coord.models.held[bytes.fromhex(v)] for v in (model, data)}
            base_bytes, data_bytes = (held[model].manifest.total_size,
                                      held[data].manifest.total_size)
            sent: dict[str, int] = {n.peer_id: 0 for n in nodes[1:]}
            tasks = rejected = 0
            for rd in status["rounds"]:
                for t in rd["tasks"]:
                    tasks += 1
                    rejected += t["verdict"] != "accepted"
                    if t.get("delta") and t["worker"] in sent:
                        # A delta the coordinator did not fetch (its task had timed out)
                        # is still counted, at its size in the worker's store.
                        cid = bytes.fromhex(t["delta"])
                        held_by = [n.models.held[cid] for n in nodes
                                   if n.models is not None and cid in n.models.held]
                        if not held_by:  # would understate the bytes sent
                            raise RuntimeError(f"delta {t['delta'][:16]} of task "
                                               f"{t['task']} is held by no node")
                        sent[t["worker"]] += held_by[0].manifest.total_size
            received = [_fetched(n) - base_bytes - data_bytes for n in nodes[1:]]
            train_s = sum(n.worker.stats.train_s for n in nodes[1:])  # type: ignore[union-attr]
            state = _load(coord, status["base"])
            rounds_out = [{"round": rd["round"], "accepted": rd["accepted"],
                           "heldout_before": rd["heldout_before"],
                           "heldout_after": rd.get("heldout_after"),
                           "check_s": rd.get("check_s"),
                           "train_loss": [t.get("last_loss") for t in rd["tasks"]],
                           "heldout_gain": [t.get("metrics", {}).get("heldout_gain")
                                            for t in rd["tasks"]],
                           "own_excess": None, "max_cosine": [
                               t.get("metrics", {}).get("max_cosine") for t in rd["tasks"]]}
                          for rd in status["rounds"]]
            n_workers = len(nodes) - 1
            return NetworkResult(
                state=state,
                bytes_sent_per_worker=sum(sent.values()) // n_workers,
                bytes_received_per_worker=sum(received) // n_workers,
                base_bytes=base_bytes, data_bytes_per_worker=data_bytes,
                train_wall_s=train_s,
                check_wall_s=sum(rd.get("check_s") or 0.0 for rd in status["rounds"]),
                reexec_wall_s=sum(rd.get("reexec_s") or 0.0 for rd in status["rounds"]),
                reexec_count=sum(rd.get("reexec", 0) for rd in status["rounds"]),
                tasks=tasks, rejected=rejected, rounds=rounds_out)


def _load(node: LocalNode, version: str) -> State:
    assert node.models is not None
    held = node.models.held[bytes.fromhex(version)]
    with tempfile.TemporaryDirectory() as tmp:
        for entry in held.manifest.shards:
            (Path(tmp) / entry.path).symlink_to(node.models.store.shard_path(entry.root))
        _, state = models.load_model(tmp)
        state = {k: v.clone() for k, v in state.items()}  # off the map of tmp
    return state
