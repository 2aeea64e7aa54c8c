"""Mixed hardware and elastic jobs, measured on real daemons (issue 19, items 5 and 6).

Two measurements of bench/environment.py, each on a testnet of `iollm node start`
processes on 127.0.0.1 (node/cli/testnet.py: a bootstrap node, which coordinates, and
the worker nodes; one validator, so the chain costs little):

``throttled``  four workers, the last one held to a quarter of a CPU by a cgroup (v1's
               cpu controller, `cpu.cfs_quota_us` = 25000 of `cpu.cfs_period_us` =
               100000; `cpu.max` on v2): its daemon's whole process tree, the warm task
               parent that every node starts before the job included, so every task
               child is in it too. Each worker's CPUs per round are measured (v1's
               cpuacct) to check the quota against what the others get. The
               training benchmark's recipe, shortened (bench/training.py's warm start,
               (a) and (c), shared through its cache), is run twice through the network:
               unthrottled, then throttled. Goals: the throttled run's sized rounds take
               at most 0.6x the wall time of its round 0, an equal split of tokens (the
               workers hold the base and the data before it starts, so round 0 fetches
               nothing); its collaboration efficiency is within 0.02 of the unthrottled
               run's.
``join``       three workers run a job; during its round 0 a fresh node is initialised and
               started (`iollm init`, `iollm node start`); the time from that start to
               its first accepted task (the end of the round that accepted it), with the
               milestones between.

Must run as root (cgroups). The machine is shared: every figure is from one run.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import torch

from bench.training_net import job_toml
from bench.training_sim import NetworkResult, Recipe, log
from node.api.server import api_request, read_token_file
from node.cli.testnet import testnet_down, testnet_up
from node.ml import gpt

GOAL_WALL_RATIO = 0.6  # sized rounds against the equal split, throttled run
GOAL_EFFICIENCY_GAP = 0.02  # throttled efficiency within this of the unthrottled one
QUOTA = 0.25  # of one CPU
CGROUP_V1 = Path("/sys/fs/cgroup/cpu")
CGROUP_V2 = Path("/sys/fs/cgroup")
CPUACCT_V1 = Path("/sys/fs/cgroup/cpuacct")
CGROUP_NAME = "hetero-bench"
POLL_S = 1.0
JOB_TIMEOUT_S = 3600.0


# --------------------------------------------------------------------------- cgroups


def process_tree(pid: int) -> list[int]:
    """``pid`` and every process below it now: a daemon, its warm task parent
    (node/jobs/warmchild.py, a child of the daemon) and the task children forked from it."""
    top = psutil.Process(pid)
    return [pid] + [p.pid for p in top.children(recursive=True)]


@contextlib.contextmanager
def cpu_quota(pid: int, fraction: float) -> Iterator[str]:
    """Hold ``pid``'s process tree (the daemon, its warm task parent, the children both
    start from now on) to ``fraction`` of one CPU; yields a line saying how. cgroup v1's
    cpu controller when mounted, else v2. A process moved into a cgroup takes only
    itself: the warm parent, started before, is moved with it, or its forks would run
    free."""
    period = 100_000
    quota = int(period * fraction)
    if (CGROUP_V1 / "cpu.cfs_quota_us").exists():
        group = CGROUP_V1 / CGROUP_NAME
        group.mkdir(exist_ok=True)
        (group / "cpu.cfs_period_us").write_text(str(period))
        (group / "cpu.cfs_quota_us").write_text(str(quota))
        how = f"cgroup v1 {group}: cpu.cfs_quota_us={quota} of cpu.cfs_period_us={period}"
        root = CGROUP_V1
    elif (CGROUP_V2 / "cgroup.controllers").exists():
        group = CGROUP_V2 / CGROUP_NAME
        group.mkdir(exist_ok=True)
        (group / "cpu.max").write_text(f"{quota} {period}")
        how = f"cgroup v2 {group}: cpu.max={quota} {period}"
        root = CGROUP_V2
    else:
        raise SystemExit("no cgroup cpu controller here (v1 cpu or v2); cannot throttle")
    moved = process_tree(pid)
    for p in moved:
        with contextlib.suppress(ProcessLookupError):  # a child that ended meanwhile
            (group / "cgroup.procs").write_text(str(p))
    try:
        yield f"{how}; {len(moved)} processes moved (the daemon and its warm task parent)"
    finally:
        for line in (group / "cgroup.procs").read_text().split():
            with contextlib.suppress(OSError):  # a process that ended meanwhile
                (root / "cgroup.procs").write_text(line)
        with contextlib.suppress(OSError):
            group.rmdir()


class CpuMeter:
    """CPU seconds used by each worker's process tree, from a cgroup v1 cpuacct group of
    its own (which holds the children it starts later too): what a worker actually gets
    on a shared machine, to check that the quota is a quarter of it. None where there
    is no cpuacct hierarchy (cgroup v2: its one tree holds the throttle's group)."""

    def __init__(self, trees: dict[str, int]) -> None:
        self.groups: dict[str, Path] = {}
        if not (CPUACCT_V1 / "cpuacct.usage").exists():
            return
        for name, pid in trees.items():
            group = CPUACCT_V1 / f"{CGROUP_NAME}-{name}"
            group.mkdir(exist_ok=True)
            for p in process_tree(pid):
                with contextlib.suppress(ProcessLookupError):
                    (group / "cgroup.procs").write_text(str(p))
            self.groups[name] = group
        self.samples: list[tuple[float, dict[str, float]]] = []

    def sample(self) -> None:
        if self.groups:
            self.samples.append((time.time(), {
                n: int((g / "cpuacct.usage").read_text()) / 1e9
                for n, g in self.groups.items()}))

    def share(self, t0: float, t1: float) -> dict[str, float] | None:
        """Each worker's CPUs over [t0, t1] (seconds since the epoch), from the samples
        nearest each end; None without two distinct samples."""
        if not self.groups or len(self.samples) < 2:
            return None
        a = min(self.samples, key=lambda s: abs(s[0] - t0))
        b = min(self.samples, key=lambda s: abs(s[0] - t1))
        if b[0] <= a[0]:
            return None
        return {n: (b[1][n] - a[1][n]) / (b[0] - a[0]) for n in self.groups}

    def close(self) -> None:
        for group in self.groups.values():
            for line in (group / "cgroup.procs").read_text().split():
                with contextlib.suppress(OSError):
                    (CPUACCT_V1 / "cgroup.procs").write_text(line)
            with contextlib.suppress(OSError):
                group.rmdir()


# --------------------------------------------------------------------------- the testnet


def iollm(*args: str, timeout: float = 600) -> str:
    out = subprocess.run([sys.executable, "-m", "node.cli", *args], capture_output=True,
                         text=True, timeout=timeout, check=False)
    if out.returncode:
        raise RuntimeError(f"iollm {' '.join(args)}: {out.stderr.strip()[-500:]}")
    return out.stdout.strip().splitlines()[-1] if out.stdout.strip() else ""


class Net:
    """A testnet's nodes by name, with their API."""

    def __init__(self, state: dict[str, Any]) -> None:
        self.nodes = {n["name"]: n for n in state["nodes"]}

    def api(self, name: str, method: str, path: str, body: Any = None) -> Any:
        node = self.nodes[name]
        token = read_token_file(Path(node["home"]) / "api.token")
        return api_request(node["api"], token, method, path, body, timeout=60)

    def home(self, name: str) -> str:
        return str(self.nodes[name]["home"])


def wait_job(net: Net, jid: str, on_status: Callable[[dict[str, Any]], None] | None = None
             ) -> dict[str, Any]:
    deadline = time.monotonic() + JOB_TIMEOUT_S
    seen = -1
    while time.monotonic() < deadline:
        status = net.api("bootstrap", "GET", f"/v1/jobs/status?id={jid}")
        if on_status is not None:
            on_status(status)
        if len(status.get("rounds", [])) != seen:
            seen = len(status.get("rounds", []))
            if seen:
                rd = status["rounds"][-1]
                log(f"  round {rd['round']}: {rd['accepted']} accepted, train phase "
                    f"{(rd['trained_ms'] - rd['offered_ms']) / 1000:.1f} s, steps "
                    f"{[t.get('steps') for t in rd['tasks']]}, held-out "
                    f"{rd.get('heldout_after')}")
        if status["status"] != "running":
            if status["status"] != "done":
                raise RuntimeError(f"job ended {status['status']}: {status.get('error')}")
            return dict(status)
        time.sleep(POLL_S)  # polling another process, bounded by the deadline
    raise RuntimeError(f"job {jid} not done in {JOB_TIMEOUT_S:.0f} s")


# --------------------------------------------------------------------------- throttled


def run_process_job(recipe: Recipe, config: gpt.GPTConfig, base: dict[str, torch.Tensor],
                    tokens: Any, train_len: int, heldout: tuple[int, int],
                    on_round: Any = None, *, throttle: float | None = None,
                    out: dict[str, Any]) -> NetworkResult:
    """Part (b) of bench/training.py through real daemons; with ``throttle``, the last
    worker's daemon held to that fraction of a CPU. Per-round figures go to ``out``."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        gpt.save_model(root / "base", config, base)
        (root / "data").mkdir()
        np.asarray(tokens, dtype=np.uint8).tofile(root / "data" / "corpus.txt")
        state = testnet_up(root / "net", recipe.workers, validators=1, timeout=600)
        try:
            net = Net(state)
            boot = net.home("bootstrap")
            model = iollm("model", "publish", str(root / "base"), "--name", "bench-base",
                          "--home", boot)
            data = iollm("dataset", "publish", str(root / "data" / "corpus.txt"), "--name",
                         "bench-data", "--home", boot)
            workers = [f"node-{i}" for i in range(1, recipe.workers + 1)]
            for w in workers:  # round 0 then fetches nothing: an equal split, measured
                iollm("model", "fetch", model, "--home", net.home(w))
                iollm("dataset", "fetch", data, "--home", net.home(w))
            # Every daemon's warm task parent (node/jobs/warmchild.py) is started now, by
            # one small task child each (a throwaway `model init`), unthrottled: it starts
            # once per daemon, and round 0 would otherwise pay the throttled worker's start
            # (seconds of CPU importing torch, minutes at its quota) and pass for slow.
            for name in ["bootstrap", *workers]:
                iollm("model", "init", "--size", "tiny", "--name", "warm-up", "--home",
                      net.home(name))
            slow = workers[-1]
            meter = CpuMeter({w: net.nodes[w]["pid"] for w in workers})
            try:
                with (cpu_quota(net.nodes[slow]["pid"], throttle) if throttle
                      else contextlib.nullcontext("unthrottled")) as how:
                    log(f"(b) {how}")
                    jid = net.api("bootstrap", "POST", "/v1/jobs/submit",
                                  {"spec": job_toml(recipe, model, data)})["job"]
                    status = wait_job(net, jid, lambda _: meter.sample())
            finally:
                meter.close()
            final = root / "final"
            iollm("model", "fetch", status["base"], "--out", str(final), "--home", boot)
            _, final_state = gpt.load_model(final)
            peers = {w: net.nodes[w]["peer_id"] for w in workers}
        finally:
            testnet_down(root / "net")
    rounds = status["rounds"]
    slow_peer = peers[workers[-1]]
    out.update(
        throttled=bool(throttle), slow_peer=slow_peer,
        train_phase_s=[(rd["trained_ms"] - rd["offered_ms"]) / 1000 for rd in rounds],
        steps=[{t["worker"][-6:]: t.get("steps") for t in rd["tasks"]} for rd in rounds],
        tokens_per_s=[{w[-6:]: row.get("tokens_per_s") for w, row in rd["workers"].items()}
                      for rd in rounds],
        heldout=[rd.get("heldout_after") for rd in rounds],
        fit=[{w[-6:]: [None if row.get("overhead_s") is None else round(row["overhead_s"], 1),
                       None if row.get("fit_tokens_per_s") is None
                       else round(row["fit_tokens_per_s"])]
              for w, row in rd["workers"].items()} for rd in rounds],
        left_out=[[w[-6:] for w in rd.get("left_out", [])] for rd in rounds],
        rejected=[[f"{t['worker'][-6:]}: {t.get('reason')}" for t in rd["tasks"]
                   if t["verdict"] != "accepted"] for rd in rounds],
        cpu_share=[_named(meter.share(rd["offered_ms"] / 1000, rd["trained_ms"] / 1000),
                          peers) for rd in rounds])
    tasks = sum(len(rd["tasks"]) for rd in rounds)
    rejected = sum(t["verdict"] != "accepted" for rd in rounds for t in rd["tasks"])
    per_delta = gpt.n_params(base) // 2 + 1  # int4: about half a byte a parameter
    return NetworkResult(
        state=final_state, bytes_sent_per_worker=per_delta * tasks // recipe.workers,
        bytes_received_per_worker=per_delta * len(rounds),
        base_bytes=0, data_bytes_per_worker=0,
        train_wall_s=sum(t.get("wall_ms", 0) for rd in rounds for t in rd["tasks"]) / 1000,
        check_wall_s=sum(rd.get("check_s") or 0.0 for rd in rounds),
        reexec_wall_s=sum(rd.get("reexec_s") or 0.0 for rd in rounds),
        reexec_count=sum(rd.get("reexec", 0) for rd in rounds),
        tasks=tasks, rejected=rejected,
        rounds=[{"round": rd["round"], "accepted": rd["accepted"],
                 "heldout_before": rd["heldout_before"],
                 "heldout_after": rd.get("heldout_after"), "check_s": rd.get("check_s"),
                 "train_loss": [t.get("last_loss") for t in rd["tasks"]],
                 "heldout_gain": [], "own_excess": None, "max_cosine": []} for rd in rounds])


def _named(share: dict[str, float] | None, peers: dict[str, str]
           ) -> dict[str, float] | None:
    """A per-node figure keyed as the other per-round figures are: a peer id's tail."""
    return None if share is None else {peers[n][-6:]: round(v, 3) for n, v in share.items()}


def measure_throttled(args: Any) -> dict[str, Any]:
    """Unthrottled, then throttled: bench/training.py's machinery for (a), (b), (c)."""
    from bench import training

    sets = [f"--set={s}" for s in args.set]
    figures: dict[str, Any] = {"quota": args.quota}
    for throttle in (args.quota, None):  # the throttled run first: it alone gives the wall ratio
        side: dict[str, Any] = {}
        out = Path(args.cache) / f"hetero-{'throttled' if throttle else 'free'}.json"

        def run_b(*a: Any, _t: float | None = throttle, _side: dict[str, Any] = side
                  ) -> NetworkResult:
            return run_process_job(*a, throttle=_t, out=_side)

        training.main([*sets, "--cache", str(args.cache), "--json", str(out)], run_b=run_b)
        result = json.loads(out.read_text())
        figures["throttled" if throttle else "unthrottled"] = {**side, **{
            k: result[k] for k in ("a", "b", "c", "efficiency")}}
    thr = figures["throttled"]
    equal = thr["train_phase_s"][0]
    sized = sorted(thr["train_phase_s"][2:] or thr["train_phase_s"][1:])
    median = sized[len(sized) // 2]
    figures["wall_ratio"] = median / equal
    figures["efficiency_gap"] = (figures["unthrottled"]["efficiency"]
                                 - thr["efficiency"])
    return figures


# --------------------------------------------------------------------------- join


def measure_join(args: Any) -> dict[str, Any]:
    """A fresh node started during a job's round 0: time to its first accepted task."""
    from node.cli.testnet import _node_config

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        state = testnet_up(root / "net", 3, validators=1, timeout=600)
        proc = None
        try:
            net = Net(state)
            boot = net.home("bootstrap")
            model = iollm("model", "init", "--size", "tiny", "--home", boot)
            data = iollm("dataset", "stdlib", "--home", boot)
            spec = (Path(__file__).resolve().parent.parent / "bootstrap/jobs/example.toml"
                    ).read_text()
            spec = "\n".join(
                f'base_model = "{model}"' if ln.startswith("base_model") else
                f'dataset = "{data}"' if ln.startswith("dataset") else
                "rounds = 3" if ln.startswith("rounds") else
                "workers_per_round = 4" if ln.startswith("workers_per_round") else
                "inner_steps = 30" if ln.startswith("inner_steps") else ln
                for ln in spec.splitlines())
            jid = net.api("bootstrap", "POST", "/v1/jobs/submit", {"spec": spec})["job"]
            boot_log = Path(boot) / "daemon.log"
            deadline = time.monotonic() + 600
            while "round 0: " not in boot_log.read_text(errors="replace"):  # tasks out
                if time.monotonic() > deadline:
                    raise RuntimeError("the job's round 0 did not start")
                time.sleep(0.2)  # polling another process's log, bounded
            home = root / "late"
            subprocess.run([sys.executable, "-m", "node.cli", "init", "--home", str(home)],
                           check=True, stdout=subprocess.DEVNULL)
            (home / "config.toml").write_text(_node_config(None))
            boot_addr = net.nodes["bootstrap"]["addrs"][0]
            genesis = root / "net" / "genesis.toml"
            t0 = time.time()
            log_file = open(home / "daemon.log", "ab")  # noqa: SIM115 - the child's
            proc = subprocess.Popen(
                [sys.executable, "-m", "node.cli", "node", "start", "--home", str(home),
                 "--bootstrap", boot_addr, "--genesis", str(genesis)],
                stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            log_file.close()
            marks: dict[str, float] = {}
            peer = None
            deadline = time.monotonic() + JOB_TIMEOUT_S
            while time.monotonic() < deadline:
                if "ready" not in marks and (home / "node.json").exists():
                    marks["ready"] = time.time() - t0
                    peer = json.loads((home / "node.json").read_text()).get("peer_id")
                text = (home / "daemon.log").read_text(errors="replace")
                if "prefetched" in text and "prefetched" not in marks:
                    marks["prefetched"] = time.time() - t0
                status = net.api("bootstrap", "GET", f"/v1/jobs/status?id={jid}")
                done = [rd for rd in status.get("rounds", []) for t in rd["tasks"]
                        if t["worker"] == peer and t["verdict"] == "accepted"]
                if done:
                    marks["accepted"] = done[0]["ended_ms"] / 1000 - t0
                    marks["round"] = done[0]["round"]
                    break
                if status["status"] != "running":
                    raise RuntimeError(f"the job ended before the late worker contributed: "
                                       f"{status['status']} {status.get('error')}")
                time.sleep(POLL_S)  # polling another process, bounded by the deadline
            else:
                raise RuntimeError("the late worker had no accepted task in time")
        finally:
            if proc is not None:
                proc.terminate()
                proc.wait(30)
            testnet_down(root / "net")
    return marks


MEASUREMENTS: dict[str, Callable[[Any], dict[str, Any]]] = {
    "throttled": measure_throttled, "join": measure_join,
}


def report(name: str, figures: dict[str, Any]) -> list[str]:
    """Print one measurement's figures; the goals it missed."""
    missed = []
    if name == "throttled":
        for which in ("unthrottled", "throttled"):
            f = figures[which]
            print(f"{which}: efficiency {f['efficiency']:.3f} ((a) {f['a']:.4f}, (b) "
                  f"{f['b']:.4f}, (c) {f['c']:.4f}); train phase per round "
                  f"{[round(x, 1) for x in f['train_phase_s']]} s")
            print(f"  steps per round {f['steps']}")
            rates = [{k: round(v or 0) for k, v in r.items()} for r in f["tokens_per_s"]]
            print(f"  tokens/s per worker {rates}")
            print(f"  CPUs each worker's processes got in the train phase {f['cpu_share']}")
            print(f"  fit after each round [overhead s, tokens/s] {f['fit']}; left out "
                  f"{f['left_out']}; not accepted {f['rejected']}")
        print(f"quota of the throttled worker: {figures['quota']} CPU")
        print(f"throttled run: sized rounds (median) / round 0 (equal split) = "
              f"{figures['wall_ratio']:.2f}x (goal <= {GOAL_WALL_RATIO}x)")
        print(f"efficiency unthrottled - throttled = {figures['efficiency_gap']:+.3f} "
              f"(goal <= {GOAL_EFFICIENCY_GAP})")
        if not figures["wall_ratio"] <= GOAL_WALL_RATIO:
            missed.append("wall ratio")
        if not figures["efficiency_gap"] <= GOAL_EFFICIENCY_GAP:
            missed.append("efficiency gap")
    else:
        print(f"late worker: daemon ready {figures.get('ready', float('nan')):.1f} s, "
              f"prefetched {figures.get('prefetched', float('nan')):.1f} s, first accepted "
              f"task (round {figures.get('round')}) {figures['accepted']:.1f} s after "
              f"`node start`")
    return missed


if __name__ == "__main__":  # pragma: no cover - bench/environment.py is the entry
    print("run bench/environment.py", file=sys.stderr)
    sys.exit(2)
