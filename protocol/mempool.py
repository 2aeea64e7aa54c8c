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
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from protocol.ledger import CheckedTx, TxRefused

MAX_MEMPOOL_TXS = 8_000  # about 7 full blocks: beyond, others' txs are refused
RETRY_TTL_MS = 600_000  # a tx refused as "not yet" is kept this long after it arrived


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
