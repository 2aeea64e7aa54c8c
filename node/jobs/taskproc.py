"""The torch side of a node: ``python -m node.jobs.taskproc``, one operation per process.

The daemon never imports torch (node/jobs/taskrun.py runs this module as a child). Protocol:
ONE JSON object on stdin (the request), progress lines on stderr, ONE JSON object as the
last line of stdout: ``{"ok": true, ...}`` and exit 0, or ``{"ok": false, "error": msg}``
and exit 1. Numbers in answers are finite (a non-finite metric is sent as null).
Every path is absolute. Every file written goes to a temporary name in its directory and is
renamed into place, so a crash leaves nothing half-written; a model directory gets its
weights first and its config.json last.

Every answer also carries "peak_rss_bytes", the child's peak resident memory.

Ops (fields without a default are required):

``init``    {"op": "init", "arch": "gpt", "size": "tiny", "seed": 0, "out_dir": D}
            or "config": {GPTConfig fields} instead of "size"; or "arch": llama | qwen2 |
            mistral | gpt2, "size": tiny | small | 125m, "tokenizer": "byte" | "bpe"
            (with "data_files" and "vocab_size"), "block_size": optional
            -> {"params": N, "sha256": hex of model.safetensors, "vocab_size" (HF)}
``corpus``  {"op": "corpus", "out": F} -> {"bytes": N, "files": K}
``train``   {"op": "train", "model_dir": D, "data_files": [F, ...], "slice_start": s,
             "slice_len": n, "seed": k, "steps": H, "batch_size": B, "seq_len": T, "lr": x,
             "warmup": 0, "lr_end": null, "device": "cpu"|"cuda"|"auto", "threads": 1,
             "delta_bits": 8|4, "out_dir": O, optional: "micro_batch": m, "compile": false,
             "grad_checkpointing": false, "micro_batch_cache": DIR, "token_cache": DIR,
             "memory": "standard"|"lean" (the job's train.memory)}
            -> O/delta.safetensors (int8; int4 with "delta_bits": 4); {"first_loss",
               "last_loss", "tokens", "wall_s", "delta": path, "delta_bytes": size,
               "device": device used, "micro_batch", "precision": fp32|bf16|fp16}
            A model directory with a tokenizer.json reads the data as that tokenizer's ids
            (tokenized once, cached in "token_cache", default <store>/tokens); slices stay
            in bytes of the data and are mapped onto tokens in proportion.
``check``   {"op": "check", "model_dir": D, "data_files": [...], "heldout_fraction": h,
             "eval_batches": n, "batch_size": b, "seq_len": T, "seed": k, "window_seed": k,
             "deltas": [{"id", "path", "slice_start", "slice_len", "seed", "steps",
                         "batch_size", "seq_len"}, ...],   # in arrival order
             "reexec": [{"id", "train": {train request fields}}, ...],
             "thresholds": {Thresholds field: value}, "device": "cpu", "threads": 1}
            (a delta entry may carry its training fields in a "train" object instead).
            "seed" draws the held-out windows (fixed per job: comparable losses);
            "window_seed" (default: "seed") picks which of each task's training windows are
            measured: the coordinator should draw it at random once the deltas are in, so
            that no worker knows in advance which of its windows will be looked at.
            Deltas in arrival order: of a copy and its original, the later one is charged.
            -> {"results": {id: {metrics..., "reexec_match", "reexec_diff", "verdict",
               "reason"}}, "thresholds": {...}, "check_wall_s", "reexec_wall_s"}
``outer``   {"op": "outer", "model_dir": D, "deltas": [paths], "momentum": M0|null,
             "outer_lr": x, "outer_momentum": m, "aggregate": "trimmed"|"clip",
             "weights": [tokens of each delta] | null (the aggregate's weights),
             "delta_bits": 8|4 (of the published update),
             "out_model_dir": O, "out_update": U, "out_momentum": M, "data_files": [...],
             "heldout_fraction": h, "eval_batches": n, "batch_size": 32, "seq_len": null,
             "seed": 0, "threads": 1}
            -> {"heldout_loss", "n_deltas", "update_bytes", "sha256", "wall_s"}
``apply``   {"op": "apply", "model_dir": D, "update": U, "out_model_dir": O}
            -> {"params", "sha256", "wall_s"}: the same bytes as outer's O
"""

from __future__ import annotations

import hashlib
import importlib
import json
import math
import os
import resource
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from node.ml import corpus, device, gpt, heap, hf, models, tokens, trainer
from protocol import checking
from protocol.jobspec import DELTA_BITS, MEMORY_MODES

__all__ = ["OPS", "RequestError", "answer", "handle", "main"]

DELTA_FILE = "delta.safetensors"
RESIDUAL_SUFFIX = ".__residual"
# One JSON request: fields and short lists of deltas, never tensors.
MAX_REQUEST_BYTES = 1 << 20


class RequestError(ValueError):
    """The request is malformed or names something that is not there."""


def progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- fields


def field(req: dict[str, Any], name: str, kind: type | tuple[type, ...],
          default: Any = ...) -> Any:
    if name not in req or (req[name] is None and default is not ...):
        if default is ...:
            raise RequestError(f"missing field {name!r}")
        return default
    value = req[name]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(value, bool) and kind is not bool:
        raise RequestError(f"field {name!r}: expected {getattr(kind, '__name__', kind)}")
    if not isinstance(value, kind):
        raise RequestError(f"field {name!r}: expected {getattr(kind, '__name__', kind)}, "
                           f"got {type(value).__name__}")
    if isinstance(value, float) and not math.isfinite(value):
        raise RequestError(f"field {name!r} is not finite")
    return value


def int_field(req: dict[str, Any], name: str, lo: int = 0, default: Any = ...) -> int:
    value = field(req, name, int, default)
    if value < lo:
        raise RequestError(f"field {name!r} must be >= {lo}, got {value}")
    return int(value)


def path_field(req: dict[str, Any], name: str, default: Any = ...) -> Path:
    """An absolute path; a field given ``default=None`` may be absent: None then (typed as
    a Path for the callers that never pass a default, which get a RequestError instead)."""
    value = field(req, name, str, default)
    if value is None:
        return None  # type: ignore[return-value]
    if not os.path.isabs(value):
        raise RequestError(f"field {name!r}: path {value!r} is not absolute")
    return Path(value)


def file_list(req: dict[str, Any]) -> list[str]:
    files = field(req, "data_files", list)
    if not files or not all(isinstance(f, str) and os.path.isabs(f) for f in files):
        raise RequestError("data_files: a non-empty list of absolute paths")
    for f in files:
        if not os.path.isfile(f):
            raise RequestError(f"data file {f}: no such file")
    return files


class Data:
    """A request's dataset as the model sees it: bytes for the built-in GPT, or the ids of
    the model's tokenizer (tokenized once per (dataset, tokenizer), then cached). Slices
    and windows of a job are given in bytes of the dataset; :meth:`span` maps them onto
    token positions in proportion (the same map on every node: the same tokens)."""

    def __init__(self, req: dict[str, Any], model_dir: Path, config: models.Config) -> None:
        files = file_list(req)
        self.n_bytes = sum(os.path.getsize(f) for f in files)
        tok_file = model_dir / tokens.TOKENIZER_FILE
        if models.is_hf(config) and not tok_file.is_file():
            raise RequestError(f"model {model_dir}: a Hugging Face model needs a "
                               f"{tokens.TOKENIZER_FILE} (tokenizers' format) to read text")
        if tok_file.is_file():
            try:
                vocab = tokens.vocab_size(tok_file)
            except Exception as e:  # tokenizers raises its own Exception type on a bad file
                raise RequestError(f"{tok_file}: unreadable tokenizer ({e})") from None
            if vocab > getattr(config, "vocab_size", vocab):
                raise RequestError(f"{tok_file}: {vocab} tokens, more than the model's "
                                   f"vocab_size {getattr(config, 'vocab_size', 0)}")
            cache = path_field(req, "token_cache", None) or default_token_cache(files[0])
            try:
                self.tokens = tokens.tokenized(tok_file, files, cache, progress=_tok_progress)
            except Exception as e:  # tokenizers raises its own Exception type on a bad file
                raise RequestError(f"tokenizing the dataset: {e}") from None
        else:
            self.tokens = corpus.load_tokens(files)
        self.n = len(self.tokens)

    def span(self, start: int, length: int) -> tuple[int, int]:
        """(start, length) in tokens of a byte range of the dataset."""
        if self.n == self.n_bytes:
            return start, length
        lo = start * self.n // self.n_bytes
        return lo, (start + length) * self.n // self.n_bytes - lo


def default_token_cache(first_file: str) -> Path:
    """Beside the content store (``<store>/tokens``) when the data are its shards, else
    in the temporary directory."""
    p = Path(first_file)
    if p.parent.name == "shards":
        return p.parent.parent / "tokens"
    return Path(tempfile.gettempdir()) / "iollm-tokens"


def _tok_progress(n: int) -> None:
    progress(f"tokenizing the dataset: {n} tokens")  # once a window (1 MiB of text)


def data_files(req: dict[str, Any]) -> Any:
    """The dataset's bytes (the built-in GPT's tokens)."""
    return corpus.load_tokens(file_list(req))


def pick_device(name: str) -> str:
    try:
        return device.choose(name)
    except ValueError as e:
        raise RequestError(str(e)) from None


def load_model_dir(path: Path) -> tuple[models.Config, dict[str, torch.Tensor]]:
    try:
        return models.load_model(path)
    except ValueError as e:
        raise RequestError(f"model {path}: {e}") from None


def load_tensors(path: Path, what: str) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise RequestError(f"{what} {path}: no such file")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise RequestError(f"{what} {path}: unreadable safetensors ({e})") from None


def load_delta(path: Path, config: models.Config) -> dict[str, torch.Tensor]:
    """A dequantized delta (int8 or int4), checked against the model's tensor names and
    shapes."""
    q = load_tensors(path, "delta")
    try:
        delta = trainer.dequantize(q)
        models.check_state(config, delta)
    except ValueError as e:
        raise RequestError(f"delta {path}: {e}") from None
    return delta


def write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    gpt.write_atomic(path, data)


def clean(obj: Any) -> Any:
    """JSON-safe: non-finite floats become None (answers are parsed with allow_nan off)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean(v) for v in obj]
    return obj


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --------------------------------------------------------------------------- ops


def op_init(req: dict[str, Any]) -> dict[str, Any]:
    arch = field(req, "arch", str, "gpt")
    if arch in hf.ARCHS:
        return init_hf(req, arch)
    if arch != gpt.ARCHITECTURE:
        raise RequestError(f"arch {arch!r}: one of gpt, {', '.join(hf.ARCHS)}")
    if "config" in req:
        config = gpt.config_from_json({"architecture": arch, **field(req, "config", dict)})
    else:
        size = field(req, "size", str)
        if size not in gpt.SIZES:
            raise RequestError(f"size {size!r}: one of {', '.join(gpt.SIZES)}")
        config = gpt.SIZES[size]
    out = path_field(req, "out_dir")
    state = gpt.init_state(config, int_field(req, "seed", 0, 0))
    gpt.save_model(out, config, state)
    return {"params": gpt.n_params(state), "sha256": sha256_file(out / gpt.WEIGHTS_FILE)}


def init_hf(req: dict[str, Any], arch: str) -> dict[str, Any]:
    """A fresh Hugging Face model with its tokenizer: a byte tokenizer, or a byte-level
    BPE of ``vocab_size`` trained on ``data_files``."""
    size = field(req, "size", str)
    if size not in hf.SIZES:
        raise RequestError(f"size {size!r}: one of {', '.join(hf.SIZES)}")
    kind = field(req, "tokenizer", str, "byte")
    if kind == "byte":
        tok = tokens.byte_tokenizer()
    elif kind == "bpe":
        files = file_list(req)
        vocab = int_field(req, "vocab_size", 258, 8192)
        progress(f"training a byte-level BPE of {vocab} tokens on {len(files)} file(s)")
        try:
            tok = tokens.train_bpe(files, vocab)
        except ValueError as e:
            raise RequestError(str(e)) from None
    else:
        raise RequestError(f"tokenizer {kind!r}: one of byte, bpe")
    block = int_field(req, "block_size", 1, None) if req.get("block_size") else None
    cfg_json = hf.make_config(arch, size, tok.get_vocab_size(with_added_tokens=True),
                              tok.token_to_id(tokens.EOT), block)
    config = hf.HFConfig.from_json(cfg_json)
    out = path_field(req, "out_dir")
    state = hf.init_state(config, int_field(req, "seed", 0, 0))
    models.save_model(out, config, state, tok)
    return {"params": sum(t.numel() for t in state.values()),
            "sha256": sha256_file(out / gpt.WEIGHTS_FILE), "vocab_size": config.vocab_size}


def op_corpus(req: dict[str, Any]) -> dict[str, Any]:
    out = path_field(req, "out")
    out.parent.mkdir(parents=True, exist_ok=True)
    stats = corpus.build_stdlib_corpus(out, seed=int_field(req, "seed", 0, 0),
                                       include_tests=field(req, "include_tests", bool, False))
    return {"bytes": stats.bytes, "files": stats.files}


def train_args(req: dict[str, Any]) -> dict[str, Any]:
    """The training fields of a train request (also a check's re-execution entries)."""
    lr_end = field(req, "lr_end", (int, float), None)
    return {
        "slice_start": int_field(req, "slice_start", 0),
        "slice_len": int_field(req, "slice_len", 1),
        "seed": int_field(req, "seed", 0),
        "steps": int_field(req, "steps", 1),
        "batch_size": int_field(req, "batch_size", 1),
        "seq_len": int_field(req, "seq_len", 1),
        "lr": field(req, "lr", float),
        "warmup": int_field(req, "warmup", 0, 0),
        "lr_end": None if lr_end is None else float(lr_end),
        "memory": memory_mode(req),
    }


def memory_mode(req: dict[str, Any]) -> str:
    """The job's train.memory (training maths, so a re-execution must use the same)."""
    mode = field(req, "memory", str, "standard")
    if mode not in MEMORY_MODES:
        raise RequestError(f"memory: one of {', '.join(MEMORY_MODES)}, got {mode!r}")
    return mode


def delta_bits(req: dict[str, Any]) -> int:
    """Bits a value of the delta or update a request writes (8 unless it says 4)."""
    bits = int_field(req, "delta_bits", 4, 8)
    if bits not in DELTA_BITS:  # the job spec's choices
        raise RequestError(f"delta_bits: one of {DELTA_BITS}, got {bits}")
    return bits


def run_options(req: dict[str, Any]) -> dict[str, Any]:
    """How a request wants its training run (none changes the result beyond rounding):
    a fixed micro-batch (default: found per device), torch.compile, activation
    checkpointing, where found micro-batches are cached."""
    micro = field(req, "micro_batch", int, None)
    if micro is not None and micro < 1:
        raise RequestError(f"field 'micro_batch' must be >= 1, got {micro}")
    return {"micro_batch": micro, "compile_model": field(req, "compile", bool, False),
            "grad_checkpointing": field(req, "grad_checkpointing", bool, False),
            "micro_batch_cache": path_field(req, "micro_batch_cache", None)}


_CHILD = False  # True in a task child (main), never in a process that imports this module


def run_training(config: models.Config, base: dict[str, torch.Tensor], data: Data,
                 args: dict[str, Any], dev: str, what: str,
                 run_opts: dict[str, Any] | None = None) -> trainer.TaskOutput:
    every = max(1, args["steps"] // 10)
    run_opts = run_opts or {}

    def on_step(step: int, loss: torch.Tensor) -> None:
        if (step + 1) % every == 0 or step == 0:
            progress(f"{what}: step {step + 1}/{args['steps']} loss {float(loss):.4f}")

    a = dict(args)
    if a["memory"] == "lean" and _CHILD:
        # Freed activations go back to the system at once (node/ml/heap.py): what the
        # lean mode's peak needs, at about a fifth more CPU time (many more page faults),
        # so a standard job keeps glibc's default. Process-wide: only in a task child.
        heap.large_blocks_mapped()
    start, length = data.span(a.pop("slice_start"), a.pop("slice_len"))
    try:
        return trainer.train_task(
            config, base, data.tokens, start, length, a.pop("seed"),
            a.pop("steps"), a.pop("batch_size"), a.pop("seq_len"), a.pop("lr"), dev,
            warmup=a.pop("warmup"), lr_end=a.pop("lr_end"), memory=a.pop("memory"),
            on_step=on_step, **run_opts)
    except ValueError as e:
        raise RequestError(f"{what}: {e}") from None


def op_train(req: dict[str, Any]) -> dict[str, Any]:
    model_dir = path_field(req, "model_dir")
    config, base = load_model_dir(model_dir)
    data = Data(req, model_dir, config)
    args = train_args(req)
    dev = pick_device(field(req, "device", str, "cpu"))
    out_dir = path_field(req, "out_dir")
    t0 = time.perf_counter()
    out = run_training(config, base, data, args, dev, "train", run_options(req))
    wall = time.perf_counter() - t0
    blob = save(trainer.quantize(out.delta, delta_bits(req)))
    path = out_dir / DELTA_FILE
    write_atomic(path, blob)
    return {"first_loss": out.first_loss, "last_loss": out.last_loss,
            "tokens": out.tokens_processed, "wall_s": wall, "delta": str(path),
            "delta_bytes": len(blob), "device": dev, "micro_batch": out.micro_batch,
            "precision": device.precision(dev).name}


def op_check(req: dict[str, Any]) -> dict[str, Any]:
    t0 = time.perf_counter()
    model_dir = path_field(req, "model_dir")
    config, base = load_model_dir(model_dir)
    data = Data(req, model_dir, config)
    n = data.n
    _, h_start = corpus.split(n, field(req, "heldout_fraction", float))
    seq_len = int_field(req, "seq_len", 1)
    batch = int_field(req, "batch_size", 1)
    n_windows = int_field(req, "eval_batches", 1) * batch
    seed = int_field(req, "seed", 0, 0)
    dev = pick_device(field(req, "device", str, "cpu"))
    th_req = field(req, "thresholds", dict, {})
    try:
        checking.judge({}, th_req)  # validates the names
    except ValueError as exc:
        raise RequestError(str(exc)) from None
    entries = field(req, "deltas", list)
    results: dict[str, dict[str, Any]] = {}
    cands: list[trainer.Candidate] = []
    slices: dict[str, tuple[int, int]] = {}  # in bytes, as the requests give them
    for e in entries:
        if not isinstance(e, dict):
            raise RequestError("deltas: a list of objects")
        did = field(e, "id", str)
        if did in results or any(c.id == did for c in cands):
            raise RequestError(f"deltas: id {did!r} twice")
        t = e.get("train", e)
        if not isinstance(t, dict):
            raise RequestError(f"delta {did}: 'train' must be an object")
        try:
            delta = load_delta(path_field(e, "path"), config)
        except RequestError as err:
            # A peer's bad file is data: that one delta is rejected, the round goes on.
            results[did] = {"verdict": "reject", "reason": str(err)}
            continue
        slices[did] = (int_field(e, "slice_start", 0), int_field(e, "slice_len", 1))
        start, length = data.span(*slices[did])
        cands.append(trainer.Candidate(
            id=did, delta=delta, slice_start=start, slice_len=length,
            seed=int_field(t, "seed", 0),
            steps=int_field(t, "steps", 1), batch_size=int_field(t, "batch_size", 1),
            seq_len=int_field(t, "seq_len", 1, seq_len)))
    try:
        metrics = trainer.check_round(config, base, cands, data.tokens,
                                      heldout=(h_start, n - h_start),
                                      n_windows=n_windows, batch_size=batch, seed=seed,
                                      window_seed=int_field(req, "window_seed", 0, seed),
                                      seq_len=seq_len, device=dev)
    except ValueError as err:
        raise RequestError(f"check: {err}") from None
    for m in metrics.values():
        m["reexec_match"] = None
        m["reexec_diff"] = None
    check_wall = time.perf_counter() - t0
    t1 = time.perf_counter()
    tol = checking.judge_thresholds(th_req).reexec_tol
    by_id = {c.id: c for c in cands}
    for r in field(req, "reexec", list, []):
        if not isinstance(r, dict):
            raise RequestError("reexec: a list of objects")
        rid = field(r, "id", str)
        if rid not in by_id:
            if rid in results:
                continue  # its delta was already rejected as unreadable
            raise RequestError(f"reexec: no delta with id {rid!r}")
        train = field(r, "train", dict)
        args = train_args(train)
        c = by_id[rid]
        if (args["slice_start"], args["slice_len"], args["seed"], args["steps"],
                args["batch_size"], args["seq_len"]) != (*slices[rid], c.seed, c.steps,
                                                        c.batch_size, c.seq_len):
            raise RequestError(f"reexec {rid}: train fields differ from the delta's entry")
        out = run_training(config, base, data, args, dev, f"reexec {rid}", run_options(train))
        rerun = trainer.dequantize(trainer.quantize(out.delta, delta_bits(train)))
        diff = trainer.reexec_diff(c.delta, rerun)
        metrics[rid]["reexec_diff"] = diff
        metrics[rid]["reexec_match"] = diff <= tol
    reexec_wall = time.perf_counter() - t1
    for did, m in metrics.items():
        m["verdict"], m["reason"] = checking.judge(m, th_req)
        results[did] = m
    ordered = {e["id"]: results[e["id"]] for e in entries}
    return {"results": ordered, "thresholds": checking.judge_thresholds(th_req).to_json(),
            "check_wall_s": check_wall, "reexec_wall_s": reexec_wall}


def heldout_loss(req: dict[str, Any], config: models.Config, model_dir: Path,
                 state: dict[str, torch.Tensor]) -> float | None:
    """The held-out loss of ``state`` when the request names data files, else None."""
    if "data_files" not in req or req["data_files"] is None:
        return None
    data = Data(req, model_dir, config)
    n = data.n
    _, h_start = corpus.split(n, field(req, "heldout_fraction", float))
    batch = int_field(req, "batch_size", 1, 32)
    seq_len = int_field(req, "seq_len", 1, models.block_size(config))
    starts = trainer.heldout_windows(h_start, n - h_start,
                                     int_field(req, "eval_batches", 1) * batch, seq_len,
                                     int_field(req, "seed", 0, 0), n)
    return trainer.windows_loss(models.build(config, state), data.tokens, starts, seq_len,
                                batch)


def write_model(out_dir: Path, base_dir: Path, state: dict[str, torch.Tensor]) -> str:
    """A new version beside its base (models.write_version: outer and apply must give
    identical directories, whoever wrote the base's files). The weights' sha256."""
    return models.write_version(out_dir, base_dir, state)


def op_outer(req: dict[str, Any]) -> dict[str, Any]:
    t0 = time.perf_counter()
    model_dir = path_field(req, "model_dir")
    config, base = load_model_dir(model_dir)
    paths = field(req, "deltas", list)
    if not paths:
        raise RequestError("deltas: at least one accepted delta")
    deltas = [load_delta(path_field({"p": p}, "p"), config) for p in paths]
    momentum_path = path_field(req, "momentum", None)
    momentum: dict[str, torch.Tensor] | None = None
    residual: dict[str, torch.Tensor] | None = None
    if momentum_path is not None:
        buf = load_tensors(momentum_path, "momentum")
        momentum = {k: v for k, v in buf.items() if not k.endswith(RESIDUAL_SUFFIX)}
        residual = {k[:-len(RESIDUAL_SUFFIX)]: v for k, v in buf.items()
                    if k.endswith(RESIDUAL_SUFFIX)}
        try:
            models.check_state(config, momentum)
            models.check_state(config, residual)
        except ValueError as e:
            raise RequestError(f"momentum {momentum_path}: {e}") from None
    aggregate = field(req, "aggregate", str, "trimmed")
    if aggregate not in ("trimmed", "clip"):
        raise RequestError(f"aggregate {aggregate!r}: one of trimmed, clip")
    weights = field(req, "weights", list, None)  # tokens behind each delta
    if weights is not None and (len(weights) != len(deltas) or not all(
            isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w)
            and w > 0 for w in weights)):
        raise RequestError("weights: one finite positive number per delta")
    avg = trainer.robust_aggregate(deltas, method=aggregate, weights=weights)
    update, new_m = trainer.outer_step(base, avg, momentum, field(req, "outer_lr", float),
                                       field(req, "outer_momentum", float))
    q, new_state, new_r = trainer.publish_update(base, update, residual, delta_bits(req))
    upd = save(q)
    write_atomic(path_field(req, "out_update"), upd)
    buf = {**new_m, **{k + RESIDUAL_SUFFIX: v for k, v in new_r.items()}}
    write_atomic(path_field(req, "out_momentum"), save(dict(sorted(buf.items()))))
    sha = write_model(path_field(req, "out_model_dir"), model_dir, new_state)
    loss = heldout_loss(req, config, model_dir, new_state)
    return {"heldout_loss": loss, "n_deltas": len(deltas), "update_bytes": len(upd),
            "sha256": sha, "wall_s": time.perf_counter() - t0}


def op_apply(req: dict[str, Any]) -> dict[str, Any]:
    t0 = time.perf_counter()
    model_dir = path_field(req, "model_dir")
    _, base = load_model_dir(model_dir)
    q = load_tensors(path_field(req, "update"), "update")
    try:
        new_state = trainer.apply_update(base, q)
    except ValueError as e:
        raise RequestError(f"update: {e}") from None
    sha = write_model(path_field(req, "out_model_dir"), model_dir, new_state)
    return {"params": gpt.n_params(new_state), "sha256": sha,
            "wall_s": time.perf_counter() - t0}


def op_forge(req: dict[str, Any]) -> dict[str, Any]:
    """A cheating worker's delta (``worker.adversary``, for tests of the checks). The code
    is tests/adversary.py, which this package never imports otherwise: a node configured
    to cheat must run from a source checkout, with the repository root on its path."""
    try:
        adversary = importlib.import_module("tests.adversary")
    except ImportError:
        raise RequestError("worker.adversary is for tests only: it needs tests/adversary.py "
                           "of a source checkout on the Python path") from None
    result: dict[str, Any] = adversary.forge(req)
    return result


OPS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "init": op_init,
    "corpus": op_corpus,
    "train": op_train,
    "check": op_check,
    "outer": op_outer,
    "apply": op_apply,
    "forge": op_forge,
}


def handle(req: Any) -> dict[str, Any]:
    """Run one request; RequestError (a ValueError) when it is malformed."""
    if not isinstance(req, dict):
        raise RequestError("the request must be a JSON object")
    op = req.get("op")
    if op not in OPS:
        raise RequestError(f"unknown op {op!r} (one of {', '.join(OPS)})")
    threads = int_field(req, "threads", 1, 1)
    torch.set_num_threads(threads)
    return OPS[op](req)


def answer(raw: bytes) -> tuple[int, dict[str, Any]]:
    """(exit code, answer object) for the raw bytes of a request."""
    try:
        if len(raw) > MAX_REQUEST_BYTES:
            raise RequestError(f"request over {MAX_REQUEST_BYTES} bytes")
        try:
            req = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RequestError(f"request is not JSON: {e}") from None
        result = clean(handle(req))
        return 0, {"ok": True, **result, "peak_rss_bytes": peak_rss_bytes()}
    except (ValueError, OSError) as e:
        # ValueError covers RequestError and the checks of gpt/trainer/corpus.
        return 1, {"ok": False, "error": str(e) or type(e).__name__}
    except Exception as e:  # a bug: the traceback goes to stderr, the answer says what
        traceback.print_exc()
        return 1, {"ok": False, "error": f"internal error: {type(e).__name__}: {e}"}


def peak_rss_bytes() -> int:
    """This process's peak resident memory so far (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def main(raw: bytes | None = None) -> int:
    """Answer one request (read from stdin unless given: a warm child gets it as an
    argument, node/jobs/warmchild.py) on stdout; the exit code."""
    global _CHILD
    was, _CHILD = _CHILD, True
    try:  # a real child exits after this; a test calling main in its own process goes on
        if raw is None:
            raw = sys.stdin.buffer.read(MAX_REQUEST_BYTES + 1)
        code, obj = answer(raw)
        sys.stdout.write(json.dumps(obj, allow_nan=False) + "\n")
        sys.stdout.flush()
        return code
    finally:
        _CHILD = was


if __name__ == "__main__":
    sys.exit(main())
