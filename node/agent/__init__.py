"""The agent optimal-path module: searches the model-version graph for the best model a
goal's budget can buy (specs/agent.md). It runs branches as ordinary jobs through the
jobs service, decides with protocol.agentsearch (Optuna's TPE sampler and
successive-halving pruner as its advisor, in sqlite in the node home), remembers every
branch in the node's storage, reads other nodes' round records from the chain for a warm
start, and draws the search tree.

Owns: searches (``agent/*`` keys of the node's kv store, ``<home>/agent/optuna.db``).
May import: node.jobs, node.smip, node.chain, node.discovery, node.storage, node.errors,
node.config, protocol/.
"""
