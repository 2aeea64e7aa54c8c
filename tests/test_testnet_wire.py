"""The namespace testnet's relay (node/testnet/wire.py) carries what its links claim,
without daemons: shaped links deliver their rate to bulk TCP, on a busy machine too (the
relay runs ahead of the hosts' processes). Root needed; skipped elsewhere."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from node.testnet.links import LinkShape
from node.testnet.netns import (
    NetnsError,
    NetState,
    check_available,
    create_network,
    namespaces,
    shape,
    tcp_stream_mbit,
    teardown,
)

try:
    check_available()
    UNAVAILABLE = ""
except NetnsError as exc:
    UNAVAILABLE = str(exc)
# CI runs as root, where set-up installs what is missing: there the tests run (and fail).
pytestmark = [pytest.mark.skipif(bool(UNAVAILABLE) and os.geteuid() != 0, reason=UNAVAILABLE),
              pytest.mark.timeout(120)]

PREFIX = f"wire{os.getpid() % 10**6}"
MIB = 1 << 20
# A bulk TCP stream's payload over a link: 1448 of each 1500 bytes (IPv4 and TCP headers
# with timestamps), less the congestion control's probing. Slow start is not counted (the
# first quarter of each stream is not timed): it is the same on any link, and its share of
# a short run on a busy machine put the whole-stream rate at the floor.
FLOOR = 0.80
# The rate is timed by the receiver from its accept(): bytes the kernel took in before the
# reading thread ran count as if they came faster, by a few percent at most.
CEILING = 1.05


@pytest.fixture
def net(tmp_path: Path) -> Iterator[tuple[Path, NetState]]:
    directory = tmp_path / "net"
    try:
        yield directory, create_network(directory, PREFIX, ["sink", "a", "b", "c"])
    finally:
        teardown(PREFIX, directory)
        assert namespaces(PREFIX) == []


def streams(state: NetState, senders: list[str], mib: int) -> list[float]:
    sink = state.host("sink")
    rates: list[float] = []
    threads = [threading.Thread(target=lambda i=i, name=name: rates.append(tcp_stream_mbit(
        state.host(name).netns, sink.netns, str(sink.addr), mib * MIB, 5300 + i,
        after=mib * MIB // 4)))
        for i, name in enumerate(senders)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(100)
    assert len(rates) == len(senders), "a stream failed"
    return rates


def test_relay_runs_ahead_of_the_hosts(net: tuple[Path, NetState]) -> None:
    _, state = net
    assert state.wire_pid is not None
    if os.sched_getscheduler(state.wire_pid) != os.SCHED_FIFO:
        # wire.prioritise() falls back to nice -20 where real-time scheduling is refused
        # (no CAP_SYS_NICE, or no real-time runtime in this cgroup).
        assert os.getpriority(os.PRIO_PROCESS, state.wire_pid) == -20


# A chaos-stage test (run serially after the default suite): a throughput floor is only
# fair with the machine's two cores not shared with another worker's testnets.
@pytest.mark.chaos
def test_shaped_links_carry_their_rate(net: tuple[Path, NetState]) -> None:
    directory, state = net
    shape(directory, ["a"], LinkShape(delay_ms=25, rate_mbit=100))
    [one] = streams(state, ["a"], 32)
    assert FLOOR * 100 <= one <= CEILING * 100, one  # the rate reached, and held
    shape(directory, ["a", "b", "c"], LinkShape(delay_ms=25, rate_mbit=50))
    three = streams(state, ["a", "b", "c"], 16)
    assert all(FLOOR * 50 <= r <= CEILING * 50 for r in three), three
    print(f"\n100 Mbit/s, 50 ms RTT: {one:.1f} Mbit/s; three 50 Mbit/s links at once: "
          f"{' + '.join(f'{r:.1f}' for r in three)} = {sum(three):.1f} Mbit/s")
