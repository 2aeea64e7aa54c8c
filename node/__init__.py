"""The iollm node daemon: trio + py-libp2p + storage + torch, one subpackage per service
(README, "Layout"); node/daemon.py wires them into one nursery."""

__version__ = "0.1.0"
