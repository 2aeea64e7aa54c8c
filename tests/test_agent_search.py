"""The agent's search (protocol/agentsearch.py with Optuna as its advisor, driven by
node/agent/service.py) on a simulated objective, in trio's MockClock: budgets, parallel
branches, lost branches, the optimal path, reflections, and memory's warm start."""

from __future__ import annotations

import itertools
import random
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import optuna
import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from node.agent.advisor import OptunaAdvisor
from node.agent.picture import search_svg
from node.agent.service import Agent
from node.storage import open_storage
from protocol.agentgoal import Goal, goal_from_toml_dict, parse_goal_toml
from protocol.agentsearch import (
    ANNEAL,
    LATE,
    MAX_ANNEALS,
    MAX_PLATEAUS,
    WORK_FIELDS,
    Search,
    Start,
    priced,
)
from protocol.errors import LocalProtocolError
from tests.agentsim import BASE_LOSS, SimRunner
from tests.test_agent_goal import goal_docs

BASE = "ab" * 32
DATA = "cd" * 32


def goal_toml(budget: str, *, parallel: int, population: int, seed: int, space: str,
              top: str = "", extra: str = "") -> Goal:
    """The goals of these tests: one template; ``budget`` is its [budget] line, ``space``
    the [space] fields after lr, outer_lr and inner_steps."""
    return parse_goal_toml(f"""
base_model = "{BASE}"
dataset = "{DATA}"
{top}
[budget]
{budget}
[search]
population = {population}
parallel = {parallel}
seed = {seed}
[space]
lr = {{low = 1e-4, high = 3e-2, log = true}}
outer_lr = {{low = 0.2, high = 1.0}}
inner_steps = [20, 50]
{space}
{extra}""")


def goal(budget: int = 40, *, target: float | None = None, parallel: int = 2,
         population: int = 4, wpr: int = 2, extra: str = "") -> Goal:
    objective = f"[objective]\ntarget = {target}\n" if target is not None else ""
    return goal_toml(f"tasks = {budget}", parallel=parallel, population=population, seed=3,
                     space=f"workers_per_round = {wpr}", top=f'name = "sim"\n{objective}',
                     extra=extra)


def run_agent(tmp_path: Path, body: Callable[[Agent], Awaitable[Any]],
              runner: SimRunner, *, optuna_in_home: bool = False) -> Any:
    """``optuna_in_home``: the studies in sqlite under the home, as the daemon keeps
    them (slower: a commit per trial event); else in memory."""
    async def main() -> Any:
        async with open_storage(tmp_path / "node.db") as storage, \
                trio.open_nursery() as nursery:
            agent = Agent(storage, runner, clock_ms=lambda: int(trio.current_time() * 1000),
                          home=tmp_path if optuna_in_home else None)
            await nursery.start(agent.run)
            try:
                return await body(agent)
            finally:
                nursery.cancel_scope.cancel()

    return trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


async def search_to_end(agent: Agent, g: Goal) -> dict[str, Any]:
    sid = await agent.start(g)
    # No trio deadline here: under MockClock's autojump a deadline fires whenever every
    # task waits on the database thread. pytest-timeout bounds the test instead.
    await agent.ended(sid).wait()
    return agent.status(sid)


@pytest.mark.timeout(60)
def test_search_spends_its_budget_in_parallel_and_finds_a_path(tmp_path: Path) -> None:
    runner = SimRunner(DATA, [BASE], workers=4)
    d = run_agent(tmp_path, lambda a: search_to_end(a, goal(40)), runner)
    s = d["search"]
    assert d["status"] == "done" and s["finished"] == "budget spent"
    assert s["spent"]["tasks"] <= 40
    assert s["spent"]["tasks"] > 40 - 2  # a rung of 2 tasks fits until the end
    assert runner.max_running == 2  # 4 workers, 2 per round: two branches at once
    kinds = {b["kind"] for b in s["branches"]}
    assert {"fresh", "continue", "exploit"} <= kinds, kinds
    assert any(b["status"] == "stopped" for b in s["branches"])  # successive halving
    # A branch from a version some rounds deep goes on with the data schedule (and the
    # coordinator's outer momentum) of those rounds: train.first_round is its depth.
    for b in (b for b in s["branches"] if b["job"] is not None):  # None: never started
        train = runner.jobs[b["job"]]["doc"]["train"]
        assert train.get("first_round", 0) == b["depth"], b
    assert any(b["depth"] > 0 for b in s["branches"])
    # The optimal path goes from the base to the best version, each step a parent link,
    # and every loss on it is what the branch reported.
    nodes = {n["version"]: n for n in s["nodes"]}
    path = s["path"]
    assert path[0] == BASE and path[-1] == s["best"]["version"]
    for parent, child in itertools.pairwise(path):
        assert nodes[child]["parent"] == parent
    assert s["best"]["loss"] == min(n["loss"] for n in s["nodes"] if n["loss"] is not None)
    assert s["best"]["loss"] < BASE_LOSS - 1.5
    # Reflections: one per rung decision, with the evidence.
    assert len(s["reflections"]) == sum(1 for b in s["branches"] if b["status"] in
                                        ("done", "stopped") and b["losses"])
    stop = next(r for r in s["reflections"] if r["decision"] == "stop")
    assert stop["why"] and stop["peers"] and stop["curve"]
    assert any(r["moved"] for r in s["reflections"])  # explore moved a setting
    # The picture: a dot per version (+3 in the legend), the path's in the path colour,
    # the stopped branches' grey.
    from xml.etree import ElementTree

    from node.agent.picture import PATH_COLOUR, STOPPED_COLOUR

    circles = ElementTree.fromstring(search_svg(d)).findall(
        "{http://www.w3.org/2000/svg}circle")
    assert len(circles) == len(s["nodes"]) + 3
    fills = [c.get("fill") for c in circles[:-3]]
    assert fills.count(PATH_COLOUR) == len(path)
    stopped = {b["id"] for b in s["branches"] if b["status"] in ("stopped", "failed")}
    assert fills.count(STOPPED_COLOUR) == sum(
        1 for n in s["nodes"] if n["branch"] in stopped and n["version"] not in path)


@pytest.mark.timeout(60)
def test_the_studies_are_kept_in_sqlite_in_the_home(tmp_path: Path) -> None:
    runner = SimRunner(DATA, [BASE], workers=4)
    d = run_agent(tmp_path, lambda a: search_to_end(a, goal(6)), runner,
                  optuna_in_home=True)
    study = optuna.load_study(study_name=d["id"],
                              storage=f"sqlite:///{tmp_path / 'agent' / 'optuna.db'}")
    s = d["search"]
    assert len(study.trials) == len({b["trial"] for b in s["branches"]})
    assert min(t.value for t in study.trials if t.value is not None) == s["best"]["loss"]


@pytest.mark.timeout(60)
def test_target_ends_the_search_early(tmp_path: Path) -> None:
    runner = SimRunner(DATA, [BASE])
    d = run_agent(tmp_path, lambda a: search_to_end(a, goal(200, target=3.0)), runner)
    s = d["search"]
    assert s["finished"] == "target 3 reached"
    assert s["best"]["loss"] <= 3.0 and s["spent"]["tasks"] < 200


@pytest.mark.timeout(60)
def test_lost_branches_are_retried_then_dropped_and_never_block(tmp_path: Path) -> None:
    # Jobs 1 and 2 (branches 1 and 2) lose their workers; each is tried again, and the
    # second try of one of them (job 4) is lost too, so that branch is dropped.
    runner = SimRunner(DATA, [BASE], lose=frozenset({1, 2, 4}), workers=4)
    g = goal(24, extra="[train]\nseq_len = 64\n")

    async def body(agent: Agent) -> dict[str, Any]:
        return await search_to_end(agent, g)

    d = run_agent(tmp_path, body, runner)
    s = d["search"]
    by_id = {b["id"]: b for b in s["branches"]}
    # Jobs 1 and 2 end at the same simulated moment: which retry is job 4 is the order
    # trio runs them in.
    kept, dropped = sorted((by_id[1], by_id[2]), key=lambda b: b["status"] == "failed")
    assert kept["tries"] == 2 and kept["losses"], kept
    assert dropped["status"] == "failed" and dropped["tries"] == 2
    decisions = [r["decision"] for r in s["reflections"]]
    assert decisions.count("retry") == 2 and decisions.count("drop") == 1
    # What the lost tries spent counts against the budget, and the search still ended.
    assert s["finished"] == "budget spent" and s["spent"]["tasks"] <= 24
    assert s["best"] is not None


@pytest.mark.timeout(90)
def test_a_second_search_with_memory_reaches_the_first_best_with_fewer_tasks(
        tmp_path: Path) -> None:
    runner = SimRunner(DATA, [BASE], workers=4)
    g = goal(40)

    async def body(agent: Agent) -> tuple[dict[str, Any], dict[str, Any]]:
        first = await search_to_end(agent, g)
        second = await search_to_end(agent, g)
        return first, second

    first, second = run_agent(tmp_path, body, runner)
    best = first["search"]["best"]["loss"]
    assert second["memory"]["priors"] > 0 and second["memory"]["starts"]
    assert second["memory"]["starts"][0] == first["search"]["best"]["version"]

    def tasks_to_reach(doc: dict[str, Any], loss: float) -> int | None:
        return next((t for t, x in doc["search"]["trace"] if x <= loss), None)

    first_tasks = tasks_to_reach(first, best)
    second_tasks = tasks_to_reach(second, best)
    assert first_tasks is not None and second_tasks is not None
    assert second_tasks < first_tasks, (first_tasks, second_tasks)


@pytest.mark.timeout(60)
def test_stop_ends_a_running_search(tmp_path: Path) -> None:
    runner = SimRunner(DATA, [BASE])

    async def body(agent: Agent) -> dict[str, Any]:
        sid = await agent.start(goal(400))
        await trio.sleep(25)  # simulated: the first rungs are done
        d = await agent.stop(sid[:6])
        return d

    d = run_agent(tmp_path, body, runner)
    assert d["status"] == "stopped" and d["search"]["finished"] == "stopped by the user"
    assert d["search"]["spent"]["tasks"] < 400


# --- the machine alone, events in any order -----------------------------------------------


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_the_machine_keeps_its_budget_whatever_the_events(data: st.DataObject) -> None:
    budget = data.draw(st.integers(1, 30))
    parallel = data.draw(st.integers(1, 4))
    g = goal(budget, parallel=parallel, population=data.draw(st.integers(1, 5)))
    advisor = OptunaAdvisor(g, "prop", seed=0)
    search = Search(g, advisor, random.Random(0), [Start(BASE, None)])
    running: list[int] = []
    loss = {BASE: BASE_LOSS}
    counter = 0
    low = g.dim("lr").low
    late: dict[int, int] = {}  # late annealing steps along each branch's path
    for _ in range(60):
        if search.done:
            break
        free = parallel - len(running)
        planned = search.plan(max(0, free))
        assert len(planned) <= max(0, free)
        for b in planned:
            assert b.start in loss
            search.started(b.id, f"job{b.id}")
            running.append(b.id)
        reserved = sum(search.cost(search.branches[i]) for i in running)
        assert search.spent_tasks + reserved <= budget
        if not running:
            assert search.done
            break
        i = running.pop(data.draw(st.integers(0, len(running) - 1)))
        b = search.branches[i]
        if data.draw(st.booleans()) and data.draw(st.booleans()):
            search.lost(i, "gone", tasks=data.draw(st.integers(0, search.cost(b))))
            continue
        versions, losses, parents = [], [], []
        parent = b.start
        for _r in range(b.rounds):
            counter += 1
            v = f"{counter:064x}"
            loss[v] = loss[parent] * data.draw(st.floats(0.5, 1.1))
            versions.append(v)
            losses.append(loss[v])
            parents.append(parent)
            parent = v
        queued = {q.id for q in search.queue}
        record = search.finished(i, versions, losses, parents, search.cost(b), 1.0)
        new = [q for q in search.queue if q.id not in queued]
        retries = [q for q in new if q.retry_of is not None]
        lr = float(b.params["lr"])
        if "no gain" in record["why"] and lr > low and b.plateaus < MAX_PLATEAUS:
            # A plateau: exactly one retry, from the same start, one annealing step down.
            (r,) = retries
            assert (r.retry_of, r.start, r.start_loss, r.depth) == \
                (b.id, b.start, b.start_loss, b.depth)
            assert r.params["lr"] == pytest.approx(max(low, lr * ANNEAL))
            assert r.plateaus == b.plateaus + 1 <= MAX_PLATEAUS
        else:
            assert retries == []
        for q in new:
            stepped = q.parent == b.id and "late in the budget" in record["why"]
            late[q.id] = late.get(b.id, 0) + stepped if q.parent == b.id else \
                late.get(q.retry_of or -1, 0)
            assert late[q.id] <= MAX_ANNEALS
        with pytest.raises(LocalProtocolError):
            search.finished(i, versions, losses, parents, 0, 0.0)  # not running any more
    assert search.spent_tasks <= budget
    path = search.optimal_path()
    if search.best is not None:
        assert path[-1].version == search.best[1] and path[0].version == BASE
        assert [n.depth for n in path] == list(range(len(path)))


@pytest.mark.timeout(60)
def test_status_and_show_print_the_branches_reflections_and_path(tmp_path: Path) -> None:
    from node.cli.agent import format_status

    d = run_agent(tmp_path, lambda a: search_to_end(a, goal(12)), SimRunner(DATA, [BASE]))
    text = format_status(d, tree=True)
    s = d["search"]
    assert f"search {d['id']}" in text and "budget spent" in text
    assert "REFLECTIONS" in text and "OPTIMAL PATH" in text
    for v in s["path"]:
        assert v in text
    for r in s["reflections"]:
        assert f"#{r['n']}" in text and r["why"] in text


@pytest.mark.timeout(60)
def test_the_api_routes(tmp_path: Path) -> None:
    from node.agent.planner import PlannerError
    from node.agent.service import NotRunning, UnknownSearch
    from node.api.agent import agent_routes
    from node.api.server import ApiError, Request
    from protocol.agentgoal import GoalError, goal_to_toml

    text = goal_to_toml(goal(8))

    async def body(agent: Agent) -> None:
        routes = agent_routes(agent)

        async def call(method: str, path: str, body: Any = None, **query: str) -> Any:
            return await routes[(method, path)](Request(method, path, query, body))

        proposal = {"lr": 0.003, "outer_lr": 0.7, "inner_steps": 50}
        sid = (await call("POST", "/v1/agent/run", {"goal": text,
                                                     "proposals": [proposal]}))["id"]
        await agent.ended(sid).wait()
        d = await call("GET", "/v1/agent/status", id=sid[:6])
        assert d["status"] == "done" and d["memory"]["proposals"] == 1
        first = d["search"]["branches"][0]["params"]
        assert {k: first[k] for k in proposal} == proposal  # the proposal ran first
        assert [r["id"] for r in await call("GET", "/v1/agent")] == [sid]
        assert (await call("GET", "/v1/agent/svg", id=sid))["svg"].startswith("<svg")
        with pytest.raises(NotRunning):
            await call("POST", "/v1/agent/stop", {"id": sid})
        with pytest.raises(UnknownSearch):
            await call("GET", "/v1/agent/status", id="ffff")
        with pytest.raises(GoalError, match=r"budget\.tasks"):
            await call("POST", "/v1/agent/run", {"goal": text.replace("tasks = 8",
                                                                       "tasks = -1")})
        with pytest.raises(PlannerError, match=r"proposal 1: lr: 5\.0 is outside") as refused:
            await call("POST", "/v1/agent/run", {"goal": text,
                                                 "proposals": [{**proposal, "lr": 5.0}]})
        assert refused.value.status == 400  # the API's one mapping (node/errors.py)
        with pytest.raises(ApiError, match="id: missing"):
            await call("GET", "/v1/agent/status")

    run_agent(tmp_path, body, SimRunner(DATA, [BASE]))


# --- what the budget prices, the incumbent first, annealing late -------------------------


@settings(max_examples=60, deadline=None)
@given(goal_docs())
def test_a_task_budget_fixes_the_fields_that_only_size_a_task(doc: dict[str, Any]) -> None:
    g = goal_from_toml_dict(doc)
    p = priced(g)
    assert priced(p) == p and p.key() == g.key()
    for d, q in zip(g.space, p.space, strict=True):
        assert q.name == d.name
        if g.budget_worker_s is not None or d.kind == "fixed" or \
                d.name not in (*WORK_FIELDS, "workers_per_round"):
            assert q == d  # a worker-seconds budget prices a task's size: searched
            continue
        ends = d.values if d.kind == "choice" else (d.low, d.high)
        most_work = d.name in WORK_FIELDS
        assert q.kind == "fixed" and q.values == ((max if most_work else min)(ends),)
        assert d.contains(q.values[0])
    # The machine searches the priced space, the advisor samples it.
    search = Search(g, OptunaAdvisor(g, "priced", seed=0), random.Random(0),
                    [Start(BASE, None)])
    assert search.goal == p
    for b in search.plan(3):
        for d in p.space:
            assert d.contains(b.params[d.name]), (d, b.params)


def priced_goal(budget: str, *, parallel: int = 2, population: int = 4) -> Goal:
    return goal_toml(budget, parallel=parallel, population=population, seed=5,
                     space="batch_size = {low = 4, high = 16}\nworkers_per_round = [1, 2]")


@pytest.mark.timeout(60)
def test_branches_take_the_priced_sizes_and_the_incumbent_runs_first(tmp_path: Path
                                                                     ) -> None:
    runner = SimRunner(DATA, [BASE], workers=2)
    d = run_agent(tmp_path, lambda a: search_to_end(a, priced_goal("tasks = 16")), runner)
    trains = [runner.jobs[b["job"]]["doc"]["train"] for b in d["search"]["branches"]
              if b["job"] is not None]
    assert trains and all((t["inner_steps"], t["batch_size"], t["workers_per_round"])
                          == (50, 16, 1) for t in trains)
    assert d["search"]["priced"] == {"inner_steps": 50, "batch_size": 16,
                                     "workers_per_round": 1}
    from node.cli.agent import format_status

    assert "priced      batch_size=16 inner_steps=50 workers_per_round=1" in format_status(d)
    # One worker a branch: the two workers run the two branches search.parallel allows
    # (at the unpriced most of 2 workers a round they would run one).
    assert runner.max_running == 2
    # The first branch is the job's defaults (lr 3e-3, outer lr 0.7) at the priced sizes.
    first = d["search"]["branches"][0]
    assert first["kind"] == "fresh" and (first["params"]["lr"], first["params"]["outer_lr"]
                                         ) == (3e-3, 0.7)
    # Under a worker-seconds budget the sizes cost, and are searched.
    runner = SimRunner(DATA, [BASE], workers=4)
    (tmp_path / "ws").mkdir()
    d = run_agent(tmp_path / "ws", lambda a: search_to_end(
        a, priced_goal("worker_seconds = 900")), runner)
    assert d["search"]["priced"] == {}
    seen = {(t["inner_steps"], t["workers_per_round"]) for t in
            (runner.jobs[b["job"]]["doc"]["train"] for b in d["search"]["branches"]
             if b["job"] is not None)}
    assert len(seen) > 1, (seen, d["search"]["spent"])


def test_late_in_the_budget_a_kept_branch_goes_on_with_its_lr_annealed() -> None:
    g = priced_goal("tasks = 8", parallel=1, population=1)
    search = Search(g, OptunaAdvisor(g, "anneal", seed=0), random.Random(0),
                    [Start(BASE, None)])
    loss, lrs, kinds, annealing = BASE_LOSS, [], [], []
    while True:
        planned = search.plan(1)
        if not planned:
            break
        (b,) = planned
        search.started(b.id, f"job{b.id}")
        lrs.append(b.params["lr"])
        kinds.append(b.kind)
        loss -= 0.1
        record = search.finished(b.id, [f"{b.id:064x}"], [loss], [b.start], 1, 1.0)
        assert record["decision"] == "continue"
        if "annealing" in record["why"]:
            annealing.append(search.spent_tasks)
    assert search.finished_reason == "budget spent" and search.spent_tasks == 8
    # One trajectory: the defaults, then once LATE of the budget is spent, x0.8 a rung up
    # to MAX_ANNEALS times, each a new trial of the advisor (the pruner compares settings).
    k = int(LATE * 8)
    assert annealing == [k, k + 1, k + 2] and MAX_ANNEALS == 3
    assert lrs == pytest.approx([3e-3] * k + [3e-3 * ANNEAL ** i for i in (1, 2, 3)]
                                + [3e-3 * ANNEAL ** 3] * (8 - k - 3))
    assert kinds == ["fresh"] + ["continue"] * (k - 1) + ["exploit"] * 3 + \
        ["continue"] * (8 - k - 3)
    assert [n.depth for n in search.optimal_path()] == list(range(9))


def test_memory_continues_the_best_version_and_a_worse_rung_does_not_reach_it() -> None:
    g = goal(8)
    known = {"lr": 2e-3, "outer_lr": 0.6, "inner_steps": 20, "workers_per_round": 2}
    best = Start("ee" * 32, 3.0, depth=4, params=known)
    search = Search(g, OptunaAdvisor(g, "memory", seed=0), random.Random(0),
                    [best, Start(BASE, BASE_LOSS)])
    (b,) = search.plan(1)
    # The first branch goes on from the best version known, with the setting that made
    # it, at the priced size (inner_steps at its most), from its depth.
    assert (b.start, b.depth, b.start_loss) == (best.version, 4, 3.0)
    assert {k: b.params[k] for k in ("lr", "outer_lr")} == {"lr": 2e-3, "outer_lr": 0.6}
    assert b.params["inner_steps"] == 50
    search.started(b.id, "job")
    record = search.finished(b.id, ["ff" * 32], [3.1], [best.version], 2, 1.0)
    assert record["decision"] == "stop" and "no gain" in record["why"]
    # What the search made is worse than its start: it has not reached 3.0.
    assert search.best == (3.1, "ff" * 32) and search.tasks_to_reach(3.0) is None


def run_alone(search: Search, loss: float = BASE_LOSS, worker_s: float = 1.0
              ) -> tuple[list[float], list[str], list[int]]:
    """One branch at a time, each rung 0.1 better, until the budget is spent: the lrs and
    kinds of the branches, and the tasks spent at each annealing decision."""
    lrs, kinds, annealing = [], [], []
    while planned := search.plan(1):
        (b,) = planned
        search.started(b.id, f"job{b.id}")
        lrs.append(b.params["lr"])
        kinds.append(b.kind)
        loss -= 0.1
        record = search.finished(b.id, [f"{b.id:064x}"], [loss], [b.start], 1, worker_s)
        assert record["decision"] == "continue"
        if "annealing" in record["why"]:
            annealing.append(search.spent_tasks)
    return lrs, kinds, annealing


def test_annealing_stops_at_the_low_end_of_the_lr_range() -> None:
    g = priced_goal("tasks = 8", parallel=1, population=1)
    low = g.dim("lr").low
    start = Start(BASE, BASE_LOSS, params={"lr": low * 1.1, "outer_lr": 0.7})
    lrs, kinds, annealing = run_alone(
        Search(g, OptunaAdvisor(g, "floor", seed=0), random.Random(0), [start]))
    # Once late: x0.8 would go below the range, so it takes exactly the low end; then
    # nothing is left to anneal and the branch goes on plain.
    k = int(LATE * 8)
    assert annealing == [k]
    assert lrs == [low * 1.1] * k + [low] * (8 - k)
    assert kinds == ["fresh"] + ["continue"] * (k - 1) + ["exploit"] + ["continue"] * (7 - k)


def test_memory_goes_on_with_the_next_annealing_step_and_the_cap_is_per_search() -> None:
    g = priced_goal("tasks = 8", parallel=1, population=1)
    # A path memory knows was annealing (here as often as one search may): going on from
    # it takes the next step at once, and this search may anneal it MAX_ANNEALS times
    # in all, that first step included.
    start = Start(BASE, BASE_LOSS, params={"lr": 2e-3, "outer_lr": 0.7},
                  anneals=MAX_ANNEALS)
    search = Search(g, OptunaAdvisor(g, "cap", seed=0), random.Random(0), [start])
    lrs, kinds, annealing = run_alone(search)
    k = int(LATE * 8)
    assert annealing == [k, k + 1]
    assert lrs == pytest.approx([2e-3 * ANNEAL] * k + [2e-3 * ANNEAL ** 2]
                                + [2e-3 * ANNEAL ** 3] * (7 - k))
    assert kinds == ["fresh"] + ["continue"] * (k - 1) + ["exploit"] * 2 + \
        ["continue"] * (6 - k)
    last = max(search.branches.values(), key=lambda b: b.id)
    assert (last.anneals, last.carried) == (2 * MAX_ANNEALS, MAX_ANNEALS)
    # A path that never annealed goes on with the very setting that made it.
    plain = Start(BASE, BASE_LOSS, params={"lr": 2e-3, "outer_lr": 0.7})
    lrs, _, annealing = run_alone(
        Search(g, OptunaAdvisor(g, "plain", seed=0), random.Random(0), [plain]))
    assert lrs[:k] == [2e-3] * k and annealing == [k, k + 1, k + 2]


def test_a_rung_that_makes_no_gain_tries_its_start_again_with_the_lr_annealed() -> None:
    g = priced_goal("tasks = 8", parallel=1, population=2)
    low = g.dim("lr").low
    known = {"lr": low / ANNEAL ** 1.5, "outer_lr": 0.7}
    start = Start("ee" * 32, 3.0, depth=4, params=known)
    search = Search(g, OptunaAdvisor(g, "plateau", seed=0), random.Random(0),
                    [start, Start(BASE, BASE_LOSS)])
    outcomes = iter([3.05, 3.02, 2.9, 3.1, 3.2])  # worse, worse, better, worse, worse
    seen: list[tuple[str, str, float, int | None]] = []
    records = []
    while len(seen) < 5 and (planned := search.plan(1)):
        (b,) = planned
        search.started(b.id, f"job{b.id}")
        seen.append((b.kind, b.start, b.params["lr"], b.parent))
        records.append(search.finished(b.id, [f"{b.id:064x}"], [next(outcomes)],
                                       [b.start], 1, 1.0))
    # The first rung from the best known version made no gain: the lr is too high for
    # this stage, so the same start goes on one annealing step down; again, down to the
    # range's low end; there the start has no lower lr to try, so the search moves on
    # (its second fresh branch, from the other start point).
    assert records[0]["decision"] == "stop" and "a plateau: branch 2" in records[0]["why"]
    assert seen[0] == ("fresh", start.version, known["lr"], None)
    assert seen[1] == ("exploit", start.version, pytest.approx(known["lr"] * ANNEAL), None)
    assert seen[2] == ("exploit", start.version, low, None)
    assert records[2]["decision"] == "continue"
    assert seen[3][:2] == ("continue", f"{3:064x}") and seen[3][2] == low
    assert records[3]["decision"] == "stop" and "plateau" not in records[3]["why"]
    assert seen[4][:2] == ("fresh", BASE)
    assert [search.branches[i].anneals for i in (1, 2, 3, 4)] == [0, 1, 2, 2]
    assert search.best is not None and search.best[0] == 2.9


@pytest.mark.timeout(60)
def test_memory_keeps_each_versions_annealing_count(tmp_path: Path) -> None:
    g = priced_goal("tasks = 8", parallel=1, population=1)

    async def body(agent: Agent) -> list[Start]:
        sid = await agent.start(g)
        await agent.ended(sid).wait()
        return agent.memory(g).starts

    starts = run_agent(tmp_path, body, SimRunner(DATA, [BASE]))
    best = starts[0]
    assert best.anneals > 0 and best.params is not None and best.params["lr"] < 3e-3


def test_proposals_are_the_first_fresh_settings_and_each_trial_has_its_setting() -> None:
    g = priced_goal("tasks = 16", parallel=2, population=2)
    proposals = [{"lr": 1e-3, "outer_lr": 0.5}, {"lr": 5e-3, "outer_lr": 0.9}]
    advisor = OptunaAdvisor(g, "proposals", seed=0)
    search = Search(g, advisor, random.Random(0), [Start(BASE, BASE_LOSS)], proposals)
    planned = search.plan(2)
    assert [{k: b.params[k] for k in ("lr", "outer_lr")} for b in planned] == proposals
    # Every branch's trial in the study holds the setting the machine planned for it.
    loss, seen = BASE_LOSS, 0
    while planned:
        for b in planned:
            search.started(b.id, f"job{b.id}")
            trial = advisor.trials[b.trial]
            assert {k: b.params[k] for k in trial.params} == trial.params, b
            seen += 1
        for b in planned:
            loss -= 0.05
            search.finished(b.id, [f"{b.id:064x}"], [loss], [b.start], 2, 1.0)
        planned = search.plan(2)
    assert seen > 2 and any(b.kind == "exploit" for b in search.branches.values())


def test_the_advisor_refuses_a_trial_out_of_step_with_what_it_queued() -> None:
    g = priced_goal("tasks = 16")
    advisor = OptunaAdvisor(g, "step", seed=0)
    advisor.study.enqueue_trial({"lr": 1e-3, "outer_lr": 0.5})  # someone else's
    with pytest.raises(RuntimeError, match=r"has \{'lr': 0.001, 'outer_lr': 0.5\}, not the "
                                           r"queued \{'lr': 0.005, 'outer_lr': 0.9\}"):
        advisor.new_trial({"lr": 5e-3, "outer_lr": 0.9})
    # The queue stays one out of step: every later setting is refused, never run wrong.
    with pytest.raises(RuntimeError, match="not the queued"):
        advisor.new_trial({"lr": 2e-3, "outer_lr": 0.6})
    assert advisor.trials == {}


def test_bounds_and_reflections_hold_only_the_searched_ranges() -> None:
    g = priced_goal("tasks = 16")  # batch_size: a range the task budget fixes at 16
    search = Search(g, OptunaAdvisor(g, "bounds", seed=0), random.Random(0),
                    [Start(BASE, BASE_LOSS)])
    assert set(search.bounds) == {"lr", "outer_lr"} == set(search.to_dict()["bounds"])


def test_worker_seconds_progress_counts_what_running_branches_will_spend() -> None:
    g = priced_goal("worker_seconds = 100", parallel=2, population=2)
    search = Search(g, OptunaAdvisor(g, "progress", seed=0), random.Random(0),
                    [Start(BASE, BASE_LOSS)])
    (b,) = search.plan(1)
    search.started(b.id, "job")
    search.finished(b.id, ["ff" * 32], [BASE_LOSS - 0.1], [BASE], 2, 10.0)  # 5 s a task
    assert search.progress() == pytest.approx(0.1)
    (c,) = search.plan(1)
    assert search.progress() == pytest.approx((10.0 + 5.0 * search.cost(c)) / 100)


def plateau_search(lr: float, *, anneals: int = 0, population: int = 1, parallel: int = 1,
                   space: str = "") -> tuple[Search, Start]:
    g = priced_goal("tasks = 8", parallel=parallel, population=population)
    if space:
        g = parse_goal_toml(f"""
base_model = "{BASE}"
dataset = "{DATA}"
[budget]
tasks = 8
[search]
population = {population}
parallel = {parallel}
[space]
{space}
""")
    start = Start("ee" * 32, 3.0, depth=4, params={"lr": lr, "outer_lr": 0.7},
                  anneals=anneals)
    return Search(g, OptunaAdvisor(g, "plateau", seed=0), random.Random(0), [start]), start


def rung(search: Search, b: Any, loss: float) -> dict[str, Any]:
    search.started(b.id, f"job{b.id}")
    return search.finished(b.id, [f"{b.id:064x}"], [loss], [b.start], 1, 1.0)


def test_a_start_that_never_gains_is_retried_at_most_max_plateaus_times() -> None:
    search, start = plateau_search(1e-2)
    records, lrs = [], []
    for _ in range(MAX_PLATEAUS + 1):
        (b,) = search.plan(1)
        assert b.start == start.version
        lrs.append(b.params["lr"])
        records.append(rung(search, b, 3.1))  # never beats its start's 3.0
    assert lrs == pytest.approx([1e-2 * ANNEAL ** i for i in range(MAX_PLATEAUS + 1)])
    assert [search.branches[i].plateaus for i in (1, 2, 3)] == [0, 1, 2]
    assert "plateau" not in records[-1]["why"] and search.queue == []
    # The retry's reflection says what moved: from the branch it retries (a fresh one,
    # without a parent), and the lr it went to.
    assert "lr 0.01 -> 0.008" in records[0]["why"]
    assert records[1]["moved"] == {"lr": [1e-2, pytest.approx(8e-3)]}
    (nxt,) = search.plan(1)  # the search moves on: an exploit of the best result
    assert nxt.kind == "exploit" and nxt.retry_of is None and nxt.plateaus == 0


def test_plateau_steps_count_toward_the_late_annealing_cap() -> None:
    search, _ = plateau_search(2e-3)
    outcomes = iter([3.1, 3.1, 2.9, 2.8, 2.7, 2.6, 2.5, 2.4])
    lrs, late = [], 0
    while planned := search.plan(1):
        (b,) = planned
        lrs.append(b.params["lr"])
        late += "late in the budget" in rung(search, b, next(outcomes))["why"]
    # Two plateau steps, then MAX_ANNEALS - 2 late ones: one search lowers a path's lr
    # at most ANNEAL ** MAX_ANNEALS, whatever the cause.
    assert late == MAX_ANNEALS - MAX_PLATEAUS == 1
    assert lrs == pytest.approx([2e-3 * ANNEAL ** i for i in (0, 1, 2)]
                                + [2e-3 * ANNEAL ** 3] * 5)


def test_an_exploit_with_a_perturbed_setting_carries_no_annealing_steps() -> None:
    low = 1e-4
    search, _ = plateau_search(low, anneals=2)  # at the low end: nothing to step
    (b,) = search.plan(1)
    assert (b.anneals, b.carried) == (2, 2)
    assert "plateau" not in rung(search, b, 3.1)["why"]
    (e,) = search.plan(1)
    assert (e.kind, e.parent) == ("exploit", b.id) and (e.anneals, e.carried) == (0, 0)


def test_memory_takes_no_annealing_step_from_an_lr_outside_the_range() -> None:
    search, _ = plateau_search(5e-2, anneals=2)  # above this goal's 3e-2
    (b,) = search.plan(1)
    assert b.params["lr"] == pytest.approx(search.goal.dim("lr").middle())
    assert (b.anneals, b.carried) == (2, 2)


def test_a_fixed_lr_goal_gives_no_plateau_retry() -> None:
    search, _ = plateau_search(3e-3, space="lr = 3e-3\nouter_lr = {low = 0.2, high = 1.0}")
    (b,) = search.plan(1)
    record = rung(search, b, 3.1)
    assert "no gain" in record["why"] and "plateau" not in record["why"]
    assert search.queue == []


def test_with_branches_side_by_side_a_retry_queues_after_earlier_decisions() -> None:
    g = priced_goal("tasks = 40", parallel=2, population=2)
    start = Start("ee" * 32, 2.0, depth=4, params={"lr": 1e-2, "outer_lr": 0.7})
    other = Start("dd" * 32, 3.0, depth=2)
    search = Search(g, OptunaAdvisor(g, "order", seed=0), random.Random(0), [start, other])
    b, a = search.plan(2)
    assert b.start == start.version and a.start == other.version
    assert rung(search, a, 2.9)["decision"] == "continue"
    assert "plateau" in rung(search, b, 2.05)["why"]  # no gain, yet the better loss
    first, second = search.plan(2)
    assert (first.kind, first.parent) == ("continue", a.id)
    assert (second.retry_of, second.start) == (b.id, start.version)
