"""The search's advisor: Optuna's ask-and-tell interface, TPE sampler and successive-
halving pruner over one goal's space (protocol.agentsearch.Advisor).

Optuna does what it does well here (sampling from the trials so far, pruning at rungs,
keeping every trial in sqlite); protocol/agentsearch adds what it lacks: branching from a
parent version and PBT's exploit/explore, which arrive here as trials with fixed params.
Optuna's calls are synchronous and short (a few ms on sqlite): they run on the trio
thread, between the agent's awaits.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import optuna
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)
from optuna.trial import TrialState, create_trial

from protocol.agentgoal import Goal
from protocol.agentsearch import priced

optuna.logging.set_verbosity(optuna.logging.WARNING)
log = logging.getLogger(__name__)

_STATES = {"complete": TrialState.COMPLETE, "pruned": TrialState.PRUNED,
           "fail": TrialState.FAIL}


def distributions(goal: Goal) -> dict[str, BaseDistribution]:
    out: dict[str, BaseDistribution] = {}
    for d in goal.searched:
        if d.kind == "choice":
            out[d.name] = CategoricalDistribution(list(d.values))
        elif d.integer:
            out[d.name] = IntDistribution(int(d.low), int(d.high), log=d.log)
        else:
            out[d.name] = FloatDistribution(d.low, d.high, log=d.log)
    return out


class OptunaAdvisor:
    """One Optuna study per search, over the space the goal's budget prices (as the
    search machine sees it: protocol.agentsearch.priced). ``storage``: an Optuna storage
    URL (``sqlite:///<home>/agent/optuna.db``), or None for memory (tests, --sim)."""

    def __init__(self, goal: Goal, study: str, *, seed: int, storage: str | None = None
                 ) -> None:
        goal = priced(goal)
        self.dists = distributions(goal)
        sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=max(2, min(
            goal.population, 4)))
        pruner = optuna.pruners.SuccessiveHalvingPruner(
            min_resource=goal.rounds_per_rung, reduction_factor=goal.reduction_factor)
        self.study = optuna.create_study(study_name=study, storage=storage, sampler=sampler,
                                         pruner=pruner, direction="minimize",
                                         load_if_exists=True)
        self.fixed = {d.name: d.values[0] for d in goal.space if d.kind == "fixed"}
        self.trials: dict[int, optuna.Trial] = {}
        self.priors = 0

    def add_prior(self, params: Mapping[str, Any], step: int, loss: float) -> bool:
        """A trial from memory (an earlier branch, a round record on the chain), as a
        completed trial: TPE samples near the good ones. False when outside the space."""
        chosen = {k: params[k] for k in self.dists if k in params}
        if len(chosen) != len(self.dists) or any(
                not self.dists[k]._contains(self.dists[k].to_internal_repr(v))
                for k, v in chosen.items()):
            return False
        self.study.add_trial(create_trial(params=chosen, distributions=self.dists,
                                          value=loss, intermediate_values={step: loss}))
        self.priors += 1
        return True

    def new_trial(self, params: Mapping[str, Any] | None) -> tuple[int, dict[str, Any]]:
        """RuntimeError (the trial told failed) when ``params`` were queued but ask()
        returned another waiting trial: something else enqueued into this study, and every
        setting after it would be one call out of step."""
        wanted = None if params is None else {k: params[k] for k in self.dists}
        if wanted is not None:
            self.study.enqueue_trial(wanted, skip_if_exists=False)
        trial = self.study.ask(self.dists)
        if wanted is not None and trial.params != wanted:
            self.study.tell(trial, None, state=TrialState.FAIL)
            raise RuntimeError(f"optuna study {self.study.study_name}: trial "
                               f"{trial.number} has {trial.params}, not the queued "
                               f"{wanted}")
        self.trials[trial.number] = trial
        return trial.number, {**self.fixed, **trial.params}

    def report(self, trial: int, step: int, loss: float) -> bool:
        t = self.trials[trial]
        t.report(loss, step)
        return bool(t.should_prune())

    def close(self, trial: int, state: str, loss: float | None) -> None:
        t = self.trials.pop(trial, None)
        if t is None:
            return
        if state == "complete" and loss is None:
            state = "fail"
        self.study.tell(t, loss if state == "complete" else None, state=_STATES[state])
