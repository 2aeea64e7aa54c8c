"""Fuzz of py-libp2p's pubsub and Kademlia readers through a real host (hypothesis).

The hosts run in a trio loop on a thread of their own for the whole test, so each
hypothesis example only opens a stream and writes its frames. An example is a few frames
on one stream: random bytes, a valid length before random bytes, or a protobuf message of
the reader's own type with random fields (the inputs that reach furthest into the
library: peer ids that are not peer ids, unknown enum values, absurd backoffs). After
each example the victim is alive and answers an honest Kademlia request; at the end it
still gossips.

The default suite runs a short search; ``-m slow`` a long one.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest
import trio
import varint
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from libp2p.kad_dht.pb.kademlia_pb2 import Message as KadMessage
from libp2p.kad_dht.pb.kademlia_pb2 import Record as KadRecord
from libp2p.pubsub.pb import rpc_pb2

from protocol.penalty import PenaltyPolicy
from tests.hostile import attack
from tests.test_stream_guard import MESHSUB, TOPIC, subscribed, trio_nodes

KAD = "/ipfs/kad/1.0.0"
LINGER_S = 0.2
SHORT = settings(max_examples=25, deadline=None, derandomize=True,
                 suppress_health_check=list(HealthCheck))
LONG = settings(max_examples=1000, deadline=None, suppress_health_check=list(HealthCheck))
# The attacker is never banned here: each example must reach the reader.
NEVER_BAN = PenaltyPolicy(strikes=10**9)

small_bytes = st.binary(max_size=64)
topics = st.sampled_from([TOPIC, "", "x" * 300]) | st.text(max_size=20)


def _frame(body: bytes) -> bytes:
    return varint.encode(len(body)) + body


@st.composite
def rpc_messages(draw: st.DrawFn) -> bytes:
    rpc = rpc_pb2.RPC()
    for _ in range(draw(st.integers(0, 3))):
        rpc.subscriptions.add(subscribe=draw(st.booleans()), topicid=draw(topics))
    for _ in range(draw(st.integers(0, 3))):
        rpc.publish.add(from_id=draw(small_bytes), data=draw(small_bytes),
                        seqno=draw(small_bytes), topicIDs=draw(st.lists(topics, max_size=3)),
                        signature=draw(small_bytes), key=draw(small_bytes))
    if draw(st.booleans()):
        control = rpc.control
        for _ in range(draw(st.integers(0, 2))):
            control.ihave.add(topicID=draw(topics),
                              messageIDs=draw(st.lists(small_bytes, max_size=3)))
            control.iwant.add(messageIDs=draw(st.lists(small_bytes, max_size=3)))
            control.graft.add(topicID=draw(topics))
            prune = control.prune.add(topicID=draw(topics),
                                      backoff=draw(st.integers(0, 2**64 - 1)))
            for _ in range(draw(st.integers(0, 2))):
                prune.peers.add(peerID=draw(small_bytes), signedPeerRecord=draw(small_bytes))
    if draw(st.booleans()):
        rpc.senderRecord = draw(small_bytes)
    return _frame(rpc.SerializeToString())


@st.composite
def kad_messages(draw: st.DrawFn) -> bytes:
    message = KadMessage(type=draw(st.integers(0, 9)), key=draw(small_bytes),
                         clusterLevelRaw=draw(st.integers(-(2**31), 2**31 - 1)))
    if draw(st.booleans()):
        message.record.CopyFrom(KadRecord(key=draw(small_bytes), value=draw(small_bytes),
                                          timeReceived=draw(st.text(max_size=30)),
                                          author=draw(small_bytes),
                                          signature=draw(small_bytes)))
    for peers in (message.closerPeers, message.providerPeers):
        for _ in range(draw(st.integers(0, 2))):
            peers.add(id=draw(small_bytes), addrs=draw(st.lists(small_bytes, max_size=2)),
                      connection=draw(st.integers(0, 5)))
    if draw(st.booleans()):
        message.senderRecord = draw(small_bytes)
    return _frame(message.SerializeToString())


def frames(messages: st.SearchStrategy[bytes]) -> st.SearchStrategy[bytes]:
    one = st.one_of(
        st.binary(min_size=1, max_size=300),
        st.binary(max_size=300).map(_frame),
        messages,
    )
    return st.lists(one, min_size=1, max_size=3).map(b"".join)


class Hosts:
    """Victim, attacker and honest hosts (trio_nodes) in a trio loop on another thread;
    ``call`` runs an async function there and returns its result."""

    def __init__(self) -> None:
        self._ready = threading.Event()
        self._token: trio.lowlevel.TrioToken | None = None
        self._stop: trio.Event | None = None
        self.failure: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            trio.run(self._main)
        except BaseException as exc:  # the victim died: the tests report it
            self.failure = exc
        finally:
            self._ready.set()

    async def _main(self) -> None:
        async with trio_nodes(3, NEVER_BAN) as nodes:
            (self.victim, _), (self.attacker, _), (self.honest, _) = nodes
            self.subscription = await self.victim.pubsub.subscribe(TOPIC)
            await self.honest.pubsub.subscribe(TOPIC)
            self._token = trio.lowlevel.current_trio_token()
            self._stop = trio.Event()
            self._ready.set()
            await self._stop.wait()

    def __enter__(self) -> Hosts:
        self._thread.start()
        assert self._ready.wait(60), "the hosts did not start within 60 s"
        if self.failure is not None:
            raise self.failure
        return self

    def __exit__(self, *_: object) -> None:
        if self._token is not None and self._stop is not None and self.failure is None:
            with contextlib.suppress(trio.RunFinishedError):
                trio.from_thread.run_sync(self._stop.set, trio_token=self._token)
        self._thread.join(30)

    def call(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> Any:
        async def bounded() -> Any:
            with trio.fail_after(30):
                return await fn(*args)

        try:
            return trio.from_thread.run(bounded, trio_token=self._token)
        except (trio.RunFinishedError, trio.Cancelled):  # the loop ended under the call
            self._thread.join(30)
            raise AssertionError(f"the hosts' trio loop ended: {self.failure!r}") from None

    async def honest_kademlia(self) -> None:
        closest = await self.honest.dht.peer_routing.find_closest_peers_network(
            self.attacker.peer_id.to_bytes())
        assert self.victim.peer_id in closest

    async def honest_gossip(self) -> None:
        await subscribed(self.honest, self.victim)
        data = b"honest after the fuzz"
        await self.honest.pubsub.publish(TOPIC, data)
        while (await self.subscription.get()).data != data:
            pass


@pytest.fixture(scope="module")
def hosts() -> Iterator[Hosts]:
    with Hosts() as running:
        yield running


def _example(hosts: Hosts, protocol: str, payload: bytes) -> None:
    # A pubsub peer keeps its stream open after valid frames: wait briefly, not for the
    # end; the honest request right after is what must succeed.
    hosts.call(attack, hosts.attacker, hosts.victim.peer_id, protocol, payload, LINGER_S)
    hosts.call(hosts.honest_kademlia)


@SHORT
@given(payload=frames(rpc_messages()))
def test_pubsub_reader(hosts: Hosts, payload: bytes) -> None:
    _example(hosts, MESHSUB, payload)


@SHORT
@given(payload=frames(kad_messages()))
def test_kademlia_reader(hosts: Hosts, payload: bytes) -> None:
    _example(hosts, KAD, payload)


@pytest.mark.slow
@pytest.mark.timeout(1200)  # 1000 examples, about a quarter of a second each
@LONG
@given(payload=frames(rpc_messages()))
def test_pubsub_reader_long(hosts: Hosts, payload: bytes) -> None:
    _example(hosts, MESHSUB, payload)


@pytest.mark.slow
@pytest.mark.timeout(1200)
@LONG
@given(payload=frames(kad_messages()))
def test_kademlia_reader_long(hosts: Hosts, payload: bytes) -> None:
    _example(hosts, KAD, payload)


def test_victim_still_gossips_after_the_fuzz(hosts: Hosts) -> None:
    hosts.call(hosts.honest_gossip)
