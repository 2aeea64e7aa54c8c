"""hivemind DHT half of bench/discovery.py: the same capability-query workload on hivemind.

Runs INSIDE the hivemind venv made by bench/hivemind_env.py (imports hivemind, the standard
library and, when present, psutil; nothing from iollm). bench/discovery.py starts it as

    bench/.venv-hivemind/bin/python bench/hivemind_dht_worker.py --nodes 30 --queries 300 --seed 1

What it does, all on 127.0.0.1:
1. starts N hivemind DHTNodes in this one process, on one asyncio (uvloop) event loop, the
   way hivemind.DHT runs its node; each node owns one go-libp2p daemon (p2pd) child process.
   Node 0 starts alone; every later node bootstraps from node 0 and from the node made just
   before it;
2. every node stores its capability record (~600 random bytes, expiring in 30 minutes)
   under its own key, each store awaited (hivemind replicates to num_replicas=5 nodes);
3. memory per node = (RSS of this process + RSS of every p2pd child) / N, read right after
   the stores;
4. Q sequential queries: a random node runs `node.get(key, latest=True)` for a random
   other node's key; success = the exact stored bytes come back;
5. kills 20% of the nodes (DHTNode.shutdown, which terminates the node's p2pd; any p2pd
   still alive after that is SIGKILLed and the survivors checked), then Q queries again,
   from random survivors, for the keys of ALL N nodes (the killed nodes' records live on
   in their replicas).

Latency is measured per query around the `get` call, over all queries of a phase, failed
ones included (a failed query costs its caller the time until it gave up; a query cut by
--query-timeout-s counts with that timeout). Percentiles interpolate linearly between
order statistics (numpy's default).

Exactly one JSON object is printed on stdout at the end; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import sys
import time
from typing import Any

# hivemind reads its log level at import time; its INFO lines would flood stderr.
os.environ.setdefault("HIVEMIND_LOGLEVEL", "WARNING")

import hivemind
from benchstats import percentile
from hivemind.dht.node import DHTNode
from hivemind.utils.timed_storage import get_dht_time

try:
    import psutil
except ImportError:  # the /proc fallback below does the same on Linux
    psutil = None

RECORD_SIZE = 600
RECORD_TTL_S = 30 * 60.0
# p2pd options: loopback only, and nothing that talks to anything but our own peers.
# nat_port_map would send UPnP/NAT-PMP probes to the LAN gateway; relay and AutoNAT are
# pointless on loopback. Everything else stays at hivemind's defaults.
P2P_OPTIONS: dict[str, Any] = {
    "host_maddrs": ["/ip4/127.0.0.1/tcp/0"],
    "nat_port_map": False,
    "auto_nat": False,
    "use_relay": False,
    "use_auto_relay": False,
    "use_ipfs": False,
}


def log(msg: str) -> None:
    print(f"[hivemind-worker {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _rss_bytes(pid: int) -> int:
    if psutil is not None:
        try:
            return int(psutil.Process(pid).memory_info().rss)
        except psutil.Error:
            return 0
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _pid_alive(pid: int) -> bool:
    """True while `pid` runs (a zombie, dead but not yet reaped, counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


# Every p2pd this process started, for the last-resort cleanup in main() and on SIGTERM:
# an orphaned p2pd would otherwise outlive this process.
_ALL_P2PD_PIDS: list[int] = []
# The unix control sockets hivemind makes in /tmp; its shutdown removes them, a kill does not.
_ALL_SOCKETS: list[str] = []


def _kill_all_p2pd() -> None:
    for pid in _ALL_P2PD_PIDS:
        if pid > 0 and _pid_alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    for path in _ALL_SOCKETS:
        with contextlib.suppress(OSError):
            os.remove(path)


def _on_sigterm(signum: int, frame: object) -> None:
    _kill_all_p2pd()
    log(f"stopped by signal {signum}")
    os._exit(128 + signum)


def _machine_busy_ticks() -> int:
    """Busy CPU time of the whole machine, in clock ticks (all cores, from /proc/stat)."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:8]]
    except (OSError, ValueError):
        return 0
    user, nice, system, _idle, _iowait, irq, softirq = fields
    return user + nice + system + irq + softirq


def _proc_ticks(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as f:
            rest = f.read().rsplit(")", 1)[1].split()
        return int(rest[11]) + int(rest[12])  # utime + stime
    except (OSError, ValueError, IndexError):
        return 0


class CpuMeter:
    """CPU used during a phase by this benchmark (this process and its p2pd children) and by
    everything else on the machine, in percent of one core. On a small shared machine other
    processes' load moves these latencies a lot; this says how much there was."""

    def __init__(self, pids: list[int]) -> None:
        self.pids = pids
        self.t0 = time.monotonic()
        self.machine0 = _machine_busy_ticks()
        self.own0 = self._own()

    def _own(self) -> int:
        return _proc_ticks(os.getpid()) + sum(_proc_ticks(p) for p in self.pids if p > 0)

    def read(self) -> dict[str, float]:
        dt = max(time.monotonic() - self.t0, 1e-6)
        hz = os.sysconf("SC_CLK_TCK")
        own = (self._own() - self.own0) / hz / dt * 100.0
        machine = (_machine_busy_ticks() - self.machine0) / hz / dt * 100.0
        return {"own_cpu_pct": round(own, 1), "other_cpu_pct": round(max(machine - own, 0.0), 1)}


class Swarm:
    """N DHTNodes in this process and the pids of their p2pd daemons."""

    def __init__(self) -> None:
        self.nodes: list[DHTNode] = []
        self.p2pd_pids: list[int] = []
        self.alive: list[bool] = []

    async def start(self, n: int, per_node_timeout_s: float) -> None:
        maddrs: list[list[str]] = []
        for i in range(n):
            initial: list[str] = []
            if i > 0:
                initial = list(dict.fromkeys(maddrs[0] + maddrs[i - 1]))
            node = await asyncio.wait_for(
                DHTNode.create(initial_peers=initial or None, **P2P_OPTIONS),
                per_node_timeout_s,
            )
            self.nodes.append(node)
            child = node.p2p._child  # hivemind keeps the p2pd subprocess here
            self.p2pd_pids.append(child.pid if child is not None else -1)
            _ALL_P2PD_PIDS.append(self.p2pd_pids[-1])
            for maddr in (node.p2p._daemon_listen_maddr, node.p2p._client_listen_maddr):
                with contextlib.suppress(Exception):
                    _ALL_SOCKETS.append(maddr["unix"])
            self.alive.append(True)
            maddrs.append([str(a) for a in await node.get_visible_maddrs()])
            if i == 0 or (i + 1) % 5 == 0 or i + 1 == n:
                log(f"started {i + 1}/{n} nodes")

    def memory_bytes(self) -> tuple[int, int]:
        """RSS of this process and the summed RSS of the live p2pd children."""
        own = _rss_bytes(os.getpid())
        p2pd = sum(
            _rss_bytes(pid) for pid, ok in zip(self.p2pd_pids, self.alive, strict=True) if ok
        )
        return own, p2pd

    async def kill(self, idx: int, timeout_s: float) -> None:
        """Shut node `idx` down and make sure its p2pd process is gone."""
        self.alive[idx] = False
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.nodes[idx].shutdown(), timeout_s)
        pid = self.p2pd_pids[idx]
        deadline = time.monotonic() + timeout_s
        while pid > 0 and _pid_alive(pid) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if pid > 0 and _pid_alive(pid):
            log(f"p2pd {pid} of node {idx} outlived shutdown; SIGKILL")
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    async def close(self, timeout_s: float) -> None:
        live = [i for i, ok in enumerate(self.alive) if ok]
        await asyncio.gather(*(self.kill(i, timeout_s) for i in live))
        _kill_all_p2pd()


async def run_queries(
    swarm: Swarm,
    records: list[bytes],
    keys: list[str],
    n_queries: int,
    rng: random.Random,
    timeout_s: float,
) -> dict[str, float]:
    """Sequential queries: a random live node gets a random other node's key."""
    live = [i for i, ok in enumerate(swarm.alive) if ok]
    latencies: list[float] = []
    ok_count = 0
    for q in range(n_queries):
        asker = rng.choice(live)
        target = rng.choice([j for j in range(len(keys)) if j != asker])
        t0 = time.perf_counter()
        try:
            found = await asyncio.wait_for(
                swarm.nodes[asker].get(keys[target], latest=True), timeout_s
            )
        except TimeoutError:
            found = None
        latencies.append((time.perf_counter() - t0) * 1000.0)
        if found is not None and found.value == records[target]:
            ok_count += 1
        if (q + 1) % 100 == 0:
            log(f"  {q + 1}/{n_queries} queries, {ok_count} ok")
    latencies.sort()
    return {
        "p50_ms": round(percentile(latencies, 50), 3),
        "p99_ms": round(percentile(latencies, 99), 3),
        "success": round(ok_count / n_queries, 4),
    }


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(args.seed)
    n = args.nodes
    records = [rng.randbytes(RECORD_SIZE) for _ in range(n)]
    keys = [f"iollm-bench/capability/{args.seed}/{i}" for i in range(n)]
    swarm = Swarm()
    detail: dict[str, Any] = {"cpus": os.cpu_count(), "loadavg_1m_start": os.getloadavg()[0]}
    try:
        t0 = time.monotonic()
        await asyncio.wait_for(swarm.start(n, args.node_timeout_s), args.phase_timeout_s)
        detail["start_s"] = round(time.monotonic() - t0, 2)

        t0 = time.monotonic()
        expiration = get_dht_time() + RECORD_TTL_S
        for i, node in enumerate(swarm.nodes):
            deadline = time.monotonic() + args.node_timeout_s
            while True:
                stored = await asyncio.wait_for(
                    node.store(keys[i], records[i], expiration), args.node_timeout_s
                )
                if stored:
                    break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"node {i} could not store its record")
                await asyncio.sleep(0.2)
        detail["store_s"] = round(time.monotonic() - t0, 2)
        log(f"all {n} records stored in {detail['store_s']} s")

        own, p2pd = swarm.memory_bytes()
        detail["python_rss_mb"] = round(own / 2**20, 1)
        detail["p2pd_rss_mb_total"] = round(p2pd / 2**20, 1)
        mem_per_node_mb = round((own + p2pd) / n / 2**20, 2)
        log(
            f"memory: python {detail['python_rss_mb']} MB + p2pd {detail['p2pd_rss_mb_total']} MB "
            f"= {mem_per_node_mb} MB/node"
        )

        log(f"{args.queries} queries among {n} nodes")
        meter = CpuMeter(swarm.p2pd_pids)
        before = await asyncio.wait_for(
            run_queries(swarm, records, keys, args.queries, rng, args.query_timeout_s),
            args.phase_timeout_s,
        )
        detail["cpu_before"] = meter.read()
        log(f"before: {before}, cpu {detail['cpu_before']}")

        n_kill = round(n * args.kill_fraction)
        victims = sorted(rng.sample(range(n), n_kill))
        t0 = time.monotonic()
        await asyncio.wait_for(
            asyncio.gather(*(swarm.kill(i, args.node_timeout_s) for i in victims)),
            args.phase_timeout_s,
        )
        still = [swarm.p2pd_pids[i] for i in victims if _pid_alive(swarm.p2pd_pids[i])]
        if still:
            raise RuntimeError(f"p2pd processes {still} of killed nodes are still running")
        detail["kill_s"] = round(time.monotonic() - t0, 2)
        log(f"killed nodes {victims}; their p2pd processes are gone")

        log(f"{args.queries} queries among {n - n_kill} survivors, keys of all {n} nodes")
        meter = CpuMeter([p for p, ok in zip(swarm.p2pd_pids, swarm.alive, strict=True) if ok])
        after = await asyncio.wait_for(
            run_queries(swarm, records, keys, args.queries, rng, args.query_timeout_s),
            args.phase_timeout_s,
        )
        detail["cpu_after"] = meter.read()
        log(f"after: {after}, cpu {detail['cpu_after']}")
    finally:
        await swarm.close(args.node_timeout_s)
    detail["loadavg_1m_end"] = os.getloadavg()[0]

    return {
        "nodes": n,
        "queries": args.queries,
        "before": before,
        "after": after,
        "killed": n_kill,
        "mem_per_node_mb": mem_per_node_mb,
        "hivemind_version": hivemind.__version__,
        "detail": detail,
    }


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nodes", type=int, default=30)
    p.add_argument("--queries", type=int, default=300)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--kill-fraction", type=float, default=0.2)
    p.add_argument("--query-timeout-s", type=float, default=10.0, help="cap on one get")
    p.add_argument(
        "--node-timeout-s",
        type=float,
        default=30.0,
        help="cap on one node's start, store or shutdown",
    )
    p.add_argument(
        "--phase-timeout-s",
        type=float,
        default=600.0,
        help="cap on one phase (start, queries, kill)",
    )
    p.add_argument("--total-timeout-s", type=float, default=1500.0, help="cap on the whole run")
    args = p.parse_args(argv)
    if args.nodes < 2 or args.queries < 1 or not 0 <= args.kill_fraction < 1:
        p.error("need --nodes >= 2, --queries >= 1 and 0 <= --kill-fraction < 1")
    if round(args.nodes * args.kill_fraction) > args.nodes - 1:
        p.error("--kill-fraction leaves no node alive")
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    log(
        f"hivemind {hivemind.__version__}, {args.nodes} nodes, {args.queries} queries, "
        f"seed {args.seed}, psutil {'yes' if psutil is not None else 'no (/proc)'}"
    )
    try:
        import uvloop  # hivemind's own event loop (hivemind.DHT runs its node on it)

        runner: Any = uvloop.run
    except ImportError:
        runner = asyncio.run

    async def guarded() -> dict[str, Any]:
        return await asyncio.wait_for(bench(args), args.total_timeout_s)

    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        result = runner(guarded())
    except (Exception, KeyboardInterrupt) as exc:
        log(f"failed: {type(exc).__name__}: {exc}")
        return 1
    finally:
        _kill_all_p2pd()
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
