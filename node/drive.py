"""One way to run a sans-IO state machine (protocol/) from trio.

A machine takes events (a message, the time) and returns actions; it never waits. Its
service owns the waiting: for the next message in an inbox, for the machine's next
deadline on the injected clock (``clock_ms``: wall time in tests is a fake), and for a
periodic tick of its own (a rebroadcast, a poll). :func:`drive` is that loop, written
once for the chain's consensus rounds and the jobs' round of tasks; :class:`Timers` keeps
the deadlines of a machine that asks for them as actions (``SetTimeout``).

Deadlines are in ms of ``clock_ms``; the wait is converted to trio time, so the loop
runs unchanged under trio's ``MockClock`` (tests/test_drive.py).
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

import trio

T = TypeVar("T")
Item = TypeVar("Item")


async def drive(
    inbox: trio.MemoryReceiveChannel[Item],
    *,
    clock_ms: Callable[[], int],
    deadline_ms: Callable[[], int | None],
    tick_s: float,
    on_item: Callable[[Item], Awaitable[None]],
    on_wake: Callable[[int, bool], Awaitable[None]],
    done: Callable[[], bool],
) -> None:
    """Until ``done()``: hand each inbox item to ``on_item``; when the machine's deadline
    (``deadline_ms()``, None for none) or the next tick (every ``tick_s``) comes first,
    call ``on_wake(now_ms, ticked)``. Items are never held back for a tick: a busy inbox
    still gets its ticks, since each wait ends at the earlier of the two."""
    next_tick = trio.current_time() + tick_s
    while not done():
        wake = next_tick
        deadline = deadline_ms()
        if deadline is not None:
            wake = min(wake, trio.current_time() + max(0, deadline - clock_ms()) / 1000)
        if trio.current_time() < wake:
            got: list[Item] = []
            with trio.move_on_at(wake):
                got.append(await inbox.receive())
            if got:
                await on_item(got[0])
                continue
        ticked = trio.current_time() >= next_tick
        if ticked:
            next_tick = trio.current_time() + tick_s
        await on_wake(clock_ms(), ticked)


class Timers(Generic[T]):
    """Deadlines (ms) with a payload each; equal deadlines come out in the order set."""

    def __init__(self) -> None:
        self._heap: list[tuple[int, int, T]] = []
        self._seq = itertools.count()

    def __len__(self) -> int:
        return len(self._heap)

    def set(self, at_ms: int, payload: T) -> None:
        heapq.heappush(self._heap, (at_ms, next(self._seq), payload))

    def next_ms(self) -> int | None:
        return self._heap[0][0] if self._heap else None

    def due(self, now_ms: int) -> list[T]:
        """Remove and return the payloads whose deadline is at or before ``now_ms``."""
        out = []
        while self._heap and self._heap[0][0] <= now_ms:
            out.append(heapq.heappop(self._heap)[2])
        return out
