"""Many nodes in one trio process, on 127.0.0.1: for multi-node tests and benchmarks.

The nodes are built by the daemon's own wiring (node.daemon.build_node): storage, host,
DHT, gossipsub, discovery, and with ``models=True`` the content store and SMIP, with a
worker config the worker and jobs services, with a genesis the chain; only without the
environment probe (the caller passes each node's EnvReport) and the local API. Node 0 is
every other node's bootstrap peer, as in ``iollm testnet up``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import multiaddr
import trio
from libp2p.peer.peerinfo import PeerInfo
from nacl.signing import SigningKey

from node.chain.service import Chain
from node.config import ChainSection, DiscoverySection, JobsSection, WorkerSection
from node.daemon import Node, NodeSpec, build_node
from node.p2p import open_network
from protocol.capability import EnvReport
from protocol.genesis import Genesis
from protocol.peerid import peer_id_from_public_key
from tests.memnet import MemNetwork, MemNode, mock_clock_ms, open_memnet

LOOPBACK = multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")


class LocalNode:
    """A node of the cluster: the services ``build_node`` started, and the scope that
    stops them (``kill``)."""

    def __init__(self, node: Node, scope: trio.CancelScope) -> None:
        self.node = node
        self.scope = scope
        self.key, self.net, self.storage = node.key, node.net, node.storage
        self.discovery, self.models, self.chain = node.discovery, node.models, node.chain
        self.worker, self.jobs, self.receipts = node.worker, node.jobs, node.receipts

    @property
    def peer_id(self) -> str:
        return self.discovery.peer_id

    def info(self) -> PeerInfo:
        if isinstance(self.net, MemNode):  # memnet dials by peer id
            return PeerInfo(self.net.peer_id, [])
        return PeerInfo(self.net.peer_id, self.net.host.get_addrs())

    def kill(self) -> None:
        """Stop every service of the node at once, as a crash would: no goodbyes. Its TCP
        sockets are closed first, as the kernel closes a dead process's: cancelling the
        tasks alone leaves them open in this process, and its peers would keep talking
        to a connection nobody reads (and never learn that it went). On memnet
        (tests/memnet.py) the world drops its connections and streams instead."""
        if isinstance(self.net, MemNode):
            self.net.world.kill(self.net)
            self.scope.cancel()
            return
        for conns in self.net.host.get_network().connections.values():
            for conn in conns if isinstance(conns, list) else [conns]:
                _close_socket(conn)
        self.scope.cancel()


def _close_socket(conn: Any) -> None:
    """Close the TCP socket under a py-libp2p connection (swarm conn -> yamux -> secure
    session -> noise -> raw -> TrioTCPStream -> trio.SocketStream)."""
    obj = conn
    for attr in ("muxed_conn", "secured_conn", "conn", "conn", "stream", "stream"):
        obj = getattr(obj, attr, None)
        if obj is None:
            return
    sock = getattr(obj, "socket", None)
    if sock is not None:
        sock.close()


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
    genesis: Genesis | None,
    chain_class: type[Chain] = Chain,
    chain_config: ChainSection | None = None,
    world: MemNetwork | None = None,
    *,
    jobs_config: JobsSection | None = None,
    task_status: Any = trio.TASK_STATUS_IGNORED,
) -> None:
    spec = NodeSpec(key=node_key(index), home=directory / f"home{index}",
                    database=directory / f"node{index}.db", listen=[LOOPBACK], env=env,
                    discovery=config, clock_ms=clock_ms,
                    store=directory / f"store{index}" if models else None,
                    quota_bytes=quota_bytes, worker=worker_config, genesis=genesis,
                    bootstrap=bootstrap, software="iollm/local", chain_class=chain_class,
                    chain=chain_config or ChainSection(), jobs=jobs_config or JobsSection(),
                    network=world.open_node if world is not None else open_network)
    assert worker_config is None or models, "jobs need models=True"
    with trio.CancelScope() as scope:
        async with build_node(spec) as built:
            task_status.started(LocalNode(built, scope))
            await trio.sleep_forever()


def node_key(index: int) -> SigningKey:
    """Node ``index``'s identity: deterministic, so a test can write the genesis first."""
    return SigningKey(index.to_bytes(4, "big") * 8)


def node_peer_id(index: int) -> str:
    return peer_id_from_public_key(bytes(node_key(index).verify_key))


class Cluster(list[LocalNode]):
    """The running nodes, in index order; :meth:`restart` brings a killed one back."""

    def __init__(self, nursery: trio.Nursery, start: Callable[[int], Any]) -> None:
        super().__init__()
        self.world: MemNetwork | None = None  # set by memnet_cluster
        self._nursery = nursery
        self._start = start

    async def restart(self, index: int, timeout: float = 60.0) -> LocalNode:
        """Start node ``index`` again on its database (kill it first), or the next new
        node when ``index == len(self)`` (``envs`` must have an entry for it); returns
        once it has joined."""
        with trio.fail_after(timeout):
            node: LocalNode = await self._nursery.start(self._start, index)
            await node.discovery.bootstrapped.wait()
        if index == len(self):
            self.append(node)
        else:
            self[index] = node
        return node


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
    genesis: Genesis | None = None,
    chain_classes: Sequence[type[Chain]] | None = None,
    chain_config: ChainSection | None = None,
    jobs_config: JobsSection | None = None,
    start: int | None = None,
    world: MemNetwork | None = None,
) -> AsyncIterator[Cluster]:
    """Start one node per env and yield them once each has joined (connected to node 0 and
    refreshed its routing table); their first network publish runs on in background
    (``node.discovery.published`` tells when it is done). ``workers[i]``, when given and
    not None, also runs node i's worker and jobs services with that worker config. With a
    ``genesis`` every node runs the chain service (validators: see :func:`node_peer_id`),
    node i as ``chain_classes[i]`` when given (tests' misbehaving validators), with
    ``chain_config`` for its tunables (config.toml's [chain] defaults when None); the jobs
    services with ``jobs_config`` ([jobs] defaults when None). Only the
    first ``start`` nodes (default all) start; ``Cluster.restart(len(nodes))`` adds the
    next one later. With a ``world`` (tests/memnet.py) the nodes live on that in-memory
    network instead of 127.0.0.1 (run it on trio's MockClock)."""
    async with trio.open_nursery() as nursery:

        async def start_node(i: int, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
            bootstrap = [nodes[0].info()] if i and nodes else []
            worker = workers[i] if workers is not None else None
            chain_class = chain_classes[i] if chain_classes is not None else Chain
            await _run_node(i, directory, envs[i], config, clock_ms, bootstrap, models,
                            quota_bytes, worker, genesis, chain_class, chain_config, world,
                            jobs_config=jobs_config, task_status=task_status)

        nodes = Cluster(nursery, start_node)
        with trio.fail_after(start_timeout):
            for i in range(len(envs) if start is None else start):
                nodes.append(await nursery.start(start_node, i))
            for n in nodes:
                await n.discovery.bootstrapped.wait()
        yield nodes
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def memnet_cluster(directory: Path, envs: Sequence[EnvReport], config: DiscoverySection,
                         **options: Any) -> AsyncIterator[Cluster]:
    """:func:`local_cluster` on an in-memory network (tests/memnet.py), its clock_ms
    following trio's: run it under ``tests.memnet.run_on_mock_clock``. ``nodes.world``
    partitions, heals and kills."""
    clock = mock_clock_ms()
    async with open_memnet(clock) as world, local_cluster(directory, envs, clock, config,
                                                          world=world, **options) as nodes:
        nodes.world = world
        yield nodes
