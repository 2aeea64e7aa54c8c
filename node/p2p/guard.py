"""One guard around every inbound stream of the host: no handler error ends the node.

py-libp2p runs each inbound stream's handler (ours, and its own: pubsub, Kademlia,
identify, ping) in the nursery of the stream's connection, which is inside the host's
nursery: an exception a handler does not catch (py-libp2p 0.8.1's pubsub lets a protobuf
``DecodeError`` through) travels up and ends the daemon. A peer could stop any node it
can reach with one malformed frame.

The guard sits at the one place every inbound stream passes: the swarm's common stream
handler, which negotiates the protocol and dispatches to the registered handler. It
wraps that call, so a protocol registered later is covered with no change here. An
error that escapes a handler:

- resets that stream (and nothing else: the connection and its other streams go on);
- is logged as one line with the peer and protocol (the traceback at debug level only);
- is counted in ``iollm_stream_handler_errors_total{protocol, kind}``;
- if it is a failure an honest peer cannot cause, is a strike against the peer
  (protocol/penalty.py); a peer with too many strikes is disconnected and its
  connections are refused until the ban ends.

A peer that vanishes (reset, EOF, timeout, broken link) is counted as ``gone``, not as
a strike: honest peers crash and lose their links.

It also bounds what a peer's inbound streams can make the node hold (the limits are
P2POptions, node/p2p/options.py: ``[p2p]`` in config.toml). Each stream counts against
``max_streams_per_peer`` (and ``max_streams`` in all) before it is negotiated, and once
negotiated it reserves what it may buffer: its protocol's frame cap (declared with
:meth:`StreamGuard.declare`; DEFAULT_FRAME_BYTES for a protocol that declared none) plus
the muxer's receive window, against ``peer_buffer_bytes`` (``buffer_bytes`` in all) for as long
as its handler runs. A stream over either bound is reset unread and counted
(``over-limit``, ``over-budget``): not a strike, as a busy honest peer may reach them.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import trio
from libp2p.abc import INetConn, INetStream, INetwork, INotifee
from libp2p.host.basic_host import BasicHost
from libp2p.io.exceptions import ConnectionClosedError, IncompleteReadError
from libp2p.network.connection.exceptions import RawConnError
from libp2p.network.stream.exceptions import StreamError
from libp2p.peer.id import ID
from libp2p.stream_muxer.exceptions import MuxedConnError, MuxedStreamError
from libp2p.stream_muxer.yamux.yamux import DEFAULT_WINDOW_SIZE as YAMUX_WINDOW_BYTES
from multiaddr import Multiaddr
from prometheus_client import CollectorRegistry, Counter, Gauge

from node.p2p.options import P2POptions
from protocol.penalty import PeerPenalties, PenaltyPolicy

log = logging.getLogger(__name__)

# Ways a peer vanishes mid-stream. Everything else a handler raises is the peer's input
# making our code (or the library's) fail, and counts against it.
PEER_GONE_ERRORS: tuple[type[BaseException], ...] = (
    StreamError, IncompleteReadError, ConnectionClosedError, RawConnError, MuxedStreamError,
    MuxedConnError, trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError,
    EOFError, ConnectionError,
)
RESET_TIMEOUT_S = 2.0  # resetting a stream of a peer that does not read
NOT_NEGOTIATED = "(none)"  # the protocol label of a stream that failed before negotiation
DISCONNECT_QUEUE = 256  # peers waiting to be disconnected; more are caught on their next stream
DEFAULT_FRAME_BYTES = 64 << 10

StreamHandler = Callable[[INetStream], Awaitable[None]]


def peer_of(stream: INetStream) -> ID:
    return stream.muxed_conn.peer_id


class StreamGuard(INotifee):
    """Installed on a host by :meth:`install`; :meth:`run` does the disconnections."""

    def __init__(self, host: BasicHost, registry: CollectorRegistry,
                 policy: PenaltyPolicy | None = None,
                 clock: Callable[[], float] = trio.current_time,
                 limits: P2POptions | None = None) -> None:
        self._host = host
        self.limits = limits or P2POptions()
        self._clock = clock
        self.penalties = PeerPenalties(policy)
        # py-libp2p's own inbound entry point: protocol negotiation, then the handler.
        self._dispatch: StreamHandler = host._swarm_stream_handler
        self._to_disconnect, self._disconnect_queue = trio.open_memory_channel[ID](
            DISCONNECT_QUEUE)
        self.open_streams: dict[ID, int] = {}  # inbound streams running, by peer
        self._open_total = 0
        self.frame_caps: dict[str, int] = {}  # protocol -> largest frame its handler reads
        self.buffered: dict[ID, int] = {}  # bytes reserved by each peer's inbound streams
        self._buffered_total = 0
        self.errors = Counter(
            "iollm_stream_handler_errors",
            "inbound streams whose handler failed, by protocol and kind: error (counts "
            "against the peer), gone (the peer vanished), refused (a banned peer), "
            "over-limit (too many streams open at once, max_streams_per_peer), "
            "over-budget (its streams may buffer too much, peer_buffer_bytes); and "
            "tasks of the library's services that failed (protocol service:task, kind task)",
            ["protocol", "kind"], registry=registry)
        self.bans = Counter("iollm_peers_banned", "peers banned for repeated handler errors",
                            registry=registry)
        Gauge("iollm_peers_banned_now", "peers banned at this moment",
              registry=registry).set_function(lambda: len(self.banned()))
        Gauge("iollm_inbound_streams_open", "inbound streams being handled now (limit "
              "max_streams)", registry=registry).set_function(lambda: self._open_total)
        Gauge("iollm_inbound_streams_open_one_peer", "the most inbound streams one peer has "
              "being handled now (limit max_streams_per_peer)", registry=registry,
              ).set_function(lambda: max(self.open_streams.values(), default=0))

    def install(self) -> None:
        network = self._host.get_network()
        network.set_stream_handler(self.handle)
        network.register_notifee(self)
        # Negotiation is where a stream's protocol becomes known: its handler is wrapped
        # there (basic_host's _swarm_stream_handler calls multiselect.negotiate, then the
        # handler it returns; tests/test_p2p_guards.py fails if that changes).
        multiselect = self._host.multiselect
        negotiate = multiselect.negotiate

        async def negotiate_within_budget(communicator: Any, timeout: Any) -> Any:
            protocol, handler = await negotiate(communicator, timeout)
            if protocol is None or handler is None:
                return protocol, handler
            return protocol, self._within_budget(str(protocol), handler)

        multiselect.negotiate = negotiate_within_budget  # type: ignore[method-assign,assignment]

    def declare(self, protocol: str, max_frame_bytes: int) -> None:
        """The largest frame ``protocol``'s handler reads at once: what each of its inbound
        streams reserves (beside the receive window) while it runs."""
        self.frame_caps[protocol] = max_frame_bytes

    def stream_share(self, protocol: str) -> int:
        return self.frame_caps.get(protocol, DEFAULT_FRAME_BYTES) + YAMUX_WINDOW_BYTES

    def _within_budget(self, protocol: str, handler: StreamHandler) -> StreamHandler:
        share = self.stream_share(protocol)

        async def run(stream: INetStream) -> None:
            peer = peer_of(stream)
            held = self.buffered.get(peer, 0)
            if (held + share > self.limits.peer_buffer_bytes
                    or self._buffered_total + share > self.limits.buffer_bytes):
                self.errors.labels(protocol=protocol, kind="over-budget").inc()
                await _reset(stream)
                return
            self.buffered[peer] = held + share
            self._buffered_total += share
            try:
                await handler(stream)
            finally:
                self._buffered_total -= share
                left = self.buffered[peer] - share
                if left:
                    self.buffered[peer] = left
                else:
                    del self.buffered[peer]

        return run

    def banned(self) -> list[str]:
        return self.penalties.banned(self._clock())

    def is_banned(self, peer: ID) -> bool:
        return self.penalties.is_banned(peer.to_base58(), self._clock())

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Close the connections of banned peers. Done here, not in the handler or the
        notifee that found them: closing a connection cancels its own tasks."""
        task_status.started()
        async for peer in self._disconnect_queue:
            with trio.move_on_after(RESET_TIMEOUT_S):
                try:
                    await self._host.get_network().close_peer(peer)
                except Exception as exc:  # already closing, or closed meanwhile
                    log.debug("closing banned peer %s: %r", peer, exc)

    async def handle(self, stream: INetStream) -> None:
        """The swarm's handler of every inbound stream."""
        peer = peer_of(stream)
        if self.is_banned(peer):
            self.errors.labels(protocol=NOT_NEGOTIATED, kind="refused").inc()
            await _reset(stream)
            self._disconnect(peer)
            return
        held = self.open_streams.get(peer, 0)
        if (held >= self.limits.max_streams_per_peer
                or self._open_total >= self.limits.max_streams):
            # Not a strike: the peer may just be busy; the stream is refused, not read.
            self.errors.labels(protocol=NOT_NEGOTIATED, kind="over-limit").inc()
            await _reset(stream)
            return
        self.open_streams[peer] = held + 1
        self._open_total += 1
        try:
            await self._dispatch(stream)
        except Exception as exc:
            await _reset(stream)
            self.failed(peer, str(stream.get_protocol() or NOT_NEGOTIATED), exc)
        finally:
            self._open_total -= 1
            left = self.open_streams[peer] - 1
            if left:
                self.open_streams[peer] = left
            else:
                del self.open_streams[peer]

    def failed(self, peer: ID, protocol: str, exc: BaseException) -> None:
        """Account for one handler failure of ``peer`` on ``protocol``."""
        if _only(exc, PEER_GONE_ERRORS):
            self.errors.labels(protocol=protocol, kind="gone").inc()
            log.debug("%s stream from %s ended: %r", protocol, peer, exc)
            return
        self.errors.labels(protocol=protocol, kind="error").inc()
        log.warning("%s stream from %s failed: %s", protocol, peer, _one_line(exc))
        log.debug("the failure's traceback", exc_info=exc)
        if self.penalties.strike(peer.to_base58(), self._clock()):
            policy = self.penalties.policy
            self.bans.inc()
            log.warning("banning %s for %g s: %d failed streams within %g s", peer,
                        policy.ban_s, policy.strikes, policy.window_s)
            self._disconnect(peer)

    def guard_tasks(self, manager: Any, service: str) -> None:
        """Contain the failures of the tasks a library service spawns as it goes.

        An error in one of them ends the whole service (pubsub, gossipsub), and with it
        the node. Wrapping the service manager's ``run_task`` keeps the failure to that
        task; it is logged and counted, never a strike: these tasks are also our own
        outbound work (sending, replays, retries), where a failure is no peer's fault.
        The per-message check that reads a peer's input is guarded in GuardedPubsub
        (node/p2p/host.py), before this wrapping exists. Daemon tasks (the service's own
        loops) are left as they are: one of those failing is a library bug.
        """
        run_task = manager.run_task

        def guarded_run_task(async_fn: Callable[..., Awaitable[Any]], *args: Any,
                             daemon: bool = False, name: str | None = None,
                             **kwargs: Any) -> None:
            if daemon:
                run_task(async_fn, *args, daemon=daemon, name=name, **kwargs)
                return

            async def contained(*task_args: Any) -> None:
                try:
                    await async_fn(*task_args)
                except Exception as exc:
                    label = f"{service}:{getattr(async_fn, '__name__', 'task')}"
                    kind = "gone" if _only(exc, PEER_GONE_ERRORS) else "task"
                    self.errors.labels(protocol=label, kind=kind).inc()
                    log.warning("%s failed: %s", label, _one_line(exc))
                    log.debug("the failure's traceback", exc_info=exc)

            run_task(contained, *args, daemon=daemon,
                     name=name or getattr(async_fn, "__name__", None), **kwargs)

        manager.run_task = guarded_run_task

    def _disconnect(self, peer: ID) -> None:
        # When the queue is full, the peer's next stream or connection queues it again.
        with contextlib.suppress(trio.WouldBlock):
            self._to_disconnect.send_nowait(peer)

    # -- INotifee: a banned peer's new connection is closed at once -------------------

    async def connected(self, network: INetwork, conn: INetConn) -> None:
        peer = conn.muxed_conn.peer_id
        if self.is_banned(peer):
            log.debug("refusing a connection of banned peer %s", peer)
            self._disconnect(peer)

    async def opened_stream(self, network: INetwork, stream: INetStream) -> None:
        pass

    async def closed_stream(self, network: INetwork, stream: INetStream) -> None:
        pass

    async def disconnected(self, network: INetwork, conn: INetConn) -> None:
        pass

    async def listen(self, network: INetwork, multiaddr: Multiaddr) -> None:
        pass

    async def listen_close(self, network: INetwork, multiaddr: Multiaddr) -> None:
        pass


def _only(exc: BaseException, kinds: tuple[type[BaseException], ...]) -> bool:
    """True when ``exc``, or every leaf of an exception group, is one of ``kinds``."""
    if isinstance(exc, BaseExceptionGroup):
        return all(_only(e, kinds) for e in exc.exceptions)
    return isinstance(exc, kinds)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:200]}" if text else type(exc).__name__


async def _reset(stream: Any) -> None:
    # Shielded: the stream must not be left half-open when the caller is being cancelled.
    # An error means it was reset or closed already: nothing left to do.
    with (trio.CancelScope(shield=True), trio.move_on_after(RESET_TIMEOUT_S),
          contextlib.suppress(Exception)):
        await stream.reset()

