"""The agent service: runs goal searches (protocol.agentsearch) with branches as jobs.

One search is one trio task driving its :class:`~protocol.agentsearch.Search`: it asks the
machine for branches while slots are free, runs each as a job through a :class:`Runner`
(:class:`JobsRunner`: the jobs service, so every branch is an ordinary, signed, checked
job with its receipts and round records), and feeds back what the job made. A branch's
job that fails, or does not end within the branch deadline, is *lost*: the machine plans
it again once, then drops it; the other branches go on.

Every search is kept in the node's kv store (``agent/search/<id>``, JSON) after each
event: its goal, every branch (setting, versions, losses, cost), the reflections and the
optimal path. That is the agent's memory; with the round records on the chain (any
node's jobs on the same base and evaluation set) it warm-starts a new search: the best
known versions as its start points, the settings tried as prior trials of its study.
"""

from __future__ import annotations

import builtins
import hashlib
import json
import logging
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import trio

from node.agent.advisor import OptunaAdvisor
from node.errors import Conflict, NodeError, NotFound
from protocol.agentgoal import SEARCHABLE, Goal, doc_to_toml, goal_to_toml
from protocol.agentsearch import Branch, Search, Start

log = logging.getLogger(__name__)
_T = TypeVar("_T")

INDEX_KEY = "agent/searches"
SEARCH_KEY = "agent/search/"
BRANCH_TIMEOUT_S = 6 * 3600.0  # a branch job not ended by then is lost (its job runs out)
MAX_STARTS = 2  # memory's best versions a new search starts from


class AgentError(NodeError):
    """A search cannot be started or changed as asked (the message says why)."""


class UnknownSearch(NotFound, AgentError):
    """No search here has that id or unique prefix."""


class NotRunning(Conflict, AgentError):
    """The search has already ended."""


class BranchLost(Exception):
    """A branch's job failed or timed out; what it spent before is still spent."""

    def __init__(self, reason: str, tasks: int = 0, worker_s: float = 0.0) -> None:
        super().__init__(reason)
        self.tasks = tasks
        self.worker_s = worker_s


@dataclass
class Outcome:
    """What a branch's job made, round by round (rounds that made no version left out)."""

    versions: list[str]
    losses: list[float]
    parents: list[str]
    start_loss: float | None
    tasks: int
    worker_s: float


class Runner(Protocol):
    """Where branches run: the network's jobs (JobsRunner), or a simulation (bench --sim,
    the search tests' objective)."""

    def slots(self, goal: Goal) -> int:
        """How many branches of ``goal`` the workers available now can run at once."""

    def knows(self, version: str) -> bool:
        """Whether ``version`` can be trained from (held here or announced)."""

    async def submit(self, doc: dict[str, Any]) -> str:
        """Start the branch's job (its job file as a TOML document); its id."""

    async def wait(self, job: str) -> Outcome:
        """The job's outcome once it ends; BranchLost when it failed."""


@dataclass
class Memory:
    """What a new search knows before it starts."""

    starts: list[Start] = field(default_factory=list)
    priors: list[tuple[dict[str, Any], int, float]] = field(default_factory=list)
    sources: dict[str, int] = field(default_factory=dict)


class Agent:
    """The searches of this node (see the module docstring)."""

    def __init__(self, storage: Any, runner: Runner, *, clock_ms: Callable[[], int],
                 home: Path | None = None, chain: Any = None, jobs: Any = None,
                 branch_timeout_s: float = BRANCH_TIMEOUT_S) -> None:
        self.storage = storage
        self.runner = runner
        self.clock_ms = clock_ms
        self.home = home  # None: Optuna studies in memory (tests, simulations)
        self.chain = chain
        self.jobs = jobs
        self.branch_timeout_s = branch_timeout_s
        self.docs: dict[str, dict[str, Any]] = {}  # search id -> stored document
        self.searches: dict[str, Search] = {}  # the ones running here now
        self._changed: dict[str, trio.Event] = {}
        self._ended: dict[str, trio.Event] = {}
        self._nursery: trio.Nursery | None = None
        self._locks: dict[str, trio.Lock] = {}  # one machine call at a time per search

    # -- service --------------------------------------------------------------------------

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        raw = await self.storage.kv_get(INDEX_KEY)
        for sid in json.loads(raw) if isinstance(raw, str) else []:
            doc = await self.storage.kv_get(SEARCH_KEY + sid)
            if not isinstance(doc, str):
                continue
            self.docs[sid] = json.loads(doc)
            if self.docs[sid]["status"] == "running":
                # Its branch jobs may still run out on their own; the search's decisions
                # were lost with the process. What it found stays in memory.
                self.docs[sid].update(status="interrupted", error="the node restarted")
                await self._put(sid)
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await trio.sleep_forever()

    async def _put(self, sid: str) -> None:
        await self.storage.kv_set(SEARCH_KEY + sid, json.dumps(self.docs[sid]))

    # -- commands -------------------------------------------------------------------------

    async def start(self, goal: Goal, proposals: Sequence[Mapping[str, Any]] = ()) -> str:
        """Start a search for ``goal``; its id (hex). ``proposals``: settings (checked
        points of the space, e.g. the planner's) its first fresh branches take. AgentError
        when a base model or the dataset is not known here."""
        for i, base in enumerate(goal.base_models):
            if not self.runner.knows(base):
                field_name = "base_model" if len(goal.base_models) == 1 else f"base_model[{i}]"
                raise AgentError(f"{field_name}: version {base[:16]} is not known here "
                                 "(publish it, or wait for its announcement)")
        if not self.runner.knows(goal.dataset):
            raise AgentError(f"dataset: version {goal.dataset[:16]} is not known here")
        text = goal_to_toml(goal)
        now = self.clock_ms()
        sid = hashlib.sha256(f"{text}\n{now}\n{len(self.docs)}".encode()).hexdigest()[:16]
        memory = self.memory(goal)
        starts = memory.starts or [Start(b, None) for b in goal.base_models]
        url = self._optuna_url()

        def build() -> tuple[OptunaAdvisor, int]:
            advisor = OptunaAdvisor(goal, sid, seed=goal.seed, storage=url)
            return advisor, sum(advisor.add_prior(p, step, loss)
                                for p, step, loss in memory.priors)

        advisor, priors = build() if url is None else await trio.to_thread.run_sync(build)
        search = Search(goal, advisor, random.Random(goal.seed), starts, proposals)
        self._locks[sid] = trio.Lock()
        self.searches[sid] = search
        self.docs[sid] = {"id": sid, "name": goal.name, "key": goal.key(), "goal": text,
                          "status": "running", "error": "", "created_ms": now,
                          "ended_ms": None, "memory": {"starts": [s.version for s in starts
                                                                  if memory.starts],
                                                       "priors": priors, **memory.sources,
                                                       "proposals": len(proposals)},
                          "search": search.to_dict()}
        await self._put(sid)
        raw = await self.storage.kv_get(INDEX_KEY)
        index = json.loads(raw) if isinstance(raw, str) else []
        await self.storage.kv_set(INDEX_KEY, json.dumps([*index, sid]))
        self._changed[sid] = trio.Event()
        self._ended[sid] = trio.Event()
        assert self._nursery is not None, "Agent.run first"
        self._nursery.start_soon(self._drive, sid, goal, search)
        log.info("search %s started: %s (%d start points, %d prior trials)", sid, goal.name,
                 len(starts), priors)
        return sid

    def _optuna_url(self) -> str | None:
        if self.home is None:
            return None
        directory = self.home / "agent"
        directory.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{directory / 'optuna.db'}"

    def resolve(self, prefix: str) -> str:
        p = prefix.strip().lower()
        matches = [s for s in self.docs if s.startswith(p)] if len(p) >= 4 else []
        if len(matches) != 1:
            raise UnknownSearch(f"{'no' if not matches else 'more than one'} search here "
                                f"starts with {prefix!r}")
        return matches[0]

    def list(self) -> list[dict[str, Any]]:
        out = []
        for sid, d in sorted(self.docs.items(), key=lambda kv: -kv[1]["created_ms"]):
            s = d["search"]
            out.append({"id": sid, "name": d["name"], "status": d["status"],
                        "created_ms": d["created_ms"], "branches": len(s["branches"]),
                        "spent_tasks": s["spent"]["tasks"],
                        "best": s["best"]["loss"] if s["best"] else None})
        return out

    def status(self, prefix: str) -> dict[str, Any]:
        return self.docs[self.resolve(prefix)]

    def ended(self, sid: str) -> trio.Event:
        return self._ended.setdefault(sid, trio.Event())

    async def stop(self, prefix: str) -> dict[str, Any]:
        sid = self.resolve(prefix)
        search = self.searches.get(sid)
        if search is None or self.docs[sid]["status"] != "running":
            raise NotRunning(f"search {sid} is not running ({self.docs[sid]['status']})")
        await self._call(sid, search.stop, "stopped by the user")
        self._changed[sid].set()
        await self.ended(sid).wait()
        return self.docs[sid]

    # -- memory ---------------------------------------------------------------------------

    def memory(self, goal: Goal) -> Memory:
        """Start points and prior trials for ``goal``: every branch of this node's earlier
        searches on the same key, and every round record on the chain of a job (any
        node's) on the same dataset and evaluation set that descends from a base."""
        key = goal.key()
        seen: dict[str, Start] = {}
        memory = Memory()
        stored = 0
        for d in self.docs.values():
            if d.get("key") != key:
                continue
            for b in d["search"]["branches"]:
                if not b["losses"]:
                    continue
                stored += 1
                memory.priors.append((b["params"], b["depth"] + len(b["losses"]),
                                      b["losses"][-1]))
                for i, (v, loss) in enumerate(zip(b["versions"], b["losses"], strict=True)):
                    seen.setdefault(v, Start(v, loss, b["depth"] + i + 1, b["params"],
                                             b.get("anneals", 0)))
        chained = 0
        for v, start in self._chain_versions(goal):
            chained += 1
            if v not in seen:
                seen[v] = start
                memory.priors.append((start.params or {}, start.depth, start.loss or 0.0))
        known = sorted((s for s in seen.values() if s.loss is not None
                        and self.runner.knows(s.version)), key=lambda s: s.loss or 0.0)
        memory.starts = known[:MAX_STARTS]
        memory.sources = {"stored_branches": stored, "chain_versions": chained}
        return memory

    def _chain_versions(self, goal: Goal) -> builtins.list[tuple[str, Start]]:
        if self.chain is None or self.jobs is None:
            return []
        ledger = self.chain.ledger
        out = []
        probe = goal.job_spec(name="memory", base=goal.base_models[0],
                              params=_first(goal), rounds=1)
        for jid, job in list(self.jobs.jobs.items()):
            spec = job.spec
            if (spec.dataset.hex(), spec.heldout_fraction, spec.seq_len, spec.seed,
                    spec.eval_batches) != (goal.dataset, probe.heldout_fraction,
                                           probe.seq_len, probe.seed, probe.eval_batches):
                continue
            params = {attr: getattr(spec, attr) for attr in SEARCHABLE}
            for r in range(spec.rounds):
                version = ledger.round_version(bytes.fromhex(jid), r)
                if version is None:
                    break
                lineage = ledger.lineage(version)
                if not lineage or lineage[-1][1].parent.hex() not in goal.base_models:
                    continue
                loss = lineage[0][1].heldout_loss_micro / 1e6
                out.append((version.hex(), Start(version.hex(), loss, len(lineage), params)))
        return out

    # -- driving a search -----------------------------------------------------------------

    async def _drive(self, sid: str, goal: Goal, search: Search) -> None:
        doc = self.docs[sid]
        try:
            async with trio.open_nursery() as nursery:
                while True:
                    free = min(goal.parallel, self.runner.slots(search.goal)) - len(
                        search.running)
                    for b in await self._call(sid, search.plan, max(0, free)):
                        nursery.start_soon(self._branch, sid, search, b)
                    async with self._locks[sid]:
                        doc["search"] = search.to_dict()
                    await self._put(sid)
                    if search.done:
                        break
                    # Something runs (plan ends the search otherwise): wait for news.
                    await self._changed[sid].wait()
                    self._changed[sid] = trio.Event()
                # Branches still running when the search ends (target reached, stop)
                # are left to their jobs; the search stops waiting on them.
                nursery.cancel_scope.cancel()
            await self._call(sid, search.abandon)
            doc["status"] = "stopped" if search.finished_reason == "stopped by the user" \
                else "done"
        except Exception as exc:  # a bug here ends this search, not the node
            log.exception("search %s failed", sid)
            doc["status"], doc["error"] = "failed", f"internal error: {exc!r}"
        doc["search"] = search.to_dict()
        doc["ended_ms"] = self.clock_ms()
        with trio.CancelScope(shield=True):
            await self._put(sid)
        self.searches.pop(sid, None)
        best = search.best
        log.info("search %s %s: %s; best %s", sid, doc["status"], search.finished_reason,
                 f"{best[0]:.4f} ({best[1][:16]})" if best else "none")
        self.ended(sid).set()

    async def _call(self, sid: str, fn: Callable[..., _T], *args: Any) -> _T:
        """A call into the search machine, in a thread: its advisor commits each trial
        event to sqlite (tens to hundreds of ms on a busy disk), which must not stall the
        node's network. The lock keeps the machine single-threaded."""
        async with self._locks[sid]:
            if self.home is None:  # studies in memory: microseconds, and deterministic
                return fn(*args)   # under a test's MockClock (no thread to wait on)
            return await trio.to_thread.run_sync(fn, *args)

    async def _branch(self, sid: str, search: Search, b: Branch) -> None:
        goal = search.goal
        doc = goal.job_doc(name=f"{goal.name} b{b.id}", base=b.start, params=b.params,
                           rounds=b.rounds)
        if b.depth:  # go on with the schedule (and momentum) of the rounds behind it
            doc["train"]["first_round"] = b.depth
        try:
            job = await self.runner.submit(doc)
            await self._call(sid, search.started, b.id, job)
            self._changed[sid].set()
            with trio.move_on_after(self.branch_timeout_s) as timer:
                outcome = await self.runner.wait(job)
            if timer.cancelled_caught:
                raise BranchLost(f"job {job[:16]} did not end in {self.branch_timeout_s:g} s")
        except BranchLost as exc:
            if b.status == "running":
                await self._call(sid, search.lost, b.id, str(exc), exc.tasks, exc.worker_s)
        else:
            async with self._locks[sid]:
                search.learn_loss(b.id, b.start, outcome.start_loss)
            if b.status == "running":
                await self._call(sid, search.finished, b.id, outcome.versions,
                                 outcome.losses, outcome.parents, outcome.tasks,
                                 outcome.worker_s)
        self._changed[sid].set()


def _first(goal: Goal) -> dict[str, Any]:
    return {d.name: (d.values[0] if d.kind != "range" else
                     (int(d.low) if d.integer else d.low)) for d in goal.space}


class JobsRunner:
    """Branches as jobs of this node's jobs service (its coordinator), on the network's
    workers found through their capability records."""

    def __init__(self, jobs: Any, models: Any, discovery: Any, peer_id: str) -> None:
        self.jobs = jobs
        self.models = models
        self.discovery = discovery
        self.peer_id = peer_id

    def slots(self, goal: Goal) -> int:
        workers = sum(1 for c in self.discovery.live_records()
                      if c.record.peer_id != self.peer_id)
        return max(1, workers // max(1, goal.most_workers_per_round()))

    def knows(self, version: str) -> bool:
        try:
            return self.models.info_of(bytes.fromhex(version)) is not None
        except ValueError:
            return False

    async def submit(self, doc: dict[str, Any]) -> str:
        from node.jobs.coordinator import JobError

        try:
            return str(await self.jobs.submit(doc_to_toml(doc)))
        except JobError as exc:
            raise BranchLost(f"the job was refused: {exc}") from None

    async def wait(self, job: str) -> Outcome:
        await self.jobs.ended(job).wait()
        s = self.jobs.status(job)
        rounds = s.get("rounds", [])
        tasks = sum(len(r["tasks"]) for r in rounds)
        worker_s = float(sum(r.get("train_s") or 0.0 for r in rounds))
        if s["status"] != "done":
            raise BranchLost(s.get("error") or s["status"], tasks, worker_s)
        made = [r for r in rounds if r.get("version")]
        start = rounds[0]["heldout_before"] if rounds else None
        return Outcome([r["version"] for r in made], [float(r["heldout_after"]) for r in made],
                       [r["base"] for r in made],
                       float(start) if start is not None else None, tasks, worker_s)
