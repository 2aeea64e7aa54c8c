"""Training job specs: the TOML file a model designer writes, parsed and checked.

See specs/jobs.md, "Job spec" (normative). One table, :data:`FIELDS`, drives everything:
the TOML parser (:func:`parse_job_toml`), the checks of :class:`JobSpec`, its wire map and
its defaults (:data:`DEFAULTS`). Parsing fills every default in, so a signed job always
carries every value and no two nodes can disagree about a default.

Errors name the field by its TOML path (``train.rounds: expected an integer in
[1, 10000], got "x"``): :class:`JobSpecError` while parsing a user's file; a LocalProtocolError
(``protocol.checks.Invalid``) when code builds a bad :class:`JobSpec`; a RemoteProtocolError
when a peer's job carries one (:meth:`JobSpec.from_dict`).

This module imports the standard library (tomllib, math, json) and protocol/ only.
"""

from __future__ import annotations

import json
import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from protocol.checks import MAX_INT, Invalid, check_keys, fail, to_remote
from protocol.errors import LocalProtocolError, ProtocolError
from protocol.smip import FORBIDDEN_RANGES, ID_BYTES

MAX_JOB_NAME = 100  # characters
MAX_ROUNDS = 10_000
MAX_WORKERS_PER_ROUND = 1024  # protocol/coordination.py MAX_TASKS_PER_ROUND
MAX_INNER_STEPS = 1_000_000
MAX_BATCH_SIZE = 4096
MAX_SEQ_LEN = 65_536
MAX_LR = 10.0  # inner and outer learning rates; anything larger is a typo
MAX_VRAM_GB = 4096
MAX_EVAL_BATCHES = 4096
MAX_TASK_S = 7 * 24 * 3600
MAX_TOLERANCE = 10.0  # |heldout_tolerance|, in nats per byte: ln 256 is 5.5
BPS = 10_000  # basis points in 1
DEVICES: tuple[str, ...] = ("any", "cpu", "cuda")
DELTA_BITS: tuple[int, ...] = (8, 4)  # int8 per row, or int4 in groups (specs/jobs.md)
# train.memory: "lean" fuses the AdamW step into the backward pass, bf16 moments, a
# per-tensor clip (node/ml/leanopt.py); training maths, so checks re-run with it too.
MEMORY_MODES: tuple[str, ...] = ("standard", "lean")


class JobSpecError(ProtocolError, ValueError):
    """A job file is invalid. ``field`` is the TOML path ("train.rounds"), or "toml" when
    the text is not TOML at all; ``str()`` is ``"<field>: <message>"``, for the user."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


_REQUIRED: Any = object()


@dataclass(frozen=True)
class Field:
    """One row of the spec table: where it sits in TOML, where in :class:`JobSpec`."""

    path: str  # TOML path: "name", "train.rounds"
    attr: str  # JobSpec attribute (and wire key)
    kind: str  # "text" | "id" | "int" | "float" | "choice" | "share" | "bits"
    lo: float = 0
    hi: float = MAX_INT
    lo_open: bool = False  # the bound itself is excluded
    hi_open: bool = False
    default: Any = _REQUIRED  # the TOML value used when the field is absent
    doc: str = ""
    choices: tuple[str, ...] = ()  # kind "choice": the allowed strings

    @property
    def required(self) -> bool:
        return self.default is _REQUIRED


def _f(path: str, kind: str, lo: float = 0, hi: float = MAX_INT, *, attr: str = "",
       lo_open: bool = False, hi_open: bool = False, default: Any = _REQUIRED,
       doc: str = "", choices: tuple[str, ...] = ()) -> Field:
    return Field(path, attr or path.rsplit(".", 1)[-1], kind, lo, hi, lo_open, hi_open,
                 default, doc, choices)


FIELDS: tuple[Field, ...] = (
    _f("name", "text", 1, MAX_JOB_NAME, doc="free text, shown in listings"),
    _f("base_model", "id", doc="SMIP version id (64 hex) of the model to train"),
    _f("dataset", "id", doc="SMIP version id (64 hex) of the dataset"),
    _f("train.rounds", "int", 1, MAX_ROUNDS, doc="outer steps"),
    _f("train.workers_per_round", "int", 1, MAX_WORKERS_PER_ROUND, doc="tasks per round"),
    _f("train.inner_steps", "int", 1, MAX_INNER_STEPS, doc="optimizer steps per task"),
    _f("train.batch_size", "int", 1, MAX_BATCH_SIZE, default=8, doc="sequences per step"),
    _f("train.seq_len", "int", 1, MAX_SEQ_LEN, default=64, doc="bytes per sequence"),
    _f("train.lr", "float", 0, MAX_LR, lo_open=True, default=3e-3, doc="inner AdamW lr"),
    _f("train.outer_lr", "float", 0, MAX_LR, lo_open=True, default=0.7,
       doc="outer (Nesterov SGD) lr"),
    _f("train.outer_momentum", "float", 0, 1, hi_open=True, default=0.9,
       doc="outer Nesterov momentum"),
    _f("train.seed", "int", 0, MAX_INT, default=0, doc="task seeds derive from it"),
    _f("train.first_round", "int", 0, MAX_ROUNDS, default=0,
       doc="round of the data schedule the job starts at (a job continuing the version "
           "another job made: that job's rounds behind it); the coordinator also starts "
           "the outer momentum from that job's, when it coordinated it"),
    _f("train.delta_bits", "bits", 4, 8, default=8,
       doc="bits a value of the deltas and outer updates on the wire: 8 or 4"),
    _f("train.memory", "choice", default="standard", choices=MEMORY_MODES,
       doc='"standard" or "lean" (optimizer step in the backward pass, bf16 moments)'),
    _f("data.heldout_fraction", "float", 0, 0.5, lo_open=True, hi_open=True, default=0.05,
       doc="the last fraction of the dataset bytes, never trained on"),
    _f("requirements.min_vram_gb", "int", 0, MAX_VRAM_GB, default=0,
       doc="nominal GB of the worker's largest GPU; 0: CPU workers are fine"),
    _f("requirements.device", "choice", default="any", doc='"any", "cpu" or "cuda"',
       choices=DEVICES),
    _f("rewards.pool", "int", 0, MAX_INT, attr="reward_pool", default=0,
       doc="integer reward units for the whole job"),
    _f("rewards.designer_share", "share", 0, BPS, attr="designer_share_bps", default=0.2,
       doc="fraction of the pool for the designer, 0..1, in whole basis points"),
    _f("checks.heldout_tolerance", "float", -MAX_TOLERANCE, MAX_TOLERANCE, default=-1.0,
       doc="a delta must improve held-out loss by at least this (negative: may worsen it "
           "by at most that much)"),
    _f("checks.reexec_fraction", "float", 0, 1, default=0.1,
       doc="fraction of tasks the coordinator re-executes"),
    _f("checks.max_cosine", "float", 0, 1, lo_open=True, default=0.95,
       doc="a delta at least this similar to another's is a copy"),
    _f("checks.eval_batches", "int", 1, MAX_EVAL_BATCHES, default=4,
       doc="held-out batches per evaluation"),
    _f("timeouts.task_s", "int", 1, MAX_TASK_S, attr="task_timeout_s", default=600,
       doc="a task not answered in this time is reassigned"),
)
BY_PATH: dict[str, Field] = {f.path: f for f in FIELDS}
BY_ATTR: dict[str, Field] = {f.attr: f for f in FIELDS}
SECTIONS: tuple[str, ...] = tuple(dict.fromkeys(f.path.split(".")[0] for f in FIELDS
                                                if "." in f.path))
REQUIRED_FIELDS: tuple[str, ...] = tuple(f.path for f in FIELDS if f.required)
# The one table of defaults, TOML path -> TOML value (designer_share as the fraction).
DEFAULTS: dict[str, Any] = {f.path: f.default for f in FIELDS if not f.required}


# --- field checks ------------------------------------------------------------------------------


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
    elif isinstance(value, bytes):
        text = f"{len(value)} bytes"
    else:
        text = str(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _interval(f: Field, fmt: str = "{}") -> str:
    if f.hi == MAX_INT and not f.lo_open:
        return f">= {fmt.format(f.lo)}"
    lo, hi = fmt.format(f.lo), fmt.format(f.hi)
    return f"in {'(' if f.lo_open else '['}{lo}, {hi}{')' if f.hi_open else ']'}"


def _in_range(f: Field, x: float) -> bool:
    above = x > f.lo if f.lo_open else x >= f.lo
    below = x < f.hi if f.hi_open else x <= f.hi
    return above and below


def _forbidden(text: str) -> bool:
    return any(lo <= ord(c) <= hi for c in text for lo, hi in FORBIDDEN_RANGES)


def _problem(f: Field, value: object) -> str | None:
    """What is wrong with ``value`` as the JobSpec attribute of ``f`` (None: nothing)."""
    if f.kind == "text":
        if not isinstance(value, str):
            return f"expected a string, got {_show(value)}"
        if not 1 <= len(value) <= f.hi:
            return f"expected 1..{f.hi:g} characters, got {len(value)}"
        if _forbidden(value) or value != value.strip():
            return "must not hold control characters or leading or trailing spaces"
        return None
    if f.kind == "id":
        ok = isinstance(value, bytes) and len(value) == ID_BYTES
        return None if ok else f"expected a {ID_BYTES}-byte version id, got {_show(value)}"
    if f.kind == "choice":
        ok = isinstance(value, str) and value in f.choices
        return None if ok else f"expected one of {', '.join(map(json.dumps, f.choices))}, " \
                               f"got {_show(value)}"
    if f.kind == "bits":
        ok = isinstance(value, int) and not isinstance(value, bool) and value in DELTA_BITS
        return None if ok else f"expected {' or '.join(map(str, DELTA_BITS))}, got " \
                               f"{_show(value)}"
    if f.kind in ("int", "share"):
        if isinstance(value, int) and not isinstance(value, bool) and _in_range(f, value):
            return None
        return f"expected an integer {_interval(f)}, got {_show(value)}"
    assert f.kind == "float", f.kind
    if isinstance(value, float) and math.isfinite(value) and _in_range(f, value):
        return None
    return f"expected a finite number {_interval(f, '{:g}')}, got {_show(value)}"


def _from_toml(f: Field, raw: object) -> Any:
    """The JobSpec attribute value for the TOML value ``raw`` of ``f``; JobSpecError."""
    number = isinstance(raw, (int, float)) and not isinstance(raw, bool)
    if f.kind == "id":
        if isinstance(raw, str) and len(raw) == 2 * ID_BYTES and raw.isascii():
            try:
                return bytes.fromhex(raw)
            except ValueError:
                pass
        raise JobSpecError(f.path, f"expected {2 * ID_BYTES} hex characters (an SMIP version"
                                   f" id), got {_show(raw)}")
    if f.kind == "float" and number:
        value: Any = float(raw)  # type: ignore[arg-type]
        if not (math.isfinite(value) and _in_range(f, value)):
            raise JobSpecError(f.path, f"expected a finite number {_interval(f, '{:g}')}, "
                                       f"got {_show(raw)}")
        return value
    if f.kind == "share":
        bps = Decimal(repr(raw)) * BPS if number and math.isfinite(raw) else None  # type: ignore[arg-type]
        if bps is None or bps != bps.to_integral_value() or not 0 <= bps <= BPS:
            raise JobSpecError(f.path, "expected a number in [0, 1] in whole basis points "
                                       f"(at most 4 decimals), got {_show(raw)}")
        return int(bps)
    value = raw
    problem = _problem(f, value)
    if problem:
        raise JobSpecError(f.path, problem)
    return value


def _to_toml(f: Field, value: Any) -> Any:
    if f.kind == "id":
        return value.hex()
    if f.kind == "share":
        return value / BPS  # x / 10000 prints as the shortest decimal: repr round-trips
    return value


def check_spec_values(values: Mapping[str, Any]) -> None:
    """Check JobSpec attribute values, each field then the rules across fields;
    JobSpecError naming the first bad field by its TOML path."""
    for f in FIELDS:
        problem = _problem(f, values[f.attr])
        if problem:
            raise JobSpecError(f.path, problem)
    if values["device"] == "cpu" and values["min_vram_gb"] > 0:
        raise JobSpecError("requirements.min_vram_gb", 'must be 0 when requirements.device'
                                                       ' is "cpu"')


# --- the spec ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class JobSpec:
    """A training recipe: what to train, on what, how, with which checks and rewards.
    Attribute names are the TOML keys, except ``reward_pool`` (rewards.pool),
    ``designer_share_bps`` (rewards.designer_share × 10000) and ``task_timeout_s``
    (timeouts.task_s). Build one with :func:`parse_job_toml` or :func:`spec_with_defaults`."""

    name: str
    base_model: bytes
    dataset: bytes
    rounds: int
    workers_per_round: int
    inner_steps: int
    batch_size: int
    seq_len: int
    lr: float
    outer_lr: float
    outer_momentum: float
    seed: int
    first_round: int
    delta_bits: int
    memory: str
    heldout_fraction: float
    min_vram_gb: int
    device: str
    reward_pool: int
    designer_share_bps: int
    heldout_tolerance: float
    reexec_fraction: float
    max_cosine: float
    eval_batches: int
    task_timeout_s: int

    def __post_init__(self) -> None:
        try:
            check_spec_values(self.__dict__)
        except JobSpecError as exc:
            fail(f"job spec {exc}")

    @property
    def designer_share(self) -> float:
        return self.designer_share_bps / BPS

    def train_split(self, total_bytes: int) -> int:
        """Bytes of the train split of a dataset of ``total_bytes`` (the dataset's shards
        concatenated in manifest order): ``total - floor(total * heldout_fraction)``, the
        product taken in IEEE-754 binary64, so every node cuts at the same byte. The rest
        is held out. LocalProtocolError when either part would be empty."""
        if not isinstance(total_bytes, int) or not 0 <= total_bytes <= 2**53:
            raise LocalProtocolError("total_bytes must be an integer in [0, 2^53]")
        heldout = math.floor(total_bytes * self.heldout_fraction)
        if heldout < 1 or heldout >= total_bytes:
            raise LocalProtocolError(f"a dataset of {total_bytes} bytes is too small to hold "
                                     f"out {self.heldout_fraction:g} of it")
        return total_bytes - heldout

    def to_dict(self) -> dict[str, Any]:
        """The wire map: every attribute, in FIELDS order."""
        return {f.attr: getattr(self, f.attr) for f in FIELDS}

    @classmethod
    def from_dict(cls, d: object) -> JobSpec:
        """Inverse of :meth:`to_dict`; RemoteProtocolError naming the field."""
        try:
            d = check_keys("job spec", d, frozenset(BY_ATTR))
            return cls(**d)
        except Invalid as exc:
            raise to_remote(exc) from None

    def to_toml_dict(self) -> dict[str, Any]:
        """The values as a TOML document (nested tables, hex ids, designer_share as a
        fraction): what :func:`spec_from_toml_dict` turns back into this spec."""
        doc: dict[str, Any] = {}
        for f in FIELDS:
            *section, key = f.path.split(".")
            table = doc.setdefault(section[0], {}) if section else doc
            table[key] = _to_toml(f, getattr(self, f.attr))
        return doc


def spec_from_toml_dict(doc: Mapping[str, Any]) -> JobSpec:
    """A JobSpec from a parsed TOML document: unknown fields first, then each field in
    FIELDS order (missing, then wrong), then the rules across fields; JobSpecError."""
    for key, value in doc.items():
        if key in SECTIONS:
            if not isinstance(value, dict):
                raise JobSpecError(key, f"expected a table, got {_show(value)}")
            for sub in value:
                if f"{key}.{sub}" not in BY_PATH:
                    raise JobSpecError(f"{key}.{sub}", "unknown field")
        elif key not in BY_PATH:
            raise JobSpecError(key, "unknown field")
    values: dict[str, Any] = {}
    for f in FIELDS:
        *section, key = f.path.split(".")
        table = doc.get(section[0], {}) if section else doc
        if key in table:
            values[f.attr] = _from_toml(f, table[key])
        elif f.required:
            raise JobSpecError(f.path, "missing")
        else:
            values[f.attr] = _from_toml(f, f.default)
    check_spec_values(values)
    return JobSpec(**values)


def parse_job_toml(text: str) -> JobSpec:
    """Parse a job file; JobSpecError naming the first bad field ("toml" for syntax)."""
    if not isinstance(text, str):
        raise JobSpecError("toml", "a job file is text")
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise JobSpecError("toml", str(exc)) from None
    return spec_from_toml_dict(doc)


def spec_with_defaults(**values: Any) -> JobSpec:
    """A JobSpec from attribute values, defaults filled in for the ones not given (code
    and tests; users write TOML). LocalProtocolError on a bad or unknown value."""
    unknown = sorted(set(values) - set(BY_ATTR))
    if unknown:
        raise LocalProtocolError(f"unknown job spec fields {unknown}")
    full = {f.attr: _from_toml(f, f.default) for f in FIELDS if not f.required}
    full.update(values)
    missing = sorted(set(BY_ATTR) - set(full))
    if missing:
        raise LocalProtocolError(f"missing job spec fields {missing}")
    return JobSpec(**full)
