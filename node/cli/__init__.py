"""``iollm``: the command line (app: the parser, ``main``, the node and network commands;
common: what every command group shares; models, jobs, ledger: one module per command
group) and the local testnet of processes (testnet).

Talks to a running node only through its API. May import: node.api, node.config,
node.identity, protocol/; node.daemon only to start a node.
"""
