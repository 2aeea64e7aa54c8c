"""The gossip router's mesh upkeep (node/p2p/gossip.py), heartbeat by heartbeat, without a
network: py-libp2p's own router grafts every peer outside the mesh two at a time and
prunes them again, ours keeps a full mesh as it is and backs off from the peers it
prunes."""

from __future__ import annotations

from types import SimpleNamespace

from libp2p.peer.id import ID
from libp2p.pubsub.gossipsub import PROTOCOL_ID_V11, GossipSub

from node.p2p.gossip import OPPORTUNISTIC_GRAFT_TICKS, SpecGossipSub
from node.p2p.host import SCORE_PARAMS

TOPIC = "/iollm/capability/1"


def _router(cls: type[GossipSub], mesh: int, others: int) -> tuple[GossipSub, list[ID]]:
    """A router with ``mesh`` peers in its mesh of TOPIC and ``others`` more on the
    topic, all speaking gossipsub v1.1 with a score of 0 (no invalid message seen)."""
    peers = [ID(bytes([0, 2, 8, i])) for i in range(mesh + others)]
    router = cls(protocols=[PROTOCOL_ID_V11], degree=6, degree_low=4, degree_high=12,
                 heartbeat_interval=1, score_params=SCORE_PARAMS,
                 eclipse_protection_enabled=False)
    router.pubsub = SimpleNamespace(peer_topics={TOPIC: set(peers)})  # type: ignore[assignment]
    for peer in peers:
        router.peer_protocol[peer] = PROTOCOL_ID_V11
    router.mesh[TOPIC] = set(peers[:mesh])
    return router, peers


def _heartbeats(router: GossipSub, n: int) -> tuple[list[ID], list[ID]]:
    """Run ``n`` mesh heartbeats: every peer grafted and pruned, in order."""
    grafted: list[ID] = []
    pruned: list[ID] = []
    for _ in range(n):
        to_graft, to_prune = router.mesh_heartbeat()
        grafted += [p for p, topics in to_graft.items() if TOPIC in topics]
        pruned += [p for p, topics in to_prune.items() if TOPIC in topics]
    return grafted, pruned


def test_the_librarys_router_churns_a_full_mesh() -> None:
    """The behaviour SpecGossipSub replaces: with every score 0, py-libp2p grafts 2 peers
    a heartbeat, and grafts peers it pruned again within seconds. If this fails, the
    library changed: node/p2p/gossip.py may no longer be needed."""
    router, _ = _router(GossipSub, mesh=6, others=20)
    pruned_before: set[ID] = set()
    regrafted: set[ID] = set()
    grafts = 0
    for _ in range(10):
        grafted, pruned = _heartbeats(router, 1)
        grafts += len(grafted)
        regrafted |= set(grafted) & pruned_before
        pruned_before |= set(pruned)
    assert grafts >= 10 and pruned_before
    assert regrafted, "no pruned peer grafted again"


def test_a_full_mesh_stays_as_it_is() -> None:
    router, peers = _router(SpecGossipSub, mesh=6, others=20)
    grafted, pruned = _heartbeats(router, 2 * OPPORTUNISTIC_GRAFT_TICKS)
    assert grafted == [] and pruned == []
    assert router.mesh[TOPIC] == set(peers[:6])


def test_pruned_peers_are_backed_off_and_not_grafted_again() -> None:
    """An oversubscribed mesh (peers grafted us) is pruned to the degree; the pruned peers
    are not grafted again within the backoff, even when the mesh then falls below
    degree_low and must graft."""
    router, peers = _router(SpecGossipSub, mesh=14, others=2)
    _, pruned = _heartbeats(router, 1)
    assert len(pruned) == 14 - 6 and len(router.mesh[TOPIC]) == 6
    assert all(router._check_back_off(p, TOPIC) for p in pruned)
    for gone in list(router.mesh[TOPIC])[:3]:  # three mesh peers leave: 3 < degree_low
        router.mesh[TOPIC].discard(gone)
    grafted, _ = _heartbeats(router, 3)
    assert grafted and not set(grafted) & set(pruned)
    assert set(grafted) <= set(peers[14:]) | set(peers[:14]) - set(pruned)


def test_opportunistic_grafting_only_lifts_a_mesh_scored_below_zero() -> None:
    """Every OPPORTUNISTIC_GRAFT_TICKS heartbeats, and only when the mesh's median score is
    below 0 (its peers forwarded invalid messages): then 2 peers scoring above it."""
    router, peers = _router(SpecGossipSub, mesh=6, others=4)
    assert router.scorer is not None
    for peer in peers[:6]:
        router.scorer.on_invalid_message(peer, TOPIC)
    scores = [router.scorer.score(p, [TOPIC]) for p in peers[:6]]
    assert all(s < 0 for s in scores), scores
    grafted, _ = _heartbeats(router, OPPORTUNISTIC_GRAFT_TICKS - 1)
    assert grafted == []
    grafted, _ = _heartbeats(router, 1)
    assert len(grafted) == 2 and set(grafted) <= set(peers[6:])
