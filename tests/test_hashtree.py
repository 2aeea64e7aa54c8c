"""protocol.hashtree: chunk geometry, tree vectors written out by hand, tamper detection,
the streaming hasher against the one-shot computation, and the error kinds on garbage."""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import random

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from protocol.errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from protocol.hashtree import (
    DEFAULT_CHUNK_SIZE,
    MAX_CHUNK_SIZE,
    MIN_CHUNK_SIZE,
    ShardHasher,
    check_chunk_size,
    check_leaf_layer,
    chunk_count,
    chunk_span,
    hash_bytes,
    leaf_hash,
    root_from_leaves,
    verify_chunk,
)

CS = MIN_CHUNK_SIZE  # 64 KiB keeps every test fast
CHUNK_SIZES = [1 << k for k in range(16, 25)]


def H(data: bytes) -> bytes:  # the spec's names
    return hashlib.sha256(data).digest()


def L(chunk: bytes) -> bytes:
    return H(b"\x00" + chunk)


def N(left: bytes, right: bytes) -> bytes:
    return H(b"\x01" + left + right)


def shard(size: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(size)


def chunks_of(data: bytes, cs: int = CS) -> list[bytes]:
    return [data[i : i + cs] for i in range(0, len(data), cs)] or [b""]


# --- geometry ---------------------------------------------------------------------------


def test_chunk_size_bounds() -> None:
    for cs in CHUNK_SIZES:
        check_chunk_size(cs)
    assert DEFAULT_CHUNK_SIZE == 1 << 20 and MAX_CHUNK_SIZE == 1 << 24
    for bad in (0, -CS, CS // 2, CS + 1, 3 * CS, 2 * MAX_CHUNK_SIZE, True, 65536.0, "65536", None):
        with pytest.raises(LocalProtocolError):
            check_chunk_size(bad)  # type: ignore[arg-type]


def test_chunk_count_and_spans() -> None:
    assert chunk_count(0, CS) == 1 and chunk_span(0, CS, 0) == (0, 0)
    assert chunk_count(1, CS) == 1 and chunk_span(1, CS, 0) == (0, 1)
    assert chunk_count(CS, CS) == 1 and chunk_span(CS, CS, 0) == (0, CS)
    assert chunk_count(CS + 1, CS) == 2 and chunk_span(CS + 1, CS, 1) == (CS, 1)
    assert chunk_count(3 * CS, CS) == 3 and chunk_span(3 * CS, CS, 2) == (2 * CS, CS)
    assert chunk_count(2**40, 1 << 20) == 2**20
    for size, index in ((0, 1), (CS, 1), (CS + 1, 2), (5, -1), (5, True)):
        with pytest.raises(LocalProtocolError):
            chunk_span(size, CS, index)
    for size in (-1, True, 1.0, 2**63):
        with pytest.raises(LocalProtocolError):
            chunk_count(size, CS)  # type: ignore[arg-type]


# --- vectors: the tree written out by hand for n = 1, 2, 3, 5, 8 --------------------------


def _vector_chunks(n: int) -> list[bytes]:
    # n - 1 full chunks of byte i, then a 1000-byte tail (a short last chunk)
    return [bytes([i]) * CS for i in range(n - 1)] + [bytes([0xAA]) * 1000]


def _expected_root(n: int) -> bytes:
    c = _vector_chunks(n)
    lf = [L(x) for x in c]
    if n == 1:
        return lf[0]
    if n == 2:
        return N(lf[0], lf[1])
    if n == 3:  # [l0 l1 l2] -> [n01 l2] -> root
        return N(N(lf[0], lf[1]), lf[2])
    if n == 5:  # [l0..l4] -> [n01 n23 l4] -> [n0123 l4] -> root
        return N(N(N(lf[0], lf[1]), N(lf[2], lf[3])), lf[4])
    if n == 8:
        q = [N(lf[i], lf[i + 1]) for i in (0, 2, 4, 6)]
        return N(N(q[0], q[1]), N(q[2], q[3]))
    raise AssertionError(n)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8])
def test_known_vectors(n: int) -> None:
    data = b"".join(_vector_chunks(n))
    assert chunk_count(len(data), CS) == n
    root, leaves = hash_bytes(data, CS)
    assert leaves == b"".join(L(c) for c in _vector_chunks(n))
    assert root == _expected_root(n) == root_from_leaves(leaves)
    check_leaf_layer(leaves, len(data), CS, root)
    for i, c in enumerate(_vector_chunks(n)):
        verify_chunk(leaves, len(data), CS, i, c)


LITERAL_VECTORS = [  # (data, chunk_size, root hex)
    (b"", CS, "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d"),
    (b"\x00" * CS + b"abc", CS, "c77b8cfd3c3a0b7999dce3e70cea10c2d5d313b61e41ad2c31b5ae061136f223"),
    (bytes(range(256)) * 1024 + b"x", CS,
     "0335d14e7972d95ee858d4fcab403c15df2435c5a9b674fef1f96630c881a130"),
]  # fmt: skip


@pytest.mark.parametrize("data, cs, root_hex", LITERAL_VECTORS)
def test_literal_vectors(data: bytes, cs: int, root_hex: str) -> None:
    """Fixed hex, so another implementation (and specs/) can check itself against these."""
    root, _ = hash_bytes(data, cs)
    assert root.hex() == root_hex
    assert root == _reference_root([L(c) for c in chunks_of(data, cs)])


def _reference_root(level: list[bytes]) -> bytes:
    """The tree rule restated independently: pair left to right, carry an odd last node."""
    while len(level) > 1:
        nxt = [N(a, b) for a, b in zip(level[::2], level[1::2], strict=False)]
        level = nxt + level[len(nxt) * 2 :]
    return level[0]


def test_odd_node_is_carried_not_duplicated() -> None:
    a, b, c = L(b"a"), L(b"b"), L(b"c")
    assert root_from_leaves(a + b + c) != root_from_leaves(a + b + c + c)
    assert root_from_leaves(a + b + c) == N(N(a, b), c)


def test_root_from_leaves_rejects_bad_lengths() -> None:
    for bad in (b"", b"\x00" * 31, b"\x00" * 33, b"\x00" * 65):
        with pytest.raises(LocalProtocolError):
            root_from_leaves(bad)
    with pytest.raises(LocalProtocolError):
        root_from_leaves("00" * 32)  # type: ignore[arg-type]


# --- tamper detection -------------------------------------------------------------------


sizes = st.integers(min_value=0, max_value=6 * CS + 3)


@settings(max_examples=60, deadline=None)
@given(size=sizes, seed=st.integers(0, 2**32), pick=st.integers(0, 2**32), flip=st.integers(1, 255))
def test_any_single_byte_change_is_detected(size: int, seed: int, pick: int, flip: int) -> None:
    data = shard(size, seed)
    root, leaves = hash_bytes(data, CS)
    if size == 0:
        return
    pos = pick % size
    tampered = bytearray(data)
    tampered[pos] ^= flip
    i = pos // CS
    chunk = bytes(tampered[i * CS : (i + 1) * CS])
    with pytest.raises(RemoteProtocolError) as exc:
        verify_chunk(leaves, size, CS, i, chunk)
    assert exc.value.reason == "bad-chunk"
    assert hash_bytes(bytes(tampered), CS)[0] != root


@settings(max_examples=60, deadline=None)
@given(size=sizes, seed=st.integers(0, 2**32), cut=st.integers(1, 3 * CS), extend=st.booleans())
def test_chunk_of_wrong_length_is_refused(size: int, seed: int, cut: int, extend: bool) -> None:
    data = shard(size, seed)
    _, leaves = hash_bytes(data, CS)
    i = chunk_count(size, CS) - 1
    off, length = chunk_span(size, CS, i)
    chunk = data[off : off + length]
    bad = chunk + b"\x00" * cut if extend else chunk[: max(0, length - cut)]
    if bad == chunk:
        return  # an empty chunk cannot be cut shorter
    with pytest.raises(RemoteProtocolError, match="bad-chunk"):
        verify_chunk(leaves, size, CS, i, bad)


@settings(max_examples=80, deadline=None)
@given(size=sizes, seed=st.integers(0, 2**32), delta=st.integers(-200, 200).filter(bool))
def test_any_truncation_or_extension_of_the_leaf_layer_is_detected(
    size: int, seed: int, delta: int
) -> None:
    root, leaves = hash_bytes(shard(size, seed), CS)
    changed = leaves[:delta] if delta < 0 else leaves + random.Random(seed).randbytes(delta)
    with pytest.raises(RemoteProtocolError) as exc:
        check_leaf_layer(changed, size, CS, root)
    assert exc.value.reason == "bad-leaves"


@settings(max_examples=60, deadline=None)
@given(n=st.integers(2, 7), seed=st.integers(0, 2**32), data=st.data())
def test_any_swap_of_two_different_chunks_is_detected(
    n: int, seed: int, data: st.DataObject
) -> None:
    size = n * CS  # all chunks full, so a swap keeps every length right
    original = chunks_of(shard(size, seed))
    i = data.draw(st.integers(0, n - 1))
    j = data.draw(st.integers(0, n - 1).filter(lambda j: original[j] != original[i]))
    root, leaves = hash_bytes(b"".join(original), CS)
    swapped = list(original)
    swapped[i], swapped[j] = swapped[j], swapped[i]
    with pytest.raises(RemoteProtocolError):
        verify_chunk(leaves, size, CS, i, swapped[i])
    _, swapped_leaves = hash_bytes(b"".join(swapped), CS)
    assert root_from_leaves(swapped_leaves) != root
    with pytest.raises(RemoteProtocolError):
        check_leaf_layer(swapped_leaves, size, CS, root)


def test_leaf_layer_with_one_changed_bit_is_refused() -> None:
    size = 5 * CS + 7
    root, leaves = hash_bytes(shard(size), CS)
    for bit in range(0, len(leaves) * 8, 97):
        changed = bytearray(leaves)
        changed[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(RemoteProtocolError, match="bad-leaves"):
            check_leaf_layer(bytes(changed), size, CS, root)


def test_leaf_layer_for_another_size_or_chunk_size_is_refused() -> None:
    size = 4 * CS
    root, leaves = hash_bytes(shard(size), CS)
    check_leaf_layer(leaves, size, CS, root)
    with pytest.raises(RemoteProtocolError):
        check_leaf_layer(leaves, size + CS, CS, root)  # 5 chunks expected
    with pytest.raises(RemoteProtocolError):
        check_leaf_layer(leaves, size, 2 * CS, root)  # 2 chunks expected


# --- streaming hasher -------------------------------------------------------------------


def _one_shot(data: bytes, cs: int) -> tuple[bytes, bytes]:
    leaves = b"".join(L(c) for c in chunks_of(data, cs))
    return root_from_leaves(leaves), leaves


@settings(max_examples=80, deadline=None)
@given(
    size=st.one_of(
        st.integers(0, 4 * CS + 5),
        st.sampled_from([k * CS + d for k in range(5) for d in (-1, 0, 1) if k * CS + d >= 0]),
    ),
    seed=st.integers(0, 2**32),
    splits=st.lists(st.integers(0, 4 * CS + 5), max_size=8),
)
def test_streaming_equals_one_shot(size: int, seed: int, splits: list[int]) -> None:
    data = shard(size, seed)
    points = sorted({0, size, *(s for s in splits if s <= size)})
    hasher = ShardHasher(CS)
    for a, b in itertools.pairwise(points):
        hasher.update(memoryview(data)[a:b] if a % 2 else data[a:b])
    hasher.update(b"")
    root, leaves, got_size = hasher.finish()
    assert (root, leaves, got_size) == (*_one_shot(data, CS), size)


@pytest.mark.parametrize("cs", [CS, 2 * CS, 1 << 20])
def test_streaming_other_chunk_sizes(cs: int) -> None:
    data = shard(3 * cs + 11)
    hasher = ShardHasher(cs)
    for i in range(0, len(data), 10_000):
        hasher.update(data[i : i + 10_000])
    assert hasher.finish()[:2] == _one_shot(data, cs)


def test_streaming_hasher_holds_no_chunk() -> None:
    hasher = ShardHasher(MAX_CHUNK_SIZE)
    piece = b"\x5a" * 4096
    for _ in range(1000):
        hasher.update(piece)
    # nothing but the SHA-256 state and the (still empty) leaf layer is kept
    assert len(hasher._leaves) == 0 and hasher.size == 4096 * 1000
    root, leaves, size = hasher.finish()
    assert root == leaves == L(piece * 1000) and size == 4096 * 1000


def test_streaming_hasher_misuse() -> None:
    hasher = ShardHasher(CS)
    with pytest.raises(LocalProtocolError):
        hasher.update("text")  # type: ignore[arg-type]
    hasher.finish()
    with pytest.raises(LocalProtocolError):
        hasher.update(b"x")
    with pytest.raises(LocalProtocolError):
        hasher.finish()
    with pytest.raises(LocalProtocolError):
        ShardHasher(1000)


# --- garbage in, only protocol errors out --------------------------------------------------

garbage = st.one_of(
    st.binary(max_size=300),
    st.none(),
    st.integers(-(2**70), 2**70),
    st.booleans(),
    st.floats(allow_nan=True),
    st.text(max_size=40),
    st.lists(st.integers(), max_size=3),
)


@settings(max_examples=300, deadline=None)
@given(leaves=garbage, size=garbage, cs=garbage, root=garbage, index=garbage, data=garbage)
def test_garbage_raises_only_protocol_errors(
    leaves: object, size: object, cs: object, root: object, index: object, data: object
) -> None:
    calls = [
        lambda: check_chunk_size(cs),  # type: ignore[arg-type]
        lambda: chunk_count(size, cs),  # type: ignore[arg-type]
        lambda: chunk_span(size, cs, index),  # type: ignore[arg-type]
        lambda: root_from_leaves(leaves),  # type: ignore[arg-type]
        lambda: check_leaf_layer(leaves, size, cs, root),  # type: ignore[arg-type]
        lambda: verify_chunk(leaves, size, cs, index, data),  # type: ignore[arg-type]
        lambda: ShardHasher(cs).update(data),  # type: ignore[arg-type]
        lambda: leaf_hash(data),  # type: ignore[arg-type]
    ]
    for call in calls:
        with contextlib.suppress(ProtocolError):
            call()


@settings(max_examples=200, deadline=None)
@given(leaves=st.binary(max_size=400), size=sizes, root=st.binary(min_size=32, max_size=32))
def test_random_leaf_layers_from_peers_raise_remote_errors(
    leaves: bytes, size: int, root: bytes
) -> None:
    # With one chunk the leaf layer is the root itself: that layer is right, and only the
    # chunk check can tell it from another.
    assume(not (chunk_count(size, CS) == 1 and leaves == root))
    with pytest.raises(RemoteProtocolError):
        check_leaf_layer(leaves, size, CS, root)


@settings(max_examples=200, deadline=None)
@given(size=sizes, data=st.binary(max_size=300), index=st.integers(0, 6))
def test_random_chunks_from_peers_raise_remote_errors(size: int, data: bytes, index: int) -> None:
    _, leaves = hash_bytes(shard(size), CS)
    if index >= chunk_count(size, CS):
        with pytest.raises(LocalProtocolError):  # we never ask for a chunk that does not exist
            verify_chunk(leaves, size, CS, index, data)
        return
    off, length = chunk_span(size, CS, index)
    if data == shard(size)[off : off + length]:
        return
    with pytest.raises(RemoteProtocolError, match="bad-chunk"):
        verify_chunk(leaves, size, CS, index, data)
