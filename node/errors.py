"""The node's error bases, and the HTTP status the local API answers for each.

A service raises, for a request it cannot do as asked, an error of its own layer
(``ChainError``, ``JobError``, ``FetchError``...), each derived from :class:`NodeError`
and from the kind below that says why, the kind first (``class ChainBusy(Busy,
ChainError)``: the first base's status is the one that counts). node/api/server.py maps
every NodeError to its ``status``, and every ``protocol.errors.ProtocolError`` (input
that does not check) to 400, in one place: handlers never choose a status for a
service's error.
"""

from __future__ import annotations


class NodeError(Exception):
    """The request cannot be done as asked; the message says why (400)."""

    status = 400


class NotFound(NodeError):
    """What the request names is not known here (404)."""

    status = 404


class Conflict(NodeError):
    """This node's state does not allow the request (409)."""

    status = 409


class Busy(NodeError):
    """Overloaded: the same request later may succeed (503), after ``retry_after_s``
    seconds where the service can tell (the API sends it as Retry-After)."""

    status = 503

    def __init__(self, message: str, retry_after_s: int | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s
