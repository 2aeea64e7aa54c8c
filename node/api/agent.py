"""The local API's routes for the agent (node/agent, specs/agent.md).

    POST /v1/agent/run     {"goal": TOML text, "proposals"?}   -> {"id": search id}
    GET  /v1/agent                                             -> [search summary]
    GET  /v1/agent/status?id=  (id or unique prefix >= 4 hex)  -> the search: goal,
                                branches, reflections, optimal path
    POST /v1/agent/stop    {"id"}                              -> the search, ended
    GET  /v1/agent/svg?id=                                     -> {"svg": the search tree}
"""

from __future__ import annotations

from typing import Any

from node.agent.picture import search_svg
from node.agent.planner import check_proposals
from node.agent.service import Agent
from node.api.server import ApiError, Request, Routes, body_fields, text_field
from protocol.agentgoal import parse_goal_toml


def agent_routes(agent: Agent) -> Routes:
    async def run(request: Request) -> Any:
        body = body_fields(request, {"goal"}, {"proposals"})
        goal = parse_goal_toml(text_field(body["goal"], "goal"))  # GoalError: 400
        proposals: list[dict[str, Any]] = []
        if body.get("proposals") is not None:  # PlannerError: 400
            proposals = check_proposals(goal, body["proposals"])
        return {"id": await agent.start(goal, proposals)}

    async def listing(_: Request) -> Any:
        return agent.list()

    def _id(request: Request) -> str:
        sid = (request.query.get("id") or "").strip()
        if not sid:
            raise ApiError(400, f"id: missing ({request.path}?id=SEARCH)")
        return sid

    async def status(request: Request) -> Any:
        return agent.status(_id(request))

    async def stop(request: Request) -> Any:
        body = body_fields(request, {"id"})
        return await agent.stop(text_field(body["id"], "id"))

    async def svg(request: Request) -> Any:
        return {"svg": search_svg(agent.status(_id(request)))}

    return {
        ("POST", "/v1/agent/run"): run,
        ("GET", "/v1/agent"): listing,
        ("GET", "/v1/agent/status"): status,
        ("POST", "/v1/agent/stop"): stop,
        ("GET", "/v1/agent/svg"): svg,
    }
