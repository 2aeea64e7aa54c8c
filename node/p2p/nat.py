"""NAT traversal with py-libp2p's own modules: circuit relay v2 (hop service with limits,
reservations, dialing through a relay), AutoNAT (is this node reachable?) and DCUtR
(upgrading a relayed connection to a direct one).

Who does what:

- every node answers AutoNAT dial-back requests, accepts relayed connections (the relay
  v2 "stop" side) and runs DCUtR, which tries to replace each relayed connection by a
  direct one (a plain dial first, then a hole punch);
- a node whose ``[relay] service`` is on serves the relay v2 "hop" side, within the
  configured limits (reservations, circuits per reservation, bytes and seconds per
  circuit);
- a node that finds itself not reachable (AutoNAT, or ``reachability = "private"``)
  reserves a slot on up to ``max_relays`` relays and advertises
  ``<relay addr>/p2p/<relay>/p2p-circuit/p2p/<self>`` instead of its own addresses
  (specs/records.md); every node dials such an address through the relay when a direct
  dial fails.

What the library gets wrong, and the fix here (each has a guard test in
tests/test_nat.py that fails when the library changes under it):

1. ``Swarm.dial_peer`` drops every ``/p2p-circuit`` address ("this node has no relay
   transport"), even with the relay transport built: nothing dials through a relay by
   itself. ``_install_relay_dialing`` wraps the swarm's ``dial_peer``: when the library's
   direct dial fails, the peer's circuit addresses are dialed through the relay
   transport.
2. ``AutoNATService._try_dial`` dials back with ``host.connect``, which returns at once
   when a connection to the peer exists: the connection the request came on. Every
   requester was told it is reachable. ``DialBackAutoNAT`` dials the address itself
   (TCP, then a Noise handshake that proves the peer id) without the swarm, and closes.
3. ``CircuitV2Transport.dial`` makes a reservation on the relay before every dial when
   the client role is on; the transport here is built with the stop role only, and
   reservations are made explicitly by ``NatService``.
4. ``BasicHost.get_addrs`` strips everything from the first ``/p2p/`` of an address on,
   so a circuit address cannot go through its ``addrs_factory``; and the DHT drops a
   provider record that carries no address, so advertising nothing is no way out.
   ``_install_relayed_addrs`` replaces the host's ``get_addrs`` (identify, the DHT's
   peer and provider records, ``Network.listen_addrs``): a private node with relay slots
   advertises its relayed addresses only, peers cannot reach its own, and a dial to one
   would wait out its timeout before the relay is tried.
5. The relay's ``RelayResourceManager`` keeps the slot of a client that disconnected
   until the reservation's TTL ends (an hour by default), although it no longer honours
   it (the spec: a reservation lasts while its connection does): ``max_reservations``
   clients that came and went filled the relay. ``ConnectedRelayResources`` frees them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import multiaddr
import trio
from libp2p.host.autonat.autonat import AUTONAT_PROTOCOL_ID, AutoNATService, AutoNATStatus
from libp2p.host.basic_host import BasicHost
from libp2p.network.exceptions import SwarmException
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo, info_from_p2p_addr
from libp2p.relay.circuit_v2.config import RelayConfig, RelayRole
from libp2p.relay.circuit_v2.dcutr import DCUtRProtocol
from libp2p.relay.circuit_v2.protocol import PROTOCOL_ID as HOP_PROTOCOL_ID
from libp2p.relay.circuit_v2.protocol import CircuitV2Protocol
from libp2p.relay.circuit_v2.resources import RelayLimits, RelayResourceManager
from libp2p.relay.circuit_v2.transport import CircuitV2Transport
from prometheus_client import CollectorRegistry, Counter, Gauge

log = logging.getLogger(__name__)

REACHABILITY_MODES = ("auto", "public", "private")
# The relay protocol logs every circuit that ends (a normal close, a reset) at ERROR, and
# DCUtR every dial of a failed hole punch at WARNING: these are outcomes, counted in
# /metrics, not faults of this node.
logging.getLogger("libp2p.relay.circuit_v2.protocol").setLevel(logging.CRITICAL)
logging.getLogger("libp2p.relay.circuit_v2.transport").setLevel(logging.CRITICAL)
logging.getLogger("libp2p.relay.circuit_v2.dcutr").setLevel(logging.ERROR)
logging.getLogger("libp2p.host.autonat").setLevel(logging.CRITICAL)

DIAL_BACK_TIMEOUT_S = 5.0  # one AutoNAT dial-back (TCP connect + Noise handshake)
MAX_DIAL_BACK_ADDRS = 4  # addresses one AutoNAT request may make us dial


@dataclass(frozen=True)
class NatOptions:
    """The ``[relay]`` section of config.toml (node/config.py documents each key)."""

    service: bool = False
    max_reservations: int = 64
    max_circuits: int = 16
    max_circuit_bytes: int = 1 << 30
    max_circuit_duration_s: int = 3600
    reservation_ttl_s: int = 3600
    reachability: str = "auto"
    relays: tuple[str, ...] = ()
    max_relays: int = 2
    autonat_confirmations: int = 2
    # Seconds. The deadlines of one AutoNAT question, one reservation, one dial through a
    # relay (two handshakes, one through the relay).
    autonat_query_timeout_s: float = 10.0
    reserve_timeout_s: float = 10.0
    relay_dial_timeout_s: float = 15.0
    # Reachability and reservations are checked every check_interval_s while unknown or
    # none is held, every settled_interval_s once settled; known reachability is asked
    # again every recheck_reachability_s (each answer costs every server a dial-back, and
    # our swarm logs the dial-back's unfinished upgrade as an error).
    check_interval_s: float = 2.0
    settled_interval_s: float = 30.0
    recheck_reachability_s: float = 300.0

    def limits(self) -> RelayLimits:
        return RelayLimits(duration=self.max_circuit_duration_s, data=self.max_circuit_bytes,
                           max_circuit_conns=self.max_circuits,
                           max_reservations=self.max_reservations,
                           reservation_ttl=self.reservation_ttl_s)


@dataclass
class NatMetrics:
    reachability: Gauge
    reservations: Gauge
    relay_dials: Counter
    upgrades: Counter

    @classmethod
    def create(cls, registry: CollectorRegistry) -> NatMetrics:
        return cls(
            reachability=Gauge("iollm_reachability",
                               "what AutoNAT (or the config) says of this node: 0 unknown, "
                               "1 public, 2 private", registry=registry),
            reservations=Gauge("iollm_relay_reservations",
                               "relay slots this node holds (it is reachable through them)",
                               registry=registry),
            relay_dials=Counter("iollm_relay_dials",
                                "dials through a relay after the direct dial failed, by result",
                                ["result"], registry=registry),
            upgrades=Counter("iollm_dcutr_upgrades",
                             "attempts to replace a relayed connection by a direct one, by "
                             "method (unilateral: a plain dial; holepunch: DCUtR's "
                             "synchronised dials) and result", ["method", "result"],
                             registry=registry),
        )


def is_circuit(addr: Any) -> bool:
    return "/p2p-circuit" in str(addr)


def _direct(conn: Any) -> bool:
    try:
        addrs = conn.get_transport_addresses()
    except Exception:
        return False
    return bool(addrs) and not any(is_circuit(a) for a in addrs)


def has_direct_connection(host: BasicHost, peer: ID) -> bool:
    return any(_direct(c) for c in host.get_network().connections.get(peer, []))


class DialBackAutoNAT(AutoNATService):
    """AutoNAT whose dial-back really dials (fix 2 in the module docstring)."""

    async def _try_dial(self, peer_id: ID, addrs: list[bytes]) -> bytes | None:
        swarm: Any = self.host.get_network()
        for raw in addrs[:MAX_DIAL_BACK_ADDRS]:
            try:
                addr = multiaddr.Multiaddr(raw)
            except Exception:
                continue
            transport = None if is_circuit(addr) else \
                swarm.transport_manager.transport_for_dialing(addr)
            if transport is None:
                continue
            try:
                with trio.fail_after(DIAL_BACK_TIMEOUT_S):
                    raw_conn = await transport.dial(addr)
                    try:
                        secured = await swarm.upgrader.upgrade_security(raw_conn, True, peer_id)
                        await secured.close()
                    finally:
                        await raw_conn.close()
                return raw
            except Exception as exc:
                log.debug("AutoNAT dial-back to %s at %s failed: %r", peer_id, addr, exc)
        return None


class ConnectedRelayResources(RelayResourceManager):
    """The relay's slots, freed when their holder disconnects (fix 5)."""

    def _clean_expired(self) -> None:
        super()._clean_expired()
        for peer in [p for p in self._reservations if not self._is_peer_connected(p)]:
            del self._reservations[peer]


class CountedDCUtR(DCUtRProtocol):
    """The library's DCUtR, counting each upgrade attempt and its result."""

    metrics: NatMetrics  # set right after construction

    async def _try_unilateral_upgrade(self, peer_id: ID) -> bool:
        ok = await super()._try_unilateral_upgrade(peer_id)
        tried = any(not is_circuit(a) for a in self.host.get_peerstore().addrs(peer_id))
        if tried or ok:
            self.metrics.upgrades.labels("unilateral", "direct" if ok else "failed").inc()
        return ok

    async def _perform_hole_punch(self, peer_id: ID, addrs: list[multiaddr.Multiaddr],
                                  as_responder: bool = False) -> bool:
        ok = await super()._perform_hole_punch(peer_id, addrs, as_responder)
        self.metrics.upgrades.labels("holepunch", "direct" if ok else "failed").inc()
        return ok


class _DirectAddrsHost:
    """The host as DCUtR sees it: ``get_addrs`` lists the transport addresses (DCUtR binds
    its hole-punch dials to the listen port and predicts the NAT's mapping from it), the
    rest is the host itself."""

    def __init__(self, host: BasicHost) -> None:
        self._host = host

    def __getattr__(self, name: str) -> Any:
        return getattr(self._host, name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "_host":
            object.__setattr__(self, name, value)
        else:  # DCUtR registers itself on the host (its disconnect hook)
            setattr(self._host, name, value)

    def get_addrs(self) -> list[multiaddr.Multiaddr]:
        return list(self._host.get_transport_addrs())


def _install_relay_dialing(host: BasicHost, transport: CircuitV2Transport,
                           metrics: NatMetrics, timeout_s: float) -> None:
    """Fix 1: when the library's dial fails, dial the peer's circuit addresses."""
    swarm: Any = host.get_network()
    library_dial: Callable[[ID], Awaitable[list[Any]]] = swarm.dial_peer
    locks: dict[ID, trio.Lock] = {}

    async def dial_peer(peer_id: ID) -> list[Any]:
        try:
            return await library_dial(peer_id)
        except SwarmException as direct_error:
            circuits = [a for a in host.get_peerstore().addrs(peer_id) if is_circuit(a)]
            if not circuits:
                raise
            lock = locks.setdefault(peer_id, trio.Lock())
            async with lock:  # two services dialing one peer: one relayed connection
                existing = [c for c in swarm.connections.get(peer_id, []) if not c.is_closed]
                if existing:
                    return existing
                for addr in circuits:
                    try:
                        with trio.fail_after(timeout_s):
                            conn = await transport.dial(addr)
                        metrics.relay_dials.labels("ok").inc()
                        return [conn]
                    except Exception as exc:
                        metrics.relay_dials.labels("failed").inc()
                        log.debug("dial of %s through %s failed: %r", peer_id, addr, exc)
            locks.pop(peer_id, None)
            raise SwarmException(f"unable to connect to {peer_id}: direct dial failed "
                                 f"({direct_error}) and so did every relay") from direct_error

    swarm.dial_peer = dial_peer


def _install_relayed_addrs(host: BasicHost, nat: NatService) -> None:
    """Fix 4: the host's address list is the relayed addresses while private with slots."""
    library_get_addrs = host.get_addrs

    def get_addrs() -> list[multiaddr.Multiaddr]:
        if nat.private and (relayed := nat.circuit_addrs()):
            return [multiaddr.Multiaddr(a) for a in relayed]
        return library_get_addrs()

    host.get_addrs = get_addrs  # type: ignore[method-assign]


@dataclass
class _Reservation:
    relay: ID
    expires: float  # wall-clock seconds (the relay's own expiry)
    addrs: list[str] = field(default_factory=list)  # our circuit addresses through it


class NatService:
    """Relay (stop, and hop if configured), AutoNAT and DCUtR for one host; for a private
    node, the reservations and the relayed addresses it advertises."""

    def __init__(self, host: BasicHost, options: NatOptions, registry: CollectorRegistry) -> None:
        if options.reachability not in REACHABILITY_MODES:
            raise ValueError(f"reachability must be one of {REACHABILITY_MODES}")
        self.host = host
        self.options = options
        self.metrics = NatMetrics.create(registry)
        self.relay = CircuitV2Protocol(host, options.limits(), allow_hop=options.service)
        self.relay.resource_manager = ConnectedRelayResources(options.limits(), host)
        # Stop role only: reservations are made here, not as a side effect of a dial (fix 3).
        self.transport = CircuitV2Transport(host, self.relay, RelayConfig(roles=RelayRole.STOP))
        self.autonat = DialBackAutoNAT(host, serve=True,
                                       confirmations=options.autonat_confirmations)
        self.dcutr = CountedDCUtR(_DirectAddrsHost(host))  # type: ignore[arg-type]
        self.dcutr.metrics = self.metrics
        self.status = {"public": AutoNATStatus.PUBLIC, "private": AutoNATStatus.PRIVATE}.get(
            options.reachability, AutoNATStatus.UNKNOWN)
        self.metrics.reachability.set(self.status)
        self.reservations: dict[ID, _Reservation] = {}
        self.configured_relays = [info_from_p2p_addr(multiaddr.Multiaddr(a))
                                  for a in options.relays]
        self._changed = trio.Event()
        _install_relay_dialing(host, self.transport, self.metrics,
                               options.relay_dial_timeout_s)
        _install_relayed_addrs(host, self)

    # -- what the rest of node/p2p reads ------------------------------------------------

    @property
    def private(self) -> bool:
        return self.status == AutoNATStatus.PRIVATE

    def circuit_addrs(self) -> list[str]:
        return [a for r in self.reservations.values() for a in r.addrs]

    async def wait_changed(self) -> None:
        """Return when reachability or the set of relayed addresses changes next."""
        await self._changed.wait()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    # -- service ------------------------------------------------------------------------

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        checked = -self.options.recheck_reachability_s
        while True:
            if self.options.reachability == "auto" and (
                    self.status == AutoNATStatus.UNKNOWN
                    or trio.current_time() - checked >= self.options.recheck_reachability_s):
                await self.check_reachability()
                if self.status != AutoNATStatus.UNKNOWN:
                    checked = trio.current_time()
            if self.private:
                await self.keep_reservations()
            elif self.reservations:
                self.reservations.clear()
                self.metrics.reservations.set(0)
                self._notify()
            settled = self.status != AutoNATStatus.UNKNOWN and (
                not self.private or len(self.reservations) >= self.options.max_relays)
            await trio.sleep(self.options.settled_interval_s if settled
                             else self.options.check_interval_s)

    def _direct_peers_speaking(self, protocol: str) -> list[ID]:
        peers = []
        for peer in self.host.get_connected_peers():
            if not has_direct_connection(self.host, peer):
                continue
            try:
                protocols = [str(p) for p in self.host.get_peerstore().get_protocols(peer)]
            except Exception:
                continue
            if protocol in protocols:
                peers.append(peer)
        return peers

    async def check_reachability(self) -> None:
        """Ask every directly connected AutoNAT server to dial us back (in parallel), then
        let the library's rule decide (``autonat_confirmations`` servers agreeing)."""
        servers = self._direct_peers_speaking(str(AUTONAT_PROTOCOL_ID))

        addrs = self.own_direct_addrs()

        async def ask(server: ID) -> None:
            try:
                await self.autonat.query_server(server, [a.to_bytes() for a in addrs],
                                                timeout=self.options.autonat_query_timeout_s)
            except Exception as exc:  # the server's fault, not a verdict about us
                log.debug("AutoNAT query to %s failed: %r", server, exc)

        async with trio.open_nursery() as nursery:
            for server in servers:
                nursery.start_soon(ask, server)
        before = self.status
        self.autonat.update_status()
        self.status = self.autonat.get_status()
        if self.status != before:
            log.info("reachability: %s (AutoNAT, %d servers)",
                     {0: "unknown", 1: "public", 2: "private"}[self.status],
                     len(self.autonat.dial_results))
            self.metrics.reachability.set(self.status)
            self._notify()

    def own_direct_addrs(self) -> list[multiaddr.Multiaddr]:
        """Our listen addresses and the addresses peers saw us at (identify), which the
        host does not advertise while it has relayed ones."""
        found = {str(a): a for a in self.host.get_transport_addrs()}
        manager = getattr(self.host, "_observed_addr_manager", None)
        if manager is not None:
            for a in manager.addrs(min_observers=1):
                found.setdefault(str(a), a)
        return [a for a in found.values() if not is_circuit(a)]

    def _relay_candidates(self) -> list[PeerInfo]:
        candidates = list(self.configured_relays)
        known = {c.peer_id for c in candidates}
        for peer in self._direct_peers_speaking(str(HOP_PROTOCOL_ID)):
            if peer not in known:
                candidates.append(PeerInfo(peer, []))
        return candidates

    async def keep_reservations(self) -> None:
        """Drop reservations whose relay went away or that near their end; reserve on
        new relays until ``max_relays`` are held."""
        now = time.time()
        for relay, held in list(self.reservations.items()):
            gone = not has_direct_connection(self.host, relay)
            if gone or held.expires - now < self.options.reservation_ttl_s / 2:
                del self.reservations[relay]
                if gone:
                    self._notify()
        changed = False
        for info in self._relay_candidates():
            if len(self.reservations) >= self.options.max_relays:
                break
            if info.peer_id in self.reservations:
                continue
            got = await self._reserve(info)
            if got is not None:
                self.reservations[info.peer_id] = got
                changed = True
        self.metrics.reservations.set(len(self.reservations))
        if changed:
            self._notify()

    async def _reserve(self, info: PeerInfo) -> _Reservation | None:
        stream = None
        try:
            with trio.fail_after(self.options.reserve_timeout_s):
                if info.addrs:
                    await self.host.connect(info)
                stream = await self.host.new_stream(info.peer_id, [HOP_PROTOCOL_ID])
                ok = await self.transport._make_reservation(stream, info.peer_id)
        except Exception as exc:
            log.debug("reservation on relay %s failed: %r", info.peer_id, exc)
            return None
        finally:
            if stream is not None:
                with trio.move_on_after(1):
                    await stream.close()
        if not ok:
            log.info("relay %s refused a reservation", info.peer_id)
            return None
        expires = float(self.transport._reservations.get(info.peer_id, 0))
        me = self.host.get_id().to_base58()
        relay = info.peer_id.to_base58()
        addrs = []
        for addr in self._relay_addrs(info.peer_id):
            text = str(addr).split("/p2p/")[0]
            addrs.append(f"{text}/p2p/{relay}/p2p-circuit/p2p/{me}")
        log.info("reserved a slot on relay %s (%d addresses, %.0f s)", relay, len(addrs),
                 expires - time.time())
        return _Reservation(info.peer_id, expires, addrs)

    def _relay_addrs(self, relay: ID) -> list[multiaddr.Multiaddr]:
        """The relay's dialable addresses: those of our direct connection to it first
        (what it is reachable at from here), then its advertised ones; loopback last."""
        seen: dict[str, multiaddr.Multiaddr] = {}
        for conn in self.host.get_network().connections.get(relay, []):
            if _direct(conn) and getattr(conn, "direction", "") == "outbound":
                for a in conn.get_transport_addresses():
                    seen.setdefault(str(a), a)
        for a in self.host.get_peerstore().addrs(relay):
            if not is_circuit(a) and "/tcp/" in str(a):
                seen.setdefault(str(a).split("/p2p/")[0], a)
        return sorted(seen.values(), key=lambda a: "/ip4/127." in str(a))[:4]
