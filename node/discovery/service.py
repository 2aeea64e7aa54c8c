"""Capability discovery: publish this node's signed record, answer and run queries.

One service (``Discovery.run``) in the daemon's nursery. It

* re-signs and publishes the capability record every ``refresh_interval_s``: as a DHT
  value under ``/iollm-cap/<hash>``, as provider records under each capability-class key
  (so "at least 24 GB" is one provider lookup, not a scan), and on the gossip topic
  (so replicas held by other nodes stay fresh: py-libp2p answers ``get_value`` from its
  local store first, and a stale copy would hide a newer one);
* answers ``/iollm/capability/1.0.0`` with the current signed record (fresh even where a
  DHT copy is stale);
* keeps a replica of every record it has seen, and pulls the records it lacks from a
  peer over ``/iollm/capability-sync/1.0.0`` when it joins and every ``sync_interval_s``
  (gossip is best-effort: py-libp2p drops what it cannot deliver in time);
* keeps the DHT routing table filled with connected peers and with the peers named in
  verified records (py-libp2p adds neither by itself, and drops a peer after one failed
  dial) and keeps dialling bootstrap peers with backoff.

Every record that comes in, from the DHT, a stream or gossip, is verified by
protocol.capability before it is used or stored. The decisions are protocol/'s; this
module only moves bytes and owns the timeouts.
"""

from __future__ import annotations

import itertools
import logging
import math
import random
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import trio
from nacl.signing import SigningKey
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from node.config import DiscoverySection
from node.identity import peer_id_of
from node.p2p import P2P, GossipMessage, PeerId, PeerInfo, ProtocolId, RecordValidator, Subscription
from node.p2p.framing import read_frame, reset_quietly, write_frame
from node.p2p.host import KAD_PROTOCOL_ID, BadMultiaddr, parse_multiaddr
from node.p2p.lookup import K, RoundTrips, Unresponsive, walk
from node.storage import Storage
from protocol.capability import (
    CAPABILITY_PROTOCOL_ID,
    MAX_ADDRS,
    MAX_CAPABILITY_BYTES,
    MAX_SYNC_RECORDS,
    MAX_SYNC_REQUEST_BYTES,
    STREAM_TIMEOUT_S,
    SYNC_PROTOCOL_ID,
    CapabilityRecord,
    EnvReport,
    SyncRequest,
    capability_classes,
    capability_dht_key,
    class_provider_key,
    decode_sync_request,
    matches,
    next_seq,
    query_class,
    select_best,
    sign_capability,
    sort_key,
    sync_answer,
    validate_dht_entry,
    verify_capability,
)
from protocol.errors import RemoteProtocolError

log = logging.getLogger(__name__)

CAPABILITY_PROTOCOL = ProtocolId(CAPABILITY_PROTOCOL_ID)
SYNC_PROTOCOL = ProtocolId(SYNC_PROTOCOL_ID)
CAPABILITY_TOPIC = "/iollm/capability/1"
SEQ_KEY = "capability.seq"
RECORD_PEER_ADDR_TTL_S = 3600  # peerstore lifetime of addresses taken from records


class _Step(NamedTuple):
    """One DHT step of publishing: ``fn(*args)``; paced steps wait for a provide slot."""

    what: str
    fn: Callable[..., Awaitable[Any]]
    args: tuple[Any, ...]
    paced: bool


@dataclass(frozen=True)
class PeerCapability:
    """A verified record and the envelope it came in (for storage and forwarding)."""

    record: CapabilityRecord
    envelope: bytes


class DiscoveryMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.published = Counter(
            "iollm_capability_published", "Capability records signed and published",
            registry=registry)
        self.rejected = Counter(
            "iollm_capability_rejected", "Capability records refused, by reason",
            ["reason"], registry=registry)
        self.query_seconds = Histogram(
            "iollm_capability_query_seconds", "Latency of capability queries",
            ["kind"], registry=registry)
        self.connected = Gauge(
            "iollm_connected_peers", "Peers with an open connection", registry=registry)
        self.routing_table = Gauge(
            "iollm_dht_routing_table_size", "Peers in the DHT routing table", registry=registry)


class CapabilityValidator(RecordValidator):
    """py-libp2p DHT validator for the ``/iollm-cap/`` namespace (protocol/ decides)."""

    def __init__(self, clock_ms: Callable[[], int], metrics: DiscoveryMetrics) -> None:
        self.clock_ms = clock_ms
        self.metrics = metrics

    def validate(self, key: str, value: bytes) -> None:
        try:
            validate_dht_entry(key, value, self.clock_ms())
        except RemoteProtocolError as exc:
            self.metrics.rejected.labels(exc.reason).inc()
            raise

    def select(self, key: str, values: list[bytes]) -> int:
        return select_best(values, self.clock_ms())


class Discovery:
    def __init__(
        self,
        net: P2P,
        key: SigningKey,
        storage: Storage,
        config: DiscoverySection,
        env: EnvReport,
        *,
        software: str,
        clock_ms: Callable[[], int],
        metrics: DiscoveryMetrics,
        bootstrap: Sequence[PeerInfo] = (),
        rng: random.Random | None = None,
        name: str = "",
    ) -> None:
        self.net = net
        self.key = key
        self.storage = storage
        self.config = config
        self.env = env
        self.software = software
        self.name = name  # [node] name, carried in the capability record
        self.clock_ms = clock_ms
        self.metrics = metrics
        self.bootstrap = list(bootstrap)
        self.rng = rng or random.Random()
        self.peer_id = peer_id_of(key)
        self.current: PeerCapability | None = None
        self.bootstrapped = trio.Event()
        self.routing_rounds = 0  # passes of the routing-table upkeep (tests wait on it)
        self.published = trio.Event()  # set after the first network publish completes
        self.unresponsive = Unresponsive(for_s=config.unresponsive_for_s)
        self.round_trips = RoundTrips()  # of this node's DHT requests: when to hedge one
        # Every verified record this node holds (its own included), by peer id: the
        # answer to most queries, with no network round trip.
        self.replicas: dict[str, PeerCapability] = {}
        self._sync_limiter = trio.CapacityLimiter(config.sync_serve_concurrency)

    # -- service -----------------------------------------------------------------------

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        self.net.serve(CAPABILITY_PROTOCOL, self._serve_record, 0)  # it only writes
        self.net.serve(SYNC_PROTOCOL, self._serve_sync, MAX_SYNC_REQUEST_BYTES)
        subscription = await self.net.subscribe(CAPABILITY_TOPIC, self._gossip_validator)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._receive_gossip, subscription)
            nursery.start_soon(self._maintain_routing)
            for info in self.bootstrap:
                nursery.start_soon(self._keep_bootstrap, info)
            if not self.bootstrap:
                self.bootstrapped.set()
            await self._restore()
            nursery.start_soon(self._redial_known_peers)
            nursery.start_soon(self._repeat_gossip)
            nursery.start_soon(self._repeat_sync)
            # The record is signed and stored locally first, so the node answers queries
            # about itself at once; the network side of publishing follows in background.
            await self._sign_current()
            task_status.started()
            while True:
                nursery.start_soon(self._publish_network)
                # A node that finds itself behind NAT, or gets a relay slot, re-signs at
                # once: its record must carry the addresses it is reachable at.
                with trio.move_on_after(self.config.refresh_interval_s):
                    await self.net.wait_addrs_changed()
                await self.storage.prune_capabilities(self.clock_ms())
                await self._sign_current()

    async def _sign_current(self) -> None:
        now = self.clock_ms()
        # Committed before use, so seq keeps increasing across restarts and crashes (and
        # next_seq's time floor keeps it increasing even if the database is lost).
        previous = await self.storage.kv_get(SEQ_KEY)
        seq = next_seq(previous if isinstance(previous, int) else None, now)
        await self.storage.kv_set(SEQ_KEY, seq)
        record = CapabilityRecord(
            peer_id=self.peer_id,
            addrs=tuple(self.net.listen_addrs()[:MAX_ADDRS]),  # loopback sorts last
            software=self.software,
            seq=seq,
            created_ms=now,
            expires_ms=now + int(self.config.record_ttl_s * 1000),
            env=self.env,
            name=self.name,
        )
        envelope = sign_capability(self.key, record)
        self.current = PeerCapability(record, envelope)
        await self.storage.put_capability(self.peer_id, seq, record.expires_ms, envelope)
        self._store_replica(record, envelope)
        self.metrics.published.inc()

    async def _publish_network(self) -> None:
        """Put the DHT value and gossip at once, provide the class keys paced; each step
        bounded by the query timeout. A DHT step that failed is tried again after
        ``retry_interval_s``, 2x and 4x that (the next refresh repeats them all anyway):
        one dropped ADD_PROVIDER would otherwise hide this node from a class for a
        whole refresh interval."""
        mine = self.current
        assert mine is not None
        await self.bootstrapped.wait()
        if self.current is not mine:
            # Re-signed while waiting: the newer record's own publish does it all, and
            # sets ``published`` (every re-sign is followed by a publish, in ``run``).
            return
        classes = capability_classes(self.env)
        generic = [c for c in classes if not c.startswith("gpu-mem-")]
        # The most selective class first.
        ordered = generic + [c for c in reversed(classes) if c.startswith("gpu-mem-")]
        steps = [_Step("DHT put of the capability record", self._put_current, (), paced=False)]
        steps += [_Step(f"providing class {name}", self.net.provide,
                        (class_provider_key(name),), paced=True) for name in ordered]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._attempt, "gossip of the capability record",
                               self.net.publish, CAPABILITY_TOPIC, mine.envelope)
            failed = await self._run_steps(steps)
        self.published.set()
        for retry in range(self.config.publish_retries):
            if not failed:
                return
            await trio.sleep(self.config.retry_interval_s * 2**retry)
            if self.current is not mine:
                return  # re-signed meanwhile: as above
            failed = await self._run_steps(failed)
        for step in failed:
            log.warning("%s failed %d times; the next refresh tries again", step.what,
                        self.config.publish_retries + 1)

    async def _put_current(self) -> None:
        """Put the record this node holds at this moment, not the one a publish began
        with: py-libp2p refuses (ValueError) to put a value older than the one in its own
        store, and a re-sign stores the newer record there at once, so a retry of the
        older one failed every time (seen on a 30-host testnet)."""
        assert self.current is not None
        await self.net.put_value(capability_dht_key(self.peer_id), self.current.envelope)

    async def _run_steps(self, steps: list[_Step]) -> list[_Step]:
        """Run DHT publish steps (the put at once, each provide in the node's next provide
        slot: ``Network.provide_slot``, py-libp2p drops ADD_PROVIDER beyond 10 per sender
        per 10 s, and a node has up to 15 classes); the steps that failed."""
        failed: list[_Step] = []

        async def one(step: _Step) -> None:
            if not await self._attempt(step.what, step.fn, *step.args):
                failed.append(step)

        async with trio.open_nursery() as nursery:
            for step in steps:
                if step.paced:
                    await self.net.provide_slot()
                nursery.start_soon(one, step)
        return failed

    async def _attempt(self, what: str, fn: Callable[..., Awaitable[Any]], *args: Any) -> bool:
        """Whether ``fn(*args)`` finished in time without an error or a False result."""
        started = trio.current_time()
        ok = False
        with trio.move_on_after(self.config.query_timeout_s):
            try:
                ok = await fn(*args) is not False
            except Exception as exc:
                log.info("%s failed: %r", what, exc)
        log.debug("%s took %.3f s (%s)", what, trio.current_time() - started,
                  "done" if ok else "failed")
        return ok

    def _store_replica(self, record: CapabilityRecord, envelope: bytes) -> None:
        """Keep a verified record as the replica of its peer, and put it in the local DHT
        store, which serves it to GET_VALUE until the record expires (the store's validity
        is wall-clock seconds). The peer's signed addresses go to the peerstore, so the
        routing table can be refilled from records after py-libp2p dropped peers."""
        self.replicas[record.peer_id] = PeerCapability(record, envelope)
        self.net.store_value(capability_dht_key(record.peer_id).encode(), envelope,
                             record.expires_ms / 1000)
        if record.peer_id != self.peer_id:
            addrs = []
            for text in record.addrs:
                try:
                    addrs.append(parse_multiaddr(text))
                except BadMultiaddr:
                    continue  # the validator does not parse addresses; a bad one is skipped
            if addrs:
                self.net.add_addrs(PeerId.from_base58(record.peer_id), addrs,
                                   RECORD_PEER_ADDR_TTL_S)

    async def _restore(self) -> None:
        """After a restart: put the stored, still valid records of other nodes back into
        the local DHT store, so queries are answered before the network catches up."""
        for row in await self.storage.list_capabilities(self.clock_ms()):
            cap = self._verify(row.envelope, row.peer_id)
            if cap is not None and row.peer_id != self.peer_id:
                self._store_replica(cap.record, row.envelope)

    async def _redial_known_peers(self) -> None:
        """Dial the most recently seen peers once each, so a restarted node rejoins even
        while its bootstrap peers are down."""
        rows = (await self.storage.list_peers())[:self.config.known_peers_redial]

        async def dial(peer_id: str, addrs: list[str]) -> None:
            good = []
            for text in addrs:
                try:
                    good.append(parse_multiaddr(text))
                except BadMultiaddr:
                    log.debug("skipping bad stored address %r of %s", text, peer_id)
            try:
                info = PeerInfo(PeerId.from_base58(peer_id), good)
                await self.net.connect(info, timeout=self.config.query_timeout_s)
            except Exception as exc:
                log.debug("known peer %s not reachable: %r", peer_id, exc)
                return
            self.bootstrapped.set()

        async with trio.open_nursery() as nursery:
            for row in rows:
                if row.peer_id != self.peer_id and row.addrs:
                    nursery.start_soon(dial, row.peer_id, row.addrs)

    async def _repeat_gossip(self) -> None:
        """Re-announce the current record: soon after start (the gossip mesh takes a few
        heartbeats to form, and py-libp2p drops what it cannot deliver), then every
        ``gossip_interval_s``. Announcements are idempotent: receivers keep the highest seq."""
        await self.bootstrapped.wait()
        startup = [b - a for a, b in itertools.pairwise((0.0, *self.config.gossip_startup_s))]
        steady = itertools.repeat(self.config.gossip_interval_s)
        for delay in itertools.chain(startup, steady):
            await trio.sleep(delay)
            if self.current is None:
                continue
            with trio.move_on_after(self.config.query_timeout_s):
                try:
                    await self.net.publish(CAPABILITY_TOPIC, self.current.envelope)
                except Exception as exc:
                    log.info("gossip of the capability record failed: %r", exc)

    async def _keep_bootstrap(self, info: PeerInfo) -> None:
        """Dial a bootstrap peer until connected, with capped exponential backoff;
        redial if the connection drops."""
        delay = 1.0
        while True:
            if info.peer_id in self.net.connected_peers():
                await trio.sleep(5)
                continue
            try:
                await self.net.connect(info, timeout=self.config.query_timeout_s)
            except Exception as exc:
                log.warning("bootstrap peer %s unreachable (%s); retrying in %.0f s",
                            info.peer_id, type(exc).__name__, delay)
                await trio.sleep(delay)
                delay = min(delay * 2, 60.0)
                continue
            delay = 1.0
            log.info("connected to bootstrap peer %s", info.peer_id)
            with trio.move_on_after(self.config.query_timeout_s):
                await self.net.refresh_routing_table()
            self.bootstrapped.set()

    async def _maintain_routing(self) -> None:
        """Add connected peers to the routing table, and while it holds fewer than K peers
        also the peers of verified records (py-libp2p drops a peer from the table after one
        failed dial, which under load leaves a node knowing nobody but its bootstrap peer):
        fast at first, then slowly."""
        period = 0.5
        while True:
            # A connected peer enters the table only once identify shows it serves the DHT:
            # any libp2p peer may connect, and one that does not speak Kademlia would be
            # handed out in FIND_NODE answers. Peers of verified records are iollm nodes.
            candidates = [p for p in self.net.connected_peers()
                          if self.net.speaks(p, KAD_PROTOCOL_ID)]
            if self.net.routing_table_size() < K:
                candidates += [PeerId.from_base58(pid) for pid in self.replicas
                               if pid != self.peer_id]
            for peer in candidates:
                if not self.net.in_routing_table(peer):
                    with trio.move_on_after(self.config.query_timeout_s):
                        try:
                            await self.net.add_to_routing_table(peer)
                        except Exception as exc:
                            log.debug("add_peer %s failed: %r", peer, exc)
            self.metrics.connected.set(len(self.net.connected_peers()))
            self.metrics.routing_table.set(self.net.routing_table_size())
            self.routing_rounds += 1
            await trio.sleep(period)
            period = min(period * 2, 30.0)

    # -- serving --------------------------------------------------------------------------

    async def _serve_record(self, stream: Any) -> None:
        try:
            if self.current is None:
                await reset_quietly(stream)
                return
            await write_frame(stream, self.current.envelope, self.config.query_timeout_s)
            await stream.close()
        except Exception as exc:
            log.debug("serving capability record failed: %r", exc)
            await reset_quietly(stream)

    async def _serve_sync(self, stream: Any) -> None:
        """Answer one sync request: the matching records, one frame each, newest first,
        then an empty frame."""
        timeout = min(self.config.query_timeout_s, STREAM_TIMEOUT_S)
        try:
            request = decode_sync_request(
                await read_frame(stream, MAX_SYNC_REQUEST_BYTES, timeout))
            with trio.fail_after(timeout):
                await self._sync_limiter.acquire()
            try:
                records = {c.record.peer_id: c for c in self.live_records()}
                chosen = sync_answer([c.record for c in records.values()], request,
                                     self.clock_ms())
                for record in chosen:
                    await write_frame(stream, records[record.peer_id].envelope, timeout)
                await write_frame(stream, b"", timeout)
            finally:
                self._sync_limiter.release()
            await stream.close()
        except Exception as exc:  # a bad request, a slow or vanished peer: drop the stream
            log.debug("serving a record sync failed: %r", exc)
            await reset_quietly(stream)

    async def sync_from(self, peer: PeerId, since_ms: int = 0) -> int:
        """Pull the records ``peer`` holds (created at or after ``since_ms``) and keep the
        valid ones that are newer than ours. Returns how many were new; raises nothing
        (a failed sync is logged and counts 0)."""
        timeout = min(self.config.query_timeout_s, STREAM_TIMEOUT_S)
        stream = None
        new = 0
        try:
            with trio.fail_after(timeout):
                stream = await self.net.open_stream(peer, SYNC_PROTOCOL)
            request = SyncRequest(since_ms=since_ms, limit=MAX_SYNC_RECORDS)
            await write_frame(stream, request.encode(), timeout)
            for _ in range(MAX_SYNC_RECORDS):
                data = await read_frame(stream, MAX_CAPABILITY_BYTES, timeout)
                if not data:
                    break
                try:
                    record = verify_capability(data, self.clock_ms())
                except RemoteProtocolError as exc:
                    self.metrics.rejected.labels(exc.reason).inc()
                    continue  # one bad record does not spoil the others
                if record.peer_id == self.peer_id:
                    continue
                known = self.local_record(record.peer_id)
                if known is None or known.record.seq < record.seq:
                    new += 1
                    await self._remember(PeerCapability(record, data))
            await stream.close()
        except Exception as exc:
            log.debug("record sync from %s failed after %d new records: %r", peer, new, exc)
            if stream is not None:
                await reset_quietly(stream)
        return new

    async def _repeat_sync(self) -> None:
        """Pull records from a peer: from the bootstrap peers first, a few times soon after
        joining, then every sync_interval_s from one random connected peer."""
        await self.bootstrapped.wait()
        startup = [b - a for a, b in itertools.pairwise((0.0, *self.config.sync_startup_s))]
        steady = itertools.repeat(self.config.sync_interval_s)
        bootstrap = [info.peer_id for info in self.bootstrap]
        for round_, delay in enumerate(itertools.chain(startup, steady)):
            await trio.sleep(delay)
            connected = self.net.connected_peers()
            if not connected:
                continue
            preferred = [p for p in bootstrap if p in connected]
            peer = preferred[0] if round_ == 0 and preferred else self.rng.choice(connected)
            await self.sync_from(peer)

    def _gossip_validator(self, sender: PeerId, message: GossipMessage) -> bool:
        """Gossip verdict: accept only a valid record signed by the message's author."""
        try:
            record = verify_capability(message.data, self.clock_ms())
        except RemoteProtocolError as exc:
            self.metrics.rejected.labels(exc.reason).inc()
            return False
        return message.from_peer is not None and record.peer_id == message.from_peer.to_base58()

    async def _receive_gossip(self, subscription: Subscription) -> None:
        while True:
            message = await subscription.get()
            try:
                record = verify_capability(message.data, self.clock_ms())
            except RemoteProtocolError:
                continue  # the topic validator already counted it
            if record.peer_id == self.peer_id:
                continue
            await self._remember(PeerCapability(record, message.data))

    async def _remember(self, cap: PeerCapability) -> None:
        """Keep a verified record: SQLite for restarts, the replica and the DHT store."""
        record = cap.record
        old = self.local_record(record.peer_id)
        if old is None or (old.envelope != cap.envelope
                           and select_best([cap.envelope, old.envelope], self.clock_ms()) == 0):
            self._store_replica(record, cap.envelope)
        if await self.storage.put_capability(record.peer_id, record.seq, record.expires_ms,
                                             cap.envelope):
            await self.storage.upsert_peer(record.peer_id, list(record.addrs), self.clock_ms())

    # -- queries --------------------------------------------------------------------------

    def _verify(self, data: bytes | None, peer_id: str) -> PeerCapability | None:
        if data is None:
            return None
        try:
            record = verify_capability(data, self.clock_ms(), expected_peer_id=peer_id)
        except RemoteProtocolError as exc:
            self.metrics.rejected.labels(exc.reason).inc()
            return None
        return PeerCapability(record, data)

    async def fetch_direct(self, peer_id: str) -> PeerCapability | None:
        """Ask the peer itself for its current record over ``/iollm/capability/1.0.0``."""
        timeout = min(self.config.query_timeout_s, STREAM_TIMEOUT_S)
        stream = None
        try:
            with trio.fail_after(timeout):
                stream = await self.net.open_stream(PeerId.from_base58(peer_id),
                                                    CAPABILITY_PROTOCOL)
            data = await read_frame(stream, MAX_CAPABILITY_BYTES, timeout)
            await stream.close()
        except Exception as exc:  # TooSlowError, FrameError, any stream failure
            log.debug("direct capability fetch from %s failed: %r", peer_id, exc)
            if stream is not None:
                await reset_quietly(stream)
            return None
        return self._verify(data, peer_id)

    async def record_from_network(self, peer_id: str) -> PeerCapability | None:
        """The best verified record of ``peer_id`` held by the peers closest to its DHT key.

        py-libp2p's ``get_value`` answers from the local store whenever it holds any copy,
        so a stale local copy would hide a newer one; this always asks the network."""
        key = capability_dht_key(peer_id).encode()

        async def get_value(peer: PeerId) -> tuple[PeerCapability | None, list[PeerId]]:
            value, closer = await self.net.value_from_peer(peer, key)
            return (self._verify(value, peer_id) if value is not None else None), closer

        # value_quorum valid copies end the walk: waiting for all k closest peers to answer
        # made every query cost the slowest of ~20 peers (bench/wan.py, RESULTS.md). So
        # does value_grace_s after the first copy: on a loaded machine the third copy
        # could take seconds longer than the first, and the copies are almost always the
        # same (gossip keeps replicas fresh; the latest record is the direct stream's).
        result = await walk(self.net, key, get_value, rpc_timeout=self.config.rpc_timeout_s,
                            timeout=self.config.query_timeout_s, unresponsive=self.unresponsive,
                            hedge_after=self.config.hedge_after_s,
                            round_trips=self.round_trips,
                            enough=lambda answers: len(answers) >= self.config.value_quorum,
                            grace=self.config.value_grace_s)
        caps = [c for _, c in result.answers]
        if not caps:
            return None
        return max(caps, key=lambda c: (c.record.seq, c.record.created_ms))

    def name_of(self, peer_id: str) -> str:
        """The name in ``peer_id``'s unexpired record held here (this node's own too);
        "" when it has none or none is held. For display only: it is the peer's claim."""
        if peer_id == self.peer_id:
            return self.name
        cap = self.local_record(peer_id)
        return cap.record.name if cap is not None else ""

    def local_record(self, peer_id: str) -> PeerCapability | None:
        """The unexpired replica of ``peer_id``'s record, if any. A value that a peer PUT
        into the local DHT store directly (verified by the DHT validator) counts too."""
        now = self.clock_ms()
        cap = self.replicas.get(peer_id)
        if cap is not None and cap.record.expires_ms > now:
            return cap
        stored = self._verify(self.net.local_value(capability_dht_key(peer_id).encode()), peer_id)
        if stored is not None:
            self.replicas[peer_id] = stored
        elif cap is not None:
            del self.replicas[peer_id]  # expired, and nothing newer arrived
        return stored

    def live_records(self) -> list[PeerCapability]:
        """Every unexpired replica, this node's own record included."""
        now = self.clock_ms()
        return [c for c in self.replicas.values() if c.record.expires_ms > now]

    async def record_of(self, peer_id: str) -> PeerCapability | None:
        """A verified, unexpired record of ``peer_id``: the local replica (kept fresh by
        gossip), else the DHT, else the peer itself. ``None`` when none of them has one."""
        if peer_id == self.peer_id:
            return self.current
        cap = self.local_record(peer_id)
        if cap is not None:
            return cap
        cap = await self.record_from_network(peer_id) or await self.fetch_direct(peer_id)
        if cap is not None:
            await self._remember(cap)
        return cap

    async def find_providers(self, key_hex: str) -> list[PeerInfo]:
        """All providers of a key: the local store merged with the closest peers' answers.

        py-libp2p's own ``find_providers`` returns the local store alone whenever it is
        non-empty, and may return duplicates; this asks the network every time."""
        key = bytes.fromhex(key_hex)
        found: dict[PeerId, PeerInfo] = {p.peer_id: p for p in self.net.local_providers(key)}

        async def get_providers(peer: PeerId) -> tuple[list[PeerInfo] | None, list[PeerId]]:
            return await self.net.providers_from_peer(peer, key, self.config.max_providers)

        result = await walk(self.net, key, get_providers, rpc_timeout=self.config.rpc_timeout_s,
                            timeout=self.config.query_timeout_s, unresponsive=self.unresponsive,
                            hedge_after=self.config.hedge_after_s,
                            round_trips=self.round_trips)
        for _, providers in result.answers:
            for info in providers:
                found.setdefault(info.peer_id, info)
        for info in found.values():
            if info.addrs:
                self.net.add_addrs(info.peer_id, info.addrs, RECORD_PEER_ADDR_TTL_S)
        return list(found.values())

    async def records_of(self, peer_ids: Sequence[str]) -> list[PeerCapability]:
        results: list[PeerCapability] = []
        limiter = trio.CapacityLimiter(self.config.fetch_concurrency)

        async def one(pid: str) -> None:
            async with limiter:
                cap = await self.record_of(pid)
            if cap is not None:
                results.append(cap)

        async with trio.open_nursery() as nursery:
            for pid in dict.fromkeys(peer_ids):
                nursery.start_soon(one, pid)
        return results

    async def query_gpus(self, *, min_vram_gb: float | None = None,
                         min_tflops: float | None = None) -> list[CapabilityRecord]:
        """Verified records of every node meeting the filters, most capable first."""
        for value in (min_vram_gb, min_tflops):
            if value is not None and (not math.isfinite(value) or value < 0):
                raise ValueError("filters must be non-negative numbers")
        with self.metrics.query_seconds.labels("gpus").time():
            # The replicas answer at once; the class's provider records add the nodes
            # whose records have not reached this node (yet), fetched one by one.
            known = {c.record.peer_id: c for c in self.live_records()}
            providers = await self.find_providers(class_provider_key(query_class(min_vram_gb)))
            missing = [pid for p in providers if (pid := p.peer_id.to_base58()) not in known]
            for cap in await self.records_of(missing):
                known.setdefault(cap.record.peer_id, cap)
        records = [c.record for c in known.values()
                   if matches(c.record, min_vram_gb=min_vram_gb, min_tflops=min_tflops)]
        return sorted(records, key=sort_key)

    async def connected_peers(self) -> list[tuple[str, CapabilityRecord | None]]:
        peers = [p.to_base58() for p in self.net.connected_peers()]
        caps = {c.record.peer_id: c.record for c in await self.records_of(peers)}
        return [(p, caps.get(p)) for p in sorted(peers)]
