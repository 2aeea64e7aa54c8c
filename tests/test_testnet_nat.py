"""The NAT of the namespace testnet (node/testnet/nat.py), without daemons: a host behind
the gateway reaches a public host, seen at the gateway's address (masquerade); no public
host can open a connection to it; teardown leaves nothing. Root and iptables needed."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from node.cli.app import main
from node.testnet.nat import add_nat, check_nat_available
from node.testnet.netns import (
    Host,
    NetnsError,
    check_available,
    create_network,
    namespaces,
    run_in_netns,
    teardown,
)

try:
    check_available()
    check_nat_available()
    UNAVAILABLE = ""
except NetnsError as exc:
    UNAVAILABLE = str(exc)
# CI runs as root, where set-up installs what is missing: there the tests run (and fail).
pytestmark = [pytest.mark.skipif(bool(UNAVAILABLE) and os.geteuid() != 0, reason=UNAVAILABLE),
              pytest.mark.timeout(60)]

PREFIX = f"nat{os.getpid() % 10**6}"
PORT = 4001


@pytest.fixture
def natted(tmp_path: Path) -> Iterator[tuple[Host, Host, Host]]:
    try:
        state = create_network(tmp_path / "net", PREFIX, ["pub", "natgw"])
        [behind] = add_nat(PREFIX, state.host("natgw"), ["priv"])
        yield state.host("pub"), state.host("natgw"), behind
    finally:
        teardown(PREFIX, tmp_path / "net")
        assert namespaces(PREFIX) == []


def _listen(host: Host) -> socket.socket:
    def make() -> socket.socket:
        server = socket.socket()
        server.bind((str(host.addr), PORT))
        server.listen()
        server.settimeout(5)
        return server
    return run_in_netns(host.netns, make)


def _connect(host: Host, to: str) -> socket.socket:
    return run_in_netns(host.netns, socket.create_connection, (to, PORT), 1.5)


def test_behind_the_nat_out_yes_in_no(natted: tuple[Host, Host, Host]) -> None:
    public, gateway, behind = natted
    assert str(behind.addr).startswith("198.19.0.") and behind.netns == f"{PREFIX}-priv"
    server = _listen(public)
    with server, _connect(behind, str(public.addr)):
        accepted, (source, _) = server.accept()
        accepted.close()
        assert source == str(gateway.addr)  # masqueraded
    hidden = _listen(behind)
    with hidden:
        # Neither its own address (routed nowhere outside) nor the gateway's (no
        # forwarding of new connections) lets a public host in.
        for target in (str(behind.addr), str(gateway.addr)):
            with pytest.raises(OSError):
                _connect(public, target).close()


@pytest.mark.parametrize("args", [("--nat", "1"), ("--hosts", "--nodes", "2", "--nat", "2")])
def test_nat_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                 args: tuple[str, ...]) -> None:
    code = main(["testnet", "up", *args, "--dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 1 and "--nat N needs --hosts" in err and len(err.splitlines()) == 1, err
