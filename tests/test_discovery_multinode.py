"""Capability discovery across real py-libp2p hosts on 127.0.0.1, in one trio process.

The default suite keeps the tests of what only real py-libp2p hosts show (ADD_PROVIDER
answers, identify and the routing table, the walk's quorum over real Kademlia); the
service-logic tests run with ``-m slow``: tests/test_discovery_memnet.py runs their logic
on the in-memory network and trio's MockClock in seconds."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import trio
from libp2p.peer.id import ID
from libp2p.records.record import make_signed_put_record
from nacl.signing import SigningKey

from node.config import DiscoverySection
from node.discovery.service import CAPABILITY_PROTOCOL
from node.p2p.lookup import Unresponsive, value_from_peer, walk
from protocol.capability import CapabilityRecord, capability_dht_key, class_provider_key
from protocol.envelope import DOMAIN_CAPABILITY, seal
from tests.cluster import LocalNode
from tests.netutil import FakeClock, make_env, node_cluster, wait_until

# Ten nodes: CPU-only ones and GPUs from 8 to 80 GiB (one with two cards).
GPU_SETS: list[tuple[int, ...]] = [(), (8,), (12,), (16,), (24,), (24, 24), (40,), (48,),
                                   (80,), ()]


def run(fn, *args, timeout: float = 90):  # type: ignore[no-untyped-def]
    async def main():  # type: ignore[no-untyped-def]
        with trio.fail_after(timeout):
            return await fn(*args)

    return trio.run(main)


async def all_published(nodes: Sequence[LocalNode]) -> None:
    # A bound, not a wait: a node with many capability classes takes 1.1 s per class to
    # publish (provide pacing, node/p2p/host.py), about 12 s for the GPU nodes here.
    with trio.fail_after(60):
        for n in nodes:
            await n.discovery.published.wait()


@pytest.mark.slow  # its logic runs on memnet in the default suite: tests/test_discovery_memnet.py
def test_every_node_finds_every_other_and_filters_exactly(tmp_path: Path) -> None:
    clock = FakeClock()
    envs = [make_env(g, tflops=10.0 + i) for i, g in enumerate(GPU_SETS)]

    async def scenario() -> None:
        async with node_cluster(tmp_path, envs, clock) as nodes:
            await all_published(nodes)
            everyone = {n.peer_id for n in nodes}

            async def all_see_all() -> bool:
                for n in nodes:
                    found = {r.peer_id for r in await n.discovery.query_gpus()}
                    if found != everyone:
                        return False
                return True

            await wait_until(all_see_all, timeout=30)

            # Each node's own record, fetched by every other node through the DHT.
            for asker in nodes:
                for target in nodes:
                    cap = await asker.discovery.record_of(target.peer_id)
                    assert cap is not None and cap.record.peer_id == target.peer_id
                    assert cap.record.env == target.discovery.env

            by_min = {
                None: everyone,
                0: everyone,
                8: {n.peer_id for n, g in zip(nodes, GPU_SETS, strict=True) if g},
                20: {n.peer_id for n, g in zip(nodes, GPU_SETS, strict=True) if g and g[0] >= 24},
                24: {n.peer_id for n, g in zip(nodes, GPU_SETS, strict=True) if g and g[0] >= 24},
                41: {n.peer_id for n, g in zip(nodes, GPU_SETS, strict=True) if g and g[0] >= 48},
                80: {nodes[8].peer_id},
                81: set(),
            }
            asker = nodes[3]
            for min_vram, expected in by_min.items():
                got = await asker.discovery.query_gpus(min_vram_gb=min_vram)
                assert {r.peer_id for r in got} == expected, min_vram
                mems = [max((g.total_memory_bytes for g in r.env.gpus), default=0) for r in got]
                assert mems == sorted(mems, reverse=True)  # most capable first
            got = await asker.discovery.query_gpus(min_tflops=15.5)
            assert {r.peer_id for r in got} == {n.peer_id for n in nodes[6:]}

            # The DHT alone (no replicas involved): class provider records and values.
            want_24 = by_min[24]

            async def providers_complete() -> bool:
                found = await asker.discovery.find_providers(class_provider_key("gpu-mem-24"))
                return {p.peer_id.to_base58() for p in found} == want_24

            await wait_until(providers_complete, timeout=30)
            for target in nodes:
                if target is not asker:
                    cap = await asker.discovery.record_from_network(target.peer_id)
                    assert cap is not None and cap.envelope == target.discovery.current.envelope  # type: ignore[union-attr]

    run(scenario)


@pytest.mark.slow  # its logic runs on memnet in the default suite: tests/test_discovery_memnet.py
def test_a_provide_that_reached_nobody_is_tried_again(tmp_path: Path) -> None:
    """A node alone when it first publishes (its provides reach no peer) provides its
    classes to the peer that joins afterwards, without waiting for its next refresh."""
    key = bytes.fromhex(class_provider_key("gpu-mem-24"))

    async def scenario() -> None:
        async with node_cluster(tmp_path, [make_env((24,)), make_env()], FakeClock(),
                                start=1) as nodes:
            await all_published(nodes)
            first = nodes[0].net.peer_id
            joiner = await nodes.restart(1)
            assert first not in _providers(joiner, key)

            async def provided() -> bool:
                return first in _providers(joiner, key)

            await wait_until(provided, timeout=30)

    run(scenario)


def _providers(node: LocalNode, key: bytes) -> set[ID]:
    """The providers of ``key`` in ``node``'s own DHT store (what others told it)."""
    return {p.peer_id for p in node.net.dht.provider_store.get_providers(key)}


@pytest.mark.slow  # its logic runs on memnet in the default suite: tests/test_discovery_memnet.py
def test_forged_and_expired_records_are_rejected(tmp_path: Path) -> None:
    clock = FakeClock()
    envs = [make_env(g) for g in [(), (24,), (40,), ()]]

    async def scenario() -> None:
        async with node_cluster(tmp_path, envs, clock) as nodes:
            await all_published(nodes)
            victim, attacker, asker = nodes[1], nodes[2], nodes[3]
            key = capability_dht_key(victim.peer_id)
            genuine = victim.discovery.current
            assert genuine is not None

            # A record claiming the victim's peer id, signed with the attacker's key.
            forged_record = CapabilityRecord(
                peer_id=victim.peer_id, addrs=genuine.record.addrs, software="evil",
                seq=genuine.record.seq + 100, created_ms=clock(),
                expires_ms=clock() + 3_600_000, env=make_env((80, 80, 80, 80)))
            forged = sign_as(attacker.key, forged_record)
            dht_record = make_signed_put_record(key.encode(), forged,
                                                attacker.net.host.get_private_key())
            for target in (nodes[0], asker):
                ok = await attacker.net.dht.value_store._store_at_peer(
                    target.net.peer_id, key.encode(), forged, record=dht_record)
                assert not ok  # remote validators refuse it
            cap = await asker.discovery.record_of(victim.peer_id)
            assert cap is not None and cap.record.software == "iollm/local"
            assert asker.discovery.metrics.rejected.labels("signer-mismatch")._value.get() >= 1

            # An expired record: the victim's own, after its lifetime has passed.
            clock.advance(7200 + 1)
            assert asker.discovery._verify(genuine.envelope, victim.peer_id) is None
            assert asker.discovery.metrics.rejected.labels("expired")._value.get() >= 1

    run(scenario)


def sign_as(key: SigningKey, record: CapabilityRecord) -> bytes:
    """Seal a record under a key that is not the record's peer (sign_capability refuses
    to: that would be our own misuse), as an attacker's modified node would."""
    return seal(key, DOMAIN_CAPABILITY, record.encode_body()).encode()


@pytest.mark.slow  # its logic runs on memnet in the default suite: tests/test_discovery_memnet.py
def test_departed_node_disappears_after_expiry(tmp_path: Path) -> None:
    clock = FakeClock()
    config = DiscoverySection(refresh_interval_s=3600, record_ttl_s=7200, query_timeout_s=10,
                              rpc_timeout_s=1)
    envs = [make_env(g) for g in [(), (24,), (40,), (8,), ()]]

    async def scenario() -> None:
        async with node_cluster(tmp_path, envs, clock, config=config) as nodes:
            await all_published(nodes)
            leaver, asker = nodes[2], nodes[4]

            async def sees_leaver() -> bool:
                got = await asker.discovery.query_gpus(min_vram_gb=40)
                return [r.peer_id for r in got] == [leaver.peer_id]

            await wait_until(sees_leaver, timeout=20)
            leaver.kill()
            # Time passes beyond the record lifetime; the others refresh, the leaver can't.
            clock.advance(7200 + 1)
            async with trio.open_nursery() as nursery:
                for n in nodes:
                    if n is not leaver:
                        await n.discovery._sign_current()
                        nursery.start_soon(n.discovery._publish_network)
            got = {r.peer_id for r in await asker.discovery.query_gpus()}
            expected = {n.peer_id for n in nodes if n is not leaver}
            assert got == expected, f"missing {expected - got}, extra {got - expected}"

    run(scenario)


@pytest.mark.slow  # its logic runs on memnet in the default suite: tests/test_discovery_memnet.py
def test_frozen_peer_does_not_hang_direct_fetch(tmp_path: Path) -> None:
    clock = FakeClock()
    config = DiscoverySection(refresh_interval_s=3600, record_ttl_s=7200, query_timeout_s=1)

    async def scenario() -> None:
        async with node_cluster(tmp_path, [make_env(), make_env()], clock,
                                config=config) as nodes:
            frozen, asker = nodes[0], nodes[1]

            async def never_answer(stream) -> None:  # type: ignore[no-untyped-def]
                await trio.sleep_forever()

            frozen.net.host.set_stream_handler(CAPABILITY_PROTOCOL, never_answer)
            start = trio.current_time()
            assert await asker.discovery.fetch_direct(frozen.peer_id) is None
            assert trio.current_time() - start < 5

    run(scenario)


def test_no_answer_to_add_provider(tmp_path: Path) -> None:
    """A go-libp2p peer reuses the stream after ADD_PROVIDER and reads the next reply:
    the first reply on the stream must be the one to its next request (PING here)."""
    import varint
    from libp2p.kad_dht.pb.kademlia_pb2 import Message

    from node.p2p.framing import reset_quietly
    from node.p2p.host import KAD_PROTOCOL_ID

    clock = FakeClock()

    async def scenario() -> None:
        async with node_cluster(tmp_path, [make_env(), make_env()], clock) as nodes:
            server, client = nodes
            stream = await client.net.host.new_stream(server.net.peer_id, [KAD_PROTOCOL_ID])
            add = Message(type=Message.MessageType.ADD_PROVIDER, key=b"\x12\x20" + b"k" * 32)
            provider = add.providerPeers.add()
            provider.id = client.net.peer_id.to_bytes()
            provider.addrs.append(client.net.host.get_addrs()[0].to_bytes())
            ping = Message(type=Message.MessageType.PING)
            for m in (add, ping):
                data = m.SerializeToString()
                await stream.write(varint.encode(len(data)) + data)
            with trio.fail_after(5):
                length = varint.decode_bytes(await stream.read(1))
                reply = Message()
                reply.ParseFromString(await stream.read(length))
            assert reply.type == Message.MessageType.PING
            await reset_quietly(stream)
            providers = server.net.dht.provider_store.get_providers(bytes(add.key))
            assert [p.peer_id for p in providers] == [ID(client.net.peer_id.to_bytes())]

    run(scenario)


@pytest.mark.slow  # its logic runs on memnet in the default suite: tests/test_discovery_memnet.py
def test_gossip_rejects_forged_and_keeps_newest(tmp_path: Path) -> None:
    """Gossip verdicts: a record claiming another peer is rejected; a replayed older record
    of a peer never replaces the newer replica; a newer one does."""
    from node.discovery.service import CAPABILITY_TOPIC

    clock = FakeClock()

    async def scenario() -> None:
        async with node_cluster(tmp_path, [make_env(), make_env((24,)), make_env((40,))],
                                clock) as nodes:
            await all_published(nodes)
            observer, victim, attacker = nodes

            async def observer_has_victim() -> bool:
                return observer.discovery.local_record(victim.peer_id) is not None

            await wait_until(observer_has_victim, timeout=30)
            genuine = victim.discovery.current
            assert genuine is not None
            rejected = observer.discovery.metrics.rejected

            forged_record = CapabilityRecord(
                peer_id=victim.peer_id, addrs=genuine.record.addrs, software="evil",
                seq=genuine.record.seq + 1, created_ms=clock(), expires_ms=clock() + 3_600_000,
                env=make_env((80,)))
            before = rejected.labels("signer-mismatch")._value.get()
            # A modified node: without its own validator, it sends what ours would refuse.
            attacker.net.pubsub.remove_topic_validator(CAPABILITY_TOPIC)
            await attacker.net.pubsub.publish(CAPABILITY_TOPIC,
                                              sign_as(attacker.key, forged_record))

            async def forged_rejected() -> bool:
                return rejected.labels("signer-mismatch")._value.get() > before

            await wait_until(forged_rejected, timeout=20)
            assert observer.discovery.local_record(victim.peer_id) == genuine

            # The victim re-signs (seq goes up); then someone replays the old envelope.
            await victim.discovery._sign_current()
            newer = victim.discovery.current
            assert newer is not None and newer.record.seq > genuine.record.seq
            await victim.net.pubsub.publish(CAPABILITY_TOPIC, newer.envelope)

            async def observer_has_newer() -> bool:
                return observer.discovery.local_record(victim.peer_id) == newer

            await wait_until(observer_has_newer, timeout=20)
            await observer.discovery._remember(genuine)  # a replay, however it arrives
            assert observer.discovery.local_record(victim.peer_id) == newer

    run(scenario)


async def record_sync_scenario(nodes: Sequence[LocalNode], forget: Callable[[], object]
                               ) -> float:
    """The record-sync scenario of the real-socket test below and its memnet twin
    (tests/test_discovery_memnet.py), on nodes (source, liar, frozen, empty): ``empty``,
    after ``forget`` (its replicas and DHT values dropped), gets every record back from the
    source's sync answer, once; the liar's answer holds a forged record of the source
    (refused, counted) and its own (kept); the frozen peer sends one record and then
    nothing. Returns the seconds the frozen peer's sync took (each caller bounds them)."""
    from node.discovery.service import SYNC_PROTOCOL
    from node.p2p.framing import read_frame, write_frame

    source, liar, frozen, empty = nodes
    others = [n for n in nodes if n is not empty]

    async def source_has_all() -> bool:
        return all(source.discovery.local_record(n.peer_id) for n in others[1:])

    await wait_until(source_has_all, timeout=30)
    forget()
    assert all(empty.discovery.local_record(n.peer_id) is None for n in others)
    assert await empty.discovery.sync_from(source.net.peer_id) == len(others)
    for n in others:
        cap = empty.discovery.local_record(n.peer_id)
        assert cap is not None and cap.envelope == n.discovery.current.envelope  # type: ignore[union-attr]
    assert await empty.discovery.sync_from(source.net.peer_id) == 0  # idempotent

    # The liar answers with a forged record of the source (higher seq), then a genuine one
    # of its own, then ends the answer properly.
    genuine = source.discovery.current
    assert genuine is not None
    now = source.discovery.clock_ms()
    forged = sign_as(liar.key, CapabilityRecord(
        peer_id=source.peer_id, addrs=genuine.record.addrs, software="evil",
        seq=genuine.record.seq + 5, created_ms=now, expires_ms=now + 3_600_000,
        env=make_env((80,))))

    async def lying_answer(stream: Any) -> None:
        await read_frame(stream, 64, 5)
        for frame in (forged, liar.discovery.current.envelope, b""):  # type: ignore[union-attr]
            await write_frame(stream, frame, 5)
        await stream.close()

    async def frozen_answer(stream: Any) -> None:
        await read_frame(stream, 64, 5)
        await write_frame(stream, frozen.discovery.current.envelope, 5)  # type: ignore[union-attr]
        await trio.sleep_forever()  # the connection open, nothing more: a frozen peer

    liar.net.serve(SYNC_PROTOCOL, lying_answer, 64)
    frozen.net.serve(SYNC_PROTOCOL, frozen_answer, 64)
    forget()
    rejected = empty.discovery.metrics.rejected.labels("signer-mismatch")
    before = rejected._value.get()
    assert await empty.discovery.sync_from(liar.net.peer_id) == 1
    assert rejected._value.get() == before + 1
    assert empty.discovery.local_record(source.peer_id) is None  # forged one refused
    assert empty.discovery.local_record(liar.peer_id) is not None

    started = trio.current_time()
    assert await empty.discovery.sync_from(frozen.net.peer_id) == 1
    elapsed = trio.current_time() - started
    assert empty.discovery.local_record(frozen.peer_id) is not None
    return elapsed


@pytest.mark.slow  # its logic runs on memnet in the default suite: tests/test_discovery_memnet.py
def test_record_sync_fills_a_node_and_survives_a_lying_or_frozen_peer(tmp_path: Path) -> None:
    """A node that lost every replica gets them back from one peer over the sync stream; a
    peer whose answer holds a forged record, or that freezes mid-answer, costs only those
    records and at most the stream timeout."""
    clock = FakeClock()

    async def scenario() -> None:
        async with node_cluster(tmp_path, [make_env(g) for g in [(), (24,), (40,), (8,)]],
                                clock) as nodes:
            await all_published(nodes)
            empty = nodes[3]

            def forget() -> None:
                empty.discovery.replicas.clear()
                empty.net.dht.value_store.store.clear()

            elapsed = await record_sync_scenario(nodes, forget)
            assert elapsed < 5 + 2  # the stream timeout, not forever

    run(scenario)


def test_only_dht_peers_enter_the_routing_table(tmp_path: Path) -> None:
    """Any libp2p peer may connect; one whose identify does not list Kademlia is kept out
    of the routing table (it would be handed out in FIND_NODE answers), a node is let in."""
    from multiaddr import Multiaddr

    from node.p2p import open_network
    from node.p2p.host import KAD_PROTOCOL_ID

    async def scenario() -> None:
        async with node_cluster(tmp_path, [make_env(), make_env()], FakeClock()) as nodes, \
                open_network(SigningKey.generate(), [Multiaddr("/ip4/127.0.0.1/tcp/0")],
                             {}) as stranger:
            stranger.host.remove_stream_handler(KAD_PROTOCOL_ID)  # a peer without the DHT
            node = nodes[0]
            await stranger.host.connect(node.info())

            async def identified() -> bool:
                return node.net.speaks(stranger.peer_id, KAD_PROTOCOL_ID) is False

            await wait_until(identified, 10)
            rounds = node.discovery.routing_rounds

            async def two_more_rounds() -> bool:
                return node.discovery.routing_rounds >= rounds + 2

            await wait_until(two_more_rounds, 70)  # the upkeep slows to one pass in 30 s
            table = node.net.dht.routing_table
            assert not table.peer_in_table(stranger.peer_id)
            assert table.peer_in_table(nodes[1].net.peer_id)

    run(scenario)


def test_dht_only_query_stops_at_a_quorum_of_copies(tmp_path: Path) -> None:
    """A walk that has enough stops there: the DHT-only record query ends once
    [discovery] value_quorum valid copies are in, instead of waiting on every one of the
    k closest peers (whose slowest made its p99; bench/RESULTS.md, 2026-12-07)."""
    clock = FakeClock()

    async def scenario() -> None:
        async with node_cluster(tmp_path, [make_env() for _ in range(6)], clock) as nodes:
            await all_published(nodes)
            asker, target = nodes[0], nodes[5]
            quorum = asker.discovery.config.value_quorum
            key = capability_dht_key(target.peer_id).encode()

            async def get(peer: ID) -> tuple[bytes | None, list[ID]]:
                return await value_from_peer(asker.net.host, peer, key)

            async def copies() -> bool:
                full = await walk(asker.net, key, get, rpc_timeout=3, timeout=10,
                                  unresponsive=Unresponsive())
                return len(full.answers) > quorum

            await wait_until(copies, timeout=30)  # the record reached more than a quorum
            quick = await walk(asker.net, key, get, rpc_timeout=3, timeout=10,
                               unresponsive=Unresponsive(),
                               enough=lambda answers: len(answers) >= quorum)
            assert len(quick.answers) == quorum
            cap = await asker.discovery.record_from_network(target.peer_id)
            assert cap is not None and cap.envelope == target.discovery.current.envelope  # type: ignore[union-attr]

    run(scenario)
