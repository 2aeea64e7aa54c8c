"""SMIP announcements: "peer P provides version V", signed, gossiped, judged."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from nacl.signing import SigningKey

from protocol.capability import MAX_CLOCK_SKEW_MS
from protocol.checks import Invalid as _Invalid
from protocol.checks import check_int as _check_int
from protocol.checks import check_keys as _check_keys
from protocol.checks import fail as _fail
from protocol.checks import packb
from protocol.checks import to_remote as _remote
from protocol.envelope import DOMAIN_ANNOUNCE, open_envelope, seal, unpack_strict
from protocol.errors import LocalProtocolError, RemoteProtocolError
from protocol.peerid import peer_id_from_public_key, public_key_from_peer_id
from protocol.smip.common import (
    ANNOUNCE_VERSION,
    DEFAULT_ANNOUNCE_LIFETIME_MS,
    KINDS,
    MAX_ANNOUNCE_BYTES,
    MAX_ANNOUNCE_LIFETIME_MS,
    MAX_MANIFEST_BYTES,
    MAX_VERSIONS_PER_PROVIDER,
    _check_id,
    _check_version_field,
    short_id,
    version_id,
)
from protocol.smip.manifest import (
    Manifest,
    check_name,
)

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


