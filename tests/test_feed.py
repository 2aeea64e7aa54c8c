"""protocol.feed: entries, chains, replays, gaps and forks with standalone evidence."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import random

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nacl.signing import SigningKey

from protocol.envelope import DOMAIN_FEED, DOMAIN_RECEIPT, open_envelope, signing_message
from protocol.errors import LocalProtocolError, RemoteProtocolError
from protocol.feed import (
    FEED_KIND_RECEIPT,
    MAX_ENTRY_BYTES,
    MAX_EVIDENCE_BYTES,
    MAX_FEED_PAYLOAD_BYTES,
    MAX_FORKS_KEPT,
    ZERO_ID,
    Accepted,
    Duplicate,
    FeedEntry,
    FeedState,
    Fork,
    ForkEvidence,
    Gap,
    entry_id,
    next_entry,
    open_entry,
    seal_entry,
    verify_chain,
    verify_fork_evidence,
)
from protocol.peerid import peer_id_from_public_key

A_KEY, B_KEY = SigningKey(bytes([3]) * 32), SigningKey(bytes([4]) * 32)
A, B = (peer_id_from_public_key(bytes(k.verify_key)) for k in (A_KEY, B_KEY))
NOW = 1_800_000_000_000


def packb(obj: object) -> bytes:
    data: bytes = msgpack.packb(obj, use_bin_type=True)
    return data


def forge(body: bytes, key: SigningKey = A_KEY, domain: str = DOMAIN_FEED) -> bytes:
    sig = key.sign(signing_message(domain, body)).signature
    return packb([1, domain, bytes(key.verify_key), sig, body])


def reason(fn: object, *args: object, **kw: object) -> str:
    with pytest.raises(RemoteProtocolError) as exc_info:
        fn(*args, **kw)  # type: ignore[operator]
    return exc_info.value.reason


def chain(n: int, key: SigningKey = A_KEY, *, start: list[bytes] | None = None,
          tag: bytes = b"") -> list[bytes]:
    """``n`` more entries after ``start`` (payloads differ by ``tag``: another branch)."""
    out = list(start or [])
    for i in range(n):
        last = open_entry(out[-1]) if out else None
        last_id = entry_id(out[-1]) if out else None
        out.append(next_entry(key, last, last_id, FEED_KIND_RECEIPT, tag + b"payload %d" % i,
                              NOW + 1000 * len(out)))
    return out


CHAIN = chain(5)


def reencode(data: bytes) -> bytes:
    """The same signed entry in a wider msgpack encoding (bin32 headers): other bytes,
    same body, same signature. Anyone can do this to any envelope."""
    env = open_envelope(data, DOMAIN_FEED, MAX_ENTRY_BYTES)
    def bin32(b: bytes) -> bytes:
        return b"\xc6" + len(b).to_bytes(4, "big") + b
    return (b"\x95\x01" + packb(DOMAIN_FEED) + bin32(env.public_key) + bin32(env.signature)
            + bin32(env.body))  # fmt: skip


# --- entries -----------------------------------------------------------------------------------


def test_entries_link_by_seq_and_prev() -> None:
    entries = [open_entry(e) for e in CHAIN]
    assert [e.seq for e in entries] == [1, 2, 3, 4, 5]
    assert entries[0].prev == ZERO_ID
    for before, after, data in zip(entries, entries[1:], CHAIN, strict=False):
        assert after.prev == entry_id(data) and after.author == before.author == A
    body = open_envelope(CHAIN[2], DOMAIN_FEED, MAX_ENTRY_BYTES).body
    assert entry_id(CHAIN[2]) == hashlib.sha256(body).digest()
    assert entry_id(reencode(CHAIN[2])) == entry_id(CHAIN[2])
    assert verify_chain(CHAIN) == entries


def test_next_entry_rules() -> None:
    first = open_entry(CHAIN[0])
    later = next_entry(A_KEY, first, entry_id(CHAIN[0]), "receipt", b"x", NOW - 10**6)
    assert open_entry(later).created_ms == first.created_ms  # the clock stepped back
    with pytest.raises(LocalProtocolError):
        next_entry(B_KEY, first, entry_id(CHAIN[0]), "receipt", b"x", NOW)  # not B's feed
    with pytest.raises(LocalProtocolError):
        next_entry(A_KEY, first, None, "receipt", b"x", NOW)
    with pytest.raises(LocalProtocolError):
        next_entry(A_KEY, None, bytes(32), "receipt", b"x", NOW)
    with pytest.raises(LocalProtocolError):
        next_entry(A_KEY, None, None, "receipt", b"x" * (MAX_FEED_PAYLOAD_BYTES + 1), NOW)
    with pytest.raises(LocalProtocolError):
        next_entry(A_KEY, None, None, "Receipt", b"x", NOW)
    big = next_entry(A_KEY, None, None, "k" * 32, b"x" * MAX_FEED_PAYLOAD_BYTES, 2**63 - 1)
    assert len(big) <= MAX_ENTRY_BYTES
    with pytest.raises(LocalProtocolError):
        FeedEntry(A, 1, bytes([1]) * 32, NOW, "receipt", b"")  # entry 1 links to nothing
    with pytest.raises(LocalProtocolError):
        FeedEntry(A, 2, ZERO_ID, NOW, "receipt", b"")
    with pytest.raises(LocalProtocolError):
        seal_entry(B_KEY, open_entry(CHAIN[0]))


def test_entry_body_errors() -> None:
    d = open_entry(CHAIN[1]).to_dict()
    cases = [({"v": 2}, "unknown-version"), ({"type": "receipt"}, "wrong-type"),
             ({"prev": ZERO_ID}, "bad-prev"), ({"seq": 0}, "malformed"),
             ({"seq": True}, "malformed"), ({"extra": 1}, "malformed"),
             ({"author": "x"}, "bad-peer-id"), ({"author": B}, "signer-mismatch"),
             ({"payload": "text"}, "oversized"), ({"kind": ""}, "malformed")]  # fmt: skip
    for change, expected in cases:
        assert reason(open_entry, forge(packb({**d, **change}))) == expected, change
    assert reason(open_entry, forge(packb(d), domain=DOMAIN_RECEIPT)) == "wrong-domain"
    assert reason(open_entry, forge(packb(d), key=B_KEY)) == "signer-mismatch"


def test_every_flipped_byte_truncation_and_garbage_is_rejected() -> None:
    data = CHAIN[1]
    for i in range(len(data)):
        with pytest.raises(RemoteProtocolError):
            open_entry(data[:i] + bytes([data[i] ^ 0x41]) + data[i + 1:])
    for n in range(len(data)):
        with pytest.raises(RemoteProtocolError):
            open_entry(data[:n])
    for tail in (b"\x00", data):
        with pytest.raises(RemoteProtocolError):
            open_entry(data + tail)
    assert reason(open_entry, b"\x00" * (MAX_ENTRY_BYTES + 1)) == "oversized"


@settings(max_examples=100, deadline=None)
@given(st.integers(0, len(CHAIN[3]) - 1), st.integers(1, 255))
def test_random_byte_changes_are_rejected(i: int, delta: int) -> None:
    data = CHAIN[3]
    changed = data[:i] + bytes([(data[i] + delta) % 256]) + data[i + 1:]
    with pytest.raises(RemoteProtocolError):
        open_entry(changed)
    state = FeedState(A)
    for e in CHAIN[:3]:
        state.accept(e)
    with pytest.raises(RemoteProtocolError):
        state.accept(changed)


@settings(max_examples=40, deadline=None)
@given(st.from_regex(r"[a-z][a-z0-9-]{0,31}", fullmatch=True), st.binary(max_size=300),
       st.integers(0, 2**63 - 1), st.integers(1, 2**63 - 1))
def test_entry_round_trip(kind: str, payload: bytes, created: int, seq: int) -> None:
    prev = ZERO_ID if seq == 1 else bytes([7]) * 32
    entry = FeedEntry(A, seq, prev, created, kind, payload)
    assert open_entry(seal_entry(A_KEY, entry)) == entry


# --- chains ------------------------------------------------------------------------------------


def test_verify_chain_errors() -> None:
    assert verify_chain([]) == []
    assert reason(verify_chain, CHAIN[1:]) == "bad-seq"  # no entry 1
    assert reason(verify_chain, [CHAIN[0], CHAIN[2]]) == "bad-seq"
    assert reason(verify_chain, CHAIN, author=B) == "wrong-peer"
    assert reason(verify_chain, [CHAIN[0], *chain(2, B_KEY)[1:]]) == "wrong-peer"
    other = chain(3, tag=b"other ")
    assert reason(verify_chain, [*CHAIN[:2], other[2]]) == "bad-prev"
    assert verify_chain(CHAIN[2:], after=(2, entry_id(CHAIN[1]))) == [
        open_entry(e) for e in CHAIN[2:]]
    assert reason(verify_chain, CHAIN[2:], after=(2, entry_id(other[1]))) == "bad-prev"
    # A validly signed entry that goes back in time.
    d = open_entry(CHAIN[0]).to_dict()
    early = forge(packb({**open_entry(CHAIN[1]).to_dict(), "created_ms": d["created_ms"] - 1}))
    assert reason(verify_chain, [CHAIN[0], early]) == "bad-time"
    assert reason(verify_chain, [CHAIN[0], b"junk"]) == "malformed"


# --- receiving: accepted, duplicate, gap, fork ----------------------------------------------


def test_state_accepts_in_order_and_reports_replays_and_gaps() -> None:
    state = FeedState(A)
    assert state.head_seq == 0 and state.head is None and state.head_id is None
    assert state.accept(CHAIN[2]) == Gap(0, 3)
    assert state.head_seq == 0
    for data in CHAIN[:3]:
        outcome = state.accept(data)
        assert isinstance(outcome, Accepted) and outcome.entry_id == entry_id(data)
    assert state.accept(CHAIN[1]) == Duplicate(2, entry_id(CHAIN[1]))
    assert state.accept(reencode(CHAIN[2])) == Duplicate(3, entry_id(CHAIN[2]))
    assert state.accept(CHAIN[4]) == Gap(3, 5)
    assert isinstance(state.accept(CHAIN[3]), Accepted)
    assert state.head_seq == 4 and state.head == open_entry(CHAIN[3])
    assert state.envelope(2) == CHAIN[1] and not state.forks
    with pytest.raises(IndexError):
        state.envelope(5)
    assert reason(state.accept, chain(1, B_KEY)[0]) == "wrong-peer"
    early = forge(packb({**open_entry(CHAIN[4]).to_dict(), "created_ms": 0}))
    assert reason(state.accept, early) == "bad-time"
    with pytest.raises(LocalProtocolError):
        FeedState("not a peer id")


def test_two_entries_at_one_seq_are_a_verifiable_fork() -> None:
    state = FeedState(A)
    for data in CHAIN[:3]:
        state.accept(data)
    other = chain(1, start=CHAIN[:1], tag=b"branch ")[1]  # another entry 2
    outcome = state.accept(other)
    assert isinstance(outcome, Fork)
    ev = outcome.evidence
    assert (ev.author, ev.seq, ev.entry_a, ev.entry_b) == (A, 2, CHAIN[1], other)
    assert verify_fork_evidence(ev) and state.forks == [ev]
    decoded = ForkEvidence.decode(ev.encode())
    assert decoded == ev and verify_fork_evidence(decoded)
    assert state.head_seq == 3  # first seen wins; the chain goes on
    assert isinstance(state.accept(CHAIN[3]), Accepted)


def test_an_entry_linking_elsewhere_is_a_verifiable_fork() -> None:
    # A signs entry 3 for one peer, another entry 3 and an entry 4 after it for another;
    # the first peer sees only that entry 4.
    state = FeedState(A)
    for data in CHAIN[:3]:
        state.accept(data)
    branch = chain(2, start=CHAIN[:2], tag=b"branch ")
    outcome = state.accept(branch[3])
    assert isinstance(outcome, Fork)
    ev = outcome.evidence
    assert (ev.seq, ev.entry_a, ev.entry_b) == (3, CHAIN[2], branch[3])
    assert verify_fork_evidence(ev)


def test_fork_evidence_that_proves_nothing() -> None:
    ev = ForkEvidence(A, 2, CHAIN[1], CHAIN[1])
    assert not verify_fork_evidence(ev)  # the same entry twice
    assert not verify_fork_evidence(dataclasses.replace(ev, entry_b=reencode(CHAIN[1])))
    assert not verify_fork_evidence(ForkEvidence(A, 2, CHAIN[1], CHAIN[2]))  # a true link
    assert not verify_fork_evidence(ForkEvidence(A, 2, CHAIN[1], CHAIN[3]))  # not adjacent
    assert not verify_fork_evidence(ForkEvidence(A, 3, CHAIN[1], CHAIN[2]))  # wrong seq
    b2 = chain(2, B_KEY)[1]
    assert not verify_fork_evidence(ForkEvidence(A, 2, CHAIN[1], b2))  # two authors
    assert not verify_fork_evidence(ForkEvidence(B, 2, CHAIN[1], b2))
    forged = forge(packb({**open_entry(CHAIN[1]).to_dict(), "payload": b"x"}), key=B_KEY)
    assert not verify_fork_evidence(ForkEvidence(A, 2, CHAIN[1], forged))  # not A's signature
    assert not verify_fork_evidence(ForkEvidence(A, 2, CHAIN[1], b"junk"))
    assert not verify_fork_evidence("evidence")  # type: ignore[arg-type]


def test_fork_evidence_decoding() -> None:
    good = ForkEvidence(A, 2, CHAIN[1], chain(1, start=CHAIN[:1], tag=b"x")[1]).encode()
    assert len(good) <= MAX_EVIDENCE_BYTES
    for i in range(len(good)):
        changed = good[:i] + bytes([good[i] ^ 0x41]) + good[i + 1:]
        try:
            ev = ForkEvidence.decode(changed)
        except RemoteProtocolError:
            continue
        verify_fork_evidence(ev)  # a bool, never an exception
    for n in range(len(good)):
        with pytest.raises(RemoteProtocolError):
            ForkEvidence.decode(good[:n])
    assert reason(ForkEvidence.decode, good + b"\x00") == "malformed"
    assert reason(ForkEvidence.decode, b"\x00" * (MAX_EVIDENCE_BYTES + 1)) == "oversized"
    d = msgpack.unpackb(good)
    assert reason(ForkEvidence.decode, packb({**d, "v": 2})) == "unknown-version"
    assert reason(ForkEvidence.decode, packb({**d, "type": "x"})) == "wrong-type"
    assert reason(ForkEvidence.decode, packb({**d, "seq": 0})) == "malformed"
    assert reason(ForkEvidence.decode, packb({**d, "author": "x"})) == "bad-peer-id"


def test_a_forking_author_fills_no_memory() -> None:
    state = FeedState(A)
    for data in CHAIN[:2]:
        state.accept(data)
    for i in range(MAX_FORKS_KEPT + 5):
        other = chain(1, start=CHAIN[:1], tag=b"b%d " % i)[1]
        assert isinstance(state.accept(other), Fork)
    assert len(state.forks) == MAX_FORKS_KEPT and state.head_seq == 2


# --- properties -----------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, len(CHAIN) - 1), max_size=25), st.randoms())
def test_honest_feed_in_any_order_never_forks(order: list[int], rng: random.Random) -> None:
    state = FeedState(A)
    for i in order:
        outcome = state.accept(CHAIN[i] if rng.random() < 0.7 else reencode(CHAIN[i]))
        assert not isinstance(outcome, Fork)
        if isinstance(outcome, Gap):
            assert outcome.got > outcome.have + 1
    for data in CHAIN:  # catch up on the gaps
        assert isinstance(state.accept(data), (Accepted, Duplicate))
    assert state.head_seq == len(CHAIN) and not state.forks


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 4), st.integers(1, 4), st.integers(0, 4))
def test_a_fork_is_always_caught_with_valid_evidence(k: int, extra_a: int, extra_b: int) -> None:
    """The author's branches share entries 1..k-1 and differ from entry k on; a peer holding
    branch A judges every entry of branch B: shared ones are duplicates, the ones past its
    head + 1 gaps, every other one a fork whose evidence verifies."""
    common = chain(k - 1)
    branch_a = chain(1 + extra_a, start=common, tag=b"a ")
    branch_b = chain(1 + extra_b, start=common, tag=b"b ")
    state = FeedState(A)
    for data in branch_a:
        assert isinstance(state.accept(data), Accepted)
    for data in branch_b:
        seq = open_entry(data).seq
        outcome = state.accept(data)
        if seq < k:
            assert isinstance(outcome, Duplicate)
        elif seq > len(branch_a) + 1:
            assert outcome == Gap(len(branch_a), seq)
        else:
            assert isinstance(outcome, Fork) and verify_fork_evidence(outcome.evidence)
            assert verify_fork_evidence(ForkEvidence.decode(outcome.evidence.encode()))


@settings(max_examples=40, deadline=None)
@given(st.binary(max_size=200))
def test_garbage_never_crashes(data: bytes) -> None:
    state = FeedState(A)
    for fn in (open_entry, entry_id, state.accept, ForkEvidence.decode):
        with contextlib.suppress(RemoteProtocolError):
            fn(data)
    with contextlib.suppress(RemoteProtocolError):
        verify_chain([data])
