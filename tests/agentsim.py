"""A simulated objective for the agent's search: branches "train" in trio time (MockClock
in tests, no real time in bench --sim) and held-out loss follows a fixed function of the
setting, with seeded noise. It is what the search is tested on, not a stand-in for the
jobs service: the network's runner (node.agent.service.JobsRunner) is tested on a testnet.

The landscape: each round moves the loss a fraction of the way to a floor of 1.0; the
fraction peaks at lr 3e-3 (log scale), outer_lr 0.7, more inner steps; too high an lr
makes a round worse. So there is a best setting to find, continuing good versions pays,
and a poor branch is visible after one rung.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Mapping
from typing import Any

import trio

from node.agent.service import BranchLost, Outcome
from protocol.agentgoal import Goal

BASE_LOSS = 5.5
FLOOR = 1.0
ROUND_S = 10.0  # simulated seconds of a round of 50 inner steps


def gain(params: Mapping[str, Any]) -> float:
    """The fraction of the gap to the floor one round closes with this setting."""
    lr = math.log10(float(params.get("lr", 3e-3)) / 3e-3)
    outer = (float(params.get("outer_lr", 0.7)) - 0.7) / 0.35
    steps = int(params.get("inner_steps", 50)) / 50
    g = 0.35 * math.exp(-(lr / 0.45) ** 2) * math.exp(-outer ** 2) * min(1.5, steps) ** 0.5
    return g - (0.15 if lr > 0.6 else 0.0)  # diverges when the lr is far too high


class SimRunner:
    """Branches of a goal in simulated time. ``lose``: job numbers (1-based, in submit
    order) whose workers vanish half-way (a lost branch)."""

    def __init__(self, dataset: str, bases: list[str], *, workers: int = 4, seed: int = 0,
                 lose: frozenset[int] = frozenset()) -> None:
        self.losses: dict[str, float] = {b: BASE_LOSS for b in bases}
        self.dataset = dataset
        self.workers = workers
        self.seed = seed
        self.lose = lose
        self.jobs: dict[str, dict[str, Any]] = {}
        self.running = 0
        self.max_running = 0
        self.submitted = 0

    def slots(self, goal: Goal) -> int:
        return max(1, self.workers // goal.most_workers_per_round())

    def knows(self, version: str) -> bool:
        return version == self.dataset or version in self.losses

    async def submit(self, doc: dict[str, Any]) -> str:
        self.submitted += 1
        job = hashlib.sha256(f"{self.seed}/{self.submitted}/{doc}".encode()).hexdigest()
        self.jobs[job] = {"doc": doc, "n": self.submitted}
        return job

    async def wait(self, job: str) -> Outcome:
        entry = self.jobs[job]
        doc, n = entry["doc"], entry["n"]
        train = doc["train"]
        rounds, wpr = int(train["rounds"]), int(train["workers_per_round"])
        rng = random.Random(f"{self.seed}/{job}")
        self.running += 1
        self.max_running = max(self.max_running, self.running)
        try:
            base = doc["base_model"]
            loss = self.losses[base]
            start = loss
            versions, losses, parents = [], [], []
            round_s = ROUND_S * int(train["inner_steps"]) / 50
            for r in range(rounds):
                if n in self.lose and r == rounds // 2:
                    await trio.sleep(round_s / 2)
                    raise BranchLost("no worker completed a task in 4 tries",
                                     tasks=wpr, worker_s=wpr * round_s / 2)
                await trio.sleep(round_s)
                loss = loss - gain(train) * (loss - FLOOR) * (1 + rng.gauss(0, 0.05))
                version = hashlib.sha256(f"{job}/{r}".encode()).hexdigest()
                self.losses[version] = loss
                parents.append(base if r == 0 else versions[-1])
                versions.append(version)
                losses.append(loss)
            return Outcome(versions, losses, parents, start, rounds * wpr,
                           rounds * wpr * round_s)
        finally:
            self.running -= 1
