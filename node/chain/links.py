"""Validator streams: each validator keeps a direct ``/iollm/consensus/1.0.0`` stream to
every other validator of its genesis, and a connection to each (specs/consensus.md,
"Validator streams").

Gossipsub alone was not enough: under a load of transactions its per-peer queues drop
messages, proposals of a megabyte among them, and a round lost that way costs its
timeouts. A stream from anyone who is not a validator is reset before a byte is read.

The txs a validator admits go to the others on a second stream of the same protocol (its
own queue and flow-control window, so a batch of txs never holds up a proposal or a
vote): three copies of each batch instead of gossip's nine (a publish to three peers, two
forwards by each), for the same checks on arrival.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from node.chain.network import CONSENSUS_PROTOCOL, open_to
from node.config import ChainSection
from node.discovery.service import Discovery
from node.p2p import P2P, PeerId, PeerInfo
from node.p2p.framing import FrameReader, reset_quietly, write_frame
from node.p2p.host import parse_multiaddr
from protocol.chainwire import STREAM_KINDS, TXS_KIND, ConsensusFrame

log = logging.getLogger(__name__)

# Where a received message goes: (kind, data, the validator that sent it).
Deliver = Callable[[str, bytes, PeerId], None]
# Where a received tx batch goes (data, the validator that sent it); the stream is not
# read again until it returns, which holds back a sender faster than the checks.
TakeTxs = Callable[[bytes, PeerId], Awaitable[None]]


class ValidatorLinks:
    def __init__(self, net: P2P, discovery: Discovery, powers: dict[str, int], *,
                 peer_id: str, max_frame: int, deliver: Deliver, take_txs: TakeTxs,
                 tunables: ChainSection) -> None:
        self.net = net
        self.tunables = tunables
        self.discovery = discovery
        self.powers = powers
        self.peer_id = peer_id
        self.max_frame = max_frame
        self.deliver = deliver
        self.take_txs = take_txs
        self._queues: dict[str, trio.MemorySendChannel[bytes]] = {}
        self._open: set[str] = set()  # validators with a stream open to them now
        self._tx_queues: dict[str, trio.MemorySendChannel[bytes]] = {}
        self._tx_open: set[str] = set()  # the same for the txs' streams

    async def run(self) -> None:
        self.net.serve(CONSENSUS_PROTOCOL, self._serve, self.max_frame)
        async with trio.open_nursery() as nursery:
            for pid in self.powers:
                if pid != self.peer_id:
                    for queues, is_open, size in (
                            (self._queues, self._open, self.tunables.direct_queue),
                            (self._tx_queues, self._tx_open, self.tunables.direct_tx_queue)):
                        send, recv = trio.open_memory_channel[bytes](size)
                        queues[pid] = send
                        nursery.start_soon(self._send, PeerId.from_base58(pid), recv, is_open)
            nursery.start_soon(self._connect)

    def broadcast(self, message: bytes) -> bool:
        """Queue an encoded ConsensusFrame for every other validator; a validator whose
        queue is full (its stream stuck) misses it and catches up by block sync. True
        when every other validator's open stream took it: a gossip copy would then only
        cost each node the message a second time, and a third from each forwarder."""
        return self._queue_all(self._queues, self._open, message)

    def send_txs(self, batch: bytes) -> bool:
        """Queue an encoded tx batch for every other validator on its txs stream; True
        when every one's open stream took it. Else the caller gossips the batch (a
        validator that took it both ways checks each tx once: checks are cached)."""
        return self._queue_all(self._tx_queues, self._tx_open,
                               ConsensusFrame(TXS_KIND, batch).encode())

    def _queue_all(self, queues: dict[str, trio.MemorySendChannel[bytes]], is_open: set[str],
                   message: bytes) -> bool:
        reached = 0
        for pid, send in queues.items():
            try:
                send.send_nowait(message)
            except trio.WouldBlock:
                continue
            reached += pid in is_open
        return reached == len(self.powers) - 1

    async def _send(self, peer: PeerId, queue: trio.MemoryReceiveChannel[bytes],
                    is_open: set[str]) -> None:
        while True:
            message = await queue.receive()
            stream = None
            try:
                stream = await open_to(self.net, self.discovery, peer, CONSENSUS_PROTOCOL,
                                       self.tunables.open_timeout_s)
                is_open.add(peer.to_base58())
                while True:
                    await write_frame(stream, message, self.tunables.direct_write_timeout_s)
                    got: list[bytes] = []
                    # The receiver resets a stream idle for direct_idle_timeout_s, unseen
                    # by a writer that waits here, whose next message would then be lost
                    # on it (the txs' stream idles whenever no txs come): end it first,
                    # and open a fresh one for the next message.
                    with trio.move_on_after(self.tunables.direct_idle_timeout_s / 2):
                        got.append(await queue.receive())
                    if not got:
                        break
                    message = got[0]
                is_open.discard(peer.to_base58())
                await reset_quietly(stream)
            except Exception as exc:  # gone, stalled, or not reachable: try again later
                log.debug("consensus stream to %s: %r", peer, exc)
                is_open.discard(peer.to_base58())
                if stream is not None:
                    await reset_quietly(stream)
                await trio.sleep(self.tunables.direct_retry_s)

    async def _serve(self, stream: Any) -> None:
        sender = self.net.remote_peer(stream)
        if sender.to_base58() not in self.powers:
            log.debug("consensus stream from %s refused: not a validator", sender)
            await reset_quietly(stream)
            return
        # One read takes all the muxer holds: a frame read piece by piece costs a read
        # (two locks and a yamux window update, which the sender must decrypt and
        # handle) per piece, and these streams carry a tx batch or a proposal a block.
        reader = FrameReader(stream)
        try:
            while True:
                frame = ConsensusFrame.decode(
                    await reader.read_frame(self.max_frame,
                                            self.tunables.direct_idle_timeout_s,
                                            body_timeout=self.frame_body_deadline),
                    self.max_frame, STREAM_KINDS)
                if frame.kind == TXS_KIND:
                    await self.take_txs(frame.data, sender)
                else:
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
