"""node/p2p/framing.py FrameReader and write_bulk against a scripted stream (no network)."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from node.p2p.framing import (
    BULK_WRITE_BYTES,
    FrameEnded,
    FrameError,
    FrameReader,
    frame_prefix,
    write_bulk,
)


class ScriptedStream:
    """``read`` hands out the scripted pieces one per call (at most ``n`` bytes), then
    raises as py-libp2p does at the end; ``write`` records what was written."""

    def __init__(self, pieces: list[bytes]) -> None:
        self.pieces = list(pieces)
        self.reads = 0
        self.writes: list[bytes] = []

    async def read(self, n: int) -> bytes:
        await trio.lowlevel.checkpoint()
        self.reads += 1
        if not self.pieces:
            raise EOFError("end")  # stands for StreamEOF
        piece = self.pieces.pop(0)
        if len(piece) > n:
            self.pieces.insert(0, piece[n:])
            piece = piece[:n]
        return piece

    async def write(self, data: bytes | memoryview) -> None:
        await trio.lowlevel.checkpoint()
        self.writes.append(bytes(data))


def frames(*payloads: bytes) -> bytes:
    return b"".join(frame_prefix(len(p)) + p for p in payloads)


def read_all(pieces: list[bytes], count: int, max_bytes: int = 1 << 24) -> list[bytes]:
    async def main() -> list[bytes]:
        reader = FrameReader(ScriptedStream(pieces))
        return [await reader.read_frame(max_bytes, 5) for _ in range(count)]

    return trio.run(main)


def test_frames_cut_from_one_read_and_across_reads() -> None:
    big = bytes(range(256)) * 5000  # 1.28 MB, more than one read-ahead
    wire = frames(b"a", b"", b"hello", big, b"z")
    assert read_all([wire], 5) == [b"a", b"", b"hello", big, b"z"]
    # the same bytes cut at every awkward place: inside prefixes and payloads
    cuts = [wire[i:i + 3] for i in range(0, 20, 3)] + [wire[21:70000], wire[70000:]]
    assert read_all(cuts, 5) == [b"a", b"", b"hello", big, b"z"]


def test_many_small_frames_take_few_reads() -> None:
    stream = ScriptedStream([frames(*[b"x%d" % i for i in range(100)])])

    async def main() -> None:
        reader = FrameReader(stream)
        got = [await reader.read_frame(64, 5) for _ in range(100)]
        assert got == [b"x%d" % i for i in range(100)]

    trio.run(main)
    assert stream.reads == 1


def test_oversized_frame_and_early_end_are_frame_errors() -> None:
    # Only the peer's end is FrameEnded: a server closes after it and resets after the rest.
    with pytest.raises(FrameError, match="exceeds") as oversized:
        read_all([frames(b"x" * 100)], 1, max_bytes=99)
    assert not isinstance(oversized.value, FrameEnded)
    with pytest.raises(FrameEnded, match="ended after"):
        read_all([frames(b"x" * 100)[:50]], 1)


def test_stalled_stream_times_out() -> None:
    class Frozen:
        async def read(self, n: int) -> bytes:
            await trio.sleep_forever()
            raise AssertionError

    async def main() -> None:
        with pytest.raises(FrameError, match="within") as stalled:
            await FrameReader(Frozen()).read_frame(10, 0.05)
        assert not isinstance(stalled.value, FrameEnded)

    trio.run(main)


def test_a_begun_frame_has_the_body_deadline_not_the_idle_one() -> None:
    """A peer may idle long between frames, but a frame begun and then stalled is dropped
    at ``body_timeout(length)``, not held until the idle deadline (its buffer is memory);
    on a MockClock, so the deadlines are exact."""

    class HalfSent:
        def __init__(self) -> None:
            self.sent = False

        async def read(self, n: int) -> bytes:
            if not self.sent:
                self.sent = True
                await trio.sleep(50)  # idle for a while: within the idle deadline
                return frames(b"x" * 1000)[:600]
            await trio.sleep_forever()
            raise AssertionError

    lengths: list[int] = []

    def body_timeout(length: int) -> float:
        lengths.append(length)
        return 2.0

    async def main() -> None:
        start = trio.current_time()
        with pytest.raises(FrameError, match="body of a 1000-byte frame did not follow "
                                             "within 2 s"):
            await FrameReader(HalfSent()).read_frame(4096, 100, body_timeout=body_timeout)
        assert trio.current_time() - start == pytest.approx(52.0)
        assert lengths == [1000]
        # A frame that does complete in time is unaffected.
        reader = FrameReader(ScriptedStream([frames(b"y" * 10)]))
        assert await reader.read_frame(4096, 100, body_timeout=body_timeout) == b"y" * 10

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_write_bulk_cuts_into_one_noise_message_per_yamux_frame() -> None:
    data = bytes(range(256)) * 1000
    stream = ScriptedStream([])
    trio.run(write_bulk, stream, bytearray(data), 5)
    assert b"".join(stream.writes) == data
    assert all(len(w) <= BULK_WRITE_BYTES for w in stream.writes)
    assert BULK_WRITE_BYTES + 12 <= 65519  # a yamux frame fits one Noise plaintext
