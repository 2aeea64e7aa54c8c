"""``iollm testnet up|down``: a bootstrap node and N nodes as processes on 127.0.0.1.

Each node gets its own home under the testnet directory, a config that listens on
127.0.0.1 only (port 0, so parallel testnets never collide) and a log file. The first
nodes (four by default) are the validators of a fresh chain whose genesis ``up`` writes
to ``DIR/genesis.toml``; every node is started with ``--genesis`` naming it. ``up`` returns
once every node is running and the bootstrap node's DHT query sees every capability
record; the processes run in their own session, so they outlive the command.
``testnet.json`` lists them for ``down``.

With ``hosts`` (``--hosts``) each node runs in a network namespace of its own, with its
own address of 198.18.0.0/15 and a link that can be shaped (node/testnet); ``down`` then
also removes every namespace of the testnet's prefix and its relay.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from node.config import DEFAULT_CONFIG_TOML, RUNTIME_FILE, TOKEN_FILE
from node.testnet.links import LinkShape
from node.testnet.netns import pid_alive

STATE_FILE = "testnet.json"
GENESIS_FILE = "genesis.toml"
TESTNET_CHAIN_ID = "iollm-testnet"
TESTNET_BLOCK_INTERVAL_MS = 1000
DEFAULT_VALIDATORS = 4  # the first nodes (bootstrap first) validate: 3f+1 with f = 1
LOCAL_LISTEN = "/ip4/127.0.0.1/tcp/0"
NAT_GATEWAY = "natgw"  # the host the --nat nodes sit behind (it runs no node)
HOST_PORT = 4001  # each host has an address of its own, so one port for all
DEFAULT_PREFIX = "iollm"

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


def _node_config(fake_gpus: list[dict[str, Any]] | None, name: str = "",
                 listen: str = LOCAL_LISTEN, relay_service: bool = False) -> str:
    text = DEFAULT_CONFIG_TOML.replace('name = ""', f'name = "{name}"')
    text = text.replace('listen = ["/ip4/0.0.0.0/tcp/4001"]', f'listen = ["{listen}"]')
    if relay_service:  # --nat: the public nodes relay for those behind the NAT
        text = text.replace("service = false", "service = true")
    text = text.replace("port = 7780", "port = 0")
    text = text.replace("bench_seconds = 0.5", "bench_seconds = 0.2")
    if fake_gpus:
        text = text.replace("fake_gpus = []", f"fake_gpus = {_toml_gpus(fake_gpus)}")
    return text


def _iollm(*args: str) -> list[str]:
    return [sys.executable, "-m", "node.cli", *args]


def log_tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _start(name: str, home: Path, bootstrap: str | None, genesis: Path,
           netns: str | None = None) -> subprocess.Popen[bytes]:
    cmd = _iollm("node", "start", "--home", str(home), "--genesis", str(genesis))
    if bootstrap:
        cmd += ["--bootstrap", bootstrap]
    env = None
    if netns:
        from node.testnet.netns import netns_argv

        cmd = netns_argv(netns, cmd)
        env = {**os.environ, "IOLLM_NETNS": netns}
    log = open(home / "daemon.log", "ab")  # noqa: SIM115 - handed to the child process
    try:
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    finally:
        log.close()


def _wait_ready(proc: subprocess.Popen[bytes], home: Path, deadline: float) -> dict[str, Any]:
    runtime = home / RUNTIME_FILE
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise TestnetError(f"node in {home} exited with code {proc.returncode}:\n"
                               f"{log_tail(home / 'daemon.log')}")
        if runtime.exists():
            try:
                info = json.loads(runtime.read_text())
                if info.get("pid") == proc.pid:
                    return dict(info)
            except ValueError:
                pass  # being written
        time.sleep(0.1)  # polling a file another process writes; bounded by the deadline
    raise TestnetError(f"node in {home} not ready in time:\n{log_tail(home / 'daemon.log')}")


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


def node_api(node: dict[str, Any], token: str, method: str, path: str, body: Any = None,
             timeout: float = 30.0) -> Any:
    """``api_request`` to one node of ``testnet.json``, from inside its namespace if it
    runs in one (its API listens on that namespace's 127.0.0.1)."""
    from node.api.client import api_request

    if node.get("netns"):
        from node.testnet.netns import run_in_netns

        return run_in_netns(node["netns"], api_request, node["api"], token, method, path,
                            body, timeout)
    return api_request(node["api"], token, method, path, body, timeout)


def testnet_up(directory: Path, nodes: int, *, simulate_gpus: bool = False,
               timeout: float = 120.0, validators: int | None = None,
               genesis_overrides: dict[str, Any] | None = None, hosts: bool = False,
               prefix: str = DEFAULT_PREFIX, link: LinkShape | None = None,
               nat: int = 0, shapes: dict[str, LinkShape] | None = None) -> dict[str, Any]:
    """``shapes``: per-host links from the start, over ``link`` (which every public host
    gets): a link shaped before the nodes connect is the one their TCP measures; one
    reshaped under a live connection is not at once (see node.testnet.netns.shape)."""
    from node.api.client import ApiClientError, read_token_file

    if not 1 <= nodes <= 64:
        raise TestnetError("--nodes must be between 1 and 64")
    n_validators = min(DEFAULT_VALIDATORS, nodes + 1) if validators is None else validators
    if not 1 <= n_validators <= nodes + 1:
        raise TestnetError(f"--validators must be between 1 and {nodes + 1} (the nodes)")
    state_path = directory / STATE_FILE
    if state_path.exists():
        state = json.loads(state_path.read_text())
        if any(pid_alive(n["pid"]) for n in state["nodes"]):
            raise TestnetError(f"a testnet is already running in {directory} "
                               f"(iollm testnet down --dir {directory})")
    directory.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    deadline = started + timeout
    names = ["bootstrap"] + [f"node-{i}" for i in range(1, nodes + 1)]
    if not 0 <= nat <= nodes - 1 or (nat and not hosts):
        raise TestnetError("--nat N needs --hosts and at most --nodes minus 1 (one node and "
                           "the bootstrap node stay public)")
    behind_nat = names[len(names) - nat:] if nat else []
    if shapes and not hosts:
        raise TestnetError("per-host links need --hosts")
    procs: list[tuple[str, Path, subprocess.Popen[bytes]]] = []
    infos: list[dict[str, Any]] = []
    spaces: dict[str, tuple[str, str]] = {}  # name -> (namespace, address)
    if hosts:
        from node.testnet.netns import NetnsError, create_network

        public = [n for n in names if n not in behind_nat] + ([NAT_GATEWAY] if nat else [])
        initial = {n: link for n in public} if link and link.shaped else {}
        initial.update(shapes or {})
        try:
            net = create_network(directory, prefix, public, initial or None)
        except NetnsError as exc:
            raise TestnetError(str(exc)) from None
        spaces = {h.name: (h.netns, str(h.addr)) for h in net.hosts}
        if nat:
            from node.testnet.nat import add_nat
            from node.testnet.netns import teardown

            try:
                private = add_nat(prefix, net.host(NAT_GATEWAY), behind_nat)
            except NetnsError as exc:
                teardown(prefix, directory)
                raise TestnetError(str(exc)) from None
            spaces.update({h.name: (h.netns, str(h.addr)) for h in private})
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
            netns, addr = spaces.get(name, (None, None))
            listen = f"/ip4/{addr}/tcp/{HOST_PORT}" if addr else LOCAL_LISTEN
            relay_service = bool(nat) and name not in behind_nat
            (home / "config.toml").write_text(_node_config(gpus, name, listen, relay_service))
            (home / RUNTIME_FILE).unlink(missing_ok=True)
            bootstrap = infos[0]["addrs"][0] if infos else None
            proc = _start(name, home, bootstrap, genesis, netns)
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
        if hosts:
            state["prefix"] = prefix
        state_path.write_text(json.dumps(state, indent=2) + "\n")

        # Ready means published (every node's record put, gossiped and provided under all
        # its classes once) and discoverable (the bootstrap node's query sees them all).
        for (_, home, _), info in zip(procs, infos, strict=True):
            token = read_token_file(home / TOKEN_FILE)
            while time.monotonic() < deadline:
                try:
                    if node_api(info, token, "GET", "/v1/status", timeout=30)["published"]:
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
                seen = len(node_api(infos[0], token, "GET", "/v1/gpus", timeout=30))
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
        if hosts:
            from node.testnet.netns import teardown

            teardown(prefix, directory)
        raise
    _progress(started, f"all {len(names)} records discoverable")
    where = (f"in namespaces {prefix}-* on 198.18.0.0/15" + (
        f", links {_describe(link)}" if link and link.shaped else "") + (
        f", {', '.join(behind_nat)} behind a NAT" if nat else "")) if hosts else "on 127.0.0.1"
    print(f"testnet up in {directory}: {len(names)} nodes {where}")
    for node in state["nodes"]:
        print(f"  {node['name']:<10} {node['addrs'][0]}")
        print(f"  {'':<10} api {node['api']}  home {node['home']}")
    print(f"chain {TESTNET_CHAIN_ID}: {n_validators} validator(s), genesis {genesis}")
    print(f"query it: iollm gpus --home {directory}/bootstrap")
    return state


def _describe(link: LinkShape) -> str:
    parts = []
    if link.delay_ms:
        parts.append(f"delay {link.delay_ms:g} ms" + (
            f" +- {link.jitter_ms:g} ms" if link.jitter_ms else ""))
    elif link.jitter_ms:
        parts.append(f"jitter {link.jitter_ms:g} ms")
    if link.loss:
        parts.append(f"loss {link.loss * 100:g}%")
    if link.rate_mbit:
        parts.append(f"{link.rate_mbit:g} Mbit/s")
    return ", ".join(parts) or "unshaped"


def testnet_down(directory: Path, grace: float = 15.0, prefix: str | None = None) -> None:
    """Stop the testnet's nodes; with namespaces (or ``prefix``), remove every namespace
    of its prefix and its relay, also what a killed ``up`` left without a state file."""
    from node.testnet.netns import STATE_FILE as NET_STATE
    from node.testnet.netns import NetnsError, load_state, teardown

    state_path = directory / STATE_FILE
    if prefix is None and (directory / NET_STATE).exists():
        try:
            prefix = load_state(directory).prefix
        except NetnsError:
            prefix = None
    try:
        state = json.loads(state_path.read_text())
    except FileNotFoundError:
        if prefix is None:
            raise TestnetError(f"no testnet in {directory} (no {STATE_FILE}); a namespace "
                               f"testnet's leftovers: iollm testnet down --prefix P") from None
        state = {"nodes": []}
    pids = [n["pid"] for n in state["nodes"] if pid_alive(n["pid"])]
    for pid in pids:
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(pid_alive(p) for p in pids):
        time.sleep(0.1)
    killed = [p for p in pids if pid_alive(p)]
    for pid in killed:
        os.kill(pid, signal.SIGKILL)
    state_path.unlink(missing_ok=True)
    print(f"testnet in {directory} stopped: {len(pids)} node(s)"
          + (f", {len(killed)} killed after {grace:.0f} s" if killed else ""))
    prefix = prefix or state.get("prefix")
    if prefix:
        try:
            gone = teardown(prefix, directory)
        except NetnsError as exc:
            raise TestnetError(str(exc)) from None
        print(f"removed {len(gone.namespaces)} namespace(s) of prefix {prefix}"
              + (f" and {gone.processes} process(es) left in them or relaying"
                 if gone.processes else ""))


# -- the namespace testnet's commands (parser in node/cli/app.py) -----------------------------


def _link_args(parser: argparse.ArgumentParser) -> None:
    from node.cli.common import nonnegative

    parser.add_argument("--delay-ms", type=nonnegative, default=0.0, metavar="MS",
                        help="delay each packet gets on the host's link, each way: between "
                             "two hosts so shaped the round trip is 4x MS (default 0)")
    parser.add_argument("--jitter-ms", type=nonnegative, default=0.0, metavar="MS",
                        help="the delay varies uniformly by +-MS, without reordering")
    parser.add_argument("--loss", type=nonnegative, default=0.0, metavar="PCT",
                        help="percent of packets lost on the link, each way (default 0)")
    parser.add_argument("--rate-mbit", type=nonnegative, default=0.0, metavar="MBIT",
                        help="the link's rate each way in Mbit/s (default: unlimited)")


def link_of(args: argparse.Namespace) -> LinkShape:
    from node.cli.common import CliError

    try:
        return LinkShape(args.delay_ms, args.jitter_ms, args.loss / 100, args.rate_mbit)
    except ValueError:
        raise CliError(f"--loss {args.loss:g}: a percentage below 100") from None


def hosts_options(args: argparse.Namespace) -> dict[str, Any]:
    """``testnet_up``'s keyword arguments for ``--hosts`` and the link options."""
    from node.cli.common import CliError

    link = link_of(args)
    if link.shaped and not args.hosts:
        raise CliError("--delay-ms, --jitter-ms, --loss and --rate-mbit need --hosts")
    return {"hosts": args.hosts, "prefix": args.prefix or DEFAULT_PREFIX, "link": link,
            "nat": args.nat}


def _net_change(args: argparse.Namespace, change: Any, *extra: Any) -> int:
    from node.cli.common import CliError
    from node.testnet.netns import NetnsError

    try:
        change(Path(args.dir), *extra)
    except NetnsError as exc:
        raise CliError(str(exc)) from None
    return 0


def cmd_shape(args: argparse.Namespace) -> int:
    from node.testnet.netns import shape

    link = link_of(args)
    code = _net_change(args, shape, args.host, link)
    print(f"{', '.join(args.host)}: {_describe(link)}")
    return code


def cmd_partition(args: argparse.Namespace) -> int:
    from node.testnet.netns import partition

    groups = [[n for n in g.split(",") if n] for g in args.group]
    code = _net_change(args, partition, groups)
    print("partitioned: " + " | ".join(", ".join(g) for g in groups)
          + " (hosts not named form one more group)")
    return code


def cmd_heal(args: argparse.Namespace) -> int:
    from node.testnet.netns import heal

    code = _net_change(args, heal)
    print("healed: every host reaches every other")
    return code


def add_hosts_commands(t_sub: Any, up: argparse.ArgumentParser,
                       down: argparse.ArgumentParser) -> None:
    up.add_argument("--hosts", action="store_true",
                    help="each node in a network namespace of its own, with an address of "
                         "198.18.0.0/15 and a link that can be shaped (root; Linux)")
    up.add_argument("--prefix", metavar="P", help="namespace names start with P- "
                    f"(default {DEFAULT_PREFIX}; one prefix per testnet on a machine)")
    up.add_argument("--nat", type=int, default=0, metavar="N",
                    help="put the last N nodes behind a NAT (a gateway host that masquerades "
                         "and lets no connection in); the public nodes offer the relay "
                         "service (needs --hosts and iptables)")
    _link_args(up)
    down.add_argument("--prefix", metavar="P", help="also remove every namespace named P-* "
                      "and its processes (default: the testnet's own prefix)")
    dir_help = "testnet directory (default ./testnet)"
    p = t_sub.add_parser("shape", help="shape the links of some hosts (--hosts testnets)",
                         description="Change the links of the named hosts of a running "
                                     "namespace testnet; no option clears the shaping.")
    p.add_argument("host", nargs="+", metavar="HOST", help="host names (bootstrap, node-1, ...)")
    p.add_argument("--dir", default="testnet", metavar="DIR", help=dir_help)
    _link_args(p)
    p.set_defaults(func=cmd_shape)
    p = t_sub.add_parser("partition", help="cut traffic between groups of hosts",
                         description="Cut traffic between groups of hosts of a namespace "
                                     "testnet; hosts in no group form one more group. "
                                     "Example: iollm testnet partition bootstrap,node-1 "
                                     "node-2,node-3")
    p.add_argument("group", nargs="+", metavar="GROUP", help="host names, comma-separated")
    p.add_argument("--dir", default="testnet", metavar="DIR", help=dir_help)
    p.set_defaults(func=cmd_partition)
    p = t_sub.add_parser("heal", help="restore traffic between every pair of hosts")
    p.add_argument("--dir", default="testnet", metavar="DIR", help=dir_help)
    p.set_defaults(func=cmd_heal)
