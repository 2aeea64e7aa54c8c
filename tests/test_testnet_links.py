"""The namespace testnet's link model (node/testnet/links.py), without any network."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from node.testnet.links import QUEUE_S, LinkModel, LinkShape

A, B, C = b"\xc6\x12\x01\x01", b"\xc6\x12\x01\x02", b"\xc6\x12\x01\x03"

shapes = st.builds(LinkShape, delay_ms=st.floats(0, 200), jitter_ms=st.floats(0, 50),
                   loss=st.floats(0, 0.5), rate_mbit=st.sampled_from([0.0, 1.0, 50.0, 100.0]))
packets = st.lists(st.tuples(st.sampled_from([A, B, C]), st.sampled_from([A, B, C]),
                             st.integers(20, 1500), st.floats(0, 0.01)), max_size=200)


def model(shape_a: LinkShape, shape_b: LinkShape, seed: int = 1) -> LinkModel:
    links = LinkModel(random.Random(seed))
    links.add_host(A, shape_a)
    links.add_host(B, shape_b)
    links.add_host(C)
    return links


def test_unshaped_link_delivers_at_once() -> None:
    assert model(LinkShape(), LinkShape()).route(A, B, 1500, 5.0).at == 5.0


def test_delay_adds_up_along_both_links() -> None:
    links = model(LinkShape(delay_ms=25), LinkShape(delay_ms=10))
    assert links.route(A, B, 100, 1.0).at == pytest.approx(1.035)
    assert links.route(B, C, 100, 1.0).at == pytest.approx(1.010)


def test_rate_serialises_packets_and_a_full_queue_drops() -> None:
    links = model(LinkShape(rate_mbit=1.0), LinkShape())
    times = [links.route(A, C, 1250, 0.0).at for _ in range(30)]  # 10 ms each at 1 Mbit/s
    assert times[:3] == pytest.approx([0.01, 0.02, 0.03])
    # 0.2 s of backlog at most: packets beyond it are tail-dropped, not queued for ever
    assert abs(sum(t is not None for t in times) - QUEUE_S / 0.01) <= 1
    assert links.route(A, C, 1250, 10.0).at == pytest.approx(10.01)


def test_loss_rate_is_the_shape_s() -> None:
    links = model(LinkShape(loss=0.1), LinkShape())
    delivered = sum(links.route(A, C, 100, 0.0).at is not None for _ in range(20_000))
    assert 17_600 < delivered < 18_400


def test_partition_cuts_between_groups_only_and_heal_restores() -> None:
    links = model(LinkShape(), LinkShape())
    links.partition([[A], [B]])  # C is in no group: a third group
    assert links.route(A, B, 100, 0.0).reason == "partition"
    assert links.route(B, C, 100, 0.0).reason == "partition"
    assert links.route(A, A, 100, 0.0).at == 0.0
    links.heal()
    assert links.route(A, B, 100, 0.0).at == 0.0


def test_packets_for_other_addresses_go_nowhere() -> None:
    links = model(LinkShape(), LinkShape())
    assert links.route(A, b"\x08\x08\x08\x08", 100, 0.0).reason == "unknown-destination"
    assert links.route(b"\x0a\x00\x00\x01", A, 100, 0.0).reason == "unknown-source"


@pytest.mark.parametrize("bad", [dict(loss=1.0), dict(loss=-0.1), dict(delay_ms=-1),
                                 dict(rate_mbit=-5), dict(jitter_ms=float("nan"))])
def test_bad_shapes_are_refused(bad: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        LinkShape(**bad)


@settings(max_examples=200, deadline=None)
@given(shapes, shapes, packets, st.integers(0, 2**32))
def test_no_reordering_no_early_delivery_rate_held(
        shape_a: LinkShape, shape_b: LinkShape,
        sent: list[tuple[bytes, bytes, int, float]], seed: int) -> None:
    links = model(shape_a, shape_b, seed)
    now = 0.0
    last: dict[tuple[bytes, bytes], float] = {}
    bits: dict[bytes, float] = {}
    for src, dst, size, gap in sent:
        now += gap
        verdict = links.route(src, dst, size, now)
        if verdict.at is None:
            assert verdict.reason in ("uplink", "downlink")
            continue
        floor = sum(s.delay_ms - s.jitter_ms for s in
                    ({A: shape_a, B: shape_b}.get(h, LinkShape()) for h in (src, dst)))
        assert verdict.at >= now + max(floor, 0) / 1000 - 1e-9  # never early
        assert verdict.at >= last.get((src, dst), 0.0)  # never reordered on one path
        last[(src, dst)] = verdict.at
        bits[src] = bits.get(src, 0.0) + size * 8
    for host, shape in ((A, shape_a), (B, shape_b)):
        if shape.rate_mbit and bits.get(host):
            # what went out of a rated uplink fits in its rate, plus one queue of backlog
            assert bits[host] <= shape.rate_mbit * 1e6 * (now + QUEUE_S) + 1500 * 8
