"""The local API's routes for training: jobs, receipts, the built-in model and corpus.

    POST /v1/jobs/submit      {"spec": TOML text}             -> {"job": id}
    GET  /v1/jobs                                             -> [job summary]
    GET  /v1/jobs/status?id=  (id or unique prefix >= 8 hex)  -> rounds, workers, losses
    GET  /v1/receipts?job=    (optional job id)               -> [receipt]
    GET  /v1/feed?author=&after=                              -> [feed entry]
    POST /v1/models/init      {"arch", "size", "name", "seed", "tokenizer", "vocab_size",
                               "dataset", "block_size"} -> {"op": id}
    POST /v1/datasets/stdlib  {"name"}                        -> {"op": id}

The last two run as operations (``GET /v1/ops?id=``): a child process builds the files
(torch stays out of the daemon), then they are published through SMIP like any other.
"""

from __future__ import annotations

import secrets
import shutil
from pathlib import Path
from typing import Any

import trio

from node.api.ops import Operations
from node.api.server import ApiError, Request, Routes, body_fields, text_field
from node.jobs.coordinator import Jobs
from node.jobs.receipts import Receipts
from node.jobs.taskrun import run_taskproc
from node.ml import catalog
from node.smip.service import Models
from node.smip.types import Progress, UnknownVersion

ARCHS = ("gpt", *catalog.HF_ARCHS)


def job_routes(jobs: Jobs, receipts: Receipts, models: Models, ops: Operations,
               nursery: trio.Nursery, tmp_root: Path) -> Routes:
    async def submit(request: Request) -> Any:
        body = body_fields(request, {"spec"})
        return {"job": await jobs.submit(text_field(body["spec"], "spec"))}

    async def listing(_: Request) -> Any:
        return jobs.list()

    async def status(request: Request) -> Any:
        jid = (request.query.get("id") or "").strip()
        if not jid:
            raise ApiError(400, "id: missing (GET /v1/jobs/status?id=JOB)")
        return jobs.status(jid)

    async def receipt_list(request: Request) -> Any:
        job = (request.query.get("job") or "").strip().lower() or None
        if job is not None and len(job) < 64:
            job = jobs.status(job)["job"]
        return await receipts.list(job)

    async def feed(request: Request) -> Any:
        after = request.query.get("after") or "0"
        if not after.isdigit():
            raise ApiError(400, f"after: expected a sequence number, got {after!r}")
        return await receipts.feed(request.query.get("author") or None, int(after))

    async def build(kind: str, name: str, op: dict[str, Any], out_name: str,
                    progress: Progress) -> Any:
        tmp = tmp_root / f"build-{secrets.token_hex(6)}"
        tmp.mkdir(parents=True)
        try:
            progress.phase = "building"
            out = tmp / out_name
            key = "out_dir" if kind == "model" else "out"
            answer = await run_taskproc({**op, key: str(out)},
                                        timeout_s=jobs.tunables.build_timeout_s,
                                        what=f"building the {kind}")
            progress.phase = "publishing"
            version = await models.publish(out, kind=kind, name=name, progress=progress)
            return {"version": version, "kind": kind, "name": name, **answer}
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    async def model_init(request: Request) -> Any:
        body = body_fields(request, set(), {"arch", "size", "name", "seed", "tokenizer",
                                            "vocab_size", "dataset", "block_size"})
        arch, size = body.get("arch", "gpt"), body.get("size", "tiny")
        if arch not in ARCHS:
            raise ApiError(400, f"arch: expected one of {', '.join(ARCHS)}, got {arch!r}")
        sizes = catalog.GPT_SIZES if arch == "gpt" else tuple(catalog.HF_SIZES)
        if size not in sizes:
            raise ApiError(400, f"size: expected one of {', '.join(sizes)} for {arch}, "
                                f"got {size!r}")
        seed = body.get("seed", 0)
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
            raise ApiError(400, f"seed: expected an integer in [0, 2**63), got {seed!r}")
        name = text_field(body.get("name") or f"{arch}-{size}", "name")
        op: dict[str, Any] = {"op": "init", "arch": arch, "size": size, "seed": seed}
        if arch != "gpt":
            op.update(hf_init_fields(body))
        elif any(body.get(k) is not None for k in ("tokenizer", "vocab_size", "dataset")):
            raise ApiError(400, "tokenizer, vocab_size and dataset: for Hugging Face "
                                "architectures only (the built-in gpt reads bytes)")
        dataset = op.pop("dataset", None)

        async def work(progress: Progress) -> Any:
            if dataset is not None:  # the BPE is trained on it: fetched first
                progress.phase = "fetching the dataset"
                await models.fetch(dataset, kind="dataset")
                held = models.held[models.resolve(dataset)]
                op["data_files"] = [str(models.store.shard_path(s.root))
                                    for s in held.manifest.shards]
            return await build("model", name, op, "model", progress)

        return {"op": ops.start(nursery, "model-init", work)}

    def hf_init_fields(body: dict[str, Any]) -> dict[str, Any]:
        tok = body.get("tokenizer") or ("bpe" if body.get("dataset") else "byte")
        if tok not in catalog.TOKENIZERS:
            raise ApiError(400, f"tokenizer: expected one of {', '.join(catalog.TOKENIZERS)}, "
                                f"got {tok!r}")
        out: dict[str, Any] = {"tokenizer": tok}
        if tok == "bpe":
            dataset = body.get("dataset")
            if not isinstance(dataset, str):
                raise ApiError(400, "dataset: a BPE tokenizer is trained on a dataset: give "
                                    "its version")
            try:
                out["dataset"] = models.resolve(dataset).hex()
            except UnknownVersion as exc:
                raise ApiError(400, f"dataset: {exc}") from None
        for key, lo, hi in (("vocab_size", 258, 1 << 20), ("block_size", 1, 1 << 20)):
            v = body.get(key)
            if v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
                raise ApiError(400, f"{key}: expected an integer in [{lo}, {hi}], got {v!r}")
            if key == "vocab_size" and tok != "bpe":
                raise ApiError(400, "vocab_size: for a BPE tokenizer only (a byte tokenizer "
                                    "has 257 tokens)")
            out[key] = v
        return out

    async def dataset_stdlib(request: Request) -> Any:
        body = body_fields(request, set(), {"name"})
        name = text_field(body.get("name") or "python-stdlib", "name")

        async def work(progress: Progress) -> Any:
            return await build("dataset", name, {"op": "corpus"}, "stdlib.txt", progress)

        return {"op": ops.start(nursery, "dataset-stdlib", work)}

    return {
        ("POST", "/v1/jobs/submit"): submit,
        ("GET", "/v1/jobs"): listing,
        ("GET", "/v1/jobs/status"): status,
        ("GET", "/v1/receipts"): receipt_list,
        ("GET", "/v1/feed"): feed,
        ("POST", "/v1/models/init"): model_init,
        ("POST", "/v1/datasets/stdlib"): dataset_stdlib,
    }
