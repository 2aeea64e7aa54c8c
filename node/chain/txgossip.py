"""Transactions: submitted here, gossiped in batches, taken into validators' mempools.

A validator sends the batches of txs it admits straight to the other validators on their
txs streams (node/chain/links.py), and gossips only a batch that some validator's stream
did not take; other nodes gossip theirs. A node keeps the txs it submitted itself in its
``outbox`` table and sends them again until they are final, because gossip and streams
are best effort (shared/notes/libp2p-0.8.1.md) and a crash must not lose a receipt. Each
tx is checked once per node (every signature: ``protocol.ledger.check_tx``, cached by tx
id in :class:`ChainState`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import trio

from node.chain.network import publish
from node.chain.state import ChainState
from node.config import ChainSection
from node.errors import Busy, Conflict
from node.p2p import P2P
from protocol.chainwire import decode_tx_batch, encode_tx_batch, tx_batches
from protocol.errors import RemoteProtocolError
from protocol.ledger import encode_tx
from protocol.mempool import GOSSIP_BUDGETS

if TYPE_CHECKING:
    from node.chain.links import ValidatorLinks

log = logging.getLogger(__name__)

TX_BATCH_BYTES = 256 * 1024  # one gossip message of txs (gossipsub's cap is 1 MiB)


class ChainError(Conflict):
    """A request the chain cannot do as asked (the message says why)."""


class ChainBusy(Busy, ChainError):
    """The chain cannot finalize more in time: the same request later may succeed."""


class TxGossip:
    def __init__(self, state: ChainState, net: P2P, topic: str, *, peer_id: str,
                 is_validator: bool, tunables: ChainSection) -> None:
        self.state = state
        self.tunables = tunables
        self.net = net
        self.topic = topic
        self.peer_id = peer_id
        self.is_validator = is_validator
        self.links: ValidatorLinks | None = None  # a validator's: its txs go direct
        self._outgoing: list[bytes] = []
        self._flush = trio.Event()

    async def run(self, subscription: Any) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._receive, subscription)
            nursery.start_soon(self._publish)
            nursery.start_soon(self._resubmit)

    def check_gossip(self, data: bytes) -> None:
        """The relay check of the topic: the batch decodes (each tx is checked on arrival)."""
        decode_tx_batch(data, TX_BATCH_BYTES + 1024)

    async def submit(self, kind: str, payload: bytes) -> bytes:
        """Send one of this node's own transactions to the validators, kept in the outbox
        until final; its tx id. RemoteProtocolError (with the reason) when it does not
        check; a tx that is final already is not sent again."""
        return (await self.submit_many([encode_tx(kind, payload)]))[0]

    async def submit_many(self, txs: Sequence[bytes], *, refuse_when_busy: bool = False
                          ) -> list[bytes]:
        """:meth:`submit` for many. With ``refuse_when_busy`` (the API: load from outside)
        ChainBusy when the chain could not finalize them within the finality budget
        (protocol/mempool.py), rather than taking more than it can finalize in time and
        starving consensus of the CPU. This node's own work (receipts, evidence) is
        always taken: its outbox keeps it until final."""
        pool = self.state.mempool
        if refuse_when_busy:  # before any signature check: refusing must cost less
            self.refuse_if_busy(len(txs))
        checked = [self.state.check(t) for t in txs]  # all or nothing: raises on the first bad
        now = self.state.clock_ms()
        done = await self.state.final_heights([c.id for c in checked])
        fresh = [c for c in checked if c.id not in done]
        for c in fresh:  # in the mempool before any await: next_nonce counts it at once
            pool.add(c, now, own=True)
        await self.state.storage.outbox_add([(c.id.hex(), c.data, now) for c in fresh])
        self._outgoing += [c.data for c in fresh]
        self._flush.set()
        return [c.id for c in checked]

    def refuse_if_busy(self, adding: int) -> None:
        """ChainBusy, with the seconds to wait, when the mempool would not take
        ``adding`` more txs from outside: over the finality budget, or full."""
        pool = self.state.mempool
        now, held = self.state.clock_ms(), len(pool)
        if pool.is_full(adding) or not pool.admission.admits(held, adding, now):
            after = pool.admission.retry_after_s(held, adding, now)
            raise ChainBusy(
                f"the chain cannot finalize {adding} more txs in time: {held} are waiting, "
                f"{pool.admission.rate(now):.0f}/s are being finalized; try again in "
                f"{after} s", retry_after_s=after)

    def next_nonce(self) -> int:
        """The nonce of this node's next revenue record: after the ledger's and after
        those still waiting in the mempool."""
        pending = [w.tx.record.nonce for w in self.state.mempool.own()
                   if w.tx.kind == "revenue" and w.tx.record.payer == self.peer_id]
        return max([self.state.ledger.nonce(self.peer_id), *pending]) + 1

    async def _publish(self) -> None:
        while True:
            await self._flush.wait()
            await trio.sleep(self.tunables.tx_flush_s)
            self._flush = trio.Event()
            txs, self._outgoing = self._outgoing, []
            for batch in tx_batches(txs, TX_BATCH_BYTES):
                data = encode_tx_batch(batch)
                if self.links is None or not self.links.send_txs(data):
                    await publish(self.net, self.topic, data)

    async def _receive(self, subscription: Any) -> None:
        """Validators keep every tx that checks; other nodes only relay (gossipsub does)."""
        while True:
            message = await subscription.get()
            if self.is_validator:
                await self.take_batch(message.data, message.from_peer)
            await trio.lowlevel.checkpoint()

    async def take_batch(self, data: bytes, sender: object) -> None:
        """A validator takes a batch of txs (from gossip or another validator's stream)
        into its mempool: each tx that checks (every signature) and is not final."""
        pool = self.state.mempool
        now = self.state.clock_ms()
        # Checking more would only starve consensus (senders repeat theirs). A batch is
        # taken whole while there is room for one more tx, overshooting by at most a
        # batch: the more validators hold a tx, the sooner a block has it.
        if pool.is_full() or not pool.admission.admits(len(pool), 1, now,
                                                       budgets=GOSSIP_BUDGETS):
            return
        try:
            batch = decode_tx_batch(data, TX_BATCH_BYTES + 1024)
        except RemoteProtocolError:
            return
        for i, tx in enumerate(batch):
            if i % 64 == 63:  # a batch is ~40 ms of signature checks: let consensus in
                await trio.lowlevel.checkpoint()
            try:
                checked = self.state.check(tx)
            except RemoteProtocolError as exc:
                log.debug("tx refused from %s: %s", sender, exc)
                continue
            if not self.state.is_final(checked.id):
                pool.add(checked, now)

    async def _resubmit(self) -> None:
        """Gossip again this node's txs that waited ``resubmit_s`` without becoming final, a
        bounded number a pass (a burst of them would crowd out everything else); forget
        those that can never apply."""
        state = self.state
        trial_proposer = state.genesis.validators[0].peer_id  # any validator: a trial block
        every_s = self.tunables.resubmit_s
        while True:
            await trio.sleep(every_s)
            now = state.clock_ms()
            rows = [r for r in await state.storage.outbox(self.tunables.resubmit_max)
                    if now - r[2] >= every_s * 1000]
            checked = []
            for tid, tx, _ in rows:
                try:
                    checked.append(state.check(tx))
                except RemoteProtocolError:
                    await state.storage.outbox_remove([tid])
            if not checked:
                continue
            _, refused = state.ledger.build_block(
                checked, time_ms=state.ledger.last_time_ms + 1, proposer=trial_proposer,
                max_bytes=state.genesis.max_block_bytes)
            never = {c.id for c, why in refused if not why.retry}
            for c, why in refused:
                if not why.retry:
                    log.warning("tx %s (%s) will never apply: %s", c.id.hex()[:16], c.kind,
                                why)
            if never:
                await state.storage.outbox_remove([t.hex() for t in never])
                state.mempool.drop(never)
            for c in checked:
                if c.id not in never:
                    state.mempool.add(c, now, own=True)
                    self._outgoing.append(c.data)
            self._flush.set()
