"""The node's one Ed25519 key (the same key as its libp2p peer id), kept in the node home.

The key file holds the raw 32-byte seed, mode 0600, created with O_EXCL so two ``init``s
racing cannot both write it; ``--force`` replaces it by rename, never in place.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from nacl.signing import SigningKey

from protocol.peerid import peer_id_from_public_key

KEY_FILE = "node.key"


class IdentityError(Exception):
    """The key file is missing, unreadable, malformed or too open."""


def peer_id_of(key: SigningKey) -> str:
    return peer_id_from_public_key(bytes(key.verify_key))


def write_private_file(path: Path, data: bytes, *, overwrite: bool) -> None:
    """Write ``data`` to ``path`` with mode 0600 set before any byte is written."""
    if not overwrite:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    write_private_file(tmp, data, overwrite=False)
    os.replace(tmp, path)


def create_key(home: Path, *, force: bool = False) -> SigningKey:
    path = home / KEY_FILE
    if path.exists() and not force:
        raise IdentityError(f"{path} already exists (use --force to replace the node identity)")
    key = SigningKey.generate()
    write_private_file(path, bytes(key), overwrite=force)
    return key


def load_key(home: Path) -> SigningKey:
    path = home / KEY_FILE
    try:
        mode = path.stat().st_mode
        data = path.read_bytes()
    except FileNotFoundError:
        raise IdentityError(f"no node identity at {path}: run `iollm init` first") from None
    except OSError as exc:
        raise IdentityError(f"cannot read {path}: {exc.strerror}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise IdentityError(f"{path} is readable by others (mode {mode & 0o777:o}): chmod 600 it")
    if len(data) != 32:
        raise IdentityError(f"{path} is not an iollm key (expected 32 bytes, got {len(data)})")
    return SigningKey(data)
