"""Long operations the daemon runs for the API: publish and fetch take seconds to hours, far
longer than one HTTP request, so a route starts one and answers its id at once, and the
client polls ``GET /v1/ops?id=...`` for its progress and, at the end, its result or error.

    ops = Operations(clock_ms)
    op_id = ops.start(nursery, "fetch", lambda progress: work(progress))
    ops.get(op_id)  # {"id", "kind", "state", "phase", "done_bytes", ..., "result", "error"}

An operation runs as a task of the nursery given to `start` (the daemon's own), so it goes
on when the client stops waiting and ends with the daemon. Its function receives a
`Progress` that it updates as it works; `get` reads it. The function's return value, which
must be JSON-able, becomes ``result``.

Errors. The errors of bad input or of a failed transfer (the node's own errors,
node/errors.py: `PublishError`, `FetchError`, `UnknownVersion`...; and `ValueError`,
`KeyError`) end the operation ``failed`` with their message, for the user.
Any other exception is a bug: it is logged with its traceback and reported as
``internal error: <type>: <message>``; it never reaches the nursery, so one failed
operation cannot stop the node.

Finished operations are kept `KEEP_FINISHED_MS` after they end, at most `MAX_FINISHED` of
them (the oldest go first), so a client that polls late still sees how they ended (the
daemon passes ``[api] keep_finished_s`` and ``max_finished``, whose defaults these are).
"""

from __future__ import annotations

import json
import logging
import random
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from node.errors import NodeError, NotFound
from node.smip.types import Progress

__all__ = ["KEEP_FINISHED_MS", "MAX_FINISHED", "Operations"]

log = logging.getLogger(__name__)

KEEP_FINISHED_MS = 60 * 60 * 1000  # a finished operation is forgotten an hour after it ended
MAX_FINISHED = 256  # and at most this many finished operations are kept

RUNNING, DONE, FAILED = "running", "done", "failed"
USER_ERRORS: tuple[type[Exception], ...] = (NodeError, ValueError, KeyError)

OpFunction = Callable[[Progress], Awaitable[Any]]


@dataclass
class _Op:
    id: str
    kind: str
    started_ms: int
    progress: Progress = field(default_factory=Progress)
    state: str = RUNNING
    result: Any = None
    error: str | None = None
    ended_ms: int | None = None

    def to_json(self) -> dict[str, Any]:
        p = self.progress
        return {
            "id": self.id,
            "kind": self.kind,
            "state": self.state,
            "phase": p.phase,
            "done_bytes": p.done_bytes,
            "total_bytes": p.total_bytes,
            "detail": p.detail,
            "result": self.result,
            "error": self.error,
            "started_ms": self.started_ms,
            "ended_ms": self.ended_ms,
        }


def _message(exc: Exception) -> str:
    if isinstance(exc, KeyError) and len(exc.args) == 1 and isinstance(exc.args[0], str):
        return exc.args[0]  # str(KeyError("x")) would be "'x'"
    return str(exc) or type(exc).__name__


def user_error_message(exc: BaseException) -> str | None:
    """The message for the user if `exc` is bad input or a failed transfer, else None.

    A group (raised out of a nursery) counts when every exception in it does; their
    messages are joined.
    """
    if isinstance(exc, BaseExceptionGroup):
        parts = [user_error_message(e) for e in exc.exceptions]
        return None if None in parts else "; ".join(p for p in parts if p)
    if isinstance(exc, USER_ERRORS):
        return _message(exc)
    return None


class UnknownOperation(NotFound):
    """No operation has that id (never started, or forgotten after it ended)."""


class Operations:
    """The daemon's long operations by id. Used from one trio run."""

    def __init__(self, clock_ms: Callable[[], int], *, rng: random.Random | None = None,
                 max_finished: int = MAX_FINISHED,
                 keep_finished_ms: int = KEEP_FINISHED_MS) -> None:
        self.clock_ms = clock_ms
        self.rng = rng or random.Random()
        self.max_finished = max_finished
        self.keep_finished_ms = keep_finished_ms
        self._ops: dict[str, _Op] = {}
        self._finished: deque[str] = deque()  # ids in the order they finished

    def start(self, nursery: trio.Nursery, kind: str, fn: OpFunction) -> str:
        """Run ``fn(progress)`` as a task of `nursery`; return the new operation's id."""
        self._prune()
        op_id = f"{self.rng.getrandbits(64):016x}"
        while op_id in self._ops:  # pragma: no cover - 64 random bits
            op_id = f"{self.rng.getrandbits(64):016x}"
        op = _Op(id=op_id, kind=kind, started_ms=self.clock_ms())
        self._ops[op_id] = op
        nursery.start_soon(self._run, op, fn, name=f"op {kind} {op_id}")
        return op_id

    def get(self, op_id: str) -> dict[str, Any]:
        """The operation's state as JSON; UnknownOperation if unknown or forgotten."""
        self._prune()
        op = self._ops.get(op_id)
        if op is None:
            raise UnknownOperation(f"no operation {op_id!r} (unknown, or finished long ago)")
        return op.to_json()

    def listing(self) -> list[dict[str, Any]]:
        """Every operation still kept (running, or finished recently), newest first."""
        self._prune()
        return [op.to_json() for op in sorted(self._ops.values(), key=lambda o: -o.started_ms)]

    async def _run(self, op: _Op, fn: OpFunction) -> None:
        try:
            result = await fn(op.progress)
        except Exception as exc:
            message = user_error_message(exc)
            if message is None:
                log.exception("operation %s (%s) failed", op.id, op.kind)
                message = f"internal error: {type(exc).__name__}: {_message(exc)}"
            else:
                log.info("operation %s (%s) failed: %s", op.id, op.kind, message,
                         exc_info=log.isEnabledFor(logging.DEBUG))
            self._finish(op, FAILED, error=message)
            return
        try:
            json.dumps(result, allow_nan=False)
        except (TypeError, ValueError) as exc:  # a bug of the operation, not the user's input
            log.error("operation %s (%s) returned a result that is not JSON: %s", op.id,
                      op.kind, exc)
            self._finish(op, FAILED, error=f"internal error: result is not JSON: {exc}")
            return
        self._finish(op, DONE, result=result)

    def _finish(self, op: _Op, state: str, *, result: Any = None, error: str | None = None
                ) -> None:
        op.state, op.result, op.error, op.ended_ms = state, result, error, self.clock_ms()
        self._finished.append(op.id)
        self._prune()

    def _prune(self) -> None:
        cutoff = self.clock_ms() - self.keep_finished_ms
        drop = max(0, len(self._finished) - self.max_finished)
        while self._finished and (drop > 0 or self._ended(self._finished[0]) < cutoff):
            del self._ops[self._finished.popleft()]
            drop -= 1

    def _ended(self, op_id: str) -> int:
        ended = self._ops[op_id].ended_ms
        assert ended is not None
        return ended
