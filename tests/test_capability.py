"""protocol.capability: codec, signing and verification, DHT keys, classes and filters."""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import math
import re
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nacl.signing import SigningKey

from protocol.capability import (
    CAPABILITY_PROTOCOL_ID,
    CLASS_NAMES,
    DEFAULT_LIFETIME_MS,
    GB_BUCKETS,
    GIB,
    MAX_CAPABILITY_BYTES,
    MAX_CLOCK_SKEW_MS,
    MAX_LIFETIME_MS,
    MAX_SYNC_RECORDS,
    MAX_SYNC_REQUEST_BYTES,
    NOMINAL_GB_SIZES,
    CapabilityRecord,
    EnvReport,
    GpuInfo,
    SyncRequest,
    capability_classes,
    capability_dht_key,
    capability_frame_length,
    class_provider_key,
    decode_sync_request,
    encode_capability_frame,
    matches,
    new_capability_record,
    next_seq,
    nominal_gb,
    query_class,
    select_best,
    sign_capability,
    sort_key,
    sync_answer,
    validate_dht_entry,
    verify_capability,
)
from protocol.envelope import DOMAIN_CAPABILITY, signing_message
from protocol.errors import LocalProtocolError, RemoteProtocolError
from protocol.peerid import peer_id_from_public_key

KEYS = [SigningKey(bytes([i + 1]) * 32) for i in range(4)]
PEERS = [peer_id_from_public_key(bytes(k.verify_key)) for k in KEYS]
KEY, PEER = KEYS[0], PEERS[0]
NOW = 1_800_000_000_000  # ms; any fixed instant
MIB = 1 << 20


def gpu(total_mib: int, name: str = "NVIDIA Test") -> GpuInfo:
    return GpuInfo(name, total_mib * MIB, total_mib * MIB // 2, "8.9")


def env(*gpus: GpuInfo, tflops: float = 1.5) -> EnvReport:
    return EnvReport(
        os="Linux-6.8.0-x86_64",
        python="3.11.9",
        torch="2.4.1" if gpus else "",
        cuda="12.4" if gpus else "",
        gpus=tuple(gpus),
        cpu_cores=16,
        ram_bytes=64 * GIB,
        disk_free_bytes=500 * GIB,
        tflops=tflops,
        tflops_dtype="bf16" if gpus else "fp32",
        tflops_device="cuda" if gpus else "cpu",
    )


def record(
    peer: str = PEER, *, seq: int = 1, created: int = NOW, env_: EnvReport | None = None
) -> CapabilityRecord:
    return CapabilityRecord(
        peer_id=peer,
        addrs=("/ip4/10.0.0.1/tcp/4001", "/ip6/::1/tcp/4001"),
        software="iollm/0.1.0",
        seq=seq,
        created_ms=created,
        expires_ms=created + DEFAULT_LIFETIME_MS,
        env=env_ if env_ is not None else env(gpu(24563, "NVIDIA GeForce RTX 4090")),
    )


def signed(rec: CapabilityRecord | None = None, key: SigningKey = KEY) -> bytes:
    return sign_capability(key, rec if rec is not None else record())


def forge(body: bytes, key: SigningKey = KEY, domain: str = DOMAIN_CAPABILITY) -> bytes:
    """A correctly signed envelope around any body bytes, under any domain."""
    sig = key.sign(signing_message(domain, body)).signature
    data: bytes = msgpack.packb([1, domain, bytes(key.verify_key), sig, body], use_bin_type=True)
    return data


def reason_of(data: bytes, now: int = NOW, **kw: Any) -> str:
    with pytest.raises(RemoteProtocolError) as exc_info:
        verify_capability(data, now, **kw)
    return exc_info.value.reason


# --- strategies -------------------------------------------------------------------------------

texts = st.text(st.characters(blacklist_categories=("Cc", "Cs")), max_size=40)
tags = st.text(st.characters(blacklist_categories=("Cc", "Cs")), max_size=8)
byte_counts = st.integers(0, 2**63 - 1)
gpus_st = st.builds(GpuInfo, texts, byte_counts, byte_counts, tags)
envs = st.builds(
    EnvReport,
    os=texts,
    python=texts,
    torch=texts,
    cuda=texts,
    gpus=st.lists(gpus_st, max_size=4).map(tuple),
    cpu_cores=st.integers(0, 1 << 20),
    ram_bytes=byte_counts,
    disk_free_bytes=byte_counts,
    tflops=st.floats(0, 1e6, allow_nan=False) | st.integers(0, 10**6),
    tflops_dtype=tags,
    tflops_device=tags,
)
addrs = st.lists(
    st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=60).map(
        lambda s: "/" + s
    ),
    max_size=4,
).map(tuple)


@st.composite
def keyed_records(draw: st.DrawFn) -> tuple[SigningKey, CapabilityRecord]:
    i = draw(st.integers(0, len(KEYS) - 1))
    created = draw(st.integers(0, 2**62))
    rec = CapabilityRecord(
        peer_id=PEERS[i],
        addrs=draw(addrs),
        software=draw(
            st.text(st.characters(blacklist_categories=("Cc", "Cs")), min_size=1, max_size=64)
        ),
        seq=draw(st.integers(0, 2**63 - 1)),
        created_ms=created,
        expires_ms=created + draw(st.integers(1, MAX_LIFETIME_MS)),
        env=draw(envs),
        name=draw(st.text(st.characters(blacklist_categories=("Cc", "Cs", "Zl", "Zp", "Zs",
                                                              "Cf", "Co", "Cn")),
                          max_size=64)),
    )
    return KEYS[i], rec


msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=12)
    | st.binary(max_size=12),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4)
    ),
    max_leaves=12,
)


# --- round trips ---------------------------------------------------------------------------------


@settings(max_examples=150)
@given(envs)
def test_env_round_trip_through_msgpack(e: EnvReport) -> None:
    wire = msgpack.packb(e.to_dict(), use_bin_type=True)
    back = EnvReport.from_dict(msgpack.unpackb(wire, raw=False))
    assert back == e
    assert isinstance(back.tflops, float)
    assert all(GpuInfo.from_dict(g.to_dict()) == g for g in e.gpus)


@settings(max_examples=100, suppress_health_check=[HealthCheck.too_slow])
@given(keyed_records())
def test_record_sign_verify_round_trip(kr: tuple[SigningKey, CapabilityRecord]) -> None:
    key, rec = kr
    data = sign_capability(key, rec)
    assert len(data) <= MAX_CAPABILITY_BYTES
    assert verify_capability(data, rec.created_ms, expected_peer_id=rec.peer_id) == rec
    assert CapabilityRecord.decode_body(rec.encode_body()) == rec
    key_str = capability_dht_key(rec.peer_id)
    assert validate_dht_entry(key_str, data, rec.expires_ms - 1) == rec


def test_a_name_is_carried_and_old_records_still_decode() -> None:
    named = dataclasses.replace(record(), name="gpu-box 3 (Zürich)")
    body = msgpack.unpackb(named.encode_body(), raw=False)
    assert body["name"] == "gpu-box 3 (Zürich)"
    assert verify_capability(signed(named), NOW) == named
    # A record without a name (every record before the field) encodes without the key,
    # byte for byte as before, and decodes with name "".
    plain = record()
    assert "name" not in msgpack.unpackb(plain.encode_body(), raw=False)
    assert verify_capability(signed(plain), NOW).name == ""


def test_body_layout() -> None:
    body = msgpack.unpackb(record().encode_body(), raw=False)
    assert body["v"] == 1
    assert set(body) == {
        "v",
        "peer_id",
        "addrs",
        "software",
        "seq",
        "created_ms",
        "expires_ms",
        "env",
    }
    assert body["env"]["gpus"][0] == {
        "name": "NVIDIA GeForce RTX 4090",
        "total_memory_bytes": 24563 * MIB,
        "free_memory_bytes": 24563 * MIB // 2,
        "compute_capability": "8.9",
    }


def test_new_capability_record_and_next_seq() -> None:
    rec = new_capability_record(
        peer_id=PEER, addrs=(), software="iollm/0.1.0", env=env(), seq=7, now_ms=NOW
    )
    assert (rec.created_ms, rec.expires_ms, rec.seq) == (NOW, NOW + DEFAULT_LIFETIME_MS, 7)
    assert next_seq(None, NOW) == NOW
    assert next_seq(NOW + 5, NOW) == NOW + 6  # stored seq ahead of the clock: keep counting
    assert next_seq(3, NOW) == NOW  # lost or old state: the clock still outbids it


# --- field validation ---------------------------------------------------------------------------


def _env_dict() -> dict[str, Any]:
    return env(gpu(24563)).to_dict()


ENV_MUTATIONS: list[tuple[str, Any]] = [
    ("os", 5),
    ("os", "x" * 257),
    ("os", "evil\x1b[2Jterminal"),
    ("python", None),
    ("torch", b"2.4"),
    ("gpus", "none"),
    ("gpus", [_env_dict()["gpus"][0]] * 65),
    ("gpus", [{"name": "x"}]),
    ("gpus", [5]),
    ("cpu_cores", -1),
    ("cpu_cores", True),
    ("cpu_cores", 2.0),
    ("cpu_cores", (1 << 20) + 1),
    ("ram_bytes", -1),
    ("ram_bytes", 2**63),
    ("disk_free_bytes", "lots"),
    ("tflops", math.nan),
    ("tflops", math.inf),
    ("tflops", -math.inf),
    ("tflops", -0.5),
    ("tflops", 1e7),
    ("tflops", 10**400),
    ("tflops", "fast"),
    ("tflops", False),
    ("tflops_dtype", "b" * 33),
    ("tflops_device", None),
]


@pytest.mark.parametrize(("field", "value"), ENV_MUTATIONS)
def test_env_from_dict_rejects(field: str, value: Any) -> None:
    d = _env_dict()
    d[field] = value
    with pytest.raises(RemoteProtocolError) as exc_info:
        EnvReport.from_dict(d)
    assert exc_info.value.reason == "malformed"


GPU_MUTATIONS: list[tuple[str, Any]] = [
    ("name", 1),
    ("name", "n" * 257),
    ("total_memory_bytes", -1),
    ("total_memory_bytes", 1.5),
    ("free_memory_bytes", -(2**63)),
    ("compute_capability", "9" * 33),
    ("compute_capability", 8.9),
]


@pytest.mark.parametrize(("field", "value"), GPU_MUTATIONS)
def test_gpu_from_dict_rejects(field: str, value: Any) -> None:
    d = gpu(1000).to_dict()
    d[field] = value
    with pytest.raises(RemoteProtocolError):
        GpuInfo.from_dict(d)
    with pytest.raises(RemoteProtocolError):
        EnvReport.from_dict({**_env_dict(), "gpus": [d]})


@pytest.mark.parametrize("bad", [None, [], "env", {"extra": 1}])
def test_env_from_dict_rejects_shapes(bad: Any) -> None:
    with pytest.raises(RemoteProtocolError):
        EnvReport.from_dict(bad)


def test_env_from_dict_rejects_missing_and_unknown_fields() -> None:
    d = _env_dict()
    del d["os"]
    with pytest.raises(RemoteProtocolError):
        EnvReport.from_dict(d)
    with pytest.raises(RemoteProtocolError):
        EnvReport.from_dict({**_env_dict(), "new_field": 1})


def test_local_construction_errors_are_local() -> None:
    with pytest.raises(LocalProtocolError):
        env(gpu(100), tflops=math.nan)
    with pytest.raises(LocalProtocolError):
        GpuInfo("x", -1, 0, "")
    with pytest.raises(LocalProtocolError):
        dataclasses.replace(env(), gpus=[gpu(100)])  # type: ignore[arg-type]
    with pytest.raises(LocalProtocolError):
        dataclasses.replace(env(), gpus=tuple(gpu(1) for _ in range(65)))


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"expires_ms": NOW}, "bad-lifetime"),
        ({"expires_ms": NOW - 1}, "bad-lifetime"),
        ({"expires_ms": NOW + MAX_LIFETIME_MS + 1}, "bad-lifetime"),
        ({"peer_id": "QmNotAnEd25519Id"}, "bad-peer-id"),
        ({"addrs": ["/ip4/1.2.3.4/tcp/1"]}, "malformed"),  # list, not tuple
        ({"addrs": tuple(f"/ip4/10.0.0.{i}/tcp/1" for i in range(17))}, "malformed"),
        ({"addrs": ("/dns4/" + "a" * 251,)}, "malformed"),
        ({"addrs": ("ip4/1.2.3.4/tcp/1",)}, "malformed"),
        ({"addrs": ("/ip4/1.2.3.4/tcp/1 ",)}, "malformed"),
        ({"addrs": ("/ip4/1.2.3.4/tcp/1\n",)}, "malformed"),
        ({"addrs": ("/dns4/exämple.com/tcp/1",)}, "malformed"),
        ({"software": ""}, "malformed"),
        ({"software": "s" * 65}, "malformed"),
        ({"seq": -1}, "malformed"),
        ({"seq": 2**63}, "malformed"),
        ({"created_ms": -5, "expires_ms": 5}, "malformed"),
        ({"env": {"not": "an env"}}, "malformed"),
        ({"name": "n" * 65}, "malformed"),
        ({"name": "\x1b[31mred"}, "malformed"),  # no terminal escapes beside peer ids
        ({"name": "a\u2028b"}, "malformed"),
        ({"name": " padded"}, "malformed"),
        ({"name": 7}, "malformed"),
    ],
)
def test_record_validation(change: dict[str, Any], reason: str) -> None:
    with pytest.raises(LocalProtocolError) as exc_info:
        dataclasses.replace(record(), **change)
    assert str(exc_info.value).startswith(reason)
    # The same record arriving from a peer is rejected with the same reason.
    d = record().to_dict()
    d.update({k: list(v) if isinstance(v, tuple) else v for k, v in change.items()})
    if "env" in change:
        d["env"] = change["env"]
    if change.get("addrs") == ["/ip4/1.2.3.4/tcp/1"]:
        return  # a list is the wire form of addrs: valid on the wire
    assert reason_of(forge(msgpack.packb(d, use_bin_type=True))) == reason


def test_lifetime_bounds_are_inclusive() -> None:
    rec = dataclasses.replace(record(), expires_ms=NOW + MAX_LIFETIME_MS)
    assert verify_capability(signed(rec), NOW) == rec
    rec = dataclasses.replace(record(), expires_ms=NOW + 1)
    assert verify_capability(signed(rec), NOW) == rec


# --- signing and verification ------------------------------------------------------------------


def test_sign_refuses_someone_elses_record() -> None:
    with pytest.raises(LocalProtocolError):
        sign_capability(KEYS[1], record(PEER))


def test_sign_refuses_oversized_record() -> None:
    big = env(*(gpu(1000, "G" * 256) for _ in range(40)))
    with pytest.raises(LocalProtocolError):
        sign_capability(KEY, record(env_=big))


def test_forged_signer_claiming_another_peer() -> None:
    # Validly signed by KEYS[1], but the body claims to be PEER.
    data = forge(record(PEER).encode_body(), key=KEYS[1])
    assert reason_of(data) == "signer-mismatch"


def test_signature_swapped_in_from_another_key() -> None:
    good = msgpack.unpackb(signed(), raw=False)
    good[2] = bytes(KEYS[1].verify_key)  # claim a different signer, keep the signature
    assert reason_of(msgpack.packb(good, use_bin_type=True)) == "bad-signature"


def test_expiry_boundaries() -> None:
    rec = record()
    data = signed(rec)
    assert verify_capability(data, rec.expires_ms - 1) == rec
    assert reason_of(data, rec.expires_ms) == "expired"
    assert reason_of(data, rec.expires_ms + 10**9) == "expired"


def test_future_boundaries() -> None:
    rec = record()
    data = signed(rec)
    assert verify_capability(data, NOW - MAX_CLOCK_SKEW_MS) == rec
    assert reason_of(data, NOW - MAX_CLOCK_SKEW_MS - 1) == "future"


def test_oversized() -> None:
    assert reason_of(b"\x00" * (MAX_CAPABILITY_BYTES + 1)) == "oversized"
    # A correctly signed envelope just over the cap is refused before decoding its body.
    data = forge(b"\xc4" + b"x" * MAX_CAPABILITY_BYTES)
    assert len(data) > MAX_CAPABILITY_BYTES
    assert reason_of(data) == "oversized"


def test_wrong_domain() -> None:
    assert reason_of(forge(record().encode_body(), domain="iollm/other/v1")) == "wrong-domain"


def test_unknown_body_versions() -> None:
    for v in (0, 2, 255, "1", None, True, 1.0, -1):
        d = record().to_dict()
        d["v"] = v
        assert reason_of(forge(msgpack.packb(d, use_bin_type=True))) == "unknown-version"
    d = record().to_dict()
    del d["v"]
    assert reason_of(forge(msgpack.packb(d, use_bin_type=True))) == "malformed"


def test_unknown_envelope_version() -> None:
    fields = msgpack.unpackb(signed(), raw=False)
    fields[0] = 2
    assert reason_of(msgpack.packb(fields, use_bin_type=True)) == "unknown-version"


def test_wrong_peer() -> None:
    data = signed()
    assert verify_capability(data, NOW, expected_peer_id=PEER).peer_id == PEER
    assert reason_of(data, expected_peer_id=PEERS[1]) == "wrong-peer"


def test_unknown_fields_rejected() -> None:
    d = record().to_dict()
    d["bonus"] = 1
    assert reason_of(forge(msgpack.packb(d, use_bin_type=True))) == "malformed"


def test_every_corruption_and_truncation_raises_remote_error() -> None:
    data = signed()
    for i in range(len(data)):
        for flip in (0x01, 0x80, 0xFF):
            bad = data[:i] + bytes([data[i] ^ flip]) + data[i + 1 :]
            with pytest.raises(RemoteProtocolError):
                verify_capability(bad, NOW)
    for n in range(len(data)):
        with pytest.raises(RemoteProtocolError):
            verify_capability(data[:n], NOW)
    with pytest.raises(RemoteProtocolError):
        verify_capability(data + b"\x00", NOW)


@settings(max_examples=300)
@given(st.binary(max_size=400))
def test_random_bytes_only_raise_remote_errors(data: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        verify_capability(data, NOW)


@settings(max_examples=200)
@given(msgpack_values)
def test_any_signed_body_only_raises_remote_errors(value: Any) -> None:
    data = forge(msgpack.packb(value, use_bin_type=True))
    with pytest.raises(RemoteProtocolError):
        verify_capability(data, NOW)


def _paths(d: dict[str, Any], prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = []
    for k, v in d.items():
        out.append((*prefix, k))
        if isinstance(v, dict):
            out += _paths(v, (*prefix, k))
        elif isinstance(v, list):
            for i, item in enumerate(v):
                out.append((*prefix, k, i))
                if isinstance(item, dict):
                    out += _paths(item, (*prefix, k, i))
    return out


BODY = record(env_=env(gpu(24563), gpu(11178))).to_dict()
BODY_PATHS = _paths(BODY)


@settings(max_examples=200)
@given(st.sampled_from(BODY_PATHS), msgpack_values, st.booleans())
def test_mutated_bodies_verify_or_raise_remote_errors(
    path: tuple[Any, ...], value: Any, delete: bool
) -> None:
    d = msgpack.unpackb(msgpack.packb(BODY), raw=False)  # deep copy
    parent = d
    for step in path[:-1]:
        parent = parent[step]
    if delete:
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    data = forge(msgpack.packb(d, use_bin_type=True))
    try:
        rec = verify_capability(data, NOW)
    except RemoteProtocolError:
        return
    assert rec.to_dict() == msgpack.unpackb(msgpack.packb(d), raw=False)


def test_now_must_be_int() -> None:
    with pytest.raises(LocalProtocolError):
        verify_capability(signed(), float(NOW))  # type: ignore[arg-type]


# --- the direct stream frame --------------------------------------------------------------------


def test_frame() -> None:
    assert CAPABILITY_PROTOCOL_ID == "/iollm/capability/1.0.0"
    data = signed()
    frame = encode_capability_frame(data)
    assert frame[:4] == len(data).to_bytes(4, "big") and frame[4:] == data
    assert capability_frame_length(frame[:4]) == len(data)
    assert capability_frame_length((MAX_CAPABILITY_BYTES).to_bytes(4, "big")) == 8192


@pytest.mark.parametrize(
    ("header", "reason"),
    [
        (b"\x00\x00\x00\x00", "malformed"),
        (b"\x00\x00\x20\x01", "oversized"),
        (b"\xff\xff\xff\xff", "oversized"),
        (b"\x00\x00\x01", "malformed"),
    ],
)
def test_bad_frame_headers(header: bytes, reason: str) -> None:
    with pytest.raises(RemoteProtocolError) as exc_info:
        capability_frame_length(header)
    assert exc_info.value.reason == reason


def test_frame_refuses_bad_payloads() -> None:
    with pytest.raises(LocalProtocolError):
        encode_capability_frame(b"")
    with pytest.raises(LocalProtocolError):
        encode_capability_frame(b"x" * (MAX_CAPABILITY_BYTES + 1))


# --- DHT keys, the validator, select -----------------------------------------------------------


def test_dht_key() -> None:
    key = capability_dht_key(PEER)
    expected = hashlib.sha256(PEER.encode()).digest()[:16].hex()
    assert key == "/iollm-cap/" + expected
    assert len(key) == 43 and len(key.encode()) <= 50
    assert capability_dht_key(PEERS[1]) != key


def test_validate_dht_entry() -> None:
    data = signed()
    assert validate_dht_entry(capability_dht_key(PEER), data, NOW).peer_id == PEER
    for key in (capability_dht_key(PEERS[1]), "/iollm-cap/" + "0" * 32, "", "/pk/x"):
        with pytest.raises(RemoteProtocolError) as exc_info:
            validate_dht_entry(key, data, NOW)
        assert exc_info.value.reason == "key-mismatch"
    with pytest.raises(RemoteProtocolError) as exc_info:
        validate_dht_entry(capability_dht_key(PEER), data, NOW + DEFAULT_LIFETIME_MS)
    assert exc_info.value.reason == "expired"


def test_select_best() -> None:
    s1, s5, s3 = (signed(record(seq=s)) for s in (1, 5, 3))
    assert select_best([s1, s5, s3], NOW) == 1
    # Same seq: the later created_ms wins; an exact tie keeps the first.
    later = signed(record(seq=5, created=NOW + 1))
    assert select_best([s5, later], NOW + 1) == 1
    assert select_best([s5, s5], NOW) == 0
    # Invalid and expired values lose whatever their seq.
    expired = signed(record(seq=99, created=NOW - DEFAULT_LIFETIME_MS))
    corrupt = s5[:-1] + bytes([s5[-1] ^ 1])
    future = signed(record(seq=98, created=NOW + MAX_CLOCK_SKEW_MS + 1))
    assert select_best([expired, corrupt, future, s1, b"junk", s3], NOW) == 5
    assert select_best([expired, corrupt, b""], NOW) == 0
    assert select_best([], NOW) == 0


# --- nominal sizes, classes, queries, filters ----------------------------------------------------

# (card, total memory in MiB as torch reports it, nominal GB)
REAL_CARDS = [
    ("RTX 2060", 5926, 6),
    ("RTX 3070", 7974, 8),
    ("RTX 3080", 10009, 10),
    ("RTX 2080 Ti", 11019, 11),
    ("GTX 1080 Ti", 11178, 11),
    ("RTX 3060", 12045, 12),
    ("T4", 15102, 16),
    ("V100-16GB", 16160, 16),
    ("A10G", 22731, 24),
    ("L4", 22478, 24),
    ("RTX 3090", 24268, 24),
    ("RTX 4090", 24563, 24),
    ("RTX 4090 (exact 24 GiB)", 24576, 24),
    ("V100-32GB", 32510, 32),
    ("A100-40GB", 40537, 40),  # 42_505_273_344 bytes
    ("A6000", 48676, 48),
    ("A100-80GB", 81050, 80),
    ("H100 SXM", 81559, 80),
    ("H100 NVL", 95830, 94),
    ("H200", 143771, 141),
    ("B200", 183359, 180),
    ("MI300X", 196592, 192),
    ("A100 MIG 1g.5gb", 4864, 5),
    ("H100 MIG 1g.10gb", 9984, 10),
    ("odd 13 GiB vGPU", 13 * 1024, 13),
    ("beyond the table", 400 * 1024, 400),
]


@pytest.mark.parametrize(("card", "mib", "expected"), REAL_CARDS)
def test_nominal_gb_of_real_cards(card: str, mib: int, expected: int) -> None:
    assert nominal_gb(mib * MIB) == expected, card


def test_nominal_gb_edges() -> None:
    assert nominal_gb(0) == 0
    previous = 0
    for size in NOMINAL_GB_SIZES:
        top = size * GIB
        assert nominal_gb(top) == size  # a card reporting its full size
        assert nominal_gb(top + 1) >= size  # one byte more never rounds down
        assert nominal_gb(previous * GIB + 1) in (size, previous)
        low = -(-top * 17 // 20)  # ceil(0.85 * size GiB)
        if low > previous * GIB:  # the 85 % floor only bites where sizes are far apart
            assert nominal_gb(low) == size
            assert nominal_gb(low - 1) == (low - 1) // GIB
        previous = size


def test_nominal_gb_is_monotonic() -> None:
    points = sorted({s * GIB + d for s in NOMINAL_GB_SIZES for d in (-GIB // 3, -1, 0, 1)})
    points += [int(x * GIB / 8) for x in range(0, 8 * 300)]
    points.sort()
    values = [nominal_gb(p) for p in points]
    assert values == sorted(values)


def _grid_records() -> list[CapabilityRecord]:
    sizes_mib = {m for _, m, _ in REAL_CARDS} | {g * 1024 for g in range(1, 300, 3)}
    sizes_mib |= {s * 1024 for s in NOMINAL_GB_SIZES}  # a node at every sold size
    recs = [record(PEERS[1], env_=env())]  # the CPU-only node
    recs += [
        record(env_=env(gpu(m), gpu(min(m, 2048)), tflops=float(i % 7)))
        for i, m in enumerate(sorted(sizes_mib))
    ]
    return recs


GRID = _grid_records()
REQUESTS = [None, 0, 0.5, 1, 2, 3.9, 4, 5, 6, 8, 10, 11, 12, 13, 16, 20, 23.5, 24, 30, 40, 47,
            48, 64, 80, 94, 96, 100, 141, 192, 200, 288, 1000]  # fmt: skip


def test_classes_of_single_nodes() -> None:
    assert capability_classes(env()) == ["all", "cpu"]
    assert capability_classes(env(gpu(24563))) == [
        "all", "gpu", "gpu-mem-4", "gpu-mem-8", "gpu-mem-12", "gpu-mem-16", "gpu-mem-24",
    ]  # fmt: skip
    l4 = capability_classes(env(gpu(22478)))
    assert "gpu-mem-24" in l4 and "gpu-mem-32" not in l4
    ti = capability_classes(env(gpu(11178)))
    assert "gpu-mem-8" in ti and "gpu-mem-12" not in ti
    # The largest single GPU counts, not the sum: 8 x 16 GB is not a 128 GB node.
    eight = capability_classes(env(*(gpu(16160) for _ in range(8))))
    assert "gpu-mem-16" in eight and "gpu-mem-24" not in eight
    h200 = capability_classes(env(gpu(143771)))
    assert h200[-1] == "gpu-mem-128"
    assert all(c in CLASS_NAMES for c in h200 + l4 + eight)


@pytest.mark.parametrize("req", REQUESTS)
def test_query_class_is_the_tightest_superset(req: float | None) -> None:
    members = {
        c: {i for i, r in enumerate(GRID) if c in capability_classes(r.env)} for c in CLASS_NAMES
    }
    wanted = {i for i, r in enumerate(GRID) if matches(r, min_vram_gb=req, min_tflops=None)}
    chosen = query_class(req)
    assert wanted <= members[chosen]
    if req in GB_BUCKETS or not req:
        assert wanted == members[chosen]  # a bucket request needs no filtering at all
    if req in NOMINAL_GB_SIZES:
        # The grid holds a node of exactly this size, so every class that skips nodes the
        # chosen one holds would lose that node: no superset is smaller.
        supersets = [c for c in CLASS_NAMES if wanted <= members[c]]
        assert len(members[chosen]) == min(len(members[c]) for c in supersets)


def test_query_class_values() -> None:
    assert query_class(None) == "all"
    assert query_class(0) == "all"
    assert query_class(0.5) == "gpu"
    assert query_class(3.99) == "gpu"
    assert query_class(4) == "gpu-mem-4"
    assert query_class(30) == "gpu-mem-24"
    assert query_class(94) == "gpu-mem-80"
    assert query_class(10_000) == "gpu-mem-192"


def test_matches_exact_sets() -> None:
    cards = {name: record(env_=env(gpu(mib), tflops=float(gb))) for name, mib, gb in REAL_CARDS}

    def picked(**kw: float | None) -> set[str]:
        return {n for n, r in cards.items() if matches(r, **kw)}

    assert picked(min_vram_gb=24, min_tflops=None) == {
        "A10G", "L4", "RTX 3090", "RTX 4090", "RTX 4090 (exact 24 GiB)", "V100-32GB",
        "A100-40GB", "A6000", "A100-80GB", "H100 SXM", "H100 NVL", "H200", "B200", "MI300X",
        "beyond the table",
    }  # fmt: skip
    assert picked(min_vram_gb=12, min_tflops=None) - picked(min_vram_gb=16, min_tflops=None) == {
        "RTX 3060", "odd 13 GiB vGPU",
    }  # fmt: skip
    assert picked(min_vram_gb=96, min_tflops=None) == {"H200", "B200", "MI300X", "beyond the table"}
    # tflops filters exactly, combined with VRAM by AND.
    assert picked(min_vram_gb=80, min_tflops=141) == {"H200", "B200", "MI300X", "beyond the table"}
    assert picked(min_vram_gb=None, min_tflops=400) == {"beyond the table"}
    assert len(picked(min_vram_gb=None, min_tflops=None)) == len(cards)
    cpu = record(env_=env(tflops=0.3))
    assert matches(cpu, min_vram_gb=0, min_tflops=None)
    assert not matches(cpu, min_vram_gb=0.1, min_tflops=None)
    assert matches(cpu, min_vram_gb=None, min_tflops=0.3)
    assert not matches(cpu, min_vram_gb=None, min_tflops=0.31)


@pytest.mark.parametrize("bad", [-1, math.nan, math.inf, "24", True])
def test_bad_filters_are_local_errors(bad: Any) -> None:
    with pytest.raises(LocalProtocolError):
        query_class(bad)
    with pytest.raises(LocalProtocolError):
        matches(record(), min_vram_gb=bad, min_tflops=None)
    with pytest.raises(LocalProtocolError):
        matches(record(), min_vram_gb=None, min_tflops=bad)


def test_class_provider_keys() -> None:
    keys = {name: class_provider_key(name) for name in CLASS_NAMES}
    assert len(set(keys.values())) == len(CLASS_NAMES)
    expected = "1220" + hashlib.sha256(b"iollm/capability-class/v1/gpu-mem-24").hexdigest()
    assert keys["gpu-mem-24"] == expected
    assert all(len(k) == 68 and k.startswith("1220") for k in keys.values())
    with pytest.raises(LocalProtocolError):
        class_provider_key("gpu-mem-23")


def test_sort_key_most_capable_first() -> None:
    a = record(PEERS[0], env_=env(gpu(81559), tflops=400.0))
    b = record(PEERS[1], env_=env(gpu(81559), tflops=300.0))
    c = record(PEERS[2], env_=env(gpu(81559), tflops=300.0))
    d = record(PEERS[3], env_=env(gpu(24563), gpu(24563), tflops=900.0))
    cpu = record(PEERS[0], env_=env(tflops=2.0))
    ordered = sorted([cpu, d, c, b, a], key=sort_key)
    tie = sorted([b, c], key=lambda r: r.peer_id)
    assert ordered == [a, *tie, d, cpu]


# --- record sync requests -------------------------------------------------------------------


@given(st.integers(0, 2**63 - 1), st.integers(1, MAX_SYNC_RECORDS))
def test_sync_request_round_trips_within_cap(since_ms: int, limit: int) -> None:
    data = SyncRequest(since_ms, limit).encode()
    assert len(data) <= MAX_SYNC_REQUEST_BYTES
    assert decode_sync_request(data) == SyncRequest(since_ms, limit)


@settings(max_examples=300)
@given(st.binary(max_size=100))
def test_sync_request_garbage_raises_only_remote_error(data: bytes) -> None:
    _decode_or_refuse(data)


@settings(max_examples=200)
@given(msgpack_values)
def test_sync_request_any_msgpack_value_raises_only_remote_error(value: Any) -> None:
    _decode_or_refuse(msgpack.packb(value, use_bin_type=True))


def _decode_or_refuse(data: bytes) -> None:
    """Either a RemoteProtocolError or a request whose every field is in range."""
    try:
        request = decode_sync_request(data)
    except RemoteProtocolError:
        return
    assert request.since_ms >= 0 and 1 <= request.limit <= MAX_SYNC_RECORDS


@pytest.mark.parametrize(("request_map", "reason"), [
    ({"v": 2, "since_ms": 0, "limit": 1}, "unknown-version"),
    ({"v": True, "since_ms": 0, "limit": 1}, "unknown-version"),
    ({"v": 1, "since_ms": -1, "limit": 1}, "malformed"),
    ({"v": 1, "since_ms": 0, "limit": 0}, "malformed"),
    ({"v": 1, "since_ms": 0, "limit": MAX_SYNC_RECORDS + 1}, "malformed"),
    ({"v": 1, "since_ms": 0, "limit": True}, "malformed"),
    ({"v": 1, "since_ms": 0}, "malformed"),
    ({"v": 1, "since_ms": 0, "limit": 1, "more": 1}, "malformed"),
    ({"v": 1, "since_ms": 0, "limit": 1, "pad": "x" * 64}, "oversized"),
])
def test_sync_request_refused(request_map: dict[str, Any], reason: str) -> None:
    with pytest.raises(RemoteProtocolError) as err:
        decode_sync_request(msgpack.packb(request_map))
    assert err.value.reason == reason


def test_sync_request_encode_refuses_our_own_bad_values() -> None:
    for bad in (SyncRequest(-1, 1), SyncRequest(0, 0), SyncRequest(0, MAX_SYNC_RECORDS + 1)):
        with pytest.raises(LocalProtocolError):
            bad.encode()


def test_sync_answer_is_fresh_unexpired_newest_first_and_limited() -> None:
    now = 10_000_000
    old = dataclasses.replace(record(PEERS[0]), created_ms=now - 5000, expires_ms=now + 1)
    new = dataclasses.replace(record(PEERS[1]), created_ms=now - 10, expires_ms=now + 1)
    newer = dataclasses.replace(record(PEERS[2]), created_ms=now - 1, expires_ms=now + 1)
    expired = dataclasses.replace(record(PEERS[3]), created_ms=now - 1, expires_ms=now)
    records = [old, new, expired, newer]
    assert sync_answer(records, SyncRequest(0, 100), now) == [newer, new, old]
    assert sync_answer(records, SyncRequest(now - 10, 100), now) == [newer, new]
    assert sync_answer(records, SyncRequest(0, 1), now) == [newer]


# --- the spec agrees with the code --------------------------------------------------------------

SPEC = Path(__file__).resolve().parents[1] / "specs" / "capability.md"


def test_spec_constants_table_matches_code() -> None:
    import protocol.capability as cap

    text = SPEC.read_text(encoding="utf-8")
    section = text.split("## Constants", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `([A-Z_]+)` +\| \w+ +\| `([^`]+)` +\|", section, re.MULTILINE)
    assert len(rows) >= 20
    for name, value in rows:
        assert getattr(cap, name) == ast.literal_eval(value), name


def test_spec_test_vectors() -> None:
    text = SPEC.read_text(encoding="utf-8")
    values = re.findall(r"^\| value key of `(\w+)` +\| `([^`]+)`", text, re.MULTILINE)
    classes = re.findall(r"^\| class key of `([\w-]+)` +\| `([0-9a-f]+)`", text, re.MULTILINE)
    assert len(values) == 2 and len(classes) == 4
    assert all(capability_dht_key(p) == k for p, k in values)
    assert all(class_provider_key(n) == k for n, k in classes)


def _spec_section(text: str, heading: str) -> str:
    return text.split(f"\n{heading}\n", 1)[1].split("\n#", 1)[0]


def test_spec_discovery_configuration_matches_code() -> None:
    import tomllib

    from node.config import DEFAULT_CONFIG_TOML, DiscoverySection

    section = _spec_section(SPEC.read_text(encoding="utf-8"), "### Configuration")
    rows = dict(re.findall(r"^\| `(\w+)` +\| (?:float|int|list) +\| `([^`]+)` +\|", section,
                           re.MULTILINE))
    defaults = DiscoverySection()
    documented = tomllib.loads(DEFAULT_CONFIG_TOML)["discovery"]
    assert set(rows) == {f.name for f in dataclasses.fields(DiscoverySection)} == set(documented)
    for name, value in rows.items():
        assert getattr(defaults, name) == documented[name] == ast.literal_eval(value), name


def test_spec_node_constants_match_code() -> None:
    import importlib

    section = _spec_section(SPEC.read_text(encoding="utf-8"), "### Node constants")
    rows = re.findall(r"^\| `(node(?:\.\w+)+)\.([A-Z_]+)` +\| \w+ +\| `([^`]+)` +\|",
                      section, re.MULTILINE)
    assert len(rows) >= 4
    for module, name, value in rows:
        assert getattr(importlib.import_module(module), name) == ast.literal_eval(value), name
