"""The node's state in SQLite: a small key-value table, known peers, capability records,
the content store's shard metadata and pins (the shard bytes live on disk: node/smip/store.py).

aiosqlite is asyncio-only; it runs here under trio through trio-asyncio. That bridge is
confined to this module: `open_storage` opens a trio-asyncio loop for its own lifetime and
every public method of `Storage` is a trio-native coroutine. Callers never see asyncio.

Cost: every statement is a round trip trio -> asyncio loop -> aiosqlite's worker thread ->
asyncio loop -> trio. Measured (best of 10 batches of 300, on a loaded 2-core VM): about
220-260 µs a statement for ``SELECT 1`` and 260-300 µs for `kv_set`, against 1-2 µs and
25-100 µs for sqlite3 called directly (DESIGN.md's estimate was ~150 µs; a bare
``trio.to_thread.run_sync`` hop measured ~180 µs on the same machine). Reproduce with
``pytest tests/test_storage.py -m slow -s``. Fine for control-plane state; never put
per-chunk or per-token work through it: batch it into one statement instead.

Durability: the connection runs in autocommit mode (``isolation_level=None``) and every
write method is exactly one SQL statement, so the write is committed when the method
returns; a cancelled write is applied entirely or not at all (it may still land just
after the caller saw the cancellation). With WAL and
``synchronous=NORMAL`` a committed write survives the process being killed; a power loss
may roll back the last few commits (never corrupts the database).

Schema: versioned with ``PRAGMA user_version``; ``MIGRATIONS[i]`` takes version ``i`` to
``i + 1``. A database written by a newer iollm (higher user_version) is refused with
`SchemaVersionError` rather than misread.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import aiosqlite
import trio
import trio_asyncio

__all__ = [
    "MIGRATIONS",
    "SCHEMA_VERSION",
    "CapabilityRow",
    "JobRow",
    "ManifestRow",
    "PeerRow",
    "ReceiptRow",
    "SchemaVersionError",
    "ShardRow",
    "ShardUsage",
    "Storage",
    "StorageError",
    "open_storage",
]

KvValue = bytes | str | int

# Each entry is the list of statements taking the schema from version i to i + 1. Append
# only: never edit a migration that has shipped.
MIGRATIONS: list[tuple[str, ...]] = [
    (
        """CREATE TABLE kv (
            key   TEXT PRIMARY KEY,
            value BLOB NOT NULL           -- BLOB affinity: bytes, str and int kept as given
        )""",
        """CREATE TABLE peers (
            peer_id      TEXT PRIMARY KEY,
            addrs        TEXT NOT NULL,   -- JSON list of multiaddr strings
            last_seen_ms INTEGER NOT NULL
        )""",
        """CREATE TABLE capabilities (
            peer_id    TEXT PRIMARY KEY,  -- only the highest seq per peer is kept
            seq        INTEGER NOT NULL,
            expires_ms INTEGER NOT NULL,
            envelope   BLOB NOT NULL      -- the signed record, verified before storing
        )""",
        "CREATE INDEX capabilities_by_expiry ON capabilities (expires_ms)",
    ),
    (  # 1 -> 2: the content store (node/smip/store.py)
        """CREATE TABLE shards (
            root         TEXT PRIMARY KEY,  -- hex of the 32-byte hash-tree root
            size         INTEGER NOT NULL,
            chunk_size   INTEGER NOT NULL,
            state        TEXT NOT NULL CHECK (state IN ('partial', 'complete')),
            last_used_ms INTEGER NOT NULL
        )""",
        "CREATE INDEX shards_by_last_use ON shards (state, last_used_ms)",
        # No foreign key to shards: a version's shards are pinned before they are fetched,
        # so that nothing evicts them half-way through.
        """CREATE TABLE pins (
            owner TEXT NOT NULL,            -- e.g. a version id
            root  TEXT NOT NULL,
            PRIMARY KEY (owner, root)
        )""",
        "CREATE INDEX pins_by_root ON pins (root)",
    ),
    (  # 2 -> 3: SMIP versions this node holds (node/smip/service.py)
        """CREATE TABLE manifests (
            version    TEXT PRIMARY KEY,    -- hex of the version id (hash of the envelope)
            kind       TEXT NOT NULL,
            name       TEXT NOT NULL,
            created_ms INTEGER NOT NULL,
            publisher  TEXT NOT NULL,
            state      TEXT NOT NULL CHECK (state IN ('partial', 'complete')),
            envelope   BLOB NOT NULL        -- the signed manifest, verified before storing
        )""",
    ),
    (  # 3 -> 4: training jobs, contribution receipts, this node's feed (specs/jobs.md)
        """CREATE TABLE jobs (
            job_id       TEXT PRIMARY KEY,  -- hex of the job id
            envelope     BLOB NOT NULL,     -- the signed job, verified before storing
            role         TEXT NOT NULL CHECK (role IN ('coordinator', 'worker', 'seen')),
            submitted_ms INTEGER NOT NULL,
            state        TEXT NOT NULL,     -- JSON: the coordinator's progress
                                            -- (node/jobs/coordinator.py)
            updated_ms   INTEGER NOT NULL
        )""",
        """CREATE TABLE receipts (
            receipt_id  TEXT PRIMARY KEY,   -- hex of the receipt id
            job_id      TEXT NOT NULL,
            round       INTEGER NOT NULL,
            task_id     TEXT NOT NULL,
            worker      TEXT NOT NULL,
            coordinator TEXT NOT NULL,
            issued_ms   INTEGER NOT NULL,
            envelope    BLOB NOT NULL       -- the receipt, both signatures verified
        )""",
        "CREATE INDEX receipts_by_job ON receipts (job_id, round, task_id)",
        """CREATE TABLE feed (
            author   TEXT NOT NULL,         -- peer id; this node's own feed, and others'
            seq      INTEGER NOT NULL,
            entry_id TEXT NOT NULL,
            envelope BLOB NOT NULL,
            PRIMARY KEY (author, seq)       -- one entry a position: a second is a fork
        )""",
    ),
    (  # 4 -> 5: the chain's final blocks, this node's unfinished txs, ledger snapshots
        """CREATE TABLE blocks (
            height   INTEGER PRIMARY KEY,
            block_id TEXT NOT NULL UNIQUE,  -- hex
            block    BLOB NOT NULL,         -- protocol.ledger.Block bytes
            commit_  BLOB NOT NULL          -- its commit certificate, verified before storing
        )""",
        """CREATE TABLE txs (
            tx_id  TEXT PRIMARY KEY,        -- hex; every tx of a stored final block
            height INTEGER NOT NULL
        )""",
        """CREATE TABLE outbox (
            tx_id    TEXT PRIMARY KEY,      -- hex; a tx this node submitted, not yet final
            tx       BLOB NOT NULL,
            added_ms INTEGER NOT NULL
        )""",
        """CREATE TABLE ledger_snapshot (
            height INTEGER PRIMARY KEY,     -- the ledger after this block; only the latest
            state  BLOB NOT NULL            -- is kept (protocol.ledger.Ledger.encode)
        )""",
    ),
]
SCHEMA_VERSION = len(MIGRATIONS)

# How long a statement waits for a lock held by another connection (another process on
# the same node home, e.g. a CLI reading it) before failing. Spent in aiosqlite's thread,
# not in trio.
BUSY_TIMEOUT_MS = 5_000


class StorageError(Exception):
    """The node's database cannot be used as it is."""


class SchemaVersionError(StorageError):
    """The database was written by a newer iollm (its user_version is above ours)."""


@dataclass(frozen=True)
class PeerRow:
    peer_id: str
    addrs: list[str]
    last_seen_ms: int


@dataclass(frozen=True)
class CapabilityRow:
    peer_id: str
    seq: int
    expires_ms: int
    envelope: bytes


@dataclass(frozen=True)
class ShardRow:
    root: str  # hex
    size: int
    chunk_size: int
    state: str  # "partial" or "complete"
    last_used_ms: int


@dataclass(frozen=True)
class ManifestRow:
    version: str  # hex
    kind: str
    name: str
    created_ms: int
    publisher: str
    state: str  # "partial" (fetch begun) or "complete" (every shard held)
    envelope: bytes


@dataclass(frozen=True)
class JobRow:
    job_id: str
    envelope: bytes
    role: str  # "coordinator", "worker" or "seen" (announced on gossip)
    submitted_ms: int
    state: str  # JSON, "" when this node does not coordinate the job
    updated_ms: int


@dataclass(frozen=True)
class ReceiptRow:
    receipt_id: str
    job_id: str
    round: int
    task_id: str
    worker: str
    coordinator: str
    issued_ms: int
    envelope: bytes


@dataclass(frozen=True)
class ShardUsage:
    """Byte totals over the shards table; each shard counts once at its full size."""

    used_bytes: int  # every shard, partial ones included (their space is reserved)
    pinned_bytes: int  # shards with at least one pin
    partial_bytes: int  # shards being fetched
    held_bytes: int  # pinned or partial: what eviction cannot free


class Storage:
    """Trio-native access to the node's SQLite database. Get one from `open_storage`.

    Methods may be called from any trio task of the run that opened it; aiosqlite runs
    statements one at a time, in call order.
    """

    def __init__(self, loop: trio_asyncio.TrioEventLoop, conn: aiosqlite.Connection) -> None:
        self._loop = loop
        self._conn = conn

    # -- the bridge: the only two places that cross into asyncio ------------------------

    async def _run(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """Run one statement (autocommitted) and return all its rows."""
        rows = await self._loop.run_aio_coroutine(self._conn.execute_fetchall(sql, params))
        return [tuple(row) for row in rows]

    async def _close(self) -> None:
        await self._loop.run_aio_coroutine(self._conn.close())

    # -- key-value ----------------------------------------------------------------------

    async def kv_get(self, key: str) -> KvValue | None:
        """The value stored under `key` (bytes, str or int as it was set), or None."""
        rows = await self._run("SELECT value FROM kv WHERE key = ?", (key,))
        return rows[0][0] if rows else None

    async def kv_set(self, key: str, value: KvValue) -> None:
        """Store `value` under `key`, replacing any previous value; committed on return."""
        if isinstance(value, bool) or not isinstance(value, bytes | str | int):
            raise TypeError(f"kv values are bytes, str or int, not {type(value).__name__}")
        await self._run(
            "INSERT INTO kv (key, value) VALUES (?, ?)"
            " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (key, value),
        )

    async def kv_increment(self, key: str, by: int = 1) -> int:
        """Atomically add `by` to the int under `key` (absent counts as 0); return the sum.

        For counters that must keep increasing across restarts, such as the sequence
        number of this node's capability record. Committed on return.
        """
        rows = await self._run(
            "INSERT INTO kv (key, value) VALUES (?, ?)"
            " ON CONFLICT (key) DO UPDATE SET value = value + excluded.value"
            " RETURNING value",
            (key, by),
        )
        value = rows[0][0]
        if not isinstance(value, int):
            raise StorageError(f"kv key {key!r} does not hold an int")
        return value

    # -- peers --------------------------------------------------------------------------

    async def upsert_peer(self, peer_id: str, addrs: list[str], last_seen_ms: int) -> None:
        """Insert or replace what is known of `peer_id`; committed on return."""
        await self._run(
            "INSERT INTO peers (peer_id, addrs, last_seen_ms) VALUES (?, ?, ?)"
            " ON CONFLICT (peer_id) DO UPDATE"
            " SET addrs = excluded.addrs, last_seen_ms = excluded.last_seen_ms",
            (peer_id, json.dumps(list(addrs)), last_seen_ms),
        )

    async def get_peer(self, peer_id: str) -> PeerRow | None:
        rows = await self._run(
            "SELECT peer_id, addrs, last_seen_ms FROM peers WHERE peer_id = ?", (peer_id,)
        )
        return _peer_row(rows[0]) if rows else None

    async def list_peers(self) -> list[PeerRow]:
        """All known peers, most recently seen first."""
        rows = await self._run(
            "SELECT peer_id, addrs, last_seen_ms FROM peers ORDER BY last_seen_ms DESC, peer_id"
        )
        return [_peer_row(row) for row in rows]

    # -- capability records -------------------------------------------------------------

    async def put_capability(
        self, peer_id: str, seq: int, expires_ms: int, envelope: bytes
    ) -> bool:
        """Keep this record if its seq is higher than the stored one for `peer_id`.

        Returns True if stored, False if a record with an equal or higher seq was already
        there (it stays, even if expired: `prune_capabilities` removes expired records).
        The caller verifies the envelope first. One statement, committed on return.
        """
        rows = await self._run(
            "INSERT INTO capabilities (peer_id, seq, expires_ms, envelope) VALUES (?, ?, ?, ?)"
            " ON CONFLICT (peer_id) DO UPDATE"
            " SET seq = excluded.seq, expires_ms = excluded.expires_ms,"
            " envelope = excluded.envelope"
            " WHERE excluded.seq > capabilities.seq"
            " RETURNING seq",
            (peer_id, seq, expires_ms, bytes(envelope)),
        )
        return bool(rows)

    async def get_capability(self, peer_id: str, now_ms: int | None = None) -> CapabilityRow | None:
        """The stored record of `peer_id`; with `now_ms`, None if it has expired."""
        sql = "SELECT peer_id, seq, expires_ms, envelope FROM capabilities WHERE peer_id = ?"
        params: tuple[Any, ...] = (peer_id,)
        if now_ms is not None:
            sql += " AND expires_ms > ?"
            params += (now_ms,)
        rows = await self._run(sql, params)
        return _capability_row(rows[0]) if rows else None

    async def list_capabilities(self, now_ms: int) -> list[CapabilityRow]:
        """The records not expired at `now_ms` (expires_ms > now_ms), by peer id."""
        rows = await self._run(
            "SELECT peer_id, seq, expires_ms, envelope FROM capabilities"
            " WHERE expires_ms > ? ORDER BY peer_id",
            (now_ms,),
        )
        return [_capability_row(row) for row in rows]

    async def prune_capabilities(self, now_ms: int) -> int:
        """Delete the records expired at `now_ms`; return how many. Committed on return."""
        rows = await self._run(
            "DELETE FROM capabilities WHERE expires_ms <= ? RETURNING peer_id", (now_ms,)
        )
        return len(rows)


    # -- SMIP versions (node/smip/service.py) ---------------------------------------------------

    async def put_manifest(self, row: ManifestRow) -> None:
        """Insert or replace the row of a version; committed on return."""
        await self._run(
            "INSERT OR REPLACE INTO manifests"
            " (version, kind, name, created_ms, publisher, state, envelope)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            (row.version, row.kind, row.name, row.created_ms, row.publisher, row.state,
             row.envelope),
        )

    async def list_manifests(self) -> list[ManifestRow]:
        rows = await self._run(
            "SELECT version, kind, name, created_ms, publisher, state, envelope FROM manifests"
            " ORDER BY created_ms DESC, version")
        return [ManifestRow(*r) for r in rows]

    async def set_manifest_state(self, version: str, state: str) -> None:
        await self._run("UPDATE manifests SET state = ? WHERE version = ?", (state, version))

    # -- content store: shards and pins (node/smip/store.py) ---------------------------

    async def put_shard(
        self, root: str, size: int, chunk_size: int, state: str, last_used_ms: int
    ) -> None:
        """Insert or replace the row of shard `root` (hex); committed on return."""
        await self._run(
            "INSERT INTO shards (root, size, chunk_size, state, last_used_ms)"
            " VALUES (?, ?, ?, ?, ?)"
            " ON CONFLICT (root) DO UPDATE SET size = excluded.size,"
            " chunk_size = excluded.chunk_size, state = excluded.state,"
            " last_used_ms = excluded.last_used_ms",
            (root, size, chunk_size, state, last_used_ms),
        )

    async def get_shard(self, root: str) -> ShardRow | None:
        rows = await self._run(f"SELECT {_SHARD_COLUMNS} FROM shards WHERE root = ?", (root,))
        return ShardRow(*rows[0]) if rows else None

    async def list_shards(self) -> list[ShardRow]:
        """Every shard row, by root."""
        rows = await self._run(f"SELECT {_SHARD_COLUMNS} FROM shards ORDER BY root")
        return [ShardRow(*row) for row in rows]

    async def touch_shard(self, root: str, last_used_ms: int) -> bool:
        """Set the last use of `root`; False if there is no such shard."""
        rows = await self._run(
            "UPDATE shards SET last_used_ms = ? WHERE root = ? RETURNING root",
            (last_used_ms, root),
        )
        return bool(rows)

    async def delete_shard(self, root: str) -> bool:
        """Delete the row of `root` (its pins stay); False if there was none."""
        rows = await self._run("DELETE FROM shards WHERE root = ? RETURNING root", (root,))
        return bool(rows)

    async def shard_usage(self) -> ShardUsage:
        rows = await self._run(
            "SELECT COALESCE(SUM(size), 0),"
            " COALESCE(SUM(CASE WHEN pinned THEN size END), 0),"
            " COALESCE(SUM(CASE WHEN state = 'partial' THEN size END), 0),"
            " COALESCE(SUM(CASE WHEN pinned OR state = 'partial' THEN size END), 0)"
            " FROM (SELECT size, state,"
            " EXISTS (SELECT 1 FROM pins WHERE pins.root = shards.root) AS pinned FROM shards)"
        )
        return ShardUsage(*rows[0])

    async def eviction_candidates(self) -> list[ShardRow]:
        """Complete shards without any pin, least recently used first."""
        rows = await self._run(
            f"SELECT {_SHARD_COLUMNS} FROM shards WHERE state = 'complete'"
            " AND NOT EXISTS (SELECT 1 FROM pins WHERE pins.root = shards.root)"
            " ORDER BY last_used_ms, root"
        )
        return [ShardRow(*row) for row in rows]

    async def add_pins(self, owner: str, roots: Sequence[str]) -> int:
        """Pin each root (hex) for `owner`; return how many pins are new."""
        rows = await self._run(
            "INSERT INTO pins (owner, root) SELECT ?, value FROM json_each(?) WHERE true"
            " ON CONFLICT (owner, root) DO NOTHING RETURNING root",
            (owner, json.dumps(list(roots))),
        )
        return len(rows)

    async def remove_pins(self, owner: str) -> int:
        """Drop every pin of `owner`; return how many."""
        rows = await self._run("DELETE FROM pins WHERE owner = ? RETURNING root", (owner,))
        return len(rows)

    async def list_pins(self, owner: str) -> list[str]:
        """The roots (hex) `owner` pins, sorted."""
        rows = await self._run("SELECT root FROM pins WHERE owner = ? ORDER BY root", (owner,))
        return [row[0] for row in rows]


    # -- training jobs, receipts and feeds (node/jobs/coordinator.py, node/jobs/worker.py) --

    async def put_job(self, row: JobRow) -> None:
        """Insert a job, or update its role (a coordinator row is never downgraded) and
        state; committed on return."""
        await self._run(
            "INSERT INTO jobs (job_id, envelope, role, submitted_ms, state, updated_ms)"
            " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (job_id) DO UPDATE SET"
            " role = CASE WHEN jobs.role = 'coordinator' THEN jobs.role"
            " WHEN excluded.role = 'seen' THEN jobs.role ELSE excluded.role END,"
            " state = CASE WHEN excluded.state = '' THEN jobs.state ELSE excluded.state END,"
            " updated_ms = excluded.updated_ms",
            (row.job_id, row.envelope, row.role, row.submitted_ms, row.state, row.updated_ms),
        )

    async def list_jobs(self) -> list[JobRow]:
        rows = await self._run(f"SELECT {_JOB_COLUMNS} FROM jobs ORDER BY submitted_ms DESC")
        return [JobRow(*r) for r in rows]

    async def get_job(self, job_id: str) -> JobRow | None:
        rows = await self._run(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE job_id = ?", (job_id,))
        return JobRow(*rows[0]) if rows else None

    async def put_receipt(self, row: ReceiptRow) -> bool:
        """Store a verified receipt; False when it was already stored (counted once)."""
        rows = await self._run(
            "INSERT INTO receipts (receipt_id, job_id, round, task_id, worker, coordinator,"
            " issued_ms, envelope) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
            " ON CONFLICT (receipt_id) DO NOTHING RETURNING receipt_id",
            (row.receipt_id, row.job_id, row.round, row.task_id, row.worker, row.coordinator,
             row.issued_ms, row.envelope),
        )
        return bool(rows)

    async def list_receipts(self, job_id: str | None = None) -> list[ReceiptRow]:
        where, params = ("WHERE job_id = ?", (job_id,)) if job_id else ("", ())
        rows = await self._run(f"SELECT {_RECEIPT_COLUMNS} FROM receipts {where}"
                               " ORDER BY job_id, round, task_id, issued_ms", params)
        return [ReceiptRow(*r) for r in rows]

    async def append_feed(self, author: str, seq: int, entry_id: str, envelope: bytes) -> bool:
        """Store a feed entry at its position; False when that position is already taken
        (the caller compares the two: the same entry again, or a fork)."""
        rows = await self._run(
            "INSERT INTO feed (author, seq, entry_id, envelope) VALUES (?, ?, ?, ?)"
            " ON CONFLICT (author, seq) DO NOTHING RETURNING seq",
            (author, seq, entry_id, envelope))
        return bool(rows)

    async def feed_entries(self, author: str, after_seq: int = 0, limit: int = 1000
                           ) -> list[tuple[int, str, bytes]]:
        """(seq, entry id, envelope) of ``author``'s entries after ``after_seq``, in order."""
        rows = await self._run(
            "SELECT seq, entry_id, envelope FROM feed WHERE author = ? AND seq > ?"
            " ORDER BY seq LIMIT ?", (author, after_seq, limit))
        return [(r[0], r[1], r[2]) for r in rows]

    async def feed_head(self, author: str) -> tuple[int, str, bytes] | None:
        rows = await self._run(
            "SELECT seq, entry_id, envelope FROM feed WHERE author = ? ORDER BY seq DESC"
            " LIMIT 1", (author,))
        return (rows[0][0], rows[0][1], rows[0][2]) if rows else None


    # -- chain --------------------------------------------------------------------------

    async def put_block(self, height: int, block_id: str, block: bytes, commit: bytes,
                        tx_ids: Sequence[str] = ()) -> bool:
        """Store a final block, its certificate and the index of its txs; False when that
        height is stored. (The index is written after the block: a crash between leaves
        txs unindexed, and the ledger, which replays blocks, still counts them once.)"""
        rows = await self._run(
            "INSERT INTO blocks (height, block_id, block, commit_) VALUES (?, ?, ?, ?)"
            " ON CONFLICT DO NOTHING RETURNING height", (height, block_id, block, commit))
        if not rows:
            return False
        for start in range(0, len(tx_ids), 400):  # 2 parameters a row, under SQLite's cap
            part = tx_ids[start:start + 400]
            await self._run("INSERT INTO txs (tx_id, height) VALUES "
                            + ",".join(["(?, ?)"] * len(part)) + " ON CONFLICT DO NOTHING",
                            [x for t in part for x in (t, height)])
        return True

    async def tx_heights(self, tx_ids: Sequence[str]) -> dict[str, int]:
        """tx id -> the height of the stored final block holding it, for those that are."""
        out: dict[str, int] = {}
        for start in range(0, len(tx_ids), 500):
            part = list(tx_ids[start:start + 500])
            rows = await self._run(f"SELECT tx_id, height FROM txs WHERE tx_id IN "
                                   f"({','.join('?' * len(part))})", part)
            out.update((r[0], r[1]) for r in rows)
        return out

    async def get_blocks(self, from_height: int, limit: int) -> list[tuple[int, bytes, bytes]]:
        """(height, block, commit) from ``from_height`` on, in order, at most ``limit``."""
        rows = await self._run(
            "SELECT height, block, commit_ FROM blocks WHERE height >= ? ORDER BY height"
            " LIMIT ?", (from_height, limit))
        return [(r[0], bytes(r[1]), bytes(r[2])) for r in rows]

    async def last_blocks(self, limit: int) -> list[tuple[int, bytes, bytes]]:
        """The ``limit`` highest blocks, highest first."""
        rows = await self._run(
            "SELECT height, block, commit_ FROM blocks ORDER BY height DESC LIMIT ?", (limit,))
        return [(r[0], bytes(r[1]), bytes(r[2])) for r in rows]

    async def put_snapshot(self, height: int, state: bytes) -> None:
        """Keep ``state`` as the ledger after block ``height``, in place of older ones."""
        await self._run("INSERT OR REPLACE INTO ledger_snapshot (height, state) VALUES (?, ?)",
                        (height, state))
        await self._run("DELETE FROM ledger_snapshot WHERE height < ?", (height,))

    async def get_snapshot(self) -> tuple[int, bytes] | None:
        rows = await self._run(
            "SELECT height, state FROM ledger_snapshot ORDER BY height DESC LIMIT 1")
        return (rows[0][0], bytes(rows[0][1])) if rows else None

    async def outbox_add(self, rows: Sequence[tuple[str, bytes, int]]) -> None:
        """Keep (tx id, tx, added_ms) rows, in as few statements as SQLite allows (a
        validator's API may take a thousand txs at once)."""
        for start in range(0, len(rows), 300):  # 3 parameters a row, under SQLite's cap
            part = rows[start:start + 300]
            await self._run("INSERT INTO outbox (tx_id, tx, added_ms) VALUES "
                            + ",".join(["(?, ?, ?)"] * len(part)) + " ON CONFLICT DO NOTHING",
                            [x for row in part for x in row])

    async def outbox(self, limit: int = -1) -> list[tuple[str, bytes, int]]:
        """(tx id, tx, added_ms), oldest first, at most ``limit`` (-1: all)."""
        rows = await self._run("SELECT tx_id, tx, added_ms FROM outbox ORDER BY added_ms"
                               " LIMIT ?", (limit,))
        return [(r[0], bytes(r[1]), r[2]) for r in rows]

    async def outbox_remove(self, tx_ids: Sequence[str]) -> None:
        for start in range(0, len(tx_ids), 500):  # under SQLite's bound-parameter cap
            part = list(tx_ids[start:start + 500])
            await self._run(f"DELETE FROM outbox WHERE tx_id IN ({','.join('?' * len(part))})",
                            part)


_SHARD_COLUMNS = "root, size, chunk_size, state, last_used_ms"
_JOB_COLUMNS = "job_id, envelope, role, submitted_ms, state, updated_ms"
_RECEIPT_COLUMNS = ("receipt_id, job_id, round, task_id, worker, coordinator, issued_ms,"
                    " envelope")


def _peer_row(row: tuple[Any, ...]) -> PeerRow:
    return PeerRow(peer_id=row[0], addrs=json.loads(row[1]), last_seen_ms=row[2])


def _capability_row(row: tuple[Any, ...]) -> CapabilityRow:
    return CapabilityRow(peer_id=row[0], seq=row[1], expires_ms=row[2], envelope=bytes(row[3]))


@asynccontextmanager
async def open_storage(path: str | os.PathLike[str]) -> AsyncIterator[Storage]:
    """Open (creating if needed) and migrate the database at `path`.

    ``async with open_storage(home / "node.db") as db: ...``. Raises `SchemaVersionError`
    for a database of a newer schema, `StorageError` if WAL cannot be enabled, and
    sqlite3 errors as they come (e.g. the directory does not exist).
    """
    path_text = os.fspath(path)
    try:
        async with trio_asyncio.open_loop() as loop:
            # Shielded: a connect abandoned half-way would leave aiosqlite's (non-daemon)
            # worker thread calling back into a closed loop, and no handle to stop it.
            with trio.CancelScope(shield=True):
                conn = await loop.run_aio_coroutine(
                    aiosqlite.connect(path_text, isolation_level=None)  # autocommit
                )
            db = Storage(loop, conn)
            try:
                await _configure(db, path_text)
                await _migrate(db, path_text)
                yield db
            finally:
                with trio.CancelScope(shield=True):
                    await db._close()
    except BaseExceptionGroup as group:
        # The bridge loop's internal nurseries wrap whatever crosses them, the caller's
        # own exceptions included; the loop is our detail, so hand back a lone exception
        # as itself.
        exc = _sole_exception(group)
        if exc is group:
            raise
        context = exc.__context__
        try:
            raise exc
        finally:
            exc.__context__ = context  # not the group that it was unwrapped from
            del exc, group


def _sole_exception(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


async def _configure(db: Storage, path: str) -> None:
    await db._run(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    mode = (await db._run("PRAGMA journal_mode = WAL"))[0][0]
    if mode != "wal" and path != ":memory:":
        raise StorageError(f"{path}: cannot enable WAL journal mode (got {mode!r})")
    await db._run("PRAGMA synchronous = NORMAL")


async def _migrate(db: Storage, path: str) -> None:
    # The version check and the migrations share one write transaction, so two processes
    # opening the same new database do not both migrate it.
    await db._run("BEGIN IMMEDIATE")
    try:
        version = (await db._run("PRAGMA user_version"))[0][0]
        if version > SCHEMA_VERSION:
            raise SchemaVersionError(
                f"{path}: database schema version {version} is newer than this iollm"
                f" supports ({SCHEMA_VERSION}); upgrade iollm or use another node home"
            )
        for statements in MIGRATIONS[version:]:
            for statement in statements:
                await db._run(statement)
        if version != SCHEMA_VERSION:
            await db._run(f"PRAGMA user_version = {SCHEMA_VERSION}")
        await db._run("COMMIT")
    except BaseException:
        # No transaction left to roll back is fine; the original error is what matters.
        with trio.CancelScope(shield=True), contextlib.suppress(sqlite3.Error):
            await db._run("ROLLBACK")
        raise
