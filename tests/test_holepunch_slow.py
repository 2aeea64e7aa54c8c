"""How often DCUtR's hole punch upgrades a relayed connection between two nodes behind
two different NATs (masquerade, no inbound connection): behind -m slow, about 4 minutes.

    bash scripts/test.sh -m slow -k holepunch

Namespaces: a relay host and two NAT gateways on the testnet's tun network, one node
behind each gateway (198.19.1.0/24 and 198.19.2.0/24). Node b dials node a through the
relay TRIALS times; the test asserts that every dial through the relay works and prints
how many were upgraded to a direct connection, with the DCUtR counters of both.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from node.testnet.nat import add_nat, check_nat_available
from node.testnet.netns import (
    NetnsError,
    check_available,
    create_network,
    namespaces,
    netns_argv,
    teardown,
)
from tests.natpeer import TRIALS

try:
    check_available()
    check_nat_available()
    UNAVAILABLE = ""
except NetnsError as exc:
    UNAVAILABLE = str(exc)
pytestmark = [pytest.mark.slow, pytest.mark.skipif(bool(UNAVAILABLE), reason=UNAVAILABLE)]

PREFIX = f"nath{os.getpid() % 10**6}"
ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(600)
def test_holepunch_between_two_nats(tmp_path: Path) -> None:
    procs: list[subprocess.Popen[bytes]] = []
    try:
        state = create_network(tmp_path / "net", PREFIX, ["relay", "gw1", "gw2"])
        [a] = add_nat(PREFIX, state.host("gw1"), ["a"], 1)
        [b] = add_nat(PREFIX, state.host("gw2"), ["b"], 2)

        def start(role: str, netns: str, ip: str) -> None:
            with open(tmp_path / f"{role}.log", "wb") as log:
                procs.append(subprocess.Popen(
                    netns_argv(netns, [sys.executable, "-m", "tests.natpeer", role, ip,
                                       str(tmp_path)]),
                    stdout=log, stderr=subprocess.STDOUT, cwd=ROOT))

        relay = state.host("relay")
        start("relay", relay.netns, str(relay.addr))
        deadline = time.monotonic() + 120
        while not (tmp_path / "relay.addr").exists():
            assert time.monotonic() < deadline, (tmp_path / "relay.log").read_text()
            time.sleep(0.2)  # another process starts; bounded by the deadline
        start("a", a.netns, str(a.addr))
        start("b", b.netns, str(b.addr))
        deadline = time.monotonic() + 480
        while not (tmp_path / "b.result").exists():
            assert time.monotonic() < deadline, (tmp_path / "b.log").read_text()[-3000:]
            assert all(p.poll() is None for p in procs), (tmp_path / "b.log").read_text()
            time.sleep(1)  # polling other processes, bounded by the deadline
        result = json.loads((tmp_path / "b.result").read_text())
        upgraded = sum(bool(r.get("direct")) for r in result["results"])
        print(f"\nrelayed connections upgraded by hole punching: {upgraded} of {TRIALS}")
        print(f"b: {result['counters']}")
        print(f"a: {(tmp_path / 'a.counters').read_text()}")
        print(f"trials: {result['results']}")
        assert all(r["relayed"] for r in result["results"]), result
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(timeout=30)
        teardown(PREFIX, tmp_path / "net")
        assert namespaces(PREFIX) == []
