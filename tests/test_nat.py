"""NAT traversal (node/p2p/nat.py) between real hosts on 127.0.0.1, in one trio process:
a node configured private reserves a slot on a relay, advertises its relayed address,
is dialed through the relay and upgraded to a direct connection; AutoNAT tells a
reachable address from an unreachable one; the relay's limits hold. The guard tests
fail when py-libp2p changes under the fixes of node/p2p/nat.py."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import pytest
import trio
from libp2p.custom_types import TProtocol
from libp2p.host.autonat.autonat import AutoNATService, AutoNATStatus
from libp2p.host.autonat.pb.autonat_pb2 import Message as AutoNATMessage
from libp2p.network.exceptions import SwarmException
from libp2p.peer.id import ID as PeerId
from libp2p.peer.peerinfo import PeerInfo
from libp2p.relay.circuit_v2.resources import RelayResourceManager
from multiaddr import Multiaddr
from nacl.signing import SigningKey
from prometheus_client import CollectorRegistry

from node.config import ConfigError, RelaySection, parse_config
from node.p2p.host import Network, libp2p_key_pair, open_network, parse_multiaddr
from node.p2p.nat import (
    ConnectedRelayResources,
    NatOptions,
    has_direct_connection,
    is_circuit,
)
from protocol.capability import MAX_STR_CHARS
from tests.netutil import wait_until

pytestmark = pytest.mark.timeout(60)

ECHO = TProtocol("/iollm-test/echo/1")
SINK = TProtocol("/iollm-test/sink/1")
LOOPBACK = [Multiaddr("/ip4/127.0.0.1/tcp/0")]


async def _sink(stream: Any) -> None:
    try:
        while True:
            await stream.read(1 << 20)
    except Exception:  # EOF or reset
        pass


async def _echo(stream: Any) -> None:
    await stream.write(await stream.read(100))
    await stream.close()


async def _echo_once(net: Network, peer: Any, text: bytes) -> bytes:
    with trio.fail_after(15):
        stream = await net.host.new_stream(peer, [ECHO])
        await stream.write(text)
        return bytes(await stream.read(100))


def _sample(registry: CollectorRegistry, name: str, **labels: str) -> float:
    value = registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


@asynccontextmanager
async def _nodes(*options: NatOptions | None) -> AsyncIterator[list[tuple[Network,
                                                                        CollectorRegistry]]]:
    async with AsyncExitStack() as stack:
        out = []
        for opts in options:
            registry = CollectorRegistry()
            net = await stack.enter_async_context(
                open_network(SigningKey.generate(), LOOPBACK, {}, registry=registry, nat=opts))
            net.host.set_stream_handler(ECHO, _echo)
            net.host.set_stream_handler(SINK, _sink)
            out.append((net, registry))
        yield out


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _trio(fn: Callable[[], Awaitable[None]]) -> Callable[[], None]:
    """A synchronous test that runs ``fn`` under trio (no pytest-trio here)."""
    def test() -> None:
        trio.run(fn)
    test.__name__ = fn.__name__
    test.__doc__ = fn.__doc__
    return test


async def _true(value: bool) -> bool:
    return value


@_trio
async def test_private_node_is_dialed_through_the_relay_and_upgraded() -> None:
    relay_opts = NatOptions(service=True, reachability="public")
    async with _nodes(relay_opts, None, None) as [(relay, _), (dialer, dialer_reg), _]:
        private_opts = NatOptions(reachability="private", relays=(relay.listen_addrs()[0],))
        async with _nodes(private_opts) as [(private, private_reg)]:
            await wait_until(lambda: _true(bool(private.nat.circuit_addrs())), 15)
            addrs = private.listen_addrs()
            # What the capability record carries: only the relayed address, one that our
            # own parser and the record's size limit accept.
            assert len(addrs) == 1 and is_circuit(addrs[0])
            assert addrs[0].startswith(relay.listen_addrs()[0] + "/p2p-circuit/p2p/")
            assert addrs[0].endswith(str(private.peer_id)) and len(addrs[0]) <= MAX_STR_CHARS
            # Identify and the DHT's provider records carry the same (fix 4).
            assert [str(a) for a in private.host.get_addrs()] == addrs
            assert _sample(private_reg, "iollm_relay_reservations") == 1
            assert _sample(private_reg, "iollm_reachability") == AutoNATStatus.PRIVATE

            # Guard for fix 1: the library's own dial drops /p2p-circuit addresses. If this
            # fails, py-libp2p dials relays itself now and the wrapper in nat.py may go.
            swarm: Any = dialer.host.get_network()
            dialer.host.get_peerstore().add_addrs(private.peer_id,
                                                  [parse_multiaddr(addrs[0])], 60)
            with pytest.raises(SwarmException, match="relay-only"):
                await type(swarm).dial_peer(swarm, private.peer_id)

            await dialer.connect(PeerInfo(private.peer_id, [parse_multiaddr(addrs[0])]),
                                 timeout=20)
            assert await _echo_once(dialer, private.peer_id, b"through the relay") == \
                b"through the relay"
            assert _sample(dialer_reg, "iollm_relay_dials_total", result="ok") == 1
            # DCUtR: the private node dials the public one directly (on loopback the plain
            # dial succeeds, no hole punch is needed).
            def upgraded() -> float:
                return sum(_sample(reg, "iollm_dcutr_upgrades_total", method=m, result="direct")
                           for reg in (private_reg, dialer_reg)
                           for m in ("unilateral", "holepunch"))

            await wait_until(lambda: _true(upgraded() >= 1), 30)
            assert has_direct_connection(dialer.host, private.peer_id)
            assert await _echo_once(dialer, private.peer_id, b"direct") == b"direct"


@_trio
async def test_a_relay_refuses_reservations_beyond_its_limit() -> None:
    relay_opts = NatOptions(service=True, reachability="public", max_reservations=1,
                            max_circuit_bytes=256 << 10)
    async with _nodes(relay_opts, NatOptions(reachability="public")) as [(relay, _),
                                                                        (second, _)]:
        relay_info = PeerInfo(relay.peer_id, [parse_multiaddr(relay.listen_addrs()[0])])
        private_opts = NatOptions(reachability="private", relays=(relay.listen_addrs()[0],))
        async with _nodes(private_opts) as [(first, _)]:
            await wait_until(lambda: _true(bool(first.nat.circuit_addrs())), 15)
            assert await second.nat._reserve(relay_info) is None  # the one slot is taken
            assert relay.nat.relay.resource_manager.limits.max_reservations == 1
            # A circuit carries at most max_circuit_bytes: the relay resets it beyond.
            await second.connect(PeerInfo(first.peer_id,
                                          [parse_multiaddr(first.listen_addrs()[0])]), 20)
            stream = await second.host.new_stream(first.peer_id, [SINK])
            sent, reset = 0, False
            with trio.fail_after(20):  # a stall, not a reset, fails the test
                try:
                    while sent < 4 << 20:
                        await stream.write(bytes(64 << 10))
                        sent += 64 << 10
                    await stream.read(1)
                except Exception:  # the reset, as whichever stream error the library raises
                    reset = True
            assert reset and sent < 4 << 20
        # The slot is free once its holder is gone (a reservation needs its connection).
        assert await second.nat._reserve(relay_info) is not None


@_trio
async def test_a_node_without_relays_keeps_its_own_addresses() -> None:
    async with _nodes(NatOptions(reachability="private")) as [(private, reg)]:
        assert private.listen_addrs() and not any(is_circuit(a) for a in private.listen_addrs())
        assert _sample(reg, "iollm_relay_reservations") == 0


@_trio
async def test_autonat_tells_reachable_from_unreachable() -> None:
    async with _nodes(None, None, NatOptions(reachability="auto")) as nodes:
        (s1, _), (s2, _), (client, client_reg) = nodes
        for server in (s1, s2):
            addr = parse_multiaddr(server.listen_addrs()[0])
            await client.connect(PeerInfo(server.peer_id, [addr]))
        await wait_until(lambda: _true(client.nat.status == AutoNATStatus.PUBLIC), 20)
        assert _sample(client_reg, "iollm_reachability") == AutoNATStatus.PUBLIC
        # The same question about an address nobody listens at, as a node behind NAT asks it.
        unreachable = Multiaddr(f"/ip4/127.0.0.1/tcp/{_closed_port()}").to_bytes()
        for server in (s1, s2):
            status, _ = await client.nat.autonat.query_server(server.peer_id, [unreachable])
            assert status == AutoNATMessage.E_DIAL_ERROR
        client.nat.autonat.update_status()
        assert client.nat.autonat.get_status() == AutoNATStatus.PRIVATE

        # Guard for fix 2: py-libp2p's own server dials back with host.connect, which
        # returns at once on the connection the request came on: "reachable". If this
        # fails, the library dials for real now and DialBackAutoNAT may go.
        AutoNATService(s1.host, serve=True)  # its handler replaces ours on s1
        status, _ = await client.nat.autonat.query_server(s1.peer_id, [unreachable])
        assert status == AutoNATMessage.OK


# -- guards: the library behaviour node/p2p/nat.py works around -------------------------


@_trio
async def test_guard_library_relay_keeps_the_slots_of_gone_clients() -> None:
    """Fix 5: a reservation whose holder is not connected still fills a slot of the
    library's resource manager; ours frees it. If this fails, the library frees it now."""
    async with _nodes(None) as [(relay, _)]:
        limits = NatOptions(max_reservations=1).limits()
        gone = PeerId.from_pubkey(libp2p_key_pair(SigningKey.generate()).public_key)
        other = PeerId.from_pubkey(libp2p_key_pair(SigningKey.generate()).public_key)
        library = RelayResourceManager(limits, relay.host)
        library.reserve(gone)
        assert not library.can_accept_reservation(other)
        ours = ConnectedRelayResources(limits, relay.host)
        ours.reserve(gone)
        assert ours.can_accept_reservation(other)


def test_guard_get_addrs_cannot_carry_circuit_addresses() -> None:
    """Fix 4: BasicHost.get_addrs strips an address from its first /p2p/ on (how it
    replaces a peer id), which cuts a circuit address to the relay's own address."""
    circuit = Multiaddr("/ip4/1.2.3.4/tcp/5/p2p/12D3KooWJ9aqVq35m5aXU6rC2m2Qy5bafmPMGXUteJr1f"
                        "iNoBtya/p2p-circuit")
    assert str(circuit.decapsulate(Multiaddr(
        f"/p2p/{circuit.value_for_protocol('p2p')}"))) == "/ip4/1.2.3.4/tcp/5"


# -- config -----------------------------------------------------------------------------


def test_relay_section_defaults_and_values() -> None:
    assert parse_config({}).relay == RelaySection()
    config = parse_config({"relay": {"service": True, "max_reservations": 4,
                                     "reachability": "private"}})
    assert config.relay.service and config.relay.max_reservations == 4


@pytest.mark.parametrize(("table", "expected"), [
    ({"reachability": "behind-nat"}, "relay.reachability must be one of"),
    ({"max_circuit_bytes": 0}, "relay limits must be positive"),
    ({"max_relays": 99}, "relay.max_relays"),
    ({"service": "yes"}, "relay.service: expected bool"),
])
def test_bad_relay_values_name_the_key(table: dict[str, object], expected: str) -> None:
    with pytest.raises(ConfigError, match=expected):
        parse_config({"relay": table})
