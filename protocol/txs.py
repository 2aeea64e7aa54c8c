"""Ledger transactions and blocks on the wire (specs/rewards.md, "Transactions", "Blocks").

A transaction is ``packb([kind, payload])`` (:func:`encode_tx`); its id is SHA-256 of
those bytes (:func:`tx_id`). :func:`check_tx` is the stateless, expensive half of
validation: it decodes the payload and checks every signature in it, and returns a
:class:`CheckedTx` that the ledger (protocol/ledger.py) applies without checking a
signature again. A node caches CheckedTx by id, so a transaction's signatures are checked
once per node whether it arrives by gossip or in a block.

Two record types are new here, each signed under its own domain: :class:`RoundRecord`
(``iollm/round/v1``, a coordinator's record of a finished round) and :class:`Revenue`
(``iollm/revenue/v1``, a payer's attested income for a model).

Every refusal is a :class:`TxRefused`: a RemoteProtocolError with ``retry`` saying whether
the transaction may become valid later (the mempool keeps it) or never can.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from functools import cached_property
from typing import Any, ClassVar, TypeVar

from nacl.signing import SigningKey

from protocol.checks import (
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
from protocol.consensus import block_id, verify_double_vote
from protocol.envelope import (
    DOMAIN_REVENUE,
    DOMAIN_ROUND,
    open_envelope,
    seal,
    unpack_strict,
)
from protocol.errors import LocalProtocolError, RemoteProtocolError
from protocol.feed import MAX_EVIDENCE_BYTES, ForkEvidence, verify_fork_evidence
from protocol.genesis import Genesis
from protocol.jobs import MAX_JOB_BYTES, MAX_RECEIPT_BYTES, open_job, open_receipt
from protocol.jobspec import MAX_ROUNDS
from protocol.peerid import peer_id_from_public_key
from protocol.smip import FORBIDDEN_RANGES, ID_BYTES

TXS_VERSION = 1  # "v" of round records, revenue records and blocks
ZERO_ID = bytes(ID_BYTES)  # prev_id of block 1
MAX_ROUND_RECEIPTS = 2048  # receipt ids one round record lists
MAX_ROUND_BYTES = MAX_ROUND_RECEIPTS * 34 + 1024  # whole envelope
MAX_REVENUE_BYTES = 1024  # whole envelope
MAX_MEMO = 200  # characters
MAX_VOTES_BYTES = 4096  # payload of a double-vote transaction

KIND_JOB = "job"
KIND_RECEIPT = "receipt"
KIND_ROUND = "round"
KIND_REVENUE = "revenue"
KIND_FEED_FORK = "feed-fork"
KIND_DOUBLE_VOTE = "double-vote"
KINDS: tuple[str, ...] = (KIND_JOB, KIND_RECEIPT, KIND_ROUND, KIND_REVENUE, KIND_FEED_FORK,
                          KIND_DOUBLE_VOTE)
MAX_PAYLOAD_BYTES: dict[str, int] = {
    KIND_JOB: MAX_JOB_BYTES, KIND_RECEIPT: MAX_RECEIPT_BYTES, KIND_ROUND: MAX_ROUND_BYTES,
    KIND_REVENUE: MAX_REVENUE_BYTES, KIND_FEED_FORK: MAX_EVIDENCE_BYTES,
    KIND_DOUBLE_VOTE: MAX_VOTES_BYTES,
}  # fmt: skip
MAX_TX_BYTES = max(MAX_PAYLOAD_BYTES.values()) + 64


class TxRefused(RemoteProtocolError):
    """A transaction (or a block, because of one) is refused; the state is unchanged.
    ``retry``: it may become valid later (unknown job, receipts not counted yet, a nonce
    ahead); otherwise it never will (bad signature, duplicate, replay, wrong chain)."""

    def __init__(self, reason: str, detail: str, retry: bool = False) -> None:
        super().__init__(reason, detail)
        self.detail = detail
        self.retry = retry


def _refuse(exc: RemoteProtocolError, where: str = "") -> TxRefused:
    message = str(exc).removeprefix(f"{exc.reason}: ")
    return TxRefused(exc.reason, f"{where}{message}", getattr(exc, "retry", False))


def _check_id(name: str, value: object) -> None:
    if not (isinstance(value, bytes) and len(value) == ID_BYTES):
        fail(f"{name} must be {ID_BYTES} bytes")








# --- signed records: a map with "type" and "v", strict keys ------------------------------------

R = TypeVar("R", bound="_Record")


class _Record:
    TYPE: ClassVar[str]
    DOMAIN: ClassVar[str]
    MAX_BYTES: ClassVar[int]
    SIGNER: ClassVar[str]  # the field naming the signer

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": self.TYPE, "v": TXS_VERSION}
        for f in fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    def encode(self) -> bytes:
        """The envelope body."""
        return packb(self.to_dict())

    @classmethod
    def from_dict(cls: type[R], d: object) -> R:
        d = check_header(f"a {cls.TYPE}", d, cls.TYPE, TXS_VERSION)
        names = frozenset(f.name for f in fields(cls))  # type: ignore[arg-type]
        try:
            d = dict(check_keys(cls.TYPE, d, names | {"type", "v"}))
            del d["type"], d["v"]
            return cls(**{k: tuple(x) if isinstance(x, list) else x for k, x in d.items()})
        except Invalid as exc:
            raise to_remote(exc) from None

    def seal(self, key: SigningKey) -> bytes:
        """Envelope bytes; LocalProtocolError unless ``key`` is the signer field's."""
        own = peer_id_from_public_key(bytes(key.verify_key))
        if getattr(self, self.SIGNER) != own:
            raise LocalProtocolError(f"a {self.TYPE} of {getattr(self, self.SIGNER)} cannot "
                                     f"be signed by {own}")
        data = seal(key, self.DOMAIN, self.encode()).encode()
        if len(data) > self.MAX_BYTES:
            raise LocalProtocolError(f"{self.TYPE} envelope of {len(data)} bytes")
        return data

    @classmethod
    def open(cls: type[R], data: bytes) -> tuple[R, bytes]:
        """Check envelope bytes: envelope, body, then signer == the signer field. Returns
        the record and its id, H(body). RemoteProtocolError naming the reason."""
        envelope = open_envelope(data, cls.DOMAIN, cls.MAX_BYTES)
        record = cls.from_dict(unpack_strict(envelope.body, cls.MAX_BYTES))
        who = getattr(record, cls.SIGNER)
        if envelope.signer != who:
            raise RemoteProtocolError("signer-mismatch", f"signed by {envelope.signer}, "
                                                         f"{cls.SIGNER} {who}")
        return record, digest(envelope.body)


@dataclass(frozen=True)
class RoundRecord(_Record):
    """A coordinator's record that round ``round`` of job ``job_id`` produced model
    ``version`` from ``parent``, with these held-out losses (integer micro-nats, both
    measured on the job's held-out windows) and these accepted receipts."""

    TYPE: ClassVar[str] = "round-record"
    DOMAIN: ClassVar[str] = DOMAIN_ROUND
    MAX_BYTES: ClassVar[int] = MAX_ROUND_BYTES
    SIGNER: ClassVar[str] = "coordinator"

    chain_id: str
    job_id: bytes
    round: int
    coordinator: str
    version: bytes
    parent: bytes
    heldout_loss_micro: int
    parent_loss_micro: int
    receipts: tuple[bytes, ...]

    def __post_init__(self) -> None:
        check_chain(self.chain_id)
        _check_id("job_id", self.job_id)
        check_int("round", self.round, 0, MAX_ROUNDS - 1)
        check_peer("coordinator", self.coordinator)
        _check_id("version", self.version)
        _check_id("parent", self.parent)
        if self.version == self.parent:
            fail("version is its own parent")
        check_int("heldout_loss_micro", self.heldout_loss_micro)
        check_int("parent_loss_micro", self.parent_loss_micro)
        if not isinstance(self.receipts, tuple) or len(self.receipts) > MAX_ROUND_RECEIPTS:
            fail(f"receipts must be at most {MAX_ROUND_RECEIPTS} receipt ids")
        for i, rid in enumerate(self.receipts):
            _check_id(f"receipts[{i}]", rid)
        if len(set(self.receipts)) != len(self.receipts):
            fail("receipts lists a receipt id twice")


_FORBIDDEN = tuple(FORBIDDEN_RANGES)


@dataclass(frozen=True)
class Revenue(_Record):
    """``payer`` attests it received ``amount`` units of income for model ``model``.
    ``nonce`` is the payer's previous nonce + 1 (from 1), so a record counts once."""

    TYPE: ClassVar[str] = "revenue"
    DOMAIN: ClassVar[str] = DOMAIN_REVENUE
    MAX_BYTES: ClassVar[int] = MAX_REVENUE_BYTES
    SIGNER: ClassVar[str] = "payer"

    chain_id: str
    payer: str
    model: bytes
    amount: int
    nonce: int
    memo: str = ""

    def __post_init__(self) -> None:
        check_chain(self.chain_id)
        check_peer("payer", self.payer)
        _check_id("model", self.model)
        check_int("amount", self.amount, 1)
        check_int("nonce", self.nonce, 1)
        if not (isinstance(self.memo, str) and len(self.memo) <= MAX_MEMO) or any(
                lo <= ord(c) <= hi for c in self.memo for lo, hi in _FORBIDDEN):
            fail(f"memo must be a string of at most {MAX_MEMO} characters, no controls")


# --- transactions ------------------------------------------------------------------------------


def encode_tx(kind: str, payload: bytes) -> bytes:
    """A transaction: ``packb([kind, payload])``."""
    if kind not in KINDS:
        raise LocalProtocolError(f"unknown transaction kind {kind!r}")
    if not isinstance(payload, bytes) or len(payload) > MAX_PAYLOAD_BYTES[kind]:
        raise LocalProtocolError(f"a {kind} payload is at most {MAX_PAYLOAD_BYTES[kind]} bytes")
    return packb([kind, payload])


def tx_id(tx: bytes) -> bytes:
    return digest(tx)


@dataclass(frozen=True)
class CheckedTx:
    """A transaction whose encoding and signatures are checked. ``data`` is the
    transaction bytes, ``record`` the decoded record (Job, Receipt, RoundRecord, Revenue,
    ForkEvidence, or the consensus Vote of a double vote), ``ref`` the record's own id
    (job id, receipt id, H(body) of a round or revenue record, H(payload) otherwise)."""

    id: bytes
    kind: str
    data: bytes
    record: Any
    ref: bytes


def check_tx(genesis: Genesis, tx: bytes) -> CheckedTx:
    """Decode ``tx`` and check every signature in it, and the chain id of the records
    that carry one. TxRefused(retry=False) on any failure; needs no ledger state."""
    if not isinstance(tx, (bytes, bytearray)) or len(tx) > MAX_TX_BYTES:
        raise TxRefused("oversized", f"a transaction is bytes, at most {MAX_TX_BYTES}")
    tx = bytes(tx)
    try:
        decoded = unpack_strict(tx, MAX_TX_BYTES)
    except RemoteProtocolError as exc:
        raise _refuse(exc) from None
    if not (isinstance(decoded, list) and len(decoded) == 2 and decoded[0] in KINDS
            and isinstance(decoded[1], bytes)):
        raise TxRefused("malformed", "a transaction is [kind, payload: bin] of a known kind")
    kind, payload = decoded
    if packb(decoded) != tx:
        raise TxRefused("malformed", "not the canonical encoding of [kind, payload]")
    if len(payload) > MAX_PAYLOAD_BYTES[kind]:
        raise TxRefused("oversized", f"{kind} payload of {len(payload)} bytes")
    try:
        record, ref = _CHECKS[kind](genesis, payload)
    except TxRefused:
        raise
    except RemoteProtocolError as exc:
        raise _refuse(exc, f"{kind}: ") from None
    return CheckedTx(digest(tx), kind, tx, record, ref)


def _check_job(genesis: Genesis, payload: bytes) -> tuple[Any, bytes]:
    job, envelope = open_job(payload)
    return job, digest(envelope.body)


def _check_receipt(genesis: Genesis, payload: bytes) -> tuple[Any, bytes]:
    receipt = open_receipt(payload)
    # open_receipt verified the envelope; its body (field 4) is what the id hashes.
    return receipt, digest(unpack_strict(payload, MAX_RECEIPT_BYTES)[4])


def __check_chain_of(genesis: Genesis, record: RoundRecord | Revenue) -> None:
    if record.chain_id != genesis.chain_id:
        raise TxRefused("wrong-chain", f"{record.TYPE} for chain {record.chain_id!r}, this "
                                       f"is {genesis.chain_id!r}")


def _check_round(genesis: Genesis, payload: bytes) -> tuple[Any, bytes]:
    record, ref = RoundRecord.open(payload)
    __check_chain_of(genesis, record)
    return record, ref


def _check_revenue(genesis: Genesis, payload: bytes) -> tuple[Any, bytes]:
    record, ref = Revenue.open(payload)
    __check_chain_of(genesis, record)
    return record, ref


def _check_fork(genesis: Genesis, payload: bytes) -> tuple[Any, bytes]:
    evidence = ForkEvidence.decode(payload)
    if not verify_fork_evidence(evidence):
        raise TxRefused("bad-evidence", "the two entries do not prove a fork")
    return evidence, digest(payload)


def _check_double_vote(genesis: Genesis, payload: bytes) -> tuple[Any, bytes]:

    pair = unpack_strict(payload, MAX_VOTES_BYTES)
    if not (isinstance(pair, list) and len(pair) == 2
            and all(isinstance(v, bytes) for v in pair)):
        raise TxRefused("malformed", "a double vote is [vote_a: bin, vote_b: bin]")
    vote = verify_double_vote(genesis.chain_id, genesis.powers, pair[0], pair[1])
    return vote, digest(payload)


_CHECKS = {KIND_JOB: _check_job, KIND_RECEIPT: _check_receipt, KIND_ROUND: _check_round,
           KIND_REVENUE: _check_revenue, KIND_FEED_FORK: _check_fork,
           KIND_DOUBLE_VOTE: _check_double_vote}  # fmt: skip


# --- blocks ------------------------------------------------------------------------------------

_BLOCK_KEYS = frozenset({"type", "v", "chain_id", "height", "time_ms", "proposer", "prev_id",
                         "state_root", "txs"})


@dataclass(frozen=True)
class Block:
    """Block ``height`` of chain ``chain_id``: ``txs`` applied in order on the state after
    block ``prev_id`` give the state whose root is ``state_root``."""

    chain_id: str
    height: int
    time_ms: int
    proposer: str
    prev_id: bytes
    state_root: bytes
    txs: tuple[bytes, ...]

    def __post_init__(self) -> None:
        check_chain(self.chain_id)
        check_int("height", self.height, 1)
        check_int("time_ms", self.time_ms)
        check_peer("proposer", self.proposer)
        _check_id("prev_id", self.prev_id)
        _check_id("state_root", self.state_root)
        if (self.height == 1) != (self.prev_id == ZERO_ID):
            fail("prev_id is 32 zero bytes exactly at height 1", "bad-prev")
        if not isinstance(self.txs, tuple) or not all(isinstance(t, bytes) for t in self.txs):
            fail("txs must be a tuple of bytes")

    def to_dict(self) -> dict[str, Any]:
        return {"type": "block", "v": TXS_VERSION, "chain_id": self.chain_id,
                "height": self.height, "time_ms": self.time_ms, "proposer": self.proposer,
                "prev_id": self.prev_id, "state_root": self.state_root,
                "txs": list(self.txs)}  # fmt: skip

    def encode(self) -> bytes:
        return self._encoded

    @cached_property
    def _encoded(self) -> bytes:
        return packb(self.to_dict())

    @cached_property
    def id(self) -> bytes:
        """:func:`protocol.consensus.block_id` of :meth:`encode`."""
        return block_id(self._encoded)

    @classmethod
    def decode(cls, data: bytes, max_bytes: int) -> Block:
        """Inverse of :meth:`encode`; RemoteProtocolError ("oversized" over ``max_bytes``)."""
        if not isinstance(data, (bytes, bytearray)):
            raise RemoteProtocolError("malformed", "a block must be bytes")
        if len(data) > max_bytes:
            raise RemoteProtocolError("oversized", f"block of {len(data)} bytes > {max_bytes}")
        d = unpack_strict(bytes(data), max_bytes)
        if not isinstance(d, dict) or d.get("type") != "block":
            raise RemoteProtocolError("wrong-type", "not a block")
        if type(d.get("v")) is not int or d["v"] != TXS_VERSION:
            raise RemoteProtocolError("unknown-version", f"block version {d.get('v')!r:.20}")
        try:
            d = dict(check_keys("block", d, _BLOCK_KEYS))
            if not isinstance(d["txs"], list):
                fail("txs must be an array")
            block = cls(d["chain_id"], d["height"], d["time_ms"], d["proposer"], d["prev_id"],
                        d["state_root"], tuple(d["txs"]))
        except Invalid as exc:
            raise to_remote(exc) from None
        if block.encode() != data:
            raise RemoteProtocolError("malformed", "not the canonical encoding of the block")
        return block


def votes_payload(vote_a: bytes, vote_b: bytes) -> bytes:
    """The payload of a double-vote transaction."""
    return packb([vote_a, vote_b])

