"""The jobs service: submit training jobs and coordinate them (specs/jobs.md).

The node that submits a job coordinates it. For each round it

1. finds workers through their capability records (``Discovery.live_records``) that
   meet the job's requirements, waiting a little for enough of them;
2. plans the round's micro-tasks (protocol.coordination.plan_round) and lets
   protocol.coordination.RoundMachine decide who trains what; this module only opens
   the ``/iollm/task/1.0.0`` streams (node/jobs/worker.py is the other end), owns the
   deadlines and feeds the outcomes back to the machine;
3. fetches every submitted delta through SMIP and checks them in one child process
   (held-out gain, own-slice gain, copies, re-execution of a sample: node/jobs/taskproc.py);
4. signs a receipt for each accepted task and answers every worker with its verdict;
5. combines the accepted deltas (robust aggregate, Nesterov outer step, in a child
   process), publishes the new version with its parent link and the int8 outer update
   that lets workers rebuild it, and goes on from there.

The job's progress is a JSON document in the ``jobs`` table, written at the start and
end of every round, so a coordinator that restarts resumes its jobs at the round it was
in (that round's tasks are planned again identically and re-trained).
"""

from __future__ import annotations

import builtins
import json
import logging
import math
import random
import secrets
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import trio
from nacl.signing import SigningKey

from node.chain.service import Chain
from node.config import JobsSection
from node.discovery.service import Discovery
from node.drive import drive
from node.errors import NodeError, NotFound
from node.jobs.receipts import Receipts
from node.jobs.taskrun import TaskProcError, finite, run_taskproc
from node.jobs.worker import (
    BUSY_PREFIX,
    TASK_PROGRESS_PROTOCOL,
    TASK_PROTOCOL,
    materialize,
    meets_requirements,
)
from node.ml import catalog
from node.p2p import P2P, GossipMessage, PeerId, PeerInfo
from node.p2p.framing import FrameError, read_frame, reset_quietly, write_frame
from node.p2p.host import parse_multiaddr
from node.smip.service import Models
from node.smip.types import FetchError, PublishError
from node.storage import JobRow, Storage
from protocol.checking import passed_checks
from protocol.coordination import Assign, RoundMachine, plan_round
from protocol.errors import ProtocolError, RemoteProtocolError
from protocol.jobs import (
    MAX_REPLY_BYTES,
    MAX_RESULT_BYTES,
    Job,
    JobSpec,
    Prefetch,
    Receipt,
    TaskAssign,
    TaskProgress,
    TaskReply,
    TaskResult,
    Verdict,
    check_result,
    decode_worker_frame,
    job_id,
    open_job,
    parse_job_toml,
    receipt_id,
    round_version_name,
    seal_job,
    seal_receipt,
    update_version_name,
)
from protocol.ledger import RoundRecord
from protocol.scheduling import Sample, fit, record, size_round, slots_of
from protocol.smip import id_hex

log = logging.getLogger(__name__)

JOB_TOPIC = "/iollm/jobs/1"


class JobError(NodeError):
    """A job cannot be submitted as given (the message names the field)."""


class UnknownJob(NotFound, JobError):
    """No job known here has that id, or more than one starts with that prefix."""


@dataclass
class _Outcome:
    """What a task stream reports to the round loop."""

    kind: str  # "accepted", "refused", "lost", "submitted"
    assign: Assign
    result: TaskResult | None = None
    envelope: bytes = b""
    reason: str = ""


@dataclass
class _Pending:
    """A submitted task's stream, waiting for the verdict."""

    done: trio.Event = field(default_factory=trio.Event)
    verdict: Verdict | None = None


class Jobs:
    def __init__(self, net: P2P, key: SigningKey, storage: Storage, models: Models,
                 discovery: Discovery, receipts: Receipts, home: Path, *,
                 clock_ms: Callable[[], int], threads: int = 1,
                 chain: Chain | None = None, tunables: JobsSection | None = None) -> None:
        self.net = net
        self.key = key
        self.storage = storage
        self.models = models
        self.discovery = discovery
        self.receipts = receipts
        self.home = home
        self.clock_ms = clock_ms
        self.threads = threads
        self.tunables = tunables or JobsSection()  # timeouts and retries ([jobs] in config)
        self.peer_id = models.peer_id
        self.chain = chain  # where the job, its receipts and round records are recorded
        self.states: dict[str, dict[str, Any]] = {}  # job id hex -> progress (coordinated here)
        # job id hex -> the round under way: its phase and each task's worker, state and
        # the worker's last TaskProgress (for `job status --watch`; never stored).
        self.live: dict[str, dict[str, Any]] = {}
        self.jobs: dict[str, Job] = {}  # every job known here
        self._nursery: trio.Nursery | None = None
        self._ended: dict[str, trio.Event] = {}  # set when a job coordinated here ends

    # -- service ------------------------------------------------------------------------

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        subscription = await self.net.subscribe(JOB_TOPIC, self._gossip_validator)
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            for row in await self.storage.list_jobs():
                try:
                    job, _ = open_job(row.envelope)
                except RemoteProtocolError as exc:
                    log.warning("dropping stored job %s: %s", row.job_id[:16], exc)
                    continue
                self.jobs[row.job_id] = job
                if row.role == "coordinator" and row.state:
                    self.states[row.job_id] = json.loads(row.state)
                    if self.states[row.job_id]["status"] == "running":
                        log.info("resuming job %s", row.job_id[:16])
                        nursery.start_soon(self._coordinate, row.job_id, row.envelope)
            nursery.start_soon(self._receive_gossip, subscription)
            task_status.started()
            await trio.sleep_forever()

    def _gossip_validator(self, sender: PeerId, message: GossipMessage) -> bool:
        try:
            open_job(message.data)
        except RemoteProtocolError:
            return False
        return True

    async def _receive_gossip(self, subscription: Any) -> None:
        while True:
            message = await subscription.get()
            try:
                job, _ = open_job(message.data)
            except RemoteProtocolError:
                continue
            jid = job_id(message.data).hex()
            if jid not in self.jobs:
                self.jobs[jid] = job
                await self.storage.put_job(JobRow(jid, message.data, "seen", job.submitted_ms,
                                                  "", self.clock_ms()))

    # -- submitting ---------------------------------------------------------------------

    async def submit(self, text: str) -> str:
        """Parse, check, sign and start a job; its id (hex). JobError on a bad spec."""
        try:
            spec = parse_job_toml(text)
        except ValueError as exc:  # JobSpecError names the field
            raise JobError(str(exc)) from None
        for name in ("base_model", "dataset"):
            version = getattr(spec, name)
            if self.models.info_of(version) is None:
                raise JobError(f"{name}: version {id_hex(version)[:16]} is not known here "
                               f"(publish it, or wait for its announcement)")
        held = self.models.held.get(spec.base_model)
        if held is not None:
            check_base(spec, held.manifest.config)
        job = Job(spec=spec, coordinator=self.peer_id, submitted_ms=self.clock_ms())
        envelope = seal_job(self.key, job)
        jid = job_id(envelope).hex()
        self.jobs[jid] = job
        self.states[jid] = {"status": "running", "error": "", "round": 0,
                            "base": spec.base_model.hex(), "update": None, "update_parent": None,
                            "momentum": None, "best_loss": None, "rounds": []}
        await self._save(jid, envelope)
        await self._record("job", envelope)
        try:
            await self.net.publish(JOB_TOPIC, envelope)
        except Exception as exc:  # gossip is best effort; the job runs regardless
            log.info("announcing job %s failed: %r", jid[:16], exc)
        assert self._nursery is not None
        self._nursery.start_soon(self._coordinate, jid, envelope)
        log.info("submitted job %s (%s)", jid[:16], spec.name)
        return jid

    async def _save(self, jid: str, envelope: bytes) -> None:
        job = self.jobs[jid]
        await self.storage.put_job(JobRow(jid, envelope, "coordinator", job.submitted_ms,
                                          json.dumps(self.states[jid]), self.clock_ms()))

    # -- queries ------------------------------------------------------------------------

    def list(self) -> list[dict[str, Any]]:
        out = []
        for jid, job in sorted(self.jobs.items(), key=lambda kv: -kv[1].submitted_ms):
            state = self.states.get(jid)
            out.append({"job": jid, "name": job.spec.name, "coordinator": job.coordinator,
                        "submitted_ms": job.submitted_ms,
                        "status": state["status"] if state else "elsewhere",
                        "round": state["round"] if state else None,
                        "rounds": job.spec.rounds})
        return out

    def status(self, jid: str) -> dict[str, Any]:
        matches = [j for j in self.jobs if j.startswith(jid.lower())] if len(jid) >= 8 else []
        if len(matches) != 1:
            raise UnknownJob(f"{'no' if not matches else 'more than one'} job known here "
                           f"starts with {jid!r}")
        jid = matches[0]
        job = self.jobs[jid]
        return {"job": jid, "name": job.spec.name, "coordinator": job.coordinator,
                "submitted_ms": job.submitted_ms, "spec": spec_summary(job.spec),
                "coordinated_here": jid in self.states, **(self.states.get(jid) or {}),
                **({"live": _live_view(self.live[jid])} if jid in self.live else {})}

    # -- coordinating -------------------------------------------------------------------

    async def _coordinate(self, jid: str, envelope: bytes) -> None:
        state, job = self.states[jid], self.jobs[jid]
        job_dir = self.home / "jobs" / jid[:32]
        job_dir.mkdir(parents=True, exist_ok=True)
        try:
            dataset = await self._fetch(job.spec.dataset.hex())
            job.spec.train_split(dataset.manifest.total_size)  # too small to split: fails now
            if state["round"] == 0:
                check_base(job.spec, (await self._fetch(state["base"])).manifest.config)
                if job.spec.first_round and state["momentum"] is None:
                    state["momentum"] = inherit_momentum(self.states, jid, job_dir)
            empty = 0
            while state["round"] < job.spec.rounds:
                await self._fetch(state["base"])
                record = await self._round(jid, envelope, job, state, dataset, job_dir)
                if all(t["verdict"] == "failed" for t in record["tasks"]):
                    # Nobody finished anything (workers busy with other jobs, or all gone):
                    # the round is tried again rather than spent.
                    empty += 1
                    if empty > self.tunables.empty_round_retries:
                        raise JobError(f"round {state['round']}: no worker completed a task "
                                       f"in {empty} tries")
                    log.warning("job %s round %d: no task completed; trying again in %g s",
                                jid[:16], state["round"], self.tunables.empty_round_pause_s)
                    await trio.sleep(self.tunables.empty_round_pause_s)
                    continue
                empty = 0
                if record.get("version") and self.chain is not None:
                    await self._record("round", self._round_record(jid, record))
                state["rounds"].append(record)
                state["round"] += 1
                await self._save(jid, envelope)
            state["status"] = "done"
            log.info("job %s done: %d rounds, final version %s", jid[:16], job.spec.rounds,
                     state["base"][:16])
        except (FetchError, PublishError, TaskProcError, JobError, ProtocolError) as exc:
            state["status"], state["error"] = "failed", str(exc)
            log.warning("job %s failed: %s", jid[:16], exc)
        except Exception as exc:  # a bug here must end this job, not the node's other work
            log.exception("job %s failed", jid[:16])
            state["status"], state["error"] = "failed", f"internal error: {exc!r}"
        with trio.CancelScope(shield=True):
            await self._save(jid, envelope)
        self.ended(jid).set()

    async def _record(self, kind: str, payload: bytes) -> None:
        """Submit a ledger transaction of this job to the chain, if this node follows one.
        The chain keeps it until final (its outbox); a refusal here is a bug of ours."""
        if self.chain is None:
            return
        try:
            await self.chain.submit(kind, payload)
        except ProtocolError as exc:
            log.error("the chain refused this node's %s tx: %s", kind, exc)

    def _round_record(self, jid: str, record: dict[str, Any]) -> bytes:
        """The signed record of a finished round: the version it made from which parent,
        both held-out losses, and the receipts it accepted (specs/rewards.md)."""
        assert self.chain is not None
        after = record["heldout_after"]
        before = record["heldout_before"] if record["heldout_before"] is not None else after
        return RoundRecord(
            chain_id=self.chain.genesis.chain_id, job_id=bytes.fromhex(jid),
            round=record["round"], coordinator=self.peer_id,
            version=bytes.fromhex(record["version"]), parent=bytes.fromhex(record["base"]),
            heldout_loss_micro=round(after * 1e6), parent_loss_micro=round(before * 1e6),
            receipts=tuple(bytes.fromhex(r) for r in record["receipts"])).seal(self.key)

    def ended(self, jid: str) -> trio.Event:
        """Set once the job coordinated here is done or failed."""
        return self._ended.setdefault(jid, trio.Event())

    async def _fetch(self, version: str, hint: builtins.list[PeerId] | None = None) -> Any:
        await self.models.fetch(version, hint=hint or [])
        return self.models.held[bytes.fromhex(version)]

    def _candidates(self, job: Job) -> dict[str, int]:
        """Every peer that may take tasks of ``job``, with its slots (one per GPU)."""
        return {c.record.peer_id: slots_of(c.record.env, job.spec.device)
                for c in sorted(self.discovery.live_records(), key=lambda c: c.record.peer_id)
                if c.record.peer_id != self.peer_id
                and not meets_requirements(job, c.record.env)}

    def _claimed_tflops(self, peer: str) -> float | None:
        cap = self.discovery.local_record(peer)
        return cap.record.env.tflops if cap is not None else None

    async def _wait_for_workers(self, job: Job) -> dict[str, int]:
        with trio.move_on_after(self.tunables.no_worker_timeout_s):
            waited = 0.0
            while True:
                found = self._candidates(job)
                if sum(found.values()) >= job.spec.workers_per_round or (
                        found and waited >= self.tunables.worker_grace_s):
                    return found
                await trio.sleep(self.tunables.worker_poll_s / 4)
                waited += self.tunables.worker_poll_s / 4
        raise JobError(f"no worker meeting the requirements appeared in "
                       f"{self.tunables.no_worker_timeout_s:g} s")

    async def _round(self, jid: str, envelope: bytes, job: Job, state: dict[str, Any],
                     dataset: Any, job_dir: Path) -> dict[str, Any]:
        spec, r = job.spec, state["round"]
        started = self.clock_ms()
        train_len = spec.train_split(dataset.manifest.total_size)
        workers = await self._wait_for_workers(job)
        # Each task sized to the worker slot it is meant for, by the times measured on
        # this job's accepted tasks (protocol/scheduling.py): the round's tasks end
        # together, and a worker whose fixed cost alone would make the round wait is left
        # out of it. The book is the state's as saved at the last round's end, so a
        # resumed round is sized as it was.
        book = state.setdefault("throughput", {})
        measured = {p: [Sample(*s) for s in v.get("samples", ())] for p, v in book.items()}
        plan = size_round(workers, measured, n_tasks=spec.workers_per_round,
                          inner_steps=spec.inner_steps,
                          tokens_per_step=spec.batch_size * spec.seq_len,
                          out_rounds={p: v.get("out", 0) for p, v in book.items()})
        # A worker is out when none of its slots got a task; it still takes a task whose
        # worker is gone (the round's machine offers it to any candidate).
        sized = plan.tasks
        working = {s.worker for s in sized}
        left_out = sorted({w for w, _ in plan.left_out} - working)
        for w in working:
            book.setdefault(w, {})["out"] = 0
        for w in left_out:
            book.setdefault(w, {})["out"] = book[w].get("out", 0) + 1
        tasks = plan_round(job_seed=spec.seed, round_=r, rounds=spec.rounds,
                           n_tasks=len(sized), train_len=train_len,
                           min_slice=spec.seq_len + 2, steps=[s.steps for s in sized],
                           first_round=spec.first_round)
        log.info("job %s round %d: %d tasks (steps %s), %d candidate workers%s%s", jid[:16],
                 r, len(tasks), ",".join(str(s.steps) for s in sized), len(workers),
                 f", {len(left_out)} left out ({', '.join(w[-6:] for w in left_out)})"
                 if left_out else "",
                 f", predicted to end in {float(plan.target_ms) / 1000:.1f} s"
                 if any(measured.values()) else "")
        machine = RoundMachine(tasks, workers,
                               offer_timeout_ms=int(self.tunables.offer_timeout_s * 1000),
                               task_timeout_ms=int(spec.task_timeout_s * 1000),
                               max_attempts=self.tunables.max_attempts,
                               busy_retry_ms=int(self.tunables.busy_retry_s * 1000),
                               max_busy=self.tunables.max_busy,
                               rng=random.Random(spec.seed * 1_000_003 + r),
                               capacity=workers,
                               preferred={t.task_id: s.worker
                                          for t, s in zip(tasks, sized, strict=True)})
        taken_ms: dict[tuple[str, str], int] = {}  # (task, worker) -> when it was taken
        elapsed_ms: dict[str, int] = {}  # task -> taken to result, as seen from here
        send, recv = trio.open_memory_channel[_Outcome](math.inf)
        pending: dict[tuple[str, str], _Pending] = {}
        arrivals: list[str] = []  # task ids, in the order their results were taken
        records: dict[str, Any] = {}
        live: dict[str, Any] = {"round": r, "phase": "training", "started_ms": started,
                                "tasks": {}}
        self.live[jid] = live
        base = bytes.fromhex(state["base"])
        update = bytes.fromhex(state["update"]) if state["update"] else None
        parent = bytes.fromhex(state["update_parent"]) if state["update_parent"] else None

        async with trio.open_nursery() as nursery:
            def launch(assigns: list[Assign]) -> None:
                for a in assigns:
                    p = pending[(a.task.task_id, a.worker)] = _Pending()
                    live["tasks"][a.task.task_id] = {
                        "task": a.task.task_id, "worker": a.worker, "state": "offered",
                        "since_ms": self.clock_ms(), "steps": a.task.steps or spec.inner_steps}
                    msg = TaskAssign(
                        job=envelope, round=r, task_id=a.task.task_id,
                        worker=a.worker, base_version=base, dataset_version=spec.dataset,
                        slice_start=a.task.slice_start, slice_len=a.task.slice_len,
                        seed=a.task.seed, inner_steps=a.task.steps or spec.inner_steps,
                        batch_size=spec.batch_size, seq_len=spec.seq_len, lr=spec.lr,
                        deadline_ms=a.deadline_ms, update_version=update,
                        update_parent=parent)
                    nursery.start_soon(self._offer, a, msg, p, send,
                                       partial(_on_progress, live["tasks"], a.worker))

            offered = self.clock_ms()
            launch(machine.start(offered))

            async def on_outcome(outcome: _Outcome) -> None:
                now = self.clock_ms()
                tid, w = outcome.assign.task.task_id, outcome.assign.worker
                view = live["tasks"].get(tid)
                if view is not None and view["worker"] == w:
                    view.update(state=_LIVE_STATE[outcome.kind], since_ms=now,
                                reason=outcome.reason[:120])
                    if outcome.result is not None:
                        view.update(loss=outcome.result.last_loss, step=view["steps"],
                                    tokens=outcome.result.tokens,
                                    wall_ms=outcome.result.wall_ms)
                if outcome.kind == "accepted":
                    taken_ms[(tid, w)] = now
                    launch(machine.on_accepted(tid, w, now))
                elif outcome.kind == "refused":
                    log.info("task %s refused by %s: %s", tid, w, outcome.reason)
                    launch(machine.on_refused(tid, w, now,
                                              busy=outcome.reason.startswith(BUSY_PREFIX)))
                elif outcome.kind == "lost":
                    log.info("task %s lost by %s: %s", tid, w, outcome.reason)
                    launch(machine.on_lost(tid, w, now))
                else:
                    launch(machine.on_submitted(tid, w, outcome, now))
                    if machine.submitted().get(tid, (None, None))[1] is outcome:
                        arrivals.append(tid)
                        if (tid, w) in taken_ms:  # the reply and the result may cross
                            elapsed_ms[tid] = now - taken_ms[(tid, w)]
                    else:
                        self._answer(pending, tid, w, Verdict.reject(
                            tid, "too late: the task went to another worker"))

            hinted = set(workers)  # who holds (or is fetching) this round's base

            async def on_wake(now: int, ticked: bool) -> None:
                if ticked:  # new workers may have come since the round started
                    for w, slots in self._candidates(job).items():
                        if w not in hinted:  # a newcomer: fetch now, train next round
                            hinted.add(w)
                            nursery.start_soon(self._hint, Prefetch(envelope, w, base))
                        launch(machine.add_worker(w, now, slots))
                launch(machine.on_tick(now))

            await drive(recv, clock_ms=self.clock_ms, deadline_ms=machine.next_deadline,
                        tick_s=self.tunables.worker_poll_s, on_item=on_outcome, on_wake=on_wake,
                        done=lambda: machine.done)
            trained = self.clock_ms()  # every task submitted or failed: the round's train phase
            # In arrival order: of a delta and its copy, the later arrival is the copy.
            taken = machine.submitted()
            submitted: dict[str, _Outcome] = {t: taken[t][1] for t in arrivals}
            for tid in machine.failed():
                records[tid] = {"task": tid, "worker": None, "verdict": "failed",
                                "reason": "no worker completed it"}
            live["phase"] = "checking"
            check = await self._check(jid, job, state, dataset, job_dir, tasks, submitted)
            accepted, receipt_ids, weights = [], [], []
            thresholds = _thresholds(spec)
            steps_of = {t.task_id: t.steps or spec.inner_steps for t in tasks}
            for tid, outcome in submitted.items():
                assert outcome.result is not None
                res, verdict = outcome.result, check["deltas"].get(tid, {})
                ok = verdict.get("verdict") == "accept"
                reason = verdict.get("reason", "not checked")
                receipt = None
                metrics = {k: float(v) for k, v in verdict.items()
                           if k in ("heldout_gain", "own_gain", "other_gain", "max_cosine")
                           and isinstance(v, (int, float)) and math.isfinite(v)}
                if ok:
                    receipt = seal_receipt(self.key, Receipt(
                        job_id=bytes.fromhex(jid), round=r, task_id=tid, worker=res.worker,
                        coordinator=self.peer_id, delta_version=res.delta_version,
                        tokens=res.tokens, metrics=metrics, verdict="accepted",
                        result=outcome.envelope, issued_ms=self.clock_ms()))
                    await self.receipts.store(receipt)
                    await self._record("receipt", receipt)
                    receipt_ids.append(receipt_id(receipt).hex())
                    accepted.append(verdict["path"])
                    weights.append(res.tokens)  # check_result: the assignment's tokens
                    self._measure(state, res.worker, res.tokens, elapsed_ms.get(tid))
                self._answer(pending, tid, res.worker,
                             Verdict(tid, True, "", receipt) if ok else Verdict.reject(tid, reason))
                records[tid] = {"task": tid, "worker": res.worker,
                                "verdict": "accepted" if ok else "rejected",
                                "reason": "" if ok else reason,
                                "delta": res.delta_version.hex(), "first_loss": res.first_loss,
                                "last_loss": res.last_loss, "tokens": res.tokens,
                                "wall_ms": res.wall_ms, "metrics": metrics,
                                "checks": passed_checks(verdict, thresholds) if ok else [],
                                "steps": steps_of[tid], "elapsed_ms": elapsed_ms.get(tid)}
            for p in pending.values():  # streams still open without a verdict: end them
                p.done.set()
        record: dict[str, Any] = {
            "round": r, "base": state["base"], "started_ms": started, "offered_ms": offered,
            "trained_ms": trained,
            "heldout_before": check.get("heldout_base"), "check_s": check.get("check_wall_s"),
            "reexec_s": check.get("reexec_wall_s"), "reexec": check.get("reexec", 0),
            "train_s": sum(t.get("wall_ms", 0) for t in records.values()) / 1000,
            "tasks": [records[t] for t in sorted(records)], "accepted": len(accepted),
            "receipts": receipt_ids, "workers": self._throughput_record(state, records),
            "left_out": left_out}
        live["phase"] = "merging"
        if accepted:
            await self._outer(jid, job, state, dataset, job_dir, accepted, record, weights)
        else:
            log.warning("job %s round %d: no delta accepted; the base stays", jid[:16], r)
            record.update(version=None, heldout_after=record["heldout_before"])
        record["ended_ms"] = self.clock_ms()
        self.live.pop(jid, None)
        for d in job_dir.glob(f"r{r}-*"):
            shutil.rmtree(d, ignore_errors=True)
        return record

    def _measure(self, state: dict[str, Any], worker: str, tokens: int,
                 elapsed: int | None) -> None:
        """One more accepted task of ``worker``: its samples in the job's state (saved with
        the round, so a resumed job sizes its rounds as before)."""
        if elapsed is None or tokens < 1:
            return
        row = state.setdefault("throughput", {}).setdefault(worker, {})
        samples = record([Sample(*s) for s in row.get("samples", ())], tokens, elapsed)
        row["samples"] = [[s.tokens, s.elapsed_ms] for s in samples]

    def _throughput_record(self, state: dict[str, Any], records: dict[str, Any]
                           ) -> dict[str, Any]:
        """Per worker of the round: what it was given and delivered (steps, tokens, the
        tokens per second this round, as measured here), its fitted time per task after
        the round (``overhead_s`` plus tokens at ``fit_tokens_per_s``), beside the TFLOP/s
        its capability record claims (never used for sizing)."""
        out: dict[str, Any] = {}
        for t in records.values():
            w = t.get("worker")
            if w is None:
                continue
            row = out.setdefault(w, {"tasks": 0, "steps": 0, "tokens": 0, "elapsed_ms": 0,
                                     "claimed_tflops": self._claimed_tflops(w)})
            if t["verdict"] == "accepted" and t.get("elapsed_ms"):
                row["tasks"] += 1
                row["steps"] += t.get("steps") or 0
                row["tokens"] += t["tokens"]
                row["elapsed_ms"] += t["elapsed_ms"]
        for w, row in out.items():
            row["tokens_per_s"] = (row["tokens"] * 1000 / row["elapsed_ms"]
                                   if row["elapsed_ms"] else None)
            samples = (state.get("throughput") or {}).get(w, {}).get("samples", ())
            model = fit([Sample(*s) for s in samples])
            row["overhead_s"] = None if model is None else float(model.overhead_ms) / 1000
            row["fit_tokens_per_s"] = None if model is None else model.tokens_per_s
        return out

    def _answer(self, pending: dict[tuple[str, str], _Pending], tid: str, worker: str,
                verdict: Verdict) -> None:
        p = pending.get((tid, worker))
        if p is not None and not p.done.is_set():
            p.verdict = verdict
            p.done.set()

    async def _offer(self, a: Assign, msg: TaskAssign, p: _Pending,
                     send: trio.MemorySendChannel[_Outcome],
                     on_progress: Callable[[TaskProgress], None]) -> None:
        """One task stream: assignment, reply, progress (on 1.1.0), result, verdict."""
        stream = None
        try:
            with trio.fail_after(self.tunables.offer_timeout_s):
                for attempt in range(self.tunables.offer_tries):
                    try:
                        stream = await self._open(a.worker)
                        await write_frame(stream, msg.encode(), self.tunables.offer_timeout_s)
                        reply = TaskReply.decode(await read_frame(stream, MAX_REPLY_BYTES,
                                                                  self.tunables.offer_timeout_s))
                        break
                    except Exception as exc:  # FrameError, OSError, a failed dial
                        # py-libp2p drops one of two connections dialled at once in both
                        # directions, and the stream on it: one more try on a fresh one.
                        if (attempt + 1 == self.tunables.offer_tries
                                or isinstance(exc, RemoteProtocolError)):
                            raise
                        log.debug("offer of %s to %s failed (%r); again", a.task.task_id,
                                  a.worker, exc)
                        if stream is not None:
                            await reset_quietly(stream)
                            stream = None
                        await trio.sleep(self.tunables.offer_retry_s)
            assert stream is not None  # the loop above ends with a stream, or raises
            if reply.task_id != a.task.task_id:
                raise RemoteProtocolError("malformed", "the reply names another task")
            if not reply.accepted:
                await send.send(_Outcome("refused", a, reason=reply.reason))
                await stream.close()
                return
            await send.send(_Outcome("accepted", a))
            while True:
                left = max(1.0, (a.deadline_ms - self.clock_ms()) / 1000)
                data = await read_frame(stream, MAX_RESULT_BYTES, left)
                frame = decode_worker_frame(data)
                if isinstance(frame, TaskResult):
                    result = frame
                    break
                if frame.task_id == a.task.task_id:
                    on_progress(frame)
            check_result(result, msg)  # the assigned worker's signature, for this task
            await send.send(_Outcome("submitted", a, result, data))
            await p.done.wait()
            if p.verdict is not None:
                await write_frame(stream, p.verdict.encode(), self.tunables.verdict_write_timeout_s)
            await stream.close()
        except (Exception, trio.TooSlowError) as exc:
            if not isinstance(exc, (FrameError, RemoteProtocolError, trio.TooSlowError,
                                    OSError)):
                log.debug("task stream to %s: %r", a.worker, exc)
            await send.send(_Outcome("lost", a, reason=repr(exc)[:200]))
            if stream is not None:
                await reset_quietly(stream)

    async def _hint(self, msg: Prefetch) -> None:
        """Tell a worker that joined mid-round which version this round trains from, so
        that it fetches it (and the dataset) while the round runs (specs/jobs.md,
        "Elastic jobs"). Best effort: a worker that misses it fetches at its first task."""
        stream = None
        try:
            with trio.fail_after(self.tunables.offer_timeout_s):
                stream = await self._open(msg.worker)
                await write_frame(stream, msg.encode(), self.tunables.offer_timeout_s)
                await stream.close()
            log.info("hinted %s to prefetch %s", msg.worker, msg.base_version.hex()[:16])
        except (Exception, trio.TooSlowError) as exc:
            log.info("prefetch hint to %s failed: %r", msg.worker, exc)
            if stream is not None:
                await reset_quietly(stream)

    async def _open(self, worker: str) -> Any:
        peer = PeerId.from_base58(worker)
        if peer not in self.net.connected_peers():
            cap = self.discovery.local_record(worker)
            addrs = [parse_multiaddr(a) for a in cap.record.addrs] if cap else []
            await self.net.connect(PeerInfo(peer, addrs), timeout=self.tunables.offer_timeout_s)
        return await self.net.open_stream(peer, [TASK_PROGRESS_PROTOCOL, TASK_PROTOCOL])

    # -- checking and the outer step ------------------------------------------------------

    async def _check(self, jid: str, job: Job, state: dict[str, Any], dataset: Any,
                     job_dir: Path, tasks: builtins.list[Any], submitted: dict[str, _Outcome]
                     ) -> dict[str, Any]:
        """Fetch the deltas and check them all in one child process. Returns its answer,
        with ``deltas[task id]`` holding each verdict and the delta's file ``path``."""
        spec, r = job.spec, state["round"]
        base = self.models.held[bytes.fromhex(state["base"])]
        model_dir = job_dir / f"r{r}-base"
        materialize(self.models, base, model_dir)
        data_files = [str(self.models.store.shard_path(s.root)) for s in dataset.manifest.shards]
        plans = {t.task_id: t for t in tasks}
        steps = {t.task_id: t.steps or spec.inner_steps for t in tasks}  # as assigned
        paths: dict[str, str] = {}
        failed: dict[str, str] = {}

        async def fetch(tid: str, outcome: _Outcome) -> None:
            assert outcome.result is not None
            try:
                with trio.fail_after(self.tunables.fetch_delta_timeout_s):
                    # A busy worker's answer is late.
                    for delay in (*self.tunables.fetch_retries_s, None):
                        try:
                            held = await self._fetch(outcome.result.delta_version.hex(),
                                                     hint=[PeerId.from_base58(outcome.assign.worker)])
                            break
                        except FetchError:
                            if delay is None:
                                raise
                            await trio.sleep(delay)
                if len(held.manifest.shards) != 1:
                    raise FetchError("a delta is one safetensors file")
                paths[tid] = str(self.models.store.shard_path(held.manifest.shards[0].root))
            except (FetchError, trio.TooSlowError) as exc:
                failed[tid] = f"the delta could not be fetched: {exc}"

        async with trio.open_nursery() as nursery:
            for tid, outcome in submitted.items():
                nursery.start_soon(fetch, tid, outcome)
        rng = random.Random(f"{jid}/{r}/reexec")
        train_fields = {"model_dir": str(model_dir), "data_files": data_files,
                        "batch_size": spec.batch_size,
                        "seq_len": spec.seq_len, "lr": spec.lr, "device": "cpu",
                        "threads": self.threads, "delta_bits": spec.delta_bits,
                        "memory": spec.memory}
        reexec = [{"id": tid, "train": dict(train_fields, op="train",
                                            slice_start=plans[tid].slice_start,
                                            slice_len=plans[tid].slice_len,
                                            seed=plans[tid].seed, steps=steps[tid])}
                  for tid in sorted(paths) if rng.random() < spec.reexec_fraction]
        answer: dict[str, Any] = {"results": {}, "check_wall_s": 0.0, "reexec_wall_s": 0.0}
        if paths:
            request = {
                "op": "check", "model_dir": str(model_dir), "data_files": data_files,
                "heldout_fraction": spec.heldout_fraction, "eval_batches": spec.eval_batches,
                "batch_size": spec.batch_size, "seq_len": spec.seq_len,
                "seed": spec.seed,  # the same held-out windows every round: comparable losses
                # Which trained windows are measured is drawn only now, after the deltas are
                # in: a worker that could predict them could train on those alone.
                "window_seed": secrets.randbits(62),
                "threads": self.threads,
                "deltas": [{"id": tid, "path": p, "slice_start": plans[tid].slice_start,
                            "slice_len": plans[tid].slice_len, "seed": plans[tid].seed,
                            "steps": steps[tid], "batch_size": spec.batch_size,
                            "seq_len": spec.seq_len}
                           for tid in submitted if (p := paths.get(tid)) is not None],
                "reexec": reexec,
                "thresholds": _thresholds(spec),
            }
            answer = await run_taskproc(request, timeout_s=self.tunables.check_timeout_s,
                                        what="checking")
        verdicts: dict[str, dict[str, Any]] = answer["results"]
        for tid, p in paths.items():
            verdicts.setdefault(tid, {"verdict": "reject", "reason": "not checked"})
            verdicts[tid]["path"] = p
        for tid, reason in failed.items():
            verdicts[tid] = {"verdict": "reject", "reason": reason}
        bases = [v["heldout_base"] for v in verdicts.values()
                 if isinstance(v.get("heldout_base"), (int, float))]
        return {"deltas": verdicts, "heldout_base": bases[0] if bases else None,
                "check_wall_s": answer["check_wall_s"], "reexec_wall_s": answer["reexec_wall_s"],
                "reexec": len(reexec)}

    async def _outer(self, jid: str, job: Job, state: dict[str, Any], dataset: Any,
                     job_dir: Path, accepted: builtins.list[str], record: dict[str, Any],
                     weights: builtins.list[int]) -> None:
        spec, r = job.spec, state["round"]
        model_dir = job_dir / f"r{r}-base"
        out_dir, update = job_dir / f"r{r}-new", job_dir / f"r{r}-update" / "update.safetensors"
        momentum = job_dir / f"momentum-r{r}.safetensors"
        update.parent.mkdir(parents=True, exist_ok=True)
        answer = await run_taskproc({
            "op": "outer", "model_dir": str(model_dir), "deltas": accepted,
            "momentum": state["momentum"], "outer_lr": spec.outer_lr,
            "outer_momentum": spec.outer_momentum, "aggregate": "trimmed",
            # Each delta weighs the tokens behind it (tasks are sized to their workers).
            "weights": weights,
            "delta_bits": spec.delta_bits, "out_model_dir": str(out_dir), "out_update": str(update),
            "out_momentum": str(momentum),
            "data_files": [str(self.models.store.shard_path(s.root))
                           for s in dataset.manifest.shards],
            "heldout_fraction": spec.heldout_fraction, "eval_batches": spec.eval_batches,
            "batch_size": spec.batch_size, "seq_len": spec.seq_len, "seed": spec.seed,
            "threads": self.threads}, timeout_s=self.tunables.outer_timeout_s,
            what="the outer step")
        new = await self.models.publish(out_dir, kind="model",
                                        name=round_version_name(spec.name, r),
                                        parents=[state["base"]])
        upd = await self.models.publish(update, kind="model",
                                        name=update_version_name(spec.name, r))
        loss = finite(answer.get("heldout_loss"), "heldout_loss")
        record.update(version=new, update=upd, heldout_after=loss)
        old_momentum = state["momentum"]
        state.update(base=new, update=upd, update_parent=state["base"], momentum=str(momentum),
                     best_loss=loss if state["best_loss"] is None else min(state["best_loss"],
                                                                           loss))
        if old_momentum:
            Path(old_momentum).unlink(missing_ok=True)
        log.info("job %s round %d: %d accepted, held-out %.4f -> %.4f, version %s", jid[:16],
                 r, len(accepted), record["heldout_before"] or float("nan"), loss, new[:16])


def inherit_momentum(states: Mapping[str, Mapping[str, Any]], jid: str, job_dir: Path
                     ) -> str | None:
    """For a job that continues another (``train.first_round`` > 0): a copy, in its
    ``job_dir``, of the final outer momentum of a finished job of this coordinator whose
    final version is this job's base (specs/jobs.md, "Continuing a job"); None when there
    is none, and the job starts from zero momentum as any job does."""
    base = states[jid]["base"]
    for other, st in states.items():
        src = st.get("momentum")
        if other == jid or st.get("status") != "done" or st.get("base") != base or not src:
            continue
        if Path(src).is_file():
            dst = job_dir / "momentum-inherited.safetensors"
            shutil.copyfile(src, dst)
            log.info("job %s continues job %s's outer momentum", jid[:16], other[:16])
            return str(dst)
    return None


def _thresholds(spec: JobSpec) -> dict[str, float]:
    """The job's overrides of protocol/checking.py's thresholds."""
    return {"min_heldout_gain": spec.heldout_tolerance, "max_cosine": spec.max_cosine}


_LIVE_STATE = {"accepted": "training", "refused": "refused", "lost": "lost",
               "submitted": "submitted"}


def _on_progress(tasks: dict[str, Any], worker: str, progress: TaskProgress) -> None:
    """A worker's TaskProgress, into the live view of its task (if it still holds it)."""
    view = tasks.get(progress.task_id)
    if view is not None and view["worker"] == worker and view["state"] == "training":
        view.update(step=progress.step, steps=progress.steps, loss=progress.loss,
                    tokens=progress.tokens, wall_ms=progress.wall_ms)


def _live_view(live: dict[str, Any]) -> dict[str, Any]:
    return {"round": live["round"], "phase": live["phase"], "started_ms": live["started_ms"],
            "tasks": [dict(t) for _, t in sorted(live["tasks"].items())]}


def check_base(spec: JobSpec, config: dict[str, Any]) -> None:
    """JobError unless the workers can train ``spec`` on a model of this config."""
    why = catalog.is_trainable_config(config)
    if why:
        raise JobError(f"base_model: {why}")
    block = catalog.context_length(config)
    if block is not None and spec.seq_len > block:
        raise JobError(f"train.seq_len: {spec.seq_len} is longer than the model's context "
                       f"({block})")


def spec_summary(spec: JobSpec) -> dict[str, Any]:
    return {"base_model": spec.base_model.hex(), "dataset": spec.dataset.hex(),
            "rounds": spec.rounds,
            "workers_per_round": spec.workers_per_round, "inner_steps": spec.inner_steps,
            "batch_size": spec.batch_size, "seq_len": spec.seq_len, "lr": spec.lr,
            "outer_lr": spec.outer_lr, "outer_momentum": spec.outer_momentum,
            "reward_pool": spec.reward_pool, "designer_share_bps": spec.designer_share_bps,
            "first_round": spec.first_round, "memory": spec.memory}
