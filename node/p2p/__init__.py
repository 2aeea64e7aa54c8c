"""Everything that touches py-libp2p: the host (TCP + Noise + Yamux, the Kademlia DHT,
gossipsub), the library patches (AtomicYamux, the auto-connector, the pubsub clean-up; wire.py:
yamux frames that fit one Noise message, a signed peer record once per peer),
the stream guard that every inbound stream passes, length-prefixed framing with deadlines,
the DHT walk over the library's private per-peer requests, and NAT traversal (nat.py:
relay v2, AutoNAT, DCUtR).

Owns: the libp2p objects and every call into the library's internals. May import:
libp2p, protocol/, and nothing else of node/. No other package imports libp2p
(tests/test_layout.py): the services take the names they need from here, and program
against ``P2P`` (api.py: streams, gossip, the DHT, peers; ``PeerGone`` when a peer went
away), never the library objects behind ``Network`` (a test fails on ``net.host``,
``net.pubsub``, ``net.dht``). Each patch has a guard test that fails when the library
changes under it.
"""

from libp2p.custom_types import TProtocol as ProtocolId
from libp2p.host.exceptions import StreamFailure
from libp2p.network.exceptions import SwarmException
from libp2p.peer.id import ID as PeerId
from libp2p.peer.peerinfo import PeerInfo
from libp2p.records.validator import Validator as RecordValidator

from node.p2p.api import (
    P2P,
    GossipMessage,
    GossipValidator,
    PeerGone,
    Stream,
    Subscription,
    Unreachable,
)
from node.p2p.host import Network, open_network
from node.p2p.nat import NatOptions

# What a stream may raise when its peer went away (Network.open_stream turns the library's
# errors into PeerGone; a stream already open may still raise the library's own): worth
# one more dial, not the peer's fault.
OPEN_STREAM_ERRORS: tuple[type[Exception], ...] = (PeerGone, SwarmException, StreamFailure)

__all__ = ["OPEN_STREAM_ERRORS", "P2P", "GossipMessage", "GossipValidator", "NatOptions",
           "Network", "PeerGone", "PeerId", "PeerInfo", "ProtocolId", "RecordValidator",
           "Stream", "Subscription", "Unreachable", "open_network"]
