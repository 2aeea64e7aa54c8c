"""Helpers for multi-node tests: real py-libp2p hosts on 127.0.0.1 in one trio process."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import multiaddr
import trio
from nacl.signing import SigningKey
from prometheus_client import CollectorRegistry

from node.config import DiscoverySection
from node.discovery import CapabilityValidator, Discovery, DiscoveryMetrics
from node.host import Network, open_network
from node.storage import Storage, open_storage
from protocol.capability import DHT_NAMESPACE, EnvReport, GpuInfo

LOOPBACK = multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")
GIB = 2**30


class FakeClock:
    """Injected wall clock in ms; tests move it instead of sleeping."""

    def __init__(self) -> None:
        self.now_ms = int(time.time() * 1000)

    def __call__(self) -> int:
        return self.now_ms

    def advance(self, seconds: float) -> None:
        self.now_ms += int(seconds * 1000)


def make_env(gpu_gib: Sequence[int] = (), tflops: float = 1.0) -> EnvReport:
    gpus = tuple(GpuInfo(f"Test GPU {g}GB", g * GIB, g * GIB, "8.0") for g in gpu_gib)
    return EnvReport(os="Linux-test", python="3.11.7", torch="2.13.0", cuda="12.4" if gpus else "",
                     gpus=gpus, cpu_cores=2, ram_bytes=24 * GIB, disk_free_bytes=100 * GIB,
                     tflops=tflops, tflops_dtype="bf16" if gpus else "fp32",
                     tflops_device="cuda" if gpus else "cpu")


@dataclass
class TestNode:
    __test__ = False
    key: SigningKey
    net: Network
    storage: Storage
    discovery: Discovery
    scope: trio.CancelScope

    @property
    def peer_id(self) -> str:
        return self.discovery.peer_id

    async def stop(self) -> None:
        """Kill the node's services (as a crash would: no goodbye to anyone)."""
        self.scope.cancel()


@asynccontextmanager
async def node_cluster(
    tmp_path: Path,
    envs: Sequence[EnvReport],
    clock: FakeClock,
    *,
    config: DiscoverySection | None = None,
) -> AsyncIterator[list[TestNode]]:
    """Start one node per env; node 0 is every other node's bootstrap peer. Yields when
    every node has connected and published once (network publishing runs on)."""
    config = config or DiscoverySection(refresh_interval_s=3600, record_ttl_s=7200,
                                        query_timeout_s=5)
    nodes: list[TestNode] = []
    async with trio.open_nursery() as nursery:
        for i, env in enumerate(envs):
            ready = trio.Event()
            holder: list[TestNode] = []

            async def run_node(i: int = i, env: EnvReport = env, ready: trio.Event = ready,
                               holder: list[TestNode] = holder) -> None:
                key = SigningKey(bytes([i + 1]) * 32)
                registry = CollectorRegistry()
                metrics = DiscoveryMetrics(registry)
                validator = CapabilityValidator(clock, lambda r: metrics.rejected.labels(r).inc())
                with trio.CancelScope() as scope:
                    async with AsyncExitStack() as stack:
                        storage = await stack.enter_async_context(
                            open_storage(tmp_path / f"node{i}.db"))
                        net = await stack.enter_async_context(
                            open_network(key, [LOOPBACK], {DHT_NAMESPACE: validator}))
                        bootstrap = [] if not nodes else [
                            _info(nodes[0].net)]
                        discovery = Discovery(net, key, storage, config, env,
                                              software="iollm/test", clock_ms=clock,
                                              metrics=metrics, bootstrap=bootstrap)
                        async with trio.open_nursery() as inner:
                            await inner.start(discovery.run)
                            holder.append(TestNode(key, net, storage, discovery, scope))
                            ready.set()
                            await trio.sleep_forever()

            nursery.start_soon(run_node)
            with trio.fail_after(10):
                await ready.wait()
            nodes.append(holder[0])
        with trio.fail_after(20):
            for n in nodes:
                await n.discovery.bootstrapped.wait()
        yield nodes
        nursery.cancel_scope.cancel()


def _info(net: Network):  # type: ignore[no-untyped-def]
    from libp2p.peer.peerinfo import PeerInfo

    return PeerInfo(net.peer_id, net.host.get_addrs())


async def wait_until(predicate, timeout: float, interval: float = 0.05) -> None:  # type: ignore[no-untyped-def]
    """Poll an async predicate until true; fail after ``timeout``. Used for convergence of
    eventually-consistent network state (DHT replication), never as a fixed sleep."""
    with trio.fail_after(timeout):
        while not await predicate():
            await trio.sleep(interval)
