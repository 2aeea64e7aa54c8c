"""A raw hostile peer: malformed frames written on any protocol a node serves.

Used by the stream-guard tests (tests/test_stream_guard.py, in one process) and the
per-protocol test against a real daemon (tests/test_hostile_daemon.py). The attacker is
an ordinary py-libp2p host of ours; only what it writes on the stream is wrong.
"""

from __future__ import annotations

import contextlib
import random
from typing import Any

import trio
import varint
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID

from node.p2p.host import Network

MAX_VARINT = 2**63 - 1  # the largest length prefix a 64-bit reader can hold


def malformed_payloads(seed: int = 0) -> dict[str, bytes]:
    """The cases every protocol must survive, by name."""
    rng = random.Random(seed)
    return {
        # 11 bytes with the continuation bit set: longer than any valid varint.
        "bad varint": b"\xff" * 11,
        # A valid length, then bytes that are no message of any protocol (issue 14's
        # reproduction on /meshsub/1.1.0: py-libp2p's pubsub raised DecodeError).
        "not the message": varint.encode(16) + b"\xff" * 16,
        "max length, truncated body": varint.encode(MAX_VARINT) + b"\x00" * 32,
        # A 4 GiB frame announced: as our 4-byte prefix, and as the library's varint.
        "4 GiB prefix": b"\xff\xff\xff\xff" + b"\x00" * 32,
        "4 GiB varint": varint.encode(1 << 32) + b"\x00" * 32,
        "random bytes": rng.randbytes(rng.randrange(1, 2048)),
    }


async def attack(net: Network, peer: ID, protocol: str, payload: bytes,
                 timeout: float = 5.0) -> str:
    """Open a stream on ``protocol``, write ``payload``, close our side, and read until the
    other side resets, ends or goes quiet; returns how it ended (for messages only)."""
    with trio.move_on_after(timeout):
        try:
            stream = await net.host.new_stream(peer, [TProtocol(protocol)])
        except Exception as exc:  # refused: the connection was closed, or the protocol
            return f"not opened ({type(exc).__name__})"
        try:
            await stream.write(payload)
            await stream.close()
            while True:
                await stream.read(1 << 16)
        except Exception as exc:  # reset or EOF: the node is done with the stream
            return type(exc).__name__
        finally:
            with trio.move_on_after(1):
                await _quiet_reset(stream)
    return "timeout"


async def _quiet_reset(stream: Any) -> None:
    with contextlib.suppress(Exception):
        await stream.reset()
