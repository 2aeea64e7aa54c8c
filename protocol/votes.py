"""The consensus messages: proposals, votes, commit certificates, evidence checks and the
proposer rule (specs/consensus.md, "Messages" to "Evidence"). Sans-IO; the machine that
uses them is protocol.consensus, which re-exports every public name here.

Wire messages (:class:`Proposal`, :class:`Vote`, :class:`Commit`) are msgpack maps with
``type`` and ``v`` first and strict keys. Building an invalid one is LocalProtocolError;
bytes from a peer raise RemoteProtocolError(reason) and nothing else.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from nacl.signing import SigningKey

from protocol.checks import (
    ID_BYTES,
    Invalid,
    check_chain,
    check_header,
    check_int,
    check_keys,
    check_peer,
    digest,
    fail,
    packb,
    to_remote,
)
from protocol.envelope import DOMAIN_PROPOSAL, DOMAIN_VOTE, open_envelope, seal, unpack_strict
from protocol.errors import LocalProtocolError, RemoteProtocolError
from protocol.peerid import peer_id_from_public_key

# --- constants (specs/consensus.md, "Constants") -----------------------------------------------

CONSENSUS_VERSION = 1  # body field "v" of every message below
PREVOTE = "prevote"
PRECOMMIT = "precommit"
VOTE_KINDS = (PREVOTE, PRECOMMIT)
MAX_VOTE_BYTES = 512  # whole vote envelope (a vote is about 300 bytes)
MAX_VALIDATORS = 128
MAX_COMMIT_BYTES = MAX_VALIDATORS * (MAX_VOTE_BYTES + 3) + 128
MAX_ROUND = 2**32 - 1
PROPOSER_SEED = "iollm/proposer/v1"

# --- field checks ------------------------------------------------------------------------------






def _check_id(name: str, value: object) -> None:
    if not (isinstance(value, bytes) and len(value) == ID_BYTES):
        fail(f"{name} must be {ID_BYTES} bytes")


def check_validators(validators: Mapping[str, int]) -> dict[str, int]:
    """The validator set as a dict; LocalProtocolError (it comes from our genesis)."""
    if not isinstance(validators, Mapping) or not 1 <= len(validators) <= MAX_VALIDATORS:
        raise LocalProtocolError(f"validators must be a map of 1..{MAX_VALIDATORS} peer ids")
    for peer, power in validators.items():
        check_peer("validator", peer)
        check_int("voting power", power, 1)
    check_int("total voting power", sum(validators.values()), 1)
    return dict(validators)


def _body(type_: str, d: object, names: frozenset[str]) -> dict[str, Any]:
    """The fields of a decoded body once its type tag and version are right."""
    d = check_header(f"a {type_}", d, type_, CONSENSUS_VERSION)
    try:
        d = dict(check_keys(type_, d, names | {"type", "v"}))
    except Invalid as exc:
        raise to_remote(exc) from None
    del d["type"], d["v"]
    return d


def _build(cls: type[Any], type_: str, d: object) -> Any:
    try:
        return cls(**_body(type_, d, frozenset(f.name for f in fields(cls))))
    except Invalid as exc:
        raise to_remote(exc) from None


def _to_dict(type_: str, obj: object) -> dict[str, Any]:
    return {"type": type_, "v": CONSENSUS_VERSION,
            **{f.name: getattr(obj, f.name) for f in fields(obj)}}  # type: ignore[arg-type]


def _signer(data: bytes, domain: str, cap: int) -> tuple[Any, str]:
    """The decoded body of a verified envelope, and its signer's peer id."""
    envelope = open_envelope(data, domain, cap)
    return unpack_strict(envelope.body, cap), envelope.signer


def own_id(key: SigningKey) -> str:
    return peer_id_from_public_key(bytes(key.verify_key))


# --- messages ----------------------------------------------------------------------------------


def block_id(block: bytes) -> bytes:
    """A block's id: SHA-256 of its bytes."""
    return digest(block)


@dataclass(frozen=True)
class Proposal:
    """``proposer`` proposes ``block`` in round ``round`` of ``height``; ``valid_round`` is
    the round in which it saw 2f+1 prevotes for that block (-1: none, a fresh block)."""

    chain_id: str
    height: int
    round: int
    block: bytes
    valid_round: int
    proposer: str

    def __post_init__(self) -> None:
        check_chain(self.chain_id)
        check_int("height", self.height, 1)
        check_int("round", self.round, 0, MAX_ROUND)
        if not isinstance(self.block, bytes):
            fail("block must be bytes")
        check_int("valid_round", self.valid_round, -1, self.round - 1)
        check_peer("proposer", self.proposer)

    @property
    def block_id(self) -> bytes:
        return block_id(self.block)


def seal_proposal(key: SigningKey, p: Proposal) -> bytes:
    """Proposal envelope bytes; LocalProtocolError unless ``key`` is the proposer's."""
    if p.proposer != own_id(key):
        raise LocalProtocolError(f"a proposal of {p.proposer} cannot be signed by this key")
    return seal(key, DOMAIN_PROPOSAL, packb(_to_dict("proposal", p))).encode()


def open_proposal(data: bytes, max_bytes: int) -> Proposal:
    """Check proposal envelope bytes of at most ``max_bytes``: envelope, body, signer."""
    body, signer = _signer(data, DOMAIN_PROPOSAL, max_bytes)
    p: Proposal = _build(Proposal, "proposal", body)
    if signer != p.proposer:
        raise RemoteProtocolError("signer-mismatch", f"signed by {signer}, proposer {p.proposer}")
    return p


@dataclass(frozen=True)
class Vote:
    """``validator``'s prevote or precommit for ``block_id`` (None: nil) in a round."""

    chain_id: str
    height: int
    round: int
    kind: str
    block_id: bytes | None
    validator: str

    def __post_init__(self) -> None:
        check_chain(self.chain_id)
        check_int("height", self.height, 1)
        check_int("round", self.round, 0, MAX_ROUND)
        if self.kind not in VOTE_KINDS:
            fail(f"kind must be one of {VOTE_KINDS}")
        if self.block_id is not None:
            _check_id("block_id", self.block_id)
        check_peer("validator", self.validator)


def seal_vote(key: SigningKey, v: Vote) -> bytes:
    """Vote envelope bytes; LocalProtocolError unless ``key`` is the validator's."""
    if v.validator != own_id(key):
        raise LocalProtocolError(f"a vote of {v.validator} cannot be signed by this key")
    data = seal(key, DOMAIN_VOTE, packb(_to_dict("vote", v))).encode()
    if len(data) > MAX_VOTE_BYTES:  # cannot happen within the field caps; kept honest
        raise LocalProtocolError(f"vote of {len(data)} bytes > {MAX_VOTE_BYTES}")
    return data


def open_vote(data: bytes) -> Vote:
    """Check vote envelope bytes: size, envelope, body, signer == validator."""
    body, signer = _signer(data, DOMAIN_VOTE, MAX_VOTE_BYTES)
    v: Vote = _build(Vote, "vote", body)
    if signer != v.validator:
        raise RemoteProtocolError("signer-mismatch", f"signed by {signer}, voter {v.validator}")
    return v


@dataclass(frozen=True)
class Commit:
    """The certificate stored with a final block: precommit envelopes for ``block_id`` in
    ``round`` by more than 2/3 of the voting power (checked by :func:`verify_commit`)."""

    height: int
    round: int
    block_id: bytes
    votes: tuple[bytes, ...]

    def __post_init__(self) -> None:
        check_int("height", self.height, 1)
        check_int("round", self.round, 0, MAX_ROUND)
        _check_id("block_id", self.block_id)
        if not (isinstance(self.votes, tuple) and 1 <= len(self.votes) <= MAX_VALIDATORS
                and all(isinstance(v, bytes) and len(v) <= MAX_VOTE_BYTES
                        for v in self.votes)):
            fail(f"votes must be 1..{MAX_VALIDATORS} envelopes of <= {MAX_VOTE_BYTES} bytes")

    def encode(self) -> bytes:
        return packb({**_to_dict("commit", self), "votes": list(self.votes)})

    @classmethod
    def decode(cls, data: bytes) -> Commit:
        """Decode commit bytes (the votes are checked by :func:`verify_commit`)."""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise RemoteProtocolError("malformed", "a commit must be bytes")
        if len(data) > MAX_COMMIT_BYTES:
            raise RemoteProtocolError("oversized", f"commit of {len(data)} bytes")
        d = _body("commit", unpack_strict(bytes(data), MAX_COMMIT_BYTES),
                  frozenset(f.name for f in fields(cls)))
        votes = d["votes"]
        try:
            return cls(d["height"], d["round"], d["block_id"],
                       tuple(votes) if isinstance(votes, list) else votes)
        except Invalid as exc:
            raise to_remote(exc) from None


def quorum(validators: Mapping[str, int]) -> int:
    """The smallest voting power that is more than 2/3 of the total ("2f+1")."""
    return sum(check_validators(validators).values()) * 2 // 3 + 1


def skip_power(total: int) -> int:
    """The smallest voting power that is more than 1/3 of ``total`` ("f+1")."""
    return total // 3 + 1


def _stride(total: int) -> int:
    """The proposer stride: about total/phi, the golden ratio, and coprime with total."""
    stride = max(1, total * 61803398874989 // 10**14)
    while math.gcd(stride, total) != 1:
        stride += 1
    return stride


def proposer_for(validators: Mapping[str, int], height: int, round: int) -> str:
    """The proposer of (height, round). Lay the validators, in ascending peer-id order, on
    a circle of ``total`` power units, each over as many units as it has power; round r of
    height h is proposed by the owner of unit ``(x_h + r * stride) mod total``, with
    ``x_h = int(H(packb([PROPOSER_SEED, h]))) mod total`` and ``stride`` from
    :func:`_stride`. Over any ``total`` consecutive rounds each validator proposes exactly
    ``power`` times, and consecutive rounds land far apart on the circle."""
    vals = check_validators(validators)
    total = sum(vals.values())
    start = int.from_bytes(digest(packb([PROPOSER_SEED, height])), "big") % total
    x = (start + round * _stride(total)) % total
    for peer in sorted(vals):
        x -= vals[peer]
        if x < 0:
            return peer
    raise AssertionError("unreachable: x < total power")


def verify_commit(chain_id: str, validators: Mapping[str, int], height: int, block_id: bytes,
                  data: bytes) -> Commit:
    """Check a commit certificate for ``block_id`` at ``height``: every vote verifies and is
    a PRECOMMIT on ``chain_id`` for (height, commit.round, block_id) by a distinct validator
    of the set, and their power is more than 2/3 of the total. RemoteProtocolError else."""
    vals = check_validators(validators)
    commit = Commit.decode(data)
    if commit.height != height or commit.block_id != block_id:
        raise RemoteProtocolError("wrong-block", "commit is for another height or block")
    seen: set[str] = set()
    for raw in commit.votes:
        v = open_vote(raw)
        if (v.chain_id, v.height, v.round) != (chain_id, height, commit.round):
            raise RemoteProtocolError("wrong-vote", "a vote of another chain, height or round")
        if v.kind != PRECOMMIT or v.block_id != block_id:
            raise RemoteProtocolError("wrong-vote", "a vote that is not a precommit for the block")
        if v.validator not in vals:
            raise RemoteProtocolError("not-validator", f"{v.validator} is not a validator")
        if v.validator in seen:
            raise RemoteProtocolError("duplicate-vote", f"two votes of {v.validator}")
        seen.add(v.validator)
    if sum(vals[p] for p in seen) < quorum(vals):
        raise RemoteProtocolError("no-quorum", "the votes hold 2/3 of the power or less")
    return commit


def verify_double_vote(chain_id: str, validators: Mapping[str, int], a: bytes,
                       b: bytes) -> Vote:
    """Two validly signed votes by one validator of the set, same chain, height, round and
    kind, different block_id: returns the first. RemoteProtocolError otherwise."""
    vals = check_validators(validators)
    va, vb = open_vote(a), open_vote(b)
    if va.chain_id != chain_id or va.validator not in vals:
        raise RemoteProtocolError("not-evidence", "not a vote of this chain's validators")
    same = (va.validator, va.chain_id, va.height, va.round, va.kind)
    if same != (vb.validator, vb.chain_id, vb.height, vb.round, vb.kind):
        raise RemoteProtocolError("not-evidence", "the votes are not of one vote slot")
    if va.block_id == vb.block_id:
        raise RemoteProtocolError("not-evidence", "the votes agree")
    return va


def verify_double_proposal(chain_id: str, validators: Mapping[str, int], a: bytes, b: bytes,
                           max_bytes: int) -> Proposal:
    """Two validly signed, different proposals by the proposer of one (height, round) on
    ``chain_id``: returns the first. RemoteProtocolError otherwise."""
    vals = check_validators(validators)
    pa, pb = open_proposal(a, max_bytes), open_proposal(b, max_bytes)
    if pa.chain_id != chain_id or pa.proposer != proposer_for(vals, pa.height, pa.round):
        raise RemoteProtocolError("not-evidence", "not a proposal by this round's proposer")
    if (pa.chain_id, pa.height, pa.round, pa.proposer) != (
            pb.chain_id, pb.height, pb.round, pb.proposer):
        raise RemoteProtocolError("not-evidence", "the proposals are not of one round")
    if pa == pb:
        raise RemoteProtocolError("not-evidence", "the proposals agree")
    return pa


def message_height(data: bytes, max_bytes: int) -> tuple[str, int] | None:
    """(chain_id, height) of a proposal or vote envelope, read WITHOUT checking it: for
    routing a message to the machine of its height (which checks everything) or noticing
    that a peer is ahead, never for trusting it. None when the bytes lack that shape."""
    try:
        envelope = unpack_strict(bytes(data), max_bytes)
        body = unpack_strict(envelope[4], max_bytes)
        chain_id, height = body["chain_id"], body["height"]
    except (RemoteProtocolError, TypeError, KeyError, IndexError):
        return None
    if isinstance(chain_id, str) and type(height) is int:
        return chain_id, height
    return None
