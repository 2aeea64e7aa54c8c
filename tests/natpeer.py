"""One node of the hole-punch measurement (tests/test_holepunch_slow.py), run inside a
namespace: ``python -m tests.natpeer ROLE IP DIR``.

relay: a public node offering the relay service; writes ``DIR/relay.addr``.
a: a private node with a slot on the relay; writes its circuit addresses, then its DCUtR
   counters every few seconds (``DIR/a.counters``).
b: a private node that dials a through the relay TRIALS times, waits each time up to
   UPGRADE_WAIT_S for a direct connection, disconnects; writes ``DIR/b.result``.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import trio
from multiaddr import Multiaddr
from nacl.signing import SigningKey
from prometheus_client import CollectorRegistry

from node.p2p import PeerId, PeerInfo
from node.p2p.host import open_network, parse_multiaddr
from node.p2p.nat import NatOptions, has_direct_connection

TRIALS = 5
UPGRADE_WAIT_S = 30.0


def counters(registry: CollectorRegistry) -> dict[str, float]:
    return {f"{s.name}{sorted(s.labels.items())}": s.value for m in registry.collect()
            for s in m.samples if s.name.endswith("_total")
            and ("dcutr" in s.name or "relay_dials" in s.name)}


async def main(role: str, ip: str, directory: Path) -> None:
    registry = CollectorRegistry()
    if role == "relay":
        options = NatOptions(service=True, reachability="public")
    else:
        options = NatOptions(reachability="private",
                             relays=((directory / "relay.addr").read_text().strip(),))
    async with open_network(SigningKey.generate(), [Multiaddr(f"/ip4/{ip}/tcp/4001")], {},
                            registry=registry, nat=options) as net:
        if role == "relay":
            (directory / "relay.addr").write_text(net.listen_addrs()[0])
            await trio.sleep_forever()
        while not net.nat.circuit_addrs():
            await trio.sleep(0.2)
        (directory / f"{role}.addrs").write_text(
            json.dumps([str(net.peer_id), *net.nat.circuit_addrs()]))
        if role == "a":
            while True:
                (directory / "a.counters").write_text(json.dumps(counters(registry)))
                await trio.sleep(2)
        while not (directory / "a.addrs").exists():
            await trio.sleep(0.2)
        peer_text, *addrs = json.loads((directory / "a.addrs").read_text())
        peer = PeerId.from_base58(peer_text)
        results: list[dict[str, object]] = []
        for trial in range(TRIALS):
            start = time.monotonic()
            try:
                await net.connect(PeerInfo(peer, [parse_multiaddr(a) for a in addrs]), 30)
            except Exception as exc:
                results.append({"trial": trial, "relayed": False, "error": repr(exc)})
                continue
            direct = False
            with trio.move_on_after(UPGRADE_WAIT_S):
                while not has_direct_connection(net.host, peer):
                    await trio.sleep(0.2)
                direct = True
            results.append({"trial": trial, "relayed": True, "direct": direct,
                            "s": round(time.monotonic() - start, 1)})
            await net.host.disconnect(peer)
            await trio.sleep(3)  # both sides see the disconnect (DCUtR resets its budget)
        (directory / "b.result").write_text(json.dumps(
            {"results": results, "counters": counters(registry)}, indent=1))


if __name__ == "__main__":
    trio.run(main, sys.argv[1], sys.argv[2], Path(sys.argv[3]))
