"""The chain service (specs/consensus.md, "Network"; the rules themselves are
protocol.consensus and protocol.ledger): it wires the parts, each in its own module.

Every node that has a genesis runs it:

* **state.py**: the ledger, the mempool, the index of final txs; the one place a final
  block is stored and applied.
* **txgossip.py**: this node's own txs (kept in its outbox until final) and the tx topic,
  from which validators fill their mempools.
* **consensus.py** (validators): one ``protocol.consensus.Machine`` per height, fed from
  the consensus topic and the direct **links.py** streams between validators.
* **sync.py**: heads, and catch-up from any peer without trusting it.
* **network.py**: topics, relay checks, publishing, dialling.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import trio
from nacl.signing import SigningKey

from node.chain.consensus import Consensus, frame_limit, proposal_limit
from node.chain.links import ValidatorLinks
from node.chain.network import chain_topics, topic_validator
from node.chain.state import ChainState, Mempool
from node.chain.sync import BlockSync
from node.chain.txgossip import ChainBusy, ChainError, TxGossip
from node.config import ChainSection
from node.discovery.service import Discovery
from node.p2p import P2P
from node.storage import Storage
from protocol.chainwire import ConsensusFrame, check_consensus_gossip
from protocol.errors import RemoteProtocolError
from protocol.genesis import Genesis, GenesisError, parse_genesis
from protocol.ledger import Ledger

log = logging.getLogger(__name__)

__all__ = ["GENESIS_FILE", "Chain", "ChainBusy", "ChainError", "load_genesis"]


class Chain:
    """The chain of one genesis on this node: its parts, wired (see the module doc)."""

    consensus_class: type[Consensus] = Consensus  # tests' misbehaving validators change it

    def __init__(self, net: P2P, key: SigningKey, storage: Storage, genesis: Genesis,
                 discovery: Discovery, *, clock_ms: Any,
                 tunables: ChainSection) -> None:
        """``tunables``: config.toml's [chain] section."""
        self.net = net
        self.key = key
        self.storage = storage
        self.genesis = genesis
        self.peer_id = discovery.peer_id
        self.topics = chain_topics(genesis.chain_id)
        self.is_validator = self.peer_id in genesis.powers
        self.state = ChainState(genesis, storage, clock_ms, tunables)
        self._max_consensus_frame = frame_limit(genesis)
        self.txs = TxGossip(self.state, net, self.topics.txs, peer_id=self.peer_id,
                            is_validator=self.is_validator, tunables=tunables)
        self.sync = BlockSync(self.state, net, discovery, self.topics.heads,
                              max_proposal_bytes=proposal_limit(genesis), tunables=tunables)
        self.consensus: Consensus | None = None
        self.links: ValidatorLinks | None = None
        if self.is_validator:
            self.consensus = self.consensus_class(
                self.state, net, key, self.topics.consensus, peer_id=self.peer_id,
                links=None, submit=self.txs.submit, behind=self.sync.behind,
                tunables=tunables)
            self.links = ValidatorLinks(net, discovery, genesis.powers, peer_id=self.peer_id,
                                        max_frame=self._max_consensus_frame,
                                        deliver=self.consensus.deliver,
                                        take_txs=self.txs.take_batch, tunables=tunables)
            self.consensus.links = self.txs.links = self.links

    # -- what the rest of the node uses --------------------------------------------------

    @property
    def ledger(self) -> Ledger:
        return self.state.ledger

    @property
    def mempool(self) -> Mempool:
        return self.state.mempool

    async def submit(self, kind: str, payload: bytes) -> bytes:
        return await self.txs.submit(kind, payload)

    async def submit_many(self, txs: Sequence[bytes], *, refuse_when_busy: bool = False
                          ) -> list[bytes]:
        return await self.txs.submit_many(txs, refuse_when_busy=refuse_when_busy)

    def refuse_if_busy(self, adding: int) -> None:
        self.txs.refuse_if_busy(adding)

    def next_nonce(self) -> int:
        return self.txs.next_nonce()

    async def final_heights(self, tx_ids: Sequence[bytes]) -> dict[bytes, int]:
        return await self.state.final_heights(tx_ids)

    async def final_height(self, tx_id: bytes) -> int | None:
        return (await self.state.final_heights([tx_id])).get(tx_id)

    async def wait_final(self, tx_ids: Sequence[bytes], timeout: float) -> dict[bytes, int]:
        return await self.state.wait_final(tx_ids, timeout)

    async def wait_height(self, height: int, timeout: float) -> bool:
        return await self.state.wait_height(height, timeout)

    # -- service -----------------------------------------------------------------------

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        await self.state.load()
        t = self.topics
        # Only validators join the consensus topic: every vote and rebroadcast reached
        # every node of the network, and each relayed it to its mesh, so an idle chain
        # cost each follower a steady stream of messages to read, check and forward (at
        # 30 hosts, queues overflowed). Followers learn the chain's height from heads.
        topics = [(t.txs, self.txs.check_gossip), (t.heads, self.sync.check_gossip)]
        if self.consensus is not None:
            topics.append((t.consensus, self._check_consensus_gossip))
        subs = {topic: await self.net.subscribe(topic, topic_validator(self.net, topic, check))
                for topic, check in topics}
        async with trio.open_nursery() as nursery:
            await nursery.start(lambda task_status: self.sync.run(
                subs[t.heads], announce=self.is_validator, task_status=task_status))
            nursery.start_soon(self.txs.run, subs[t.txs])
            if self.links is not None and self.consensus is not None:
                nursery.start_soon(self._receive_consensus, self.consensus,
                                   subs[t.consensus])
                nursery.start_soon(self.links.run)
                nursery.start_soon(self.consensus.run)
            log.info("chain %s at height %d (%s)", self.genesis.chain_id, self.ledger.height,
                     "validator" if self.is_validator else "follower")
            task_status.started()

    def _check_consensus_gossip(self, data: bytes) -> None:
        check_consensus_gossip(data, self.genesis.chain_id, self.genesis.powers,
                               self._max_consensus_frame)

    async def _receive_consensus(self, consensus: Consensus, subscription: Any) -> None:
        """Feed the consensus topic's messages to this validator's machine."""
        while True:
            message = await subscription.get()
            try:
                frame = ConsensusFrame.decode(message.data, self._max_consensus_frame)
            except RemoteProtocolError:
                continue
            consensus.deliver(frame.kind, frame.data, message.from_peer)


GENESIS_FILE = "genesis.toml"  # in the node home: the chain this home follows


def load_genesis(home: Path, path: Path | None) -> Genesis | None:
    """The genesis this node follows: ``path`` (``node start --genesis``), kept in the
    home so that later starts need no flag, or the one kept there before; None when there
    is neither. ChainError when ``path`` is unreadable or invalid, or names another chain
    than the one this home follows (its blocks would not verify)."""
    kept = home / GENESIS_FILE
    current = None
    if kept.exists():
        current = _read_genesis(kept)
    if path is None:
        return current
    given = _read_genesis(path)
    if current is not None and current.id != given.id:
        raise ChainError(f"{path}: this home follows chain {current.chain_id!r} (genesis "
                         f"{current.id.hex()[:16]}), not {given.chain_id!r} (genesis "
                         f"{given.id.hex()[:16]}); use another --home")
    if current is None:
        tmp = kept.with_suffix(".tmp")
        tmp.write_text(path.read_text(encoding="utf-8"), encoding="utf-8")
        os.replace(tmp, kept)
    return given


def _read_genesis(path: Path) -> Genesis:
    try:
        return parse_genesis(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise ChainError(f"cannot read the genesis file {path}: {exc}") from None
    except GenesisError as exc:
        raise ChainError(f"{path}: {exc}") from None
