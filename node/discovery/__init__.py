"""Capability records on the DHT and gossip: this node's record (put, provided under its
capability classes, gossiped, refreshed), verified records of others, GPU queries.

Owns: the capability protocol streams and topic. May import: node.p2p, node.storage,
node.config, protocol/.
"""
