"""One round of a training job, from the coordinator's side: sans-IO (specs/jobs.md).

A round is a fixed list of micro-tasks (:func:`plan_round`: data slice and seed each) and
a set of candidate workers. :class:`RoundMachine` decides which worker is offered which
task, and what happens when a worker refuses, dies, stalls or submits. It takes events
and ``now_ms`` and returns :class:`Assign` decisions; node/jobs/coordinator.py sends them, owns the
streams and the clock, and feeds the outcomes back. Nothing here waits or reads a clock.

Each task moves through the table :data:`TRANSITIONS`::

    pending --offer--> offered --accepted--> training --submitted--> submitted
       ^                  |                     |
       +----refused/lost--+--------lost---------+        pending --give_up--> failed

A worker that refuses a task is not offered that task again, unless it refused because it
was busy: then it is offered tasks again ``busy_retry_ms`` later (a busy refusal does not
count as an attempt, up to ``max_busy`` of them a task); a worker that is lost
(its stream broke, it missed a deadline, it sent a result that does not verify) is not
offered anything again this round. A task offered ``max_attempts`` times without a
result fails; the round still ends, with the tasks that were submitted.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from protocol.errors import LocalProtocolError

MAX_TASKS_PER_ROUND = 1024


class TaskStatus(Enum):
    PENDING = "pending"
    OFFERED = "offered"
    TRAINING = "training"
    SUBMITTED = "submitted"
    FAILED = "failed"


S = TaskStatus
TRANSITIONS: dict[tuple[TaskStatus, str], TaskStatus] = {
    (S.PENDING, "offer"): S.OFFERED,
    (S.OFFERED, "accepted"): S.TRAINING,
    (S.OFFERED, "refused"): S.PENDING,
    (S.OFFERED, "lost"): S.PENDING,
    (S.TRAINING, "lost"): S.PENDING,
    (S.TRAINING, "submitted"): S.SUBMITTED,
    (S.OFFERED, "submitted"): S.SUBMITTED,  # the reply and the result may cross
    (S.PENDING, "give_up"): S.FAILED,
}


class IllegalTransition(LocalProtocolError):
    """The machine was driven through an edge that :data:`TRANSITIONS` lacks (our bug)."""


@dataclass(frozen=True)
class TaskPlan:
    """One micro-task: train ``inner_steps`` from the round's base on this slice."""

    task_id: str
    round: int
    index: int
    slice_start: int
    slice_len: int
    seed: int
    steps: int | None = None  # inner steps; None: the job's (an equal split)


def task_seed(job_seed: int, round_: int, index: int) -> int:
    """The seed of a task: a hash of (job seed, round, index), so re-executing a task
    anywhere gives the same batches, and no two tasks of a job share a seed."""
    digest = hashlib.sha256(f"{job_seed}/{round_}/{index}".encode()).digest()[:8]
    return int.from_bytes(digest, "big") >> 1  # 63 bits: fits every int type on the way


def plan_round(*, job_seed: int, round_: int, rounds: int, n_tasks: int, train_len: int,
               min_slice: int, steps: Sequence[int] | None = None,
               first_round: int = 0) -> list[TaskPlan]:
    """The tasks of round ``round_`` of ``rounds``: disjoint contiguous slices of the
    train split, one per task of the round. The split is cut into ``n_tasks`` slices
    (never under ``min_slice``, a sequence and its target), equal ones, or with ``steps``
    (each task's inner steps, sized to its worker: protocol/scheduling.py) each in
    proportion to its task's steps, so that every byte is as likely to be trained on
    whoever holds it; task i of round r takes slot ``(i + r) mod n_tasks``: a round's
    tasks cover the whole split, each its own part (which the own-slice check needs),
    and a task index moves on each round.
    Why slices this large: a small slice holds a few files, a worker that trains on a few
    files drifts towards them, and the round's average then covers fewer files than a
    data-parallel step samples. bench/training.py (simulated, 4 workers) measured
    collaboration efficiency 0.10 with slices of the bytes one task reads (5 rounds of
    80 inner steps), and with 10 rounds of 80, 0.66 with one slice per task of the job
    (``rounds * n_tasks`` slices, no byte trained twice) against 0.72 with these; with
    20 rounds of 40 the smaller slices of the former were worse still. ``rounds`` only
    bounds ``round_``.
    ``first_round`` (the job's ``train.first_round``) shifts the data schedule: round
    ``round_`` draws the seeds and slots of schedule round ``first_round + round_``, so
    a job that continues another's version goes on with that job's schedule instead of
    training again on the windows its round 0 drew. Task ids and ``TaskPlan.round`` stay
    the job's own round."""
    if not 1 <= n_tasks <= MAX_TASKS_PER_ROUND:
        raise LocalProtocolError(f"n_tasks must be in [1, {MAX_TASKS_PER_ROUND}], got {n_tasks}")
    if not 0 <= round_ < rounds or min_slice < 1 or first_round < 0:
        raise LocalProtocolError("round must be in [0, rounds), min_slice positive and "
                                 "first_round not negative")
    sched = first_round + round_  # the data schedule's round: seeds and slots
    if train_len < min_slice:
        raise LocalProtocolError(f"the train split ({train_len} bytes) is shorter than one "
                                 f"sequence ({min_slice} bytes)")
    if steps is not None and (len(steps) != n_tasks or min(steps) < 1):
        raise LocalProtocolError("steps: one positive count per task")
    slice_len = max(train_len // n_tasks, min_slice)
    if steps is None or len(set(steps)) == 1 or slice_len * n_tasks > train_len:
        # Equal slices (and, below one sequence a task, slices that wrap and overlap).
        slots = max(train_len // slice_len, 1)  # slices that fit side by side in the split
        return [TaskPlan(f"r{round_}-t{index}", round_, index,
                         ((index + sched) % slots) * slice_len, slice_len,
                         task_seed(job_seed, sched, index),
                         None if steps is None else steps[index])
                for index in range(n_tasks)]
    # Slot k holds task (k - r) mod n; slot lengths follow those tasks' steps.
    order = [(k - sched) % n_tasks for k in range(n_tasks)]
    whole = sum(steps)
    lens = {i: max(train_len * steps[i] // whole, min_slice) for i in order}
    tasks: dict[int, TaskPlan] = {}
    start = 0
    for i in order:
        at = min(start, train_len - lens[i])  # min_slice rounding up may overrun the end
        tasks[i] = TaskPlan(f"r{round_}-t{i}", round_, i, at, lens[i],
                            task_seed(job_seed, sched, i), steps[i])
        start += lens[i]
    return [tasks[i] for i in range(n_tasks)]


@dataclass(frozen=True)
class Assign:
    """Decision: offer ``task`` to ``worker``; it must have submitted by ``deadline_ms``."""

    task: TaskPlan
    worker: str
    attempt: int
    deadline_ms: int


@dataclass
class _Task:
    plan: TaskPlan
    status: TaskStatus = TaskStatus.PENDING
    worker: str | None = None
    deadline_ms: int = 0
    attempts: int = 0
    busy_refusals: int = 0
    refused_by: set[str] = field(default_factory=set)
    result: Any = None


class RoundMachine:
    """Which worker trains which task of one round. Every ``on_*`` method returns the
    offers to make now; :meth:`next_deadline` says when to call :meth:`on_tick`."""

    def __init__(self, tasks: Sequence[TaskPlan], workers: Iterable[str], *,
                 offer_timeout_ms: int, task_timeout_ms: int, max_attempts: int = 3,
                 capacity: int | Mapping[str, int] = 1, busy_retry_ms: int = 2_000,
                 max_busy: int = 60, rng: random.Random | None = None,
                 preferred: Mapping[str, str] | None = None) -> None:
        if not tasks:
            raise LocalProtocolError("a round needs at least one task")
        if len({t.task_id for t in tasks}) != len(tasks):
            raise LocalProtocolError("task ids of a round must be distinct")
        caps = capacity.values() if isinstance(capacity, Mapping) else [capacity]
        if min(offer_timeout_ms, task_timeout_ms, max_attempts, busy_retry_ms, max_busy,
               *caps) < 1:
            raise LocalProtocolError("timeouts, limits and capacity must be >= 1")
        self.tasks = {t.task_id: _Task(t) for t in tasks}
        order = sorted(set(workers))
        (rng or random.Random(0)).shuffle(order)  # spread load across rounds and jobs
        self.workers: list[str] = order
        self.lost: set[str] = set()
        self.busy_until: dict[str, int] = {}  # worker -> when it may be offered again
        self.busy_retry_ms = busy_retry_ms
        self.max_busy = max_busy
        self.offer_timeout_ms = offer_timeout_ms
        self.task_timeout_ms = task_timeout_ms
        self.max_attempts = max_attempts
        # Tasks per worker at once: its slots (one per GPU it lists, else 1).
        self.capacity: dict[str, int] = (dict(capacity) if isinstance(capacity, Mapping)
                                         else dict.fromkeys(self.workers, capacity))
        self.default_capacity = 1 if isinstance(capacity, Mapping) else capacity
        # task id -> the worker it was sized for (protocol/scheduling.py): it waits for
        # that worker while the worker may still take it.
        self.preferred: dict[str, str] = dict(preferred or {})
        if not set(self.preferred) <= set(self.tasks):
            raise LocalProtocolError("preferred names a task the round does not have")
        self.stale = 0  # events about a task from a worker that no longer holds it

    # -- queries ------------------------------------------------------------------------

    def status(self, task_id: str) -> TaskStatus:
        return self.tasks[task_id].status

    def holder(self, task_id: str) -> str | None:
        return self.tasks[task_id].worker

    @property
    def done(self) -> bool:
        return all(t.status in (S.SUBMITTED, S.FAILED) for t in self.tasks.values())

    def submitted(self) -> dict[str, tuple[str, Any]]:
        """task id -> (worker, result) of every submitted task."""
        return {tid: (t.worker, t.result) for tid, t in self.tasks.items()
                if t.status is S.SUBMITTED and t.worker is not None}

    def failed(self) -> list[str]:
        return [tid for tid, t in self.tasks.items() if t.status is S.FAILED]

    def next_deadline(self) -> int | None:
        """When :meth:`on_tick` has something to do: a deadline, or a busy worker that
        may be offered a waiting task again."""
        deadlines = [t.deadline_ms for t in self.tasks.values()
                     if t.status in (S.OFFERED, S.TRAINING)]
        if any(t.status is S.PENDING for t in self.tasks.values()):
            deadlines += [u for w, u in self.busy_until.items() if w not in self.lost]
        return min(deadlines) if deadlines else None

    # -- events -------------------------------------------------------------------------

    def start(self, now_ms: int) -> list[Assign]:
        return self._fill(now_ms)

    def add_worker(self, worker: str, now_ms: int, capacity: int = 0) -> list[Assign]:
        """A worker that became available (joined the network) during the round, with
        ``capacity`` slots (0: the machine's default). It takes a waiting task only if no
        other worker was sized for it, or that worker is gone: a sized round is not
        reshuffled, and the newcomer is sized into the next round."""
        if worker not in self.workers and worker not in self.lost:
            self.workers.append(worker)
            self.capacity[worker] = capacity or self.default_capacity
        return self._fill(now_ms)

    def on_accepted(self, task_id: str, worker: str, now_ms: int) -> list[Assign]:
        task = self._held(task_id, worker)
        if task is not None and task.status is S.OFFERED:
            self._move(task, "accepted")
            task.deadline_ms = now_ms + self.task_timeout_ms
        return []

    def on_refused(self, task_id: str, worker: str, now_ms: int, *, busy: bool = False
                   ) -> list[Assign]:
        """The worker will not take the task; with ``busy``, not now (it is at its
        capacity): it may be offered tasks again ``busy_retry_ms`` from now."""
        task = self._held(task_id, worker)
        if task is None or task.status is not S.OFFERED:
            return []
        self._move(task, "refused")
        task.worker = None
        if busy and task.busy_refusals < self.max_busy:
            task.busy_refusals += 1
            task.attempts -= 1
            self.busy_until[worker] = now_ms + self.busy_retry_ms
        else:
            task.refused_by.add(worker)
        return self._fill(now_ms)

    def on_lost(self, task_id: str, worker: str, now_ms: int) -> list[Assign]:
        """The worker died, stalled or answered nonsense: it gets nothing more this round,
        and the task goes to another worker."""
        task = self._held(task_id, worker)
        if task is None:
            return []
        self._lose(worker)
        return self._fill(now_ms)

    def on_submitted(self, task_id: str, worker: str, result: Any, now_ms: int) -> list[Assign]:
        task = self._held(task_id, worker)
        if task is None or task.status not in (S.OFFERED, S.TRAINING):
            if task is not None:
                self.stale += 1
            return []
        self._move(task, "submitted")
        task.result = result
        return self._fill(now_ms)  # the worker has room again

    def on_tick(self, now_ms: int) -> list[Assign]:
        for task in self.tasks.values():
            if (task.status in (S.OFFERED, S.TRAINING) and task.deadline_ms <= now_ms
                    and task.worker is not None):
                self._lose(task.worker)
        return self._fill(now_ms)

    # -- internals ----------------------------------------------------------------------

    def _held(self, task_id: str, worker: str) -> _Task | None:
        task = self.tasks.get(task_id)
        if task is None or task.worker != worker:
            self.stale += 1
            return None
        return task

    def _move(self, task: _Task, event: str) -> None:
        nxt = TRANSITIONS.get((task.status, event))
        if nxt is None:
            raise IllegalTransition(f"task {task.plan.task_id}: no transition from "
                                    f"{task.status.value} on {event!r}")
        task.status = nxt

    def _lose(self, worker: str) -> None:
        self.lost.add(worker)
        for task in self.tasks.values():
            if task.worker == worker and task.status in (S.OFFERED, S.TRAINING):
                self._move(task, "lost")
                task.worker = None

    def _load(self, worker: str) -> int:
        return sum(1 for t in self.tasks.values()
                   if t.worker == worker and t.status in (S.OFFERED, S.TRAINING))

    def _fill(self, now_ms: int) -> list[Assign]:
        """Offer every pending task to the least-loaded worker that may take it; fail the
        tasks that no worker may take any more."""
        out = []
        self.busy_until = {w: u for w, u in self.busy_until.items() if u > now_ms}
        for task in self.tasks.values():
            if task.status is not S.PENDING:
                continue
            if task.attempts >= self.max_attempts:
                self._move(task, "give_up")
                continue
            able = [w for w in self.workers if w not in self.lost
                    and w not in task.refused_by]
            if not able:
                self._move(task, "give_up")
                continue
            free = [w for w in able if self._load(w) < self._cap(w)
                    and w not in self.busy_until]
            pref = self.preferred.get(task.plan.task_id)
            if pref in able:
                if pref not in free:
                    continue  # sized for that worker: wait until it has room again
                worker = pref
            elif not free:
                continue  # wait for a worker to finish or be lost
            else:
                worker = min(free, key=lambda w: (self._load(w), self._done_by(w)))
            self._move(task, "offer")
            task.worker = worker
            task.attempts += 1
            task.deadline_ms = now_ms + self.offer_timeout_ms
            out.append(Assign(task.plan, worker, task.attempts,
                              now_ms + self.offer_timeout_ms + self.task_timeout_ms))
        return out

    def _cap(self, worker: str) -> int:
        return self.capacity.get(worker, self.default_capacity)

    def _done_by(self, worker: str) -> int:
        return sum(1 for t in self.tasks.values()
                   if t.worker == worker and t.status is S.SUBMITTED)
