"""Capability discovery on tests/memnet.py and trio's MockClock: nodes built by the
daemon's wiring (tests/cluster.py -> node.daemon.build_node) on an in-memory network, so
hours of record lifetime pass in virtual time. The logic of the real-socket tests of
tests/test_discovery_multinode.py: every node finds every other and filters exactly; a
provide that reached nobody is tried again; forged and expired records are refused; a
departed node disappears after expiry; gossip refuses forgeries and keeps the newest;
record sync fills a node and survives a lying or frozen peer; a frozen peer does not
hang a direct fetch."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import pytest
import trio

from node.config import DiscoverySection
from node.discovery.service import CAPABILITY_PROTOCOL, CAPABILITY_TOPIC
from protocol.capability import CapabilityRecord, EnvReport, capability_dht_key, class_provider_key
from protocol.errors import RemoteProtocolError
from tests.cluster import Cluster, LocalNode, memnet_cluster
from tests.memnet import MemNode, run_on_mock_clock
from tests.netutil import make_env
from tests.test_discovery_multinode import all_published, record_sync_scenario, sign_as

pytestmark = pytest.mark.timeout(60)
CONFIG = DiscoverySection(refresh_interval_s=3600, record_ttl_s=7200, query_timeout_s=5,
                          retry_interval_s=2)
# For the tests that let hours pass: each gossip round is a SQLite write per receiver, the
# bulk of their real time at the default one a minute.
HOURS = DiscoverySection(refresh_interval_s=3600, record_ttl_s=7200, query_timeout_s=10,
                         rpc_timeout_s=1, gossip_interval_s=900)
GPU_SETS: list[tuple[int, ...]] = [(), (8,), (12,), (16,), (24,), (24, 24), (40,), (48,),
                                   (80,), ()]


def cluster(tmp_path: Path, envs: list[EnvReport], config: DiscoverySection = CONFIG,
            **options: Any) -> AbstractAsyncContextManager[Cluster]:
    return memnet_cluster(tmp_path, envs, config, **options)


def run(fn: Callable[[], Awaitable[None]], virtual_s: float = 20_000) -> None:
    async def main() -> None:
        with trio.fail_after(virtual_s):
            await fn()

    run_on_mock_clock(main)


def mem(node: LocalNode) -> MemNode:
    assert isinstance(node.net, MemNode)
    return node.net


def forgery(of: LocalNode, by: LocalNode, now_ms: int) -> bytes:
    genuine = of.discovery.current
    assert genuine is not None
    return sign_as(by.key, CapabilityRecord(
        peer_id=of.peer_id, addrs=genuine.record.addrs, software="evil",
        seq=genuine.record.seq + 100, created_ms=now_ms, expires_ms=now_ms + 3_600_000,
        env=make_env((80, 80))))


def test_every_node_finds_every_other_and_filters_exactly(tmp_path: Path) -> None:
    envs = [make_env(g, tflops=10.0 + i) for i, g in enumerate(GPU_SETS)]

    async def main() -> None:
        async with cluster(tmp_path, envs) as nodes:
            await all_published(nodes)
            await trio.sleep(10)  # gossip and the first syncs settle
            everyone = {n.peer_id for n in nodes}
            for n in nodes:
                assert {r.peer_id for r in await n.discovery.query_gpus()} == everyone
            for asker in (nodes[0], nodes[7]):
                for target in nodes:
                    cap = await asker.discovery.record_of(target.peer_id)
                    assert cap is not None and cap.record.env == target.discovery.env
            with_gpu = [(n, g) for n, g in zip(nodes, GPU_SETS, strict=True) if g]
            by_min = {None: everyone, 8: {n.peer_id for n, _ in with_gpu},
                      24: {n.peer_id for n, g in with_gpu if g[0] >= 24},
                      41: {n.peer_id for n, g in with_gpu if g[0] >= 48},
                      80: {nodes[8].peer_id}, 81: set()}
            asker = nodes[3]
            for min_vram, expected in by_min.items():
                got = await asker.discovery.query_gpus(min_vram_gb=min_vram)
                assert {r.peer_id for r in got} == expected, min_vram
                mems = [max((g.total_memory_bytes for g in r.env.gpus), default=0) for r in got]
                assert mems == sorted(mems, reverse=True)
            got = await asker.discovery.query_gpus(min_tflops=15.5)
            assert {r.peer_id for r in got} == {n.peer_id for n in nodes[6:]}
            # The DHT alone: class provider records and values.
            found = await asker.discovery.find_providers(class_provider_key("gpu-mem-24"))
            assert {p.peer_id.to_base58() for p in found} == by_min[24]
            for target in nodes:
                if target is not asker:
                    cap = await asker.discovery.record_from_network(target.peer_id)
                    assert cap is not None
                    assert cap.envelope == target.discovery.current.envelope  # type: ignore[union-attr]

    run(main)


def test_a_provide_that_reached_nobody_is_tried_again(tmp_path: Path) -> None:
    key = bytes.fromhex(class_provider_key("gpu-mem-24"))

    async def main() -> None:
        async with cluster(tmp_path, [make_env((24,)), make_env()], start=1) as nodes:
            await all_published(nodes)
            first = nodes[0].net.peer_id
            joiner = await nodes.restart(1)
            assert first not in {p.peer_id for p in mem(joiner).local_providers(key)}
            with trio.fail_after(30):  # the retries come within 2 + 4 + 8 s, not at 3600 s
                while first not in {p.peer_id for p in mem(joiner).local_providers(key)}:
                    await trio.sleep(0.5)

    run(main)


def test_a_put_retried_after_a_re_sign_puts_the_newer_record(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """py-libp2p refuses to put a record older than the one in its own store, and a
    re-sign stores the newer one there at once: a publish whose put failed and that
    retried the record it began with failed every retry (and warned) once the node had
    re-signed meanwhile. The retry now defers to the newer record's own publish."""
    caplog.set_level(logging.INFO, logger="node.discovery.service")

    async def main() -> None:
        async with cluster(tmp_path, [make_env(), make_env(), make_env()]) as nodes:
            await all_published(nodes)
            node = nodes[0]
            key = capability_dht_key(node.peer_id).encode()
            first = node.discovery.current
            mem(node).failing_puts = 1
            mem(node).change_addrs()  # re-signs; that publish's put fails once
            while mem(node).failing_puts or node.discovery.current is first:
                await trio.sleep(0.1)
            second = node.discovery.current
            mem(node).change_addrs()  # re-signs again before the failed put's retry
            while node.discovery.current is second:
                await trio.sleep(0.1)
            await trio.sleep(30)  # past every retry (2 + 4 + 8 s)
            newest = node.discovery.current
            assert newest is not None
            held = [mem(n).values.get(key) for n in nodes[1:]]
            assert all(h is not None and h[0] == newest.envelope for h in held)

    run(main)
    failures = [r.getMessage() for r in caplog.records if "DHT put" in r.getMessage()]
    assert failures == ["DHT put of the capability record failed: "
                        "TooSlowError('put_value: no peer answered in time')"]


def test_forged_and_expired_records_are_rejected(tmp_path: Path) -> None:
    async def main() -> None:
        async with cluster(tmp_path, [make_env(g) for g in [(), (24,), (40,), ()]],
                           HOURS) as nodes:
            await all_published(nodes)
            victim, attacker, asker = nodes[1], nodes[2], nodes[3]
            clock = victim.discovery.clock_ms
            genuine = victim.discovery.current
            assert genuine is not None
            forged = forgery(victim, attacker, clock())
            key = capability_dht_key(victim.peer_id).encode()
            for target in (nodes[0], asker):  # a PUT_VALUE from the attacker
                with pytest.raises(RemoteProtocolError):
                    mem(target).accept_value(key, forged, clock() / 1000 + 3600)
            mem(asker).values.clear()
            asker.discovery.replicas.clear()
            cap = await asker.discovery.record_of(victim.peer_id)
            assert cap is not None and cap.envelope == genuine.envelope
            assert asker.discovery.metrics.rejected.labels("signer-mismatch")._value.get() >= 1
            # The victim's own record, once its lifetime has passed (others re-signed
            # theirs at the hourly refresh; the victim's replica held here is this one).
            await trio.sleep(7200 + 1)
            assert asker.discovery._verify(genuine.envelope, victim.peer_id) is None
            assert asker.discovery.metrics.rejected.labels("expired")._value.get() >= 1

    run(main)


def test_departed_node_disappears_after_expiry(tmp_path: Path) -> None:
    envs = [make_env(g) for g in [(), (24,), (40,), (8,), ()]]

    async def main() -> None:
        async with cluster(tmp_path, envs, HOURS) as nodes:
            await all_published(nodes)
            leaver, asker = nodes[2], nodes[4]
            with trio.fail_after(30):
                while [r.peer_id for r in await asker.discovery.query_gpus(min_vram_gb=40)
                       ] != [leaver.peer_id]:
                    await trio.sleep(0.5)
            leaver.kill()
            # Beyond the record lifetime: the others refresh on their own (hourly), the
            # leaver can't.
            await trio.sleep(7200 + 60)
            got = {r.peer_id for r in await asker.discovery.query_gpus()}
            assert got == {n.peer_id for n in nodes if n is not leaver}

    run(main)


def test_gossip_rejects_forged_and_keeps_newest(tmp_path: Path) -> None:
    async def main() -> None:
        async with cluster(tmp_path, [make_env(), make_env((24,)), make_env((40,))]) as nodes:
            await all_published(nodes)
            observer, victim, attacker = nodes
            with trio.fail_after(30):
                while observer.discovery.local_record(victim.peer_id) is None:
                    await trio.sleep(0.5)
            genuine = victim.discovery.current
            assert genuine is not None
            rejected = observer.discovery.metrics.rejected.labels("signer-mismatch")
            before = rejected._value.get()
            # A modified node: without its own validator, it sends what ours refuse.
            await attacker.net.subscribe(CAPABILITY_TOPIC, lambda *_: True)
            await attacker.net.publish(CAPABILITY_TOPIC,
                                       forgery(victim, attacker, victim.discovery.clock_ms()))
            with trio.fail_after(20):
                while rejected._value.get() == before:
                    await trio.sleep(0.1)
            assert observer.discovery.local_record(victim.peer_id) == genuine

            await victim.discovery._sign_current()
            newer = victim.discovery.current
            assert newer is not None and newer.record.seq > genuine.record.seq
            await victim.net.publish(CAPABILITY_TOPIC, newer.envelope)
            with trio.fail_after(20):
                while observer.discovery.local_record(victim.peer_id) != newer:
                    await trio.sleep(0.1)
            await observer.discovery._remember(genuine)  # a replay, however it arrives
            assert observer.discovery.local_record(victim.peer_id) == newer

    run(main)


def test_record_sync_fills_a_node_and_survives_a_lying_or_frozen_peer(tmp_path: Path) -> None:
    async def main() -> None:
        async with cluster(tmp_path, [make_env(g) for g in [(), (24,), (40,), (8,)]]) as nodes:
            await all_published(nodes)
            frozen, empty = nodes[2], nodes[3]

            def forget_all() -> None:
                empty.discovery.replicas.clear()
                mem(empty).values.clear()

            # The stream timeout, exactly: virtual time does not drift.
            assert await record_sync_scenario(nodes, forget_all) == pytest.approx(5, abs=0.1)

            # A frozen peer does not hang a direct fetch either.
            async def never_answer(stream: Any) -> None:
                await trio.sleep_forever()

            frozen.net.serve(CAPABILITY_PROTOCOL, never_answer, 0)
            started = trio.current_time()
            assert await empty.discovery.fetch_direct(frozen.peer_id) is None
            assert trio.current_time() - started == pytest.approx(5, abs=0.1)

    run(main)
