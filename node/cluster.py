"""Many nodes in one trio process, on 127.0.0.1: for multi-node tests and benchmarks.

The nodes are complete (storage, host, DHT, gossipsub, discovery, and with ``models=True``
the content store and SMIP), only without the environment probe (the caller passes each
node's EnvReport) and the local API. Node 0 is every other node's bootstrap peer, as in
``iollm testnet up``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import multiaddr
import trio
from libp2p.peer.peerinfo import PeerInfo
from nacl.signing import SigningKey
from prometheus_client import CollectorRegistry

from node.config import DiscoverySection, WorkerSection
from node.contentstore import ContentStore
from node.discovery import CapabilityValidator, Discovery, DiscoveryMetrics
from node.host import Network, open_network
from node.jobs import Jobs
from node.models import Models, ModelsMetrics
from node.receipts import Receipts
from node.storage import Storage, open_storage
from node.worker import Worker
from protocol.capability import DHT_NAMESPACE, EnvReport

LOOPBACK = multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")


@dataclass
class LocalNode:
    key: SigningKey
    net: Network
    storage: Storage
    discovery: Discovery
    scope: trio.CancelScope
    models: Models | None = None
    worker: Worker | None = None
    jobs: Jobs | None = None
    receipts: Receipts | None = None

    @property
    def peer_id(self) -> str:
        return self.discovery.peer_id

    def info(self) -> PeerInfo:
        return PeerInfo(self.net.peer_id, self.net.host.get_addrs())

    def kill(self) -> None:
        """Stop every service of the node at once, as a crash would: no goodbyes."""
        self.scope.cancel()


async def _run_node(
    index: int,
    directory: Path,
    env: EnvReport,
    config: DiscoverySection,
    clock_ms: Callable[[], int],
    bootstrap: list[PeerInfo],
    models: bool,
    quota_bytes: int,
    worker_config: WorkerSection | None,
    *,
    task_status: Any = trio.TASK_STATUS_IGNORED,
) -> None:
    key = SigningKey(index.to_bytes(4, "big") * 8)  # deterministic identities
    metrics = DiscoveryMetrics(CollectorRegistry())
    validator = CapabilityValidator(clock_ms, metrics)
    with trio.CancelScope() as scope:
        async with (
            open_storage(directory / f"node{index}.db") as storage,
            open_network(key, [LOOPBACK], {DHT_NAMESPACE: validator}) as net,
            trio.open_nursery() as nursery,
        ):
            discovery = Discovery(net, key, storage, config, env, software="iollm/local",
                                  clock_ms=clock_ms, metrics=metrics, bootstrap=bootstrap)
            await nursery.start(discovery.run)
            service = None
            if models:
                store = ContentStore(directory / f"store{index}", storage, quota_bytes, clock_ms)
                await store.open()
                nursery.start_soon(_close_at_exit, store)
                service = Models(net, key, storage, store, discovery, clock_ms=clock_ms,
                                 metrics=ModelsMetrics(CollectorRegistry()))
                await nursery.start(service.run)
            node = LocalNode(key, net, storage, discovery, scope, service)
            if worker_config is not None:
                assert service is not None, "jobs need models=True"
                home = directory / f"home{index}"
                node.receipts = Receipts(storage, key, discovery.peer_id, clock_ms)
                node.worker = Worker(net, key, service, node.receipts, worker_config, env,
                                     home / "work")
                node.jobs = Jobs(net, key, storage, service, discovery, node.receipts, home,
                                 clock_ms=clock_ms, threads=worker_config.threads)
                await nursery.start(node.worker.run)
                await nursery.start(node.jobs.run)
            task_status.started(node)


async def _close_at_exit(store: ContentStore) -> None:
    try:
        await trio.sleep_forever()
    finally:
        with trio.CancelScope(shield=True):
            await store.aclose()


@asynccontextmanager
async def local_cluster(
    directory: Path,
    envs: Sequence[EnvReport],
    clock_ms: Callable[[], int],
    config: DiscoverySection,
    *,
    start_timeout: float = 60.0,
    models: bool = False,
    quota_bytes: int = 1 << 40,
    workers: Sequence[WorkerSection | None] | None = None,
) -> AsyncIterator[list[LocalNode]]:
    """Start one node per env and yield them once each has joined (connected to node 0 and
    refreshed its routing table); their first network publish runs on in background
    (``node.discovery.published`` tells when it is done). ``workers[i]``, when given and
    not None, also runs node i's worker and jobs services with that worker config."""
    nodes: list[LocalNode] = []
    async with trio.open_nursery() as nursery:
        with trio.fail_after(start_timeout):
            for i, env in enumerate(envs):
                bootstrap = [nodes[0].info()] if nodes else []
                worker = workers[i] if workers is not None else None
                nodes.append(await nursery.start(_run_node, i, directory, env, config,
                                                 clock_ms, bootstrap, models, quota_bytes,
                                                 worker))
            for n in nodes:
                await n.discovery.bootstrapped.wait()
        yield nodes
        nursery.cancel_scope.cancel()
