"""``iollm``: the command line. Thin: each command parses, calls one function, prints.

Commands that talk to a running node read its API address from ``<home>/node.json``
(written by the daemon when ready) and the bearer token from ``<home>/api.token``.
Errors the user can fix print one line and exit non-zero; tracebacks are for bugs.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from node import __version__
from node.cli.common import CliError, call_node, home_of, int_arg, named, nonnegative
from node.config import (
    CONFIG_FILE,
    DEFAULT_CONFIG_TOML,
    TOKEN_FILE,
    ConfigError,
    load_config,
)

EXIT_USAGE = 2


# -- init ----------------------------------------------------------------------------------


def cmd_init(args: argparse.Namespace) -> int:
    from node.api.server import generate_token, write_token_file
    from node.identity import IdentityError, create_key, peer_id_of

    home = home_of(args)
    home.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        key = create_key(home, force=args.force)
    except IdentityError as exc:
        raise CliError(str(exc)) from None
    config_path = home / CONFIG_FILE
    if not config_path.exists() or args.force:
        config_path.write_text(DEFAULT_CONFIG_TOML)
    token_path = home / TOKEN_FILE
    if args.force:
        token_path.unlink(missing_ok=True)
    if not token_path.exists():
        write_token_file(token_path, generate_token())
    print(f"initialised node home {home}")
    print(f"peer id: {peer_id_of(key)}")
    return 0


# -- node start ----------------------------------------------------------------------------


def cmd_node_start(args: argparse.Namespace) -> int:
    import trio

    from node.daemon import StartOptions, run_daemon

    home = home_of(args)
    config = load_config(home)
    options = StartOptions(listen=args.listen or None, bootstrap=args.bootstrap or None,
                           api_port=args.api_port,
                           genesis=Path(args.genesis).expanduser() if args.genesis else None)
    try:
        trio.run(run_daemon, home, config, options)
    except KeyboardInterrupt:
        logging.getLogger("node").info("interrupted during start-up")
        return 130
    except Exception as exc:
        raise CliError(fatal_reason(exc)) from None
    return 0


def fatal_reason(exc: BaseException) -> str:
    """One line saying why the daemon stopped.

    The services run in one nursery tree, so an error arrives wrapped in exception groups;
    the first leaf that is not a cancellation is the cause. Errors the user can act on
    (a bad key, address, genesis; a port in use; the home's disk failing) are stated as
    they are. Anything else is a bug: its traceback goes to the log first, then this line.
    """
    import sqlite3

    from node.chain.service import ChainError
    from node.homelock import HomeLocked
    from node.identity import IdentityError
    from node.ml.probe import ProbeError
    from node.p2p.host import BadMultiaddr, ListenError

    cause = _first_cause(exc)
    if isinstance(cause, ListenError):
        return cause.strerror or str(cause)
    if isinstance(cause, IdentityError | BadMultiaddr | ProbeError | ChainError | ConfigError
                  | HomeLocked):
        return str(cause)
    if isinstance(cause, OSError):
        return f"the node stopped: {cause}"
    if isinstance(cause, sqlite3.Error):
        return f"the node stopped: its state database failed: {cause}"
    logging.getLogger("node").error("the node stopped on an unexpected error", exc_info=cause)
    return (f"the node stopped on an unexpected error: {type(cause).__name__}: {cause} "
            f"(traceback in the log above; please report it)")


def _first_cause(exc: BaseException) -> BaseException:
    if isinstance(exc, BaseExceptionGroup):
        import trio

        leaves = [_first_cause(e) for e in exc.exceptions]
        return next((e for e in leaves if not isinstance(e, trio.Cancelled)), leaves[0])
    return exc


# -- commands that talk to a running node ---------------------------------------------------


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"


def _describe(record: dict[str, Any]) -> str:
    env = record["env"]
    gpus = env.get("gpus") or []
    if gpus:
        names: dict[str, int] = {}
        for g in gpus:
            label = f"{g['name']} ({_gib(g['total_memory_bytes'])})"
            names[label] = names.get(label, 0) + 1
        hw = ", ".join(f"{n}x {label}" for label, n in names.items())
    else:
        hw = "CPU only"
    # A testnet's simulated GPUs (config [probe] fake_gpus) say so, figure included.
    sim = " (simulated)" if env.get("tflops_device") == "simulated" else ""
    return (f"{hw}{sim}; {env['tflops']:.3g} TFLOP/s {env['tflops_dtype']}{sim}; "
            f"{env['cpu_cores']} cores, {_gib(env['ram_bytes'])} RAM")


def cmd_peers(args: argparse.Namespace) -> int:
    peers = call_node(args, "/v1/peers")
    if args.json:
        print(json.dumps(peers, indent=2))
        return 0
    if not peers:
        print("no connected peers")
    for p in peers:
        cap = p["capability"]
        print(f"{p['peer_id']}  {named(cap)}"
              f"{_describe(cap) if cap else '(no valid capability record)'}")
    return 0


def cmd_gpus(args: argparse.Namespace) -> int:
    query = []
    if args.min_vram is not None:
        query.append(f"min_vram={args.min_vram}")
    if args.min_tflops is not None:
        query.append(f"min_tflops={args.min_tflops}")
    records = call_node(args, "/v1/gpus" + ("?" + "&".join(query) if query else ""))
    if args.json:
        print(json.dumps(records, indent=2))
        return 0
    print(f"{len(records)} node(s) match")
    for r in records:
        print(f"{r['peer_id']}  {named(r)}{_describe(r)}")
    return 0


def cmd_env(args: argparse.Namespace) -> int:
    from node.ml.probe import env_to_json, format_env, probe_environment

    home = home_of(args)
    report = probe_environment(home if home.exists() else Path.cwd(),
                               bench_seconds=args.bench_seconds)
    print(json.dumps(env_to_json(report), indent=2) if args.json else format_env(report))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    status = call_node(args, "/v1/status")
    if args.json:
        print(json.dumps(status, indent=2))
        return 0
    print(f"peer id:          {status['peer_id']}")
    print(f"software:         {status['software']}")
    print(f"uptime:           {status['uptime_s']:.0f} s")
    print(f"connected peers:  {status['connected_peers']}")
    print(f"routing table:    {status['routing_table_size']} peers")
    for a in status["addrs"]:
        print(f"listening:        {a}")
    print(f"protocols:        {' '.join(status['protocols'])}")
    banned = status["banned_peers"]
    print(f"banned peers:     {len(banned)}" + "".join(f"\n  {p}" for p in banned))
    return 0


# -- testnet ---------------------------------------------------------------------------------


def cmd_testnet_up(args: argparse.Namespace) -> int:
    from node.cli.testnet import TestnetError, hosts_options, testnet_up

    try:
        testnet_up(Path(args.dir), args.nodes, simulate_gpus=args.simulate_gpus,
                   timeout=args.timeout, validators=args.validators,
                   **hosts_options(args))
    except TestnetError as exc:
        raise CliError(str(exc)) from None
    return 0


def cmd_testnet_down(args: argparse.Namespace) -> int:
    from node.cli.testnet import TestnetError, testnet_down

    try:
        testnet_down(Path(args.dir), prefix=args.prefix)
    except TestnetError as exc:
        raise CliError(str(exc)) from None
    return 0


# -- parser ----------------------------------------------------------------------------------


_tcp_port = int_arg(0, 65535, "a TCP port (0-65535)")


def build_parser() -> argparse.ArgumentParser:
    home = argparse.ArgumentParser(add_help=False)
    home.add_argument("--home", metavar="DIR",
                      help="node home (default: $IOLLM_HOME or ~/.iollm)")
    client = argparse.ArgumentParser(add_help=False, parents=[home])
    client.add_argument("--json", action="store_true", help="print JSON")
    client.add_argument("--timeout", type=float, default=60.0, metavar="S",
                        help="seconds to wait for the node's answer (default 60)")

    parser = argparse.ArgumentParser(
        prog="iollm",
        description="iollm: a peer-to-peer network for training and sharing LLMs.",
        epilog="Start with `iollm init`, then `iollm node start`; or try a local "
               "testnet: `iollm testnet up --nodes 3`.",
    )
    parser.add_argument("--version", action="version", version=f"iollm {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("init", parents=[home], help="create a node home: key, config, token",
                       description="Create the node home: an Ed25519 identity (mode 0600), "
                                   "config.toml with documented defaults and an API token.")
    p.add_argument("--force", action="store_true",
                   help="replace an existing identity, config and token")
    p.set_defaults(func=cmd_init)

    node = sub.add_parser("node", help="run the node daemon")
    node_sub = node.add_subparsers(dest="node_command", metavar="ACTION", required=True)
    p = node_sub.add_parser(
        "start", parents=[home], help="run the daemon in the foreground",
        description="Run the node: libp2p host (TCP+Noise+Yamux), Kademlia DHT, gossipsub, "
                    "capability records and the local API. Stop with Ctrl-C or SIGTERM.")
    p.add_argument("--listen", action="append", metavar="MULTIADDR",
                   help="listen address, e.g. /ip4/0.0.0.0/tcp/4001 (repeatable; "
                        "replaces node.listen from config.toml)")
    p.add_argument("--bootstrap", action="append", metavar="MULTIADDR",
                   help="bootstrap peer /ip4/.../tcp/N/p2p/<id> (repeatable; added to "
                        "node.bootstrap from config.toml)")
    p.add_argument("--api-port", type=_tcp_port, metavar="N",
                   help="port of the local API on 127.0.0.1 (0 = any free port)")
    p.add_argument("--genesis", metavar="FILE",
                   help="join the chain this genesis file defines (kept in the home, so "
                        "later starts need no flag); see bootstrap/genesis.example.toml")
    p.set_defaults(func=cmd_node_start)

    p = sub.add_parser("status", parents=[client], help="this node's id, addresses, peers")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("env", parents=[home], help="probe this machine (OS, GPUs, TFLOP/s)",
                       description="Report OS, Python, torch and CUDA versions, each GPU, "
                                   "CPU cores, RAM, free disk and a short matmul benchmark.")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--bench-seconds", type=nonnegative, default=0.5, metavar="S",
                   help="length of the matmul benchmark (default 0.5)")
    p.set_defaults(func=cmd_env)

    p = sub.add_parser("peers", parents=[client],
                       help="connected peers with their capability")
    p.set_defaults(func=cmd_peers)

    p = sub.add_parser("gpus", parents=[client], help="GPUs the network offers",
                       description="Query the DHT for nodes meeting the filters; only "
                                   "verified, unexpired records; most capable first.")
    p.add_argument("--min-vram", type=nonnegative, metavar="GB",
                   help="at least this much memory on one GPU (GiB)")
    p.add_argument("--min-tflops", type=nonnegative, metavar="X",
                   help="at least this measured matmul throughput (TFLOP/s)")
    p.set_defaults(func=cmd_gpus)

    from node.cli.jobs import add_job_commands
    from node.cli.models import add_model_commands

    add_job_commands(sub, client, add_model_commands(sub, client))
    from node.cli.ledger import add_ledger_commands

    add_ledger_commands(sub, home, client)
    from node.cli.dashboard import add_dashboard_command

    add_dashboard_command(sub, client)
    from node.cli.agent import add_agent_commands

    add_agent_commands(sub, client)

    testnet = sub.add_parser("testnet", help="a local testnet of node processes on 127.0.0.1")
    t_sub = testnet.add_subparsers(dest="testnet_command", metavar="ACTION", required=True)
    p = t_sub.add_parser("up", help="start a bootstrap node and N nodes",
                         description="Start a bootstrap node and N nodes as background "
                                     "processes on 127.0.0.1, each with its own home under "
                                     "DIR; wait until every record is discoverable.")
    p.add_argument("--nodes", type=int, default=3, metavar="N", help="nodes besides the "
                   "bootstrap node (default 3)")
    p.add_argument("--dir", default="testnet", metavar="DIR",
                   help="testnet directory (default ./testnet)")
    p.add_argument("--simulate-gpus", action="store_true",
                   help="give the nodes simulated GPUs of various sizes (demo only)")
    p.add_argument("--validators", type=int, metavar="N",
                   help="how many of the nodes (bootstrap first) validate the chain "
                        "(default: 4, or all if fewer)")
    p.add_argument("--timeout", type=float, default=120.0, metavar="S",
                   help="seconds to wait for the testnet to be ready (default 120)")
    p.set_defaults(func=cmd_testnet_up)
    from node.cli.compose import add_testnet_init

    add_testnet_init(t_sub)
    p = t_sub.add_parser("down", help="stop the testnet's processes")
    p.add_argument("--dir", default="testnet", metavar="DIR",
                   help="testnet directory (default ./testnet)")
    p.set_defaults(func=cmd_testnet_down)
    from node.cli.testnet import add_hosts_commands

    add_hosts_commands(t_sub, t_sub.choices["up"], p)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for noisy in ("libp2p", "multiaddr", "asyncio", "aiosqlite"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if args.verbose else logging.ERROR)
    try:
        return int(args.func(args) or 0)
    except (CliError, ConfigError) as exc:
        print(f"iollm: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
