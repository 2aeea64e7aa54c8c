"""The wiring of a node: ``build_node`` starts every service of one node in one trio
nursery tree, for the daemon and for the tests' in-process cluster alike; ``run_daemon``
adds the environment probe, the local API and the signals.

    open_storage ──┐
    ContentStore ──┤
    open_network ──┼─ Discovery.run      (capability records, queries)
                   ├─ Models.run         (SMIP: publish, announce, serve, fetch)
                   ├─ Chain.run          (mempool, BFT rounds, final blocks, catch-up)
                   ├─ Worker.run         (micro-tasks of other nodes' jobs)
                   ├─ Jobs.run           (jobs submitted here: coordination; job gossip)
                   ├─ serve_api          (local JSON API + /metrics; daemon only)
                   └─ Operations         (publish and fetch started through the API)

A service that fails takes the node down with it (trio's nursery semantics); SIGINT and
SIGTERM cancel the tree, every ``async with`` closes in order, and the SQLite state was
committed write by write, so a restart finds it.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import signal
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import trio
from multiaddr import Multiaddr
from nacl.signing import SigningKey
from prometheus_client import CollectorRegistry, Gauge

from node import __version__
from node.agent.service import Agent, JobsRunner
from node.api.agent import agent_routes
from node.api.dashboard import Sessions, dashboard_routes
from node.api.gauges import register_service_metrics
from node.api.jobs import job_routes
from node.api.ledger import ledger_routes
from node.api.models import model_routes, resolve_version
from node.api.ops import Operations
from node.api.server import Routes, read_token_file, serve_api
from node.api.status import status_routes
from node.chain.service import Chain, load_genesis
from node.config import (
    RUNTIME_FILE,
    STATE_DB,
    TOKEN_FILE,
    ChainSection,
    Config,
    ConfigError,
    DiscoverySection,
    JobsSection,
    SmipSection,
    WorkerSection,
    cache_dir,
    read_bootstrap_file,
)
from node.discovery.service import CapabilityValidator, Discovery, DiscoveryMetrics
from node.homelock import hold_home
from node.identity import load_key
from node.jobs.coordinator import Jobs
from node.jobs.receipts import Receipts
from node.jobs.worker import Worker
from node.ml.probe import fake_gpus_tflops, parse_fake_gpus, probe_in_subprocess
from node.p2p import P2P, NatOptions, PeerInfo, open_network
from node.p2p.host import (
    ListenError,
    check_listen_addrs,
    parse_multiaddr,
    peer_info_from_multiaddr,
)
from node.p2p.options import P2POptions
from node.smip.service import Models, ModelsMetrics
from node.smip.store import ContentStore
from node.storage import Storage, open_storage
from protocol.capability import DHT_NAMESPACE, EnvReport
from protocol.genesis import Genesis

log = logging.getLogger(__name__)

SOFTWARE = f"iollm/{__version__}"


# The cyclic GC's youngest generation is collected after this many net allocations of
# container objects (CPython's default: 700). A validator under load has thousands of
# young objects alive at any moment (a tx batch decoding and being checked, frames in
# flight): at 700 each collection walked them and promoted them to older generations,
# whose collections walked them again; the collector took about 4% of a validator's CPU.
# At 20,000 it took under 0.5% (cyclic garbage waits for up to that many allocations).
GC_YOUNG_THRESHOLD = 20_000


def wall_clock_ms() -> int:
    return int(time.time() * 1000)


@dataclass
class NodeSpec:
    """What one node is made of. ``store`` None: no content store, so no SMIP and no jobs;
    ``worker`` None: no worker and no jobs services; ``genesis`` None: no chain."""

    key: SigningKey
    home: Path  # jobs' state and the worker's scratch space live under it
    database: Path
    listen: list[Multiaddr]
    env: EnvReport
    discovery: DiscoverySection
    clock_ms: Callable[[], int]
    store: Path | None = None
    quota_bytes: int = 1 << 40
    worker: WorkerSection | None = None
    genesis: Genesis | None = None
    bootstrap: list[PeerInfo] = field(default_factory=list)
    software: str = SOFTWARE
    name: str = ""  # [node] name, carried in the capability record
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)
    chain_class: type[Chain] = Chain  # tests run misbehaving validators
    chain: ChainSection = field(default_factory=ChainSection)
    smip: SmipSection = field(default_factory=SmipSection)
    jobs: JobsSection = field(default_factory=JobsSection)
    nat: NatOptions | None = None  # None: reachable, no relay service (node/p2p/nat.py)
    p2p: P2POptions = field(default_factory=P2POptions)  # the host's limits
    # What builds the node's network: py-libp2p; tests/memnet.py's in-memory one in
    # the MockClock service tests. Same arguments as open_network.
    network: Callable[..., AbstractAsyncContextManager[P2P]] = open_network


@dataclass
class Node:
    """The running services of one node (those its spec asked for)."""

    key: SigningKey
    net: P2P
    storage: Storage
    discovery: Discovery
    models: Models | None = None
    receipts: Receipts | None = None
    chain: Chain | None = None
    worker: Worker | None = None
    jobs: Jobs | None = None
    agent: Agent | None = None


@asynccontextmanager
async def build_node(spec: NodeSpec) -> AsyncIterator[Node]:
    """Open the node's state, store and network, start its services in order and yield
    them running; they stop when the block ends."""
    metrics = DiscoveryMetrics(spec.registry)
    validator = CapabilityValidator(spec.clock_ms, metrics)
    async with (
        open_storage(spec.database) as storage,
        _open_store(spec, storage) as store,
        spec.network(spec.key, spec.listen, {DHT_NAMESPACE: validator},
                     registry=spec.registry, nat=spec.nat, options=spec.p2p) as net,
        trio.open_nursery() as nursery,
    ):
        discovery = Discovery(net, spec.key, storage, spec.discovery, spec.env,
                              software=spec.software, clock_ms=spec.clock_ms, metrics=metrics,
                              bootstrap=spec.bootstrap, name=spec.name)
        node = Node(spec.key, net, storage, discovery)
        await nursery.start(discovery.run)
        if store is not None:
            node.models = Models(net, spec.key, storage, store, discovery, tunables=spec.smip,
                                 clock_ms=spec.clock_ms, metrics=ModelsMetrics(spec.registry))
            await nursery.start(node.models.run)
        if spec.genesis is not None:
            node.chain = spec.chain_class(net, spec.key, storage, spec.genesis, discovery,
                                          clock_ms=spec.clock_ms, tunables=spec.chain)
            await nursery.start(node.chain.run)
        if spec.worker is not None and node.models is not None:
            node.receipts = Receipts(storage, spec.key, discovery.peer_id, spec.clock_ms)
            node.worker = Worker(net, spec.key, node.models, node.receipts, spec.worker,
                                 spec.env, spec.home / "work", tunables=spec.jobs)
            node.jobs = Jobs(net, spec.key, storage, node.models, discovery, node.receipts,
                             spec.home, clock_ms=spec.clock_ms, threads=spec.worker.threads,
                             chain=node.chain, tunables=spec.jobs)
            await nursery.start(node.worker.run)
            await nursery.start(node.jobs.run)
            node.agent = Agent(storage, JobsRunner(node.jobs, node.models, discovery,
                                                   discovery.peer_id),
                               clock_ms=spec.clock_ms, home=spec.home, chain=node.chain,
                               jobs=node.jobs)
            await nursery.start(node.agent.run)
        # Peers that connected during start-up saw only the protocols registered by then.
        await net.announce_protocols()
        yield node
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def _open_store(spec: NodeSpec, storage: Storage) -> AsyncIterator[ContentStore | None]:
    if spec.store is None:
        yield None
        return
    async with ContentStore(spec.store, storage, spec.quota_bytes, spec.clock_ms) as store:
        yield store


@dataclass
class StartOptions:
    listen: list[str] | None = None  # overrides config node.listen
    bootstrap: list[str] | None = None  # added to config node.bootstrap
    api_port: int | None = None  # overrides config api.port
    genesis: Path | None = None  # the chain to join (kept in the home: node/chain/service.py)


def _write_runtime_file(home: Path, info: dict[str, Any]) -> None:
    tmp = home / (RUNTIME_FILE + ".tmp")
    tmp.write_text(json.dumps(info, indent=2) + "\n")
    os.replace(tmp, home / RUNTIME_FILE)


async def run_daemon(
    home: Path,
    config: Config,
    options: StartOptions,
    *,
    clock_ms: Callable[[], int] = wall_clock_ms,
) -> None:
    """Run a node until cancelled or signalled. Raises on start-up errors (the CLI turns
    them into one line); HomeLocked when another daemon runs on ``home``."""
    gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])
    with hold_home(home):
        await _run_daemon(home, config, options, clock_ms)


async def _run_daemon(home: Path, config: Config, options: StartOptions,
                      clock_ms: Callable[[], int]) -> None:
    key = load_key(home)
    token = read_token_file(home / TOKEN_FILE)
    listen = [parse_multiaddr(a) for a in (options.listen or config.node.listen)]
    check_listen_addrs(listen)  # before the probe: fail in milliseconds, not seconds
    bootstrap_addrs = list(config.node.bootstrap) + list(options.bootstrap or [])
    if config.node.bootstrap_file:
        bootstrap_addrs += read_bootstrap_file(Path(config.node.bootstrap_file).expanduser())
    bootstrap = [peer_info_from_multiaddr(a) for a in bootstrap_addrs]
    for relay_addr in config.relay.relays:
        peer_info_from_multiaddr(relay_addr)  # a bad one fails here, with its text
    nat = NatOptions(**{**asdict(config.relay), "relays": tuple(config.relay.relays)})
    try:
        fake_gpus = parse_fake_gpus(config.probe.fake_gpus) if config.probe.fake_gpus else None
        fake_tflops = fake_gpus_tflops(config.probe.fake_gpus) if fake_gpus else None
    except ValueError as exc:
        raise ConfigError(f"probe.fake_gpus: {exc}") from None
    api_port = config.api.port if options.api_port is None else options.api_port
    genesis = load_genesis(home, options.genesis)  # before the probe: a bad file fails fast

    log.info("probing the environment (%.1f s benchmark)", config.probe.bench_seconds)
    env = await probe_in_subprocess(
        home, bench_seconds=config.probe.bench_seconds, fake_gpus=fake_gpus,
        fake_tflops=fake_tflops,
        cache=cache_dir() if config.probe.reuse_s > 0 else None,
        cache_max_age_s=config.probe.reuse_s)
    registry = CollectorRegistry()
    Gauge("iollm_start_time_seconds", "Unix time the daemon started",
          registry=registry).set(time.time())
    ops = Operations(clock_ms, max_finished=config.api.max_finished,
                     keep_finished_ms=int(config.api.keep_finished_s * 1000))
    spec = NodeSpec(key=key, home=home, database=home / STATE_DB, listen=listen, env=env,
                    discovery=config.discovery, clock_ms=clock_ms,
                    store=config.store.directory(home), quota_bytes=config.store.quota_bytes,
                    worker=config.worker, genesis=genesis, bootstrap=bootstrap,
                    registry=registry, name=config.node.name, chain=config.chain,
                    smip=config.smip, jobs=config.jobs, nat=nat,
                    p2p=P2POptions(**asdict(config.p2p)))
    async with build_node(spec) as node, trio.open_nursery() as nursery:
        assert node.models is not None and node.jobs is not None and node.receipts is not None
        models = node.models
        routes: Routes = status_routes(node.net, node.discovery, env, SOFTWARE)
        routes.update(model_routes(models, ops, nursery))
        routes.update(ledger_routes(node.chain,
                                    lambda text: resolve_version(models, text, "model"),
                                    node.discovery.name_of))
        routes.update(job_routes(node.jobs, node.receipts, models, ops, nursery, home / "tmp"))
        register_service_metrics(registry, chain=node.chain, jobs=node.jobs, worker=node.worker)
        sessions = Sessions(token, clock_ms)
        routes.update(dashboard_routes(
            sessions, home, ops=ops, worker=node.worker, chain=node.chain,
            resolve_model=lambda text: resolve_version(models, text, "model")))
        if node.agent is not None:
            routes.update(agent_routes(node.agent))
        try:
            port = await nursery.start(
                lambda task_status: serve_api(routes, token, registry, host="127.0.0.1",
                                              port=api_port, sessions=sessions,
                                              request_timeout=config.api.request_timeout_s,
                                              idle_timeout=config.api.idle_timeout_s,
                                              max_connections=config.api.max_connections,
                                              task_status=task_status))
        except OSError as exc:
            raise ListenError(exc.errno, f"cannot serve the local API on 127.0.0.1:"
                                         f"{api_port}: {exc.strerror}") from None
        info = {
            "pid": os.getpid(),
            "peer_id": node.discovery.peer_id,
            "addrs": node.net.listen_addrs(),
            "api": f"http://127.0.0.1:{port}",
            "software": SOFTWARE,
        }
        if netns := os.environ.get("IOLLM_NETNS"):  # a namespace testnet's host: the
            info["netns"] = netns  # API's 127.0.0.1 is that namespace's (node/cli/common.py)
        _write_runtime_file(home, info)
        try:
            log.info("node %s ready; listening on %s; API on %s", node.discovery.peer_id,
                     " ".join(node.net.listen_addrs()), info["api"])
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for signum in signals:
                    log.info("received %s, shutting down", signal.Signals(signum).name)
                    break
            nursery.cancel_scope.cancel()
        finally:
            (home / RUNTIME_FILE).unlink(missing_ok=True)
    log.info("node stopped")
