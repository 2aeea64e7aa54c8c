"""tests/memnet.py, the in-memory P2P the MockClock service tests run on: it must keep
the semantics the services rely on (node/p2p/framing.py over its streams, gossip judged
before relay, the DHT walk over its stores, peers that vanish)."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st
from nacl.signing import SigningKey

from node.p2p import P2P, GossipMessage, PeerGone, PeerId, PeerInfo, RecordValidator, Unreachable
from node.p2p.framing import FrameEnded, FrameReader, frame_prefix, read_frame, write_frame
from node.p2p.host import NotServed
from node.p2p.lookup import HEDGE_MIN_S, RoundTrips, Unresponsive, walk
from tests.memnet import (
    MemNetwork,
    MemNode,
    MemStreamEOF,
    mock_clock_ms,
    open_memnet,
    run_on_mock_clock,
)

pytestmark = pytest.mark.timeout(30)


def key(i: int) -> SigningKey:
    return SigningKey(bytes([i + 1]) * 32)


@asynccontextmanager
async def world_of(n: int, validators: dict[str, RecordValidator] | None = None,
                   ) -> AsyncIterator[tuple[MemNetwork, list[MemNode]]]:
    async with open_memnet(mock_clock_ms()) as world, AsyncExitStack() as stack:
        nodes = [await stack.enter_async_context(world.open_node(key(i), [], validators))
                 for i in range(n)]
        yield world, nodes


def run(main: Callable[[], Awaitable[None]]) -> None:
    run_on_mock_clock(main)


def test_memnode_is_a_p2p() -> None:
    async def main() -> None:
        async with world_of(1) as (_, (a,)):
            net: P2P = a  # mypy checks the Protocol; here the attributes exist
            assert all(callable(getattr(net, name)) for name in P2P.__dict__
                       if not name.startswith("_") and name != "peer_id")
    run(main)


def test_frames_cross_a_stream_and_close_ends_one_side() -> None:
    async def main() -> None:
        async with world_of(2) as (_, (a, b)):
            got: list[bytes] = []

            async def echo(stream: Any) -> None:
                request = await read_frame(stream, 1 << 20, 5)
                await write_frame(stream, request[::-1], 5)
                await stream.close()
                got.append(request)

            b.serve("/t/echo", echo, 1 << 20)
            stream = await a.open_stream(b.peer_id, ["/t/none", "/t/echo"])
            assert stream.get_protocol() == "/t/echo"
            assert b.remote_peer(stream) == b.peer_id
            await write_frame(stream, b"hello" * 1000, 5)
            assert await read_frame(stream, 1 << 20, 5) == (b"hello" * 1000)[::-1]
            with pytest.raises(FrameEnded):  # the server closed after its answer
                await read_frame(stream, 10, 5)
            assert got == [b"hello" * 1000]
            assert b.peer_id in a.connected_peers() and a.peer_id in b.connected_peers()
    run(main)


def test_short_reads_eof_and_reset() -> None:
    async def main() -> None:
        async with world_of(2) as (_, (a, b)):
            ends: list[Any] = []
            b.serve("/t/hold", lambda s: _keep(ends, s), 0)
            stream = await a.open_stream(b.peer_id, "/t/hold")
            await trio.sleep(0.01)
            (theirs,) = ends
            assert theirs.remote == a.peer_id
            await stream.write(b"abcdef")
            assert await theirs.read(4) == b"abcd"  # a short read of what is there
            assert await theirs.read(100) == b"ef"
            await stream.close()
            with pytest.raises(MemStreamEOF):
                await theirs.read(1)
            await theirs.write(b"still open this way")  # close ends one direction only
            assert await stream.read() == b"still open this way"
            await theirs.reset()
            with pytest.raises(PeerGone):
                await stream.read()
            with pytest.raises(PeerGone):
                await stream.write(b"x")
    run(main)


async def _keep(ends: list[Any], stream: Any) -> None:
    ends.append(stream)
    await trio.sleep_forever()


def test_a_blocked_reader_learns_its_peer_died_and_the_dead_are_unreachable() -> None:
    async def main() -> None:
        async with world_of(3) as (world, (a, b, c)):
            b.serve("/t/hold", lambda s: _keep([], s), 0)
            stream = await a.open_stream(b.peer_id, "/t/hold")
            failed: list[BaseException] = []

            async def reader() -> None:
                try:
                    await stream.read()
                except PeerGone as exc:
                    failed.append(exc)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(reader)
                await trio.sleep(1)
                world.kill(b)
            assert failed and b.peer_id not in a.connected_peers()
            with pytest.raises(PeerGone):
                await a.open_stream(b.peer_id, "/t/hold")
            with pytest.raises(PeerGone):
                await a.connect(PeerInfo(b.peer_id, []))
            with pytest.raises(NotServed):  # c lives but serves nothing of that name
                await a.open_stream(c.peer_id, "/t/hold")
    run(main)


def test_partition_cuts_streams_and_dials_until_healed() -> None:
    async def main() -> None:
        async with world_of(4) as (world, nodes):
            a, b, c, d = nodes
            b.serve("/t/hold", lambda s: _keep([], s), 0)
            stream = await a.open_stream(b.peer_id, "/t/hold")
            world.partition([a, c], [b, d])
            with pytest.raises(PeerGone):
                await stream.read()
            with pytest.raises(PeerGone):
                await a.connect(PeerInfo(b.peer_id, []))
            await a.connect(PeerInfo(c.peer_id, []))  # within a side: fine
            world.heal()
            await a.connect(PeerInfo(b.peer_id, []))
            assert b.peer_id in a.connected_peers()
            # A closed connection resets its streams; either side may dial again.
            stream = await a.open_stream(b.peer_id, "/t/hold")
            world.disconnect(a.peer_id, b.peer_id)
            assert b.peer_id not in a.connected_peers()
            with pytest.raises(PeerGone):
                await stream.write(b"x")
            assert (await a.open_stream(b.peer_id, "/t/hold")).remote == b.peer_id
    run(main)


def test_gossip_is_judged_before_delivery_and_relay() -> None:
    """a - b - c in a line: b refuses messages starting with b"bad", so c never sees
    them (b does not relay what it refused), while good ones reach c through b; each
    message is delivered once however many paths it has."""
    async def main() -> None:
        async with world_of(4) as (_, (a, b, c, d)):
            for x, y in ((a, b), (b, c), (a, d), (d, c)):
                await x.connect(PeerInfo(y.peer_id, []))
            seen: dict[str, list[tuple[bytes, PeerId | None]]] = {}
            subs = {}
            for name, node in zip("abcd", (a, b, c, d), strict=True):
                def validator(_sender: PeerId, m: GossipMessage, name: str = name) -> bool:
                    return name not in ("b", "d") or not m.data.startswith(b"bad")
                subs[name] = await node.subscribe("t", validator)
                seen[name] = []
            await a.publish("t", b"good")
            await a.publish("t", b"bad!")
            await trio.sleep(1)
            for name, sub in subs.items():
                with trio.move_on_after(0.5):
                    while True:
                        m = await sub.get()
                        seen[name].append((m.data, m.from_peer))
            assert seen["c"] == [(b"good", a.peer_id)]
            assert seen["b"] == [(b"good", a.peer_id)]
            assert [d for d, _ in seen["a"]] == [b"good", b"bad!"]  # own, as py-libp2p
    run(main)


class OnlyEven(RecordValidator):  # type: ignore[misc]
    def validate(self, key: str, value: bytes) -> None:
        if value[-1] % 2:
            raise ValueError("odd")

    def select(self, key: str, values: list[bytes]) -> int:
        return max(range(len(values)), key=lambda i: values[i])


def test_dht_values_providers_and_the_walk() -> None:
    async def main() -> None:
        async with world_of(6, {"v": OnlyEven()}) as (world, nodes):
            for n in nodes[1:]:
                await n.connect(PeerInfo(nodes[0].peer_id, []))
            for n in nodes:
                await n.refresh_routing_table()
            await nodes[1].put_value("/v/x", b"\x02")
            with pytest.raises(ValueError):
                await nodes[1].put_value("/v/x", b"\x03")  # the validator refuses it
            await nodes[2].put_value("/v/x", b"\x04")  # select keeps the higher
            assert nodes[0].local_value(b"/v/x") == b"\x04"
            await nodes[3].provide("ab" * 16)
            assert [p.peer_id for p in nodes[0].local_providers(bytes.fromhex("ab" * 16))] == [
                nodes[3].peer_id]
            asker = nodes[5]

            async def get(peer: PeerId) -> tuple[bytes | None, list[PeerId]]:
                return await asker.value_from_peer(peer, b"/v/x")

            world.kill(nodes[4])
            result = await walk(asker, b"/v/x", get, rpc_timeout=1, timeout=5,
                                unresponsive=Unresponsive())
            assert {v for _, v in result.answers} == {b"\x04"}
            assert nodes[4].peer_id not in result.closest
            # Values expire by the injected wall clock, as py-libp2p's store does.
            nodes[0].store_value(b"/v/y", b"\x06", world.now_s() + 10)
            assert nodes[0].local_value(b"/v/y") == b"\x06"
            await trio.sleep(11)
            assert nodes[0].local_value(b"/v/y") is None
    run(main)


@settings(max_examples=30, deadline=None)
@given(payloads=st.lists(st.binary(max_size=300), max_size=8),
       cut=st.lists(st.integers(1, 97), min_size=1, max_size=5))
def test_frames_survive_any_write_cutting(payloads: list[bytes], cut: list[int]) -> None:
    """Whatever sizes the writes come in, node/p2p/framing.py's readers get the frames
    back whole, and then the end of the stream."""
    async def main() -> None:
        async with world_of(2) as (_, (a, b)):
            got: list[bytes] = []
            done = trio.Event()

            async def reader(stream: Any) -> None:
                frames = FrameReader(stream)
                try:
                    for _ in payloads:
                        got.append(await frames.read_frame(1 << 16, 5))
                    with pytest.raises(FrameEnded):
                        await read_frame(stream, 1 << 16, 5)
                finally:
                    done.set()

            b.serve("/t/read", reader, 1 << 16)
            stream = await a.open_stream(b.peer_id, "/t/read")
            data = b"".join(frame_prefix(len(p)) + p for p in payloads)
            sizes = itertools.cycle(cut)
            at = 0
            while at < len(data):
                step = next(sizes)
                await stream.write(data[at:at + step])
                at += step
            await stream.close()
            await done.wait()
            assert got == payloads

    run(main)


@asynccontextmanager
async def _star(n: int) -> AsyncIterator[tuple[MemNetwork, list[MemNode]]]:
    """``n`` nodes, each connected to the first, with full routing tables."""
    async with world_of(n) as (world, nodes):
        for node in nodes[1:]:
            await node.connect(PeerInfo(nodes[0].peer_id, []))
        for node in nodes:
            await node.refresh_routing_table()
        yield world, nodes


@pytest.mark.parametrize("measured", [False, True])
def test_a_slow_peer_costs_a_walk_its_hedge_time_not_its_rpc_timeout(measured: bool) -> None:
    """The three peers asked first answer after 2.5 s (within rpc_timeout): their slots
    go to the next candidates after the hedge time, and the walk has its answer from
    those (before, it waited for the slow three). The hedge time is hedge_after (0.5 s),
    or with round times measured at 50 ms srtt + 4 * rttvar; every answer of the walk is
    a sample of its RoundTrips."""
    async def main() -> None:
        async with _star(8) as (_, nodes):
            asker = nodes[0]
            slow = set(asker.closest_known(b"/v/x", 3))

            async def get(peer: PeerId) -> tuple[bytes | None, list[PeerId]]:
                await trio.sleep(2.5 if peer in slow else 0.05)
                return b"v", []

            round_trips = RoundTrips()
            for _ in range(10 if measured else 0):
                round_trips.observe(0.05)
            late = round_trips.hedge_after(0.5)
            assert HEDGE_MIN_S <= late < 0.06 if measured else late == 0.5
            start = trio.current_time()
            result = await walk(asker, b"/v/x", get, rpc_timeout=3, timeout=10,
                                unresponsive=Unresponsive(), hedge_after=0.5,
                                round_trips=round_trips,
                                enough=lambda answers: len(answers) >= 2)
            assert trio.current_time() - start == pytest.approx(late + 0.05)
            assert not slow & {peer for peer, _ in result.answers}
            assert round_trips.srtt == pytest.approx(0.05)
    run(main)


@given(samples=st.lists(st.floats(min_value=0, max_value=30), max_size=50),
       ceiling=st.floats(min_value=HEDGE_MIN_S, max_value=30))
def test_round_trips_hedge_within_their_bounds(samples: list[float], ceiling: float) -> None:
    """Whatever the samples, the wait before hedging stays within [HEDGE_MIN_S, ceiling],
    is the ceiling before any sample, and the smoothed time within the samples' range."""
    round_trips = RoundTrips()
    assert round_trips.hedge_after(ceiling) == ceiling
    for sample in samples:
        round_trips.observe(sample)
        assert HEDGE_MIN_S <= round_trips.hedge_after(ceiling) <= ceiling
    if samples:
        assert round_trips.srtt is not None
        assert min(samples) - 1e-9 <= round_trips.srtt <= max(samples) + 1e-9


def test_peers_marked_unresponsive_are_asked_last_not_never() -> None:
    """A walk asks the peers earlier walks marked only when no one else is left; when
    every peer is marked (a loaded machine: every peer missed a deadline once), it asks
    them rather than return nothing."""
    async def main() -> None:
        async with _star(6) as (_, nodes):
            asker = nodes[0]
            await nodes[1].put_value("/v/x", b"\x02")
            asked: list[PeerId] = []

            async def get(peer: PeerId) -> tuple[bytes | None, list[PeerId]]:
                asked.append(peer)
                return await asker.value_from_peer(peer, b"/v/x")

            marked = Unresponsive()
            closest = asker.closest_known(b"/v/x", 2)
            for peer in closest:
                marked.mark(peer, trio.current_time())
            await walk(asker, b"/v/x", get, rpc_timeout=1, timeout=5, unresponsive=marked)
            assert set(asked[:len(asked) - 2]).isdisjoint(closest)
            assert set(asked[-2:]) == set(closest)  # asked once no one else was left
            for peer in asker.closest_known(b"/v/x", 5):
                marked.mark(peer, trio.current_time())
            asked.clear()
            result = await walk(asker, b"/v/x", get, rpc_timeout=1, timeout=5,
                                unresponsive=marked)
            assert asked and {v for _, v in result.answers} == {b"\x02"}
    run(main)


def test_a_frozen_marked_peer_does_not_hold_up_a_walk_that_others_answered() -> None:
    """A walk without ``enough`` (find_providers, a record not on the DHT) asks a marked
    peer last, but does not wait for it once the others have answered: a frozen peer
    marked by an earlier walk cost every such walk its rpc_timeout (3.1 s, not 0.1 s)."""
    async def main() -> None:
        async with _star(8) as (_, nodes):
            asker = nodes[0]
            frozen = asker.closest_known(b"/v/x", 1)[0]
            marked = Unresponsive()
            marked.mark(frozen, trio.current_time())

            async def get(peer: PeerId) -> tuple[bytes | None, list[PeerId]]:
                if peer == frozen:
                    await trio.sleep_forever()
                await trio.sleep(0.05)
                return None, []

            start = trio.current_time()
            result = await walk(asker, b"/v/x", get, rpc_timeout=3, timeout=10,
                                unresponsive=marked)
            assert trio.current_time() - start < 0.5
            assert len(result.closest) == 6 and frozen not in result.closest
    run(main)


def test_a_walk_drops_unreachable_peers_and_only_marks_refusing_ones() -> None:
    """A peer that cannot be dialled, or does not answer in time, leaves the routing
    table; one that refuses on a live connection (a reset at its stream limit, an "na")
    is marked but kept: it is still there."""
    async def main() -> None:
        async with _star(6) as (_, nodes):
            asker = nodes[0]
            unreachable, refusing, silent = asker.closest_known(b"/v/x", 3)

            async def get(peer: PeerId) -> tuple[bytes | None, list[PeerId]]:
                if peer == unreachable:
                    raise Unreachable("dial failed")
                if peer == refusing:
                    raise PeerGone("stream reset")
                if peer == silent:
                    await trio.sleep_forever()
                return None, []

            marked = Unresponsive()
            result = await walk(asker, b"/v/x", get, rpc_timeout=1, timeout=5,
                                unresponsive=marked)
            assert result.failed == {unreachable, refusing, silent}
            now = trio.current_time()
            assert all(marked.is_bad(p, now) for p in (unreachable, refusing, silent))
            kept = set(asker.closest_known(b"/v/x", 6))
            assert refusing in kept and not {unreachable, silent} & kept
    run(main)


def test_a_walk_has_at_most_twice_alpha_requests_outstanding() -> None:
    """Hedging gives a slow request's slot to the next candidate, but the slow ones run
    on: with every peer slow, a walk had up to 18 requests out at once."""
    async def main() -> None:
        async with _star(20) as (_, nodes):
            out = peak = 0

            async def get(peer: PeerId) -> tuple[bytes | None, list[PeerId]]:
                nonlocal out, peak
                out += 1
                peak = max(peak, out)
                try:
                    await trio.sleep(2.5)
                finally:
                    out -= 1
                return None, []

            await walk(nodes[0], b"/v/x", get, rpc_timeout=3, timeout=20,
                       unresponsive=Unresponsive(), alpha=3, hedge_after=0.5)
            assert peak == 6
    run(main)


def test_a_walk_ends_grace_seconds_after_its_first_payload() -> None:
    """A record query waits for value_quorum copies, but at most its grace after the
    first: one copy at 0.05 s and the others at 2 s end the walk at 0.35 s with one."""
    async def main() -> None:
        async with _star(8) as (_, nodes):
            asker = nodes[0]
            quick = asker.closest_known(b"/v/x", 1)[0]

            async def get(peer: PeerId) -> tuple[bytes | None, list[PeerId]]:
                await trio.sleep(0.05 if peer == quick else 2)
                return b"v", []

            start = trio.current_time()
            result = await walk(asker, b"/v/x", get, rpc_timeout=3, timeout=10,
                                unresponsive=Unresponsive(), hedge_after=5,
                                enough=lambda answers: len(answers) >= 3, grace=0.3)
            assert trio.current_time() - start == pytest.approx(0.35)
            assert [peer for peer, _ in result.answers] == [quick]
    run(main)
