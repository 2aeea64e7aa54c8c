"""Elastic jobs on the wire: the coordinator's prefetch hint to a worker that joined during
a round (protocol/jobs.py ``Prefetch``, specs/jobs.md "Elastic jobs")."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nacl.signing import SigningKey

from protocol.errors import LocalProtocolError, RemoteProtocolError
from protocol.jobs import (
    MAX_ASSIGN_BYTES,
    Job,
    Prefetch,
    TaskAssign,
    check_prefetch,
    decode_message,
    seal_job,
    spec_with_defaults,
)
from protocol.peerid import peer_id_from_public_key

C_KEY, W_KEY, X_KEY = (SigningKey(bytes([i + 40]) * 32) for i in range(3))
C, W, X = (peer_id_from_public_key(bytes(k.verify_key)) for k in (C_KEY, W_KEY, X_KEY))
BASE, DATA = bytes([1]) * 32, bytes([2]) * 32
SPEC = spec_with_defaults(name="elastic", base_model=BASE, dataset=DATA, rounds=3,
                          workers_per_round=2, inner_steps=10)
JOB = seal_job(C_KEY, Job(SPEC, C, 1_800_000_000_000))


def reason(fn, *args, **kw) -> str:  # type: ignore[no-untyped-def]
    with pytest.raises(RemoteProtocolError) as exc_info:
        fn(*args, **kw)
    return exc_info.value.reason


def test_a_hint_round_trips_and_is_told_apart_from_an_assignment() -> None:
    hint = Prefetch(JOB, W, BASE)
    data = hint.encode()
    assert len(data) <= MAX_ASSIGN_BYTES
    assert decode_message(data) == hint == Prefetch.decode(data)
    assert check_prefetch(hint, me=W, sender=C).spec == SPEC
    assert reason(TaskAssign.decode, data) == "wrong-type"  # never taken for a task


def test_a_hint_from_anyone_but_the_coordinator_or_for_another_worker_is_refused() -> None:
    hint = Prefetch(JOB, W, BASE)
    assert reason(check_prefetch, hint, me=X, sender=C) == "wrong-peer"
    assert reason(check_prefetch, hint, me=W, sender=X) == "wrong-peer"
    forged = bytearray(JOB)
    forged[-1] ^= 1  # the job's body changed under its signature
    d = msgpack.unpackb(hint.encode())
    d["job"] = bytes(forged)
    assert reason(Prefetch.decode, msgpack.packb(d)) in ("bad-signature", "malformed")
    with pytest.raises(LocalProtocolError):
        Prefetch(JOB, W, b"short")
    d = msgpack.unpackb(hint.encode())
    d["extra"] = 1
    assert reason(Prefetch.decode, msgpack.packb(d)) == "malformed"
    assert reason(Prefetch.decode, b"\x00" * (MAX_ASSIGN_BYTES + 1)) == "oversized"


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=300))
def test_any_bytes_either_decode_to_a_valid_hint_or_fail_with_a_reason(data: bytes) -> None:
    try:
        hint = Prefetch.decode(data)
    except RemoteProtocolError as exc:
        assert exc.reason
    else:
        assert hint.encode() == data


def test_worker_devices_give_one_slot_each_and_bad_ones_are_named() -> None:
    from node.config import ConfigError, parse_config

    assert parse_config({"worker": {"devices": ["cuda:0", "cuda:1"]}}).worker.slots == 2
    assert parse_config({"worker": {"max_tasks": 3}}).worker.slots == 3  # no devices
    for bad in (["gpu0"], ["cuda:"], [1], ["cpu"] * 65):
        with pytest.raises(ConfigError, match=r"worker\.devices"):
            parse_config({"worker": {"devices": bad}})


def test_a_node_has_one_slot_per_gpu_it_lists_or_one() -> None:
    """Simulated GPUs (a test EnvReport, as `testnet up --simulate-gpus` makes): the slot
    count is a function of the capability record only."""
    from protocol.scheduling import MAX_SLOTS, slots_of
    from tests.netutil import make_env

    assert slots_of(make_env(), "any") == 1
    assert slots_of(make_env(gpu_gib=(24, 24, 80)), "any") == 3
    assert slots_of(make_env(gpu_gib=(24, 24)), "cpu") == 1  # a CPU job: one task at once
    assert slots_of(make_env(gpu_gib=(8,) * 64), "cuda") == MAX_SLOTS == 64  # a record's most
