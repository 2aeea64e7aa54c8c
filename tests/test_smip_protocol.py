"""protocol.smip: manifests, version graph, announcements, DHT keys, the chunk stream
messages, and specs/smip.md's tables and vectors against the code."""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import math
import random
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nacl.signing import SigningKey

import protocol.smip as smip
from protocol.capability import MAX_CLOCK_SKEW_MS
from protocol.envelope import (
    DOMAIN_ANNOUNCE,
    DOMAIN_CAPABILITY,
    DOMAIN_MANIFEST,
    DOMAINS,
    signing_message,
)
from protocol.errors import LocalProtocolError, RemoteProtocolError
from protocol.hashtree import (
    DEFAULT_CHUNK_SIZE,
    MAX_CHUNK_SIZE,
    MIN_CHUNK_SIZE,
    chunk_count,
    hash_bytes,
    leaf_hash,
    root_from_leaves,
    verify_chunk,
)
from protocol.peerid import peer_id_from_public_key
from protocol.smip import (
    ACCEPT,
    IGNORE,
    MAX_ANNOUNCE_BYTES,
    MAX_CONFIG_BYTES,
    MAX_CONFIG_DEPTH,
    MAX_LIST_BYTES,
    MAX_LIST_LIMIT,
    MAX_MANIFEST_BYTES,
    MAX_NAME,
    MAX_PARENTS,
    MAX_PATH_BYTES,
    MAX_REQUEST_BYTES,
    MAX_RESPONSE_HEADER_BYTES,
    MAX_SHARD_CHUNKS,
    MAX_SHARDS,
    MAX_VERSIONS_PER_PROVIDER,
    REJECT,
    Announcement,
    ChunkRequest,
    LeavesRequest,
    ListRequest,
    Manifest,
    ManifestRequest,
    ResponseHeader,
    ShardEntry,
    build_manifest,
    check_announcement_matches,
    check_name,
    check_path,
    check_response_header,
    choose_chunk_size,
    decode_list_payload,
    decode_request,
    decode_response_header,
    encode_list_payload,
    encode_request,
    encode_response_header,
    id_hex,
    judge_announcement,
    lineage,
    new_announcement,
    new_shards,
    open_manifest,
    parse_id,
    payload_deadline_s,
    payload_limit,
    select_list,
    shard_provider_key,
    shared_shards,
    short_id,
    sign_announcement,
    sign_manifest,
    supersedes,
    verify_announcement,
    version_id,
    version_provider_key,
)

KEYS = [SigningKey(bytes([i + 1]) * 32) for i in range(3)]
PEERS = [peer_id_from_public_key(bytes(k.verify_key)) for k in KEYS]
KEY, PEER = KEYS[0], PEERS[0]
NOW = 1_800_000_000_000
CS = MIN_CHUNK_SIZE
ROOT = bytes(range(32))

MANIFEST_REASONS = {"malformed", "oversized", "unknown-version", "wrong-domain", "bad-signature",
                    "bad-peer-id", "signer-mismatch", "id-mismatch"}  # fmt: skip
ANNOUNCE_REASONS = {"malformed", "oversized", "unknown-version", "wrong-domain", "bad-signature",
                    "bad-peer-id", "bad-lifetime", "signer-mismatch", "wrong-peer", "future",
                    "expired"}  # fmt: skip
WIRE_REASONS = {"malformed", "oversized"}


def shard(path: str = "model.safetensors", size: int = 150_000, root: bytes = ROOT) -> ShardEntry:
    return ShardEntry(path, size, CS, root)


def manifest(**kw: Any) -> Manifest:
    args: dict[str, Any] = {
        "kind": "model",
        "name": "tiny",
        "shards": [shard()],
        "created_ms": NOW,
        "publisher": PEER,
        "config": {"vocab_size": 256, "n_layer": 2},
    }
    args.update(kw)
    return build_manifest(**args)


def signed(m: Manifest | None = None, key: SigningKey = KEY) -> bytes:
    return sign_manifest(key, m if m is not None else manifest())[0]


def forge(body: bytes, key: SigningKey = KEY, domain: str = DOMAIN_MANIFEST) -> bytes:
    """A correctly signed envelope around any body bytes (sign_* refuse invalid bodies)."""
    sig = key.sign(signing_message(domain, body)).signature
    data: bytes = msgpack.packb([1, domain, bytes(key.verify_key), sig, body], use_bin_type=True)
    return data


def packb(obj: object) -> bytes:
    data: bytes = msgpack.packb(obj, use_bin_type=True)
    return data


def reason(fn: Any, *args: Any, **kw: Any) -> str:
    with pytest.raises(RemoteProtocolError) as exc_info:
        fn(*args, **kw)
    return exc_info.value.reason


def announcement(
    version: bytes = ROOT, *, provider: int = 0, seq: int = 1, created: int = NOW,
    name: str = "tiny", manifest_created: int = NOW,
) -> Announcement:  # fmt: skip
    return Announcement(PEERS[provider], version, "model", name, 400, manifest_created, seq,
                        created, created + smip.DEFAULT_ANNOUNCE_LIFETIME_MS)  # fmt: skip


# --- strategies -------------------------------------------------------------------------------

_TEXT_CHARS = st.characters(
    blacklist_categories=("Cc", "Cs", "Cf", "Zl", "Zp"), blacklist_characters="/\\"
)
names = st.text(_TEXT_CHARS, min_size=1, max_size=MAX_NAME).filter(
    lambda s: s == s.strip(" ") and s not in (".", "..")
)
parts = st.text(_TEXT_CHARS, min_size=1, max_size=10).filter(lambda s: s not in (".", ".."))


@st.composite
def shard_lists(draw: st.DrawFn) -> list[ShardEntry]:
    # Paths of one depth can never be a directory of one another.
    depth = draw(st.integers(1, 3))
    paths = draw(
        st.lists(st.lists(parts, min_size=depth, max_size=depth).map("/".join), min_size=1,
                 max_size=6, unique=True).filter(
            lambda ps: all(len(p.encode()) <= MAX_PATH_BYTES for p in ps))
    )  # fmt: skip
    out = []
    for path in paths:
        cs = 1 << draw(st.integers(16, 24))
        size = draw(st.integers(0, cs * MAX_SHARD_CHUNKS))
        out.append(ShardEntry(path, size, cs, draw(st.binary(min_size=32, max_size=32))))
    return out


def json_values(depth: int) -> st.SearchStrategy[Any]:
    scalars = (
        st.none()
        | st.booleans()
        | st.integers(-(2**63), 2**63 - 1)
        | st.floats(allow_nan=False, allow_infinity=False)
        | st.text(max_size=10)
    )
    if depth >= MAX_CONFIG_DEPTH:
        return scalars
    inner = json_values(depth + 1)
    return scalars | st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                   max_size=3)  # fmt: skip


configs = st.dictionaries(st.text(max_size=8), json_values(1), max_size=4)
ids = st.binary(min_size=32, max_size=32)


@st.composite
def keyed_manifests(draw: st.DrawFn) -> tuple[SigningKey, Manifest]:
    i = draw(st.integers(0, len(KEYS) - 1))
    m = build_manifest(
        kind=draw(st.sampled_from(smip.KINDS)),
        name=draw(names),
        parents=draw(st.lists(ids, max_size=MAX_PARENTS, unique=True)),
        config=draw(configs),
        shards=draw(shard_lists()),
        created_ms=draw(st.integers(0, 2**63 - 1)),
        publisher=PEERS[i],
    )
    return KEYS[i], m


requests = (
    st.builds(ManifestRequest, ids)
    | st.builds(LeavesRequest, ids)
    | st.builds(ChunkRequest, ids, st.integers(0, MAX_SHARD_CHUNKS - 1))
    | st.builds(
        ListRequest, st.integers(1, MAX_LIST_LIMIT), st.integers(0, 2**63 - 1), st.none() | ids
    )
)
headers = st.builds(
    ResponseHeader,
    st.just("ok"),
    st.integers(0, 2**63 - 1),
    st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=200),
) | st.builds(ResponseHeader.error, st.sampled_from(smip.STATUSES[1:]), st.text(max_size=300))


# --- manifests: round trips ------------------------------------------------------------------


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(keyed_manifests())
def test_manifest_sign_open_round_trip(km: tuple[SigningKey, Manifest]) -> None:
    key, m = km
    data, vid = sign_manifest(key, m)
    assert vid == hashlib.sha256(data).digest() == version_id(data)
    assert open_manifest(data) == m
    assert open_manifest(data, vid) == m
    assert Manifest.decode_body(m.encode_body()) == m


def test_body_layout_and_key_order() -> None:
    body = msgpack.unpackb(manifest(parents=[ROOT]).encode_body(), raw=False)
    assert list(body) == ["v", "kind", "name", "parents", "config", "shards", "created_ms",
                          "publisher"]  # fmt: skip
    assert body["v"] == 1 and body["parents"] == [ROOT]
    assert body["shards"] == [{"path": "model.safetensors", "size": 150_000, "chunk_size": CS,
                               "root": ROOT}]  # fmt: skip


def test_build_sorts_shards_and_config_is_copied() -> None:
    config: dict[str, Any] = {"layers": (1, 2), "nested": {"a": [1.5, None]}}
    m = manifest(shards=[shard("b"), shard("a/x"), shard("a.txt")], config=config)
    assert [s.path for s in m.shards] == ["a.txt", "a/x", "b"]  # '.' < '/' in UTF-8
    assert m.config == {"layers": [1, 2], "nested": {"a": [1.5, None]}}
    config["nested"]["a"].append(3)  # the manifest keeps its own copy
    assert m.config["nested"]["a"] == [1.5, None]
    assert m.total_size == 3 * 150_000


def test_open_manifest_checks_the_id_first() -> None:
    data = signed()
    assert reason(open_manifest, data, bytes(32)) == "id-mismatch"
    # Garbage with a wrong id is refused by its hash, before any decoding.
    assert reason(open_manifest, b"\xc1garbage", bytes(32)) == "id-mismatch"
    assert reason(open_manifest, b"\xc1garbage") == "malformed"
    with pytest.raises(LocalProtocolError):
        open_manifest(data, b"short")


def test_every_flipped_byte_and_truncation_is_rejected() -> None:
    data, vid = sign_manifest(KEY, manifest(parents=[ROOT]))
    for i in range(len(data)):
        for flip in (0x01, 0x80, 0xFF):
            bad = data[:i] + bytes([data[i] ^ flip]) + data[i + 1 :]
            assert reason(open_manifest, bad) in MANIFEST_REASONS - {"id-mismatch"}
            assert reason(open_manifest, bad, vid) == "id-mismatch"
    for n in range(len(data)):
        assert reason(open_manifest, data[:n]) in MANIFEST_REASONS
    assert reason(open_manifest, data + b"\x00") == "malformed"


@settings(max_examples=200)
@given(st.data())
def test_random_flips_in_random_manifests_are_rejected(data: st.DataObject) -> None:
    key, m = data.draw(keyed_manifests())
    env, _ = sign_manifest(key, m)
    i = data.draw(st.integers(0, len(env) - 1))
    flip = data.draw(st.integers(1, 255))
    bad = env[:i] + bytes([env[i] ^ flip]) + env[i + 1 :]
    assert reason(open_manifest, bad) in MANIFEST_REASONS - {"id-mismatch"}


@settings(max_examples=300)
@given(st.binary(max_size=600))
def test_open_manifest_random_bytes(data: bytes) -> None:
    assert reason(open_manifest, data) in MANIFEST_REASONS


# --- manifests: signatures ---------------------------------------------------------------------


def test_forged_signature_is_rejected() -> None:
    fields = msgpack.unpackb(signed(), raw=False)
    fields[3] = KEYS[1].sign(signing_message(DOMAIN_MANIFEST, fields[4])).signature
    assert reason(open_manifest, packb(fields)) == "bad-signature"
    fields = msgpack.unpackb(signed(), raw=False)
    fields[2] = bytes(KEYS[1].verify_key)  # claim another signer, keep the signature
    assert reason(open_manifest, packb(fields)) == "bad-signature"


def test_signer_must_be_publisher() -> None:
    body = manifest(publisher=PEERS[1]).encode_body()
    assert reason(open_manifest, forge(body, key=KEY)) == "signer-mismatch"
    assert open_manifest(forge(body, key=KEYS[1])).publisher == PEERS[1]
    with pytest.raises(LocalProtocolError):
        sign_manifest(KEY, manifest(publisher=PEERS[1]))


def test_wrong_domain_does_not_open() -> None:
    body = manifest().encode_body()
    assert reason(open_manifest, forge(body, domain=DOMAIN_ANNOUNCE)) == "wrong-domain"
    assert reason(open_manifest, forge(body, domain=DOMAIN_CAPABILITY)) == "wrong-domain"


def test_body_versions_and_fields() -> None:
    for v in (0, 2, True, 1.0, "1", None):
        d = manifest().to_dict()
        d["v"] = v
        assert reason(open_manifest, forge(packb(d))) == "unknown-version"
    d = manifest().to_dict()
    del d["v"]
    assert reason(open_manifest, forge(packb(d))) == "malformed"
    d = manifest().to_dict()
    d["license"] = "mit"
    assert reason(open_manifest, forge(packb(d))) == "malformed"
    d = manifest().to_dict()
    d["publisher"] = "QmNotEd25519"
    assert reason(open_manifest, forge(packb(d))) == "bad-peer-id"
    d = manifest().to_dict()
    d["shards"][0]["extra"] = 1
    assert reason(open_manifest, forge(packb(d))) == "malformed"


# --- manifests: field rules -------------------------------------------------------------------

GOOD_PATHS = ["model.safetensors", "a/b/c.bin", "日本語/データ.parquet", "x" * 255, ".hidden",
              "a..b", "é" * 127, "with space.bin"]  # fmt: skip
BAD_PATHS = ["", "/abs", "a//b", "a/", "./a", "a/./b", "../up", "a/../b", "..", ".", "a\\b",
             "nul\x00", "tab\there", "esc\x1b[2J", "c1\x85", "del\x7f", "x" * 256, "é" * 128,
             "bidi\u202eevil", "line\u2028sep", "iso\u2066late"]  # fmt: skip


@pytest.mark.parametrize("path", GOOD_PATHS)
def test_good_paths(path: str) -> None:
    check_path(path)
    m = open_manifest(signed(manifest(shards=[shard(path)])))
    assert m.shards[0].path == path


@pytest.mark.parametrize("path", BAD_PATHS)
def test_bad_paths(path: str) -> None:
    with pytest.raises(LocalProtocolError):
        check_path(path)
    d = manifest().to_dict()
    d["shards"][0]["path"] = path
    assert reason(open_manifest, forge(packb(d))) == "malformed"


@pytest.mark.parametrize(
    "paths",
    [["a", "a"], ["b", "a"], ["a", "a/b"], ["x/y", "x/y/z"], ["a-b", "a/c", "a"]],
)
def test_path_sets_must_be_sorted_unique_and_writable(paths: list[str]) -> None:
    d = manifest().to_dict()
    d["shards"] = [shard(p).to_dict() for p in paths]
    assert reason(open_manifest, forge(packb(d))) == "malformed"
    if any(q.startswith(p + "/") for p in paths for q in paths):
        with pytest.raises(LocalProtocolError):
            manifest(shards=[shard(p) for p in paths])  # build sorts; clashes remain


@pytest.mark.parametrize(
    "name", ["", "n" * (MAX_NAME + 1), "a/b", "a\\b", " lead", "trail ", ".", "..", "esc\x1b",
             "nl\n", "\u202egnp", 5, None],
)  # fmt: skip
def test_bad_names(name: Any) -> None:
    with pytest.raises(LocalProtocolError):
        check_name(name)
    d = manifest().to_dict()
    d["name"] = name
    assert reason(open_manifest, forge(packb(d))) == "malformed"


def test_good_names() -> None:
    for name in ["gpt2-small", "Llama 3.1 8B", "模型", "n" * MAX_NAME, "a.b", "..."]:
        assert open_manifest(signed(manifest(name=name))).name == name


@pytest.mark.parametrize(
    "config",
    [
        {"x": math.nan},
        {"x": math.inf},
        {"x": b"bytes"},
        {"x": 2**63},
        {"x": -(2**63) - 1},
        {1: "int key"},
        {"x": {1, 2}},
        {"deep": [[[[[[1]]]]]]},  # 7 levels with the config map
        {"big": "x" * MAX_CONFIG_BYTES},
        {"surrogate": "\ud800"},
    ],
)
def test_bad_configs(config: dict[Any, Any]) -> None:
    with pytest.raises(LocalProtocolError):
        manifest(config=config)


def test_config_limits_are_inclusive() -> None:
    deepest: Any = 1
    for _ in range(MAX_CONFIG_DEPTH - 1):
        deepest = [deepest]
    manifest(config={"deep": deepest, "lo": -(2**63), "hi": 2**63 - 1})
    pad = MAX_CONFIG_BYTES - len(packb({"big": ""})) - 2  # str16 header: 3 bytes, not 1
    big = {"big": "x" * pad}
    assert len(packb(big)) == MAX_CONFIG_BYTES
    assert open_manifest(signed(manifest(config=big))).config == big
    d = manifest().to_dict()
    d["config"] = {"big": "x" * (pad + 1)}
    assert reason(open_manifest, forge(packb(d))) == "malformed"


def test_config_on_the_wire() -> None:
    for config in [{"x": b"bin"}, {"x": float("nan")}, "not a map", [1]]:
        d = manifest().to_dict()
        d["config"] = config
        assert reason(open_manifest, forge(packb(d))) == "malformed"
    # A float32 on the wire is a float; its size is counted as float64.
    d = manifest().to_dict()
    body = packb(d).replace(b"\xa7n_layer\x02", b"\xa7n_layer\xca\x3f\xc0\x00\x00")
    assert open_manifest(forge(body)).config["n_layer"] == 1.5


@pytest.mark.parametrize(
    ("change", "where"),
    [
        ({"kind": "adapter"}, "kind"),
        ({"parents": [ROOT] * 2}, "parents"),
        ({"parents": [bytes([i]) * 32 for i in range(MAX_PARENTS + 1)]}, "parents"),
        ({"parents": [b"short"]}, "parents"),
        ({"shards": []}, "shards"),
        ({"created_ms": -1}, "created_ms"),
        ({"created_ms": True}, "created_ms"),
        ({"created_ms": 2**63}, "created_ms"),
    ],
)
def test_bad_manifest_fields(change: dict[str, Any], where: str) -> None:
    with pytest.raises(LocalProtocolError):
        manifest(**change)
    d = manifest().to_dict()
    d.update(change)
    assert reason(open_manifest, forge(packb(d))) == "malformed", where


@pytest.mark.parametrize(
    ("size", "chunk_size"),
    [(-1, CS), (10, CS + 1), (10, CS // 2), (10, MAX_CHUNK_SIZE * 2), (10, True),
     (CS * MAX_SHARD_CHUNKS + 1, CS), (1.0, CS)],
)  # fmt: skip
def test_bad_shard_geometry(size: Any, chunk_size: Any) -> None:
    with pytest.raises(LocalProtocolError):
        ShardEntry("a", size, chunk_size, ROOT)
    d = manifest().to_dict()
    d["shards"][0].update(size=size, chunk_size=chunk_size)
    assert reason(open_manifest, forge(packb(d))) == "malformed"


def test_shard_limits() -> None:
    ShardEntry("a", CS * MAX_SHARD_CHUNKS, CS, ROOT)  # exactly the most chunks
    ShardEntry("a", 0, CS, ROOT)  # an empty shard is one empty chunk
    with pytest.raises(LocalProtocolError):
        ShardEntry("a", 1, CS, b"\x00" * 31)
    many = [ShardEntry(f"s{i:05}", 1, CS, ROOT) for i in range(MAX_SHARDS)]
    m = manifest(shards=many)
    assert len(open_manifest(signed(m)).shards) == MAX_SHARDS
    with pytest.raises(LocalProtocolError):
        manifest(shards=[*many, ShardEntry("z", 1, CS, ROOT)])
    d = m.to_dict()
    d["shards"].append(ShardEntry("z", 1, CS, ROOT).to_dict())
    assert reason(open_manifest, forge(packb(d))) == "malformed"


def test_manifest_size_limits() -> None:
    # Per-field caps allow more than fits: 4096 shards with 255-byte paths do not.
    long = [ShardEntry(f"{i:05}" + "p" * 250, 1, CS, ROOT) for i in range(MAX_SHARDS)]
    with pytest.raises(LocalProtocolError):
        sign_manifest(KEY, manifest(shards=long))
    assert reason(open_manifest, b"\x00" * (MAX_MANIFEST_BYTES + 1)) == "oversized"
    assert reason(open_manifest, b"\x00" * (MAX_MANIFEST_BYTES + 1), bytes(32)) == "oversized"
    big = forge(b"\xc6" + (MAX_MANIFEST_BYTES).to_bytes(4, "big") + b"x" * MAX_MANIFEST_BYTES)
    assert reason(open_manifest, big) == "oversized"


def test_choose_chunk_size() -> None:
    assert choose_chunk_size(0) == DEFAULT_CHUNK_SIZE
    assert choose_chunk_size(DEFAULT_CHUNK_SIZE * MAX_SHARD_CHUNKS) == 1 << 20
    assert choose_chunk_size(DEFAULT_CHUNK_SIZE * MAX_SHARD_CHUNKS + 1) == 1 << 21
    assert choose_chunk_size(MAX_CHUNK_SIZE * MAX_SHARD_CHUNKS) == MAX_CHUNK_SIZE
    with pytest.raises(LocalProtocolError):
        choose_chunk_size(MAX_CHUNK_SIZE * MAX_SHARD_CHUNKS + 1)


# --- ids and keys ------------------------------------------------------------------------------


def test_hex_forms() -> None:
    vid = version_id(signed())
    text = id_hex(vid)
    assert len(text) == 64 and text == text.lower()
    assert parse_id(text) == parse_id(text.upper()) == vid
    assert short_id(vid) == text[:12]
    for bad in ["", text[:-1], text + "0", "g" * 64, "é" * 64, " " + text[1:], None]:
        assert reason(parse_id, bad) == "malformed"
    with pytest.raises(LocalProtocolError):
        id_hex(b"x")


@given(st.text(max_size=70))
def test_parse_id_only_raises_remote_errors(text: str) -> None:
    try:
        assert len(parse_id(text)) == 32
    except RemoteProtocolError as exc:
        assert exc.reason == "malformed"


def test_provider_keys() -> None:
    vkey, skey = version_provider_key(ROOT), shard_provider_key(ROOT)
    assert vkey == "1220" + hashlib.sha256(b"iollm/smip-version/v1/" + ROOT).hexdigest()
    assert skey == "1220" + hashlib.sha256(b"iollm/smip-shard/v1/" + ROOT).hexdigest()
    assert vkey != skey  # one namespace per kind of id: a root never answers a version query
    assert len(vkey) == 68 and len(bytes.fromhex(vkey)) == 34 <= 50  # py-libp2p's key limit
    with pytest.raises(LocalProtocolError):
        version_provider_key(id_hex(ROOT).encode())


# --- version graph -------------------------------------------------------------------------


def vid(i: int) -> bytes:
    return hashlib.sha256(bytes([i])).digest()


def graph(edges: dict[int, list[int]]) -> dict[bytes, Manifest]:
    return {vid(v): manifest(name=f"v{v}", parents=[vid(p) for p in ps]) for v, ps in edges.items()}


def names_of(ids_: tuple[bytes, ...]) -> list[int]:
    index = {vid(i): i for i in range(256)}
    return [index[x] for x in ids_]


def test_lineage_first_parent_first() -> None:
    # 5 merges 4 (first parent) and 3; 4 <- 2 <- 1; 3 <- 1.
    g = graph({5: [4, 3], 4: [2], 3: [1], 2: [1], 1: []})
    result = lineage(vid(5), g.get)
    assert names_of(result.versions) == [5, 4, 2, 1, 3]
    assert result.missing == () and not result.truncated


def test_lineage_missing_parents() -> None:
    g = graph({3: [2, 9], 2: [8]})
    result = lineage(vid(3), g.get)
    assert names_of(result.versions) == [3, 2, 8, 9]
    assert names_of(result.missing) == [8, 9]
    assert lineage(vid(7), g.get).missing == (vid(7),)


def test_lineage_survives_cycles() -> None:
    g = graph({1: [2], 2: [3], 3: [1, 2], 4: [4]})  # a corrupt store
    assert names_of(lineage(vid(1), g.get).versions) == [1, 2, 3]
    assert names_of(lineage(vid(4), g.get).versions) == [4]


def test_lineage_bounds() -> None:
    n = 6000  # deeper than Python's recursion limit
    g = {}
    for i in range(n):
        child = hashlib.sha256(i.to_bytes(4, "big")).digest()
        parent = hashlib.sha256((i + 1).to_bytes(4, "big")).digest()
        g[child] = dataclasses.replace(manifest(), parents=(parent,))
    start = hashlib.sha256((0).to_bytes(4, "big")).digest()
    full = lineage(start, g.get, max_depth=n + 1, max_versions=n + 2)
    assert len(full.versions) == n + 1 and len(full.missing) == 1 and not full.truncated
    deep = lineage(start, g.get, max_depth=10)
    assert len(deep.versions) == 11 and deep.truncated and deep.missing == ()
    wide = lineage(start, g.get, max_versions=5)
    assert len(wide.versions) == 5 and wide.truncated
    assert len(lineage(start, g.get).versions) == smip.MAX_LINEAGE_DEPTH + 1


def test_shared_and_new_shards() -> None:
    a, b, c = (hashlib.sha256(x).digest() for x in (b"a", b"b", b"c"))
    parent = manifest(shards=[shard("emb", root=a), shard("head", root=b)])
    other = manifest(shards=[shard("x", root=c)])
    child = manifest(shards=[shard("emb", root=a), shard("head", root=c), shard("renamed",
                                                                            root=b)])  # fmt: skip
    assert [s.path for s in shared_shards(child, parent)] == ["emb", "renamed"]
    assert [s.path for s in new_shards(child, [parent])] == ["head"]
    assert new_shards(child, [parent, other]) == ()
    assert new_shards(child, []) == child.shards


# --- announcements ---------------------------------------------------------------------------


def test_announcement_round_trip_and_claims() -> None:
    data, v = sign_manifest(KEY, manifest())
    ann = new_announcement(provider=PEERS[1], manifest_bytes=data, manifest=manifest(), seq=7,
                           now_ms=NOW)  # fmt: skip
    env = sign_announcement(KEYS[1], ann)
    assert verify_announcement(env, NOW, expected_provider=PEERS[1]) == ann
    assert ann.version == v and ann.key == (PEERS[1], v)
    check_announcement_matches(ann, data, manifest())
    lie = dataclasses.replace(ann, name="other")
    assert reason(check_announcement_matches, lie, data, manifest()) == "announce-mismatch"
    lie = dataclasses.replace(ann, manifest_size=len(data) + 1)
    assert reason(check_announcement_matches, lie, data, manifest()) == "announce-mismatch"
    with pytest.raises(LocalProtocolError):
        sign_announcement(KEY, ann)


def test_announcement_checks() -> None:
    env = sign_announcement(KEY, announcement())
    assert reason(verify_announcement, env, NOW, expected_provider=PEERS[1]) == "wrong-peer"
    body = packb(announcement(provider=1).to_dict())
    assert reason(verify_announcement, forge(body, domain=DOMAIN_ANNOUNCE), NOW) == (
        "signer-mismatch"
    )
    assert reason(verify_announcement, forge(body), NOW) == "wrong-domain"
    life = smip.DEFAULT_ANNOUNCE_LIFETIME_MS
    assert verify_announcement(env, NOW + life - 1).seq == 1
    assert reason(verify_announcement, env, NOW + life) == "expired"
    assert verify_announcement(env, NOW - MAX_CLOCK_SKEW_MS).seq == 1
    assert reason(verify_announcement, env, NOW - MAX_CLOCK_SKEW_MS - 1) == "future"
    for change in [{"expires_ms": NOW}, {"expires_ms": NOW + smip.MAX_ANNOUNCE_LIFETIME_MS + 1}]:
        d = {**announcement().to_dict(), **change}
        assert reason(verify_announcement, forge(packb(d), domain=DOMAIN_ANNOUNCE), NOW) == (
            "bad-lifetime"
        )
    changes: list[dict[str, Any]] = [
        {"v": 2}, {"manifest_size": 0}, {"manifest_size": MAX_MANIFEST_BYTES + 1},
        {"version": b"x"}, {"kind": "lora"}, {"seq": -1}, {"extra": 1},
    ]  # fmt: skip
    for change in changes:
        d = {**announcement().to_dict(), **change}
        assert reason(verify_announcement, forge(packb(d), domain=DOMAIN_ANNOUNCE), NOW) in (
            {"malformed", "unknown-version"}
        )


def test_largest_announcement_fits() -> None:
    widest = announcement(name="\U0001f600" * MAX_NAME, seq=2**63 - 1)  # 4 UTF-8 bytes each
    ann = dataclasses.replace(
        widest, manifest_size=MAX_MANIFEST_BYTES, manifest_created_ms=2**63 - 1
    )
    assert len(sign_announcement(KEY, ann)) <= MAX_ANNOUNCE_BYTES


def test_announcement_corruption_and_garbage() -> None:
    env = sign_announcement(KEY, announcement())
    for i in range(len(env)):
        bad = env[:i] + bytes([env[i] ^ 0x20]) + env[i + 1 :]
        assert reason(verify_announcement, bad, NOW) in ANNOUNCE_REASONS
    for n in range(len(env)):
        assert reason(verify_announcement, env[:n], NOW) in ANNOUNCE_REASONS
    assert reason(verify_announcement, b"\x00" * (MAX_ANNOUNCE_BYTES + 1), NOW) == "oversized"


@settings(max_examples=300)
@given(st.binary(max_size=1100))
def test_verify_announcement_random_bytes(data: bytes) -> None:
    assert reason(verify_announcement, data, NOW) in ANNOUNCE_REASONS


def test_judge_announcement_verdicts() -> None:
    known: dict[tuple[str, bytes], Announcement] = {}
    first = sign_announcement(KEY, announcement(seq=5))
    v = judge_announcement(first, NOW, known)
    assert (v.action, v.reason) == (ACCEPT, "") and v.announcement is not None
    known[v.announcement.key] = v.announcement
    assert judge_announcement(first, NOW, known).action == IGNORE  # duplicate
    older = sign_announcement(KEY, announcement(seq=4, created=NOW + 1))
    assert judge_announcement(older, NOW, known).reason == "duplicate"  # replay of an old seq
    newer = sign_announcement(KEY, announcement(seq=6))
    assert judge_announcement(newer, NOW, known).action == ACCEPT
    other_version = sign_announcement(KEY, announcement(version=bytes(32)))
    assert judge_announcement(other_version, NOW, known).action == ACCEPT
    full = judge_announcement(other_version, NOW, known, lambda p: MAX_VERSIONS_PER_PROVIDER)
    assert (full.action, full.reason) == (IGNORE, "too-many")
    # An update of a kept entry is taken even from a provider at its limit.
    assert judge_announcement(newer, NOW, known, lambda p: MAX_VERSIONS_PER_PROVIDER).action == (
        ACCEPT
    )
    assert judge_announcement(first, NOW + 10**9, known).reason == "expired"
    assert judge_announcement(first, NOW + 10**9, known).action == IGNORE
    assert judge_announcement(b"junk", NOW, known).action == REJECT
    forged = forge(packb(announcement(provider=1).to_dict()), domain=DOMAIN_ANNOUNCE)
    assert judge_announcement(forged, NOW, known).action == REJECT
    with pytest.raises(LocalProtocolError):
        supersedes(announcement(), announcement(provider=1))


@settings(max_examples=100, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, 1), st.integers(0, 2), st.integers(0, 4)), max_size=30),
       st.randoms(use_true_random=False))  # fmt: skip
def test_announcements_are_idempotent_in_any_order(
    specs: list[tuple[int, int, int]], rnd: random.Random
) -> None:
    """Any delivery order, with duplicates and replays, leaves one entry per (provider,
    version): the one with the highest seq."""
    envs = [sign_announcement(KEYS[p], announcement(bytes([v]) * 32, provider=p, seq=s))
            for p, v, s in specs]  # fmt: skip
    deliveries = envs + rnd.choices(envs, k=len(envs)) if envs else []
    rnd.shuffle(deliveries)
    known: dict[tuple[str, bytes], Announcement] = {}
    for env in deliveries:
        verdict = judge_announcement(env, NOW, known)
        if verdict.action == ACCEPT:
            assert verdict.announcement is not None
            known[verdict.announcement.key] = verdict.announcement
    expected: dict[tuple[str, bytes], int] = {}
    for p, v, s in specs:
        key = (PEERS[p], bytes([v]) * 32)
        expected[key] = max(s, expected.get(key, -1))
    assert {k: a.seq for k, a in known.items()} == expected


# --- stream messages ---------------------------------------------------------------------------


@settings(max_examples=300)
@given(requests)
def test_request_round_trip(request: Any) -> None:
    payload = encode_request(request)
    assert len(payload) <= MAX_REQUEST_BYTES
    assert decode_request(payload) == request


@settings(max_examples=300)
@given(headers)
def test_response_header_round_trip(header: ResponseHeader) -> None:
    payload = encode_response_header(header)
    assert len(payload) <= MAX_RESPONSE_HEADER_BYTES
    assert decode_response_header(payload) == header


@pytest.mark.parametrize(
    "d",
    [
        {"op": "delete", "root": ROOT},
        {"root": ROOT},
        {"op": 1},
        {"op": "chunk", "root": ROOT},
        {"op": "chunk", "root": ROOT, "index": -1},
        {"op": "chunk", "root": ROOT, "index": MAX_SHARD_CHUNKS},
        {"op": "chunk", "root": ROOT, "index": True},
        {"op": "chunk", "root": ROOT, "index": 1.0},
        {"op": "chunk", "root": ROOT[:31], "index": 0},
        {"op": "chunk", "root": ROOT, "index": 0, "extra": 1},
        {"op": "leaves", "root": id_hex(ROOT)},
        {"op": "manifest", "root": ROOT},
        {"op": "list", "limit": 0},
        {"op": "list", "limit": MAX_LIST_LIMIT + 1},
        {"op": "list", "limit": 1, "since_ms": -1},
        {"op": "list", "limit": 1, "after": b""},
        ["chunk", ROOT, 0],
    ],
)
def test_bad_requests(d: Any) -> None:
    assert reason(decode_request, packb(d)) == "malformed"


def test_request_sizes() -> None:
    assert reason(decode_request, b"\x80" * (MAX_REQUEST_BYTES + 1)) == "oversized"
    assert reason(decode_request, packb({"op": "list", "limit": 1}) + b"\x00") == "malformed"
    assert reason(decode_request, "text") == "malformed"
    assert decode_request(packb({"op": "list", "limit": 3})) == ListRequest(3)
    assert decode_request(packb({"op": "list", "limit": 3, "after": ROOT})) == (
        ListRequest(3, 0, ROOT)
    )


@settings(max_examples=500)
@given(st.binary(max_size=MAX_REQUEST_BYTES + 10))
def test_decode_request_random_bytes(data: bytes) -> None:
    try:
        encode_request(decode_request(data))
    except RemoteProtocolError as exc:
        assert exc.reason in WIRE_REASONS


@settings(max_examples=300)
@given(requests, st.data())
def test_request_flips_and_truncations(request: Any, data: st.DataObject) -> None:
    payload = encode_request(request)
    i = data.draw(st.integers(0, len(payload) - 1))
    bad = payload[:i] + bytes([payload[i] ^ data.draw(st.integers(1, 255))]) + payload[i + 1 :]
    for candidate in (bad, payload[:i]):
        try:
            decode_request(candidate)
        except RemoteProtocolError as exc:
            assert exc.reason in WIRE_REASONS


@pytest.mark.parametrize(
    "d",
    [
        {"status": "ok"},
        {"status": "teapot", "length": 0},
        {"status": "busy", "length": 5},
        {"status": "ok", "length": -1},
        {"status": "ok", "length": 2**63},
        {"status": "ok", "length": True},
        {"status": "not-found", "length": 0, "message": "é"},
        {"status": "not-found", "length": 0, "message": "x" * 201},
        {"status": "not-found", "length": 0, "message": "\x1b[2J"},
        {"status": "ok", "length": 0, "retry": 1},
    ],
)
def test_bad_response_headers(d: Any) -> None:
    assert reason(decode_response_header, packb(d)) == "malformed"


@settings(max_examples=500)
@given(st.binary(max_size=MAX_RESPONSE_HEADER_BYTES + 10))
def test_decode_response_header_random_bytes(data: bytes) -> None:
    try:
        decode_response_header(data)
    except RemoteProtocolError as exc:
        assert exc.reason in WIRE_REASONS


def test_error_header_is_made_safe() -> None:
    h = ResponseHeader.error("internal", "disk \x1b[31mfailed\n" + "é" * 500)
    assert h.message.startswith("disk ?[31mfailed?") and len(h.message) == 200
    assert decode_response_header(encode_response_header(h)) == h
    assert "message" not in msgpack.unpackb(encode_response_header(ResponseHeader("ok", 3)))
    with pytest.raises(LocalProtocolError):
        ResponseHeader("busy", 1)


def test_check_response_header_limits() -> None:
    def ok(n: int) -> ResponseHeader:
        return ResponseHeader("ok", n)

    mreq, lreq, creq, sreq = (ManifestRequest(ROOT), LeavesRequest(ROOT), ChunkRequest(ROOT, 2),
                              ListRequest(10))  # fmt: skip
    cases: list[tuple[smip.Request, int]] = [
        (mreq, MAX_MANIFEST_BYTES), (lreq, smip.MAX_LEAVES_BYTES), (creq, MAX_CHUNK_SIZE),
        (sreq, MAX_LIST_BYTES),
    ]  # fmt: skip
    for req, limit in cases:
        assert payload_limit(req) == limit
        assert check_response_header(req, ok(limit)) == limit
        assert reason(check_response_header, req, ok(limit + 1)) == "oversized"
        assert check_response_header(req, ResponseHeader.error("not-found")) == 0
    assert reason(check_response_header, mreq, ok(0)) == "malformed"
    assert reason(check_response_header, lreq, ok(0)) == "bad-leaves"
    assert reason(check_response_header, lreq, ok(33)) == "bad-leaves"
    entry = shard(size=150_000)  # 3 chunks: 65536, 65536, 18928
    assert check_response_header(lreq, ok(96), shard=entry) == 96
    assert reason(check_response_header, lreq, ok(64), shard=entry) == "bad-leaves"
    assert check_response_header(creq, ok(18928), shard=entry) == 18928
    assert reason(check_response_header, creq, ok(CS), shard=entry) == "bad-chunk"
    assert check_response_header(ChunkRequest(ROOT, 0), ok(CS), shard=entry) == CS
    with pytest.raises(LocalProtocolError):
        check_response_header(ChunkRequest(ROOT, 3), ok(1), shard=entry)
    with pytest.raises(LocalProtocolError):
        check_response_header(creq, ok(1), shard=shard(root=bytes(32)))
    empty = shard(size=0)
    assert check_response_header(ChunkRequest(ROOT, 0), ok(0), shard=empty) == 0
    assert payload_deadline_s(0) == smip.RESPONSE_TIMEOUT_S
    assert payload_deadline_s(MAX_CHUNK_SIZE) == smip.RESPONSE_TIMEOUT_S + 64


def test_chunk_flow_end_to_end() -> None:
    """A server-side answer and a client-side check of every chunk of a real shard."""
    data = random.Random(1).randbytes(3 * CS + 17)
    root, leaves = hash_bytes(data, CS)
    entry = ShardEntry("w.safetensors", len(data), CS, root)
    for i in range(entry.chunks):
        req = decode_request(encode_request(ChunkRequest(root, i)))
        assert isinstance(req, ChunkRequest)
        body = data[req.index * CS : (req.index + 1) * CS]
        header = decode_response_header(encode_response_header(ResponseHeader("ok", len(body))))
        assert check_response_header(req, header, shard=entry) == len(body)
        verify_chunk(leaves, entry.size, entry.chunk_size, i, body)


# --- the list answer ---------------------------------------------------------------------------


def provider_announcements(n: int, same_time: bool = False) -> dict[Announcement, bytes]:
    out = {}
    for i in range(n):
        ann = announcement(hashlib.sha256(bytes([i])).digest(),
                           manifest_created=NOW if same_time else NOW + i * 1000)  # fmt: skip
        out[ann] = sign_announcement(KEY, ann)
    return out


@pytest.mark.parametrize("same_time", [False, True])
def test_list_pagination_sees_everything_once(same_time: bool) -> None:
    table = provider_announcements(23, same_time)
    request: ListRequest | None = ListRequest(5, NOW)
    seen: list[bytes] = []
    pages = 0
    while request is not None:
        answer = select_list(table, request, NOW)
        payload = encode_list_payload([table[a] for a in answer])
        assert len(payload) <= MAX_LIST_BYTES
        page = decode_list_payload(payload, request, PEER, NOW)
        seen += [a.version for a in page.announcements]
        request = page.next
        pages += 1
    assert sorted(seen) == sorted(a.version for a in table) and len(seen) == 23
    assert pages == 5


def test_list_answers_are_checked() -> None:
    table = provider_announcements(4)
    anns = sorted(table, key=lambda a: a.order)
    envs = [table[a] for a in anns]
    req = ListRequest(3)
    assert reason(decode_list_payload, encode_list_payload(envs), req, PEER, NOW) == "malformed"
    rev = encode_list_payload(envs[:3][::-1])
    assert reason(decode_list_payload, rev, req, PEER, NOW) == "malformed"
    dup = encode_list_payload([envs[0], envs[0]])
    assert reason(decode_list_payload, dup, req, PEER, NOW) == "malformed"
    cursor = ListRequest(3, anns[1].manifest_created_ms, anns[1].version)
    early = encode_list_payload(envs[1:3])  # repeats the cursor's own entry
    assert reason(decode_list_payload, early, cursor, PEER, NOW) == "malformed"
    assert reason(decode_list_payload, encode_list_payload(envs[:1]), req, PEERS[1], NOW) == (
        "wrong-peer"
    )
    assert reason(decode_list_payload, packb([1, 2]), req, PEER, NOW) == "malformed"
    assert reason(decode_list_payload, b"\x00" * (MAX_LIST_BYTES + 1), req, PEER, NOW) == (
        "oversized"
    )
    # Entries that expired in transit are skipped, not errors; paging still moves on.
    late = NOW + smip.DEFAULT_ANNOUNCE_LIFETIME_MS
    page = decode_list_payload(encode_list_payload(envs[:3]), req, PEER, late)
    assert page.announcements == () and page.next == ListRequest(3, anns[2].manifest_created_ms,
                                                                  anns[2].version)  # fmt: skip
    assert select_list(table, req, late) == []
    with pytest.raises(LocalProtocolError):
        encode_list_payload([b"x" * (MAX_ANNOUNCE_BYTES + 1)])


@settings(max_examples=300)
@given(st.binary(max_size=2000))
def test_decode_list_payload_random_bytes(data: bytes) -> None:
    try:
        decode_list_payload(data, ListRequest(MAX_LIST_LIMIT), PEER, NOW)
    except RemoteProtocolError as exc:
        assert exc.reason in ANNOUNCE_REASONS


def test_largest_list_fits() -> None:
    # The widest encoding any encoder may choose: array32, then bin16 entries.
    entry = b"\xc5" + MAX_ANNOUNCE_BYTES.to_bytes(2, "big") + b"\x00" * MAX_ANNOUNCE_BYTES
    payload = b"\xdd" + MAX_LIST_LIMIT.to_bytes(4, "big") + entry * MAX_LIST_LIMIT
    assert len(payload) == MAX_LIST_BYTES
    assert msgpack.unpackb(payload) == [b"\x00" * MAX_ANNOUNCE_BYTES] * MAX_LIST_LIMIT
    assert reason(decode_list_payload, payload, ListRequest(MAX_LIST_LIMIT), PEER, NOW) != (
        "oversized"
    )


# --- sans-IO --------------------------------------------------------------------------------------


def test_smip_imports_no_io() -> None:
    check = (
        "import sys, protocol.smip; bad = {m.split('.')[0] for m in sys.modules} & "
        "{'trio', 'libp2p', 'aiosqlite', 'torch', 'asyncio', 'socket'}; assert not bad, bad"
    )
    result = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True,
                            timeout=60, cwd=Path(__file__).resolve().parents[1])  # fmt: skip
    assert result.returncode == 0, result.stderr


# --- the spec agrees with the code ----------------------------------------------------------------

SPECS = Path(__file__).resolve().parents[1] / "specs"
SPEC_TEXT = (SPECS / "smip.md").read_text(encoding="utf-8")
VECTOR_KEY = SigningKey(bytes(range(32)))
VECTOR_NOW = 1_800_000_000_000


def _section(heading: str) -> str:
    return SPEC_TEXT.split(f"\n{heading}\n", 1)[1].split("\n#", 1)[0]  # to the next heading


def _vector_block(name: str) -> bytes:
    match = re.search(rf"<!-- vector: {name} -->\n```text\n([0-9a-f\n]+)```", SPEC_TEXT)
    assert match is not None, name
    return bytes.fromhex(match.group(1).replace("\n", ""))


def test_spec_constants_table_matches_code() -> None:
    import protocol.hashtree as hashtree

    rows = re.findall(r"^\| `([A-Z_0-9]+)` +\| \w+ +\| `([^`]+)` +\|", _section("## Constants"),
                      re.MULTILINE)  # fmt: skip
    assert len(rows) >= 45
    for name, value in rows:
        module = smip if hasattr(smip, name) else hashtree
        assert getattr(module, name) == ast.literal_eval(value), name
    # Every tunable of the module is in the table (messages' own tags have their tables).
    tags = {"ACCEPT", "IGNORE", "REJECT", "IGNORE_REASONS", "STATUSES", "DOMAIN_MANIFEST",
            "DOMAIN_ANNOUNCE"}  # fmt: skip
    public = {n for n in vars(smip) if n.isupper() and not n.startswith(("_", "STATUS_", "OP_"))}
    assert public - tags <= {name for name, _ in rows}


def test_spec_message_tables_match_code() -> None:
    # The first row of each table is its header: | `status` | ..., | `op` | ...
    statuses = re.findall(r"^\| `([a-z-]+)` +\|", _section("### Response header"), re.MULTILINE)
    assert statuses[0] == "status" and tuple(statuses[1:]) == smip.STATUSES
    for heading in ("### Requests", "### Payloads"):
        ops = re.findall(r"^\| `([a-z]+)` +\|", _section(heading), re.MULTILINE)
        assert ops == ["op", "manifest", "leaves", "chunk", "list"], heading
    reasons = dict(re.findall(r"^\| `([a-z-]+)` +\| .+ \| (reject|ignore) +\|",
                              _section("## Error reasons"), re.MULTILINE))  # fmt: skip
    assert {r for r, v in reasons.items() if v == "ignore"} == {"duplicate", "too-many"}
    assert {"duplicate", "too-many"} <= smip.IGNORE_REASONS
    assert "id-mismatch" in reasons and "announce-mismatch" in reasons


def test_spec_hash_tree_vectors() -> None:
    rows = dict(re.findall(r"^\| tree `(\w+)` +\| `([0-9a-f]{64})`", SPEC_TEXT, re.MULTILINE))
    data = bytes(j % 251 for j in range(150_000))
    root, leaves = hash_bytes(data, CS)
    assert chunk_count(len(data), CS) == 3
    assert [rows[f"leaf_{i}"] for i in range(3)] == [leaves[32 * i : 32 * i + 32].hex()
                                                     for i in range(3)]  # fmt: skip
    assert rows["leaf_2"] == leaf_hash(data[2 * CS :]).hex()
    node_01 = hashlib.sha256(b"\x01" + leaves[:64]).digest()
    assert rows["node_01"] == node_01.hex()
    assert rows["root"] == root.hex() == root_from_leaves(leaves).hex()
    assert rows["root"] == hashlib.sha256(b"\x01" + node_01 + leaves[64:]).hexdigest()
    for cs in (MIN_CHUNK_SIZE, MAX_CHUNK_SIZE):
        assert rows["empty_root"] == hash_bytes(b"", cs)[0].hex()


def _vector_manifest() -> Manifest:
    root = hash_bytes(bytes(j % 251 for j in range(150_000)), CS)[0]
    return build_manifest(
        kind="model", name="tiny", shards=[ShardEntry("model.safetensors", 150_000, CS, root)],
        created_ms=VECTOR_NOW, publisher=peer_id_from_public_key(bytes(VECTOR_KEY.verify_key)),
        config={"vocab_size": 256, "n_layer": 2},
    )  # fmt: skip


def test_spec_manifest_vectors() -> None:
    env = _vector_block("manifest-envelope")
    m = _vector_manifest()
    assert sign_manifest(VECTOR_KEY, m) == (env, version_id(env))
    rows = dict(re.findall(r"^\| (?:manifest|key) `(\w+)` +\| `([0-9a-f]+)`", SPEC_TEXT,
                           re.MULTILINE))  # fmt: skip
    vid = version_id(env)
    assert open_manifest(env, parse_id(rows["version_id"])) == m
    assert rows["version"] == version_provider_key(vid)
    assert rows["shard"] == shard_provider_key(m.shards[0].root)
    assert f"`{short_id(vid)}`" in SPEC_TEXT
    assert f"Envelope ({len(env)}\nbytes)" in SPEC_TEXT or f"Envelope ({len(env)} bytes)" in (
        SPEC_TEXT.replace("\n", " ")
    )


def test_spec_announcement_vector() -> None:
    manifest_env = _vector_block("manifest-envelope")
    env = _vector_block("announce-envelope")
    ann = new_announcement(provider=peer_id_from_public_key(bytes(VECTOR_KEY.verify_key)),
                           manifest_bytes=manifest_env, manifest=_vector_manifest(),
                           seq=VECTOR_NOW, now_ms=VECTOR_NOW)  # fmt: skip
    assert sign_announcement(VECTOR_KEY, ann) == env
    assert verify_announcement(env, VECTOR_NOW) == ann
    assert ann.expires_ms == 1_800_003_600_000 and ann.manifest_size == 368


def test_spec_wire_vectors() -> None:
    vid = version_id(_vector_block("manifest-envelope"))
    root = _vector_manifest().shards[0].root
    rows = dict(re.findall(r"^\| wire `(.+?)` +\| `([0-9a-f]+)` +\|", SPEC_TEXT, re.MULTILINE))
    requests_: dict[str, Any] = {
        "manifest {version: version_id}": ManifestRequest(vid),
        "leaves {root}": LeavesRequest(root),
        "chunk {root, index: 2}": ChunkRequest(root, 2),
        "list {limit: 100}": ListRequest(100),
        "list {limit: 100, since_ms: 1800000000000, after: version_id}": ListRequest(
            100, VECTOR_NOW, vid
        ),
    }
    headers_ = {
        "header {status: ok, length: 18928}": ResponseHeader("ok", 18928),
        'header {status: not-found, length: 0, message: "no such root"}': ResponseHeader(
            "not-found", 0, "no such root"
        ),
    }
    assert set(rows) == set(requests_) | set(headers_)
    for text, request in requests_.items():
        assert encode_request(request).hex() == rows[text], text
        assert decode_request(bytes.fromhex(rows[text])) == request
    for text, header in headers_.items():
        assert encode_response_header(header).hex() == rows[text], text
        assert decode_response_header(bytes.fromhex(rows[text])) == header


def test_records_domains_table_matches_code() -> None:
    import protocol.capability as capability
    import protocol.consensus as consensus
    import protocol.feed as feed
    import protocol.jobs as jobs
    import protocol.txs as txs

    text = (SPECS / "records.md").read_text(encoding="utf-8")
    section = text.split("\n## Domains\n", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `(iollm/[\w/-]+)` +\|[^|]+\| ([^|]+?) *\|", section,
                      re.MULTILINE)  # fmt: skip
    assert {domain for domain, _ in rows} == DOMAINS
    for domain, cap in rows:
        fixed = re.fullmatch(r"(\d+) \(`(\w+)`\)", cap)
        if fixed is None:  # a proposal's cap follows the genesis's max_block_bytes
            assert domain == "iollm/proposal/v1" and "max_block_bytes" in cap, (domain, cap)
            continue
        value, name = fixed.groups()
        module = next(m for m in (smip, capability, jobs, feed, consensus, txs)
                      if hasattr(m, name))
        assert getattr(module, name) == int(value), name


# --- structure-aware fuzzing: valid shapes with one value replaced ---------------------------

msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats()
    | st.text(max_size=12) | st.binary(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner,
                                                                max_size=4),
    max_leaves=12,
)  # fmt: skip


def _replace_somewhere(value: Any, data: st.DataObject) -> Any:
    """``value`` with one element, at any depth, replaced by a random msgpack value."""
    if isinstance(value, dict) and value and data.draw(st.booleans()):
        key = data.draw(st.sampled_from(sorted(value)))
        return {**value, key: _replace_somewhere(value[key], data)}
    if isinstance(value, list) and value and data.draw(st.booleans()):
        i = data.draw(st.integers(0, len(value) - 1))
        return [*value[:i], _replace_somewhere(value[i], data), *value[i + 1 :]]
    return data.draw(msgpack_values)


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_mutated_manifest_bodies_raise_only_remote_errors(data: st.DataObject) -> None:
    body = _replace_somewhere(manifest(parents=[ROOT], shards=[shard("a"), shard("b/c")]).to_dict(),
                              data)  # fmt: skip
    try:
        m = open_manifest(forge(packb(body)))
    except RemoteProtocolError as exc:
        assert exc.reason in MANIFEST_REASONS
    else:
        assert Manifest.decode_body(m.encode_body()) == m


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_mutated_announcements_and_requests_raise_only_remote_errors(data: st.DataObject) -> None:
    body = _replace_somewhere(announcement().to_dict(), data)
    try:
        verify_announcement(forge(packb(body), domain=DOMAIN_ANNOUNCE), NOW)
    except RemoteProtocolError as exc:
        assert exc.reason in ANNOUNCE_REASONS
    request = data.draw(requests)
    try:
        decode_request(packb(_replace_somewhere(request.to_dict(), data)))
    except RemoteProtocolError as exc:
        assert exc.reason in WIRE_REASONS
    header = data.draw(headers)
    try:
        decode_response_header(packb(_replace_somewhere(
            msgpack.unpackb(encode_response_header(header)), data)))  # fmt: skip
    except RemoteProtocolError as exc:
        assert exc.reason in WIRE_REASONS
