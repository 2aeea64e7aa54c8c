"""Building the libp2p host, DHT and gossipsub exactly as shared/notes/libp2p-0.8.1.md says.

TCP + Noise + Yamux only (the library's defaults also offer plaintext, secio, TLS and
mplex), one connection per peer (otherwise every dial waits a fixed 250 ms), the Kademlia
DHT in server mode, gossipsub with a 1 s heartbeat and the burst limits lifted.

The services get the ``Network`` this module builds; nothing here decides anything about
records, that is protocol/'s job.
"""

from __future__ import annotations

import contextlib
import logging
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, cast

import libp2p.kad_dht.kad_dht as kad_dht_module
import multiaddr
import psutil
import trio
import varint
from libp2p import new_host
from libp2p.crypto.ed25519 import Ed25519PrivateKey
from libp2p.crypto.keys import KeyPair
from libp2p.crypto.x25519 import create_new_key_pair as create_x25519_key_pair
from libp2p.custom_types import TProtocol
from libp2p.host.basic_host import BasicHost
from libp2p.host.exceptions import StreamFailure
from libp2p.identity.identify_push.identify_push import push_identify_to_peers
from libp2p.kad_dht.kad_dht import DHTMode, KadDHT
from libp2p.kad_dht.pb.kademlia_pb2 import Message as KadMessage
from libp2p.network.config import ConnectionConfig
from libp2p.network.connection.exceptions import RawConnError
from libp2p.network.exceptions import SwarmException
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo, info_from_p2p_addr
from libp2p.pubsub.gossipsub import PROTOCOL_ID_V11
from libp2p.pubsub.pubsub import Pubsub
from libp2p.pubsub.score import ScoreParams, TopicScoreParams
from libp2p.rcmgr import ResourceLimits, ResourceManager
from libp2p.records.validator import Validator
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.stream_muxer import muxer_multistream
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_PROTOCOL_ID
from libp2p.stream_muxer.yamux.yamux import Yamux
from libp2p.tools.anyio_service import background_trio_service
from nacl.signing import SigningKey
from prometheus_client import CollectorRegistry, Counter

import node.p2p.wire  # first: its patches apply before any host is built
from node.p2p.api import GossipMessage, GossipValidator, PeerGone
from node.p2p.gossip import SpecGossipSub
from node.p2p.guard import StreamGuard
from node.p2p.lookup import KAD_STREAMS_PER_PEER, providers_from_peer, value_from_peer
from node.p2p.nat import NatOptions, NatService
from node.p2p.options import P2POptions
from protocol.penalty import PenaltyPolicy

log = logging.getLogger(__name__)

KAD_PROTOCOL_ID = TProtocol("/ipfs/kad/1.0.0")
IOLLM_PREFIX = "/iollm/"  # every protocol of ours
# py-libp2p accepts at most 10 ADD_PROVIDER from one sender per 10 s window and silently
# drops (and resets) the rest: every provide of a node, of any service, starts at least
# this long after the previous one.
PROVIDE_SPACING_S = 1.1
HEARTBEAT_S = 1  # gossipsub heartbeat (py-libp2p default 120 s; go-libp2p 1 s)
# py-libp2p's gossipsub queues every message it publishes or forwards for each connected
# peer not (yet) subscribed to the topic, in case the peer's subscription is still on its
# way, for 30 s and up to 100 messages a peer; each message first rebuilds every such
# queue to drop the expired. For peers that never join a topic (followers and the
# consensus topic) the queues stayed full, each message paid for them all, and a warning
# was logged per message once a queue passed 100. The race it covers lasts about a round
# trip after a connection opens, and gossip is repeated anyway.
PENDING_GOSSIP_TTL_S = 2.0
# Gossipsub peer scoring, invalid messages only (P4; the other terms stay at py-libp2p's
# zero weights, and IP colocation must stay off: testnets run on one address). Each
# message a topic validator refuses costs its forwarder one point on that topic, decaying
# by INVALID_DECAY a heartbeat (half-life about 23 s). At GRAYLIST_SCORE the forwarder is
# graylisted on the topic: its messages there are dropped before any check, it is not
# grafted into the topic's mesh or sent gossip, until its count decays. An honest node
# never forwards what fails a check (it validates before relaying).
# py-libp2p's resource manager: its connection cap and per-peer dial rate limit serve as
# they are. Its circuit breaker (every connection refused for 60 s after 5 failed
# acquisitions) and graceful degradation (limits cut by up to half when reached, so they
# move under load) are off; its stream cap, which queues streams on a semaphore rather
# than refusing them, sits at four times the stream guard's (node/p2p/guard.py:
# max_streams inbound at once, refused unread and counted beyond). Both caps are
# P2POptions (node/p2p/options.py).
# The largest Kademlia request a peer may send us: py-libp2p reads requests up to 4 MiB,
# and each open Kademlia stream may hold one half-sent (node/p2p/guard.py counts a
# stream's frame cap against its peer's buffer budget). Our records are at most 8 KiB
# (protocol/capability.py); go-libp2p's largest, IPNS records, a few KiB. The patch
# reaches the request handler only (KadDHT._do_handle_stream reads the module name); the
# answers our own lookups read keep the library's limit.
KAD_MAX_REQUEST_BYTES = 64 << 10
kad_dht_module.MAX_DHT_MESSAGE_SIZE = KAD_MAX_REQUEST_BYTES
# How long an inbound Kademlia stream may wait for the peer's next request, and then for
# the whole of it from its first byte, before it is reset: go-libp2p's server waits a
# minute, but py-libp2p's serves only 12 streams at once (see _IdleBounded).
KAD_IDLE_TIMEOUT_S = 10.0
KAD_RESET_TIMEOUT_S = 1.0  # resetting a stream over that limit
INVALID_DECAY = 0.97
GRAYLIST_SCORE = -10.0
SCORE_PARAMS = ScoreParams(
    p4_invalid_messages=TopicScoreParams(weight=1.0, cap=1000.0, decay=INVALID_DECAY),
    publish_threshold=GRAYLIST_SCORE, gossip_threshold=GRAYLIST_SCORE,
    graylist_threshold=GRAYLIST_SCORE)
CLOSE_TIMEOUT_S = 2.0  # closing the connections at shutdown, before the services stop
# A peer that takes longer than this to take one yamux frame (at most 64 KiB) has its
# connection closed: a frame begun cannot be abandoned (AtomicYamux).
FRAME_WRITE_TIMEOUT_S = 10.0
# The library logs every normal stream EOF of the DHT as a warning.
logging.getLogger("libp2p.kad_dht").setLevel(logging.ERROR)
# py-libp2p, when imported, cuts its loggers off from the root (propagate False, no
# handler unless LIBP2P_DEBUG is set): its warnings then reached stderr through logging's
# last-resort handler, without timestamp, level or component. Through the root logger
# they get the node's own format and levels (node/cli/app.py sets them).
logging.getLogger("libp2p").propagate = True


class AtomicYamux(Yamux):
    """Yamux whose frames are written whole, or the connection is closed.

    py-libp2p's frame write can be cancelled half-way: a task cancelled (by a timeout, or
    a fetch that ended) while its frame was being encrypted and sent left the Noise
    session's nonce advanced or the byte stream cut, and every later message on that
    connection failed authentication. One timed-out write on one stream broke gossip,
    the DHT and consensus with that peer (tests/test_host.py reproduces it). Here a frame
    write, once it holds the connection, is shielded from cancellation (the cancellation
    takes effect right after it); a peer that does not take the frame within
    FRAME_WRITE_TIMEOUT_S gets its connection closed instead.
    """

    async def _write_frame(self, data: bytes) -> None:
        async with self._write_lock:
            with trio.CancelScope(shield=True), trio.move_on_after(
                    FRAME_WRITE_TIMEOUT_S) as stalled:
                await self.secured_conn.write(data)
            if stalled.cancelled_caught:
                with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_TIMEOUT_S):
                    await self.secured_conn.close()
                # "connection closed": py-libp2p's callers treat that as a closed peer.
                raise RawConnError(f"connection closed: a frame write stalled for "
                                   f"{FRAME_WRITE_TIMEOUT_S:g} s")
        await trio.lowlevel.checkpoint()


# py-libp2p 0.8.1 builds every yamux connection from this module's name ``Yamux``
# (muxer_multistream.new_conn), whatever class muxer_opt maps the protocol to; the test
# that connections are AtomicYamux catches a version that changes this.
muxer_multistream.Yamux = AtomicYamux  # type: ignore[misc]


class BadMultiaddr(ValueError):
    """A multiaddr given by the user (config, --listen, --bootstrap) does not parse."""


class NotServed(Exception):
    """The peer's identify answer does not list the protocol asked for."""


class ListenError(OSError):
    """A listen address cannot be bound (in use, not local, no permission)."""


def check_listen_addrs(addrs: list[multiaddr.Multiaddr]) -> None:
    """Bind-test each listen address before handing it to py-libp2p, which logs a bind
    failure and carries on listening on nothing."""
    for addr in addrs:
        family = socket.AF_INET6 if "ip6" in [p.name for p in addr.protocols()] else socket.AF_INET
        host = addr.value_for_protocol("ip6" if family == socket.AF_INET6 else "ip4")
        port = int(addr.value_for_protocol("tcp"))
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((host, port))
            except OSError as exc:
                raise ListenError(exc.errno, f"cannot listen on {addr}: {exc.strerror}") from None


def parse_multiaddr(text: str, *, need_peer_id: bool = False) -> multiaddr.Multiaddr:
    try:
        addr = multiaddr.Multiaddr(text)
    except Exception as exc:  # the library raises several unrelated types
        raise BadMultiaddr(f"bad multiaddr {text!r}: {exc}") from None
    protocols = [p.name for p in addr.protocols()]
    if "tcp" not in protocols:
        raise BadMultiaddr(f"bad multiaddr {text!r}: only /ip4|ip6/.../tcp/... is supported")
    if need_peer_id and "p2p" not in protocols:
        raise BadMultiaddr(f"bad multiaddr {text!r}: a bootstrap address needs /p2p/<peer id>")
    return addr


def interface_addresses(family: int) -> list[str]:
    """This machine's addresses of one family, loopback last (psutil reads the OS table)."""
    found = [a.address.split("%")[0] for addrs in psutil.net_if_addrs().values() for a in addrs
             if a.family == family and not a.address.startswith("fe80")]
    return sorted(set(found), key=lambda ip: (ip.startswith("127.") or ip == "::1", ip))


def expand_unspecified(addrs: list[multiaddr.Multiaddr]) -> list[multiaddr.Multiaddr]:
    """Replace a wildcard listen address (0.0.0.0, ::) by the machine's real addresses.

    Peers cannot dial 0.0.0.0; without this a node listening on all interfaces would
    advertise only that, in its capability record and its DHT provider records."""
    out: list[multiaddr.Multiaddr] = []
    for addr in addrs:
        text = str(addr)
        for wildcard, proto, family in (("/ip4/0.0.0.0/", "ip4", socket.AF_INET),
                                        ("/ip6/::/", "ip6", socket.AF_INET6)):
            if text.startswith(wildcard):
                out += [multiaddr.Multiaddr(text.replace(wildcard, f"/{proto}/{ip}/", 1))
                        for ip in interface_addresses(family)]
                break
        else:
            out.append(addr)
    return out


def peer_info_from_multiaddr(text: str) -> PeerInfo:
    return info_from_p2p_addr(parse_multiaddr(text, need_peer_id=True))


def libp2p_key_pair(signing_key: SigningKey) -> KeyPair:
    """The node's one Ed25519 key, as py-libp2p wants it (same key, same peer id)."""
    private = Ed25519PrivateKey.from_bytes(bytes(signing_key))
    return KeyPair(private, private.get_public_key())


class _NoAddProviderEcho:
    """Stream wrapper that swallows py-libp2p's reply to ADD_PROVIDER.

    The Kademlia spec defines no answer to ADD_PROVIDER; go-libp2p-kad-dht reuses the
    stream and reads such an answer as the reply to its next request (shared notes,
    interop). py-libp2p's handler writes the varint length and the message in two writes,
    so the length is held back until the message shows what it is.
    """

    def __init__(self, stream: Any) -> None:
        self._stream = stream
        self._held: bytes | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)

    async def write(self, data: bytes) -> None:
        if self._held is None:
            try:
                length = varint.decode_bytes(data)
            except Exception:
                length = -1
            if length >= 0 and len(data) == len(varint.encode(length)):
                self._held = data
                return
            await self._stream.write(data)
            return
        held, self._held = self._held, None
        message = KadMessage()
        try:
            message.ParseFromString(data)
            is_add_provider = message.type == KadMessage.MessageType.ADD_PROVIDER
        except Exception:
            is_add_provider = False
        if is_add_provider:
            answered = getattr(self._stream, "answered", None)
            if answered is not None:  # _IdleBounded: the request is done all the same
                answered()
            return
        await self._stream.write(held + data)


class GuardedPubsub(Pubsub):
    """Pubsub that forgets a peer whose stream failed in any way.

    py-libp2p 0.8.1's ``Pubsub.stream_handler`` cleans up (resets the stream, drops the
    peer's subscriptions and mesh links) only for StreamError, ParseError and
    IncompleteReadError; a frame that is not an RPC protobuf raises ``DecodeError``,
    which it lets through with the peer half-registered. Here every failure gets the
    library's own clean-up, then goes on to the stream guard, which resets the stream,
    logs and counts it (tests/test_stream_guard.py fails if the library's handler
    changes what it catches)."""

    guard: StreamGuard  # set by open_network before the service starts

    async def stream_handler(self, stream: Any) -> None:
        try:
            await super().stream_handler(stream)
        except Exception:
            self._handle_dead_peer(stream.muxed_conn.peer_id)
            raise

    async def push_msg(self, msg_forwarder: ID, msg: Any) -> None:
        """The library checks each received message in a task of pubsub's own service
        (``push_msg``); an error there (a ``key`` that is no public key raised DecodeError)
        ended the service and the node. A received message's failure is the forwarder's
        strike; our own publish still raises to its caller."""
        try:
            await super().push_msg(msg_forwarder, msg)
        except Exception as exc:
            if msg_forwarder == self.my_id:
                raise
            self.guard.failed(msg_forwarder, "pubsub:push_msg", exc)


class _IdleBounded:
    """Stream wrapper that bounds how long a peer may hold an inbound Kademlia stream
    without sending a request: the wait for a request's first byte, and then the whole
    request from that byte on until it is answered, each at most KAD_IDLE_TIMEOUT_S
    (TooSlowError; the handler resets a stream whose read fails).

    py-libp2p's Kademlia handler serves requests on a stream until the peer closes it,
    with no deadline between requests, and serves at most 12 streams at once (it resets
    any beyond). A client that never closes (py-libp2p's own, when its request is
    cancelled; go-libp2p, which keeps streams for reuse) held a slot for as long as the
    connection lived: 12 of them and the node answered no DHT request at all. A deadline
    per read was not enough: a peer sending one byte every 9 s held its slot for good."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream
        self._request_deadline: float | None = None  # set by a request's first byte

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)

    async def read(self, n: int | None = None) -> bytes:
        if self._request_deadline is None:
            with trio.fail_after(KAD_IDLE_TIMEOUT_S):
                data = cast(bytes, await self._stream.read(n))
            if data:
                self._request_deadline = trio.current_time() + KAD_IDLE_TIMEOUT_S
            return data
        with trio.fail_at(self._request_deadline):
            return cast(bytes, await self._stream.read(n))

    def answered(self) -> None:
        """The request was read whole and answered (or its answer withheld): the next
        request's deadline starts with its own first byte."""
        self._request_deadline = None

    async def write(self, data: bytes) -> None:
        self.answered()
        await self._stream.write(data)


class InteropKadDHT(KadDHT):
    """KadDHT whose server side never answers ADD_PROVIDER (see _NoAddProviderEcho), drops
    a stream that idles (see _IdleBounded), and serves at most KAD_STREAMS_PER_PEER
    inbound streams of one peer at once (it resets the others): py-libp2p serves 12 in
    all, and one peer could hold every one of them."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._inbound_of: dict[ID, int] = {}

    async def handle_stream(self, stream: Any) -> None:
        peer = stream.muxed_conn.peer_id
        held = self._inbound_of.get(peer, 0)
        if held >= KAD_STREAMS_PER_PEER:
            with trio.move_on_after(KAD_RESET_TIMEOUT_S), contextlib.suppress(Exception):
                await stream.reset()
            return
        self._inbound_of[peer] = held + 1
        try:
            # The wrappers are a stream in every way the handler uses (reads, writes, ids).
            await super().handle_stream(
                cast(Any, _NoAddProviderEcho(_IdleBounded(stream))))
        finally:
            left = self._inbound_of[peer] - 1
            if left:
                self._inbound_of[peer] = left
            else:
                del self._inbound_of[peer]


class _Subscription:
    """A pubsub subscription whose messages come out as GossipMessage."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    async def get(self) -> GossipMessage:
        return gossip_message(await self._inner.get())


def gossip_message(message: Any) -> GossipMessage:
    """py-libp2p's pubsub message (rpc_pb2.Message) as ours."""
    from_id = message.from_id
    return GossipMessage(bytes(message.data),
                         ID(from_id) if isinstance(from_id, bytes) and from_id else None)


@dataclass
class Network:
    """The running libp2p pieces of one node, behind node/p2p/api.py's ``P2P`` calls (the
    library objects are this package's business only: tests/test_layout.py)."""

    host: BasicHost
    dht: KadDHT
    pubsub: Pubsub
    gossipsub: SpecGossipSub
    guard: StreamGuard
    gossip_rejected: Counter
    nat: NatService
    _provide_lock: trio.Lock = field(default_factory=trio.Lock)
    _next_provide: float = 0.0

    def serve(self, protocol: str, handler: Callable[[Any], Awaitable[None]],
              max_frame_bytes: int) -> None:
        """Serve ``protocol`` with ``handler``, which reads frames of at most
        ``max_frame_bytes`` (what each inbound stream of it may hold: the guard counts it
        against the peer's buffer budget)."""
        self.host.set_stream_handler(TProtocol(str(protocol)), handler)
        self.guard.declare(str(protocol), max_frame_bytes)

    def remote_peer(self, stream: Any) -> ID:
        return cast(ID, stream.muxed_conn.peer_id)

    def connected_peers(self) -> list[ID]:
        return list(self.host.get_connected_peers())

    def add_addrs(self, peer: ID, addrs: Sequence[multiaddr.Multiaddr], ttl_s: float) -> None:
        self.host.get_peerstore().add_addrs(peer, list(addrs), int(ttl_s))

    def banned_peers(self) -> list[str]:
        return self.guard.banned()

    async def publish(self, topic: str, data: bytes) -> None:
        await self.pubsub.publish(topic, data)

    async def subscribe(self, topic: str, validator: GossipValidator) -> _Subscription:
        def validate(forwarder: ID, message: Any) -> bool:
            return validator(forwarder, gossip_message(message))

        self.pubsub.set_topic_validator(topic, validate, False)
        return _Subscription(await self.pubsub.subscribe(topic))

    async def put_value(self, key: str, value: bytes) -> None:
        try:
            await self.dht.put_value(key, value)
        finally:  # stored locally first: a put that fails or is cancelled later still
            self._no_republish(key.encode("utf-8"))  # left the mark

    async def provide(self, key: str) -> bool:
        return await self.dht.provide(key)

    def store_value(self, key: bytes, value: bytes, expires_s: float) -> None:
        self.dht.value_store.put(key, value, validity=expires_s)
        self._no_republish(key)

    def _no_republish(self, key: bytes) -> None:
        """py-libp2p marks every value put into its store, a copy of another node's record
        included, for republishing: at its next maintenance pass (every 600 s, the first
        at start) it looks up the closest peers of each and PUTs it to all of them; a
        30-node network holds 30 copies on each node: 900 lookups and up to 18,000 PUTs a
        pass.
        Records of ours are re-published by their owners (discovery's refresh)."""
        self.dht.value_store.local_keys.discard(key)

    def local_value(self, key: bytes) -> bytes | None:
        record = self.dht.value_store.get(key)
        return None if record is None else bytes(record.value)

    def local_providers(self, key: bytes) -> list[PeerInfo]:
        return list(self.dht.provider_store.get_providers(key))

    async def value_from_peer(self, peer: ID, key: bytes) -> tuple[bytes | None, list[ID]]:
        return await value_from_peer(self.host, peer, key)

    async def providers_from_peer(self, peer: ID, key: bytes, limit: int
                                  ) -> tuple[list[PeerInfo], list[ID]]:
        return await providers_from_peer(self.host, peer, key, limit)

    def closest_known(self, key: bytes, count: int) -> list[ID]:
        return list(self.dht.routing_table.find_local_closest_peers(key, count))

    def in_routing_table(self, peer: ID) -> bool:
        return bool(self.dht.routing_table.peer_in_table(peer))

    async def add_to_routing_table(self, peer: ID) -> None:
        await self.dht.add_peer(peer, skip_server_mode_check=True)

    def drop_from_routing_table(self, peer: ID) -> None:
        self.dht.routing_table.remove_peer(peer)

    async def refresh_routing_table(self) -> None:
        await self.dht.refresh_routing_table()

    def routing_table_size(self) -> int:
        return int(self.dht.get_routing_table_size())

    def reject_gossip(self, topic: str, reason: str) -> bool:
        """Count a gossip message a topic validator drops (it is not relayed); False, the
        validator's verdict, for ``return net.reject_gossip(...)``."""
        self.gossip_rejected.labels(topic=topic, reason=reason).inc()
        return False

    @property
    def peer_id(self) -> ID:
        return self.host.get_id()

    def listen_addrs(self) -> list[str]:
        """Full dialable addresses, ``/ip4/.../tcp/N/p2p/<id>``; for a node that is not
        reachable and holds relay slots, its relayed addresses
        ``.../p2p/<relay>/p2p-circuit/p2p/<id>`` instead (node/p2p/nat.py: the host's own
        list, which identify and the DHT's provider records carry too)."""
        pid = self.peer_id.to_base58()
        return [f"{a}/p2p/{pid}" if "/p2p/" not in str(a) else str(a)
                for a in self.host.get_addrs()]

    async def wait_addrs_changed(self) -> None:
        """Return when what ``listen_addrs`` says may have changed (reachability, relays)."""
        await self.nat.wait_changed()

    def protocols(self) -> list[str]:
        """Every protocol id this host serves (a handler is registered for it)."""
        return sorted(str(p) for p in self.host.get_mux().get_protocols() if p)

    async def provide_slot(self) -> None:
        """Wait for this node's next provide slot (PROVIDE_SPACING_S after the previous
        one started); the caller starts its provide at once."""
        async with self._provide_lock:
            wait = self._next_provide - trio.current_time()
            if wait > 0:
                await trio.sleep(wait)
            self._next_provide = trio.current_time() + PROVIDE_SPACING_S

    def _identified(self, peer: ID) -> list[str] | None:
        """The protocols ``peer`` listed in its identify answer; None until it has been
        identified (py-libp2p identifies each new connection in the background)."""
        try:
            protocols = self.host.get_peerstore().get_protocols(peer)
        except Exception:  # PeerStoreError: never seen
            return None
        return [str(p) for p in protocols] if protocols else None

    def speaks(self, peer: ID, protocol: str) -> bool | None:
        """Whether ``peer`` lists ``protocol`` in its identify answer; None until known."""
        protocols = self._identified(peer)
        return None if protocols is None else protocol in protocols

    async def open_stream(self, peer: ID, protocol: str | Sequence[str]) -> Any:
        """A new stream to ``peer`` on ``protocol`` (or the first of several the peer
        serves, in the order given: ``stream.get_protocol()`` says which). One of ours is
        not asked of a peer
        whose identify answer lists none of ours (NotServed, at once: it is not an iollm
        node, and py-libp2p would negotiate, fail and log a block of ERROR lines each
        time). A node is always asked: it may have identified before its services
        registered their protocols, and py-libp2p does not push the update."""
        protocols = [protocol] if isinstance(protocol, str) else list(protocol)
        if protocols[0].startswith(IOLLM_PREFIX) and self.is_iollm_node(peer) is False:
            raise NotServed(f"{peer} is not an iollm node (serves none of our protocols)")
        try:
            return await self.host.new_stream(peer, [TProtocol(p) for p in protocols])
        except (SwarmException, StreamFailure) as exc:
            # The connection went away or the negotiation failed on it (py-libp2p drops
            # one of two crossing dials): worth one more dial, not the peer's fault.
            raise PeerGone(f"no stream to {peer}: {exc}") from exc

    async def announce_protocols(self, timeout: float = 5.0) -> None:
        """Push our identify answer to the connected peers (identify/push): peers that
        identified this node before its services registered their protocols learn them."""
        with trio.move_on_after(timeout):
            try:
                await push_identify_to_peers(self.host)
            except Exception as exc:  # a peer gone meanwhile: it identifies us anew later
                log.debug("identify push failed: %r", exc)

    def is_iollm_node(self, peer: ID) -> bool | None:
        """Whether ``peer``'s identify answer lists any of our protocols; None until known."""
        protocols = self._identified(peer)
        return None if protocols is None else any(p.startswith(IOLLM_PREFIX) for p in protocols)

    async def connect(self, info: PeerInfo, timeout: float = 5.0) -> None:
        """Dial a peer and put it in the DHT routing table (not done by the library). A
        peer this node has banned is not dialed (NotServed): its connection would be
        closed at once."""
        if self.guard.is_banned(info.peer_id):
            raise NotServed(f"{info.peer_id} is banned for now")
        with trio.fail_after(timeout):
            await self.host.connect(info)
            await self.dht.add_peer(info.peer_id, skip_server_mode_check=True)


async def _no_auto_connect() -> None:
    return None


def _disable_auto_connector(host: BasicHost) -> None:
    """Turn off the swarm's AutoConnector.

    It dials every peer in the peerstore whenever the node has fewer than ~100
    connections (and again on every disconnect). On a small network that is a burst of
    simultaneous dials in both directions which, with one connection per peer, fail
    their muxer upgrade and stall DHT queries for their 30 s timeouts. The DHT dials the
    peers it needs; nothing else should.
    """
    host.get_network().auto_connector.maybe_connect = _no_auto_connect  # type: ignore[attr-defined]


@asynccontextmanager
async def open_network(
    signing_key: SigningKey,
    listen: list[multiaddr.Multiaddr],
    validators: dict[str, Validator],
    gossip_topics_validated: bool = True,
    registry: CollectorRegistry | None = None,
    penalties: PenaltyPolicy | None = None,
    nat: NatOptions | None = None,
    options: P2POptions | None = None,
) -> AsyncIterator[Network]:
    """Start host, DHT (server mode) and gossipsub; yield once all are listening.

    Every inbound stream runs under the stream guard (node/p2p/guard.py), whose
    counters go to ``registry``; ``penalties`` says when a failing peer is banned.
    ``nat``: relay, AutoNAT and DCUtR (node/p2p/nat.py); None, a node that takes itself
    for reachable and offers no relay (in-process test clusters on 127.0.0.1).
    ``options``: the limits of ``[p2p]`` in config.toml (node/p2p/options.py)."""
    options = options or P2POptions()
    key_pair = libp2p_key_pair(signing_key)
    noise_key = create_x25519_key_pair()

    host = new_host(
        key_pair=key_pair,
        sec_opt={
            TProtocol(NOISE_PROTOCOL_ID): NoiseTransport(
                key_pair, noise_privkey=noise_key.private_key
            )
        },
        muxer_opt={TProtocol(YAMUX_PROTOCOL_ID): AtomicYamux},
        listen_addrs=listen,
        connection_config=ConnectionConfig(max_connections_per_peer=1),
        addrs_factory=expand_unspecified,
        resource_manager=ResourceManager(
            ResourceLimits(max_connections=options.max_connections,
                           max_streams=4 * options.max_streams),
            enable_circuit_breaker=False, enable_graceful_degradation=False),
    )
    assert isinstance(host, BasicHost)
    host.multiselect_client = node.p2p.wire.OneTripMultiselectClient()
    _disable_auto_connector(host)
    registry = registry or CollectorRegistry()
    guard = StreamGuard(host, registry, penalties, limits=options)
    gossip_rejected = Counter("iollm_gossip_rejected",
                              "gossip messages dropped by a topic validator before relaying, "
                              "by topic and reason", ["topic", "reason"], registry=registry)
    guard.install()
    dht = InteropKadDHT(host, DHTMode.SERVER, enable_random_walk=False)
    for namespace, validator in validators.items():
        dht.register_validator(namespace, validator)
    gossipsub = SpecGossipSub(
        protocols=[PROTOCOL_ID_V11],
        degree=6,
        degree_low=4,
        degree_high=12,
        heartbeat_interval=HEARTBEAT_S,
        spam_protection_enabled=False,
        score_params=SCORE_PARAMS,
        pending_messages_ttl=PENDING_GOSSIP_TTL_S,
        eclipse_protection_enabled=False,  # node/p2p/gossip.py says why
    )
    pubsub = GuardedPubsub(host, gossipsub)
    pubsub.guard = guard
    guard.declare(str(KAD_PROTOCOL_ID), KAD_MAX_REQUEST_BYTES)
    guard.declare(str(PROTOCOL_ID_V11), pubsub.max_inbound_rpc_size)
    nat_service = NatService(host, nat or NatOptions(reachability="public"), registry)
    async with (
        host.run(listen_addrs=listen),
        background_trio_service(nat_service.relay),
        background_trio_service(nat_service.dcutr),
        background_trio_service(dht),
        background_trio_service(pubsub) as pubsub_manager,
        background_trio_service(gossipsub) as gossipsub_manager,
        # Innermost: cancelling it at the end must not cover the library's services, whose
        # exits turn an exception in flight into Cancelled (the scope would swallow it).
        trio.open_nursery() as guard_nursery,
    ):
        await guard_nursery.start(guard.run)
        guard.guard_tasks(pubsub_manager, "pubsub")
        guard.guard_tasks(gossipsub_manager, "gossipsub")
        await pubsub.wait_until_ready()
        if not host.get_addrs():
            raise ListenError(0, f"could not listen on any of {[str(a) for a in listen]}")
        await guard_nursery.start(nat_service.run)
        try:
            yield Network(host=host, dht=dht, pubsub=pubsub, gossipsub=gossipsub, guard=guard,
                          gossip_rejected=gossip_rejected, nat=nat_service)
        finally:
            # Close the connections while the services still run: the services stop in
            # reverse order before the host does, and a pubsub stream handler that read a
            # message after pubsub's nursery closed raised "Nursery is closed to new
            # arrivals" out of the daemon at shutdown. Swarm.close is idempotent.
            with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_TIMEOUT_S):
                await host.get_network().close()
            guard_nursery.cancel_scope.cancel()
