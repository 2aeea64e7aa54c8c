"""Signed envelopes: the one way a signed record travels (specs/records.md).

An envelope holds the encoded body bytes, the signer's Ed25519 public key and a signature
over ``SIGNING_PREFIX || domain || 0x00 || body``. The domain names the record type, so a
signature made for one type can never be replayed as another (consensus-specs'
``compute_signing_root`` with a ``DOMAIN_*`` table). Wire form, msgpack:

    [ENVELOPE_VERSION, domain: str, public_key: bin(32), signature: bin(64), body: bin]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgpack
from nacl.exceptions import BadSignatureError
from nacl.signing import SigningKey, VerifyKey

from protocol.errors import LocalProtocolError, RemoteProtocolError
from protocol.peerid import peer_id_from_public_key

ENVELOPE_VERSION = 1
SIGNING_PREFIX = b"iollm-signed-v1\x00"
MAX_ENVELOPE_BYTES = 64 * 1024  # default cap; each record type may set a lower one

# Domain tags: one per signed record type. Adding a type means adding a row here and in
# specs/records.md; never reuse a tag for a different body layout (bump its /vN instead).
DOMAIN_CAPABILITY = "iollm/capability/v1"
DOMAIN_MANIFEST = "iollm/manifest/v1"  # SMIP model/dataset versions (specs/smip.md)
DOMAIN_ANNOUNCE = "iollm/announce/v1"  # SMIP "peer P provides version V" (specs/smip.md)
DOMAIN_JOB = "iollm/job/v1"  # a signed training job (specs/jobs.md)
DOMAIN_TASK_RESULT = "iollm/task-result/v1"  # a worker's signed task result (specs/jobs.md)
DOMAIN_RECEIPT = "iollm/receipt/v1"  # a contribution receipt (specs/jobs.md)
DOMAIN_FEED = "iollm/feed/v1"  # an entry of a node's append-only feed (specs/jobs.md)
DOMAIN_PROPOSAL = "iollm/proposal/v1"  # a block proposal (specs/consensus.md)
DOMAIN_VOTE = "iollm/vote/v1"  # a prevote or precommit (specs/consensus.md)
DOMAIN_ROUND = "iollm/round/v1"  # a coordinator's record of a finished round (specs/rewards.md)
DOMAIN_REVENUE = "iollm/revenue/v1"  # a signed revenue record for a model (specs/rewards.md)
DOMAINS: frozenset[str] = frozenset({DOMAIN_CAPABILITY, DOMAIN_MANIFEST, DOMAIN_ANNOUNCE,
                                     DOMAIN_JOB, DOMAIN_TASK_RESULT, DOMAIN_RECEIPT,
                                     DOMAIN_FEED, DOMAIN_PROPOSAL, DOMAIN_VOTE, DOMAIN_ROUND,
                                     DOMAIN_REVENUE})


def signing_message(domain: str, body: bytes) -> bytes:
    """The exact bytes an envelope's signature covers."""
    return SIGNING_PREFIX + domain.encode("ascii") + b"\x00" + body


@dataclass(frozen=True)
class Envelope:
    domain: str
    public_key: bytes
    signature: bytes
    body: bytes

    @property
    def signer(self) -> str:
        """The signer's libp2p peer id."""
        return peer_id_from_public_key(self.public_key)

    def encode(self) -> bytes:
        data: bytes = msgpack.packb(
            [ENVELOPE_VERSION, self.domain, self.public_key, self.signature, self.body],
            use_bin_type=True,
        )
        return data


def seal(signing_key: SigningKey, domain: str, body: bytes) -> Envelope:
    """Sign ``body`` under ``domain``. Raises LocalProtocolError on an unknown domain."""
    if domain not in DOMAINS:
        raise LocalProtocolError(f"unknown signing domain {domain!r}")
    signature = signing_key.sign(signing_message(domain, body)).signature
    return Envelope(domain, bytes(signing_key.verify_key), signature, body)


def open_envelope(data: bytes, domain: str, max_bytes: int = MAX_ENVELOPE_BYTES) -> Envelope:
    """Decode and verify an envelope that must carry ``domain``.

    Every failure (oversized, not msgpack, wrong shape, unknown version, other domain,
    bad signature) raises RemoteProtocolError and nothing else.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise RemoteProtocolError("malformed", "envelope must be bytes")
    if len(data) > max_bytes:
        raise RemoteProtocolError("oversized", f"envelope of {len(data)} bytes > {max_bytes}")
    fields = unpack_strict(bytes(data), max_bytes)
    if not isinstance(fields, list) or len(fields) != 5:
        raise RemoteProtocolError("malformed", "envelope must be a 5-element array")
    version, got_domain, public_key, signature, body = fields
    if type(version) is not int or version != ENVELOPE_VERSION:  # True == 1 == 1.0
        raise RemoteProtocolError(
            "unknown-version", f"envelope version {version!r}, this node speaks {ENVELOPE_VERSION}"
        )
    if got_domain != domain:
        raise RemoteProtocolError("wrong-domain", f"expected {domain!r}, got {got_domain!r}")
    if not (isinstance(public_key, bytes) and len(public_key) == 32):
        raise RemoteProtocolError("malformed", "public key must be 32 bytes")
    if not (isinstance(signature, bytes) and len(signature) == 64):
        raise RemoteProtocolError("malformed", "signature must be 64 bytes")
    if not isinstance(body, bytes):
        raise RemoteProtocolError("malformed", "body must be bytes")
    try:
        VerifyKey(public_key).verify(signing_message(domain, body), signature)
    except (BadSignatureError, ValueError) as exc:
        raise RemoteProtocolError("bad-signature", "signature does not verify") from exc
    return Envelope(domain, public_key, signature, body)


def unpack_strict(data: bytes, max_bytes: int) -> Any:
    """msgpack-decode one object, with every size limit bounded by ``max_bytes``.

    Trailing bytes, extension types and non-string map keys are rejected: one value has
    exactly one encoding we accept, so hashes of encodings are meaningful.
    """
    try:
        return msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            use_list=True,
            max_str_len=max_bytes,
            max_bin_len=max_bytes,
            max_array_len=max_bytes,
            max_map_len=max_bytes,
            max_ext_len=0,
        )
    except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError,
            msgpack.StackError, UnicodeDecodeError) as exc:
        raise RemoteProtocolError("malformed", f"not a valid msgpack value: {exc}") from None
