"""What the SMIP service and its fetcher share: the protocol id, errors, progress, and the
versions a node holds (kept apart so that node/smip/fetch.py and node/smip/service.py do
not import each other).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from node.errors import NodeError, NotFound
from node.p2p import ProtocolId
from protocol.smip import SMIP_PROTOCOL_ID, Announcement, Manifest

SMIP_PROTOCOL = ProtocolId(SMIP_PROTOCOL_ID)


class PublishError(NodeError):
    """The files cannot be published as asked (the message says why, for the user)."""


class FetchError(NodeError):
    """A fetch failed: no provider left, the version is unknown, ... (the message says)."""


class UnknownVersion(NotFound):
    """No version known here matches that id or prefix (or the text is not one)."""


@dataclass
class Progress:
    """What a long operation is doing; the service writes it, the API reads it."""

    phase: str = "starting"
    done_bytes: int = 0
    total_bytes: int = 0
    detail: str = ""


@dataclass(frozen=True)
class VersionInfo:
    version: str  # 64 hex
    kind: str
    name: str
    created_ms: int
    publisher: str
    state: str  # "complete", "partial" or "announced"
    size: int  # 0 when only announced
    providers: int
    parents: list[str]

    def to_json(self) -> dict[str, Any]:
        return {"version": self.version, "kind": self.kind, "name": self.name,
                "created_ms": self.created_ms, "publisher": self.publisher,
                "state": self.state, "size": self.size, "providers": self.providers,
                "parents": self.parents}


@dataclass
class HeldVersion:
    """A version whose verified manifest this node stores."""

    version: bytes
    envelope: bytes
    manifest: Manifest
    state: str  # "partial" or "complete"
    announcement: bytes | None = None  # our current signed announcement, when complete
    announced: Announcement | None = None  # the same, decoded

