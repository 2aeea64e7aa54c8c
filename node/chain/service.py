"""The chain service: mempool, BFT rounds, final blocks and catch-up (specs/consensus.md,
"Network"; the rules themselves are protocol.consensus and protocol.ledger).

Every node that has a genesis runs it:

* **Transactions** travel in batches on gossip topic ``TX_TOPIC`` + chain id. Each is checked once
  per node (every signature: ``protocol.ledger.check_tx``, cached by tx id) and waits in
  the mempool until a final block holds it. A node keeps the txs it submitted itself in
  its ``outbox`` table and gossips them again until they are final, because gossip is
  best effort (shared/notes/libp2p-0.8.1.md) and a crash must not lose a receipt.
* **Validators** (peer ids in the genesis) run one ``protocol.consensus.Machine`` per
  height over gossip topic ``CONSENSUS_TOPIC`` + chain id; this module only carries its messages,
  owns its timers and asks the ledger whether a proposed block is valid.
* **Final blocks** are stored with their commit certificate. Validators announce their
  head on ``HEAD_TOPIC`` + chain id; a node that learns of a higher height asks that peer for the
  blocks on ``BLOCKS_PROTOCOL`` and takes each only after its certificate verifies and
  the ledger re-derives its state root. So a node that joins late, or a validator that was
  down, catches up from anyone without trusting them.
"""

from __future__ import annotations

import contextlib
import heapq
import logging
import os
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio
from nacl.signing import SigningKey

from node.discovery.service import Discovery
from node.p2p import PeerId, PeerInfo, ProtocolId
from node.p2p.framing import FrameError, read_frame, reset_quietly, write_frame
from node.p2p.host import Network, parse_multiaddr
from node.storage import Storage
from protocol.chainwire import (
    BLOCK_FRAME_OVERHEAD,
    CONSENSUS_FRAME_OVERHEAD,
    MAX_SYNC_REQUEST_BYTES,
    BlockFrame,
    ConsensusFrame,
    Head,
    SyncRequest,
    check_consensus_gossip,
    check_head_gossip,
    decode_tx_batch,
    encode_tx_batch,
    tx_batches,
)
from protocol.consensus import (
    Broadcast,
    Decide,
    Evidence,
    Machine,
    Resume,
    SetTimeout,
    message_height,
    verify_commit,
)
from protocol.errors import RemoteProtocolError
from protocol.genesis import Genesis, GenesisError, parse_genesis
from protocol.ledger import (
    Block,
    CheckedTx,
    Ledger,
    TxRefused,
    block_id,
    check_tx,
    encode_tx,
)
from protocol.ledger import (
    tx_id as ledger_tx_id,
)
from protocol.txs import votes_payload

log = logging.getLogger(__name__)

# Gossip topics, one set per chain (the chain id appended): nodes of another genesis on
# the same network are in other meshes, and drop nothing of this chain's traffic.
TX_TOPIC = "/iollm/txs/1/"
CONSENSUS_TOPIC = "/iollm/consensus/1/"
HEAD_TOPIC = "/iollm/chain/1/"


@dataclass(frozen=True)
class ChainTopics:
    txs: str
    consensus: str
    heads: str


def chain_topics(chain_id: str) -> ChainTopics:
    return ChainTopics(TX_TOPIC + chain_id, CONSENSUS_TOPIC + chain_id, HEAD_TOPIC + chain_id)
BLOCKS_PROTOCOL = ProtocolId("/iollm/blocks/1.0.0")
CONSENSUS_PROTOCOL = ProtocolId("/iollm/consensus/1.0.0")  # validator to validator, direct

TX_BATCH_BYTES = 256 * 1024  # one gossip message of txs (gossipsub's cap is 1 MiB)
TX_FLUSH_S = 0.05  # submitted txs wait this long to share a gossip message
MAX_MEMPOOL_TXS = 8_000  # about 7 full blocks: beyond, new txs are refused
RETRY_TTL_MS = 600_000  # a tx refused as "not yet" (unknown job...) is kept this long
CHECKED_CACHE = 100_000  # tx ids whose signatures this node verified
RESUBMIT_S = 10.0  # own txs not final after this long are gossiped again
RESUBMIT_MAX = 2000  # at most this many a pass
REBROADCAST_S = 1.0  # a validator repeats its own votes of the current height
HEAD_EVERY_S = 2.0  # a validator announces its head at least this often
CONNECT_EVERY_S = 5.0  # a validator dials the validators it is not connected to
EMPTY_BLOCK_S = 5.0  # with an empty mempool a validator waits this long before a height
MAX_CLOCK_DRIFT_MS = 10_000  # a block's time may be this far ahead of this node's clock
MAX_FUTURE_MESSAGES = 256  # consensus messages kept for the next height
DIRECT_QUEUE = 64  # consensus messages waiting for one validator's stream
DIRECT_WRITE_TIMEOUT_S = 10.0
DIRECT_RETRY_S = 1.0
DIRECT_IDLE_TIMEOUT_S = 600.0  # a validator sends at least its rebroadcast every second
# A consensus frame begun must be complete within this, plus its size at the slowest rate
# a validator's link may have: a partial frame is held in memory until then. Never less
# than the sender's own write timeout, or a slow but honest write would be cut.
FRAME_BODY_BASE_S = DIRECT_WRITE_TIMEOUT_S
FRAME_BODY_MIN_BYTES_PER_S = 256 * 1024
SYNC_BATCH = 32  # blocks one sync request asks for
SYNC_TIMEOUT_S = 30.0
SNAPSHOT_EVERY = 50  # blocks between ledger snapshots (a restart replays the rest)
RECENT_FINAL = 200_000  # tx id -> height of the block that holds it, for waiters
RESUME_KEY = "consensus_resume"  # kv: the validator's write-ahead point (Resume)


class ChainError(Exception):
    """A request the chain cannot do as asked (the message says why)."""


class ChainBusy(ChainError):
    """The mempool is full: the same request later may succeed."""


@dataclass
class _Waiting:
    tx: CheckedTx
    added_ms: int
    own: bool


class Mempool:
    """Checked transactions waiting for a block, in arrival order, bounded in count."""

    def __init__(self, max_txs: int = MAX_MEMPOOL_TXS) -> None:
        self.max_txs = max_txs
        self._txs: OrderedDict[bytes, _Waiting] = OrderedDict()
        self.arrived = trio.Event()  # set when a tx comes; replaced when the pool empties

    def __len__(self) -> int:
        return len(self._txs)

    def __contains__(self, tx_id: object) -> bool:
        return tx_id in self._txs

    def add(self, tx: CheckedTx, now_ms: int, *, own: bool = False) -> bool:
        """Keep ``tx``; False when it is there already or the pool is full of others'."""
        if tx.id in self._txs:
            self._txs[tx.id].own |= own
            return False
        if len(self._txs) >= self.max_txs and not own:
            return False
        self._txs[tx.id] = _Waiting(tx, now_ms, own)
        self.arrived.set()
        return True

    def own(self) -> list[_Waiting]:
        return [w for w in self._txs.values() if w.own]

    def candidates(self) -> list[CheckedTx]:
        return [w.tx for w in self._txs.values()]

    def drop(self, tx_ids: Iterable[bytes]) -> None:
        for t in tx_ids:
            self._txs.pop(t, None)
        if not self._txs and self.arrived.is_set():
            self.arrived = trio.Event()

    def refused(self, refusals: Sequence[tuple[CheckedTx, TxRefused]], now_ms: int) -> list[bytes]:
        """Drop what can never apply and what waited too long for its turn; the ids dropped."""
        gone = [tx.id for tx, why in refusals
                if not why.retry or now_ms - self._txs[tx.id].added_ms > RETRY_TTL_MS
                if tx.id in self._txs]
        self.drop(gone)
        return gone


class Chain:
    def __init__(self, net: Network, key: SigningKey, storage: Storage, genesis: Genesis,
                 discovery: Discovery, *, clock_ms: Callable[[], int]) -> None:
        self.net = net
        self.key = key
        self.storage = storage
        self.genesis = genesis
        self.discovery = discovery
        self.clock_ms = clock_ms
        self.peer_id = discovery.peer_id
        self.powers = genesis.powers
        self.topics = chain_topics(genesis.chain_id)
        self.is_validator = self.peer_id in self.powers
        self.timeouts = genesis.timeouts
        self.max_proposal_bytes = genesis.max_block_bytes + 1024
        self._max_consensus_frame = self.max_proposal_bytes + CONSENSUS_FRAME_OVERHEAD
        self._max_block_frame = self.max_proposal_bytes + BLOCK_FRAME_OVERHEAD
        self.ledger = Ledger.from_genesis(genesis)
        self.mempool = Mempool()
        self.machine: Machine | None = None
        self._checked: OrderedDict[bytes, CheckedTx] = OrderedDict()
        self._validated: dict[bytes, Ledger] = {}  # block id -> ledger after it, this height
        self._future: list[tuple[str, bytes]] = []  # messages of the next height
        self._timers: list[tuple[int, int, str, int, int]] = []
        self._timer_seq = 0
        self._outgoing: list[bytes] = []
        self._flush = trio.Event()
        self._inbox_send, self._inbox = trio.open_memory_channel[
            tuple[str, bytes, PeerId | None]](1024)
        self._sync_lock = trio.Lock()
        self._new_block = trio.Event()  # set and replaced at every final block
        self._final: OrderedDict[bytes, int] = OrderedDict()
        self.evidence_seen: set[tuple[str, str]] = set()
        self._nursery: trio.Nursery | None = None
        self._resume: Resume | None = None  # as last written to storage
        self._direct: dict[str, trio.MemorySendChannel[bytes]] = {}  # validator -> queue

    # -- service ------------------------------------------------------------------------

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        await self._load()
        self.net.host.set_stream_handler(BLOCKS_PROTOCOL, self._serve_blocks)
        t = self.topics
        for topic, check in ((t.txs, self._valid_txs), (t.consensus, self._valid_consensus),
                             (t.heads, self._valid_head)):
            self.net.pubsub.set_topic_validator(topic, _topic_validator(self.net, topic, check),
                                                False)
        subs = {topic: await self.net.pubsub.subscribe(topic)
                for topic in (t.txs, t.consensus, t.heads)}
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._receive_txs, subs[t.txs])
            nursery.start_soon(self._receive_consensus, subs[t.consensus], nursery)
            nursery.start_soon(self._receive_heads, subs[t.heads], nursery)
            nursery.start_soon(self._publish_txs)
            nursery.start_soon(self._resubmit)
            if self.is_validator:
                self.net.host.set_stream_handler(CONSENSUS_PROTOCOL, self._serve_consensus)
                for pid in self.powers:
                    if pid != self.peer_id:
                        send, recv = trio.open_memory_channel[bytes](DIRECT_QUEUE)
                        self._direct[pid] = send
                        nursery.start_soon(self._send_direct, PeerId.from_base58(pid), recv)
                nursery.start_soon(self._connect_validators)
                nursery.start_soon(self._announce_heads)
                nursery.start_soon(self._consensus)
            log.info("chain %s at height %d (%s)", self.genesis.chain_id, self.ledger.height,
                     "validator" if self.is_validator else "follower")
            task_status.started()
            await trio.sleep_forever()

    async def _load(self) -> None:
        """The ledger from the latest snapshot and the blocks stored after it. Stored
        blocks were verified when they came; replaying them re-checks every tx anyway."""
        saved = await self.storage.kv_get(RESUME_KEY)
        self._resume = Resume.decode(saved) if isinstance(saved, bytes) else None
        snap = await self.storage.get_snapshot()
        if snap is not None:
            self.ledger = Ledger.decode(snap[1])
        while True:
            rows = await self.storage.get_blocks(self.ledger.height + 1, SYNC_BATCH)
            if not rows:
                break
            for height, data, _ in rows:
                block = Block.decode(data, self.genesis.max_block_bytes)
                self.ledger = self.ledger.apply_block(block, [self._check(t) for t in block.txs])
                assert self.ledger.height == height
        for tx_id, tx, added_ms in await self.storage.outbox():
            try:
                self.mempool.add(self._check(tx), added_ms, own=True)
            except RemoteProtocolError as exc:
                log.warning("dropping stored tx %s: %s", tx_id[:16], exc)
                await self.storage.outbox_remove([tx_id])

    def _check(self, tx: bytes) -> CheckedTx:
        """check_tx, once per tx id (verifying signatures is the expensive part)."""
        tid = ledger_tx_id(tx)
        hit = self._checked.get(tid)
        if hit is not None:
            self._checked.move_to_end(tid)
            return hit
        checked = check_tx(self.genesis, tx)
        self._checked[tid] = checked
        if len(self._checked) > CHECKED_CACHE:
            self._checked.popitem(last=False)
        return checked

    # -- transactions -------------------------------------------------------------------

    async def submit(self, kind: str, payload: bytes) -> bytes:
        """Send one of this node's own transactions to the validators, kept in the outbox
        until final; its tx id. RemoteProtocolError (with the reason) when it does not
        check; a tx that is final already is not sent again."""
        return (await self.submit_many([encode_tx(kind, payload)]))[0]

    async def submit_many(self, txs: Sequence[bytes], *, refuse_when_full: bool = False
                          ) -> list[bytes]:
        """:meth:`submit` for many. With ``refuse_when_full`` (the API: load from outside)
        ChainBusy when the mempool is full, rather than taking more than the chain can
        finalize and starving consensus of the CPU."""
        if refuse_when_full and len(self.mempool) + len(txs) > self.mempool.max_txs:
            # Before any signature check: refusing must cost less than taking.
            raise ChainBusy(f"the mempool holds {len(self.mempool)} txs, at most "
                            f"{self.mempool.max_txs}: try again in a few seconds")
        checked = [self._check(t) for t in txs]  # all or nothing: raises on the first bad
        now = self.clock_ms()
        done = await self.final_heights([c.id for c in checked])
        fresh = [c for c in checked if c.id not in done]
        for c in fresh:  # in the mempool before any await: next_nonce counts it at once
            self.mempool.add(c, now, own=True)
        await self.storage.outbox_add([(c.id.hex(), c.data, now) for c in fresh])
        self._outgoing += [c.data for c in fresh]
        self._flush.set()
        return [c.id for c in checked]

    def next_nonce(self) -> int:
        """The nonce of this node's next revenue record: after the ledger's and after
        those still waiting in the mempool."""
        pending = [w.tx.record.nonce for w in self.mempool.own()
                   if w.tx.kind == "revenue" and w.tx.record.payer == self.peer_id]
        return max([self.ledger.nonce(self.peer_id), *pending]) + 1

    # -- gossip validation: checked before gossipsub relays a message ------------------

    def _valid_txs(self, data: bytes) -> None:
        decode_tx_batch(data, TX_BATCH_BYTES + 1024)  # each tx is checked on arrival

    def _valid_consensus(self, data: bytes) -> None:
        check_consensus_gossip(data, self.genesis.chain_id, self.powers,
                               self._max_consensus_frame)

    def _valid_head(self, data: bytes) -> None:
        check_head_gossip(data, self.genesis.chain_id)

    async def _publish_txs(self) -> None:
        while True:
            await self._flush.wait()
            await trio.sleep(TX_FLUSH_S)
            self._flush = trio.Event()
            txs, self._outgoing = self._outgoing, []
            for batch in tx_batches(txs, TX_BATCH_BYTES):
                await self._publish(self.topics.txs, encode_tx_batch(batch))

    async def _publish(self, topic: str, data: bytes) -> None:
        try:
            await self.net.pubsub.publish(topic, data)
        except Exception as exc:  # gossip is best effort; every sender repeats
            log.debug("publishing on %s failed: %r", topic, exc)

    async def _receive_txs(self, subscription: Any) -> None:
        """Validators keep every tx that checks; other nodes only relay (gossipsub does)."""
        while True:
            message = await subscription.get()
            if not self.is_validator or len(self.mempool) >= self.mempool.max_txs:
                continue  # full: checking more would only starve consensus; senders repeat
            try:
                batch = decode_tx_batch(message.data, TX_BATCH_BYTES + 1024)
            except RemoteProtocolError:
                continue
            now = self.clock_ms()
            for i, tx in enumerate(batch):
                if i % 64 == 63:  # a batch is ~40 ms of signature checks: let consensus in
                    await trio.lowlevel.checkpoint()
                try:
                    checked = self._check(tx)
                except RemoteProtocolError as exc:
                    log.debug("tx refused from %s: %s", message.from_id, exc)
                    continue
                if checked.id not in self._final:
                    self.mempool.add(checked, now)
            await trio.lowlevel.checkpoint()

    async def _resubmit(self) -> None:
        """Gossip again this node's txs that waited RESUBMIT_S without becoming final, a
        bounded number a pass (a burst of them would crowd out everything else); forget
        those that can never apply."""
        trial_proposer = self.genesis.validators[0].peer_id  # any validator: a trial block
        while True:
            await trio.sleep(RESUBMIT_S)
            now = self.clock_ms()
            rows = [r for r in await self.storage.outbox(RESUBMIT_MAX)
                    if now - r[2] >= RESUBMIT_S * 1000]
            checked = []
            for tid, tx, _ in rows:
                try:
                    checked.append(self._check(tx))
                except RemoteProtocolError:
                    await self.storage.outbox_remove([tid])
            if not checked:
                continue
            _, refused = self.ledger.build_block(
                checked, time_ms=self.ledger.last_time_ms + 1, proposer=trial_proposer,
                max_bytes=self.genesis.max_block_bytes)
            never = {c.id for c, why in refused if not why.retry}
            for c, why in refused:
                if not why.retry:
                    log.warning("tx %s (%s) will never apply: %s", c.id.hex()[:16], c.kind,
                                why)
            if never:
                await self.storage.outbox_remove([t.hex() for t in never])
                self.mempool.drop(never)
            for c in checked:
                if c.id not in never:
                    self.mempool.add(c, now, own=True)
                    self._outgoing.append(c.data)
            self._flush.set()

    # -- consensus (validators) ---------------------------------------------------------

    async def _consensus(self) -> None:
        while True:
            height = self.ledger.height + 1
            await self._wait_to_start(height)
            if self.ledger.height + 1 != height:
                continue  # caught up through sync meanwhile
            saved = self._resume
            machine = Machine(self.genesis.chain_id, self.powers, self.key, height,
                              self.timeouts, valid_block=self._valid_block,
                              make_block=self._make_block,
                              max_proposal_bytes=self.max_proposal_bytes,
                              resume=saved if saved is not None and saved.height == height
                              else None)
            self.machine, self._validated, self._timers = machine, {}, []
            await self._act(machine.start(self.clock_ms()))
            future, self._future = self._future, []
            for kind, data in future:
                await self._feed(kind, data, None)
            next_rebroadcast = trio.current_time() + REBROADCAST_S
            while machine.decided is None and self.ledger.height + 1 == height:
                wake = next_rebroadcast
                if self._timers:
                    wake = min(wake, trio.current_time() +
                               max(0, self._timers[0][0] - self.clock_ms()) / 1000)
                item = None
                with trio.move_on_at(wake):
                    item = await self._inbox.receive()
                if item is not None:
                    await self._feed(*item)
                    continue
                if trio.current_time() >= next_rebroadcast:
                    next_rebroadcast = trio.current_time() + REBROADCAST_S
                    await self._act(machine.rebroadcast())
                now = self.clock_ms()
                while self._timers and self._timers[0][0] <= now:
                    _, _, step, h, r = heapq.heappop(self._timers)
                    await self._act(machine.on_timeout(step, h, r, now))
            self.machine = None

    async def _wait_to_start(self, height: int) -> None:
        """The pause between heights: the block interval, and with nothing to put in a
        block up to EMPTY_BLOCK_S more. A message of this height from another validator
        (it started already) ends the wait, as does a block arriving through sync."""
        deadline = trio.current_time() + EMPTY_BLOCK_S
        await self._sleep_unless_called(self.genesis.block_interval_ms / 1000, height)
        if len(self.mempool) == 0 and not self._future and self.ledger.height + 1 == height:
            await self._sleep_unless_called(deadline - trio.current_time(), height,
                                            until=self.mempool.arrived)

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
                if self._height_of(kind, data) == height:
                    self._future.append((kind, data))
                    return
                await self._feed(kind, data, sender)

    def _height_of(self, kind: str, data: bytes) -> int | None:
        """The height a message claims (unchecked: the machine of that height checks it;
        verifying here too would hash every megabyte proposal twice)."""
        got = message_height(data, self.max_proposal_bytes)
        return got[1] if got is not None and got[0] == self.genesis.chain_id else None

    async def _feed(self, kind: str, data: bytes, sender: PeerId | None) -> None:
        """One consensus message to the machine of its height, kept for the next height,
        or taken as a sign that this node is behind."""
        height = self._height_of(kind, data)
        machine = self.machine
        if height is None or height <= self.ledger.height:
            return
        if machine is None or height > machine.height:
            # The next height's messages wait for its machine. A message two heights on
            # means its sender decided a block this node has not: this node missed that
            # block's precommits, and the others no longer repeat them, so it syncs.
            if height <= self.ledger.height + 2 and len(self._future) < MAX_FUTURE_MESSAGES:
                self._future.append((kind, data))
            if height > self.ledger.height + 1 and sender is not None:
                self._start_sync(sender)
            return
        try:
            now = self.clock_ms()
            actions = (machine.on_proposal(data, now) if kind == "proposal"
                       else machine.on_vote(data, now))
        except RemoteProtocolError as exc:
            log.debug("%s refused: %s", kind, exc)
            return
        await self._act(actions)

    async def _act(self, actions: Sequence[object]) -> None:
        for a in actions:
            if isinstance(a, Broadcast):
                await self._save_resume()
                message = ConsensusFrame(a.kind, a.data).encode()
                for send in self._direct.values():
                    with contextlib.suppress(trio.WouldBlock):  # a stuck peer: it syncs
                        send.send_nowait(message)
                if a.kind == "vote":  # small; the gossip path also reaches validators
                    await self._publish(self.topics.consensus, message)  # no direct link reaches
            elif isinstance(a, SetTimeout):
                self._timer_seq += 1
                heapq.heappush(self._timers, (a.at_ms, self._timer_seq, a.step, a.height,
                                              a.round))
            elif isinstance(a, Decide):
                await self._commit(a.block, a.commit.encode(), self._validated.get(a.block_id))
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
            await self.storage.kv_set(RESUME_KEY, point.encode())
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
        now = self.clock_ms()
        block, refused = self.ledger.build_block(
            self.mempool.candidates(), time_ms=max(now, self.ledger.last_time_ms + 1),
            proposer=self.peer_id, max_bytes=self.genesis.max_block_bytes)
        for tx_id in self.mempool.refused(refused, now):
            log.debug("tx %s dropped from the mempool", tx_id.hex()[:16])
        return block.encode()

    def _valid_block(self, data: bytes) -> bool:
        """Whether the proposed ``data`` is the next block on this node's ledger: decodes,
        follows the last block, not from the future, every tx applies, the root matches."""
        bid = block_id(data)
        if bid in self._validated:
            return True
        try:
            block = Block.decode(data, self.genesis.max_block_bytes)
            if block.time_ms > self.clock_ms() + MAX_CLOCK_DRIFT_MS:
                raise RemoteProtocolError("future", f"block time {block.time_ms} is ahead")
            after = self.ledger.apply_block(block, [self._check(t) for t in block.txs])
        except RemoteProtocolError as exc:
            log.info("proposed block refused: %s", exc)
            return False
        self._validated[bid] = after
        return True

    # -- final blocks -------------------------------------------------------------------

    async def _commit(self, data: bytes, commit: bytes, after: Ledger | None) -> None:
        """Store a final block and move the ledger on. Consensus and sync may both bring
        one height; the first to store it wins, the other returns."""
        block = Block.decode(data, self.genesis.max_block_bytes)
        if block.height != self.ledger.height + 1:
            return
        if after is None:
            after = self.ledger.apply_block(block, [self._check(t) for t in block.txs])
        bid = block_id(data)
        tx_ids = [self._check(t).id for t in block.txs]
        if not await self.storage.put_block(block.height, bid.hex(), data, commit,
                                            [t.hex() for t in tx_ids]):
            return
        self.ledger = after
        self.mempool.drop(tx_ids)
        for t in tx_ids:
            self._final[t] = block.height
        while len(self._final) > RECENT_FINAL:
            self._final.popitem(last=False)
        await self.storage.outbox_remove([t.hex() for t in tx_ids])
        if block.height % SNAPSHOT_EVERY == 0:
            await self.storage.put_snapshot(block.height, self.ledger.encode())
        log.info("block %d final: %d txs, %s", block.height, len(block.txs), bid.hex()[:16])
        self._new_block.set()
        self._new_block = trio.Event()
        if self.is_validator:
            await self._publish(self.topics.heads, self._head())

    async def final_heights(self, tx_ids: Sequence[bytes]) -> dict[bytes, int]:
        """tx id -> the height of the final block holding it, for those that are final:
        recent blocks from memory, older ones from the stored index."""
        out = {t: self._final[t] for t in tx_ids if t in self._final}
        rest = [t.hex() for t in tx_ids if t not in out]
        if rest:
            out.update((bytes.fromhex(t), h)
                       for t, h in (await self.storage.tx_heights(rest)).items())
        return out

    async def final_height(self, tx_id: bytes) -> int | None:
        return (await self.final_heights([tx_id])).get(tx_id)

    async def wait_final(self, tx_ids: Sequence[bytes], timeout: float) -> dict[bytes, int]:
        """Wait until every tx is in a final block (or ``timeout``); those that are."""
        final = await self.final_heights(tx_ids)
        with trio.move_on_after(timeout):
            while len(final) < len(set(tx_ids)):
                await self._new_block.wait()
                final.update((t, self._final[t]) for t in tx_ids if t in self._final)
        return final

    async def wait_height(self, height: int, timeout: float) -> bool:
        with trio.move_on_after(timeout):
            while self.ledger.height < height:
                await self._new_block.wait()
        return self.ledger.height >= height

    # -- heads and catch-up -------------------------------------------------------------

    def _head(self) -> bytes:
        return Head(self.genesis.chain_id, self.ledger.height).encode()

    async def _announce_heads(self) -> None:
        while True:
            await trio.sleep(HEAD_EVERY_S)
            await self._publish(self.topics.heads, self._head())

    async def _receive_heads(self, subscription: Any, nursery: trio.Nursery) -> None:
        while True:
            message = await subscription.get()
            try:
                head = Head.decode(message.data)
            except RemoteProtocolError:
                continue
            if head.chain_id == self.genesis.chain_id and head.height > self.ledger.height:
                self._start_sync(message.from_id, nursery)

    async def _receive_consensus(self, subscription: Any, nursery: trio.Nursery) -> None:
        while True:
            message = await subscription.get()
            try:
                frame = ConsensusFrame.decode(message.data, self._max_consensus_frame)
            except RemoteProtocolError:
                continue
            kind, data = frame.kind, frame.data
            sender = PeerId(message.from_id) if isinstance(message.from_id, bytes) else None
            if self.is_validator:
                try:
                    self._inbox_send.send_nowait((kind, data, sender))
                except trio.WouldBlock:
                    log.debug("consensus inbox full; a %s dropped", kind)
            elif sender is not None:
                height = self._height_of(kind, data)
                if height is not None and height > self.ledger.height + 1:
                    self._start_sync(sender, nursery)

    def _start_sync(self, peer: Any, nursery: trio.Nursery | None = None) -> None:
        if self._sync_lock.locked():
            return
        pid = (peer if isinstance(peer, PeerId) else PeerId(peer) if isinstance(peer, bytes)
               else None)
        if pid is None or pid == self.net.peer_id:
            return
        nursery = nursery or self._nursery
        if nursery is not None:
            nursery.start_soon(self._sync_from, pid)

    async def _sync_from(self, peer: PeerId) -> None:
        """Take blocks from ``peer`` until it has no more: each one only after its
        certificate verifies and the ledger applies it to the same state root."""
        if self._sync_lock.locked():
            return
        async with self._sync_lock:
            try:
                while True:
                    got = await self._sync_batch(peer)
                    if got < SYNC_BATCH:
                        return
            except (FrameError, RemoteProtocolError, OSError, trio.TooSlowError) as exc:
                log.info("catching up from %s stopped: %s", peer, exc)
            except Exception as exc:  # a dial that fails in the library's own ways
                log.info("catching up from %s failed: %r", peer, exc)

    async def _sync_batch(self, peer: PeerId) -> int:
        stream = await self._open(peer)
        try:
            start = self.ledger.height + 1
            await write_frame(stream, SyncRequest(start, SYNC_BATCH).encode(), SYNC_TIMEOUT_S)
            got = 0
            while True:
                frame = await read_frame(stream, self._max_block_frame, SYNC_TIMEOUT_S)
                if not frame:
                    break
                pair = BlockFrame.decode(frame, self._max_block_frame)
                data, commit = pair.block, pair.commit
                block = Block.decode(data, self.genesis.max_block_bytes)
                if block.height <= self.ledger.height:
                    continue  # consensus finished it here meanwhile
                if block.height != self.ledger.height + 1:
                    raise RemoteProtocolError("gap", f"block {block.height} after "
                                                     f"{self.ledger.height}")
                verify_commit(self.genesis.chain_id, self.powers, block.height,
                              block_id(data), commit)
                await self._commit(data, commit, None)
                got += 1
            await stream.close()
            return got
        except BaseException:
            await reset_quietly(stream)
            raise

    async def _open(self, peer: PeerId, protocol: ProtocolId = BLOCKS_PROTOCOL) -> Any:
        if peer not in self.net.host.get_connected_peers():
            cap = self.discovery.local_record(peer.to_base58())
            addrs = [parse_multiaddr(a) for a in cap.record.addrs] if cap else []
            await self.net.connect(PeerInfo(peer, addrs), timeout=SYNC_TIMEOUT_S)
        with trio.fail_after(SYNC_TIMEOUT_S):
            return await self.net.open_stream(peer, protocol)

    async def _serve_blocks(self, stream: Any) -> None:
        try:
            req = SyncRequest.decode(await read_frame(stream, MAX_SYNC_REQUEST_BYTES,
                                                      SYNC_TIMEOUT_S))
            for _, data, commit in await self.storage.get_blocks(req.start,
                                                                 min(req.limit, SYNC_BATCH)):
                await write_frame(stream, BlockFrame(data, commit).encode(), SYNC_TIMEOUT_S)
            await write_frame(stream, b"", SYNC_TIMEOUT_S)
            await stream.close()
        except Exception as exc:  # a peer that vanished, stalled or sent garbage
            log.debug("serving blocks ended: %r", exc)
            await reset_quietly(stream)

    async def _send_direct(self, peer: PeerId, queue: trio.MemoryReceiveChannel[bytes]) -> None:
        """Carry this validator's consensus messages to one other validator on a stream
        of their own. Gossipsub alone was not enough: under a load of transactions its
        per-peer queues drop messages, proposals of a megabyte among them, and a round
        lost that way costs its timeouts (specs/consensus.md, "Network")."""
        while True:
            message = await queue.receive()
            stream = None
            try:
                stream = await self._open(peer, CONSENSUS_PROTOCOL)
                while True:
                    await write_frame(stream, message, DIRECT_WRITE_TIMEOUT_S)
                    message = await queue.receive()
            except Exception as exc:  # gone, stalled, or not reachable: try again later
                log.debug("consensus stream to %s: %r", peer, exc)
                if stream is not None:
                    await reset_quietly(stream)
                await trio.sleep(DIRECT_RETRY_S)

    async def _serve_consensus(self, stream: Any) -> None:
        """The direct stream of another validator of this genesis; anyone else's is reset
        before a byte of it is read."""
        sender = stream.muxed_conn.peer_id
        if sender.to_base58() not in self.powers:
            log.debug("consensus stream from %s refused: not a validator", sender)
            await reset_quietly(stream)
            return
        try:
            while True:
                frame = ConsensusFrame.decode(
                    await read_frame(stream, self._max_consensus_frame, DIRECT_IDLE_TIMEOUT_S,
                                     body_timeout=_frame_body_deadline),
                    self._max_consensus_frame)
                kind, data = frame.kind, frame.data
                with contextlib.suppress(trio.WouldBlock):
                    self._inbox_send.send_nowait((kind, data, sender))
        except Exception as exc:  # closed, idle, or garbage: the stream goes
            log.debug("consensus stream ended: %r", exc)
            await reset_quietly(stream)

    async def _connect_validators(self) -> None:
        """Keep a connection to every other validator whose address discovery knows, so
        the consensus topic's mesh holds them all."""
        while True:
            connected = set(self.net.host.get_connected_peers())
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
            await trio.sleep(CONNECT_EVERY_S)


def _frame_body_deadline(length: int) -> float:
    return FRAME_BODY_BASE_S + length / FRAME_BODY_MIN_BYTES_PER_S


def _topic_validator(net: Network, topic: str, check: Callable[[bytes], object]
                     ) -> Callable[[PeerId, Any], bool]:
    """A gossipsub topic validator from a check that raises RemoteProtocolError."""

    def validate(_forwarder: PeerId, message: Any) -> bool:
        try:
            check(bytes(message.data))
        except RemoteProtocolError as exc:
            return net.reject_gossip(topic, exc.reason)
        return True

    return validate


GENESIS_FILE = "genesis.toml"  # in the node home: the chain this home follows


def load_genesis(home: Path, path: Path | None) -> Genesis | None:
    """The genesis this node follows: ``path`` (``node start --genesis``), kept in the
    home so that later starts need no flag, or the one kept there before; None when there
    is neither. ChainError when ``path`` is unreadable or invalid, or names another chain
    than the one this home follows (its blocks would not verify)."""
    kept = home / GENESIS_FILE
    current = None
    if kept.exists():
        current = _read_genesis(kept)
    if path is None:
        return current
    given = _read_genesis(path)
    if current is not None and current.id != given.id:
        raise ChainError(f"{path}: this home follows chain {current.chain_id!r} (genesis "
                         f"{current.id.hex()[:16]}), not {given.chain_id!r} (genesis "
                         f"{given.id.hex()[:16]}); use another --home")
    if current is None:
        tmp = kept.with_suffix(".tmp")
        tmp.write_text(path.read_text(encoding="utf-8"), encoding="utf-8")
        os.replace(tmp, kept)
    return given


def _read_genesis(path: Path) -> Genesis:
    try:
        return parse_genesis(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise ChainError(f"cannot read the genesis file {path}: {exc}") from None
    except GenesisError as exc:
        raise ChainError(f"{path}: {exc}") from None
