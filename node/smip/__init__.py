"""SMIP, the sharing of models and datasets: the content store (store: content-addressed
shards and chunks on disk, quota, eviction), publish / announce / serve (service), the
multi-provider verified fetch (fetch), and what the last two share (types).

Owns: the SMIP stream and announcement topic, the store directory. May import: node.p2p,
node.discovery, node.storage, node.config, protocol/.
"""
