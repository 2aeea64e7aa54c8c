"""Capability records: what a node offers (its environment probe), signed and expiring.

See specs/capability.md (normative) and specs/records.md (the envelope). This module is
pure: it validates and decides, given ``now_ms``; node/discovery/service.py does the I/O.

Units (the one place they are defined; specs/capability.md repeats them):

* times are integer milliseconds since the Unix epoch (``*_ms``), passed in, never read;
* memory is integer bytes (``*_bytes``);
* ``tflops`` is measured dense matmul throughput in 10^12 floating-point operations per
  second, in the dtype named by ``tflops_dtype``;
* "GB" of GPU memory (``min_vram_gb``, the ``gpu-mem-N`` classes) is the *nominal* size a
  card is sold as, derived from the reported bytes by :func:`nominal_gb`: the smallest
  entry S of NOMINAL_GB_SIZES with ``bytes <= S * 2^30``, provided ``bytes >= 0.85 * S *
  2^30``; otherwise ``floor(bytes / 2^30)``. Drivers report less than the physical memory
  (ECC, reserved memory: an L4 "24 GB" reports 21.95 GiB, a T4 "16 GB" 14.75 GiB) but
  never more, and physical sizes are whole GiB, so rounding *up* to a sold size is right;
  the 0.85 floor keeps an odd size (a 13 GiB vGPU) from being rounded up to 16.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, fields
from typing import Any

from nacl.signing import SigningKey

from protocol.checks import MAX_INT as MAX_INT  # re-exported: specs/capability.md names it here
from protocol.checks import Invalid as _Invalid
from protocol.checks import check_int as _check_int
from protocol.checks import check_keys as _check_keys
from protocol.checks import fail as _fail
from protocol.checks import packb
from protocol.checks import to_remote as _remote
from protocol.envelope import DOMAIN_CAPABILITY, open_envelope, seal, unpack_strict
from protocol.errors import LocalProtocolError, RemoteProtocolError
from protocol.peerid import peer_id_from_public_key, public_key_from_peer_id

# --- constants (specs/capability.md, "Constants") ------------------------------------

CAPABILITY_VERSION = 1
CAPABILITY_PROTOCOL_ID = "/iollm/capability/1.0.0"
MAX_CAPABILITY_BYTES = 8192  # whole envelope; also the direct-stream frame cap
MAX_LIFETIME_MS = 24 * 60 * 60 * 1000
MAX_CLOCK_SKEW_MS = 60 * 1000
DEFAULT_LIFETIME_MS = 30 * 60 * 1000
DEFAULT_REFRESH_MS = 10 * 60 * 1000
STREAM_TIMEOUT_S = 5.0  # requester's deadline on the direct stream (applied in node/)
FRAME_HEADER_BYTES = 4

MAX_GPUS = 64
MAX_ADDRS = 16
MAX_STR_CHARS = 256  # free-text fields and multiaddrs
MAX_SHORT_STR_CHARS = 32  # tags: tflops_dtype, tflops_device, compute_capability
MAX_SOFTWARE_CHARS = 64
MAX_NODE_NAME_CHARS = 64  # the optional ``name`` an operator gives a node
MAX_CPU_CORES = 1 << 20
MAX_TFLOPS = 1e6  # an exaflop per node is not a measurement, it is a lie

SYNC_PROTOCOL_ID = "/iollm/capability-sync/1.0.0"
SYNC_VERSION = 1
MAX_SYNC_REQUEST_BYTES = 64  # {"v", "since_ms", "limit"}: about 30 bytes encoded
MAX_SYNC_RECORDS = 10_000  # records in one sync answer; the requester reads no more

DHT_NAMESPACE = "iollm-cap"
DHT_KEY_PREFIX = "/" + DHT_NAMESPACE + "/"
DHT_KEY_DIGEST_BYTES = 16  # keeps keys at 43 bytes: py-libp2p breaks on keys over 50

GIB = 1 << 30
# Sizes GPUs and MIG slices are sold as, in GB (= GiB of physical memory). Adding a size
# only rounds the cards just below it to it instead of the next size up: a compatible
# change (a node and a requester with different tables disagree only about such cards).
NOMINAL_GB_SIZES: tuple[int, ...] = (
    1, 2, 3, 4, 5, 6, 8, 10, 11, 12, 16, 18, 20, 24, 32, 35, 40, 47, 48, 64, 71, 80, 94,
    96, 128, 141, 144, 180, 192, 256, 288,
)  # fmt: skip
NOMINAL_MIN_FRACTION = (17, 20)  # 0.85 as an exact ratio: the check is integer arithmetic
GB_BUCKETS: tuple[int, ...] = (4, 8, 12, 16, 24, 32, 40, 48, 64, 80, 96, 128, 192)
CLASS_ALL = "all"
CLASS_CPU = "cpu"
CLASS_GPU = "gpu"
CLASS_NAMES: tuple[str, ...] = (
    CLASS_ALL,
    CLASS_CPU,
    CLASS_GPU,
    *(f"gpu-mem-{b}" for b in GB_BUCKETS),
)
CLASS_KEY_PREFIX = b"iollm/capability-class/v1/"
_SHA256_MULTIHASH_PREFIX = b"\x12\x20"  # multihash code sha2-256, digest length 32


# --- validation helpers ----------------------------------------------------------------


def _check_str(name: str, value: object, max_chars: int, *, nonempty: bool = False) -> None:
    if not isinstance(value, str):
        _fail(f"{name} must be a string, got {type(value).__name__}")
    if len(value) > max_chars:
        _fail(f"{name} has {len(value)} characters > {max_chars}")
    if nonempty and not value:
        _fail(f"{name} must not be empty")
    # Control characters would let a peer write terminal escapes into `iollm peers`;
    # lone surrogates cannot be encoded as UTF-8 and would crash msgpack at signing time.
    if any(ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 or 0xD800 <= ord(c) < 0xE000 for c in value):
        _fail(f"{name} contains control characters or surrogates")


# --- the environment report --------------------------------------------------------------


@dataclass(frozen=True)
class GpuInfo:
    name: str
    total_memory_bytes: int
    free_memory_bytes: int
    compute_capability: str  # "8.0"; "" where unknown

    def __post_init__(self) -> None:
        _check_str("gpu.name", self.name, MAX_STR_CHARS)
        _check_int("gpu.total_memory_bytes", self.total_memory_bytes)
        _check_int("gpu.free_memory_bytes", self.free_memory_bytes)
        _check_str("gpu.compute_capability", self.compute_capability, MAX_SHORT_STR_CHARS)

    def to_dict(self) -> dict[str, Any]:
        """A plain msgpack-able map whose keys are the field names."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, d: object) -> GpuInfo:
        """Inverse of :meth:`to_dict`; RemoteProtocolError("malformed") on anything wrong."""
        try:
            return cls(**_check_keys("gpu", d, _GPU_FIELDS))
        except _Invalid as exc:
            raise _remote(exc) from None


_GPU_FIELDS = frozenset(f.name for f in fields(GpuInfo))


@dataclass(frozen=True)
class EnvReport:
    """Result of the environment probe (``iollm env``), the body of a capability record."""

    os: str
    python: str
    torch: str  # "" when torch is not importable
    cuda: str  # "" when no CUDA runtime
    gpus: tuple[GpuInfo, ...]
    cpu_cores: int  # 0 where unknown
    ram_bytes: int
    disk_free_bytes: int
    tflops: float  # measured matmul throughput
    tflops_dtype: str  # "fp32" on CPU, "bf16" on GPU
    tflops_device: str  # "cpu" or "cuda"

    def __post_init__(self) -> None:
        for name in ("os", "python", "torch", "cuda"):
            _check_str(name, getattr(self, name), MAX_STR_CHARS)
        if not isinstance(self.gpus, tuple):
            _fail(f"gpus must be a tuple, got {type(self.gpus).__name__}")
        if len(self.gpus) > MAX_GPUS:
            _fail(f"{len(self.gpus)} GPUs > {MAX_GPUS}")
        if not all(isinstance(g, GpuInfo) for g in self.gpus):
            _fail("gpus must hold GpuInfo values")
        _check_int("cpu_cores", self.cpu_cores, 0, MAX_CPU_CORES)
        _check_int("ram_bytes", self.ram_bytes)
        _check_int("disk_free_bytes", self.disk_free_bytes)
        t = self.tflops
        if not isinstance(t, (int, float)) or isinstance(t, bool):
            _fail(f"tflops must be a number, got {type(t).__name__}")
        # isfinite first: NaN compares false with everything and would pass a range check.
        if isinstance(t, float) and not math.isfinite(t):
            _fail(f"tflops must be finite, got {t}")
        if not 0 <= t <= MAX_TFLOPS:
            _fail(f"tflops={t} outside [0, {MAX_TFLOPS}]")
        _check_str("tflops_dtype", self.tflops_dtype, MAX_SHORT_STR_CHARS)
        _check_str("tflops_device", self.tflops_device, MAX_SHORT_STR_CHARS)

    def to_dict(self) -> dict[str, Any]:
        """A plain msgpack-able map: field names as keys, ``gpus`` a list of maps and
        ``tflops`` always a float (so it encodes as a msgpack float64)."""
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["gpus"] = [g.to_dict() for g in self.gpus]
        d["tflops"] = float(self.tflops)
        return d

    @classmethod
    def from_dict(cls, d: object) -> EnvReport:
        """Inverse of :meth:`to_dict`; RemoteProtocolError("malformed") on anything wrong.

        ``tflops`` may arrive as a msgpack integer (another encoder may write 0 as 0); it is
        kept as a float.
        """
        try:
            d = dict(_check_keys("env", d, _ENV_FIELDS))
            gpus = d["gpus"]
            if not isinstance(gpus, list):
                _fail(f"gpus must be an array, got {type(gpus).__name__}")
            if len(gpus) > MAX_GPUS:  # before building: bounds the work a peer can cause
                _fail(f"{len(gpus)} GPUs > {MAX_GPUS}")
            d["gpus"] = tuple(GpuInfo(**_check_keys("gpu", g, _GPU_FIELDS)) for g in gpus)
            t = d["tflops"]
            if isinstance(t, int) and not isinstance(t, bool) and 0 <= t <= MAX_TFLOPS:
                d["tflops"] = float(t)
            return cls(**d)
        except _Invalid as exc:
            raise _remote(exc) from None

    @property
    def total_gpu_memory_bytes(self) -> int:
        return sum(g.total_memory_bytes for g in self.gpus)

    @property
    def max_gpu_memory_bytes(self) -> int:
        return max((g.total_memory_bytes for g in self.gpus), default=0)


_ENV_FIELDS = frozenset(f.name for f in fields(EnvReport))


# --- the record ----------------------------------------------------------------------------


@dataclass(frozen=True)
class CapabilityRecord:
    """A node's signed statement of what it offers, valid in [created_ms, expires_ms).

    ``seq`` increases with every refresh of the same node (see :func:`next_seq`); among
    valid records of one peer the highest ``(seq, created_ms)`` wins.
    """

    peer_id: str
    addrs: tuple[str, ...]  # multiaddrs the node listens on, "/ip4/1.2.3.4/tcp/4001"
    software: str  # "iollm/0.1.0"
    seq: int
    created_ms: int
    expires_ms: int
    env: EnvReport
    name: str = ""  # the operator's name for the node ([node] name); "" when none

    def __post_init__(self) -> None:
        try:
            public_key_from_peer_id(self.peer_id)
        except RemoteProtocolError as exc:
            _fail(str(exc), "bad-peer-id")
        if not isinstance(self.addrs, tuple):
            _fail(f"addrs must be a tuple, got {type(self.addrs).__name__}")
        if len(self.addrs) > MAX_ADDRS:
            _fail(f"{len(self.addrs)} addrs > {MAX_ADDRS}")
        for a in self.addrs:
            _check_str("addr", a, MAX_STR_CHARS)
            # Not parsed here (no multiaddr library in protocol/), only shaped: node/
            # parses before dialling and skips what does not parse.
            if not (a.startswith("/") and a.isascii() and a.isprintable() and " " not in a):
                _fail(f"addr {a!r} is not a multiaddr string")
        _check_str("software", self.software, MAX_SOFTWARE_CHARS, nonempty=True)
        _check_int("seq", self.seq)
        _check_int("created_ms", self.created_ms)
        _check_int("expires_ms", self.expires_ms)
        if self.expires_ms <= self.created_ms:
            _fail("expires_ms must be after created_ms", "bad-lifetime")
        if self.expires_ms - self.created_ms > MAX_LIFETIME_MS:
            _fail(f"lifetime over MAX_LIFETIME_MS={MAX_LIFETIME_MS}", "bad-lifetime")
        if not isinstance(self.env, EnvReport):
            _fail(f"env must be an EnvReport, got {type(self.env).__name__}")
        check_node_name(self.name)

    def to_dict(self) -> dict[str, Any]:
        """The body map, version field ``v`` included."""
        return {
            "v": CAPABILITY_VERSION,
            "peer_id": self.peer_id,
            "addrs": list(self.addrs),
            "software": self.software,
            "seq": self.seq,
            "created_ms": self.created_ms,
            "expires_ms": self.expires_ms,
            "env": self.env.to_dict(),
            # Only when set: a record without a name encodes as before this field, so
            # nodes that do not know it still take the records of unnamed nodes.
            **({"name": self.name} if self.name else {}),
        }

    @classmethod
    def from_dict(cls, d: object) -> CapabilityRecord:
        """Inverse of :meth:`to_dict`; RemoteProtocolError on anything wrong.

        The version is checked before anything else so that a record of a newer version
        is reported as "unknown-version", not as a pile of unknown fields.
        """
        v = d.get("v", CAPABILITY_VERSION) if isinstance(d, dict) else CAPABILITY_VERSION
        # type() and not only ==: True == 1 and 1.0 == 1 in Python, and neither is version 1.
        if type(v) is not int or v != CAPABILITY_VERSION:
            raise RemoteProtocolError(
                "unknown-version",
                f"capability version {v!r}, this node speaks {CAPABILITY_VERSION}",
            )
        try:
            d = dict(_check_keys("capability", d, _RECORD_KEYS, _OPTIONAL_RECORD_KEYS))
            addrs = d["addrs"]
            if not isinstance(addrs, list):
                _fail(f"addrs must be an array, got {type(addrs).__name__}")
            env = EnvReport.from_dict(d["env"])
            return cls(
                peer_id=d["peer_id"],
                addrs=tuple(addrs),
                software=d["software"],
                seq=d["seq"],
                created_ms=d["created_ms"],
                expires_ms=d["expires_ms"],
                env=env,
                name=d.get("name", ""),
            )
        except _Invalid as exc:
            raise _remote(exc) from None

    def encode_body(self) -> bytes:
        """The msgpack body bytes that the envelope signs."""
        return packb(self.to_dict())

    @classmethod
    def decode_body(cls, body: bytes) -> CapabilityRecord:
        """Decode body bytes; RemoteProtocolError on anything but one valid record."""
        return cls.from_dict(unpack_strict(body, MAX_CAPABILITY_BYTES))


_RECORD_KEYS = frozenset(
    {"v", "peer_id", "addrs", "software", "seq", "created_ms", "expires_ms", "env"}
)
_OPTIONAL_RECORD_KEYS = frozenset({"name"})


def check_node_name(name: object) -> None:
    """A node's name: at most MAX_NODE_NAME_CHARS printable characters, no spaces at
    either end (it is shown in terminals beside peer ids: no control characters, no
    escape sequences); "" for none."""
    _check_str("name", name, MAX_NODE_NAME_CHARS)
    if isinstance(name, str) and (not name.isprintable() or name != name.strip()):
        _fail(f"name {name[:MAX_NODE_NAME_CHARS]!r} must be printable, without spaces at "
              f"either end")



def next_seq(previous: int | None, now_ms: int) -> int:
    """The seq of a node's next record: above the last one, and at least ``now_ms``.

    Using the clock as a floor means a node that lost its stored seq (a wiped home) still
    outbids the records it published before, as long as its clock did not go back.
    """
    return max(now_ms, -1 if previous is None else previous + 1)


def new_capability_record(
    *,
    peer_id: str,
    addrs: tuple[str, ...],
    software: str,
    env: EnvReport,
    seq: int,
    now_ms: int,
    lifetime_ms: int = DEFAULT_LIFETIME_MS,
    name: str = "",
) -> CapabilityRecord:
    """A record created now and expiring ``lifetime_ms`` later (LocalProtocolError if
    any field is invalid)."""
    return CapabilityRecord(peer_id, addrs, software, seq, now_ms, now_ms + lifetime_ms, env,
                            name)


# --- signing and verification --------------------------------------------------------------


def sign_capability(signing_key: SigningKey, record: CapabilityRecord) -> bytes:
    """Envelope bytes of ``record`` signed under DOMAIN_CAPABILITY.

    Raises LocalProtocolError if the record is not the key's own (a node signs only its
    own capability) or if the envelope would exceed MAX_CAPABILITY_BYTES (the per-field
    caps allow more than the total: 64 GPUs with 256-character names do not fit).
    """
    own = peer_id_from_public_key(bytes(signing_key.verify_key))
    if record.peer_id != own:
        raise LocalProtocolError(f"record is for {record.peer_id}, key is {own}")
    data = seal(signing_key, DOMAIN_CAPABILITY, record.encode_body()).encode()
    if len(data) > MAX_CAPABILITY_BYTES:
        raise LocalProtocolError(
            f"capability envelope of {len(data)} bytes > {MAX_CAPABILITY_BYTES}"
        )
    return data


def verify_capability(
    data: bytes, now_ms: int, *, expected_peer_id: str | None = None
) -> CapabilityRecord:
    """Check envelope bytes and return the record they carry.

    Checks, in this order (the first failure names the reason): size ("oversized"),
    envelope shape, version, domain and signature (see protocol.envelope), body
    ("malformed", "unknown-version", "bad-peer-id", "bad-lifetime"), signer is the
    record's peer ("signer-mismatch"), the expected peer if given ("wrong-peer"), not
    created in the future beyond MAX_CLOCK_SKEW_MS ("future"), not expired at ``now_ms``
    ("expired"). For any bytes, only RemoteProtocolError escapes.
    """
    if not isinstance(now_ms, int):
        raise LocalProtocolError("now_ms must be an int")
    envelope = open_envelope(data, DOMAIN_CAPABILITY, MAX_CAPABILITY_BYTES)
    record = CapabilityRecord.decode_body(envelope.body)
    if envelope.signer != record.peer_id:
        raise RemoteProtocolError(
            "signer-mismatch", f"signed by {envelope.signer}, claims {record.peer_id}"
        )
    if expected_peer_id is not None and record.peer_id != expected_peer_id:
        raise RemoteProtocolError(
            "wrong-peer", f"record of {record.peer_id}, expected {expected_peer_id}"
        )
    if record.created_ms > now_ms + MAX_CLOCK_SKEW_MS:
        raise RemoteProtocolError(
            "future", f"created_ms {record.created_ms} is ahead of now {now_ms} beyond skew"
        )
    if now_ms >= record.expires_ms:
        raise RemoteProtocolError("expired", f"expired at {record.expires_ms}, now {now_ms}")
    return record


# --- the direct stream /iollm/capability/1.0.0 ----------------------------------------------


def encode_capability_frame(envelope_bytes: bytes) -> bytes:
    """The responder's one frame: 4-byte big-endian length, then the envelope."""
    if not 0 < len(envelope_bytes) <= MAX_CAPABILITY_BYTES:
        raise LocalProtocolError(f"frame payload of {len(envelope_bytes)} bytes")
    return len(envelope_bytes).to_bytes(FRAME_HEADER_BYTES, "big") + envelope_bytes


def capability_frame_length(header: bytes) -> int:
    """Payload length announced by a frame header; the requester then reads exactly that
    many bytes. RemoteProtocolError on a zero or over-cap length, before reading it."""
    if len(header) != FRAME_HEADER_BYTES:
        raise RemoteProtocolError("malformed", f"frame header of {len(header)} bytes")
    n = int.from_bytes(header, "big")
    if n == 0:
        raise RemoteProtocolError("malformed", "empty capability frame")
    if n > MAX_CAPABILITY_BYTES:
        raise RemoteProtocolError("oversized", f"frame of {n} bytes > {MAX_CAPABILITY_BYTES}")
    return n


# --- record sync /iollm/capability-sync/1.0.0 -----------------------------------------------

_SYNC_KEYS = frozenset({"v", "since_ms", "limit"})


@dataclass(frozen=True)
class SyncRequest:
    """Ask a peer for the valid records it holds that were created at or after
    ``since_ms``, newest first, at most ``limit`` of them."""

    since_ms: int
    limit: int

    def encode(self) -> bytes:
        try:
            _check_int("since_ms", self.since_ms)
            _check_int("limit", self.limit, 1, MAX_SYNC_RECORDS)
        except _Invalid as exc:
            raise LocalProtocolError(str(exc)) from None
        return packb({"v": SYNC_VERSION, "since_ms": self.since_ms, "limit": self.limit})


def decode_sync_request(data: bytes) -> SyncRequest:
    """RemoteProtocolError on anything but one well-formed request within the cap."""
    if len(data) > MAX_SYNC_REQUEST_BYTES:
        raise RemoteProtocolError("oversized", f"sync request of {len(data)} bytes")
    obj = unpack_strict(data, MAX_SYNC_REQUEST_BYTES)
    try:
        d = _check_keys("sync request", obj, _SYNC_KEYS)
        if d["v"] != SYNC_VERSION or isinstance(d["v"], bool):
            raise _Invalid("unknown-version", f"sync request version {d['v']!r}")
        _check_int("since_ms", d["since_ms"])
        _check_int("limit", d["limit"], 1, MAX_SYNC_RECORDS)
    except _Invalid as exc:
        raise _remote(exc) from None
    return SyncRequest(since_ms=d["since_ms"], limit=d["limit"])


def sync_answer(records: list[CapabilityRecord], request: SyncRequest,
                now_ms: int) -> list[CapabilityRecord]:
    """The records a responder sends: unexpired, created at or after ``since_ms``, newest
    first, at most ``limit``."""
    fresh = [r for r in records if r.created_ms >= request.since_ms and r.expires_ms > now_ms]
    fresh.sort(key=lambda r: (-r.created_ms, r.peer_id))
    return fresh[: request.limit]


# --- DHT values ------------------------------------------------------------------------------


def capability_dht_key(peer_id: str) -> str:
    """``/iollm-cap/`` + hex of the first 16 bytes of SHA-256(peer id, UTF-8): 43 bytes."""
    if not isinstance(peer_id, str):
        raise LocalProtocolError("peer_id must be a str")
    digest = hashlib.sha256(peer_id.encode("utf-8")).digest()
    return DHT_KEY_PREFIX + digest[:DHT_KEY_DIGEST_BYTES].hex()


def validate_dht_entry(key: str, value: bytes, now_ms: int) -> CapabilityRecord:
    """The DHT validator: :func:`verify_capability` plus the key must be the record's own
    ("key-mismatch"), so no peer can store its record under another peer's key."""
    record = verify_capability(value, now_ms)
    if key != capability_dht_key(record.peer_id):
        raise RemoteProtocolError("key-mismatch", f"key {key!r} is not the key of {record.peer_id}")
    return record


def select_best(values: list[bytes], now_ms: int) -> int:
    """Index of the valid record with the highest ``(seq, created_ms)``; the first such on
    a tie; invalid and expired values lose; 0 if none is valid (or ``values`` is empty,
    which callers should not pass)."""
    best_index, best_rank = 0, None
    for i, value in enumerate(values):
        try:
            record = verify_capability(value, now_ms)
        except RemoteProtocolError:
            continue
        rank = (record.seq, record.created_ms)
        if best_rank is None or rank > best_rank:
            best_index, best_rank = i, rank
    return best_index


# --- capability classes (DHT provider records) ---------------------------------------------


def nominal_gb(memory_bytes: int) -> int:
    """The nominal size in GB of a GPU that reports ``memory_bytes`` of total memory.

    The smallest S in NOMINAL_GB_SIZES with ``memory_bytes <= S * 2^30``, if the card
    reports at least 85 % of it; otherwise (an unlisted size, or beyond the table) the
    whole GiB it reports, rounded down. Non-decreasing in ``memory_bytes``. Examples:
    RTX 4090 24563 MiB -> 24, L4 22478 MiB -> 24, T4 15102 MiB -> 16, GTX 1080 Ti
    11178 MiB -> 11, A100-40GB 40513 MiB -> 40, H100 NVL 95830 MiB -> 94.
    """
    num, den = NOMINAL_MIN_FRACTION
    for size in NOMINAL_GB_SIZES:
        if memory_bytes <= size * GIB:
            return size if memory_bytes * den >= num * size * GIB else memory_bytes // GIB
    return memory_bytes // GIB


def vram_at_least(memory_bytes: int, gb: float) -> bool:
    """Whether a GPU reporting ``memory_bytes`` counts as a card of at least ``gb`` GB:
    ``nominal_gb(memory_bytes) >= gb``. Classes and :func:`matches` both go through here,
    so they agree to the byte."""
    return nominal_gb(memory_bytes) >= gb


def capability_classes(env: EnvReport) -> list[str]:
    """Every class ``env`` belongs to: "all"; "cpu" without a GPU; otherwise "gpu" and
    each "gpu-mem-N" bucket its largest single GPU reaches (cumulative, so a lookup of one
    class finds every node at or above it)."""
    if not env.gpus:
        return [CLASS_ALL, CLASS_CPU]
    best = env.max_gpu_memory_bytes
    return [CLASS_ALL, CLASS_GPU] + [f"gpu-mem-{b}" for b in GB_BUCKETS if vram_at_least(best, b)]


def class_provider_key(name: str) -> str:
    """Hex of the sha2-256 multihash of ``b"iollm/capability-class/v1/" + name``: the key
    form py-libp2p's ``provide``/``find_providers`` take and go-libp2p stores (a CID's
    multihash)."""
    if name not in CLASS_NAMES:
        raise LocalProtocolError(f"unknown capability class {name!r}")
    digest = hashlib.sha256(CLASS_KEY_PREFIX + name.encode("ascii")).digest()
    return (_SHA256_MULTIHASH_PREFIX + digest).hex()


def _check_filter(name: str, value: float | None) -> None:
    if value is None:
        return
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise LocalProtocolError(f"{name} must be a number")
    if not (math.isfinite(value) and value >= 0):
        raise LocalProtocolError(f"{name} must be finite and >= 0, got {value}")


def query_class(min_vram_gb: float | None) -> str:
    """The class to look up for a VRAM request: the one whose providers are a superset of
    the answer with the fewest extras.

    None or 0: "all". Below the smallest bucket: "gpu" (any GPU). Otherwise the largest
    bucket N <= the request. The class is only a pre-filter: the caller fetches each
    provider's record and keeps those for which :func:`matches` is true.
    """
    _check_filter("min_vram_gb", min_vram_gb)
    if not min_vram_gb:
        return CLASS_ALL
    fitting = [b for b in GB_BUCKETS if b <= min_vram_gb]
    return f"gpu-mem-{fitting[-1]}" if fitting else CLASS_GPU


def matches(
    record: CapabilityRecord, *, min_vram_gb: float | None, min_tflops: float | None
) -> bool:
    """Exact filter: the largest single GPU has at least ``min_vram_gb`` nominal GB (see
    :func:`vram_at_least`) and the measured tflops is at least ``min_tflops``. None means
    no constraint; 0 GB is met by every node, CPU-only ones included."""
    _check_filter("min_vram_gb", min_vram_gb)
    _check_filter("min_tflops", min_tflops)
    env = record.env
    # A CPU-only node has max_gpu_memory_bytes == 0, nominally 0 GB: it meets only 0 GB.
    if min_vram_gb is not None and not vram_at_least(env.max_gpu_memory_bytes, min_vram_gb):
        return False
    return min_tflops is None or env.tflops >= min_tflops


def sort_key(record: CapabilityRecord) -> tuple[int, float, str]:
    """Sort key putting the most capable first: largest single-GPU memory, then tflops,
    both descending, then peer id ascending so the order is deterministic."""
    return (-record.env.max_gpu_memory_bytes, -float(record.env.tflops), record.peer_id)
