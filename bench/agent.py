"""Benchmark of the agent optimal-path module: the best held-out loss an equal budget of
micro-tasks buys, on the built-in tiny GPT and the stdlib corpus.

    (a) default   the example job's settings (lr 3e-3, outer lr 0.7, momentum 0.9,
                  50 inner steps, 2 workers per round), one job of budget / 2 rounds
    (b) random    random search over the agent's space (lr 1e-3..3e-2 log, outer lr
                  0.3..1.0, inner steps {20, 50, 100}, workers per round {1, 2}): jobs of
                  `--random-rounds` rounds from the base, settings drawn uniformly (log
                  for lr), best of them
    (c) agent     the agent (node/agent: Optuna TPE + successive halving + PBT over the
                  version graph) with the same budget; the task budget prices its space
                  (specs/agent.md, "Pricing the space"): 100 inner steps, 1 worker a round
    (c2) memory   the agent again on the same goal, with (c)'s memory
    (a=)          with --equal-compute: (a)'s settings for as many training steps as the
                  budget buys at 100 inner steps a task (twice (a)'s tasks)

The budget counts micro-tasks, as the goals do; a task's size is a setting, so every
method's training steps, tokens and worker-seconds are printed beside its loss: at equal
compute the comparison may differ, and (a=) measures by how much.

Goals (exit 1 when one is missed): on every seed (c)'s best < (a)'s final and (b)'s best;
(c) reaches (a)'s final loss with at most half of (a)'s tasks; (c2) reaches (c)'s best
with at most half of the tasks (c) needed.

Modes. By default every job runs through a local testnet, one per seed (NetJobs: a
coordinator node and two worker nodes, real py-libp2p hosts on 127.0.0.1, SMIP, the
chain, task children; the agent is the coordinator node's own service). ``--sim`` runs
each job in this process with the functions the network's workers and coordinator run
(plan_round's slices, train_task, int8/int4 deltas, the robust aggregate, the outer
Nesterov step, a continuation's inherited momentum), for tuning: the transport and the
checks are missing.

    .venv/bin/python bench/agent.py                          # 3 seeds, budget 24 tasks
    .venv/bin/python bench/agent.py --sim --seeds 1 --budget 12   # quick look
    # the runs in bench/RESULTS.md (2026-12-08), 25-45 minutes on a loaded 2-core VM:
    .venv/bin/python bench/agent.py --seeds 3 --budget 8 --random-rounds 2 \
        --rounds-per-rung 1 --population 2 --parallel 1 --equal-compute
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import trio  # noqa: E402

from node.agent.service import Agent, Outcome  # noqa: E402
from node.ml import corpus, gpt, trainer  # noqa: E402
from node.storage import open_storage  # noqa: E402
from protocol.agentgoal import Goal, parse_goal_toml  # noqa: E402
from protocol.coordination import plan_round  # noqa: E402

DEFAULTS = {"lr": 3e-3, "outer_lr": 0.7, "outer_momentum": 0.9, "inner_steps": 50}
WPR = 2  # (a)'s workers per round, and the testnet's workers
WPR_CHOICES = [1, WPR]  # the space's (b) samples and (c) prices
INNER_CHOICES = [20, 50, 100]
SEQ_LEN = 64
BATCH = 8
EVAL_BATCHES = 8


def log(msg: str) -> None:
    print(f"[agent-bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def goal_text(base: str, data: str, budget: int, seed: int, rung: int, population: int,
              parallel: int) -> str:
    return f"""
name = "bench"
base_model = "{base}"
dataset = "{data}"
[budget]
tasks = {budget}
[search]
population = {population}
parallel = {parallel}
rounds_per_rung = {rung}
seed = {seed}
[space]
lr = {{low = 1e-3, high = 3e-2, log = true}}
outer_lr = {{low = 0.3, high = 1.0}}
inner_steps = {INNER_CHOICES}
workers_per_round = {WPR_CHOICES}
[train]
batch_size = {BATCH}
seq_len = {SEQ_LEN}
seed = {seed}
[checks]
eval_batches = {EVAL_BATCHES}
"""


class SimJobs:
    """Jobs of branch docs trained in this process (see the module docstring). Versions
    are the hashes of their weights' bytes; every state is kept."""

    def __init__(self, base: dict[str, torch.Tensor], data_id: str, tokens: Any,
                 train_len: int, heldout: tuple[int, int]) -> None:
        self.config = gpt.SIZES["tiny"]
        self.tokens, self.train_len, self.heldout = tokens, train_len, heldout
        self.states: dict[str, dict[str, torch.Tensor]] = {}
        self.momenta: dict[str, Any] = {}
        self.base = self._keep(base)
        self.data_id = data_id
        self.docs: dict[str, dict[str, Any]] = {}
        self.loss_cache: dict[str, float] = {}
        self.agent: Agent = None  # type: ignore[assignment]  # set by sim_seed

    def _keep(self, state: dict[str, torch.Tensor]) -> str:
        version = hashlib.sha256(gpt.state_bytes(state)).hexdigest()
        self.states[version] = state
        return version

    def loss(self, version: str, seed: int) -> float:
        """Held-out loss as the coordinator measures it: the spec's seed picks windows."""
        key = f"{version}/{seed}"
        if key not in self.loss_cache:
            self.loss_cache[key] = trainer.evaluate(
                self.config, self.states[version], self.tokens, self.heldout[0],
                self.heldout[1], EVAL_BATCHES, BATCH, SEQ_LEN, seed)
        return self.loss_cache[key]

    # -- the agent's Runner ------------------------------------------------------------

    def slots(self, goal: Goal) -> int:
        return 2

    def knows(self, version: str) -> bool:
        return version == self.data_id or version in self.states

    async def submit(self, doc: dict[str, Any]) -> str:
        job = hashlib.sha256(json.dumps(doc, sort_keys=True).encode()
                             + str(len(self.docs)).encode()).hexdigest()
        self.docs[job] = doc
        return job

    async def wait(self, job: str) -> Outcome:
        await trio.sleep(0)
        return self.run(self.docs[job])

    async def job(self, doc: dict[str, Any]) -> Outcome:
        return self.run(doc)

    async def search(self, goal: Goal) -> dict[str, Any]:
        sid = await self.agent.start(goal)
        await self.agent.ended(sid).wait()
        return dict(self.agent.status(sid))

    def run(self, doc: dict[str, Any]) -> Outcome:
        """A job's rounds as the network runs them: plan_round's slices and seeds, each
        task's inner AdamW steps (train_task), its delta quantized as on the wire, the
        trimmed mean of the round's deltas, the outer Nesterov step and its quantized
        update. The coordinator's checks are left out: every simulated worker is honest."""
        t = doc["train"]
        rounds, inner, seed = int(t["rounds"]), int(t["inner_steps"]), int(t.get("seed", 0))
        wpr, bits = int(t["workers_per_round"]), int(t.get("delta_bits", 8))
        start = doc["base_model"]
        first = int(t.get("first_round", 0))
        momentum, residual = self.momenta.get(start, (None, None)) if first else (None, None)
        state = self.states[start]
        versions, losses, parents = [], [], []
        prev = start
        train_s = 0.0  # as the workers report it: their tasks' training time
        for rnd in range(rounds):
            deltas = []
            for plan in plan_round(job_seed=seed, round_=rnd, rounds=rounds, n_tasks=wpr,
                                   train_len=self.train_len, min_slice=SEQ_LEN + 2,
                                   first_round=first):
                t0 = time.perf_counter()
                out = trainer.train_task(self.config, state, self.tokens, plan.slice_start,
                                         plan.slice_len, plan.seed, inner, BATCH, SEQ_LEN,
                                         float(t["lr"]))
                train_s += time.perf_counter() - t0
                deltas.append(trainer.dequantize(trainer.quantize(out.delta, bits)))
            avg = trainer.robust_aggregate(deltas, method="trimmed")
            update, momentum = trainer.outer_step(state, avg, momentum, float(t["outer_lr"]),
                                                  float(t.get("outer_momentum", 0.9)))
            _, state, residual = trainer.publish_update(state, update, residual, bits)
            v = self._keep(state)
            versions.append(v)
            losses.append(self.loss(v, seed))
            parents.append(prev)
            prev = v
        # As the coordinator: a job that continues this one's final version (its
        # train.first_round set) starts from this job's outer momentum and residual.
        self.momenta[versions[-1]] = (momentum, residual)
        return Outcome(versions, losses, parents, self.loss(start, seed), rounds * wpr,
                       train_s)


class NetJobs:
    """The same methods through a local testnet (tests/cluster.py, as bench/training_net.py):
    a coordinator node (jobs, agent and chain services, no worker) and WPR worker nodes,
    real py-libp2p hosts on 127.0.0.1 in this trio process; the base model and the corpus
    are published through SMIP, every job is submitted as a user's TOML spec, workers
    train in their own task children, the coordinator checks, merges and measures each
    round's held-out loss, and the agent is the coordinator node's own (its branches
    real jobs, its memory its store and the chain)."""

    def __init__(self, coordinator: Any, base: str, data_id: str) -> None:
        self.node, self.base, self.data_id = coordinator, base, data_id
        self.n = 0

    async def job(self, doc: dict[str, Any]) -> Outcome:
        from protocol.agentgoal import doc_to_toml

        self.n += 1
        full = {"name": f"bench-{self.n}", "base_model": doc["base_model"],
                "dataset": self.data_id,
                "train": {**doc["train"], "batch_size": BATCH, "seq_len": SEQ_LEN},
                "checks": {"eval_batches": EVAL_BATCHES}}
        jobs = self.node.jobs
        jid = await jobs.submit(doc_to_toml(full))
        await jobs.ended(jid).wait()
        st = jobs.status(jid)
        if st["status"] != "done":
            raise RuntimeError(f"job {jid[:16]} ended {st['status']}: {st.get('error')}")
        made = [r for r in st["rounds"] if r.get("version")]
        return Outcome([r["version"] for r in made], [float(r["heldout_after"]) for r in made],
                       [r["base"] for r in made], float(st["rounds"][0]["heldout_before"]),
                       sum(len(r["tasks"]) for r in st["rounds"]),
                       float(sum(r.get("train_s") or 0.0 for r in st["rounds"])))

    async def search(self, goal: Goal) -> dict[str, Any]:
        agent = self.node.node.agent
        sid = await agent.start(goal)
        await agent.ended(sid).wait()
        return dict(agent.status(sid))


async def net_seed(root: Path, tokens: Any, seed: int, budget: int, random_rounds: int,
                   rung: int, population: int, parallel: int, equal_compute: bool
                   ) -> dict[str, Any]:
    """One seed: (a) and (b) on one fresh testnet, (c) and (c2) on another, so that the
    agent's memory (its store and the chain's round records of the same model and
    dataset) holds none of the baselines' jobs: (c) starts from the base as they did."""
    from bench.training_net import _env as make_env
    from node.config import DiscoverySection, WorkerSection
    from node.ml import models
    from protocol.genesis import make_genesis
    from tests.cluster import local_cluster, node_peer_id

    home = root / f"seed-{seed}"
    home.mkdir()
    models.save_model(home / "base", gpt.SIZES["tiny"], gpt.init_state(gpt.SIZES["tiny"], 0))
    (home / "data.txt").write_bytes(bytes(tokens))
    clock = lambda: int(time.time() * 1000)  # noqa: E731
    n = 1 + WPR
    discovery = DiscoverySection(refresh_interval_s=3600, record_ttl_s=7200,
                                 query_timeout_s=10, gossip_interval_s=2)
    workers = [WorkerSection(enabled=False)] + [WorkerSection(threads=1)] * WPR
    out: dict[str, Any] = {}
    for part in ("baselines", "searches"):
        genesis = make_genesis(f"bench-agent-{seed}-{part}",
                               [node_peer_id(i) for i in range(n)], clock(),
                               block_interval_ms=500)
        (home / part).mkdir()
        async with local_cluster(home / part, [make_env() for _ in range(n)], clock,
                                 discovery, models=True, workers=workers,
                                 genesis=genesis) as nodes:
            coord = nodes[0]
            assert coord.models is not None
            base = await coord.models.publish(home / "base", kind="model", name="gpt-tiny")
            data = await coord.models.publish(home / "data.txt", kind="dataset",
                                              name="stdlib")
            with trio.fail_after(60):
                while len(coord.discovery.live_records()) < n:
                    await trio.sleep(0.1)  # the workers' capability records; bounded
            net = NetJobs(coord, base, data)
            if part == "baselines":
                out.update(await baselines(net, budget, seed, random_rounds, equal_compute))
            else:
                out.update(await searches(net, budget, seed, rung, population, parallel))
    out["seed"] = seed
    return out


def tasks_to_reach(trace: list[tuple[int, float]], loss: float) -> int | None:
    return next((t for t, x in trace if x <= loss + 1e-12), None)


async def baselines(backend: Any, budget: int, seed: int, random_rounds: int,
                    equal_compute: bool = False) -> dict[str, Any]:
    """(a) and (b) for one seed, on ``backend`` (SimJobs or NetJobs), whose ``job(doc)``
    runs one job to its end."""
    base = backend.base
    out: dict[str, Any] = {"seed": seed}
    # (a) the example job's settings, one job spending the whole budget.
    doc = {"base_model": base, "train": {**DEFAULTS, "rounds": budget // WPR,
                                         "workers_per_round": WPR, "seed": seed}}
    a = await backend.job(doc)
    out["a"] = {"final": a.losses[-1], "curve": a.losses, "tasks": a.tasks,
                "trace": [((i + 1) * WPR, x) for i, x in enumerate(a.losses)],
                **compute([(a.tasks, DEFAULTS["inner_steps"], a.worker_s)])}
    log(f"seed {seed} (a) default: {a.losses[-1]:.4f} after {a.tasks} tasks")
    if equal_compute:
        # (a=) the same settings for the training steps the agent's priced tasks can
        # take: the budget at the space's most inner steps a task.
        rounds = math.ceil(budget * max(INNER_CHOICES) / DEFAULTS["inner_steps"] / WPR)
        e = await backend.job({**doc, "train": {**doc["train"], "rounds": rounds}})
        out["a_eq"] = {"final": e.losses[-1], "tasks": e.tasks,
                       **compute([(e.tasks, DEFAULTS["inner_steps"], e.worker_s)])}
        log(f"seed {seed} (a=) default at equal compute: {e.losses[-1]:.4f} after "
            f"{e.tasks} tasks")
    # (b) random search over the agent's space: jobs of random_rounds rounds from the base.
    rng = random.Random(seed)
    best_b, spent, trace_b, used = math.inf, 0, [], []
    while spent + random_rounds * min(WPR_CHOICES) <= budget:
        params = {"lr": math.exp(rng.uniform(math.log(1e-3), math.log(3e-2))),
                  "outer_lr": rng.uniform(0.3, 1.0), "outer_momentum": 0.9,
                  "inner_steps": rng.choice(INNER_CHOICES)}
        wpr = rng.choice(WPR_CHOICES)
        if spent + random_rounds * wpr > budget:
            wpr = min(WPR_CHOICES)  # the last job takes what the budget has left
        b = await backend.job({"base_model": base, "train": {
            **params, "rounds": random_rounds, "workers_per_round": wpr, "seed": seed}})
        spent += b.tasks
        used.append((b.tasks, params["inner_steps"], b.worker_s))
        best_b = min(best_b, min(b.losses))
        trace_b.append((spent, best_b))
    out["b"] = {"best": best_b, "tasks": spent, "trace": trace_b, **compute(used)}
    log(f"seed {seed} (b) random: {best_b:.4f} after {spent} tasks")
    return out


def compute(jobs: list[tuple[int, int, float]]) -> dict[str, Any]:
    """What a method's jobs trained, from (tasks, inner steps, worker-seconds) each: the
    budget counts tasks, and a task's size is a setting, so the comparison at equal tasks
    is shown with the training steps (a step is BATCH x SEQ_LEN tokens) and the workers'
    training seconds behind it."""
    steps = sum(t * inner for t, inner, _ in jobs)
    return {"steps": steps, "tokens": steps * BATCH * SEQ_LEN,
            "worker_s": round(sum(w for _, _, w in jobs), 1)}


async def searches(backend: Any, budget: int, seed: int, rung: int, population: int,
                   parallel: int) -> dict[str, Any]:
    """(c) the agent, then (c2) again with (c)'s memory."""
    out: dict[str, Any] = {}
    goal = parse_goal_toml(goal_text(backend.base, backend.data_id, budget, seed, rung,
                                     population, parallel))
    for name in ("c", "c2"):
        d = await backend.search(goal)
        s = d["search"]
        out[name] = {"best": s["best"]["loss"], "tasks": s["spent"]["tasks"],
                     "trace": s["trace"], "branches": len(s["branches"]),
                     "path": len(s["path"]),
                     **compute([(b["tasks"], int(b["params"]["inner_steps"]), b["worker_s"])
                                for b in s["branches"]]),
                     "tree": [{k: b[k] for k in ("id", "kind", "parent", "depth", "params",
                                                "status", "losses")}
                              for b in s["branches"]]}
        if name == "c":
            out["c_doc"] = d
        log(f"seed {seed} ({name}) agent: {s['best']['loss']:.4f} after "
            f"{s['spent']['tasks']} tasks, {len(s['branches'])} branches")
    return out


async def sim_seed(jobs: SimJobs, tmp: Path, seed: int, budget: int, random_rounds: int,
                   rung: int, population: int, parallel: int, equal_compute: bool
                   ) -> dict[str, Any]:
    out = await baselines(jobs, budget, seed, random_rounds, equal_compute)
    async with open_storage(tmp / f"agent-{seed}.db") as storage, \
            trio.open_nursery() as nursery:
        agent = Agent(storage, jobs, clock_ms=lambda: int(time.time() * 1000), home=None)
        await nursery.start(agent.run)
        jobs.agent = agent
        out.update(await searches(jobs, budget, seed, rung, population, parallel))
        nursery.cancel_scope.cancel()
    return out


def summarize(results: list[dict[str, Any]]) -> tuple[list[str], bool]:
    lines, ok = [], True

    def ms(xs: list[float]) -> str:
        return f"{statistics.mean(xs):.4f} ± {statistics.pstdev(xs):.4f}"

    keys = ["a", "b", "c", "c2"] + (["a_eq"] if "a_eq" in results[0] else [])
    for key in keys:
        label = "final" if key.startswith("a") else "best"
        xs = [r[key][label] for r in results]
        name = "(a=)" if key == "a_eq" else f"({key})"
        lines.append(f"{name:<5} {label:<5} {ms(xs)}  per seed " + " ".join(
            f"{x:.4f}" for x in xs) + "; compute per seed: " + ", ".join(
            f"{r[key]['tasks']} tasks {r[key]['steps']} steps "
            f"{r[key]['tokens'] / 1e6:.2f}M tokens {r[key]['worker_s']:.0f} worker-s"
            for r in results))
    for r in results:
        a, b, c, c2 = r["a"], r["b"], r["c"], r["c2"]
        beat = c["best"] < a["final"] and c["best"] < b["best"]
        reach_a = tasks_to_reach([tuple(t) for t in c["trace"]], a["final"])
        half_a = reach_a is not None and reach_a <= a["tasks"] / 2
        reach_c = tasks_to_reach([tuple(t) for t in c2["trace"]], c["best"])
        first_c = tasks_to_reach([tuple(t) for t in c["trace"]], c["best"])
        half_c = reach_c is not None and first_c is not None and reach_c <= first_c / 2
        ok &= beat and half_a and half_c
        lines.append(f"seed {r['seed']}: (c) beats (a) and (b): {'yes' if beat else 'MISSED'}; "
                     f"(c) reaches (a)'s {a['final']:.4f} after {reach_a} tasks of "
                     f"{a['tasks']} (goal <= half: {'yes' if half_a else 'MISSED'}); "
                     f"(c2) reaches (c)'s {c['best']:.4f} after {reach_c} tasks, (c) after "
                     f"{first_c} (goal <= half: {'yes' if half_c else 'MISSED'})")
    return lines, ok


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sim", action="store_true",
                    help="jobs in this process (see the docstring) instead of a testnet")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--first-seed", type=int, default=0,
                    help="seeds FIRST.. (e.g. 3 for seeds the constants were not tuned on)")
    ap.add_argument("--budget", type=int, default=24, help="micro-tasks per method")
    ap.add_argument("--random-rounds", type=int, default=3)
    ap.add_argument("--rounds-per-rung", type=int, default=2,
                    help="rounds of one agent branch job (search.rounds_per_rung)")
    ap.add_argument("--population", type=int, default=4,
                    help="fresh branches before exploiting (search.population)")
    ap.add_argument("--parallel", type=int, default=2,
                    help="branches at once (search.parallel)")
    ap.add_argument("--equal-compute", action="store_true",
                    help="also run (a=): (a)'s settings for the training steps of the "
                         "agent's budget at its most inner steps a task")
    ap.add_argument("--corpus-bytes", type=int, default=2_000_000)
    ap.add_argument("--json", type=Path, help="write the figures here")
    ap.add_argument("--svg", type=Path, help="draw seed 0's search tree here")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        data_path = tmp / "stdlib.txt"
        corpus.build_stdlib_corpus(data_path)
        data_path.write_bytes(data_path.read_bytes()[:args.corpus_bytes])
        tokens = corpus.load_tokens(data_path)
        train_len, h_start = corpus.split(len(tokens), 0.05)
        data_id = hashlib.sha256(data_path.read_bytes()).hexdigest()
        results = []
        t0 = time.perf_counter()
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            rest = (args.budget, args.random_rounds, args.rounds_per_rung, args.population,
                    args.parallel, args.equal_compute)
            if args.sim:
                jobs = SimJobs(gpt.init_state(gpt.SIZES["tiny"], 0), data_id, tokens,
                               train_len, (h_start, len(tokens) - h_start))
                results.append(trio.run(sim_seed, jobs, tmp, seed, *rest))
            else:
                results.append(trio.run(net_seed, tmp, tokens, seed, *rest))
            if args.json:  # after each seed: a run stopped early keeps what it measured
                args.json.write_text(json.dumps([{k: v for k, v in r.items() if k != "c_doc"}
                                                 for r in results], indent=1))
        if args.svg:
            from node.agent.picture import search_svg

            args.svg.write_text(search_svg(results[0]["c_doc"]))
        lines, ok = summarize(results)
        for line in lines:
            print(line)
        print(f"budget {args.budget} tasks x {args.seeds} seeds, (a) {WPR} workers per round, "
              f"{time.perf_counter() - t0:.0f} s; goals {'met' if ok else 'MISSED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
