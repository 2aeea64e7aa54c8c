"""Iterative Kademlia lookups that a dead, frozen or slow peer cannot stall.

py-libp2p's own lookups query peers in lock-step rounds and wait for every peer of a round,
each with a 10 s timeout: one frozen peer (TCP open, nothing answering, as after SIGSTOP)
costs every lookup that meets it 10 s per round. This walk keeps ``alpha`` requests in
flight at all times, gives each its own deadline, never waits for a straggler before
asking the next candidate (a request unanswered after ``hedge_after`` seconds gives up its
slot, and still counts if it answers later), and remembers peers that failed so later
walks ask them only when no one else is left. One walk serves GET_VALUE and
GET_PROVIDERS (and any other per-peer query a caller passes): each answer carries closer
peers, and the payload (a value, providers) is collected along the way. There is no
FIND_NODE request here: the routing table's refresh is py-libp2p's.

The per-peer requests are the standard ``/ipfs/kad/1.0.0`` messages (py-libp2p's protobuf
codec), sent here rather than through py-libp2p's per-peer calls, because those leave the
stream open when they are cancelled (see ``kad_request``).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import trio
from libp2p.abc import IHost, INetStream
from libp2p.custom_types import TProtocol
from libp2p.kad_dht.pb.kademlia_pb2 import Message
from libp2p.kad_dht.utils import maybe_consume_signed_record, xor_distance
from libp2p.network.stream.net_stream import NetStream
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo
from libp2p.protocol_muxer.multiselect_client import MULTISELECT_PROTOCOL_ID
from libp2p.utils.varint import (
    encode_delim,
    encode_varint_prefixed,
    read_varint_prefixed_bytes_limited,
)
from multiaddr import Multiaddr

from node.p2p.api import P2P, Unreachable

log = logging.getLogger(__name__)

T = TypeVar("T")
# One request to one peer: (payload or None, closer peers).
PeerQuery = Callable[[ID], Awaitable[tuple[T | None, list[ID]]]]

K = 20  # replication parameter of the network (libp2p Kademlia's k)
ALPHA = 3  # requests in flight per walk (libp2p Kademlia's alpha)
UNRESPONSIVE_FOR_S = 60.0  # the default of [discovery] unresponsive_for_s
HEDGE_AFTER_S = 0.5  # the default of [discovery] hedge_after_s
KAD_PROTOCOL = TProtocol("/ipfs/kad/1.0.0")
# Kademlia streams one peer may hold at another at once: a server resets inbound ones
# beyond (py-libp2p serves 12 in all: six peers, not one, are needed to hold them all),
# and a client waits for a free one of its own (concurrent walks, e.g. records_of's 16,
# ask the same few peers) rather than be reset and mark the peer.
KAD_STREAMS_PER_PEER = 2
MAX_ECHO_BYTES = 1024  # a multistream-select message: a protocol id and its newline
# The largest answer a request reads (py-libp2p reads up to 4 MiB): a hostile peer's
# answer costs a walk at most this much to read and parse.
KAD_MAX_ANSWER_BYTES = 256 << 10
CLOSER_ADDR_TTL_S = 600  # peerstore lifetime of the addresses in closerPeers (py-libp2p's)
# Resetting the stream of a failed or cancelled request: a walk that has its answers
# waits for these resets, so they are kept short; a reset that does not make it leaves the
# peer's handler waiting only until its idle timeout (node/p2p/host.py, _IdleBounded),
# and our own stream slot is released without it (_reset_or_release).
RESET_TIMEOUT_S = 0.25


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


# Never hedge sooner than this, whatever the measured round times: on loopback they are a
# millisecond, and a walk that hedged every request would double its load for nothing.
HEDGE_MIN_S = 0.05


@dataclass
class RoundTrips:
    """This node's DHT requests' round times, smoothed as TCP smooths its RTT (RFC 6298:
    ``srtt``, ``rttvar``; gains 1/8 and 1/4): a request still unanswered after ``srtt + 4
    * rttvar`` is late by what the node has measured, and is hedged then rather than
    after the fixed ``hedge_after_s``. At 50 ms links that fixed half second was most of
    a query's tail, a request to a peer that waited for a CPU (RESULTS.md, the 30-host
    DHT query). Only answered requests are samples: a timeout says nothing of how long an
    answer takes (Karn's rule)."""

    srtt: float | None = None
    rttvar: float = 0.0

    def observe(self, seconds: float) -> None:
        if self.srtt is None:
            self.srtt, self.rttvar = seconds, seconds / 2
            return
        self.rttvar = 0.75 * self.rttvar + 0.25 * abs(self.srtt - seconds)
        self.srtt = 0.875 * self.srtt + 0.125 * seconds

    def hedge_after(self, ceiling: float) -> float:
        """When to hedge a request: ``srtt + 4 * rttvar``, within ``[HEDGE_MIN_S,
        ceiling]`` (``ceiling`` alone until a request has been answered)."""
        if self.srtt is None:
            return ceiling
        return min(ceiling, max(HEDGE_MIN_S, self.srtt + 4 * self.rttvar))


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
    hedge_after: float = HEDGE_AFTER_S,
    round_trips: RoundTrips | None = None,
    enough: Callable[[list[tuple[ID, T]]], bool] | None = None,
    grace: float = math.inf,
) -> WalkResult[T]:
    """Walk towards ``key`` until the ``k`` closest live peers seen have all answered, or
    ``timeout`` seconds have passed, or ``enough(answers)`` holds (the caller has what it
    needs: the requests still in flight are cancelled), or ``grace`` seconds have passed
    since the first payload came in: then it returns what it has.

    A request still unanswered after ``hedge_after`` seconds stops counting against
    ``alpha`` (the next candidate is asked at once) but runs on to ``rpc_timeout``: one
    slow peer costs a walk ``hedge_after``, not ``rpc_timeout``. With ``round_trips``,
    the node's measured round times set that wait (``RoundTrips.hedge_after``, at most
    ``hedge_after``), and every answer is a sample of them. At most ``2 * alpha``
    requests of a walk are outstanding at once, hedged ones included. Peers marked unresponsive
    by earlier walks are asked only once no other candidate is left: under load every
    peer may miss a deadline now and then, and a walk that skipped them all found nothing
    (seen on a 30-host testnet at load average 28). Their requests keep the walk going
    only while no unmarked peer has answered: their answers count if they come before the
    other requests end, but a frozen marked peer does not cost a walk its rpc_timeout."""
    local = net.peer_id
    # The keyspace of go-libp2p and py-libp2p: SHA-256 of the key and of the peer id bytes.
    target = hashlib.sha256(key).digest()

    def distance(peer: ID) -> int:
        return xor_distance(target, hashlib.sha256(peer.to_bytes()).digest())

    began = now = trio.current_time()
    seeds = net.closest_known(key, k)
    if len(seeds) < k:  # a young node: its connections are all it knows
        seeds += [p for p in net.connected_peers() if p not in seeds]
    candidates = {p: distance(p) for p in seeds if p != local}
    shunned = {p for p in candidates if unresponsive.is_bad(p, now)}  # asked last
    queried: set[ID] = set()
    responded: set[ID] = set()
    failed: set[ID] = set()
    answers: list[tuple[ID, T]] = []
    send, receive = trio.open_memory_channel[tuple[ID, bool, bool, T | None, list[ID]]](
        float("inf"))

    async def ask(peer: ID) -> None:
        payload: T | None = None
        closer: list[ID] = []
        ok = False
        gone = True  # a timeout, or a failed dial
        with trio.move_on_after(rpc_timeout):
            try:
                payload, closer = await query(peer)
                ok, gone = True, False
            except Exception as exc:  # the peer's failure is data, not our crash
                log.debug("request to %s failed: %r", peer, exc)
                gone = isinstance(exc, Unreachable)
        send.send_nowait((peer, ok, gone, payload, closer))

    def next_peers() -> list[ID]:
        live = sorted((p for p in candidates if p not in failed), key=candidates.__getitem__)
        fresh = [p for p in live[:k] if p not in queried and p not in shunned]
        if fresh:
            return fresh
        return [p for p in live[:k] if p not in queried]  # no one else is left

    def waiting_for_anyone() -> bool:
        """A marked peer's request keeps the walk going only while no other peer has
        answered: a frozen peer marked by an earlier walk must not cost every walk without
        ``enough`` its rpc_timeout."""
        if pending - queried_marked:
            return True
        return bool(pending) and not responded - shunned

    pending: set[ID] = set()  # the peers of the requests not yet ended
    queried_marked: set[ID] = set()  # peers asked although marked unresponsive
    end_at = math.inf  # the first payload's time + grace
    fast: dict[ID, float] = {}  # requests that hold a slot of alpha: when each started
    started: dict[ID, float] = {}  # every request's start, for its round time

    def late_after() -> float:
        return hedge_after if round_trips is None else round_trips.hedge_after(hedge_after)

    # The nursery sits inside the deadline: on timeout the stragglers are cancelled and
    # the walk returns what it has (a partial answer beats none).
    with trio.move_on_after(timeout):
        async with trio.open_nursery() as nursery:

            def launch() -> None:
                # Hedged requests run on, but at most 2 * alpha in all: slow peers
                # everywhere must not turn one walk into a burst of requests.
                room = min(alpha - len(fast), 2 * alpha - len(pending))
                for peer in next_peers()[: max(0, room)]:
                    queried.add(peer)
                    if peer in shunned:
                        queried_marked.add(peer)
                    pending.add(peer)
                    fast[peer] = started[peer] = trio.current_time()
                    nursery.start_soon(ask, peer)

            launch()
            while waiting_for_anyone():
                hedge_at = min(fast.values(), default=math.inf) + late_after()
                with trio.move_on_at(min(hedge_at, end_at)):
                    peer, ok, gone, payload, closer = await receive.receive()
                    pending.discard(peer)
                    fast.pop(peer, None)
                    if ok:
                        responded.add(peer)
                        if round_trips is not None:
                            round_trips.observe(trio.current_time() - started[peer])
                        if payload is not None:
                            answers.append((peer, payload))
                            end_at = min(end_at, trio.current_time() + grace)
                            if enough is not None and enough(answers):
                                nursery.cancel_scope.cancel()
                                break
                        now = trio.current_time()
                        for c in closer:
                            if c != local and c not in candidates:
                                candidates[c] = distance(c)
                                if unresponsive.is_bad(c, now):
                                    shunned.add(c)
                    else:
                        failed.add(peer)
                        unresponsive.mark(peer, trio.current_time())
                        # A reset (the peer at its stream limit) or an "na" comes from a
                        # peer still there: marked, but kept in the routing table.
                        if gone:
                            net.drop_from_routing_table(peer)
                now = trio.current_time()
                if now >= end_at:
                    nursery.cancel_scope.cancel()
                    break
                late = late_after()
                for slow in [p for p, at in fast.items() if at + late <= now]:
                    del fast[slow]  # still running, no longer holding a slot
                launch()
            nursery.cancel_scope.cancel()  # marked peers still silent: not waited for
    closest = sorted(responded, key=candidates.__getitem__)[:k]
    log.debug("walk for %s: %.3f s, %d asked (%d shunned at the start), %d answered, "
              "%d failed, %d payloads", key.hex()[:16], trio.current_time() - began,
              len(queried), len(shunned), len(responded), len(failed), len(answers))
    return WalkResult(answers, closest, failed)


# -- one request to one peer ----------------------------------------------------------------


_outbound: weakref.WeakKeyDictionary[IHost, dict[ID, trio.Semaphore]] = (
    weakref.WeakKeyDictionary())


@contextlib.asynccontextmanager
async def _stream_slot(host: IHost, peer: ID) -> AsyncIterator[None]:
    """One of the KAD_STREAMS_PER_PEER request streams this host may have open to
    ``peer`` (the caller's deadline bounds the wait)."""
    slots = _outbound.setdefault(host, {})
    semaphore = slots.setdefault(peer, trio.Semaphore(KAD_STREAMS_PER_PEER))
    try:
        async with semaphore:
            yield
    finally:
        if (semaphore.value == KAD_STREAMS_PER_PEER
                and not semaphore.statistics().tasks_waiting):
            slots.pop(peer, None)  # none held, none waited for


async def kad_request(host: IHost, peer: ID, request: Message) -> Message:
    """One Kademlia request, on at most KAD_STREAMS_PER_PEER streams to ``peer`` at once
    (see ``_kad_request``)."""
    async with _stream_slot(host, peer):
        return await _kad_request(host, peer, request)


async def _kad_request(host: IHost, peer: ID, request: Message) -> Message:
    """One Kademlia request on a stream of its own: the answer. The stream is closed after
    the answer; a request that fails or is cancelled (a walk's deadline, or a walk that
    has enough) resets it. py-libp2p's own per-peer calls close the stream in a
    ``finally`` that a cancellation skips: the answering peer's handler then waited for a
    next request forever, holding one of its 12 inbound Kademlia slots, and once all 12
    were held it refused every request (seen on a 12-host testnet: within a minute most
    peers answered GET_VALUE with nothing, and a query had to walk most of the network).

    The protocol is chosen without a round trip of its own: the multistream-select
    handshake, the protocol and the request go out in one write, and the two echoes are
    read before the answer (go-libp2p's lazy negotiation). A listener reads them in order
    as it would from a client that waits; a request costs one round trip, not two. A
    peer that refuses the protocol reads the request as a malformed proposal and drops
    the stream."""
    try:
        stream = await host.get_network().new_stream(peer)
    except Exception as exc:  # no connection, and the dial failed
        raise Unreachable(f"no stream to {peer}: {exc!r}") from exc
    try:
        data = request.SerializeToString()
        await stream.write(encode_delim(MULTISELECT_PROTOCOL_ID.encode())
                           + encode_delim(KAD_PROTOCOL.encode())
                           + encode_varint_prefixed(data))
        for expected in (MULTISELECT_PROTOCOL_ID, KAD_PROTOCOL):
            # Bounded: the library's read_delim takes any length the peer announces.
            echo = await read_varint_prefixed_bytes_limited(stream, MAX_ECHO_BYTES)
            if echo != expected.encode() + b"\n":
                raise ValueError(f"{peer} answered {echo.rstrip()!r} to {expected}")
        stream.set_protocol(KAD_PROTOCOL)
        answer = Message()
        answer.ParseFromString(
            await read_varint_prefixed_bytes_limited(stream, KAD_MAX_ANSWER_BYTES))
        if answer.type != request.type:
            raise ValueError(f"a {answer.type} answer to a {request.type} request")
    except BaseException:
        await _reset_or_release(stream)
        raise
    # The request is answered: a slow FIN (its frame queued on a busy connection) or a
    # deadline that comes now must not fail it. The close is shielded and bounded, and
    # one that does not make it is a reset (or, cut too, the bookkeeping alone).
    with trio.CancelScope(shield=True):
        closed = False
        with trio.move_on_after(RESET_TIMEOUT_S), contextlib.suppress(Exception):
            await stream.close()
            closed = True
        if not closed:
            await _reset_or_release(stream)
    return answer


async def _reset_or_release(stream: INetStream) -> None:
    """Reset ``stream``, waiting at most RESET_TIMEOUT_S. A reset cut off there (its frame
    queued behind bulk data on a busy connection) never reached NetStream.remove(), so the
    swarm's stream semaphore and the resource manager's slot stayed held until the
    connection closed: the bookkeeping part alone is done then. It touches no socket, and
    the swarm releases those exactly once per stream."""
    with trio.CancelScope(shield=True):
        with trio.move_on_after(RESET_TIMEOUT_S) as cut, contextlib.suppress(Exception):
            await stream.reset()
        if cut.cancelled_caught and isinstance(stream, NetStream):
            # The releases come before the notifees are told; those are bounded too.
            with trio.move_on_after(RESET_TIMEOUT_S), contextlib.suppress(Exception):
                await stream.remove()
            # py-libp2p's yamux marks the stream closed in a finally but gives back its
            # slot of the connection's 256 (open_stream's backlog) after it: a cut
            # reset skipped that, and the slot stayed taken until the connection closed.
            muxed = stream.muxed_stream
            finalize = getattr(getattr(muxed, "conn", None), "_finalize_stream", None)
            if finalize is not None:
                with trio.move_on_after(RESET_TIMEOUT_S), contextlib.suppress(Exception):
                    await finalize(muxed, fully_closed=True)


def _closer_peers(host: IHost, answer: Message) -> list[ID]:
    """The first K closer peers an answer names (not this node); their addresses go to
    the peerstore, so that the walk can dial them. The rest are not looked at: an honest
    peer names at most K."""
    closer: list[ID] = []
    for entry in answer.closerPeers[:K]:
        try:
            peer = ID(entry.id)
            addrs = [Multiaddr(a) for a in entry.addrs]
        except Exception:  # a malformed entry: skipped, the others still count
            continue
        if peer == host.get_id():
            continue
        closer.append(peer)
        if addrs:
            host.get_peerstore().add_addrs(peer, addrs, CLOSER_ADDR_TTL_S)
    return closer


async def value_from_peer(host: IHost, peer: ID, key: bytes) -> tuple[bytes | None, list[ID]]:
    """One GET_VALUE: ``peer``'s value for ``key`` if it holds one, and the closer peers it
    names. Raises when the request fails (the walk marks the peer)."""
    request = Message(type=Message.MessageType.GET_VALUE, key=key)
    answer = await kad_request(host, peer, request)
    value = answer.record.value if answer.HasField("record") else b""
    return (bytes(value) if value else None), _closer_peers(host, answer)


async def providers_from_peer(host: IHost, peer: ID, key: bytes, limit: int
                              ) -> tuple[list[PeerInfo], list[ID]]:
    """One GET_PROVIDERS: the first ``limit`` providers ``peer`` knows for ``key``, and
    the closer peers. A provider entry whose signed peer record does not verify is
    skipped, as py-libp2p does; entries past ``limit`` are not looked at (each costs a
    signature check)."""
    request = Message(type=Message.MessageType.GET_PROVIDERS, key=key)
    answer = await kad_request(host, peer, request)
    providers: list[PeerInfo] = []
    for entry in answer.providerPeers:
        if len(providers) >= limit:
            break
        try:
            if not maybe_consume_signed_record(entry, host):
                continue
            addrs = []
            for a in entry.addrs:
                with contextlib.suppress(Exception):
                    addrs.append(Multiaddr(a))
            providers.append(PeerInfo(ID(entry.id), addrs))
        except Exception:  # a malformed entry: skipped, the others still count
            continue
    return providers, _closer_peers(host, answer)
