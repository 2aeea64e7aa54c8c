"""The worker service: take micro-tasks of other nodes' jobs (specs/jobs.md, "Worker").

One stream of ``/iollm/task/1.0.0`` per task, opened by the job's coordinator:

    coordinator                          worker
    TaskAssign  ───────────────────────▶ checks the job, its requirements, capacity
                ◀─────────────────────── TaskReply (accepted, or refused and why)
                                         fetches base and dataset (SMIP), trains in a
                                         child process, publishes the delta (SMIP)
                ◀─────────────────────── TaskResult, sealed by the worker
    Verdict     ───────────────────────▶ a receipt when accepted: stored, and appended
                                         to this node's feed

A broken stream at any point ends the task here; the coordinator gives the task to
another worker. The torch work runs in ``python -m node.jobs.taskproc`` (node/jobs/taskrun.py).
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio
from nacl.signing import SigningKey

from node.config import JobsSection, WorkerSection
from node.jobs.receipts import Receipts
from node.jobs.taskrun import StepProgress, TaskProcError, finite, run_taskproc
from node.p2p import P2P, PeerId, ProtocolId
from node.p2p.framing import FrameError, read_frame, reset_quietly, write_frame
from node.smip.service import Models
from node.smip.types import FetchError, HeldVersion, PublishError
from protocol.capability import EnvReport, GpuInfo, vram_at_least
from protocol.errors import RemoteProtocolError
from protocol.jobs import (
    MAX_ASSIGN_BYTES,
    MAX_LOSS,
    MAX_VERDICT_BYTES,
    Job,
    Prefetch,
    TaskAssign,
    TaskProgress,
    TaskReply,
    TaskResult,
    Verdict,
    check_assign,
    check_prefetch,
    decode_message,
    delta_version_name,
    seal_task_result,
)
from protocol.smip import id_hex

log = logging.getLogger(__name__)

TASK_PROTOCOL_ID = "/iollm/task/1.0.0"
TASK_PROTOCOL = ProtocolId(TASK_PROTOCOL_ID)
# The same stream with TaskProgress frames before the result (specs/jobs.md); offered
# first by coordinators, served beside 1.0.0 so that nodes of either version work together.
TASK_PROGRESS_PROTOCOL = ProtocolId("/iollm/task/1.1.0")
COPY_WAIT_S = 120.0  # adversary "copy": how long it waits for a delta to copy
SLOW_FACTOR = 1.0  # adversary "slow": waits its training time again (half speed)
BUSY_PREFIX = "busy"  # a refusal for want of capacity starts so: the coordinator asks again


def meets_requirements(job: Job, env: EnvReport) -> str:
    """Why this node cannot take tasks of ``job`` ("" when it can)."""
    spec = job.spec
    has_cuda = bool(env.gpus) and bool(env.cuda)
    if spec.device == "cuda" and not has_cuda:
        return "the job needs a CUDA GPU"
    if spec.min_vram_gb > 0 and not any(vram_at_least(g.total_memory_bytes, spec.min_vram_gb)
                                        for g in env.gpus):
        return f"the job needs a GPU of at least {spec.min_vram_gb} GB"
    if spec.memory == "lean" and has_cuda and all(_fp16_only(g) for g in env.gpus):
        # Such a card trains in fp16 with a loss scaler, which a step taken inside the
        # backward pass cannot undo (node/ml/trainer.py refuses it).
        return "the job's lean memory mode needs bf16: this node's GPUs have fp16 only"
    return ""


def _fp16_only(gpu: GpuInfo) -> bool:
    """Whether a CUDA card lacks bf16 (compute capability below 8.0; unknown: it may not)."""
    major = gpu.compute_capability.split(".")[0]
    return major.isdigit() and int(major) < 8


def _is_prefetch(data: bytes) -> bool:
    """Whether a task stream's first frame is a prefetch hint rather than an assignment
    (anything that does not decode is left to the assignment's checks and refused)."""
    try:
        return isinstance(decode_message(data), Prefetch)
    except RemoteProtocolError:
        return False


def materialize(models: Models, held: HeldVersion, directory: Path) -> list[Path]:
    """Links under ``directory`` to the store's files of ``held`` (manifest paths), for a
    child process to read; returns them in manifest order. Nothing is copied."""
    directory.mkdir(parents=True, exist_ok=True)
    out = []
    for entry in held.manifest.shards:
        link = directory / entry.path
        link.parent.mkdir(parents=True, exist_ok=True)
        link.unlink(missing_ok=True)
        link.symlink_to(models.store.shard_path(entry.root))
        out.append(link)
    return out


@dataclass
class WorkerStats:
    accepted: int = 0
    refused: int = 0
    finished: int = 0
    failed: int = 0
    rebuilt: int = 0  # bases rebuilt from the parent and the outer update
    prefetched: int = 0  # versions fetched ahead of a task, on a coordinator's hint
    train_s: float = 0.0  # wall time of the training children, summed
    peak_rss_bytes: int = 0  # the largest peak resident memory of a training child


class Worker:
    def __init__(self, net: P2P, key: SigningKey, models: Models, receipts: Receipts,
                 config: WorkerSection, env: EnvReport, work_dir: Path, *,
                 tunables: JobsSection | None = None) -> None:
        self.net = net
        self.key = key
        self.models = models
        self.receipts = receipts
        self.config = config
        self.tunables = tunables or JobsSection()  # timeouts and retries ([jobs] in config)
        self.env = env
        self.work_dir = work_dir
        self.peer_id = models.peer_id
        self.busy = 0
        self.stats = WorkerStats()
        self.task_accepted = trio.Event()  # set at the first task this node takes
        self._nursery: trio.Nursery | None = None
        self._prefetching = False  # one prefetch at a time: a hint costs at most one fetch
        # Slots (specs/jobs.md, "Heterogeneous workers"): one per configured device, each
        # training one task at a time; without devices, max_tasks slots on config.device.
        self.free_devices: list[str] = list(config.devices)

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        shutil.rmtree(self.work_dir, ignore_errors=True)  # what a crash left behind
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            for protocol in (TASK_PROGRESS_PROTOCOL, TASK_PROTOCOL):
                self.net.serve(protocol, self._serve, max(MAX_ASSIGN_BYTES, MAX_VERDICT_BYTES))
            task_status.started()
            await trio.sleep_forever()

    def _hint(self, peer: PeerId, msg: Prefetch) -> str:
        """A coordinator's prefetch hint (specs/jobs.md, "Elastic jobs"): fetch the round's
        base version and the job's dataset in the background. Why it is ignored ("" when
        it is taken)."""
        try:
            job = check_prefetch(msg, me=self.peer_id, sender=peer.to_base58())
        except RemoteProtocolError as exc:
            return str(exc)
        if not self.config.enabled or meets_requirements(job, self.env):
            return "this node takes no tasks of that job"
        if self._prefetching or self._nursery is None:
            return "a prefetch is under way"
        self._prefetching = True
        self._nursery.start_soon(self._prefetch, peer, msg.base_version, job.spec.dataset)
        return ""

    async def _prefetch(self, peer: PeerId, base: bytes, dataset: bytes) -> None:
        try:
            for version in (dataset, base):
                await self._fetch(version, [peer])
            self.stats.prefetched += 1
            log.info("prefetched %s and its dataset for the next round", id_hex(base)[:16])
        except Exception as exc:  # a hint only: whatever went wrong, the task fetches again
            log.info("prefetching %s failed: %r", id_hex(base)[:16], exc)
        finally:
            self._prefetching = False

    async def _fetch(self, version: bytes, hint: list[PeerId]) -> HeldVersion:
        """Fetch a version, trying again after a pause when it fails: at the start of a
        round every worker asks the coordinator for the same versions at once."""
        for delay in (*self.tunables.fetch_retries_s, None):
            try:
                await self.models.fetch(id_hex(version), hint=hint)
                return self.models.held[version]
            except FetchError as exc:
                if delay is None:
                    raise
                log.info("fetching %s failed (%s); again in %g s", id_hex(version)[:16], exc,
                         delay)
                await trio.sleep(delay)
        raise AssertionError("unreachable")

    # -- one task, one stream ------------------------------------------------------------

    async def _serve(self, stream: Any) -> None:
        try:
            peer = self.net.remote_peer(stream)
            data = await read_frame(stream, MAX_ASSIGN_BYTES, self.tunables.assign_timeout_s)
            if _is_prefetch(data):
                ignored = self._hint(peer, Prefetch.decode(data))
                if ignored:
                    log.info("prefetch hint from %s ignored: %s", peer, ignored)
                await stream.close()
                return
            assign, job, refusal = self._judge(peer, data)
            if refusal or assign is None or job is None:
                self.stats.refused += 1
                task = assign.task_id if assign is not None else ""
                log.info("refusing task %s from %s: %s", task, peer, refusal)
                await write_frame(stream, TaskReply.refuse(task, refusal).encode(),
                                  self.tunables.reply_timeout_s)
                await stream.close()
                return
            self.busy += 1
            slot = self.free_devices.pop(0) if self.free_devices else None
            try:
                self.stats.accepted += 1
                self.task_accepted.set()
                await write_frame(stream, TaskReply(assign.task_id, True, "").encode(),
                                  self.tunables.reply_timeout_s)
                report = (self._reporter(stream, assign.task_id)
                          if str(stream.get_protocol()) == TASK_PROGRESS_PROTOCOL else None)
                result = await self._train(peer, assign, job, slot, report)
                await write_frame(stream, result, self.tunables.result_write_timeout_s)
            finally:
                self.busy -= 1
                if slot is not None:
                    self.free_devices.append(slot)
            self.stats.finished += 1
            verdict = Verdict.decode(await read_frame(stream, MAX_VERDICT_BYTES,
                                                      self.tunables.verdict_timeout_s))
            if verdict.receipt is not None:
                await self.receipts.store(verdict.receipt, expect_worker=self.peer_id)
            log.info("task %s %s%s", assign.task_id,
                     "accepted" if verdict.accepted else "rejected",
                     "" if verdict.accepted else f": {verdict.reason}")
            await stream.close()
        except (FrameError, RemoteProtocolError, FetchError, PublishError, TaskProcError,
                OSError) as exc:
            self.stats.failed += 1
            log.warning("task stream ended: %s", exc)
            await reset_quietly(stream)
        except Exception:
            self.stats.failed += 1
            log.exception("task failed")
            await reset_quietly(stream)

    def _judge(self, peer: PeerId, data: bytes) -> tuple[TaskAssign | None, Job | None, str]:
        """The assignment, its job, and why it is refused ("" when it is taken)."""
        try:
            assign = TaskAssign.decode(data)
            job = check_assign(assign, me=self.peer_id, sender=peer.to_base58(),
                               now_ms=int(time.time() * 1000))
        except RemoteProtocolError as exc:
            return None, None, f"bad assignment: {exc}"
        if not self.config.enabled:
            return assign, job, "this node does not take tasks (worker.enabled = false)"
        if self.busy >= self.config.slots:
            return assign, job, f"{BUSY_PREFIX}: {self.busy} of {self.config.slots} tasks"
        return assign, job, meets_requirements(job, self.env)

    async def _base(self, coordinator: PeerId, assign: TaskAssign) -> HeldVersion:
        """The task's base version: rebuilt from the parent and the small outer update
        when this node holds the parent, else fetched whole."""
        models, base = self.models, assign.base_version
        held = models.held.get(base)
        if held is not None and held.state == "complete":
            return held
        parent, update = assign.update_parent, assign.update_version
        parent_held = models.held.get(parent) if parent is not None else None
        if update is not None and parent_held is not None and parent_held.state == "complete":
            work = self.work_dir / f"rebuild-{id_hex(base)[:16]}"
            try:
                upd = await self._fetch(update, [coordinator])
                upd_file = materialize(models, upd, work / "update")[0]
                materialize(models, parent_held, work / "parent")
                await run_taskproc({"op": "apply", "model_dir": str(work / "parent"),
                                    "update": str(upd_file), "out_model_dir": str(work / "new")},
                                   timeout_s=600, what="rebuilding the base")
                if await models.adopt(base, work / "new", hint=[coordinator]):
                    self.stats.rebuilt += 1
                    log.info("rebuilt %s from its parent and the outer update", id_hex(base)[:16])
                    return models.held[base]
                log.warning("the rebuilt base differs from %s; fetching it", id_hex(base)[:16])
            except (FetchError, TaskProcError, RemoteProtocolError, OSError) as exc:
                log.warning("rebuilding %s failed (%s); fetching it", id_hex(base)[:16], exc)
            finally:
                shutil.rmtree(work, ignore_errors=True)
        return await self._fetch(base, [coordinator])

    def _reporter(self, stream: Any, task_id: str
                  ) -> Callable[[StepProgress, float, int], Awaitable[None]]:
        """Sends the coordinator a TaskProgress for a training step, at most every
        [jobs] progress_every_s (and always the first and the last step)."""
        last = -math.inf

        async def report(step: StepProgress, started: float, tokens_per_step: int) -> None:
            nonlocal last
            now = time.monotonic()
            if now - last < self.tunables.progress_every_s and 1 < step.step < step.steps:
                return
            last = now
            if not (math.isfinite(step.loss) and 0 <= step.loss <= MAX_LOSS):
                return  # a diverged loss is the result's business, not the display's
            msg = TaskProgress(task_id, min(step.step, step.steps), step.steps, step.loss,
                               step.step * tokens_per_step, int((now - started) * 1000))
            await write_frame(stream, msg.encode(), self.tunables.progress_write_timeout_s)

        return report

    async def _train(self, coordinator: PeerId, assign: TaskAssign, job: Job,
                     slot: str | None = None,
                     report: Callable[[StepProgress, float, int], Awaitable[None]] | None = None,
                     ) -> bytes:
        """Fetch, train (on the slot's device, if the node has devices), publish the
        delta; the sealed result. ``report`` is told of each training step the child
        reports."""
        started = time.monotonic()
        tokens_per_step = assign.batch_size * assign.seq_len

        async def on_step(step: StepProgress) -> None:
            if report is not None:
                await report(step, started, tokens_per_step)

        models = self.models
        base = await self._base(coordinator, assign)
        dataset = await self._fetch(assign.dataset_version, [coordinator])
        work = self.work_dir / f"{id_hex(assign.job_id)[:16]}-{assign.task_id}"
        try:
            model_dir = work / "base"
            materialize(models, base, model_dir)
            data_files = [str(models.store.shard_path(s.root)) for s in dataset.manifest.shards]
            out_dir = work / "out"
            out_dir.mkdir(parents=True, exist_ok=True)
            request = {
                "op": "train", "model_dir": str(model_dir), "data_files": data_files,
                "slice_start": assign.slice_start, "slice_len": assign.slice_len,
                "seed": assign.seed, "steps": assign.inner_steps,
                "batch_size": assign.batch_size, "seq_len": assign.seq_len, "lr": assign.lr,
                "device": "cpu" if job.spec.device == "cpu" else slot or self.config.device,
                "threads": self.config.threads, "delta_bits": job.spec.delta_bits,
                "memory": job.spec.memory,  # training maths: the checker re-runs with it
                "out_dir": str(out_dir), "compile": self.config.compile,
                # Kept across tasks (work_dir is emptied at start): the micro-batch found
                # for a (model, device) is searched for once.
                "micro_batch_cache": str(self.work_dir.parent / "micro-batch"),
            }
            timeout = (max(1.0, assign.deadline_ms / 1000 - time.time())
                       + self.tunables.train_timeout_slack_s)
            answer = await self._adversary(
                coordinator, assign,
                dict(request, _train_len=job.spec.train_split(dataset.manifest.total_size)),
                timeout)
            if answer is None:
                answer = await run_taskproc(request, timeout_s=timeout, what="training",
                                            on_step=on_step)
            self.stats.train_s += float(answer.get("wall_s") or 0.0)
            self.stats.peak_rss_bytes = max(self.stats.peak_rss_bytes,
                                            int(answer.get("peak_rss_bytes") or 0))
            log.info("task %s trained on %s (%s, micro-batch %s): peak memory %.0f MiB",
                     assign.task_id, answer.get("device"), answer.get("precision"),
                     answer.get("micro_batch"), int(answer.get("peak_rss_bytes") or 0) / 2**20)
            delta = await models.publish(out_dir / "delta.safetensors", kind="model",
                                         name=delta_version_name(assign.job_id,
                                                                 assign.task_id))
        finally:
            shutil.rmtree(work, ignore_errors=True)
        result = TaskResult(
            job_id=assign.job_id, round=assign.round, task_id=assign.task_id,
            worker=self.peer_id, delta_version=bytes.fromhex(delta),
            first_loss=finite(answer.get("first_loss"), "first_loss"),
            last_loss=finite(answer.get("last_loss"), "last_loss"),
            tokens=int(answer.get("tokens", 0)),
            wall_ms=int((time.monotonic() - started) * 1000))
        return seal_task_result(self.key, result)

    async def _adversary(self, coordinator: PeerId, assign: TaskAssign, request: dict[str, Any],
                         timeout: float) -> dict[str, Any] | None:
        """TEST ONLY (``worker.adversary``): misbehave as configured, writing the forged
        delta where an honest one would go. None when honest."""
        mode = self.config.adversary
        if not mode:
            return None
        if mode == "slow":
            # Honest work, delivered at half its speed: a worker whose capability
            # record claims more than it delivers (specs/jobs.md, "Heterogeneous workers").
            request.pop("_train_len")
            answer = await run_taskproc(request, timeout_s=timeout, what="training")
            await trio.sleep(SLOW_FACTOR * float(answer.get("wall_s") or 0.0))
            return answer
        out = str(Path(request["out_dir"]) / "delta.safetensors")
        log.warning("adversary %r: forging task %s", mode, assign.task_id)
        if mode == "wrong-slice":
            # Train honestly, but on data half the train split away from the slice given.
            train_len = request.pop("_train_len")
            start = (assign.slice_start + train_len // 2) % max(train_len - assign.slice_len, 1)
            return await run_taskproc(dict(request, slice_start=start), timeout_s=timeout,
                                      what="training")
        forge: dict[str, Any] = {"op": "forge", "model_dir": request["model_dir"], "out": out,
                                 "seed": assign.seed}
        if mode in ("random", "zero"):
            forge["mode"] = mode
        else:  # copy, copy-noise: another worker's delta of the same round
            source = await self._delta_to_copy(coordinator, assign)
            forge["mode"] = "copy" if mode == "copy" else "noise"
            forge["source"] = str(source)
        answer = await run_taskproc(forge, timeout_s=timeout, what="forging")
        return {"first_loss": answer.get("first_loss", 3.0),
                "last_loss": answer.get("last_loss", 2.0),
                "tokens": request["steps"] * request["batch_size"] * request["seq_len"]}

    async def _delta_to_copy(self, coordinator: PeerId, assign: TaskAssign) -> Path:
        prefix = f"delta {id_hex(assign.job_id)[:12]} r{assign.round}-"
        with trio.fail_after(COPY_WAIT_S):
            while True:
                found = [v for v in self.models.list_versions("model")
                         if v.name.startswith(prefix) and v.publisher != self.peer_id]
                if found:
                    break
                await trio.sleep(0.5)
        held = await self._fetch(bytes.fromhex(found[0].version),
                                 [PeerId.from_base58(found[0].publisher)])
        return self.models.store.shard_path(held.manifest.shards[0].root)
