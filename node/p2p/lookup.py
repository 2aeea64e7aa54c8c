"""Iterative Kademlia lookups that a dead or frozen peer cannot stall.

py-libp2p's own lookups query peers in lock-step rounds and wait for every peer of a round,
each with a 10 s timeout: one frozen peer (TCP open, nothing answering, as after SIGSTOP)
costs every lookup that meets it 10 s per round. This walk keeps ``alpha`` requests in
flight at all times, gives each its own deadline, never waits for a straggler before
asking the next candidate, and remembers peers that failed so later walks skip them for a
while. One walk serves FIND_NODE, GET_VALUE and GET_PROVIDERS: each answer carries closer
peers, and the payload (a value, providers) is collected along the way.

The per-peer requests are py-libp2p's own message codecs (``_get_from_peer`` and friends),
so the wire format stays the standard ``/ipfs/kad/1.0.0``.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar, cast

import trio
from libp2p.kad_dht.kad_dht import KadDHT
from libp2p.kad_dht.utils import xor_distance
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo

from node.p2p.api import P2P

log = logging.getLogger(__name__)

T = TypeVar("T")
# One request to one peer: (payload or None, closer peers).
PeerQuery = Callable[[ID], Awaitable[tuple[T | None, list[ID]]]]

K = 20  # replication parameter of the network (libp2p Kademlia's k)
ALPHA = 3  # requests in flight per walk (libp2p Kademlia's alpha)
UNRESPONSIVE_FOR_S = 60.0  # the default of [discovery] unresponsive_for_s


@dataclass
class Unresponsive:
    """Peers that recently failed a request, skipped by walks until their time is up."""

    until: dict[ID, float] = field(default_factory=dict)
    for_s: float = UNRESPONSIVE_FOR_S

    def mark(self, peer: ID, now: float) -> None:
        self.until[peer] = now + self.for_s

    def is_bad(self, peer: ID, now: float) -> bool:
        deadline = self.until.get(peer)
        if deadline is None:
            return False
        if deadline <= now:
            del self.until[peer]
            return False
        return True


@dataclass
class WalkResult(Generic[T]):
    answers: list[tuple[ID, T]]  # (peer, payload) in the order they came in
    closest: list[ID]  # the up to K closest peers that answered, nearest first
    failed: set[ID]


async def walk(
    net: P2P,
    key: bytes,
    query: PeerQuery[T],
    *,
    rpc_timeout: float,
    timeout: float,
    unresponsive: Unresponsive,
    k: int = K,
    alpha: int = ALPHA,
    enough: Callable[[list[tuple[ID, T]]], bool] | None = None,
) -> WalkResult[T]:
    """Walk towards ``key`` until the ``k`` closest live peers seen have all answered, or
    ``timeout`` seconds have passed, or ``enough(answers)`` holds (the caller has what it
    needs: the requests still in flight are cancelled): then it returns what it has."""
    local = net.peer_id
    # The keyspace of go-libp2p and py-libp2p: SHA-256 of the key and of the peer id bytes.
    target = hashlib.sha256(key).digest()

    def distance(peer: ID) -> int:
        return xor_distance(target, hashlib.sha256(peer.to_bytes()).digest())

    now = trio.current_time()
    seeds = net.closest_known(key, k)
    if len(seeds) < k:  # a young node: its connections are all it knows
        seeds += [p for p in net.connected_peers() if p not in seeds]
    candidates = {p: distance(p) for p in seeds
                  if p != local and not unresponsive.is_bad(p, now)}
    queried: set[ID] = set()
    responded: set[ID] = set()
    failed: set[ID] = set()
    answers: list[tuple[ID, T]] = []
    send, receive = trio.open_memory_channel[tuple[ID, bool, T | None, list[ID]]](
        float("inf"))

    async def ask(peer: ID) -> None:
        payload: T | None = None
        closer: list[ID] = []
        ok = False
        with trio.move_on_after(rpc_timeout):
            try:
                payload, closer = await query(peer)
                ok = True
            except Exception as exc:  # the peer's failure is data, not our crash
                log.debug("request to %s failed: %r", peer, exc)
        send.send_nowait((peer, ok, payload, closer))

    def next_peers() -> list[ID]:
        live = sorted((p for p in candidates if p not in failed), key=candidates.__getitem__)
        return [p for p in live[:k] if p not in queried]

    in_flight = 0
    # The nursery sits inside the deadline: on timeout the stragglers are cancelled and
    # the walk returns what it has (a partial answer beats none).
    with trio.move_on_after(timeout):
        async with trio.open_nursery() as nursery:

            def launch() -> None:
                nonlocal in_flight
                for peer in next_peers()[: max(0, alpha - in_flight)]:
                    queried.add(peer)
                    in_flight += 1
                    nursery.start_soon(ask, peer)

            launch()
            while in_flight:
                peer, ok, payload, closer = await receive.receive()
                in_flight -= 1
                if ok:
                    responded.add(peer)
                    if payload is not None:
                        answers.append((peer, payload))
                        if enough is not None and enough(answers):
                            nursery.cancel_scope.cancel()
                            break
                    now = trio.current_time()
                    for c in closer:
                        if c != local and c not in candidates and not unresponsive.is_bad(c, now):
                            candidates[c] = distance(c)
                else:
                    failed.add(peer)
                    unresponsive.mark(peer, trio.current_time())
                    net.drop_from_routing_table(peer)
                launch()
    closest = sorted(responded, key=candidates.__getitem__)[:k]
    return WalkResult(answers, closest, failed)


# -- one request to one peer: py-libp2p's private per-peer calls, kept here ----------------
# (tests/test_p2p_guards.py fails when their signatures change)


async def value_from_peer(dht: KadDHT, peer: ID, key: bytes) -> tuple[bytes | None, list[ID]]:
    """One GET_VALUE: ``peer``'s value for ``key`` if it holds one, and the closer peers it
    names."""
    value, closer = cast(Any, await dht.value_store._get_from_peer(
        peer, key, return_closer_peers=True))
    return (value if isinstance(value, bytes) else None), list(closer or [])


async def providers_from_peer(dht: KadDHT, peer: ID, key: bytes
                              ) -> tuple[list[PeerInfo], list[ID]]:
    """One GET_PROVIDERS: the providers ``peer`` knows for ``key``, and the closer peers."""
    providers, closer = await dht.provider_store._get_providers_from_peer_with_closers(peer, key)
    return list(providers), list(closer)
