"""WAN benchmark: SMIP fetches and the chain on shaped links of the namespace testnet.

    .venv/bin/python bench/wan.py [--mib 128] [--only fetch,providers,finality,training,discovery]
                                  [--rate 500] [--seconds 20] [--hosts 30] [--queries 100]

Root only (network namespaces). One namespace testnet (`iollm testnet up --hosts`, prefix
``wanbench`` or --prefix): the bootstrap node and 3 nodes, each in a namespace of its own;
the links are shaped by the relay of node/testnet (links.py says how). The fetching node
is the bootstrap node, whose own link is unshaped, so a path's shape is the provider's
link. node-1, node-2 and node-3 have 25 ms each way from the start (REST), before any
connection is opened: BBR, the congestion control here, sizes its window from the lowest
round trip a connection saw in the last 10 s, so a delay added under a live connection
measured BBR's memory, not the fetch (5 Mbit/s for up to 10 s; see netns.shape). The
phases then change rates only, and run in this order whatever --only's order.

  fetch:     node-1 publishes MIB MiB (a dataset of random bytes); its link gets
             100 Mbit/s (50 ms RTT to the fetcher). Baseline (a): one TCP stream from
             node-1 to the bootstrap node over that same link, MIB/2 MiB (what the link
             and the relay carry). (b): the bootstrap node fetches the dataset. Goal: (b)
             >= 0.9 x the link's rate (90 Mbit/s); (b) against (a) is printed too. The
             stream muxer's window must cover the bandwidth-delay product (625 KB here):
             py-libp2p's yamux grows each stream's window up to 16 MiB.
  providers: two datasets of MIB/2 MiB on node-1; one is fetched by node-2 and node-3
             first (100 ms RTT, no rate limit), so it has three providers. Then node-1,
             node-2 and node-3 each get 50 Mbit/s. (a) the bootstrap node fetches the
             dataset only node-1 holds; (b) the one all three hold. Goal: (b) >= 2.5x (a).
             (c) three raw TCP streams at once, one from each provider: the ceiling.
  finality:  the 4 validators. Receipts-like transactions (signed by fresh keys, bench/
             consensus.py's) offered at RATE/s to the validators for a 12 s warm-up
             (not counted) and SECONDS; the latency from the offer to the final block
             that holds each, and the receipts refused (503). (b) every host's
             link 25 ms each way (100 ms RTT between two hosts), then (a) every link
             unshaped (a lower delay is taken up at once). Goal: (b) p50 < 2 s at 500/s,
             none refused or lost.

  training:  a 2-round job of the tiny GPT (2 workers a round, 20 inner steps, batch 8,
             sequence 64: the chaos test's recipe) submitted to node-1, on two testnets
             of their own: (b) every link 25 ms each way from the start (100 ms RTT
             between two hosts), then (a) no link shaped (the loopback-like baseline: the
             relay, no delay). Each publishes its base model and corpus, then times the
             job from its submission to ``done`` (0.5 s polls); the workers fetch both
             over the links within that time. Goal: (b) <= 1.25x (a).

  discovery: a testnet of its own, HOSTS hosts (30), every link 12.5 ms each way (50 ms
             RTT between two hosts); QUERIES times a random host asks for a random other
             host's record on the DHT-only path (``/v1/record?source=dht``: the DHT walk,
             no local replica, no direct ask), twice: (a) as soon as the testnet is up,
             (b) once SETTLE_S (240 s) have passed since the testnet was up (testnet_up
             returned: the daemons that started first have run longer; both times are
             printed) and the daemons have used under IDLE_CORES (0.3) cores in all over
             IDLE_WINDOW_S (10 s), or IDLE_WAIT_S (300 s) more have passed: the daemons'
             CPU before (b) and in its first 20 s is printed. A query succeeds when it
             returns the target's record at least as new (seq) as the one the target
             itself serves just before the query.
             Goal on (b): p99 under 10 RTTs, 100% success; (a) is printed too. Why
             two: all 30 daemons start within
             a minute and run their startup schedules at once (record syncs 0-60 s after
             joining, publish retries 15-105 s after the first publish, the chain's
             catch-up, gossip meshes forming); on a 2-core machine that saturates both
             cores for a minute or two, and every request of a walk started then can
             miss its deadline. The goal is about a running network, where nodes join
             one at a time; (a) shows what the boot costs. Their schedules stay in step
             after the boot (each daemon's periodic DHT puts and record syncs come at
             the same time after its start): 240 s after the testnet was up, 30 daemons
             used 0.1 cores in all in one run and 1.5 in another, and the queries' tail
             followed. A real network's nodes each have a machine; this one's 30 share
             two cores, so (b) is taken while they are idle.

A fetch's time is the daemon's own operation time (request to verified, complete
version). Exits 1 when a goal is missed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))  # consensus.py's receipts, benchstats

from benchstats import percentile  # noqa: E402

from node.api.server import read_token_file  # noqa: E402
from node.cli.testnet import node_api, testnet_down, testnet_up  # noqa: E402
from node.testnet import netns  # noqa: E402
from node.testnet.links import LinkShape  # noqa: E402

MIB = 1 << 20
PREFIX = "wanbench"
RAW_PORT = 5201
PROVIDERS = ("node-1", "node-2", "node-3")
REST = LinkShape(delay_ms=25)  # the providers' links between phases
PHASES = ("fetch", "providers", "finality")  # the order they run in (discovery first)
OWN_TESTNET = ("discovery", "training")  # phases that bring up testnets of their own
TRAINING_GOAL = 1.25  # the job's wall time at 100 ms RTT against unshaped links, at most
SETTLE_S = 240.0  # discovery (b): from the end of testnet_up (see the docstring)
# discovery (b) also waits (at most IDLE_WAIT_S) for a window of IDLE_WINDOW_S in which the
# 30 daemons used under IDLE_CORES of CPU in all: see the docstring.
IDLE_CORES, IDLE_WINDOW_S, IDLE_WAIT_S = 0.3, 10.0, 300.0


def log(msg: str) -> None:
    print(f"[wan {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class Node:
    def __init__(self, entry: dict[str, Any]) -> None:
        self.entry = entry
        self.name = entry["name"]
        self.netns = entry["netns"]
        self.addr = entry["addrs"][0].split("/")[2]
        self.token = read_token_file(Path(entry["home"]) / "api.token")

    def call(self, method: str, path: str, body: Any = None) -> Any:
        return node_api(self.entry, self.token, method, path, body, 60)

    def run_op(self, path: str, body: Any, timeout: float = 1800) -> dict[str, Any]:
        """Run an operation to its end; its answer, with ``phases``: when a poll first
        saw each phase (monotonic seconds)."""
        op_id = self.call("POST", path, body)["op"]
        deadline = time.monotonic() + timeout
        phases: dict[str, float] = {}
        while time.monotonic() < deadline:
            op = self.call("GET", f"/v1/ops?id={op_id}")
            phases.setdefault(op["phase"], time.monotonic())
            if op["state"] != "running":
                if op["state"] != "done":
                    raise SystemExit(f"bench: {path} on {self.name} failed: {op['error']}")
                return dict(op) | {"phases": phases, "seen_end": time.monotonic()}
            time.sleep(0.05)  # polling another process, with a deadline
        raise SystemExit(f"bench: {path} on {self.name} did not finish in {timeout:.0f} s")

    def publish(self, path: Path, name: str) -> str:
        op = self.run_op("/v1/models/publish", {"path": str(path), "kind": "dataset",
                                                "name": name})
        return str(op["result"]["version"])

    def fetch_s(self, version: str) -> tuple[float, float]:
        """(the whole fetch, its chunk phase): seconds. The chunk phase runs from a poll
        first seeing it to a poll seeing the end; before it come the provider lookup,
        the manifest and the leaf layers (a few round trips each)."""
        op = self.run_op("/v1/models/fetch", {"version": version})
        chunks = op["seen_end"] - op["phases"].get("chunks", op["seen_end"])
        return (op["ended_ms"] - op["started_ms"]) / 1000, chunks

    def providers(self, version: str) -> int:
        for v in self.call("GET", "/v1/models?kind=dataset"):
            if v["version"] == version:
                return int(v["providers"])
        return 0


def random_file(path: Path, mib: int) -> Path:
    with path.open("wb") as out:
        for _ in range(mib):
            out.write(os.urandom(MIB))
    return path


def raw_stream_mbit(sender: Node, receiver: Node, nbytes: int, port: int = RAW_PORT) -> float:
    """One TCP stream from ``sender`` to ``receiver`` over their links: Mbit/s received."""
    return netns.tcp_stream_mbit(sender.netns, receiver.netns, receiver.addr, nbytes, port,
                                 timeout=600)


def wait_providers(node: Node, version: str, n: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while node.providers(version) < n:
        if time.monotonic() > deadline:
            raise SystemExit(f"bench: {node.name} knows fewer than {n} providers of {version}")
        time.sleep(0.5)  # the announcements travel by gossip; bounded by the deadline


def phase_fetch(directory: Path, nodes: dict[str, Node], mib: int, work: Path) -> bool:
    boot, one = nodes["bootstrap"], nodes["node-1"]
    version = one.publish(random_file(work / "fetch.bin", mib), "fetch")
    rate = 100.0
    netns.shape(directory, ["node-1"], LinkShape(delay_ms=REST.delay_ms, rate_mbit=rate))
    raw = raw_stream_mbit(one, boot, mib // 2 * MIB)
    log(f"fetch: (a) raw TCP over the link {raw:.1f} Mbit/s")
    took, chunks = boot.fetch_s(version)
    got = mib * MIB * 8 / took / 1e6
    netns.shape(directory, ["node-1"], REST)
    ok = got >= 0.9 * rate
    print(f"fetch, 1 provider, {rate:g} Mbit/s 50 ms RTT: {mib} MiB in {took:.1f} s = "
          f"{got:.1f} Mbit/s, {got / rate:.2f}x the link rate (goal 0.90x: "
          f"{'met' if ok else 'MISSED'}); {got / raw:.2f}x the raw TCP stream "
          f"({raw:.1f} Mbit/s); the chunk phase alone {chunks:.1f} s = "
          f"{mib * MIB * 8 / chunks / 1e6:.1f} Mbit/s")
    return ok


def phase_providers(directory: Path, nodes: dict[str, Node], mib: int, work: Path) -> bool:
    boot, one = nodes["bootstrap"], nodes["node-1"]
    half = max(mib // 2, 1)
    shared = one.publish(random_file(work / "shared.bin", half), "shared")
    alone = one.publish(random_file(work / "alone.bin", half), "alone")
    for name in ("node-2", "node-3"):
        wait_providers(nodes[name], shared, 1)  # the announcement is gossip: not at once
        nodes[name].fetch_s(shared)
    wait_providers(boot, shared, 3)
    wait_providers(boot, alone, 1)
    providers = list(PROVIDERS)
    netns.shape(directory, providers, LinkShape(delay_ms=REST.delay_ms, rate_mbit=50))
    # (c) what the three links carry at once: three raw TCP streams into the fetcher
    rates: list[float] = []
    streams = [threading.Thread(target=lambda n=n, i=i: rates.append(raw_stream_mbit(
        nodes[n], boot, half // 2 * MIB, RAW_PORT + i))) for i, n in enumerate(providers)]
    for t in streams:
        t.start()
    for t in streams:
        t.join(timeout=600)
    t_one, c_one = boot.fetch_s(alone)
    t_three, c_three = boot.fetch_s(shared)
    netns.shape(directory, providers, REST)
    bits = half * MIB * 8
    one_mbit, three_mbit = bits / t_one / 1e6, bits / t_three / 1e6
    ok = three_mbit >= 2.5 * one_mbit
    print(f"fetch, providers each behind 50 Mbit/s, 50 ms RTT: (a) 1 provider {one_mbit:.1f} "
          f"Mbit/s, (b) 3 providers {three_mbit:.1f} Mbit/s = {three_mbit / one_mbit:.2f}x "
          f"(goal 2.5x: {'met' if ok else 'MISSED'}); chunk phases alone "
          f"{bits / c_one / 1e6:.1f} and {bits / c_three / 1e6:.1f} Mbit/s = "
          f"{c_one / c_three:.2f}x; (c) three raw TCP streams at once: "
          f"{' + '.join(f'{r:.1f}' for r in rates)} = {sum(rates):.1f} Mbit/s")
    return ok


def offer_and_watch(nodes: list[Node], txs: list[bytes], rate: float, seconds: float,
                    warmup: float) -> dict[str, Any]:
    """Offer ``txs`` at ``rate``/s for ``warmup`` + ``seconds``, spread over the
    validators (each sender in its validator's namespace), watch the first validator's
    final blocks; the latency from each admitted POST's answer to the block seen final,
    and the receipts refused, of what was sent after the warm-up."""
    import consensus  # bench/consensus.py: its keep-alive poster

    from protocol.ledger import tx_id

    per_batch = max(1, round(rate * consensus.SEND_EVERY_S))
    batches = [txs[i:i + per_batch] for i in range(0, len(txs), per_batch)]
    bodies = [json.dumps({"txs": [t.hex() for t in b]}).encode() for b in batches]
    ids = [[tx_id(t).hex() for t in b] for b in batches]
    submitted: dict[str, float] = {}
    final: dict[str, float] = {}
    refused = [0]
    stop = threading.Event()
    start = time.monotonic() + 0.5
    end = start + warmup + seconds

    def sender(i: int) -> None:
        poster = consensus.Poster()
        v = consensus.Validator(nodes[i].entry)
        for k in range(i, len(batches), len(nodes)):
            at = start + k * consensus.SEND_EVERY_S
            if at >= end:
                break
            if (wait := at - time.monotonic()) > 0:
                time.sleep(wait)  # pacing the offered load, not synchronisation
            status, _ = poster.post(v, bodies[k])
            if status == 200:
                now = time.monotonic()
                for t in ids[k]:
                    submitted[t] = now
            elif at >= start + warmup:
                refused[0] += len(batches[k])

    def watcher() -> None:
        v = consensus.Validator(nodes[0].entry)
        height = int(v.call("GET", "/v1/ledger")["height"]) + 1
        while not stop.is_set():
            rows = v.call("GET", f"/v1/ledger/blocks?from={height}&limit=50&txs=1")
            now = time.monotonic()
            for b in rows:
                for t in b["tx_ids"]:
                    final.setdefault(t, now)
                height = b["height"] + 1
            if not rows:
                stop.wait(consensus.POLL_S)

    watch = threading.Thread(target=netns.run_in_netns, args=(nodes[0].netns, watcher))
    watch.start()
    senders = [threading.Thread(target=netns.run_in_netns, args=(n.netns, sender, i))
               for i, n in enumerate(nodes)]
    for t in senders:
        t.start()
    for t in senders:
        t.join(timeout=warmup + seconds + 120)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not all(t in final for t in submitted):
        time.sleep(0.2)  # waiting on the validators, with a deadline
    stop.set()
    watch.join(timeout=10)
    lat = sorted(final[t] - at for t, at in submitted.items()
                 if at >= start + warmup and t in final)
    return {"admitted": len(submitted), "refused": refused[0],
            "lost": sum(1 for t in submitted if t not in final),
            "p50": percentile(lat, 50), "p99": percentile(lat, 99), "n": len(lat)}


def phase_finality(directory: Path, nodes: dict[str, Node], rate: float, seconds: float
                   ) -> bool:
    import consensus

    from protocol.ledger import encode_tx

    validators = [nodes[n] for n in ("bootstrap", "node-1", "node-2", "node-3")]
    job = consensus.make_job()
    warmup = 12.0  # see below
    n = int(rate * (warmup + seconds)) + 1
    log(f"finality: generating {2 * n} signed receipts")
    txs = consensus.generate(job, 2 * n)
    validators[0].call("POST", "/v1/ledger/txs", {"txs": [encode_tx("job", job).hex()]})
    time.sleep(3)  # the job registered before its receipts: a few blocks
    # The validators' connections are open when their links are shaped, and BBR (the
    # kernel's congestion control here) keeps a connection's lowest RTT of the last 10 s:
    # for those 10 s it sizes windows for the unshaped link, and consensus stalls (the
    # first run refused 100 receipts then). What is offered in the warm-up is not counted.
    netns.shape(directory, list(nodes), LinkShape(delay_ms=25))
    wan = offer_and_watch(validators, txs[n:], rate, seconds, warmup)
    log(f"finality (b) 100 ms RTT: {wan}")
    netns.shape(directory, list(nodes), LinkShape())
    base = offer_and_watch(validators, txs[:n], rate, seconds, warmup)
    log(f"finality (a) unshaped: {base}")
    ok = wan["p50"] < 2.0 and wan["lost"] == 0 and wan["refused"] == 0
    print(f"finality at {rate:g} receipts/s: (a) unshaped p50 {base['p50']:.2f} s, p99 "
          f"{base['p99']:.2f} s; (b) 100 ms RTT p50 {wan['p50']:.2f} s, p99 {wan['p99']:.2f} s "
          f"({wan['p50'] / base['p50']:.2f}x (a); {wan['refused']} refused, {wan['lost']} "
          f"lost; goal p50 < 2 s: {'met' if ok else 'MISSED'})")
    return ok


def job_spec(base: str, data: str) -> str:
    return (f'name = "wan"\nbase_model = "{base}"\ndataset = "{data}"\n[train]\nrounds = 2\n'
            f"workers_per_round = 2\ninner_steps = 20\nbatch_size = 8\nseq_len = 64\n"
            f"[checks]\nreexec_fraction = 0.0\n[timeouts]\ntask_s = 300\n")


def cli(home: str, *args: str) -> str:
    """The iollm CLI against one node, as a user runs it (it enters the node's namespace)."""
    done = subprocess.run([sys.executable, "-m", "node.cli", *args, "--home", home],
                          capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise SystemExit(f"bench: iollm {' '.join(args)} failed: {done.stderr.strip()}")
    return done.stdout.strip()


def job_wall_s(work: Path, prefix: str, link: LinkShape | None) -> float:
    """A testnet of its own (bootstrap + 3 nodes), ``link`` on every host from the start;
    the 2-round job's wall time on it, from submission to done."""
    directory = work / f"net-training-{'wan' if link else 'plain'}"
    netns.teardown(prefix)
    state = testnet_up(directory, 3, hosts=True, prefix=prefix, timeout=300, link=link)
    try:
        nodes = {n["name"]: Node(n) for n in state["nodes"]}
        coordinator = nodes["node-1"]
        home = coordinator.entry["home"]
        base = cli(home, "model", "init", "--size", "tiny")
        data = cli(home, "dataset", "stdlib")
        start = time.monotonic()
        job = coordinator.call("POST", "/v1/jobs/submit", {"spec": job_spec(base, data)})["job"]
        deadline = start + 1800
        while (status := coordinator.call("GET", f"/v1/jobs/status?id={job}"))["status"] \
                == "running":
            if time.monotonic() > deadline:
                raise SystemExit(f"bench: the job did not end in {deadline - start:.0f} s")
            time.sleep(0.5)  # polling another process, with a deadline
        took = time.monotonic() - start
        if status["status"] != "done":
            raise SystemExit(f"bench: the job ended {status['status']}: {status}")
        return took
    finally:
        testnet_down(directory)


def phase_training(work: Path, prefix: str) -> bool:
    prefix = prefix[:11] + "t"
    log("training: the job at 100 ms RTT")
    wan = job_wall_s(work, prefix, LinkShape(delay_ms=25))
    log(f"training: (b) 100 ms RTT {wan:.1f} s; the job on unshaped links")
    plain = job_wall_s(work, prefix, None)
    ok = wan <= TRAINING_GOAL * plain
    print(f"training job, 2 rounds of the tiny GPT, 2 workers: (a) unshaped links {plain:.1f} s, "
          f"(b) 100 ms RTT between hosts {wan:.1f} s = {wan / plain:.2f}x (a) (goal "
          f"<= {TRAINING_GOAL:g}x: {'met' if ok else 'MISSED'})")
    return ok


def cpu_cores(pids: list[int], seconds: float) -> float:
    """The CPU the processes ``pids`` used over the next ``seconds``, in cores (user and
    system time from /proc; a process gone meanwhile counts what it used before)."""
    import consensus  # bench/consensus.py: cpu_seconds

    def used() -> dict[int, float]:
        seconds: dict[int, float] = {}
        for pid in pids:
            with contextlib.suppress(OSError):
                seconds[pid] = consensus.cpu_seconds(pid)
        return seconds

    before, start = used(), time.monotonic()
    time.sleep(seconds)  # a measurement window, not synchronisation
    after = used()
    return sum(after[p] - before[p] for p in after if p in before) / (time.monotonic() - start)


def wait_idle(pids: list[int]) -> tuple[float, float]:
    """Wait until the daemons ``pids`` used under IDLE_CORES in one IDLE_WINDOW_S window,
    IDLE_WAIT_S at most: (seconds waited, cores in the last window)."""
    start = time.monotonic()
    while True:
        cores = cpu_cores(pids, IDLE_WINDOW_S)
        waited = time.monotonic() - start
        if cores < IDLE_CORES or waited >= IDLE_WAIT_S:
            return waited, cores


def discovery_queries(nodes: list[Node], queries: int, rng: Any) -> tuple[list[float], int]:
    """``queries`` DHT-only record queries, each by a random host for a random other's
    record: their times (seconds, sorted) and how many failed. A query fails unless it
    returns the target's record with a seq at least that of the record the target
    itself serves just before (asked outside the timed query)."""
    took: list[float] = []
    failed = 0
    for _ in range(queries):
        asker, target = rng.sample(nodes, 2)
        pid = target.entry["peer_id"]
        want = target.call("GET", f"/v1/record?peer_id={pid}")["seq"]  # its own, current
        start = time.monotonic()
        try:
            got = asker.call("GET", f"/v1/record?peer_id={pid}&source=dht")
            ok = got["peer_id"] == pid and got["seq"] >= want
            if not ok:
                log(f"  query returned {got['peer_id']} seq {got['seq']}, the target "
                    f"serves seq {want}")
        except Exception as exc:  # a 404 (not found) or a timeout: a failed query
            log(f"  query failed: {exc}")
            ok = False
        took.append(time.monotonic() - start)
        failed += not ok
    return sorted(took), failed


def phase_discovery(work: Path, prefix: str, hosts: int, queries: int, seed: int) -> bool:
    """Its own testnet of ``hosts`` hosts, every link 12.5 ms each way (50 ms RTT)."""
    import random

    directory = work / "net-discovery"
    prefix = prefix[:11] + "d"
    netns.teardown(prefix)
    log(f"discovery: testnet of {hosts} hosts")
    started = time.monotonic()
    state = testnet_up(directory, hosts - 1, hosts=True, prefix=prefix, timeout=900,
                       link=LinkShape(delay_ms=12.5))
    rtt = 0.05
    up = time.monotonic()
    try:
        nodes = [Node(n) for n in state["nodes"]]
        rng = random.Random(seed)
        log(f"discovery: up after {up - started:.0f} s; (a) {queries} queries")
        boot, boot_failed = discovery_queries(nodes, queries, rng)
        if (wait := SETTLE_S - (time.monotonic() - up)) > 0:
            log(f"discovery: (b) in {wait:.0f} s, {SETTLE_S:.0f} s after the testnet was up")
            time.sleep(wait)  # letting the startup schedules end (docstring), not sync
        pids = [n["pid"] for n in state["nodes"]]
        waited, idle = wait_idle(pids)
        b_at = time.monotonic()
        log(f"discovery: (b) at {b_at - up:.0f} s after the testnet was up, "
            f"{b_at - started:.0f} s after testnet_up began; the daemons used {idle:.2f} "
            f"cores in the last {IDLE_WINDOW_S:.0f} s (waited {waited:.0f} s for under "
            f"{IDLE_CORES})")
        b_cpu: list[float] = []
        meter = threading.Thread(target=lambda: b_cpu.append(cpu_cores(pids, 20)), daemon=True)
        meter.start()
        took, failed = discovery_queries(nodes, queries, rng)
        meter.join()
        p50, p99 = percentile(took, 50), percentile(took, 99)
    finally:
        testnet_down(directory)
    success = 1 - failed / queries
    ok = p99 < 10 * rtt and failed == 0
    print(f"capability query, DHT only, {hosts} hosts, 50 ms RTT: (a) right after the start "
          f"p50 {percentile(boot, 50) * 1000:.0f} ms, p99 {percentile(boot, 99) * 1000:.0f} ms, "
          f"success {1 - boot_failed / queries:.1%}; (b) {b_at - up:.0f} s after the testnet "
          f"was up ({b_at - started:.0f} s after testnet_up began) "
          f"p50 {p50 * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms = {p99 / rtt:.1f} RTTs, max "
          f"{took[-1] * 1000:.0f} ms, success {success:.1%} (goal on (b): p99 < 10 RTTs and "
          f"100%: {'met' if ok else 'MISSED'}); the {hosts} daemons' CPU: {idle:.2f} cores just "
          f"before (b), {b_cpu[0]:.2f} in its first 20 s")
    return ok


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mib", type=int, default=128, help="size of the single-provider fetch")
    p.add_argument("--only", default="fetch,providers,finality,training,discovery",
                   help="comma-separated phases: fetch, providers, finality, training, "
                        "discovery")
    p.add_argument("--hosts", type=int, default=30, help="discovery: hosts")
    p.add_argument("--queries", type=int, default=100, help="discovery: queries")
    p.add_argument("--seed", type=int, default=1, help="discovery: who asks for whom")
    p.add_argument("--rate", type=float, default=500.0, help="finality: receipts a second")
    p.add_argument("--seconds", type=float, default=20.0, help="finality: seconds of load")
    p.add_argument("--dir", type=Path, help="testnet directory (default: a temporary one)")
    p.add_argument("--keep", action="store_true", help="leave the testnet running")
    p.add_argument("--prefix", default=PREFIX,
                   help=f"the testnets' namespace prefix (default {PREFIX}; discovery's adds d)")
    args = p.parse_args()
    netns.check_available()
    phases = [x for x in args.only.split(",") if x]
    if unknown := set(phases) - {*PHASES, *OWN_TESTNET}:
        raise SystemExit(f"bench: unknown phase {', '.join(sorted(unknown))}")
    work = Path(tempfile.mkdtemp(prefix="wanbench-"))
    directory = args.dir or work / "net"
    prefix = netns.check_prefix(args.prefix)
    netns.teardown(prefix)
    results: list[bool] = []
    if "discovery" in phases:
        phases.remove("discovery")
        results.append(phase_discovery(work, prefix, args.hosts, args.queries, args.seed))
    if "training" in phases:
        phases.remove("training")
        results.append(phase_training(work, prefix))
    if not phases:
        return 0 if all(results) else 1
    log(f"testnet up in {directory}")
    import consensus

    state = testnet_up(directory, 3, hosts=True, prefix=prefix, timeout=300, genesis_overrides={
        "block_interval_ms": 100, "max_block_bytes": consensus.BLOCK_BYTES},
        shapes={n: REST for n in PROVIDERS})
    nodes = {n["name"]: Node(n) for n in state["nodes"]}
    try:
        for phase in (p for p in PHASES if p in phases):
            log(f"phase {phase}")
            if phase == "fetch":
                results.append(phase_fetch(directory, nodes, args.mib, work))
            elif phase == "providers":
                results.append(phase_providers(directory, nodes, args.mib, work))
            else:
                results.append(phase_finality(directory, nodes, args.rate, args.seconds))
        print(json.dumps(json.loads((directory / "wire-stats.json").read_text())))
    finally:
        if not args.keep:
            testnet_down(directory)
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
