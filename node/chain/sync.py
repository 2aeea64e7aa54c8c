"""Heads and catch-up (specs/consensus.md, "Block sync").

Validators announce their head on the head topic (the proposer of each block when it is
final here; any validator every ``head_every_s`` when no head as high was heard since);
a node that learns of a higher
height (a head, or a consensus message two heights on) asks that peer for blocks on
``/iollm/blocks/1.0.0`` and takes each only after its commit certificate verifies and
the ledger re-derives its state root. So a node that joins late, or a validator that was
down, catches up from anyone without trusting them. A validator takes a head only one
block ahead as a sign it is behind only if it still lacks that block ``head_every_s``
later: its own consensus is usually deciding that very block, and a sync then moves the
block a second time for nothing.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import trio

from node.chain.network import BLOCKS_PROTOCOL, open_to, publish
from node.chain.state import ChainState
from node.config import ChainSection
from node.discovery.service import Discovery
from node.p2p import P2P, PeerId
from node.p2p.framing import FrameError, read_frame, reset_quietly, write_frame
from protocol.chainwire import (
    BLOCK_FRAME_OVERHEAD,
    MAX_SYNC_REQUEST_BYTES,
    BlockFrame,
    Head,
    SyncRequest,
    check_head_gossip,
)
from protocol.consensus import verify_commit
from protocol.errors import RemoteProtocolError
from protocol.ledger import Block, block_id

log = logging.getLogger(__name__)

# With no head as high as this node's heard for this many head_every_s periods, a
# validator announces its own even if nothing changed.
HEAD_QUIET_PERIODS = 10



class BlockSync:
    def __init__(self, state: ChainState, net: P2P, discovery: Discovery, topic: str,
                 *, max_proposal_bytes: int, tunables: ChainSection) -> None:
        self.state = state
        self.tunables = tunables
        self.net = net
        self.discovery = discovery
        self.topic = topic
        self.max_frame = max_proposal_bytes + BLOCK_FRAME_OVERHEAD
        self._lock = trio.Lock()
        self._nursery: trio.Nursery | None = None
        self._validator = False
        self._waiting_for: int | None = None  # the height a one-ahead head is given time
        self._heard = 0  # the highest head of this chain sent or heard
        self._heard_at = -math.inf  # when one at least as high as this node's ledger was

    async def run(self, subscription: Any, *, announce: bool,
                  task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Serve blocks, follow others' heads, and (``announce``: validators) announce
        this node's own every ``head_every_s`` and at every final block it proposed."""
        self.net.serve(BLOCKS_PROTOCOL, self._serve, MAX_SYNC_REQUEST_BYTES)
        self._validator = announce
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._receive_heads, subscription)
            if announce:
                nursery.start_soon(self._announce)
            task_status.started()

    def check_gossip(self, data: bytes) -> None:
        """The relay check of the head topic."""
        check_head_gossip(data, self.state.genesis.chain_id)

    def behind(self, peer: Any) -> None:
        """``peer`` has blocks this node lacks: take them, unless a sync runs already."""
        if self._lock.locked() or self._nursery is None:
            return
        pid = (peer if isinstance(peer, PeerId) else PeerId(peer) if isinstance(peer, bytes)
               else None)
        if pid is None or pid == self.net.peer_id:
            return
        self._nursery.start_soon(self._sync_from, pid)

    def _head(self) -> bytes:
        return Head(self.state.genesis.chain_id, self.state.ledger.height).encode()

    async def _announce(self) -> None:
        """The other validators decide each block themselves: one head per block (its
        proposer's) tells followers at once, and four would cost every node four. The
        periodic head (every ``head_every_s``) repairs a lost one, so it is sent only
        when no head as high as this node's was heard since (suppression as in Trickle,
        RFC 6206), or none at all for HEAD_QUIET_PERIODS periods (a node that joins a
        chain making no blocks still learns its height): four validators each sending
        one every 2 s cost each of 30 nodes a dozen gossip messages a second, most of
        an idle node's CPU (bench/RESULTS.md)."""
        me = self.net.peer_id.to_base58()
        every = self.tunables.head_every_s
        last = trio.current_time()
        while True:
            with trio.move_on_at(last + every):
                await self.state.new_block.wait()
            now = trio.current_time()
            height = self.state.ledger.height
            own = self.state.last_proposer == me and height > self._heard
            lost = height > self._heard or now - self._heard_at >= HEAD_QUIET_PERIODS * every
            if own or (now - last >= every and lost):
                await publish(self.net, self.topic, self._head())
                self._hear(height)
            if own or now - last >= every:
                last = now

    def _hear(self, height: int) -> None:
        """A head at ``height`` went out or came in."""
        if height >= self.state.ledger.height:
            self._heard_at = trio.current_time()
        self._heard = max(self._heard, height)

    async def _receive_heads(self, subscription: Any) -> None:
        while True:
            message = await subscription.get()
            try:
                head = Head.decode(message.data)
            except RemoteProtocolError:
                continue
            if head.chain_id != self.state.genesis.chain_id:
                continue
            # Only a validator's head suppresses ours, and only up to our own ledger: a
            # height nobody here has verified (any peer may sign a head) must not silence
            # the validators' heads, on which followers depend.
            author = message.from_peer
            if author is not None and author.to_base58() in self.state.powers:
                self._hear(min(head.height, self.state.ledger.height))
            if head.height <= self.state.ledger.height:
                continue
            if self._validator and head.height == self.state.ledger.height + 1:
                self._behind_unless_decided(message.from_peer, head.height)
            else:
                self.behind(message.from_peer)

    def _behind_unless_decided(self, peer: Any, height: int) -> None:
        """Sync from ``peer`` if block ``height`` is still not final here after
        ``head_every_s`` (one such wait at a time)."""
        if self._nursery is None or self._waiting_for is not None:
            return
        self._waiting_for = height

        async def wait() -> None:
            try:
                if not await self.state.wait_height(height, self.tunables.head_every_s):
                    self.behind(peer)
            finally:
                self._waiting_for = None

        self._nursery.start_soon(wait)

    async def _sync_from(self, peer: PeerId) -> None:
        """Take blocks from ``peer`` until it has no more: each one only after its
        certificate verifies and the ledger applies it to the same state root."""
        if self._lock.locked():
            return
        async with self._lock:
            try:
                # Until a batch brings nothing new: a peer may cap its answers below our
                # request (each node's [chain] sync_batch is its own).
                while await self._sync_batch(peer):
                    pass
            except (FrameError, RemoteProtocolError, OSError, trio.TooSlowError) as exc:
                log.info("catching up from %s stopped: %s", peer, exc)
            except Exception as exc:  # a dial that fails in the library's own ways
                log.info("catching up from %s failed: %r", peer, exc)

    async def _sync_batch(self, peer: PeerId) -> int:
        state = self.state
        timeout = self.tunables.sync_timeout_s
        stream = await open_to(self.net, self.discovery, peer, BLOCKS_PROTOCOL,
                               self.tunables.open_timeout_s)
        try:
            start = state.ledger.height + 1
            request = SyncRequest(start, self.tunables.sync_batch)
            await write_frame(stream, request.encode(), timeout)
            got = 0
            while True:
                frame = await read_frame(stream, self.max_frame, timeout)
                if not frame:
                    break
                pair = BlockFrame.decode(frame, self.max_frame)
                data, commit = pair.block, pair.commit
                block = Block.decode(data, state.genesis.max_block_bytes)
                if block.height <= state.ledger.height:
                    continue  # consensus finished it here meanwhile
                if block.height != state.ledger.height + 1:
                    raise RemoteProtocolError("gap", f"block {block.height} after "
                                                     f"{state.ledger.height}")
                verify_commit(state.genesis.chain_id, state.powers, block.height,
                              block_id(data), commit)
                await state.commit(data, commit, None)
                got += 1
            await stream.close()
            return got
        except BaseException:
            await reset_quietly(stream)
            raise

    async def _serve(self, stream: Any) -> None:
        timeout = self.tunables.sync_timeout_s
        try:
            req = SyncRequest.decode(await read_frame(stream, MAX_SYNC_REQUEST_BYTES, timeout))
            for _, data, commit in await self.state.storage.get_blocks(
                    req.start, min(req.limit, self.tunables.sync_batch)):
                await write_frame(stream, BlockFrame(data, commit).encode(), timeout)
            await write_frame(stream, b"", timeout)
            await stream.close()
        except Exception as exc:  # a peer that vanished, stalled or sent garbage
            log.debug("serving blocks ended: %r", exc)
            await reset_quietly(stream)
