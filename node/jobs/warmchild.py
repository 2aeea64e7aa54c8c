"""Task children forked from a warm parent that has already imported torch and node.ml.

A fresh ``python -m node.jobs.taskproc`` pays about 2 s of CPU importing torch before it
works, for every micro-task and every check of every round. Here one warm parent per
daemon process (the standard library's ``multiprocessing`` fork server, started lazily on
the first task) imports taskproc's modules once, and every task is a fork of it: the same
isolation as before (a crash, an out-of-memory kill or a cancelled task takes nothing else
with it), without the import.

What the warm parent may do before forking: import modules, nothing else. Forking a
process after torch's intra-op thread pool started is unsafe (the child inherits the
pool's locks, not its threads), and CUDA cannot survive a fork at all. Importing torch
starts neither: both start on the first op, which happens only in a child
(tests/test_warmchild.py checks the live warm parent's threads, and every child refuses to
work when it inherited an initialised CUDA).

A child is started by ``Process.start`` in a worker thread (it blocks on the fork server's
socket, for seconds the first time while the parent imports). The child gets the request
as an argument and this side's pipes as its stdout and stderr (taskproc's protocol
unchanged: progress lines on stderr, the answer as the last line of stdout), lowers its own
priority, and exits when the daemon dies: it watches the daemon's end of the pipe it was
started through, because its parent is the fork server, which would wait for it rather
than end it. The fork server exits once the daemon and every child have closed its
"alive" pipe, so a daemon killed with SIGKILL leaves no process behind either.

One rule multiprocessing imposes: a child runs the daemon's main script again as
``__mp_main__`` when the daemon was started from a script path (the ``iollm`` console
script, whose ``if __name__`` guard keeps it to one import), not when started with
``python -m node.cli``. That import, node.cli.app, is preloaded: 0.09 s a task measured
under load otherwise, 0.3 ms with it.

If the warm parent cannot be started, tasks run as fresh ``python -m node.jobs.taskproc``
children as they did before, with one WARNING in the log. A warm parent that died (killed,
out of memory) is started again on the next task.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from multiprocessing.connection import wait as wait_ready
from multiprocessing.process import BaseProcess
from typing import Any

import trio

log = logging.getLogger(__name__)

# What the warm parent imports, and nothing more (see the module's doc): taskproc (torch,
# safetensors, node.ml); torch._inductor.config, which torch.use_deterministic_algorithms
# imports on first call (node/ml/trainer.py, every training and check) and which pulls in
# torch._dynamo: 1.0 s of CPU per child otherwise (measured), 70 MiB more in the warm parent;
# this module, which every child unpickles its entry point from; node.cli.app, which the
# ``iollm`` console script imports when a child runs it again (see the module's doc);
# transformers' model machinery, which every task of a Hugging Face model (node/ml/hf.py)
# imports: 1.1 s of CPU per child otherwise (measured), 34 MiB more in the warm parent, no
# thread started (a node without transformers skips it: the fork server ignores an
# ImportError in its preload).
PRELOAD = ["node.jobs.taskproc", "torch._inductor.config", "node.jobs.warmchild",
           "node.cli.app", "transformers.modeling_utils",
           "transformers.models.auto.modeling_auto"]
# A warm parent that died makes a start fail; the next one restarts it, once the dead
# one can be reaped (it may still be exiting: hence the pause).
START_ATTEMPTS = 3
START_RETRY_S = 0.2
KILL_WAIT_S = 5.0  # a SIGKILLed child is gone well within this

# Around starts and exit-status reads, both in worker threads: multiprocessing's start
# path is not made for concurrent use, and it reads the status of children that ended.
_lock = threading.Lock()
# A warm parent that could not start is tried again this long after (fresh children
# meanwhile): what failed (memory, file descriptors) may pass.
WARM_RETRY_S = 60.0
# time.monotonic, not trio's clock: this state outlives one trio.run (the CLI runs several).
_state: dict[str, Any] = {"fresh": False, "retry_at": float("-inf")}


class WarmChild:
    """A task child forked from the warm parent; the attributes taskrun reads of a
    ``trio.Process``: ``stdout``, ``stderr``, ``pid``, ``returncode`` (once it ended)."""

    def __init__(self, proc: BaseProcess, stdout: trio.lowlevel.FdStream,
                 stderr: trio.lowlevel.FdStream) -> None:
        self._proc = proc
        self.pid: int = proc.pid or 0
        self.stdout = stdout
        self.stderr = stderr
        self.returncode: int | None = None

    async def wait(self) -> int:
        """Its exit status, as a negative signal number when killed. The fork server
        reports it on the sentinel; 255 when the fork server itself died meanwhile."""
        await trio.lowlevel.wait_readable(self._proc.sentinel)
        self.returncode = await trio.to_thread.run_sync(_collect, self._proc)
        return self.returncode

    def kill(self) -> None:
        """SIGKILL, unless it already ended (its pid may be another process's by then)."""
        if self.returncode is None and not wait_ready([self._proc.sentinel], 0):
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)


async def run_child(request: bytes, *, env: dict[str, str], nice: int,
                    preexec: Callable[[], None],
                    task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """Run one taskproc child to its end, as ``trio.run_process`` would: ``task_status``
    gets the child (``stdout`` and ``stderr`` to read) once started; its ``returncode``
    is set when this returns; cancelled, it kills the child. A warm child when the warm
    parent works, else a fresh ``python -m node.jobs.taskproc`` (``preexec`` runs in it
    before exec: the same lowered priority)."""
    warm = not _state["fresh"] and time.monotonic() >= _state["retry_at"]
    child = await _start_warm(request, env, nice) if warm else None
    if child is None:
        await trio.run_process(
            [sys.executable, "-m", "node.jobs.taskproc"], stdin=request,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, check=False, env=env,
            preexec_fn=preexec, task_status=task_status)
        return
    try:
        task_status.started(child)
        await child.wait()
    finally:
        if child.returncode is None:  # cancelled: kill it and collect its status
            child.kill()
            with trio.move_on_after(KILL_WAIT_S) as scope:
                scope.shield = True
                await child.wait()


def set_fresh_children(fresh: bool) -> None:
    """Fresh ``python -m node.jobs.taskproc`` children from now on (True), as when no warm
    parent can start, or warm ones again (False): bench/task_start.py's baseline."""
    _state["fresh"] = fresh


async def _start_warm(request: bytes, env: dict[str, str], nice: int) -> WarmChild | None:
    """A forked child, or None (and fresh children for WARM_RETRY_S) when the warm parent
    cannot be started."""
    error: BaseException | None = None
    for attempt in range(START_ATTEMPTS):
        if attempt:
            await trio.sleep(START_RETRY_S)
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        out = Connection(out_w, readable=False)
        err = Connection(err_w, readable=False)
        try:
            proc = _context().Process(target=_child_main, args=(request, env, nice, out, err),
                                      name="iollm-task", daemon=True)
            await trio.to_thread.run_sync(_start, proc)
        except (OSError, EOFError, ValueError, RuntimeError) as e:
            # EOFError: the warm parent died between accepting and forking; the next
            # attempt's ensure_running() sees it dead and starts another.
            error = e
            os.close(out_r)
            os.close(err_r)
            continue
        finally:
            out.close()  # the child has its own copies now
            err.close()
        return WarmChild(proc, trio.lowlevel.FdStream(out_r), trio.lowlevel.FdStream(err_r))
    _state["retry_at"] = time.monotonic() + WARM_RETRY_S
    reason = (str(error).strip().splitlines() or [""])[0]
    log.warning("no warm parent for task processes (%s: %s): each task starts a fresh "
                "Python and imports torch (about 2 s more per task) for the next %.0f s",
                type(error).__name__, reason, WARM_RETRY_S)
    return None


def _context() -> Any:
    """The fork-server context, its warm parent preloading taskproc's modules."""
    ctx = multiprocessing.get_context("forkserver")  # ValueError where there is no fork
    ctx.set_forkserver_preload(PRELOAD)
    return ctx


def _start(proc: BaseProcess) -> None:
    with _lock:
        proc.start()


def _collect(proc: BaseProcess) -> int:
    """The exit status of a child that ended (its sentinel is readable), and its file
    descriptors closed. Under the lock: a start reaps ended children too (multiprocessing's
    _cleanup), and two readers of the status would split its bytes."""
    with _lock:
        code = proc.exitcode
        with contextlib.suppress(ValueError):
            proc.close()  # the sentinel and the daemon-side pipe end
    return 255 if code is None else code


def _child_main(request: bytes, env: dict[str, str], nice: int, out: Connection,
                err: Connection) -> None:
    """In the forked child: taskproc's protocol on the pipes it was given, then exit."""
    with contextlib.suppress(OSError):
        os.nice(nice)
    os.dup2(out.fileno(), 1)
    os.dup2(err.fileno(), 2)
    out.close()
    err.close()
    os.environ.clear()
    os.environ.update(env)
    _exit_with_daemon()
    from node.jobs import taskproc

    if taskproc.torch.cuda.is_initialized():  # inherited from the warm parent: unusable, see above
        print("the warm task parent initialised CUDA before forking", file=sys.stderr)
        sys.exit(70)
    sys.exit(taskproc.main(request))


def _exit_with_daemon() -> None:
    """End this child when the process that asked for it (the daemon) ends: the pipe it
    was started through reads as closed then."""
    parent = multiprocessing.parent_process()
    if parent is None or parent.sentinel is None:
        return

    def watch(sentinel: int) -> None:
        wait_ready([sentinel])
        os._exit(1)

    threading.Thread(target=watch, args=(parent.sentinel,), name="exit-with-daemon",
                     daemon=True).start()
