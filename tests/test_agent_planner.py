"""The planner adapter (node/agent/planner.py) against a small local HTTP server that
replays answers in the OpenAI chat-completions form (tests/data/planner_answers.json): a
stand-in for the user's endpoint. Every answer is untrusted: checked as a goal file is,
or as points of the goal's space, and refused with the field named."""

from __future__ import annotations

import dataclasses
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from node.agent.planner import Planner, PlannerError, check_proposals
from node.config import AgentSection

ANSWERS = json.loads((Path(__file__).parent / "data" / "planner_answers.json").read_text())
BASE, DATA = "ab" * 32, "cd" * 32


class Endpoint:
    """What the server saw, and which recorded answer it gives next."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, dict[str, str], dict[str, Any]]] = []
        self.answer = "goal-good"
        self.raw: bytes | None = None


@pytest.fixture
def endpoint() -> Iterator[tuple[Endpoint, str]]:
    state = Endpoint()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            state.requests.append((self.path, dict(self.headers), body))
            data = state.raw if state.raw is not None else json.dumps(
                ANSWERS[state.answer]).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *_: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield state, f"http://127.0.0.1:{server.server_port}/v1"
    finally:
        server.shutdown()
        server.server_close()


def planner(url: str) -> Planner:
    return Planner(AgentSection(llm_url=url, llm_model="local-test", llm_timeout_s=10),
                   environ={"IOLLM_LLM_KEY": "sk-test"})


@pytest.mark.timeout(30)
def test_a_goal_from_free_text(endpoint: tuple[Endpoint, str]) -> None:
    state, url = endpoint
    goal = planner(url).goal("make the tiny gpt as good as you can on the stdlib, 40 tasks",
                             {"model:gpt-tiny": BASE})
    assert (goal.base_models, goal.dataset, goal.target, goal.budget_tasks) == (
        (BASE,), DATA, 2.5, 40)
    path, headers, body = state.requests[0]
    assert path == "/v1/chat/completions" and headers["Authorization"] == "Bearer sk-test"
    assert body["model"] == "local-test" and body["temperature"] == 0
    assert body["messages"][1]["content"].startswith("make the tiny gpt")
    assert BASE in body["messages"][0]["content"]  # the names the node knows


@pytest.mark.timeout(30)
@pytest.mark.parametrize(("answer", "why"), [
    ("goal-bad", "the planner's goal was refused: space.lr.high: expected a finite number"),
    ("goal-prose", "the planner's goal was refused: toml: "),
])
def test_a_bad_goal_is_refused_with_the_field(endpoint: tuple[Endpoint, str], answer: str,
                                              why: str) -> None:
    state, url = endpoint
    state.answer = answer
    with pytest.raises(PlannerError, match=why):
        planner(url).goal("anything", {})


@pytest.mark.timeout(30)
def test_proposals_are_points_of_the_space(endpoint: tuple[Endpoint, str]) -> None:
    state, url = endpoint
    p = planner(url)
    tasks_goal = p.goal("a goal", {})
    # A task budget fixes inner_steps at its most (protocol.agentsearch.priced): the
    # planner is shown, and proposes, lr alone.
    assert check_proposals(tasks_goal, [{"lr": 0.003}, {"lr": 0.004, "inner_steps": 50}]
                           ) == [{"lr": 0.003}, {"lr": 0.004}]
    with pytest.raises(PlannerError, match="proposal 1: inner_steps: the budget fixes it "
                                           "at 50"):
        check_proposals(tasks_goal, [{"lr": 0.003, "inner_steps": 20}])
    state.answer = "propose-good"
    with pytest.raises(PlannerError, match="proposal 2: inner_steps: the budget fixes it"):
        p.propose(tasks_goal, [], 2)
    assert '"inner_steps"' not in state.requests[-1][2]["messages"][0]["content"]
    # Under a worker-seconds budget inner_steps costs, and is proposed.
    goal = dataclasses.replace(tasks_goal, budget_worker_s=1e5)
    assert p.propose(goal, [({"lr": 0.004, "inner_steps": 20}, 1, 3.1)], 2) == [
        {"lr": 0.003, "inner_steps": 50}, {"lr": 0.006, "inner_steps": 20}]
    assert "3.1" in state.requests[-1][2]["messages"][0]["content"]  # memory shown
    state.answer = "propose-outside"
    with pytest.raises(PlannerError, match=r"proposal 2: lr: 0.5 is outside the space"):
        p.propose(goal, [], 2)
    for bad, why in (([], "expected a list"), ([{"lr": 0.003}], "proposal 1: inner_steps: "
                                                                  "missing"),
                     ([{"lr": 0.003, "inner_steps": 50, "seq_len": 8}], "not a searched"),
                     ([{"lr": True, "inner_steps": 50}], "outside the space"), ("x", "list")):
        with pytest.raises(PlannerError, match=why):
            check_proposals(goal, bad)


@pytest.mark.timeout(30)
def test_broken_endpoints_are_one_error(endpoint: tuple[Endpoint, str]) -> None:
    state, url = endpoint
    for raw, why in ((b"not json", "not a chat completion"),
                     (b'{"choices": []}', "not a chat completion"),
                     (b"x" * (256 * 1024 + 10), "over 262144 bytes")):
        state.raw = raw
        with pytest.raises(PlannerError, match=why):
            planner(url).goal("x", {})
    with pytest.raises(PlannerError, match="did not answer"):
        planner("http://127.0.0.1:9/v1").goal("x", {})
    with pytest.raises(PlannerError, match="no planner is set"):
        Planner(AgentSection())
