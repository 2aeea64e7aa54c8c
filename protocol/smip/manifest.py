"""SMIP manifests: shard entries, the signed manifest, its version id, the version graph."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from nacl.signing import SigningKey

from protocol.checks import MAX_INT, packb
from protocol.checks import Invalid as _Invalid
from protocol.checks import check_int as _check_int
from protocol.checks import check_keys as _check_keys
from protocol.checks import fail as _fail
from protocol.checks import to_remote as _remote
from protocol.envelope import DOMAIN_MANIFEST, open_envelope, seal, unpack_strict
from protocol.errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from protocol.hashtree import (
    DEFAULT_CHUNK_SIZE,
    MAX_CHUNK_SIZE,
    check_chunk_size,
    chunk_count,
)
from protocol.peerid import peer_id_from_public_key, public_key_from_peer_id
from protocol.smip.common import (
    ID_BYTES,
    KINDS,
    MANIFEST_VERSION,
    MAX_CONFIG_BYTES,
    MAX_CONFIG_DEPTH,
    MAX_LINEAGE_DEPTH,
    MAX_LINEAGE_VERSIONS,
    MAX_MANIFEST_BYTES,
    MAX_NAME,
    MAX_PARENTS,
    MAX_PATH_BYTES,
    MAX_SHARD_CHUNKS,
    MAX_SHARDS,
    _check_id,
    _check_version_field,
    _forbidden,
    short_id,
    version_id,
)

# --- manifest fields ------------------------------------------------------------------------


def check_name(name: object) -> None:
    """1..MAX_NAME characters, none forbidden, no "/" or "\\", no leading or trailing
    space, not "." or "..": safe to print and to use as one path component."""
    if not isinstance(name, str):
        _fail(f"name must be a string, got {type(name).__name__}")
    if not 1 <= len(name) <= MAX_NAME:
        _fail(f"name has {len(name)} characters, not 1..{MAX_NAME}")
    if _forbidden(name) or "/" in name or "\\" in name:
        _fail("name contains a control character, a separator or a slash")
    if name != name.strip(" ") or name in (".", ".."):
        _fail(f"name {name!r} has leading or trailing spaces or is a dot name")


def check_path(path: object) -> None:
    """A relative POSIX path: non-empty parts separated by single "/", none "." or "..",
    no backslash or forbidden code point, at most MAX_PATH_BYTES of UTF-8."""
    if not isinstance(path, str):
        _fail(f"path must be a string, got {type(path).__name__}")
    if _forbidden(path) or "\\" in path:
        _fail(f"path {path!r} contains a control character or a backslash")
    if not 1 <= len(path.encode("utf-8")) <= MAX_PATH_BYTES:
        _fail(f"path must have 1..{MAX_PATH_BYTES} UTF-8 bytes")
    if any(part in ("", ".", "..") for part in path.split("/")):
        _fail(f"path {path!r} is absolute or has an empty, '.' or '..' part")


def _normalise_config(value: object, depth: int) -> Any:
    """A copy of a JSON-like value with tuples as lists; _Invalid on anything else."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        _check_int("config integer", value, -(2**63), MAX_INT)
        return value
    if isinstance(value, float):
        if not math.isfinite(value):  # JSON has no NaN or infinity
            _fail(f"config float {value} is not finite")
        return value
    if isinstance(value, (list, tuple, dict)) and depth >= MAX_CONFIG_DEPTH:
        _fail(f"config nested deeper than {MAX_CONFIG_DEPTH} levels")
    if isinstance(value, (list, tuple)):
        return [_normalise_config(v, depth + 1) for v in value]
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            _fail("config map keys must be strings")
        return {k: _normalise_config(v, depth + 1) for k, v in value.items()}
    _fail(f"config holds a {type(value).__name__}; only JSON-like values are allowed")


def normalise_config(config: object) -> dict[str, Any]:
    """Check a config map and return the copy a manifest holds (tuples become lists).

    Values are nil, bool, int in [-2^63, 2^63), finite float, str, array and str-keyed map
    (no bin: configs round-trip through JSON), nested at most MAX_CONFIG_DEPTH levels and
    at most MAX_CONFIG_BYTES once encoded in msgpack's shortest form with float64 floats.
    """
    if not isinstance(config, dict):
        _fail(f"config must be a map, got {type(config).__name__}")
    copy: dict[str, Any] = _normalise_config(config, 0)
    try:
        size = len(packb(copy))
    except (ValueError, TypeError, OverflowError) as exc:  # lone surrogates, locally built
        _fail(f"config does not encode: {exc}")
    if size > MAX_CONFIG_BYTES:
        _fail(f"config of {size} bytes > {MAX_CONFIG_BYTES}")
    return copy


def choose_chunk_size(size: int) -> int:
    """The chunk size a publisher should use: DEFAULT_CHUNK_SIZE, doubled until the shard
    has at most MAX_SHARD_CHUNKS chunks. LocalProtocolError beyond 8 TiB."""
    _check_int("size", size)
    chunk_size = DEFAULT_CHUNK_SIZE
    while chunk_count(size, chunk_size) > MAX_SHARD_CHUNKS:
        if chunk_size == MAX_CHUNK_SIZE:
            raise LocalProtocolError(f"a shard of {size} bytes is too large for SMIP")
        chunk_size *= 2
    return chunk_size


# --- manifest -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShardEntry:
    """One file of a version, content-addressed by the root of its hash tree."""

    path: str
    size: int
    chunk_size: int
    root: bytes

    def __post_init__(self) -> None:
        check_path(self.path)
        _check_int("size", self.size)
        try:
            check_chunk_size(self.chunk_size)
            n = chunk_count(self.size, self.chunk_size)
        except ProtocolError as exc:
            _fail(str(exc))
        if n > MAX_SHARD_CHUNKS:
            _fail(f"{self.path}: {n} chunks > {MAX_SHARD_CHUNKS}; use a larger chunk_size")
        _check_id("root", self.root)

    @property
    def chunks(self) -> int:
        return chunk_count(self.size, self.chunk_size)

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "size": self.size, "chunk_size": self.chunk_size,
                "root": self.root}  # fmt: skip


_SHARD_KEYS = frozenset({"path", "size", "chunk_size", "root"})


@dataclass(frozen=True)
class Manifest:
    """A version's body. Not hashable (``config`` is a dict); its identity is the version
    id of the envelope that carries it."""

    kind: str
    name: str
    parents: tuple[bytes, ...]  # version ids, first parent first
    config: dict[str, Any]
    shards: tuple[ShardEntry, ...]  # strictly increasing by path
    created_ms: int
    publisher: str  # peer id; must be the envelope's signer

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            _fail(f"kind {self.kind!r} is not one of {KINDS}")
        check_name(self.name)
        if not isinstance(self.parents, tuple):
            _fail("parents must be a tuple")
        if len(self.parents) > MAX_PARENTS:
            _fail(f"{len(self.parents)} parents > {MAX_PARENTS}")
        for parent in self.parents:
            _check_id("parent", parent)
        if len(set(self.parents)) != len(self.parents):
            _fail("parents are not unique")
        object.__setattr__(self, "config", normalise_config(self.config))
        self._check_shards()
        _check_int("created_ms", self.created_ms)
        try:
            public_key_from_peer_id(self.publisher)
        except RemoteProtocolError as exc:
            _fail(str(exc), "bad-peer-id")

    def _check_shards(self) -> None:
        if not isinstance(self.shards, tuple):
            _fail("shards must be a tuple")
        if not 1 <= len(self.shards) <= MAX_SHARDS:
            _fail(f"{len(self.shards)} shards, not 1..{MAX_SHARDS}")
        if not all(isinstance(s, ShardEntry) for s in self.shards):
            _fail("shards must hold ShardEntry values")
        paths = [s.path for s in self.shards]
        # str order is code point order is UTF-8 byte order: every implementation agrees.
        if any(a >= b for a, b in itertools.pairwise(paths)):
            _fail("shard paths must be unique and sorted")
        # A file "a" and a file "a/b" cannot both be written to a directory.
        dirs = {p[:i] for p in paths for i, c in enumerate(p) if c == "/"}
        clash = dirs.intersection(paths)
        if clash:
            _fail(f"shard path {sorted(clash)[0]!r} is also a directory of another shard")

    @property
    def total_size(self) -> int:
        return sum(s.size for s in self.shards)

    def to_dict(self) -> dict[str, Any]:
        """The body map, version field ``v`` first (the spec's key order)."""
        return {
            "v": MANIFEST_VERSION,
            "kind": self.kind,
            "name": self.name,
            "parents": list(self.parents),
            "config": self.config,
            "shards": [s.to_dict() for s in self.shards],
            "created_ms": self.created_ms,
            "publisher": self.publisher,
        }

    @classmethod
    def from_dict(cls, d: object) -> Manifest:
        """Inverse of :meth:`to_dict`; RemoteProtocolError on anything wrong."""
        _check_version_field("manifest", d, MANIFEST_VERSION)
        try:
            d = _check_keys("manifest", d, _MANIFEST_KEYS)
            parents, shards = d["parents"], d["shards"]
            if not isinstance(parents, list) or not isinstance(shards, list):
                _fail("parents and shards must be arrays")
            if len(shards) > MAX_SHARDS:  # before building thousands of entries
                _fail(f"{len(shards)} shards > {MAX_SHARDS}")
            entries = tuple(ShardEntry(**_check_keys("shard", s, _SHARD_KEYS)) for s in shards)
            return cls(d["kind"], d["name"], tuple(parents), d["config"], entries,
                       d["created_ms"], d["publisher"])  # fmt: skip
        except _Invalid as exc:
            raise _remote(exc) from None

    def encode_body(self) -> bytes:
        return packb(self.to_dict())

    @classmethod
    def decode_body(cls, body: bytes) -> Manifest:
        return cls.from_dict(unpack_strict(body, MAX_MANIFEST_BYTES))


_MANIFEST_KEYS = frozenset(
    {"v", "kind", "name", "parents", "config", "shards", "created_ms", "publisher"}
)


def build_manifest(
    *,
    kind: str,
    name: str,
    shards: Iterable[ShardEntry],
    created_ms: int,
    publisher: str,
    parents: Sequence[bytes] = (),
    config: Mapping[str, Any] | None = None,
) -> Manifest:
    """A manifest with its shards sorted by path; LocalProtocolError on any invalid field."""
    return Manifest(kind, name, tuple(parents), dict(config or {}),
                    tuple(sorted(shards, key=lambda s: s.path)), created_ms, publisher)  # fmt: skip


def sign_manifest(signing_key: SigningKey, manifest: Manifest) -> tuple[bytes, bytes]:
    """``(envelope_bytes, version_id)``. LocalProtocolError if ``manifest.publisher`` is not
    the key's peer id or the envelope would exceed MAX_MANIFEST_BYTES (the per-field caps
    allow more than fits)."""
    own = peer_id_from_public_key(bytes(signing_key.verify_key))
    if manifest.publisher != own:
        raise LocalProtocolError(f"manifest publisher is {manifest.publisher}, key is {own}")
    data = seal(signing_key, DOMAIN_MANIFEST, manifest.encode_body()).encode()
    if len(data) > MAX_MANIFEST_BYTES:
        raise LocalProtocolError(f"manifest envelope of {len(data)} bytes > {MAX_MANIFEST_BYTES}")
    return data, version_id(data)


def open_manifest(data: bytes, expected_version_id: bytes | None = None) -> Manifest:
    """Check manifest envelope bytes and return the manifest.

    In order: size ("oversized"); if an id is expected, the hash of the bytes
    ("id-mismatch", before any decoding); the envelope ("malformed", "unknown-version",
    "wrong-domain", "bad-signature"); the body ("unknown-version", "malformed",
    "oversized", "bad-peer-id"); the signer is the publisher ("signer-mismatch").
    """
    if expected_version_id is not None and not (
        isinstance(expected_version_id, bytes) and len(expected_version_id) == ID_BYTES
    ):
        raise LocalProtocolError(f"expected_version_id must be {ID_BYTES} bytes")
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise RemoteProtocolError("malformed", "manifest must be bytes")
    data = bytes(data)
    if len(data) > MAX_MANIFEST_BYTES:
        raise RemoteProtocolError("oversized", f"manifest of {len(data)} bytes")
    if expected_version_id is not None and version_id(data) != expected_version_id:
        raise RemoteProtocolError(
            "id-mismatch", f"bytes are not version {short_id(expected_version_id)}"
        )
    envelope = open_envelope(data, DOMAIN_MANIFEST, MAX_MANIFEST_BYTES)
    manifest = Manifest.decode_body(envelope.body)
    if envelope.signer != manifest.publisher:
        raise RemoteProtocolError(
            "signer-mismatch", f"signed by {envelope.signer}, publisher {manifest.publisher}"
        )
    return manifest


# --- version graph ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Lineage:
    versions: tuple[bytes, ...]  # the start, then ancestors depth-first, first parent first
    missing: tuple[bytes, ...]  # ids in ``versions`` whose manifest was not available
    truncated: bool  # the walk stopped at max_depth or max_versions


def lineage(
    version: bytes,
    get_manifest: Callable[[bytes], Manifest | None],
    *,
    max_depth: int = MAX_LINEAGE_DEPTH,
    max_versions: int = MAX_LINEAGE_VERSIONS,
) -> Lineage:
    """Walk a version's ancestry through ``get_manifest`` (None: not available here).

    Each id appears once, so a cycle (impossible with honest hashes, possible in a corrupt
    store) ends the walk instead of looping. ``missing`` lists what to fetch to go further.
    Iterative: a 4096-deep chain must not hit Python's recursion limit.
    """
    seen: set[bytes] = set()
    order: list[bytes] = []
    missing: list[bytes] = []
    truncated = False
    stack: list[tuple[bytes, int]] = [(version, 0)]
    while stack:
        vid, depth = stack.pop()
        if vid in seen:
            continue
        if len(order) >= max_versions:
            truncated = True
            break
        seen.add(vid)
        order.append(vid)
        manifest = get_manifest(vid)
        if manifest is None:
            missing.append(vid)
            continue
        if depth >= max_depth:
            truncated = truncated or bool(manifest.parents)
            continue
        stack.extend((p, depth + 1) for p in reversed(manifest.parents))
    return Lineage(tuple(order), tuple(missing), truncated)


def shared_shards(child: Manifest, parent: Manifest) -> tuple[ShardEntry, ...]:
    """The child's shards whose content (root) the parent already has, under any path."""
    roots = {s.root for s in parent.shards}
    return tuple(s for s in child.shards if s.root in roots)


def new_shards(child: Manifest, parents: Iterable[Manifest]) -> tuple[ShardEntry, ...]:
    """The child's shards found in none of ``parents``: what a holder of the parents must
    fetch. (A root fixes content and size, so equal roots are the same bytes.)"""
    roots = {s.root for p in parents for s in p.shards}
    return tuple(s for s in child.shards if s.root not in roots)


