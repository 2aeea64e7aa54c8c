"""The host's limits, as the node's operator sets them (``[p2p]`` in config.toml; node/config.py
builds this from it, and documents each key). No libp2p here: what the options mean is
in node/p2p/guard.py (streams, buffers) and node/p2p/host.py (connections)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class P2POptions:
    # Inbound streams open at once, from one peer and in all. py-libp2p's resource manager
    # (libp2p.rcmgr, 0.8.1) limits streams in total and per service, not per peer, so one
    # peer could take the whole allowance; the stream guard, which sees every inbound
    # stream, counts them. An honest node uses a few at a time (one SMIP stream per
    # provider, a task stream per offer, the sync and capability streams).
    max_streams_per_peer: int = 64
    max_streams: int = 1024
    # What one peer's inbound streams may hold at once in partial frames and unread data,
    # and all peers' together, in bytes; a stream's share is its protocol's frame cap plus
    # the receive window (py-libp2p's yamux grows the window beyond its initial size only
    # as the handler reads, and the handler reads at most one frame ahead).
    peer_buffer_bytes: int = 16 << 20
    buffer_bytes: int = 256 << 20
    # Connections at once (py-libp2p's resource manager refuses more).
    max_connections: int = 1000
