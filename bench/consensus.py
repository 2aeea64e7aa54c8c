"""Chain benchmark: receipts finalized per second and finality latency under load and
overload, four validators.

    .venv/bin/python bench/consensus.py [--loads 1,3] [--seconds 30] [--warmup 10]
                                        [--block-interval-ms 100] [--dir DIR] [--keep]
                                        [--capacity N]   (A/B: loads x N receipts/s)

In one run, all on 127.0.0.1:
  (a) baseline: how many receipts one process checks per second here (``check_tx``: the
      two Ed25519 signatures and the decoding every validator does for every receipt),
      the bound a validator on one core cannot pass. The goal capacity is GOAL_RATIO of
      it: four validators on two cores each check every receipt, so half of (a) is all
      that two cores can verify, and half of that is left for everything else.
  (b) a local testnet of four validator daemons (``iollm testnet up --nodes 3``, its
      genesis with ``--block-interval-ms`` and blocks of up to 1 MiB - 8 KiB); a job is
      registered, then signed receipts (pre-generated, each a worker's result inside a
      coordinator's receipt, as a real job makes them) are offered, one phase per entry
      of ``--loads`` (multiples of the goal capacity from the median of the first three
      (a) runs: the load is set before the later ones exist), at a steady rate for ``--warmup``
      + ``--seconds``, spread over the four validators' APIs; a batch the API refuses
      (503, over the chain's finality budget) is counted and not sent again. One
      validator's final blocks are watched (every 50 ms) for their tx ids.
Per phase: throughput (receipts in final blocks during the window, per second), finality
latency of the admitted receipts (from the POST returning to the watcher seeing it final;
the 50 ms poll is part of it), what was admitted and refused, and where the CPU went: each
daemon's CPU time in the window, and the share of it that checking each receipt once per
validator accounts for (at (a)'s rate per CPU second: a share that does not move with what
else runs on the machine). After the load, every admitted receipt must be final, the four
validators must hold the same blocks, and ``iollm ledger verify`` on one home must replay
them to the root the node reports.

Goals (exit 1 when one is missed), as ratios to (a) of the same run: throughput at the
highest load at least GOAL_RATIO x (a); p50 finality of the admitted receipts under 2 s
in every phase; nothing admitted lost.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import queue
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from benchstats import percentile  # bench/ is on sys.path when run as a script

ROOT = Path(__file__).resolve().parent.parent

GOAL_RATIO = 0.25  # of (a): the goal capacity
GOAL_P50_S = 2.0
BLOCK_BYTES = (1 << 20) - 8192  # gossipsub carries at most 1 MiB a message
SEND_EVERY_S = 0.1
POLL_S = 0.05
DRAIN_S = 60.0
# This machine's speed drifts within minutes: (a) is measured for CHECK_S three times
# before the load phases and once after each (the testnet idle each time); the median of
# them all counts.
CHECK_S = 3.0


def log(msg: str) -> None:
    print(f"[consensus {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --- load: a job and its receipts ----------------------------------------------------------


def _keys() -> tuple[Any, list[Any]]:
    from nacl.signing import SigningKey

    return SigningKey(b"\x11" * 32), [SigningKey(bytes([0x20 + i]) * 32) for i in range(8)]


def make_job() -> bytes:
    from protocol.jobs import Job, seal_job, spec_with_defaults
    from protocol.peerid import peer_id_from_public_key

    coordinator, _ = _keys()
    spec = spec_with_defaults(name="bench", base_model=b"\x01" * 32, dataset=b"\x02" * 32,
                              rounds=1, workers_per_round=8, inner_steps=1)
    me = peer_id_from_public_key(bytes(coordinator.verify_key))
    return seal_job(coordinator, Job(spec, me, 1))


def make_receipts(args: tuple[bytes, int, int]) -> list[bytes]:
    """Receipt txs ``start .. start + n - 1`` of the job (worker i % 8 did task i)."""
    from protocol.jobs import TaskResult, issue_receipt, job_id, seal_task_result
    from protocol.ledger import encode_tx
    from protocol.peerid import peer_id_from_public_key

    job, start, n = args
    coordinator, workers = _keys()
    jid = job_id(job)
    out = []
    for i in range(start, start + n):
        w = workers[i % len(workers)]
        result = seal_task_result(w, TaskResult(
            jid, 0, f"t{i}", peer_id_from_public_key(bytes(w.verify_key)),
            i.to_bytes(32, "big"), 3.0, 2.0, 8192, 1000))
        out.append(encode_tx("receipt", issue_receipt(
            coordinator, result, metrics={"own_gain": 0.12, "heldout_gain": 0.01},
            issued_ms=1)))
    return out


def generate(job: bytes, n: int) -> list[bytes]:
    parts = [(job, s, min(2000, n - s)) for s in range(0, n, 2000)]
    with ProcessPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        return [tx for chunk in pool.map(make_receipts, parts) for tx in chunk]


def measure_check_rate(genesis_toml: str, txs: list[bytes]) -> tuple[float, float]:
    """Receipts checked by this process, over at least CHECK_S seconds: per second of wall
    time (the baseline), and per second of its own CPU time (what a check costs, whatever
    share of the cores other work on the machine leaves it)."""
    from protocol.genesis import parse_genesis
    from protocol.ledger import check_tx

    g = parse_genesis(genesis_toml)
    done = 0
    t0, c0 = time.perf_counter(), time.process_time()
    while (elapsed := time.perf_counter() - t0) < CHECK_S:
        for tx in txs:
            check_tx(g, tx)
        done += len(txs)
    return done / elapsed, done / (time.process_time() - c0)


# --- the testnet, driven through the API ---------------------------------------------------


class Validator:
    def __init__(self, entry: dict[str, Any]) -> None:
        from node.api.server import read_token_file

        self.name, self.api, self.home = entry["name"], entry["api"], Path(entry["home"])
        self.token = read_token_file(self.home / "api.token")

    def call(self, method: str, path: str, body: Any = None, timeout: float = 60) -> Any:
        from node.api.server import api_request

        return api_request(self.api, self.token, method, path, body, timeout=timeout)


class Poster:
    """One sender thread's keep-alive connections to the validators' APIs: the load
    generator shares the machine with the validators, so it spends as little CPU as it
    can (bodies are encoded before the phase, connections are kept)."""

    def __init__(self) -> None:
        self.conns: dict[str, http.client.HTTPConnection] = {}

    def post(self, v: Validator, body: bytes) -> tuple[int, bytes]:
        """POST a pre-encoded body of txs; (status, answer). A dropped connection is
        opened again once."""
        for attempt in (0, 1):
            conn = self.conns.get(v.api)
            if conn is None:
                url = urlsplit(v.api)
                conn = self.conns[v.api] = http.client.HTTPConnection(
                    url.hostname or "127.0.0.1", url.port, timeout=60)
            try:
                conn.request("POST", "/v1/ledger/txs", body=body, headers={
                    "Authorization": f"Bearer {v.token}", "Content-Type": "application/json"})
                response = conn.getresponse()
                answer = response.read()
            except (OSError, http.client.HTTPException):
                conn.close()
                del self.conns[v.api]
                if attempt:
                    raise
                continue
            if response.getheader("Connection", "").lower() == "close":
                conn.close()
                del self.conns[v.api]
            return response.status, answer
        raise AssertionError("unreachable")


def offer(validators: list[Validator], txs: list[bytes], rate: float, seconds: float,
          submitted: dict[str, float], refused: list[int], errors: list[str]) -> int:
    """Send ``rate`` txs a second for ``seconds``, in batches every SEND_EVERY_S, each
    batch to the next validator; records when each admitted POST returned, counts the txs
    of refused ones (503) and keeps the other failures. Returns how many were offered."""
    from protocol.ledger import tx_id

    per_batch = max(1, round(rate * SEND_EVERY_S))
    batches = [txs[i:i + per_batch] for i in range(0, len(txs), per_batch)]
    bodies = [json.dumps({"txs": [t.hex() for t in b]}).encode() for b in batches]
    ids = [[tx_id(t).hex() for t in b] for b in batches]
    jobs: queue.Queue[tuple[Validator, int] | None] = queue.Queue()

    def sender() -> None:
        poster = Poster()
        while (item := jobs.get()) is not None:
            v, k = item
            try:
                status, answer = poster.post(v, bodies[k])
            except (OSError, http.client.HTTPException) as exc:
                errors.append(f"{v.name}: {exc!r}")
                continue
            if status == 503:  # over the finality budget: counted, not sent again
                refused.append(len(batches[k]))
            elif status != 200:  # the figures will show it; keep the pace
                errors.append(f"{v.name}: HTTP {status} {answer[:200]!r}")
            else:
                now = time.monotonic()
                for t in ids[k]:
                    submitted[t] = now

    threads = [threading.Thread(target=sender, daemon=True) for _ in range(4)]
    for t in threads:
        t.start()
    start = time.monotonic()
    k = 0
    while k < len(batches) and time.monotonic() - start < seconds:
        jobs.put((validators[k % len(validators)], k))
        k += 1
        wait = start + k * SEND_EVERY_S - time.monotonic()
        if wait > 0:
            time.sleep(wait)  # pacing the offered load, not synchronisation
    for _ in threads:
        jobs.put(None)
    for t in threads:
        t.join(timeout=120)
    return sum(len(b) for b in batches[:k])


def cpu_seconds(pid: int) -> float:
    """A process's CPU time so far (user + system), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def watch(v: Validator, final: dict[str, float], blocks: list[dict[str, Any]],
          stop: threading.Event) -> None:
    height = 1
    while not stop.is_set():
        try:
            rows = v.call("GET", f"/v1/ledger/blocks?from={height}&limit=50&txs=1")
        except Exception as exc:
            log(f"watcher: {exc}")
            rows = []
        now = time.monotonic()
        for b in rows:
            for t in b["tx_ids"]:
                final.setdefault(t, now)
            blocks.append({**b, "seen": now, "tx_ids": None})
            height = b["height"] + 1
        if not rows:
            stop.wait(POLL_S)


def phase(validators: list[Validator], pids: list[int], txs: list[bytes], load: float,
          rate: float, args: argparse.Namespace, final: dict[str, float]) -> dict[str, Any]:
    """One load phase: offer ``rate`` txs a second, then drain; its figures."""
    log(f"(b) load {load:g}x: offering {rate:.0f} receipts/s for {args.warmup:g} + "
        f"{args.seconds:g} s")
    submitted: dict[str, float] = {}
    refused: list[int] = []
    errors: list[str] = []
    cpu: dict[int, float] = {}

    def mark_window() -> None:
        for pid in pids:
            cpu[pid] = cpu_seconds(pid)

    load_start = time.monotonic()
    w0, w1 = load_start + args.warmup, load_start + args.warmup + args.seconds
    timer = threading.Timer(args.warmup, mark_window)
    timer.start()
    offered = offer(validators, txs, rate, args.warmup + args.seconds, submitted, refused,
                    errors)
    timer.join()
    cpu_window = {pid: cpu_seconds(pid) - cpu[pid] for pid in pids}
    cpu_span = time.monotonic() - w0
    log(f"    offered {offered}, admitted {len(submitted)}; draining")
    deadline = time.monotonic() + DRAIN_S
    while time.monotonic() < deadline and not all(t in final for t in submitted):
        time.sleep(0.2)  # waiting on the validators, with a deadline
    in_window = [t for t, at in final.items() if w0 <= at < w1 and t in submitted]
    lat = sorted(final[t] - s for t, s in submitted.items() if w0 <= s < w1 and t in final)
    finalized = len(in_window) / args.seconds
    daemons = sum(cpu_window.values()) / cpu_span  # cores busy with the daemons
    return {"load": load, "offered": rate, "finalized": finalized,
            "admitted": len(submitted) / (args.warmup + args.seconds),
            "refused": sum(refused), "errors": len(errors), "first_error": errors[:1],
            "p50": percentile(lat, 50), "p99": percentile(lat, 99), "latencies": len(lat),
            "lost": sum(1 for t in submitted if t not in final),
            "cores": daemons}


def run(args: argparse.Namespace) -> int:
    from node.cli.testnet import STATE_FILE, testnet_down, testnet_up
    from protocol.ledger import encode_tx, tx_id

    loads = [float(x) for x in args.loads.split(",")]
    work = Path(args.dir or tempfile.mkdtemp(prefix="iollm-consensus-"))
    work.mkdir(parents=True, exist_ok=True)
    job = make_job()
    net = work / "testnet"
    log("starting a testnet of four validators")
    testnet_up(net, 3, timeout=180, validators=4, genesis_overrides={
        "block_interval_ms": args.block_interval_ms, "max_block_bytes": BLOCK_BYTES})
    try:
        genesis_toml = (net / "genesis.toml").read_text()
        log("(a) receipts one process checks per second")
        sample = generate(job, 2000)
        measured = [measure_check_rate(genesis_toml, sample) for _ in range(3)]
        checks, cpu_checks = [m[0] for m in measured], [m[1] for m in measured]
        goal = GOAL_RATIO * statistics.median(checks)
        log(f"    {', '.join(f'{c:.0f}' for c in checks)} /s; goal capacity {goal:.0f} /s")
        rates = [load * (args.capacity or goal) for load in loads]
        counts = [int(r * (args.warmup + args.seconds)) + 1 for r in rates]
        log(f"generating {sum(counts)} signed receipts")
        t0 = time.monotonic()
        txs = generate(job, sum(counts))
        log(f"    {time.monotonic() - t0:.1f} s ({len(txs[0])} bytes a receipt tx)")
        state = json.loads((net / STATE_FILE).read_text())
        validators = [Validator(e) for e in state["nodes"]]
        pids = [e["pid"] for e in state["nodes"]]
        final: dict[str, float] = {}
        blocks: list[dict[str, Any]] = []
        stop = threading.Event()
        watcher = threading.Thread(target=watch, args=(validators[0], final, blocks, stop),
                                   daemon=True)
        watcher.start()
        job_tx = encode_tx("job", job)
        validators[0].call("POST", "/v1/ledger/txs", {"txs": [job_tx.hex()]})
        deadline = time.monotonic() + 60
        while tx_id(job_tx).hex() not in final:
            if time.monotonic() > deadline:
                raise SystemExit("the job tx was not final within 60 s")
            time.sleep(POLL_S)  # waiting on another process, with a deadline
        phases = []
        offset = 0
        for load, rate, n in zip(loads, rates, counts, strict=True):
            phases.append(phase(validators, pids, txs[offset:offset + n], load, rate, args,
                                final))
            offset += n
            wall, cpu = measure_check_rate(genesis_toml, sample)
            checks.append(wall)
            cpu_checks.append(cpu)
            log(f"(a) again: {checks[-1]:.0f} /s")
        stop.set()
        watcher.join(timeout=10)
        check_rate = statistics.median(checks)
        goal = GOAL_RATIO * check_rate
        cpu_check_rate = statistics.median(cpu_checks)
        for f in phases:  # CPU time against CPU time: the share does not move with load
            f["checking_cores"] = 4 * f["finalized"] / cpu_check_rate

        heights = [v.call("GET", "/v1/ledger")["height"] for v in validators]
        top = min(heights)
        same = len({json.dumps(v.call("GET", f"/v1/ledger/blocks?from={top}&limit=1"))
                    for v in validators}) == 1
        verify = subprocess.run([sys.executable, "-m", "node.cli", "ledger", "verify", "--home",
                                 str(validators[1].home), "--json"], capture_output=True,
                                text=True, timeout=600)
        verified = json.loads(verify.stdout) if verify.returncode == 0 else None
    finally:
        if not args.keep:
            testnet_down(net)

    print(f"(a) one process checks {check_rate:.0f} receipts/s (baseline: the median of "
          f"{', '.join(f'{c:.0f}' for c in checks)}); goal capacity {GOAL_RATIO:g}x = "
          f"{goal:.0f}/s; per second of its CPU time: {cpu_check_rate:.0f} (the median)")
    for f in phases:
        print(f"(b) load {f['load']:g}x: offered {f['offered']:.0f}/s, admitted "
              f"{f['admitted']:.0f}/s ({f['refused']} refused with 503, {f['errors']} other "
              f"failures), finalized {f['finalized']:.0f}/s = "
              f"{f['finalized'] / check_rate:.2f}x the baseline")
        print(f"    finality of admitted receipts: p50 {f['p50']:.2f} s, p99 {f['p99']:.2f} s "
              f"over {f['latencies']}; {f['lost']} admitted and not final after the drain")
        print(f"    CPU: the daemons kept {f['cores']:.2f} of the 2 cores busy; checking each "
              f"receipt once per validator accounts for {f['checking_cores']:.2f} "
              f"({f['checking_cores'] / max(f['cores'], 1e-9):.0%})")
        if f["first_error"]:
            print(f"    first failure: {f['first_error'][0]}")
    print(f"    validators at heights {heights}; same block at {top}: {same}; ledger verify: "
          + (f"height {verified['height']}, root {verified['state_root'][:16]}"
             if verified else f"FAILED {verify.stderr.strip()[-300:]}"))
    missed = []
    top_phase = max(phases, key=lambda f: f["load"])
    if top_phase["finalized"] < goal:
        missed.append(f"throughput {top_phase['finalized']:.0f}/s < {GOAL_RATIO:g}x "
                      f"= {goal:.0f}/s at load {top_phase['load']:g}x")
    for f in phases:
        if not f["p50"] < GOAL_P50_S:
            missed.append(f"p50 finality {f['p50']:.2f} s >= {GOAL_P50_S:g} s at load "
                          f"{f['load']:g}x")
        if f["lost"]:
            missed.append(f"{f['lost']} admitted receipts not final at load {f['load']:g}x")
    if not same or verified is None:
        missed.append("the validators disagree or the chain does not verify")
    if missed:
        print("goal missed: " + "; ".join(missed))
        return 1
    print(f"goals met: >= {GOAL_RATIO:g}x the baseline finalized at {top_phase['load']:g}x "
          f"load, p50 < {GOAL_P50_S:g} s at every load, nothing admitted lost")
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--loads", default="1,3",
                   help="offered loads, in multiples of the goal capacity (GOAL_RATIO x the "
                        "check baseline), one phase each (default 1,3)")
    p.add_argument("--capacity", type=float, default=0.0,
                   help="offer --loads as multiples of this many receipts/s instead of the "
                        "goal capacity (for A/B runs on a shared machine, where (a) by wall "
                        "time moves with the other load; the goals are unchanged)")
    p.add_argument("--seconds", type=float, default=30.0, help="measured window (s)")
    p.add_argument("--warmup", type=float, default=10.0, help="load before the window (s)")
    p.add_argument("--block-interval-ms", type=int, default=100,
                   help="the genesis block interval (default 100)")
    p.add_argument("--dir", help="work directory (default: a new temporary one)")
    p.add_argument("--keep", action="store_true", help="leave the testnet running")
    return run(p.parse_args())


if __name__ == "__main__":
    sys.exit(main())
