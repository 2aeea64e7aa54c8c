"""The typed surface of node/p2p that the services program against.

``P2P`` is every call a service makes on the network: streams, gossip, the DHT (values,
providers, the per-peer requests of the lookup walk, the routing table) and the peer
set. node/p2p/host.py's ``Network`` is the libp2p implementation; tests/memnet.py is an
in-memory one that runs many nodes on trio's MockClock. No py-libp2p object is part of
it except the identity types ``PeerId`` and ``PeerInfo``, which are plain values (bytes,
addresses). tests/test_layout.py fails when a module outside node/p2p reaches into the
library objects behind it (``.host``, ``.pubsub``, ``.dht``).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from libp2p.peer.id import ID as PeerId
from libp2p.peer.peerinfo import PeerInfo
from multiaddr import Multiaddr


class PeerGone(ConnectionError):
    """The peer went away: not connected, its connection closed, or the stream reset
    under us. Worth another try later, not the peer's fault."""


class Unreachable(PeerGone):
    """No stream could be opened to the peer at all (no connection, and the dial failed):
    unlike a reset or a refusal on a live connection, a sign that the peer is gone."""


@dataclass(frozen=True)
class GossipMessage:
    """One message of a gossip topic: its payload and its author (the signer; None when
    the message carries no author, which strict signing refuses before delivery)."""

    data: bytes
    from_peer: PeerId | None


# Runs before a message is delivered or relayed; False drops it (and counts against the
# forwarder). Arguments: the peer that forwarded it, the message.
GossipValidator = Callable[[PeerId, GossipMessage], bool]


class Subscription(Protocol):
    async def get(self) -> GossipMessage:
        """The next message that passed the topic's validator."""
        ...


class Stream(Protocol):
    """A bidirectional byte stream to one peer (node/p2p/framing.py frames it).

    ``read`` may return fewer bytes than asked and raises at the end of the stream or
    when it was reset; ``close`` ends this side's writes; ``reset`` drops both sides."""

    async def read(self, n: int | None = None) -> bytes: ...

    async def write(self, data: bytes) -> None: ...

    async def close(self) -> None: ...

    async def reset(self) -> None: ...

    def get_protocol(self) -> Any:
        """The protocol id negotiated for this stream."""
        ...


StreamHandler = Callable[[Any], Awaitable[None]]


class P2P(Protocol):
    """Everything the services ask of the network (node/p2p/host.py: ``Network``)."""

    @property
    def peer_id(self) -> PeerId: ...

    # -- streams ---------------------------------------------------------------------

    def serve(self, protocol: str, handler: StreamHandler, max_frame_bytes: int) -> None: ...

    async def open_stream(self, peer: PeerId, protocol: str | Sequence[str]) -> Any: ...

    def remote_peer(self, stream: Any) -> PeerId:
        """The peer at the other end of ``stream``."""
        ...

    # -- peers -----------------------------------------------------------------------

    async def connect(self, info: PeerInfo, timeout: float = 5.0) -> None: ...

    def connected_peers(self) -> list[PeerId]: ...

    def add_addrs(self, peer: PeerId, addrs: Sequence[Multiaddr], ttl_s: float) -> None:
        """Remember addresses of ``peer`` for later dials, for ``ttl_s`` seconds."""
        ...

    def speaks(self, peer: PeerId, protocol: str) -> bool | None: ...

    def listen_addrs(self) -> list[str]: ...

    async def wait_addrs_changed(self) -> None: ...

    def protocols(self) -> list[str]: ...

    def banned_peers(self) -> list[str]: ...

    async def announce_protocols(self, timeout: float = 5.0) -> None: ...

    # -- gossip ----------------------------------------------------------------------

    async def publish(self, topic: str, data: bytes) -> None: ...

    async def subscribe(self, topic: str, validator: GossipValidator) -> Subscription:
        """Join ``topic``; ``validator`` judges each message before it is delivered here
        or relayed to others."""
        ...

    def reject_gossip(self, topic: str, reason: str) -> bool: ...

    # -- DHT -------------------------------------------------------------------------

    async def put_value(self, key: str, value: bytes) -> None: ...

    async def provide(self, key: str) -> bool: ...

    async def provide_slot(self) -> None: ...

    def store_value(self, key: bytes, value: bytes, expires_s: float) -> None:
        """Put a verified value in the local DHT store, served until ``expires_s``
        (wall-clock seconds)."""
        ...

    def local_value(self, key: bytes) -> bytes | None: ...

    def local_providers(self, key: bytes) -> list[PeerInfo]: ...

    async def value_from_peer(self, peer: PeerId, key: bytes
                              ) -> tuple[bytes | None, list[PeerId]]:
        """One GET_VALUE to ``peer``: its value for ``key`` if any, and closer peers."""
        ...

    async def providers_from_peer(self, peer: PeerId, key: bytes, limit: int
                                  ) -> tuple[list[PeerInfo], list[PeerId]]:
        """One GET_PROVIDERS to ``peer``: the first ``limit`` providers it knows, and
        closer peers."""
        ...

    def closest_known(self, key: bytes, count: int) -> list[PeerId]:
        """The routing table's ``count`` peers closest to ``key``."""
        ...

    def in_routing_table(self, peer: PeerId) -> bool: ...

    async def add_to_routing_table(self, peer: PeerId) -> None: ...

    def drop_from_routing_table(self, peer: PeerId) -> None: ...

    async def refresh_routing_table(self) -> None: ...

    def routing_table_size(self) -> int: ...


__all__ = ["P2P", "GossipMessage", "GossipValidator", "PeerGone", "PeerId", "PeerInfo",
           "Stream", "StreamHandler", "Subscription", "Unreachable"]
