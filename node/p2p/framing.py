"""Length-prefixed frames over libp2p streams, with deadlines at the IO edge.

py-libp2p's ``read(n)`` may return short reads and signals the end with ``StreamEOF``;
a peer killed mid-transfer looks exactly like a clean close, and a frozen peer makes
reads hang forever (shared/notes/libp2p-0.8.1.md). So every frame is length-prefixed,
every read has a deadline, and any failure resets the stream.
"""

from __future__ import annotations

import contextlib
import struct
from collections import deque
from collections.abc import Callable
from typing import Any

import trio
from libp2p.security.noise.io import MAX_PLAINTEXT_LENGTH
from libp2p.stream_muxer.yamux.yamux import HEADER_SIZE as YAMUX_HEADER_BYTES
from libp2p.stream_muxer.yamux.yamux import MAX_MESSAGE_SIZE as YAMUX_MAX_FRAME_BYTES

FRAME_HEADER = struct.Struct(">I")
READ_AHEAD_BYTES = 1 << 20  # the most one FrameReader read asks the stream for
# The most data one yamux frame carries when it must fit in one Noise message: py-libp2p's
# yamux cuts a write into frames of 64 KiB (12 header bytes + 65524), one byte over
# Noise's 65519-byte plaintext limit, so every frame of a bulk write crosses the wire as
# two Noise messages (65519 + 17 bytes), each with its own length read, decryption and
# socket reads on the receiver. Writes cut at this size keep it at one.
BULK_WRITE_BYTES = min(MAX_PLAINTEXT_LENGTH, YAMUX_MAX_FRAME_BYTES) - YAMUX_HEADER_BYTES
# A FrameReader that needs more than this and last found less waits COALESCE_WAIT_S before
# its next read: a reader that keeps up with the wire otherwise reads every yamux frame
# alone, and each read sends a window update (py-libp2p releases credit on every read)
# that the sender must decrypt and handle, as many small messages as data messages.
COALESCE_BELOW_BYTES = 4 * BULK_WRITE_BYTES
COALESCE_WAIT_S = 0.001


class FrameError(Exception):
    """The peer closed early, stalled past the deadline, or announced an oversized frame."""


class FrameEnded(FrameError):
    """The peer closed or reset the stream: nothing is owed to it. The other FrameErrors
    (a stall, an oversized frame) are the peer's fault, and a server resets the stream,
    since a close would only end its own side and leave the peer writing into it."""


async def read_exactly(stream: Any, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        try:
            chunk = await stream.read(n - len(buf))
        except Exception as exc:  # StreamEOF, StreamReset, muxer errors: all "gone"
            raise FrameEnded(f"stream ended after {len(buf)} of {n} bytes ({exc!r})") from None
        if not chunk:
            raise FrameEnded(f"stream ended after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


async def read_frame(stream: Any, max_bytes: int, timeout: float, *,
                     body_timeout: Callable[[int], float] | None = None) -> bytes:
    """Read one frame of at most ``max_bytes`` within ``timeout`` seconds. With
    ``body_timeout``, ``timeout`` is for the header only and the body of a frame of
    ``length`` bytes must follow within ``body_timeout(length)``: a stream may idle long
    between frames, but a frame begun is not held half-sent (its buffer is memory)."""
    limit = f"no complete frame within {timeout:g} s"
    with trio.move_on_after(timeout) as scope:
        header = await read_exactly(stream, FRAME_HEADER.size)
        length, limit = _begin_body(header, max_bytes, scope, body_timeout, limit)
        return await read_exactly(stream, length)
    assert scope.cancelled_caught
    raise FrameError(limit)


def _begin_body(header: bytes, max_bytes: int, scope: trio.CancelScope,
                body_timeout: Callable[[int], float] | None, limit: str) -> tuple[int, str]:
    """A frame's length from its header (FrameError over ``max_bytes``); with
    ``body_timeout``, the body's deadline set on ``scope`` and the error that names it."""
    (length,) = FRAME_HEADER.unpack(header)
    if length > max_bytes:
        raise FrameError(f"frame of {length} bytes exceeds the {max_bytes}-byte limit")
    if body_timeout is not None:
        body_s = body_timeout(length)
        limit = f"the body of a {length}-byte frame did not follow within {body_s:g} s"
        scope.deadline = trio.current_time() + body_s
    return length, limit


async def write_frame(stream: Any, payload: bytes, timeout: float) -> None:
    with trio.move_on_after(timeout) as scope:
        await stream.write(FRAME_HEADER.pack(len(payload)) + payload)
        return
    assert scope.cancelled_caught
    raise FrameError(f"could not send a frame within {timeout:g} s")


async def write_bulk(stream: Any, data: bytes | bytearray | memoryview, timeout: float) -> None:
    """Write a large buffer within ``timeout`` seconds, without copying it, in pieces of
    BULK_WRITE_BYTES (one yamux frame and one Noise message each)."""
    view = memoryview(data).cast("B")
    with trio.move_on_after(timeout) as scope:
        for start in range(0, len(view), BULK_WRITE_BYTES):
            await stream.write(view[start:start + BULK_WRITE_BYTES])
        return
    assert scope.cancelled_caught
    raise FrameError(f"could not send {len(view)} bytes within {timeout:g} s")


def frame_prefix(length: int) -> bytes:
    """The 4-byte length prefix of a frame of ``length`` bytes."""
    return FRAME_HEADER.pack(length)


class FrameReader:
    """Frames from one stream through a read-ahead buffer, for streams that carry many
    frames in a row (pipelined requests and answers).

    Every py-libp2p ``read`` takes two locks and sends a yamux window update, and a frame
    read with ``read_frame`` costs at least two reads (the prefix, then the body): on a
    chunk stream that was a large share of the receiver's work per MiB. Here one read
    takes all that the muxer holds (up to READ_AHEAD_BYTES), and frames are cut from what
    was read; a frame inside one read is a slice, a longer one one join. What is buffered
    here beyond the frame being read is at most READ_AHEAD_BYTES. Same errors as
    ``read_frame``; after one the reader (and its stream) must not be used again.
    """

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self._pieces: deque[bytes] = deque()
        self._offset = 0  # bytes of _pieces[0] already taken
        self._available = 0  # bytes buffered, less _offset
        self._last_read = 0  # bytes the latest stream read returned

    @property
    def buffered(self) -> int:
        return self._available

    async def _fill(self, n: int) -> None:
        while self._available < n:
            if self._last_read < COALESCE_BELOW_BYTES < n - self._available:
                # The last read found the muxer's buffer nearly empty (this side keeps up
                # with the wire) and much more is needed: let it fill a little first.
                await trio.sleep(COALESCE_WAIT_S)
            try:
                piece = await self.stream.read(READ_AHEAD_BYTES)
            except Exception as exc:  # StreamEOF, StreamReset, muxer errors: all "gone"
                raise FrameEnded(f"stream ended after {self._available} of {n} bytes "
                                 f"({exc!r})") from None
            if not piece:
                raise FrameEnded(f"stream ended after {self._available} of {n} bytes")
            self._pieces.append(piece)
            self._available += len(piece)
            self._last_read = len(piece)

    def _take(self, n: int) -> bytes:
        """``n`` buffered bytes (the caller checked they are there)."""
        first = self._pieces[0]
        start, end = self._offset, self._offset + n
        if end <= len(first):  # the usual case: inside one piece
            data = first if start == 0 and end == len(first) else first[start:end]
            if end == len(first):
                self._pieces.popleft()
                end = 0
            self._offset = end
            self._available -= n
            return data
        parts: list[bytes | memoryview] = []
        need = n
        while need:
            piece = self._pieces[0]
            view = memoryview(piece)[self._offset:]
            if len(view) <= need:
                parts.append(view)
                need -= len(view)
                self._pieces.popleft()
                self._offset = 0
            else:
                parts.append(view[:need])
                self._offset += need
                need = 0
        self._available -= n
        return b"".join(parts)

    async def read_frame(self, max_bytes: int, timeout: float, *,
                         body_timeout: Callable[[int], float] | None = None) -> bytes:
        """One frame of at most ``max_bytes`` within ``timeout`` seconds; ``body_timeout``
        as in :func:`read_frame` (``timeout`` then bounds the wait for the header)."""
        limit = f"no complete frame within {timeout:g} s"
        with trio.move_on_after(timeout) as scope:
            await self._fill(FRAME_HEADER.size)
            length, limit = _begin_body(self._take(FRAME_HEADER.size), max_bytes, scope,
                                        body_timeout, limit)
            await self._fill(length)
            return self._take(length) if length else b""
        assert scope.cancelled_caught
        raise FrameError(limit)


async def reset_quietly(stream: Any) -> None:
    """Reset a stream after an error; a stream that is already gone is fine."""
    with trio.move_on_after(1), contextlib.suppress(Exception):
        await stream.reset()
