"""node/api/ops.py: long operations in a real trio nursery, driven by events, on a fake clock."""

from __future__ import annotations

import logging
import random
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import trio
import trio.testing

from node.api.ops import Operations, UnknownOperation
from node.jobs.taskrun import TaskProcError
from node.smip.store import QuotaExceeded
from node.smip.types import FetchError, Progress, PublishError, UnknownVersion

DEADLINE_S = 10


class Clock:
    def __init__(self, now_ms: int = 1_800_000_000_000) -> None:
        self.now_ms = now_ms

    def __call__(self) -> int:
        return self.now_ms


def run(body: Callable[[trio.Nursery], Awaitable[None]]) -> None:
    """Run body(nursery) under a deadline; the nursery waits for every operation."""

    async def main() -> None:
        with trio.fail_after(DEADLINE_S):
            async with trio.open_nursery() as nursery:
                await body(nursery)

    trio.run(main)


async def finish(ops: Operations, op_id: str) -> dict[str, Any]:
    await trio.testing.wait_all_tasks_blocked()
    return ops.get(op_id)


def test_progress_while_running_then_the_result() -> None:
    clock = Clock()
    ops = Operations(clock, rng=random.Random(1))
    reached, release = trio.Event(), trio.Event()

    async def work(progress: Progress) -> Any:
        progress.phase, progress.total_bytes, progress.done_bytes = "chunks", 1000, 250
        progress.detail = "3 providers"
        reached.set()
        await release.wait()
        progress.done_bytes, progress.phase = 1000, "done"
        return {"version": "ab" * 32}

    async def body(nursery: trio.Nursery) -> None:
        op_id = ops.start(nursery, "fetch", work)
        assert ops.get(op_id)["state"] == "running"  # not started yet: the initial progress
        await reached.wait()
        assert ops.get(op_id) == {
            "id": op_id, "kind": "fetch", "state": "running", "phase": "chunks",
            "done_bytes": 250, "total_bytes": 1000, "detail": "3 providers", "result": None,
            "error": None, "started_ms": 1_800_000_000_000, "ended_ms": None,
        }
        clock.now_ms += 1500
        release.set()
        done = await finish(ops, op_id)
        assert done["state"] == "done"
        assert done["result"] == {"version": "ab" * 32}
        assert (done["phase"], done["done_bytes"], done["error"]) == ("done", 1000, None)
        assert done["ended_ms"] - done["started_ms"] == 1500

    run(body)


@pytest.mark.parametrize(
    ("exc", "message"),
    [
        (PublishError("not a safetensors file: x.bin"), "not a safetensors file: x.bin"),
        (FetchError("no provider left for version 1234"), "no provider left for version 1234"),
        (ValueError("bad name"), "bad name"),
        (KeyError("unknown version ab12"), "unknown version ab12"),  # without repr quotes
        (UnknownVersion("no version known here starts with ab12"),
         "no version known here starts with ab12"),
        (ExceptionGroup("in a nursery", [FetchError("a"), ValueError("b")]), "a; b"),
        (QuotaExceeded(needed=2, quota=1, pinned=1, in_progress=0, held=1),
         "no room for 2 bytes: quota 1, pinned 1, in progress 0 (together 1, which eviction "
         "cannot free), so at most 0 bytes fit"),
        (TaskProcError("building the model: size: expected tiny"),
         "building the model: size: expected tiny"),
    ],
)
def test_user_errors_fail_with_their_message(exc: Exception, message: str,
                                             caplog: pytest.LogCaptureFixture) -> None:
    ops = Operations(Clock())

    async def work(progress: Progress) -> Any:
        progress.phase = "manifest"
        raise exc

    async def body(nursery: trio.Nursery) -> None:
        op_id = ops.start(nursery, "publish", work)
        failed = await finish(ops, op_id)
        assert (failed["state"], failed["error"], failed["result"]) == ("failed", message, None)
        assert failed["phase"] == "manifest"  # where it stopped
        assert failed["ended_ms"] is not None

    with caplog.at_level(logging.INFO, logger="node.api.ops"):
        run(body)
    assert "Traceback" not in caplog.text


def test_a_bug_is_an_internal_error_logged_with_traceback_and_the_node_goes_on(
        caplog: pytest.LogCaptureFixture) -> None:
    ops = Operations(Clock())
    release = trio.Event()

    async def bug(progress: Progress) -> Any:
        raise RuntimeError("index out of step")

    async def mixed(progress: Progress) -> Any:
        raise ExceptionGroup("two", [FetchError("no provider"), ZeroDivisionError("oops")])

    async def other(progress: Progress) -> Any:
        await release.wait()
        return 7

    async def body(nursery: trio.Nursery) -> None:
        slow = ops.start(nursery, "fetch", other)
        first = ops.start(nursery, "publish", bug)
        second = ops.start(nursery, "fetch", mixed)
        assert (await finish(ops, first))["error"] == \
            "internal error: RuntimeError: index out of step"
        assert (await finish(ops, second))["error"].startswith("internal error: ExceptionGroup")
        assert ops.get(slow)["state"] == "running"  # the nursery was not cancelled
        release.set()
        assert (await finish(ops, slow))["result"] == 7

    with caplog.at_level(logging.ERROR, logger="node.api.ops"):
        run(body)
    assert caplog.text.count("Traceback") == 2
    assert "index out of step" in caplog.text


def test_a_result_that_is_not_json_is_an_internal_error() -> None:
    ops = Operations(Clock())

    async def body(nursery: trio.Nursery) -> None:
        async def work(progress: Progress) -> Any:
            return {"when": object()}

        async def nan(progress: Progress) -> Any:
            return float("nan")

        for fn in (work, nan):
            failed = await finish(ops, ops.start(nursery, "fetch", fn))
            assert failed["state"] == "failed"
            assert failed["error"].startswith("internal error: result is not JSON")

    run(body)


def test_unknown_id_is_a_key_error() -> None:
    with pytest.raises(UnknownOperation, match="no operation 'nope'"):
        Operations(Clock()).get("nope")


def test_ids_are_distinct_and_come_from_the_rng() -> None:
    async def body(nursery: trio.Nursery) -> None:
        async def work(progress: Progress) -> Any:
            return None

        a = Operations(Clock(), rng=random.Random(5))
        b = Operations(Clock(), rng=random.Random(5))
        ids = [a.start(nursery, "fetch", work) for _ in range(50)]
        assert len(set(ids)) == 50
        assert all(len(i) == 16 and int(i, 16) >= 0 for i in ids)
        assert b.start(nursery, "fetch", work) == ids[0]

    run(body)


def test_finished_operations_are_kept_bounded_by_count() -> None:
    ops = Operations(Clock(), max_finished=2)
    release = trio.Event()

    async def quick(progress: Progress) -> Any:
        return "ok"

    async def slow(progress: Progress) -> Any:
        await release.wait()
        return "slow"

    async def body(nursery: trio.Nursery) -> None:
        running = ops.start(nursery, "fetch", slow)
        done = []
        for _ in range(4):
            done.append(ops.start(nursery, "publish", quick))
            await trio.testing.wait_all_tasks_blocked()
        for old in done[:2]:
            with pytest.raises(UnknownOperation):
                ops.get(old)
        assert [ops.get(i)["result"] for i in done[2:]] == ["ok", "ok"]
        assert ops.get(running)["state"] == "running"  # running ones are never dropped
        release.set()
        assert (await finish(ops, running))["result"] == "slow"
        with pytest.raises(UnknownOperation):  # it finished last, so the oldest finished one went
            ops.get(done[2])

    run(body)


def test_finished_operations_are_forgotten_after_a_while() -> None:
    clock = Clock()
    ops = Operations(clock, keep_finished_ms=60_000)

    async def quick(progress: Progress) -> Any:
        return 1

    async def body(nursery: trio.Nursery) -> None:
        first = await finish(ops, ops.start(nursery, "publish", quick))
        clock.now_ms += 30_000
        second = await finish(ops, ops.start(nursery, "publish", quick))
        clock.now_ms += 30_000
        assert ops.get(first["id"])["state"] == "done"  # exactly 60 s: still kept
        clock.now_ms += 1
        with pytest.raises(UnknownOperation):
            ops.get(first["id"])
        assert ops.get(second["id"])["state"] == "done"

    run(body)
