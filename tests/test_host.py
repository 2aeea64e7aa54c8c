"""The libp2p host of node/p2p/host.py between two real hosts on 127.0.0.1, in one trio
process: a write cancelled half-way must not break the connection (AtomicYamux)."""

from __future__ import annotations

import contextlib
import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
from libp2p.custom_types import TProtocol
from multiaddr import Multiaddr
from nacl.signing import SigningKey

import node.p2p.host
from node.p2p.host import AtomicYamux, Network, open_network, peer_info_from_multiaddr
from tests.netutil import wait_until

SINK = TProtocol("/iollm-test/sink/1")
ECHO = TProtocol("/iollm-test/echo/1")
BIG = bytes(4 << 20)  # many yamux frames, each two Noise messages: cancellable in between


async def _sink(stream: Any) -> None:
    try:
        while True:
            await stream.read(1 << 20)
    except Exception:  # EOF or reset: the writer gave up
        pass


async def _echo(stream: Any) -> None:
    await stream.write(await stream.read(100))
    await stream.close()


@asynccontextmanager
async def _pair() -> AsyncIterator[tuple[Network, Network, Any]]:
    loopback = [Multiaddr("/ip4/127.0.0.1/tcp/0")]
    async with open_network(SigningKey.generate(), loopback, {}) as a, \
            open_network(SigningKey.generate(), loopback, {}) as b:
        b.host.set_stream_handler(SINK, _sink)
        b.host.set_stream_handler(ECHO, _echo)
        info = peer_info_from_multiaddr(str(b.listen_addrs()[0]))
        await a.connect(info)
        yield a, b, info


async def _echo_once(a: Network, info: Any, text: bytes) -> bytes:
    with trio.fail_after(5):
        stream = await a.host.new_stream(info.peer_id, [ECHO])
        await stream.write(text)
        return bytes(await stream.read(100))


def _muxers(net: Network) -> list[type]:
    return [type(c.muxed_conn) for c in net.host.get_network().get_connections()]


def _run(scenario: Any, timeout: float = 120) -> None:
    async def main() -> None:
        with trio.fail_after(timeout):
            await scenario()

    trio.run(main)


def test_cancelled_writes_leave_the_connection_usable() -> None:
    rng = random.Random(7)

    async def scenario() -> None:
        async with _pair() as (a, b, info):
            assert _muxers(a) == [AtomicYamux] and _muxers(b) == [AtomicYamux]
            for i in range(25):
                # Cancelled anywhere: before, between or inside the frames of the write.
                stream = await a.host.new_stream(info.peer_id, [SINK])
                with trio.move_on_after(rng.uniform(0.0002, 0.01)):
                    await stream.write(BIG)
                with trio.move_on_after(2):
                    await stream.reset()
                # Before AtomicYamux, this failed within a few rounds: "Failed
                # authentication of message" on the reader, and the connection gone.
                assert await _echo_once(a, info, b"ping %d" % i) == b"ping %d" % i
            assert len(_muxers(a)) == 1  # still the first connection

    _run(scenario)


def test_a_stalled_frame_write_closes_the_connection(monkeypatch: pytest.MonkeyPatch) -> None:
    async def scenario() -> None:
        async with _pair() as (a, _, info):
            first = a.host.get_network().get_connections(info.peer_id)[0]
            stream = await a.host.new_stream(info.peer_id, [SINK])
            # Every frame now "stalls" at once: the write fails and the connection is
            # closed (a frame begun cannot be abandoned); a new dial makes a fresh one.
            monkeypatch.setattr(node.p2p.host, "FRAME_WRITE_TIMEOUT_S", 0.0)
            with pytest.raises(Exception, match=r"stalled|closed"):
                await stream.write(BIG)
            monkeypatch.setattr(node.p2p.host, "FRAME_WRITE_TIMEOUT_S", 10.0)
            with trio.fail_after(10):
                await first.muxed_conn.event_closed.wait()

            async def forgotten() -> bool:  # once the connection's reader has stopped
                return not a.host.get_network().get_connections(info.peer_id)

            await wait_until(forgotten, timeout=10)
            await a.connect(info)
            assert await _echo_once(a, info, b"again") == b"again"

    _run(scenario)


def test_our_protocols_are_not_asked_of_a_peer_that_serves_none() -> None:
    """Network.open_stream: once identify shows a peer serves none of our /iollm/
    protocols (not an iollm node), asking it for one fails at once (NotServed), without
    a negotiation (py-libp2p would log a block of ERROR lines for each); other protocols
    are asked as before."""
    from node.p2p.host import NotServed

    async def scenario() -> None:
        async with _pair() as (a, _, info):  # b serves only the test protocols
            async def identified() -> bool:
                return a.is_iollm_node(info.peer_id) is not None

            await wait_until(identified, timeout=10)
            assert a.is_iollm_node(info.peer_id) is False
            with pytest.raises(NotServed):
                await a.open_stream(info.peer_id, "/iollm/smip/1.0.0")
            stream = await a.open_stream(info.peer_id, str(ECHO))
            await stream.write(b"hi")
            with trio.fail_after(5):
                assert await stream.read(100) == b"hi"

    _run(scenario)


def test_protocols_registered_later_reach_connected_peers() -> None:
    """A node's services register their protocols after its host is up; build_node then
    pushes its identify answer (Network.announce_protocols), so a peer that identified it
    early does not take it for a foreign peer for the life of the connection."""

    async def scenario() -> None:
        async with _pair() as (a, b, info):
            async def identified() -> bool:
                return a.is_iollm_node(info.peer_id) is not None

            await wait_until(identified, timeout=10)
            assert a.is_iollm_node(info.peer_id) is False
            b.host.set_stream_handler(TProtocol("/iollm/late/1.0.0"), _echo)
            await b.announce_protocols()

            async def updated() -> bool:
                return a.is_iollm_node(info.peer_id) is True

            await wait_until(updated, timeout=10)
            stream = await a.open_stream(info.peer_id, "/iollm/late/1.0.0")
            await stream.write(b"late")
            with trio.fail_after(5):
                assert await stream.read(100) == b"late"

    _run(scenario)


def test_a_cancelled_dht_request_resets_its_stream() -> None:
    """A GET_VALUE cancelled while the peer has not answered (a walk's deadline, or a walk
    that has enough) resets its stream. py-libp2p's own request left it open, and the
    peer's handler waited on it for the next request, holding one of its 12 DHT slots for
    good (bench/RESULTS.md, 2026-12-08, the 30-host DHT query)."""
    from node.p2p.host import KAD_PROTOCOL_ID

    async def scenario() -> None:
        async with _pair() as (a, b, info):
            asked = trio.Event()
            ended = trio.Event()
            reset: list[bool] = []

            async def slow_server(stream: Any) -> None:
                await stream.read(100)  # the request
                asked.set()
                with contextlib.suppress(Exception):
                    while await stream.read(100):  # never answered: what comes next?
                        pass
                # py-libp2p's yamux reports a reset as StreamEOF when the reset stream's
                # buffer is gone before the read looks: its flag tells a reset from a FIN.
                reset.append(stream.muxed_stream.reset_received)
                ended.set()

            b.host.set_stream_handler(KAD_PROTOCOL_ID, slow_server)
            async with trio.open_nursery() as nursery:
                cancel = trio.CancelScope()

                async def request() -> None:
                    with cancel:
                        await a.value_from_peer(info.peer_id, b"/iollm-cap/0123")

                nursery.start_soon(request)
                with trio.fail_after(5):
                    await asked.wait()
                cancel.cancel()
            with trio.fail_after(5):  # the library's request: forever
                await ended.wait()
            assert reset == [True]

    _run(scenario)


def test_a_reset_cut_off_by_its_timeout_still_frees_the_stream_slot(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A cancelled request whose reset frame cannot go out within RESET_TIMEOUT_S (queued
    behind bulk data on a busy connection) still gives back the swarm's stream semaphore:
    the cut reset never reached NetStream.remove(), and each one held a slot until the
    connection closed."""
    from node.p2p.host import KAD_PROTOCOL_ID

    write_frame = AtomicYamux._write_frame

    async def slow_reset(self: Any, data: bytes, *args: Any, **kwargs: Any) -> Any:
        if len(data) == 12 and data[3] & 0x08:  # a yamux header with the RST flag
            await trio.sleep(1)
        return await write_frame(self, data, *args, **kwargs)

    monkeypatch.setattr(AtomicYamux, "_write_frame", slow_reset)

    async def scenario() -> None:
        async with _pair() as (a, b, info):
            async def never(stream: Any) -> None:
                await trio.sleep_forever()

            b.host.set_stream_handler(KAD_PROTOCOL_ID, never)
            await _echo_once(a, info, b"connected")
            semaphore = a.host.get_network()._stream_semaphore
            conn = a.host.get_network().get_connections(info.peer_id)[0]
            backlog = conn.muxed_conn.stream_backlog_semaphore  # yamux's, per connection
            # (>=: the echo's stream may be given back meanwhile; the leak was 1 a request)
            before, backlog_before = semaphore.value, backlog.value
            for _ in range(5):
                with trio.move_on_after(0.3):
                    await a.value_from_peer(info.peer_id, b"/iollm-cap/0123")
            assert semaphore.value >= before
            assert backlog.value >= backlog_before

    _run(scenario)


def test_a_slow_fin_does_not_fail_an_answered_dht_request(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The stream of an answered request is closed outside the request's deadline: a FIN
    frame queued behind bulk data for a second failed a request that had its answer."""
    write_frame = AtomicYamux._write_frame

    async def slow_fin(self: Any, data: bytes, *args: Any, **kwargs: Any) -> Any:
        if len(data) == 12 and data[3] & 0x04:  # a yamux header with the FIN flag
            await trio.sleep(1)
        return await write_frame(self, data, *args, **kwargs)

    async def scenario() -> None:
        async with _pair() as (a, b, info):
            await b.put_value("/iollm-cap/0123", b"v")
            monkeypatch.setattr(AtomicYamux, "_write_frame", slow_fin)
            with trio.move_on_after(0.6) as deadline:
                value, _ = await a.value_from_peer(info.peer_id, b"/iollm-cap/0123")
            assert not deadline.cancelled_caught
            assert value == b"v"

    _run(scenario)


def test_the_dht_server_drops_a_stream_that_idles(monkeypatch: pytest.MonkeyPatch) -> None:
    """A client that keeps its Kademlia stream open after an answer (go-libp2p reuses
    them; py-libp2p's cancelled requests forget them) gets it reset after
    KAD_IDLE_TIMEOUT_S, and the server's slot is free again: py-libp2p serves 12 inbound
    DHT streams at once and waited on an idle one for as long as the connection lived."""
    import varint
    from libp2p.kad_dht.pb.kademlia_pb2 import Message

    from node.p2p.host import KAD_PROTOCOL_ID

    monkeypatch.setattr(node.p2p.host, "KAD_IDLE_TIMEOUT_S", 0.5)

    async def scenario() -> None:
        async with _pair() as (a, b, info):
            stream = await a.host.new_stream(info.peer_id, [KAD_PROTOCOL_ID])
            ping = Message(type=Message.MessageType.PING).SerializeToString()
            await stream.write(varint.encode(len(ping)) + ping)
            with trio.fail_after(5):
                length = varint.decode_bytes(await stream.read(1))
                await stream.read(length)  # the answer; the stream stays open
            assert b.dht._inbound_limiter.borrowed_tokens == 1

            async def slot_free() -> bool:
                return b.dht._inbound_limiter.borrowed_tokens == 0

            await wait_until(slot_free, 5)

    _run(scenario)


def test_the_dht_server_drops_a_request_that_trickles_in(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A request must arrive whole within KAD_IDLE_TIMEOUT_S of its first byte: a client
    sending a byte every 0.3 s (each read well within the timeout) held its slot for as
    long as it kept trickling."""
    import varint

    from node.p2p.host import KAD_PROTOCOL_ID

    monkeypatch.setattr(node.p2p.host, "KAD_IDLE_TIMEOUT_S", 0.5)

    async def scenario() -> None:
        async with _pair() as (a, b, info):
            stream = await a.host.new_stream(info.peer_id, [KAD_PROTOCOL_ID])

            async def slot_free() -> bool:
                return b.dht._inbound_limiter.borrowed_tokens == 0

            async with trio.open_nursery() as nursery:
                async def trickle() -> None:
                    with contextlib.suppress(Exception):
                        await stream.write(varint.encode(1000))
                        for _ in range(100):
                            await trio.sleep(0.3)
                            await stream.write(b"\x00")

                nursery.start_soon(trickle)
                with trio.fail_after(5):
                    while b.dht._inbound_limiter.borrowed_tokens == 0:
                        await trio.sleep(0.01)
                await wait_until(slot_free, 2)
                nursery.cancel_scope.cancel()

    _run(scenario)


def test_the_dht_server_serves_at_most_two_streams_of_one_peer() -> None:
    """py-libp2p serves 12 inbound DHT streams at once: one peer opening 12 held them
    all. Of three streams a peer keeps open at once, the third is reset (or refused
    while it is negotiated); the first is served."""
    from libp2p.kad_dht.pb.kademlia_pb2 import Message
    from libp2p.utils.varint import encode_varint_prefixed

    from node.p2p.host import KAD_PROTOCOL_ID, KAD_STREAMS_PER_PEER

    assert KAD_STREAMS_PER_PEER == 2

    async def scenario() -> None:
        async with _pair() as (a, b, info):
            ping = encode_varint_prefixed(
                Message(type=Message.MessageType.PING).SerializeToString())
            served: list[bool] = []
            for _ in range(3):  # each kept open: the handler waits for its next request
                try:
                    with trio.fail_after(5):
                        stream = await a.host.new_stream(info.peer_id, [KAD_PROTOCOL_ID])
                        await stream.write(ping)
                        served.append(bool(await stream.read(100)))
                except trio.TooSlowError:
                    raise
                except Exception:  # reset, or refused while negotiated
                    served.append(False)
            assert served[0] and not served[2]
            assert b.dht._inbound_of[a.peer_id] <= 2

    _run(scenario)


def test_concurrent_dht_requests_to_one_peer_wait_for_its_limit_not_get_reset() -> None:
    """A node's concurrent walks ask the same few peers (records_of runs 16): its
    requests to one peer take turns on KAD_STREAMS_PER_PEER streams instead of being
    reset by the peer's limit (a reset marks the peer unresponsive for a minute)."""
    async def scenario() -> None:
        async with _pair() as (a, b, info):
            await b.put_value("/iollm-cap/0123", b"v")
            values: list[bytes | None] = []

            async def ask() -> None:
                value, _ = await a.value_from_peer(info.peer_id, b"/iollm-cap/0123")
                values.append(value)

            with trio.fail_after(10):
                async with trio.open_nursery() as nursery:
                    for _ in range(8):
                        nursery.start_soon(ask)
            assert values == [b"v"] * 8

    _run(scenario)


def test_a_hostile_dht_answer_is_bounded() -> None:
    """A DHT answer is read up to KAD_MAX_ANSWER_BYTES (py-libp2p reads 4 MiB), only
    its first K closer peers are kept (and only their addresses go to the peerstore),
    and providers past the caller's limit are not looked at."""
    from libp2p.kad_dht.pb.kademlia_pb2 import Message
    from libp2p.peer.id import ID
    from libp2p.utils.varint import encode_varint_prefixed, read_varint_prefixed_bytes

    from node.p2p.host import KAD_PROTOCOL_ID
    from node.p2p.lookup import KAD_MAX_ANSWER_BYTES, K

    closer = [ID(bytes([0, 36, 8, 1, 18, 32]) + bytes([i]) * 32) for i in range(1, 3 * K)]
    pad = {"big": b""}

    async def scenario() -> None:
        async with _pair() as (a, b, info):
            async def hostile(stream: Any) -> None:
                request = Message()
                request.ParseFromString(await read_varint_prefixed_bytes(stream))
                answer = Message(type=request.type, key=pad["big"])
                for i, peer in enumerate(closer):
                    entry = answer.closerPeers.add()
                    entry.id = peer.to_bytes()
                    entry.addrs.append(Multiaddr(f"/ip4/10.0.0.{i}/tcp/1").to_bytes())
                    provider = answer.providerPeers.add()
                    provider.id = peer.to_bytes()
                await stream.write(encode_varint_prefixed(answer.SerializeToString()))
                await stream.close()

            b.host.set_stream_handler(KAD_PROTOCOL_ID, hostile)
            with trio.fail_after(5):
                providers, named = await a.providers_from_peer(info.peer_id, b"k", 3)
            assert [p.peer_id for p in providers] == closer[:3]
            assert named == closer[:K]
            store = a.host.get_peerstore()
            with_addrs = set(store.peers_with_addrs())
            assert closer[K - 1] in with_addrs and closer[K] not in with_addrs
            pad["big"] = bytes(KAD_MAX_ANSWER_BYTES)
            with trio.fail_after(5), pytest.raises(Exception, match="exceeds"):
                await a.value_from_peer(info.peer_id, b"k")

    _run(scenario)


def test_records_stored_or_put_are_not_republished_by_the_library() -> None:
    """py-libp2p republishes every value in its store that it did not receive through a
    PUT (a lookup and up to 20 PUTs each, at every maintenance pass): a node's replicas
    of the other nodes' records are theirs to publish, and its own is re-published by
    discovery's refresh."""
    import time

    async def scenario() -> None:
        async with _pair() as (a, _, _):
            a.store_value(b"/iollm-cap/00", b"a copy", time.time() + 600)
            await a.put_value("/iollm-cap/01", b"its own")
            assert a.local_value(b"/iollm-cap/00") == b"a copy"
            assert a.local_value(b"/iollm-cap/01") == b"its own"
            looked_up: list[bytes] = []

            class Routing:  # the library's maintenance pass, with its lookups recorded
                async def find_closest_peers_network(self, key: bytes) -> list[Any]:
                    looked_up.append(key)
                    return []

            with trio.fail_after(5):
                await a.dht.value_store._republish_records(Routing())
            assert not looked_up

    _run(scenario)


def test_a_dht_request_to_a_peer_without_the_dht_fails_fast() -> None:
    """The request's protocol is proposed in the same write as the request (no round
    trip of its own): a peer that does not serve Kademlia refuses it, and the request
    fails at once rather than waiting out a deadline."""
    from node.p2p.host import KAD_PROTOCOL_ID

    async def scenario() -> None:
        async with _pair() as (a, b, info):
            value, _ = await a.value_from_peer(info.peer_id, b"/iollm-cap/0123")
            assert value is None  # served: no such value
            b.host.remove_stream_handler(KAD_PROTOCOL_ID)
            with trio.fail_after(1), pytest.raises(ValueError, match="answered b'na' to"):
                await a.value_from_peer(info.peer_id, b"/iollm-cap/0123")
            assert await _echo_once(a, info, b"still connected") == b"still connected"

    _run(scenario)


def test_gossip_queued_for_a_peer_off_the_topic_expires_in_seconds(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """py-libp2p queues each message for every connected peer not subscribed to its topic
    (its subscription may be on the way) and rebuilt every such queue on each message:
    30 s and 100 messages a peer before. A peer that never joins the topic keeps at most
    PENDING_GOSSIP_TTL_S of messages queued."""
    # The host takes the TTL when it is built; a short one keeps the wait short.
    monkeypatch.setattr(node.p2p.host, "PENDING_GOSSIP_TTL_S", 0.3)

    def validate(sender: Any, message: Any) -> bool:
        return True

    async def scenario() -> None:
        async with _pair() as (a, _, info):
            await a.subscribe("/iollm-test/only-a", validate)

            async def b_is_a_pubsub_peer() -> bool:
                return info.peer_id in a.pubsub.peers

            await wait_until(b_is_a_pubsub_peer, 10)
            await a.publish("/iollm-test/only-a", b"one")
            assert len(a.gossipsub._pending_messages[info.peer_id]) == 1
            # The TTL is wall-clock time (the library reads time.time()): it must pass.
            await trio.sleep(node.p2p.host.PENDING_GOSSIP_TTL_S + 0.2)
            await a.publish("/iollm-test/only-a", b"two")
            assert len(a.gossipsub._pending_messages[info.peer_id]) == 1

    _run(scenario)
