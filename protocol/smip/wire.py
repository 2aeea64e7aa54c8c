"""The SMIP stream protocol /iollm/smip/1.0.0: requests, response headers, payload
limits and deadlines, and the "list" answer."""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from protocol.checks import Invalid as _Invalid
from protocol.checks import check_int as _check_int
from protocol.checks import check_keys as _check_keys
from protocol.checks import fail as _fail
from protocol.checks import packb
from protocol.checks import to_remote as _remote
from protocol.envelope import unpack_strict
from protocol.errors import LocalProtocolError, RemoteProtocolError
from protocol.hashtree import (
    HASH_BYTES,
    chunk_span,
)
from protocol.smip.announce import (
    Announcement,
    _check_time,
    _open_announcement,
)
from protocol.smip.common import (
    MAX_ANNOUNCE_BYTES,
    MAX_CHUNK_BYTES,
    MAX_LEAVES_BYTES,
    MAX_LIST_BYTES,
    MAX_LIST_LIMIT,
    MAX_MANIFEST_BYTES,
    MAX_MESSAGE_CHARS,
    MAX_REQUEST_BYTES,
    MAX_RESPONSE_HEADER_BYTES,
    MAX_SHARD_CHUNKS,
    MIN_TRANSFER_BYTES_PER_S,
    RESPONSE_TIMEOUT_S,
    _check_id,
)
from protocol.smip.manifest import (
    ShardEntry,
)

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
