"""``iollm job ...``, ``iollm receipts``, ``iollm model init``, ``iollm dataset stdlib``.

    model init        POST /v1/models/init, then wait for the operation
    dataset stdlib    POST /v1/datasets/stdlib, then wait
    job submit FILE   POST /v1/jobs/submit (the node signs and coordinates the job)
    job status JOB    GET /v1/jobs/status?id=   (--watch: until the job ends)
    job list          GET /v1/jobs
    receipts          GET /v1/receipts?job=

Like the model commands, these only talk to the running node; stdout carries what a
script wants (an id, a table, ``--json``), stderr the progress.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

from node.cli.common import SHORT, CliError, call_node, int_arg, short_peer, when
from node.cli.jobview import JobWatch, format_status
from node.cli.models import wait_for_operation
from node.ml import catalog

WATCH_POLL_S = 1.0


def cmd_model_init(args: argparse.Namespace) -> int:
    body = {"arch": args.arch, "size": args.size, "name": args.name, "seed": args.seed}
    for key in ("tokenizer", "vocab_size", "dataset", "block_size"):
        if getattr(args, key) is not None:
            body[key] = getattr(args, key)
    started = call_node(args, "/v1/models/init", "POST", body)
    result = wait_for_operation(args, started["op"], "init", "Its version will be in "
                                "`iollm model list` when it is done.")
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"published model {result['name']!r} ({result.get('params', '?')} parameters): "
          f"version {result['version']}", file=sys.stderr)
    print(result["version"])
    return 0


def cmd_dataset_stdlib(args: argparse.Namespace) -> int:
    started = call_node(args, "/v1/datasets/stdlib", "POST", {"name": args.name})
    result = wait_for_operation(args, started["op"], "corpus", "Its version will be in "
                                "`iollm dataset list` when it is done.")
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"published dataset {result['name']!r} ({result.get('bytes', '?')} bytes from "
          f"{result.get('files', '?')} files): version {result['version']}", file=sys.stderr)
    print(result["version"])
    return 0


def cmd_job_submit(args: argparse.Namespace) -> int:
    path = Path(args.file).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CliError(f"cannot read {args.file}: {exc}") from None
    job = call_node(args, "/v1/jobs/submit", "POST", {"spec": text})["job"]
    print(f"submitted job {job}; `iollm job status {job[:SHORT]}` follows it", file=sys.stderr)
    print(job)
    if args.wait:
        return _watch(args, job)
    return 0


def _watch(args: argparse.Namespace, job: str) -> int:
    view = JobWatch(sys.stderr)
    status: dict[str, Any] | None = None
    try:
        while True:
            status = call_node(args, f"/v1/jobs/status?id={quote(job)}")
            view.update(status)
            if status.get("status") != "running":
                break
            time.sleep(WATCH_POLL_S)  # polling another process: the job has no end time
    finally:
        view.close(status if status and status.get("status") != "running" else None)
    return 0 if status.get("status") == "done" else 1


def cmd_job_status(args: argparse.Namespace) -> int:
    if args.watch:
        return _watch(args, args.job)
    status = call_node(args, f"/v1/jobs/status?id={quote(args.job)}")
    print(json.dumps(status, indent=2) if args.json
          else format_status(status, checks=args.checks))
    return 0


def cmd_job_list(args: argparse.Namespace) -> int:
    jobs = call_node(args, "/v1/jobs")
    if args.json:
        print(json.dumps(jobs, indent=2))
        return 0
    if not jobs:
        print("no jobs known to this node")
        return 0
    print(f"{'JOB':<{SHORT}}  {'NAME':<20}  {'STATUS':<9}  ROUND   {'SUBMITTED':<23}  COORDINATOR")
    for j in jobs:
        rnd = "-" if j["round"] is None else f"{j['round']}/{j['rounds']}"
        print(f"{j['job'][:SHORT]}  {j['name'][:20]:<20}  {j['status']:<9}  {rnd:<6}  "
              f"{when(j['submitted_ms']):<23}  {short_peer(j['coordinator'])}")
    return 0


def cmd_receipts(args: argparse.Namespace) -> int:
    path = "/v1/receipts" + (f"?job={quote(args.job)}" if args.job else "")
    receipts = call_node(args, path)
    if args.json:
        print(json.dumps(receipts, indent=2))
        return 0
    if not receipts:
        print("no receipts held by this node" + (f" for job {args.job}" if args.job else ""))
        return 0
    print(f"{'RECEIPT':<{SHORT}}  {'JOB':<{SHORT}}  RND  {'TASK':<8}  {'WORKER':<18}  "
          f"{'TOKENS':>8}  HELD-OUT GAIN  VERDICT")
    for r in receipts:
        gain = r["metrics"].get("heldout_gain")
        print(f"{r['receipt'][:SHORT]}  {r['job'][:SHORT]}  {r['round']:>3}  {r['task']:<8}  "
              f"{short_peer(r['worker']):<18}  {r['tokens']:>8}  "
              f"{'?' if gain is None else f'{gain:.4f}':>13}  {r['verdict']}")
    return 0


def _job_arg(text: str) -> str:
    value = text.strip().lower()
    if not 8 <= len(value) <= 64 or any(c not in "0123456789abcdef" for c in value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a job id: give its 64 hex digits "
                                         "or a unique prefix of at least 8")
    return value


_seed = int_arg(0, 2**63 - 1, "a seed in [0, 2**63)")


def add_job_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser],
                     client: argparse.ArgumentParser,
                     groups: dict[str, argparse._SubParsersAction[argparse.ArgumentParser]]
                     ) -> None:
    p = groups["model"].add_parser(
        "init", parents=[client], help="publish a fresh model (built-in GPT, Llama, ...)",
        description="Initialise a model with a seed and publish it as a model version in "
                    "Hugging Face layout (config.json + model.safetensors). --arch gpt (the "
                    "default) is the built-in byte-level GPT, which needs nothing beyond "
                    "torch; llama, qwen2, mistral and gpt2 are built by transformers from "
                    "their config and come with a tokenizer.json: a byte tokenizer, or with "
                    "--dataset a byte-level BPE trained on that dataset. Prints the version "
                    "id.")
    p.add_argument("--arch", default="gpt", choices=["gpt", *catalog.HF_ARCHS],
                   help="architecture (default gpt, the built-in byte-level GPT)")
    p.add_argument("--size", default="tiny", choices=list(catalog.HF_SIZES),
                   help="tiny (~0.1-0.8M parameters), small (a few million) or 125m "
                        "(GPT-2 small's shape; not for gpt); default tiny")
    p.add_argument("--tokenizer", choices=list(catalog.TOKENIZERS),
                   help="byte (256 byte tokens) or bpe (trained on --dataset); default: bpe "
                        "when --dataset is given, else byte. Not for gpt")
    p.add_argument("--dataset", metavar="VERSION",
                   help="the dataset a BPE tokenizer is trained on (fetched first)")
    p.add_argument("--vocab-size", type=int_arg(258, 1 << 20, "an integer in [258, 2**20]"),
                   help="tokens in a BPE tokenizer (default 8192)")
    p.add_argument("--block-size", type=int_arg(1, 1 << 20, "a positive integer"),
                   help="the context length (default: the size's)")
    p.add_argument("--name", help="the model's name (default ARCH-SIZE)")
    p.add_argument("--seed", type=_seed, default=0, help="initialisation seed (default 0)")
    p.set_defaults(func=cmd_model_init)

    p = groups["dataset"].add_parser(
        "stdlib", parents=[client], help="publish the default corpus (Python stdlib source)",
        description="Build a text corpus from this Python's standard-library source files "
                    "(deterministic, in a fixed shuffled file order) and publish it as a "
                    "dataset version. Prints the version id.")
    p.add_argument("--name", help="the dataset's name (default python-stdlib)")
    p.set_defaults(func=cmd_dataset_stdlib)

    group = sub.add_parser(
        "job", help="submit and follow training jobs",
        description="Training jobs: this node signs the job, coordinates it, and the "
                    "network's workers train it in rounds of micro-tasks (specs/jobs.md).")
    actions = group.add_subparsers(dest="job_command", metavar="ACTION", required=True)
    p = actions.add_parser(
        "submit", parents=[client], help="submit a job file (TOML)",
        description="Check the job file (a wrong or missing field is named), sign it and "
                    "start coordinating it from this node. Prints the job id. See "
                    "specs/jobs.md and bootstrap/jobs/example.toml for the format.")
    p.add_argument("file", metavar="FILE", help="the job spec, a TOML file")
    p.add_argument("--wait", action="store_true",
                   help="follow the job until it ends (as `job status --watch`)")
    p.set_defaults(func=cmd_job_submit)
    p = actions.add_parser("status", parents=[client], help="rounds, workers, losses, versions",
                           description="One job's progress: per round the held-out loss "
                                       "before and after, each task's worker, verdict and "
                                       "why, the version published, and the round under "
                                       "way.")
    p.add_argument("job", metavar="JOB", type=_job_arg,
                   help="job id, or a unique prefix of at least 8 hex digits")
    p.add_argument("--watch", action="store_true",
                   help="follow the job until it ends: one live line per task (worker, "
                        "inner step, loss, tokens/s) and a summary per round")
    p.add_argument("--checks", action="store_true",
                   help="show the checks every accepted task passed (by default only "
                        "where its held-out loss rose)")
    p.set_defaults(func=cmd_job_status)
    p = actions.add_parser("list", parents=[client], help="jobs this node knows",
                           description="Jobs coordinated here, worked on here, or announced.")
    p.set_defaults(func=cmd_job_list)

    p = sub.add_parser("receipts", parents=[client], help="contribution receipts held here",
                       description="Receipts this node holds: those it issued as a "
                                   "coordinator and those it earned as a worker. Each is "
                                   "signed by both and appended to this node's feed.")
    p.add_argument("--job", type=_job_arg, help="only this job's")
    p.set_defaults(func=cmd_receipts)
