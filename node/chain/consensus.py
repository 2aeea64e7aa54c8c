"""The consensus driver of a validator: one ``protocol.consensus.Machine`` per height.

This module carries the machine's messages (direct validator streams and the consensus
topic), owns its timers (node/drive.py), asks the ledger whether a proposed block is
valid, and writes the machine's resume point before anything it signed leaves, so a
validator that crashes and restarts signs nothing twice (specs/consensus.md, "What the
node does").
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence

import trio
from nacl.signing import SigningKey

from node.chain.links import ValidatorLinks
from node.chain.network import publish
from node.chain.state import ChainState, Validated
from node.config import ChainSection
from node.drive import Timers, drive
from node.p2p import P2P, PeerId
from protocol.chainwire import CONSENSUS_FRAME_OVERHEAD, ConsensusFrame
from protocol.consensus import (
    Broadcast,
    Decide,
    Evidence,
    Machine,
    Resume,
    SetTimeout,
    message_height,
)
from protocol.errors import RemoteProtocolError
from protocol.genesis import Genesis
from protocol.ledger import Block, block_id
from protocol.txs import votes_payload

log = logging.getLogger(__name__)

MAX_CLOCK_DRIFT_MS = 10_000  # a block's time may be this far ahead of this node's clock
RESUME_KEY = "consensus_resume"  # kv: the validator's write-ahead point (Resume)

# (kind, data, sender): sender None for messages this node kept for a later height.
Message = tuple[str, bytes, PeerId | None]


def proposal_limit(genesis: Genesis) -> int:
    """The largest proposal message of a chain: its largest block, and the signed
    wrapping around it."""
    return genesis.max_block_bytes + 1024


def frame_limit(genesis: Genesis) -> int:
    """The largest consensus frame of a chain (topic and validator streams)."""
    return proposal_limit(genesis) + CONSENSUS_FRAME_OVERHEAD


def claimed_height(data: bytes, genesis: Genesis) -> int | None:
    """The height a consensus message of this chain claims (unchecked: the machine of
    that height checks it; verifying here too would hash every megabyte proposal twice)."""
    got = message_height(data, proposal_limit(genesis))
    return got[1] if got is not None and got[0] == genesis.chain_id else None


class Consensus:
    def __init__(self, state: ChainState, net: P2P, key: SigningKey, topic: str, *,
                 peer_id: str, links: ValidatorLinks | None,
                 submit: Callable[[str, bytes], Awaitable[bytes]],
                 behind: Callable[[PeerId], None], tunables: ChainSection) -> None:
        """``submit`` sends a tx of this node's (evidence); ``behind`` starts a block
        sync from a peer that is ahead."""
        self.state = state
        self.net = net
        self.key = key
        self.topic = topic
        self.peer_id = peer_id
        self.links = links
        self.submit = submit
        self.behind = behind
        self.tunables = tunables
        self.machine: Machine | None = None
        self.evidence_seen: set[tuple[str, str]] = set()
        self._validated: dict[bytes, Validated] = {}  # by block id, this height
        self._future: list[tuple[str, bytes]] = []  # messages of the next height
        self._timers: Timers[tuple[str, int, int]] = Timers()
        self._inbox_send, self._inbox = trio.open_memory_channel[Message](tunables.inbox)
        self._resume: Resume | None = None  # as last written to storage

    def deliver(self, kind: str, data: bytes, sender: PeerId | None) -> None:
        """A consensus message from the network; dropped when the inbox is full (the
        sender rebroadcasts)."""
        try:
            self._inbox_send.send_nowait((kind, data, sender))
        except trio.WouldBlock:
            log.debug("consensus inbox full; a %s dropped", kind)

    async def run(self) -> None:
        saved = await self.state.storage.kv_get(RESUME_KEY)
        self._resume = Resume.decode(saved) if isinstance(saved, bytes) else None
        while True:
            height = self.state.ledger.height + 1
            await self._wait_to_start(height)
            if self.state.ledger.height + 1 == height:  # else caught up through sync
                await self._run_height(height)

    async def _run_height(self, height: int) -> None:
        state = self.state
        saved = self._resume
        machine = Machine(state.genesis.chain_id, state.powers, self.key, height,
                          state.genesis.timeouts, valid_block=self._valid_block,
                          make_block=self._make_block,
                          max_proposal_bytes=proposal_limit(state.genesis),
                          resume=saved if saved is not None and saved.height == height else None)
        self.machine, self._validated, self._timers = machine, {}, Timers()
        await self.act(machine.start(state.clock_ms()))
        future, self._future = self._future, []
        for kind, data in future:
            await self._feed(kind, data, None)

        async def on_item(item: Message) -> None:
            await self._feed(*item)

        async def on_wake(now: int, ticked: bool) -> None:
            if ticked:  # once a second also on gossip: a stream that took a vote may
                await self.act(machine.rebroadcast(), gossip=True)  # lose it, unseen
            for step, h, r in self._timers.due(now):
                await self.act(machine.on_timeout(step, h, r, now))

        await drive(self._inbox, clock_ms=state.clock_ms, deadline_ms=self._timers.next_ms,
                    tick_s=self.tunables.rebroadcast_s, on_item=on_item, on_wake=on_wake,
                    done=lambda: machine.decided is not None or state.ledger.height >= height)
        self.machine = None

    async def _wait_to_start(self, height: int) -> None:
        """The pause between heights: the block interval, and with nothing to put in a
        block up to ``empty_block_s`` more. A message of this height from another validator
        (it started already) ends the wait, as does a block arriving through sync."""
        deadline = trio.current_time() + self.tunables.empty_block_s
        await self._sleep_unless_called(self.state.genesis.block_interval_ms / 1000, height)
        if (len(self.state.mempool) == 0 and not self._future
                and self.state.ledger.height + 1 == height):
            await self._sleep_unless_called(deadline - trio.current_time(), height,
                                            until=self.state.mempool.arrived)

    async def _sleep_unless_called(self, seconds: float, height: int,
                                   until: trio.Event | None = None) -> None:
        async with trio.open_nursery() as nursery:
            if until is not None:  # e.g. a first tx in the mempool: a block to make
                async def wake() -> None:
                    await until.wait()
                    nursery.cancel_scope.cancel()
                nursery.start_soon(wake)
            await self._take_messages(seconds, height)
            nursery.cancel_scope.cancel()

    async def _take_messages(self, seconds: float, height: int) -> None:
        with trio.move_on_after(seconds):
            while True:
                kind, data, sender = await self._inbox.receive()
                if claimed_height(data, self.state.genesis) == height:
                    self._future.append((kind, data))
                    return
                await self._feed(kind, data, sender)

    async def _feed(self, kind: str, data: bytes, sender: PeerId | None) -> None:
        """One consensus message to the machine of its height, kept for the next height,
        or taken as a sign that this node is behind."""
        height = claimed_height(data, self.state.genesis)
        machine = self.machine
        ledger_height = self.state.ledger.height
        if height is None or height <= ledger_height:
            return
        if machine is None or height > machine.height:
            # The next height's messages wait for its machine. A message two heights on
            # means its sender decided a block this node has not: this node missed that
            # block's precommits, and the others no longer repeat them, so it syncs.
            room = len(self._future) < self.tunables.max_future_messages
            if height <= ledger_height + 2 and room:
                self._future.append((kind, data))
            if height > ledger_height + 1 and sender is not None:
                self.behind(sender)
            return
        try:
            now = self.state.clock_ms()
            actions = (machine.on_proposal(data, now) if kind == "proposal"
                       else machine.on_vote(data, now))
        except RemoteProtocolError as exc:
            log.debug("%s refused: %s", kind, exc)
            return
        await self.act(actions)

    async def act(self, actions: Sequence[object], *, gossip: bool = False) -> None:
        """Carry out the machine's actions (tests' misbehaving validators extend this).
        Votes go on gossip too when ``gossip`` or when no direct stream is open to some
        validator."""
        for a in actions:
            if isinstance(a, Broadcast):
                await self._save_resume()
                message = ConsensusFrame(a.kind, a.data).encode()
                direct = self.links is not None and self.links.broadcast(message)
                if a.kind == "vote" and (gossip or not direct):  # small: gossip reaches
                    await publish(self.net, self.topic, message)  # what streams do not
            elif isinstance(a, SetTimeout):
                self._timers.set(a.at_ms, (a.step, a.height, a.round))
            elif isinstance(a, Decide):
                await self.state.commit(a.block, a.commit.encode(),
                                        self._validated.get(a.block_id))
            elif isinstance(a, Evidence):
                await self._report(a)

    async def _save_resume(self) -> None:
        """Write the machine's resume point before a message it signed leaves: a
        validator that crashes and restarts at this height then signs nothing in the
        rounds it already signed in, and keeps its lock (protocol.consensus.Resume)."""
        if self.machine is None:
            return
        point = self.machine.resume_point()
        if point != self._resume:
            await self.state.storage.kv_set(RESUME_KEY, point.encode())
            self._resume = point

    async def _report(self, ev: Evidence) -> None:
        if (ev.validator, ev.kind) in self.evidence_seen or ev.kind != "double-vote":
            return
        self.evidence_seen.add((ev.validator, ev.kind))
        log.warning("validator %s signed two votes in one round; reporting it", ev.validator)
        try:
            await self.submit("double-vote", votes_payload(ev.a, ev.b))
        except RemoteProtocolError as exc:
            log.info("evidence against %s not submitted: %s", ev.validator, exc)

    def _make_block(self, round_: int) -> bytes:
        state = self.state
        now = state.clock_ms()
        block, refused = state.ledger.build_block(
            state.mempool.candidates(), time_ms=max(now, state.ledger.last_time_ms + 1),
            proposer=self.peer_id, max_bytes=state.genesis.max_block_bytes)
        for tx_id in state.mempool.refused(refused, now):
            log.debug("tx %s dropped from the mempool", tx_id.hex()[:16])
        return block.encode()

    def _valid_block(self, data: bytes) -> bool:
        """Whether the proposed ``data`` is the next block on this node's ledger: decodes,
        follows the last block, not from the future, every tx applies, the root matches."""
        bid = block_id(data)
        if bid in self._validated:
            return True
        state = self.state
        try:
            block = Block.decode(data, state.genesis.max_block_bytes)
            if block.time_ms > state.clock_ms() + MAX_CLOCK_DRIFT_MS:
                raise RemoteProtocolError("future", f"block time {block.time_ms} is ahead")
            self._validated[bid] = state.validate(block)
        except RemoteProtocolError as exc:
            log.info("proposed block refused: %s", exc)
            return False
        return True
