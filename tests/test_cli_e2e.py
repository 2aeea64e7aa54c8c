"""End to end through the CLI: real daemon processes on 127.0.0.1."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.netutil import iollm
from tests.test_cli_startup import run_probed


def wait_for_file(path: Path, proc: subprocess.Popen[bytes], timeout: float) -> dict:  # type: ignore[type-arg]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"daemon exited with {proc.returncode}"
        if path.exists():
            try:
                return json.loads(path.read_text())
            except ValueError:
                pass
        time.sleep(0.05)  # another process writes it; bounded by the deadline
    raise AssertionError(f"{path} not written within {timeout} s")


def test_testnet_up_gpus_and_auth(tmp_path: Path) -> None:
    net = tmp_path / "net"
    up = iollm("testnet", "up", "--nodes", "3", "--simulate-gpus", "--dir", str(net),
               "--timeout", "150", timeout=200)
    try:
        assert "testnet up" in up.stdout
        # Progress while it comes up (about 30 s on a loaded machine), on stderr.
        for line in ("4 node homes and the genesis ready", "bootstrap node listening on",
                     "node-3 running (4 of 4)", "node-2 published its capability record",
                     "all 4 records discoverable"):
            assert line in up.stderr, up.stderr
        state = json.loads((net / "testnet.json").read_text())
        assert len(state["nodes"]) == 4
        all_ids = {n["peer_id"] for n in state["nodes"]}

        listed = json.loads(iollm("gpus", "--json", "--home", str(net / "node-1")).stdout)
        assert {r["peer_id"] for r in listed} == all_ids
        # Simulated: node-1 H100 80 GB, node-2 RTX 4090 24 GB, node-3 CPU only; bootstrap real.
        big = json.loads(iollm("gpus", "--json", "--min-vram", "24",
                               "--home", str(net / "node-3")).stdout)
        by_name = {n["name"]: n["peer_id"] for n in state["nodes"]}
        assert [r["peer_id"] for r in big] == [by_name["node-1"], by_name["node-2"]]
        human = iollm("gpus", "--min-vram", "40", "--home", str(net / "bootstrap")).stdout
        assert "1 node(s) match" in human and "H100" in human
        # Simulated GPUs say so, and claim a plausible rate: --min-tflops means something.
        assert "(simulated); 700 TFLOP/s bf16 (simulated)" in human, human
        fast = json.loads(iollm("gpus", "--json", "--min-tflops", "100",
                                "--home", str(net / "node-2")).stdout)
        assert [r["peer_id"] for r in fast] == [by_name["node-1"], by_name["node-2"]]

        peers = json.loads(iollm("peers", "--json", "--home", str(net / "bootstrap")).stdout)
        assert {p["peer_id"] for p in peers} == all_ids - {by_name["bootstrap"]}
        # Each node's name ([node] name) travels in its record and is shown by its id.
        assert {p["capability"]["name"] for p in peers} == {"node-1", "node-2", "node-3"}
        table = iollm("peers", "--home", str(net / "bootstrap")).stdout
        assert f"{by_name['node-2']}  node-2  1x NVIDIA GeForce RTX 4090" in table, table
        # Commands that only ask the node load none of the daemon's code (a real node
        # answering, so every formatting path runs).
        for argv in (["status"], ["peers"], ["gpus"], ["ledger", "balance", "--all"],
                     ["model", "list"], ["job", "list"]):
            proc, loaded = run_probed(*argv, "--home", str(net / "node-1"))
            assert proc.returncode == 0 and loaded == [], (argv, loaded, proc.stderr)

        # The probe ran in a child process: no daemon carries torch (~190 MiB resident).
        for n in state["nodes"]:
            assert "libtorch" not in Path(f"/proc/{n['pid']}/maps").read_text(), n["name"]

        api = state["nodes"][0]["api"]
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            req = urllib.request.Request(f"{api}/v1/status", headers=headers)
            with pytest.raises(urllib.error.HTTPError) as err:
                urllib.request.urlopen(req, timeout=10)
            assert err.value.code == 401
        req = urllib.request.Request(f"{api}/metrics", headers={})
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(req, timeout=10)
        assert err.value.code == 401
        token = (net / "bootstrap" / "api.token").read_text().strip()
        req = urllib.request.Request(f"{api}/metrics",
                                     headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            metrics = resp.read().decode()
        assert "iollm_capability_published_total" in metrics
        assert "iollm_connected_peers" in metrics

        bad = iollm("gpus", "--min-vram", "-3", "--home", str(net / "node-1"), check=False)
        assert bad.returncode == 2 and "non-negative" in bad.stderr
        again = iollm("testnet", "up", "--nodes", "1", "--dir", str(net), check=False)
        assert again.returncode == 1 and "already running" in again.stderr
    finally:
        down = iollm("testnet", "down", "--dir", str(net))
    assert "stopped: 4 node(s)" in down.stdout and "killed" not in down.stdout
    for n in state["nodes"]:
        log = (Path(n["home"]) / "daemon.log").read_text()
        assert "Traceback" not in log, log
        assert not (Path(n["home"]) / "node.json").exists()


def test_init_identity_restart_and_clean_shutdown(tmp_path: Path) -> None:
    home = tmp_path / "home"
    out = iollm("init", "--home", str(home)).stdout
    peer_id = out.split("peer id: ")[1].strip()
    key_mode = stat.S_IMODE((home / "node.key").stat().st_mode)
    assert key_mode == 0o600
    assert stat.S_IMODE((home / "api.token").stat().st_mode) == 0o600
    key_bytes = (home / "node.key").read_bytes()

    again = iollm("init", "--home", str(home), check=False)
    assert again.returncode == 1 and "--force" in again.stderr
    assert (home / "node.key").read_bytes() == key_bytes  # never overwritten

    seqs = []
    for _ in range(2):
        proc = subprocess.Popen(
            [sys.executable, "-m", "node.cli", "node", "start", "--home", str(home),
             "--listen", "/ip4/127.0.0.1/tcp/0", "--api-port", "0"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            info = wait_for_file(home / "node.json", proc, timeout=60)
            assert info["peer_id"] == peer_id
            status = json.loads(iollm("status", "--json", "--home", str(home)).stdout)
            assert status["peer_id"] == peer_id
            seqs.append(status["record"]["seq"])
        finally:
            proc.send_signal(signal.SIGINT if len(seqs) == 1 else signal.SIGTERM)
            output, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0, output
        assert b"Traceback" not in output, output.decode()
        assert not (home / "node.json").exists()
    assert seqs[1] > seqs[0]  # the sequence number survived the restart


def test_clear_errors_without_traceback(tmp_path: Path) -> None:
    home = tmp_path / "home"
    missing = iollm("node", "start", "--home", str(home), check=False)
    assert missing.returncode == 1 and "iollm init" in missing.stderr
    iollm("init", "--home", str(home))
    cases = [
        (["--listen", "/ip4/not-an-ip/tcp/1"], "bad multiaddr"),
        (["--bootstrap", "/ip4/127.0.0.1/tcp/4001"], "/p2p/"),
        (["--listen", "/ip4/127.0.0.1/tcp/0", "--api-port", "70000"], "not a TCP port"),
    ]
    for extra, expected in cases:
        proc = iollm("node", "start", "--home", str(home), *extra, check=False, timeout=60)
        assert proc.returncode != 0
        assert expected in proc.stderr.lower() or expected in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr
    no_node = iollm("gpus", "--home", str(home), check=False)
    assert no_node.returncode == 1 and "no node is running" in no_node.stderr
    (home / "config.toml").write_text("[discovery]\nrecord_ttl_s = 'soon'\n")
    bad_config = iollm("node", "start", "--home", str(home), check=False)
    assert bad_config.returncode == 1 and "discovery.record_ttl_s" in bad_config.stderr
    assert os.path.exists(home / "node.key")
