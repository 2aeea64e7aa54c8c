"""Benchmark of the agent optimal-path module: the best held-out loss an equal budget of
micro-tasks buys, on the built-in tiny GPT and the stdlib corpus.

    (a) default   the example job's settings (lr 3e-3, outer lr 0.7, momentum 0.9,
                  50 inner steps), one job of budget / workers_per_round rounds
    (b) random    random search over the agent's space: jobs of `--random-rounds` rounds
                  from the base, settings drawn uniformly (log for lr), best of them
    (c) agent     the agent (node/agent: Optuna TPE + successive halving + PBT over the
                  version graph) with the same budget
    (c2) memory   the agent again on the same goal, with (c)'s memory

Goals (exit 1 when one is missed): on every seed (c)'s best < (a)'s final and (b)'s best;
(c) reaches (a)'s final loss with at most half of (a)'s tasks; (c2) reaches (c)'s best
with at most half of the tasks (c) needed.

Mode. ``--sim`` runs each branch's job in this process with the same
functions the network's workers and coordinator run (plan_round's slices, train_task,
int8/int4 deltas, the robust aggregate, the outer Nesterov step), so losses are real
training losses; the transport and the checks are missing. A run through a local testnet
(the issue's reported run) is not written yet: the agent's network path (JobsRunner,
branches as real jobs) is exercised by tests/test_agent_multinode.py only.

    .venv/bin/python bench/agent.py --sim                    # 3 seeds, budget 24 tasks
    .venv/bin/python bench/agent.py --sim --seeds 1 --budget 12   # quick look
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
WPR = 2
SEQ_LEN = 64
BATCH = 8
EVAL_BATCHES = 8


def log(msg: str) -> None:
    print(f"[agent-bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def goal_text(base: str, data: str, budget: int, seed: int, rung: int) -> str:
    return f"""
name = "bench"
base_model = "{base}"
dataset = "{data}"
[budget]
tasks = {budget}
[search]
population = 4
parallel = 2
rounds_per_rung = {rung}
seed = {seed}
[space]
lr = {{low = 1e-3, high = 3e-2, log = true}}
outer_lr = {{low = 0.3, high = 1.0}}
inner_steps = [20, 50, 100]
workers_per_round = {WPR}
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
        momentum = self.momenta.get(start) if first else None
        state, residual = self.states[start], None
        versions, losses, parents = [], [], []
        prev = start
        t0 = time.perf_counter()
        for rnd in range(rounds):
            deltas = []
            for plan in plan_round(job_seed=seed, round_=rnd, rounds=rounds, n_tasks=wpr,
                                   train_len=self.train_len, min_slice=SEQ_LEN + 2,
                                   first_round=first):
                out = trainer.train_task(self.config, state, self.tokens, plan.slice_start,
                                         plan.slice_len, plan.seed, inner, BATCH, SEQ_LEN,
                                         float(t["lr"]))
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
        # train.first_round set) starts from this job's outer momentum.
        self.momenta[versions[-1]] = momentum
        return Outcome(versions, losses, parents, self.loss(start, seed), rounds * wpr,
                       time.perf_counter() - t0)


def tasks_to_reach(trace: list[tuple[int, float]], loss: float) -> int | None:
    return next((t for t, x in trace if x <= loss + 1e-12), None)


async def run_seed(jobs: SimJobs, budget: int, seed: int, random_rounds: int, rung: int,
                   tmp: Path) -> dict[str, Any]:
    base = jobs.base
    out: dict[str, Any] = {"seed": seed}
    # (a) the example job's settings, one job spending the whole budget.
    doc = {"base_model": base, "train": {**DEFAULTS, "rounds": budget // WPR,
                                         "workers_per_round": WPR, "seed": seed}}
    a = jobs.run(doc)
    out["a"] = {"final": a.losses[-1], "curve": a.losses, "tasks": a.tasks,
                "trace": [((i + 1) * WPR, x) for i, x in enumerate(a.losses)]}
    log(f"seed {seed} (a) default: {a.losses[-1]:.4f} after {a.tasks} tasks")
    # (b) random search: budget / (random_rounds * WPR) jobs from the base.
    rng = random.Random(seed)
    best_b, spent, trace_b = math.inf, 0, []
    while spent + random_rounds * WPR <= budget:
        params = {"lr": math.exp(rng.uniform(math.log(1e-3), math.log(3e-2))),
                  "outer_lr": rng.uniform(0.3, 1.0), "outer_momentum": 0.9,
                  "inner_steps": rng.choice([20, 50, 100])}
        b = jobs.run({"base_model": base, "train": {**params, "rounds": random_rounds,
                                                    "workers_per_round": WPR, "seed": seed}})
        spent += b.tasks
        best_b = min(best_b, min(b.losses))
        trace_b.append((spent, best_b))
    out["b"] = {"best": best_b, "tasks": spent, "trace": trace_b}
    log(f"seed {seed} (b) random: {best_b:.4f} after {spent} tasks")
    # (c) the agent, then (c2) again with (c)'s memory.
    goal = parse_goal_toml(goal_text(base, jobs.data_id, budget, seed, rung))
    async with open_storage(tmp / f"agent-{seed}.db") as storage, \
            trio.open_nursery() as nursery:
        agent = Agent(storage, jobs, clock_ms=lambda: int(time.time() * 1000), home=None)
        await nursery.start(agent.run)
        for name in ("c", "c2"):
            sid = await agent.start(goal)
            await agent.ended(sid).wait()
            s = agent.status(sid)["search"]
            out[name] = {"best": s["best"]["loss"], "tasks": s["spent"]["tasks"],
                         "trace": s["trace"], "branches": len(s["branches"]),
                         "path": len(s["path"])}
            if name == "c":
                out["c_doc"] = agent.status(sid)
            log(f"seed {seed} ({name}) agent: {s['best']['loss']:.4f} after "
                f"{s['spent']['tasks']} tasks, {len(s['branches'])} branches")
        nursery.cancel_scope.cancel()
    return out


def summarize(results: list[dict[str, Any]]) -> tuple[list[str], bool]:
    lines, ok = [], True

    def ms(xs: list[float]) -> str:
        return f"{statistics.mean(xs):.4f} ± {statistics.pstdev(xs):.4f}"

    for key, label in (("a", "final"), ("b", "best"), ("c", "best"), ("c2", "best")):
        xs = [r[key]["final" if key == "a" else "best"] for r in results]
        lines.append(f"({key}) {label:<5} {ms(xs)}  per seed " + " ".join(f"{x:.4f}"
                                                                      for x in xs))
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
    ap.add_argument("--sim", action="store_true", required=True,
                    help="in-process jobs (see the docstring; the only mode so far)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--budget", type=int, default=24, help="micro-tasks per method")
    ap.add_argument("--random-rounds", type=int, default=3)
    ap.add_argument("--rounds-per-rung", type=int, default=2,
                    help="rounds of one agent branch job (search.rounds_per_rung)")
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
        for seed in range(args.seeds):
            jobs = SimJobs(gpt.init_state(gpt.SIZES["tiny"], 0), data_id, tokens, train_len,
                           (h_start, len(tokens) - h_start))
            results.append(trio.run(run_seed, jobs, args.budget, seed, args.random_rounds,
                                    args.rounds_per_rung, tmp))
        if args.svg:
            from node.agent.picture import search_svg

            args.svg.write_text(search_svg(results[0]["c_doc"]))
        lines, ok = summarize(results)
        for line in lines:
            print(line)
        print(f"budget {args.budget} tasks x {args.seeds} seeds, {WPR} workers per round, "
              f"{time.perf_counter() - t0:.0f} s; goals {'met' if ok else 'MISSED'}")
        if args.json:
            args.json.write_text(json.dumps([{k: v for k, v in r.items() if k != "c_doc"}
                                             for r in results], indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
