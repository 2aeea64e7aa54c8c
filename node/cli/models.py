"""``iollm model ...`` and ``iollm dataset ...``: SMIP through the running node's API.

    publish PATH  POST /v1/models/publish, then poll GET /v1/ops?id= with a progress bar
    list          GET /v1/models?kind=
    show VERSION  GET /v1/models/show?version=
    fetch VERSION POST /v1/models/fetch, then poll like publish

Publish and fetch run inside the daemon as operations: the command only watches. Ctrl-C
stops watching, not the operation (a fetch that is stopped later resumes where it was).
A version is given as its 64 hex digits or a unique prefix of at least 8. Output that
scripts want (a version id, ``--json``) goes to stdout; progress and remarks to stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import quote

from node.cli.common import SHORT, CliError, call_node, short_peer, when

POLL_S = 0.2  # how often a waiting command asks the node how its operation goes
LOG_EVERY_S = 5.0  # without a terminal, one progress line this often (and at each phase)
RATE_WINDOW_S = 3.0  # the MiB/s shown is the average over this much recent time
MIN_PREFIX_CHARS = 8  # node/daemon.py refuses shorter prefixes
BAR_WIDTH = 24


# -- formatting ------------------------------------------------------------------------------


def _size(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


class ProgressView:
    """Shows an operation's progress on `stream`: a bar redrawn in place on a terminal,
    otherwise a plain line at each new phase and every `LOG_EVERY_S`."""

    def __init__(self, stream: TextIO, what: str, *, tty: bool | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.stream = stream
        self.what = what
        self.tty = stream.isatty() if tty is None else tty
        self.clock = clock
        self.phase: str | None = None
        self.total: int | None = None
        self.samples: deque[tuple[float, int]] = deque()  # (time, done_bytes), recent
        self.last_line = float("-inf")
        self.drawn = False

    def rate(self) -> float:
        """Bytes per second over the recent samples (since the count last restarted)."""
        if len(self.samples) < 2:
            return 0.0
        (t0, d0), (t1, d1) = self.samples[0], self.samples[-1]
        return max(0, d1 - d0) / (t1 - t0) if t1 > t0 else 0.0

    def line(self, op: dict[str, Any]) -> str:
        done, total = op["done_bytes"], op["total_bytes"]
        if op.get("state") == "done" and op.get("ended_ms") is not None:
            seconds = max(0.001, (op["ended_ms"] - op["started_ms"]) / 1000)
            return (f"{self.what} done: {_size(done)} in {seconds:.1f} s "
                    f"({done / 2**20 / seconds:.1f} MiB/s)"
                    + (f"  {op['detail']}" if op["detail"] else ""))
        parts = [f"{self.what} {op['phase'] or 'starting'}"]
        if total > 0:
            fraction = min(1.0, done / total)
            if self.tty:
                filled = round(fraction * BAR_WIDTH)
                parts.append("[" + "#" * filled + "." * (BAR_WIDTH - filled) + "]")
            parts.append(f"{fraction * 100:3.0f}%  {done / 2**20:.1f}/{total / 2**20:.1f} MiB")
        elif done:
            parts.append(_size(done))
        if total > 0 or done:
            parts.append(f"{self.rate() / 2**20:.1f} MiB/s")
        if op["detail"]:
            parts.append(op["detail"])
        return "  ".join(parts)

    def update(self, op: dict[str, Any]) -> None:
        now = self.clock()
        new_phase = op["phase"] != self.phase
        self.phase = op["phase"]
        done = op["done_bytes"]
        if op["total_bytes"] != self.total or (self.samples and done < self.samples[-1][1]):
            self.samples.clear()  # a phase that counts other bytes
            self.total = op["total_bytes"]
        self.samples.append((now, done))
        while len(self.samples) > 2 and now - self.samples[1][0] >= RATE_WINDOW_S:
            self.samples.popleft()
        if self.tty:
            self.stream.write("\r\033[K" + self.line(op))
            self.drawn = True
        elif new_phase or now - self.last_line >= LOG_EVERY_S:
            self.stream.write(self.line(op) + "\n")
            self.last_line = now
        self.stream.flush()

    def close(self) -> None:
        """End the bar's line, so what follows starts on a fresh one."""
        if self.drawn:
            self.stream.write("\n")
            self.stream.flush()
            self.drawn = False


def wait_for_operation(args: argparse.Namespace, op_id: str, what: str, on_interrupt: str,
                       ) -> dict[str, Any]:
    """Poll the operation until it ends; its result, or CliError with its error."""
    view = ProgressView(sys.stderr, what)
    try:
        while True:
            op = call_node(args, f"/v1/ops?id={quote(op_id)}")
            view.update(op)
            if op["state"] != "running":
                break
            time.sleep(POLL_S)  # polling another process; the operation has no end time
    except KeyboardInterrupt:
        view.close()
        print(f"iollm: stopped waiting; the {what} goes on in the node (operation {op_id})."
              f" {on_interrupt}", file=sys.stderr)
        raise
    finally:
        view.close()
    if op["state"] == "failed":
        raise CliError(op["error"] or f"the {what} failed")
    return dict(op["result"])


# -- commands --------------------------------------------------------------------------------


def cmd_publish(args: argparse.Namespace) -> int:
    path = Path(args.path).expanduser().absolute()
    if not path.exists():
        raise CliError(f"{args.path}: no such file or directory")
    name = args.name or path.resolve().name
    started = call_node(args, "/v1/models/publish", "POST", {
        "path": str(path), "kind": args.kind, "name": name, "parents": args.parent or []})
    result = wait_for_operation(args, started["op"], "publish",
                                "Its version id will be in `iollm "
                                f"{args.kind} list --home ...` when it is done.")
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"published {args.kind} {name!r}: version {result['version']}", file=sys.stderr)
        print(result["version"])
    return 0


def cmd_fetch(args: argparse.Namespace) -> int:
    out = str(Path(args.out).expanduser().absolute()) if args.out else None
    started = call_node(args, "/v1/models/fetch", "POST",
                        {"version": args.version, "out": out, "kind": args.kind})
    info = wait_for_operation(args, started["op"], "fetch",
                              "Run the same command again to wait for it; a stopped fetch "
                              "resumes where it was.")
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    where = f", files in {info['out']}" if info.get("out") else " into the node's store"
    print(f"fetched {info['kind']} {info['name']!r} {info['version'][:SHORT]}: "
          f"{_size(info['size'])}{where}")
    return 0


def latest_of_lineage(versions: list[dict[str, Any]]) -> set[str]:
    """The versions no other listed version names as a parent: the newest of each
    lineage (a version only heard announced has no known parents, so it is one too)."""
    parents = {p for v in versions for p in v.get("parents") or []}
    return {v["version"] for v in versions if v["version"] not in parents}


def cmd_list(args: argparse.Namespace) -> int:
    versions = call_node(args, f"/v1/models?kind={args.kind}")
    hidden = [v for v in versions if v.get("job_role")]
    if not args.all:
        versions = [v for v in versions if not v.get("job_role")]
    if args.json:
        print(json.dumps(versions, indent=2))
        return 0
    if not versions:
        print(f"no {args.kind}s known to this node")
    else:
        latest = latest_of_lineage([v for v in versions if not v.get("job_role")])
        width = max(4, *(len(v["name"]) for v in versions))
        print(f"{'VERSION':<{SHORT}}  {'NAME':<{width}}  {'LATEST':<6}  {'STATE':<9}  "
              f"{'SIZE':>10}  PROVIDERS  {'CREATED':<23}  PUBLISHER")
        for v in versions:
            size = _size(v["size"]) if v["size"] else "?"
            mark = (v.get("job_role") or "") if v.get("job_role") else (
                "*" if v["version"] in latest else "")
            print(f"{v['version'][:SHORT]}  {v['name']:<{width}}  {mark:<6}  "
                  f"{v['state']:<9}  {size:>10}  {v['providers']:>9}  "
                  f"{when(v['created_ms']):<23}  {short_peer(v['publisher'])}")
    if hidden and not args.all:
        print(f"({len(hidden)} job-internal deltas and updates hidden: --all shows them)",
              file=sys.stderr)
    return 0


def format_show(info: dict[str, Any]) -> str:
    lines = [
        f"{info['kind']} {info['name']!r}",
        f"version    {info['version']}",
        f"publisher  {info['publisher']}",
        f"created    {when(info['created_ms'])}",
        f"state      {info['state']}, {_size(info['size'])}, "
        f"{info['providers']} provider(s) known",
        f"config     {json.dumps(info.get('config') or {}, sort_keys=True)[:200]}",
    ]
    if not info["lineage"]:
        lines.append("(its manifest is not held here: fetch it to see lineage and shards)")
        return "\n".join(lines)
    lines.append("lineage    (this version, then its ancestors, first parent first)")
    known = {e["version"] for e in info["lineage"] if e["known"]}
    for depth, entry in enumerate(info["lineage"]):
        label = (f"{entry['name']!r}  {when(entry['created_ms'])}" if entry["known"]
                 else "(manifest not held here)")
        arrow = "  " * depth + ("└─ " if depth else "")
        lines.append(f"  {arrow}{entry['version'][:SHORT]}  {label}")
    shards, new = info["shards"], set(info["new_shards"])
    parent = info["parents"][0] if info["parents"] else None
    if parent is None:
        lines.append(f"shards     {len(shards)} (no parent)")
    elif parent in known:
        lines.append(f"shards     {len(shards)}, {len(new)} new against its first parent "
                     f"{parent[:SHORT]}")
    else:
        lines.append(f"shards     {len(shards)} (its first parent {parent[:SHORT]} is not "
                     f"held here to compare)")
    width = max((len(s["path"]) for s in shards), default=0)
    for s in shards:
        mark = ("new" if s["path"] in new else "shared") if parent in known else ""
        held = "held" if s["held"] else "not held"
        lines.append(f"  {s['path']:<{width}}  {_size(s['size']):>10}  {mark:<6}  {held}")
    return "\n".join(lines)


def cmd_show(args: argparse.Namespace) -> int:
    info = call_node(args, f"/v1/models/show?version={quote(args.version)}")
    print(json.dumps(info, indent=2) if args.json else format_show(info))
    return 0


# -- parser ----------------------------------------------------------------------------------


def version_arg(text: str) -> str:
    value = text.strip().lower()
    if not MIN_PREFIX_CHARS <= len(value) <= 64 or any(c not in "0123456789abcdef"
                                                       for c in value):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a version id: give its 64 hex digits or a unique prefix of at "
            f"least {MIN_PREFIX_CHARS}")
    return value


def add_model_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser],
                       client: argparse.ArgumentParser
                       ) -> dict[str, argparse._SubParsersAction[argparse.ArgumentParser]]:
    """``iollm model ACTION`` and ``iollm dataset ACTION``; `client` carries --home,
    --json and --timeout. Returns each kind's ACTION subparsers, for more actions."""
    groups = {}
    for kind, files in (("model", "a .safetensors file, or a directory of .safetensors "
                                  "shards with an optional config.json"),
                        ("dataset", "a file, or a directory of files")):
        group = sub.add_parser(
            kind, help=f"publish, list, show and fetch {kind}s (SMIP)",
            description=f"Share {kind}s through SMIP: a {kind} version is a signed manifest "
                        f"of content-addressed shards, announced to every node and pulled "
                        f"in verified chunks from all the peers that hold it.")
        actions = group.add_subparsers(dest=f"{kind}_command", metavar="ACTION", required=True)
        groups[kind] = actions

        p = actions.add_parser(
            "publish", parents=[client], help=f"publish a {kind} version from local files",
            description=f"Hash PATH ({files}) into the node's store, sign the manifest, "
                        f"provide it on the DHT and announce it. Prints the version id on "
                        f"stdout; progress goes to stderr.")
        p.add_argument("path", metavar="PATH", help=files)
        if kind == "model":
            p.add_argument("--name", required=True, help="the model's name (not unique: "
                           "versions are named by their id)")
        else:
            p.add_argument("--name", help="the dataset's name (default: the file or "
                           "directory name)")
        p.add_argument("--parent", action="append", metavar="VERSION", type=version_arg,
                       help="a version this one derives from (repeatable; the first is the "
                            "first parent, against which new shards are counted)")
        p.set_defaults(func=cmd_publish, kind=kind)

        p = actions.add_parser(
            "list", parents=[client], help=f"{kind} versions this node knows",
            description=f"{kind.capitalize()} versions held here (complete, or partial: a "
                        f"fetch under way or stopped) and announced by peers; newest first. "
                        f"LATEST marks the newest version of each lineage (no listed "
                        f"version derives from it).")
        p.add_argument("--all", action="store_true",
                       help="also the deltas and outer updates training jobs publish "
                            "(hidden by default)")
        p.set_defaults(func=cmd_list, kind=kind)

        p = actions.add_parser(
            "show", parents=[client], help="one version: lineage, config, shards",
            description="Show one version: its lineage as a chain of ancestors, its config, "
                        "and its shards, marking those that are new against its first "
                        "parent (the rest are shared and never fetched twice).")
        p.add_argument("version", metavar="VERSION", type=version_arg,
                       help="version id, or a unique prefix of at least 8 hex digits")
        p.set_defaults(func=cmd_show, kind=kind)

        p = actions.add_parser(
            "fetch", parents=[client], help=f"download a {kind} version from its providers",
            description="Take the manifest from any provider and check it, then pull the "
                        "shards not already held in verified chunks from several providers "
                        "at once. A stopped fetch resumes from what is on disk. Ctrl-C stops "
                        "waiting; the fetch goes on in the node.")
        p.add_argument("version", metavar="VERSION", type=version_arg,
                       help="version id, or a unique prefix of at least 8 hex digits")
        p.add_argument("--out", metavar="DIR",
                       help="also write the files into DIR, by their paths in the manifest "
                            "(default: keep them in the node's store only)")
        p.set_defaults(func=cmd_fetch, kind=kind)
    return groups
