"""SMIP fetching: the client side of ``/iollm/smip/1.0.0`` and the multi-provider fetch.

``fetch_version`` follows specs/smip.md "Fetching": find providers (announcements, then the
DHT), take the manifest from the first provider whose answer verifies, then fetch the leaf
layer and the chunks of every missing shard from all providers at once. Each provider gets
``STREAMS_PER_PROVIDER`` workers, one stream each, with up to ``PIPELINE_DEPTH`` requests
outstanding; a free slot takes the lowest-numbered waiting chunk of a shard its provider
serves. Once no chunk waits, a provider with a free slot asks for a chunk that another
provider has outstanding and nobody else does, the newest asked first (the end game: the
last chunks queued behind a slow provider's others come from a faster one too); the first
copy to arrive is kept: a second is not stored, or not read once the fetch is done (its
stream is reset). Every chunk is verified against its leaf before it is written
(node/smip/store.py); a provider that sends bad bytes or stalls is dropped for the rest
of the fetch and its chunk goes back to the queue. A fetch that stops (killed,
cancelled) resumes from the chunks already verified on disk.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING, Any

import trio

from node.config import SmipSection
from node.p2p import OPEN_STREAM_ERRORS, P2P, PeerId
from node.p2p.framing import FrameEnded, FrameError, FrameReader, reset_quietly, write_frame
from node.smip.store import PartialShard
from node.smip.types import SMIP_PROTOCOL, FetchError, HeldVersion, Progress
from protocol.errors import RemoteProtocolError
from protocol.hashtree import chunk_span
from protocol.smip import (
    BUSY_BACKOFF_S,
    MAX_RESPONSE_HEADER_BYTES,
    PIPELINE_DEPTH,
    RESPONSE_TIMEOUT_S,
    STATUS_BUSY,
    STATUS_OK,
    STREAMS_PER_PROVIDER,
    ChunkRequest,
    LeavesRequest,
    ListPage,
    ListRequest,
    ManifestRequest,
    Request,
    ResponseHeader,
    ShardEntry,
    check_response_header,
    decode_list_payload,
    decode_response_header,
    encode_request,
    id_hex,
    open_manifest,
    payload_deadline_s,
    shard_provider_key,
    short_id,
    version_provider_key,
)

if TYPE_CHECKING:
    from node.smip.service import Models

log = logging.getLogger(__name__)

# DHT lookups of a version nobody announced, each a full walk (at most the discovery
# config's query_timeout_s): one. An id no announcement and no provider record names
# fails after it, with "no provider"; retries here only made such a fetch take 19 s.
PROVIDER_LOOKUP_RETRIES_S: tuple[float, ...] = (0.0,)
WAIT_FOR_WORK_S = 1.0  # an idle worker re-checks the queue at least this often


class SmipClient:
    """One stream to one provider, carrying requests in sequence. Any failure resets the
    stream and makes the client unusable (the caller opens another one)."""

    def __init__(self, net: P2P, peer: PeerId, tunables: SmipSection) -> None:
        self.net = net
        self.peer = peer
        self.tunables = tunables
        self.stream: Any = None
        self.reader: FrameReader | None = None

    async def open(self) -> SmipClient:

        tries = self.tunables.open_tries
        for attempt in range(tries):
            try:
                with trio.fail_after(RESPONSE_TIMEOUT_S):
                    self.stream = await self.net.open_stream(self.peer, SMIP_PROTOCOL)
                break
            except OPEN_STREAM_ERRORS as exc:
                # The connection went (closed by the peer or after a stalled frame
                # write, node/p2p/host.py; py-libp2p drops one of two crossing dials) and
                # the stream's negotiation failed on it: not the provider's fault, so
                # dial once more before it counts as failed.
                if attempt + 1 == tries:
                    raise
                log.debug("stream to %s failed (%r); dialling again", self.peer, exc)
                await trio.sleep(self.tunables.open_retry_s)
        self.reader = FrameReader(self.stream)
        return self

    async def __aenter__(self) -> SmipClient:
        return await self.open()

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close(failed=exc is not None)

    async def close(self, *, failed: bool = False) -> None:
        stream, self.stream, self.reader = self.stream, None, None
        if stream is None:
            return
        if failed:
            await reset_quietly(stream)
            return
        with trio.move_on_after(1):
            try:
                await stream.close()
            except Exception:
                await reset_quietly(stream)

    async def request(self, request: Request,
                      shard: ShardEntry | None = None) -> tuple[ResponseHeader, bytes]:
        """One exchange. RemoteProtocolError for bytes that fail a check, FrameError for a
        stall or a closed stream; the stream is reset on either."""
        await self.send(request)
        return await self.receive(request, shard)

    async def send(self, request: Request) -> None:
        """Write one request; its answer is read by a later ``receive`` (answers come in
        the order of the requests: up to PIPELINE_DEPTH may be outstanding)."""
        if self.stream is None:
            raise FrameError("stream closed")
        frame = encode_request(request)
        try:
            await write_frame(self.stream, frame, RESPONSE_TIMEOUT_S)
        except BaseException as exc:
            with trio.CancelScope(shield=True):  # cancelled too: reset, not left open
                await self.close(failed=True)
            if isinstance(exc, Exception) and not isinstance(exc, FrameError):
                # StreamReset, muxer errors: the stream is gone, as a read says it
                raise FrameEnded(f"stream gone ({exc!r})") from None
            raise

    async def receive(self, request: Request,
                      shard: ShardEntry | None = None) -> tuple[ResponseHeader, bytes]:
        """Read and check the answer to ``request``, the oldest one outstanding."""
        reader = self.reader
        if reader is None:
            raise FrameError("stream closed")
        try:
            header = decode_response_header(
                await reader.read_frame(MAX_RESPONSE_HEADER_BYTES, RESPONSE_TIMEOUT_S))
            n = check_response_header(request, header, shard=shard)
            if header.status != STATUS_OK:
                return header, b""
            payload = await reader.read_frame(n, payload_deadline_s(n))
            if len(payload) != n:
                raise RemoteProtocolError("malformed", f"payload of {len(payload)} bytes, "
                                                       f"header said {n}")
            return header, payload
        except BaseException:
            with trio.CancelScope(shield=True):  # cancelled too: reset, not left open
                await self.close(failed=True)
            raise

    async def list(self, request: ListRequest, provider: str, now_ms: int) -> ListPage:
        header, payload = await self.request(request)
        if header.status != STATUS_OK:
            raise RemoteProtocolError("malformed", f"list answered {header.status}")
        return decode_list_payload(payload, request, provider, now_ms)


# --- finding providers and the manifest ---------------------------------------------------


async def find_providers(models: Models, key_hex: str, known: list[PeerId]) -> list[PeerId]:
    """``known`` (from announcements) followed by the DHT's providers of the key, without
    this node and without duplicates."""
    found = list(known)
    try:
        found += [p.peer_id for p in await models.discovery.find_providers(key_hex)]
    except Exception as exc:  # the DHT is one source; announcements may suffice
        log.info("provider lookup of %s failed: %r", key_hex[:16], exc)
    own = models.net.peer_id
    return [p for p in dict.fromkeys(found) if p != own]


async def fetch_manifest(models: Models, version: bytes, providers: list[PeerId],
                         keep: dict[PeerId, SmipClient] | None = None) -> HeldVersion:
    """The first manifest answer that verifies against the id, asked one provider at a
    time. FetchError when none does. ``keep``: the stream that gave it stays open there
    (the caller's to close), for the chunk fetch to go on with: opening another costs a
    round trip before its first request."""

    reasons = []
    for peer in providers:
        client = SmipClient(models.net, peer, models.tunables)
        try:
            await client.open()
            header, payload = await client.request(ManifestRequest(version))
            if header.status != STATUS_OK:
                reasons.append(f"{peer}: {header.status}")
                await client.close()
                continue
            manifest = open_manifest(payload, version)
        except Exception as exc:  # ProtocolError, FrameError, TooSlowError, a failed dial
            await client.close(failed=True)
            reasons.append(f"{peer}: {str(exc) or type(exc).__name__}")
            models.metrics.dropped.labels(getattr(exc, "reason", "unreachable")).inc()
            continue
        if keep is None:
            await client.close()
        else:
            keep[peer] = client
        return HeldVersion(version, payload, manifest, "partial")
    raise FetchError(f"no provider gave a valid manifest of {short_id(version)}"
                     + (f" ({'; '.join(reasons)})" if reasons else ""))


async def fetch_version(models: Models, version: bytes, progress: Progress,
                        hint: Sequence[PeerId] = (), kind: str | None = None) -> HeldVersion:
    """Fetch a version completely into the store (resuming), or raise FetchError.
    ``hint``: peers known to provide it, tried before the announced and DHT providers.
    ``kind``: what the caller asked for; a version of the other kind is refused once its
    manifest is known, before any chunk is fetched."""

    progress.phase = "providers"
    own = models.net.peer_id
    # Peers already known to hold it (the caller's hint, announcements) are used at once:
    # a DHT lookup costs tens of milliseconds, a large share of a small fetch. The DHT is
    # asked only when they are none or none gives the manifest; each shard's providers
    # are looked up on the DHT during the fetch anyway (ChunkFetcher).
    known = [p for p in dict.fromkeys([*hint, *models.providers_of(version)]) if p != own]
    providers = known
    if not providers:
        for delay in PROVIDER_LOOKUP_RETRIES_S:
            await trio.sleep(delay)
            providers = await find_providers(models, version_provider_key(version),
                                             models.providers_of(version))
            if providers or version in models.held:
                break
    kept: dict[PeerId, SmipClient] = {}  # the manifest's stream, for the chunks
    try:
        return await _fetch_held(models, version, progress, providers, known, kind, kept)
    finally:
        for client in kept.values():  # not taken by a chunk worker
            await client.close()


async def _fetch_held(models: Models, version: bytes, progress: Progress,
                      providers: list[PeerId], known: list[PeerId], kind: str | None,
                      kept: dict[PeerId, SmipClient]) -> HeldVersion:
    held = models.held.get(version)
    if held is None:
        if not providers:
            raise FetchError(f"no provider of {id_hex(version)} found (announcements and DHT)")
        progress.phase = "manifest"
        try:
            held = await fetch_manifest(models, version, providers, kept)
        except FetchError:
            if not known:  # these were the DHT's providers already
                raise
            more = [p for p in await find_providers(models, version_provider_key(version), [])
                    if p not in known]
            if not more:
                raise
            providers = [*known, *more]
            held = await fetch_manifest(models, version, more, kept)
        await models.remember_manifest(held)
    check_kind(version, held.manifest.kind, kind)
    shards = list({s.root: s for s in held.manifest.shards}.values())
    todo = [s for s in shards if not models.store.has(s.root)]
    progress.total_bytes = sum(s.size for s in shards)
    progress.done_bytes = progress.total_bytes - sum(s.size for s in todo)
    if todo:
        if not providers:
            raise FetchError(f"no provider of {id_hex(version)} found to fetch "
                             f"{len(todo)} missing shards from")
        progress.phase = "chunks"
        await ChunkFetcher(models, todo, providers, progress, kept).run()
    await models.mark_complete(held)
    return held


def check_kind(version: bytes, actual: str, wanted: str | None) -> None:
    if wanted is not None and actual != wanted:
        raise FetchError(f"{id_hex(version)[:16]} is a {actual}, not a {wanted}: use "
                         f"`iollm {actual} fetch`")


# --- chunks from many providers -----------------------------------------------------------


@dataclass
class _Shard:
    entry: ShardEntry
    providers: set[PeerId]
    partial: PartialShard | None = None
    waiting: deque[int] = field(default_factory=deque)
    # Chunks asked for: who has each outstanding (until that asker's answer is read, also
    # when another copy arrived first), oldest asked first.
    asked: dict[int, set[PeerId]] = field(default_factory=dict)
    arrived: set[int] = field(default_factory=set)  # answered (stored or being stored)
    refused: set[PeerId] = field(default_factory=set)  # answered not-found / too-large / internal
    leaves_busy: bool = False
    done: bool = False


@dataclass
class _Provider:
    peer: PeerId
    dropped: str = ""  # why it was dropped, "" while in use
    busy_until: float = 0.0


class ChunkFetcher:
    def __init__(self, models: Models, shards: list[ShardEntry], providers: list[PeerId],
                 progress: Progress, streams: dict[PeerId, SmipClient] | None = None) -> None:
        self.models = models
        self._streams = streams if streams is not None else {}  # open ones, taken by workers
        self.progress = progress
        self.shards = [_Shard(s, set(providers)) for s in shards]
        self.providers = {p: _Provider(p) for p in providers}
        self._changed = trio.Event()
        self._nursery: trio.Nursery | None = None
        self._lookups: list[trio.CancelScope] = []  # cancelled once every shard is done
        self._workers: list[trio.CancelScope] = []  # cancelled too: duplicates not read
        self._writes = trio.Semaphore(models.tunables.writes_in_flight)
        # Each worker's requests in flight, in the order their answers will come.
        self._queues: dict[PeerId, list[deque[tuple[_Shard, int | None, Request]]]] = {}

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    @property
    def finished(self) -> bool:
        return all(s.done for s in self.shards)

    async def run(self) -> None:

        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            for provider in list(self.providers.values()):
                self._start_workers(provider)
            for shard in self.shards:
                nursery.start_soon(self._more_providers, shard)
        if not self.finished:
            left = [s.entry.path for s in self.shards if not s.done]
            why = "; ".join(f"{p.peer}: {p.dropped or 'has not got them'}"
                            for p in self.providers.values())
            raise FetchError(f"no provider left for {len(left)} shards ({', '.join(left[:3])}"
                             f"{', ...' if len(left) > 3 else ''}): {why}")

    def _start_workers(self, provider: _Provider) -> None:
        assert self._nursery is not None
        for _ in range(STREAMS_PER_PROVIDER):
            self._nursery.start_soon(self._worker, provider)

    async def _more_providers(self, shard: _Shard) -> None:
        """Add the DHT's providers of one shard (another version may hold it too)."""
        found: list[PeerId] = []
        with trio.CancelScope() as scope:
            self._lookups.append(scope)
            if self.finished:
                scope.cancel()
            # Not at once: every shard's lookup at the start slowed the first stream's
            # opening from a few to 40 ms (2 MiB fetches took 150 ms instead of 100), and
            # a fetch that its known providers serve is often over before more would
            # help. A shard left without a provider is looked up at once.
            with trio.move_on_after(self.models.tunables.more_providers_after_s):
                while self._has_provider(shard) and not shard.done:
                    changed = self._changed
                    await changed.wait()
            if shard.done:
                return
            found = await find_providers(self.models, shard_provider_key(shard.entry.root), [])
        for peer in found:
            if peer in shard.providers:
                continue
            shard.providers.add(peer)
            if peer not in self.providers and not self.finished:
                self.providers[peer] = provider = _Provider(peer)
                self._start_workers(provider)
        self._notify()

    # -- scheduling --------------------------------------------------------------------

    def _pick(self, provider: _Provider) -> tuple[_Shard, int | None] | None:
        """Work for this provider: (shard, None) to fetch a leaf layer, (shard, index) for a
        chunk, or None when there is nothing for it right now."""
        if trio.current_time() < provider.busy_until:
            return None
        for shard in self.shards:
            if shard.done or provider.peer not in shard.providers \
                    or provider.peer in shard.refused:
                continue
            if shard.partial is None:
                if not shard.leaves_busy:
                    shard.leaves_busy = True
                    return shard, None
                continue
            if shard.waiting:
                return shard, shard.waiting.popleft()
        return self._duplicate(provider)

    def _duplicate(self, provider: _Provider) -> tuple[_Shard, int] | None:
        """The end game: a chunk not yet arrived, outstanding at one other provider only
        and queued there behind another answer, the newest asked first (the likeliest to
        be queued behind that provider's others). Not while a shard this provider serves
        awaits its leaf layer: its chunks are about to wait, and a small fetch would be
        asked twice over."""
        shards = [s for s in self.shards if not s.done and provider.peer in s.providers
                  and provider.peer not in s.refused]
        if any(s.partial is None for s in shards):
            return None
        for shard in shards:
            for index in reversed(shard.asked):
                if index in shard.arrived:
                    continue
                askers = shard.asked[index]
                if len(askers) == 1 and provider.peer not in askers \
                        and self._queued_behind(shard, index, next(iter(askers))):
                    return shard, index
        return None

    def _queued_behind(self, shard: _Shard, index: int, peer: PeerId) -> bool:
        """Whether ``peer`` has an answer to read before this chunk's (the one at the head
        of a worker's queue is being read: a copy asked now would come after it)."""
        for queue in self._queues.get(peer, ()):
            for position, (other, other_index, _) in enumerate(queue):
                if other is shard and other_index == index:
                    return position > 0
        return False

    def _has_provider(self, shard: _Shard) -> bool:
        """Some provider of this shard is still in use and has not refused it."""
        return any(p in self.providers and not self.providers[p].dropped
                   and p not in shard.refused for p in shard.providers)

    def _useless(self, provider: _Provider) -> bool:
        """Nothing this provider could ever be given again."""
        return bool(provider.dropped) or all(
            s.done or provider.peer not in s.providers or provider.peer in s.refused
            for s in self.shards)

    def _drop(self, provider: _Provider, reason: str) -> None:
        if not provider.dropped:
            provider.dropped = reason
            self.models.metrics.dropped.labels(reason.split(":")[0]).inc()
            log.info("dropping provider %s from the fetch: %s", provider.peer, reason)

    # -- one worker: one stream to one provider ------------------------------------------

    async def _worker(self, provider: _Provider) -> None:
        """One stream to one provider, with up to PIPELINE_DEPTH requests outstanding: the
        stream never idles between answers, so py-libp2p's yamux window grows as on a bulk
        transfer and each chunk arrives in a few large reads (one request at a time
        measured 0.46x of a raw stream, the muxer's per-frame work doubling the CPU
        per byte)."""
        scope = trio.CancelScope()
        self._workers.append(scope)
        if self.finished:
            scope.cancel()
        with scope:
            await self._work(provider)

    async def _work(self, provider: _Provider) -> None:
        client: SmipClient | None = None
        outstanding: deque[tuple[_Shard, int | None, Request]] = deque()
        self._queues.setdefault(provider.peer, []).append(outstanding)
        answered = reopened = False  # an answer read on this stream; opened it again
        try:
            if not self.finished and not self._useless(provider):
                # Opened at once, not with the first request: the other providers' workers
                # wait for the leaf layer (a round trip) anyway, and their streams' opening
                # (another) overlaps it.
                client = self._streams.pop(provider.peer, None) or await SmipClient(
                    self.models.net, provider.peer, self.models.tunables).open()
            while True:
                if provider.dropped:  # by another worker, or a write that found a bad chunk
                    raise FrameError("dropped")
                while len(outstanding) < PIPELINE_DEPTH and not self.finished \
                        and not self._useless(provider):
                    work = self._pick(provider)
                    if work is None:
                        break
                    shard, index = work
                    request: Request = LeavesRequest(shard.entry.root) if index is None \
                        else ChunkRequest(shard.entry.root, index)
                    outstanding.append((shard, index, request))
                    if index is not None:
                        shard.asked.setdefault(index, set()).add(provider.peer)
                    if client is None:
                        client = self._streams.pop(provider.peer, None)
                    if client is None:
                        client = await SmipClient(self.models.net, provider.peer,
                                                    self.models.tunables).open()
                    try:
                        await client.send(request)
                    except FrameError as exc:
                        if answered or reopened:
                            raise
                        reopened = True
                        client = await self._reopen(provider, outstanding, exc)
                if not outstanding:
                    if self.finished or self._useless(provider):
                        return
                    changed = self._changed
                    with trio.move_on_after(WAIT_FOR_WORK_S):
                        await changed.wait()
                    continue
                shard, index, request = outstanding[0]
                assert client is not None
                try:
                    header, payload = await client.receive(request, shard.entry)
                except FrameError as exc:
                    if answered or reopened:
                        raise
                    reopened = True
                    client = await self._reopen(provider, outstanding, exc)
                    continue
                answered = True
                if header.status != STATUS_OK:
                    outstanding.popleft()
                    self._refused(provider, shard, index, header)  # puts it back itself
                    continue
                if index is not None:
                    self._unask(shard, index, provider.peer)
                    if index in shard.arrived:  # the other copy came first
                        self.models.metrics.duplicates.inc(len(payload))
                        outstanding.popleft()
                        continue
                    shard.arrived.add(index)
                # Stored by a task of its own, so that the next answer is read (and the
                # next request sent) meanwhile; at most ``writes_in_flight`` answers wait so.
                await self._writes.acquire()
                assert self._nursery is not None
                self._nursery.start_soon(self._store, provider, shard, index, payload)
                outstanding.popleft()  # only once handled: a chunk that fails goes back
        except Exception as exc:  # bad bytes, a stall, a failed dial or write
            if isinstance(exc, RemoteProtocolError):
                self._drop(provider, str(exc))  # "reason: what was wrong"
            elif isinstance(exc, (FrameError, trio.TooSlowError)):
                self._drop(provider, f"stalled: {str(exc) or 'no answer in time'}")
            else:
                self._drop(provider, f"failed: {exc!r}")
            for shard, index, _ in reversed(outstanding):
                self._put_back(shard, index, provider.peer)
            if client is not None:
                await client.close(failed=True)
        finally:
            queues = self._queues[provider.peer]  # by identity: deques compare by content
            del queues[next(i for i, q in enumerate(queues) if q is outstanding)]
            if client is not None:  # cancelled at the end: duplicates still outstanding
                with trio.CancelScope(shield=True):
                    await client.close(failed=bool(outstanding))
            self._notify()

    async def _reopen(self, provider: _Provider,
                      outstanding: deque[tuple[_Shard, int | None, Request]],
                      exc: FrameError) -> SmipClient:
        """A stream that failed before its first answer, opened again with its requests:
        opened before there was work for it, it may have idled past the provider's
        STREAM_IDLE_TIMEOUT_S and been reset there, which is no stall."""
        log.info("stream to %s failed before its first answer (%s): opening another",
                 provider.peer, exc)
        client = await SmipClient(self.models.net, provider.peer, self.models.tunables).open()
        for *_, request in outstanding:
            await client.send(request)
        return client

    async def _store(self, provider: _Provider, shard: _Shard, index: int | None,
                     payload: bytes) -> None:
        """Take one answer: a leaf layer opens the shard's fetch (its files and database
        row: tens of milliseconds, with an fsync), a chunk is verified and written (in a
        thread). A bad one drops its provider (whose worker stops at its next answer) and
        goes back to the queue."""
        try:
            if index is None:
                await self._got_leaves(shard, payload)
            else:
                await self._got_chunk(shard, index, payload)
        except Exception as exc:  # bad leaves or a bad chunk, a failed write
            self._drop(provider, str(exc) if isinstance(exc, RemoteProtocolError)
                       else f"failed: {exc!r}")
            if index is not None:
                shard.arrived.discard(index)  # bad, or not written: needed again
            self._put_back(shard, index)
        finally:
            self._writes.release()

    def _put_back(self, shard: _Shard, index: int | None, peer: PeerId | None = None) -> None:
        """A request that ``peer`` will not answer (or an answer that failed): back to the
        queue, unless the chunk arrived or another provider has it outstanding."""
        if index is None:
            shard.leaves_busy = False
        else:
            if peer is not None:
                self._unask(shard, index, peer)
            if index not in shard.arrived and index not in shard.asked:
                shard.waiting.appendleft(index)
        self._notify()

    @staticmethod
    def _unask(shard: _Shard, index: int, peer: PeerId) -> None:
        askers = shard.asked.get(index)
        if askers is not None:
            askers.discard(peer)
            if not askers:
                del shard.asked[index]

    def _refused(self, provider: _Provider, shard: _Shard, index: int | None,
                 header: ResponseHeader) -> None:
        if header.status == STATUS_BUSY:
            provider.busy_until = trio.current_time() + BUSY_BACKOFF_S
        else:
            shard.refused.add(provider.peer)
        self._put_back(shard, index, provider.peer)

    async def _got_leaves(self, shard: _Shard, payload: bytes) -> None:
        entry = shard.entry
        partial = await self.models.store.begin_fetch(entry.root, entry.size, entry.chunk_size,
                                                      payload)
        missing = partial.missing()
        held = entry.chunks - len(missing)
        # Bytes already verified on disk: the shard less its missing chunks.
        self.progress.done_bytes += entry.size - sum(
            chunk_span(entry.size, entry.chunk_size, i)[1] for i in missing)
        if held:
            log.info("resuming %s: %d of %d chunks already verified", entry.path, held,
                     entry.chunks)
        shard.partial, shard.waiting, shard.leaves_busy = partial, deque(missing), False
        await self._maybe_finish(shard)
        self._notify()

    async def _got_chunk(self, shard: _Shard, index: int, payload: bytes) -> None:
        assert shard.partial is not None
        if await shard.partial.write_chunk(index, payload):  # verified, then written
            self.progress.done_bytes += len(payload)
            self.models.metrics.fetched.inc(len(payload))
        await self._maybe_finish(shard)

    async def _maybe_finish(self, shard: _Shard) -> None:
        if shard.done or shard.partial is None or not shard.partial.complete:
            return
        await shard.partial.finish()
        shard.done = True
        if self.finished:
            for scope in [*self._lookups, *self._workers]:
                scope.cancel()
        self.progress.detail = (f"{sum(s.done for s in self.shards)}/{len(self.shards)} shards, "
                                f"{sum(not p.dropped for p in self.providers.values())} providers")
        self._notify()
