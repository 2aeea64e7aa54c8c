"""The agent's search over the model-version graph, as a sans-IO machine (specs/agent.md).

A *branch* is one ordinary training job of ``rounds_per_rung`` rounds (one rung), started
from a model version with a setting of the searched fields. The machine decides which
branches to run; node/agent runs them as jobs and feeds their outcomes back:

    plan(free)          -> the branches to launch now (each then ``started``)
    finished(id, ...)   -> the branch's rung is done: its versions and held-out losses
    lost(id, reason)    -> the branch's job failed or its workers vanished

Decisions combine asynchronous successive halving with population-based training:

* *fresh*: the first ``population`` branches start from the start points (the goal's base
  models, or the best versions memory knows) with settings the advisor samples (Optuna's
  TPE in node/agent, warm-started with the memory's trials);
* *continue*: a branch the advisor's successive-halving pruner keeps at its rung goes on
  from its own last version, same setting, one rung further (the same trial);
* *stop*: a branch below the rung's top 1/eta (or that did not beat its start) stops;
  one that did not beat its start (a plateau) has its start tried again, with the lr one
  annealing step down, queued like a continuation (up to MAX_PLATEAUS times per start);
* *exploit/explore*: a free slot after the population is out continues from one of the
  best versions so far (the top quarter, drawn with the injected rng) with its setting
  perturbed (x0.8 or x1.25, a neighbouring choice, or resampled one time in four), as a
  new trial; the version DAG is the search tree.

The budget prices the space (``priced``): under a budget of tasks (or of reward units,
paid per task) a field that only sizes one task's work (``WORK_FIELDS``) costs nothing in
the budget's unit, so it is fixed at its most-work end; ``workers_per_round`` at its low end
(every task of a round starts from the same version: fewer per round buys more rounds, the
outer steps that make progress, and the wall time is won back by branches side by side).
Under a worker-seconds budget those fields cost and are searched. The first fresh branch
runs the incumbent (the job's default setting, or the setting that made memory's best,
its lr one annealing step further when that path was annealing), and once a quarter of the budget
is spent a kept branch goes on with its lr x0.8 (annealing, as PBT's explore late in a run).

A lost branch is planned again once, then dropped; it never blocks the others. After each
rung the machine appends a reflection record (decision, evidence, settings moved, the
branch's loss curve) and narrows the ranges that perturbations may reach to the span of
the best settings seen at that rung. The machine takes no clock and no randomness of its
own: ``rng`` and the advisor are injected.

This module imports the standard library and protocol/ only.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Protocol

from protocol.agentgoal import Dim, Goal
from protocol.errors import LocalProtocolError

MAX_TRIES = 2  # a lost branch is planned once more, then dropped
EXPLOIT_QUANTILE = 0.25  # exploit draws its parent among this best fraction of versions
RESAMPLE_P = 0.25  # explore: chance that a perturbed field is sampled afresh instead
PERTURB = (0.8, 1.25)  # explore: factors of a numeric field (PBT's)
NARROW_MIN = 4  # results at a rung before its best settings narrow the explore ranges
# Fields that size one task's work without changing how many tasks a round takes: under a
# task budget they are free in its unit (specs/agent.md, "Pricing the space").
WORK_FIELDS = ("inner_steps", "batch_size")
LATE = 0.25  # budget fraction spent after which a kept branch anneals as it goes on
ANNEAL = PERTURB[0]  # its lr factor
MAX_ANNEALS = 3  # annealing steps one search takes along one path, plateau steps included
MAX_PLATEAUS = 2  # plateau retries of one start version (a retry that stalls is retried)


def priced(goal: Goal) -> Goal:
    """The goal's space as its budget prices it. Without a worker-seconds budget, the
    budget counts tasks (a reward pool is paid per task): a searched work field is fixed
    at its most-work value and ``workers_per_round`` at its fewest. With one, they cost
    worker-seconds and stay searched. Idempotent."""
    if goal.budget_worker_s is not None:
        return goal

    def fix(d: Dim) -> Dim:
        if d.kind == "fixed" or (d.name not in WORK_FIELDS and d.name != "workers_per_round"):
            return d
        ends = d.values if d.kind == "choice" else (d.low, d.high)
        value = max(ends) if d.name in WORK_FIELDS else min(ends)
        return Dim(d.name, "fixed", (int(value) if d.integer else value,),
                   integer=d.integer)

    return replace(goal, space=tuple(fix(d) for d in goal.space))


class Advisor(Protocol):
    """What the search asks of a hyperparameter library (node/agent: Optuna)."""

    def new_trial(self, params: Mapping[str, Any] | None) -> tuple[int, dict[str, Any]]:
        """A new trial: sampled when ``params`` is None, else with these params."""

    def report(self, trial: int, step: int, loss: float) -> bool:
        """Record ``loss`` at ``step`` (rounds from the base); True: prune the trial."""

    def close(self, trial: int, state: str, loss: float | None) -> None:
        """End a trial: state "complete", "pruned" or "fail"."""


@dataclass
class Branch:
    """One branch: a job of one rung from ``start`` with ``params``."""

    id: int
    trial: int
    kind: str  # "fresh" | "continue" | "exploit"
    start: str  # the version it trains from (hex)
    start_loss: float | None
    depth: int  # rounds from the base before it
    params: dict[str, Any]
    rounds: int
    parent: int | None = None  # the branch whose version it starts from
    anneals: int = 0  # lr annealing steps behind its setting (see Search._annealed)
    carried: int = 0  # of those, the steps taken before this search (memory's)
    plateaus: int = 0  # plateau retries of its start before it (see Search.finished)
    retry_of: int | None = None  # the branch whose plateau it retries
    status: str = "planned"  # planned | running | done | stopped | failed
    job: str | None = None
    tries: int = 0
    versions: list[str] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    tasks: int = 0
    worker_s: float = 0.0
    note: str = ""

    @property
    def loss(self) -> float | None:
        return self.losses[-1] if self.losses else None

    @property
    def end_depth(self) -> int:
        return self.depth + len(self.losses)


@dataclass(frozen=True)
class Start:
    """A version a search may start from, with what is known of it."""

    version: str
    loss: float | None
    depth: int = 0
    params: dict[str, Any] | None = None  # the setting that made it, when known
    anneals: int = 0  # lr annealing steps behind that setting (memory's, all searches)


@dataclass(frozen=True)
class Node:
    """A version in the search tree."""

    version: str
    parent: str | None
    loss: float | None
    depth: int
    branch: int | None  # None: a start point


class Search:
    """The search machine of one goal (see the module docstring)."""

    def __init__(self, goal: Goal, advisor: Advisor, rng: random.Random,
                 starts: Sequence[Start], proposals: Sequence[Mapping[str, Any]] = ()
                 ) -> None:
        """``goal``: as written; the machine searches ``priced(goal)``, over which
        ``advisor`` must sample. ``proposals``: settings (e.g. the planner's) the first
        fresh branches take, in order, instead of the incumbent."""
        if not starts:
            raise LocalProtocolError("a search needs at least one start version")
        self.goal = priced(goal)
        self.priced = {d.name: d.values[0] for d in self.goal.space
                       if d.kind == "fixed" and goal.dim(d.name).kind != "fixed"}
        self.advisor = advisor
        self.rng = rng
        self.starts = list(starts)
        self.proposals = [dict(p) for p in proposals]
        self.branches: dict[int, Branch] = {}
        self.queue: list[Branch] = []  # decided, waiting for a free slot
        self.nodes: dict[str, Node] = {s.version: Node(s.version, None, s.loss, s.depth, None)
                                       for s in starts}
        self.reflections: list[dict[str, Any]] = []
        self.trace: list[tuple[int, float]] = []  # (tasks spent, best loss) at each new best
        self.rung_losses: dict[int, list[tuple[float, dict[str, Any]]]] = {}
        self.bounds: dict[str, tuple[float, float]] = {
            d.name: (d.low, d.high) for d in self.goal.space if d.kind == "range"}
        self.spent_tasks = 0
        self.spent_worker_s = 0.0
        self.fresh = 0
        self.best: tuple[float, str] | None = None
        self.finished_reason = ""
        self._next_id = 0

    # -- budget ---------------------------------------------------------------------------

    def cost(self, b: Branch) -> int:
        return b.rounds * int(b.params["workers_per_round"])

    def _reserved(self) -> int:
        return sum(self.cost(b) for b in self.branches.values() if b.status == "running")

    def _fits(self, tasks: int) -> bool:
        g = self.goal
        total = self.spent_tasks + self._reserved() + tasks
        if g.budget_tasks is not None and total > g.budget_tasks:
            return False
        if g.budget_reward is not None and total * g.reward_per_task > g.budget_reward:
            return False
        return g.budget_worker_s is None or \
            self._worker_s(self._reserved() + tasks) <= g.budget_worker_s

    def _worker_s(self, tasks: int) -> float:
        """Worker-seconds spent, plus ``tasks`` more at the mean cost of a task so far."""
        done = sum(b.tasks for b in self.branches.values() if b.tasks)
        per_task = self.spent_worker_s / done if done else 0.0
        return self.spent_worker_s + per_task * tasks

    @property
    def running(self) -> list[Branch]:
        return [b for b in self.branches.values() if b.status == "running"]

    @property
    def done(self) -> bool:
        return bool(self.finished_reason)

    # -- planning -------------------------------------------------------------------------

    def plan(self, free: int) -> list[Branch]:
        """Up to ``free`` branches to launch now, marked running. When nothing runs and
        nothing more fits the budget, the search ends (``finished_reason``)."""
        out: list[Branch] = []
        while not self.done and len(out) < free:
            b = self._next()
            if b is None:
                break
            b.status = "running"
            b.tries += 1
            self.branches[b.id] = b
            out.append(b)
        if not out and not self.running and not self.done:
            self.finished_reason = "budget spent"
            self._close_open_trials()
        return out

    def _next(self) -> Branch | None:
        while self.queue:
            b = self.queue.pop(0)
            if self._fits(self.cost(b)):
                return b
            self._drop(b, "the budget left is too small for its rung")
        wpr = self._wpr_max()
        if not self._fits(self.goal.rounds_per_rung * wpr):
            return None
        if self.fresh < self.goal.population or not self._results():
            start = self.starts[self.fresh % min(len(self.starts), 2)]
            # The proposals first, else the incumbent: what made the best start version,
            # else the defaults. The rest the advisor samples.
            prior: Mapping[str, Any] | None = None
            if self.fresh < len(self.proposals):
                prior = self.proposals[self.fresh]
            elif self.fresh == 0 and not self.proposals:
                prior = start.params or self.goal.incumbent()
            anneals = carried = 0
            known = start.params
            lr_dim = next((d for d in self.goal.searched if d.name == "lr"), None)
            if known is not None and prior is known:
                # Going on from what memory learnt: the path's annealing goes on too. A
                # path that was annealing takes its next step (the lr that made the start
                # version is one its later training had already outgrown).
                # A known lr outside this goal's range is not that path's lr any more.
                anneals = carried = start.anneals
                inside = lr_dim is None or lr_dim.contains(known.get("lr"))
                stepped = self._lr_step(self._complete(known)) if anneals and inside \
                    else None
                if stepped is not None:
                    prior, anneals = stepped, anneals + 1
            trial, params = self.advisor.new_trial(self._complete(prior) if prior else None)
            self.fresh += 1
            b = self._branch("fresh", trial, start.version, start.loss, start.depth,
                             params, None)
            b.anneals, b.carried = anneals, carried
            return b
        parent = self._pick_parent()
        params = self._explore(parent.params)
        trial, params = self.advisor.new_trial(params)
        assert parent.loss is not None
        b = self._branch("exploit", trial, parent.versions[-1], parent.loss,
                         parent.end_depth, params, parent.id)
        # A perturbed setting (its lr maybe raised or resampled) starts a new path: the
        # parent's annealing steps are not behind it, so memory must not step it on.
        b.anneals = b.carried = 0
        return b

    def _wpr_max(self) -> int:
        d = self.goal.dim("workers_per_round")
        return int(max(d.values) if d.kind != "range" else d.high)

    def _branch(self, kind: str, trial: int, start: str, start_loss: float | None,
                depth: int, params: dict[str, Any], parent: int | None) -> Branch:
        self._next_id += 1
        of = self.branches[parent] if parent is not None else None
        return Branch(self._next_id, trial, kind, start, start_loss, depth, dict(params),
                      self.goal.rounds_per_rung, parent,
                      anneals=of.anneals if of is not None else 0,
                      carried=of.carried if of is not None else 0)

    def _complete(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """``params`` kept where they lie in the space, the rest from its middle."""
        out: dict[str, Any] = {}
        for d in self.goal.searched:
            value = params.get(d.name)
            out[d.name] = value if value is not None and d.contains(value) else d.middle()
        return out

    def _results(self) -> list[Branch]:
        return [b for b in self.branches.values() if b.losses and b.status in ("done",
                                                                              "stopped")]

    def _pick_parent(self) -> Branch:
        ranked = sorted(self._results(), key=lambda b: (b.loss, b.id))
        top = ranked[:max(1, math.ceil(len(ranked) * EXPLOIT_QUANTILE))]
        return top[self.rng.randrange(len(top))]

    def _explore(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """PBT's explore: each searched field perturbed, within the (narrowed) space."""
        out = dict(params)
        for d in self.goal.searched:
            if self.rng.random() < RESAMPLE_P:
                out[d.name] = self._sample(d)
                continue
            if d.kind == "choice":
                i = d.values.index(out[d.name]) if out[d.name] in d.values else 0
                i = min(len(d.values) - 1, max(0, i + self.rng.choice((-1, 1))))
                out[d.name] = d.values[i]
                continue
            lo, hi = self.bounds[d.name]
            x = float(out[d.name]) * self.rng.choice(PERTURB)
            x = min(hi, max(lo, x))
            out[d.name] = round(x) if d.integer else x
        return out

    def _sample(self, d: Dim) -> Any:
        if d.kind == "choice":
            return d.values[self.rng.randrange(len(d.values))]
        lo, hi = self.bounds[d.name]
        x = math.exp(self.rng.uniform(math.log(lo), math.log(hi))) if d.log else \
            self.rng.uniform(lo, hi)
        return round(x) if d.integer else x

    # -- events ---------------------------------------------------------------------------

    def started(self, branch: int, job: str) -> None:
        self._running(branch).job = job

    def learn_loss(self, branch: int, version: str, loss: float | None) -> None:
        """The held-out loss of a start version, measured by the branch's first round
        (a base model's loss is known only then)."""
        node = self.nodes.get(version)
        if loss is None or node is None or node.loss is not None or not math.isfinite(loss):
            return
        self.nodes[version] = Node(node.version, node.parent, loss, node.depth, node.branch)
        b = self.branches.get(branch)
        if b is not None and b.start == version and b.start_loss is None:
            b.start_loss = loss

    def finished(self, branch: int, versions: Sequence[str], losses: Sequence[float],
                 parents: Sequence[str], tasks: int, worker_s: float) -> dict[str, Any]:
        """A branch's rung is done: ``versions[i]`` was made from ``parents[i]`` with
        held-out loss ``losses[i]``. Returns the reflection record of the decision."""
        b = self._running(branch)
        if not (len(versions) == len(losses) == len(parents)) or \
                not all(math.isfinite(x) for x in losses):
            raise LocalProtocolError("finished: versions, losses and parents must match")
        b.versions, b.losses, b.tasks, b.worker_s = list(versions), list(losses), tasks, \
            worker_s
        self.spent_tasks += tasks
        self.spent_worker_s += worker_s
        for i, (v, loss, p) in enumerate(zip(versions, losses, parents, strict=True)):
            self.nodes[v] = Node(v, p, loss, b.depth + i + 1, b.id)
            if self.best is None or loss < self.best[0]:
                self.best = (loss, v)
                self.trace.append((self.spent_tasks, loss))
        if not versions:  # every round's deltas refused: the rung made nothing
            b.status, b.note = "stopped", "no round produced a version"
            self.advisor.close(b.trial, "fail", None)
            return self._reflect(b, "stop", b.note, None)
        loss = losses[-1]
        rung = b.end_depth // self.goal.rounds_per_rung
        self.rung_losses.setdefault(rung, []).append((loss, dict(b.params)))
        prune = self.advisor.report(b.trial, b.end_depth, loss)
        target = self.goal.target
        if target is not None and self.best is not None and self.best[0] <= target:
            b.status = "done"
            self.advisor.close(b.trial, "complete", loss)
            self.finished_reason = f"target {target:g} reached"
            self._close_open_trials()
            return self._reflect(b, "target", f"loss {self.best[0]:.4f} <= target {target:g}",
                                 rung)
        if prune:
            b.status, b.note = "stopped", self._why_pruned(rung, loss)
            self.advisor.close(b.trial, "pruned", loss)
            return self._reflect(b, "stop", b.note, rung)
        if b.start_loss is not None and loss >= b.start_loss:
            b.status, b.note = "stopped", (f"no gain: {loss:.4f} >= its start's "
                                           f"{b.start_loss:.4f}")
            self.advisor.close(b.trial, "complete", loss)
            why = b.note
            # A plateau: the lr is too high for this stage of training. Its start version
            # is tried again with the lr one annealing step down (down to the range's
            # low end, at most MAX_PLATEAUS times per start), queued in decision order
            # like a continuation: with branches side by side, a kept branch decided
            # earlier does not wait behind a stalled one.
            stepped = self._lr_step(b.params) if b.plateaus < MAX_PLATEAUS else None
            if stepped is not None:
                trial, params = self.advisor.new_trial(stepped)
                retry = self._branch("exploit", trial, b.start, b.start_loss, b.depth,
                                     params, b.parent)
                retry.anneals, retry.carried = b.anneals + 1, b.carried
                retry.plateaus, retry.retry_of = b.plateaus + 1, b.id
                self.queue.append(retry)
                why += (f"; a plateau: branch {retry.id} goes on from its start with lr "
                        f"{float(b.params['lr']):.4g} -> {float(params['lr']):.4g} "
                        f"(annealing)")
            return self._reflect(b, "stop", why, rung)
        b.status = "done"
        annealed = self._annealed(b)
        if annealed is None:
            nxt = self._branch("continue", b.trial, versions[-1], loss, b.end_depth,
                               b.params, b.id)
            how = "goes on from it"
        else:
            # A new setting is a new trial: the pruner compares settings, not lr schedules.
            self.advisor.close(b.trial, "complete", loss)
            trial, params = self.advisor.new_trial(annealed)
            nxt = self._branch("exploit", trial, versions[-1], loss, b.end_depth, params,
                               b.id)
            nxt.anneals += 1
            how = f"goes on from it with lr x{ANNEAL:g} (late in the budget: annealing)"
        self.queue.append(nxt)
        return self._reflect(b, "continue", f"kept at rung {rung} (top 1/"
                                           f"{self.goal.reduction_factor}): branch "
                                           f"{nxt.id} {how}", rung)

    def progress(self) -> float:
        """The fraction of the tightest budget spent or reserved by running branches."""
        g, tasks = self.goal, self.spent_tasks + self._reserved()
        parts = [0.0]
        if g.budget_tasks is not None:
            parts.append(tasks / g.budget_tasks)
        if g.budget_reward is not None:
            parts.append(tasks * g.reward_per_task / g.budget_reward)
        if g.budget_worker_s is not None:
            parts.append(self._worker_s(self._reserved()) / g.budget_worker_s)
        return max(parts)

    def _annealed(self, b: Branch) -> dict[str, Any] | None:
        """Late in the budget, a kept branch's setting with its lr annealed (see
        ``_lr_step``); None when it goes on unchanged: early, nothing to anneal, or this
        search annealed its path MAX_ANNEALS times already (plateau steps count: the
        cap bounds how far one search lowers a path's lr, ANNEAL ** 3 = 0.51x)."""
        if self.progress() < LATE or b.anneals - b.carried >= MAX_ANNEALS:
            return None
        return self._lr_step(b.params)

    def _lr_step(self, params: Mapping[str, Any]) -> dict[str, Any] | None:
        """``params`` with the lr one annealing step down (x ANNEAL, not below the goal's
        range); None when lr is not a searched range or is at its low end."""
        d = next((d for d in self.goal.searched if d.name == "lr"), None)
        if d is None or d.kind != "range" or "lr" not in params:
            return None
        lr = max(d.low, float(params["lr"]) * ANNEAL)
        return None if lr >= float(params["lr"]) else {**params, "lr": lr}

    def lost(self, branch: int, reason: str, tasks: int = 0, worker_s: float = 0.0
             ) -> dict[str, Any]:
        """The branch's job failed (its workers vanished, a refusal): planned again once
        from the same version, then dropped."""
        b = self._running(branch)
        self.spent_tasks += tasks
        self.spent_worker_s += worker_s
        if b.tries < MAX_TRIES and not self.done:
            b.status, b.note, b.job = "planned", f"retry after: {reason}", None
            self.branches.pop(b.id)
            self.queue.insert(0, b)
            return self._reflect(b, "retry", reason, None)
        b.status, b.note = "failed", reason
        self.advisor.close(b.trial, "fail", None)
        return self._reflect(b, "drop", f"lost {b.tries} times: {reason}", None)

    def stop(self, reason: str) -> None:
        """End the search (the user's ``agent stop``): nothing more is planned."""
        if not self.done:
            self.finished_reason = reason
        self._close_open_trials()

    def abandon(self) -> None:
        """The search has ended: branches still running are no longer waited on (their
        jobs run out on their own); their trials end as failed."""
        for b in self.running:
            b.status, b.note = "stopped", f"the search ended: {self.finished_reason}"
            self.advisor.close(b.trial, "fail", None)

    # -- helpers --------------------------------------------------------------------------

    def _running(self, branch: int) -> Branch:
        b = self.branches.get(branch)
        if b is None or b.status != "running":
            raise LocalProtocolError(f"branch {branch} is not running")
        return b

    def _drop(self, b: Branch, why: str) -> None:
        """A planned branch that will not run. A continuation's trial ends complete at its
        last rung's loss; any other trial never ran, so it failed."""
        b.status, b.note = "stopped", why
        self.branches[b.id] = b
        if b.kind == "continue" and b.parent is not None:
            self.advisor.close(b.trial, "complete", self.branches[b.parent].loss)
        else:
            self.advisor.close(b.trial, "fail", None)

    def _close_open_trials(self) -> None:
        for b in self.queue:
            self._drop(b, self.finished_reason or "the search ended")
        self.queue.clear()

    def _why_pruned(self, rung: int, loss: float) -> str:
        peers = sorted(x for x, _ in self.rung_losses.get(rung, []))
        keep = max(1, len(peers) // self.goal.reduction_factor)
        cutoff = peers[keep - 1]
        return (f"below the top 1/{self.goal.reduction_factor} at rung {rung}: loss "
                f"{loss:.4f}, cutoff {cutoff:.4f} of {len(peers)}")

    def _reflect(self, b: Branch, decision: str, why: str, rung: int | None
                 ) -> dict[str, Any]:
        moved: dict[str, list[Any]] = {}
        # A plateau retry moved from the branch it retries; another exploit from its parent.
        was = b.retry_of if b.retry_of is not None else b.parent
        if was is not None and b.kind == "exploit":
            before = self.branches[was].params
            moved = {k: [before.get(k), v] for k, v in b.params.items() if before.get(k) != v}
        narrowed = self._narrow(rung) if rung is not None else {}
        record = {"n": len(self.reflections) + 1, "branch": b.id, "kind": b.kind,
                  "rung": rung, "decision": decision, "why": why, "loss": b.loss,
                  "curve": list(b.losses), "moved": moved, "narrowed": narrowed,
                  "peers": sorted(x for x, _ in self.rung_losses.get(rung, []))
                  if rung is not None else [],
                  "spent_tasks": self.spent_tasks,
                  "best": self.best[0] if self.best else None}
        self.reflections.append(record)
        return record

    def _narrow(self, rung: int) -> dict[str, list[float]]:
        """The explore ranges shrink to the span of the rung's best settings (the top
        1/eta, with a perturbation step of room); returned when they moved."""
        results = sorted(self.rung_losses.get(rung, []), key=lambda r: r[0])
        if len(results) < NARROW_MIN:
            return {}
        top = results[:max(2, len(results) // self.goal.reduction_factor)]
        out: dict[str, list[float]] = {}
        for name, (lo, hi) in self.bounds.items():
            xs = [float(p[name]) for _, p in top if name in p]
            if not xs:
                continue
            new = (max(lo, min(xs) * PERTURB[0]), min(hi, max(xs) * PERTURB[1]))
            if new[0] < new[1] and new != (lo, hi):
                self.bounds[name] = new
                out[name] = [new[0], new[1]]
        return out

    # -- results --------------------------------------------------------------------------

    def optimal_path(self) -> list[Node]:
        """The versions from a start point to the best version found, in order."""
        if self.best is None:
            return []
        path, v = [], self.best[1]
        seen: set[str] = set()
        while v in self.nodes and v not in seen:
            seen.add(v)
            node = self.nodes[v]
            path.append(node)
            if node.parent is None:
                break
            v = node.parent
        return path[::-1]

    def tasks_to_reach(self, loss: float) -> int | None:
        """Tasks spent when the search first held a version of at most ``loss``."""
        return next((t for t, x in self.trace if x <= loss), None)

    def to_dict(self) -> dict[str, Any]:
        """The search as JSON-ready data: what the agent stores and shows."""
        return {
            "branches": [asdict(b) for b in sorted(
                [*self.branches.values(), *self.queue], key=lambda b: b.id)],
            "nodes": [asdict(n) for n in self.nodes.values()],
            "path": [n.version for n in self.optimal_path()],
            "best": {"loss": self.best[0], "version": self.best[1]} if self.best else None,
            "reflections": self.reflections, "trace": [list(t) for t in self.trace],
            "spent": {"tasks": self.spent_tasks, "worker_s": round(self.spent_worker_s, 3)},
            "bounds": {k: list(v) for k, v in self.bounds.items()},
            "priced": dict(self.priced),
            "finished": self.finished_reason,
        }
