"""Append-only signed feeds, as in Secure Scuttlebutt (specs/jobs.md, "Feed").

Each node signs its own chain of entries: entry ``seq`` (from 1) names the id of entry
``seq - 1`` in ``prev`` (32 zero bytes for the first). A node that has the chain up to
``n`` takes entry ``n + 1`` only if it links to its entry ``n``; an honest author never
signs two different entries at one position, so two of them, or an entry whose ``prev`` is
not the id of the author's entry before it, are *fork evidence* that anyone can check with
the author's public key alone (:func:`verify_fork_evidence`). The receipts a node holds
are the first kind of entry (``FEED_KIND_RECEIPT``); consensus over them comes later.

An entry's id (:func:`entry_id`) is SHA-256 of its envelope's *body* bytes: the body is
what the author signed, while anyone can re-encode the envelope around it; hashing the
envelope would let a relayer make "another" entry at a position and frame an honest author.

Pure: :class:`FeedState` takes bytes one by one and returns an outcome value
(:class:`Accepted`, :class:`Duplicate`, :class:`Gap`, :class:`Fork`); node/ stores and
fetches. Invalid bytes raise RemoteProtocolError(reason) and nothing else.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from nacl.signing import SigningKey

from protocol.checks import (
    Invalid,
    check_header,
    check_int,
    check_keys,
    digest,
    fail,
    packb,
    to_remote,
)
from protocol.envelope import DOMAIN_FEED, open_envelope, seal, unpack_strict
from protocol.errors import LocalProtocolError, RemoteProtocolError
from protocol.peerid import peer_id_from_public_key, public_key_from_peer_id

FEED_VERSION = 1  # body field "v" of entries and of fork evidence
ENTRY_TYPE = "feed-entry"
EVIDENCE_TYPE = "fork-evidence"
FEED_KIND_RECEIPT = "receipt"  # payload: a receipt envelope (protocol/jobs.py)
ID_BYTES = 32
ZERO_ID = bytes(ID_BYTES)  # ``prev`` of entry 1
MAX_FEED_PAYLOAD_BYTES = 16 * 1024
MAX_ENTRY_BYTES = MAX_FEED_PAYLOAD_BYTES + 1024  # whole envelope
MAX_EVIDENCE_BYTES = 2 * MAX_ENTRY_BYTES + 256
MAX_SEQ = 2**63 - 1
MAX_FORKS_KEPT = 8  # evidence a FeedState keeps per author: one proves it, more costs memory

_KIND = re.compile(r"[a-z][a-z0-9-]{0,31}")
_ENTRY_KEYS = frozenset({"type", "v", "author", "seq", "prev", "created_ms", "kind", "payload"})
_EVIDENCE_KEYS = frozenset({"type", "v", "author", "seq", "entry_a", "entry_b"})




def _check_author(value: object) -> None:
    try:
        public_key_from_peer_id(value)  # type: ignore[arg-type]
    except RemoteProtocolError as exc:
        fail(f"author: {exc}", "bad-peer-id")


def _check_header(what: str, d: object, type_: str) -> dict[str, Any]:
    """The map ``d`` once its type tag and version are right (checked in that order)."""
    return check_header(what, d, type_, FEED_VERSION)


# --- entries -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class FeedEntry:
    """Entry ``seq`` of ``author``'s feed: ``kind`` says what ``payload`` holds."""

    author: str
    seq: int
    prev: bytes
    created_ms: int
    kind: str
    payload: bytes

    def __post_init__(self) -> None:
        _check_author(self.author)
        check_int("seq", self.seq, 1, MAX_SEQ)
        if not (isinstance(self.prev, bytes) and len(self.prev) == ID_BYTES):
            fail(f"prev must be {ID_BYTES} bytes")
        if (self.seq == 1) != (self.prev == ZERO_ID):
            fail("prev is 32 zero bytes exactly for entry 1", "bad-prev")
        check_int("created_ms", self.created_ms)
        if not (isinstance(self.kind, str) and _KIND.fullmatch(self.kind)):
            fail("kind must be 1..32 characters of [a-z0-9-], a letter first")
        if not isinstance(self.payload, bytes) or len(self.payload) > MAX_FEED_PAYLOAD_BYTES:
            fail(f"payload must be at most {MAX_FEED_PAYLOAD_BYTES} bytes", "oversized")

    def to_dict(self) -> dict[str, Any]:
        return {"type": ENTRY_TYPE, "v": FEED_VERSION, "author": self.author, "seq": self.seq,
                "prev": self.prev, "created_ms": self.created_ms, "kind": self.kind,
                "payload": self.payload}  # fmt: skip

    @classmethod
    def from_dict(cls, d: object) -> FeedEntry:
        d = _check_header("feed entry", d, ENTRY_TYPE)
        try:
            d = dict(check_keys("feed entry", d, _ENTRY_KEYS))
            del d["type"], d["v"]
            return cls(**d)
        except Invalid as exc:
            raise to_remote(exc) from None


def seal_entry(key: SigningKey, entry: FeedEntry) -> bytes:
    """Entry envelope bytes; LocalProtocolError unless ``key`` is the author's."""
    own = peer_id_from_public_key(bytes(key.verify_key))
    if entry.author != own:
        raise LocalProtocolError(f"an entry of {entry.author} cannot be signed by {own}")
    data = seal(key, DOMAIN_FEED, packb(entry.to_dict())).encode()
    if len(data) > MAX_ENTRY_BYTES:  # cannot happen within the field caps; kept honest
        raise LocalProtocolError(f"feed entry of {len(data)} bytes > {MAX_ENTRY_BYTES}")
    return data


def _open(data: bytes) -> tuple[FeedEntry, bytes]:
    envelope = open_envelope(data, DOMAIN_FEED, MAX_ENTRY_BYTES)
    entry = FeedEntry.from_dict(unpack_strict(envelope.body, MAX_ENTRY_BYTES))
    if envelope.signer != entry.author:
        raise RemoteProtocolError("signer-mismatch", f"signed by {envelope.signer}, "
                                                     f"author {entry.author}")
    return entry, digest(envelope.body)


def open_entry(data: bytes) -> FeedEntry:
    """Check entry envelope bytes on their own: envelope, body, signer == author."""
    return _open(data)[0]


def entry_id(data: bytes) -> bytes:
    """SHA-256 of the entry envelope's body bytes (the entry is checked first)."""
    return _open(data)[1]


def next_entry(key: SigningKey, last: FeedEntry | None, last_id: bytes | None, kind: str,
               payload: bytes, now_ms: int) -> bytes:
    """The envelope of the entry after ``last`` (whose id is ``last_id``) in our own feed;
    the first entry when ``last`` is None. ``created_ms`` never goes back: a clock that
    steps back reuses ``last.created_ms``."""
    if last is None:
        if last_id is not None:
            raise LocalProtocolError("last_id given without last")
        seq, prev, created = 1, ZERO_ID, now_ms
    else:
        if not (isinstance(last_id, bytes) and len(last_id) == ID_BYTES):
            raise LocalProtocolError(f"last_id must be {ID_BYTES} bytes")
        seq, prev, created = last.seq + 1, last_id, max(now_ms, last.created_ms)
    own = peer_id_from_public_key(bytes(key.verify_key))
    if last is not None and last.author != own:
        raise LocalProtocolError(f"last entry is {last.author}'s, the key is {own}")
    return seal_entry(key, FeedEntry(own, seq, prev, created, kind, bytes(payload)))


def verify_chain(entries: Sequence[bytes], *, author: str | None = None,
                 after: tuple[int, bytes] | None = None) -> list[FeedEntry]:
    """Check a run of entry envelopes: each valid and signed, one author (``author`` if
    given: "wrong-peer"), seqs contiguous ("bad-seq") from 1, or from ``after``'s seq + 1
    when ``after = (seq, id)`` is the entry held before them, each ``prev`` the id of the
    one before ("bad-prev"), ``created_ms`` never decreasing ("bad-time")."""
    out: list[FeedEntry] = []
    seq, prev = (0, ZERO_ID) if after is None else after
    last_ms = None
    for data in entries:
        entry, eid = _open(data)
        author = entry.author if author is None else author
        if entry.author != author:
            raise RemoteProtocolError("wrong-peer", f"entry of {entry.author} in {author}'s feed")
        if entry.seq != seq + 1:
            raise RemoteProtocolError("bad-seq", f"entry {entry.seq} after entry {seq}")
        if entry.prev != prev:
            raise RemoteProtocolError("bad-prev", f"entry {entry.seq} does not link to the "
                                                  "entry before it")
        if last_ms is not None and entry.created_ms < last_ms:
            raise RemoteProtocolError("bad-time", f"entry {entry.seq} created before entry "
                                                  f"{seq}")
        out.append(entry)
        seq, prev, last_ms = entry.seq, eid, entry.created_ms
    return out


# --- fork evidence -----------------------------------------------------------------------------


@dataclass(frozen=True)
class ForkEvidence:
    """Two entry envelopes signed by ``author`` that cannot both be in one chain:
    ``entry_a`` is at ``seq`` and ``entry_b`` is either another entry at ``seq`` or an
    entry at ``seq + 1`` whose ``prev`` is not ``entry_a``'s id. Built and decoded from
    any bytes; :func:`verify_fork_evidence` says whether it proves anything."""

    author: str
    seq: int
    entry_a: bytes
    entry_b: bytes

    def __post_init__(self) -> None:
        _check_author(self.author)
        check_int("seq", self.seq, 1, MAX_SEQ)
        for name in ("entry_a", "entry_b"):
            value = getattr(self, name)
            if not isinstance(value, bytes) or len(value) > MAX_ENTRY_BYTES:
                fail(f"{name} must be at most {MAX_ENTRY_BYTES} bytes")

    def encode(self) -> bytes:
        return packb({"type": EVIDENCE_TYPE, "v": FEED_VERSION, "author": self.author,
                       "seq": self.seq, "entry_a": self.entry_a, "entry_b": self.entry_b})

    @classmethod
    def decode(cls, data: bytes) -> ForkEvidence:
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise RemoteProtocolError("malformed", "fork evidence must be bytes")
        if len(data) > MAX_EVIDENCE_BYTES:
            raise RemoteProtocolError("oversized", f"fork evidence of {len(data)} bytes")
        d = _check_header("fork evidence", unpack_strict(bytes(data), MAX_EVIDENCE_BYTES),
                          EVIDENCE_TYPE)
        try:
            d = dict(check_keys("fork evidence", d, _EVIDENCE_KEYS))
            del d["type"], d["v"]
            return cls(**d)
        except Invalid as exc:
            raise to_remote(exc) from None


def verify_fork_evidence(evidence: ForkEvidence) -> bool:
    """Whether ``evidence`` proves its author signed a fork: both entries open and are the
    author's, ``entry_a`` is at ``seq``, and ``entry_b`` is a different entry (another
    body) at ``seq``, or is at ``seq + 1`` with a ``prev`` other than ``entry_a``'s id."""
    if not isinstance(evidence, ForkEvidence):
        return False
    try:
        a, id_a = _open(evidence.entry_a)
        b, id_b = _open(evidence.entry_b)
    except RemoteProtocolError:
        return False
    if not (a.author == b.author == evidence.author and a.seq == evidence.seq):
        return False
    if b.seq == a.seq:
        return id_a != id_b
    return b.seq == a.seq + 1 and b.prev != id_a


# --- receiving a feed --------------------------------------------------------------------------


@dataclass(frozen=True)
class Accepted:
    """The entry extends the chain: store it."""

    entry: FeedEntry
    entry_id: bytes


@dataclass(frozen=True)
class Duplicate:
    """This entry is already held (a replay, or the same body re-encoded)."""

    seq: int
    entry_id: bytes


@dataclass(frozen=True)
class Gap:
    """The entry is past the head: fetch ``have + 1 .. got - 1`` first. Nothing kept."""

    have: int
    got: int


@dataclass(frozen=True)
class Fork:
    """The author signed two chains: pass the evidence on; the entry is not kept."""

    evidence: ForkEvidence


Outcome = Accepted | Duplicate | Gap | Fork


class FeedState:
    """One author's feed as received, entry by entry, first seen wins. Holds every kept
    envelope in memory (node/ rebuilds it from storage); ``forks`` lists the evidence
    found (the first MAX_FORKS_KEPT), after which the chain is still extended as first
    seen."""

    def __init__(self, author: str) -> None:
        try:
            _check_author(author)
        except Invalid as exc:
            raise LocalProtocolError(str(exc)) from None
        self.author = author
        self._entries: list[tuple[FeedEntry, bytes, bytes]] = []  # (entry, id, envelope)
        self.forks: list[ForkEvidence] = []

    @property
    def head_seq(self) -> int:
        """Seq of the last kept entry; 0 for an empty feed."""
        return len(self._entries)

    @property
    def head_id(self) -> bytes | None:
        return self._entries[-1][1] if self._entries else None

    @property
    def head(self) -> FeedEntry | None:
        return self._entries[-1][0] if self._entries else None

    def envelope(self, seq: int) -> bytes:
        """The kept envelope bytes of entry ``seq`` (1-based); IndexError if not held."""
        if not 1 <= seq <= len(self._entries):
            raise IndexError(f"entry {seq} is not held (head {self.head_seq})")
        return self._entries[seq - 1][2]

    def accept(self, data: bytes) -> Outcome:
        """Judge one received entry. RemoteProtocolError if it is invalid on its own, is
        another author's ("wrong-peer"), or would make time go back ("bad-time")."""
        entry, eid = _open(data)
        if entry.author != self.author:
            raise RemoteProtocolError("wrong-peer", f"entry of {entry.author}, this feed is "
                                                    f"{self.author}'s")
        head = self.head_seq
        if entry.seq <= head:
            _, held_id, held_data = self._entries[entry.seq - 1]
            if held_id == eid:
                return Duplicate(entry.seq, eid)
            return self._fork(entry.seq, held_data, bytes(data))
        if entry.seq > head + 1:
            return Gap(head, entry.seq)
        if head and entry.prev != self._entries[-1][1]:
            return self._fork(head, self._entries[-1][2], bytes(data))
        if head and entry.created_ms < self._entries[-1][0].created_ms:
            raise RemoteProtocolError("bad-time", f"entry {entry.seq} created before entry "
                                                  f"{head}")
        self._entries.append((entry, eid, bytes(data)))
        return Accepted(entry, eid)

    def _fork(self, seq: int, entry_a: bytes, entry_b: bytes) -> Fork:
        evidence = ForkEvidence(self.author, seq, entry_a, entry_b)
        if len(self.forks) < MAX_FORKS_KEPT:
            self.forks.append(evidence)
        return Fork(evidence)
