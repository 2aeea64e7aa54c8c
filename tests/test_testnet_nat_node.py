"""A node behind NAT on the namespace testnet (issue 17, item 4): marker ``chaos``, run by
scripts/test.sh after the default suite (so by CI, which runs as root).

    bash scripts/test.sh -m chaos -k testnet_nat_node

``iollm testnet up --hosts --nodes 2 --nat 1``: the bootstrap node and node-1 are public
and offer the relay service; node-2 sits behind a NAT gateway (masquerade, no inbound
connection). node-2 must find out that it is not reachable (AutoNAT), reserve relay slots
and advertise its relayed addresses, be found by ``iollm gpus``, fetch and serve shards,
and train a task of node-1's job; node-1, restarted, must reach it again. The test prints
the relay and DCUtR counters of every node (the hole-punching upgrade rate).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from node.cli.testnet import _start, _wait_ready
from node.config import TOKEN_FILE
from node.testnet.netns import run_in_netns
from tests.netutil import iollm
from tests.test_testnet_chaos import assert_job_done, job_file, nodes_of, publish_base_and_data
from tests.test_testnet_hosts import PREFIX, UNAVAILABLE, api, leftovers, run_op, wait

pytestmark = [pytest.mark.chaos,
              # as test_testnet_hosts.py: as root (CI) a missing piece fails, not skips
              pytest.mark.skipif(bool(UNAVAILABLE) and os.geteuid() != 0,
                                 reason=UNAVAILABLE)]

COUNTERS = ("iollm_reachability", "iollm_relay_reservations", "iollm_relay_dials_total",
            "iollm_dcutr_upgrades_total")


@pytest.fixture
def natnet(tmp_path: Path) -> Iterator[Path]:
    directory = tmp_path / "net"
    prefix = PREFIX + "n"
    up = iollm("testnet", "up", "--hosts", "--prefix", prefix, "--nodes", "2", "--nat", "1",
               "--dir", str(directory), "--timeout", "300", timeout=360, check=False)
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        assert "node-2 behind a NAT" in up.stdout
        yield directory
    finally:
        iollm("testnet", "down", "--dir", str(directory), timeout=120)
        assert leftovers(prefix, directory) == []


def metrics(node: dict[str, Any]) -> dict[str, float]:
    """The node's NAT counters from /metrics, ``name{labels}`` -> value."""
    token = (Path(node["home"]) / TOKEN_FILE).read_text().strip()

    def get() -> str:
        request = urllib.request.Request(node["api"] + "/metrics",
                                         headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(request, timeout=10) as answer:
            return str(answer.read().decode())

    out = {}
    for line in run_in_netns(node["netns"], get).splitlines():
        if line.startswith(COUNTERS):
            key, value = line.rsplit(" ", 1)
            out[key] = float(value)
    return out


def listed(node: dict[str, Any]) -> dict[str, list[str]]:
    records = json.loads(iollm("gpus", "--json", "--home", node["home"]).stdout)
    return {r["peer_id"]: r["addrs"] for r in records}


@pytest.mark.timeout(1500)
def test_a_node_behind_nat_takes_part(natnet: Path, tmp_path: Path) -> None:
    directory = natnet
    nodes = {n["name"]: n for n in nodes_of(directory)}
    boot, one, behind = nodes["bootstrap"], nodes["node-1"], nodes["node-2"]
    assert behind["addrs"][0].startswith("/ip4/198.19.0.")  # its own, behind the NAT

    # AutoNAT: private; relay slots on both public nodes; the record carries them.
    took = wait(lambda: metrics(behind).get("iollm_reachability") == 2.0
                and metrics(behind).get("iollm_relay_reservations", 0) >= 1, 120,
                "node-2 private with a relay slot")
    print(f"\nnode-2 private and relayed {took:.1f} s after the testnet was up")
    for public in (boot, one):
        assert metrics(public).get("iollm_reachability") == 1.0
    wait(lambda: all("/p2p-circuit/" in a for a in listed(one).get(behind["peer_id"], ["-"])),
         60, "node-2's relayed addresses in node-1's answer")

    # node-2 serves shards: node-1 fetches what node-2 published, byte for byte.
    blob = tmp_path / "blob.bin"
    blob.write_bytes(os.urandom(6 * 2**20))
    version = run_op(behind, "/v1/models/publish",
                     {"path": str(blob), "kind": "dataset", "name": "natblob"}, 120)["version"]
    got = tmp_path / "got"
    run_op(one, "/v1/models/fetch", {"version": version, "out": str(got)}, 300)
    fetched = b"".join(p.read_bytes() for p in sorted(got.rglob("*")) if p.is_file())
    assert hashlib.sha256(fetched).digest() == hashlib.sha256(blob.read_bytes()).digest()

    # node-2 fetches shards (the base model and the dataset) and trains a task.
    base, data = publish_base_and_data(one["home"])
    job = job_file(tmp_path / "job.toml", base, data, 1, 300)
    submitted = iollm("job", "submit", str(job), "--wait", "--home", one["home"], timeout=1200)
    assert_job_done(submitted.stderr)
    jobs = api(one, "/v1/jobs")
    status = api(one, f"/v1/jobs/status?id={jobs[0]['job']}")
    workers = {t["worker"] for r in status["rounds"] for t in r["tasks"]
               if t["verdict"] == "accepted"}
    assert behind["peer_id"] in workers, status["rounds"]

    # Reachable: node-1 restarted has no connection to node-2; it fetches what only node-2
    # holds (through a relay, unless node-2 dialed it first).
    second = tmp_path / "second.bin"
    second.write_bytes(os.urandom(2 * 2**20))
    only_behind = run_op(behind, "/v1/models/publish",
                         {"path": str(second), "kind": "dataset", "name": "natblob2"},
                         120)["version"]
    before = metrics(one)
    os.kill(one["pid"], 15)
    wait(lambda: subprocess.run(["kill", "-0", str(one["pid"])], capture_output=True)
         .returncode != 0, 60, "node-1 stopped")
    genesis = directory / "genesis.toml"
    proc = _start("node-1", Path(one["home"]), boot["addrs"][0], genesis, one["netns"])
    try:
        info = _wait_ready(proc, Path(one["home"]), time.monotonic() + 120)
        restarted = {**one, **info}
        start = time.monotonic()
        again = run_op(restarted, "/v1/models/fetch", {"version": only_behind}, 300)
        print(f"node-1 restarted fetched from node-2 in {time.monotonic() - start:.1f} s: "
              f"{again}")
        after = {name: metrics(n) for name, n in
                 (("bootstrap", boot), ("node-1", restarted), ("node-2", behind))}
        print(f"node-1 before the restart: {before}")
        for name, counters in after.items():
            print(f"{name}: {counters}")
    finally:
        proc.terminate()
        proc.wait(timeout=30)
