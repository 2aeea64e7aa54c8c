"""SMIP, the model sharing protocol: manifests, announcements, DHT keys, the chunk stream.

See specs/smip.md (normative). This module is pure: it builds, encodes, decodes and checks,
given bytes and ``now_ms``; node/ does the DHT, gossip, streams and disk.

* A *manifest* is a signed envelope (domain ``iollm/manifest/v1``) naming a model or
  dataset version: kind, name, parent versions, an architecture config and its shards, each
  with size, chunk size and hash-tree root (protocol/hashtree.py). Its *version id* is
  SHA-256 of the exact envelope bytes, so an id names one publisher's one signed
  statement, and a manifest fetched by id is checked by hashing before any decoding.
* An *announcement* (domain ``iollm/announce/v1``, gossip topic ``iollm/smip/announce/1``)
  says "peer P provides version V"; receivers keep one per (P, V), the highest ``seq``.
* Providers are found on the DHT under :func:`version_provider_key` and
  :func:`shard_provider_key`, the same key form as capability classes.
* Bulk data moves on the stream protocol ``/iollm/smip/1.0.0``: a request frame, then a
  response header frame and, for ``ok``, one payload frame; many requests per stream.

Errors: building something invalid is LocalProtocolError; any bytes from a peer that are
invalid raise RemoteProtocolError(reason) and nothing else.
"""

from __future__ import annotations

import hashlib
import itertools
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from nacl.signing import SigningKey

from protocol.capability import MAX_CLOCK_SKEW_MS
from protocol.checks import MAX_INT as MAX_INT  # re-exported: specs/smip.md names it here
from protocol.checks import Invalid as _Invalid
from protocol.checks import check_int as _check_int
from protocol.checks import check_keys as _check_keys
from protocol.checks import digest, packb
from protocol.checks import fail as _fail
from protocol.checks import to_remote as _remote
from protocol.envelope import DOMAIN_ANNOUNCE, DOMAIN_MANIFEST, open_envelope, seal, unpack_strict
from protocol.errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from protocol.hashtree import (
    DEFAULT_CHUNK_SIZE,
    HASH_BYTES,
    MAX_CHUNK_SIZE,
    check_chunk_size,
    chunk_count,
    chunk_span,
)
from protocol.peerid import peer_id_from_public_key, public_key_from_peer_id

# --- constants (specs/smip.md, "Constants") -------------------------------------------------

SMIP_PROTOCOL_ID = "/iollm/smip/1.0.0"
ANNOUNCE_TOPIC = "iollm/smip/announce/1"
MANIFEST_VERSION = 1  # body field "v" of a manifest
ANNOUNCE_VERSION = 1  # body field "v" of an announcement
KINDS: tuple[str, ...] = ("model", "dataset")
ID_BYTES = HASH_BYTES  # version ids and shard roots
SHORT_ID_CHARS = 12  # hex characters of the display form

MAX_MANIFEST_BYTES = 1 << 20  # whole envelope
MAX_NAME = 128  # characters
MAX_PARENTS = 8
MAX_CONFIG_BYTES = 1 << 16  # config re-encoded in shortest msgpack form, floats as float64
MAX_CONFIG_DEPTH = 6  # nesting of maps/arrays, the config map itself being level 1
MAX_SHARDS = 4096
MAX_PATH_BYTES = 255  # UTF-8 bytes of a shard path
MAX_SHARD_CHUNKS = 1 << 19  # keeps a leaf layer at 16 MiB, one frame
MAX_CHUNK_BYTES = MAX_CHUNK_SIZE  # 16 MiB
MAX_LEAVES_BYTES = HASH_BYTES * MAX_SHARD_CHUNKS  # 16 MiB

MAX_ANNOUNCE_BYTES = 1024  # whole envelope
DEFAULT_ANNOUNCE_LIFETIME_MS = 60 * 60 * 1000
MAX_ANNOUNCE_LIFETIME_MS = 24 * 60 * 60 * 1000
ANNOUNCE_REFRESH_MS = 20 * 60 * 1000  # a provider re-signs and re-gossips this often
MAX_VERSIONS_PER_PROVIDER = 4096  # a receiver keeps at most this many entries per provider
REPROVIDE_INTERVAL_MS = 12 * 60 * 60 * 1000  # DHT provider records live 48 h (py-libp2p)

FRAME_HEADER_BYTES = 4  # node/p2p/framing.py: big-endian unsigned length
MAX_REQUEST_BYTES = 512
MAX_RESPONSE_HEADER_BYTES = 512
MAX_MESSAGE_CHARS = 200  # printable ASCII error text in a response header
MAX_LIST_LIMIT = 256  # announcements in one "list" answer
# array32 header, then per entry a bin16 header and the envelope.
MAX_LIST_BYTES = 5 + MAX_LIST_LIMIT * (3 + MAX_ANNOUNCE_BYTES)
STREAM_IDLE_TIMEOUT_S = 30.0  # server closes a stream with no new request for this long
RESPONSE_TIMEOUT_S = 10.0  # from the end of a request to the end of its header frame
MIN_TRANSFER_BYTES_PER_S = 1 << 18  # slower than 256 KiB/s is a stall (payload deadlines)
MAX_INFLIGHT_PER_PEER = 8  # requests a server works on for one peer; more get "busy"
MAX_INFLIGHT_TOTAL = 64  # requests a server works on for all peers together
STREAMS_PER_PROVIDER = 1  # streams a fetcher keeps open to one provider
PIPELINE_DEPTH = 8  # requests a fetcher may have outstanding on one stream
BUSY_BACKOFF_S = 1.0  # a fetcher waits this long before asking a "busy" provider again

MAX_LINEAGE_DEPTH = 4096
MAX_LINEAGE_VERSIONS = 65536

VERSION_KEY_PREFIX = b"iollm/smip-version/v1/"
SHARD_KEY_PREFIX = b"iollm/smip-shard/v1/"
_SHA256_MULTIHASH_PREFIX = b"\x12\x20"  # multihash code sha2-256, digest length 32

# Code points never allowed in names and paths: C0, DEL, C1 (terminal escapes), surrogates
# (not UTF-8), line/paragraph separators and bidi controls (text that displays as another).
FORBIDDEN_RANGES: tuple[tuple[int, int], ...] = (
    (0x00, 0x1F), (0x7F, 0x9F), (0x2028, 0x202E), (0x2066, 0x2069), (0xD800, 0xDFFF),
)  # fmt: skip


# --- validation helpers ---------------------------------------------------------------------


def _check_id(name: str, value: object) -> None:
    if not (isinstance(value, bytes) and len(value) == ID_BYTES):
        _fail(f"{name} must be {ID_BYTES} bytes")


def _forbidden(text: str) -> bool:
    return any(lo <= ord(c) <= hi for c in text for lo, hi in FORBIDDEN_RANGES)


def _check_version_field(what: str, d: object, expected: int) -> None:
    """Check ``v`` before anything else, so a newer record reads as "unknown-version"."""
    v = d.get("v", expected) if isinstance(d, dict) else expected
    if type(v) is not int or v != expected:  # True == 1 == 1.0 in Python; neither is 1
        raise RemoteProtocolError("unknown-version", f"{what} version {v!r}, we speak {expected}")



# --- ids, hex forms and DHT keys --------------------------------------------------------------


def version_id(envelope_bytes: bytes) -> bytes:
    """SHA-256 of the exact manifest envelope bytes: the version id."""
    return digest(envelope_bytes)


def id_hex(digest: bytes) -> str:
    """The 64-character lowercase hex form of a version id or shard root (CLI, API, files)."""
    if not (isinstance(digest, bytes) and len(digest) == ID_BYTES):
        raise LocalProtocolError(f"an id is {ID_BYTES} bytes")
    return digest.hex()


def short_id(digest: bytes) -> str:
    """The first SHORT_ID_CHARS hex characters, for display only (never to look up)."""
    return id_hex(digest)[:SHORT_ID_CHARS]


def parse_id(text: str) -> bytes:
    """Inverse of :func:`id_hex` (either case); RemoteProtocolError("malformed") on
    anything but 64 hex characters: the text comes from a user or an API client."""
    if not (isinstance(text, str) and len(text) == 2 * ID_BYTES and text.isascii()):
        raise RemoteProtocolError("malformed", f"an id is {2 * ID_BYTES} hex characters")
    try:
        return bytes.fromhex(text)
    except ValueError:
        raise RemoteProtocolError("malformed", f"{text!r} is not hex") from None


def _provider_key(prefix: bytes, digest: bytes) -> str:
    if not (isinstance(digest, bytes) and len(digest) == ID_BYTES):
        raise LocalProtocolError(f"an id is {ID_BYTES} bytes")
    return (_SHA256_MULTIHASH_PREFIX + hashlib.sha256(prefix + digest).digest()).hex()


def version_provider_key(version: bytes) -> str:
    """Hex of the sha2-256 multihash of ``VERSION_KEY_PREFIX + version`` (68 characters;
    34 bytes as py-libp2p takes it through ``bytes.fromhex``), as ``class_provider_key``."""
    return _provider_key(VERSION_KEY_PREFIX, version)


def shard_provider_key(root: bytes) -> str:
    """Hex of the sha2-256 multihash of ``SHARD_KEY_PREFIX + root``."""
    return _provider_key(SHARD_KEY_PREFIX, root)


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


# --- announcements ------------------------------------------------------------------------


@dataclass(frozen=True)
class Announcement:
    """Peer ``provider`` says it serves ``version``; valid in [created_ms, expires_ms).

    ``kind``, ``name``, ``manifest_size`` and ``manifest_created_ms`` repeat the manifest
    so a listing needs no fetch; they are the provider's claim until the manifest is
    fetched and :func:`check_announcement_matches` passes.
    """

    provider: str
    version: bytes
    kind: str
    name: str
    manifest_size: int
    manifest_created_ms: int
    seq: int
    created_ms: int
    expires_ms: int

    def __post_init__(self) -> None:
        try:
            public_key_from_peer_id(self.provider)
        except RemoteProtocolError as exc:
            _fail(str(exc), "bad-peer-id")
        _check_id("version", self.version)
        if self.kind not in KINDS:
            _fail(f"kind {self.kind!r} is not one of {KINDS}")
        check_name(self.name)
        _check_int("manifest_size", self.manifest_size, 1, MAX_MANIFEST_BYTES)
        for name in ("manifest_created_ms", "seq", "created_ms", "expires_ms"):
            _check_int(name, getattr(self, name))
        if not 0 < self.expires_ms - self.created_ms <= MAX_ANNOUNCE_LIFETIME_MS:
            _fail("expires_ms must be in (created_ms, created_ms + lifetime]", "bad-lifetime")

    @property
    def key(self) -> tuple[str, bytes]:
        """A receiver keeps one announcement per key."""
        return self.provider, self.version

    @property
    def order(self) -> tuple[int, bytes]:
        """Position in a "list" answer: by manifest time, then version id."""
        return self.manifest_created_ms, self.version

    def to_dict(self) -> dict[str, Any]:
        return {"v": ANNOUNCE_VERSION, "provider": self.provider, "version": self.version,
                "kind": self.kind, "name": self.name, "manifest_size": self.manifest_size,
                "manifest_created_ms": self.manifest_created_ms, "seq": self.seq,
                "created_ms": self.created_ms, "expires_ms": self.expires_ms}  # fmt: skip

    @classmethod
    def from_dict(cls, d: object) -> Announcement:
        _check_version_field("announcement", d, ANNOUNCE_VERSION)
        try:
            d = dict(_check_keys("announcement", d, _ANNOUNCE_KEYS))
            del d["v"]
            return cls(**d)
        except _Invalid as exc:
            raise _remote(exc) from None


_ANNOUNCE_KEYS = frozenset(
    {"v", "provider", "version", "kind", "name", "manifest_size", "manifest_created_ms",
     "seq", "created_ms", "expires_ms"}
)  # fmt: skip


def new_announcement(
    *,
    provider: str,
    manifest_bytes: bytes,
    manifest: Manifest,
    seq: int,
    now_ms: int,
    lifetime_ms: int = DEFAULT_ANNOUNCE_LIFETIME_MS,
) -> Announcement:
    """An announcement of the version carried by ``manifest_bytes`` (already opened into
    ``manifest``). ``seq`` comes from ``protocol.capability.next_seq`` over the provider's
    stored counter, so it grows across refreshes and restarts."""
    return Announcement(provider, version_id(manifest_bytes), manifest.kind, manifest.name,
                        len(manifest_bytes), manifest.created_ms, seq, now_ms,
                        now_ms + lifetime_ms)  # fmt: skip


def sign_announcement(signing_key: SigningKey, announcement: Announcement) -> bytes:
    """Envelope bytes; LocalProtocolError unless it is the key's own announcement."""
    own = peer_id_from_public_key(bytes(signing_key.verify_key))
    if announcement.provider != own:
        raise LocalProtocolError(f"announcement of {announcement.provider}, key is {own}")
    data = seal(signing_key, DOMAIN_ANNOUNCE, packb(announcement.to_dict())).encode()
    if len(data) > MAX_ANNOUNCE_BYTES:  # cannot happen within the field caps; kept honest
        raise LocalProtocolError(f"announcement of {len(data)} bytes > {MAX_ANNOUNCE_BYTES}")
    return data


def _open_announcement(data: bytes, expected_provider: str | None) -> Announcement:
    """Every [REJECT] check of an announcement; the time checks are the caller's."""
    envelope = open_envelope(data, DOMAIN_ANNOUNCE, MAX_ANNOUNCE_BYTES)
    ann = Announcement.from_dict(unpack_strict(envelope.body, MAX_ANNOUNCE_BYTES))
    if envelope.signer != ann.provider:
        raise RemoteProtocolError(
            "signer-mismatch", f"signed by {envelope.signer}, provider {ann.provider}"
        )
    if expected_provider is not None and ann.provider != expected_provider:
        raise RemoteProtocolError(
            "wrong-peer", f"announcement of {ann.provider}, expected {expected_provider}"
        )
    return ann


def _check_time(ann: Announcement, now_ms: int) -> None:
    if ann.created_ms > now_ms + MAX_CLOCK_SKEW_MS:
        raise RemoteProtocolError("future", f"created_ms {ann.created_ms} ahead of {now_ms}")
    if now_ms >= ann.expires_ms:
        raise RemoteProtocolError("expired", f"expired at {ann.expires_ms}, now {now_ms}")


def verify_announcement(
    data: bytes, now_ms: int, *, expected_provider: str | None = None
) -> Announcement:
    """Check announcement envelope bytes: size and envelope, body ("malformed",
    "unknown-version", "bad-peer-id", "bad-lifetime"), signer ("signer-mismatch"), the
    expected provider ("wrong-peer"), then time ("future", "expired")."""
    if not isinstance(now_ms, int):
        raise LocalProtocolError("now_ms must be an int")
    ann = _open_announcement(data, expected_provider)
    _check_time(ann, now_ms)
    return ann


def supersedes(new: Announcement, current: Announcement | None) -> bool:
    """Whether ``new`` replaces ``current`` (same key): a higher ``(seq, created_ms)``.
    Replays and duplicates do not, so applying any delivery order gives one result."""
    if current is None:
        return True
    if new.key != current.key:
        raise LocalProtocolError("comparing announcements of different (provider, version)")
    return (new.seq, new.created_ms) > (current.seq, current.created_ms)


ACCEPT, IGNORE, REJECT = "accept", "ignore", "reject"
IGNORE_REASONS = frozenset({"future", "expired", "duplicate", "too-many"})


@dataclass(frozen=True)
class Verdict:
    action: str  # ACCEPT (store it, forward it), IGNORE (drop), REJECT (drop, penalise sender)
    reason: str  # "" when accepted
    announcement: Announcement | None


def judge_announcement(
    data: bytes,
    now_ms: int,
    known: Mapping[tuple[str, bytes], Announcement],
    provider_count: Callable[[str], int] = lambda _provider: 0,
) -> Verdict:
    """The gossip validator: decide on one received announcement given what is kept.

    ``known`` maps ``(provider, version)`` to the kept announcement; ``provider_count``
    says how many a provider has there. On ACCEPT the caller stores the announcement under
    its key: :func:`supersedes` makes that idempotent.
    """
    try:
        ann = verify_announcement(data, now_ms)
    except RemoteProtocolError as exc:
        action = IGNORE if exc.reason in IGNORE_REASONS else REJECT
        return Verdict(action, exc.reason, None)
    current = known.get(ann.key)
    if not supersedes(ann, current):
        return Verdict(IGNORE, "duplicate", ann)
    if current is None and provider_count(ann.provider) >= MAX_VERSIONS_PER_PROVIDER:
        return Verdict(IGNORE, "too-many", ann)
    return Verdict(ACCEPT, "", ann)


def check_announcement_matches(
    ann: Announcement, manifest_bytes: bytes, manifest: Manifest
) -> None:
    """After fetching the manifest: the provider's claims about it were true, else
    RemoteProtocolError("announce-mismatch") (drop the entry, penalise the provider)."""
    got = (version_id(manifest_bytes), manifest.kind, manifest.name, len(manifest_bytes),
           manifest.created_ms)  # fmt: skip
    claimed = (ann.version, ann.kind, ann.name, ann.manifest_size, ann.manifest_created_ms)
    if got != claimed:
        raise RemoteProtocolError("announce-mismatch", f"announcement of {short_id(ann.version)}"
                                  " does not describe its manifest")  # fmt: skip


# --- the stream protocol /iollm/smip/1.0.0 ----------------------------------------------------

OP_MANIFEST, OP_LEAVES, OP_CHUNK, OP_LIST = "manifest", "leaves", "chunk", "list"
STATUS_OK = "ok"
STATUS_NOT_FOUND = "not-found"  # the server does not have it (any more)
STATUS_BAD_REQUEST = "bad-request"  # undecodable request, or a chunk index past the shard
STATUS_BUSY = "busy"  # over MAX_INFLIGHT_PER_PEER / MAX_INFLIGHT_TOTAL: ask later or elsewhere
STATUS_TOO_LARGE = "too-large"  # the answer would exceed the payload limit of its request
STATUS_INTERNAL = "internal"  # the server failed (disk error...)
STATUSES: tuple[str, ...] = (STATUS_OK, STATUS_NOT_FOUND, STATUS_BAD_REQUEST, STATUS_BUSY,
                             STATUS_TOO_LARGE, STATUS_INTERNAL)  # fmt: skip


@dataclass(frozen=True)
class ManifestRequest:
    """The manifest envelope bytes of ``version``."""

    version: bytes

    def __post_init__(self) -> None:
        _check_id("version", self.version)

    def to_dict(self) -> dict[str, Any]:
        return {"op": OP_MANIFEST, "version": self.version}


@dataclass(frozen=True)
class LeavesRequest:
    """The leaf layer (32 bytes per chunk) of the shard with this root."""

    root: bytes

    def __post_init__(self) -> None:
        _check_id("root", self.root)

    def to_dict(self) -> dict[str, Any]:
        return {"op": OP_LEAVES, "root": self.root}


@dataclass(frozen=True)
class ChunkRequest:
    """Chunk ``index`` of the shard with this root."""

    root: bytes
    index: int

    def __post_init__(self) -> None:
        _check_id("root", self.root)
        _check_int("index", self.index, 0, MAX_SHARD_CHUNKS - 1)

    def to_dict(self) -> dict[str, Any]:
        return {"op": OP_CHUNK, "root": self.root, "index": self.index}


@dataclass(frozen=True)
class ListRequest:
    """Up to ``limit`` of the server's own current announcements, in ``order``, after the
    cursor: ``manifest_created_ms >= since_ms`` without ``after``, else
    ``(manifest_created_ms, version) > (since_ms, after)``."""

    limit: int
    since_ms: int = 0
    after: bytes | None = None

    def __post_init__(self) -> None:
        _check_int("limit", self.limit, 1, MAX_LIST_LIMIT)
        _check_int("since_ms", self.since_ms)
        if self.after is not None:
            _check_id("after", self.after)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"op": OP_LIST, "limit": self.limit}
        if self.since_ms:
            d["since_ms"] = self.since_ms
        if self.after is not None:
            d["after"] = self.after
        return d

    def admits(self, ann: Announcement) -> bool:
        if self.after is None:
            return ann.manifest_created_ms >= self.since_ms
        return ann.order > (self.since_ms, self.after)


Request = ManifestRequest | LeavesRequest | ChunkRequest | ListRequest

# op -> (class, required keys besides "op", optional keys)
_REQUESTS: dict[str, tuple[type[Any], frozenset[str], frozenset[str]]] = {
    OP_MANIFEST: (ManifestRequest, frozenset({"version"}), frozenset()),
    OP_LEAVES: (LeavesRequest, frozenset({"root"}), frozenset()),
    OP_CHUNK: (ChunkRequest, frozenset({"root", "index"}), frozenset()),
    OP_LIST: (ListRequest, frozenset({"limit"}), frozenset({"since_ms", "after"})),
}


def encode_request(request: Request) -> bytes:
    """The payload of a request frame (node/p2p/framing.py adds the 4-byte length)."""
    if not isinstance(request, (ManifestRequest, LeavesRequest, ChunkRequest, ListRequest)):
        raise LocalProtocolError(f"not a request: {type(request).__name__}")
    return packb(request.to_dict())


def decode_request(payload: bytes) -> Request:
    """A server's decoding of a request frame. RemoteProtocolError "oversized" over
    MAX_REQUEST_BYTES, else "malformed" for anything but one valid request; the server
    answers either with ``bad-request``."""
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise RemoteProtocolError("malformed", "request must be bytes")
    if len(payload) > MAX_REQUEST_BYTES:
        raise RemoteProtocolError("oversized", f"request of {len(payload)} bytes")
    d = unpack_strict(bytes(payload), MAX_REQUEST_BYTES)
    op = d.get("op") if isinstance(d, dict) else None
    if not isinstance(op, str) or op not in _REQUESTS:
        raise RemoteProtocolError("malformed", f"unknown request op {op!r}")
    cls, required, optional = _REQUESTS[op]
    try:
        fields = dict(_check_keys(f"{op} request", d, required | {"op"}, optional))
        del fields["op"]
        request: Request = cls(**fields)
    except _Invalid as exc:
        raise _remote(exc) from None
    return request


@dataclass(frozen=True)
class ResponseHeader:
    """First frame of every response. For ``ok``, ``length`` is the size of the one payload
    frame that follows; for any other status no payload follows and ``length`` is 0."""

    status: str
    length: int = 0
    message: str = ""  # printable ASCII, for logs; senders omit it on "ok"

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            _fail(f"unknown status {self.status!r}")
        _check_int("length", self.length)
        if self.status != STATUS_OK and self.length:
            _fail(f"a {self.status} response carries no payload, length {self.length}")
        if not isinstance(self.message, str) or len(self.message) > MAX_MESSAGE_CHARS:
            _fail(f"message must be a string of at most {MAX_MESSAGE_CHARS} characters")
        if any(not " " <= c <= "~" for c in self.message):
            _fail("message must be printable ASCII")

    @classmethod
    def error(cls, status: str, message: str = "") -> ResponseHeader:
        """An error header whose message is any text made safe (ASCII, cut to length)."""
        safe = "".join(c if " " <= c <= "~" else "?" for c in message)[:MAX_MESSAGE_CHARS]
        return cls(status, 0, safe)


def encode_response_header(header: ResponseHeader) -> bytes:
    d: dict[str, Any] = {"status": header.status, "length": header.length}
    if header.message:
        d["message"] = header.message
    return packb(d)


def decode_response_header(payload: bytes) -> ResponseHeader:
    """A client's decoding of a header frame: "oversized" or "malformed" on anything but
    one valid header."""
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise RemoteProtocolError("malformed", "response header must be bytes")
    if len(payload) > MAX_RESPONSE_HEADER_BYTES:
        raise RemoteProtocolError("oversized", f"response header of {len(payload)} bytes")
    d = unpack_strict(bytes(payload), MAX_RESPONSE_HEADER_BYTES)
    try:
        d = _check_keys("response header", d, frozenset({"status", "length"}),
                        frozenset({"message"}))  # fmt: skip
        return ResponseHeader(d["status"], d["length"], d.get("message", ""))
    except _Invalid as exc:
        raise _remote(exc) from None


def payload_limit(request: Request) -> int:
    """The largest ``ok`` payload a client accepts for ``request``."""
    if isinstance(request, ManifestRequest):
        return MAX_MANIFEST_BYTES
    if isinstance(request, LeavesRequest):
        return MAX_LEAVES_BYTES
    if isinstance(request, ChunkRequest):
        return MAX_CHUNK_BYTES
    if isinstance(request, ListRequest):
        return MAX_LIST_BYTES
    raise LocalProtocolError(f"not a request: {type(request).__name__}")


def check_response_header(
    request: Request, header: ResponseHeader, *, shard: ShardEntry | None = None
) -> int:
    """The number of payload bytes to read next (0 for an error status; the caller reads
    ``header.status``), checked before reading them.

    RemoteProtocolError: over the request's limit ("oversized"); an empty manifest
    ("malformed"); a leaf layer not a positive multiple of 32, or for a known ``shard``
    not exactly 32 per chunk ("bad-leaves"); a chunk of the wrong length for a known
    ``shard`` ("bad-chunk"). ``shard`` must be the entry the request is about.
    """
    if header.status != STATUS_OK:
        return 0
    n = header.length
    limit = payload_limit(request)
    if n > limit:
        raise RemoteProtocolError("oversized", f"payload of {n} bytes > {limit}")
    if shard is not None and getattr(request, "root", None) != shard.root:
        raise LocalProtocolError("shard is not the one the request is about")
    if isinstance(request, ManifestRequest) and n == 0:
        raise RemoteProtocolError("malformed", "empty manifest")
    if isinstance(request, LeavesRequest):
        expected = HASH_BYTES * shard.chunks if shard is not None else None
        if n == 0 or n % HASH_BYTES or (expected is not None and n != expected):
            raise RemoteProtocolError("bad-leaves", f"leaf layer of {n} bytes")
    if isinstance(request, ChunkRequest) and shard is not None:
        try:
            _, expected = chunk_span(shard.size, shard.chunk_size, request.index)
        except LocalProtocolError:
            raise LocalProtocolError(f"chunk {request.index} is past the shard") from None
        if n != expected:
            raise RemoteProtocolError("bad-chunk", f"chunk of {n} bytes, expected {expected}")
    return n


def payload_deadline_s(length: int) -> float:
    """Seconds allowed for a response frame of ``length`` bytes from the end of the frame
    before it: the header (``length`` 0) after the request, the payload after the header.
    A peer slower than MIN_TRANSFER_BYTES_PER_S has stalled, and is dropped."""
    return RESPONSE_TIMEOUT_S + length / MIN_TRANSFER_BYTES_PER_S


# --- the "list" answer ------------------------------------------------------------------------


def select_list(
    announcements: Iterable[Announcement], request: ListRequest, now_ms: int
) -> list[Announcement]:
    """A server's answer to ``request``: its unexpired announcements after the cursor,
    in ``order``, at most ``limit``. It sends their envelopes with
    :func:`encode_list_payload`."""
    live = [a for a in announcements if a.created_ms <= now_ms < a.expires_ms]
    return sorted((a for a in live if request.admits(a)), key=lambda a: a.order)[: request.limit]


def encode_list_payload(envelopes: Sequence[bytes]) -> bytes:
    """The ``ok`` payload of a list answer: a msgpack array of announcement envelopes."""
    if len(envelopes) > MAX_LIST_LIMIT or any(len(e) > MAX_ANNOUNCE_BYTES for e in envelopes):
        raise LocalProtocolError("list answer over its limits")
    return packb([bytes(e) for e in envelopes])


@dataclass(frozen=True)
class ListPage:
    announcements: tuple[Announcement, ...]  # verified and current at now_ms
    next: ListRequest | None  # the request for the next page; None when this was the last


def decode_list_payload(
    payload: bytes, request: ListRequest, provider: str, now_ms: int
) -> ListPage:
    """A client's check of a list answer from ``provider``. Every entry must be the
    provider's own valid announcement, in strictly increasing ``order``, admitted by the
    request's cursor, at most ``limit`` of them; else RemoteProtocolError (the whole
    answer is the peer's fault). Expired or future entries are skipped, not errors."""
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise RemoteProtocolError("malformed", "list answer must be bytes")
    if len(payload) > MAX_LIST_BYTES:
        raise RemoteProtocolError("oversized", f"list answer of {len(payload)} bytes")
    entries = unpack_strict(bytes(payload), MAX_LIST_BYTES)
    if not isinstance(entries, list) or len(entries) > request.limit:
        raise RemoteProtocolError("malformed", f"list answer is not an array of <= {request.limit}")
    if not all(isinstance(e, bytes) for e in entries):
        raise RemoteProtocolError("malformed", "list entries must be bin")
    opened = [_open_announcement(e, provider) for e in entries]
    if not all(request.admits(a) for a in opened) or any(
        a.order >= b.order for a, b in itertools.pairwise(opened)
    ):
        raise RemoteProtocolError("malformed", "list answer out of order or before the cursor")
    current = []
    for ann in opened:
        try:
            _check_time(ann, now_ms)
        except RemoteProtocolError:
            continue
        current.append(ann)
    last = opened[-1] if len(opened) == request.limit else None
    nxt = ListRequest(request.limit, last.manifest_created_ms, last.version) if last else None
    return ListPage(tuple(current), nxt)
