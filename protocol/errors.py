"""The two kinds of protocol error (after h11's LocalProtocolError/RemoteProtocolError).

``LocalProtocolError`` is our own misuse: a bug, it should propagate and crash loudly.
``RemoteProtocolError`` is a peer's misbehaviour: data. node/ catches it, logs the
``reason`` and penalises or disconnects that peer.
"""

from __future__ import annotations


class ProtocolError(Exception):
    """Base class of every error protocol/ raises on purpose."""


class LocalProtocolError(ProtocolError):
    """We tried to build or send something invalid (a bug on our side)."""


class RemoteProtocolError(ProtocolError):
    """Bytes or a record from a peer are invalid.

    ``reason`` is a short stable tag (``"bad-signature"``, ``"expired"`` ...) usable as a
    metrics label; the message says what exactly was wrong.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
