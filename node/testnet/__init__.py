"""The namespace testnet: hosts in network namespaces, the links between them, partitions.

links.py is the link model (sans-IO: packets and times in, a departure time or a drop
out); wire.py is the relay process that carries every packet between the hosts' tun
devices through that model; netns.py creates and removes the namespaces and devices,
starts the relay and tells it of new shapes and partitions. node/cli/testnet.py starts
the daemons inside the hosts.

Owns: namespaces named ``<prefix>-<host>``, the addresses of 198.18.0.0/15, ``net.json``
in the testnet directory. May import: the standard library only (node.cli imports it).
"""
