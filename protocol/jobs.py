"""Training jobs on the wire: the signed job, coordinator <-> worker messages, receipts.

See specs/jobs.md (normative). Pure: it builds, encodes, decodes and checks, given bytes
and ``now_ms``; node/ does the streams, the training and the storage.

* A *job* (:class:`Job`, domain ``iollm/job/v1``) is a :class:`~protocol.jobspec.JobSpec`
  signed by the node that coordinates it, the one it was submitted to. Its id is
  SHA-256 of the envelope's *body* bytes (:func:`job_id`): the body is what the
  signature covers, so nobody but the signer can make two ids for one job (an envelope can
  be re-encoded by anyone; see specs/jobs.md, FAQ).
* On one task stream the coordinator sends :class:`TaskAssign`, the worker answers
  :class:`TaskReply`, may send :class:`TaskProgress` while it trains, then its
  :class:`TaskResult` sealed under
  ``iollm/task-result/v1``, and the coordinator answers :class:`Verdict`.
* An accepted result yields a :class:`Receipt` (``iollm/receipt/v1``) sealed by the
  coordinator around the worker's sealed result: both signatures in one record, each
  checkable by anyone (:func:`open_receipt`).

Every message is a msgpack map with ``type`` (its tag) and ``v`` (its version) first.
Building something invalid is LocalProtocolError; bytes from a peer raise
RemoteProtocolError(reason) naming the field, and nothing else.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, fields
from functools import cached_property
from typing import Any, ClassVar, TypeVar

from nacl.signing import SigningKey

from protocol.checks import (
    Invalid,
    check_header,
    check_int,
    check_keys,
    check_peer,
    digest,
    fail,
    packb,
    to_remote,
)
from protocol.envelope import (
    DOMAIN_JOB,
    DOMAIN_RECEIPT,
    DOMAIN_TASK_RESULT,
    Envelope,
    open_envelope,
    seal,
    unpack_strict,
)
from protocol.errors import LocalProtocolError, RemoteProtocolError
from protocol.jobspec import (
    BPS,
    DEFAULTS,
    FIELDS,
    MAX_BATCH_SIZE,
    MAX_INNER_STEPS,
    MAX_LR,
    MAX_ROUNDS,
    MAX_SEQ_LEN,
    JobSpec,
    JobSpecError,
    parse_job_toml,
    spec_with_defaults,
)
from protocol.peerid import peer_id_from_public_key
from protocol.smip import FORBIDDEN_RANGES, ID_BYTES

__all__ = [
    "BPS", "DEFAULTS", "DOMAIN_JOB", "DOMAIN_RECEIPT", "DOMAIN_TASK_RESULT", "FIELDS", "Job",
    "JobSpec", "JobSpecError", "Prefetch", "Receipt", "TaskAssign", "TaskReply", "TaskResult",
    "Verdict", "check_assign", "check_prefetch", "check_result", "decode_message",
    "issue_receipt", "job_id", "open_job", "open_receipt", "open_task_result",
    "parse_job_toml", "receipt_id", "safe_reason", "seal_job", "seal_receipt",
    "seal_task_result", "spec_with_defaults",
]  # fmt: skip

# --- constants (specs/jobs.md, "Constants") ----------------------------------------------------

JOBS_VERSION = 1  # body field "v" of every message below

MAX_JOB_BYTES = 4096  # whole envelope
MAX_ASSIGN_BYTES = MAX_JOB_BYTES + 1024
MAX_REPLY_BYTES = 2048  # a reason of MAX_REASON_CHARS 4-byte characters fits
MAX_PROGRESS_BYTES = 256  # a task id and five numbers
MAX_RESULT_BYTES = 1024  # whole envelope
MAX_RECEIPT_BYTES = 4096  # whole envelope, the worker's result inside
MAX_VERDICT_BYTES = MAX_RECEIPT_BYTES + 2048
MAX_TASK_ID = 64  # characters of [A-Za-z0-9._:-]
MAX_REASON_CHARS = 300
MAX_METRICS = 16
MAX_LOSS = 1e6
VERDICT_ACCEPTED = "accepted"
VERDICTS: tuple[str, ...] = (VERDICT_ACCEPTED,)  # a receipt only records accepted work

_TASK_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")
_METRIC = re.compile(r"[a-z][a-z0-9_]{0,31}")

# --- field checks ------------------------------------------------------------------------------




def _check_id(name: str, value: object) -> None:
    if not (isinstance(value, bytes) and len(value) == ID_BYTES):
        fail(f"{name} must be {ID_BYTES} bytes")


def _check_opt_id(name: str, value: object) -> None:
    if value is not None:
        _check_id(name, value)




def _check_task_id(value: object, *, allow_empty: bool = False) -> None:
    if allow_empty and value == "":
        return
    if not (isinstance(value, str) and _TASK_ID.fullmatch(value)):
        fail(f"task_id must be 1..{MAX_TASK_ID} characters of [A-Za-z0-9._:-]")


def _check_float(name: str, value: object, lo: float, hi: float, *,
                 lo_open: bool = False) -> None:
    # An int is not a float on the wire: one value, one encoding.
    if not (isinstance(value, float) and math.isfinite(value)):
        fail(f"{name} must be a finite float, got {type(value).__name__}")
    if not ((value > lo if lo_open else value >= lo) and value <= hi):
        fail(f"{name}={value} outside {'(' if lo_open else '['}{lo}, {hi}]")


def _check_bool(name: str, value: object) -> None:
    if not isinstance(value, bool):
        fail(f"{name} must be a boolean")


def _forbidden(text: str) -> bool:
    return any(lo <= ord(c) <= hi for c in text for lo, hi in FORBIDDEN_RANGES)


def _check_reason(accepted: bool, reason: object) -> None:
    if not isinstance(reason, str) or len(reason) > MAX_REASON_CHARS or _forbidden(reason):
        fail(f"reason must be a string of at most {MAX_REASON_CHARS} characters, no controls")
    if accepted and reason:
        fail("reason must be empty when accepted")


def safe_reason(text: str) -> str:
    """Any text made a valid ``reason``: forbidden code points replaced, cut to length."""
    clean = "".join("?" if _forbidden(c) else c for c in str(text))
    return clean[:MAX_REASON_CHARS]


def _check_size(what: str, data: bytes, cap: int) -> None:
    if len(data) > cap:
        raise LocalProtocolError(f"{what} of {len(data)} bytes > {cap}")


def _remote_in(where: str, exc: RemoteProtocolError) -> Invalid:
    """A nested record's RemoteProtocolError as an Invalid of the outer one, same reason."""
    message = str(exc).removeprefix(f"{exc.reason}: ")
    return Invalid(exc.reason, f"{where}: {message}")


# --- the message base: type tag, version, strict keys ------------------------------------------

M = TypeVar("M", bound="_Message")


class _Message:
    """Shared wire form of the dataclasses below: ``{"type", "v", <fields>...}``; fields
    listed in OPTIONAL are left out when None."""

    TYPE: ClassVar[str]
    MAX_BYTES: ClassVar[int]
    OPTIONAL: ClassVar[frozenset[str]] = frozenset()

    def _wire_fields(self) -> dict[str, Any]:
        out = {}
        for f in fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if not (value is None and f.name in self.OPTIONAL):
                out[f.name] = value
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.TYPE, "v": JOBS_VERSION, **self._wire_fields()}

    def encode(self) -> bytes:
        """The message bytes (for sealed types: the envelope body)."""
        data = packb(self.to_dict())
        _check_size(self.TYPE, data, self.MAX_BYTES)
        return data

    @classmethod
    def _from_wire(cls: type[M], d: dict[str, Any]) -> M:
        return cls(**d)

    @classmethod
    def from_dict(cls: type[M], d: object) -> M:
        """Inverse of :meth:`to_dict`: type, then version, then fields; RemoteProtocolError."""
        d = check_header(f"a {cls.TYPE} message", d, cls.TYPE, JOBS_VERSION)
        names = frozenset(f.name for f in fields(cls))  # type: ignore[arg-type]
        try:
            d = dict(check_keys(cls.TYPE, d, names - cls.OPTIONAL | {"type", "v"},
                                cls.OPTIONAL))
            del d["type"], d["v"]
            return cls._from_wire(d)
        except Invalid as exc:
            raise to_remote(exc) from None

    @classmethod
    def decode(cls: type[M], data: bytes) -> M:
        """Decode message bytes; "oversized" over MAX_BYTES, else a named reason."""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise RemoteProtocolError("malformed", f"a {cls.TYPE} message must be bytes")
        if len(data) > cls.MAX_BYTES:
            raise RemoteProtocolError("oversized", f"{cls.TYPE} of {len(data)} bytes")
        return cls.from_dict(unpack_strict(bytes(data), cls.MAX_BYTES))


def _seal(key: SigningKey, domain: str, message: _Message, signer: str, cap: int) -> bytes:
    own = peer_id_from_public_key(bytes(key.verify_key))
    if signer != own:
        raise LocalProtocolError(f"a {message.TYPE} of {signer} cannot be signed by {own}")
    data = seal(key, domain, message.encode()).encode()
    _check_size(f"{message.TYPE} envelope", data, cap)
    return data


def _open(data: bytes, domain: str, cls: type[M], cap: int) -> tuple[M, Envelope]:
    envelope = open_envelope(data, domain, cap)
    return cls.from_dict(unpack_strict(envelope.body, cap)), envelope


def _signer_is(envelope: Envelope, who: str, role: str) -> None:
    if envelope.signer != who:
        raise RemoteProtocolError("signer-mismatch", f"signed by {envelope.signer}, "
                                                     f"{role} {who}")


# --- the job -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Job(_Message):
    """A spec submitted at ``submitted_ms`` to ``coordinator``, which signs and runs it."""

    TYPE: ClassVar[str] = "job"
    MAX_BYTES: ClassVar[int] = MAX_JOB_BYTES

    spec: JobSpec
    coordinator: str
    submitted_ms: int

    def __post_init__(self) -> None:
        if not isinstance(self.spec, JobSpec):
            fail("spec must be a JobSpec")
        check_peer("coordinator", self.coordinator)
        check_int("submitted_ms", self.submitted_ms)

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.TYPE, "v": JOBS_VERSION, "spec": self.spec.to_dict(),
                "coordinator": self.coordinator, "submitted_ms": self.submitted_ms}

    @classmethod
    def _from_wire(cls, d: dict[str, Any]) -> Job:
        try:
            spec = JobSpec.from_dict(d["spec"])
        except RemoteProtocolError as exc:
            raise _remote_in("spec", exc) from None
        return cls(spec, d["coordinator"], d["submitted_ms"])


def job_id(envelope_bytes: bytes) -> bytes:
    """SHA-256 of the job envelope's body bytes (the envelope is opened and verified
    first: RemoteProtocolError on anything that is not a validly signed job envelope)."""
    return digest(open_envelope(envelope_bytes, DOMAIN_JOB, MAX_JOB_BYTES).body)


def seal_job(key: SigningKey, job: Job) -> bytes:
    """Job envelope bytes; LocalProtocolError unless ``key`` is the job's coordinator."""
    return _seal(key, DOMAIN_JOB, job, job.coordinator, MAX_JOB_BYTES)


def open_job(data: bytes) -> tuple[Job, Envelope]:
    """Check job envelope bytes: envelope, body, then signer == coordinator."""
    job, envelope = _open(data, DOMAIN_JOB, Job, MAX_JOB_BYTES)
    _signer_is(envelope, job.coordinator, "coordinator")
    return job, envelope


# --- coordinator <-> worker --------------------------------------------------------------------


@dataclass(frozen=True)
class TaskAssign(_Message):
    """Coordinator -> worker: train ``inner_steps`` from ``base_version`` on bytes
    ``[slice_start, slice_start + slice_len)`` of the dataset's train split, seeded
    ``seed``, and submit by ``deadline_ms``. ``job`` is the signed job, so the worker
    checks the job and its requirements itself. When ``update_version`` is given, it is
    the int8 outer update that turns ``update_parent`` into ``base_version``: a worker
    holding the parent rebuilds the base instead of downloading it.

    Construction opens ``job`` and checks the assignment against it ("assign-mismatch").
    """

    TYPE: ClassVar[str] = "task-assign"
    MAX_BYTES: ClassVar[int] = MAX_ASSIGN_BYTES
    OPTIONAL: ClassVar[frozenset[str]] = frozenset({"update_version", "update_parent"})

    job: bytes
    round: int
    task_id: str
    worker: str
    base_version: bytes
    dataset_version: bytes
    slice_start: int
    slice_len: int
    seed: int
    inner_steps: int
    batch_size: int
    seq_len: int
    lr: float
    deadline_ms: int
    update_version: bytes | None = None
    update_parent: bytes | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.job, bytes) or len(self.job) > MAX_JOB_BYTES:
            fail(f"job must be at most {MAX_JOB_BYTES} bytes of job envelope")
        check_int("round", self.round, 0, MAX_ROUNDS - 1)
        _check_task_id(self.task_id)
        check_peer("worker", self.worker)
        for name in ("base_version", "dataset_version"):
            _check_id(name, getattr(self, name))
        check_int("slice_start", self.slice_start)
        check_int("slice_len", self.slice_len, 1)
        check_int("slice_start + slice_len", self.slice_start + self.slice_len)
        check_int("seed", self.seed)
        check_int("inner_steps", self.inner_steps, 1, MAX_INNER_STEPS)
        check_int("batch_size", self.batch_size, 1, MAX_BATCH_SIZE)
        check_int("seq_len", self.seq_len, 1, MAX_SEQ_LEN)
        _check_float("lr", self.lr, 0.0, MAX_LR, lo_open=True)
        check_int("deadline_ms", self.deadline_ms)
        _check_opt_id("update_version", self.update_version)
        _check_opt_id("update_parent", self.update_parent)
        if (self.update_version is None) != (self.update_parent is None):
            fail("update_version and update_parent go together")
        if self.update_parent is not None and self.update_parent == self.base_version:
            fail("update_parent is base_version itself")
        spec = self.job_record.spec
        if self.dataset_version != spec.dataset:
            fail("dataset_version is not the job's dataset", "assign-mismatch")
        if self.round >= spec.rounds:
            fail(f"round {self.round} of a job of {spec.rounds} rounds", "assign-mismatch")
        if self.round == 0 and (self.base_version != spec.base_model
                                or self.update_version is not None):
            fail("round 0 trains the job's base_model, without an update", "assign-mismatch")

    @cached_property
    def _opened(self) -> tuple[Job, bytes]:
        try:
            job, envelope = open_job(self.job)
        except RemoteProtocolError as exc:
            raise _remote_in("job", exc) from None
        return job, digest(envelope.body)

    @property
    def job_record(self) -> Job:
        """The opened, verified job."""
        return self._opened[0]

    @property
    def job_id(self) -> bytes:
        return self._opened[1]

    @property
    def tokens(self) -> int:
        """Tokens the task trains on: its steps times the batch's tokens."""
        return self.inner_steps * self.batch_size * self.seq_len


@dataclass(frozen=True)
class TaskReply(_Message):
    """Worker -> coordinator: the task is taken, or refused and why. ``task_id`` is ""
    only in a refusal of an assignment that could not be decoded."""

    TYPE: ClassVar[str] = "task-reply"
    MAX_BYTES: ClassVar[int] = MAX_REPLY_BYTES

    task_id: str
    accepted: bool
    reason: str = ""

    def __post_init__(self) -> None:
        _check_bool("accepted", self.accepted)
        _check_task_id(self.task_id, allow_empty=not self.accepted)
        _check_reason(self.accepted, self.reason)

    @classmethod
    def refuse(cls, task_id: str, reason: str) -> TaskReply:
        """A refusal with any text as the reason (made safe: :func:`safe_reason`)."""
        return cls(task_id, False, safe_reason(reason))


@dataclass(frozen=True)
class TaskProgress(_Message):
    """Worker -> coordinator, on a ``/iollm/task/1.1.0`` stream between its reply and its
    result, at most every ``progress_every_s`` ([jobs] in the node's config): ``step``
    of ``steps`` inner steps are done, the last measured training ``loss``, ``tokens``
    trained so far in ``wall_ms`` since the task was taken. For display only: nothing is
    paid or checked on it."""

    TYPE: ClassVar[str] = "task-progress"
    MAX_BYTES: ClassVar[int] = MAX_PROGRESS_BYTES

    task_id: str
    step: int
    steps: int
    loss: float
    tokens: int
    wall_ms: int

    def __post_init__(self) -> None:
        _check_task_id(self.task_id)
        check_int("steps", self.steps, 1, MAX_INNER_STEPS)
        check_int("step", self.step, 0, self.steps)
        _check_float("loss", self.loss, 0.0, MAX_LOSS)
        check_int("tokens", self.tokens)
        check_int("wall_ms", self.wall_ms)


@dataclass(frozen=True)
class TaskResult(_Message):
    """Worker's signed statement: for this task it trained, published ``delta_version``
    (through SMIP), on ``tokens`` tokens, with these losses and wall time."""

    TYPE: ClassVar[str] = "task-result"
    MAX_BYTES: ClassVar[int] = MAX_RESULT_BYTES

    job_id: bytes
    round: int
    task_id: str
    worker: str
    delta_version: bytes
    first_loss: float
    last_loss: float
    tokens: int
    wall_ms: int

    def __post_init__(self) -> None:
        _check_id("job_id", self.job_id)
        check_int("round", self.round, 0, MAX_ROUNDS - 1)
        _check_task_id(self.task_id)
        check_peer("worker", self.worker)
        _check_id("delta_version", self.delta_version)
        _check_float("first_loss", self.first_loss, 0.0, MAX_LOSS)
        _check_float("last_loss", self.last_loss, 0.0, MAX_LOSS)
        check_int("tokens", self.tokens)
        check_int("wall_ms", self.wall_ms)


def seal_task_result(key: SigningKey, result: TaskResult) -> bytes:
    """Result envelope bytes; LocalProtocolError unless ``key`` is the result's worker."""
    return _seal(key, DOMAIN_TASK_RESULT, result, result.worker, MAX_RESULT_BYTES)


def open_task_result(data: bytes) -> TaskResult:
    """Check result envelope bytes: envelope, body, then signer == worker."""
    result, envelope = _open(data, DOMAIN_TASK_RESULT, TaskResult, MAX_RESULT_BYTES)
    _signer_is(envelope, result.worker, "worker")
    return result


def check_result(result: TaskResult, assign: TaskAssign) -> None:
    """The coordinator's check that a result answers ``assign``: same job, round, task,
    worker and tokens (``inner_steps * batch_size * seq_len`` of the assignment), else
    RemoteProtocolError("result-mismatch")."""
    for name, got, want in (("job_id", result.job_id, assign.job_id),
                            ("round", result.round, assign.round),
                            ("task_id", result.task_id, assign.task_id),
                            ("worker", result.worker, assign.worker)):  # fmt: skip
        if got != want:
            raise RemoteProtocolError("result-mismatch", f"result {name} is not the task's")
    # The tokens a receipt carries weigh the delta in the outer step, the worker's
    # measured throughput and its reward: they are the assignment's, never the worker's say.
    if result.tokens != assign.tokens:
        raise RemoteProtocolError("result-mismatch", f"result tokens {result.tokens}, the "
                                                     f"task has {assign.tokens}")


def check_assign(assign: TaskAssign, *, me: str, sender: str, now_ms: int,
                 dataset_bytes: int | None = None) -> Job:
    """A worker's checks of a decoded assignment beyond its own consistency: it names
    this worker ("wrong-peer"), came from the job's coordinator ("wrong-peer"), is not
    past its deadline ("expired"), and, once the dataset's size is known, its slice lies
    in the train split ("bad-slice"). Returns the job."""
    job = assign.job_record
    if assign.worker != me:
        raise RemoteProtocolError("wrong-peer", f"the assignment names {assign.worker}")
    if job.coordinator != sender:
        raise RemoteProtocolError("wrong-peer", f"job coordinated by {job.coordinator}, "
                                                f"assigned by {sender}")
    if now_ms >= assign.deadline_ms:
        raise RemoteProtocolError("expired", f"deadline {assign.deadline_ms}, now {now_ms}")
    if dataset_bytes is not None:
        try:
            train_len = job.spec.train_split(dataset_bytes)
        except LocalProtocolError as exc:
            raise RemoteProtocolError("bad-slice", str(exc)) from None
        if assign.slice_start + assign.slice_len > train_len:
            end = assign.slice_start + assign.slice_len
            raise RemoteProtocolError("bad-slice", f"slice ends at {end}, the train split "
                                                   f"at {train_len}")
    return job


# --- receipts ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Receipt(_Message):
    """The coordinator's signed record that ``worker``'s result was checked and accepted.
    ``result`` is the worker's own sealed TaskResult, so the receipt carries both
    signatures; construction opens it and requires it to say what the receipt says
    ("result-mismatch")."""

    TYPE: ClassVar[str] = "receipt"
    MAX_BYTES: ClassVar[int] = MAX_RECEIPT_BYTES

    job_id: bytes
    round: int
    task_id: str
    worker: str
    coordinator: str
    delta_version: bytes
    tokens: int
    metrics: dict[str, float]
    verdict: str
    result: bytes
    issued_ms: int

    def __post_init__(self) -> None:
        _check_id("job_id", self.job_id)
        check_int("round", self.round, 0, MAX_ROUNDS - 1)
        _check_task_id(self.task_id)
        check_peer("worker", self.worker)
        check_peer("coordinator", self.coordinator)
        _check_id("delta_version", self.delta_version)
        check_int("tokens", self.tokens)
        if not isinstance(self.metrics, dict) or len(self.metrics) > MAX_METRICS:
            fail(f"metrics must be a map of at most {MAX_METRICS} entries")
        for name, value in self.metrics.items():
            if not (isinstance(name, str) and _METRIC.fullmatch(name)):
                fail("metric names are 1..32 characters of [a-z0-9_], a letter first")
            _check_float(f"metrics.{name}", value, -MAX_LOSS, MAX_LOSS)
        if self.verdict not in VERDICTS:
            fail(f"verdict must be one of {VERDICTS}")
        check_int("issued_ms", self.issued_ms)
        if not isinstance(self.result, bytes):
            fail("result must be bytes")
        try:
            inner = open_task_result(self.result)
        except RemoteProtocolError as exc:
            raise _remote_in("result", exc) from None
        for name in ("job_id", "round", "task_id", "worker", "delta_version", "tokens"):
            if getattr(inner, name) != getattr(self, name):
                fail(f"the worker's result has another {name}", "result-mismatch")

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        d["metrics"] = dict(sorted(self.metrics.items()))  # one order, whoever built it
        return d

    @property
    def task_result(self) -> TaskResult:
        """The worker's result, as it signed it."""
        return open_task_result(self.result)


def seal_receipt(key: SigningKey, receipt: Receipt) -> bytes:
    """Receipt envelope bytes; LocalProtocolError unless ``key`` is the coordinator."""
    return _seal(key, DOMAIN_RECEIPT, receipt, receipt.coordinator, MAX_RECEIPT_BYTES)


def issue_receipt(key: SigningKey, result_envelope: bytes, *, metrics: dict[str, float],
                  issued_ms: int) -> bytes:
    """The receipt for a worker's accepted result, signed by ``key`` as coordinator.
    RemoteProtocolError if ``result_envelope`` does not verify."""
    r = open_task_result(result_envelope)
    coordinator = peer_id_from_public_key(bytes(key.verify_key))
    return seal_receipt(key, Receipt(r.job_id, r.round, r.task_id, r.worker, coordinator,
                                     r.delta_version, r.tokens, dict(metrics),
                                     VERDICT_ACCEPTED, bytes(result_envelope), issued_ms))


def open_receipt(data: bytes) -> Receipt:
    """Check receipt envelope bytes: the coordinator's envelope, the body, the worker's
    result inside (envelope, body, signer == worker) and that it matches the receipt,
    then signer == coordinator. Every failure is a named RemoteProtocolError."""
    receipt, envelope = _open(data, DOMAIN_RECEIPT, Receipt, MAX_RECEIPT_BYTES)
    _signer_is(envelope, receipt.coordinator, "coordinator")
    return receipt


def receipt_id(data: bytes) -> bytes:
    """SHA-256 of the receipt envelope's body bytes (opened and verified first)."""
    return digest(open_envelope(data, DOMAIN_RECEIPT, MAX_RECEIPT_BYTES).body)


@dataclass(frozen=True)
class Verdict(_Message):
    """Coordinator -> worker, the answer to a result: accepted with its receipt, or
    rejected and why (no receipt). Construction opens the receipt and requires it to be
    for ``task_id``."""

    TYPE: ClassVar[str] = "verdict"
    MAX_BYTES: ClassVar[int] = MAX_VERDICT_BYTES
    OPTIONAL: ClassVar[frozenset[str]] = frozenset({"receipt"})

    task_id: str
    accepted: bool
    reason: str = ""
    receipt: bytes | None = None

    def __post_init__(self) -> None:
        _check_task_id(self.task_id)
        _check_bool("accepted", self.accepted)
        _check_reason(self.accepted, self.reason)
        if self.accepted != (self.receipt is not None):
            fail("an accepted verdict carries a receipt, a rejection none")
        if self.receipt is not None:
            if not isinstance(self.receipt, bytes):
                fail("receipt must be bytes")
            try:
                receipt = open_receipt(self.receipt)
            except RemoteProtocolError as exc:
                raise _remote_in("receipt", exc) from None
            if receipt.task_id != self.task_id:
                fail("the receipt is for another task", "result-mismatch")

    @classmethod
    def reject(cls, task_id: str, reason: str) -> Verdict:
        """A rejection with any text as the reason (made safe: :func:`safe_reason`)."""
        return cls(task_id, False, safe_reason(reason))


@dataclass(frozen=True)
class Prefetch(_Message):
    """Coordinator -> a worker that joined during a round: the version this round trains
    from and the job (so its dataset). The worker fetches both now, while the round runs,
    and rebuilds the next round's base from them and the small outer update, so its first
    task starts at once. No answer; the coordinator closes the stream. A hint, never a
    task: a worker may ignore it. Construction opens ``job``."""

    TYPE: ClassVar[str] = "prefetch"
    MAX_BYTES: ClassVar[int] = MAX_ASSIGN_BYTES

    job: bytes
    worker: str
    base_version: bytes

    def __post_init__(self) -> None:
        if not isinstance(self.job, bytes) or len(self.job) > MAX_JOB_BYTES:
            fail(f"job must be at most {MAX_JOB_BYTES} bytes of job envelope")
        check_peer("worker", self.worker)
        _check_id("base_version", self.base_version)
        try:
            open_job(self.job)
        except RemoteProtocolError as exc:
            raise _remote_in("job", exc) from None

    @property
    def job_record(self) -> Job:
        return open_job(self.job)[0]


def check_prefetch(msg: Prefetch, *, me: str, sender: str) -> Job:
    """A worker's checks of a prefetch hint: it names this worker and came from the job's
    coordinator ("wrong-peer"). Returns the job."""
    job = msg.job_record
    if msg.worker != me:
        raise RemoteProtocolError("wrong-peer", f"the hint names {msg.worker}")
    if job.coordinator != sender:
        raise RemoteProtocolError("wrong-peer", f"job coordinated by {job.coordinator}, "
                                                f"hinted by {sender}")
    return job


Message = TaskAssign | TaskReply | TaskProgress | Verdict | Prefetch
_UNSEALED: dict[str, type[Message]] = {
    c.TYPE: c for c in (TaskAssign, TaskReply, TaskProgress, Verdict, Prefetch)
}


def decode_worker_frame(data: bytes) -> TaskProgress | TaskResult:
    """A frame the worker sends after its reply: a :class:`TaskProgress`, or its sealed
    result (checked as :func:`open_task_result` does). Both are msgpack maps; progress is
    told apart by its type tag (an envelope has none)."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise RemoteProtocolError("malformed", "a frame must be bytes")
    if len(data) <= MAX_PROGRESS_BYTES:
        d = unpack_strict(bytes(data), MAX_PROGRESS_BYTES)
        if isinstance(d, dict) and d.get("type") == TaskProgress.TYPE:
            return TaskProgress.from_dict(d)
    return open_task_result(bytes(data))
def decode_message(data: bytes) -> Message:
    """Decode any unsealed task-stream message by its type tag (sealed results travel as
    envelopes: :func:`open_task_result`)."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise RemoteProtocolError("malformed", "a message must be bytes")
    cap = max(c.MAX_BYTES for c in _UNSEALED.values())
    if len(data) > cap:
        raise RemoteProtocolError("oversized", f"message of {len(data)} bytes")
    d = unpack_strict(bytes(data), cap)
    tag = d.get("type") if isinstance(d, dict) else None
    cls = _UNSEALED.get(tag) if isinstance(tag, str) else None
    if cls is None:
        raise RemoteProtocolError("wrong-type", f"unknown message type {tag!r:.40}")
    if len(data) > cls.MAX_BYTES:
        raise RemoteProtocolError("oversized", f"{cls.TYPE} of {len(data)} bytes")
    return cls.from_dict(d)


# --- the names of the versions a job publishes -----------------------------------------------

# A job publishes, per task, the worker's delta, and per round the merged version and the
# int8 outer update that turns the previous version into it. The deltas and updates are
# the job's internals (`iollm model list` hides them unless --all); the round versions are
# models. Names are all that every node sees of a version it only heard announced, so the
# role is read from them: these functions make the names and `job_version_role` reads them.
_DELTA_NAME = re.compile(r"delta [0-9a-f]{12} [A-Za-z0-9._:-]{1,64}")
_UPDATE_NAME = re.compile(r".+ update r[0-9]+")


def delta_version_name(job: bytes, task_id: str) -> str:
    return f"delta {job.hex()[:12]} {task_id}"


def update_version_name(job_name: str, round_: int) -> str:
    """The outer update that round ``round_`` (0-based) made."""
    return f"{job_name} update r{round_ + 1}"


def round_version_name(job_name: str, round_: int) -> str:
    """The version round ``round_`` (0-based) made."""
    return f"{job_name} r{round_ + 1}"


def job_version_role(name: str) -> str | None:
    """"delta" or "update" for a name a job gives its internal versions, else None."""
    if _DELTA_NAME.fullmatch(name):
        return "delta"
    if _UPDATE_NAME.fullmatch(name):
        return "update"
    return None
