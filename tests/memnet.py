"""An in-memory implementation of node/p2p/api.py's ``P2P``, for service tests on trio's
MockClock (test-only: the installed package never imports it).

Many nodes run in one trio process with no sockets, no Noise and no yamux, so a service's
logic (consensus rounds, record expiry, retries) runs in virtual time: a test of minutes
of protocol time takes a second. What it keeps of the real network, because the services
depend on it:

* streams: ``read(n)`` may return fewer bytes, raises at the end (MemStreamEOF) or once
  reset (PeerGone); ``close`` ends this side's writes only; ``reset`` ends both sides.
  A peer that dies or is cut off has every stream with it reset (its peers' reads and
  writes raise PeerGone). A stream is opened only to a reachable peer that serves the
  protocol, and opening one connects the two nodes (py-libp2p dials from its peerstore;
  here any live node can be dialled).
* gossip: a message spreads hop by hop between connected subscribers of its topic; each
  node runs its topic validator before it delivers or relays a message (a refused
  message goes no further from there), and sees each message once. Delivery is
  best-effort: a subscriber whose queue is full misses the message, as in py-libp2p.
* the DHT: each node has its own value and provider store (values validated by the
  registered namespace validators, expired by the wall clock the world is given); puts
  and provides reach the K closest reachable peers the node knows; the per-peer requests
  of node/p2p/lookup.walk answer from the asked peer's store, with its closest peers.
* connect / disconnect, partitions and healing (a cut pair neither connects nor keeps its
  streams), and a node that dies (``kill``).

What it leaves out: bandwidth, frame limits, the stream guard, peer scoring, NAT.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from queue import SimpleQueue
from typing import Any

import aiosqlite.core
import trio
import trio.testing
from multiaddr import Multiaddr
from nacl.signing import SigningKey

from node.identity import peer_id_of
from node.p2p import (
    GossipMessage,
    GossipValidator,
    PeerGone,
    PeerId,
    PeerInfo,
    RecordValidator,
    Unreachable,
)
from node.p2p.host import KAD_PROTOCOL_ID, PROVIDE_SPACING_S, NotServed
from node.p2p.lookup import K

GOSSIP_PROTOCOL_ID = "/meshsub/1.1.0"
DHT_RECORD_TTL_S = 24 * 3600  # py-libp2p's value store default (kad_dht/common.py)
SUBSCRIPTION_QUEUE = 1024  # messages a subscriber may have waiting; more are dropped
HOP_LATENCY_S = 0.002  # a gossip hop, a dial, a DHT request


class MemStreamEOF(Exception):
    """The other side closed its writes and everything it wrote has been read."""


class MemStreamClosed(Exception):
    """This side wrote after closing its own writes (a bug of the caller)."""


class _Pipe:
    """One direction of a stream: chunks in order, and what a short read left over."""

    def __init__(self) -> None:
        self.send, self.recv = trio.open_memory_channel[bytes](math.inf)
        self.left = b""


class _StreamPair:
    """What both ends of one stream share: whether it was reset."""

    def __init__(self, a_to_b: _Pipe, b_to_a: _Pipe) -> None:
        self.pipes = (a_to_b, b_to_a)
        self.was_reset = False

    def reset(self) -> None:
        self.was_reset = True
        for pipe in self.pipes:
            pipe.send.close()  # a blocked reader wakes and sees the reset


class MemStream:
    def __init__(self, pair: _StreamPair, inbound: _Pipe, outbound: _Pipe,
                 remote: PeerId, protocol: str) -> None:
        self._pair = pair
        self._in = inbound
        self._out = outbound
        self.remote = remote
        self.protocol = protocol
        self._closed = False

    def _check(self) -> None:
        if self._pair.was_reset:
            raise PeerGone(f"stream with {self.remote} was reset")

    async def read(self, n: int | None = None) -> bytes:
        await trio.lowlevel.checkpoint()
        self._check()
        if not self._in.left:
            try:
                self._in.left = await self._in.recv.receive()
            except (trio.EndOfChannel, trio.ClosedResourceError):
                self._check()
                raise MemStreamEOF(f"{self.remote} closed the stream") from None
        take = len(self._in.left) if n is None or n < 0 else min(n, len(self._in.left))
        data, self._in.left = self._in.left[:take], self._in.left[take:]
        return data

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        await trio.lowlevel.checkpoint()
        self._check()
        if self._closed:
            raise MemStreamClosed("write after close")
        self._out.send.send_nowait(bytes(data))

    async def close(self) -> None:
        await trio.lowlevel.checkpoint()
        self._closed = True
        self._out.send.close()

    async def reset(self) -> None:
        await trio.lowlevel.checkpoint()
        self._pair.reset()

    def get_protocol(self) -> str:
        return self.protocol


def _distance(key: bytes, peer: PeerId) -> int:
    """Kademlia's XOR distance in the SHA-256 keyspace (as node/p2p/lookup.walk)."""
    a = hashlib.sha256(key).digest()
    b = hashlib.sha256(peer.to_bytes()).digest()
    return int.from_bytes(bytes(x ^ y for x, y in zip(a, b, strict=True)), "big")


@dataclass
class _Message:
    mid: tuple[PeerId, int]
    topic: str
    data: bytes
    author: PeerId


class _Subscription:
    def __init__(self, receive: trio.MemoryReceiveChannel[GossipMessage]) -> None:
        self._receive = receive

    async def get(self) -> GossipMessage:
        return await self._receive.receive()


@dataclass
class MemNode:
    """One node's network: implements node/p2p/api.py's P2P."""

    world: MemNetwork
    key: SigningKey
    index: int
    validators: dict[str, RecordValidator]
    alive: bool = True
    handlers: dict[str, Callable[[Any], Awaitable[None]]] = field(default_factory=dict)
    topics: dict[str, tuple[GossipValidator, trio.MemorySendChannel[GossipMessage]]] = field(
        default_factory=dict)
    seen: set[tuple[PeerId, int]] = field(default_factory=set)
    values: dict[bytes, tuple[bytes, float]] = field(default_factory=dict)
    providers: dict[bytes, dict[PeerId, PeerInfo]] = field(default_factory=dict)
    table: set[PeerId] = field(default_factory=set)
    addrs: dict[PeerId, list[Multiaddr]] = field(default_factory=dict)
    rejected: dict[tuple[str, str], int] = field(default_factory=dict)
    nursery: trio.Nursery | None = None
    _seq: itertools.count[int] = field(default_factory=itertools.count)
    _provide_lock: trio.Lock = field(default_factory=trio.Lock)
    _next_provide: float = 0.0
    failing_puts: int = 0  # the next this many put_value calls fail, as a timeout would
    _addrs_changed: trio.Event = field(default_factory=trio.Event)

    def __post_init__(self) -> None:
        self._peer_id = PeerId.from_base58(peer_id_of(self.key))

    @property
    def peer_id(self) -> PeerId:
        return self._peer_id

    # -- streams -----------------------------------------------------------------------

    def serve(self, protocol: str, handler: Callable[[Any], Awaitable[None]],
              max_frame_bytes: int) -> None:
        self.handlers[str(protocol)] = handler

    async def open_stream(self, peer: PeerId, protocol: str | Sequence[str]) -> MemStream:
        await self.world.dial(self, peer)
        remote = self.world.nodes[peer]
        wanted = [protocol] if isinstance(protocol, str) else list(protocol)
        chosen = next((str(p) for p in wanted if str(p) in remote.handlers), None)
        if chosen is None:
            raise NotServed(f"{peer} serves none of {wanted}")
        there, back = _Pipe(), _Pipe()
        pair = _StreamPair(there, back)
        self.world.streams.setdefault(frozenset((self.peer_id, peer)), []).append(pair)
        ours = MemStream(pair, back, there, peer, chosen)
        theirs = MemStream(pair, there, back, self.peer_id, chosen)
        assert remote.nursery is not None
        remote.nursery.start_soon(remote.handlers[chosen], theirs)
        return ours

    def remote_peer(self, stream: Any) -> PeerId:
        return stream.remote  # type: ignore[no-any-return]

    # -- peers -------------------------------------------------------------------------

    async def connect(self, info: PeerInfo, timeout: float = 5.0) -> None:
        with trio.fail_after(timeout):
            await self.world.dial(self, info.peer_id)
        self.table.add(info.peer_id)

    def connected_peers(self) -> list[PeerId]:
        return sorted(self.world.links.get(self.peer_id, set()), key=str)

    def add_addrs(self, peer: PeerId, addrs: Sequence[Multiaddr], ttl_s: float) -> None:
        self.addrs[peer] = list(addrs)

    def speaks(self, peer: PeerId, protocol: str) -> bool | None:
        node = self.world.nodes.get(peer)
        return None if node is None else str(protocol) in node.protocols()

    def listen_addrs(self) -> list[str]:
        return [f"/ip4/127.0.0.1/tcp/{10000 + self.index}/p2p/{self.peer_id.to_base58()}"]

    async def wait_addrs_changed(self) -> None:
        await self._addrs_changed.wait()
        self._addrs_changed = trio.Event()

    def change_addrs(self) -> None:
        """What AutoNAT's verdict or a relay slot does to a real host: its addresses
        change, and the node re-signs its record at once."""
        self._addrs_changed.set()

    def protocols(self) -> list[str]:
        return sorted([*self.handlers, str(KAD_PROTOCOL_ID), GOSSIP_PROTOCOL_ID])

    def banned_peers(self) -> list[str]:
        return []

    async def announce_protocols(self, timeout: float = 5.0) -> None:
        await trio.lowlevel.checkpoint()

    # -- gossip ------------------------------------------------------------------------

    async def subscribe(self, topic: str, validator: GossipValidator) -> _Subscription:
        await trio.lowlevel.checkpoint()
        send, receive = trio.open_memory_channel[GossipMessage](SUBSCRIPTION_QUEUE)
        self.topics[topic] = (validator, send)
        return _Subscription(receive)

    async def publish(self, topic: str, data: bytes) -> None:
        await trio.lowlevel.checkpoint()
        message = _Message((self.peer_id, next(self._seq)), topic, bytes(data), self.peer_id)
        self.world.receive(self, self.peer_id, message)

    def reject_gossip(self, topic: str, reason: str) -> bool:
        self.rejected[(topic, reason)] = self.rejected.get((topic, reason), 0) + 1
        return False

    # -- DHT ---------------------------------------------------------------------------

    def _validate(self, key: str, value: bytes) -> None:
        namespace = key.split("/")[1] if key.startswith("/") else ""
        validator = self.validators.get(namespace)
        if validator is not None:
            validator.validate(key, value)

    def accept_value(self, key: bytes, value: bytes, expires_s: float) -> None:
        """A PUT_VALUE received (or our own put): validated (the validator's error
        raised), and the better of the old and new copy kept (the validator's select)."""
        text = key.decode()
        self._validate(text, value)
        old = self.values.get(key)
        namespace = text.split("/")[1] if text.startswith("/") else ""
        validator = self.validators.get(namespace)
        if old is not None and validator is not None and validator.select(
                text, [old[0], value]) == 0:
            return
        self.values[key] = (value, expires_s)

    async def put_value(self, key: str, value: bytes) -> None:
        expires = self.world.now_s() + DHT_RECORD_TTL_S
        # As py-libp2p's KadDHT.put_value: a value that loses to the local store's copy
        # (the validator's select) is refused before anything is sent.
        old = self.values.get(key.encode())
        namespace = key.split("/")[1] if key.startswith("/") else ""
        validator = self.validators.get(namespace)
        if (old is not None and old[0] != value and validator is not None
                and validator.select(key, [value, old[0]]) != 0):
            raise ValueError("Refusing to replace newer value with the older one")
        if self.failing_puts:
            self.failing_puts -= 1
            await trio.sleep(HOP_LATENCY_S)
            raise trio.TooSlowError("put_value: no peer answered in time")
        self.accept_value(key.encode(), value, expires)
        for peer in await self._closest_reachable(key.encode()):
            try:
                self.world.nodes[peer].accept_value(key.encode(), value, expires)
            except Exception:  # the peer's validator refused it: its copy stays
                continue

    async def provide(self, key: str) -> bool:
        raw = bytes.fromhex(key)
        info = PeerInfo(self.peer_id, [Multiaddr(a.rpartition("/p2p/")[0])
                                       for a in self.listen_addrs()])
        self.providers.setdefault(raw, {})[self.peer_id] = info
        reached = await self._closest_reachable(raw)
        for peer in reached:
            self.world.nodes[peer].providers.setdefault(raw, {})[self.peer_id] = info
        return bool(reached)  # as py-libp2p: whether any peer took the record

    async def _closest_reachable(self, key: bytes) -> list[PeerId]:
        await trio.sleep(HOP_LATENCY_S)
        known = self.table | set(self.connected_peers())
        live = [p for p in known if self.world.reachable(self.peer_id, p)]
        return sorted(live, key=lambda p: _distance(key, p))[:K]

    async def provide_slot(self) -> None:
        async with self._provide_lock:
            wait = self._next_provide - trio.current_time()
            if wait > 0:
                await trio.sleep(wait)
            self._next_provide = trio.current_time() + PROVIDE_SPACING_S

    def store_value(self, key: bytes, value: bytes, expires_s: float) -> None:
        self.values[key] = (value, expires_s)

    def local_value(self, key: bytes) -> bytes | None:
        entry = self.values.get(key)
        if entry is None or entry[1] <= self.world.now_s():
            return None
        return entry[0]

    def local_providers(self, key: bytes) -> list[PeerInfo]:
        return list(self.providers.get(key, {}).values())

    async def _ask(self, peer: PeerId) -> MemNode:
        """The node a DHT request goes to, once dialled."""
        await self.world.dial(self, peer)
        await trio.sleep(HOP_LATENCY_S)
        if not self.world.reachable(self.peer_id, peer):
            raise PeerGone(f"{peer} went away during the request")
        return self.world.nodes[peer]

    async def value_from_peer(self, peer: PeerId, key: bytes
                              ) -> tuple[bytes | None, list[PeerId]]:
        there = await self._ask(peer)
        return there.local_value(key), there.closest_known(key, K)

    async def providers_from_peer(self, peer: PeerId, key: bytes, limit: int
                                  ) -> tuple[list[PeerInfo], list[PeerId]]:
        there = await self._ask(peer)
        return there.local_providers(key)[:limit], there.closest_known(key, K)

    def closest_known(self, key: bytes, count: int) -> list[PeerId]:
        return sorted(self.table, key=lambda p: _distance(key, p))[:count]

    def in_routing_table(self, peer: PeerId) -> bool:
        return peer in self.table

    async def add_to_routing_table(self, peer: PeerId) -> None:
        await self._ask(peer)
        self.table.add(peer)

    def drop_from_routing_table(self, peer: PeerId) -> None:
        self.table.discard(peer)

    def routing_table_size(self) -> int:
        return len(self.table)

    async def refresh_routing_table(self) -> None:
        """A FIND_NODE for our own id, one hop deep: the connected peers and theirs."""
        for peer in self.connected_peers():
            try:
                there = await self._ask(peer)
            except PeerGone:
                continue
            self.table.add(peer)
            self.table.update(p for p in there.table if p != self.peer_id)


class MemNetwork:
    """The world the MemNodes live in: who is alive, who is connected, what is cut off.

    ``clock_ms`` is the wall clock the nodes' DHT stores expire by (the services' own
    injected clock, so record expiry and store expiry agree)."""

    def __init__(self, nursery: trio.Nursery, clock_ms: Callable[[], int]) -> None:
        self._nursery = nursery
        self.clock_ms = clock_ms
        self.nodes: dict[PeerId, MemNode] = {}
        self.links: dict[PeerId, set[PeerId]] = {}
        self.streams: dict[frozenset[PeerId], list[_StreamPair]] = {}
        self.cut: set[frozenset[PeerId]] = set()

    def now_s(self) -> float:
        return self.clock_ms() / 1000

    # -- topology ----------------------------------------------------------------------

    def reachable(self, a: PeerId, b: PeerId) -> bool:
        na, nb = self.nodes.get(a), self.nodes.get(b)
        return (na is not None and nb is not None and na.alive and nb.alive and a != b
                and frozenset((a, b)) not in self.cut)

    async def dial(self, node: MemNode, peer: PeerId) -> None:
        """Connect ``node`` to ``peer`` (a no-op when connected); Unreachable (a PeerGone)
        when ``peer`` is dead, unknown or cut off from it."""
        if peer in self.links.get(node.peer_id, set()):
            await trio.lowlevel.checkpoint()
            return
        await trio.sleep(HOP_LATENCY_S)
        if not node.alive:
            raise PeerGone("this node is dead")
        if not self.reachable(node.peer_id, peer):
            raise Unreachable(f"cannot reach {peer}")
        self.links.setdefault(node.peer_id, set()).add(peer)
        self.links.setdefault(peer, set()).add(node.peer_id)

    def disconnect(self, a: PeerId, b: PeerId) -> None:
        """Close the connection between two nodes: every stream between them is reset."""
        self.links.get(a, set()).discard(b)
        self.links.get(b, set()).discard(a)
        for pair in self.streams.pop(frozenset((a, b)), []):
            pair.reset()

    def partition(self, *groups: Sequence[MemNode]) -> None:
        """Cut every pair of nodes in different groups (and drop their connections)."""
        for g1, g2 in itertools.combinations(groups, 2):
            for a in g1:
                for b in g2:
                    self.cut.add(frozenset((a.peer_id, b.peer_id)))
                    self.disconnect(a.peer_id, b.peer_id)

    def heal(self) -> None:
        """Undo every partition; the nodes reconnect as their services dial again."""
        self.cut.clear()

    def kill(self, node: MemNode) -> None:
        """The node dies: its connections and streams go at once, its handlers stop."""
        node.alive = False
        for peer in list(self.links.get(node.peer_id, set())):
            self.disconnect(node.peer_id, peer)
        if node.nursery is not None:
            node.nursery.cancel_scope.cancel()

    # -- gossip ------------------------------------------------------------------------

    def receive(self, node: MemNode, forwarder: PeerId, message: _Message) -> None:
        """``node`` got ``message`` from ``forwarder`` (itself: its own publish): judged
        by its topic validator, then delivered and relayed to its connected subscribers,
        each after one hop's latency."""
        if message.mid in node.seen or not node.alive:
            return
        node.seen.add(message.mid)
        subscribed = node.topics.get(message.topic)
        if subscribed is None:
            return
        validator, deliver = subscribed
        gossip = GossipMessage(message.data, message.author)
        try:
            ok = validator(forwarder, gossip)
        except Exception:
            ok = False
        if not ok:
            return
        # A full queue drops the message, as py-libp2p's does.
        with contextlib.suppress(trio.WouldBlock, trio.BrokenResourceError,
                                 trio.ClosedResourceError):
            deliver.send_nowait(gossip)
        for peer in self.links.get(node.peer_id, set()):
            there = self.nodes[peer]
            if message.topic in there.topics and message.mid not in there.seen:
                self._nursery.start_soon(self._hop, node.peer_id, there, message)

    async def _hop(self, sender: PeerId, node: MemNode, message: _Message) -> None:
        await trio.sleep(HOP_LATENCY_S)
        if self.reachable(sender, node.peer_id):
            self.receive(node, sender, message)

    # -- nodes -------------------------------------------------------------------------

    @asynccontextmanager
    async def open_node(self, signing_key: SigningKey, listen: Any = (),
                        validators: dict[str, RecordValidator] | None = None,
                        **_: Any) -> AsyncIterator[MemNode]:
        """A node on this network; same signature as node/p2p's ``open_network``, so
        ``NodeSpec(network=world.open_node)`` builds a whole node on it. A node that
        comes back (the same key) after ``kill`` is a new MemNode, with empty stores."""
        node = MemNode(self, signing_key, len(self.nodes), dict(validators or {}))
        old = self.nodes.get(node.peer_id)
        if old is not None:
            node.index = old.index
            self.kill(old)
        self.nodes[node.peer_id] = node
        try:
            async with trio.open_nursery() as nursery:
                node.nursery = nursery
                yield node
                nursery.cancel_scope.cancel()
        finally:
            if self.nodes.get(node.peer_id) is node:
                self.kill(node)


@asynccontextmanager
async def open_memnet(clock_ms: Callable[[], int]) -> AsyncIterator[MemNetwork]:
    async with trio.open_nursery() as nursery:
        yield MemNetwork(nursery, clock_ms)
        nursery.cancel_scope.cancel()


@contextmanager
def storage_holds_clock(clock: trio.testing.MockClock) -> Iterator[None]:
    """Keep ``clock`` (autojump_threshold 0) from jumping while SQLite works.

    node/storage.py runs every statement (and the connect) in aiosqlite's worker thread;
    to trio every task then looks blocked, and an autojumping clock would leap to the
    next deadline (a round timeout, the test's own bound) in the middle of a write. Each
    request queued to that thread turns autojump off until its answer is back in trio.
    aiosqlite builds each connection's request queue from its module's ``SimpleQueue``:
    the queue here counts the requests in flight."""
    busy = 0

    def done(_: object) -> None:
        nonlocal busy
        busy -= 1
        if not busy:
            clock.autojump_threshold = 0

    class CountingQueue(SimpleQueue):  # type: ignore[type-arg]
        def put_nowait(self, item: Any) -> None:
            nonlocal busy
            future = item[0]
            if future is not None:  # a request whose answer someone waits for
                busy += 1
                clock.autojump_threshold = math.inf
                future.add_done_callback(done)
            super().put_nowait(item)

    original = aiosqlite.core.SimpleQueue
    aiosqlite.core.SimpleQueue = CountingQueue  # type: ignore[misc]
    try:
        yield
    finally:
        aiosqlite.core.SimpleQueue = original  # type: ignore[misc]


def run_on_mock_clock(main: Callable[[], Awaitable[None]]) -> None:
    """``trio.run(main)`` on a MockClock that jumps whenever every task waits (and not
    while a SQLite statement runs)."""
    clock = trio.testing.MockClock(autojump_threshold=0)
    with storage_holds_clock(clock):
        trio.run(main, clock=clock)


def mock_clock_ms() -> Callable[[], int]:
    """A wall clock in ms that follows trio's (mock) clock, for the services' clock_ms:
    it reads the real time once (call it inside the run), then moves with trio's."""
    start_ms = int(time.time() * 1000) - int(trio.current_time() * 1000)
    return lambda: start_ms + int(trio.current_time() * 1000)
