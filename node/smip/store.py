"""The node's content-addressed shard store: SMIP shards (protocol/hashtree.py) on local disk.

Layout under the store directory (the daemon uses ``<home>/store``)::

    shards/<root_hex>           a complete, verified shard; appears only by an atomic rename
    leaves/<root_hex>           its leaf layer (32 bytes a chunk), served without re-hashing
    partial/<root_hex>.data     a shard being fetched: chunks pwritten at their offsets
    partial/<root_hex>.leaves   its leaf layer, checked against the root
    partial/<root_hex>.have     indices written, one decimal per line; appended, not fsynced
    tmp/                        imports and atomic writes in progress; emptied by open()

Metadata lives in SQLite (node/storage.py): per root its size, chunk_size, state
("partial" or "complete") and last_used_ms, and pins ``(owner, root)``: a shard with at
least one pin is never evicted. Pins may name roots not stored yet (pin a version's shards,
then fetch them).

API (roots are the 32-byte hash-tree roots; ``root.hex()`` names files)::

    store = ContentStore(directory, storage, quota_bytes, clock_ms)
    await store.open()                      # or: async with ContentStore(...) as store:
    info = await store.import_file(path, chunk_size, pin=None, on_progress=None)
    store.has(root); store.info(root); store.shard_path(root); store.complete_shards()
    await store.read_leaves(root); await store.read_chunk(root, index); await store.touch(root)
    partial = await store.begin_fetch(root, size, chunk_size, leaves)
    partial.missing(); await partial.write_chunk(index, data); info = await partial.finish()
    await store.pin(owner, roots); await store.unpin(owner); await store.pinned_roots(owner)
    await store.usage()  # Usage(used_bytes, pinned_bytes, quota_bytes)
    await store.evict(nbytes_needed); await store.discard_partial(root); await store.aclose()

Crash safety. A complete shard is written to tmp/ (import) or partial/ (fetch), fsynced,
and renamed into shards/ after its leaf layer is in leaves/, so shards/<root> is never half
a file. A fetched chunk is verified before it is written; after a kill, the chunks listed in
``.have`` are hashed again against their leaves before they are trusted (the list and the
data are not fsynced per chunk and may reach the disk in either order), so a torn write is
fetched again and a verified chunk never is. open() reconciles the database with the files:
a row whose files are gone is dropped, a file without a row is deleted, a fetch that was
renamed into place but not yet recorded is recorded.

Quota. Every shard counts at its full size, partial ones too (their space is reserved when
the fetch begins, and the file is sparse until filled); leaf layers (1/2048 of the data at
64 KiB chunks) are not counted. Making room evicts unpinned complete shards, least recently
used first (``touch`` marks a use); pinned and in-progress bytes are never freed, and when
they alone leave no room the call raises `QuotaExceeded` and deletes nothing.

Concurrency (one trio run). Two fetches of one root share one `PartialShard`; chunks may be
written from many tasks at once, in any order. has/read_* see only complete shards. A shard
may be evicted while a reader holds it open (POSIX keeps the inode alive): pin what must
stay. Every file operation that may take more than a few microseconds runs in a worker
thread; the largest unit of memory is one chunk (at most 16 MiB) or one copy block (1 MiB).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import mmap
import os
import secrets
import shutil
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import BinaryIO, NamedTuple

import trio

from node.errors import Conflict, NodeError, NotFound
from node.storage import ShardRow, Storage
from protocol.hashtree import (
    DEFAULT_CHUNK_SIZE,
    HASH_BYTES,
    ShardHasher,
    check_chunk_size,
    check_leaf_layer,
    chunk_count,
    chunk_span,
    leaf_hash,
    verify_chunk,
)

__all__ = [
    "ContentStore",
    "ContentStoreError",
    "FetchConflict",
    "IncompleteShard",
    "NotInStore",
    "PartialShard",
    "QuotaExceeded",
    "ShardInfo",
    "Usage",
    "parse_root",
]

log = logging.getLogger(__name__)

COMPLETE = "complete"
PARTIAL = "partial"
COPY_BLOCK_BYTES = 1 << 20  # one read in import_file: the memory it holds
COPY_HOP_BYTES = 8 << 20  # per worker-thread hop: granularity of progress and cancellation


class ContentStoreError(NodeError):
    """The store cannot do what was asked (the message says why). A NodeError, so one
    that reaches the API is answered with its kind's status (node/errors.py), and an API
    operation that meets one fails with its message instead of an internal error."""


class NotInStore(NotFound, ContentStoreError):
    """No complete shard with that root is stored."""


class IncompleteShard(ContentStoreError):
    """finish() while chunks are still missing."""


class FetchConflict(Conflict, ContentStoreError):
    """A fetch of this root is under way with another size or chunk size."""


class QuotaExceeded(Conflict, ContentStoreError):
    """Pinned plus in-progress content alone would not leave room for the bytes asked."""

    def __init__(self, needed: int, quota: int, pinned: int, in_progress: int, held: int) -> None:
        super().__init__(
            f"no room for {needed} bytes: quota {quota}, pinned {pinned}, in progress"
            f" {in_progress} (together {held}, which eviction cannot free), so at most"
            f" {max(0, quota - held)} bytes fit"
        )
        self.needed, self.quota, self.pinned, self.in_progress = needed, quota, pinned, in_progress
        self.held = held


@dataclass(frozen=True)
class ShardInfo:
    root: bytes
    size: int
    chunk_size: int

    @property
    def root_hex(self) -> str:
        return self.root.hex()

    @property
    def chunk_count(self) -> int:
        return chunk_count(self.size, self.chunk_size)


class Usage(NamedTuple):
    used_bytes: int  # complete and in-progress shards at full size
    pinned_bytes: int
    quota_bytes: int


def parse_root(text: str) -> bytes:
    """A root from its 64 lowercase hex digits (file names, API paths); ValueError else."""
    if not (isinstance(text, str) and len(text) == 2 * HASH_BYTES):
        raise ValueError(f"a root is {2 * HASH_BYTES} hex digits, got {text!r}")
    root = bytes.fromhex(text)
    if root.hex() != text:  # uppercase or spaces would name the same root twice
        raise ValueError(f"a root is lowercase hex, got {text!r}")
    return root


def _hex(root: bytes) -> str:
    if not isinstance(root, bytes) or len(root) != HASH_BYTES:
        raise ValueError(f"a root is {HASH_BYTES} bytes, got {root!r}")
    return root.hex()


# --- file helpers (blocking: called in worker threads) -------------------------------------


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, data: bytes, tmp_dir: Path) -> None:
    tmp = tmp_dir / f"{path.name}.{secrets.token_hex(6)}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _unlink(*paths: Path) -> None:
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _pwrite_all(fd: int, data: bytes | bytearray | memoryview, offset: int) -> None:
    view = memoryview(data).cast("B")
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


# O_DIRECT writes want the buffer, offset and length aligned to the device's logical block
# size; 4096 covers every Linux block device and filesystem that takes O_DIRECT at all.
_DIRECT_ALIGN = 4096
_DIRECT_PIECE = 1 << 20  # the aligned copy buffer, one per writing thread


class _DirectWriter:
    """Writes fetched chunks around the page cache (O_DIRECT) where the OS allows it.

    Why: a fetched shard is written once and not read again soon, and buffered writes of
    new data cost the kernel 0.7-2.7 ms of CPU per MiB on the 2-core VMs we measure on
    (fresh page-cache pages; a direct write costs 0.1-0.2 ms), CPU the fetch needs for
    decrypting and hashing. The data is copied into a page-aligned buffer first (about
    0.1 ms per MiB). A chunk's unaligned tail (a shard's last chunk) goes through the
    buffered descriptor, as does everything where O_DIRECT is missing (macOS) or refused
    (tmpfs: EINVAL at open or at the first write), so this is only ever a speed-up.
    Linux keeps the two descriptors coherent; fsync of either flushes the file."""

    def __init__(self, path: Path, buffered_fd: int) -> None:
        self._buffered = buffered_fd
        self._fd: int | None = None
        self._refused = False
        flag = getattr(os, "O_DIRECT", 0)
        if flag:
            with contextlib.suppress(OSError):
                self._fd = os.open(path, os.O_WRONLY | flag)
        self._local = threading.local()

    def pwrite(self, data: bytes | bytearray | memoryview, offset: int) -> None:
        view = memoryview(data).cast("B")
        fd = self._fd
        if fd is not None and not self._refused and offset % _DIRECT_ALIGN == 0:
            aligned = len(view) - len(view) % _DIRECT_ALIGN
            try:
                done = self._pwrite_direct(fd, view[:aligned], offset)
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                # Refused by this filesystem: buffered from now on. Not closed here, as
                # another thread may be writing through it; close() does that.
                self._refused = True
                done = 0
            view, offset = view[done:], offset + done
        if view:
            _pwrite_all(self._buffered, view, offset)

    def _pwrite_direct(self, fd: int, view: memoryview, offset: int) -> int:
        """Write the aligned ``view`` at ``offset``; returns the bytes written (all, unless
        the kernel wrote an unaligned short count, after which the caller goes buffered)."""
        buf: mmap.mmap | None = getattr(self._local, "buf", None)
        if buf is None:
            buf = self._local.buf = mmap.mmap(-1, _DIRECT_PIECE)  # page-aligned
        done = 0
        with memoryview(buf) as aligned_buf:
            while done < len(view):
                k = min(len(aligned_buf), len(view) - done)
                aligned_buf[:k] = view[done : done + k]
                n = os.pwrite(fd, aligned_buf[:k], offset + done)
                done += n
                if n == 0 or n % _DIRECT_ALIGN:
                    break
        return done

    def close(self) -> None:
        """Close the direct descriptor (not the buffered one, which the caller owns); called
        once no thread writes any more."""
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)


def _pread(fd: int, length: int, offset: int) -> bytes:
    parts, got = [], 0
    while got < length:
        part = os.pread(fd, length - got, offset + got)
        if not part:
            break  # end of file: the caller sees a short read
        parts.append(part)
        got += len(part)
    return b"".join(parts)


def _read_region(path: Path, offset: int, length: int) -> bytes:
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise NotInStore(f"{path.name} was removed") from None
    try:
        data = _pread(fd, length, offset)
    finally:
        os.close(fd)
    if len(data) != length:
        raise ContentStoreError(f"{path} is shorter than its recorded size")
    return data


# Linux: a read that fails (EAGAIN) instead of waiting for the disk. Elsewhere every read
# goes through a thread.
_RWF_NOWAIT: int | None = getattr(os, "RWF_NOWAIT", None)


def _read_region_if_cached(path: Path, offset: int, length: int) -> bytearray | None:
    """The region, if the page cache holds all of it; None if any of it would have to come
    from the disk (or the platform cannot tell). Cheap enough for the event loop: a served
    chunk is usually hot, and a thread hop per chunk cost the server about a quarter of
    its throughput (measured: 71 vs 92 MiB/s on loopback)."""
    if _RWF_NOWAIT is None:
        return None
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise NotInStore(f"{path.name} was removed") from None
    try:
        buf = bytearray(length)
        try:
            got = os.preadv(fd, [buf], offset, _RWF_NOWAIT)
        except OSError:  # EAGAIN: not cached; EOPNOTSUPP: old kernel or fs; else: the thread
            # path reads it again and reports a real error properly
            return None
    finally:
        os.close(fd)
    return buf if got == length else None  # not copied into bytes: served as it is


def _copy_hashing(src: BinaryIO, dst: BinaryIO, hasher: ShardHasher, limit: int) -> int:
    done = 0
    while done < limit:
        block = src.read(min(COPY_BLOCK_BYTES, limit - done))
        if not block:
            break
        hasher.update(block)
        dst.write(block)
        done += len(block)
    return done


def _flush_fsync(f: BinaryIO) -> None:
    f.flush()
    os.fsync(f.fileno())


# --- the store -------------------------------------------------------------------------------


class ContentStore:
    """Content-addressed shards under ``directory``; see the module docstring.

    ``clock_ms`` returns the current time in integer milliseconds (injected, for LRU order).
    Use from one trio run; call `open` first.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        storage: Storage,
        quota_bytes: int,
        clock_ms: Callable[[], int],
    ) -> None:
        if isinstance(quota_bytes, bool) or not isinstance(quota_bytes, int) or quota_bytes < 0:
            raise ValueError(f"quota_bytes must be an int >= 0, got {quota_bytes!r}")
        self.directory = Path(directory)
        self.quota_bytes = quota_bytes
        self._storage = storage
        self._clock_ms = clock_ms
        self._shards = self.directory / "shards"
        self._leaves = self.directory / "leaves"
        self._partial = self.directory / "partial"
        self._tmp = self.directory / "tmp"
        self._complete: dict[bytes, ShardInfo] = {}  # in-process truth for has()/read_*
        self._partials: dict[bytes, PartialShard] = {}  # live fetches, shared per root
        self._opening: dict[bytes, trio.Event] = {}  # roots whose fetch is being set up
        # Held across every check-then-change of space, pins and the shards table, so that
        # eviction never races a pin and two reservations never share the same free bytes.
        self._lock = trio.Lock()
        self._opened = False

    async def __aenter__(self) -> ContentStore:
        await self.open()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    # -- opening: directories, stale files, reconciliation -----------------------------

    async def open(self) -> None:
        """Create the directories, empty tmp/, and make the database and the files agree."""
        names = await trio.to_thread.run_sync(self._prepare_dirs)
        shard_sizes, leaves, partial = names
        partial_rows: set[str] = set()  # fetches to resume
        for row in await self._storage.list_shards():
            if await self._reconcile(row, shard_sizes, leaves, partial) == PARTIAL:
                partial_rows.add(row.root)
        keep = {info.root_hex for info in self._complete.values()}
        stale = [self._shards / n for n in shard_sizes if n not in keep]
        stale += [self._leaves / n for n in leaves if n not in keep]
        stale += [self._partial / n for n in partial if n.split(".")[0] not in partial_rows]
        if stale:
            log.warning("content store: removing %d files without a record", len(stale))
            await trio.to_thread.run_sync(_unlink, *stale)
        self._opened = True

    def _prepare_dirs(self) -> tuple[dict[str, int], set[str], set[str]]:
        for d in (self._shards, self._leaves, self._partial, self._tmp):
            d.mkdir(parents=True, exist_ok=True)
        for entry in os.scandir(self._tmp):  # imports and atomic writes a crash cut short
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
        sizes = {e.name: e.stat().st_size for e in os.scandir(self._shards) if e.is_file()}
        return sizes, set(os.listdir(self._leaves)), set(os.listdir(self._partial))

    async def _reconcile(
        self, row: ShardRow, shard_sizes: dict[str, int], leaves: set[str], partial: set[str]
    ) -> str | None:
        """Bring one row in line with the files; return the state it keeps (None: dropped)."""
        try:
            root = parse_root(row.root)
        except ValueError:
            await self._storage.delete_shard(row.root)
            return None
        installed = shard_sizes.get(row.root) == row.size and row.root in leaves
        if installed and row.state == PARTIAL:
            # finish() renamed the shard into place and was killed before recording it;
            # its leftover .have goes with the stale-file sweep.
            await self._storage.put_shard(
                row.root, row.size, row.chunk_size, COMPLETE, row.last_used_ms
            )
        elif row.state == PARTIAL:
            if f"{row.root}.data" in partial:
                return PARTIAL
            await self._storage.delete_shard(row.root)  # nothing was ever written
            return None
        elif not installed:
            log.warning("content store: shard %s is missing on disk, forgetting it", row.root)
            await self._storage.delete_shard(row.root)
            return None
        self._complete[root] = ShardInfo(root, row.size, row.chunk_size)
        return COMPLETE

    async def aclose(self) -> None:
        """Close the files of fetches under way; their partial files stay for a resume."""
        for partial in list(self._partials.values()):
            await partial.aclose()
        self._opened = False

    def _check_open(self) -> None:
        if not self._opened:
            raise ContentStoreError("content store is not open")

    # -- reading ----------------------------------------------------------------------

    def has(self, root: bytes) -> bool:
        """Whether a complete, verified shard ``root`` is stored."""
        return root in self._complete

    def info(self, root: bytes) -> ShardInfo:
        try:
            return self._complete[root]
        except KeyError:
            raise NotInStore(f"shard {_hex(root)} is not in the store") from None

    def complete_shards(self) -> list[ShardInfo]:
        return sorted(self._complete.values(), key=lambda i: i.root)

    def shard_path(self, root: bytes) -> Path:
        """Path of the complete shard file (for memory-mapped loading); NotInStore if absent.
        The file may be evicted later unless ``root`` is pinned."""
        return self._shards / self.info(root).root_hex

    async def read_leaves(self, root: bytes) -> bytes:
        """The leaf layer of a complete shard (local disk is trusted: not re-hashed)."""
        info = self.info(root)
        path = self._leaves / info.root_hex
        data = await trio.to_thread.run_sync(_read_region, path, 0, HASH_BYTES * info.chunk_count)
        return data

    async def read_chunk(self, root: bytes, index: int) -> bytes | bytearray:
        """Chunk ``index`` of a complete shard (LocalProtocolError if no such index)."""
        info = self.info(root)
        offset, length = chunk_span(info.size, info.chunk_size, index)
        path = self._shards / info.root_hex
        data: bytes | bytearray | None = _read_region_if_cached(path, offset, length)
        if data is None:  # some of it is on the disk only: read it without blocking the loop
            data = await trio.to_thread.run_sync(_read_region, path, offset, length)
        return data

    async def touch(self, root: bytes) -> None:
        """Mark a use of ``root`` now, for least-recently-used eviction."""
        info = self.info(root)
        await self._storage.touch_shard(info.root_hex, self._clock_ms())

    # -- importing ---------------------------------------------------------------------

    async def import_file(
        self,
        path: str | os.PathLike[str],
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        *,
        pin: str | None = None,
        on_progress: Callable[[int, int], None] | None = None,
    ) -> ShardInfo:
        """Copy a local file into the store, hashing it on the way (one streaming pass).

        Content already stored is not stored twice: the same root comes back, and the
        copy is discarded. ``pin`` pins the shard for that owner in the same step (so it
        cannot be evicted before the caller pins it). ``on_progress(done, total)`` is
        called in this task after every few MiB.

        Raises QuotaExceeded before copying when the file cannot fit (and cannot be a
        copy of a stored shard: none has its size), else when committing. The copy in
        tmp/ is not counted against the quota while it is being made.
        """
        check_chunk_size(chunk_size)
        self._check_open()
        src: BinaryIO = await trio.to_thread.run_sync(open, path, "rb")
        tmp = self._tmp / f"import-{secrets.token_hex(8)}"
        try:
            total = os.fstat(src.fileno()).st_size
            if all(info.size != total for info in self._complete.values()):
                u = await self._storage.shard_usage()
                if u.held_bytes + total > self.quota_bytes:
                    raise QuotaExceeded(
                        total, self.quota_bytes, u.pinned_bytes, u.partial_bytes, u.held_bytes
                    )
            dst: BinaryIO = await trio.to_thread.run_sync(open, tmp, "xb")
            try:
                hasher = ShardHasher(chunk_size)
                done = 0
                while True:
                    n = await trio.to_thread.run_sync(
                        _copy_hashing, src, dst, hasher, COPY_HOP_BYTES
                    )
                    done += n
                    if on_progress is not None:
                        on_progress(done, max(total, done))
                    if n < COPY_HOP_BYTES:
                        break
                await trio.to_thread.run_sync(_flush_fsync, dst)
            finally:
                dst.close()
            root, leaves, size = hasher.finish()
            info = ShardInfo(root, size, chunk_size)
            with trio.CancelScope(shield=True):  # the commit is short and must not be cut
                async with self._lock:
                    if root in self._complete:
                        await self._storage.touch_shard(root.hex(), self._clock_ms())
                        info = self._complete[root]
                    else:
                        await self._make_room(size)
                        await trio.to_thread.run_sync(self._install_import, tmp, info, leaves)
                        await self._record_complete(info)
                    if pin is not None:
                        await self._storage.add_pins(pin, [root.hex()])
            return info
        finally:
            src.close()
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(_unlink, tmp)

    def _install_import(self, tmp: Path, info: ShardInfo, leaves: bytes) -> None:
        # leaves first: a file under shards/ always has its leaf layer beside it.
        _write_atomic(self._leaves / info.root_hex, leaves, self._tmp)
        os.replace(tmp, self._shards / info.root_hex)
        _fsync_dir(self._leaves)
        _fsync_dir(self._shards)

    async def _record_complete(self, info: ShardInfo) -> None:
        await self._storage.put_shard(
            info.root_hex, info.size, info.chunk_size, COMPLETE, self._clock_ms()
        )
        self._complete[info.root] = info

    # -- fetching ----------------------------------------------------------------------

    async def begin_fetch(
        self, root: bytes, size: int, chunk_size: int, leaves: bytes
    ) -> PartialShard:
        """Start or resume fetching shard ``root``, whose leaf layer came from a peer.

        Raises RemoteProtocolError("bad-leaves") if ``leaves`` does not fit the root, size
        and chunk size (nothing is stored then); QuotaExceeded if the shard cannot fit
        without evicting pinned or in-progress content; FetchConflict if this root is
        being fetched with another size or chunk size. A fetch of the same root already
        under way is returned as is; a shard already complete gives a PartialShard with
        nothing missing. Resuming re-hashes the chunks on disk (in a worker thread).
        """
        hex_root = _hex(root)
        check_leaf_layer(leaves, size, chunk_size, root)
        self._check_open()
        while True:
            if root in self._complete:
                return PartialShard._done(self, self._complete[root], bytes(leaves))
            live = self._partials.get(root)
            if live is not None:
                if (live.size, live.chunk_size) != (size, chunk_size):
                    raise FetchConflict(
                        f"{hex_root} is being fetched as size {live.size}, chunk size"
                        f" {live.chunk_size}; asked for {size}, {chunk_size}"
                    )
                return live
            opening = self._opening.get(root)
            if opening is None:
                break
            await opening.wait()
        self._opening[root] = event = trio.Event()
        try:
            partial = await self._open_partial(ShardInfo(root, size, chunk_size), bytes(leaves))
            self._partials[root] = partial
            return partial
        finally:
            del self._opening[root]
            event.set()

    def _partial_paths(self, hex_root: str) -> tuple[Path, Path, Path]:
        base = self._partial / hex_root
        return base.with_suffix(".data"), base.with_suffix(".leaves"), base.with_suffix(".have")

    async def _open_partial(self, info: ShardInfo, leaves: bytes) -> PartialShard:
        async with self._lock:
            row = await self._storage.get_shard(info.root_hex)
            if row is not None and (row.size, row.chunk_size) != (info.size, info.chunk_size):
                # Left by a fetch of another manifest's claim for this root: start over.
                await self._storage.delete_shard(info.root_hex)
                await trio.to_thread.run_sync(_unlink, *self._partial_paths(info.root_hex))
                row = None
            if row is None or row.state != PARTIAL:
                await self._make_room(info.size)
                await self._storage.put_shard(
                    info.root_hex, info.size, info.chunk_size, PARTIAL, self._clock_ms()
                )
        # Outside the lock: re-hashing what a killed fetch left may take a while.
        files = await trio.to_thread.run_sync(self._open_partial_files, info, leaves)
        return PartialShard(self, info, leaves, *files)

    def _open_partial_files(
        self, info: ShardInfo, leaves: bytes
    ) -> tuple[BinaryIO, BinaryIO, bytearray]:
        data_path, leaves_path, have_path = self._partial_paths(info.root_hex)
        _write_atomic(leaves_path, leaves, self._tmp)
        # Both files stay open for the life of the PartialShard: no context manager.
        fd = os.open(data_path, os.O_RDWR | os.O_CREAT, 0o644)
        data: BinaryIO = open(fd, "r+b", 0)  # noqa: SIM115
        try:
            os.ftruncate(data.fileno(), info.size)  # sparse; a torn tail reads as zeros
            have = bytearray(info.chunk_count)
            claimed: set[int] = set()
            with contextlib.suppress(FileNotFoundError), open(have_path, "rb") as f:
                for line in f.read().split(b"\n")[:-1]:  # a torn last line has no b"\n"
                    if line.isdigit() and int(line) < len(have):
                        claimed.add(int(line))
            for i in sorted(claimed):
                offset, length = chunk_span(info.size, info.chunk_size, i)
                chunk = _pread(data.fileno(), length, offset)
                if leaf_hash(chunk) == leaves[i * HASH_BYTES : (i + 1) * HASH_BYTES]:
                    have[i] = 1
            if claimed:
                verified = b"".join(b"%d\n" % i for i in range(len(have)) if have[i])
                _write_atomic(have_path, verified, self._tmp)
                log.info(
                    "content store: resuming %s with %d of %d chunks (%d re-fetched)",
                    info.root_hex, sum(have), len(have), len(claimed) - sum(have),
                )  # fmt: skip
            have_file: BinaryIO = open(have_path, "ab", 0)  # noqa: SIM115
        except BaseException:
            data.close()
            raise
        return data, have_file, have

    async def _finish(self, partial: PartialShard) -> ShardInfo:
        info = partial.info
        data_path, leaves_path, have_path = self._partial_paths(info.root_hex)

        def install() -> None:
            # leaves first: a file under shards/ always has its leaf layer beside it.
            os.replace(leaves_path, self._leaves / info.root_hex)
            os.replace(data_path, self._shards / info.root_hex)
            _fsync_dir(self._leaves)
            _fsync_dir(self._shards)
            _unlink(have_path)

        try:
            await trio.to_thread.run_sync(partial._sync_and_close)  # outside the lock: slow
            async with self._lock:
                if info.root in self._complete:  # imported while we fetched
                    await trio.to_thread.run_sync(_unlink, data_path, leaves_path, have_path)
                else:
                    await trio.to_thread.run_sync(install)
                    await self._record_complete(info)
                return self._complete[info.root]
        finally:
            # Done or failed (a disk error), this object is closed: a later begin_fetch
            # starts afresh from the files.
            if self._partials.get(info.root) is partial:
                del self._partials[info.root]

    async def discard_partial(self, root: bytes) -> bool:
        """Forget a fetch left unfinished (by a past run): its files and reserved space.
        False if there was none; ContentStoreError if it is being fetched now."""
        hex_root = _hex(root)
        if root in self._partials or root in self._opening:
            raise ContentStoreError(f"{hex_root} is being fetched")
        async with self._lock:
            row = await self._storage.get_shard(hex_root)
            if row is None or row.state != PARTIAL:
                return False
            await self._storage.delete_shard(hex_root)
            await trio.to_thread.run_sync(_unlink, *self._partial_paths(hex_root))
            return True

    # -- space, pins, eviction -------------------------------------------------------------

    async def pin(self, owner: str, roots: Iterable[bytes]) -> int:
        """Pin ``roots`` (stored or not yet) for ``owner``; returns how many pins are new."""
        hex_roots = [_hex(r) for r in roots]
        async with self._lock:
            return await self._storage.add_pins(owner, hex_roots)

    async def unpin(self, owner: str) -> int:
        """Drop every pin of ``owner`` (its shards become evictable unless pinned by
        another owner); returns how many pins were dropped."""
        async with self._lock:
            return await self._storage.remove_pins(owner)

    async def pinned_roots(self, owner: str) -> list[bytes]:
        return [bytes.fromhex(h) for h in await self._storage.list_pins(owner)]

    async def usage(self) -> Usage:
        u = await self._storage.shard_usage()
        return Usage(u.used_bytes, u.pinned_bytes, self.quota_bytes)

    async def evict(self, nbytes_needed: int) -> list[ShardInfo]:
        """Evict least-recently-used unpinned complete shards until ``nbytes_needed`` more
        bytes fit under the quota; returns what was evicted (oldest first). Raises
        QuotaExceeded, evicting nothing, if pinned and in-progress content alone leave
        less room than that."""
        async with self._lock:
            return await self._make_room(nbytes_needed)

    async def _make_room(self, needed: int) -> list[ShardInfo]:
        assert self._lock.locked()
        u = await self._storage.shard_usage()
        if u.held_bytes + needed > self.quota_bytes:
            raise QuotaExceeded(
                needed, self.quota_bytes, u.pinned_bytes, u.partial_bytes, u.held_bytes
            )
        excess = u.used_bytes + needed - self.quota_bytes
        evicted: list[ShardInfo] = []
        if excess <= 0:
            return evicted
        for row in await self._storage.eviction_candidates():
            if excess <= 0:
                break
            info = ShardInfo(bytes.fromhex(row.root), row.size, row.chunk_size)
            # Forget it in-process first: from here on no reader is handed this shard.
            self._complete.pop(info.root, None)
            await self._storage.delete_shard(row.root)
            await trio.to_thread.run_sync(_unlink, self._shards / row.root, self._leaves / row.root)
            evicted.append(info)
            excess -= row.size
        log.info("content store: evicted %d shards", len(evicted))
        return evicted


class PartialShard:
    """A shard being fetched. Get one from `ContentStore.begin_fetch`; tasks fetching the
    same root share it. Write verified chunks in any order, from any number of tasks, then
    `finish` (any holder may; it is idempotent)."""

    def __init__(
        self,
        store: ContentStore,
        info: ShardInfo,
        leaves: bytes,
        data: BinaryIO | None,
        have_file: BinaryIO | None,
        have: bytearray,
    ) -> None:
        self.info = info
        self._store = store
        self._leaves = leaves
        self._data = data
        self._direct = None if data is None else _DirectWriter(
            store._partial_paths(info.root_hex)[0], data.fileno())
        self._have_file = have_file
        self._have = have
        self._count = sum(have)
        self._inflight = 0
        self._idle = trio.Event()
        self._closed = data is None
        self._result: ShardInfo | None = info if data is None else None
        self._finish_lock = trio.Lock()

    @classmethod
    def _done(cls, store: ContentStore, info: ShardInfo, leaves: bytes) -> PartialShard:
        # ``leaves`` hashed to the root, so they are the stored shard's leaves as well.
        return cls(store, info, leaves, None, None, bytearray(b"\x01" * info.chunk_count))

    @property
    def root(self) -> bytes:
        return self.info.root

    @property
    def size(self) -> int:
        return self.info.size

    @property
    def chunk_size(self) -> int:
        return self.info.chunk_size

    @property
    def complete(self) -> bool:
        """All chunks are written (finish() may still be needed to install the shard)."""
        return self._count == len(self._have)

    def missing(self) -> list[int]:
        """Indices of the chunks not written yet, ascending."""
        return [i for i, got in enumerate(self._have) if not got]

    async def write_chunk(self, index: int, data: bytes) -> bool:
        """Verify chunk ``index`` against its leaf, then write it at its offset.

        RemoteProtocolError("bad-chunk") if it does not verify: nothing is written and
        the sender should be penalised. Returns False if the chunk was already held (it
        is still verified, so a bad copy is still reported).
        """
        offset, _ = chunk_span(self.size, self.chunk_size, index)  # LocalProtocolError
        if self._closed and not self._have[index]:
            raise ContentStoreError(f"fetch of {self.info.root_hex} is closed")
        self._inflight += 1
        try:
            written = await trio.to_thread.run_sync(self._verify_and_write, index, offset, data)
        finally:
            self._inflight -= 1
            if not self._inflight:
                self._idle.set()
        if written and not self._have[index]:
            self._have[index] = 1
            self._count += 1
        return written

    def _verify_and_write(self, index: int, offset: int, data: bytes) -> bool:
        verify_chunk(self._leaves, self.size, self.chunk_size, index, data)
        if self._have[index]:
            return False
        assert self._direct is not None and self._have_file is not None
        self._direct.pwrite(data, offset)
        # Not fsynced: after a crash, resume re-verifies each listed chunk anyway.
        self._have_file.write(b"%d\n" % index)
        return True

    async def _drain(self) -> None:
        while self._inflight:
            self._idle = trio.Event()
            await self._idle.wait()

    async def finish(self) -> ShardInfo:
        """Install the complete shard under shards/ and return its info.

        IncompleteShard if chunks are missing (writes in flight are waited for first).
        """
        async with self._finish_lock:
            if self._result is not None:
                return self._result
            if self._closed:
                raise ContentStoreError(f"fetch of {self.info.root_hex} is closed")
            await self._drain()
            if not self.complete:
                missing = len(self._have) - self._count
                raise IncompleteShard(
                    f"{self.info.root_hex}: {missing} of {len(self._have)} chunks missing"
                )
            self._closed = True  # no await since the check: no write can slip in
            with trio.CancelScope(shield=True):
                self._result = await self._store._finish(self)
            return self._result

    def _sync_and_close(self) -> None:
        assert self._data is not None and self._direct is not None
        assert self._have_file is not None
        self._direct.close()
        os.fsync(self._data.fileno())
        self._data.close()
        self._have_file.close()

    async def aclose(self) -> None:
        """Stop this fetch without finishing it; its files stay for a later resume."""
        if self._closed:
            return
        self._closed = True
        await self._drain()
        if self._direct is not None:
            self._direct.close()
        for f in (self._data, self._have_file):
            if f is not None:
                f.close()
        if self._store._partials.get(self.root) is self:
            del self._store._partials[self.root]
