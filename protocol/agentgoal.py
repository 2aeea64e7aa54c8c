"""Agent goals: the TOML file (or sentence) a model designer writes, parsed and checked.

See specs/agent.md, "Goal file" (normative). A goal names what to train (base model
version, dataset), the objective (the dataset's held-out loss, with an optional target),
a budget (micro-tasks, worker-seconds, or reward units spent through the branch jobs'
pools), the search space over the job spec's train fields, the search's own settings, and
the fixed job fields every branch shares (the job spec's own tables).

Every value is checked as job specs are: a search range's ends and a fixed value go
through the job spec's own field checks (protocol.jobspec), so a goal can never plan a job
that ``job submit`` would refuse. Errors name the field by its TOML path, one line:
``space.lr.low: expected a finite number in (0, 10], got -1``.

This module imports the standard library and protocol/ only.
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from protocol.jobspec import (
    BY_PATH,
    JobSpec,
    JobSpecError,
    _from_toml,
    _show,
    spec_from_toml_dict,
)

MAX_GOAL_NAME = 100
MAX_TASK_BUDGET = 1_000_000
MAX_POPULATION = 256
MAX_PARALLEL = 64
MAX_ROUNDS_PER_RUNG = 1000
MAX_CHOICES = 32
MAX_BASES = 16
OBJECTIVES: tuple[str, ...] = ("heldout_loss",)

# The job spec's train fields a goal may search, with their TOML path in a job file.
SEARCHABLE: dict[str, str] = {
    "lr": "train.lr", "outer_lr": "train.outer_lr", "outer_momentum": "train.outer_momentum",
    "inner_steps": "train.inner_steps", "batch_size": "train.batch_size",
    "delta_bits": "train.delta_bits", "workers_per_round": "train.workers_per_round",
}
# The default space: what a goal without [space] searches (around the example job's
# values, bootstrap/jobs/example.toml).
DEFAULT_SPACE: dict[str, Any] = {
    "lr": {"low": 1e-3, "high": 1e-2, "log": True},
    "outer_lr": {"low": 0.3, "high": 1.0},
    "inner_steps": [20, 30, 50],
}
# Job fields without a job-spec default, fixed at the example job's values unless the
# goal searches or fixes them; the other train fields keep the job spec's defaults.
FALLBACK: dict[str, Any] = {"workers_per_round": 3, "inner_steps": 50}
# Job-spec tables a goal may fix for every branch (the job spec's own checks apply).
JOB_TABLES: tuple[str, ...] = ("train", "data", "requirements", "checks", "timeouts", "rewards")
# Fields of those tables the agent sets itself.
AGENT_SET: frozenset[str] = frozenset({"train.rounds", "rewards.pool"})


class GoalError(JobSpecError):
    """A goal is invalid; ``field`` is its TOML path, ``str()`` is ``"<field>: <message>"``."""


@dataclass(frozen=True)
class Dim:
    """One searched field: a fixed value, a list of choices, or a range [low, high]."""

    name: str  # the JobSpec attribute: "lr"
    kind: str  # "fixed" | "choice" | "range"
    values: tuple[Any, ...] = ()  # fixed: one value; choice: the choices
    low: float = 0.0
    high: float = 0.0
    log: bool = False
    integer: bool = False

    def contains(self, value: Any) -> bool:
        if self.kind in ("fixed", "choice"):
            return value in self.values
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        return self.low <= value <= self.high and (not self.integer or value == int(value))

    def middle(self) -> Any:
        """The middle choice, or the middle of the range (geometric on a log scale)."""
        if self.kind != "range":
            return self.values[len(self.values) // 2]
        x = math.sqrt(self.low * self.high) if self.log else (self.low + self.high) / 2
        return round(x) if self.integer else x

    def to_toml(self) -> Any:
        if self.kind == "fixed":
            return self.values[0]
        if self.kind == "choice":
            return list(self.values)
        if self.integer:
            return {"low": int(self.low), "high": int(self.high), "log": self.log}
        return {"low": self.low, "high": self.high, "log": self.log}


@dataclass(frozen=True)
class Goal:
    """A checked goal. ``template`` holds the fixed job-spec tables (TOML form)."""

    name: str
    base_models: tuple[str, ...]  # hex version ids; the search starts from each
    dataset: str
    objective: str
    target: float | None
    budget_tasks: int | None
    budget_worker_s: float | None
    budget_reward: int | None
    reward_per_task: int
    space: tuple[Dim, ...]
    population: int
    parallel: int
    rounds_per_rung: int
    reduction_factor: int
    seed: int
    template: dict[str, Any] = field(default_factory=dict)

    def dim(self, name: str) -> Dim:
        return next(d for d in self.space if d.name == name)

    @property
    def searched(self) -> tuple[Dim, ...]:
        return tuple(d for d in self.space if d.kind != "fixed")

    def most_workers_per_round(self) -> int:
        """The most workers a round of any branch may ask: what sizes the branches that
        can run side by side on the workers there are."""
        d = self.dim("workers_per_round")
        return int(d.high if d.kind == "range" else max(d.values))

    def key(self) -> str:
        """What makes two searches comparable: base, dataset and the evaluation set
        (the held-out split, windows and sizes every branch's loss is measured on)."""
        data = self.template.get("data", {})
        train = self.template.get("train", {})
        checks = self.template.get("checks", {})
        parts = [",".join(sorted(self.base_models)), self.dataset, self.objective,
                 repr(data.get("heldout_fraction", BY_PATH["data.heldout_fraction"].default)),
                 repr(train.get("seq_len", BY_PATH["train.seq_len"].default)),
                 repr(train.get("seed", BY_PATH["train.seed"].default)),
                 repr(checks.get("eval_batches", BY_PATH["checks.eval_batches"].default))]
        return "/".join(parts)

    def incumbent(self) -> dict[str, Any]:
        """The setting a designer would run without a search: each searched field at the
        job spec's default (or FALLBACK's, the example job's), where the space holds it;
        else at the middle of its range or choices."""
        out: dict[str, Any] = {}
        for d in self.searched:
            spec_field = BY_PATH[SEARCHABLE[d.name]]
            default = FALLBACK.get(d.name, None if spec_field.required else
                                   spec_field.default)
            out[d.name] = default if default is not None and d.contains(default) \
                else d.middle()
        return out

    def job_doc(self, *, name: str, base: str, params: Mapping[str, Any], rounds: int
                ) -> dict[str, Any]:
        """The job file (TOML document) of one branch: the template, the fixed and chosen
        values of the space, the rounds of one rung, the pool its tasks may spend."""
        doc: dict[str, Any] = {t: dict(v) for t, v in self.template.items()}
        doc["name"], doc["base_model"], doc["dataset"] = name, base, self.dataset
        values = {d.name: d.values[0] for d in self.space if d.kind == "fixed"}
        values.update(params)
        for attr, value in values.items():
            section, key = SEARCHABLE[attr].split(".")
            doc.setdefault(section, {})[key] = value
        doc.setdefault("train", {})["rounds"] = rounds
        wpr = int(values["workers_per_round"])
        if self.budget_reward is not None:
            doc.setdefault("rewards", {})["pool"] = self.reward_per_task * rounds * wpr
        return doc

    def job_spec(self, *, name: str, base: str, params: Mapping[str, Any], rounds: int
                 ) -> JobSpec:
        """The checked job spec of one branch (GoalError naming the field)."""
        try:
            return spec_from_toml_dict(self.job_doc(name=name, base=base, params=params,
                                                    rounds=rounds))
        except GoalError:
            raise
        except JobSpecError as exc:
            raise GoalError(exc.field, exc.message) from None


# --- parsing -----------------------------------------------------------------------------------

_TOP = {"name", "base_model", "dataset", "objective", "budget", "space", "search", *JOB_TABLES}
_OBJECTIVE = {"metric", "target"}
_BUDGET = {"tasks", "worker_seconds", "reward_pool", "reward_per_task"}
_SEARCH = {"population", "parallel", "rounds_per_rung", "reduction_factor", "seed"}
_RANGE = {"low", "high", "log"}


def _table(doc: Mapping[str, Any], key: str, allowed: set[str]) -> dict[str, Any]:
    value = doc.get(key, {})
    if not isinstance(value, dict):
        raise GoalError(key, f"expected a table, got {_show(value)}")
    for sub in value:
        if sub not in allowed:
            raise GoalError(f"{key}.{sub}", "unknown field")
    return value


def _int(path: str, raw: object, lo: int, hi: int) -> int:
    if isinstance(raw, bool) or not isinstance(raw, int) or not lo <= raw <= hi:
        raise GoalError(path, f"expected an integer in [{lo}, {hi}], got {_show(raw)}")
    return raw


def _positive(path: str, raw: object, hi: float = 1e12) -> float:
    ok = isinstance(raw, (int, float)) and not isinstance(raw, bool) and \
        math.isfinite(raw) and 0 < raw <= hi
    if not ok:
        raise GoalError(path, f"expected a number in (0, {hi:g}], got {_show(raw)}")
    return float(raw)  # type: ignore[arg-type]


def _id(path: str, raw: object) -> str:
    try:
        return str(_from_toml(BY_PATH["base_model"], raw).hex())
    except JobSpecError as exc:
        raise GoalError(path, exc.message) from None


def _checked(path: str, attr: str, raw: object) -> Any:
    """``raw`` through the job spec's check of the field ``attr``, named as ``path``."""
    try:
        value = _from_toml(BY_PATH[SEARCHABLE[attr]], raw)
    except JobSpecError as exc:
        raise GoalError(path, exc.message) from None
    return value


def _dim(attr: str, raw: object) -> Dim:
    path = f"space.{attr}"
    integer = BY_PATH[SEARCHABLE[attr]].kind in ("int", "bits")
    if isinstance(raw, list):
        if not 1 <= len(raw) <= MAX_CHOICES:
            raise GoalError(path, f"expected 1..{MAX_CHOICES} choices, got {len(raw)}")
        values = tuple(_checked(f"{path}[{i}]", attr, v) for i, v in enumerate(raw))
        if len(set(values)) != len(values):
            raise GoalError(path, "the choices repeat a value")
        return Dim(attr, "choice" if len(values) > 1 else "fixed", values, integer=integer)
    if isinstance(raw, dict):
        for sub in raw:
            if sub not in _RANGE:
                raise GoalError(f"{path}.{sub}", "unknown field (a range has low, high, log)")
        if attr == "delta_bits":
            raise GoalError(path, "expected a value or a list of choices (8 or 4)")
        for end in ("low", "high"):
            if end not in raw:
                raise GoalError(f"{path}.{end}", "missing")
        low = _checked(f"{path}.low", attr, raw["low"])
        high = _checked(f"{path}.high", attr, raw["high"])
        if not low < high:
            raise GoalError(path, f"expected low < high, got {_show(low)} and {_show(high)}")
        log = raw.get("log", False)
        if not isinstance(log, bool):
            raise GoalError(f"{path}.log", f"expected true or false, got {_show(log)}")
        if log and low <= 0:
            raise GoalError(f"{path}.low", "must be > 0 on a log scale")
        return Dim(attr, "range", (), float(low), float(high), log, integer)
    return Dim(attr, "fixed", (_checked(path, attr, raw),), integer=integer)


def goal_from_toml_dict(doc: Mapping[str, Any]) -> Goal:
    """A Goal from a parsed TOML document; GoalError naming the first bad field."""
    for key in doc:
        if key not in _TOP:
            raise GoalError(key, "unknown field")
    name = doc.get("name", "agent-goal")
    if not isinstance(name, str) or not 1 <= len(name) <= MAX_GOAL_NAME or \
            name != name.strip() or any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise GoalError("name", f"expected 1..{MAX_GOAL_NAME} printable characters, got "
                                f"{_show(name)}")
    if "base_model" not in doc:
        raise GoalError("base_model", "missing")
    raw_bases = doc["base_model"]
    if isinstance(raw_bases, list):
        if not 1 <= len(raw_bases) <= MAX_BASES:
            raise GoalError("base_model", f"expected 1..{MAX_BASES} version ids, got "
                                          f"{len(raw_bases)}")
        bases = tuple(_id(f"base_model[{i}]", b) for i, b in enumerate(raw_bases))
        if len(set(bases)) != len(bases):
            raise GoalError("base_model", "a version id is named twice")
    else:
        bases = (_id("base_model", raw_bases),)
    if "dataset" not in doc:
        raise GoalError("dataset", "missing")
    dataset = _id("dataset", doc["dataset"])

    obj = _table(doc, "objective", _OBJECTIVE)
    metric = obj.get("metric", "heldout_loss")
    if metric not in OBJECTIVES:
        raise GoalError("objective.metric", f"expected one of {', '.join(OBJECTIVES)}, got "
                                            f"{_show(metric)}")
    target = _positive("objective.target", obj["target"], 100.0) if "target" in obj else None

    budget = _table(doc, "budget", _BUDGET)
    tasks = _int("budget.tasks", budget["tasks"], 1, MAX_TASK_BUDGET) \
        if "tasks" in budget else None
    worker_s = _positive("budget.worker_seconds", budget["worker_seconds"]) \
        if "worker_seconds" in budget else None
    reward = _int("budget.reward_pool", budget["reward_pool"], 1, 2**62) \
        if "reward_pool" in budget else None
    per_task = _int("budget.reward_per_task", budget.get("reward_per_task", 1000), 1, 2**40)
    if tasks is None and worker_s is None and reward is None:
        raise GoalError("budget", "missing: give tasks, worker_seconds or reward_pool")

    search = _table(doc, "search", _SEARCH)
    population = _int("search.population", search.get("population", 4), 1, MAX_POPULATION)
    parallel = _int("search.parallel", search.get("parallel", 2), 1, MAX_PARALLEL)
    rung = _int("search.rounds_per_rung", search.get("rounds_per_rung", 1), 1,
                MAX_ROUNDS_PER_RUNG)
    eta = _int("search.reduction_factor", search.get("reduction_factor", 2), 2, 16)
    seed = _int("search.seed", search.get("seed", 0), 0, 2**32 - 1)

    space_doc = _table(doc, "space", set(SEARCHABLE))
    merged = dict(space_doc) if space_doc else dict(DEFAULT_SPACE)
    if "space" in doc and not space_doc:
        raise GoalError("space", "expected at least one field (or leave the table out)")
    template: dict[str, Any] = {}
    for table in JOB_TABLES:
        allowed = {p.split(".", 1)[1] for p in BY_PATH if p.startswith(table + ".")}
        values = _table(doc, table, allowed)
        for key in values:
            path = f"{table}.{key}"
            if path in AGENT_SET:
                raise GoalError(path, "set by the agent (each branch runs "
                                      "search.rounds_per_rung rounds; pools come from "
                                      "budget.reward_per_task)")
            attr = next((a for a, p in SEARCHABLE.items() if p == path), None)
            if attr is not None:
                if attr in space_doc:
                    raise GoalError(path, f"also given as space.{attr}; give it once")
                merged[attr] = values[key]  # a fixed job value is a fixed dimension
                continue
            template.setdefault(table, {})[key] = values[key]
    for attr, value in FALLBACK.items():
        merged.setdefault(attr, value)
    space = tuple(_dim(attr, merged[attr]) for attr in SEARCHABLE if attr in merged)
    goal = Goal(name=name, base_models=bases, dataset=dataset, objective=metric,
                target=target, budget_tasks=tasks, budget_worker_s=worker_s,
                budget_reward=reward, reward_per_task=per_task, space=space,
                population=population, parallel=parallel, rounds_per_rung=rung,
                reduction_factor=eta, seed=seed, template=template)
    # Every branch must be a job `job submit` takes: check the template with each end of
    # each range (the extremes are where a cross-field rule would bite).
    corners = [{d.name: (d.values[0] if d.kind != "range" else
                         (int(d.low) if d.integer else d.low)) for d in space},
               {d.name: (d.values[-1] if d.kind != "range" else
                         (int(d.high) if d.integer else d.high)) for d in space}]
    for params in corners:
        goal.job_spec(name=name, base=bases[0], params=params, rounds=rung)
    return goal


def parse_goal_toml(text: str) -> Goal:
    """Parse a goal file; GoalError naming the first bad field ("toml" for syntax)."""
    if not isinstance(text, str):
        raise GoalError("toml", "a goal file is text")
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise GoalError("toml", str(exc)) from None
    return goal_from_toml_dict(doc)


def goal_to_toml(goal: Goal) -> str:
    """The goal as a TOML file that :func:`parse_goal_toml` reads back to ``goal``."""
    lines = [f"name = {_toml_value(goal.name)}"]
    bases: Any = goal.base_models[0] if len(goal.base_models) == 1 else list(goal.base_models)
    lines.append(f"base_model = {_toml_value(bases)}")
    lines.append(f"dataset = {_toml_value(goal.dataset)}")
    tables: dict[str, dict[str, Any]] = {"objective": {"metric": goal.objective}}
    if goal.target is not None:
        tables["objective"]["target"] = goal.target
    budget: dict[str, Any] = {}
    if goal.budget_tasks is not None:
        budget["tasks"] = goal.budget_tasks
    if goal.budget_worker_s is not None:
        budget["worker_seconds"] = goal.budget_worker_s
    if goal.budget_reward is not None:
        budget["reward_pool"] = goal.budget_reward
    budget["reward_per_task"] = goal.reward_per_task
    tables["budget"] = budget
    tables["search"] = {"population": goal.population, "parallel": goal.parallel,
                        "rounds_per_rung": goal.rounds_per_rung,
                        "reduction_factor": goal.reduction_factor, "seed": goal.seed}
    tables["space"] = {d.name: d.to_toml() for d in goal.space}
    tables.update(goal.template)
    for table, values in tables.items():
        lines.append(f"\n[{table}]")
        lines.extend(f"{k} = {_toml_value(v)}" for k, v in values.items())
    return "\n".join(lines) + "\n"


def doc_to_toml(doc: Mapping[str, Any]) -> str:
    """A TOML document (scalars first, then one level of tables) as text: the branch job
    files the agent submits. tomllib reads; nothing in the standard library writes."""
    lines = [f"{k} = {_toml_value(v)}" for k, v in doc.items() if not isinstance(v, dict)]
    for table, values in doc.items():
        if isinstance(values, dict):
            lines.append(f"\n[{table}]")
            lines.extend(f"{k} = {_toml_value(v)}" for k, v in values.items())
    return "\n".join(lines) + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"no TOML form for {type(value).__name__}")
