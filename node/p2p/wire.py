"""Five patches that cut py-libp2p 0.8.1's (and trio's) per-message work, round trips and
idle sockets on the wire, the same bytes and messages otherwise. Imported by
node/p2p/host.py before any host is built; each has a guard test in
tests/test_p2p_guards.py.

* **Yamux frames that fit one Noise message.** The library cuts a stream write into
  yamux frames of 64 KiB (12 header bytes + 65524), one byte more than Noise's largest
  plaintext (65519): every frame of a large write crossed the wire as two Noise
  messages, each with its own length read, decryption and handling on the receiver.
  ``MAX_MESSAGE_SIZE`` is read where frames are cut for sending (and to slice what a
  read-everything call returns), never where frames are received: lowering it changes
  what this node sends, not what it accepts. (node/p2p/framing.py's ``write_bulk`` cut SMIP's
  writes to this size before; now every protocol's are: gossip batches, proposals.)
* **A signed peer record once per peer, not once per message.** The library puts this
  host's signed peer record in every pubsub RPC it sends, rebuilding its address list
  from its sockets and re-marshalling the envelope each time, and a receiver verifies the
  record's signature and stores it again on every RPC. Here a host's record is rebuilt
  at most every ``RECORD_REFRESH_S`` (or when none is cached), and a receiver that took
  the very same bytes from the same peer within ``RECORD_REFRESH_S`` does not verify and
  store them again (the store also refreshes the record's address TTL of two hours, so it
  is repeated that often).
* **Flow-control credit released in batches, not after every read.** The library sends
  a yamux WINDOW_UPDATE after every read that consumed anything, however small: a gossip
  RPC is read as its varint prefix byte by byte and then its body, so each one received
  cost two to four extra frames (each encrypted and written here, then read, decrypted
  and handled by the sender), as many as the messages themselves. Here a stream grants
  credit once it has consumed ``CREDIT_BATCH`` bytes (or half its window, the library's
  threshold, if that is less), growing the window as the library does. A large read (a
  proposal, a tx batch: 64 KiB slices) still grants credit after each slice, so those
  streams keep the library's pace of credit and its window growth (go-yamux's rule,
  credit only at half the window, would hold a writer of megabyte proposals to 256 KiB
  windows).
* **A stream's protocol chosen in one round trip.** The library's multistream-select
  client writes its handshake, waits for the answer, then writes the protocol and waits
  again: two round trips before a stream carries its first request, on every stream
  (each SMIP exchange, DHT request, validator stream). ``OneTripMultiselectClient``
  writes the handshake and the first protocol together and then reads both answers, as
  go-libp2p's client does; a listener reads them in order either way, so the messages are
  the same. (A 128 MiB SMIP fetch at 50 ms RTT opens two streams before its first chunk:
  the second wait cost 0.1 s of its 12.) ``open_network`` installs it on each host.
* **A sending socket that does not run dry.** trio's ``SocketStream`` sets
  ``TCP_NOTSENT_LOWAT`` to 16 KiB: the kernel holds at most that much unsent before the
  task must write again, 1.3 ms at 100 Mbit/s; its own comment says the value should be
  bandwidth times the rescheduling interval. On a loaded machine a provider's process
  waits longer than that for a CPU, and its link idles: every ``ss`` sample of a SMIP
  provider's connection was flagged app-limited. Here every trio TCP socket of the
  process gets ``NOTSENT_LOWAT`` = 256 KiB (20 ms at 100 Mbit/s): a small message queued
  behind bulk data on the same connection waits that much longer at most, which grows on
  slow links (0.2 s at 10 Mbit/s, 2 s at 1 Mbit/s) and is the price of a bulk sender
  that keeps a fast link busy. (The API's sockets get it too; they carry little.)
"""

from __future__ import annotations

import socket
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from contextlib import suppress
from typing import Any

import libp2p.pubsub.floodsub as floodsub_module
import libp2p.pubsub.gossipsub as gossipsub_module
import libp2p.pubsub.pubsub as pubsub_module
import libp2p.stream_muxer.yamux.yamux as yamux_module
import trio
from libp2p.abc import IMultiselectCommunicator
from libp2p.custom_types import TProtocol
from libp2p.peer.peerstore import env_to_send_in_RPC as library_env_to_send
from libp2p.protocol_muxer.exceptions import (
    MultiselectClientError,
    MultiselectCommunicatorError,
    ProtocolNotSupportedError,
)
from libp2p.protocol_muxer.multiselect_client import (
    DEFAULT_NEGOTIATE_TIMEOUT,
    MULTISELECT_PROTOCOL_ID,
    PROTOCOL_NOT_FOUND_MSG,
    MultiselectClient,
    is_valid_handshake,
)
from libp2p.pubsub.utils import maybe_consume_signed_record as library_consume
from libp2p.security.noise.io import MAX_PLAINTEXT_LENGTH

NOTSENT_LOWAT = 256 * 1024  # unsent bytes a TCP socket holds before it is writable again
RECORD_REFRESH_S = 60.0
MAX_REMEMBERED_PEERS = 4096  # senders whose last record a host remembers
CREDIT_BATCH = 16 * 1024  # yamux credit is granted once this much is consumed

yamux_module.MAX_MESSAGE_SIZE = MAX_PLAINTEXT_LENGTH


async def _window_update_batched(self: Any, *, bytes_read: int = 0) -> None:
    """YamuxStream's credit release after a read: a WINDOW_UPDATE only once the credit
    consumed (the target window less what the peer may still send and what is buffered
    unread) reaches CREDIT_BATCH or the library's threshold (half the window), whichever
    is less; the window grows as the library's does (``_grow_to_delta``,
    ``_apply_autotune_epoch``). ``bytes_read`` is implied by the window and the buffer."""
    async with self.window_lock:
        buffered = len(self.conn.stream_buffers.get(self.stream_id, b""))
        consumed = self.target_recv_window - (self.recv_window + buffered)
        if consumed <= 0 or consumed < min(CREDIT_BATCH, self._grow_threshold()):
            return
        increment = self._grow_to_delta(buffered) + self._apply_autotune_epoch(buffered)
        self._pending_recv_release = 0
    await self.send_window_update(increment, skip_lock=True)


yamux_module.YamuxStream._auto_tune_and_send_window_update = (  # type: ignore[method-assign]
    _window_update_batched)

_sent: weakref.WeakKeyDictionary[Any, tuple[float, tuple[bytes, bool]]] = (
    weakref.WeakKeyDictionary())
_taken: weakref.WeakKeyDictionary[Any, OrderedDict[Any, tuple[bytes, float]]] = (
    weakref.WeakKeyDictionary())


def _now() -> float:
    try:
        return trio.current_time()
    except RuntimeError:  # outside trio: no caching
        return float("nan")


def env_to_send_in_rpc(host: Any) -> tuple[bytes, bool]:
    """The library's record to send, rebuilt at most every RECORD_REFRESH_S."""
    now = _now()
    cached = _sent.get(host)
    if cached is not None and now - cached[0] < RECORD_REFRESH_S:
        return cached[1]
    fresh = library_env_to_send(host)
    _sent[host] = (now, fresh)
    return fresh


def maybe_consume_signed_record(msg: Any, host: Any, peer_id: Any) -> bool:
    """The library's check and store of a sender's record, skipped for the bytes this
    host took from that peer within RECORD_REFRESH_S."""
    if not msg.HasField("senderRecord"):
        return True
    record = msg.senderRecord
    now = _now()
    taken = _taken.get(host)
    if taken is None:
        taken = _taken[host] = OrderedDict()
    last = taken.get(peer_id)
    if last is not None and last[0] == record and now - last[1] < RECORD_REFRESH_S:
        return True
    if not library_consume(msg, host, peer_id):
        return False
    taken[peer_id] = (record, now)
    taken.move_to_end(peer_id)
    while len(taken) > MAX_REMEMBERED_PEERS:
        taken.popitem(last=False)
    return True


# Each module calls the name it imported: the patch rebinds it where it is called (the
# guard test checks that each of these modules still has both names).
PATCHED_MODULES = (pubsub_module, gossipsub_module, floodsub_module)
for _module in PATCHED_MODULES:
    _module.env_to_send_in_RPC = env_to_send_in_rpc  # type: ignore[attr-defined]
    _module.maybe_consume_signed_record = maybe_consume_signed_record  # type: ignore[attr-defined]


class OneTripMultiselectClient(MultiselectClient):
    """multistream-select's handshake and first protocol written back to back, then both
    answers read (see the module's docstring); the other protocols, if the first is
    refused, one at a time as the library does."""

    async def select_one_of(self, protocols: Sequence[TProtocol],
                            communicator: IMultiselectCommunicator,
                            negotiate_timeout: int = DEFAULT_NEGOTIATE_TIMEOUT) -> TProtocol:
        if not protocols:
            return await super().select_one_of(protocols, communicator, negotiate_timeout)
        first = protocols[0]
        with trio.move_on_after(negotiate_timeout):
            try:
                await communicator.write(MULTISELECT_PROTOCOL_ID)
                await communicator.write(first)
                handshake = await communicator.read()
                if not is_valid_handshake(handshake):
                    raise MultiselectClientError(
                        f"multiselect protocol ID mismatch: expected {MULTISELECT_PROTOCOL_ID}"
                        f", got {handshake!r}")
                answer = await communicator.read()
            except MultiselectCommunicatorError as error:
                raise MultiselectClientError(f"negotiation failed: {error}") from error
            if answer == first:
                return first
            if answer == MULTISELECT_PROTOCOL_ID:
                # The peer restarted the handshake (the library's client tolerates this
                # once, for go-libp2p under churn): go on as it does, from the first.
                await self.handshake(communicator)
                rest = list(protocols)
            elif answer == PROTOCOL_NOT_FOUND_MSG:
                rest = list(protocols[1:])
            else:
                raise MultiselectClientError(f"unexpected answer {answer!r} to {first}")
            for protocol in rest:
                try:
                    return await self.try_select(communicator, protocol)
                except ProtocolNotSupportedError:
                    continue
            raise MultiselectClientError(f"protocols not supported: {list(protocols)}")
        raise MultiselectClientError(f"response timed out after {negotiate_timeout}s, "
                                     f"protocols tried: {list(protocols)}")


_library_socket_stream_init = trio.SocketStream.__init__


def _socket_stream_init(self: trio.SocketStream, socket_: Any) -> None:
    _library_socket_stream_init(self, socket_)
    if hasattr(socket, "TCP_NOTSENT_LOWAT"):
        with suppress(OSError):
            self.setsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT, NOTSENT_LOWAT)


trio.SocketStream.__init__ = _socket_stream_init  # type: ignore[method-assign,assignment]
