"""The local control plane: the JSON HTTP server on 127.0.0.1 with bearer-token auth and
/metrics (server), long operations started through it (ops), and the routes of the
services (jobs, ledger; the rest are wired in node/daemon.py).

May import: the services, node.config, protocol/.
"""
