"""protocol/penalty.py: strikes and bans, against a plain reference model (no network)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.errors import LocalProtocolError
from protocol.penalty import PeerPenalties, PenaltyPolicy

POLICY = PenaltyPolicy(strikes=3, window_s=10.0, ban_s=30.0, max_tracked=10_000)
PEERS = ["a", "b", "c"]


def test_strikes_within_the_window_ban_until_the_ban_ends() -> None:
    p = PeerPenalties(POLICY)
    assert not p.strike("a", 0.0) and not p.strike("a", 5.0)
    assert p.strike("a", 9.0)  # the third within 10 s
    assert p.is_banned("a", 9.0) and p.is_banned("a", 38.9) and p.banned(20.0) == ["a"]
    assert not p.strike("a", 10.0)  # banned: not banned again
    assert not p.is_banned("a", 39.0) and p.banned(39.0) == []
    # After the ban the slate is clean: it takes three new strikes.
    assert not p.strike("a", 40.0) and not p.strike("a", 41.0) and p.strike("a", 42.0)


def test_strikes_older_than_the_window_do_not_count() -> None:
    p = PeerPenalties(POLICY)
    for t in (0.0, 10.0, 20.0, 30.0):  # each one window after the previous
        assert not p.strike("a", t)
    assert not p.is_banned("a", 30.0)


def test_memory_is_bounded_by_max_tracked() -> None:
    p = PeerPenalties(PenaltyPolicy(strikes=2, max_tracked=100))
    for i in range(10_000):
        p.strike(f"peer-{i}", float(i))
    assert p.tracked() <= 200


@pytest.mark.parametrize("bad", [dict(strikes=0), dict(window_s=0), dict(ban_s=-1),
                                 dict(max_tracked=0)])
def test_a_bad_policy_is_refused(bad: dict[str, float]) -> None:
    with pytest.raises(LocalProtocolError):
        PenaltyPolicy(**bad)  # type: ignore[arg-type]


def reference(events: list[tuple[str, float]], peer: str, now: float) -> bool:
    """Banned at ``now``: replay every strike with the rules written out plainly."""
    banned_until: dict[str, float] = {}
    counted: dict[str, list[float]] = {}
    for who, t in events:
        if banned_until.get(who, -1.0) > t:
            continue
        counted[who] = [s for s in counted.get(who, []) if s > t - POLICY.window_s] + [t]
        if len(counted[who]) >= POLICY.strikes:
            banned_until[who] = t + POLICY.ban_s
            counted[who] = []
    return banned_until.get(peer, -1.0) > now


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(PEERS), st.floats(0, 5, allow_nan=False)),
                max_size=40),
       st.floats(0, 50, allow_nan=False))
def test_matches_the_reference(steps: list[tuple[str, float]], probe_after: float) -> None:
    p = PeerPenalties(POLICY)
    events, now = [], 0.0
    for peer, dt in steps:  # time only moves forward, as the caller's clock does
        now += dt
        events.append((peer, now))
        newly = p.strike(peer, now)
        assert newly == (reference(events, peer, now) and not reference(events[:-1], peer, now))
    for peer in PEERS:
        assert p.is_banned(peer, now + probe_after) == reference(events, peer, now + probe_after)
