"""The reward ledger: a deterministic state machine over finalized blocks.

See specs/rewards.md (normative: a second implementation fed the same blocks MUST reach the
same state root). The ledger is a pure function of the genesis and the blocks: integer
units only, no clock, no randomness, no floats in the state.

A :class:`Ledger` value is one state. :meth:`Ledger.apply_block` returns the next state and
leaves ``self`` as it was; :meth:`Ledger.build_block` makes a block from candidate
transactions (protocol/txs.py, already checked by :func:`~protocol.txs.check_tx`).

Cost. The counted receipts, tasks, rounds and versions grow without bound, so a state does
not own copies of them: states of one chain share one store of those maps, and each state
holds only its own block's changes (an overlay). Applying a block on a state first folds
that state's overlay into the store: O(block), never O(all receipts). The price: folding
makes every *other* state of that store stale (its parent and its siblings), and a stale
state raises LocalProtocolError when used. Consensus never needs them: once a block is
committed, the next block is applied on the committed state. Snapshots
(:meth:`Ledger.encode`) are independent values. The state root hashes the balances, nonces
and jobs in full (O(accounts + jobs)) and everything else through a running hash of the
applied transaction ids, so it costs nothing per counted receipt.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from protocol.checks import ID_BYTES, MAX_INT, digest, packb
from protocol.consensus import block_id
from protocol.envelope import unpack_strict
from protocol.errors import LocalProtocolError, RemoteProtocolError
from protocol.genesis import Genesis, RewardParams
from protocol.jobs import BPS
from protocol.jobspec import JobSpec
from protocol.txs import (
    KIND_DOUBLE_VOTE,
    KIND_FEED_FORK,
    KIND_JOB,
    KIND_RECEIPT,
    KIND_REVENUE,
    KIND_ROUND,
    ZERO_ID,
    Block,
    CheckedTx,
    Revenue,
    RoundRecord,
    TxRefused,
    check_tx,
    encode_tx,
    tx_id,
)

LEDGER_VERSION = 1
ROOT_TAG = "iollm/ledger-root/v1"
SNAPSHOT_TYPE = "ledger-snapshot"
QUALITY_MIN_BPS = 1000  # quality 0.1
QUALITY_MAX_BPS = 20000  # quality 2.0
QUALITY_DEFAULT_BPS = BPS  # a receipt without an own_gain metric
MAX_SNAPSHOT_BYTES = 2**32 - 1


# --- state entries -----------------------------------------------------------------------------


@dataclass(frozen=True)
class JobEntry:
    """A registered job. The designer is the coordinator: the node the designer submitted
    the job to signs it and is the only party the ledger knows."""

    coordinator: str
    designer_share_bps: int
    rounds: int
    reward_pool: int  # informational: recorded and shown, never minted (specs/rewards.md)
    base_model: bytes
    best_micro: int | None  # best held-out loss a round record reported; None: no round yet
    height: int  # the block that registered it
    eval_set: bytes  # eval_set_id of its spec: jobs whose losses compare (breakthroughs)

    @property
    def designer(self) -> str:
        return self.coordinator

    def row(self) -> list[Any]:
        return [self.coordinator, self.designer_share_bps, self.rounds, self.reward_pool,
                self.base_model, self.best_micro, self.height, self.eval_set]


@dataclass(frozen=True)
class ReceiptEntry:
    """A counted receipt: what rewards need of it."""

    job_id: bytes
    round: int
    task_id: str
    worker: str
    tokens: int
    quality_bps: int
    height: int

    @property
    def weight(self) -> int:
        return self.tokens * self.quality_bps

    def row(self) -> list[Any]:
        return [self.job_id, self.round, self.task_id, self.worker, self.tokens,
                self.quality_bps, self.height]


@dataclass(frozen=True)
class VersionEntry:
    """A model version some round record produced: its place in the lineage."""

    job_id: bytes
    round: int
    parent: bytes
    receipts: tuple[bytes, ...]
    heldout_loss_micro: int
    height: int

    def row(self) -> list[Any]:
        return [self.job_id, self.round, self.parent, list(self.receipts),
                self.heldout_loss_micro, self.height]


@dataclass(frozen=True)
class EvidenceEntry:
    """Recorded misbehaviour: ``kind`` "feed-fork" (key: author, seq) or "double-vote"
    (key: validator, height, round, vote kind)."""

    kind: str
    offender: str
    key: tuple[Any, ...]
    tx_id: bytes
    height: int

    def row(self) -> list[Any]:
        return [self.kind, self.offender, list(self.key), self.tx_id, self.height]


# --- the split rule ----------------------------------------------------------------------------


def split(total: int, weights: Mapping[str, int]) -> dict[str, int]:
    """``total`` units split by weight, exactly (largest remainder): each recipient gets
    ``floor(total * w / W)``, and the units left over go one each to the largest
    remainders ``total * w mod W``, ties to the smaller peer id. Recipients of weight 0
    get nothing; ``{}`` when the total weight is 0 (nothing is paid)."""
    live = {p: w for p, w in weights.items() if w > 0}
    whole = sum(live.values())
    if total <= 0 or whole == 0:
        return {}
    out: dict[str, int] = {}
    rems: list[tuple[int, str]] = []
    for peer, w in live.items():
        q, r = divmod(total * w, whole)
        out[peer] = q
        rems.append((-r, peer))
    left = total - sum(out.values())
    if left:
        rems.sort()
        for _, peer in rems[:left]:
            out[peer] += 1
    return {p: a for p, a in out.items() if a}


def quality_bps(metrics: Mapping[str, float], params: RewardParams) -> int:
    """A receipt's quality from its ``own_gain`` metric (nats): 10000 without it."""
    gain = metrics.get("own_gain")
    if gain is None:
        return QUALITY_DEFAULT_BPS
    micro = int(gain * 1e6)  # IEEE-754 binary64 product, truncated toward zero
    return max(QUALITY_MIN_BPS, min(QUALITY_MAX_BPS, micro * BPS // params.quality_ref_micro))


# --- the state ---------------------------------------------------------------------------------

MAPS = ("balances", "nonces", "jobs", "receipts", "tasks", "rounds", "versions", "parents",
        "evidence", "evals")
EVAL_SET_TAG = "iollm/eval-set/v1"


def eval_set_id(spec: JobSpec) -> bytes:
    """What makes two jobs' held-out losses comparable: the dataset and the held-out
    windows every evaluation reads (split, sequence length, seed, batches, batch size).
    Breakthroughs are judged against the best loss of every job with the same id."""
    return digest(packb([EVAL_SET_TAG, spec.dataset, spec.heldout_fraction, spec.seq_len,
                         spec.seed, spec.eval_batches, spec.batch_size]))


class _Store:
    """The maps states of one chain share; ``version`` changes whenever one state's
    overlay is folded in, which makes the states built on the previous version stale."""

    __slots__ = ("maps", "version")

    def __init__(self, maps: dict[str, dict[Any, Any]]) -> None:
        self.maps = maps
        self.version = 0


class Ledger:
    """One state of the ledger. Build with :meth:`from_genesis` or :meth:`decode`."""

    def __init__(self, genesis: Genesis, store: _Store, delta: dict[str, dict[Any, Any]],
                 scalars: dict[str, Any]) -> None:
        self.genesis = genesis
        self._store = store
        self._version = store.version
        self._delta = delta
        self._s = scalars
        self._built: tuple[Block, Ledger] | None = None

    @classmethod
    def from_genesis(cls, genesis: Genesis) -> Ledger:
        maps: dict[str, dict[Any, Any]] = {name: {} for name in MAPS}
        maps["balances"].update(genesis.allocations)
        scalars = {"height": 0, "last_block_id": ZERO_ID,
                   "last_time_ms": genesis.genesis_time_ms,
                   "allocated": sum(a for _, a in genesis.allocations), "emitted": 0,
                   "revenue": 0, "tx_acc": genesis.id, "n_receipts": 0}  # fmt: skip
        return cls(genesis, _Store(maps), {name: {} for name in MAPS}, scalars)

    # --- reading ---

    def _fresh(self) -> None:
        if self._store.version != self._version:
            raise LocalProtocolError("stale ledger state: a block was applied on another "
                                     "state of this chain (see protocol/ledger.py)")

    def _get(self, name: str, key: Any) -> Any:
        d = self._delta[name]
        if key in d:
            return d[key]
        return self._store.maps[name].get(key)

    def _items(self, name: str) -> dict[Any, Any]:
        self._fresh()
        merged = dict(self._store.maps[name])
        merged.update(self._delta[name])
        return merged

    @property
    def height(self) -> int:
        return int(self._s["height"])

    @property
    def last_block_id(self) -> bytes:
        return bytes(self._s["last_block_id"])

    @property
    def last_time_ms(self) -> int:
        return int(self._s["last_time_ms"])

    @property
    def allocated(self) -> int:
        return int(self._s["allocated"])

    @property
    def emitted(self) -> int:
        """Minted by the ledger: mining emission and breakthrough rewards."""
        return int(self._s["emitted"])

    @property
    def revenue(self) -> int:
        """Revenue recorded (and credited)."""
        return int(self._s["revenue"])

    @property
    def supply(self) -> int:
        """allocated + emitted + revenue: always the sum of all balances."""
        return self.allocated + self.emitted + self.revenue

    @property
    def receipts_counted(self) -> int:
        return int(self._s["n_receipts"])

    def balance(self, peer: str) -> int:
        self._fresh()
        return int(self._get("balances", peer) or 0)

    def balances(self) -> dict[str, int]:
        return dict(sorted(self._items("balances").items()))

    def nonce(self, payer: str) -> int:
        """The payer's last revenue nonce (0: none yet)."""
        self._fresh()
        return int(self._get("nonces", payer) or 0)

    def job(self, job_id: bytes) -> JobEntry | None:
        self._fresh()
        return self._get("jobs", job_id)  # type: ignore[no-any-return]

    def jobs(self) -> dict[bytes, JobEntry]:
        return dict(sorted(self._items("jobs").items()))

    def receipt(self, receipt_id: bytes) -> ReceiptEntry | None:
        """The counted receipt, or None when it was never counted."""
        self._fresh()
        return self._get("receipts", receipt_id)  # type: ignore[no-any-return]

    def is_counted(self, receipt_id: bytes) -> bool:
        return self.receipt(receipt_id) is not None

    def version_entry(self, version: bytes) -> VersionEntry | None:
        self._fresh()
        return self._get("versions", version)  # type: ignore[no-any-return]

    def eval_best(self, eval_set: bytes) -> int | None:
        """The best held-out loss (micro-nats) any round record reported on ``eval_set``."""
        self._fresh()
        return self._get("evals", eval_set)  # type: ignore[no-any-return]

    def round_version(self, job_id: bytes, round_: int) -> bytes | None:
        """The version the round record of ``job_id``'s round ``round_`` produced."""
        self._fresh()
        return self._get("rounds", (job_id, round_))  # type: ignore[no-any-return]

    def lineage(self, version: bytes) -> list[tuple[bytes, VersionEntry]]:
        """``version`` and its ancestors that round records produced, newest first."""
        self._fresh()
        out = []
        entry = self._get("versions", version)
        while entry is not None:
            out.append((version, entry))
            version = entry.parent
            entry = self._get("versions", version)
        return out

    def revenue_split(self, model: bytes, amount: int) -> dict[str, int] | None:
        """Who a revenue record of `amount` for `model` would pay, and how much (None when
        no round record produced `model`): the rule `_tx_revenue` applies."""
        self._fresh()
        top = self._get("versions", model)
        return None if top is None else self._revenue_pay(top, model, amount)

    def _revenue_pay(self, top: VersionEntry, model: bytes, amount: int) -> dict[str, int]:
        job = self._get("jobs", top.job_id)
        designer = amount * job.designer_share_bps // BPS
        workers: dict[str, int] = {}
        for _height, entry in self.lineage(model):
            for rid in entry.receipts:
                r = self._get("receipts", rid)
                workers[r.worker] = workers.get(r.worker, 0) + r.weight
        pay = split(amount - designer, workers)
        pay[job.coordinator] = pay.get(job.coordinator, 0) + amount - sum(pay.values())
        return pay

    def evidence(self) -> list[EvidenceEntry]:
        """Every recorded piece of evidence, in key order."""
        return [e for _, e in sorted(self._items("evidence").items())]

    # --- the state root ---

    def state_root(self) -> bytes:
        """H(packb(the root list of specs/rewards.md, "State root"))."""
        self._fresh()
        s = self._s
        balances = sorted(self._items("balances").items())
        nonces = sorted(self._items("nonces").items())
        jobs = sorted(self._items("jobs").items())
        return digest(packb([
            ROOT_TAG, self.genesis.id, s["height"], s["last_time_ms"], s["tx_acc"],
            s["allocated"], s["emitted"], s["revenue"], s["n_receipts"],
            [[p, b] for p, b in balances], [[p, n] for p, n in nonces],
            [[j, *e.row()] for j, e in jobs],
        ]))  # fmt: skip

    # --- blocks ---

    def _fold(self) -> None:
        """Fold this state's overlay into the shared store (its logical state is
        unchanged; every other state on the store becomes stale)."""
        self._fresh()
        if any(self._delta.values()):
            for name, d in self._delta.items():
                self._store.maps[name].update(d)
            self._store.version += 1
            self._version = self._store.version
            self._delta = {name: {} for name in MAPS}

    def _child(self) -> Ledger:
        self._fold()
        return Ledger(self.genesis, self._store, {name: {} for name in MAPS}, dict(self._s))

    def _check_header(self, block: Block) -> None:
        g = self.genesis
        if block.chain_id != g.chain_id:
            raise RemoteProtocolError("wrong-chain", f"block of chain {block.chain_id!r}")
        if block.height != self.height + 1:
            raise RemoteProtocolError("bad-height", f"block {block.height} on state "
                                                    f"{self.height}")
        if block.prev_id != self.last_block_id:
            raise RemoteProtocolError("bad-prev", "prev_id is not the last block's id")
        if block.time_ms < self.last_time_ms:
            raise RemoteProtocolError("bad-time", f"time {block.time_ms} before "
                                                  f"{self.last_time_ms}")
        if block.proposer not in g.powers:
            raise RemoteProtocolError("not-validator", f"proposer {block.proposer} is not a "
                                                       "validator")

    def apply_block(self, block: Block, checked: Sequence[CheckedTx]) -> Ledger:
        """The state after ``block``; ``checked[i]`` is check_tx of ``block.txs[i]``.
        RemoteProtocolError (TxRefused for a transaction) when the block is invalid:
        wrong chain, height, prev_id, time before the last block, proposer not a
        validator, over max_block_bytes, any transaction refused, or a state root other
        than the one it carries. ``self`` is unchanged either way."""
        if len(checked) != len(block.txs) or any(
                c.data is not t and c.data != t for c, t in zip(checked, block.txs, strict=False)):
            raise LocalProtocolError("checked must be check_tx of each of block.txs")
        self._fresh()
        built = self._built
        if built is not None and built[0] == block:
            return built[1]  # this very block came from build_block on this state
        self._check_header(block)
        size = len(block.encode())
        if size > self.genesis.max_block_bytes:
            raise RemoteProtocolError("oversized", f"block of {size} bytes > "
                                                   f"{self.genesis.max_block_bytes}")
        new = self._child()
        block_receipts: list[ReceiptEntry] = []
        for i, c in enumerate(checked):
            try:
                new._apply_tx(c, block.height, block_receipts)
            except TxRefused as exc:
                raise TxRefused(exc.reason, f"tx {i} ({c.kind}): {exc.detail}",
                                exc.retry) from None
        new._end_block(block.height, block.time_ms, block_receipts)
        root = new.state_root()
        if root != block.state_root:
            raise RemoteProtocolError("bad-state-root", f"the block says "
                                                        f"{block.state_root.hex()[:16]}.., "
                                                        f"applying it gives {root.hex()[:16]}..")
        new._s["last_block_id"] = block.id
        return new

    def build_block(self, candidates: Sequence[CheckedTx], *, time_ms: int, proposer: str,
                    max_bytes: int) -> tuple[Block, list[tuple[CheckedTx, TxRefused]]]:
        """A block at ``self.height + 1``: the candidates that apply, in order, as many
        as fit in ``min(max_bytes, genesis.max_block_bytes)``; its state root filled in.
        Returns it and the refused candidates with why. Candidates that did not fit are
        in neither list: they wait for a later block."""
        self._fresh()
        time_ms = max(time_ms, self.last_time_ms)
        cap = min(max_bytes, self.genesis.max_block_bytes)
        prev = self.last_block_id
        header = Block(self.genesis.chain_id, self.height + 1, time_ms, proposer, prev,
                       ZERO_ID, ())
        try:
            self._check_header(header)
        except RemoteProtocolError as exc:
            raise LocalProtocolError(f"cannot build on this state: {exc}") from None
        size = len(header.encode()) + 4  # + the array header of more than 15 txs
        new = self._child()
        kept: list[bytes] = []
        refused: list[tuple[CheckedTx, TxRefused]] = []
        block_receipts: list[ReceiptEntry] = []
        for c in candidates:
            cost = len(c.data) + 5  # bin header
            if size + cost > cap:
                continue
            try:
                new._apply_tx(c, header.height, block_receipts)
            except TxRefused as exc:
                refused.append((c, exc))
                continue
            kept.append(c.data)
            size += cost
        new._end_block(header.height, time_ms, block_receipts)
        block = Block(header.chain_id, header.height, time_ms, proposer, prev,
                      new.state_root(), tuple(kept))
        new._s["last_block_id"] = block.id
        self._built = (block, new)
        return block, refused

    # --- transactions (each checks everything before it writes anything) ---

    def _put(self, name: str, key: Any, value: Any) -> None:
        self._delta[name][key] = value

    def _credit(self, amounts: Mapping[str, int]) -> None:
        bal = self._delta["balances"]
        store = self._store.maps["balances"]
        for peer, amount in amounts.items():
            if amount:
                bal[peer] = (bal[peer] if peer in bal else store.get(peer, 0)) + amount

    def _room(self, amount: int) -> int:
        """``amount``, cut so the supply stays within MAX_INT."""
        return max(0, min(amount, MAX_INT - self.supply))

    def _apply_tx(self, c: CheckedTx, height: int, block_receipts: list[ReceiptEntry]) -> None:
        handler = _HANDLERS.get(c.kind)
        if handler is None:
            raise TxRefused("unknown-kind", f"transaction kind {c.kind!r}")
        handler(self, c, height, block_receipts)
        self._s["tx_acc"] = digest(self._s["tx_acc"] + c.id)

    def _tx_job(self, c: CheckedTx, height: int, _: list[ReceiptEntry]) -> None:
        job = c.record
        if self._get("jobs", c.ref) is not None:
            raise TxRefused("duplicate", "job already registered")
        spec = job.spec
        self._put("jobs", c.ref, JobEntry(job.coordinator, spec.designer_share_bps,
                                          spec.rounds, spec.reward_pool, spec.base_model,
                                          None, height, eval_set_id(spec)))

    def _registered(self, job_id: bytes) -> JobEntry:
        job = self._get("jobs", job_id)
        if job is None:
            raise TxRefused("unknown-job", f"job {job_id.hex()[:16]}.. is not registered",
                            retry=True)
        return job  # type: ignore[no-any-return]

    def _tx_receipt(self, c: CheckedTx, height: int, block_receipts: list[ReceiptEntry]
                    ) -> None:
        r = c.record
        job = self._registered(r.job_id)
        if r.coordinator != job.coordinator:
            raise TxRefused("not-coordinator", f"receipt signed by {r.coordinator}, the job "
                                               f"is coordinated by {job.coordinator}")
        if r.round >= job.rounds:
            raise TxRefused("bad-round", f"round {r.round} of a job of {job.rounds} rounds")
        if self._get("receipts", c.ref) is not None:
            raise TxRefused("duplicate", "receipt already counted")
        task = (r.job_id, r.round, r.task_id)
        if self._get("tasks", task) is not None:
            raise TxRefused("duplicate-task", f"task {r.task_id!r} of round {r.round} "
                                              "already has a counted receipt")
        entry = ReceiptEntry(r.job_id, r.round, r.task_id, r.worker, r.tokens,
                             quality_bps(r.metrics, self.genesis.rewards), height)
        self._put("receipts", c.ref, entry)
        self._put("tasks", task, c.ref)
        self._s["n_receipts"] += 1
        block_receipts.append(entry)

    def _tx_round(self, c: CheckedTx, height: int, _: list[ReceiptEntry]) -> None:
        rec = c.record
        job = self._registered(rec.job_id)
        if rec.coordinator != job.coordinator:
            raise TxRefused("not-coordinator", f"round record signed by {rec.coordinator}, "
                                               f"the job is coordinated by {job.coordinator}")
        if rec.round >= job.rounds:
            raise TxRefused("bad-round", f"round {rec.round} of a job of {job.rounds} rounds")
        if self._get("rounds", (rec.job_id, rec.round)) is not None:
            raise TxRefused("duplicate", f"round {rec.round} already recorded")
        if self._get("versions", rec.version) is not None or \
                self._get("parents", rec.version) is not None:
            raise TxRefused("known-version", "version already in a recorded lineage")
        if rec.round == 0 and rec.parent != job.base_model:
            raise TxRefused("bad-parent", "round 0 must be trained from the job's base_model")
        entries = []
        for rid in rec.receipts:
            entry = self._get("receipts", rid)
            if entry is None:
                raise TxRefused("receipts-pending", f"receipt {rid.hex()[:16]}.. is not "
                                                    "counted yet", retry=True)
            if entry.job_id != rec.job_id or entry.round != rec.round:
                raise TxRefused("receipt-mismatch", f"receipt {rid.hex()[:16]}.. is for "
                                                    "another job or round")
            entries.append(entry)
        # Breakthrough: the round beats the best so far (its parent's loss at first), and
        # the best any job on the same evaluation set reached (branches of one search,
        # other designers' jobs on the same data), so a version pays once for a level.
        best = rec.parent_loss_micro if job.best_micro is None else job.best_micro
        known = self._get("evals", job.eval_set)
        if known is not None:
            best = min(best, known)
        margin = self.genesis.rewards.breakthrough_margin_micro
        if rec.heldout_loss_micro <= best - margin:
            minted = self._room(self.genesis.rewards.breakthrough_reward)
            designer = minted * job.designer_share_bps // BPS
            pay = split(minted - designer, _by_worker(entries))
            pay[job.coordinator] = pay.get(job.coordinator, 0) + minted - sum(pay.values())
            self._credit(pay)
            self._s["emitted"] += minted
        new_best = rec.heldout_loss_micro if job.best_micro is None else \
            min(job.best_micro, rec.heldout_loss_micro)
        self._put("jobs", rec.job_id, JobEntry(job.coordinator, job.designer_share_bps,
                                               job.rounds, job.reward_pool, job.base_model,
                                               new_best, job.height, job.eval_set))
        if known is None or rec.heldout_loss_micro < known:
            self._put("evals", job.eval_set, rec.heldout_loss_micro)
        self._put("rounds", (rec.job_id, rec.round), rec.version)
        self._put("versions", rec.version, VersionEntry(rec.job_id, rec.round, rec.parent,
                                                        rec.receipts,
                                                        rec.heldout_loss_micro, height))
        self._put("parents", rec.parent, True)

    def _tx_revenue(self, c: CheckedTx, height: int, _: list[ReceiptEntry]) -> None:
        rev = c.record
        last = self.nonce(rev.payer)
        if rev.nonce <= last:
            raise TxRefused("replayed", f"nonce {rev.nonce}, the payer's last is {last}")
        if rev.nonce > last + 1:
            raise TxRefused("nonce-gap", f"nonce {rev.nonce}, the payer's last is {last}",
                            retry=True)
        top = self._get("versions", rev.model)
        if top is None:
            raise TxRefused("unknown-model", "no round record produced this model",
                            retry=True)
        if rev.amount > MAX_INT - self.supply:
            raise TxRefused("supply-cap", f"the supply would exceed {MAX_INT}")
        self._credit(self._revenue_pay(top, rev.model, rev.amount))
        self._s["revenue"] += rev.amount
        self._put("nonces", rev.payer, rev.nonce)

    def _evidence(self, c: CheckedTx, kind: str, offender: str, key: tuple[Any, ...],
                  height: int) -> None:
        full = (kind, *key)
        if self._get("evidence", full) is not None:
            raise TxRefused("duplicate", f"{kind} evidence against {offender} already "
                                         "recorded")
        self._put("evidence", full, EvidenceEntry(kind, offender, key, c.id, height))

    def _tx_fork(self, c: CheckedTx, height: int, _: list[ReceiptEntry]) -> None:
        ev = c.record
        self._evidence(c, KIND_FEED_FORK, ev.author, (ev.author, ev.seq), height)

    def _tx_double_vote(self, c: CheckedTx, height: int, _: list[ReceiptEntry]) -> None:
        v = c.record
        self._evidence(c, KIND_DOUBLE_VOTE, v.validator,
                       (v.validator, v.height, v.round, v.kind), height)

    def _end_block(self, height: int, time_ms: int, receipts: list[ReceiptEntry]) -> None:
        """Mining emission over the block's receipts, then the block's height and time."""
        if receipts:
            weights: dict[str, int] = {}
            for r in receipts:
                job = self._get("jobs", r.job_id)
                w = r.weight
                weights[job.coordinator] = weights.get(job.coordinator, 0) + \
                    w * job.designer_share_bps
                weights[r.worker] = weights.get(r.worker, 0) + w * (BPS - job.designer_share_bps)
            minted = self._room(self.genesis.rewards.emission_per_block)
            pay = split(minted, weights)
            self._credit(pay)
            self._s["emitted"] += sum(pay.values())
        self._s["height"] = height
        self._s["last_time_ms"] = time_ms

    # --- snapshots ---

    def encode(self) -> bytes:
        """A snapshot: the genesis and the whole state (see specs/rewards.md)."""
        self._fresh()
        s = self._s
        return packb({
            "type": SNAPSHOT_TYPE, "v": LEDGER_VERSION, "genesis": self.genesis.encode(),
            "scalars": [s["height"], s["last_block_id"], s["last_time_ms"], s["allocated"],
                        s["emitted"], s["revenue"], s["tx_acc"], s["n_receipts"]],
            "state_root": self.state_root(),
            "balances": [[p, b] for p, b in sorted(self._items("balances").items())],
            "nonces": [[p, n] for p, n in sorted(self._items("nonces").items())],
            "jobs": [[j, *e.row()] for j, e in sorted(self._items("jobs").items())],
            "receipts": [[r, *e.row()] for r, e in self._items("receipts").items()],
            "versions": [[v, *e.row()] for v, e in self._items("versions").items()],
            "evidence": [e.row() for e in self.evidence()],
        })  # fmt: skip

    @classmethod
    def decode(cls, data: bytes) -> Ledger:
        """Inverse of :meth:`encode`. RemoteProtocolError("bad-snapshot") when it does not
        decode or its recomputed state root is not the one it holds."""
        try:
            d = unpack_strict(bytes(data), MAX_SNAPSHOT_BYTES)
            if d["type"] != SNAPSHOT_TYPE or d["v"] != LEDGER_VERSION:
                raise ValueError("not a ledger snapshot of this version")
            genesis = Genesis.decode(d["genesis"])
            names = ("height", "last_block_id", "last_time_ms", "allocated", "emitted",
                     "revenue", "tx_acc", "n_receipts")
            scalars = dict(zip(names, d["scalars"], strict=True))
            maps: dict[str, dict[Any, Any]] = {name: {} for name in MAPS}
            maps["balances"] = {p: b for p, b in d["balances"]}
            maps["nonces"] = {p: n for p, n in d["nonces"]}
            maps["jobs"] = {j: JobEntry(*row) for j, *row in d["jobs"]}
            for entry in maps["jobs"].values():  # the evaluation sets' bests, derived
                old = maps["evals"].get(entry.eval_set)
                if entry.best_micro is not None and (old is None or entry.best_micro < old):
                    maps["evals"][entry.eval_set] = entry.best_micro
            for rid, *row in d["receipts"]:
                entry = ReceiptEntry(*row)
                maps["receipts"][rid] = entry
                maps["tasks"][(entry.job_id, entry.round, entry.task_id)] = rid
            for v, job_id, rnd, parent, receipts, loss, height in d["versions"]:
                maps["versions"][v] = VersionEntry(job_id, rnd, parent, tuple(receipts),
                                                   loss, height)
                maps["rounds"][(job_id, rnd)] = v
                maps["parents"][parent] = True
            for kind, offender, key, txid, height in d["evidence"]:
                maps["evidence"][(kind, *key)] = EvidenceEntry(kind, offender, tuple(key),
                                                               txid, height)
            ledger = cls(genesis, _Store(maps), {name: {} for name in MAPS}, scalars)
            root = ledger.state_root()
        except (RemoteProtocolError, KeyError, TypeError, ValueError) as exc:
            raise RemoteProtocolError("bad-snapshot", f"not a ledger snapshot: {exc}") \
                from None
        if root != d["state_root"]:
            raise RemoteProtocolError("bad-snapshot", "state root does not match the state")
        return ledger


def _by_worker(entries: Iterable[ReceiptEntry]) -> dict[str, int]:
    out: dict[str, int] = {}
    for e in entries:
        out[e.worker] = out.get(e.worker, 0) + e.weight
    return out


_HANDLERS = {KIND_JOB: Ledger._tx_job, KIND_RECEIPT: Ledger._tx_receipt,
             KIND_ROUND: Ledger._tx_round, KIND_REVENUE: Ledger._tx_revenue,
             KIND_FEED_FORK: Ledger._tx_fork, KIND_DOUBLE_VOTE: Ledger._tx_double_vote}

__all__ = ["ID_BYTES", "Block", "CheckedTx", "EvidenceEntry", "JobEntry", "Ledger",
           "ReceiptEntry", "Revenue", "RoundRecord", "TxRefused", "VersionEntry", "block_id",
           "check_tx", "encode_tx", "eval_set_id", "quality_bps", "split", "tx_id"]
