"""SMIP transfer benchmark: `model fetch` of a 1 GiB model against a raw py-libp2p stream.

    .venv/bin/python bench/transfer.py [--mib 1024] [--shards 4] [--dir DIR] [--keep]

In one run, all on 127.0.0.1:
  (a) baseline: a raw py-libp2p stream (the same host build as the daemon: TCP + Noise +
      Yamux) between two fresh processes, the server writing MIB MiB in 1 MiB writes;
  (b) a local testnet (`iollm testnet up --nodes 4`): node-1 publishes three MIB MiB models
      of SHARDS safetensors shards (distinct bytes); node-2, node-3 and node-4 each fetch
      one of them, with node-1 the only provider. Each fetch comes right after an (a) run
      made while the testnet is up (and idle), so that each pair sees the same machine:
      five idle daemons cost this machine several percent of a core (the bench prints how
      much), which the raw stream would not pay on a quiet machine. The goal compares the
      fastest fetch with the fastest of these raw runs (best against best); the slower
      pair's ratio, each pair's ratio and the ratio against (a) on the quiet machine
      (before the testnet starts and after it stops) are printed too;
  (c) node-3 fetches node-2's model too (untimed), then node-4 fetches it from node-1,
      node-2 and node-3 at once; its files are written out and compared byte for byte;
  (d) latency, no goal: node-2 fetches five 2 MiB models (two shards and a config.json)
      from node-1, one after the other; their time is mostly fixed costs (stream
      opening, manifest, leaf layers, files and database rows).
A fetch's time is the daemon's own operation time (from the API request to the verified,
complete version in the store: provider lookup, manifest, leaf layers, chunks).

Memory: the peak resident memory of the fetching daemon during its fetch (its high-water
mark is reset just before, through /proc/PID/clear_refs, so start-up peaks do not count),
and its resident memory before the fetch.

Goals (exit 1 when one is missed): (b) at least 0.8x the raw stream; the fetching
daemon's peak memory under 300 MiB in (b) and (c).
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
MIB = 1 << 20
RAW_PROTOCOL = "/iollm-bench/raw/1.0.0"
RAW_WRITE = MIB
GOAL_RATIO = 0.8
GOAL_PEAK_MIB = 300.0
SMALL_MIB = 2.0  # (d): the models whose fetch time is mostly fixed costs
SMALL_RUNS = 5


def log(msg: str) -> None:
    print(f"[transfer {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --- (a) the raw stream, one process per side ----------------------------------------------


def raw_server() -> None:
    """Serve RAW_PROTOCOL: read an 8-byte length, write that many bytes, close. Prints the
    listen address on stdout, then serves until stdin closes."""
    import trio
    from libp2p.custom_types import TProtocol
    from multiaddr import Multiaddr
    from nacl.signing import SigningKey

    from node.p2p.host import open_network

    block = os.urandom(RAW_WRITE)

    async def handler(stream: Any) -> None:
        want = int.from_bytes(await stream.read(8), "big")
        sent = 0
        while sent < want:
            n = min(RAW_WRITE, want - sent)
            await stream.write(block[:n])
            sent += n
        await stream.close()

    async def main() -> None:
        async with open_network(SigningKey.generate(), [Multiaddr("/ip4/127.0.0.1/tcp/0")],
                                {}) as net:
            net.host.set_stream_handler(TProtocol(RAW_PROTOCOL), handler)
            print(net.listen_addrs()[0], flush=True)
            await trio.to_thread.run_sync(sys.stdin.read)  # until the parent closes it

    trio.run(main)


def raw_client(addr: str, nbytes: int) -> None:
    """Fetch ``nbytes`` over RAW_PROTOCOL from ``addr``; prints {"bytes", "seconds"}."""
    import trio
    from libp2p.custom_types import TProtocol
    from multiaddr import Multiaddr
    from nacl.signing import SigningKey

    from node.p2p.host import open_network, peer_info_from_multiaddr

    async def main() -> None:
        async with open_network(SigningKey.generate(), [Multiaddr("/ip4/127.0.0.1/tcp/0")],
                                {}) as net:
            info = peer_info_from_multiaddr(addr)
            await net.connect(info)
            with trio.fail_after(600):
                stream = await net.host.new_stream(info.peer_id, [TProtocol(RAW_PROTOCOL)])
                start, cpu_start = time.perf_counter(), time.process_time()
                await stream.write(nbytes.to_bytes(8, "big"))
                got = 0
                while got < nbytes:
                    got += len(await stream.read(RAW_WRITE))
                seconds = time.perf_counter() - start
                cpu = time.process_time() - cpu_start
            await stream.close()
            print(json.dumps({"bytes": got, "seconds": seconds, "cpu_s": cpu}), flush=True)

    trio.run(main)


def measure_raw(nbytes: int) -> float:
    """MiB/s of one raw stream between two fresh processes."""
    me = [sys.executable, str(Path(__file__).resolve())]
    server = subprocess.Popen([*me, "_raw-server"], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert server.stdout is not None and server.stdin is not None
        addr = server.stdout.readline().strip()
        if not addr:
            raise SystemExit("bench: the raw stream server did not start")
        out = subprocess.run([*me, "_raw-client", addr, str(nbytes)], capture_output=True,
                             text=True, timeout=900, cwd=ROOT)
        if out.returncode != 0:
            raise SystemExit(f"bench: the raw stream client failed:\n{out.stderr[-2000:]}")
        result = json.loads(out.stdout.strip().splitlines()[-1])
        server.stdin.close()
        server.wait(timeout=30)
    finally:
        if server.poll() is None:
            server.kill()
    mib = float(result["bytes"]) / MIB
    log(f"    CPU per MiB: receiver {1000 * float(result['cpu_s']) / mib:.2f} ms")
    return mib / float(result["seconds"])


# --- (b), (c) fetches between daemons -------------------------------------------------------


class Node:
    """One daemon of the testnet, driven through its local API."""

    def __init__(self, entry: dict[str, Any]) -> None:
        from node.api.server import read_token_file

        self.name = entry["name"]
        self.home = Path(entry["home"])
        self.pid = int(entry["pid"])
        self.api = entry["api"]
        self.token = read_token_file(self.home / "api.token")

    def call(self, method: str, path: str, body: Any = None) -> Any:
        from node.api.server import api_request

        return api_request(self.api, self.token, method, path, body, timeout=60)

    def run_op(self, method: str, path: str, body: Any, what: str, timeout: float = 1800
               ) -> dict[str, Any]:
        """Start an operation and poll it to the end, showing its progress."""
        op_id = self.call(method, path, body)["op"]
        deadline = time.monotonic() + timeout
        shown = 0.0
        phases: dict[str, float] = {}  # phase -> when a poll first saw it
        while time.monotonic() < deadline:
            op = self.call("GET", f"/v1/ops?id={op_id}")
            phases.setdefault(op["phase"], time.monotonic())
            if op["state"] != "running":
                if op["state"] != "done":
                    raise SystemExit(f"bench: {what} on {self.name} failed: {op['error']}")
                return dict(op) | {"phases_seen": phases}
            if time.monotonic() - shown >= 2:
                shown = time.monotonic()
                done, total = op["done_bytes"], op["total_bytes"] or 1
                log(f"  {what} on {self.name}: {op['phase']} {done / MIB:.0f}/{total / MIB:.0f}"
                    f" MiB {op['detail']}")
            time.sleep(0.1)  # polling another process, with a deadline
        raise SystemExit(f"bench: {what} on {self.name} did not finish in {timeout:.0f} s")

    def publish(self, path: Path, name: str) -> str:
        """Publish a model directory on this node; its version id."""
        op = self.run_op("POST", "/v1/models/publish",
                         {"path": str(path), "kind": "model", "name": name}, "publish")
        return str(op["result"]["version"])

    def rss_mib(self) -> float:
        return _status_kib(self.pid, "VmRSS") / 1024

    def reset_peak(self) -> bool:
        try:
            Path(f"/proc/{self.pid}/clear_refs").write_text("5")
            return True
        except OSError:
            return False

    def peak_mib(self) -> float:
        return _status_kib(self.pid, "VmHWM") / 1024

    def providers(self, version: str) -> int:
        for v in self.call("GET", "/v1/models"):
            if v["version"] == version:
                return int(v["providers"])
        return 0


def make_model(path: Path, mib: float, shards: int, seed: int) -> None:
    """A safetensors model directory of ``mib`` MiB (scripts/make_demo_data.py)."""
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_demo_data.py"), "model",
                    str(path), "--mib", str(mib), "--shards", str(shards), "--seed", str(seed)],
                   check=True, timeout=1800, stdout=subprocess.DEVNULL)


def _status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise SystemExit(f"bench: no {field} in /proc/{pid}/status")


def wait_providers(node: Node, version: str, n: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while node.providers(version) < n:
        if time.monotonic() > deadline:
            raise SystemExit(f"bench: {node.name} knows {node.providers(version)} providers "
                             f"of the model after {timeout:.0f} s, expected {n}")
        time.sleep(0.2)  # announcements travel by gossip; polled with a deadline


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process, all its threads (clock ticks of 10 ms)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def timed_fetch(node: Node, version: str, mib: float, providers: list[Node],
                out: Path | None = None) -> dict[str, float]:
    rss = node.rss_mib()
    exact_peak = node.reset_peak()
    body: dict[str, Any] = {"version": version}
    cpu = [_cpu_s(n.pid) for n in (node, *providers)]
    op = node.run_op("POST", "/v1/models/fetch", body, "fetch")
    cpu = [_cpu_s(n.pid) - c for n, c in zip((node, *providers), cpu, strict=True)]
    seconds = (op["ended_ms"] - op["started_ms"]) / 1000
    peak = node.peak_mib() if exact_peak else float("nan")
    log(f"    CPU per MiB (includes the 0.1 s polls): fetcher {1000 * cpu[0] / mib:.2f} ms, "
        f"providers {1000 * sum(cpu[1:]) / mib:.2f} ms")
    seen = op["phases_seen"]
    if "chunks" in seen:  # polled every 0.1 s: the share of the time before the chunks
        log(f"    {seen['chunks'] - min(seen.values()):.2f} s (as polled) before the chunks "
            f"phase began, of {seconds:.2f} s")
    if out is not None:  # written out after the timing: a copy of the store's files
        node.run_op("POST", "/v1/models/fetch", {"version": version, "out": str(out)},
                    "export")
    return {"seconds": seconds, "mib_s": mib / seconds, "rss_before_mib": rss,
            "peak_mib": peak, "fetcher_cpu_ms_per_mib": 1000 * cpu[0] / mib,
            "providers_cpu_ms_per_mib": 1000 * sum(cpu[1:]) / mib}


def run(args: argparse.Namespace) -> int:
    from node.cli.testnet import STATE_FILE, testnet_down, testnet_up

    work = Path(args.dir or tempfile.mkdtemp(prefix="iollm-transfer-"))
    work.mkdir(parents=True, exist_ok=True)
    nbytes = int(args.mib * MIB)

    log(f"(a) raw py-libp2p stream, {args.mib:g} MiB between two processes, quiet machine")
    quiet = [measure_raw(nbytes)]
    log(f"    {quiet[0]:.1f} MiB/s")

    # Three models of distinct bytes (no shard in common), so that (b) can be timed three
    # times with node-1 the only provider each time.
    models = [work / "model", work / "model-2", work / "model-3"]
    for seed, path in enumerate(models):
        if not path.exists():
            log(f"writing a {args.mib:g} MiB model of {args.shards} shards to {path}")
            make_model(path, args.mib, args.shards, seed)
    size_mib = sum(p.stat().st_size for p in models[0].iterdir()) / MIB

    net = work / "testnet"
    log("starting a testnet of a bootstrap node and 4 nodes")
    testnet_up(net, 4, timeout=180)
    try:
        state = json.loads((net / STATE_FILE).read_text())
        nodes = {e["name"]: Node(e) for e in state["nodes"]}
        n1, n2, n3, n4 = (nodes[f"node-{i}"] for i in (1, 2, 3, 4))

        versions = []
        for i, path in enumerate(models):
            name = f"bench-model-{i + 1}"
            log(f"publishing {name} on node-1")
            t0 = time.monotonic()
            versions.append(n1.publish(path, name))
            log(f"    {versions[-1][:12]} in {time.monotonic() - t0:.1f} s")

        raw: list[float] = []  # (a) with the testnet up, one run before each (b) run
        ones = []
        idle_load = []  # the idle testnet's CPU during each raw run, in % of one core
        for fetcher, v in zip((n2, n3, n4), versions, strict=True):
            wait_providers(fetcher, v, 1)
            log("(a) raw stream, with the testnet up and idle")
            pids = [n.pid for n in nodes.values()]
            cpu, t0 = [_cpu_s(p) for p in pids], time.monotonic()
            raw.append(measure_raw(nbytes))
            idle_load.append(100 * (sum(_cpu_s(p) for p in pids) - sum(cpu))
                             / (time.monotonic() - t0))
            log(f"    {raw[-1]:.1f} MiB/s; the {len(pids)} idle daemons meanwhile used "
                f"{idle_load[-1]:.0f}% of a core")
            log(f"(b) {fetcher.name} fetches {v[:12]} from node-1 alone")
            ones.append(timed_fetch(fetcher, v, size_mib, [n1]))
            log(f"    {ones[-1]['mib_s']:.1f} MiB/s ({ones[-1]['mib_s'] / raw[-1]:.2f}x the raw "
                f"run before it), peak {ones[-1]['peak_mib']:.0f} MiB")
        one = max(ones, key=lambda f: f["mib_s"])

        version = versions[0]
        log("node-3 fetches node-2's model (untimed), so that three nodes provide it")
        wait_providers(n3, version, 2)
        timed_fetch(n3, version, size_mib, [n1, n2])

        log("(c) node-4 fetches it from node-1, node-2 and node-3")
        wait_providers(n4, version, 3)
        out = work / "fetched"
        three = timed_fetch(n4, version, size_mib, [n1, n2, n3], out=out)
        log(f"    {three['mib_s']:.1f} MiB/s, peak {three['peak_mib']:.0f} MiB")
        files = sorted(p.name for p in models[0].iterdir())
        same, _, _ = filecmp.cmpfiles(models[0], out, files, shallow=False)
        identical = same == files

        log(f"(d) latency: node-2 fetches {SMALL_MIB:g} MiB models from node-1, one at a time")
        latency_ms = []
        for i in range(SMALL_RUNS):
            small = work / f"small-{i}"
            if not small.exists():
                make_model(small, SMALL_MIB, 2, 100 + i)
            v = n1.publish(small, f"bench-small-{i}")
            wait_providers(n2, v, 1)
            op = n2.run_op("POST", "/v1/models/fetch", {"version": v}, "fetch")
            latency_ms.append(float(op["ended_ms"] - op["started_ms"]))
        log(f"    {', '.join(f'{x:.0f}' for x in latency_ms)} ms")
    finally:
        testnet_down(net)

    log("(a) again on the quiet machine, after the testnet stopped")
    quiet.append(measure_raw(nbytes))
    baseline = max(raw)
    ratio = one["mib_s"] / baseline

    figures = {
        "model_mib": round(size_mib, 1),
        "shards": args.shards,
        "raw_mib_s": [round(r, 1) for r in raw],
        "raw_quiet_mib_s": [round(r, 1) for r in quiet],
        "idle_testnet_cpu_pct_of_core": [round(x, 1) for x in idle_load],
        "one_provider": {k: round(v, 2) for k, v in one.items()},
        "one_provider_mib_s": [round(f["mib_s"], 1) for f in ones],
        "pair_ratios": [round(f["mib_s"] / r, 3) for f, r in zip(ones, raw, strict=True)],
        "three_providers": {k: round(v, 2) for k, v in three.items()},
        "ratio_one_to_raw": round(ratio, 3),
        "ratio_one_to_quiet_raw": round(one["mib_s"] / max(quiet), 3),
        "ratio_three_to_raw": round(three["mib_s"] / baseline, 3),
        "byte_identical": identical,
        "small_fetch_ms": latency_ms,
    }
    print(json.dumps(figures, indent=2))
    print(f"\n(a) raw stream            {baseline:7.1f} MiB/s  (runs with the testnet up: "
          f"{', '.join(f'{r:.1f}' for r in raw)}; on the quiet machine: "
          f"{', '.join(f'{r:.1f}' for r in quiet)})")
    runs = ", ".join(f"{f['mib_s']:.1f}" for f in ones)
    pairs = ", ".join(f"{x:.2f}" for x in figures["pair_ratios"])
    slower = min(f["mib_s"] for f in ones) / min(raw)
    print(f"(b) fetch, 1 provider     {one['mib_s']:7.1f} MiB/s  {ratio:.2f}x"
          f"  peak {max(f['peak_mib'] for f in ones):.0f} MiB (before "
          f"{one['rss_before_mib']:.0f} MiB)")
    print(f"    runs: {runs}; each against the raw run before it: {pairs}; slower vs "
          f"slower {slower:.2f}x; best against the best quiet raw run "
          f"{figures['ratio_one_to_quiet_raw']:.2f}x")
    print(f"(c) fetch, 3 providers    {three['mib_s']:7.1f} MiB/s  "
          f"{three['mib_s'] / baseline:.2f}x  peak {three['peak_mib']:.0f} MiB "
          f"(before {three['rss_before_mib']:.0f} MiB)")
    print(f"    fetched files byte-identical to the published ones: {identical}")
    median = sorted(latency_ms)[len(latency_ms) // 2]
    small_runs = ", ".join(f"{x:.0f}" for x in latency_ms)
    print(f"(d) fetch of a {SMALL_MIB:g} MiB model (3 files), 1 provider: median "
          f"{median:.0f} ms (runs: {small_runs})")

    missed = []
    if ratio < GOAL_RATIO:
        missed.append(f"(b) is {ratio:.2f}x the raw stream, goal >= {GOAL_RATIO}x")
    for what, fig in (*(("(b)", f) for f in ones), ("(c)", three)):
        if not fig["peak_mib"] < GOAL_PEAK_MIB:
            missed.append(f"{what} peak memory {fig['peak_mib']:.0f} MiB, goal < "
                          f"{GOAL_PEAK_MIB:.0f} MiB")
    if not identical:
        missed.append("the fetched files differ from the published ones")
    for m in missed:
        print(f"GOAL MISSED: {m}")
    if not missed:
        print("all goals met")
    if not args.keep and args.dir is None:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    return 1 if missed else 0


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "_raw-server":
        raw_server()
        return 0
    if len(sys.argv) > 1 and sys.argv[1] == "_raw-client":
        raw_client(sys.argv[2], int(sys.argv[3]))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--mib", type=float, default=1024.0,
                        help="model size in MiB (default 1024: the 1 GiB of the goal)")
    parser.add_argument("--shards", type=int, default=4, help="safetensors shards (default 4)")
    parser.add_argument("--dir", help="work directory (default: a fresh temporary one, "
                                      "removed at the end)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    return run(parser.parse_args())


if __name__ == "__main__":
    sys.exit(main())
