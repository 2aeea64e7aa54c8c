"""Running torch work in a child process (node/jobs/taskproc.py) from trio.

The daemon never imports torch (about 200 MiB of resident memory, and seconds of import
time, that a node which only shares models should not pay). Training a micro-task,
checking results and the outer step each run in a child: one JSON request, progress
lines on its stderr, one JSON answer as the last line of its stdout. A child that crashes
takes nothing with it; a cancelled run kills the child. Children are forks of a warm
parent that imported torch once, given the request as an argument
(node/jobs/warmchild.py), or fresh ``python -m node.jobs.taskproc`` processes reading it
on stdin where that parent cannot start.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import trio

from node.errors import NodeError
from node.jobs import warmchild

log = logging.getLogger(__name__)

MAX_ANSWER_BYTES = 4 << 20  # a JSON answer is numbers and paths
# Children run at a lower CPU priority: training saturates every core it is given, and
# the node's own event loop (streams, gossip, the DHT) must keep answering meanwhile, or
# its peers time it out. Measured: 7 training children on 2 cores at normal priority made
# libp2p stream negotiation in the parent miss its 10 s deadline.
CHILD_NICE = 10


class TaskProcError(NodeError):
    """The child failed; the message is its own error line, or how it died. A NodeError:
    an API operation whose child fails (``model init``) ends ``failed`` with this line,
    not as an internal error."""


# The line taskproc's training loop writes on stderr every tenth of its steps
# (node/jobs/taskproc.py, run_training): "train: step 5/50 loss 3.1416".
STEP_LINE = re.compile(r"^\w+: step (\d+)/(\d+) loss (\S+)$")
MAX_STDERR_KEPT = 64 << 10  # the tail of a child's stderr kept for its error line


@dataclass(frozen=True)
class StepProgress:
    """A training child's progress: ``step`` of ``steps`` done, the loss of that step."""

    step: int
    steps: int
    loss: float


def parse_step_line(line: str) -> StepProgress | None:
    m = STEP_LINE.match(line.strip())
    if m is None:
        return None
    try:
        loss = float(m.group(3))
    except ValueError:
        return None
    return StepProgress(int(m.group(1)), int(m.group(2)), loss)


async def run_taskproc(request: dict[str, Any], *, timeout_s: float, what: str,
                       on_step: Callable[[StepProgress], Awaitable[None]] | None = None,
                       ) -> dict[str, Any]:
    """Run one taskproc op and return its answer (``ok`` removed). TaskProcError on a
    failure, a timeout or an unreadable answer. ``on_step`` is awaited with each
    progress line of a training child as it comes (stderr is read while it runs)."""
    env = dict(os.environ)
    threads = str(request.get("threads", 1))
    # Thread pools sized before torch starts; taskproc also calls set_num_threads.
    env.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads, PYTHONUNBUFFERED="1")
    data = json.dumps(request, allow_nan=False).encode()
    out = bytearray()
    err = bytearray()

    async def read_stdout(stream: Any) -> None:
        async for chunk in stream:
            out.extend(chunk)

    async def read_stderr(stream: Any) -> None:
        pending = b""
        async for chunk in stream:
            err.extend(chunk)
            del err[:-MAX_STDERR_KEPT]
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                step = parse_step_line(line.decode(errors="replace"))
                if step is not None and on_step is not None:
                    await on_step(step)

    with trio.move_on_after(timeout_s) as scope:
        async with trio.open_nursery() as nursery:
            proc = await nursery.start(partial(
                warmchild.run_child, data, env=env, nice=CHILD_NICE, preexec=_lower_priority))
            nursery.start_soon(read_stdout, proc.stdout)
            nursery.start_soon(read_stderr, proc.stderr)
    if scope.cancelled_caught:
        raise TaskProcError(f"{what}: no answer within {timeout_s:g} s")
    stderr = err.decode(errors="replace").strip()
    if stderr:
        log.debug("%s: %s", what, stderr[-2000:])
    lines = out.decode(errors="replace").strip().splitlines()
    answer: Any = None
    if lines and len(lines[-1]) <= MAX_ANSWER_BYTES:
        try:
            answer = json.loads(lines[-1])
        except json.JSONDecodeError:
            answer = None
    if not isinstance(answer, dict):
        tail = stderr.splitlines()[-1] if stderr else "no output"
        raise TaskProcError(f"{what}: the child exited {proc.returncode} ({tail})")
    if not answer.pop("ok", False):
        raise TaskProcError(f"{what}: {answer.get('error', 'failed without a message')}")
    return answer


def _lower_priority() -> None:
    """In the child, before exec: a nice value of CHILD_NICE (best effort)."""
    with contextlib.suppress(OSError):
        os.nice(CHILD_NICE)


def finite(value: Any, name: str) -> float:
    """A finite float from a child's answer, or TaskProcError."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise TaskProcError(f"{name}: expected a finite number, got {value!r}")
    return float(value)
