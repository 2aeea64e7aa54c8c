"""libp2p peer ids for Ed25519 keys, computed without libp2p.

A libp2p peer id is the multihash of the protobuf-encoded public key; keys of 42 bytes or
less use the identity multihash, so an Ed25519 peer id *contains* its public key and a
record can be checked against its claimed signer without any lookup
(libp2p/specs peer-ids/peer-ids.md).
"""

from __future__ import annotations

from protocol.errors import RemoteProtocolError

_B58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
_B58_INDEX = {c: i for i, c in enumerate(_B58)}

# protobuf PublicKey{Type=Ed25519(1), Data=<32 bytes>} then identity multihash (0x00, len).
_ED25519_PB_PREFIX = b"\x08\x01\x12\x20"
_IDENTITY_MH_PREFIX = b"\x00\x24"
MAX_PEER_ID_CHARS = 64  # Ed25519 ids are 52 characters; anything longer is garbage.


def b58encode(data: bytes) -> str:
    n = int.from_bytes(data, "big")
    out = []
    while n:
        n, rem = divmod(n, 58)
        out.append(_B58[rem])
    pad = len(data) - len(data.lstrip(b"\x00"))
    return "1" * pad + "".join(reversed(out))


def b58decode(text: str) -> bytes:
    n = 0
    for ch in text:
        try:
            n = n * 58 + _B58_INDEX[ch]
        except KeyError:
            raise ValueError(f"invalid base58 character {ch!r}") from None
    pad = len(text) - len(text.lstrip("1"))
    body = n.to_bytes((n.bit_length() + 7) // 8, "big") if n else b""
    return b"\x00" * pad + body


def peer_id_from_public_key(public_key: bytes) -> str:
    """The base58 peer id (``12D3KooW...``) of a raw 32-byte Ed25519 public key."""
    if len(public_key) != 32:
        raise ValueError("an Ed25519 public key is 32 bytes")
    return b58encode(_IDENTITY_MH_PREFIX + _ED25519_PB_PREFIX + public_key)


def public_key_from_peer_id(peer_id: str) -> bytes:
    """Inverse of :func:`peer_id_from_public_key`; raises RemoteProtocolError on junk."""
    if not isinstance(peer_id, str) or not 0 < len(peer_id) <= MAX_PEER_ID_CHARS:
        raise RemoteProtocolError("bad-peer-id", "peer id must be a short string")
    try:
        raw = b58decode(peer_id)
    except ValueError as exc:
        raise RemoteProtocolError("bad-peer-id", str(exc)) from None
    prefix = _IDENTITY_MH_PREFIX + _ED25519_PB_PREFIX
    if len(raw) != len(prefix) + 32 or not raw.startswith(prefix):
        raise RemoteProtocolError("bad-peer-id", "not an Ed25519 identity peer id")
    return raw[len(prefix) :]
