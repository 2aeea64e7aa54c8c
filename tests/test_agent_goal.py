"""Goal files and sentences (protocol/agentgoal.py, protocol/agentnl.py): every field
checked as job specs are, the bad one named; round trips; the sentence forms."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.agentgoal import (
    GoalError,
    doc_to_toml,
    goal_from_toml_dict,
    goal_to_toml,
    parse_goal_toml,
)
from protocol.agentnl import SentenceError, parse_sentence, sentence_doc
from protocol.jobspec import parse_job_toml

BASE = "ab" * 32
DATA = "cd" * 32
EXAMPLE = Path(__file__).resolve().parent.parent / "bootstrap" / "agent" / "goal.example.toml"


def valid_doc() -> dict[str, Any]:
    return {"name": "g", "base_model": BASE, "dataset": DATA,
            "objective": {"target": 1.6}, "budget": {"tasks": 40},
            "search": {"population": 4, "parallel": 2},
            "space": {"lr": {"low": 1e-4, "high": 1e-2, "log": True},
                      "inner_steps": [20, 50], "workers_per_round": 2},
            "train": {"seq_len": 64}, "data": {"heldout_fraction": 0.05}}


def test_the_example_goal_parses_and_round_trips() -> None:
    text = EXAMPLE.read_text()
    goal = parse_goal_toml(text.replace("<64 hex: the model version to start from>", BASE)
                           .replace("<64 hex: the dataset version>", DATA))
    assert parse_goal_toml(goal_to_toml(goal)) == goal
    assert goal.budget_tasks and goal.searched


@pytest.mark.parametrize(("space", "most"), [
    (2, 2), ([2, 1], 2), ([1, 3, 2], 3), ({"low": 1, "high": 4}, 4)])
def test_the_most_workers_a_round_is_the_largest_the_space_allows(space: Any,
                                                                   most: int) -> None:
    """What sizes how many branches fit on the workers there are: the largest choice,
    wherever it is listed (the last one was taken before), or the range's high end."""
    doc = valid_doc()
    doc["space"]["workers_per_round"] = space
    assert goal_from_toml_dict(doc).most_workers_per_round() == most


@pytest.mark.parametrize(("change", "field"), [
    (lambda d: d.pop("base_model"), "base_model"),
    (lambda d: d.update(base_model="xyz"), "base_model"),
    (lambda d: d.update(dataset=[1]), "dataset"),
    (lambda d: d.update(colour="red"), "colour"),
    (lambda d: d.pop("budget"), "budget"),
    (lambda d: d["budget"].update(tasks=0), "budget.tasks"),
    (lambda d: d["budget"].update(tasks=True), "budget.tasks"),
    (lambda d: d["budget"].update(coins=3), "budget.coins"),
    (lambda d: d["objective"].update(metric="accuracy"), "objective.metric"),
    (lambda d: d["objective"].update(target=float("nan")), "objective.target"),
    (lambda d: d["space"].update(lr={"low": -1.0, "high": 1e-2}), "space.lr.low"),
    (lambda d: d["space"].update(lr={"low": 1e-2, "high": 1e-3}), "space.lr"),
    (lambda d: d["space"].update(lr={"low": 1e-3}), "space.lr.high"),
    (lambda d: d["space"].update(lr={"low": 1e-3, "high": 11.0}), "space.lr.high"),
    (lambda d: d["space"].update(lr={"low": 1e-3, "high": 0.1, "step": 2}), "space.lr.step"),
    (lambda d: d["space"].update(inner_steps=[20, 20]), "space.inner_steps"),
    (lambda d: d["space"].update(inner_steps=[20, 0]), "space.inner_steps[1]"),
    (lambda d: d["space"].update(delta_bits=[8, 5]), "space.delta_bits[1]"),
    (lambda d: d["space"].update(delta_bits={"low": 4, "high": 8}), "space.delta_bits"),
    (lambda d: d["space"].update(outer_momentum=1.0), "space.outer_momentum"),
    (lambda d: d["space"].update(seq_len=[32, 64]), "space.seq_len"),
    (lambda d: d["train"].update(rounds=3), "train.rounds"),
    (lambda d: d["train"].update(lr=0.1), "train.lr"),  # also in [space]
    (lambda d: d["train"].update(seq_len=0), "train.seq_len"),
    (lambda d: d["data"].update(heldout_fraction=0.9), "data.heldout_fraction"),
    (lambda d: d.update(requirements={"device": "cpu", "min_vram_gb": 8}),
     "requirements.min_vram_gb"),
    (lambda d: d["search"].update(population=0), "search.population"),
    (lambda d: d["search"].update(reduction_factor=1), "search.reduction_factor"),
    (lambda d: d.update(search=3), "search"),
])
def test_a_bad_field_is_named(change: Any, field: str) -> None:
    doc = valid_doc()
    change(doc)
    with pytest.raises(GoalError) as info:
        goal_from_toml_dict(doc)
    assert info.value.field == field, str(info.value)
    assert str(info.value).startswith(f"{field}: ") and "\n" not in str(info.value)


def test_toml_syntax_errors_are_named() -> None:
    with pytest.raises(GoalError, match=r"^toml: "):
        parse_goal_toml("name = [")


# --- property tests -----------------------------------------------------------------------

_ranges = {
    "lr": st.tuples(st.floats(1e-5, 1e-2), st.floats(1.1, 100.0)).map(
        lambda t: {"low": t[0], "high": t[0] * t[1], "log": True}),
    "outer_lr": st.tuples(st.floats(0.05, 1.0), st.floats(0.01, 1.0)).map(
        lambda t: {"low": t[0], "high": t[0] + t[1]}),
    "outer_momentum": st.sampled_from([0.0, 0.5, 0.9]),
    "inner_steps": st.one_of(
        st.lists(st.integers(1, 500), min_size=1, max_size=5, unique=True),
        st.tuples(st.integers(1, 100), st.integers(1, 400)).map(
            lambda t: {"low": t[0], "high": t[0] + t[1]})),
    "batch_size": st.one_of(st.integers(1, 64), st.tuples(st.integers(1, 8),
                            st.integers(1, 64)).map(lambda t: {"low": t[0],
                                                               "high": t[0] + t[1]})),
    "delta_bits": st.sampled_from([8, 4, [8, 4]]),
    "workers_per_round": st.one_of(
        st.integers(1, 8),
        st.lists(st.integers(1, 8), min_size=1, max_size=4, unique=True),
        st.tuples(st.integers(1, 4), st.integers(1, 4)).map(
            lambda t: {"low": t[0], "high": t[0] + t[1]})),
}


@st.composite
def goal_docs(draw: st.DrawFn) -> dict[str, Any]:
    doc: dict[str, Any] = {"name": draw(st.text("abc -_", min_size=1, max_size=20)
                                        .map(str.strip).filter(bool)),
                           "base_model": BASE, "dataset": DATA}
    budget = draw(st.fixed_dictionaries({}, optional={
        "tasks": st.integers(1, 10_000), "worker_seconds": st.floats(1, 1e6),
        "reward_pool": st.integers(1, 10**9)}))
    doc["budget"] = budget or {"tasks": 10}
    if draw(st.booleans()):
        doc["objective"] = {"target": draw(st.floats(0.1, 10))}
    doc["space"] = draw(st.fixed_dictionaries({}, optional=_ranges)) or {"lr": 0.01}
    doc["search"] = draw(st.fixed_dictionaries({}, optional={
        "population": st.integers(1, 16), "parallel": st.integers(1, 8),
        "rounds_per_rung": st.integers(1, 5), "reduction_factor": st.integers(2, 4)}))
    return doc


@settings(max_examples=50, deadline=None)
@given(goal_docs(), st.data())
def test_valid_goals_round_trip_and_every_point_is_a_valid_job(doc: dict[str, Any],
                                                                 data: st.DataObject) -> None:
    goal = goal_from_toml_dict(doc)
    assert parse_goal_toml(goal_to_toml(goal)) == goal
    params = {}
    for d in goal.searched:
        if d.kind == "choice":
            params[d.name] = data.draw(st.sampled_from(d.values))
        elif d.integer:
            params[d.name] = data.draw(st.integers(int(d.low), int(d.high)))
        else:
            params[d.name] = data.draw(st.floats(d.low, d.high))
    job = goal.job_doc(name="b", base=BASE, params=params, rounds=goal.rounds_per_rung)
    spec = parse_job_toml(doc_to_toml(job))  # what the node's `job submit` checks
    for name, value in params.items():
        assert getattr(spec, name) == value
    assert spec.rounds == goal.rounds_per_rung


_junk = st.one_of(st.none(), st.booleans(), st.integers(-10**20, 10**20), st.floats(),
                  st.text(max_size=70), st.lists(st.integers(), max_size=3),
                  st.dictionaries(st.text(max_size=5), st.integers(), max_size=2))


@settings(max_examples=60, deadline=None)
@given(goal_docs(), st.data(), _junk)
def test_a_changed_field_is_refused_by_name_or_taken(doc: dict[str, Any],
                                                      data: st.DataObject, junk: Any) -> None:
    paths = [k for k in doc if not isinstance(doc[k], dict)] + [
        f"{k}.{s}" for k, v in doc.items() if isinstance(v, dict) for s in v]
    path = data.draw(st.sampled_from(sorted(paths)))
    table, _, key = path.rpartition(".")
    (doc[table] if table else doc)[key] = junk
    try:
        goal_from_toml_dict(doc)
    except GoalError as exc:
        # The field named is the one changed, or a part of it (space.lr.low), or, when
        # junk happened to be valid, a rule across fields.
        assert exc.field.split("[")[0].startswith(path.split(".")[0]), (path, str(exc))


# --- sentences ----------------------------------------------------------------------------

_clauses = {
    "target": st.floats(0.5, 9.5).map(lambda x: round(x, 3)).map(
        lambda x: (f"to loss {x}", ("objective", "target", x))),
    "tasks": st.integers(1, 5000).map(lambda n: (f"within {n} tasks", ("budget", "tasks", n))),
    "workers": st.integers(1, 16).map(
        lambda n: (f"with {n} workers per round", ("train", "workers_per_round", n))),
    "parallel": st.integers(1, 8).map(
        lambda n: (f"{n} branches at once", ("search", "parallel", n))),
    "seed": st.integers(0, 1000).map(lambda n: (f"seed {n}", ("search", "seed", n))),
}


@settings(max_examples=100, deadline=None)
@given(st.lists(st.sampled_from(sorted(_clauses)), unique=True).map(
    lambda names: ["tasks", *[n for n in names if n != "tasks"]]), st.data(),
    st.sampled_from([" ", ", ", " and "]))
def test_sentences_in_any_order_give_their_fields(names: list[str], data: st.DataObject,
                                                  joiner: str) -> None:
    parts = [data.draw(_clauses[n]) for n in names]
    order = data.draw(st.permutations(parts))
    text = "train gpt-tiny on stdlib " + joiner.join(c for c, _ in order)
    names_known = {"model:gpt-tiny": BASE, "dataset:stdlib": DATA}
    goal = parse_sentence(text, names_known)
    doc = sentence_doc(text, names_known)
    for _, (table, key, value) in parts:
        assert doc[table][key] == value
    assert goal.base_models == (BASE,) and goal.dataset == DATA


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))
def test_any_text_is_a_goal_or_refused_in_one_line(text: str) -> None:
    try:
        parse_sentence(text, {"model:m": BASE, "dataset:d": DATA})
    except (SentenceError, GoalError) as exc:
        assert str(exc)


@pytest.mark.parametrize(("text", "why"), [
    ("make me a model", "expected"),
    (f"train {BASE} on {DATA}", "no budget"),
    (f"train {BASE} on {DATA} within 40 tasks within 50 tasks", "twice"),
    (f"train {BASE} on {DATA} within 40 tasks quickly", "not understood: 'quickly'"),
    (f"train llama on {DATA} within 40 tasks", "model 'llama'"),
    (f"train {BASE} on {DATA} within 40 tasks to loss 500", "objective.target"),
])
def test_sentences_refused_say_why(text: str, why: str) -> None:
    with pytest.raises((SentenceError, GoalError), match=why):
        parse_sentence(text)


def test_the_sentence_of_the_issue() -> None:
    goal = parse_sentence("train gpt-tiny on python-stdlib to loss 1.6 within 40 tasks",
                          {"model:gpt-tiny": BASE, "dataset:python-stdlib": DATA})
    assert (goal.target, goal.budget_tasks) == (1.6, 40)
    assert tomllib.loads(goal_to_toml(goal))["budget"]["tasks"] == 40


def test_the_cli_names_the_bad_field_before_asking_a_node(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from node.cli.app import main

    bad = tmp_path / "goal.toml"
    bad.write_text(f'base_model = "{BASE}"\ndataset = "{DATA}"\n[budget]\ntasks = 0\n')
    for args, why in (([str(bad)], "budget.tasks: expected an integer in [1, 1000000]"),
                      (["--goal", f"train {BASE} on {DATA} within 40 tasks slowly"],
                       "not understood: 'slowly'"),
                      ([], "give a goal file or --goal")):
        code = main(["agent", "run", *args, "--home", str(tmp_path / "no-node")])
        (line,) = capsys.readouterr().err.strip().splitlines()
        assert code == 1 and line.startswith("iollm: error: ") and why in line, line
