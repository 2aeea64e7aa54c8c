"""docker-compose.yml and the Dockerfile, checked without a Docker engine (none runs
where the tests do): the YAML's shape, every command in it parsed by the iollm CLI's own
parser, the image installed by the same steps as a checkout, and the init service's
command run for real into a temporary directory."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from node.cli.app import build_parser
from node.config import load_config, read_bootstrap_file
from protocol.genesis import parse_genesis

ROOT = Path(__file__).resolve().parent.parent


def compose() -> dict[str, Any]:
    data = yaml.safe_load((ROOT / "docker-compose.yml").read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def iollm_argv(command: list[str]) -> list[str]:
    assert command[0] == "iollm", command
    return command[1:]


def test_every_service_command_and_health_check_parses() -> None:
    services = compose()["services"]
    parser = build_parser()
    assert {"init", "bootstrap", "node-1", "node-2", "node-3", "node-4"} <= set(services)
    for name, svc in services.items():
        args = parser.parse_args(iollm_argv(svc["command"]))
        if name == "init":
            assert args.func.__name__ == "cmd_testnet_init"
            continue
        assert args.func.__name__ == "cmd_node_start"
        assert args.home == f"/iollm/{name}" and args.genesis == "/iollm/genesis.toml"
        health = svc["healthcheck"]["test"]
        assert health[0] == "CMD"
        status = parser.parse_args(iollm_argv(health[1:]))
        assert status.func.__name__ == "cmd_status" and status.home == args.home
        assert svc["depends_on"]["init"]["condition"] == "service_completed_successfully"
        assert svc["volumes"] == ["homes:/iollm"]


def test_topology_bootstrap_address_and_gpu_profile() -> None:
    data = compose()
    services = data["services"]
    init = build_parser().parse_args(iollm_argv(services["init"]["command"]))
    # The bootstrap node's fixed address is the one init writes into bootstrap.txt.
    fixed = services["bootstrap"]["networks"]["iollm"]["ipv4_address"]
    assert init.bootstrap_ip == fixed
    subnet = data["networks"]["iollm"]["ipam"]["config"][0]["subnet"]
    assert fixed.rsplit(".", 1)[0] == subnet.split("/")[0].rsplit(".", 1)[0]
    # Only node-4 is in the gpu profile, on the CUDA image, reserving NVIDIA devices;
    # the others run without a profile, on the CPU image.
    gpu = services["node-4"]
    assert gpu["profiles"] == ["gpu"] and gpu["image"] == "iollm:cuda"
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    assert "cuda" in gpu["build"]["args"]["BASE_IMAGE"]
    assert "/cu" in gpu["build"]["args"]["TORCH_INDEX"]
    for name in ("bootstrap", "node-1", "node-2", "node-3"):
        assert "profiles" not in services[name] and services[name]["image"] == "iollm:latest"
    assert init.nodes == 4  # node-4's home exists whether or not the profile runs


def test_the_image_installs_as_a_checkout_does() -> None:
    docker = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    runs = " ".join(re.findall(r"^RUN ((?:[^\n]*\\\n)*[^\n]*)", docker, re.M))
    # The install is scripts/setup.sh itself (torch 2.13.0 first, then the project).
    assert re.search(r"\bbash scripts/setup\.sh\b", runs)
    assert "pip install" not in runs  # no second way to install
    # The system packages are the README's.
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    (apt,) = re.findall(r"a bare image needs `apt-get install ([\w\- ]+)`", readme)
    assert set(apt.split()) <= set(runs.split())
    assert re.search(r"^ARG BASE_IMAGE=python:3\.1[1-9]", docker, re.M)
    assert "ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu" in docker
    # What the image copies is what setup.sh installs from.
    for needed in ("pyproject.toml", "protocol", "node", "scripts"):
        assert re.search(rf"^COPY .*\b{needed}\b", docker, re.M), needed


@pytest.mark.timeout(60)
def test_the_init_service_writes_the_testnet(tmp_path: Path) -> None:
    command = iollm_argv(compose()["services"]["init"]["command"])
    command[command.index("--dir") + 1] = str(tmp_path / "iollm")
    run = subprocess.run([sys.executable, "-m", "node.cli", *command], capture_output=True,
                         text=True, timeout=50)
    assert run.returncode == 0, run.stderr
    root = tmp_path / "iollm"
    names = ["bootstrap", "node-1", "node-2", "node-3", "node-4"]
    genesis = parse_genesis((root / "genesis.toml").read_text(encoding="utf-8"))
    peers = {}
    for name in names:
        config = load_config(root / name)
        assert config.node.name == name and config.node.listen == ["/ip4/0.0.0.0/tcp/4001"]
        peers[name] = (root / name / "node.key").exists() and load_peer(root / name)
    # Four validators of equal power: the bootstrap node and node-1..3.
    assert set(genesis.powers) == {peers[n] for n in names[:4]}
    (addr,) = read_bootstrap_file(root / "bootstrap.txt")
    assert addr == f"/ip4/172.28.0.10/tcp/4001/p2p/{peers['bootstrap']}"
    assert load_config(root / "node-2").node.bootstrap_file == str(root / "bootstrap.txt")
    # A second run (a restarted project) keeps the chain.
    again = subprocess.run([sys.executable, "-m", "node.cli", *command], capture_output=True,
                           text=True, timeout=50)
    assert "left as it is" in again.stdout
    assert parse_genesis((root / "genesis.toml").read_text(encoding="utf-8")) == genesis
    bad = subprocess.run([sys.executable, "-m", "node.cli", "testnet", "init", "--dir",
                          str(tmp_path / "x"), "--bootstrap-ip", "bootstrap"],
                         capture_output=True, text=True, timeout=50)
    assert bad.returncode == 1 and "is not an IPv4 address" in bad.stderr


def load_peer(home: Path) -> str:
    from node.identity import load_key, peer_id_of

    return peer_id_of(load_key(home))
