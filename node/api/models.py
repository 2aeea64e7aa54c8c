"""The SMIP routes of the local API: publish and fetch (as operations), versions, show.

Versions are named by their id or a unique prefix of at least ``MIN_PREFIX_CHARS`` hex
digits (resolve_version); publish and fetch answer ``{"op": id}`` at once and run in the
daemon's nursery (node/api/ops.py).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import trio

from node.api.ops import Operations
from node.api.server import ApiError, Request, Routes, body_fields, text_field
from node.smip.service import Models
from node.smip.types import Progress
from protocol.jobs import job_version_role

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
        body = body_fields(request, {"version"}, {"out", "kind"})
        version = resolve_version(models, body["version"])
        out = None if body.get("out") is None else _path(body["out"], "out")
        kind = None if body.get("kind") is None else _kind(body["kind"])

        async def work(progress: Progress) -> Any:
            info = await models.fetch(version, out_dir=out, progress=progress, kind=kind)
            return {**info.to_json(), "out": None if out is None else str(out)}

        return {"op": ops.start(nursery, "fetch", work)}

    async def operation(request: Request) -> Any:
        op_id = request.query.get("id")
        if not op_id:
            raise ApiError(400, "id: missing (GET /v1/ops?id=OPERATION)")
        return ops.get(op_id)

    async def versions(request: Request) -> Any:
        kind = request.query.get("kind") or None
        # "job_role": "delta" or "update" for a job's internal versions (protocol/jobs.py).
        return [{**v.to_json(), "job_role": job_version_role(v.name)}
                for v in models.list_versions(None if kind is None else _kind(kind))]

    async def show(request: Request) -> Any:
        version = resolve_version(models, request.query.get("version"))
        return await models.show(version)

    return {
        ("POST", "/v1/models/publish"): publish,
        ("POST", "/v1/models/fetch"): fetch,
        ("GET", "/v1/ops"): operation,
        ("GET", "/v1/models"): versions,
        ("GET", "/v1/models/show"): show,
    }
