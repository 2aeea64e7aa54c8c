"""Field checks shared by the record and message decoders of protocol/.

A failed check raises :class:`Invalid`: a LocalProtocolError, because a caller building a
value with a bad field has a bug; decoders catch it and raise ``to_remote(exc)``, a
RemoteProtocolError with the same reason and detail, because there the bytes came from a
peer.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any, NoReturn

import msgpack

from protocol.errors import LocalProtocolError, RemoteProtocolError
from protocol.peerid import public_key_from_peer_id

MAX_INT = 2**63 - 1  # every integer field fits SQLite's signed 64-bit INTEGER
ID_BYTES = 32  # every id in protocol/ is a SHA-256 digest


def packb(obj: object) -> bytes:
    """The one msgpack encoding protocol/ signs and hashes (bin type for bytes)."""
    packed: bytes = msgpack.packb(obj, use_bin_type=True)
    return packed


def digest(data: bytes) -> bytes:
    """SHA-256: every id in protocol/ (specs/records.md, "Hashes")."""
    return hashlib.sha256(data).digest()


class Invalid(LocalProtocolError):
    """A field check failed (see the module docstring)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def fail(detail: str, reason: str = "malformed") -> NoReturn:
    raise Invalid(reason, detail)


def to_remote(exc: Invalid) -> RemoteProtocolError:
    return RemoteProtocolError(exc.reason, exc.detail)


def check_int(name: str, value: object, lo: int = 0, hi: int = MAX_INT) -> None:
    # bool is an int subclass and 1.0 == 1: neither is an integer on the wire.
    if not isinstance(value, int) or isinstance(value, bool):
        fail(f"{name} must be an integer, got {type(value).__name__}")
    if not lo <= value <= hi:
        fail(f"{name}={value} outside [{lo}, {hi}]")


def check_keys(
    name: str, d: object, required: frozenset[str], optional: frozenset[str] = frozenset()
) -> dict[str, Any]:
    """``d`` as a map holding every required key, and no key outside required | optional."""
    if not isinstance(d, dict):
        fail(f"{name} must be a map, got {type(d).__name__}")
    keys = set(d)
    if not required <= keys <= required | optional:
        missing = sorted(required - keys)
        extra = sorted(map(str, keys - required - optional))[:8]
        fail(f"{name}: missing fields {missing}, unknown fields {extra}")
    return d


def check_peer(name: str, value: object) -> None:
    """An Ed25519 libp2p peer id (reason "bad-peer-id")."""
    try:
        public_key_from_peer_id(value)  # type: ignore[arg-type]
    except RemoteProtocolError as exc:
        fail(f"{name}: {exc}", "bad-peer-id")


MAX_CHAIN_ID_CHARS = 64
CHAIN_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")  # a chain id, in every chain-bound record


def check_chain(value: object) -> None:
    if not (isinstance(value, str) and CHAIN_ID.fullmatch(value)):
        fail(f"chain_id must be 1..{MAX_CHAIN_ID_CHARS} characters of [A-Za-z0-9._-]")


def check_header(what: str, d: object, type_: str, version: int) -> dict[str, Any]:
    """The decoded map ``d`` once its type tag, then its version ``v``, are right; a
    RemoteProtocolError ("malformed", "wrong-type", "unknown-version") otherwise."""
    if not isinstance(d, dict):
        raise RemoteProtocolError("malformed", f"{what} must be a map")
    if d.get("type") != type_:
        raise RemoteProtocolError("wrong-type", f"expected type {type_!r}, "
                                                f"got {d.get('type')!r:.40}")
    v = d.get("v")
    if type(v) is not int or v != version:  # True == 1 == 1.0 in Python; neither is 1
        raise RemoteProtocolError("unknown-version", f"{what} version {v!r:.20}, "
                                                     f"we speak {version}")
    return d
