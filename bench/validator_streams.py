"""Validator-stream read path: CPU per megabyte received, FrameReader against read_frame.

    .venv/bin/python bench/validator_streams.py [--mib 64] [--rounds 3]

Two hosts in this process (py-libp2p, Noise, Yamux over 127.0.0.1). One writes what a
validator writes on its validator streams (node/chain/links.py), one frame per message
with ``write_frame``: tx batches of 150 receipts (856 bytes each, as the chain benchmark
sends them), a proposal of 600 of them, and votes, in that mix, PACE_S apart, until
``--mib`` MiB have gone; the other reads them, (a) frame by frame with ``read_frame``
(the baseline: what the validator streams did before) or (b) through ``FrameReader``.
Both sides run in this process, so its CPU time is the cost of moving those bytes,
sender and receiver together, whatever else runs on the machine. Rounds alternate (a),
(b); the medians count.

Goal (exit 1 when missed): (b) costs at most GOAL_RATIO of (a)'s CPU per MiB.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any

GOAL_RATIO = 0.9
RECEIPT = 856
MESSAGES = [b"t" * (150 * RECEIPT + 16), b"p" * (600 * RECEIPT + 400), b"v" * 300, b"v" * 300]
PROTOCOL = "/iollm/bench-frames/1.0.0"
PACE_S = 0.002


def one_run(mib: float, reader_kind: str) -> tuple[float, float]:
    """(MiB moved, CPU seconds of this process) for one transfer."""
    import trio
    from libp2p.custom_types import TProtocol
    from multiaddr import Multiaddr
    from nacl.signing import SigningKey

    from node.p2p.framing import FrameReader, read_frame, write_frame
    from node.p2p.host import open_network, peer_info_from_multiaddr

    total = int(mib * (1 << 20))
    out: dict[str, float] = {}

    async def main() -> None:
        done = trio.Event()
        got = 0

        async def handler(stream: Any) -> None:
            nonlocal got
            reader = FrameReader(stream)
            while got < total:
                if reader_kind == "frame_reader":
                    frame = await reader.read_frame(1 << 21, 30)
                else:
                    frame = await read_frame(stream, 1 << 21, 30)
                got += len(frame)
            done.set()

        addr = [Multiaddr("/ip4/127.0.0.1/tcp/0")]
        async with open_network(SigningKey.generate(), addr, {}) as server, \
                open_network(SigningKey.generate(), addr, {}) as client:
            server.host.set_stream_handler(TProtocol(PROTOCOL), handler)
            info = peer_info_from_multiaddr(str(server.listen_addrs()[0]))
            await client.connect(info)
            with trio.fail_after(600):
                stream = await client.host.new_stream(info.peer_id, [TProtocol(PROTOCOL)])
                cpu0 = time.process_time()
                sent, i = 0, 0
                while sent < total:
                    message = MESSAGES[i % len(MESSAGES)]
                    await write_frame(stream, message, 30)
                    sent += len(message)
                    # Messages come apart in time on a validator stream: the reader has
                    # taken the last one when the next begins.
                    await trio.sleep(PACE_S)
                    i += 1
                await done.wait()
                out["cpu"] = time.process_time() - cpu0
                out["mib"] = got / (1 << 20)
            await stream.reset()

    trio.run(main)
    return out["mib"], out["cpu"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mib", type=float, default=64.0, help="MiB moved per run (default 64)")
    p.add_argument("--rounds", type=int, default=3, help="runs of each reader (default 3)")
    args = p.parse_args()
    per_mib: dict[str, list[float]] = {"read_frame": [], "frame_reader": []}
    for r in range(args.rounds):
        for kind in per_mib:
            mib, cpu = one_run(args.mib, kind)
            per_mib[kind].append(1000 * cpu / mib)
            print(f"round {r + 1}: {kind:12s} {mib:.0f} MiB, {cpu:.2f} CPU s, "
                  f"{per_mib[kind][-1]:.2f} ms per MiB", flush=True)
    a, b = (statistics.median(per_mib[k]) for k in ("read_frame", "frame_reader"))
    print(f"(a) read_frame:  {a:.2f} ms of CPU per MiB (median)")
    print(f"(b) FrameReader: {b:.2f} ms of CPU per MiB (median) = {b / a:.2f}x (a)")
    if b > GOAL_RATIO * a:
        print(f"goal missed: (b) {b / a:.2f}x (a) > {GOAL_RATIO}x")
        return 1
    print(f"goal met: (b) <= {GOAL_RATIO}x (a)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
