"""The namespace testnet (``iollm testnet up --hosts``) and chaos on it (issue 17).

Each test here starts daemons in network namespaces of their own, on addresses of
198.18.0.0/15, through the relay of node/testnet; they need root (CI runs as root) and
are skipped elsewhere. Namespace names start with this worker's prefix, so parallel
workers and the demo never collide. The chaos cases that take minutes (a job on lossy
links, a 100 MiB fetch at 100 ms RTT) are in test_testnet_chaos.py (marker ``chaos``: run
by scripts/test.sh after the default suite), and a node behind NAT in
test_testnet_nat_node.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from node.api.server import ApiClientError
from node.cli.app import main
from node.cli.testnet import log_tail, node_api
from node.config import TOKEN_FILE
from node.testnet.netns import NetnsError, check_available, namespaces, netns_pids
from tests.netutil import iollm

try:
    check_available()
    UNAVAILABLE = ""
except NetnsError as exc:
    UNAVAILABLE = str(exc)
# CI runs as root, where set-up installs what is missing: there the tests run (and fail).
pytestmark = pytest.mark.skipif(bool(UNAVAILABLE) and os.geteuid() != 0, reason=UNAVAILABLE)

PREFIX = f"net{os.getpid() % 10**6}"  # one per pytest worker process


def api(node: dict[str, Any], path: str, method: str = "GET", body: Any = None,
        timeout: float = 30) -> Any:
    token = (Path(node["home"]) / TOKEN_FILE).read_text().strip()
    return node_api(node, token, method, path, body, timeout)


def leftovers(prefix: str, directory: Path) -> list[str]:
    """Namespaces of the prefix, and processes whose command line names the directory."""
    found = [f"netns {n}" for n in namespaces(prefix)]
    for entry in os.listdir("/proc"):
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        if entry.isdigit() and str(directory).encode() in cmdline:
            words = cmdline.replace(b"\0", b" ").decode(errors="replace")
            found.append(f"pid {entry}: {words[:120]}")
    return found


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """The CLI in this process (a child interpreter costs seconds on a loaded machine)."""
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def wait(predicate: Any, timeout: float, what: str) -> float:
    """Poll until ``predicate()``; the seconds it took. Fails after ``timeout``. A node
    whose API does not answer one poll (a daemon busy for a moment, two test workers on
    two cores) is asked again; one that never answers fails with its last error."""
    start, last = time.monotonic(), ""
    while time.monotonic() - start < timeout:
        try:
            if predicate():
                return time.monotonic() - start
        except ApiClientError as exc:
            if exc.status != 0:  # an answer, and a wrong one: no retry makes it right
                raise
            last = f" (last: {exc})"
        time.sleep(0.1)  # polling other processes, bounded by the deadline
    raise AssertionError(f"{what}: not within {timeout} s{last}")


@pytest.fixture(scope="module")
def hostnet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, dict[str, Any]]]:
    """Bootstrap + 3 nodes, the 4 validators, each in its own namespace."""
    directory = tmp_path_factory.mktemp("hostnet") / "net"
    prefix = PREFIX + "c"
    up = iollm("testnet", "up", "--hosts", "--prefix", prefix, "--nodes", "3",
               "--dir", str(directory), "--timeout", "150", timeout=200, check=False)
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        assert f"4 nodes in namespaces {prefix}-* on 198.18.0.0/15" in up.stdout
        yield directory, json.loads((directory / "testnet.json").read_text())
    finally:
        iollm("testnet", "down", "--dir", str(directory), timeout=120)
        assert leftovers(prefix, directory) == []


def heights(nodes: list[dict[str, Any]]) -> list[int]:
    return [int(api(n, "/v1/ledger", timeout=10)["height"]) for n in nodes]


@contextmanager
def daemon_logs_on_failure(nodes: list[dict[str, Any]]) -> Iterator[None]:
    """A failed assertion carries the tail of every daemon's log: a host whose API stops
    answering says why only there."""
    try:
        yield
    except AssertionError as exc:
        tails = "\n".join(f"--- {n['name']} ({n['home']}/daemon.log)\n"
                          f"{log_tail(Path(n['home']) / 'daemon.log', 30)}" for n in nodes)
        raise AssertionError(f"{exc}\n{tails}") from exc


# Marker chaos: scripts/test.sh runs it after the default suite, one test at a time. In
# the default suite's two busy workers, 2 of 7 fresh-clone runs once saw a host's API stop
# answering for good during it (cause not found; the failure now carries the daemons'
# logs); alone it passed 5 of 5 at load 4-27 (2026-12-08).
@pytest.mark.chaos
@pytest.mark.timeout(400)  # the module's testnet comes up first (up to 200 s)
def test_hosts_have_own_addresses_and_a_partition_stops_finality(
        hostnet: tuple[Path, dict[str, Any]], capsys: pytest.CaptureFixture[str]) -> None:
    directory, state = hostnet
    with daemon_logs_on_failure(state["nodes"]):
        check_addresses_and_partition(directory, state, capsys)


def check_addresses_and_partition(directory: Path, state: dict[str, Any],
                                  capsys: pytest.CaptureFixture[str]) -> None:
    nodes = state["nodes"]
    by_name = {n["name"]: n for n in nodes}
    for i, node in enumerate(nodes):
        assert node["addrs"][0].startswith(f"/ip4/198.18.1.{i + 1}/tcp/4001/p2p/")
        assert node["netns"] == f"{PREFIX}c-{node['name']}"
    # The CLI finds a host's API in its namespace (node.json names it).
    listed = json.loads(iollm("gpus", "--json", "--home", str(directory / "node-2")).stdout)
    assert {r["peer_id"] for r in listed} == {n["peer_id"] for n in nodes}

    # The DHT walk alone, asked of one host for another's record.
    found = api(by_name["node-3"], f"/v1/record?peer_id={by_name['node-1']['peer_id']}"
                                   "&source=dht")
    assert found["peer_id"] == by_name["node-1"]["peer_id"]
    with pytest.raises(ApiClientError, match="source: expected"):
        api(by_name["node-3"], f"/v1/record?peer_id={by_name['node-1']['peer_id']}&source=x")

    wait(lambda: min(heights(nodes)) >= 1, 30, "a first final block")
    code, out, _ = cli(capsys, "testnet", "partition", "bootstrap,node-1", "node-2,node-3",
                       "--dir", str(directory))
    assert code == 0 and "bootstrap, node-1 | node-2, node-3" in out
    # A block whose precommits were on the way may still land; then nothing, as neither
    # half has the 3 of 4 votes a commit needs.
    time.sleep(1.5)  # the settle time is the assertion: what lands in it is not counted
    before = heights(nodes)
    time.sleep(4.0)  # four block intervals without a block is the assertion
    assert heights(nodes) == before, "a block was finalized across a 2|2 split"

    assert cli(capsys, "testnet", "heal", "--dir", str(directory))[0] == 0
    top = max(before)
    resumed = wait(lambda: min(heights(nodes)) > top, 20, "blocks after the heal")
    with capsys.disabled():
        print(f"\nblocks resumed {resumed:.1f} s after heal")
    assert resumed < 10.0
    # No fork: every node has the same block at every height they share.
    chains = [{b["height"]: b["id"] for b in api(n, "/v1/ledger/blocks?limit=30")}
              for n in nodes]
    shared = set.intersection(*(set(c) for c in chains))
    assert len(shared) >= 2
    for height in shared:
        assert len({c[height] for c in chains}) == 1, f"fork at height {height}"
    stats = json.loads((directory / "wire-stats.json").read_text())
    assert stats.get("dropped-partition", 0) > 0
    assert by_name["bootstrap"]["netns"] in namespaces(PREFIX + "c")


def providers_known(node: dict[str, Any], version: str) -> int:
    """How many providers of dataset ``version`` ``node`` has heard of (0: not of it)."""
    held = [v for v in api(node, "/v1/models?kind=dataset") if v["version"] == version]
    return int(held[0]["providers"]) if held else 0


def run_op(node: dict[str, Any], path: str, body: Any, timeout: float) -> Any:
    op = api(node, path, "POST", body)["op"]
    state: dict[str, Any] = {}

    def ended() -> bool:
        state.update(api(node, f"/v1/ops?id={op}"))
        return state["state"] != "running"

    wait(ended, timeout, f"{path} {body}")
    assert state["state"] == "done", state.get("error", state)
    return state["result"]


def test_provider_killed_mid_fetch_on_shaped_links(
        hostnet: tuple[Path, dict[str, Any]], tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    directory, state = hostnet
    boot, one, two, _three = state["nodes"]
    data = tmp_path / "blob.bin"
    data.write_bytes(os.urandom(12 * 2**20))
    version = run_op(one, "/v1/models/publish",
                     {"path": str(data), "kind": "dataset", "name": "blob"}, 60)["version"]

    # node-2 fetches it first (unshaped, fast) and so provides it too: once it has heard
    # of it, as a user runs `model fetch` on what `model list` shows (the test may follow
    # a partition just healed, with the mesh and routing still mending).
    wait(lambda: providers_known(two, version) >= 1, 30, "node-2 hearing of the new version")
    run_op(two, "/v1/models/fetch", {"version": version}, 60)

    wait(lambda: providers_known(boot, version) >= 2, 30,
         "two providers known to the bootstrap node")
    # Each provider's link: 16 Mbit/s and 10 ms each way, so the fetch takes seconds.
    code, out, _ = cli(capsys, "testnet", "shape", "node-1", "node-2", "--rate-mbit", "16",
                       "--delay-ms", "10", "--dir", str(directory))
    assert code == 0 and "node-1, node-2: delay 10 ms, 16 Mbit/s" in out
    out = tmp_path / "out"
    op = api(boot, "/v1/models/fetch", "POST", {"version": version, "out": str(out)})["op"]

    def progress() -> dict[str, Any]:
        return dict(api(boot, f"/v1/ops?id={op}"))

    wait(lambda: progress()["done_bytes"] >= 2 * 2**20, 60, "2 MiB fetched")
    os.kill(one["pid"], signal.SIGKILL)
    wait(lambda: progress()["state"] != "running", 90, "the fetch ending")
    final = progress()
    assert final["state"] == "done", final
    got = b"".join(p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file())
    assert hashlib.sha256(got).digest() == hashlib.sha256(data.read_bytes()).digest()


def test_down_after_a_killed_up_leaves_nothing(tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    directory = tmp_path / "killed"
    prefix = PREFIX + "k"
    up = subprocess.Popen([sys.executable, "-m", "node.cli", "testnet", "up", "--hosts",
                           "--prefix", prefix, "--nodes", "1", "--dir", str(directory),
                           "--delay-ms", "5"],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    stray: subprocess.Popen[bytes] | None = None
    done = False
    try:
        # Killed as soon as it made a namespace: halfway through, no state of the nodes.
        wait(lambda: bool(namespaces(prefix)), 60, "a namespace made")
        up.kill()
        up.wait(timeout=10)
        assert not (directory / "testnet.json").exists()
        # A process left running inside a host, as a daemon would be (a real one takes
        # seconds to start; what teardown must find is a process in the namespace).
        stray = subprocess.Popen(["ip", "netns", "exec", namespaces(prefix)[0], "sleep", "600"],
                                 start_new_session=True)
        wait(lambda: stray is not None and stray.pid in netns_pids(namespaces(prefix)[0]), 10,
             "the stray process in its namespace")
        code, out, err = cli(capsys, "testnet", "down", "--dir", str(directory), "--prefix",
                             prefix)
        assert code == 0 and f"namespace(s) of prefix {prefix}" in out, err
        assert stray.wait(timeout=10) is not None
        assert leftovers(prefix, directory) == []
        # Idempotent.
        code, out, _ = cli(capsys, "testnet", "down", "--dir", str(directory), "--prefix",
                           prefix)
        assert code == 0 and "removed 0 namespace(s)" in out
        done = True
    finally:
        for proc in (up, stray):
            if proc is not None and proc.poll() is None:
                proc.kill()
        if not done:
            iollm("testnet", "down", "--dir", str(directory), "--prefix", prefix, check=False)


@pytest.mark.parametrize("args, message", [
    (("up", "--delay-ms", "10"), "need --hosts"),
    (("up", "--hosts", "--prefix", "Bad-Prefix"), "prefix 'Bad-Prefix'"),
    (("up", "--hosts", "--loss", "100"), "--loss 100"),
    (("partition", "a", "b"), "no namespace network"),
    (("heal",), "no namespace network"),
])
def test_hosts_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                   args: tuple[str, ...], message: str) -> None:
    code, _, err = cli(capsys, "testnet", *args, "--dir", str(tmp_path))
    assert code == 1 and message in err and len(err.splitlines()) == 1, err
