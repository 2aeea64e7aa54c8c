"""protocol.envelope and protocol.peerid: wire form, domains, strict decoding, peer ids."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nacl.signing import SigningKey

from protocol.envelope import (
    DOMAIN_CAPABILITY,
    ENVELOPE_VERSION,
    MAX_ENVELOPE_BYTES,
    SIGNING_PREFIX,
    Envelope,
    open_envelope,
    seal,
    signing_message,
    unpack_strict,
)
from protocol.errors import LocalProtocolError, RemoteProtocolError
from protocol.peerid import (
    b58decode,
    b58encode,
    peer_id_from_public_key,
    public_key_from_peer_id,
)

KEY = SigningKey(bytes(range(32)))
OTHER_KEY = SigningKey(bytes(32))

# Computed with py-libp2p 0.8.1: ID.from_pubkey(Ed25519PrivateKey.from_bytes(seed)...).
PEER_ID_VECTORS = [
    (bytes(32), "12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN"),
    (bytes(range(32)), "12D3KooWA4Xop1JaT3MHxwYMkCepYsv4iPVopMXwCz5iHYdBfeSB"),
]


def _reason(exc_info: pytest.ExceptionInfo[RemoteProtocolError]) -> str:
    return exc_info.value.reason


# --- peer ids -----------------------------------------------------------------------------


@pytest.mark.parametrize(("seed", "expected"), PEER_ID_VECTORS)
def test_peer_id_matches_libp2p(seed: bytes, expected: str) -> None:
    public_key = bytes(SigningKey(seed).verify_key)
    assert peer_id_from_public_key(public_key) == expected
    assert public_key_from_peer_id(expected) == public_key


@settings(max_examples=50)
@given(st.binary(min_size=32, max_size=32))
def test_peer_id_round_trip(seed: bytes) -> None:
    public_key = bytes(SigningKey(seed).verify_key)
    peer_id = peer_id_from_public_key(public_key)
    assert peer_id.startswith("12D3KooW") and len(peer_id) == 52
    assert public_key_from_peer_id(peer_id) == public_key


@settings(max_examples=200)
@given(st.binary(max_size=40))
def test_b58_round_trip(data: bytes) -> None:
    assert b58decode(b58encode(data)) == data


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "0OIl",  # not base58
        "Qm" + "1" * 44,  # a sha2 (RSA-style) id, not an Ed25519 identity id
        "12D3KooW" + "x" * 100,  # too long
        b58encode(b"\x00\x24\x08\x01\x12\x20" + bytes(31)),  # key one byte short
        b58encode(b"\x00\x24\x08\x02\x12\x20" + bytes(32)),  # secp256k1 key type
    ],
)
def test_bad_peer_ids(bad: str) -> None:
    with pytest.raises(RemoteProtocolError) as exc_info:
        public_key_from_peer_id(bad)
    assert _reason(exc_info) == "bad-peer-id"


@pytest.mark.parametrize("bad", [None, 7, b"12D3KooW"])
def test_peer_id_must_be_str(bad: object) -> None:
    with pytest.raises(RemoteProtocolError):
        public_key_from_peer_id(bad)  # type: ignore[arg-type]


def test_peer_id_from_short_key_is_local_error() -> None:
    with pytest.raises(ValueError):
        peer_id_from_public_key(bytes(31))


# --- envelopes ------------------------------------------------------------------------------


def test_seal_open_round_trip() -> None:
    env = seal(KEY, DOMAIN_CAPABILITY, b"body")
    opened = open_envelope(env.encode(), DOMAIN_CAPABILITY)
    assert opened == env
    assert opened.signer == PEER_ID_VECTORS[1][1]


def test_wire_form() -> None:
    env = seal(KEY, DOMAIN_CAPABILITY, b"hello")
    fields = msgpack.unpackb(env.encode(), raw=False)
    assert fields == [ENVELOPE_VERSION, DOMAIN_CAPABILITY, env.public_key, env.signature, b"hello"]
    # The signature covers prefix || domain || 0x00 || body, nothing else.
    assert signing_message(DOMAIN_CAPABILITY, b"hello") == (
        SIGNING_PREFIX + DOMAIN_CAPABILITY.encode() + b"\x00" + b"hello"
    )
    KEY.verify_key.verify(signing_message(DOMAIN_CAPABILITY, b"hello"), env.signature)


def test_seal_unknown_domain_is_local_error() -> None:
    with pytest.raises(LocalProtocolError):
        seal(KEY, "iollm/not-a-domain/v1", b"x")


def _forge(domain: str, body: bytes, key: SigningKey = KEY, version: int = 1) -> bytes:
    """An envelope signed correctly under any domain (seal() refuses unknown ones)."""
    sig = key.sign(signing_message(domain, body)).signature
    data: bytes = msgpack.packb(
        [version, domain, bytes(key.verify_key), sig, body], use_bin_type=True
    )
    return data


def test_wrong_domain() -> None:
    data = _forge("iollm/other/v1", b"body")
    with pytest.raises(RemoteProtocolError) as exc_info:
        open_envelope(data, DOMAIN_CAPABILITY)
    assert _reason(exc_info) == "wrong-domain"


def test_signature_does_not_transfer_between_domains() -> None:
    env = seal(KEY, DOMAIN_CAPABILITY, b"body")
    moved = msgpack.packb(
        [1, "iollm/other/v1", env.public_key, env.signature, env.body], use_bin_type=True
    )
    with pytest.raises(RemoteProtocolError) as exc_info:
        open_envelope(moved, "iollm/other/v1")
    assert _reason(exc_info) == "bad-signature"


def test_unknown_envelope_version() -> None:
    with pytest.raises(RemoteProtocolError) as exc_info:
        open_envelope(_forge(DOMAIN_CAPABILITY, b"b", version=2), DOMAIN_CAPABILITY)
    assert _reason(exc_info) == "unknown-version"


def test_bad_signature_other_key() -> None:
    env = seal(KEY, DOMAIN_CAPABILITY, b"body")
    swapped = Envelope(env.domain, bytes(OTHER_KEY.verify_key), env.signature, env.body)
    with pytest.raises(RemoteProtocolError) as exc_info:
        open_envelope(swapped.encode(), DOMAIN_CAPABILITY)
    assert _reason(exc_info) == "bad-signature"


def test_oversized_rejected_before_decoding() -> None:
    env = seal(KEY, DOMAIN_CAPABILITY, b"x" * 100)
    data = env.encode()
    open_envelope(data, DOMAIN_CAPABILITY, max_bytes=len(data))
    with pytest.raises(RemoteProtocolError) as exc_info:
        open_envelope(data, DOMAIN_CAPABILITY, max_bytes=len(data) - 1)
    assert _reason(exc_info) == "oversized"
    with pytest.raises(RemoteProtocolError) as exc_info:
        open_envelope(b"\x00" * (MAX_ENVELOPE_BYTES + 1), DOMAIN_CAPABILITY)
    assert _reason(exc_info) == "oversized"


@pytest.mark.parametrize(
    "fields",
    [
        [],
        [1, DOMAIN_CAPABILITY, bytes(32), bytes(64)],  # 4 elements
        [1, DOMAIN_CAPABILITY, bytes(31), bytes(64), b""],  # short key
        [1, DOMAIN_CAPABILITY, bytes(32), bytes(63), b""],  # short signature
        [1, DOMAIN_CAPABILITY, bytes(32), bytes(64), "text body"],  # body not bin
        [1, DOMAIN_CAPABILITY, "k" * 32, bytes(64), b""],  # key not bin
        {"v": 1},
        "a string",
    ],
)
def test_malformed_shapes(fields: object) -> None:
    with pytest.raises(RemoteProtocolError) as exc_info:
        open_envelope(msgpack.packb(fields, use_bin_type=True), DOMAIN_CAPABILITY)
    assert _reason(exc_info) == "malformed"


@pytest.mark.parametrize("bad", [None, "text", 12, [b"x"]])
def test_non_bytes_input(bad: object) -> None:
    with pytest.raises(RemoteProtocolError):
        open_envelope(bad, DOMAIN_CAPABILITY)  # type: ignore[arg-type]


def test_every_corruption_and_truncation_is_rejected() -> None:
    data = seal(KEY, DOMAIN_CAPABILITY, b"some body bytes").encode()
    for i in range(len(data)):
        for flip in (0x01, 0x80, 0xFF):
            bad = data[:i] + bytes([data[i] ^ flip]) + data[i + 1 :]
            with pytest.raises(RemoteProtocolError):
                open_envelope(bad, DOMAIN_CAPABILITY)
    for n in range(len(data)):
        with pytest.raises(RemoteProtocolError):
            open_envelope(data[:n], DOMAIN_CAPABILITY)
    with pytest.raises(RemoteProtocolError) as exc_info:
        open_envelope(data + b"\x00", DOMAIN_CAPABILITY)
    assert _reason(exc_info) == "malformed"


@settings(max_examples=300)
@given(st.binary(max_size=300))
def test_random_bytes_only_raise_remote_errors(data: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        open_envelope(data, DOMAIN_CAPABILITY)


# --- strict msgpack ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        msgpack.packb(1) + b"\x01",  # trailing bytes
        msgpack.packb({1: "int key"}),  # non-string map key
        msgpack.packb(msgpack.ExtType(5, b"ext")),  # extension type
        b"\x91" * 5000 + b"\x00",  # nesting beyond the stack limit
        b"\xdd\xff\xff\xff\xff",  # array claiming 2^32-1 elements
        b"\xa2\xff\xfe",  # invalid UTF-8 string
        b"\xc1",  # never-used byte
        b"",
    ],
)
def test_unpack_strict_rejects(data: bytes) -> None:
    with pytest.raises(RemoteProtocolError) as exc_info:
        unpack_strict(data, 1024)
    assert _reason(exc_info) == "malformed"


def test_unpack_strict_caps_lengths() -> None:
    assert unpack_strict(msgpack.packb(b"x" * 10), 10) == b"x" * 10
    with pytest.raises(RemoteProtocolError):
        unpack_strict(msgpack.packb(b"x" * 11), 10)
    with pytest.raises(RemoteProtocolError):
        unpack_strict(msgpack.packb(list(range(11))), 10)
