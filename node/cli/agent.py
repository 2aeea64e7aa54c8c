"""``iollm agent ...``: state a goal, let the node's agent search for the best model.

    agent run GOAL.toml | --goal SENTENCE [--wait]   POST /v1/agent/run
    agent status ID [--watch]                         GET /v1/agent/status?id=
    agent list                                        GET /v1/agent
    agent show ID [--svg FILE]                        the search tree and the optimal path
    agent stop ID                                     POST /v1/agent/stop

A goal file is checked here first (a wrong or missing field named, one line), then again
by the node. stdout carries what a script wants (the id, ``--json``), stderr progress.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote

from node.cli.common import SHORT, CliError, call_node, home_of, int_arg, when

WATCH_POLL_S = 2.0


def _goal_text(args: argparse.Namespace) -> str:
    from protocol.agentgoal import GoalError, goal_to_toml, parse_goal_toml

    if bool(args.file) == bool(args.goal):
        raise CliError("give a goal file or --goal SENTENCE (one of them)")
    if args.goal:
        from protocol.agentnl import SentenceError, parse_sentence

        names = _NodeNames(args)
        try:
            return goal_to_toml(parse_sentence(args.goal, names))
        except GoalError as exc:
            raise CliError(f"--goal: {exc}") from None
        except SentenceError as exc:
            planner = _planner(args)
            if planner is None:
                raise CliError(f"--goal: {exc} (the built-in forms are in specs/agent.md; "
                               "or set a planner: [agent] llm_url)") from None
        from node.agent.planner import PlannerError

        print("the built-in parser did not understand it; asking the planner",
              file=sys.stderr)
        try:
            return goal_to_toml(planner.goal(args.goal, dict(names)))
        except PlannerError as exc:
            raise CliError(str(exc)) from None
    path = Path(args.file).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CliError(f"cannot read {args.file}: {exc}") from None
    try:
        parse_goal_toml(text)
    except GoalError as exc:
        raise CliError(f"{args.file}: {exc}") from None
    return text


class _NodeNames(Mapping[str, str]):
    """Names a sentence may use for the model and dataset: the versions the running node
    knows, asked for only when a sentence names one (ids need no node)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self._names: dict[str, str] | None = None

    def _load(self) -> dict[str, str]:
        if self._names is None:
            self._names = {}
            for kind in ("model", "dataset"):
                for v in call_node(self.args, f"/v1/models?kind={kind}"):
                    self._names.setdefault(f"{kind}:{v['name']}", v["version"])
        return self._names

    def __getitem__(self, key: str) -> str:
        return self._load()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._load())

    def __len__(self) -> int:
        return len(self._load())


def _planner(args: argparse.Namespace) -> Any:
    """The configured planner (node/agent/planner.py), or None."""
    from node.agent.planner import Planner
    from node.config import ConfigError, load_config

    try:
        config = load_config(home_of(args)).agent
    except ConfigError:
        return None  # no usable home: no planner; the caller says what it could not do
    return Planner(config) if config.llm_url else None


def _proposals(args: argparse.Namespace, text: str) -> list[dict[str, Any]]:
    """The planner's settings for the first branches, from this node's earlier searches
    on a comparable goal."""
    from node.agent.planner import PlannerError
    from protocol.agentgoal import parse_goal_toml

    planner = _planner(args)
    if planner is None:
        raise CliError("--plan needs a planner: set [agent] llm_url in config.toml")
    goal = parse_goal_toml(text)
    memory = []
    for row in call_node(args, "/v1/agent"):
        d = call_node(args, f"/v1/agent/status?id={row['id']}")
        if d.get("key") == goal.key():
            memory += [(b["params"], b["depth"] + len(b["losses"]), b["losses"][-1])
                       for b in d["search"]["branches"] if b["losses"]]
    try:
        proposals: list[dict[str, Any]] = planner.propose(goal, memory, args.plan)
    except PlannerError as exc:
        raise CliError(str(exc)) from None
    print(f"the planner proposed {len(proposals)} settings", file=sys.stderr)
    return proposals


def cmd_agent_run(args: argparse.Namespace) -> int:
    text = _goal_text(args)
    body: dict[str, Any] = {"goal": text}
    if args.plan:
        body["proposals"] = _proposals(args, text)
    sid = call_node(args, "/v1/agent/run", "POST", body)["id"]
    print(f"started search {sid}; `iollm agent status {sid[:8]}` follows it", file=sys.stderr)
    print(sid)
    if args.wait:
        return _watch(args, sid)
    return 0


def _loss(x: float | None) -> str:
    return "?" if x is None else f"{x:.4f}"


def format_status(d: dict[str, Any], *, tree: bool = False) -> str:
    s = d["search"]
    best = s["best"]
    lines = [f"search {d['id']}  {d['name']!r}  {d['status']}"
             + (f": {d['error']}" if d.get("error") else "")
             + (f" ({s['finished']})" if s.get("finished") else ""),
             f"started     {when(d['created_ms'])}"
             + (f", ended {when(d['ended_ms'])}" if d.get("ended_ms") else ""),
             f"spent       {s['spent']['tasks']} tasks, {s['spent']['worker_s']:.0f} "
             f"worker-s; {len(s['branches'])} branches",
             f"memory      {d['memory'].get('priors', 0)} prior trials, "
             f"{len(d['memory'].get('starts', []))} start versions from earlier searches "
             f"and the chain",
             f"best        {_loss(best['loss']) if best else '-'}"
             + (f"  version {best['version']}" if best else "")]
    if s.get("priced"):  # absent in searches stored before the rule
        lines.append("priced      " + " ".join(f"{k}={v}" for k, v in sorted(
            s["priced"].items())) + " (free in the budget's unit: specs/agent.md)")
    lines.append("BRANCH  KIND      FROM          DEPTH  STATUS    LOSS      TASKS  SETTING")
    for b in s["branches"]:
        setting = " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                           for k, v in sorted(b["params"].items()))
        lines.append(f"{b['id']:>6}  {b['kind']:<8}  {b['start'][:SHORT]}  {b['depth']:>5}  "
                     f"{b['status']:<8}  {_loss(b['losses'][-1] if b['losses'] else None):<8}"
                     f"  {b['tasks']:>5}  {setting}")
        if b.get("note"):
            lines.append(f"{'':8}{b['note']}")
    lines.append("REFLECTIONS (after each rung: decision and evidence)")
    for r in s["reflections"][-12 if not tree else None:]:
        extra = ""
        if r["moved"]:
            extra += " moved " + ", ".join(f"{k} {_short(a)}->{_short(b)}"
                                           for k, (a, b) in r["moved"].items())
        if r["narrowed"]:
            extra += " narrowed " + ", ".join(f"{k} to [{a:.3g}, {b:.3g}]"
                                              for k, (a, b) in r["narrowed"].items())
        curve = " ".join(f"{x:.3f}" for x in r["curve"])
        lines.append(f"  #{r['n']:<3} branch {r['branch']} rung {r['rung']}: {r['decision']}"
                     f" ({r['why']}){extra}" + (f"; curve {curve}" if curve else ""))
    if tree:
        lines.append("OPTIMAL PATH (base to best)")
        nodes = {n["version"]: n for n in s["nodes"]}
        for v in s["path"]:
            n = nodes[v]
            lines.append(f"  {v}  depth {n['depth']:>3}  loss {_loss(n['loss'])}"
                         + ("" if n["branch"] is None else f"  branch {n['branch']}"))
    return "\n".join(lines)


def _short(x: Any) -> str:
    return f"{x:.3g}" if isinstance(x, float) else str(x)


def _watch(args: argparse.Namespace, sid: str) -> int:
    seen = -1
    while True:
        d = call_node(args, f"/v1/agent/status?id={quote(sid)}")
        n = len(d["search"]["reflections"])
        if n != seen or d["status"] != "running":
            seen = n
            print(format_status(d), file=sys.stderr)
        if d["status"] != "running":
            return 0 if d["status"] in ("done", "stopped") else 1
        time.sleep(WATCH_POLL_S)  # polling another process: the search has no end time


def cmd_agent_status(args: argparse.Namespace) -> int:
    if args.watch:
        return _watch(args, args.id)
    d = call_node(args, f"/v1/agent/status?id={quote(args.id)}")
    print(json.dumps(d, indent=2) if args.json else format_status(d))
    return 0


def cmd_agent_show(args: argparse.Namespace) -> int:
    d = call_node(args, f"/v1/agent/status?id={quote(args.id)}")
    if args.svg:
        svg = call_node(args, f"/v1/agent/svg?id={quote(args.id)}")["svg"]
        try:
            Path(args.svg).expanduser().write_text(svg, encoding="utf-8")
        except OSError as exc:
            raise CliError(f"cannot write {args.svg}: {exc}") from None
        print(f"wrote the search tree to {args.svg}", file=sys.stderr)
    print(json.dumps(d, indent=2) if args.json else format_status(d, tree=True))
    return 0


def cmd_agent_list(args: argparse.Namespace) -> int:
    rows = call_node(args, "/v1/agent")
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("no searches on this node")
        return 0
    print(f"{'SEARCH':<16}  {'NAME':<20}  {'STATUS':<11}  BRANCHES  TASKS  BEST     STARTED")
    for r in rows:
        print(f"{r['id']:<16}  {r['name'][:20]:<20}  {r['status']:<11}  {r['branches']:>8}  "
              f"{r['spent_tasks']:>5}  {_loss(r['best']):<7}  {when(r['created_ms'])}")
    return 0


def cmd_agent_stop(args: argparse.Namespace) -> int:
    d = call_node(args, "/v1/agent/stop", "POST", {"id": args.id})
    print(format_status(d))
    return 0


def _id_arg(text: str) -> str:
    value = text.strip().lower()
    if not 4 <= len(value) <= 16 or any(c not in "0123456789abcdef" for c in value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a search id: give its 16 hex "
                                         "digits or a unique prefix of at least 4")
    return value


def add_agent_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser],
                       client: argparse.ArgumentParser) -> None:
    group = sub.add_parser(
        "agent", help="search for the best model within a budget",
        description="The agent: state a goal (base model, dataset, budget, search space) "
                    "and the node runs training branches as jobs, stops poor ones early, "
                    "continues the best versions with perturbed settings, remembers what "
                    "it tried, and returns the optimal path from the base to the best "
                    "model (specs/agent.md).")
    actions = group.add_subparsers(dest="agent_command", metavar="ACTION", required=True)
    p = actions.add_parser(
        "run", parents=[client], help="start a search for a goal",
        description="Check the goal (a file, or a sentence with --goal) and start a search "
                    "on this node. Prints the search id. Goal format: specs/agent.md and "
                    "bootstrap/agent/goal.example.toml.")
    p.add_argument("file", metavar="GOAL.toml", nargs="?", help="the goal, a TOML file")
    p.add_argument("--goal", metavar="SENTENCE",
                   help='the goal as a sentence, e.g. "train gpt-tiny on python-stdlib to '
                        'loss 2.5 within 40 tasks" (forms: specs/agent.md)')
    p.add_argument("--plan", type=int_arg(1, 16, "a number of settings in [1, 16]"),
                   metavar="N", help="ask the planner ([agent] llm_url) for N settings of "
                   "the first branches, from this node's earlier searches")
    p.add_argument("--wait", action="store_true", help="follow the search until it ends")
    p.set_defaults(func=cmd_agent_run)
    p = actions.add_parser("status", parents=[client], help="branches, reflections, best",
                           description="One search: its branches (setting, loss, cost), "
                                       "the reflection after each rung, the best version.")
    p.add_argument("id", metavar="ID", type=_id_arg, help="search id or unique prefix")
    p.add_argument("--watch", action="store_true", help="print again after each rung, "
                   "until the search ends")
    p.set_defaults(func=cmd_agent_status)
    p = actions.add_parser("list", parents=[client], help="searches on this node",
                           description="Every search this node ran or runs, newest first.")
    p.set_defaults(func=cmd_agent_list)
    p = actions.add_parser("show", parents=[client], help="the search tree and optimal path",
                           description="A search's tree (every branch and reflection) and "
                                       "the optimal path; --svg also draws it.")
    p.add_argument("id", metavar="ID", type=_id_arg, help="search id or unique prefix")
    p.add_argument("--svg", metavar="FILE", help="write the search tree as an SVG picture")
    p.set_defaults(func=cmd_agent_show)
    p = actions.add_parser("stop", parents=[client], help="stop a running search",
                           description="Plan no more branches; branches running now are "
                                       "left to finish as jobs. What was found is kept.")
    p.add_argument("id", metavar="ID", type=_id_arg, help="search id or unique prefix")
    p.set_defaults(func=cmd_agent_stop)
