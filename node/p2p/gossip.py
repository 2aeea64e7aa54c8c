"""Gossipsub's mesh upkeep as the v1.1 spec has it, where py-libp2p's churns.

py-libp2p's router (0.8.x) grafts "opportunistically" at every heartbeat, up to 2 peers
a topic whose score is at least half the median of the mesh's: with every score at 0
(ours count invalid messages only, node/p2p/host.py), that is every peer outside the
mesh. The mesh grows past ``degree_high`` within a few heartbeats and the heartbeat
prunes it back to ``degree``, without a backoff of its own for the pruned peers, so the
next heartbeats graft them again. A pruned peer keeps the time of our PRUNE, takes the
GRAFT that follows within 10 s as a flood (penalty P7, and a PRUNE back), and so on.
On a 30-host testnet this kept every node's meshes changing every second, long after
the start: the control traffic took most of the daemons' CPU, two cores' worth on a
2-core machine, and DHT queries waited behind it (bench/RESULTS.md, 2026-12-08).

The spec's rules, which this router follows (gossipsub v1.1, "Opportunistic Grafting"
and "Prune Backoff"; go-libp2p's defaults):
- opportunistic grafting once every OPPORTUNISTIC_GRAFT_TICKS heartbeats, only when the
  median score of the mesh is below OPPORTUNISTIC_GRAFT_THRESHOLD, and only of peers
  scoring above that median, OPPORTUNISTIC_GRAFT_PEERS at most;
- a peer the heartbeat prunes is backed off from (not grafted again) for the prune
  backoff, as a peer that prunes us is.

py-libp2p's mesh-quality upkeep (replacing a mesh's worst peer by a better-scoring one)
is left as it is: it does nothing while scores are equal. Its eclipse protection is off
(``eclipse_protection_enabled=False`` where the router is made): it grafts for IP
diversity without checking backoff, and testnets run on one address or one subnet.
"""

from __future__ import annotations

import statistics
from collections import defaultdict

from libp2p.peer.id import ID
from libp2p.pubsub.gossipsub import GossipSub

OPPORTUNISTIC_GRAFT_TICKS = 60  # heartbeats between two opportunistic grafts (go: 60)
OPPORTUNISTIC_GRAFT_PEERS = 2  # peers grafted so at most, per topic (go: 2)
# Below this median score a mesh is worth improving. Our scores are 0 or negative
# (invalid messages only): only a mesh whose peers mostly forwarded invalid messages is.
OPPORTUNISTIC_GRAFT_THRESHOLD = 0.0


class SpecGossipSub(GossipSub):
    """py-libp2p's router with the v1.1 spec's opportunistic grafting and prune backoff
    (module docstring)."""

    _heartbeats = 0

    def mesh_heartbeat(self) -> tuple[defaultdict[ID, list[str]], defaultdict[ID, list[str]]]:
        self._heartbeats += 1
        to_graft, to_prune = super().mesh_heartbeat()
        for peer, topics in to_prune.items():
            for topic in topics:
                self._add_back_off(peer, topic, False)
        return to_graft, to_prune

    def _perform_opportunistic_grafting(
            self, topic: str, peers_to_graft: defaultdict[ID, list[str]]) -> int:
        if self._heartbeats % OPPORTUNISTIC_GRAFT_TICKS or self.scorer is None \
                or self.pubsub is None or topic not in self.mesh:
            return 0
        mesh = self.mesh[topic]
        if not mesh:
            return 0
        scorer = self.scorer
        median = statistics.median(scorer.score(p, [topic]) for p in mesh)
        if median >= OPPORTUNISTIC_GRAFT_THRESHOLD:
            return 0
        scores = {p: scorer.score(p, [topic]) for p in self.pubsub.peer_topics.get(topic, ())
                  if p not in mesh and self.supports_scoring(p) and p not in self.direct_peers
                  and not self._check_back_off(p, topic)}
        better = sorted((p for p, score in scores.items() if score > median),
                        key=scores.__getitem__, reverse=True)
        for peer in better[:OPPORTUNISTIC_GRAFT_PEERS]:
            mesh.add(peer)
            self._notify_mesh_peer_added(peer, topic)
            scorer.on_join_mesh(peer, topic)
            peers_to_graft[peer].append(topic)
        return min(len(better), OPPORTUNISTIC_GRAFT_PEERS)
