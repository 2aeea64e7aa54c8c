"""node/storage.py on real SQLite files under trio (trio-asyncio inside the module)."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import trio

from node.storage import (
    SCHEMA_VERSION,
    CapabilityRow,
    PeerRow,
    SchemaVersionError,
    open_storage,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
DEADLINE_S = 30


def run(fn: Callable[..., Awaitable[Any]], *args: Any) -> Any:
    """trio.run with a hard deadline on the whole test body."""

    async def main() -> Any:
        with trio.fail_after(DEADLINE_S):
            return await fn(*args)

    return trio.run(main)


def test_fresh_database_is_wal_and_current_schema(tmp_path: Path) -> None:
    path = tmp_path / "node.db"

    async def body() -> None:
        async with open_storage(path) as db:
            assert await db.kv_get("missing") is None

    run(body)
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


def test_kv_round_trips_keep_types(tmp_path: Path) -> None:
    async def body() -> None:
        async with open_storage(tmp_path / "node.db") as db:
            await db.kv_set("b", b"\x00\xffbytes")
            await db.kv_set("s", "text é")
            await db.kv_set("i", 2**62)
            assert await db.kv_get("b") == b"\x00\xffbytes"
            assert await db.kv_get("s") == "text é"
            assert await db.kv_get("i") == 2**62
            await db.kv_set("s", 5)
            assert await db.kv_get("s") == 5
            with pytest.raises(TypeError):
                await db.kv_set("x", 1.5)  # type: ignore[arg-type]
            with pytest.raises(TypeError):
                await db.kv_set("x", True)

    run(body)


def test_kv_increment_is_atomic_across_tasks_and_survives_reopen(tmp_path: Path) -> None:
    path = tmp_path / "node.db"

    async def first() -> list[int]:
        seen: list[int] = []
        async with open_storage(path) as db:

            async def bump() -> None:
                seen.append(await db.kv_increment("cap_seq"))

            async with trio.open_nursery() as nursery:
                for _ in range(20):
                    nursery.start_soon(bump)
        return seen

    async def second() -> int:
        async with open_storage(path) as db:
            return await db.kv_increment("cap_seq")

    assert sorted(run(first)) == list(range(1, 21))
    assert run(second) == 21


def test_peers_round_trip_and_upsert(tmp_path: Path) -> None:
    async def body() -> None:
        async with open_storage(tmp_path / "node.db") as db:
            assert await db.get_peer("A") is None
            await db.upsert_peer("A", ["/ip4/127.0.0.1/tcp/1"], 100)
            await db.upsert_peer("B", [], 300)
            await db.upsert_peer("A", ["/ip4/127.0.0.1/tcp/2", "/ip6/::1/tcp/2"], 200)
            assert await db.get_peer("A") == PeerRow(
                "A", ["/ip4/127.0.0.1/tcp/2", "/ip6/::1/tcp/2"], 200
            )
            assert [p.peer_id for p in await db.list_peers()] == ["B", "A"]

    run(body)


def test_capability_highest_seq_wins(tmp_path: Path) -> None:
    async def body() -> None:
        async with open_storage(tmp_path / "node.db") as db:
            assert await db.put_capability("A", 5, 1_000, b"five")
            assert not await db.put_capability("A", 4, 9_000, b"four")
            assert not await db.put_capability("A", 5, 9_000, b"five again")
            assert await db.get_capability("A") == CapabilityRow("A", 5, 1_000, b"five")
            assert await db.put_capability("A", 6, 2_000, b"six")
            assert await db.get_capability("A") == CapabilityRow("A", 6, 2_000, b"six")
            assert await db.get_capability("nobody") is None

    run(body)


def test_capability_expiry_filtering_and_prune(tmp_path: Path) -> None:
    async def body() -> None:
        async with open_storage(tmp_path / "node.db") as db:
            await db.put_capability("A", 1, 1_000, b"a")
            await db.put_capability("B", 1, 2_000, b"b")
            await db.put_capability("C", 1, 3_000, b"c")
            assert [r.peer_id for r in await db.list_capabilities(0)] == ["A", "B", "C"]
            # expires_ms is the first instant at which the record is no longer valid
            assert [r.peer_id for r in await db.list_capabilities(2_000)] == ["C"]
            assert await db.get_capability("A", now_ms=1_000) is None
            assert await db.get_capability("A", now_ms=999) is not None
            assert await db.get_capability("A") is not None  # no now: expired ones too
            assert await db.prune_capabilities(2_000) == 2
            assert await db.prune_capabilities(2_000) == 0
            assert await db.get_capability("A") is None
            assert [r.peer_id for r in await db.list_capabilities(0)] == ["C"]

    run(body)


def test_reopen_persists(tmp_path: Path) -> None:
    path = tmp_path / "node.db"

    async def write() -> None:
        async with open_storage(path) as db:
            await db.kv_set("k", "v")
            await db.upsert_peer("A", ["/ip4/127.0.0.1/tcp/1"], 7)
            await db.put_capability("A", 3, 10_000, b"env")

    async def read() -> None:
        async with open_storage(path) as db:
            assert await db.kv_get("k") == "v"
            assert await db.get_peer("A") == PeerRow("A", ["/ip4/127.0.0.1/tcp/1"], 7)
            assert await db.get_capability("A") == CapabilityRow("A", 3, 10_000, b"env")

    run(write)
    run(read)


def test_two_databases_in_one_run(tmp_path: Path) -> None:
    """Several nodes share one process in tests: each has its own bridge loop."""

    async def body() -> None:
        async with open_storage(tmp_path / "a.db") as a, open_storage(tmp_path / "b.db") as b:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(a.kv_set, "who", "a")
                nursery.start_soon(b.kv_set, "who", "b")
            assert await a.kv_get("who") == "a"
            assert await b.kv_get("who") == "b"

    run(body)


def test_cancelled_call_leaves_storage_usable(tmp_path: Path) -> None:
    async def body() -> None:
        async with open_storage(tmp_path / "node.db") as db:
            for i in range(20):
                with trio.move_on_after(0):
                    await db.kv_set("k", i)
            # Either applied or not, never half-applied, and no transaction left open.
            assert await db.kv_get("k") in (None, *range(20))
            await db.kv_set("k", "after")
            assert await db.kv_get("k") == "after"

    run(body)


CRASH_CHILD = textwrap.dedent(
    """
    import sys
    import trio
    from node.storage import open_storage

    async def main():
        async with open_storage(sys.argv[1]) as db:
            await db.kv_set("cap_seq", 42)
            await db.upsert_peer("A", ["/ip4/127.0.0.1/tcp/4001"], 123)
            await db.put_capability("A", 7, 10**15, b"envelope")
            print("written", flush=True)
            await trio.sleep_forever()

    trio.run(main)
    """
)


def test_write_survives_sigkill(tmp_path: Path) -> None:
    path = tmp_path / "node.db"

    async def crash_child() -> None:
        proc = await trio.lowlevel.open_process(
            [sys.executable, "-c", CRASH_CHILD, str(path)],
            stdout=subprocess.PIPE,
            cwd=REPO_ROOT,
        )
        assert proc.stdout is not None
        try:
            out = b""
            while b"written\n" not in out:
                chunk = await proc.stdout.receive_some()
                assert chunk, f"child exited early: {out!r}"
                out += chunk
            proc.send_signal(signal.SIGKILL)  # no close, no checkpoint, no atexit
        finally:
            if proc.returncode is None:
                proc.kill()
            await proc.wait()
            await proc.stdout.aclose()
        assert proc.returncode == -signal.SIGKILL

    async def reopen() -> None:
        async with open_storage(path) as db:
            assert await db.kv_get("cap_seq") == 42
            assert await db.get_peer("A") == PeerRow("A", ["/ip4/127.0.0.1/tcp/4001"], 123)
            assert await db.get_capability("A") == CapabilityRow("A", 7, 10**15, b"envelope")

    run(crash_child)
    # The writes sit in the WAL, never checkpointed: reopening must recover them.
    assert os.path.exists(f"{path}-wal")
    run(reopen)


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "node.db"
    with sqlite3.connect(path) as conn:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()

    async def body() -> None:
        with pytest.raises(SchemaVersionError, match="newer than this iollm supports"):
            async with open_storage(path):
                pytest.fail("a newer schema was opened")

    run(body)
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION + 1
        tables = conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()
    conn.close()
    assert tables == []  # refused before touching anything


@pytest.mark.slow
def test_bridge_overhead(tmp_path: Path) -> None:
    """Print the per-statement cost of the trio-asyncio bridge (pytest -m slow -s).

    Best of several batches, to see through a loaded machine.
    """
    batches, n = 10, 300
    path = tmp_path / "node.db"

    async def timed(fn: Callable[[int], Awaitable[Any]]) -> float:
        best = float("inf")
        for _ in range(batches):
            t0 = time.perf_counter()
            for i in range(n):
                await fn(i)
            best = min(best, (time.perf_counter() - t0) / n)
        return best

    async def body() -> tuple[float, float]:
        async with open_storage(path) as db:
            select = await timed(lambda i: db._run("SELECT 1"))
            write = await timed(lambda i: db.kv_set("k", i))
        return select, write

    select, write = run(body)
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA synchronous = NORMAL")  # per connection, as open_storage sets it
    best = float("inf")
    for _ in range(batches):
        t0 = time.perf_counter()
        for _i in range(n):
            conn.execute("SELECT 1").fetchall()
        best = min(best, (time.perf_counter() - t0) / n)
    t0 = time.perf_counter()
    for i in range(n):
        conn.execute("INSERT OR REPLACE INTO kv (key, value) VALUES ('k', ?)", (i,))
    direct_write = (time.perf_counter() - t0) / n
    conn.close()
    print(
        f"\nbridge: SELECT 1 {select * 1e6:.0f} µs, kv_set {write * 1e6:.0f} µs;"
        f" sqlite3 direct: SELECT 1 {best * 1e6:.1f} µs, write {direct_write * 1e6:.0f} µs"
    )
    assert select < 0.05  # a sanity bound, not a benchmark gate


def test_caller_errors_and_cancellation_pass_through_unwrapped(tmp_path: Path) -> None:
    """The bridge's internal nurseries must not turn the caller's errors into groups."""
    path = tmp_path / "node.db"

    async def body() -> None:
        with pytest.raises(KeyError, match="mine"):
            async with open_storage(path) as db:
                await db.kv_set("k", 1)
                raise KeyError("mine")
        with trio.CancelScope() as scope:
            async with open_storage(path) as db:
                await db.kv_set("k", 2)
                scope.cancel()
                await trio.sleep_forever()
        assert scope.cancelled_caught
        for delay in (0, 0.001, 0.01):  # cancelled while opening, at various points
            with trio.move_on_after(delay):
                async with open_storage(path) as db:
                    await trio.sleep_forever()
        async with open_storage(path) as db:
            assert await db.kv_get("k") == 2

    run(body)


def test_blocks_one_per_height_in_order_and_latest_first(tmp_path: Path) -> None:
    path = tmp_path / "node.db"

    async def body() -> None:
        async with open_storage(path) as db:
            assert await db.get_blocks(1, 10) == []
            assert await db.last_blocks(5) == []
            for h in (1, 2, 3, 5, 4):  # stored out of order: read back in height order
                assert await db.put_block(h, f"{h:064x}", b"block%d" % h, b"commit%d" % h)
            # A second block at a height is refused, the first stays (consensus and sync
            # may both bring a height: the first to store it wins).
            assert not await db.put_block(2, "ff" * 32, b"other", b"other commit")
            assert await db.get_blocks(2, 1) == [(2, b"block2", b"commit2")]
            assert [h for h, _, _ in await db.get_blocks(1, 10)] == [1, 2, 3, 4, 5]
            assert await db.get_blocks(4, 10) == [(4, b"block4", b"commit4"),
                                                  (5, b"block5", b"commit5")]
            assert await db.get_blocks(6, 10) == []
            assert [h for h, _, _ in await db.get_blocks(2, 2)] == [2, 3]
            assert [h for h, _, _ in await db.last_blocks(2)] == [5, 4]
            assert await db.last_blocks(1) == [(5, b"block5", b"commit5")]
        async with open_storage(path) as db:  # durable
            assert [h for h, _, _ in await db.last_blocks(10)] == [5, 4, 3, 2, 1]
            assert not await db.put_block(5, "ee" * 32, b"late", b"late")

    run(body)


def test_a_block_id_is_stored_once(tmp_path: Path) -> None:
    async def body() -> None:
        async with open_storage(tmp_path / "node.db") as db:
            assert await db.put_block(1, "aa" * 32, b"b", b"c")
            # The same block id again at another height (a block names its height, so
            # this is a caller's bug): refused as well, never stored twice.
            assert not await db.put_block(2, "aa" * 32, b"b", b"c")
            assert [h for h, _, _ in await db.get_blocks(1, 5)] == [1]

    run(body)


def test_outbox_keeps_txs_until_removed_across_restarts(tmp_path: Path) -> None:
    path = tmp_path / "node.db"

    async def body() -> None:
        async with open_storage(path) as db:
            assert await db.outbox() == []
            await db.outbox_add([("b" * 64, b"tx-b", 200), ("a" * 64, b"tx-a", 100)])
            await db.outbox_add([("b" * 64, b"tx-b again", 300)])  # kept once, as first added
            assert await db.outbox() == [("a" * 64, b"tx-a", 100), ("b" * 64, b"tx-b", 200)]
            await db.outbox_remove(["a" * 64, "c" * 64])  # one unknown id: ignored
            assert await db.outbox() == [("b" * 64, b"tx-b", 200)]
            await db.outbox_remove([])
        async with open_storage(path) as db:  # a crash must not lose a receipt
            assert await db.outbox() == [("b" * 64, b"tx-b", 200)]
            # More rows than SQLite binds in one statement: added and removed in parts.
            ids = [f"{i:064x}" for i in range(1200)]
            await db.outbox_add([(t, b"tx", 1000 + i) for i, t in enumerate(ids)])
            assert len(await db.outbox()) == 1201
            await db.outbox_remove(ids[:1199])
            assert [t for t, _, _ in await db.outbox()] == ["b" * 64, ids[1199]]

    run(body)


def test_snapshot_keeps_only_the_latest(tmp_path: Path) -> None:
    path = tmp_path / "node.db"

    async def body() -> None:
        async with open_storage(path) as db:
            assert await db.get_snapshot() is None
            await db.put_snapshot(50, b"state at 50")
            assert await db.get_snapshot() == (50, b"state at 50")
            await db.put_snapshot(100, b"state at 100")
            await db.put_snapshot(100, b"state at 100, again")  # replaced in place
            assert await db.get_snapshot() == (100, b"state at 100, again")
        async with open_storage(path) as db:
            assert await db.get_snapshot() == (100, b"state at 100, again")
        with sqlite3.connect(path) as conn:  # the older one is gone, not just shadowed
            assert conn.execute("SELECT height FROM ledger_snapshot").fetchall() == [(100,)]

    run(body)


def test_the_tx_index_names_the_height_of_every_stored_tx(tmp_path: Path) -> None:
    path = tmp_path / "node.db"
    ids = [f"{i:064x}" for i in range(900)]  # more than one statement binds

    async def body() -> None:
        async with open_storage(path) as db:
            assert await db.put_block(1, "aa" * 32, b"b1", b"c1", ids[:850])
            assert await db.put_block(2, "bb" * 32, b"b2", b"c2", ids[850:])
            # A block refused (its height is stored) indexes nothing.
            assert not await db.put_block(2, "cc" * 32, b"b3", b"c3", ["ff" * 32])
        async with open_storage(path) as db:  # durable: a restart still knows
            got = await db.tx_heights([*ids, "ff" * 32])
            assert got == {**{t: 1 for t in ids[:850]}, **{t: 2 for t in ids[850:]}}
            assert await db.tx_heights([]) == {}

    run(body)
