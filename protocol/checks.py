"""Field checks shared by the record and message decoders of protocol/.

A failed check raises :class:`Invalid`: a LocalProtocolError, because a caller building a
value with a bad field has a bug; decoders catch it and raise ``to_remote(exc)``, a
RemoteProtocolError with the same reason and detail, because there the bytes came from a
peer.
"""

from __future__ import annotations

import hashlib
from typing import Any, NoReturn

import msgpack

from protocol.errors import LocalProtocolError, RemoteProtocolError

MAX_INT = 2**63 - 1  # every integer field fits SQLite's signed 64-bit INTEGER
ID_BYTES = 32  # every id in protocol/ is a BLAKE2b-256 digest


def packb(obj: object) -> bytes:
    """The one msgpack encoding protocol/ signs and hashes (bin type for bytes)."""
    packed: bytes = msgpack.packb(obj, use_bin_type=True)
    return packed


def digest(data: bytes) -> bytes:
    """BLAKE2b-256: every id in protocol/."""
    return hashlib.blake2b(data, digest_size=ID_BYTES).digest()


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
