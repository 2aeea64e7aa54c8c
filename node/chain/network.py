"""The chain's network surface (specs/consensus.md, "Network"): its gossip topics, one set
per chain (the chain id appended: nodes of another genesis on the same network are in
other meshes and drop none of this chain's traffic), their relay checks, best-effort
publishing, and dialling a peer for a stream of ours."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import trio

from node.discovery.service import Discovery
from node.p2p import P2P, GossipMessage, PeerId, PeerInfo, ProtocolId
from node.p2p.host import parse_multiaddr
from protocol.errors import RemoteProtocolError

log = logging.getLogger(__name__)

TX_TOPIC = "/iollm/txs/1/"
CONSENSUS_TOPIC = "/iollm/consensus/1/"
HEAD_TOPIC = "/iollm/chain/1/"
BLOCKS_PROTOCOL = ProtocolId("/iollm/blocks/1.0.0")
CONSENSUS_PROTOCOL = ProtocolId("/iollm/consensus/1.0.0")  # validator to validator, direct


@dataclass(frozen=True)
class ChainTopics:
    txs: str
    consensus: str
    heads: str


def chain_topics(chain_id: str) -> ChainTopics:
    return ChainTopics(TX_TOPIC + chain_id, CONSENSUS_TOPIC + chain_id, HEAD_TOPIC + chain_id)


async def publish(net: P2P, topic: str, data: bytes) -> None:
    """Gossip ``data`` on ``topic``, best effort: every sender of chain traffic repeats
    it (txs from the outbox, votes by rebroadcast, heads every few seconds)."""
    try:
        await net.publish(topic, data)
    except Exception as exc:
        log.debug("publishing on %s failed: %r", topic, exc)


def topic_validator(net: P2P, topic: str, check: Callable[[bytes], object]
                    ) -> Callable[[PeerId, GossipMessage], bool]:
    """A gossipsub topic validator (run before a message is relayed) from a check that
    raises RemoteProtocolError."""

    def validate(_forwarder: PeerId, message: GossipMessage) -> bool:
        try:
            check(message.data)
        except RemoteProtocolError as exc:
            return net.reject_gossip(topic, exc.reason)
        return True

    return validate


async def open_to(net: P2P, discovery: Discovery, peer: PeerId, protocol: ProtocolId,
                  timeout: float) -> Any:
    """A stream to ``peer``, dialled first at the addresses of its capability record
    when it is not connected."""
    if peer not in net.connected_peers():
        cap = discovery.local_record(peer.to_base58())
        addrs = [parse_multiaddr(a) for a in cap.record.addrs] if cap else []
        await net.connect(PeerInfo(peer, addrs), timeout=timeout)
    with trio.fail_after(timeout):
        return await net.open_stream(peer, protocol)
