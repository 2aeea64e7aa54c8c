"""SMIP hash trees: how a shard (one file) is chunked, hashed and verified chunk by chunk.

A shard of ``size`` bytes is cut into ``n = max(1, ceil(size / chunk_size))`` chunks; chunk
``i`` is bytes ``[i * chunk_size, min(size, (i + 1) * chunk_size))`` and an empty shard has
one empty chunk. With H = SHA-256 (specs/records.md, "Hashes"):

    leaf_i = H(0x00 || chunk_i)
    node   = H(0x01 || left || right)

The tree is built level by level; at a level with an odd count the last node is carried up
unchanged. It is not duplicated: with duplication, the leaf lists ``[a, b, c]`` and
``[a, b, c, c]`` would share one root. The 0x00/0x01 prefixes keep a leaf from ever being
read as an inner node (the second-preimage fix of RFC 6962). ``root`` is the node left
when one remains (for ``n == 1`` the root is ``leaf_0``); it content-addresses the shard.

The *leaf layer* is ``leaf_0 || ... || leaf_{n-1}`` (32·n bytes). A fetcher takes it once
from any peer, checks it with :func:`check_leaf_layer` against the manifest's ``size``,
``chunk_size`` and ``root``, and then checks every chunk alone with :func:`verify_chunk`
before writing it, so a bad chunk is caught at the cost of hashing that one chunk.

Errors: our misuse (an invalid chunk size, an index out of range, a leaf layer of the wrong
length where it was already checked) raises LocalProtocolError; bytes from a peer that do
not match (leaf layer, chunk) raise RemoteProtocolError with reason ``bad-leaves`` or
``bad-chunk``. Nothing else escapes, whatever the input.
"""

from __future__ import annotations

import hashlib

from protocol.errors import LocalProtocolError, RemoteProtocolError

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "HASH_BYTES",
    "MAX_CHUNK_SIZE",
    "MAX_SHARD_SIZE",
    "MIN_CHUNK_SIZE",
    "ShardHasher",
    "check_chunk_size",
    "check_leaf_layer",
    "chunk_count",
    "chunk_span",
    "hash_bytes",
    "leaf_hash",
    "root_from_leaves",
    "verify_chunk",
]

MIN_CHUNK_SIZE = 1 << 16  # 64 KiB: below this the leaf layer grows past 1/2048 of the data
MAX_CHUNK_SIZE = 1 << 24  # 16 MiB: the most a fetcher must buffer to verify one chunk
DEFAULT_CHUNK_SIZE = 1 << 20  # 1 MiB
MAX_SHARD_SIZE = 2**63 - 1  # sizes travel as msgpack ints and sit in SQLite INTEGERs
HASH_BYTES = 32
LEAF_PREFIX = b"\x00"
NODE_PREFIX = b"\x01"

_BytesLike = bytes | bytearray | memoryview


def _h(*parts: _BytesLike) -> bytes:
    h = hashlib.sha256()
    for part in parts:
        h.update(part)
    return h.digest()


# --- geometry ------------------------------------------------------------------------------


def check_chunk_size(chunk_size: int) -> None:
    """LocalProtocolError unless ``chunk_size`` is a power of two in [64 KiB, 16 MiB]."""
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool):
        raise LocalProtocolError(f"chunk_size must be an int, got {type(chunk_size).__name__}")
    if not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE or chunk_size & (chunk_size - 1):
        raise LocalProtocolError(
            f"chunk_size {chunk_size} is not a power of two in [{MIN_CHUNK_SIZE}, {MAX_CHUNK_SIZE}]"
        )


def _check_size(size: int) -> None:
    if not isinstance(size, int) or isinstance(size, bool):
        raise LocalProtocolError(f"size must be an int, got {type(size).__name__}")
    if not 0 <= size <= MAX_SHARD_SIZE:
        raise LocalProtocolError(f"size {size} outside [0, {MAX_SHARD_SIZE}]")


def chunk_count(size: int, chunk_size: int) -> int:
    """Number of chunks of a shard of ``size`` bytes: ``max(1, ceil(size / chunk_size))``."""
    _check_size(size)
    check_chunk_size(chunk_size)
    return max(1, -(-size // chunk_size))


def chunk_span(size: int, chunk_size: int, index: int) -> tuple[int, int]:
    """``(offset, length)`` of chunk ``index``; LocalProtocolError if it does not exist."""
    n = chunk_count(size, chunk_size)
    if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < n:
        raise LocalProtocolError(f"chunk index {index!r} outside [0, {n})")
    offset = index * chunk_size
    return offset, min(size - offset, chunk_size)


# --- hashing ---------------------------------------------------------------------------------


def leaf_hash(chunk: _BytesLike) -> bytes:
    """``H(0x00 || chunk)``."""
    if not isinstance(chunk, _BytesLike):
        raise LocalProtocolError(f"chunk must be bytes, got {type(chunk).__name__}")
    return _h(LEAF_PREFIX, chunk)


def root_from_leaves(leaves: _BytesLike) -> bytes:
    """The root of a leaf layer. LocalProtocolError unless its length is a non-zero
    multiple of 32 (a caller checks a peer's leaf layer with :func:`check_leaf_layer`)."""
    if not isinstance(leaves, _BytesLike):
        raise LocalProtocolError(f"leaf layer must be bytes, got {type(leaves).__name__}")
    view = memoryview(leaves).cast("B")
    if len(view) == 0 or len(view) % HASH_BYTES:
        raise LocalProtocolError(f"leaf layer of {len(view)} bytes is not a multiple of 32 > 0")
    level = [bytes(view[i : i + HASH_BYTES]) for i in range(0, len(view), HASH_BYTES)]
    while len(level) > 1:
        parents = [_h(NODE_PREFIX, level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            parents.append(level[-1])  # carried up unchanged, never paired with itself
        level = parents
    return level[0]


def hash_bytes(data: _BytesLike, chunk_size: int) -> tuple[bytes, bytes]:
    """``(root, leaves)`` of an in-memory shard. For files use :class:`ShardHasher`."""
    hasher = ShardHasher(chunk_size)
    hasher.update(data)
    root, leaves, _ = hasher.finish()
    return root, leaves


class ShardHasher:
    """Streaming hasher: feed a shard in pieces of any size, get ``(root, leaves, size)``.

    Holds no chunk in memory: each leaf's SHA-256 state is fed as bytes arrive, so memory
    is the leaf layer (32 bytes a chunk) whatever the shard size.
    """

    def __init__(self, chunk_size: int = DEFAULT_CHUNK_SIZE) -> None:
        check_chunk_size(chunk_size)
        self.chunk_size = chunk_size
        self.size = 0
        self._leaves = bytearray()
        self._leaf = hashlib.sha256(LEAF_PREFIX)
        self._in_chunk = 0  # bytes fed into self._leaf so far
        self._done = False

    def update(self, data: _BytesLike) -> None:
        if self._done:
            raise LocalProtocolError("ShardHasher.update after finish")
        if not isinstance(data, _BytesLike):
            raise LocalProtocolError(f"data must be bytes, got {type(data).__name__}")
        view = memoryview(data).cast("B")
        if self.size + len(view) > MAX_SHARD_SIZE:
            raise LocalProtocolError(f"shard larger than {MAX_SHARD_SIZE} bytes")
        self.size += len(view)
        while view:
            take = min(len(view), self.chunk_size - self._in_chunk)
            self._leaf.update(view[:take])
            self._in_chunk += take
            view = view[take:]
            if self._in_chunk == self.chunk_size:
                self._close_leaf()

    def _close_leaf(self) -> None:
        self._leaves += self._leaf.digest()
        self._leaf = hashlib.sha256(LEAF_PREFIX)
        self._in_chunk = 0

    def finish(self) -> tuple[bytes, bytes, int]:
        """``(root, leaves, size)``; the hasher takes no more data afterwards."""
        if self._done:
            raise LocalProtocolError("ShardHasher.finish called twice")
        self._done = True
        # A trailing short chunk, or the one empty chunk of an empty shard.
        if self._in_chunk or self.size == 0:
            self._close_leaf()
        leaves = bytes(self._leaves)
        return root_from_leaves(leaves), leaves, self.size


# --- verification ----------------------------------------------------------------------------


def check_leaf_layer(leaves: object, size: int, chunk_size: int, root: bytes) -> None:
    """Check a leaf layer received from a peer against a manifest's shard entry.

    ``size``, ``chunk_size`` and ``root`` are ours (taken from a checked manifest); an
    invalid one is LocalProtocolError. RemoteProtocolError("bad-leaves") unless ``leaves``
    is bytes of exactly 32·n for that size and chunk size and hashes to ``root``.
    """
    n = chunk_count(size, chunk_size)
    if not isinstance(root, bytes | bytearray) or len(root) != HASH_BYTES:
        raise LocalProtocolError("root must be 32 bytes")
    if not isinstance(leaves, _BytesLike):
        raise RemoteProtocolError("bad-leaves", f"leaf layer is a {type(leaves).__name__}")
    got = memoryview(leaves).nbytes
    if got != HASH_BYTES * n:
        raise RemoteProtocolError(
            "bad-leaves", f"leaf layer of {got} bytes, expected {HASH_BYTES * n} ({n} chunks)"
        )
    if root_from_leaves(leaves) != bytes(root):
        raise RemoteProtocolError("bad-leaves", f"leaf layer does not hash to {bytes(root).hex()}")


def verify_chunk(leaves: _BytesLike, size: int, chunk_size: int, index: int, data: object) -> None:
    """Check chunk ``index`` received from a peer against a leaf layer already checked by
    :func:`check_leaf_layer`. RemoteProtocolError("bad-chunk") if ``data`` has the wrong
    length or hash; LocalProtocolError if the index or the leaf layer does not fit."""
    _, length = chunk_span(size, chunk_size, index)
    if not isinstance(leaves, _BytesLike):
        raise LocalProtocolError(f"leaf layer must be bytes, got {type(leaves).__name__}")
    lv = memoryview(leaves).cast("B")
    if len(lv) != HASH_BYTES * chunk_count(size, chunk_size):
        raise LocalProtocolError("leaf layer does not match size and chunk_size")
    if not isinstance(data, _BytesLike):
        raise RemoteProtocolError("bad-chunk", f"chunk {index} is a {type(data).__name__}")
    got = memoryview(data).nbytes
    if got != length:
        raise RemoteProtocolError("bad-chunk", f"chunk {index} has {got} bytes, expected {length}")
    if leaf_hash(data) != lv[index * HASH_BYTES : (index + 1) * HASH_BYTES]:
        raise RemoteProtocolError("bad-chunk", f"chunk {index} does not match its leaf hash")
