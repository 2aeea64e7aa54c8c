"""The node routes of the local API: status, environment, peers, GPU queries, records."""

from __future__ import annotations

import math
import time
from typing import Any

from node.api.server import ApiError, Request, Routes
from node.discovery.service import Discovery
from node.ml.probe import env_to_json
from node.p2p import P2P
from protocol.capability import CapabilityRecord, EnvReport


def record_to_json(record: CapabilityRecord) -> dict[str, Any]:
    return {
        "peer_id": record.peer_id,
        "addrs": list(record.addrs),
        "software": record.software,
        "seq": record.seq,
        "created_ms": record.created_ms,
        "expires_ms": record.expires_ms,
        "env": env_to_json(record.env),
        "name": record.name,
    }


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


def status_routes(net: P2P, discovery: Discovery, env: EnvReport, software: str) -> Routes:
    started = time.monotonic()

    async def status(_: Request) -> Any:
        current = discovery.current
        return {
            "peer_id": discovery.peer_id,
            "software": software,
            "addrs": net.listen_addrs(),
            "uptime_s": round(time.monotonic() - started, 3),
            "connected_peers": len(net.connected_peers()),
            "routing_table_size": net.routing_table_size(),
            "protocols": net.protocols(),
            "banned_peers": net.banned_peers(),
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
        source = request.query.get("source", "node")
        if source not in ("node", "dht"):
            raise ApiError(400, f"source: expected \"node\" or \"dht\", got {source!r}")
        # dht: the DHT walk alone (no local replica, no direct ask), for bench/wan.py
        query = discovery.record_from_network if source == "dht" else discovery.record_of
        cap = await query(peer_id) if peer_id else None
        if cap is None:
            raise ApiError(404, f"no valid capability record for {peer_id!r}")
        return record_to_json(cap.record)

    return {
        ("GET", "/v1/status"): status,
        ("GET", "/v1/env"): env_route,
        ("GET", "/v1/peers"): peers,
        ("GET", "/v1/gpus"): gpus,
        ("GET", "/v1/record"): record,
    }
