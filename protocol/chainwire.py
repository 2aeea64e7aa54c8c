"""The chain service's own wire messages (specs/consensus.md, "Network"), sans-IO.

The signed messages (transactions, proposals, votes, commits, blocks) have their codecs in
txs.py and votes.py; these are the frames that carry them:

- a **tx batch** on the transactions topic: a msgpack array of transaction envelopes;
- a **consensus frame** on the consensus topic and the direct validator stream:
  ``[kind, data]``, kind ``"proposal"`` or ``"vote"``; on the validator stream also
  ``"txs"``, data a tx batch (validators send the txs they admit straight to each other);
- a **head** on the head topic: ``[chain_id, height]``, what a node has made final;
- a **sync request** on ``/iollm/blocks/1.0.0``: ``{"from": height, "limit": n}``, and
  each answer a **block frame** ``[block, commit]`` (an empty frame ends the answer).

Every decoder takes the bytes and a size cap, and raises only RemoteProtocolError.
"""

from __future__ import annotations

from collections.abc import Container, Sequence
from dataclasses import dataclass
from typing import Any

from protocol.checks import MAX_CHAIN_ID_CHARS, MAX_INT, packb
from protocol.envelope import unpack_strict
from protocol.errors import LocalProtocolError, RemoteProtocolError
from protocol.votes import Proposal, Vote, open_proposal, open_vote

CONSENSUS_KINDS = ("proposal", "vote")  # what the consensus topic carries
TXS_KIND = "txs"
STREAM_KINDS = (*CONSENSUS_KINDS, TXS_KIND)  # what a validator stream carries
MAX_HEAD_BYTES = 256
MAX_SYNC_REQUEST_BYTES = 256
MAX_SYNC_LIMIT = 1024  # blocks one request may ask for (a server sends at most its own cap)
BLOCK_FRAME_OVERHEAD = 64 * 1024  # a block frame's bytes beyond the block: its commit
CONSENSUS_FRAME_OVERHEAD = 64  # a consensus frame's bytes beyond its message


def _malformed(what: str) -> RemoteProtocolError:
    return RemoteProtocolError("malformed", what)


def encode_tx_batch(txs: Sequence[bytes]) -> bytes:
    if not all(isinstance(tx, bytes) for tx in txs):
        raise LocalProtocolError("a tx batch holds transaction envelopes (bytes)")
    return packb(list(txs))


def decode_tx_batch(data: bytes, max_bytes: int) -> list[bytes]:
    batch = _unpack(data, max_bytes)
    if not (isinstance(batch, list) and all(isinstance(tx, bytes) for tx in batch)):
        raise _malformed("a tx batch is an array of bin")
    return batch


def tx_batches(txs: Sequence[bytes], max_bytes: int) -> list[list[bytes]]:
    """``txs`` in order, cut into batches of about ``max_bytes`` encoded (8 bytes counted
    for each tx's framing; a tx larger than that travels alone)."""
    out: list[list[bytes]] = []
    size = max_bytes
    for t in txs:
        if size + len(t) + 8 > max_bytes:
            out.append([])
            size = 0
        out[-1].append(t)
        size += len(t) + 8
    return out


@dataclass(frozen=True)
class ConsensusFrame:
    kind: str  # "proposal" or "vote"; "txs" on a validator stream only
    data: bytes  # the signed proposal or vote, or an encoded tx batch

    def __post_init__(self) -> None:
        if self.kind not in STREAM_KINDS or not isinstance(self.data, bytes):
            raise LocalProtocolError(f"a consensus frame is a proposal, a vote or txs, not "
                                     f"{self.kind!r}")

    def encode(self) -> bytes:
        return packb([self.kind, self.data])

    @classmethod
    def decode(cls, data: bytes, max_bytes: int,
               kinds: tuple[str, ...] = CONSENSUS_KINDS) -> ConsensusFrame:
        """``kinds``: those the channel carries (STREAM_KINDS on a validator stream)."""
        value = _unpack(data, max_bytes)
        if not (isinstance(value, list) and len(value) == 2
                and value[0] in kinds and isinstance(value[1], bytes)):
            raise _malformed(f"a consensus frame is [{' | '.join(kinds)}, bin]")
        return cls(value[0], value[1])


@dataclass(frozen=True)
class Head:
    chain_id: str
    height: int  # the node's last final block

    def __post_init__(self) -> None:
        if not (isinstance(self.chain_id, str) and 0 < len(self.chain_id) <= MAX_CHAIN_ID_CHARS
                and _is_int(self.height, 0)):
            raise LocalProtocolError("a head is [chain_id, height >= 0]")

    def encode(self) -> bytes:
        return packb([self.chain_id, self.height])

    @classmethod
    def decode(cls, data: bytes) -> Head:
        value = _unpack(data, MAX_HEAD_BYTES)
        if not (isinstance(value, list) and len(value) == 2 and isinstance(value[0], str)
                and 0 < len(value[0]) <= MAX_CHAIN_ID_CHARS and _is_int(value[1], 0)):
            raise _malformed("a head is [chain_id, height]")
        return cls(value[0], value[1])


@dataclass(frozen=True)
class SyncRequest:
    start: int  # the first height wanted, at least 1
    limit: int  # at most this many blocks

    def __post_init__(self) -> None:
        if not (_is_int(self.start, 1) and _is_int(self.limit, 1)
                and self.limit <= MAX_SYNC_LIMIT):
            raise LocalProtocolError(f"a sync request is from >= 1, 1 <= limit <= "
                                     f"{MAX_SYNC_LIMIT}")

    def encode(self) -> bytes:
        return packb({"from": self.start, "limit": self.limit})

    @classmethod
    def decode(cls, data: bytes) -> SyncRequest:
        value = _unpack(data, MAX_SYNC_REQUEST_BYTES)
        if not (isinstance(value, dict) and set(value) == {"from", "limit"}
                and _is_int(value["from"], 1) and _is_int(value["limit"], 1)):
            raise _malformed("a sync request is {from: height >= 1, limit: n >= 1}")
        return cls(value["from"], min(value["limit"], MAX_SYNC_LIMIT))


@dataclass(frozen=True)
class BlockFrame:
    block: bytes  # an encoded block
    commit: bytes  # its commit certificate

    def encode(self) -> bytes:
        return packb([self.block, self.commit])

    @classmethod
    def decode(cls, data: bytes, max_bytes: int) -> BlockFrame:
        value = _unpack(data, max_bytes)
        if not (isinstance(value, list) and len(value) == 2
                and all(isinstance(x, bytes) for x in value)):
            raise _malformed("a block frame is [block, commit]")
        return cls(value[0], value[1])


# -- gossip validation: what a node relays on the chain's topics ------------------------
# Each raises RemoteProtocolError(reason) for a message no honest node sends; the node
# drops it before gossipsub relays it (specs/consensus.md, "Network").


def check_consensus_gossip(data: bytes, chain_id: str, validators: Container[str],
                           max_bytes: int) -> Proposal | Vote:
    """A consensus frame whose message is a proposal or vote of this chain, signed by one
    of its validators (the signature checked)."""
    frame = ConsensusFrame.decode(data, max_bytes)
    message: Proposal | Vote
    if frame.kind == "proposal":
        message = open_proposal(frame.data, max_bytes)
        signer = message.proposer
    else:
        message = open_vote(frame.data)
        signer = message.validator
    if message.chain_id != chain_id:
        raise RemoteProtocolError("wrong-chain", f"{message.chain_id!r}, not {chain_id!r}")
    if signer not in validators:
        raise RemoteProtocolError("not-a-validator", f"{signer} is not a validator")
    return message


def check_head_gossip(data: bytes, chain_id: str) -> Head:
    head = Head.decode(data)
    if head.chain_id != chain_id:
        raise RemoteProtocolError("wrong-chain", f"{head.chain_id!r}, not {chain_id!r}")
    return head


def _unpack(data: bytes, max_bytes: int) -> Any:
    if not isinstance(data, bytes | bytearray):
        raise RemoteProtocolError("malformed", "a frame is bytes")
    if len(data) > max_bytes:
        raise RemoteProtocolError("oversized", f"{len(data)} bytes > {max_bytes}")
    return unpack_strict(bytes(data), max_bytes)


def _is_int(value: Any, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= MAX_INT
