"""Tendermint-style BFT consensus for one height: sans-IO (specs/consensus.md).

:class:`Machine` is Algorithm 1 of Buchman, Kwon and Milosevic, "The latest gossip on BFT
consensus" (2018), for one height, with voting power: "2f+1" is more than 2/3 of the
total power (:func:`quorum`), "f+1" more than 1/3. It takes signed envelopes from the
network and timeout firings, each with ``now_ms``, and returns actions as values:
:class:`Broadcast` (gossip these bytes), :class:`SetTimeout` (call ``on_timeout`` at
``at_ms``), :class:`Decide` (the block is final, with its :class:`Commit` certificate) and
:class:`Evidence` (a validator signed two conflicting messages). node/chain/service.py owns
the gossip, the clock, the blocks and one machine per height.

The machine's steps move through :data:`TRANSITIONS` only; rule numbers in comments are
the line numbers of Algorithm 1. Wire messages (:class:`Proposal`, :class:`Vote`,
:class:`Commit`) are msgpack maps with ``type`` and ``v`` first and strict keys. Building
an invalid one is LocalProtocolError; bytes from a peer raise RemoteProtocolError(reason)
and nothing else.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields

from nacl.signing import SigningKey

from protocol.checks import MAX_CHAIN_ID_CHARS, check_chain, check_int, packb
from protocol.envelope import unpack_strict
from protocol.errors import LocalProtocolError, RemoteProtocolError
from protocol.votes import (  # re-exported: the consensus interface is this module
    CONSENSUS_VERSION,
    MAX_COMMIT_BYTES,
    MAX_ROUND,
    MAX_VALIDATORS,
    MAX_VOTE_BYTES,
    PRECOMMIT,
    PREVOTE,
    PROPOSER_SEED,
    VOTE_KINDS,
    Commit,
    Proposal,
    Vote,
    block_id,
    check_validators,
    message_height,
    open_proposal,
    open_vote,
    own_id,
    proposer_for,
    quorum,
    seal_proposal,
    seal_vote,
    skip_power,
    verify_commit,
    verify_double_proposal,
    verify_double_vote,
)

__all__ = [
    "CONSENSUS_VERSION", "DECIDED", "MAX_CHAIN_ID_CHARS", "MAX_COMMIT_BYTES",
    "MAX_FUTURE_ROUNDS", "MAX_ROUND", "MAX_TIMEOUT_MS", "MAX_VALIDATORS", "MAX_VOTE_BYTES",
    "PRECOMMIT", "PREVOTE", "PROPOSE", "PROPOSER_SEED", "STEPS", "TRANSITIONS", "VOTE_KINDS",
    "Action", "Broadcast", "Commit", "Decide", "Evidence", "IllegalTransition", "Machine",
    "Proposal", "Resume", "SetTimeout", "Timeouts", "Vote", "block_id", "message_height",
    "open_proposal",
    "open_vote", "proposer_for", "quorum", "seal_proposal", "seal_vote", "verify_commit",
    "verify_double_proposal", "verify_double_vote",
]  # fmt: skip

MAX_TIMEOUT_MS = 600_000  # of any step in round 0, and of delta_ms
MAX_FUTURE_ROUNDS = 4  # rounds above ours kept per validator (the f+1 skip needs only one)

# --- steps: the state machine as data ----------------------------------------------------------

PROPOSE, DECIDED = "propose", "decided"  # the prevote and precommit steps reuse the kinds
STEPS = (PROPOSE, PREVOTE, PRECOMMIT, DECIDED)
TRANSITIONS: dict[tuple[str, str], str] = {
    (PROPOSE, "prevote"): PREVOTE,  # rules 22, 28 (a proposal), 57 (timeout: nil)
    (PREVOTE, "precommit"): PRECOMMIT,  # rules 36 (2f+1 prevotes for v), 44 (nil), 61
    (PROPOSE, "new-round"): PROPOSE,  # rules 55 (f+1 of a higher round), 65 (timeout)
    (PREVOTE, "new-round"): PROPOSE,
    (PRECOMMIT, "new-round"): PROPOSE,
    (PROPOSE, "decide"): DECIDED,  # rule 49: a proposal and 2f+1 precommits for it
    (PREVOTE, "decide"): DECIDED,
    (PRECOMMIT, "decide"): DECIDED,
}


class IllegalTransition(LocalProtocolError):
    """The machine took an edge :data:`TRANSITIONS` lacks (our bug)."""


# --- actions -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Broadcast:
    """Gossip ``data``; ``kind`` is "proposal" or "vote" (the topic)."""

    data: bytes
    kind: str


@dataclass(frozen=True)
class SetTimeout:
    """Call ``on_timeout(step, height, round, now_ms)`` once the clock reaches ``at_ms``."""

    step: str
    height: int
    round: int
    at_ms: int


@dataclass(frozen=True)
class Decide:
    """``block`` is final at ``height``; ``commit`` is its certificate."""

    height: int
    round: int
    block: bytes
    block_id: bytes
    commit: Commit


@dataclass(frozen=True)
class Evidence:
    """``validator`` signed ``a`` and ``b``, which conflict ("double-vote" or
    "double-proposal"); checkable by :func:`verify_double_vote` / ``verify_double_proposal``."""

    validator: str
    kind: str
    a: bytes
    b: bytes


Action = Broadcast | SetTimeout | Decide | Evidence


@dataclass(frozen=True)
class Resume:
    """A validator's write-ahead state at one height: the last round it signed anything
    in, and its lock. A machine made with it signs nothing in rounds up to
    ``signed_round`` (it may have signed something else there before it restarted) and
    keeps the lock, so a restart is not an equivocation and loses no safety."""

    height: int
    signed_round: int
    locked: bytes | None = None
    locked_round: int = -1

    def encode(self) -> bytes:
        return packb([self.height, self.signed_round, self.locked, self.locked_round])

    @classmethod
    def decode(cls, data: bytes) -> Resume:
        """LocalProtocolError on anything but what :meth:`encode` wrote (it is our own
        file, not a peer's bytes)."""
        try:
            h, r, locked, lr = unpack_strict(data, 256)
            resume = cls(h, r, locked, lr)
        except (RemoteProtocolError, TypeError, ValueError) as exc:
            raise LocalProtocolError(f"not a consensus resume point: {exc}") from None
        if not (isinstance(h, int) and isinstance(r, int) and isinstance(lr, int)
                and (locked is None or (isinstance(locked, bytes) and len(locked) == 32))):
            raise LocalProtocolError("not a consensus resume point")
        return resume


@dataclass(frozen=True)
class Timeouts:
    """Timeout of each step in round 0; each round adds ``delta_ms`` to all three."""

    propose_ms: int = 1000
    prevote_ms: int = 500
    precommit_ms: int = 500
    delta_ms: int = 500

    def __post_init__(self) -> None:
        for f in fields(self):
            check_int(f.name, getattr(self, f.name), 1 if f.name != "delta_ms" else 0,
                      MAX_TIMEOUT_MS)

    def of(self, step: str, round: int) -> int:
        base = {PROPOSE: self.propose_ms, PREVOTE: self.prevote_ms,
                PRECOMMIT: self.precommit_ms}[step]
        return base + round * self.delta_ms


# --- the machine -------------------------------------------------------------------------------

Slot = tuple[int, str]  # (round, vote kind)


class Machine:
    """Consensus on one height (Algorithm 1). ``key`` None, or a key outside the set: an
    observer that follows and decides but never signs. ``make_block(round)`` gives the
    block this node proposes; ``valid_block(block)`` says whether the app accepts it at
    this height (asked at most once per block). Inputs for other heights are ignored."""

    def __init__(self, chain_id: str, validators: Mapping[str, int], key: SigningKey | None,
                 height: int, timeouts: Timeouts, *, valid_block: Callable[[bytes], bool],
                 make_block: Callable[[int], bytes], max_proposal_bytes: int,
                 resume: Resume | None = None) -> None:
        check_chain(chain_id)  # Invalid: a LocalProtocolError
        check_int("height", height, 1)
        check_int("max_proposal_bytes", max_proposal_bytes, 1)
        self.chain_id, self.validators = chain_id, check_validators(validators)
        self._total = sum(self.validators.values())
        self._quorum, self._skip = quorum(self.validators), skip_power(self._total)
        me = own_id(key) if key is not None else None
        self._key: SigningKey | None = key if me in self.validators else None
        self.me: str | None = me if me in self.validators else None
        self.timeouts, self._max_bytes = timeouts, max_proposal_bytes
        self._valid_block, self._make_block = valid_block, make_block
        self._height, self._round, self._step, self._started = height, 0, PROPOSE, False
        self._locked: bytes | None = None  # block ids: comparing ids is comparing values
        self._locked_round = -1
        self._valid: bytes | None = None  # the block itself: we may have to propose it
        self._valid_round = -1
        self._proposals: dict[int, tuple[Proposal, bytes, bytes]] = {}  # round -> (p, id, data)
        # slot -> validator -> block id -> envelope: the first vote, and conflicting ones
        # for nil or a block proposed at this height (see _add_vote)
        self._votes: dict[Slot, dict[str, dict[bytes | None, bytes]]] = {}
        self._tally: dict[Slot, dict[bytes | None, int]] = {}  # power per block id
        self._senders: dict[int, set[str]] = {}  # round -> validators with a message in it
        self._done: set[tuple[str, int]] = set()  # rules 34, 36, 47: "for the first time"
        self._accepts: dict[bytes, bool] = {}  # block id -> valid_block's answer
        self._reported: set[tuple[str, int, str]] = set()  # evidence already emitted
        self._own: dict[str, bytes] = {}  # "proposal" / kind -> our latest envelope
        self._out: list[Action] = []
        self._now = 0
        self.decided: Decide | None = None
        self._quiet_below = 0  # rounds below this were signed in before a restart
        if resume is not None:
            if resume.height != height:
                raise LocalProtocolError(f"a resume of height {resume.height} at {height}")
            self._quiet_below = resume.signed_round + 1
            if resume.locked_round >= 0:
                self._locked, self._locked_round = resume.locked, resume.locked_round

    @property
    def height(self) -> int:
        return self._height

    def resume_point(self) -> Resume:
        """What a node must keep (durably, before it sends what this call follows) to
        restart at this height without signing twice or forgetting its lock."""
        return Resume(self._height, self._round, self._locked, self._locked_round)

    @property
    def round(self) -> int:
        return self._round

    @property
    def step(self) -> str:
        return self._step

    # --- inputs ---

    def start(self, now_ms: int) -> list[Action]:
        """StartRound(0). Call once, before any other input."""
        if self._started:
            raise LocalProtocolError("start() called twice")
        self._started = True
        return self._handle(now_ms, lambda: self._start_round(0))

    def on_proposal(self, data: bytes, now_ms: int) -> list[Action]:
        """A proposal envelope from the network (RemoteProtocolError if invalid)."""
        p = open_proposal(data, self._max_bytes)
        if not self._ours(p.chain_id, p.height):
            return []
        if p.proposer != proposer_for(self.validators, p.height, p.round):
            raise RemoteProtocolError("not-proposer", f"{p.proposer} does not propose round "
                                                      f"{p.round}")
        return self._handle(now_ms, lambda: self._add_proposal(p, data))

    def on_vote(self, data: bytes, now_ms: int) -> list[Action]:
        """A vote envelope from the network (RemoteProtocolError if invalid)."""
        v = open_vote(data)
        if not self._ours(v.chain_id, v.height):
            return []
        if v.validator not in self.validators:
            raise RemoteProtocolError("not-validator", f"{v.validator} is not a validator")
        return self._handle(now_ms, lambda: self._add_vote(v, data))

    def on_timeout(self, step: str, height: int, round: int, now_ms: int) -> list[Action]:
        """A timeout set by :class:`SetTimeout` fired; stale ones do nothing."""
        if step not in (PROPOSE, PREVOTE, PRECOMMIT):
            raise LocalProtocolError(f"no timeout for step {step!r}")
        if not self._started:
            raise LocalProtocolError("start() first")
        if height != self._height or round != self._round or self.decided is not None:
            return []

        def fire() -> None:
            if step == PROPOSE and self._step == PROPOSE:  # rule 57
                self._cast(PREVOTE, None)
            elif step == PREVOTE and self._step == PREVOTE:  # rule 61
                self._cast(PRECOMMIT, None)
            elif step == PRECOMMIT:  # rule 65
                self._start_round(self._round + 1)
        return self._handle(now_ms, fire)

    def rebroadcast(self) -> list[Action]:
        """What to gossip again (gossip is lossy; node/ calls this every second or so): our
        latest proposal, prevote and precommit; the 2f+1 prevotes behind our validValue,
        so a peer can accept its re-proposal (rule 28: the paper assumes every message a
        correct process received reaches all of them, this stands in for that); the 2f+1
        precommits that ended the latest earlier round, so a peer still in that round can
        follow (rule 47: a validator that left it without precommitting, or a precommit
        the peer lost, would otherwise leave it short of 2f+1 for good); once decided,
        the decided proposal and its precommits."""
        props = [self._own["proposal"]] if "proposal" in self._own else []
        votes = [self._own[k] for k in VOTE_KINDS if k in self._own]
        if self._valid_round >= 0:
            bid = block_id(self._valid)  # type: ignore[arg-type]
            votes += self._voters(self._valid_round, PREVOTE, bid)
        ended = [r for r, kind in self._votes if kind == PRECOMMIT and r < self._round
                 and self._any_power(r, PRECOMMIT) >= self._quorum]
        if ended:
            held = self._votes[(max(ended), PRECOMMIT)]
            votes += [data for w in sorted(held) for data in held[w].values()]
        if self.decided is not None:
            props.append(self._proposals[self.decided.round][2])
            votes += self.decided.commit.votes
        actions: list[Action] = [Broadcast(d, "proposal") for d in dict.fromkeys(props)]
        return actions + [Broadcast(d, "vote") for d in dict.fromkeys(votes)]

    def _ours(self, chain_id: str, height: int) -> bool:
        if not self._started:
            raise LocalProtocolError("start() first")
        if chain_id != self.chain_id:
            raise RemoteProtocolError("wrong-chain", f"a message of chain {chain_id!r:.70}")
        return height == self._height

    def _handle(self, now_ms: int, event: Callable[[], None]) -> list[Action]:
        self._now, self._out = now_ms, []
        event()
        while self.decided is None and self._apply_rule():
            pass
        return self._out

    # --- bookkeeping ---

    def _move(self, event: str) -> None:
        nxt = TRANSITIONS.get((self._step, event))
        if nxt is None:
            raise IllegalTransition(f"no transition from {self._step} on {event}")
        self._step = nxt

    def _keep(self, sender: str, round: int) -> bool:
        """Whether to store a message of ``sender`` in ``round``. Past and current rounds:
        always (one slot per message kind bounds them). Rounds above ours: at most
        MAX_FUTURE_ROUNDS per sender, the highest, so a Byzantine validator cannot fill
        memory and an honest one far ahead is still counted for the f+1 skip."""
        if round <= self._round:
            return True
        ahead = sorted(r for r, who in self._senders.items() if r > self._round and sender in who)
        if round in ahead or len(ahead) < MAX_FUTURE_ROUNDS:
            return True
        if round < ahead[0]:
            return False
        self._forget(sender, ahead[0])
        return True

    def _forget(self, sender: str, round: int) -> None:
        self._senders[round].discard(sender)
        for kind in VOTE_KINDS:
            for bid in self._votes.get((round, kind), {}).pop(sender, {}):
                self._tally[(round, kind)][bid] -= self.validators[sender]
        if round in self._proposals and self._proposals[round][0].proposer == sender:
            del self._proposals[round]

    def _add_proposal(self, p: Proposal, data: bytes) -> None:
        held = self._proposals.get(p.round)
        if held is not None:
            if held[0] != p and ("proposal", p.round, p.proposer) not in self._reported:
                self._reported.add(("proposal", p.round, p.proposer))
                self._out.append(Evidence(p.proposer, "double-proposal", held[2], data))
            return
        if self._keep(p.proposer, p.round):
            self._proposals[p.round] = (p, p.block_id, data)
            self._senders.setdefault(p.round, set()).add(p.proposer)

    def _add_vote(self, v: Vote, data: bytes) -> None:
        """Count a validator at most once per (round, kind, block id), as Algorithm 1 counts
        messages, and at most once in "2f+1 of any" (:meth:`_any_power`), so a double
        voter cannot inflate a tally. A conflicting vote is evidence (reported once per
        slot); it is kept, and counted for its block, only when it is for nil or for a block
        proposed at this height: a validator locked on v must be able to show the 2f+1
        prevotes for v it saw, one of them perhaps the equivocator's (specs/consensus.md,
        "Why conflicting votes are counted"), while a flood of votes for junk ids is
        dropped."""
        slot = (v.round, v.kind)
        held = self._votes.get(slot, {}).get(v.validator)
        if held is not None:
            if v.block_id in held:
                return
            if (v.kind, v.round, v.validator) not in self._reported:
                self._reported.add((v.kind, v.round, v.validator))
                self._out.append(Evidence(v.validator, "double-vote", next(iter(held.values())),
                                          data))
            if v.block_id is not None and all(
                    v.block_id != bid for _, bid, _ in self._proposals.values()):
                return
        elif not self._keep(v.validator, v.round):
            return
        self._votes.setdefault(slot, {}).setdefault(v.validator, {})[v.block_id] = data
        tally = self._tally.setdefault(slot, {})
        tally[v.block_id] = tally.get(v.block_id, 0) + self.validators[v.validator]
        self._senders.setdefault(v.round, set()).add(v.validator)

    def _voters(self, round: int, kind: str, bid: bytes | None) -> list[bytes]:
        """The envelopes of the votes for ``bid`` in (round, kind), by peer id."""
        held = self._votes.get((round, kind), {})
        return [held[w][bid] for w in sorted(held) if bid in held[w]]

    def _power(self, round: int, kind: str, bid: bytes | None) -> int:
        return self._tally.get((round, kind), {}).get(bid, 0)

    def _any_power(self, round: int, kind: str) -> int:
        return sum(self.validators[w] for w in self._votes.get((round, kind), {}))

    def _accepts_block(self, p: Proposal, bid: bytes) -> bool:
        if bid not in self._accepts:
            self._accepts[bid] = bool(self._valid_block(p.block))
        return self._accepts[bid]

    def _once(self, rule: str, round: int) -> bool:
        if (rule, round) in self._done:
            return False
        self._done.add((rule, round))
        return True

    # --- Algorithm 1 ---

    def _start_round(self, round: int) -> None:
        """StartRound (line 11): propose validValue, else a new block; or wait for one."""
        self._move("new-round")
        self._round = round
        if (self._key is not None and round >= self._quiet_below
                and self.me == proposer_for(self.validators, self._height, round)):
            block = self._valid if self._valid is not None else self._make_block(round)
            p = Proposal(self.chain_id, self._height, round, block, self._valid_round, self.me)
            data = seal_proposal(self._key, p)
            if len(data) > self._max_bytes:
                raise LocalProtocolError(f"our proposal of {len(data)} bytes > "
                                         f"max_proposal_bytes {self._max_bytes}")
            self._own["proposal"] = data
            self._out.append(Broadcast(data, "proposal"))
            self._add_proposal(p, data)
        else:
            self._set_timeout(PROPOSE)

    def _set_timeout(self, step: str) -> None:
        self._out.append(SetTimeout(step, self._height, self._round,
                                    self._now + self.timeouts.of(step, self._round)))

    def _cast(self, kind: str, bid: bytes | None) -> None:
        """Sign and broadcast our vote for the current round (observers only move on)."""
        self._move(kind)
        if self._key is None or self.me is None or self._round < self._quiet_below:
            return
        v = Vote(self.chain_id, self._height, self._round, kind, bid, self.me)
        data = seal_vote(self._key, v)
        self._own[kind] = data
        self._out.append(Broadcast(data, "vote"))
        self._add_vote(v, data)

    def _apply_rule(self) -> bool:
        """Apply the first rule of Algorithm 1 whose condition holds; False if none does.
        Each rule changes the step or marks itself done, so the loop ends."""
        for r, (p, bid, _) in self._proposals.items():  # rule 49, any round
            if self._power(r, PRECOMMIT, bid) >= self._quorum and self._accepts_block(p, bid):
                self._decide(r, p, bid)
                return True
        r, step = self._round, self._step
        held = self._proposals.get(r)
        if step == PROPOSE and held is not None:
            p, bid, _ = held
            vr = p.valid_round
            if vr == -1:  # rule 22
                ok = self._locked_round == -1 or self._locked == bid
            elif self._power(vr, PREVOTE, bid) >= self._quorum:  # rule 28 (vr < r: checked)
                ok = self._locked_round <= vr or self._locked == bid
            else:
                ok = None
            if ok is not None:
                self._cast(PREVOTE, bid if ok and self._accepts_block(p, bid) else None)
                return True
        if step == PREVOTE and self._any_power(r, PREVOTE) >= self._quorum and self._once(
                "prevote-timeout", r):  # rule 34
            self._set_timeout(PREVOTE)
            return True
        if (step in (PREVOTE, PRECOMMIT) and held is not None
                and self._power(r, PREVOTE, held[1]) >= self._quorum
                and self._accepts_block(held[0], held[1]) and self._once("lock", r)):  # rule 36
            if step == PREVOTE:
                self._locked, self._locked_round = held[1], r
                self._cast(PRECOMMIT, held[1])
            self._valid, self._valid_round = held[0].block, r
            return True
        if step == PREVOTE and self._power(r, PREVOTE, None) >= self._quorum:  # rule 44
            self._cast(PRECOMMIT, None)
            return True
        if self._any_power(r, PRECOMMIT) >= self._quorum and self._once("precommit-timeout", r):
            self._set_timeout(PRECOMMIT)  # rule 47
            return True
        ahead = [r2 for r2, who in self._senders.items() if r2 > r
                 and sum(self.validators[w] for w in who) >= self._skip]
        if ahead:  # rule 55: f+1 of a higher round; we go to the highest such round
            self._start_round(max(ahead))
            return True
        return False

    def _decide(self, round: int, p: Proposal, bid: bytes) -> None:
        """Rule 49: the Decide, with the precommits for the block as its certificate."""
        self._move("decide")
        commit = Commit(self._height, round, bid, tuple(self._voters(round, PRECOMMIT, bid)))
        self.decided = Decide(self._height, round, p.block, bid, commit)
        self._out.append(self.decided)
