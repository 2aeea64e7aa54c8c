"""node/smip/store.py on real files in tmp_path, with a real Storage (SQLite under trio)."""

from __future__ import annotations

import errno
import os
import random
import signal
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import node.smip.store as contentstore
from node.smip.store import (
    ContentStore,
    ContentStoreError,
    FetchConflict,
    IncompleteShard,
    NotInStore,
    QuotaExceeded,
    ShardInfo,
    parse_root,
)
from node.storage import open_storage
from protocol.errors import LocalProtocolError, RemoteProtocolError
from protocol.hashtree import chunk_count, chunk_span, hash_bytes, leaf_hash

REPO_ROOT = Path(__file__).resolve().parent.parent
DEADLINE_S = 20
CS = 1 << 16  # the smallest chunk size keeps files small
GIB = 1 << 30


def run(fn: Callable[..., Awaitable[Any]], *args: Any) -> Any:
    """trio.run with a hard deadline on the whole test body."""

    async def main() -> Any:
        with trio.fail_after(DEADLINE_S):
            return await fn(*args)

    return trio.run(main)


class Clock:
    """Milliseconds that advance by one at every reading: a strict LRU order."""

    def __init__(self) -> None:
        self.now = 1_000

    def __call__(self) -> int:
        self.now += 1
        return self.now


@asynccontextmanager
async def opened(
    home: Path, quota: int = GIB, clock: Callable[[], int] | None = None
) -> AsyncIterator[ContentStore]:
    home.mkdir(parents=True, exist_ok=True)
    async with (
        open_storage(home / "node.db") as db,
        ContentStore(home / "store", db, quota, clock or Clock()) as store,
    ):
        yield store


def write_file(path: Path, size: int, seed: int = 0) -> bytes:
    data = random.Random(seed).randbytes(size)
    path.write_bytes(data)
    return data


def files_in(path: Path) -> list[str]:
    return sorted(os.listdir(path)) if path.exists() else []


# --- import and read ------------------------------------------------------------------


def test_import_and_read_back_byte_identical(tmp_path: Path, monkeypatch: Any) -> None:
    monkeypatch.setattr(contentstore, "COPY_HOP_BYTES", CS)  # several progress reports
    data = write_file(tmp_path / "model.safetensors", 3 * CS + 100)
    root, leaves = hash_bytes(data, CS)
    progress: list[tuple[int, int]] = []

    async def body() -> None:
        async with opened(tmp_path / "a") as store:
            info = await store.import_file(
                tmp_path / "model.safetensors", CS, on_progress=lambda d, t: progress.append((d, t))
            )
            assert info == ShardInfo(root, len(data), CS) and info.chunk_count == 4
            assert store.has(root) and store.complete_shards() == [info]
            for i in range(4):
                assert await store.read_chunk(root, i) == data[i * CS : (i + 1) * CS]
            assert await store.read_leaves(root) == leaves
            assert store.shard_path(root).read_bytes() == data
            assert store.shard_path(root).name == root.hex() == info.root_hex
            assert await store.usage() == (len(data), 0, GIB)
            with pytest.raises(LocalProtocolError):
                await store.read_chunk(root, 4)
        async with opened(tmp_path / "a") as store:  # survives a restart
            assert store.has(root) and await store.read_chunk(root, 3) == data[3 * CS :]

    run(body)
    assert progress[-1] == (len(data), len(data)) and len(progress) >= 4
    assert [d for d, _ in progress] == sorted(d for d, _ in progress)
    assert files_in(tmp_path / "a" / "store" / "tmp") == []


def test_chunk_reads_from_page_cache_and_from_disk_agree(tmp_path: Path) -> None:
    """read_chunk serves cached pages on the event loop and falls back on a thread for the
    rest; both give the same bytes. Evicting the file's pages (POSIX_FADV_DONTNEED) forces
    the fallback where the kernel honours it."""
    data = write_file(tmp_path / "shard", 4 * CS + 7)
    root, _ = hash_bytes(data, CS)
    cached: list[bytes | None] = []
    real = contentstore._read_region_if_cached

    def spy(path: Path, offset: int, length: int) -> bytes | None:
        got = real(path, offset, length)
        cached.append(got)
        return got

    async def body() -> None:
        async with opened(tmp_path / "a") as store:
            await store.import_file(tmp_path / "shard", CS)
            path = store.shard_path(root)
            for evict in (False, True):
                if evict:
                    fd = os.open(path, os.O_RDONLY)
                    os.fsync(fd)
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                    os.close(fd)
                for i in range(5):
                    assert await store.read_chunk(root, i) == data[i * CS : (i + 1) * CS]

    contentstore._read_region_if_cached = spy  # type: ignore[assignment]
    try:
        run(body)
    finally:
        contentstore._read_region_if_cached = real  # type: ignore[assignment]
    assert len(cached) == 10
    assert all(c is None or c == data[(i % 5) * CS : (i % 5 + 1) * CS]
               for i, c in enumerate(cached))
    if contentstore._RWF_NOWAIT is not None:
        assert cached[0] is not None  # just imported: hot


def test_reimport_same_content_is_a_noop(tmp_path: Path) -> None:
    data = write_file(tmp_path / "one", 2 * CS + 5)
    (tmp_path / "two").write_bytes(data)

    async def body() -> None:
        async with opened(tmp_path / "a") as store:
            first = await store.import_file(tmp_path / "one", CS)
            second = await store.import_file(tmp_path / "two", CS, pin="v1")
            assert first == second
            assert await store.usage() == (len(data), len(data), GIB)
            assert await store.pinned_roots("v1") == [first.root]
            other = await store.import_file(tmp_path / "one", 2 * CS)  # other chunking
            assert other.root != first.root and other.size == first.size

    run(body)
    store_dir = tmp_path / "a" / "store"
    assert len(files_in(store_dir / "shards")) == 2 == len(files_in(store_dir / "leaves"))
    assert files_in(store_dir / "tmp") == []


def test_empty_file(tmp_path: Path) -> None:
    (tmp_path / "empty").write_bytes(b"")

    async def body() -> None:
        async with opened(tmp_path / "a") as store:
            info = await store.import_file(tmp_path / "empty", CS)
            assert info.root == leaf_hash(b"") and info.size == 0
            assert await store.read_chunk(info.root, 0) == b""
            async with opened(tmp_path / "b") as other:
                partial = await other.begin_fetch(info.root, 0, CS, info.root)
                assert partial.missing() == [0]
                assert await partial.write_chunk(0, b"")
                assert await partial.finish() == info
                assert other.shard_path(info.root).read_bytes() == b""

    run(body)


def test_absent_roots_raise_not_in_store(tmp_path: Path) -> None:
    root = bytes(32)

    async def body() -> None:
        async with opened(tmp_path / "a") as store:
            assert not store.has(root)
            with pytest.raises(NotInStore):
                store.shard_path(root)
            with pytest.raises(NotInStore):
                await store.read_chunk(root, 0)
            with pytest.raises(NotInStore):
                await store.read_leaves(root)
            with pytest.raises(NotInStore):
                await store.touch(root)
            with pytest.raises(ValueError):
                await store.pin("v", [b"short"])

    run(body)
    assert parse_root("ab" * 32) == b"\xab" * 32
    for bad in ("AB" * 32, "ab" * 31, "zz" * 32, 5):
        with pytest.raises(ValueError):
            parse_root(bad)  # type: ignore[arg-type]


# --- fetching ------------------------------------------------------------------------------


async def fetch_all(source: ContentStore, dest: ContentStore, info: ShardInfo, seed: int) -> None:
    """Copy ``info`` from source to dest chunk by chunk, in random order, 4 tasks at once."""
    leaves = await source.read_leaves(info.root)
    partial = await dest.begin_fetch(info.root, info.size, info.chunk_size, leaves)
    order = partial.missing()
    random.Random(seed).shuffle(order)

    async def worker(indices: list[int]) -> None:
        for i in indices:
            assert await partial.write_chunk(i, await source.read_chunk(info.root, i))

    async with trio.open_nursery() as nursery:
        for k in range(4):
            nursery.start_soon(worker, order[k::4])
    assert partial.missing() == [] and partial.complete
    assert await partial.finish() == info
    assert await partial.finish() == info  # idempotent


def test_fetch_in_random_order_gives_identical_file(tmp_path: Path) -> None:
    data = write_file(tmp_path / "f", 9 * CS + 1234)

    async def body() -> None:
        async with opened(tmp_path / "a") as a, opened(tmp_path / "b") as b:
            info = await a.import_file(tmp_path / "f", CS)
            leaves = await a.read_leaves(info.root)
            partial = await b.begin_fetch(info.root, info.size, CS, leaves)
            assert partial.missing() == list(range(10))
            assert not b.has(info.root)
            with pytest.raises(NotInStore):  # a reader never sees a partial shard
                await b.read_chunk(info.root, 0)
            await fetch_all(a, b, info, seed=7)
            assert b.has(info.root) and b.shard_path(info.root).read_bytes() == data
            assert await b.read_leaves(info.root) == leaves
            assert files_in(tmp_path / "b" / "store" / "partial") == []
            # a fetch of a stored shard has nothing to do
            again = await b.begin_fetch(info.root, info.size, CS, leaves)
            assert again.missing() == [] and await again.finish() == info
            assert not await again.write_chunk(0, data[:CS])
            with pytest.raises(RemoteProtocolError, match="bad-chunk"):
                await again.write_chunk(0, bytes(CS))

    run(body)


_ALIGN = contentstore._DIRECT_ALIGN
_PIECE = contentstore._DIRECT_PIECE


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(writes=st.lists(st.tuples(st.integers(0, 3 * _PIECE // _ALIGN), st.integers(0, 3),
                                 st.integers(0, 2 * _PIECE + 2 * _ALIGN)),
                       min_size=1, max_size=6))
def test_direct_writer_writes_what_buffered_writes_would(
    tmp_path: Path, writes: list[tuple[int, int, int]]
) -> None:
    # Offsets on and off the alignment, lengths from 0 to past two copy buffers, so that
    # aligned heads, unaligned tails and multi-piece writes all occur.
    path = tmp_path / "direct.data"
    size = 6 * _PIECE
    expected = bytearray(size)
    with open(path, "w+b", 0) as f:
        f.truncate(size)
        writer = contentstore._DirectWriter(path, f.fileno())
        for block, skew, length in writes:
            offset = block * _ALIGN + skew * 1000
            data = random.Random(offset ^ length).randbytes(length)
            writer.pwrite(data, offset)
            expected[offset : offset + length] = data
        direct = writer._fd is not None and not writer._refused
        writer.close()
    assert path.read_bytes() == bytes(expected)
    if sys.platform == "linux":  # tmp_path is on a filesystem that takes O_DIRECT here
        assert direct


def test_direct_writer_falls_back_when_the_filesystem_refuses(
    tmp_path: Path, monkeypatch: Any
) -> None:
    # Some filesystems accept O_DIRECT at open and refuse the first write with EINVAL.
    path = tmp_path / "refused.data"
    real_pwrite = os.pwrite
    with open(path, "w+b", 0) as f:
        writer = contentstore._DirectWriter(path, f.fileno())
        if writer._fd is None:
            pytest.skip("no O_DIRECT on this platform")

        def pwrite(fd: int, data: Any, offset: int) -> int:
            if fd == writer._fd:
                raise OSError(errno.EINVAL, "Invalid argument")
            return real_pwrite(fd, data, offset)

        monkeypatch.setattr(contentstore.os, "pwrite", pwrite)
        data = random.Random(3).randbytes(2 * _PIECE + 5)
        writer.pwrite(data, 0)
        writer.pwrite(data[:_ALIGN], 3 * _PIECE)
        assert writer._refused
        writer.close()
    assert path.read_bytes() == data + bytes(_PIECE - 5) + data[:_ALIGN]


def test_concurrent_fetches_of_one_root_share_one_partial(tmp_path: Path) -> None:
    write_file(tmp_path / "f", 5 * CS)

    async def body() -> None:
        async with opened(tmp_path / "a") as a, opened(tmp_path / "b") as b:
            info = await a.import_file(tmp_path / "f", CS)
            leaves = await a.read_leaves(info.root)
            got: list[Any] = []

            async def begin() -> None:
                got.append(await b.begin_fetch(info.root, info.size, CS, leaves))

            async with trio.open_nursery() as nursery:
                for _ in range(3):
                    nursery.start_soon(begin)
            assert got[0] is got[1] is got[2]
            with pytest.raises(FetchConflict):
                await b.begin_fetch(info.root, info.size - 1, CS, leaves)
            with pytest.raises(IncompleteShard, match="5 of 5 chunks missing"):
                await got[0].finish()
            await fetch_all(a, b, info, seed=1)  # a fourth holder finishes it

    run(body)


def test_tampered_chunk_is_refused_and_nothing_written(tmp_path: Path) -> None:
    data = write_file(tmp_path / "f", 3 * CS + 10)
    root, leaves = hash_bytes(data, CS)

    async def body() -> None:
        async with opened(tmp_path / "b") as b:
            with pytest.raises(RemoteProtocolError, match="bad-leaves"):
                await b.begin_fetch(root, len(data), CS, leaves[:-32] + bytes(32))
            assert await b.usage() == (0, 0, GIB)  # a refused layer reserves nothing
            partial = await b.begin_fetch(root, len(data), CS, leaves)
            tampered = bytearray(data[CS : 2 * CS])
            tampered[100] ^= 1
            for bad in (bytes(tampered), data[CS : 2 * CS - 1], data[CS : 2 * CS] + b"x"):
                with pytest.raises(RemoteProtocolError, match="bad-chunk"):
                    await partial.write_chunk(1, bad)
            with pytest.raises(RemoteProtocolError, match="bad-chunk"):
                await partial.write_chunk(0, data[CS : 2 * CS])  # right data, wrong place
            assert partial.missing() == [0, 1, 2, 3]
            part = tmp_path / "b" / "store" / "partial"
            assert (part / f"{root.hex()}.data").read_bytes() == bytes(len(data))
            assert (part / f"{root.hex()}.have").read_bytes() == b""
            await partial.write_chunk(1, data[CS : 2 * CS])
            assert partial.missing() == [0, 2, 3]

    run(body)


# --- crashes and resume ----------------------------------------------------------------------

FETCH_CHILD = textwrap.dedent(
    """
    import os, signal, sys
    import trio
    from node.smip.store import ContentStore
    from node.storage import open_storage
    from protocol.hashtree import hash_bytes

    home, source, cs, written = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    data = open(source, "rb").read()
    root, leaves = hash_bytes(data, cs)

    async def main():
        async with open_storage(home + "/node.db") as db:
            store = ContentStore(home + "/store", db, 1 << 30, lambda: 1)
            await store.open()
            partial = await store.begin_fetch(root, len(data), cs, leaves)
            for i in map(int, written.split(",")):
                await partial.write_chunk(i, data[i * cs : (i + 1) * cs])
            os.kill(os.getpid(), signal.SIGKILL)  # no finish, no close, no fsync

    trio.run(main)
    """
)


def run_child(script: str, *args: object) -> None:
    result = subprocess.run(
        [sys.executable, "-c", script, *map(str, args)],
        cwd=REPO_ROOT,
        capture_output=True,
        timeout=DEADLINE_S,
    )
    assert result.returncode == -signal.SIGKILL, result.stderr.decode()


def test_resume_after_kill_refetches_only_the_torn_chunk(tmp_path: Path) -> None:
    data = write_file(tmp_path / "f", 8 * CS + 300)  # 9 chunks
    root, leaves = hash_bytes(data, CS)
    home = tmp_path / "b"
    home.mkdir()
    run_child(FETCH_CHILD, home, tmp_path / "f", CS, "6,0,3,5,8")
    data_file = home / "store" / "partial" / f"{root.hex()}.data"
    # The last chunk written (8, the 300-byte tail) was torn: the file ends inside it.
    os.truncate(data_file, 8 * CS + 100)

    async def body() -> None:
        async with opened(home) as b:
            partial = await b.begin_fetch(root, len(data), CS, leaves)
            assert partial.missing() == [1, 2, 4, 7, 8]
            for i in partial.missing():
                await partial.write_chunk(i, data[i * CS : (i + 1) * CS])
            await partial.finish()
            assert b.shard_path(root).read_bytes() == data

    run(body)


def test_resume_in_process_rechecks_every_listed_chunk(tmp_path: Path) -> None:
    data = write_file(tmp_path / "f", 6 * CS)
    root, leaves = hash_bytes(data, CS)
    home = tmp_path / "b"
    part = home / "store" / "partial"

    async def first() -> None:
        async with opened(home) as b:
            partial = await b.begin_fetch(root, len(data), CS, leaves)
            for i in (0, 1, 2, 4):
                await partial.write_chunk(i, data[i * CS : (i + 1) * CS])

    async def second() -> None:
        async with opened(home) as b:
            assert await b.usage() == (len(data), 0, GIB)  # still reserved
            partial = await b.begin_fetch(root, len(data), CS, leaves)
            assert partial.missing() == [1, 3, 5]
            assert (part / f"{root.hex()}.have").read_bytes() == b"0\n2\n4\n"

    run(first)
    with open(part / f"{root.hex()}.data", "r+b") as f:  # bit rot in chunk 1
        f.seek(CS + 17)
        f.write(b"\xff")
    with open(part / f"{root.hex()}.have", "ab") as f:  # garbage and a torn line
        f.write(b"99\nxyz\n-1\n3")
    run(second)


def test_finish_crash_before_record_is_recovered(tmp_path: Path) -> None:
    data = write_file(tmp_path / "f", 2 * CS)
    root, _ = hash_bytes(data, CS)

    async def body() -> None:
        async with opened(tmp_path / "a") as a:
            await a.import_file(tmp_path / "f", CS)
            # as if finish() had renamed the file into place and died before recording it
            await a._storage.put_shard(root.hex(), len(data), CS, "partial", 5)
            (tmp_path / "a" / "store" / "partial" / f"{root.hex()}.have").write_bytes(b"0\n")
        async with opened(tmp_path / "a") as a:
            assert a.has(root) and a.shard_path(root).read_bytes() == data
            assert (await a._storage.get_shard(root.hex())).state == "complete"  # type: ignore[union-attr]
        assert files_in(tmp_path / "a" / "store" / "partial") == []

    run(body)


IMPORT_CHILD = textwrap.dedent(
    """
    import os, signal, sys
    import trio
    import node.smip.store as cs
    from node.storage import open_storage

    cs.COPY_HOP_BYTES = 1 << 16

    def crash(done, total):
        if done >= 2 * cs.COPY_HOP_BYTES:
            os.kill(os.getpid(), signal.SIGKILL)

    async def main():
        async with open_storage(sys.argv[1] + "/node.db") as db:
            store = cs.ContentStore(sys.argv[1] + "/store", db, 1 << 30, lambda: 1)
            await store.open()
            await store.import_file(sys.argv[2], 1 << 16, on_progress=crash)

    trio.run(main)
    """
)


def test_crash_during_import_leaves_nothing_under_shards(tmp_path: Path) -> None:
    data = write_file(tmp_path / "f", 6 * CS)
    root, _ = hash_bytes(data, CS)
    home = tmp_path / "a"
    home.mkdir()
    run_child(IMPORT_CHILD, home, tmp_path / "f")
    assert files_in(home / "store" / "shards") == []
    assert len(files_in(home / "store" / "tmp")) == 1  # the half copy

    async def body() -> None:
        async with opened(home) as a:
            assert not a.has(root) and await a.usage() == (0, 0, GIB)
            assert files_in(home / "store" / "tmp") == []
            assert (await a.import_file(tmp_path / "f", CS)).root == root

    run(body)


def test_open_drops_rows_without_files_and_files_without_rows(tmp_path: Path) -> None:
    write_file(tmp_path / "f", CS + 1, seed=1)
    write_file(tmp_path / "g", CS + 2, seed=2)
    store_dir = tmp_path / "a" / "store"

    async def body() -> None:
        async with opened(tmp_path / "a") as a:
            f = await a.import_file(tmp_path / "f", CS)
            g = await a.import_file(tmp_path / "g", CS)
        (store_dir / "shards" / f.root_hex).unlink()  # row without its file
        (store_dir / "shards" / ("ab" * 32)).write_bytes(b"stray")  # file without a row
        async with opened(tmp_path / "a") as a:
            assert not a.has(f.root) and a.has(g.root)
            assert await a.usage() == (g.size, 0, GIB)
        assert files_in(store_dir / "shards") == [g.root_hex]
        assert files_in(store_dir / "leaves") == [g.root_hex]

    run(body)


# --- quota, LRU, pins ---------------------------------------------------------------------


async def import_n(
    store: ContentStore, tmp_path: Path, names: str, size: int
) -> dict[str, ShardInfo]:
    out = {}
    for name in names:
        write_file(tmp_path / name, size, seed=ord(name))  # one content per name
        out[name] = await store.import_file(tmp_path / name, CS)
    return out


def test_lru_eviction_order(tmp_path: Path) -> None:
    size = 2 * CS

    async def body() -> None:
        async with opened(tmp_path / "s", quota=4 * size) as store:
            s = await import_n(store, tmp_path, "ABCD", size)
            assert await store.usage() == (4 * size, 0, 4 * size)
            await store.touch(s["A"].root)  # now B is the least recently used
            s |= await import_n(store, tmp_path, "E", size)
            assert [x for x in "ABCDE" if store.has(s[x].root)] == ["A", "C", "D", "E"]
            s |= await import_n(store, tmp_path, "F", size)
            assert [x for x in "ABCDEF" if store.has(s[x].root)] == ["A", "D", "E", "F"]
            evicted = await store.evict(2 * size)
            assert evicted == [s["D"], s["A"]]
            assert await store.usage() == (2 * size, 0, 4 * size)
            assert not (tmp_path / "s" / "store" / "leaves" / s["A"].root_hex).exists()
            assert await store.evict(size) == []  # already room

    run(body)


def test_pinned_content_is_never_evicted(tmp_path: Path) -> None:
    size = 2 * CS

    async def body() -> None:
        async with opened(tmp_path / "s", quota=4 * size) as store:
            s = await import_n(store, tmp_path, "AB", size)
            s |= await import_n(store, tmp_path, "C", size)
            await store.pin("v1", [s["A"].root, s["B"].root])
            await store.pin("v2", [s["B"].root, s["C"].root])
            assert await store.usage() == (3 * size, 3 * size, 4 * size)
            write_file(tmp_path / "big", 2 * size, seed=5)
            with pytest.raises(QuotaExceeded) as exc:
                await store.import_file(tmp_path / "big", CS)
            assert str(exc.value) == (
                f"no room for {2 * size} bytes: quota {4 * size}, pinned {3 * size}, in"
                f" progress 0 (together {3 * size}, which eviction cannot free), so at most"
                f" {size} bytes fit"
            )
            with pytest.raises(QuotaExceeded):
                await store.evict(2 * size)
            assert all(store.has(s[x].root) for x in "ABC")  # nothing deleted
            s |= await import_n(store, tmp_path, "D", size)  # fits without eviction
            s |= await import_n(store, tmp_path, "E", size)  # evicts D, the only unpinned
            assert not store.has(s["D"].root)
            assert await store.unpin("v2") == 2
            await store.evict(2 * size)  # C is unpinned now; B is still pinned by v1
            assert [x for x in "ABCE" if store.has(s[x].root)] == ["A", "B"]

    run(body)


def test_fetch_reserves_space_and_refuses_when_held_content_fills_quota(tmp_path: Path) -> None:
    data = write_file(tmp_path / "f", 3 * CS)
    root, leaves = hash_bytes(data, CS)

    async def body() -> None:
        async with opened(tmp_path / "s", quota=4 * CS) as store:
            s = await import_n(store, tmp_path, "AB", CS)
            await store.pin("v1", [s["A"].root, root])  # pinned before it is fetched
            partial = await store.begin_fetch(root, len(data), CS, leaves)  # evicts B
            assert not store.has(s["B"].root) and store.has(s["A"].root)
            assert await store.usage() == (4 * CS, 4 * CS, 4 * CS)
            write_file(tmp_path / "g", 2 * CS, seed=9)
            other, other_leaves = hash_bytes((tmp_path / "g").read_bytes(), CS)
            with pytest.raises(QuotaExceeded, match=r"in progress 196608 .* at most 0 bytes"):
                await store.begin_fetch(other, 2 * CS, CS, other_leaves)
            for i in range(3):
                await partial.write_chunk(i, data[i * CS : (i + 1) * CS])
            await partial.finish()
            assert await store.usage() == (4 * CS, 4 * CS, 4 * CS)

    run(body)


def test_discard_partial_frees_its_space(tmp_path: Path) -> None:
    data = write_file(tmp_path / "f", 3 * CS)
    root, leaves = hash_bytes(data, CS)

    async def body() -> None:
        async with opened(tmp_path / "s") as store:
            partial = await store.begin_fetch(root, len(data), CS, leaves)
            await partial.write_chunk(0, data[:CS])
            with pytest.raises(ContentStoreError):
                await store.discard_partial(root)  # being fetched
            await partial.aclose()
            with pytest.raises(ContentStoreError):
                await partial.write_chunk(1, data[CS : 2 * CS])
            assert await store.discard_partial(root)
            assert not await store.discard_partial(root)
            assert await store.usage() == (0, 0, GIB)
        assert files_in(tmp_path / "s" / "store" / "partial") == []

    run(body)


# --- properties -------------------------------------------------------------------------------


@settings(
    max_examples=12,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    cs=st.sampled_from([1 << 16, 1 << 17, 1 << 18, 1 << 20]),
    k=st.integers(0, 3),
    delta=st.sampled_from([-1, 0, 1, 777]),
    seed=st.integers(0, 2**16),
)
def test_import_then_fetch_round_trips_around_chunk_boundaries(
    cs: int, k: int, delta: int, seed: int
) -> None:
    size = max(0, k * cs + delta)
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        data = write_file(tmp_path / "f", size, seed)

        async def body() -> None:
            async with opened(tmp_path / "a") as a, opened(tmp_path / "b") as b:
                info = await a.import_file(tmp_path / "f", cs)
                assert info.chunk_count == chunk_count(size, cs)
                assert info.root == hash_bytes(data, cs)[0]
                for i in range(info.chunk_count):
                    offset, length = chunk_span(size, cs, i)
                    assert await a.read_chunk(info.root, i) == data[offset : offset + length]
                await fetch_all(a, b, info, seed)
                assert b.shard_path(info.root).read_bytes() == data

        run(body)


def test_largest_chunk_size_round_trip(tmp_path: Path) -> None:
    cs = 1 << 24
    data = write_file(tmp_path / "f", cs + 1)

    async def body() -> None:
        async with opened(tmp_path / "a") as a, opened(tmp_path / "b") as b:
            info = await a.import_file(tmp_path / "f", cs)
            await fetch_all(a, b, info, seed=0)
            assert b.shard_path(info.root).read_bytes() == data

    run(body)
