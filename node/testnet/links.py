"""The link model of the namespace testnet, without IO.

Every host hangs off the testnet by one link of its own, shaped both ways alike: a packet
from A to B crosses A's link (its uplink queue, then its delay) and then B's link (its
downlink queue, then its delay). So between two hosts each shaped with ``delay_ms = d``
the one-way delay is 2d and the round trip 4d; a host whose link is unshaped adds nothing.
A queue serves at the link's rate and holds at most ``QUEUE_S`` of backlog (tail drop,
as tbf's ``latency``); loss drops each packet on each link with its probability; jitter
adds a uniform draw from [-jitter, +jitter] to the delay, but never reorders a link's
packets (a real path keeps order; netem's reordering would make TCP retransmit for
nothing). Hosts in different groups of a partition reach nothing of each other.

Why not tc netem: the kernels this project runs on (CI's included) are built without
sch_netem, and tbf alone cannot delay or drop at random; the relay in wire.py applies
this model instead, on any kernel with tun devices.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass, field

QUEUE_S = 0.2  # backlog a link queue holds before it drops: above any BDP we test


@dataclass(frozen=True)
class LinkShape:
    """How one host's link behaves, each direction alike. Zero means not at all."""

    delay_ms: float = 0.0
    jitter_ms: float = 0.0
    loss: float = 0.0  # fraction of packets lost, 0..1
    rate_mbit: float = 0.0  # 0: no rate limit

    def __post_init__(self) -> None:
        if not (self.delay_ms >= 0 and self.jitter_ms >= 0 and self.rate_mbit >= 0):
            raise ValueError("delay, jitter and rate must be >= 0")
        if not 0.0 <= self.loss < 1.0:
            raise ValueError(f"loss must be a fraction in [0, 1), not {self.loss}")

    @property
    def shaped(self) -> bool:
        return bool(self.delay_ms or self.jitter_ms or self.loss or self.rate_mbit)

    def to_json(self) -> dict[str, float]:
        return {"delay_ms": self.delay_ms, "jitter_ms": self.jitter_ms, "loss": self.loss,
                "rate_mbit": self.rate_mbit}

    @classmethod
    def from_json(cls, obj: dict[str, float]) -> LinkShape:
        return cls(float(obj.get("delay_ms", 0)), float(obj.get("jitter_ms", 0)),
                   float(obj.get("loss", 0)), float(obj.get("rate_mbit", 0)))


@dataclass
class _Queue:
    """One direction of one link: when its queue next frees, and its last packet out."""

    free_at: float = 0.0
    last_out: float = 0.0

    def cross(self, shape: LinkShape, size: int, now: float, rng: random.Random) -> float | None:
        if shape.loss and rng.random() < shape.loss:
            return None
        t = now
        if shape.rate_mbit:
            start = max(now, self.free_at)
            if start - now > QUEUE_S:
                return None  # the queue is full
            t = self.free_at = start + size * 8 / (shape.rate_mbit * 1e6)
        delay = shape.delay_ms
        if shape.jitter_ms:
            delay += rng.uniform(-shape.jitter_ms, shape.jitter_ms)
        t = max(t + max(delay, 0.0) / 1000, self.last_out)
        self.last_out = t
        return t


@dataclass
class _Host:
    shape: LinkShape
    up: _Queue = field(default_factory=_Queue)
    down: _Queue = field(default_factory=_Queue)
    group: int = 0


@dataclass
class Verdict:
    """Where a packet goes: ``at`` (seconds, the caller's clock) or dropped for ``reason``."""

    at: float | None
    reason: str = ""


class LinkModel:
    """The testnet's links, keyed by host address (4 bytes, as in the IPv4 header)."""

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng
        self._hosts: dict[bytes, _Host] = {}

    def add_host(self, addr: bytes, shape: LinkShape = LinkShape()) -> None:
        self._hosts[addr] = _Host(shape)

    def hosts(self) -> list[bytes]:
        return list(self._hosts)

    def set_shape(self, addr: bytes, shape: LinkShape) -> None:
        self._hosts[addr].shape = shape

    def partition(self, groups: Iterable[Iterable[bytes]]) -> None:
        """Cut the hosts into groups; hosts named in no group form one more group."""
        for host in self._hosts.values():
            host.group = 0
        for number, group in enumerate(groups, start=1):
            for addr in group:
                self._hosts[addr].group = number

    def heal(self) -> None:
        self.partition(())

    def route(self, src: bytes, dst: bytes, size: int, now: float) -> Verdict:
        sender, receiver = self._hosts.get(src), self._hosts.get(dst)
        # Only the testnet's own hosts exist: anything else is routed nowhere.
        if sender is None:
            return Verdict(None, "unknown-source")
        if receiver is None:
            return Verdict(None, "unknown-destination")
        if sender.group != receiver.group:
            return Verdict(None, "partition")
        at = sender.up.cross(sender.shape, size, now, self._rng)
        if at is None:
            return Verdict(None, "uplink")
        at = receiver.down.cross(receiver.shape, size, at, self._rng)
        if at is None:
            return Verdict(None, "downlink")
        return Verdict(at)
