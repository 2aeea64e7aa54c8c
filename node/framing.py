"""Length-prefixed frames over libp2p streams, with deadlines at the IO edge.

py-libp2p's ``read(n)`` may return short reads and signals the end with ``StreamEOF``;
a peer killed mid-transfer looks exactly like a clean close, and a frozen peer makes
reads hang forever (shared/notes/libp2p-0.8.1.md). So every frame is length-prefixed,
every read has a deadline, and any failure resets the stream.
"""

from __future__ import annotations

import contextlib
import struct
from typing import Any

import trio

FRAME_HEADER = struct.Struct(">I")


class FrameError(Exception):
    """The peer closed early, stalled past the deadline, or announced an oversized frame."""


async def read_exactly(stream: Any, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        try:
            chunk = await stream.read(n - len(buf))
        except Exception as exc:  # StreamEOF, StreamReset, muxer errors: all "gone"
            raise FrameError(f"stream ended after {len(buf)} of {n} bytes ({exc!r})") from None
        if not chunk:
            raise FrameError(f"stream ended after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


async def read_frame(stream: Any, max_bytes: int, timeout: float) -> bytes:
    """Read one frame of at most ``max_bytes`` within ``timeout`` seconds."""
    with trio.move_on_after(timeout) as scope:
        (length,) = FRAME_HEADER.unpack(await read_exactly(stream, FRAME_HEADER.size))
        if length > max_bytes:
            raise FrameError(f"frame of {length} bytes exceeds the {max_bytes}-byte limit")
        return await read_exactly(stream, length)
    assert scope.cancelled_caught
    raise FrameError(f"no complete frame within {timeout:g} s")


async def write_frame(stream: Any, payload: bytes, timeout: float) -> None:
    with trio.move_on_after(timeout) as scope:
        await stream.write(FRAME_HEADER.pack(len(payload)) + payload)
        return
    assert scope.cancelled_caught
    raise FrameError(f"could not send a frame within {timeout:g} s")


async def reset_quietly(stream: Any) -> None:
    """Reset a stream after an error; a stream that is already gone is fine."""
    with trio.move_on_after(1), contextlib.suppress(Exception):
        await stream.reset()
