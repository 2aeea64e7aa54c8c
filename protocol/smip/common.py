"""SMIP's constants, field checks, ids, hex forms and DHT keys (specs/smip.md)."""

from __future__ import annotations

import hashlib

from protocol.checks import MAX_INT as MAX_INT  # re-exported: specs/smip.md names it here
from protocol.checks import digest
from protocol.checks import fail as _fail
from protocol.errors import LocalProtocolError, RemoteProtocolError
from protocol.hashtree import (
    HASH_BYTES,
    MAX_CHUNK_SIZE,
)

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
# Requests a server works on for one peer, and for all peers together; more get "busy".
# Defaults: each server sets its own (iollm: [smip] serve_per_peer, serve_total).
MAX_INFLIGHT_PER_PEER = 8
MAX_INFLIGHT_TOTAL = 64
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


