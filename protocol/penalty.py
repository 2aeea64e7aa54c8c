"""Strikes against misbehaving peers, and the temporary bans they earn (sans-IO).

A peer strikes when something it sent made one of our handlers fail in a way an honest
peer cannot cause (bytes that do not decode, a message of the wrong kind, a handler
error): node/p2p's stream guard reports each such failure here with the time. A peer
with ``strikes`` failures within ``window_s`` seconds is banned for ``ban_s`` seconds:
node/ closes its connections and refuses new ones until the ban ends. A peer vanishing
(reset, EOF, timeout) is not a strike: honest peers crash and lose their links.

Memory is bounded: at most ``max_tracked`` peers are remembered at once; when full, the
peer whose latest strike is oldest is forgotten first, so a flood of fresh identities
cannot grow this table (each identity still needs ``strikes`` failures to be banned).
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Any

from protocol.errors import LocalProtocolError


@dataclass(frozen=True)
class PenaltyPolicy:
    strikes: int = 5  # failures within the window that ban a peer
    window_s: float = 60.0  # seconds a strike counts for
    ban_s: float = 600.0  # seconds a ban lasts
    max_tracked: int = 10_000  # peers remembered at once (strikes and bans)

    def __post_init__(self) -> None:
        if self.strikes < 1:
            raise LocalProtocolError(f"strikes must be at least 1, got {self.strikes}")
        if not (self.window_s > 0 and self.ban_s > 0):
            raise LocalProtocolError("window_s and ban_s must be positive")
        if self.max_tracked < 1:
            raise LocalProtocolError(f"max_tracked must be at least 1, got {self.max_tracked}")


class PeerPenalties:
    """Strike counts and bans by peer id, at times the caller passes in (seconds, any
    monotonic origin)."""

    def __init__(self, policy: PenaltyPolicy | None = None) -> None:
        self.policy = policy or PenaltyPolicy()
        # peer -> times of its strikes within the window, oldest first; least recently
        # struck peer first (the eviction order).
        self._strikes: OrderedDict[str, deque[float]] = OrderedDict()
        self._banned_until: OrderedDict[str, float] = OrderedDict()

    def strike(self, peer: str, now: float) -> bool:
        """Record one failure caused by ``peer``; True when this strike bans it (a peer
        already banned is not banned again, and its strikes are not counted)."""
        if self.is_banned(peer, now):
            return False
        times = self._strikes.pop(peer, None) or deque()
        while times and times[0] <= now - self.policy.window_s:
            times.popleft()
        times.append(now)
        if len(times) < self.policy.strikes:
            self._strikes[peer] = times
            self._evict(self._strikes)
            return False
        self._banned_until.pop(peer, None)
        self._banned_until[peer] = now + self.policy.ban_s
        self._evict(self._banned_until)
        return True

    def is_banned(self, peer: str, now: float) -> bool:
        until = self._banned_until.get(peer)
        if until is None:
            return False
        if now < until:
            return True
        del self._banned_until[peer]
        return False

    def banned(self, now: float) -> list[str]:
        """The peers banned at ``now``."""
        return [p for p in list(self._banned_until) if self.is_banned(p, now)]

    def tracked(self) -> int:
        """Peers remembered (with strikes or a ban, expired ones included until touched)."""
        return len(self._strikes) + len(self._banned_until)

    def _evict(self, table: OrderedDict[str, Any]) -> None:
        while len(table) > self.policy.max_tracked:
            table.popitem(last=False)
