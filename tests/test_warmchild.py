"""Task children forked from the warm parent (node/jobs/warmchild.py), through
``run_taskproc`` as the daemon calls it: progress, priority, memory, cancel, a killed
child, a killed warm parent, a killed daemon, and the fresh-child path when no warm parent
can start."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

import psutil
import pytest
import trio

from node.jobs.taskrun import CHILD_NICE, StepProgress, TaskProcError, run_taskproc

ROOT = Path(__file__).resolve().parent.parent
CONFIG = {"n_layer": 1, "n_head": 2, "n_embd": 16, "block_size": 8}


def warm_parent(proc: psutil.Process | None = None) -> psutil.Process:
    """The one live fork server of ``proc`` (this process by default)."""
    found = [c for c in (proc or psutil.Process()).children()
             if "multiprocessing.forkserver" in " ".join(c.cmdline())
             and c.status() != psutil.STATUS_ZOMBIE]
    assert len(found) == 1, found
    return found[0]


def task_child() -> psutil.Process:
    (child,) = warm_parent().children()
    return child


def run(req: dict[str, Any], **kw: Any) -> dict[str, Any]:
    return trio.run(partial(run_taskproc, req, timeout_s=60, what="training", **kw))


def train(d: Path, steps: int, out: str) -> dict[str, Any]:
    return {"op": "train", "model_dir": str(d / "m"), "data_files": [str(d / "data")],
            "slice_start": 0, "slice_len": 20_000, "seed": 1, "steps": steps,
            "batch_size": 2, "seq_len": 8, "lr": 1e-3, "threads": 1, "out_dir": str(d / out)}


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("warm")
    (d / "data").write_bytes(bytes(range(256)) * 100)
    run({"op": "init", "arch": "gpt", "config": CONFIG, "seed": 0, "out_dir": str(d / "m")})
    return d


@pytest.mark.timeout(60)
def test_progress_priority_and_memory(job: Path) -> None:
    seen: list[StepProgress] = []
    nice: list[int] = []

    async def on_step(step: StepProgress) -> None:
        seen.append(step)
        if not nice:
            nice.append(task_child().nice())  # blocks its reader: the child waits

    answer = run(train(job, 10, "t"), on_step=on_step)
    assert [s.step for s in seen] == list(range(1, 11)) and answer["tokens"] == 10 * 2 * 8
    assert nice == [CHILD_NICE]
    assert answer["peak_rss_bytes"] > 50 << 20  # its own peak, the imported torch included


@pytest.mark.timeout(60)
def test_cancel_kills_the_child_and_a_killed_child_is_an_error(job: Path) -> None:
    pids: list[int] = []

    async def cancelled() -> None:
        with trio.move_on_after(50) as scope:
            async def on_step(_: StepProgress) -> None:
                pids.append(task_child().pid)
                scope.cancel()
            await run_taskproc(train(job, 10**7, "never"), timeout_s=50, what="training",
                               on_step=on_step)
        assert scope.cancelled_caught

    trio.run(cancelled)
    assert len(pids) == 1 and not psutil.pid_exists(pids[0])  # killed and reaped

    async def kill_it(_: StepProgress) -> None:
        os.kill(task_child().pid, signal.SIGKILL)

    with pytest.raises(TaskProcError, match=r"the child exited -9 \(train: step 1/10000000"):
        run(train(job, 10**7, "never"), on_step=kill_it)
    assert run(train(job, 1, "after"))["tokens"] == 16  # the next task is unaffected


@pytest.mark.timeout(90)
def test_a_dead_warm_parent_is_started_again(job: Path) -> None:
    run(train(job, 1, "before"))
    old = warm_parent()
    old.kill()  # not reaped here: multiprocessing waits for its own child
    deadline = time.monotonic() + 20
    while old.status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert run(train(job, 1, "after"))["tokens"] == 16
    assert warm_parent().pid != old.pid


@pytest.mark.timeout(60)
def test_the_warm_parent_only_imported(job: Path) -> None:
    """Forking after torch's intra-op pool started, or after CUDA, is unsafe. Once it has
    forked, the warm parent is single-threaded: numpy's BLAS stops its threads at a fork,
    an intra-op pool would not (measured: a 64x64 matmul on two threads before forking
    leaves 3 threads after it). Children check CUDA themselves (warmchild._child_main)."""
    run(train(job, 1, "t1"))
    assert warm_parent().num_threads() == 1


DAEMON = """
import json, multiprocessing, sys, trio
from node.jobs.taskrun import run_taskproc

async def main(req):
    async def on_step(_):
        print(json.dumps({"step": 1}), flush=True)
    print(json.dumps(await run_taskproc(req, timeout_s=60, what="t", on_step=on_step)),
          flush=True)

if __name__ == "__main__":
    if sys.argv[1] == "unstartable":  # no warm parent can start: fresh children
        multiprocessing.set_executable("/nonexistent/python")
    for line in sys.stdin:
        trio.run(main, json.loads(line))
"""


@pytest.mark.timeout(90)
def test_a_killed_daemon_leaves_no_process(job: Path, tmp_path: Path) -> None:
    """SIGKILL of the process that runs tasks, while one runs: its task child ends (it
    watches the daemon), then the warm parent and multiprocessing's resource tracker
    (their pipes from the daemon read as closed)."""
    (tmp_path / "daemon.py").write_text(DAEMON)
    daemon = subprocess.Popen([sys.executable, str(tmp_path / "daemon.py"), "warm"],
                              cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)
    assert daemon.stdin is not None and daemon.stdout is not None
    try:
        daemon.stdin.write(json.dumps(train(job, 10**7, "never")) + "\n")
        daemon.stdin.flush()
        assert json.loads(daemon.stdout.readline()) == {"step": 1}
        server = warm_parent(psutil.Process(daemon.pid))
        assert len(server.children()) == 1  # the task child
        # With multiprocessing's resource tracker: every process the daemon started.
        spawned = psutil.Process(daemon.pid).children(recursive=True)
        assert len(spawned) == 3, spawned
        daemon.kill()
        daemon.wait(10)
        _, alive = psutil.wait_procs(spawned, timeout=30)
        assert not alive
    finally:
        daemon.kill()
        daemon.wait(10)


@pytest.mark.slow  # a fresh child imports torch: seconds (the default suite's budget)
@pytest.mark.timeout(60)
def test_fresh_children_when_no_warm_parent_starts(job: Path, tmp_path: Path) -> None:
    (tmp_path / "daemon.py").write_text(DAEMON)
    req = json.dumps({"op": "init", "arch": "gpt", "config": CONFIG, "seed": 0,
                      "out_dir": str(tmp_path / "m")})
    proc = subprocess.run([sys.executable, str(tmp_path / "daemon.py"), "unstartable"],
                          cwd=ROOT, input=req + "\n", capture_output=True, text=True,
                          timeout=50, check=True)
    answer = json.loads(proc.stdout.splitlines()[-1])
    assert answer["params"] > 0
    assert (tmp_path / "m" / "model.safetensors").read_bytes() == (
        job / "m" / "model.safetensors").read_bytes()  # the same bytes as a warm child's
    warnings = [ln for ln in proc.stderr.splitlines() if "no warm parent" in ln]
    assert len(warnings) == 1, proc.stderr
    assert re.search(r"no warm parent for task processes \(\w+Error: ", warnings[0])
