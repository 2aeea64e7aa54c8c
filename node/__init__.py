"""The iollm node daemon: trio + py-libp2p + storage + torch, one service per module."""

__version__ = "0.1.0"
