"""Guards on the py-libp2p internals that node/p2p relies on: each fails when the library
changes under the patch or private call it names (see shared/notes/libp2p-0.8.1.md)."""

from __future__ import annotations

import inspect
from typing import Any

import pytest
import trio
from multiaddr import Multiaddr
from nacl.signing import SigningKey

from node.p2p import host as p2p_host
from node.p2p import open_network, wire
from node.p2p.options import P2POptions

LOOPBACK = Multiaddr("/ip4/127.0.0.1/tcp/0")


def _parameters(function: object) -> list[str]:
    return list(inspect.signature(function).parameters)  # type: ignore[arg-type]


def test_the_auto_connector_is_off() -> None:
    """_disable_auto_connector replaces the swarm's AutoConnector.maybe_connect; if the
    library renames either, the assignment would silently do nothing."""

    async def scenario() -> None:
        with trio.fail_after(30):
            async with open_network(SigningKey.generate(),
                                    [Multiaddr("/ip4/127.0.0.1/tcp/0")], {}) as net:
                connector = net.host.get_network().auto_connector
                assert type(connector).maybe_connect is not p2p_host._no_auto_connect
                assert connector.maybe_connect is p2p_host._no_auto_connect

    trio.run(scenario)


def test_library_logs_go_through_the_nodes_handlers() -> None:
    """py-libp2p sets its root logger's propagate to False on import; node/p2p/host.py
    turns it back on (a later import of libp2p does not undo it: it runs once)."""
    import logging

    import libp2p

    assert libp2p is not None
    assert logging.getLogger("libp2p").propagate is True


def test_the_resource_manager_is_ours_and_steady() -> None:
    """open_network hands new_host its own ResourceManager (new_host builds a default one
    otherwise, circuit breaker and degradation on) and the swarm uses it."""

    async def scenario() -> None:
        with trio.fail_after(30):
            async with open_network(SigningKey.generate(),
                                    [Multiaddr("/ip4/127.0.0.1/tcp/0")], {}) as net:
                manager = net.host.get_network()._resource_manager  # private: the check
                assert manager is not None
                assert manager.circuit_breaker is None
                assert manager.graceful_degradation is None
                assert manager.limits.max_connections == P2POptions().max_connections
                assert manager.limits.max_streams == 4 * P2POptions().max_streams

    trio.run(scenario)


def test_the_patched_reads_and_the_negotiation_hook_are_where_they_were() -> None:
    """The stream guard wraps the handler that multiselect.negotiate returns, which
    BasicHost._swarm_stream_handler then runs; the Kademlia request cap is the module name
    that KadDHT._do_handle_stream reads (node/p2p/host.py, KAD_MAX_REQUEST_BYTES)."""
    import libp2p.kad_dht.kad_dht as kad_dht_module
    from libp2p.host.basic_host import BasicHost
    from libp2p.kad_dht.kad_dht import KadDHT

    dispatch = inspect.getsource(BasicHost._swarm_stream_handler)
    assert "self.multiselect.negotiate(" in dispatch and "await handler(net_stream)" in dispatch
    assert "MAX_DHT_MESSAGE_SIZE" in inspect.getsource(KadDHT._do_handle_stream)
    assert kad_dht_module.MAX_DHT_MESSAGE_SIZE == p2p_host.KAD_MAX_REQUEST_BYTES


def test_yamux_frames_fit_one_noise_message() -> None:
    """node/p2p/wire.py lowers the yamux module's MAX_MESSAGE_SIZE, which the write path
    reads to cut frames (and a read-everything call to slice its buffer); a version that
    reads it where frames are received, or stops reading it in ``write``, would change
    what this node accepts, or nothing."""
    import libp2p.stream_muxer.yamux.yamux as yamux_module
    from libp2p.security.noise.io import MAX_PLAINTEXT_LENGTH

    assert yamux_module.MAX_MESSAGE_SIZE == MAX_PLAINTEXT_LENGTH
    # Its definition, the write path, and a comment and a slice in YamuxStream.read.
    assert inspect.getsource(yamux_module).count("MAX_MESSAGE_SIZE") == 4
    assert "MAX_MESSAGE_SIZE - HEADER_SIZE" in inspect.getsource(yamux_module.YamuxStream.write)
    assert inspect.getsource(yamux_module.YamuxStream.read).count("MAX_MESSAGE_SIZE") == 2


def test_signed_peer_records_are_built_and_checked_once_per_peer() -> None:
    """Each pubsub module still calls the two names wire.py rebinds; the record a host
    sends is built once per RECORD_REFRESH_S, and the same record from the same peer is
    verified and stored once, a new one again; a forged one is still refused."""
    from libp2p.pubsub.pb.rpc_pb2 import RPC

    for module in wire.PATCHED_MODULES:  # a module that stops calling a name by it
        source = inspect.getsource(module)  # would bypass the patch
        assert "env_to_send_in_RPC(" in source, module.__name__
        assert "maybe_consume_signed_record(" in source, module.__name__
        assert module.env_to_send_in_RPC is wire.env_to_send_in_rpc
        assert module.maybe_consume_signed_record is wire.maybe_consume_signed_record

    calls = {"build": 0, "check": 0}

    def counted(name: str, function: Any) -> Any:
        def call(*args: Any) -> Any:
            calls[name] += 1
            return function(*args)
        return call

    async def scenario() -> None:
        with trio.fail_after(30):
            async with (open_network(SigningKey.generate(), [LOOPBACK], {}) as a,
                        open_network(SigningKey.generate(), [LOOPBACK], {}) as b):
                sent = wire.env_to_send_in_rpc(a.host)[0]
                assert [wire.env_to_send_in_rpc(a.host)[0] for _ in range(3)] == [sent] * 3
                assert calls["build"] == 1
                message = RPC(senderRecord=sent)
                sender = a.host.get_id()
                assert all(wire.maybe_consume_signed_record(message, b.host, sender)
                           for _ in range(3))
                assert calls["check"] == 1
                assert b.host.get_peerstore().get_peer_record(sender) is not None
                forged = RPC(senderRecord=sent[:-1] + bytes([sent[-1] ^ 1]))
                assert not wire.maybe_consume_signed_record(forged, b.host, sender)
                assert calls["check"] == 2
                # Another peer's record is not taken as this peer's.
                assert not wire.maybe_consume_signed_record(message, b.host, b.host.get_id())

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(wire, "library_env_to_send", counted("build", wire.library_env_to_send))
        patch.setattr(wire, "library_consume", counted("check", wire.library_consume))
        trio.run(scenario)


def test_a_stream_protocol_is_chosen_in_one_round_trip() -> None:
    """open_network's hosts open streams through wire.OneTripMultiselectClient, where
    BasicHost.new_stream looks; it writes the handshake and the protocol before reading
    anything (a listener that answers only once it has both still gets an answer, which
    the library's client would wait for for ever), and the library's own listener agrees,
    also when the first protocol is refused."""
    from libp2p.custom_types import TProtocol
    from libp2p.host.basic_host import BasicHost
    from libp2p.io.trio import TrioTCPStream
    from libp2p.protocol_muxer.multiselect import Multiselect
    from libp2p.protocol_muxer.multiselect_client import MULTISELECT_PROTOCOL_ID
    from libp2p.protocol_muxer.multiselect_communicator import MultiselectCommunicator
    from trio.testing import memory_stream_pair

    assert "self.multiselect_client.select_one_of(" in inspect.getsource(BasicHost.new_stream)
    wanted, other = TProtocol("/iollm/test/1"), TProtocol("/iollm/absent/1")

    def pair() -> tuple[MultiselectCommunicator, MultiselectCommunicator]:
        near, far = memory_stream_pair()
        return (MultiselectCommunicator(TrioTCPStream(near)),  # type: ignore[arg-type]
                MultiselectCommunicator(TrioTCPStream(far)))  # type: ignore[arg-type]

    async def one_trip_listener(far: MultiselectCommunicator) -> None:
        assert [await far.read(), await far.read()] == [MULTISELECT_PROTOCOL_ID, wanted]
        await far.write(MULTISELECT_PROTOCOL_ID)
        await far.write(wanted)

    async def library_listener(far: MultiselectCommunicator) -> None:
        async def handler(stream: Any) -> None:
            pass

        assert (await Multiselect({wanted: handler}).negotiate(far, 5))[0] == wanted

    async def scenario() -> None:
        with trio.fail_after(10):
            async with open_network(SigningKey.generate(), [LOOPBACK], {}) as net:
                assert isinstance(net.host.multiselect_client, wire.OneTripMultiselectClient)
            for listener, offered in ((one_trip_listener, [wanted]),
                                      (library_listener, [wanted]),
                                      (library_listener, [other, wanted])):
                near, far = pair()
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(listener, far)
                    got = await wire.OneTripMultiselectClient().select_one_of(offered, near, 5)
                assert got == wanted

    trio.run(scenario)


def test_tcp_sockets_keep_enough_unsent_bytes() -> None:
    """trio's SocketStream still sets TCP_NOTSENT_LOWAT in __init__ (so wire.py's setting,
    made after it, is the one that holds), and a stream opened the way py-libp2p's TCP
    transport opens one carries wire.NOTSENT_LOWAT."""
    import socket

    if not hasattr(socket, "TCP_NOTSENT_LOWAT"):
        pytest.skip("no TCP_NOTSENT_LOWAT on this platform")
    assert "TCP_NOTSENT_LOWAT" in inspect.getsource(wire._library_socket_stream_init)

    async def scenario() -> None:
        with trio.fail_after(10):
            listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
            port = listeners[0].socket.getsockname()[1]
            async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
                got = stream.getsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT)
                assert got == wire.NOTSENT_LOWAT
            for listener in listeners:
                await listener.aclose()

    trio.run(scenario)


def test_yamux_credit_is_released_in_batches() -> None:
    """node/p2p/wire.py replaces YamuxStream's credit release: a reader that takes small
    pieces (as pubsub reads a varint prefix byte by byte) sends a WINDOW_UPDATE once per
    CREDIT_BATCH bytes consumed, not after every read, and a writer of more than a window
    to such a reader is never stalled (its credit keeps coming)."""
    import struct

    import libp2p.stream_muxer.yamux.yamux as yamux_module
    from libp2p.custom_types import TProtocol

    from node.p2p.host import peer_info_from_multiaddr

    assert yamux_module.YamuxStream._auto_tune_and_send_window_update is (
        wire._window_update_batched)
    for name in ("_grow_threshold", "_grow_to_delta", "_apply_autotune_epoch",
                 "send_window_update"):  # what the patch calls
        assert callable(getattr(yamux_module.YamuxStream, name)), name
    protocol = TProtocol("/iollm/test-credit/1.0.0")
    total = 3 * yamux_module.DEFAULT_WINDOW_SIZE + 12_345  # more than a window
    piece = 100
    updates: list[int] = []  # increments of the WINDOW_UPDATEs the reader sent

    async def scenario() -> None:
        with trio.fail_after(60):
            async with (open_network(SigningKey.generate(), [LOOPBACK], {}) as server,
                        open_network(SigningKey.generate(), [LOOPBACK], {}) as client):
                got = bytearray()
                done = trio.Event()

                async def handler(stream: Any) -> None:
                    conn = stream.muxed_stream.conn
                    write_frame = conn._write_frame

                    async def counted(data: bytes) -> None:
                        _, kind, _, _, length = struct.unpack(
                            yamux_module.YAMUX_HEADER_FORMAT, data[:12])
                        if kind == yamux_module.TYPE_WINDOW_UPDATE and length:
                            updates.append(length)
                        await write_frame(data)

                    conn._write_frame = counted
                    while len(got) < total:
                        got.extend(await stream.read(piece))
                    done.set()

                server.host.set_stream_handler(protocol, handler)
                info = peer_info_from_multiaddr(str(server.listen_addrs()[0]))
                await client.connect(info)
                stream = await client.host.new_stream(info.peer_id, [protocol])
                data = bytes(range(256)) * (total // 256) + bytes(total % 256)
                await stream.write(data)
                await done.wait()
                assert bytes(got) == data
                await stream.close()

    trio.run(scenario)
    # Each update grants at least a batch; reading in pieces of 100 bytes, the library
    # sent one per read (thousands, of 2 to 100 bytes).
    assert updates and all(u >= wire.CREDIT_BATCH for u in updates), updates[:10]
    assert len(updates) <= total // wire.CREDIT_BATCH + 1, len(updates)
