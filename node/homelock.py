"""One daemon per node home: an exclusive lock held for the daemon's whole life.

Two daemons on one home share a key, a database and node.json: the second one's exit
removed the first one's node.json, and on a validator home the first was left unable to
follow its own chain. The lock is ``flock`` on ``<home>/daemon.lock``: the kernel releases
it when the process ends in any way (kill -9 included), so nothing is left to clean up.
The holder writes its pid into the file, for the message the next one prints.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

LOCK_FILE = "daemon.lock"


class HomeLocked(Exception):
    """Another daemon holds the home."""


@contextlib.contextmanager
def hold_home(home: Path) -> Iterator[None]:
    """Hold ``home``'s lock until the block ends; HomeLocked at once if another process
    holds it."""
    path = home / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise HomeLocked(f"a daemon is already running on {home} (pid {holder}); stop "
                             f"it first (kill {holder}), or use another --home") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock, if held
