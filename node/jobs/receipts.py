"""Contribution receipts and this node's feed (specs/jobs.md, "Receipts" and "Feed").

A receipt is stored once it verifies (both signatures, protocol.jobs.open_receipt) and
appended to this node's own feed: a chain of entries it signs, each naming its sequence
number and the id of the one before (protocol.feed), as in Secure Scuttlebutt. Entries
are written one at a time under a lock, so the chain never branches here; a second,
different entry at one position can only come from a node that signs two, and
protocol.feed turns that into evidence.
"""

from __future__ import annotations

import builtins
import logging
from collections.abc import Callable
from typing import Any

import trio
from nacl.signing import SigningKey

from node.storage import ReceiptRow, Storage
from protocol.errors import RemoteProtocolError
from protocol.feed import FEED_KIND_RECEIPT, entry_id, next_entry, open_entry
from protocol.jobs import Receipt, open_receipt, receipt_id

log = logging.getLogger(__name__)


class Receipts:
    def __init__(self, storage: Storage, key: SigningKey, peer_id: str,
                 clock_ms: Callable[[], int]) -> None:
        self.storage = storage
        self.key = key
        self.peer_id = peer_id
        self.clock_ms = clock_ms
        self._lock = trio.Lock()

    async def store(self, envelope: bytes, *, expect_worker: str | None = None,
                    expect_coordinator: str | None = None) -> Receipt:
        """Verify and keep a receipt, once; append it to this node's feed when new.
        RemoteProtocolError when it does not verify or names someone unexpected."""
        receipt = open_receipt(envelope)
        if expect_worker is not None and receipt.worker != expect_worker:
            raise RemoteProtocolError("malformed", "the receipt names another worker")
        if expect_coordinator is not None and receipt.coordinator != expect_coordinator:
            raise RemoteProtocolError("malformed", "the receipt names another coordinator")
        row = ReceiptRow(receipt_id(envelope).hex(), receipt.job_id.hex(), receipt.round,
                         receipt.task_id, receipt.worker, receipt.coordinator,
                         receipt.issued_ms, envelope)
        if await self.storage.put_receipt(row):
            await self.append(FEED_KIND_RECEIPT, envelope)
        return receipt

    async def append(self, kind: str, payload: bytes) -> bytes:
        """Sign and store the next entry of this node's feed; its envelope bytes."""
        async with self._lock:
            head = await self.storage.feed_head(self.peer_id)
            last = None if head is None else open_entry(head[2])
            last_id = None if head is None else bytes.fromhex(head[1])
            data = next_entry(self.key, last, last_id, kind, payload, self.clock_ms())
            entry = open_entry(data)
            stored = await self.storage.append_feed(self.peer_id, entry.seq,
                                                    entry_id(data).hex(), data)
            assert stored, "this node's feed is written under one lock"
            return data

    async def list(self, job_id: str | None = None) -> list[dict[str, Any]]:
        out = []
        for row in await self.storage.list_receipts(job_id):
            r = open_receipt(row.envelope)
            out.append({"receipt": row.receipt_id, "job": row.job_id, "round": r.round,
                        "task": r.task_id, "worker": r.worker, "coordinator": r.coordinator,
                        "delta": r.delta_version.hex(), "tokens": r.tokens,
                        "metrics": dict(r.metrics), "verdict": r.verdict,
                        "issued_ms": r.issued_ms})
        return out

    async def feed(self, author: str | None = None,
                   after_seq: int = 0) -> builtins.list[dict[str, Any]]:
        out = []
        for seq, eid, data in await self.storage.feed_entries(author or self.peer_id, after_seq):
            e = open_entry(data)
            out.append({"seq": seq, "id": eid, "prev": e.prev.hex(), "kind": e.kind,
                        "created_ms": e.created_ms, "payload_bytes": len(e.payload)})
        return out
