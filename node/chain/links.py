"""Validator streams: each validator keeps a direct ``/iollm/consensus/1.0.0`` stream to
every other validator of its genesis, and a connection to each (specs/consensus.md,
"Validator streams").

Gossipsub alone was not enough: under a load of transactions its per-peer queues drop
messages, proposals of a megabyte among them, and a round lost that way costs its
timeouts. A stream from anyone who is not a validator is reset before a byte is read.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import trio

from node.chain.network import CONSENSUS_PROTOCOL, open_to
from node.config import ChainSection
from node.discovery.service import Discovery
from node.p2p import P2P, PeerId, PeerInfo
from node.p2p.framing import read_frame, reset_quietly, write_frame
from node.p2p.host import parse_multiaddr
from protocol.chainwire import ConsensusFrame

log = logging.getLogger(__name__)

# Where a received message goes: (kind, data, the validator that sent it).
Deliver = Callable[[str, bytes, PeerId], None]


class ValidatorLinks:
    def __init__(self, net: P2P, discovery: Discovery, powers: dict[str, int], *,
                 peer_id: str, max_frame: int, deliver: Deliver,
                 tunables: ChainSection) -> None:
        self.net = net
        self.tunables = tunables
        self.discovery = discovery
        self.powers = powers
        self.peer_id = peer_id
        self.max_frame = max_frame
        self.deliver = deliver
        self._queues: dict[str, trio.MemorySendChannel[bytes]] = {}
        self._open: set[str] = set()  # validators with a stream open to them now

    async def run(self) -> None:
        self.net.serve(CONSENSUS_PROTOCOL, self._serve, self.max_frame)
        async with trio.open_nursery() as nursery:
            for pid in self.powers:
                if pid != self.peer_id:
                    send, recv = trio.open_memory_channel[bytes](self.tunables.direct_queue)
                    self._queues[pid] = send
                    nursery.start_soon(self._send, PeerId.from_base58(pid), recv)
            nursery.start_soon(self._connect)

    def broadcast(self, message: bytes) -> bool:
        """Queue an encoded ConsensusFrame for every other validator; a validator whose
        queue is full (its stream stuck) misses it and catches up by block sync. True
        when every other validator's open stream took it: a gossip copy would then only
        cost each node the message a second time, and a third from each forwarder."""
        reached = 0
        for pid, send in self._queues.items():
            try:
                send.send_nowait(message)
            except trio.WouldBlock:
                continue
            reached += pid in self._open
        return reached == len(self.powers) - 1

    async def _send(self, peer: PeerId, queue: trio.MemoryReceiveChannel[bytes]) -> None:
        while True:
            message = await queue.receive()
            stream = None
            try:
                stream = await open_to(self.net, self.discovery, peer, CONSENSUS_PROTOCOL,
                                       self.tunables.open_timeout_s)
                self._open.add(peer.to_base58())
                while True:
                    await write_frame(stream, message, self.tunables.direct_write_timeout_s)
                    message = await queue.receive()
            except Exception as exc:  # gone, stalled, or not reachable: try again later
                log.debug("consensus stream to %s: %r", peer, exc)
                self._open.discard(peer.to_base58())
                if stream is not None:
                    await reset_quietly(stream)
                await trio.sleep(self.tunables.direct_retry_s)

    async def _serve(self, stream: Any) -> None:
        sender = self.net.remote_peer(stream)
        if sender.to_base58() not in self.powers:
            log.debug("consensus stream from %s refused: not a validator", sender)
            await reset_quietly(stream)
            return
        try:
            while True:
                frame = ConsensusFrame.decode(
                    await read_frame(stream, self.max_frame,
                                     self.tunables.direct_idle_timeout_s,
                                     body_timeout=self.frame_body_deadline),
                    self.max_frame)
                self.deliver(frame.kind, frame.data, sender)
        except Exception as exc:  # closed, idle, or garbage: the stream goes
            log.debug("consensus stream ended: %r", exc)
            await reset_quietly(stream)

    async def _connect(self) -> None:
        """Keep a connection to every other validator whose address discovery knows, so
        the consensus topic's mesh holds them all."""
        while True:
            connected = set(self.net.connected_peers())
            for pid in self.powers:
                peer = PeerId.from_base58(pid)
                if pid == self.peer_id or peer in connected:
                    continue
                cap = self.discovery.local_record(pid)
                if cap is None:
                    continue
                try:
                    await self.net.connect(
                        PeerInfo(peer, [parse_multiaddr(a) for a in cap.record.addrs]))
                except Exception as exc:  # down, or not reachable yet: next time
                    log.debug("dialling validator %s: %r", pid, exc)
            await trio.sleep(self.tunables.connect_every_s)

    def frame_body_deadline(self, length: int) -> float:
        """A consensus frame of ``length`` bytes begun must be complete by then: a partial
        frame is held in memory until it is."""
        t = self.tunables
        return t.frame_body_base_s + length / t.frame_body_min_bytes_per_s
