"""The chain service: mempool and transaction gossip, the BFT rounds of validators, final
blocks, catch-up sync, and the reward ledger they feed.

Owns: the blocks and consensus streams, the chain topics, the stored blocks. May import:
node.p2p, node.discovery, node.storage, node.drive, protocol/.
"""
