"""The optional planner: an OpenAI-compatible chat endpoint (``[agent] llm_url``,
``llm_model``, the key from the environment variable ``llm_key_env``) that turns free text
into a goal file, and proposes the first settings of a search from what memory holds.

Its answers are untrusted input. A goal it writes goes through ``parse_goal_toml`` like
any goal file, and is refused with the field named; a proposal must name only searched
fields with values inside the goal's space. The agent runs the same without a planner.
The CLI calls it (the key lives in the user's environment, not in the daemon's).
"""

from __future__ import annotations

import json
import os
import re
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from typing import Any

from node.config import AgentSection
from node.errors import NodeError
from protocol.agentgoal import Goal, GoalError, parse_goal_toml
from protocol.agentsearch import priced

MAX_ANSWER_BYTES = 256 * 1024
MAX_PROPOSALS = 16

GOAL_PROMPT = """You write goal files for the iollm agent (TOML). Answer with the TOML only.
Required: base_model and dataset (64-hex version ids; the user's names map to: {names}),
[budget] with tasks, worker_seconds or reward_pool. Optional: [objective] target,
[search] population/parallel/rounds_per_rung/reduction_factor/seed, [space] with any of
lr, outer_lr, outer_momentum, inner_steps, batch_size, delta_bits, workers_per_round, each
a value, a list of choices, or {{low, high, log}}."""

PROPOSE_PROMPT = """You propose the first settings of a hyperparameter search. The space:
{space}. Results so far (setting -> held-out loss at depth): {memory}. Answer with a JSON
array of at most {n} objects, each giving a value for every field of the space."""


class PlannerError(NodeError):
    """The planner could not be asked, or its answer was refused (the message says why;
    the API answers 400)."""


class Planner:
    def __init__(self, config: AgentSection, environ: Mapping[str, str] | None = None
                 ) -> None:
        if not config.llm_url:
            raise PlannerError("no planner is set: [agent] llm_url in config.toml")
        self.url = config.llm_url.rstrip("/") + "/chat/completions"
        self.model = config.llm_model
        self.key = (environ if environ is not None else os.environ).get(config.llm_key_env, "")
        self.timeout = config.llm_timeout_s

    def ask(self, system: str, user: str) -> str:
        """One chat completion; the answer's text."""
        body = json.dumps({"model": self.model, "temperature": 0,
                           "messages": [{"role": "system", "content": system},
                                        {"role": "user", "content": user}]}).encode()
        headers = {"Content-Type": "application/json"}
        if self.key:
            headers["Authorization"] = f"Bearer {self.key}"
        request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                raw = response.read(MAX_ANSWER_BYTES + 1)
        except (urllib.error.URLError, OSError, TimeoutError) as exc:
            raise PlannerError(f"the planner at {self.url} did not answer: {exc}") from None
        if len(raw) > MAX_ANSWER_BYTES:
            raise PlannerError(f"the planner's answer is over {MAX_ANSWER_BYTES} bytes")
        try:
            content = json.loads(raw)["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise PlannerError("the planner's answer is not a chat completion") from None
        if not isinstance(content, str):
            raise PlannerError("the planner's answer holds no text")
        return _unfence(content)

    def goal(self, text: str, names: Mapping[str, str]) -> Goal:
        """A checked goal from free text; PlannerError naming the refused field."""
        answer = self.ask(GOAL_PROMPT.format(names=json.dumps(dict(names))), text)
        try:
            return parse_goal_toml(answer)
        except GoalError as exc:
            raise PlannerError(f"the planner's goal was refused: {exc}") from None

    def propose(self, goal: Goal, memory: Sequence[tuple[Mapping[str, Any], int, float]],
                n: int = 4) -> list[dict[str, Any]]:
        """Settings for the first branches, each checked against ``goal``'s space."""
        space = {d.name: d.to_toml() for d in priced(goal).searched}
        shown = [{"setting": dict(p), "depth": step, "loss": round(loss, 4)}
                 for p, step, loss in list(memory)[-40:]]
        answer = self.ask(PROPOSE_PROMPT.format(space=json.dumps(space),
                                                memory=json.dumps(shown), n=n),
                          f"Propose {n} settings.")
        try:
            proposals = json.loads(answer)
        except ValueError:
            raise PlannerError("the planner's proposals are not JSON") from None
        return check_proposals(goal, proposals, n)


def check_proposals(goal: Goal, proposals: object, n: int = MAX_PROPOSALS
                    ) -> list[dict[str, Any]]:
    """Proposed settings, each a full point of ``goal``'s space as its budget prices it
    (protocol.agentsearch.priced: a field the budget fixes is not asked for, and refused
    at another value); PlannerError naming the first bad one (``proposal 2: lr: 0.5 is
    outside the space``)."""
    if not isinstance(proposals, list) or not 1 <= len(proposals) <= min(n, MAX_PROPOSALS):
        raise PlannerError(f"proposals: expected a list of 1..{min(n, MAX_PROPOSALS)} "
                           "settings")
    space = priced(goal)  # as the search sees it
    searched = {d.name: d for d in space.searched}
    fixed = {d.name: d.values[0] for d in space.space
             if d.kind == "fixed" and goal.dim(d.name).kind != "fixed"}
    out = []
    for i, p in enumerate(proposals, 1):
        if not isinstance(p, dict):
            raise PlannerError(f"proposal {i}: expected an object")
        for key in p:
            if key in fixed:
                if p[key] != fixed[key]:
                    raise PlannerError(f"proposal {i}: {key}: the budget fixes it at "
                                       f"{fixed[key]!r}")
            elif key not in searched:
                raise PlannerError(f"proposal {i}: {key}: not a searched field")
        for name, d in searched.items():
            if name not in p:
                raise PlannerError(f"proposal {i}: {name}: missing")
            if isinstance(p[name], bool) or not d.contains(p[name]):
                raise PlannerError(f"proposal {i}: {name}: {p[name]!r} is outside the space "
                                   f"{json.dumps(d.to_toml())}")
        out.append({k: (int(v) if searched[k].integer else v) for k, v in p.items()
                    if k in searched})
    return out


def _unfence(text: str) -> str:
    """The answer without a Markdown code fence around it, as chat models often add."""
    m = re.fullmatch(r"\s*```[a-zA-Z]*\n(.*?)\n?```\s*", text, re.S)
    return m.group(1) if m else text.strip()
