"""Mempool admission and expiry (specs/consensus.md, "Mempool and blocks"), sans-IO.

The transactions a node holds for a block: checked ones (``protocol.ledger.CheckedTx``),
in arrival order, at most ``max_txs`` of them. The policy:

- **Admission.** A tx already held is not added twice (it becomes *own* when this node
  submits it too). When the pool is full, others' txs are refused and this node's own are
  still taken: a node never drops what its own users asked for, and others repeat theirs.
- **Expiry.** When a block is built, the ledger refuses some txs. A refusal that can never
  succeed (``TxRefused.retry`` false: a bad nonce, a duplicate receipt) drops the tx at
  once; one that may succeed later (an unknown job, not yet final) keeps it for
  ``RETRY_TTL_MS`` after it arrived, then drops it.
- **Final.** The txs of a final block leave the pool.
- **Finality budget** (:class:`Admission`). A tx is worth taking only if the chain can
  finalize it soon. The pool counts the txs it saw finalized over the last
  ``RATE_WINDOW_MS`` (the drain rate) and takes, from outside (the API), only while the
  txs ahead of a new one would drain within the budget (:func:`budget_for`:
  ``FINALITY_BUDGET_MS``, or ``BLOCKS_AHEAD`` of the genesis's block intervals on a chain
  whose blocks come slower: with a budget shorter than the time between blocks, each
  block would cut the next one's intake, down to the floor). From gossip it takes a
  batch while fewer than ``GOSSIP_BUDGETS`` budgets' worth are waiting, so that what one
  validator took from its API the others take too. An empty pool takes any batch, and
  at least ``MIN_ADMIT`` are always taken (a chain just started or idle has no rate
  yet). What is refused is refused before any signature is checked: checking what
  cannot be finalized in time would only take CPU from the blocks.
"""

from __future__ import annotations

import math
from collections import OrderedDict, deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from protocol.ledger import CheckedTx, TxRefused

MAX_MEMPOOL_TXS = 8_000  # about 7 full blocks: beyond, others' txs are refused
RETRY_TTL_MS = 600_000  # a tx refused as "not yet" is kept this long after it arrived
FINALITY_BUDGET_MS = 1_000  # the API takes a tx while those ahead drain within this
GOSSIP_BUDGETS = 2  # gossip: within this many budgets (the API's take is taken everywhere)
BLOCKS_AHEAD = 2  # the budget is at least this many block intervals
RATE_WINDOW_MS = 5_000  # the drain rate: txs finalized over this long
MIN_ADMIT = 500  # a pool of fewer txs always takes more, whatever the rate
MAX_RETRY_AFTER_S = 30


@dataclass
class Waiting:
    """A tx in the pool: when it arrived (ms) and whether this node submitted it."""

    tx: CheckedTx
    added_ms: int
    own: bool


class Mempool:
    """Checked transactions waiting for a block, in arrival order, bounded in count."""

    def __init__(self, max_txs: int = MAX_MEMPOOL_TXS, retry_ttl_ms: int = RETRY_TTL_MS
                 ) -> None:
        self.max_txs = max_txs
        self.retry_ttl_ms = retry_ttl_ms
        self._txs: OrderedDict[bytes, Waiting] = OrderedDict()

    def __len__(self) -> int:
        return len(self._txs)

    def __contains__(self, tx_id: object) -> bool:
        return tx_id in self._txs

    def is_full(self, adding: int = 1) -> bool:
        """Whether ``adding`` more txs would take the pool past its bound."""
        return len(self._txs) + adding > self.max_txs

    def add(self, tx: CheckedTx, now_ms: int, *, own: bool = False) -> bool:
        """Keep ``tx``; False when it is there already or the pool is full of others'."""
        held = self._txs.get(tx.id)
        if held is not None:
            held.own |= own
            return False
        if len(self._txs) >= self.max_txs and not own:
            return False
        self._txs[tx.id] = Waiting(tx, now_ms, own)
        return True

    def own(self) -> list[Waiting]:
        return [w for w in self._txs.values() if w.own]

    def candidates(self) -> list[CheckedTx]:
        """Every tx held, oldest first: what a block is built from."""
        return [w.tx for w in self._txs.values()]

    def drop(self, tx_ids: Iterable[bytes]) -> None:
        for t in tx_ids:
            self._txs.pop(t, None)

    def refused(self, refusals: Sequence[tuple[CheckedTx, TxRefused]], now_ms: int) -> list[bytes]:
        """Drop what can never apply and what waited too long for its turn; the ids dropped."""
        gone = [tx.id for tx, why in refusals
                if tx.id in self._txs
                if not why.retry or now_ms - self._txs[tx.id].added_ms > self.retry_ttl_ms]
        self.drop(gone)
        return gone


def budget_for(block_interval_ms: int) -> int:
    """The finality budget of a chain: FINALITY_BUDGET_MS, or BLOCKS_AHEAD block
    intervals, whichever is longer. (The genesis's interval, not the measured time
    between blocks: that grows with the blocks' size, and a budget following it would
    let blocks, and the latency, grow without end.)"""
    return max(FINALITY_BUDGET_MS, BLOCKS_AHEAD * block_interval_ms)


class Admission:
    """The finality budget: how many txs a pool may hold and still see the last of them
    final within ``budget_ms``, at the rate blocks have been draining it."""

    def __init__(self, budget_ms: int = FINALITY_BUDGET_MS, window_ms: int = RATE_WINDOW_MS,
                 floor: int = MIN_ADMIT) -> None:
        self.budget_ms = budget_ms
        self.window_ms = window_ms
        self.floor = floor
        self._final: deque[tuple[int, int]] = deque()  # (ms, txs) of each final block
        self._in_window = 0

    def finalized(self, txs: int, now_ms: int) -> None:
        """A block of ``txs`` txs became final."""
        self._final.append((now_ms, txs))
        self._in_window += txs
        self._trim(now_ms)

    def rate(self, now_ms: int) -> float:
        """Txs finalized per second over the window."""
        self._trim(now_ms)
        return self._in_window * 1000 / self.window_ms

    def limit(self, now_ms: int, budgets: int = 1) -> int:
        """The most txs a pool may hold: what drains within ``budgets`` budgets."""
        return max(self.floor, int(self.rate(now_ms) * self.budget_ms * budgets / 1000))

    def admits(self, held: int, adding: int, now_ms: int, budgets: int = 1) -> bool:
        return held == 0 or held + adding <= self.limit(now_ms, budgets)

    def retry_after_s(self, held: int, adding: int, now_ms: int) -> int:
        """Seconds until a pool of ``held`` txs would take ``adding`` more, at the
        current rate (1 to MAX_RETRY_AFTER_S; the most when nothing drains)."""
        rate = self.rate(now_ms)
        if rate <= 0:
            return MAX_RETRY_AFTER_S
        room = max(0, self.limit(now_ms) - adding)  # what may still be held then
        return min(MAX_RETRY_AFTER_S, max(1, math.ceil((held - room) / rate)))

    def _trim(self, now_ms: int) -> None:
        while self._final and self._final[0][0] <= now_ms - self.window_ms:
            self._in_window -= self._final.popleft()[1]
