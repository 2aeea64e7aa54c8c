"""The daemon: every service of a node in one trio nursery tree.

    open_storage ─┐
    open_network ─┼─ Discovery.run      (capability records, queries)
                  └─ serve_api          (local JSON API + /metrics)

A service that fails takes the node down with it (trio's nursery semantics); SIGINT and
SIGTERM cancel the tree, every ``async with`` closes in order, and the SQLite state was
committed write by write, so a restart finds it.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio
from prometheus_client import CollectorRegistry, Gauge

from node import __version__
from node.api import ApiError, Request, read_token_file, serve_api
from node.config import (
    RUNTIME_FILE,
    STATE_DB,
    TOKEN_FILE,
    Config,
    ConfigError,
    read_bootstrap_file,
)
from node.discovery import CapabilityValidator, Discovery, DiscoveryMetrics
from node.host import (
    ListenError,
    check_listen_addrs,
    open_network,
    parse_multiaddr,
    peer_info_from_multiaddr,
)
from node.identity import load_key
from node.probe import env_to_json, parse_fake_gpus, probe_environment
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

    log.info("probing the environment (%.1f s benchmark)", config.probe.bench_seconds)
    env = await trio.to_thread.run_sync(
        lambda: probe_environment(home, bench_seconds=config.probe.bench_seconds,
                                  fake_gpus=fake_gpus))
    registry = CollectorRegistry()
    metrics = DiscoveryMetrics(registry)
    started = time.monotonic()
    Gauge("iollm_start_time_seconds", "Unix time the daemon started",
          registry=registry).set(time.time())
    validator = CapabilityValidator(clock_ms, metrics)

    async with open_storage(home / STATE_DB) as storage, open_network(
        key, listen, {DHT_NAMESPACE: validator}
    ) as net:
        discovery = Discovery(net, key, storage, config.discovery, env, software=SOFTWARE,
                              clock_ms=clock_ms, metrics=metrics, bootstrap=bootstrap)

        async def status(_: Request) -> Any:
            current = discovery.current
            return {
                "peer_id": discovery.peer_id,
                "software": SOFTWARE,
                "addrs": net.listen_addrs(),
                "uptime_s": round(time.monotonic() - started, 3),
                "connected_peers": len(net.host.get_connected_peers()),
                "routing_table_size": net.dht.get_routing_table_size(),
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
