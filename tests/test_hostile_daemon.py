"""A raw hostile peer against a real daemon process, on every protocol the node lists.

The protocol list comes from the running node (``GET /v1/status``), so a protocol added
later is attacked without editing this test. After each protocol's cases the daemon is
alive, its API answers, and an honest peer is still served on that protocol (an honest
exchange where this test knows the protocol, a successful negotiation otherwise).
"""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

import pytest
import trio
import varint
from libp2p.custom_types import TProtocol
from libp2p.identity.identify.identify import parse_identify_response
from libp2p.kad_dht.pb.kademlia_pb2 import Message as KadMessage
from libp2p.peer.id import ID
from multiaddr import Multiaddr
from nacl.signing import SigningKey

from node.api.server import api_request, read_token_file
from node.cli import testnet
from node.config import TOKEN_FILE
from node.discovery.service import CAPABILITY_TOPIC
from node.p2p.framing import read_frame
from node.p2p.host import Network, open_network, peer_info_from_multiaddr
from protocol.capability import (
    MAX_CAPABILITY_BYTES,
    new_capability_record,
    sign_capability,
    verify_capability,
)
from protocol.peerid import peer_id_from_public_key
from tests.hostile import attack, malformed_payloads
from tests.netutil import make_env

LOOPBACK = [Multiaddr("/ip4/127.0.0.1/tcp/0")]
# Served by every node; the list read from the node must hold at least these.
EXPECTED = {"/ipfs/id/1.0.0", "/ipfs/id/push/1.0.0", "/ipfs/ping/1.0.0", "/ipfs/kad/1.0.0",
            "/meshsub/1.1.0", "/iollm/capability/1.0.0", "/iollm/smip/1.0.0",
            "/iollm/blocks/1.0.0", "/iollm/consensus/1.0.0"}


class Victim:
    def __init__(self, info: dict[str, Any]) -> None:
        self.pid = int(info["pid"])
        self.api = str(info["api"])
        self.home = Path(info["home"])
        self.token = read_token_file(self.home / TOKEN_FILE)
        self.addr = str(info["addrs"][0])
        self.peer_id = ID.from_base58(info["peer_id"])

    async def get(self, path: str) -> Any:
        return await trio.to_thread.run_sync(
            lambda: api_request(self.api, self.token, "GET", path, timeout=10))

    async def assert_alive(self, after: str) -> None:
        try:
            status = await self.get("/v1/status")
        except Exception as exc:
            with trio.move_on_after(10):  # a dying daemon closes its API before it exits
                while testnet.pid_alive(self.pid):  # (reaps it: a dead child stays a zombie)
                    await trio.sleep(0.1)
            log = (self.home / "daemon.log").read_text(errors="replace")[-3000:]
            raise AssertionError(f"the daemon stopped answering after {after} ({exc!r}); "
                                 f"its log ends:\n{log}") from None
        assert status["peer_id"] == str(self.peer_id), after
        # A library service can die while the API still answers (py-libp2p's swarm did,
        # with the DecodeError); any traceback in the log is a failure.
        log = (self.home / "daemon.log").read_text(errors="replace")
        assert "Traceback" not in log, f"after {after}, the daemon's log:\n{log[-3000:]}"


class Honest:
    """A well-behaved peer: one identity, never attacks."""

    def __init__(self, net: Network, key: SigningKey) -> None:
        self.net = net
        self.key = key
        self.seq = 0

    async def check(self, victim: Victim, protocol: str) -> None:
        served = HONEST.get(protocol)
        with trio.fail_after(20):
            if served is not None:
                await served(self, victim)
                return
            stream = await self.net.host.new_stream(victim.peer_id, [TProtocol(protocol)])
            await stream.reset()

    async def ping(self, victim: Victim) -> None:
        stream = await self.net.host.new_stream(victim.peer_id, [TProtocol("/ipfs/ping/1.0.0")])
        payload = random.randbytes(32)
        await stream.write(payload)
        echo = b""
        while len(echo) < 32:
            echo += await stream.read(32 - len(echo))
        assert echo == payload
        await stream.close()

    async def identify(self, victim: Victim) -> None:
        stream = await self.net.host.new_stream(victim.peer_id, [TProtocol("/ipfs/id/1.0.0")])
        data = b""
        try:
            while True:
                data += await stream.read(1 << 16)
        except Exception:  # the responder closes after its one message
            pass
        assert parse_identify_response(data).HasField("public_key")

    async def kademlia(self, victim: Victim) -> None:
        stream = await self.net.host.new_stream(victim.peer_id, [TProtocol("/ipfs/kad/1.0.0")])
        request = KadMessage(type=KadMessage.MessageType.FIND_NODE, key=random.randbytes(32))
        body = request.SerializeToString()
        await stream.write(varint.encode(len(body)) + body)
        data = b""
        while True:  # one varint-prefixed answer
            data += await stream.read(1 << 16)
            try:
                length = varint.decode_bytes(data)
            except Exception:
                continue
            start = len(varint.encode(length))
            if len(data) >= start + length:
                break
        answer = KadMessage()
        answer.ParseFromString(data[start:start + length])
        assert answer.type == KadMessage.MessageType.FIND_NODE
        await stream.close()

    async def gossip(self, victim: Victim) -> None:
        """Publish a new capability record of ours on gossip; the victim must take it
        (it has no other way to learn it: we serve no record stream, put none on the DHT)."""
        self.seq += 1
        me = peer_id_from_public_key(bytes(self.key.verify_key))
        record = new_capability_record(peer_id=me, addrs=tuple(self.net.listen_addrs()),
                                       software="iollm/honest-test", env=make_env(),
                                       seq=self.seq, now_ms=int(time.time() * 1000))
        envelope = sign_capability(self.key, record)
        while True:  # gossip is best-effort: repeat until it is in, within the deadline
            await self.net.pubsub.publish(CAPABILITY_TOPIC, envelope)
            with trio.move_on_after(1):
                while True:
                    got = await victim.get("/v1/peers")
                    seqs = [p["capability"]["seq"] for p in got
                            if p["peer_id"] == me and p["capability"]]
                    if seqs == [self.seq]:
                        return
                    await trio.sleep(0.1)  # polling another process within the deadline

    async def consensus(self, victim: Victim) -> None:
        """The consensus stream is for the genesis' validators: a peer outside it (as this
        honest one is) is refused before it can send a frame."""
        try:
            stream = await self.net.host.new_stream(victim.peer_id,
                                                    [TProtocol("/iollm/consensus/1.0.0")])
            with trio.fail_after(5):
                while await stream.read(1024):
                    pass
        except trio.TooSlowError:
            raise AssertionError("a non-validator's consensus stream was kept open") from None
        except Exception:  # reset while negotiating, or right after: refused
            return

    async def capability(self, victim: Victim) -> None:
        stream = await self.net.host.new_stream(victim.peer_id,
                                                [TProtocol("/iollm/capability/1.0.0")])
        data = await read_frame(stream, MAX_CAPABILITY_BYTES, 10)
        record = verify_capability(data, int(time.time() * 1000))
        assert record.peer_id == str(victim.peer_id)
        await stream.close()


HONEST = {
    "/ipfs/ping/1.0.0": Honest.ping,
    "/ipfs/id/1.0.0": Honest.identify,
    "/ipfs/kad/1.0.0": Honest.kademlia,
    "/meshsub/1.1.0": Honest.gossip,
    "/iollm/capability/1.0.0": Honest.capability,
    "/iollm/consensus/1.0.0": Honest.consensus,
}


def fresh_attacker() -> Any:
    """A host of a new identity (one per protocol, so the victim's bans, 5 failures a
    minute, do not cut the cases short), as open_network's context manager."""
    return open_network(SigningKey.generate(), LOOPBACK, {})


@pytest.mark.timeout(240)
def test_every_protocol_survives_malformed_input(tmp_path: Path) -> None:
    state = testnet.testnet_up(tmp_path / "net", 1, validators=1, timeout=150)
    try:
        victim = Victim(state["nodes"][0])  # the bootstrap node: the chain's validator
        trio.run(_attack_all, victim)
        log = (victim.home / "daemon.log").read_text(errors="replace")
        assert "/meshsub/1.1.0 stream from" in log  # one line per failure, with the peer
    finally:
        testnet.testnet_down(tmp_path / "net")


async def _attack_all(victim: Victim) -> None:
    protocols = (await victim.get("/v1/status"))["protocols"]
    assert set(protocols) >= EXPECTED, protocols
    honest_key = SigningKey.generate()
    async with open_network(honest_key, LOOPBACK, {}) as honest_net:
        honest = Honest(honest_net, honest_key)
        await honest_net.pubsub.subscribe(CAPABILITY_TOPIC)
        await honest_net.connect(peer_info_from_multiaddr(victim.addr))
        for protocol in protocols:
            async with fresh_attacker() as attacker:
                await attacker.connect(peer_info_from_multiaddr(victim.addr))
                for seed in range(2):
                    for name, payload in malformed_payloads(seed).items():
                        if seed and name != "random bytes":
                            continue
                        await attack(attacker, victim.peer_id, protocol, payload)
                        await victim.assert_alive(f"{name!r} on {protocol}")
            await honest.check(victim, protocol)
        # A repeated offender is banned; the honest peer is not.
        async with fresh_attacker() as attacker:
            await attacker.connect(peer_info_from_multiaddr(victim.addr))
            for _ in range(5):
                await attack(attacker, victim.peer_id, "/meshsub/1.1.0",
                             malformed_payloads()["not the message"])
            with trio.fail_after(10):
                while str(attacker.peer_id) not in (await victim.get("/v1/status"))[
                        "banned_peers"]:
                    await trio.sleep(0.1)  # polling another process within the deadline
        assert str(honest_net.peer_id) not in (await victim.get("/v1/status"))["banned_peers"]
        await honest.check(victim, "/meshsub/1.1.0")
    metrics = await trio.to_thread.run_sync(lambda: _metrics(victim))
    assert 'iollm_stream_handler_errors_total{kind="error",protocol="/meshsub/1.1.0"}' in metrics
    assert "iollm_peers_banned_total 1.0" in metrics


def _metrics(victim: Victim) -> str:
    import urllib.request

    request = urllib.request.Request(f"{victim.api}/metrics",
                                     headers={"Authorization": f"Bearer {victim.token}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return str(response.read().decode())

