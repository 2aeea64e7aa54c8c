"""Discovery benchmark: capability queries on 30 iollm nodes against hivemind's DHT.

    .venv/bin/python bench/discovery.py [--nodes 30] [--queries 300] [--seed 1]

In one run:
1. iollm: N complete nodes (storage, py-libp2p host, DHT, gossipsub, discovery) in this one
   process on 127.0.0.1, each publishing its signed capability record. Then Q queries, a
   random node asking for a random other node's record, on two paths:
     * ``node``: what ``iollm`` itself does (``Discovery.record_of``): the local replica
       that gossip and the DHT keep fresh, else the DHT, else the peer itself;
     * ``network``: the DHT only, always asking the peers closest to the key (what
       hivemind's ``get(latest=True)`` does), for comparison;
   and class queries (``iollm gpus --min-vram X``), checked against the exact expected set.
   Then 20% of the nodes are killed (no goodbye) and the same queries run from survivors for
   the records of ALL nodes (a dead node's record stays valid until it expires).
2. hivemind 1.1.12 in a virtual environment of its own (bench/hivemind_env.py) running the
   same workload (bench/hivemind_dht_worker.py): one go-libp2p daemon per node.

Memory per node: the resident memory of the process that runs all nodes (plus, for
hivemind, its p2pd daemons), divided by N.

Goals (exit 1 when one is missed, 2 when the baseline could not be measured):
  * 100% of iollm queries answered correctly after the churn (node path and class queries);
  * iollm's node-path p99 no worse than hivemind's p99, before and after the churn;
  * iollm's memory per node below hivemind's.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import psutil
import trio
from benchstats import percentile
from hivemind_env import HivemindEnvError, ensure_hivemind_venv

from node.config import DiscoverySection
from protocol.capability import EnvReport, GpuInfo, matches

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the test cluster, tests/
from tests.cluster import LocalNode, local_cluster

BENCH_DIR = Path(__file__).resolve().parent
GIB = 2**30
GPU_CHOICES: list[tuple[int, ...]] = [(), (), (8,), (12,), (16,), (24,), (24, 24), (40,), (48,),
                                      (80,), (80,) * 8]
CLASS_QUERIES: list[float | None] = [None, 8, 20, 24, 40, 80]


def log(msg: str) -> None:
    print(f"[discovery {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def make_env(rng: random.Random) -> EnvReport:
    gpu_gib = rng.choice(GPU_CHOICES)
    gpus = tuple(GpuInfo(f"Bench GPU {g}GB", g * GIB, g * GIB, "8.0") for g in gpu_gib)
    return EnvReport(os="Linux-bench", python="3.11", torch="2.13.0",
                     cuda="12.4" if gpus else "", gpus=gpus, cpu_cores=8, ram_bytes=64 * GIB,
                     disk_free_bytes=500 * GIB, tflops=round(rng.uniform(0.1, 400.0), 3),
                     tflops_dtype="bf16" if gpus else "fp32",
                     tflops_device="cuda" if gpus else "cpu")


def summary(latencies_s: list[float], ok: int, total: int) -> dict[str, float]:
    xs = sorted(latencies_s)
    return {"p50_ms": percentile(xs, 50) * 1000, "p99_ms": percentile(xs, 99) * 1000,
            "success": ok / total if total else float("nan"), "queries": total}


async def timed_queries(
    count: int, rng: random.Random, one: Callable[[], Awaitable[bool]]
) -> dict[str, float]:
    """Run ``one`` sequentially ``count`` times; latency of every query, failed ones too."""
    latencies, ok = [], 0
    for _ in range(count):
        start = time.perf_counter()
        try:
            good = await one()
        except Exception as exc:  # a query that raises is a failed query, not a crash
            log(f"query raised {exc!r}")
            good = False
        latencies.append(time.perf_counter() - start)
        ok += good
    return summary(latencies, ok, count)


async def query_phase(askers: list[LocalNode], targets: list[LocalNode], queries: int,
                      network_queries: int, rng: random.Random) -> dict[str, Any]:
    expected = {t.peer_id: t.discovery.current for t in targets}

    def pick() -> tuple[LocalNode, LocalNode]:
        asker = rng.choice(askers)
        target = rng.choice([t for t in targets if t is not asker])
        return asker, target

    async def node_path() -> bool:
        asker, target = pick()
        cap = await asker.discovery.record_of(target.peer_id)
        return cap is not None and cap.envelope == expected[target.peer_id].envelope  # type: ignore[union-attr]

    async def network_path() -> bool:
        asker, target = pick()
        cap = await asker.discovery.record_from_network(target.peer_id)
        return cap is not None and cap.envelope == expected[target.peer_id].envelope  # type: ignore[union-attr]

    async def class_query() -> bool:
        asker = rng.choice(askers)
        min_vram = rng.choice(CLASS_QUERIES)
        want = {t.peer_id for t in targets
                if matches(t.discovery.current.record, min_vram_gb=min_vram,  # type: ignore[union-attr]
                           min_tflops=None)}
        got = await asker.discovery.query_gpus(min_vram_gb=min_vram)
        return {r.peer_id for r in got} == want

    log(f"  node path: {queries} queries")
    node = await timed_queries(queries, rng, node_path)
    log(f"  network path: {network_queries} queries")
    network = await timed_queries(network_queries, rng, network_path)
    classes = network_queries
    log(f"  class queries: {classes}")
    cls = await timed_queries(classes, rng, class_query)
    return {"node": node, "network": network, "class": cls}


def replicas_complete(nodes: list[LocalNode]) -> bool:
    for n in nodes:
        for other in nodes:
            if other is not n and n.discovery.local_record(other.peer_id) is None:
                return False
    return True


async def settle(nodes: list[LocalNode], deadline_s: float) -> float | None:
    """Wait (bounded) until gossip has given every node a valid replica of every record,
    the steady state a running network is in. Returns the seconds it took, or None if the
    deadline passed first (the queries then run anyway, and show it)."""
    start = time.perf_counter()
    with trio.move_on_after(deadline_s):
        while not replicas_complete(nodes):
            await trio.sleep(0.2)  # polling shared in-process state, bounded by the deadline
        waited = time.perf_counter() - start
        log(f"iollm: every node holds every record after {waited:.1f} s more")
        return waited
    log(f"iollm: replicas still incomplete after {deadline_s:.0f} s; measuring anyway")
    return None


async def bench_iollm(args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(args.seed)
    envs = [make_env(rng) for _ in range(args.nodes)]
    config = DiscoverySection(refresh_interval_s=3600.0, record_ttl_s=7200.0,
                              query_timeout_s=args.query_timeout_s)
    proc = psutil.Process()
    rss_before = proc.memory_info().rss
    with tempfile.TemporaryDirectory(prefix="iollm-bench-") as tmp:
        started = time.perf_counter()
        async with local_cluster(Path(tmp), envs, lambda: int(time.time() * 1000), config,
                                 start_timeout=300) as nodes:
            log(f"iollm: {len(nodes)} nodes up in {time.perf_counter() - started:.1f} s")
            with trio.fail_after(600):
                for n in nodes:
                    await n.discovery.published.wait()
            publish_s = time.perf_counter() - started
            log(f"iollm: every record published after {publish_s:.1f} s")
            settle_s = await settle(nodes, deadline_s=args.settle_s)
            rss = proc.memory_info().rss
            before = await query_phase(nodes, nodes, args.queries, args.network_queries, rng)
            killed = rng.sample(nodes[1:], round(args.nodes * args.kill_fraction))
            for n in killed:
                n.kill()
            survivors = [n for n in nodes if n not in killed]
            log(f"iollm: killed {len(killed)} nodes")
            after = await query_phase(survivors, nodes, args.queries, args.network_queries, rng)
    return {"nodes": args.nodes, "killed": len(killed), "before": before, "after": after,
            "publish_s": publish_s, "settle_s": settle_s, "mem_per_node_mb": rss / args.nodes / 1e6,
            "mem_per_node_excl_interpreter_mb": (rss - rss_before) / args.nodes / 1e6}


def bench_hivemind(args: argparse.Namespace) -> dict[str, Any]:
    python = ensure_hivemind_venv(BENCH_DIR / ".venv-hivemind")
    cmd = [str(python), str(BENCH_DIR / "hivemind_dht_worker.py"), "--nodes", str(args.nodes),
           "--queries", str(args.queries), "--seed", str(args.seed),
           "--kill-fraction", str(args.kill_fraction)]
    log("hivemind: " + " ".join(cmd))
    out = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, timeout=1800, check=False)
    if out.returncode != 0:
        raise HivemindEnvError(f"hivemind worker exited with {out.returncode}")
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "n/a"


def report(ours: dict[str, Any], theirs: dict[str, Any] | None) -> list[str]:
    """Print the table; return the goals missed."""
    missed = []
    print(f"\n== capability queries, {ours['nodes']} nodes, {ours['killed']} killed "
          f"(iollm published every record in {ours['publish_s']:.1f} s)")
    print(f"{'':34} {'p50 ms':>9} {'p99 ms':>9} {'success':>8}")
    for phase in ("before", "after"):
        for path in ("node", "network", "class"):
            s = ours[phase][path]
            print(f"iollm  {phase:6} {path + ' path':20} {s['p50_ms']:9.2f} {s['p99_ms']:9.2f} "
                  f"{s['success']:8.1%}")
        if theirs:
            h = theirs[phase]
            print(f"hivemind {phase:6} get(latest=True)   {h['p50_ms']:9.2f} {h['p99_ms']:9.2f} "
                  f"{h['success']:8.1%}")
            ours_p99 = ours[phase]["node"]["p99_ms"]
            print(f"  ratio iollm node path / hivemind: p50 "
                  f"{ratio(ours[phase]['node']['p50_ms'], h['p50_ms'])}, p99 "
                  f"{ratio(ours_p99, h['p99_ms'])}; network path p99 "
                  f"{ratio(ours[phase]['network']['p99_ms'], h['p99_ms'])}")
            if not ours_p99 <= h["p99_ms"]:
                missed.append(f"{phase}: node-path p99 {ours_p99:.1f} ms > hivemind "
                              f"{h['p99_ms']:.1f} ms")
    for path in ("node", "class"):
        if ours["after"][path]["success"] < 1.0:
            missed.append(f"after churn: {path} queries {ours['after'][path]['success']:.1%} "
                          "correct, goal 100%")
    print(f"\nmemory per node: iollm {ours['mem_per_node_mb']:.1f} MB "
          f"(of which {ours['mem_per_node_excl_interpreter_mb']:.1f} MB above the bare "
          f"interpreter)", end="")
    if theirs:
        print(f", hivemind {theirs['mem_per_node_mb']:.1f} MB "
              f"({ratio(ours['mem_per_node_mb'], theirs['mem_per_node_mb'])})")
        if not ours["mem_per_node_mb"] < theirs["mem_per_node_mb"]:
            missed.append("memory per node not below hivemind's")
    else:
        print()
    return missed


def quiet_libraries() -> None:
    import logging

    logging.basicConfig(level=logging.WARNING)
    for name in ("libp2p", "multiaddr", "asyncio", "aiosqlite"):
        logging.getLogger(name).setLevel(logging.CRITICAL)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nodes", type=int, default=30)
    p.add_argument("--queries", type=int, default=300,
                   help="node-path queries per phase (the comparison with hivemind)")
    p.add_argument("--network-queries", type=int, default=30,
                   help="network-path and class queries per phase (slower: each is a walk)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--kill-fraction", type=float, default=0.2)
    p.add_argument("--query-timeout-s", type=float, default=10.0)
    p.add_argument("--settle-s", type=float, default=60.0,
                   help="at most this long to wait for gossip replicas before querying")
    p.add_argument("--skip-hivemind", action="store_true",
                   help="measure iollm only (the comparison goals are then not checked)")
    p.add_argument("--json", metavar="FILE", help="also write all figures to FILE")
    args = p.parse_args(argv)
    if args.nodes < 5 or not 0 < args.kill_fraction < 1:
        p.error("need at least 5 nodes and a kill fraction in (0, 1)")

    quiet_libraries()
    ours = trio.run(bench_iollm, args)
    theirs = None
    if not args.skip_hivemind:
        try:
            theirs = bench_hivemind(args)
        except (HivemindEnvError, subprocess.TimeoutExpired, ValueError) as exc:
            report(ours, None)
            print(f"\nhivemind baseline could not be measured: {exc}", file=sys.stderr)
            return 2
    missed = report(ours, theirs)
    if args.json:
        Path(args.json).write_text(json.dumps({"iollm": ours, "hivemind": theirs}, indent=2))
    if missed:
        print("\nGOALS MISSED:\n  " + "\n  ".join(missed))
        return 1
    print("\nall goals met" if theirs else "\n(hivemind skipped: comparison goals not checked)")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    sys.exit(main())
