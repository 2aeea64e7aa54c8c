"""The stream guard (node/p2p/guard.py) on real hosts on 127.0.0.1, in one trio process:
no inbound stream, however malformed, ends the host; repeated offenders are banned."""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import pytest
import trio
import varint
from libp2p.custom_types import TProtocol
from libp2p.network.connection.swarm_connection import SwarmConn
from libp2p.pubsub.pb import rpc_pb2
from libp2p.pubsub.pubsub import Pubsub
from libp2p.tools.anyio_service.trio_manager import TrioManager
from multiaddr import Multiaddr
from nacl.signing import SigningKey
from prometheus_client import CollectorRegistry

import node.p2p.guard
from node.p2p.guard import NOT_NEGOTIATED
from node.p2p.host import Network, NotServed, open_network, peer_info_from_multiaddr
from node.p2p.options import P2POptions
from protocol.penalty import PenaltyPolicy
from tests.hostile import attack, malformed_payloads
from tests.netutil import wait_until

MESHSUB = "/meshsub/1.1.0"
TOPIC = "guard-test"
FAILING = TProtocol("/iollm-test/failing/1")
LOOPBACK = [Multiaddr("/ip4/127.0.0.1/tcp/0")]


def _run(scenario: Callable[[], Awaitable[None]], timeout: float = 60) -> None:
    async def main() -> None:
        with trio.fail_after(timeout):
            await scenario()

    trio.run(main)


def errors(registry: CollectorRegistry, protocol: str, kind: str = "error") -> float:
    value = registry.get_sample_value("iollm_stream_handler_errors_total",
                                      {"protocol": protocol, "kind": kind})
    return value or 0.0


@asynccontextmanager
async def trio_nodes(n: int, policy: PenaltyPolicy | None = None,
                     options: P2POptions | None = None
                     ) -> AsyncIterator[list[tuple[Network, CollectorRegistry]]]:
    """n hosts with these limits; host 0 is the victim, every other one connected to it."""
    async with AsyncExitStack() as stack:
        nodes = []
        for _ in range(n):
            registry = CollectorRegistry()
            net = await stack.enter_async_context(open_network(
                SigningKey.generate(), LOOPBACK, {}, registry=registry, penalties=policy,
                options=options))
            nodes.append((net, registry))
        victim = peer_info_from_multiaddr(nodes[0][0].listen_addrs()[0])
        for net, _ in nodes[1:]:
            await net.connect(victim)
        yield nodes


async def subscribed(watcher: Network, peer: Network) -> None:
    async def seen() -> bool:
        return peer.peer_id in watcher.pubsub.peer_topics.get(TOPIC, set())

    await wait_until(seen, timeout=10)


async def _gossip_arrives(sender: Network, subscription: Any, data: bytes) -> None:
    await sender.pubsub.publish(TOPIC, data)
    with trio.fail_after(10):
        while (await subscription.get()).data != data:
            pass


def test_malformed_pubsub_frame_does_not_end_the_host() -> None:
    """Issue 14's reproduction: length 16, then 16 bytes of 0xff on /meshsub/1.1.0."""

    async def scenario() -> None:
        async with trio_nodes(3) as [(victim, registry), (attacker, _), (honest, _)]:
            subscription = await victim.pubsub.subscribe(TOPIC)
            await honest.pubsub.subscribe(TOPIC)
            await subscribed(honest, victim)
            # The victim keeps the attacker as a pubsub peer until the bad frame.
            await wait_until(lambda: _true(attacker.peer_id in victim.pubsub.peers), 10)

            ended = await attack(attacker, victim.peer_id, MESHSUB,
                                 malformed_payloads()["not the message"])
            assert ended in ("StreamReset", "StreamEOF"), ended
            await wait_until(lambda: _true(errors(registry, MESHSUB) == 1), 10)
            # GuardedPubsub gave the library's own clean-up to the offender...
            assert attacker.peer_id not in victim.pubsub.peer_topics.get(TOPIC, set())
            # ...and the victim still gossips with the honest peer.
            await _gossip_arrives(honest, subscription, b"still here")

    _run(scenario)


def test_a_message_with_a_bogus_key_does_not_end_pubsub() -> None:
    """Found by tests/test_reader_fuzz.py: pubsub checks a received message's signature in
    a task of its own service, and a ``key`` that is no public key raised DecodeError
    there, ending the whole pubsub service."""

    async def scenario() -> None:
        async with trio_nodes(3) as [(victim, registry), (attacker, _), (honest, _)]:
            subscription = await victim.pubsub.subscribe(TOPIC)
            await honest.pubsub.subscribe(TOPIC)
            await subscribed(honest, victim)
            rpc = rpc_pb2.RPC()
            rpc.publish.add(from_id=b"\x00\x01", data=b"x", seqno=b"1", topicIDs=[TOPIC],
                            signature=b"s", key=b"\xff" * 8)
            body = rpc.SerializeToString()
            await attack(attacker, victim.peer_id, MESHSUB, varint.encode(len(body)) + body,
                         timeout=0.5)
            label = "pubsub:push_msg"
            await wait_until(lambda: _true(errors(registry, label) == 1), 10)
            await _gossip_arrives(honest, subscription, b"pubsub still runs")

    _run(scenario)


def test_a_failing_handler_resets_only_its_stream() -> None:
    async def scenario() -> None:
        async with trio_nodes(2) as [(victim, registry), (peer, _)]:
            calls = 0

            async def failing(stream: Any) -> None:
                nonlocal calls
                calls += 1
                data = await stream.read(100)
                if data == b"boom":
                    raise ValueError("a handler bug a peer can trigger")
                await stream.write(data)
                await stream.close()

            victim.host.set_stream_handler(FAILING, failing)
            ended = await attack(peer, victim.peer_id, FAILING, b"boom")
            assert ended in ("StreamReset", "StreamEOF"), ended
            assert errors(registry, FAILING) == 1
            # Same connection, same protocol: an ordinary request is still served.
            stream = await peer.host.new_stream(victim.peer_id, [FAILING])
            await stream.write(b"hello")
            with trio.fail_after(5):
                assert await stream.read(100) == b"hello"
            assert calls == 2 and len(peer.host.get_network().get_connections()) == 1

    _run(scenario)


def test_a_peer_that_vanishes_is_not_a_strike() -> None:
    async def scenario() -> None:
        async with trio_nodes(2, PenaltyPolicy(strikes=1)) as [(victim, registry), (peer, _)]:
            async def reader(stream: Any) -> None:
                await stream.read(100)
                await stream.read(100)  # the peer resets: StreamReset escapes

            victim.host.set_stream_handler(FAILING, reader)
            stream = await peer.host.new_stream(victim.peer_id, [FAILING])
            await stream.write(b"x")
            await stream.reset()
            await wait_until(lambda: _true(errors(registry, FAILING, "gone") == 1), 10)
            assert errors(registry, FAILING) == 0 and not victim.guard.banned()

    _run(scenario)


def test_repeated_offender_is_disconnected_and_refused() -> None:
    policy = PenaltyPolicy(strikes=3, window_s=60, ban_s=600)

    async def scenario() -> None:
        async with trio_nodes(3, policy) as [(victim, registry), (attacker, _), (honest, _)]:
            frame = malformed_payloads()["not the message"]
            for _ in range(policy.strikes):
                await attack(attacker, victim.peer_id, MESHSUB, frame)
            await wait_until(lambda: _true(victim.guard.banned() == [str(attacker.peer_id)]), 10)
            assert registry.get_sample_value("iollm_peers_banned_total") == 1

            async def dropped() -> bool:
                return not victim.host.get_network().get_connections(attacker.peer_id)

            await wait_until(dropped, 10)
            # A new connection of the banned peer is closed at once, and a stream it
            # manages to open meanwhile is refused.
            info = peer_info_from_multiaddr(victim.listen_addrs()[0])
            with trio.move_on_after(5):
                with contextlib.suppress(Exception):  # closed during the dial's last steps
                    await attacker.connect(info)
                ended = await attack(attacker, victim.peer_id, MESHSUB, b"")
                assert ended.startswith("not opened") or ended in ("StreamReset", "StreamEOF")
            await wait_until(dropped, 10)
            # The victim does not dial it either, while the ban lasts.
            with pytest.raises(NotServed, match="banned"):
                await victim.connect(peer_info_from_multiaddr(attacker.listen_addrs()[0]))
            # The honest peer was never touched.
            assert victim.host.get_network().get_connections(honest.peer_id)
            assert errors(registry, MESHSUB) == policy.strikes

    _run(scenario)


def test_one_peer_cannot_hold_more_than_its_share_of_streams() -> None:
    """A peer opening streams and leaving them open gets [p2p] max_streams_per_peer
    running at once; the rest are reset unread (kind over-limit, not a strike), another
    peer is still served, and closing streams frees the share again."""
    options = P2POptions(max_streams_per_peer=8)
    hold = TProtocol("/iollm-test/hold/1")

    async def holding(stream: Any) -> None:
        with contextlib.suppress(Exception):
            while await stream.read(100):  # until the peer ends or resets the stream
                pass

    async def scenario() -> None:
        async with trio_nodes(3, options=options) as [(victim, registry), (greedy, _),
                                                      (other, _)]:
            victim.host.set_stream_handler(hold, holding)
            held, refused = [], 0
            for _ in range(12):
                try:  # one over the limit is reset while it negotiates
                    stream = await greedy.host.new_stream(victim.peer_id, [hold])
                    await stream.write(b"x")
                    held.append(stream)
                except Exception:
                    refused += 1

            async def settled() -> bool:
                return errors(registry, NOT_NEGOTIATED, "over-limit") == refused

            await wait_until(settled, 10)
            # Its long-lived pubsub stream counts too: 8 in all, the rest refused.
            assert victim.guard.open_streams[greedy.peer_id] == 8
            assert refused + len(held) == 12 and refused >= 4
            assert not victim.guard.banned()
            def count(net: Network) -> int:
                return victim.guard.open_streams.get(net.peer_id, 0)

            base = count(other)  # its pubsub stream
            stream = await other.host.new_stream(victim.peer_id, [hold])  # another peer
            await stream.write(b"y")
            await wait_until(lambda: _true(count(other) == base + 1), 10)
            for s in held:
                with contextlib.suppress(Exception):
                    await s.reset()
            rest = 8 - len(held)
            await wait_until(lambda: _true(count(greedy) == rest), 10)
            again = await greedy.host.new_stream(victim.peer_id, [hold])
            await again.write(b"z")
            await wait_until(lambda: _true(count(greedy) == rest + 1), 10)

    _run(scenario)


@pytest.mark.parametrize("name", list(malformed_payloads()))
def test_kademlia_and_pubsub_readers_survive_each_case(name: str) -> None:
    async def scenario() -> None:
        async with trio_nodes(3) as [(victim, _), (attacker, _), (honest, _)]:
            payload = malformed_payloads()[name]
            for protocol in ("/ipfs/kad/1.0.0", MESHSUB):
                await attack(attacker, victim.peer_id, protocol, payload)
            # Kademlia still answers: the honest peer finds the attacker through it.
            honest_info = peer_info_from_multiaddr(victim.listen_addrs()[0])
            await honest.connect(honest_info)
            with trio.fail_after(10):
                closest = await honest.dht.peer_routing.find_closest_peers_network(
                    attacker.peer_id.to_bytes())
            assert victim.peer_id in closest

    _run(scenario)


# -- guards: the library internals the stream guard and GuardedPubsub rely on ----------


def test_every_inbound_stream_goes_through_the_guard() -> None:
    # SwarmConn hands each inbound stream to swarm.common_stream_handler, which
    # StreamGuard.install replaces; a library that dispatches elsewhere fails here.
    assert "self.swarm.common_stream_handler(net_stream)" in inspect.getsource(
        SwarmConn._handle_muxed_stream)

    async def scenario() -> None:
        async with trio_nodes(1) as [(net, _)]:
            assert net.host.get_network().common_stream_handler == net.guard.handle
            assert net.guard in net.host.get_network().notifees

    _run(scenario)


def test_pubsub_checks_messages_in_manager_tasks() -> None:
    # StreamGuard.guard_tasks wraps run_task(async_fn, *args, daemon=, name=) of the
    # services' managers; pubsub must still spawn its per-message check that way, with
    # the forwarder first.
    parameters = list(inspect.signature(TrioManager.run_task).parameters)
    assert parameters[:5] == ["self", "async_fn", "args", "daemon", "name"]
    assert "self.manager.run_task(self.push_msg, peer_id, msg)" in inspect.getsource(
        Pubsub.continuously_read_stream)


def test_library_pubsub_handler_still_lets_decode_errors_through() -> None:
    # GuardedPubsub exists because this clause misses protobuf's DecodeError. When the
    # library catches it (or everything), the patch can go: revisit node/p2p/host.py.
    source = inspect.getsource(Pubsub.stream_handler)
    assert "except (StreamError, ParseError, IncompleteReadError)" in source
    assert "DecodeError" not in source and "except Exception" not in source


def _true(value: bool) -> Awaitable[bool]:
    async def constant() -> bool:
        return value

    return constant()


def test_one_peer_cannot_make_the_node_buffer_more_than_its_budget() -> None:
    """Each negotiated stream reserves its protocol's frame cap plus the receive window
    against its peer's [p2p] peer_buffer_bytes; one over is reset unread (kind over-budget, not
    a strike), another peer is still served, and ending streams frees the budget."""
    big = 1 << 20
    hold = TProtocol("/iollm-test/big-frames/1")

    async def holding(stream: Any) -> None:
        with contextlib.suppress(Exception):
            while await stream.read(100):  # until the peer ends or resets the stream
                pass

    async def scenario() -> None:
        async with trio_nodes(3) as [(victim, registry), (greedy, _), (other, _)]:
            victim.serve(hold, holding, big)
            share = victim.guard.stream_share(str(hold))
            assert share == big + node.p2p.guard.YAMUX_WINDOW_BYTES
            # Room for four such streams beside its pubsub stream (opened on connection).
            meshsub = victim.guard.stream_share("/meshsub/1.1.0")
            await wait_until(lambda: _true(victim.guard.buffered.get(greedy.peer_id, 0)
                                           == meshsub), 10)
            budget = meshsub + 4 * share
            # Known only now (the pubsub stream's share is the library's frame cap): the
            # guard reads its limits at each stream, so these apply from here on.
            victim.guard.limits = dataclasses.replace(victim.guard.limits,
                                                      peer_buffer_bytes=budget)
            held, refused = [], 0
            for _ in range(8):
                try:  # refused after negotiation: the write or a later read fails
                    stream = await greedy.host.new_stream(victim.peer_id, [hold])
                    await stream.write(b"x")
                    held.append(stream)
                except Exception:
                    refused += 1

            async def settled() -> bool:
                return errors(registry, str(hold), "over-budget") >= 4

            await wait_until(settled, 10)
            assert victim.guard.buffered[greedy.peer_id] <= budget
            assert not victim.guard.banned()
            stream = await other.host.new_stream(victim.peer_id, [hold])  # another peer
            await stream.write(b"y")
            await wait_until(lambda: _true(victim.guard.buffered.get(other.peer_id, 0)
                                           >= share), 10)
            before = victim.guard.buffered[greedy.peer_id]
            for s in held:
                with contextlib.suppress(Exception):
                    await s.reset()
            await wait_until(lambda: _true(victim.guard.buffered[greedy.peer_id] == meshsub),
                             10)
            assert meshsub < before
            again = await greedy.host.new_stream(victim.peer_id, [hold])
            await again.write(b"z")
            await wait_until(lambda: _true(errors(registry, str(hold), "over-budget") == 4
                                           and victim.guard.buffered[greedy.peer_id]
                                           <= budget), 10)

    _run(scenario)
