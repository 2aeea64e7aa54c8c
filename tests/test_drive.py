"""node/drive.py on trio's MockClock: the loop that runs the chain's and the jobs'
machines wakes at each deadline and tick, in order, and never holds back an item."""

from __future__ import annotations

from collections.abc import Callable

import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from node.drive import Timers, drive

Event = tuple[int, str, object]


def run_drive(deadlines: list[int], arrivals: list[int], tick_ms: int, end_ms: int
              ) -> list[Event]:
    """Drive a machine whose only state is ``deadlines`` (Timers), with an item arriving
    at each of ``arrivals`` (ms), until ``end_ms``; every call the loop made, timed."""
    events: list[Event] = []

    def clock_ms() -> int:
        return round(trio.current_time() * 1000)

    async def main() -> None:
        timers: Timers[int] = Timers()
        for i, at in enumerate(deadlines):
            timers.set(at, i)
        send, recv = trio.open_memory_channel[int](len(arrivals) + 1)

        async def produce() -> None:
            for at in sorted(arrivals):
                await trio.sleep_until(at / 1000)
                await send.send(at)

        async def on_item(item: int) -> None:
            events.append((clock_ms(), "item", item))

        async def on_wake(now: int, ticked: bool) -> None:
            due = timers.due(now)
            if ticked:
                events.append((now, "tick", None))
            for i in due:
                events.append((now, "deadline", deadlines[i]))

        done: Callable[[], bool] = lambda: clock_ms() >= end_ms  # noqa: E731
        async with trio.open_nursery() as nursery:
            nursery.start_soon(produce)
            await drive(recv, clock_ms=clock_ms, deadline_ms=timers.next_ms,
                        tick_s=tick_ms / 1000, on_item=on_item, on_wake=on_wake, done=done)
            nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    return events


def test_deadlines_ticks_and_items_come_at_their_times_in_order() -> None:
    events = run_drive(deadlines=[2500, 700, 700], arrivals=[1200, 1300], tick_ms=1000,
                       end_ms=3000)
    assert events == [
        (700, "deadline", 700), (700, "deadline", 700),
        (1000, "tick", None),
        (1200, "item", 1200), (1300, "item", 1300),
        (2000, "tick", None),
        (2500, "deadline", 2500),
        (3000, "tick", None),
    ]


@settings(max_examples=60, deadline=None)
@given(deadlines=st.lists(st.integers(0, 5000), max_size=8),
       arrivals=st.lists(st.integers(1, 5000), max_size=8),
       tick_ms=st.integers(50, 2000))
def test_every_deadline_and_item_is_handled_once_on_time(
        deadlines: list[int], arrivals: list[int], tick_ms: int) -> None:
    events = run_drive(deadlines, arrivals, tick_ms, end_ms=6000)
    fired = [(at, value) for at, kind, value in events if kind == "deadline"]
    assert sorted(v for _, v in fired) == sorted(deadlines)
    assert all(at == max(value, 0) for at, value in fired)  # never late, never early
    items = [(at, value) for at, kind, value in events if kind == "item"]
    assert [v for _, v in items] == sorted(arrivals)
    assert all(at == value for at, value in items)  # handled the moment it came
    ticks = [at for at, kind, _ in events if kind == "tick"]
    assert ticks and ticks == [tick_ms * k for k in range(1, len(ticks) + 1)]
    assert [at for at, _, _ in events] == sorted(at for at, _, _ in events)


def test_timers_keep_the_order_they_were_set_in_for_equal_deadlines() -> None:
    timers: Timers[str] = Timers()
    for name, at in [("c", 5), ("a", 1), ("b", 5), ("d", 9)]:
        timers.set(at, name)
    assert timers.next_ms() == 1 and len(timers) == 4
    assert timers.due(0) == []
    assert timers.due(5) == ["a", "c", "b"]
    assert timers.next_ms() == 9
    assert timers.due(100) == ["d"] and timers.next_ms() is None
