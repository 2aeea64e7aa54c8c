"""protocol/chainwire.py: the chain service's frames, bytes in, values or one error out."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.chainwire import (
    MAX_SYNC_LIMIT,
    STREAM_KINDS,
    BlockFrame,
    ConsensusFrame,
    Head,
    SyncRequest,
    check_consensus_gossip,
    decode_tx_batch,
    encode_tx_batch,
    tx_batches,
)
from protocol.errors import LocalProtocolError, RemoteProtocolError

CAP = 4096
DECODERS: dict[str, Callable[[bytes], Any]] = {
    "tx batch": lambda b: decode_tx_batch(b, CAP),
    "consensus frame": lambda b: ConsensusFrame.decode(b, CAP),
    "validator stream frame": lambda b: ConsensusFrame.decode(b, CAP, STREAM_KINDS),
    "head": Head.decode,
    "sync request": SyncRequest.decode,
    "block frame": lambda b: BlockFrame.decode(b, CAP),
}


def pack(value: Any) -> bytes:
    return bytes(msgpack.packb(value, use_bin_type=True))


@given(st.lists(st.binary(max_size=50), max_size=20))
def test_tx_batch_round_trip(txs: list[bytes]) -> None:
    assert decode_tx_batch(encode_tx_batch(txs), CAP) == txs


@given(st.lists(st.binary(max_size=300), max_size=40), st.integers(64, 2048))
def test_tx_batches_keep_order_and_size(txs: list[bytes], cap: int) -> None:
    batches = tx_batches(txs, cap)
    assert [tx for batch in batches for tx in batch] == txs
    for batch in batches:
        assert len(batch) == 1 or sum(len(t) + 8 for t in batch) <= cap


@given(st.sampled_from(["proposal", "vote"]), st.binary(max_size=100))
def test_consensus_frame_round_trip(kind: str, data: bytes) -> None:
    assert ConsensusFrame.decode(ConsensusFrame(kind, data).encode(), CAP) == \
        ConsensusFrame(kind, data)


@given(st.sampled_from(STREAM_KINDS), st.binary(max_size=100))
def test_validator_stream_frame_round_trip(kind: str, data: bytes) -> None:
    frame = ConsensusFrame(kind, data)
    assert ConsensusFrame.decode(frame.encode(), CAP, STREAM_KINDS) == frame


def test_txs_travel_on_validator_streams_only() -> None:
    frame = ConsensusFrame("txs", encode_tx_batch([b"tx"])).encode()
    with pytest.raises(RemoteProtocolError):
        ConsensusFrame.decode(frame, CAP)  # the consensus topic's kinds
    with pytest.raises(RemoteProtocolError):  # its relay check: dropped, never relayed
        check_consensus_gossip(frame, "chain", {"validator"}, CAP)


@given(st.text(min_size=1, max_size=64), st.integers(0, 2**63 - 1))
def test_head_round_trip(chain_id: str, height: int) -> None:
    assert Head.decode(Head(chain_id, height).encode()) == Head(chain_id, height)


@given(st.integers(1, 2**63 - 1), st.integers(1, MAX_SYNC_LIMIT))
def test_sync_request_round_trip(start: int, limit: int) -> None:
    assert SyncRequest.decode(SyncRequest(start, limit).encode()) == SyncRequest(start, limit)


@given(st.binary(max_size=200), st.binary(max_size=200))
def test_block_frame_round_trip(block: bytes, commit: bytes) -> None:
    assert BlockFrame.decode(BlockFrame(block, commit).encode(), CAP) == BlockFrame(block, commit)


@pytest.mark.parametrize(("name", "data"), [
    ("tx batch", pack([b"ok", "not bytes"])),
    ("tx batch", pack({"txs": []})),
    ("consensus frame", pack(["commit", b"x"])),
    ("consensus frame", pack(["vote", "text"])),
    ("consensus frame", pack(["vote", b"x", b"extra"])),
    ("validator stream frame", pack(["commit", b"x"])),
    ("validator stream frame", pack(["txs", [b"tx"]])),  # the batch travels encoded
    ("head", pack(["iollm", -1])),
    ("head", pack(["iollm", True])),  # a bool is not a height
    ("head", pack(["", 3])),
    ("head", pack(["iollm", 2**64 - 1])),
    ("sync request", pack({"from": 0, "limit": 5})),
    ("sync request", pack({"from": 1, "limit": 5, "more": 1})),
    ("sync request", pack([1, 5])),
    ("block frame", pack([b"block"])),
    ("block frame", pack([b"block", "commit"])),
    ("block frame", b"\x92\xc4\x01a"),  # truncated
    ("block frame", bytes(CAP + 1)),  # oversized
    ("head", pack(["iollm", 1]) + b"\x00"),  # trailing bytes
])
def test_malformed_frames_are_refused(name: str, data: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        DECODERS[name](data)


def test_a_huge_limit_is_capped() -> None:
    assert SyncRequest.decode(pack({"from": 1, "limit": 10**9})).limit == MAX_SYNC_LIMIT


def test_bad_local_values_are_bugs() -> None:
    for build in (lambda: ConsensusFrame("commit", b""), lambda: Head("", 0),
                  lambda: SyncRequest(0, 1), lambda: SyncRequest(1, MAX_SYNC_LIMIT + 1),
                  lambda: encode_tx_batch(["text"])):  # type: ignore[list-item]
        with pytest.raises(LocalProtocolError):
            build()


@settings(max_examples=300)
@given(st.sampled_from(sorted(DECODERS)), st.binary(max_size=300))
def test_any_bytes_decode_or_raise_remote_protocol_error(name: str, data: bytes) -> None:
    with contextlib.suppress(RemoteProtocolError):
        DECODERS[name](data)


values = st.recursive(st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1)
                      | st.text(max_size=8)
                      | st.binary(max_size=8),
                      lambda inner: st.lists(inner, max_size=3)
                      | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=8)


@settings(max_examples=300)
@given(st.sampled_from(sorted(DECODERS)), values)
def test_any_msgpack_value_decodes_or_raises_remote_protocol_error(name: str, value: Any
                                                                   ) -> None:
    with contextlib.suppress(RemoteProtocolError):
        DECODERS[name](pack(value))
