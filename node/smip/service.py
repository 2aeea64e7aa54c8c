"""SMIP: publish, announce, serve and fetch model and dataset versions (specs/smip.md).

One service (``Models.run``) in the daemon's nursery. It

* serves ``/iollm/smip/1.0.0``: manifests, leaf layers and chunks of what the node holds
  complete, and its own announcements (``list``) for nodes that join late;
* announces every version it holds complete on the gossip topic, 1, 2 and 5 s after it
  starts providing it and every ``ANNOUNCE_REFRESH_MS``, and keeps the verified
  announcements of other nodes (one per provider and version, replays harmless);
* provides the version key and the shard keys on the DHT, in the node's provide slots;
* publishes local files (``publish``) and fetches versions (``fetch``, in node/smip/fetch.py):
  manifest from any provider, then verified chunks from every provider at once, resumable.

Bytes from the network are checked by protocol/smip/ and protocol/hashtree.py before use;
this module moves them and owns the timeouts. Nothing from the network is ever unpickled:
model files are safetensors, checked before they are stored.
"""

from __future__ import annotations

import itertools
import json
import logging
import random
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio
from nacl.signing import SigningKey
from prometheus_client import CollectorRegistry, Counter

from node.config import SmipSection
from node.discovery.service import Discovery
from node.p2p import P2P, GossipMessage, PeerId
from node.p2p.framing import (
    READ_AHEAD_BYTES,
    FrameEnded,
    FrameError,
    FrameReader,
    frame_prefix,
    reset_quietly,
    write_bulk,
    write_frame,
)
from node.smip.fetch import SmipClient, check_kind, fetch_manifest, fetch_version
from node.smip.store import ContentStore, ContentStoreError, NotInStore
from node.smip.types import (
    SMIP_PROTOCOL,
    FetchError,
    HeldVersion,
    Progress,
    PublishError,
    UnknownVersion,
    VersionInfo,
)
from node.storage import ManifestRow, Storage
from protocol.capability import next_seq
from protocol.errors import ProtocolError, RemoteProtocolError
from protocol.smip import (
    ACCEPT,
    ANNOUNCE_REFRESH_MS,
    ANNOUNCE_TOPIC,
    MAX_CONFIG_BYTES,
    MAX_REQUEST_BYTES,
    MAX_SHARDS,
    REPROVIDE_INTERVAL_MS,
    RESPONSE_TIMEOUT_S,
    STATUS_BAD_REQUEST,
    STATUS_BUSY,
    STATUS_INTERNAL,
    STATUS_NOT_FOUND,
    STATUS_OK,
    STREAM_IDLE_TIMEOUT_S,
    Announcement,
    ChunkRequest,
    LeavesRequest,
    ListRequest,
    Manifest,
    ManifestRequest,
    Request,
    ResponseHeader,
    ShardEntry,
    build_manifest,
    check_path,
    choose_chunk_size,
    decode_request,
    encode_list_payload,
    encode_response_header,
    id_hex,
    judge_announcement,
    lineage,
    new_announcement,
    new_shards,
    open_manifest,
    payload_deadline_s,
    select_list,
    shard_provider_key,
    sign_announcement,
    sign_manifest,
    version_provider_key,
)

log = logging.getLogger(__name__)

ANNOUNCE_SEQ_KEY = "smip.announce.seq"
# Weights in pickle-based formats can run code when loaded: never published, never fetched.
PICKLE_SUFFIXES = frozenset({".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib"})


class ModelsMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.served = Counter("iollm_smip_served_bytes", "payload bytes served, by request kind",
                              ["op"], registry=registry)
        self.fetched = Counter("iollm_smip_fetched_bytes", "verified chunk bytes fetched",
                               registry=registry)
        self.duplicates = Counter("iollm_smip_duplicate_bytes",
                                  "chunk bytes that arrived after another copy (end game)",
                                  registry=registry)
        self.dropped = Counter("iollm_smip_providers_dropped",
                               "providers dropped from a fetch, by reason", ["reason"],
                               registry=registry)
        self.announcements = Counter("iollm_smip_announcements",
                                     "announcements received, by verdict", ["verdict"],
                                     registry=registry)


# --- checking local files before they are published ---------------------------------------


def check_safetensors(path: Path) -> None:
    """PublishError unless ``path`` is a well-formed safetensors file: header length, JSON
    header, every tensor's dtype, shape and offsets inside the file (the safetensors
    library checks them when it opens the file; no tensor data is read)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            f.keys()
    except Exception as exc:  # the library raises its own error types and OSError
        raise PublishError(f"{path} is not a valid safetensors file: {exc}") from None


def collect_files(path: Path, kind: str) -> tuple[list[tuple[str, Path]], dict[str, Any]]:
    """The files to publish as ``(manifest path, file)``, sorted, and the manifest config.

    A model is one ``.safetensors`` file, or a directory (Hugging Face layout) holding at
    least one ``.safetensors`` file and a ``config.json`` object, which also becomes the
    manifest's config; other files of the directory (tokenizer, ...) travel along. A
    dataset is a file or a directory of files. Hidden files are skipped; pickle-based
    weights are refused."""
    if kind not in ("model", "dataset"):
        raise PublishError(f"kind must be 'model' or 'dataset', not {kind!r}")
    if not path.exists():
        raise PublishError(f"{path} does not exist")
    if path.is_file():
        files = [(path.name, path)]
    elif path.is_dir():
        files = sorted((p.relative_to(path).as_posix(), p) for p in path.rglob("*")
                       if p.is_file() and not any(part.startswith(".")
                                                  for part in p.relative_to(path).parts))
    else:
        raise PublishError(f"{path} is neither a file nor a directory")
    if not files:
        raise PublishError(f"{path} holds no files to publish")
    if len(files) > MAX_SHARDS:
        raise PublishError(f"{path} holds {len(files)} files; a version has at most {MAX_SHARDS}")
    for rel, file in files:
        try:
            check_path(rel)
        except ProtocolError as exc:
            raise PublishError(f"cannot publish {file}: {exc}") from None
    config: dict[str, Any] = {}
    if kind == "model":
        pickled = [rel for rel, _ in files if Path(rel).suffix.lower() in PICKLE_SUFFIXES]
        if pickled:
            raise PublishError(f"refusing pickle-based weights {pickled[0]!r}: loading them can "
                               "run code; convert them to safetensors")
        weights = [(rel, p) for rel, p in files if rel.endswith(".safetensors")]
        if not weights:
            raise PublishError(f"{path} is not a .safetensors file and holds none")
        for _, file in weights:
            check_safetensors(file)
        if path.is_dir():
            config = _read_config(path / "config.json")
    return files, config


def _read_config(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise PublishError(f"a model directory needs a config.json ({path} is missing)")
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise PublishError(f"{path} is over {MAX_CONFIG_BYTES} bytes")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PublishError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise PublishError(f"{path} must hold a JSON object")
    return config


# --- the service -------------------------------------------------------------------------


@dataclass
class _Inflight:
    total: int = 0
    per_peer: dict[PeerId, int] = field(default_factory=dict)


class Models:
    def __init__(
        self,
        net: P2P,
        key: SigningKey,
        storage: Storage,
        store: ContentStore,
        discovery: Discovery,
        *,
        clock_ms: Callable[[], int],
        metrics: ModelsMetrics,
        tunables: SmipSection,
        rng: random.Random | None = None,
    ) -> None:
        """``tunables``: config.toml's [smip] section."""
        self.net = net
        self.tunables = tunables
        self.key = key
        self.storage = storage
        self.store = store
        self.discovery = discovery
        self.clock_ms = clock_ms
        self.metrics = metrics
        self.rng = rng or random.Random()
        self.peer_id = discovery.peer_id
        self.held: dict[bytes, HeldVersion] = {}
        # Other nodes' verified announcements, one per (provider, version).
        self.announcements: dict[tuple[str, bytes], Announcement] = {}
        self._inflight = _Inflight()
        self._nursery: trio.Nursery | None = None
        self._fetch_locks: dict[bytes, trio.Lock] = {}

    # -- service ------------------------------------------------------------------------

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        for row in await self.storage.list_manifests():
            try:
                manifest = open_manifest(row.envelope, bytes.fromhex(row.version))
            except RemoteProtocolError as exc:  # a damaged database row: fetch it again
                log.warning("dropping stored manifest %s: %s", row.version, exc)
                continue
            self.held[bytes.fromhex(row.version)] = HeldVersion(
                bytes.fromhex(row.version), row.envelope, manifest, row.state)
        # A request frame, and what the serving FrameReader may have read ahead of it.
        self.net.serve(SMIP_PROTOCOL, self._serve, MAX_REQUEST_BYTES + READ_AHEAD_BYTES)
        subscription = await self.net.subscribe(ANNOUNCE_TOPIC, self._gossip_validator)
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._receive_gossip, subscription)
            nursery.start_soon(self._ask_peers_for_versions)
            nursery.start_soon(self._refresh)
            task_status.started()
            await trio.sleep_forever()

    def _start_providing(self, held: HeldVersion) -> None:
        """A version became complete here: provide its keys, announce it (repeated)."""
        if self._nursery is not None:
            self._nursery.start_soon(self._provide_version, held)
            self._nursery.start_soon(self._announce_repeatedly, held)

    async def _refresh(self) -> None:
        """Provide and announce what is held complete at start, then keep both fresh."""
        await self.discovery.bootstrapped.wait()
        for held in list(self.held.values()):
            if held.state == "complete":
                self._start_providing(held)
        last_provide = self.clock_ms()
        while True:
            await trio.sleep(ANNOUNCE_REFRESH_MS / 1000)
            reprovide = self.clock_ms() - last_provide >= REPROVIDE_INTERVAL_MS
            for held in list(self.held.values()):
                if held.state != "complete":
                    continue
                await self._announce(held)
                if reprovide and self._nursery is not None:
                    self._nursery.start_soon(self._provide_version, held)
            if reprovide:
                last_provide = self.clock_ms()

    async def _provide_version(self, held: HeldVersion) -> None:
        keys = [version_provider_key(held.version)]
        keys += [shard_provider_key(r) for r in dict.fromkeys(s.root for s in held.manifest.shards)]
        async with trio.open_nursery() as nursery:
            for key in keys:
                await self.net.provide_slot()
                nursery.start_soon(self._provide_one, key)

    async def _provide_one(self, key: str) -> None:
        with trio.move_on_after(self.discovery.config.query_timeout_s):
            try:
                await self.net.provide(key)
            except Exception as exc:  # best-effort: the next reprovide repeats it
                log.info("providing %s failed: %r", key, exc)

    async def _announce(self, held: HeldVersion) -> None:
        previous = await self.storage.kv_get(ANNOUNCE_SEQ_KEY)
        now = self.clock_ms()
        seq = next_seq(previous if isinstance(previous, int) else None, now)
        await self.storage.kv_set(ANNOUNCE_SEQ_KEY, seq)  # committed before it is signed
        ann = new_announcement(provider=self.peer_id, manifest_bytes=held.envelope,
                               manifest=held.manifest, seq=seq, now_ms=now)
        held.announcement, held.announced = sign_announcement(self.key, ann), ann
        await self._gossip(held.announcement)

    async def _gossip(self, announcement: bytes) -> None:
        """Publish a signed announcement; best-effort (it is repeated, and `list` answers
        late joiners), so a failure or a stall is only logged."""
        with trio.move_on_after(self.discovery.config.query_timeout_s):
            try:
                await self.net.publish(ANNOUNCE_TOPIC, announcement)
            except Exception as exc:
                log.info("gossip of announcement failed: %r", exc)

    async def _announce_repeatedly(self, held: HeldVersion) -> None:
        await self._announce(held)
        repeats = (0.0, *self.tunables.announce_repeats_s)
        for delay in (b - a for a, b in itertools.pairwise(repeats)):
            await trio.sleep(delay)
            if held.announcement is not None:
                await self._gossip(held.announcement)

    # -- announcements from others -----------------------------------------------------

    def _judge(self, data: bytes) -> Announcement | None:
        def count(provider: str) -> int:
            return sum(1 for p, _ in self.announcements if p == provider)

        verdict = judge_announcement(data, self.clock_ms(), self.announcements, count)
        self.metrics.announcements.labels(verdict.action if verdict.action == ACCEPT
                                          else verdict.reason).inc()
        if verdict.action != ACCEPT or verdict.announcement is None:
            return None
        return verdict.announcement

    def _gossip_validator(self, sender: PeerId, message: GossipMessage) -> bool:
        """Accept only verified announcements signed by the message's author; repeats are
        dropped here, so gossipsub does not forward them again. py-libp2p runs this on our
        own publishes too: refusing those would keep them from ever leaving the node."""
        if message.from_peer is None:
            return False
        from_id = message.from_peer.to_base58()
        if from_id == self.peer_id:
            return True  # signed by us just now (node/smip/service.py _announce)
        ann = self._judge(message.data)
        if ann is None or ann.provider != from_id:
            return False
        self.announcements[ann.key] = ann
        return True

    async def _receive_gossip(self, subscription: Any) -> None:
        while True:
            await subscription.get()  # the validator stored what it accepted

    async def _ask_peers_for_versions(self) -> None:
        """Late joiners learn the versions announced before they came: ``list`` requests to
        a few connected peers, soon after joining."""
        await self.discovery.bootstrapped.wait()
        for delay in (b - a for a, b in itertools.pairwise((0.0, *self.tunables.list_startup_s))):
            await trio.sleep(delay)
            peers = self.net.connected_peers()
            self.rng.shuffle(peers)
            async with trio.open_nursery() as nursery:
                for peer in peers[:self.tunables.list_peers]:
                    nursery.start_soon(self.list_from, peer)

    async def list_from(self, peer: PeerId) -> int:
        """Page through ``peer``'s own announcements; returns how many were new. A peer
        whose answer fails its checks is logged and skipped."""

        new = 0
        try:
            async with SmipClient(self.net, peer, self.tunables) as client:
                request: ListRequest | None = ListRequest(limit=256)
                while request is not None:
                    page = await client.list(request, peer.to_base58(), self.clock_ms())
                    for ann in page.announcements:
                        if ann.provider != self.peer_id and \
                                self.announcements.get(ann.key) != ann:
                            current = self.announcements.get(ann.key)
                            if current is None or (ann.seq, ann.created_ms) > \
                                    (current.seq, current.created_ms):
                                self.announcements[ann.key] = ann
                                new += 1
                    request = page.next
        except Exception as exc:
            log.debug("list from %s failed: %r", peer, exc)
        return new

    def providers_of(self, version: bytes) -> list[PeerId]:
        now = self.clock_ms()
        return [PeerId.from_base58(p) for (p, v), ann in self.announcements.items()
                if v == version and ann.expires_ms > now]

    # -- serving ------------------------------------------------------------------------

    async def _serve(self, stream: Any) -> None:
        """Answer requests on one stream, in order, until the client closes it or idles
        past STREAM_IDLE_TIMEOUT_S."""
        try:
            peer = self.net.remote_peer(stream)
        except AttributeError:
            peer = None
        reader = FrameReader(stream)
        try:
            while True:
                try:
                    data = await reader.read_frame(MAX_REQUEST_BYTES, STREAM_IDLE_TIMEOUT_S)
                except FrameEnded:
                    break  # the client is done
                except FrameError as exc:  # idle, stalled mid-frame, or oversized
                    log.debug("SMIP stream from %s cut: %s", peer, exc)
                    await reset_quietly(stream)
                    return
                try:
                    request = decode_request(data)
                except RemoteProtocolError as exc:
                    await self._respond(stream, ResponseHeader.error(STATUS_BAD_REQUEST, str(exc)))
                    break
                if not self._admit(peer):
                    await self._respond(stream, ResponseHeader.error(STATUS_BUSY))
                    continue
                try:
                    header, payload = await self._answer(request)
                    await self._respond(stream, header, payload)
                    if payload:
                        self.metrics.served.labels(type(request).__name__).inc(len(payload))
                finally:
                    self._release(peer)
            await stream.close()
        except Exception as exc:  # a client that vanished or stalled: drop the stream
            log.debug("serving SMIP to %s ended: %r", peer, exc)
            await reset_quietly(stream)

    def _admit(self, peer: PeerId | None) -> bool:
        load = self._inflight
        mine = load.per_peer.get(peer, 0) if peer is not None else 0
        limits = self.tunables
        if load.total >= limits.serve_total or mine >= limits.serve_per_peer:
            return False
        load.total += 1
        if peer is not None:
            load.per_peer[peer] = mine + 1
        return True

    def _release(self, peer: PeerId | None) -> None:
        load = self._inflight
        load.total -= 1
        if peer is not None:
            load.per_peer[peer] -= 1
            if not load.per_peer[peer]:
                del load.per_peer[peer]

    async def _respond(self, stream: Any, header: ResponseHeader,
                       payload: bytes | bytearray = b"") -> None:
        """The header frame and the payload's length prefix in one write, then the payload
        uncopied, in pieces that each cross the wire as one yamux frame in one Noise
        message (node/p2p/framing.py, write_bulk)."""
        encoded = encode_response_header(header)
        if header.status != STATUS_OK:
            await write_frame(stream, encoded, RESPONSE_TIMEOUT_S)
            return
        with trio.move_on_after(RESPONSE_TIMEOUT_S) as scope:
            await stream.write(frame_prefix(len(encoded)) + encoded + frame_prefix(len(payload)))
        if scope.cancelled_caught:
            raise FrameError(f"could not send a header within {RESPONSE_TIMEOUT_S:g} s")
        await write_bulk(stream, payload, payload_deadline_s(len(payload)))

    async def _answer(self, request: Request) -> tuple[ResponseHeader, bytes | bytearray]:
        payload: bytes | bytearray  # a chunk is served from the read buffer, not copied
        try:
            if isinstance(request, ManifestRequest):
                held = self.held.get(request.version)
                if held is None:
                    return ResponseHeader.error(STATUS_NOT_FOUND), b""
                payload = held.envelope
            elif isinstance(request, LeavesRequest):
                payload = await self.store.read_leaves(request.root)
            elif isinstance(request, ChunkRequest):
                if not self.store.has(request.root):
                    return ResponseHeader.error(STATUS_NOT_FOUND), b""
                if request.index >= self.store.info(request.root).chunk_count:
                    return ResponseHeader.error(STATUS_BAD_REQUEST, "index past the shard"), b""
                payload = await self.store.read_chunk(request.root, request.index)
            else:
                own = {h.announced: h.announcement for h in self.held.values()
                       if h.announced is not None and h.announcement is not None}
                chosen = select_list(own, request, self.clock_ms())
                payload = encode_list_payload([own[a] for a in chosen])
        except NotInStore:
            return ResponseHeader.error(STATUS_NOT_FOUND), b""
        except (OSError, ContentStoreError) as exc:
            log.warning("cannot serve %s: %r", request, exc)
            return ResponseHeader.error(STATUS_INTERNAL, "storage error"), b""
        return ResponseHeader(STATUS_OK, len(payload)), payload

    # -- publishing ---------------------------------------------------------------------

    async def publish(self, path: Path, *, kind: str, name: str, parents: Sequence[str] = (),
                      progress: Progress | None = None) -> str:
        """Store the files of ``path`` content-addressed, sign a manifest, announce and
        provide it. Returns the version id (hex). PublishError on bad input."""
        progress = progress or Progress()
        progress.phase = "checking"
        files, config = await trio.to_thread.run_sync(collect_files, path.expanduser(), kind)
        parent_ids = [self.resolve(p) for p in parents]
        for p in parent_ids:
            if p not in self.held:
                raise PublishError(f"parent {id_hex(p)} is not held by this node")
        sizes = [f.stat().st_size for _, f in files]
        progress.phase, progress.total_bytes = "hashing", sum(sizes)
        staging = f"publishing:{secrets.token_hex(8)}"  # pins the shards until the version does
        entries = []
        try:
            base = 0
            for (rel, file), size in zip(files, sizes, strict=True):
                def on_progress(done: int, _total: int, base: int = base) -> None:
                    progress.done_bytes = base + done

                info = await self.store.import_file(file, choose_chunk_size(size), pin=staging,
                                                    on_progress=on_progress)
                entries.append(ShardEntry(rel, info.size, info.chunk_size, info.root))
                base += size
            try:
                manifest = build_manifest(kind=kind, name=name, shards=entries,
                                          created_ms=self.clock_ms(), publisher=self.peer_id,
                                          parents=parent_ids, config=config)
            except ProtocolError as exc:
                raise PublishError(str(exc)) from None
            envelope, version = sign_manifest(self.key, manifest)
            await self.store.pin(id_hex(version), [e.root for e in entries])
        finally:
            await self.store.unpin(staging)
        held = HeldVersion(version, envelope, manifest, "complete")
        await self._store_manifest(held)
        self.held[version] = held
        progress.phase, progress.done_bytes = "done", progress.total_bytes
        self._start_providing(held)
        log.info("published %s %r as %s", kind, name, id_hex(version))
        return id_hex(version)

    async def _store_manifest(self, held: HeldVersion) -> None:
        m = held.manifest
        await self.storage.put_manifest(ManifestRow(id_hex(held.version), m.kind, m.name,
                                                    m.created_ms, m.publisher, held.state,
                                                    held.envelope))

    # -- fetching -----------------------------------------------------------------------

    async def fetch(self, version: str, *, out_dir: Path | None = None,
                    progress: Progress | None = None, hint: Sequence[PeerId] = (),
                    kind: str | None = None) -> VersionInfo:
        """Fetch a version (resuming what is on disk), then write its files to ``out_dir``
        if given. ``hint``: peers known to provide it (asked first, before any lookup);
        ``kind``: "model" or "dataset", when the caller wants only that kind. FetchError
        when it cannot be completed."""

        progress = progress or Progress()
        try:
            vid = self.resolve(version)
        except UnknownVersion as exc:
            raise FetchError(str(exc)) from None
        held_now = self.held.get(vid)
        if held_now is not None:  # a verified manifest (an announcement's kind is a claim)
            check_kind(vid, held_now.manifest.kind, kind)
        lock = self._fetch_locks.setdefault(vid, trio.Lock())
        async with lock:  # a second fetch of one version waits for the first, then is quick
            held = self.held.get(vid)
            if held is None or held.state != "complete":
                held = await fetch_version(self, vid, progress, hint=hint, kind=kind)
                self._start_providing(held)
        if out_dir is not None:
            progress.phase = "writing"
            await self.export(held, out_dir.expanduser())
        progress.phase = "done"
        info = self.info_of(vid)
        assert info is not None
        return info

    async def adopt(self, version: bytes, directory: Path, hint: Sequence[PeerId]) -> bool:
        """Take files rebuilt here (``directory``, under their manifest paths) as
        ``version``, instead of fetching its shards: the manifest is fetched and verified
        as usual, and every file must hash to its shard's root. True when the version is
        now held complete; False when a file differs (what was imported stays unpinned,
        so eviction reclaims it) or is missing."""

        lock = self._fetch_locks.setdefault(version, trio.Lock())
        async with lock:
            held = self.held.get(version)
            if held is not None and held.state == "complete":
                return True
            if held is None:
                held = await fetch_manifest(self, version, list(hint))
            staging = f"adopting:{secrets.token_hex(8)}"
            try:
                for entry in held.manifest.shards:
                    if self.store.has(entry.root):
                        continue
                    path = directory / entry.path
                    if not path.is_file() or path.stat().st_size != entry.size:
                        return False
                    info = await self.store.import_file(path, entry.chunk_size, pin=staging)
                    if info.root != entry.root:
                        log.warning("rebuilt %s differs from its manifest", entry.path)
                        return False
                await self.remember_manifest(held)
                await self.mark_complete(held)
            finally:
                await self.store.unpin(staging)
        self._start_providing(held)
        return True

    async def remember_manifest(self, held: HeldVersion) -> None:
        """Called by the fetcher: a verified manifest whose shards are being fetched."""
        self.held[held.version] = held
        await self.store.pin(id_hex(held.version), [s.root for s in held.manifest.shards])
        await self._store_manifest(held)

    async def mark_complete(self, held: HeldVersion) -> None:
        held.state = "complete"
        await self.storage.set_manifest_state(id_hex(held.version), "complete")

    async def export(self, held: HeldVersion, out_dir: Path) -> None:
        """Copy the version's files to ``out_dir`` under their manifest paths (copies, not
        links: editing an output must never alter the store)."""
        import shutil

        root = out_dir.resolve()
        for entry in held.manifest.shards:
            dest = (root / entry.path).resolve()
            if root not in dest.parents:  # check_path already forbids this; belt and braces
                raise FetchError(f"refusing to write outside {root}: {entry.path!r}")
            src = self.store.shard_path(entry.root)
            await trio.to_thread.run_sync(_copy_file, src, dest, shutil.copyfile)

    # -- queries ------------------------------------------------------------------------

    def resolve(self, text: str | bytes) -> bytes:
        """A version id from 64 hex characters or a unique prefix of at least 8 of the
        versions known here. UnknownVersion (with a message) otherwise."""
        if isinstance(text, bytes):
            return text
        t = text.strip().lower()
        if len(t) == 64:
            try:
                return bytes.fromhex(t)
            except ValueError:
                raise UnknownVersion(f"{text!r} is not a version id") from None
        if len(t) < 8 or any(c not in "0123456789abcdef" for c in t):
            raise UnknownVersion(f"{text!r} is not a version id or a prefix of at least 8 hex "
                                 "digits")
        known = {v for v in self.held} | {v for _, v in self.announcements}
        matches = [v for v in known if v.hex().startswith(t)]
        if len(matches) != 1:
            raise UnknownVersion(f"{'no' if not matches else 'more than one'} version known "
                           f"here starts with {t}")
        return matches[0]

    def info_of(self, version: bytes) -> VersionInfo | None:
        providers = self.providers_of(version)
        held = self.held.get(version)
        if held is not None:
            m = held.manifest
            return VersionInfo(id_hex(version), m.kind, m.name, m.created_ms, m.publisher,
                               held.state, m.total_size,
                               len(providers) + (held.state == "complete"),
                               [id_hex(p) for p in m.parents])
        anns = [a for (_, v), a in self.announcements.items() if v == version]
        if not anns:
            return None
        a = anns[0]
        return VersionInfo(id_hex(version), a.kind, a.name, a.manifest_created_ms, a.provider,
                           "announced", 0, len(providers), [])

    def list_versions(self, kind: str | None = None) -> list[VersionInfo]:
        versions = set(self.held) | {v for (_, v), a in self.announcements.items()
                                     if a.expires_ms > self.clock_ms()}
        infos = [i for v in versions if (i := self.info_of(v)) is not None
                 and (kind is None or i.kind == kind)]
        return sorted(infos, key=lambda i: (-i.created_ms, i.version))

    async def show(self, version: str) -> dict[str, Any]:
        vid = self.resolve(version)
        info = self.info_of(vid)
        if info is None:
            raise UnknownVersion(f"version {version} is not known here")
        out = info.to_json()
        held = self.held.get(vid)
        if held is None:
            return out | {"config": None, "shards": [], "lineage": [], "new_shards": []}
        m = held.manifest

        def get(v: bytes) -> Manifest | None:
            h = self.held.get(v)
            return h.manifest if h is not None else None

        line = lineage(vid, get)
        parents = [p for v in m.parents[:1] if (p := get(v)) is not None]
        fresh = {s.path for s in new_shards(m, parents)} if parents else {s.path for s in m.shards}
        return out | {
            "config": m.config,
            "shards": [{"path": s.path, "size": s.size, "chunk_size": s.chunk_size,
                        "root": s.root.hex(), "held": self.store.has(s.root)} for s in m.shards],
            "lineage": [{"version": id_hex(v), "name": h.manifest.name if h else None,
                         "created_ms": h.manifest.created_ms if h else None, "known": h is not None}
                        for v in [*line.versions, *line.missing]
                        for h in [self.held.get(v)]],
            "new_shards": sorted(fresh),
        }


def _copy_file(src: Path, dest: Path, copy: Callable[[Path, Path], Any]) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.iollm-partial")
    copy(src, tmp)
    tmp.replace(dest)
