"""SMIP across real py-libp2p hosts on 127.0.0.1, in one trio process: publish, fetch from
several providers, bad and frozen providers, forged manifests, resume, child versions."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import trio
from safetensors.numpy import load_file, save_file

import node.smip.fetch
from node.config import DiscoverySection
from node.smip.fetch import fetch_manifest
from node.smip.types import FetchError, Progress, PublishError
from protocol.smip import (
    SMIP_PROTOCOL_ID,
    STATUS_OK,
    ChunkRequest,
    LeavesRequest,
    ManifestRequest,
    Request,
    ResponseHeader,
    parse_id,
    shard_provider_key,
    version_provider_key,
)
from tests.cluster import LocalNode, local_cluster
from tests.netutil import FakeClock, make_env, wait_until

MIB = 1 << 20


def run(fn, *args, timeout: float = 120):  # type: ignore[no-untyped-def]
    async def main():  # type: ignore[no-untyped-def]
        with trio.fail_after(timeout):
            return await fn(*args)

    return trio.run(main)


def cluster(tmp_path: Path, n: int, clock: FakeClock):  # type: ignore[no-untyped-def]
    config = DiscoverySection(refresh_interval_s=3600, record_ttl_s=7200, query_timeout_s=5)
    (tmp_path / "nodes").mkdir()
    return local_cluster(tmp_path / "nodes", [make_env() for _ in range(n)], clock, config,
                         models=True)


def write_model(directory: Path, shards: int, mib_per_shard: float, seed: int = 0) -> Path:
    """A Hugging Face style model directory: safetensors shards and a config.json."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    floats = int(mib_per_shard * MIB) // 4
    for i in range(shards):
        save_file({f"layer{i}.weight": rng.standard_normal(floats, dtype=np.float32)},
                  str(directory / f"model-{i:05d}.safetensors"))
    (directory / "config.json").write_text(json.dumps({"architectures": ["Test"], "n": shards}))
    return directory


def digest_tree(directory: Path) -> dict[str, str]:
    return {p.relative_to(directory).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def served(n: LocalNode) -> float:
    assert n.models is not None
    return sum(s.value for m in n.models.metrics.served.collect() for s in m.samples
               if s.name.endswith("_total"))


def fetched(n: LocalNode) -> float:
    assert n.models is not None
    return n.models.metrics.fetched._value.get()


def gossip_accepted(n: LocalNode) -> float:
    """Announcements this node took from gossip (not from ``list`` answers)."""
    assert n.models is not None
    return n.models.metrics.announcements.labels("accept")._value.get()


def dropped(n: LocalNode, reason: str) -> float:
    assert n.models is not None
    return n.models.metrics.dropped.labels(reason)._value.get()


async def wait_known(n: LocalNode, version: str, providers: int = 1) -> None:
    async def known() -> bool:
        assert n.models is not None
        return len(n.models.providers_of(parse_id(version))) >= providers

    await wait_until(known, timeout=30)


def test_publish_fetch_many_providers_bad_provider_forged_manifest(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    clock = FakeClock()
    model = write_model(tmp_path / "model", shards=3, mib_per_shard=4.5)

    async def scenario() -> None:
        async with cluster(tmp_path, 5, clock) as nodes:
            a, b, c, bad, late = nodes
            assert all(n.models for n in nodes)
            version = await a.models.publish(model, kind="model", name="tiny")  # type: ignore[union-attr]
            listed = {v.version: v for v in a.models.list_versions()}  # type: ignore[union-attr]
            assert listed[version].state == "complete" and listed[version].kind == "model"

            # B and C fetch at once, from A (the only provider yet). The announcement
            # reached them by gossip, not only through the late joiners' list requests.
            await wait_known(b, version)
            await wait_known(c, version)
            assert gossip_accepted(b) >= 1 and gossip_accepted(c) >= 1
            async def fetch_to_dir(n: LocalNode) -> None:
                await n.models.fetch(version, out_dir=tmp_path / f"out-{n.peer_id[-6:]}")  # type: ignore[union-attr]

            async with trio.open_nursery() as nursery:
                for n in (b, c):
                    nursery.start_soon(fetch_to_dir, n)
            for n in (b, c):
                got = tmp_path / f"out-{n.peer_id[-6:]}"
                assert digest_tree(got) == digest_tree(model)
                tensors = load_file(str(got / "model-00001.safetensors"))
                assert tensors["layer1.weight"].shape == (int(4.5 * MIB) // 4,)

            # BAD now answers with a forged manifest (one byte of the signature flipped:
            # the same content under another signature, so another id): refused, and the
            # manifest taken from the next provider.
            await bad.models.fetch(version)  # type: ignore[union-attr]
            genuine_envelope = bad.models.held[parse_id(version)].envelope  # type: ignore[union-attr]
            honest_answer = bad.models._answer  # type: ignore[union-attr]
            corrupt_chunks = corrupt_leaves = False

            async def lying_answer(request: Request) -> tuple[ResponseHeader, bytes]:
                header, payload = await honest_answer(request)
                if header.status == STATUS_OK and payload:
                    if isinstance(request, ManifestRequest) and not corrupt_chunks:
                        payload = payload[:-1] + bytes([payload[-1] ^ 1])
                    elif ((isinstance(request, ChunkRequest) and corrupt_chunks)
                          or (isinstance(request, LeavesRequest) and corrupt_leaves)):
                        payload = bytes([payload[0] ^ 0xFF]) + payload[1:]
                return header, payload

            bad.models._answer = lying_answer  # type: ignore[method-assign,union-attr]
            before = dropped(late, "id-mismatch")
            got_held = await fetch_manifest(late.models, parse_id(version),  # type: ignore[arg-type]
                                            [bad.net.peer_id, a.net.peer_id])
            assert got_held.envelope == genuine_envelope
            assert dropped(late, "id-mismatch") == before + 1

            # BAD now serves corrupted chunks; LATE fetches from all four providers.
            corrupt_chunks = True
            await wait_known(late, version, providers=4)
            before_served = {n.peer_id: served(n) for n in (a, b, c)}
            await late.models.fetch(version, out_dir=tmp_path / "out-late")  # type: ignore[union-attr]
            assert digest_tree(tmp_path / "out-late") == digest_tree(model)
            assert dropped(late, "bad-chunk") == 1  # BAD was given chunks, and dropped
            honest = [n for n in (a, b, c) if served(n) > before_served[n.peer_id]]
            assert len(honest) >= 2, "chunks should come from several providers"

            with pytest.raises(FetchError, match="no provider"):
                await late.models.fetch("ab" * 32)  # type: ignore[union-attr]

            # A fetch whose only known provider does not hold the version (a stale hint,
            # no announcement heard): the manifest comes from the DHT's providers.
            other_dir = write_model(tmp_path / "other", shards=1, mib_per_shard=0.25, seed=2)
            other = await a.models.publish(other_dir, kind="model", name="other")  # type: ignore[union-attr]
            held_other = a.models.held[parse_id(other)]  # type: ignore[union-attr]
            keys = [version_provider_key(held_other.version)] + [
                shard_provider_key(s.root) for s in held_other.manifest.shards]

            async def a_provides_all() -> bool:
                for key in keys:
                    found = await late.models.discovery.find_providers(key)  # type: ignore[union-attr]
                    if a.net.peer_id not in {p.peer_id for p in found}:
                        return False
                return True

            await wait_until(a_provides_all, timeout=30)
            monkeypatch.setattr(late.models, "providers_of", lambda version: [])
            await late.models.fetch(other, hint=[c.net.peer_id])  # type: ignore[union-attr]
            assert late.models.held[parse_id(other)].state == "complete"  # type: ignore[union-attr]

            # BAD, the only provider C knows of, serves corrupted leaf layers: it is
            # dropped, and each shard, left without a provider, is looked up on the DHT
            # at once and fetched from A.
            await bad.models.fetch(other)  # type: ignore[union-attr]
            corrupt_leaves = True
            monkeypatch.setattr(c.models, "providers_of", lambda version: [bad.net.peer_id])
            await c.models.fetch(other, out_dir=tmp_path / "out-other")  # type: ignore[union-attr]
            assert digest_tree(tmp_path / "out-other") == digest_tree(other_dir)
            assert dropped(c, "bad-leaves") == 1

    run(scenario, timeout=150)


def test_resume_child_version_and_frozen_provider(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(node.smip.fetch, "RESPONSE_TIMEOUT_S", 1.0)
    clock = FakeClock()
    model = write_model(tmp_path / "model", shards=10, mib_per_shard=0.5)

    async def scenario() -> None:
        async with cluster(tmp_path, 3, clock) as nodes:
            a, b, frozen = nodes
            parent = await a.models.publish(model, kind="model", name="base")  # type: ignore[union-attr]
            await wait_known(b, parent)

            # A fetch cancelled half-way resumes without fetching a verified chunk again.
            progress = Progress()
            with trio.move_on_after(60) as scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(lambda: b.models.fetch(parent, progress=progress))  # type: ignore[union-attr]

                    async def half_done() -> bool:
                        return progress.done_bytes >= progress.total_bytes // 2 > 0

                    await wait_until(half_done, timeout=30, interval=0.001)
                    nursery.cancel_scope.cancel()
            assert not scope.cancelled_caught
            first = fetched(b)
            total = sum(p.stat().st_size for p in model.glob("*"))
            assert 0 < first < total
            await b.models.fetch(parent, out_dir=tmp_path / "out-b")  # type: ignore[union-attr]
            assert fetched(b) == total  # every byte fetched exactly once
            assert digest_tree(tmp_path / "out-b") == digest_tree(model)

            # A child changing one of ten shards stores and transfers only that shard.
            child_dir = tmp_path / "child"
            child_dir.mkdir()
            for p in model.iterdir():
                (child_dir / p.name).write_bytes(p.read_bytes())
            save_file({"layer3.weight": np.ones(1000, dtype=np.float32)},
                      str(child_dir / "model-00003.safetensors"))
            child = await a.models.publish(child_dir, kind="model", name="base-ft",  # type: ignore[union-attr]
                                           parents=[parent])
            shown = await a.models.show(child)  # type: ignore[union-attr]
            assert [x["version"] for x in shown["lineage"]] == [child, parent]
            assert shown["new_shards"] == ["config.json", "model-00003.safetensors"] or \
                shown["new_shards"] == ["model-00003.safetensors"]
            await wait_known(b, child)
            before = fetched(b)
            await b.models.fetch(child)  # type: ignore[union-attr]
            changed = (child_dir / "model-00003.safetensors").stat().st_size
            config_changed = (child_dir / "config.json").read_bytes() != \
                (model / "config.json").read_bytes()
            assert fetched(b) - before == changed + (config_changed and
                                                     (child_dir / "config.json").stat().st_size)

            # A provider that freezes (answers nothing) is dropped after the deadline and
            # the fetch completes from the other one.
            async def freeze(stream) -> None:  # type: ignore[no-untyped-def]
                await trio.sleep_forever()

            await wait_known(frozen, parent)  # an id nobody announced fails at once
            await frozen.models.fetch(parent)  # type: ignore[union-attr]
            frozen.net.host.set_stream_handler(SMIP_PROTOCOL_ID, freeze)  # type: ignore[arg-type]
            third = await a.models.publish(write_model(tmp_path / "m3", 2, 1.0, seed=3),  # type: ignore[union-attr]
                                           kind="model", name="third")
            await wait_known(frozen, third)
            await frozen.models.fetch(third)  # type: ignore[union-attr]
            frozen.net.host.set_stream_handler(SMIP_PROTOCOL_ID, freeze)  # type: ignore[arg-type]
            await wait_known(b, third, providers=2)
            await b.models.fetch(third, out_dir=tmp_path / "out-third")  # type: ignore[union-attr]
            assert digest_tree(tmp_path / "out-third") == digest_tree(tmp_path / "m3")

    run(scenario, timeout=150)


def test_publish_refuses_what_is_not_safetensors(tmp_path: Path) -> None:
    clock = FakeClock()
    (tmp_path / "weights.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    (tmp_path / "pickled").mkdir()
    (tmp_path / "pickled" / "pytorch_model.bin").write_bytes(b"\x80\x04K\x01.")
    (tmp_path / "pickled" / "config.json").write_text("{}")
    noconfig = write_model(tmp_path / "noconfig", 1, 0.1)
    (noconfig / "config.json").unlink()

    async def scenario() -> None:
        async with cluster(tmp_path, 1, clock) as (a,):
            for path, message in [
                (tmp_path / "weights.safetensors", "not a valid safetensors file"),
                (tmp_path / "pickled", "refusing pickle-based weights"),
                (noconfig, "needs a config.json"),
                (tmp_path / "missing", "does not exist"),
            ]:
                with pytest.raises(PublishError, match=message):
                    await a.models.publish(path, kind="model", name="x")  # type: ignore[union-attr]
            assert a.models.list_versions() == []  # type: ignore[union-attr]
            assert a.models.store.complete_shards() == []  # type: ignore[union-attr]

    run(scenario)


def test_an_id_nobody_provides_fails_after_one_lookup(tmp_path: Path) -> None:
    """A full id that no announcement and no provider record names: "no provider" after
    one DHT walk (bounded by query_timeout_s, 5 s here), not after retries."""
    clock = FakeClock()

    async def scenario() -> None:
        async with cluster(tmp_path, 3, clock) as nodes:
            started = trio.current_time()
            with pytest.raises(FetchError, match="no provider"):
                await nodes[2].models.fetch("ab" * 32)  # type: ignore[union-attr]
            assert trio.current_time() - started < 5 + 2.0

    run(scenario)



def test_one_provider_fetch_opens_one_stream(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """The stream that gave the manifest carries the leaf layers and the chunks too: a
    fetch from one provider opens one SMIP stream (two cost a round trip more, 50 ms of a
    12 s fetch at 50 ms RTT), and none is left open."""
    clock = FakeClock()
    model = write_model(tmp_path / "model", shards=2, mib_per_shard=1.5)
    opened: list[node.smip.fetch.SmipClient] = []
    library_open = node.smip.fetch.SmipClient.open

    async def counted_open(self: node.smip.fetch.SmipClient) -> node.smip.fetch.SmipClient:
        opened.append(self)
        return await library_open(self)

    monkeypatch.setattr(node.smip.fetch.SmipClient, "open", counted_open)

    async def scenario() -> None:
        async with cluster(tmp_path, 2, clock) as (a, b):
            version = await a.models.publish(model, kind="model", name="one")  # type: ignore[union-attr]
            await wait_known(b, version)
            await b.models.fetch(version, out_dir=tmp_path / "out")  # type: ignore[union-attr]
            assert digest_tree(tmp_path / "out") == digest_tree(model)
            assert len(opened) == 1
            assert opened[0].stream is None  # closed once the fetch ended

    run(scenario)


def test_end_game_takes_a_slow_providers_chunks(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Once no chunk waits, a provider with a free slot asks for chunks another provider
    has outstanding behind another answer: a fetch from a fast and a very slow provider
    waits for the answer the slow one is giving (each of its chunk answers takes
    ``slow_s``, under the response deadline) but not for the chunks queued behind it
    (before the end game up to PIPELINE_DEPTH times ``slow_s``), every byte arrives
    verified once, no chunk is asked of more than two providers or twice of one (a chunk
    that arrived is not asked again), and the slow provider's stream is reset once the
    fetch is done rather than read on."""
    slow_s = 5.0
    clock = FakeClock()
    model = write_model(tmp_path / "model", shards=3, mib_per_shard=8.0)
    closed: list[tuple[object, bool]] = []  # (peer, reset) of each stream closed
    sent: list[tuple[object, bytes, int]] = []  # (peer, root, index) of each chunk request
    library_close = node.smip.fetch.SmipClient.close
    library_send = node.smip.fetch.SmipClient.send

    async def recorded_close(self: node.smip.fetch.SmipClient, *, failed: bool = False) -> None:
        if self.stream is not None:
            closed.append((self.peer, failed))
        await library_close(self, failed=failed)

    async def recorded_send(self: node.smip.fetch.SmipClient, request: Request) -> None:
        if isinstance(request, ChunkRequest):
            sent.append((self.peer, request.root, request.index))
        await library_send(self, request)

    monkeypatch.setattr(node.smip.fetch.SmipClient, "close", recorded_close)
    monkeypatch.setattr(node.smip.fetch.SmipClient, "send", recorded_send)

    async def scenario() -> None:
        async with cluster(tmp_path, 3, clock) as (fast, slow, b):
            version = await fast.models.publish(model, kind="model", name="two")  # type: ignore[union-attr]
            await wait_known(slow, version)
            await slow.models.fetch(version)  # type: ignore[union-attr]
            answer = slow.models._answer  # type: ignore[union-attr]
            slow_answers: list[Request] = []

            async def slow_answer(request: Request) -> tuple[ResponseHeader, bytes]:
                if isinstance(request, ChunkRequest):
                    slow_answers.append(request)
                    await trio.sleep(slow_s)
                return await answer(request)  # type: ignore[no-any-return]

            slow.models._answer = slow_answer  # type: ignore[union-attr,method-assign]
            await wait_known(b, version, providers=2)
            sent.clear()  # the slow provider's own fetch
            start = trio.current_time()
            await b.models.fetch(version, out_dir=tmp_path / "out")  # type: ignore[union-attr]
            took = trio.current_time() - start
            print(f"end game: fetched in {took:.2f} s, {len(slow_answers)} slow answers begun, "
                  f"{len(sent)} chunk requests sent")
            assert digest_tree(tmp_path / "out") == digest_tree(model)
            assert slow_answers  # the slow provider was asked (its queue was taken over)
            assert took < 2 * slow_s
            assert fetched(b) == sum(p.stat().st_size for p in model.glob("*.safetensors")) \
                + (model / "config.json").stat().st_size
            assert len(sent) == len(set(sent)), "a provider was asked a chunk twice"
            chunks = [(root, index) for _, root, index in sent]
            assert max(chunks.count(c) for c in set(chunks)) <= 2
            first = slow_answers[0]  # being answered: no answer queued ahead of it there
            assert chunks.count((first.root, first.index)) == 1  # type: ignore[attr-defined]
            slow_peer = slow.models.net.peer_id  # type: ignore[union-attr]
            to_slow = sum(peer == slow_peer for peer, _, _ in sent)
            print(f"{to_slow} chunk requests to the slow provider")
            # It answered one at most: with more asked, requests were outstanding at the end.
            assert ((slow_peer, True) in closed) == (to_slow > 1)

    run(scenario, timeout=3 * slow_s)


def test_stream_idle_before_its_first_request_is_opened_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A chunk worker opens its provider's stream at once; while another provider's leaf
    layers come, it may idle past the provider's STREAM_IDLE_TIMEOUT_S and be reset there.
    Its first request then fails: the stream is opened again (once), and the provider is
    not dropped (the code before dropped it: "failed: StreamReset()")."""
    idle_s = 1.0
    monkeypatch.setattr(node.smip.service, "STREAM_IDLE_TIMEOUT_S", idle_s)
    clock = FakeClock()
    # One slow leaf layer, then no idle gap (a stream that idles after its first answer
    # and is cut still drops its provider).
    model = write_model(tmp_path / "model", shards=1, mib_per_shard=12.0)

    async def scenario() -> None:
        async with cluster(tmp_path, 3, clock) as (a, p, b):
            version = await a.models.publish(model, kind="model", name="idle")  # type: ignore[union-attr]
            await wait_known(p, version)
            await p.models.fetch(version)  # type: ignore[union-attr]
            for provider in (a, p):  # a first leaf layer slower than the idle cut
                answer = provider.models._answer  # type: ignore[union-attr]
                slowed: list[Request] = []

                async def slow_leaves(request: Request, answer=answer,  # type: ignore[no-untyped-def]
                                      slowed=slowed) -> tuple[ResponseHeader, bytes]:
                    if isinstance(request, LeavesRequest) and not slowed:
                        slowed.append(request)
                        await trio.sleep(2.5 * idle_s)
                    return await answer(request)  # type: ignore[no-any-return]

                provider.models._answer = slow_leaves  # type: ignore[union-attr,method-assign]
            await wait_known(b, version, providers=2)
            await b.models.fetch(version, out_dir=tmp_path / "out")  # type: ignore[union-attr]
            assert digest_tree(tmp_path / "out") == digest_tree(model)
            assert dropped(b, "stalled") == 0
            assert dropped(b, "failed") == 0
            assert served(a) > 0 and served(p) > 0

    run(scenario, timeout=30)
