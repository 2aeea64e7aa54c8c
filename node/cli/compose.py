"""``iollm testnet init``: the homes and genesis of a testnet whose nodes run elsewhere,
one per container (docker-compose.yml) or machine.

It makes what ``testnet up`` makes before it starts anything, for nodes that listen on
``0.0.0.0:PORT`` of their own host: a bootstrap node and N nodes (``bootstrap``,
``node-1``, ...), each home with its key, API token and a config naming the node and
pointing at ``DIR/bootstrap.txt`` (the bootstrap node's address on its host); one genesis
whose validators are the first four (bootstrap first), as ``testnet up`` does. A
directory that has a genesis is left as it is, so a restarted compose project keeps its
chain.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from node.cli.common import CliError, int_arg
from node.cli.testnet import DEFAULT_VALIDATORS, GENESIS_FILE, write_genesis
from node.config import CONFIG_FILE, DEFAULT_CONFIG_TOML, TOKEN_FILE

BOOTSTRAP_FILE = "bootstrap.txt"


def node_config(name: str, port: int, bootstrap_file: Path | None) -> str:
    """A node's config.toml: its name, every interface on ``port``, the bootstrap file."""
    text = DEFAULT_CONFIG_TOML.replace('name = ""', f'name = "{name}"')
    text = text.replace('listen = ["/ip4/0.0.0.0/tcp/4001"]',
                        f'listen = ["/ip4/0.0.0.0/tcp/{port}"]')
    if bootstrap_file is not None:
        text = text.replace('bootstrap_file = ""', f'bootstrap_file = "{bootstrap_file}"')
    return text


def testnet_init(directory: Path, nodes: int, bootstrap_ip: str, port: int,
                 validators: int = DEFAULT_VALIDATORS) -> bool:
    """Write the testnet into ``directory``; False (nothing written) when it has one."""
    from node.api.server import generate_token, write_token_file
    from node.identity import create_key, peer_id_of

    if (directory / GENESIS_FILE).exists():
        return False
    names = ["bootstrap"] + [f"node-{i}" for i in range(1, nodes + 1)]
    bootstrap_file = directory / BOOTSTRAP_FILE
    directory.mkdir(parents=True, exist_ok=True)
    for name in names:
        home = directory / name
        home.mkdir(exist_ok=True, mode=0o700)
        key = create_key(home, force=True)
        (home / CONFIG_FILE).write_text(
            node_config(name, port, None if name == "bootstrap" else bootstrap_file))
        write_token_file(home / TOKEN_FILE, generate_token())
        if name == "bootstrap":
            bootstrap_file.write_text(f"/ip4/{bootstrap_ip}/tcp/{port}/p2p/{peer_id_of(key)}\n")
    write_genesis(directory, [directory / n for n in names], min(validators, len(names)))
    return True


def cmd_testnet_init(args: argparse.Namespace) -> int:
    import ipaddress

    try:
        ipaddress.IPv4Address(args.bootstrap_ip)
    except ValueError:
        raise CliError(f"--bootstrap-ip: {args.bootstrap_ip!r} is not an IPv4 address") from None
    directory = Path(args.dir)
    if testnet_init(directory, args.nodes, args.bootstrap_ip, args.port):
        print(f"testnet written to {directory}: bootstrap and {args.nodes} node homes, "
              f"{directory / GENESIS_FILE}, {directory / BOOTSTRAP_FILE}")
    else:
        print(f"{directory} already holds a testnet ({GENESIS_FILE}); left as it is")
    return 0


_nodes = int_arg(1, 64, "a number of nodes in 1..64")
_port = int_arg(1, 65535, "a TCP port (1-65535)")


def add_testnet_init(actions: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = actions.add_parser(
        "init", help="write the homes and genesis of a testnet for containers or machines",
        description="Write a bootstrap node's and N nodes' homes (key, token, config with "
                    "the node's name and DIR/bootstrap.txt), and one genesis whose "
                    "validators are the first four, into DIR; each node then runs "
                    "`iollm node start --home DIR/NAME --genesis DIR/genesis.toml` on its "
                    "own host (docker-compose.yml does). A DIR with a genesis is kept.")
    p.add_argument("--dir", required=True, metavar="DIR", help="where to write the testnet")
    p.add_argument("--nodes", type=_nodes, default=3, metavar="N",
                   help="nodes besides the bootstrap node (default 3)")
    p.add_argument("--bootstrap-ip", required=True, metavar="IP",
                   help="the bootstrap node's IPv4 address as the other nodes reach it")
    p.add_argument("--port", type=_port, default=4001, metavar="N",
                   help="the TCP port every node listens on, on its own host (default 4001)")
    p.set_defaults(func=cmd_testnet_init)
