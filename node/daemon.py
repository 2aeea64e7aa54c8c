"""The daemon: every service of a node in one trio nursery tree.

    open_storage ──┐
    ContentStore ──┤
    open_network ──┼─ Discovery.run      (capability records, queries)
                   ├─ Models.run         (SMIP: publish, announce, serve, fetch)
                   ├─ Chain.run          (mempool, BFT rounds, final blocks, catch-up)
                   ├─ Worker.run         (micro-tasks of other nodes' jobs)
                   ├─ Jobs.run           (jobs submitted here: coordination; job gossip)
                   ├─ serve_api          (local JSON API + /metrics)
                   └─ Operations         (publish and fetch started through the API)

A service that fails takes the node down with it (trio's nursery semantics); SIGINT and
SIGTERM cancel the tree, every ``async with`` closes in order, and the SQLite state was
committed write by write, so a restart finds it.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio
from prometheus_client import CollectorRegistry, Gauge

from node import __version__
from node.api.jobs import job_routes
from node.api.ledger import ledger_routes
from node.api.ops import Operations
from node.api.server import (
    ApiError,
    Request,
    Routes,
    body_fields,
    read_token_file,
    serve_api,
    text_field,
)
from node.chain.service import Chain, load_genesis
from node.config import (
    RUNTIME_FILE,
    STATE_DB,
    TOKEN_FILE,
    Config,
    ConfigError,
    read_bootstrap_file,
)
from node.discovery.service import CapabilityValidator, Discovery, DiscoveryMetrics
from node.identity import load_key
from node.jobs.coordinator import Jobs
from node.jobs.receipts import Receipts
from node.jobs.worker import Worker
from node.ml.probe import env_to_json, parse_fake_gpus, probe_in_subprocess
from node.p2p.host import (
    ListenError,
    check_listen_addrs,
    open_network,
    parse_multiaddr,
    peer_info_from_multiaddr,
)
from node.smip.service import Models, ModelsMetrics
from node.smip.store import ContentStore
from node.smip.types import Progress
from node.storage import open_storage
from protocol.capability import DHT_NAMESPACE, CapabilityRecord

log = logging.getLogger(__name__)

SOFTWARE = f"iollm/{__version__}"


def wall_clock_ms() -> int:
    return int(time.time() * 1000)


def record_to_json(record: CapabilityRecord) -> dict[str, Any]:
    return {
        "peer_id": record.peer_id,
        "addrs": list(record.addrs),
        "software": record.software,
        "seq": record.seq,
        "created_ms": record.created_ms,
        "expires_ms": record.expires_ms,
        "env": env_to_json(record.env),
    }


@dataclass
class StartOptions:
    listen: list[str] | None = None  # overrides config node.listen
    bootstrap: list[str] | None = None  # added to config node.bootstrap
    api_port: int | None = None  # overrides config api.port
    genesis: Path | None = None  # the chain to join (kept in the home: node/chain/service.py)


def _float_param(request: Request, name: str) -> float | None:
    raw = request.query.get(name)
    if raw in (None, ""):
        return None
    try:
        value = float(raw)
    except ValueError:
        raise ApiError(400, f"{name} must be a number, got {raw!r}") from None
    if not math.isfinite(value) or value < 0:
        raise ApiError(400, f"{name} must be a non-negative number")
    return value


# -- SMIP routes ------------------------------------------------------------------------

KINDS = ("model", "dataset")
MIN_PREFIX_CHARS = 8  # a shorter prefix of a version id is refused: too easily ambiguous
_VERSION_TEXT = re.compile(rf"[0-9a-f]{{{MIN_PREFIX_CHARS},64}}")


def _kind(value: Any) -> str:
    if value not in KINDS:
        raise ApiError(400, f"kind: expected \"model\" or \"dataset\", got "
                            f"{json.dumps(value)[:60]}")
    return str(value)


def _path(value: Any, name: str) -> Path:
    """A path from a request, made absolute against the daemon's working directory (the
    CLI sends absolute paths)."""
    return Path(text_field(value, name)).expanduser().absolute()


def resolve_version(models: Models, text: Any, name: str = "version") -> str:
    """The full hex id of a version given as its id or a unique prefix of at least
    `MIN_PREFIX_CHARS` hex digits. A full id is returned as it is, known or not (a fetch
    finds it through the network); a prefix must match exactly one known version."""
    wanted = text_field(text, name).strip().lower()
    if not _VERSION_TEXT.fullmatch(wanted):
        raise ApiError(400, f"{name}: expected a version id or a prefix of at least "
                            f"{MIN_PREFIX_CHARS} hex digits, got {json.dumps(text)[:80]}")
    if len(wanted) == 64:
        return wanted
    matches = sorted({v.version for v in models.list_versions() if v.version.startswith(wanted)})
    if not matches:
        raise ApiError(404, f"no known version starts with {wanted}")
    if len(matches) > 1:
        raise ApiError(400, f"{name}: {wanted} is ambiguous: {len(matches)} known versions "
                            f"start with it ({', '.join(m[:16] for m in matches[:4])}, ...); "
                            f"give more digits")
    return matches[0]


def model_routes(models: Models, ops: Operations, nursery: trio.Nursery) -> Routes:
    """The SMIP routes. Publish and fetch run as operations in `nursery` (the daemon's):
    they answer ``{"op": id}`` at once, and ``GET /v1/ops?id=`` tells how they go."""

    async def publish(request: Request) -> Any:
        body = body_fields(request, {"path", "kind", "name"}, {"parents"})
        path = _path(body["path"], "path")
        kind = _kind(body["kind"])
        name = text_field(body["name"], "name")
        parents = body.get("parents") or []
        if not isinstance(parents, list):
            raise ApiError(400, "parents: expected a list of version ids")
        parent_ids = [resolve_version(models, p, "parents") for p in parents]

        async def work(progress: Progress) -> Any:
            version = await models.publish(path, kind=kind, name=name, parents=parent_ids,
                                           progress=progress)
            return {"version": version, "kind": kind, "name": name}

        return {"op": ops.start(nursery, "publish", work)}

    async def fetch(request: Request) -> Any:
        body = body_fields(request, {"version"}, {"out"})
        version = resolve_version(models, body["version"])
        out = None if body.get("out") is None else _path(body["out"], "out")

        async def work(progress: Progress) -> Any:
            info = await models.fetch(version, out_dir=out, progress=progress)
            return {**info.to_json(), "out": None if out is None else str(out)}

        return {"op": ops.start(nursery, "fetch", work)}

    async def operation(request: Request) -> Any:
        op_id = request.query.get("id")
        if not op_id:
            raise ApiError(400, "id: missing (GET /v1/ops?id=OPERATION)")
        try:
            return ops.get(op_id)
        except KeyError as exc:
            raise ApiError(404, str(exc.args[0])) from None

    async def versions(request: Request) -> Any:
        kind = request.query.get("kind") or None
        return [v.to_json() for v in models.list_versions(None if kind is None else _kind(kind))]

    async def show(request: Request) -> Any:
        version = resolve_version(models, request.query.get("version"))
        try:
            return await models.show(version)
        except KeyError:
            raise ApiError(404, f"unknown version {version}") from None

    return {
        ("POST", "/v1/models/publish"): publish,
        ("POST", "/v1/models/fetch"): fetch,
        ("GET", "/v1/ops"): operation,
        ("GET", "/v1/models"): versions,
        ("GET", "/v1/models/show"): show,
    }


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
    them into one line)."""
    key = load_key(home)
    token = read_token_file(home / TOKEN_FILE)
    listen = [parse_multiaddr(a) for a in (options.listen or config.node.listen)]
    check_listen_addrs(listen)  # before the probe: fail in milliseconds, not seconds
    bootstrap_addrs = list(config.node.bootstrap) + list(options.bootstrap or [])
    if config.node.bootstrap_file:
        bootstrap_addrs += read_bootstrap_file(Path(config.node.bootstrap_file).expanduser())
    bootstrap = [peer_info_from_multiaddr(a) for a in bootstrap_addrs]
    try:
        fake_gpus = parse_fake_gpus(config.probe.fake_gpus) if config.probe.fake_gpus else None
    except ValueError as exc:
        raise ConfigError(f"probe.fake_gpus: {exc}") from None
    api_port = config.api.port if options.api_port is None else options.api_port
    genesis = load_genesis(home, options.genesis)  # before the probe: a bad file fails fast

    log.info("probing the environment (%.1f s benchmark)", config.probe.bench_seconds)
    env = await probe_in_subprocess(home, bench_seconds=config.probe.bench_seconds,
                                    fake_gpus=fake_gpus)
    registry = CollectorRegistry()
    metrics = DiscoveryMetrics(registry)
    started = time.monotonic()
    Gauge("iollm_start_time_seconds", "Unix time the daemon started",
          registry=registry).set(time.time())
    validator = CapabilityValidator(clock_ms, metrics)
    models_metrics = ModelsMetrics(registry)
    ops = Operations(clock_ms)

    async with open_storage(home / STATE_DB) as storage, ContentStore(
        config.store.directory(home), storage, config.store.quota_bytes, clock_ms
    ) as store, open_network(key, listen, {DHT_NAMESPACE: validator},
                             registry=registry) as net:
        discovery = Discovery(net, key, storage, config.discovery, env, software=SOFTWARE,
                              clock_ms=clock_ms, metrics=metrics, bootstrap=bootstrap)
        models = Models(net, key, storage, store, discovery, clock_ms=clock_ms,
                        metrics=models_metrics)
        receipts = Receipts(storage, key, discovery.peer_id, clock_ms)
        chain = None if genesis is None else Chain(net, key, storage, genesis, discovery,
                                                   clock_ms=clock_ms)
        worker = Worker(net, key, models, receipts, config.worker, env, home / "work")
        jobs = Jobs(net, key, storage, models, discovery, receipts, home, clock_ms=clock_ms,
                    threads=config.worker.threads, chain=chain)

        async def status(_: Request) -> Any:
            current = discovery.current
            return {
                "peer_id": discovery.peer_id,
                "software": SOFTWARE,
                "addrs": net.listen_addrs(),
                "uptime_s": round(time.monotonic() - started, 3),
                "connected_peers": len(net.host.get_connected_peers()),
                "routing_table_size": net.dht.get_routing_table_size(),
                "protocols": net.protocols(),
                "banned_peers": net.guard.banned(),
                "record": record_to_json(current.record) if current else None,
                # True once the record has been put, gossiped and provided under every
                # class at least once (testnet up waits for it).
                "published": discovery.published.is_set(),
            }

        async def env_route(_: Request) -> Any:
            return env_to_json(env)

        async def peers(_: Request) -> Any:
            return [{"peer_id": pid, "capability": record_to_json(r) if r else None}
                    for pid, r in await discovery.connected_peers()]

        async def gpus(request: Request) -> Any:
            records = await discovery.query_gpus(
                min_vram_gb=_float_param(request, "min_vram"),
                min_tflops=_float_param(request, "min_tflops"))
            return [record_to_json(r) for r in records]

        async def record(request: Request) -> Any:
            peer_id = request.query.get("peer_id", "")
            cap = await discovery.record_of(peer_id) if peer_id else None
            if cap is None:
                raise ApiError(404, f"no valid capability record for {peer_id!r}")
            return record_to_json(cap.record)

        routes = {
            ("GET", "/v1/status"): status,
            ("GET", "/v1/env"): env_route,
            ("GET", "/v1/peers"): peers,
            ("GET", "/v1/gpus"): gpus,
            ("GET", "/v1/record"): record,
        }
        async with trio.open_nursery() as nursery:
            await nursery.start(discovery.run)
            await nursery.start(models.run)
            if chain is not None:
                await nursery.start(chain.run)
            await nursery.start(worker.run)
            await nursery.start(jobs.run)
            routes.update(model_routes(models, ops, nursery))
            routes.update(ledger_routes(chain, lambda text: resolve_version(models, text,
                                                                            "model")))
            routes.update(job_routes(jobs, receipts, models, ops, nursery, home / "tmp"))
            try:
                port = await nursery.start(
                    lambda task_status: serve_api(routes, token, registry, host="127.0.0.1",
                                                  port=api_port, task_status=task_status))
            except OSError as exc:
                raise ListenError(exc.errno, f"cannot serve the local API on 127.0.0.1:"
                                             f"{api_port}: {exc.strerror}") from None
            info = {
                "pid": os.getpid(),
                "peer_id": discovery.peer_id,
                "addrs": net.listen_addrs(),
                "api": f"http://127.0.0.1:{port}",
                "software": SOFTWARE,
            }
            _write_runtime_file(home, info)
            try:
                log.info("node %s ready; listening on %s; API on %s", discovery.peer_id,
                         " ".join(info["addrs"]), info["api"])
                with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                    async for signum in signals:
                        log.info("received %s, shutting down", signal.Signals(signum).name)
                        break
                nursery.cancel_scope.cancel()
            finally:
                (home / RUNTIME_FILE).unlink(missing_ok=True)
    log.info("node stopped")
