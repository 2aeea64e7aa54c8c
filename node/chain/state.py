"""What the chain's services share: the genesis, the ledger, the checked-tx cache, the
mempool and the index of final txs. :meth:`ChainState.commit` is the one way the ledger
moves on, whether a block came from this node's consensus or from block sync."""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import trio

from node.config import ChainSection
from node.storage import Storage
from protocol import mempool
from protocol.errors import RemoteProtocolError
from protocol.genesis import Genesis
from protocol.ledger import Block, CheckedTx, Ledger, check_tx
from protocol.ledger import tx_id as ledger_tx_id

log = logging.getLogger(__name__)



class Mempool(mempool.Mempool):
    """protocol.mempool's policy with the chain's finality budget, and an event that
    consensus waits on: set when a tx arrives, replaced when the pool empties."""

    def __init__(self, admission: mempool.Admission) -> None:
        super().__init__()
        self.arrived = trio.Event()
        self.admission = admission

    def add(self, tx: CheckedTx, now_ms: int, *, own: bool = False) -> bool:
        added = super().add(tx, now_ms, own=own)
        if added:
            self.arrived.set()
        return added

    def drop(self, tx_ids: Iterable[bytes]) -> None:
        super().drop(tx_ids)
        if not len(self) and self.arrived.is_set():
            self.arrived = trio.Event()


@dataclass(frozen=True)
class Validated:
    """A block that applies on the current ledger: the block, the ledger after it, and
    its txs' ids (what :meth:`ChainState.commit` would otherwise decode and hash again)."""

    block: Block
    after: Ledger
    tx_ids: tuple[bytes, ...]


class ChainState:
    def __init__(self, genesis: Genesis, storage: Storage, clock_ms: Callable[[], int],
                 tunables: ChainSection) -> None:
        self.genesis = genesis
        self.tunables = tunables
        self.storage = storage
        self.clock_ms = clock_ms
        self.powers = genesis.powers
        self.ledger = Ledger.from_genesis(genesis)
        self.mempool = Mempool(mempool.Admission(mempool.budget_for(genesis.block_interval_ms)))
        self.new_block = trio.Event()  # set and replaced at every final block
        self.last_proposer: str | None = None  # of the last block final here
        self._checked: OrderedDict[bytes, CheckedTx] = OrderedDict()
        self._final: OrderedDict[bytes, int] = OrderedDict()

    async def load(self) -> None:
        """The ledger from the latest snapshot and the blocks stored after it, then this
        node's own txs from its outbox into the mempool. Stored blocks were verified when
        they came; replaying them re-checks every tx anyway."""
        snap = await self.storage.get_snapshot()
        if snap is not None:
            self.ledger = Ledger.decode(snap[1])
        while True:
            rows = await self.storage.get_blocks(self.ledger.height + 1, self.tunables.load_batch)
            if not rows:
                break
            for height, data, _ in rows:
                self.ledger = self.validate(Block.decode(data, self.genesis.max_block_bytes)).after
                assert self.ledger.height == height
        for tx_id, tx, added_ms in await self.storage.outbox():
            try:
                self.mempool.add(self.check(tx), added_ms, own=True)
            except RemoteProtocolError as exc:
                log.warning("dropping stored tx %s: %s", tx_id[:16], exc)
                await self.storage.outbox_remove([tx_id])

    def check(self, tx: bytes) -> CheckedTx:
        """check_tx, once per tx id (verifying signatures is the expensive part)."""
        tid = ledger_tx_id(tx)
        hit = self._checked.get(tid)
        if hit is not None:
            self._checked.move_to_end(tid)
            return hit
        checked = check_tx(self.genesis, tx)
        self._checked[tid] = checked
        if len(self._checked) > self.tunables.checked_cache:
            self._checked.popitem(last=False)
        return checked

    def validate(self, block: Block) -> Validated:
        """``block`` applied on the current ledger: each tx checked (once per tx id) and the
        ledger after it; RemoteProtocolError when it does not apply."""
        checked = [self.check(t) for t in block.txs]
        return Validated(block, self.ledger.apply_block(block, checked),
                         tuple(c.id for c in checked))

    def is_final(self, tx_id: bytes) -> bool:
        """Whether ``tx_id`` is in a recent final block (the in-memory index only)."""
        return tx_id in self._final

    async def commit(self, data: bytes, commit: bytes, validated: Validated | None) -> bool:
        """Store a final block and move the ledger on; whether this call did. Consensus
        and sync may both bring one height: the first to store it wins. ``validated``:
        what validating ``data`` gave when the caller has it already (a proposal)."""
        if validated is None:
            block = Block.decode(data, self.genesis.max_block_bytes)
            if block.height != self.ledger.height + 1:
                return False
            validated = self.validate(block)
        block, after, tx_ids = validated.block, validated.after, validated.tx_ids
        if block.height != self.ledger.height + 1:
            return False
        bid = block.id
        if not await self.storage.put_block(block.height, bid.hex(), data, commit,
                                            [t.hex() for t in tx_ids]):
            return False
        self.ledger = after
        self.last_proposer = block.proposer
        self.mempool.drop(tx_ids)
        self.mempool.admission.finalized(len(tx_ids), self.clock_ms())
        for t in tx_ids:
            self._final[t] = block.height
        while len(self._final) > self.tunables.recent_final:
            self._final.popitem(last=False)
        await self.storage.outbox_remove([t.hex() for t in tx_ids])
        if block.height % self.tunables.snapshot_every == 0:
            await self.storage.put_snapshot(block.height, self.ledger.encode())
        log.info("block %d final: %d txs, %s", block.height, len(block.txs), bid.hex()[:16])
        self.new_block.set()
        self.new_block = trio.Event()
        return True

    async def final_heights(self, tx_ids: Sequence[bytes]) -> dict[bytes, int]:
        """tx id -> the height of the final block holding it, for those that are final:
        recent blocks from memory, older ones from the stored index."""
        out = {t: self._final[t] for t in tx_ids if t in self._final}
        rest = [t.hex() for t in tx_ids if t not in out]
        if rest:
            out.update((bytes.fromhex(t), h)
                       for t, h in (await self.storage.tx_heights(rest)).items())
        return out

    async def wait_final(self, tx_ids: Sequence[bytes], timeout: float) -> dict[bytes, int]:
        """Wait until every tx is in a final block (or ``timeout``); those that are."""
        final = await self.final_heights(tx_ids)
        with trio.move_on_after(timeout):
            while len(final) < len(set(tx_ids)):
                await self.new_block.wait()
                final.update((t, self._final[t]) for t in tx_ids if t in self._final)
        return final

    async def wait_height(self, height: int, timeout: float) -> bool:
        with trio.move_on_after(timeout):
            while self.ledger.height < height:
                await self.new_block.wait()
        return self.ledger.height >= height
