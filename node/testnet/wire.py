"""The relay between the testnet's hosts: ``python -m node.testnet.wire --dir DIR``.

Each host's only interface is a tun device; this process holds them all, reads every IPv4
packet a host sends, asks the link model (links.py) when it arrives or whether it is lost,
and writes it to the destination host's tun at that time. It reads ``DIR/net.json`` at
start and again on SIGHUP (new shapes, a partition, a heal), and exits on SIGTERM or when
its hosts' devices are gone (their namespaces deleted). Counters go to
``DIR/wire-stats.json`` on each reload and at exit.

A relay in Python costs about 10 microseconds a packet (the receiving host's TCP work,
done in the relay's write, included): a fifth of a core for a 100 Mbit/s stream and a
third for three 50 Mbit/s streams; an unshaped testnet goes through it too (one path to
test). It runs under the real-time policy SCHED_FIFO (``RT_PRIORITY``) where the system
allows it, else at nice -20: a link must not slow down because the hosts' own processes
keep the CPUs busy. At the default policy, on 2 cores with a load average of 40, a
100 Mbit/s link carried one TCP stream at 43 Mbit/s and three 50 Mbit/s links 46 Mbit/s
in all; under SCHED_FIFO at that load, 92 and 132 Mbit/s, as on an idle machine. A
real-time task that never sleeps could starve its CPU: this one blocks in epoll whenever
no packet is due, and the kernel's real-time throttling (95% of each second) bounds it.
"""

from __future__ import annotations

import argparse
import errno
import heapq
import json
import os
import random
import select
import signal
import sys
import time
from collections import Counter
from pathlib import Path

from node.testnet.links import LinkModel, LinkShape
from node.testnet.netns import STATE_FILE, STATS_FILE, load_state, open_tun

READ_BATCH = 64  # packets read from one device before the others get a turn
RT_PRIORITY = 10  # SCHED_FIFO priority: above every normal task, below the kernel's own


def prioritise() -> str:
    """Run this process ahead of the hosts' (see the module's docstring); says how."""
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(RT_PRIORITY))
        return f"fifo-{RT_PRIORITY}"
    except OSError:  # no CAP_SYS_NICE, or a container without real-time runtime
        pass
    try:
        os.setpriority(os.PRIO_PROCESS, 0, -20)
        return "nice-20"
    except OSError:
        return "default"


class Wire:
    def __init__(self, directory: Path, rng: random.Random) -> None:
        self.directory = directory
        self.model = LinkModel(rng)
        self.fds: dict[bytes, int] = {}  # host address -> its tun
        self.pending: list[tuple[float, int, int, bytes]] = []  # (at, seq, fd, packet)
        self.seq = 0
        self.stats: Counter[str] = Counter()
        self.generation = 0
        self.scheduling = "default"  # what prioritise() obtained

    def load(self) -> None:
        state = load_state(self.directory)
        by_name: dict[str, bytes] = {}
        for host in state.hosts:
            addr = host.addr.packed
            by_name[host.name] = addr
            if addr not in self.fds:
                self.fds[addr] = open_tun(host.netns)
                self.model.add_host(addr)
            self.model.set_shape(addr, state.shapes.get(host.name, LinkShape()))
        self.model.partition([[by_name[n] for n in group] for group in state.groups])
        self.generation = state.generation

    def write_stats(self) -> None:
        path = self.directory / STATS_FILE
        tmp = path.with_suffix(".tmp")
        stats = {"generation": self.generation, "scheduling": self.scheduling, **self.stats}
        tmp.write_text(json.dumps(stats, sort_keys=True) + "\n")
        tmp.replace(path)

    def receive(self, fd: int, now: float) -> bool:
        """Read what one host sent; False once its device is gone."""
        for _ in range(READ_BATCH):
            try:
                packet = os.read(fd, 65536)
            except BlockingIOError:
                return True
            except OSError as exc:
                if exc.errno in (errno.EBADFD, errno.EIO, errno.ENODEV):
                    return False
                raise
            if len(packet) < 20 or packet[0] >> 4 != 4:
                self.stats["dropped-not-ipv4"] += 1
                continue
            verdict = self.model.route(packet[12:16], packet[16:20], len(packet), now)
            if verdict.at is None:
                self.stats[f"dropped-{verdict.reason}"] += 1
                continue
            self.seq += 1
            heapq.heappush(self.pending, (verdict.at, self.seq, self.fds[packet[16:20]], packet))
        return True

    def deliver(self, now: float) -> None:
        while self.pending and self.pending[0][0] <= now:
            _, _, fd, packet = heapq.heappop(self.pending)
            try:
                os.write(fd, packet)
                self.stats["delivered"] += 1
            except OSError:  # the device is full or gone: a lost packet, as on a wire
                self.stats["dropped-write"] += 1

    def run(self) -> None:
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_r, False)
        os.set_blocking(wake_w, False)
        signal.set_wakeup_fd(wake_w)
        flags = {"reload": False, "stop": False}
        signal.signal(signal.SIGHUP, lambda *_: flags.__setitem__("reload", True))
        signal.signal(signal.SIGTERM, lambda *_: flags.__setitem__("stop", True))
        signal.signal(signal.SIGINT, lambda *_: flags.__setitem__("stop", True))
        self.scheduling = prioritise()
        self.load()
        self.write_stats()
        poller = select.epoll()
        poller.register(wake_r, select.EPOLLIN)
        for fd in self.fds.values():
            poller.register(fd, select.EPOLLIN)
        live = set(self.fds.values())
        while not flags["stop"] and live:
            timeout = -1.0
            if self.pending:
                timeout = max(0.0, self.pending[0][0] - time.monotonic())
            for fd, _ in poller.poll(timeout):
                now = time.monotonic()
                if fd == wake_r:
                    while True:
                        try:
                            os.read(wake_r, 512)
                        except BlockingIOError:
                            break
                elif fd in live and not self.receive(fd, now):
                    live.discard(fd)
                    poller.unregister(fd)
            if flags["reload"]:
                flags["reload"] = False
                known = set(self.fds.values())
                self.load()
                for fd in set(self.fds.values()) - known:
                    poller.register(fd, select.EPOLLIN)
                    live.add(fd)
                self.write_stats()
            self.deliver(time.monotonic())
        self.write_stats()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m node.testnet.wire",
                                     description="relay packets between the testnet's hosts")
    parser.add_argument("--dir", required=True, help="testnet directory (holds net.json)")
    parser.add_argument("--prefix", required=True,
                        help="the testnet's prefix (lets teardown find this process)")
    parser.add_argument("--seed", type=int, default=None, help="seed of loss and jitter")
    args = parser.parse_args(argv)
    directory = Path(args.dir)
    if not (directory / STATE_FILE).exists():
        print(f"wire: no {STATE_FILE} in {directory}", file=sys.stderr)
        return 1
    Wire(directory, random.Random(args.seed)).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
