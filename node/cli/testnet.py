"""``iollm testnet up|down``: a bootstrap node and N nodes as processes on 127.0.0.1.

Each node gets its own home under the testnet directory, a config that listens on
127.0.0.1 only (port 0, so parallel testnets never collide) and a log file. The first
nodes (four by default) are the validators of a fresh chain whose genesis ``up`` writes
to ``DIR/genesis.toml``; every node is started with ``--genesis`` naming it. ``up`` returns
once every node is running and the bootstrap node's DHT query sees every capability
record; the processes run in their own session, so they outlive the command.
``testnet.json`` lists them for ``down``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from node.config import DEFAULT_CONFIG_TOML, RUNTIME_FILE, TOKEN_FILE

STATE_FILE = "testnet.json"
GENESIS_FILE = "genesis.toml"
TESTNET_CHAIN_ID = "iollm-testnet"
TESTNET_BLOCK_INTERVAL_MS = 1000
DEFAULT_VALIDATORS = 4  # the first nodes (bootstrap first) validate: 3f+1 with f = 1
LOCAL_LISTEN = "/ip4/127.0.0.1/tcp/0"

# Simulated GPUs for the demo (--simulate-gpus): node i gets entry i % len. "tflops" is
# the bf16 matmul rate the record then claims: about 70% of each card's peak dense bf16
# tensor rate (H100 SXM 989, A100 312, RTX 4090 165, RTX 3060 25.6 with fp32
# accumulation), what a large matmul reaches; the record says "simulated".
SIMULATED_GPUS: list[list[dict[str, Any]]] = [
    [{"name": "NVIDIA H100 80GB HBM3", "memory_gb": 80, "compute_capability": "9.0",
      "tflops": 700}],
    [{"name": "NVIDIA GeForce RTX 4090", "memory_gb": 24, "compute_capability": "8.9",
      "tflops": 115}],
    [],
    [{"name": "NVIDIA A100-SXM4-40GB", "memory_gb": 40, "compute_capability": "8.0",
      "tflops": 220}] * 2,
    [{"name": "NVIDIA GeForce RTX 3060", "memory_gb": 12, "compute_capability": "8.6",
      "tflops": 18}],
]


class TestnetError(Exception):
    __test__ = False  # not a pytest class


def _toml_gpus(gpus: list[dict[str, Any]]) -> str:
    items = ", ".join(
        f'{{name = "{g["name"]}", memory_gb = {g["memory_gb"]}, '
        f'compute_capability = "{g["compute_capability"]}", tflops = {g["tflops"]}}}'
        for g in gpus)
    return f"[{items}]"


def _node_config(fake_gpus: list[dict[str, Any]] | None, name: str = "") -> str:
    text = DEFAULT_CONFIG_TOML.replace('name = ""', f'name = "{name}"')
    text = text.replace('listen = ["/ip4/0.0.0.0/tcp/4001"]',
                                       f'listen = ["{LOCAL_LISTEN}"]')
    text = text.replace("port = 7780", "port = 0")
    text = text.replace("bench_seconds = 0.5", "bench_seconds = 0.2")
    if fake_gpus:
        text = text.replace("fake_gpus = []", f"fake_gpus = {_toml_gpus(fake_gpus)}")
    return text


def _iollm(*args: str) -> list[str]:
    return [sys.executable, "-m", "node.cli", *args]


def _alive(pid: int) -> bool:
    # A node started by this very process (testnet_up then testnet_down in one program,
    # as bench/transfer.py does) stays a zombie until reaped, and kill(pid, 0) succeeds
    # on a zombie: reap it first.
    try:
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    except ChildProcessError:  # not a child of ours: the init process reaps it
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _log_tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _start(name: str, home: Path, bootstrap: str | None, genesis: Path
           ) -> subprocess.Popen[bytes]:
    cmd = _iollm("node", "start", "--home", str(home), "--genesis", str(genesis))
    if bootstrap:
        cmd += ["--bootstrap", bootstrap]
    log = open(home / "daemon.log", "ab")  # noqa: SIM115 - handed to the child process
    try:
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    finally:
        log.close()


def _wait_ready(proc: subprocess.Popen[bytes], home: Path, deadline: float) -> dict[str, Any]:
    runtime = home / RUNTIME_FILE
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise TestnetError(f"node in {home} exited with code {proc.returncode}:\n"
                               f"{_log_tail(home / 'daemon.log')}")
        if runtime.exists():
            try:
                info = json.loads(runtime.read_text())
                if info.get("pid") == proc.pid:
                    return dict(info)
            except ValueError:
                pass  # being written
        time.sleep(0.1)  # polling a file another process writes; bounded by the deadline
    raise TestnetError(f"node in {home} not ready in time:\n{_log_tail(home / 'daemon.log')}")


def write_genesis(directory: Path, homes: list[Path], validators: int,
                  overrides: dict[str, Any] | None = None) -> Path:
    """The testnet's genesis: the first ``validators`` homes' keys as validators, equal
    power. A directory that has one keeps it (its nodes' blocks are of that chain)."""
    from node.identity import load_key
    from protocol.genesis import make_genesis, parse_genesis
    from protocol.peerid import peer_id_from_public_key

    path = directory / GENESIS_FILE
    peers = [peer_id_from_public_key(bytes(load_key(h).verify_key)) for h in homes]
    if path.exists():
        kept = parse_genesis(path.read_text(encoding="utf-8"))
        if set(kept.powers) <= set(peers):
            return path
        raise TestnetError(f"{path} names validators this testnet does not have; remove "
                           f"{directory} to start a new chain")
    genesis = make_genesis(TESTNET_CHAIN_ID, peers[:validators], int(time.time() * 1000),
                           **{"block_interval_ms": TESTNET_BLOCK_INTERVAL_MS,
                              **(overrides or {})})
    path.write_text(genesis.to_toml(), encoding="utf-8")
    return path


def _progress(started: float, msg: str) -> None:
    """One progress line on stderr: `up` takes tens of seconds, and stdout is its result."""
    print(f"[{time.monotonic() - started:5.1f} s] {msg}", file=sys.stderr, flush=True)


def testnet_up(directory: Path, nodes: int, *, simulate_gpus: bool = False,
               timeout: float = 120.0, validators: int | None = None,
               genesis_overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    from node.api.client import ApiClientError, api_request, read_token_file

    if not 1 <= nodes <= 64:
        raise TestnetError("--nodes must be between 1 and 64")
    n_validators = min(DEFAULT_VALIDATORS, nodes + 1) if validators is None else validators
    if not 1 <= n_validators <= nodes + 1:
        raise TestnetError(f"--validators must be between 1 and {nodes + 1} (the nodes)")
    state_path = directory / STATE_FILE
    if state_path.exists():
        state = json.loads(state_path.read_text())
        if any(_alive(n["pid"]) for n in state["nodes"]):
            raise TestnetError(f"a testnet is already running in {directory} "
                               f"(iollm testnet down --dir {directory})")
    directory.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    deadline = started + timeout
    names = ["bootstrap"] + [f"node-{i}" for i in range(1, nodes + 1)]
    procs: list[tuple[str, Path, subprocess.Popen[bytes]]] = []
    infos: list[dict[str, Any]] = []
    try:
        for name in names:
            home = directory / name
            if not (home / "node.key").exists():
                subprocess.run(_iollm("init", "--home", str(home)), check=True,
                               stdout=subprocess.DEVNULL)
        genesis = write_genesis(directory, [directory / n for n in names], n_validators,
                                genesis_overrides)
        _progress(started, f"{len(names)} node homes and the genesis ready in {directory}")
        for i, name in enumerate(names):
            home = directory / name
            gpus = SIMULATED_GPUS[(i - 1) % len(SIMULATED_GPUS)] if simulate_gpus and i else None
            (home / "config.toml").write_text(_node_config(gpus, name))
            (home / RUNTIME_FILE).unlink(missing_ok=True)
            bootstrap = infos[0]["addrs"][0] if infos else None
            proc = _start(name, home, bootstrap, genesis)
            procs.append((name, home, proc))
            if i == 0:  # the others need the bootstrap node's address
                infos.append(_wait_ready(proc, home, deadline))
                _progress(started, f"bootstrap node listening on {infos[0]['addrs'][0]}; "
                                   f"starting {len(names) - 1} more")
        for name, home, proc in procs[1:]:
            infos.append(_wait_ready(proc, home, deadline))
            _progress(started, f"{name} running ({len(infos)} of {len(names)})")
        state = {"nodes": [{"name": n, "home": str(h.resolve()), "pid": p.pid, **info}
                           for (n, h, p), info in zip(procs, infos, strict=True)]}
        state_path.write_text(json.dumps(state, indent=2) + "\n")

        # Ready means published (every node's record put, gossiped and provided under all
        # its classes once) and discoverable (the bootstrap node's query sees them all).
        for (_, home, _), info in zip(procs, infos, strict=True):
            token = read_token_file(home / TOKEN_FILE)
            while time.monotonic() < deadline:
                try:
                    if api_request(info["api"], token, "GET", "/v1/status",
                                   timeout=30)["published"]:
                        break
                except ApiClientError:
                    pass
                time.sleep(0.2)  # polling another process with a deadline
            else:
                raise TestnetError(f"node in {home} did not publish its record in time")
            _progress(started, f"{home.name} published its capability record")
        boot_home = procs[0][1]
        token = read_token_file(boot_home / TOKEN_FILE)
        seen, shown = 0, -1
        while time.monotonic() < deadline:
            try:
                seen = len(api_request(infos[0]["api"], token, "GET", "/v1/gpus", timeout=30))
            except ApiClientError:
                seen = 0
            if seen == len(names):
                break
            if seen != shown:
                shown = seen
                _progress(started, f"{seen} of {len(names)} records discoverable from the "
                                   f"bootstrap node")
            time.sleep(0.5)  # the nodes publish in the background; poll with a deadline
        else:
            raise TestnetError(f"only {seen} of {len(names)} capability records discoverable "
                               f"after {timeout:.0f} s")
    except BaseException:
        for _, _, proc in procs:
            if proc.poll() is None:
                proc.terminate()
        raise
    _progress(started, f"all {len(names)} records discoverable")
    print(f"testnet up in {directory}: {len(names)} nodes on 127.0.0.1")
    for node in state["nodes"]:
        print(f"  {node['name']:<10} {node['addrs'][0]}")
        print(f"  {'':<10} api {node['api']}  home {node['home']}")
    print(f"chain {TESTNET_CHAIN_ID}: {n_validators} validator(s), genesis {genesis}")
    print(f"query it: iollm gpus --home {directory}/bootstrap")
    return state


def testnet_down(directory: Path, grace: float = 15.0) -> None:
    state_path = directory / STATE_FILE
    try:
        state = json.loads(state_path.read_text())
    except FileNotFoundError:
        raise TestnetError(f"no testnet in {directory} (no {STATE_FILE})") from None
    pids = [n["pid"] for n in state["nodes"] if _alive(n["pid"])]
    for pid in pids:
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.1)
    killed = [p for p in pids if _alive(p)]
    for pid in killed:
        os.kill(pid, signal.SIGKILL)
    state_path.unlink()
    print(f"testnet in {directory} stopped: {len(pids)} node(s)"
          + (f", {len(killed)} killed after {grace:.0f} s" if killed else ""))
