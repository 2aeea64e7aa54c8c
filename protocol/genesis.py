"""The genesis file: chain id, validator set, consensus timeouts, reward parameters.

See specs/rewards.md, "Genesis" (normative). A genesis is TOML a person writes
(:func:`parse_genesis`; example: ``bootstrap/genesis.example.toml``) or code builds
(:func:`make_genesis`, for ``iollm testnet up``). Every node of a chain holds the same one;
its id (:attr:`Genesis.id`) is SHA-256 of its canonical msgpack encoding
(:meth:`Genesis.encode`), so two nodes compare genesis files by comparing 32 bytes.

Amounts are integer reward units. The two loss parameters are written in nats in TOML
(``breakthrough_margin = 0.01``) and held as integer micro-nats: the decimal text must
have at most 6 decimals, so every node converts it to the same integer.

Every problem raises :class:`GenesisError` naming the field by its TOML path
(``validators[2].power: must be an integer in [1, 4294967296], got 0``). A genesis is
local configuration, never a peer's bytes, so there is no RemoteProtocolError here.

This module imports the standard library (tomllib, decimal, re) and protocol/ only.
"""

from __future__ import annotations

import json
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from decimal import Decimal, InvalidOperation
from functools import cached_property
from typing import Any

from protocol.checks import CHAIN_ID, MAX_CHAIN_ID_CHARS, MAX_INT, digest, packb
from protocol.consensus import MAX_TIMEOUT_MS, MAX_VALIDATORS, Timeouts
from protocol.envelope import unpack_strict
from protocol.errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from protocol.peerid import public_key_from_peer_id

GENESIS_TYPE = "genesis"
GENESIS_VERSION = 1
MAX_ALLOCATIONS = 10_000
MAX_POWER = 2**32
MAX_REWARD = 2**50  # emission_per_block, breakthrough_reward: far below MAX_INT
MAX_INTERVAL_MS = 3_600_000
MICRO = 1_000_000  # micro-nats per nat
MAX_MICRO = 10**12  # 1e6 nats: protocol/jobs.py MAX_LOSS
GOSSIP_MAX_BYTES = 1 << 20  # gossipsub's message cap
MAX_BLOCK_BYTES = GOSSIP_MAX_BYTES - 4096  # exclusive bound: headroom for the proposal
MIN_BLOCK_BYTES = 64 * 1024  # the largest transaction (fork evidence, 35 KB) fits
DEFAULT_BLOCK_BYTES = 768 * 1024
MAX_GENESIS_BYTES = 4 << 20



class GenesisError(ProtocolError, ValueError):
    """A genesis is invalid. ``field`` is the TOML path (``validators[2].power``), "toml"
    when the text is not TOML; ``str()`` is ``"<field>: <message>"``."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def _show(value: object) -> str:
    """A value as the user wrote it, TOML-like and short."""
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, str):
        text = json.dumps(value)
    elif isinstance(value, dict):
        text = "a table"
    elif isinstance(value, list):
        text = "an array"
    else:
        text = str(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _int(path: str, value: object, lo: int, hi: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise GenesisError(path, f"must be an integer in [{lo}, {hi}], got {_show(value)}")
    return value


def _peer(path: str, value: object) -> str:
    try:
        public_key_from_peer_id(value)  # type: ignore[arg-type]
    except RemoteProtocolError as exc:
        raise GenesisError(path, f"not an Ed25519 peer id ({exc})") from None
    return value  # type: ignore[return-value]


def _micro_from_toml(path: str, value: object, lo: int) -> int:
    """Nats as TOML wrote them (a number with at most 6 decimals) -> integer micro-nats."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            micro = Decimal(repr(value)) * MICRO
        except InvalidOperation:
            micro = None
        if micro is not None and micro.is_finite() and micro == micro.to_integral_value() \
                and lo <= micro <= MAX_MICRO:
            return int(micro)
    raise GenesisError(path, f"must be a number of nats in [{lo / MICRO:g}, {MAX_MICRO // MICRO}]"
                             f" with at most 6 decimals, got {_show(value)}")


def _micro_to_toml(micro: int) -> str:
    """The shortest decimal TOML float for ``micro`` micro-nats: 10000 -> "0.01"."""
    frac = f"{micro % MICRO:06d}".rstrip("0") or "0"
    return f"{micro // MICRO}.{frac}"


# --- parts -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Validator:
    """A validator: its peer id and voting power."""

    peer_id: str
    power: int

    def __post_init__(self) -> None:
        _peer("peer_id", self.peer_id)
        _int("power", self.power, 1, MAX_POWER)


@dataclass(frozen=True)
class RewardParams:
    """What the ledger mints (specs/rewards.md, "Reward rules"). Losses in micro-nats."""

    emission_per_block: int = 1000
    breakthrough_reward: int = 100_000
    breakthrough_margin_micro: int = 10_000  # 0.01 nats
    quality_ref_micro: int = 100_000  # 0.1 nats of own-slice gain is quality 1.0

    def __post_init__(self) -> None:
        _int("emission_per_block", self.emission_per_block, 0, MAX_REWARD)
        _int("breakthrough_reward", self.breakthrough_reward, 0, MAX_REWARD)
        _int("breakthrough_margin_micro", self.breakthrough_margin_micro, 0, MAX_MICRO)
        _int("quality_ref_micro", self.quality_ref_micro, 1, MAX_MICRO)


# TOML key -> RewardParams attribute; the two loss parameters are nats in TOML.
_REWARD_TOML = {"emission_per_block": "emission_per_block",
                "breakthrough_reward": "breakthrough_reward",
                "breakthrough_margin": "breakthrough_margin_micro",
                "quality_ref": "quality_ref_micro"}  # fmt: skip


@dataclass(frozen=True)
class Genesis:
    """A chain's founding parameters. Construction checks every field (GenesisError);
    ``validators`` must be non-empty, distinct and sorted by peer id, ``allocations``
    distinct and sorted by peer id (:func:`parse_genesis` and :func:`make_genesis` sort)."""

    chain_id: str
    genesis_time_ms: int
    validators: tuple[Validator, ...]
    rewards: RewardParams = field(default_factory=RewardParams)
    timeouts: Timeouts = field(default_factory=Timeouts)
    block_interval_ms: int = 2000
    max_block_bytes: int = DEFAULT_BLOCK_BYTES
    allocations: tuple[tuple[str, int], ...] = ()

    def __post_init__(self) -> None:
        if not (isinstance(self.chain_id, str) and CHAIN_ID.fullmatch(self.chain_id)):
            raise GenesisError("chain_id", f"must be 1..{MAX_CHAIN_ID_CHARS} characters of "
                                           f"[A-Za-z0-9._-], got {_show(self.chain_id)}")
        _int("genesis_time_ms", self.genesis_time_ms, 0, MAX_INT)
        _int("block_interval_ms", self.block_interval_ms, 1, MAX_INTERVAL_MS)
        _int("max_block_bytes", self.max_block_bytes, MIN_BLOCK_BYTES, MAX_BLOCK_BYTES - 1)
        if not isinstance(self.rewards, RewardParams):
            raise GenesisError("rewards", "must be a RewardParams")
        if not isinstance(self.timeouts, Timeouts):
            raise GenesisError("timeouts", "must be a Timeouts")
        if not isinstance(self.validators, tuple) or not self.validators:
            raise GenesisError("validators", "must hold at least one validator")
        if len(self.validators) > MAX_VALIDATORS:
            raise GenesisError("validators", f"at most {MAX_VALIDATORS} validators")
        for i, v in enumerate(self.validators):
            if not isinstance(v, Validator):
                raise GenesisError(f"validators[{i}]", "must be a Validator")
            if i and v.peer_id <= self.validators[i - 1].peer_id:
                raise GenesisError(f"validators[{i}].peer_id", "validators must be distinct "
                                                               "and sorted by peer id")
        if not isinstance(self.allocations, tuple) or len(self.allocations) > MAX_ALLOCATIONS:
            raise GenesisError("allocations", f"must be a tuple of at most {MAX_ALLOCATIONS}")
        total = 0
        for i, item in enumerate(self.allocations):
            if not (isinstance(item, tuple) and len(item) == 2):
                raise GenesisError(f"allocations[{i}]", "must be a (peer_id, amount) pair")
            _peer(f"allocations[{i}].peer_id", item[0])
            total += _int(f"allocations[{i}].amount", item[1], 1, MAX_INT)
            if i and item[0] <= self.allocations[i - 1][0]:
                raise GenesisError(f"allocations[{i}].peer_id", "allocations must be distinct "
                                                                "and sorted by peer id")
        if total > MAX_INT:
            raise GenesisError("allocations", f"sum {total} exceeds {MAX_INT}")

    @property
    def powers(self) -> dict[str, int]:
        """peer id -> voting power."""
        return {v.peer_id: v.power for v in self.validators}

    @property
    def total_power(self) -> int:
        return sum(v.power for v in self.validators)

    def to_dict(self) -> dict[str, Any]:
        """The canonical map (keys in this order; see specs/rewards.md, "Genesis")."""
        r, t = self.rewards, self.timeouts
        return {"type": GENESIS_TYPE, "v": GENESIS_VERSION, "chain_id": self.chain_id,
                "genesis_time_ms": self.genesis_time_ms,
                "block_interval_ms": self.block_interval_ms,
                "max_block_bytes": self.max_block_bytes,
                "timeouts": [t.propose_ms, t.prevote_ms, t.precommit_ms, t.delta_ms],
                "rewards": [r.emission_per_block, r.breakthrough_reward,
                            r.breakthrough_margin_micro, r.quality_ref_micro],
                "validators": [[v.peer_id, v.power] for v in self.validators],
                "allocations": [[p, a] for p, a in self.allocations]}  # fmt: skip

    def encode(self) -> bytes:
        """Canonical msgpack of :meth:`to_dict`: what :attr:`id` hashes."""
        return packb(self.to_dict())

    @classmethod
    def decode(cls, data: bytes) -> Genesis:
        """Inverse of :meth:`encode`; GenesisError on anything else."""
        try:
            d = unpack_strict(bytes(data), MAX_GENESIS_BYTES)
        except RemoteProtocolError as exc:
            raise GenesisError("encoding", str(exc)) from None
        if not isinstance(d, dict) or list(d) != list(_WIRE_KEYS) \
                or d["type"] != GENESIS_TYPE or d["v"] != GENESIS_VERSION:
            raise GenesisError("encoding", "not a genesis map of this version")
        try:
            return cls(d["chain_id"], d["genesis_time_ms"],
                       tuple(Validator(p, w) for p, w in d["validators"]),
                       RewardParams(*d["rewards"]), Timeouts(*d["timeouts"]),
                       d["block_interval_ms"], d["max_block_bytes"],
                       tuple((p, a) for p, a in d["allocations"]))
        except (TypeError, ValueError, LocalProtocolError) as exc:
            raise GenesisError("encoding", f"bad genesis encoding: {exc}") from None

    @cached_property
    def id(self) -> bytes:
        """SHA-256 of :meth:`encode`."""
        return digest(self.encode())

    def to_toml(self) -> str:
        """The genesis as a TOML document that :func:`parse_genesis` reads back equal."""
        r, t = self.rewards, self.timeouts
        lines = [f"chain_id = {json.dumps(self.chain_id)}",
                 f"genesis_time_ms = {self.genesis_time_ms}",
                 f"block_interval_ms = {self.block_interval_ms}",
                 f"max_block_bytes = {self.max_block_bytes}", "", "[timeouts]",
                 *(f"{f.name} = {getattr(t, f.name)}" for f in fields(t)), "", "[rewards]",
                 f"emission_per_block = {r.emission_per_block}",
                 f"breakthrough_reward = {r.breakthrough_reward}",
                 f"breakthrough_margin = {_micro_to_toml(r.breakthrough_margin_micro)}",
                 f"quality_ref = {_micro_to_toml(r.quality_ref_micro)}"]  # fmt: skip
        for v in self.validators:
            lines += ["", "[[validators]]", f'peer_id = "{v.peer_id}"', f"power = {v.power}"]
        for peer, amount in self.allocations:
            lines += ["", "[[allocations]]", f'peer_id = "{peer}"', f"amount = {amount}"]
        return "\n".join(lines) + "\n"


_WIRE_KEYS = ("type", "v", "chain_id", "genesis_time_ms", "block_interval_ms",
              "max_block_bytes", "timeouts", "rewards", "validators", "allocations")
_TOP_KEYS = frozenset({"chain_id", "genesis_time_ms", "block_interval_ms", "max_block_bytes",
                       "timeouts", "rewards", "validators", "allocations"})


# --- parsing -----------------------------------------------------------------------------------


def _table(path: str, value: object, allowed: frozenset[str] | Mapping[str, Any]
           ) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise GenesisError(path, f"expected a table, got {_show(value)}")
    for key in value:
        if key not in allowed:
            raise GenesisError(f"{path}.{key}" if path else key, "unknown field")
    return value


def _array_of_tables(path: str, value: object, keys: frozenset[str]) -> list[dict[str, Any]]:
    if not isinstance(value, list):
        raise GenesisError(path, f"expected an array of tables ([[{path}]]), got "
                                 f"{_show(value)}")
    out = []
    for i, item in enumerate(value):
        item = _table(f"{path}[{i}]", item, keys)
        for key in sorted(keys):
            if key not in item:
                raise GenesisError(f"{path}[{i}].{key}", "missing")
        out.append(item)
    return out


def _sorted_distinct(path: str, items: list[tuple[str, Any]]) -> list[tuple[str, Any]]:
    seen: dict[str, int] = {}
    for i, (peer, _) in enumerate(items):
        if peer in seen:
            raise GenesisError(f"{path}[{i}].peer_id", f"duplicate of {path}[{seen[peer]}]")
        seen[peer] = i
    return sorted(items, key=lambda item: item[0])


def genesis_from_toml_dict(doc: Mapping[str, Any]) -> Genesis:
    """A Genesis from a parsed TOML document; GenesisError naming the first bad field."""
    _table("", doc, _TOP_KEYS)
    for key in ("chain_id", "genesis_time_ms", "validators"):
        if key not in doc:
            raise GenesisError(key, "missing")
    top: dict[str, Any] = {}
    for key in ("chain_id", "genesis_time_ms", "block_interval_ms", "max_block_bytes"):
        if key in doc:
            top[key] = doc[key]
    timeouts = _table("timeouts", doc.get("timeouts", {}),
                      frozenset(f.name for f in fields(Timeouts)))
    for f in fields(Timeouts):  # the consensus module's; checked here to name the field
        if f.name in timeouts:
            _int(f"timeouts.{f.name}", timeouts[f.name], 1 if f.name != "delta_ms" else 0,
                 MAX_TIMEOUT_MS)
    top["timeouts"] = Timeouts(**timeouts)
    rewards_toml = _table("rewards", doc.get("rewards", {}), _REWARD_TOML)
    rewards: dict[str, int] = {}
    for key, value in rewards_toml.items():
        attr = _REWARD_TOML[key]
        if attr.endswith("_micro"):
            rewards[attr] = _micro_from_toml(f"rewards.{key}", value,
                                             1 if key == "quality_ref" else 0)
        else:
            rewards[attr] = value
    try:
        top["rewards"] = RewardParams(**rewards)
    except GenesisError as exc:
        toml_key = next(k for k, a in _REWARD_TOML.items() if a == exc.field)
        raise GenesisError(f"rewards.{toml_key}", exc.message) from None
    validators = []
    for i, v in enumerate(_array_of_tables("validators", doc["validators"],
                                           frozenset({"peer_id", "power"}))):
        try:
            validators.append((v["peer_id"], Validator(v["peer_id"], v["power"])))
        except GenesisError as exc:
            raise GenesisError(f"validators[{i}].{exc.field}", exc.message) from None
    if not validators:
        raise GenesisError("validators", "must hold at least one validator")
    top["validators"] = tuple(v for _, v in _sorted_distinct("validators", validators))
    allocations = []
    for i, a in enumerate(_array_of_tables("allocations", doc.get("allocations", []),
                                           frozenset({"peer_id", "amount"}))):
        _peer(f"allocations[{i}].peer_id", a["peer_id"])
        _int(f"allocations[{i}].amount", a["amount"], 1, MAX_INT)
        allocations.append((a["peer_id"], a["amount"]))
    top["allocations"] = tuple(_sorted_distinct("allocations", allocations))
    return Genesis(**top)


def parse_genesis(text: str) -> Genesis:
    """Parse a genesis file; GenesisError naming the first bad field ("toml" for syntax)."""
    if not isinstance(text, str):
        raise GenesisError("toml", "a genesis file is text")
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise GenesisError("toml", str(exc)) from None
    return genesis_from_toml_dict(doc)


def make_genesis(chain_id: str, validators: Sequence[str], genesis_time_ms: int,
                 **overrides: Any) -> Genesis:
    """A genesis for ``validators`` (peer ids, any order), each of power 10, defaults
    elsewhere. ``overrides`` may name any Genesis field (``block_interval_ms``,
    ``allocations`` as a mapping or pairs, ...) or any RewardParams or Timeouts field
    (``emission_per_block=5``, ``propose_ms=300``). GenesisError on a bad value."""
    reward_names = {f.name for f in fields(RewardParams)}
    timeout_names = {f.name for f in fields(Timeouts)}
    genesis_names = {f.name for f in fields(Genesis)} - {"chain_id", "genesis_time_ms",
                                                         "validators"}
    unknown = sorted(set(overrides) - reward_names - timeout_names - genesis_names)
    if unknown:
        raise GenesisError(unknown[0], "unknown field")
    rewards = replace(overrides.pop("rewards", RewardParams()),
                      **{k: overrides.pop(k) for k in list(overrides) if k in reward_names})
    try:
        timeouts = replace(overrides.pop("timeouts", Timeouts()),
                           **{k: overrides.pop(k) for k in list(overrides)
                              if k in timeout_names})
    except LocalProtocolError as exc:  # protocol.checks.Invalid: the message names it
        raise GenesisError("timeouts", str(exc)) from None
    allocations = overrides.pop("allocations", ())
    if isinstance(allocations, Mapping):
        allocations = allocations.items()
    peers = sorted(validators)
    for i in range(1, len(peers)):
        if peers[i] == peers[i - 1]:
            raise GenesisError("validators", f"duplicate validator {peers[i]}")
    return Genesis(chain_id, genesis_time_ms, tuple(Validator(p, 10) for p in peers),
                   rewards, timeouts, allocations=tuple(sorted(map(tuple, allocations))),
                   **overrides)
