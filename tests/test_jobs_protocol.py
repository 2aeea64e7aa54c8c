"""protocol.jobs and protocol.jobspec: job specs from TOML, the signed job, the task
messages, receipts, and specs/jobs.md's tables against the code."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nacl.signing import SigningKey

from protocol.envelope import (
    DOMAIN_JOB,
    DOMAIN_RECEIPT,
    DOMAIN_TASK_RESULT,
    DOMAINS,
    signing_message,
)
from protocol.errors import LocalProtocolError, RemoteProtocolError
from protocol.jobs import (
    DEFAULTS,
    FIELDS,
    MAX_ASSIGN_BYTES,
    MAX_JOB_BYTES,
    MAX_METRICS,
    MAX_PROGRESS_BYTES,
    MAX_REASON_CHARS,
    MAX_RECEIPT_BYTES,
    MAX_REPLY_BYTES,
    MAX_RESULT_BYTES,
    MAX_VERDICT_BYTES,
    Job,
    JobSpec,
    JobSpecError,
    Receipt,
    TaskAssign,
    TaskProgress,
    TaskReply,
    TaskResult,
    Verdict,
    check_assign,
    check_result,
    decode_message,
    decode_worker_frame,
    issue_receipt,
    job_id,
    open_job,
    open_receipt,
    open_task_result,
    parse_job_toml,
    receipt_id,
    safe_reason,
    seal_job,
    seal_receipt,
    seal_task_result,
    spec_with_defaults,
)
from protocol.jobspec import MAX_JOB_NAME, REQUIRED_FIELDS, SECTIONS, spec_from_toml_dict
from protocol.peerid import peer_id_from_public_key

ROOT = Path(__file__).resolve().parent.parent
C_KEY, W_KEY, X_KEY = (SigningKey(bytes([i + 7]) * 32) for i in range(3))
C, W, X = (peer_id_from_public_key(bytes(k.verify_key)) for k in (C_KEY, W_KEY, X_KEY))
NOW = 1_800_000_000_000
BASE, DATA, DELTA, UPD, PARENT = (bytes([i]) * 32 for i in range(1, 6))

MINIMAL = f"""
name = "stdlib-tiny"
base_model = "{BASE.hex()}"
dataset = "{DATA.hex()}"
[train]
rounds = 2
workers_per_round = 3
inner_steps = 50
"""


def packb(obj: object) -> bytes:
    data: bytes = msgpack.packb(obj, use_bin_type=True)
    return data


def forge(body: bytes, key: SigningKey, domain: str) -> bytes:
    """A correctly signed envelope around any body bytes (the seal_* helpers refuse)."""
    sig = key.sign(signing_message(domain, body)).signature
    return packb([1, domain, bytes(key.verify_key), sig, body])


def reason(fn: Any, *args: Any, **kw: Any) -> str:
    with pytest.raises(RemoteProtocolError) as exc_info:
        fn(*args, **kw)
    return exc_info.value.reason


def spec(**kw: Any) -> JobSpec:
    args: dict[str, Any] = {"name": "tiny", "base_model": BASE, "dataset": DATA, "rounds": 3,
                            "workers_per_round": 2, "inner_steps": 10}
    args.update(kw)
    return spec_with_defaults(**args)


def job_bytes(s: JobSpec | None = None, key: SigningKey = C_KEY) -> bytes:
    coordinator = peer_id_from_public_key(bytes(key.verify_key))
    return seal_job(key, Job(s or spec(), coordinator, NOW))


JOB = job_bytes()
JOB_ID = job_id(JOB)


def assign(**kw: Any) -> TaskAssign:
    args: dict[str, Any] = {
        "job": JOB, "round": 1, "task_id": "r1-t0", "worker": W, "base_version": BASE,
        "dataset_version": DATA, "slice_start": 0, "slice_len": 1000, "seed": 42,
        "inner_steps": 10, "batch_size": 8, "seq_len": 64, "lr": 3e-3,
        "deadline_ms": NOW + 60_000, "update_version": UPD, "update_parent": PARENT,
    }  # fmt: skip
    args.update(kw)
    return TaskAssign(**args)


def result(**kw: Any) -> TaskResult:
    args: dict[str, Any] = {"job_id": JOB_ID, "round": 1, "task_id": "r1-t0", "worker": W,
                            "delta_version": DELTA, "first_loss": 5.5, "last_loss": 3.25,
                            "tokens": 5120, "wall_ms": 1234}  # fmt: skip
    args.update(kw)
    return TaskResult(**args)


RESULT = seal_task_result(W_KEY, result())
METRICS = {"heldout_gain": 0.02, "own_gain": 0.1, "other_gain": 0.01, "max_cosine": 0.4}
RECEIPT = issue_receipt(C_KEY, RESULT, metrics=METRICS, issued_ms=NOW)


def receipt_body(**changes: Any) -> bytes:
    d = open_receipt(RECEIPT).to_dict()
    d.update(changes)
    return packb(d)


# --- a TOML writer, for round trips ------------------------------------------------------------


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, float):
        assert math.isfinite(value)
        return repr(value)
    assert isinstance(value, int)
    return str(value)


def write_toml(doc: dict[str, Any]) -> str:
    lines = [f"{k} = {toml_value(v)}" for k, v in doc.items() if not isinstance(v, dict)]
    for section, table in doc.items():
        if isinstance(table, dict):
            lines += ["", f"[{section}]"] + [f"{k} = {toml_value(v)}" for k, v in table.items()]
    return "\n".join(lines) + "\n"


def _forbidden_free(s: str) -> bool:
    return s == s.strip() and not any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F
                                      or 0x2028 <= ord(c) <= 0x202E or 0x2066 <= ord(c) <= 0x2069
                                      for c in s)  # fmt: skip


@st.composite
def valid_specs(draw: st.DrawFn) -> JobSpec:
    values: dict[str, Any] = {}
    for f in FIELDS:
        if f.kind == "text":
            v: Any = draw(st.text(st.characters(blacklist_categories=("Cs",)), min_size=1,
                                  max_size=MAX_JOB_NAME).filter(_forbidden_free))
        elif f.kind == "id":
            v = draw(st.binary(min_size=32, max_size=32))
        elif f.kind == "choice":
            v = draw(st.sampled_from(f.choices))
        elif f.kind == "bits":
            v = draw(st.sampled_from([8, 4]))
        elif f.kind in ("int", "share"):
            v = draw(st.integers(int(f.lo), int(f.hi)))
        else:
            v = draw(st.floats(f.lo, f.hi, exclude_min=f.lo_open, exclude_max=f.hi_open,
                               allow_nan=False, allow_infinity=False))
        values[f.attr] = v
    if values["device"] == "cpu":
        values["min_vram_gb"] = 0
    return JobSpec(**values)


# --- job spec parsing --------------------------------------------------------------------------


def test_minimal_spec_takes_every_default() -> None:
    s = parse_job_toml(MINIMAL)
    assert (s.name, s.base_model, s.dataset, s.rounds, s.workers_per_round, s.inner_steps) == (
        "stdlib-tiny", BASE, DATA, 2, 3, 50)
    doc = s.to_toml_dict()
    for path, default in DEFAULTS.items():
        section, key = path.split(".")
        assert doc[section][key] == default, path
    assert s.designer_share_bps == 2000 and s.designer_share == 0.2
    assert set(REQUIRED_FIELDS) == {"name", "base_model", "dataset", "train.rounds",
                                    "train.workers_per_round", "train.inner_steps"}
    assert set(DEFAULTS) | set(REQUIRED_FIELDS) == {f.path for f in FIELDS}


def test_example_job_file_parses() -> None:
    s = parse_job_toml((ROOT / "bootstrap/jobs/example.toml").read_text())
    assert s.name == "stdlib-tiny" and s.rounds == 2 and s.reward_pool == 1_000_000
    assert s.outer_momentum == 0.9 and s.heldout_fraction == 0.05 and s.task_timeout_s == 600


@pytest.mark.parametrize("path", REQUIRED_FIELDS)
def test_each_missing_field_is_named(path: str) -> None:
    key = path.rsplit(".", 1)[-1]
    text = "\n".join(line for line in MINIMAL.splitlines() if not line.startswith(f"{key} ="))
    with pytest.raises(JobSpecError) as exc_info:
        parse_job_toml(text)
    assert (exc_info.value.field, exc_info.value.message) == (path, "missing")
    assert str(exc_info.value) == f"{path}: missing"


BAD_VALUES = [
    ("train.rounds", '"x"', 'train.rounds: expected an integer in [1, 10000], got "x"'),
    ("train.rounds", "0", "train.rounds: expected an integer in [1, 10000], got 0"),
    ("train.rounds", "10001", "expected an integer in [1, 10000]"),
    ("train.rounds", "2.0", "expected an integer"),
    ("train.rounds", "true", "got true"),
    ("train.workers_per_round", "1025", "in [1, 1024]"),
    ("train.inner_steps", "-1", "in [1, 1000000]"),
    ("train.batch_size", "4097", "in [1, 4096]"),
    ("train.seq_len", "65537", "in [1, 65536]"),
    ("train.lr", "0.0", "train.lr: expected a finite number in (0, 10], got 0.0"),
    ("train.lr", "nan", "got nan"),
    ("train.lr", "inf", "got inf"),
    ("train.lr", '"fast"', 'got "fast"'),
    ("train.outer_lr", "11", "in (0, 10]"),
    ("train.outer_momentum", "1.0", "in [0, 1)"),
    ("train.outer_momentum", "-0.1", "in [0, 1)"),
    ("train.seed", "-1", "expected an integer >= 0, got -1"),
    ("train.first_round", "-1", "train.first_round: expected an integer in [0, 10000], got -1"),
    ("train.first_round", "1.5", "expected an integer"),
    ("train.delta_bits", "6", "train.delta_bits: expected 8 or 4, got 6"),
    ("train.delta_bits", "true", "expected 8 or 4, got true"),
    ("train.memory", '"small"', 'train.memory: expected one of "standard", "lean", got "small"'),
    ("train.memory", "true", "got true"),
    ("data.heldout_fraction", "0.5", "in (0, 0.5)"),
    ("data.heldout_fraction", "0", "in (0, 0.5)"),
    ("requirements.min_vram_gb", "8.5", "expected an integer in [0, 4096], got 8.5"),
    ("requirements.device", '"gpu"', 'expected one of "any", "cpu", "cuda", got "gpu"'),
    ("rewards.pool", "-5", "expected an integer >= 0"),
    ("rewards.designer_share", "1.5", "in [0, 1] in whole basis points"),
    ("rewards.designer_share", "0.12345", "at most 4 decimals"),
    ("rewards.designer_share", '"20%"', 'got "20%"'),
    ("checks.heldout_tolerance", "11.0", "in [-10, 10]"),
    ("checks.reexec_fraction", "1.01", "in [0, 1]"),
    ("checks.max_cosine", "0", "in (0, 1]"),
    ("checks.eval_batches", "0", "in [1, 4096]"),
    ("timeouts.task_s", "0", "in [1, 604800]"),
    ("name", '""', "name: expected 1..100 characters, got 0"),
    ("name", '"' + "x" * 101 + '"', "expected 1..100 characters, got 101"),
    ("name", '"a\\u0007b"', "control characters"),
    ("name", '" padded"', "leading or trailing spaces"),
    ("name", "3", "name: expected a string, got 3"),
    ("base_model", '"abc"', "base_model: expected 64 hex characters"),
    ("dataset", '"' + "zz" * 32 + '"', "dataset: expected 64 hex characters"),
    ("dataset", "[1, 2]", "got an array"),
]


def set_field(text: str, path: str, literal: str) -> str:
    """MINIMAL with ``path`` set to the TOML literal (added or replaced)."""
    section, _, key = path.rpartition(".")
    lines = [ln for ln in text.splitlines() if not ln.startswith(f"{key} =")]
    if not section:
        return f"{key} = {literal}\n" + "\n".join(lines)
    if f"[{section}]" not in lines:
        lines.append(f"[{section}]")
    at = lines.index(f"[{section}]") + 1
    return "\n".join([*lines[:at], f"{key} = {literal}", *lines[at:]]) + "\n"


@pytest.mark.parametrize(("path", "literal", "expected"), BAD_VALUES)
def test_each_wrong_value_is_named(path: str, literal: str, expected: str) -> None:
    with pytest.raises(JobSpecError) as exc_info:
        parse_job_toml(set_field(MINIMAL, path, literal))
    assert exc_info.value.field == path
    assert expected in str(exc_info.value), str(exc_info.value)


def test_every_field_has_a_bad_value_case() -> None:
    assert {path for path, _, _ in BAD_VALUES} == {f.path for f in FIELDS}


TOP = "\n".join(MINIMAL.splitlines()[:4]) + "\n"  # name, base_model, dataset


@pytest.mark.parametrize(("text", "field", "message"), [
    ("rounds = 2\n" + MINIMAL, "rounds", "unknown field"),  # a train key at the top level
    (set_field(MINIMAL, "train.round", "2"), "train.round", "unknown field"),
    (MINIMAL + "[trian]\nrounds = 2\n", "trian", "unknown field"),
    (TOP + "train = 5\n", "train", "expected a table, got 5"),
    (MINIMAL + "[data.more]\nx = 1\n", "data.more", "unknown field"),
])  # fmt: skip
def test_unknown_fields_are_refused_by_name(text: str, field: str, message: str) -> None:
    with pytest.raises(JobSpecError) as exc_info:
        parse_job_toml(text)
    assert (exc_info.value.field, exc_info.value.message) == (field, message)


def test_not_toml_and_cross_field_rules() -> None:
    for text in ("name = ", "[train\n", "a = 1\na = 2\n"):
        with pytest.raises(JobSpecError) as exc_info:
            parse_job_toml(text)
        assert exc_info.value.field == "toml"
    with pytest.raises(JobSpecError) as exc_info:
        parse_job_toml(MINIMAL + '[requirements]\ndevice = "cpu"\nmin_vram_gb = 8\n')
    assert exc_info.value.field == "requirements.min_vram_gb"
    assert parse_job_toml(MINIMAL + '[requirements]\ndevice = "cuda"\nmin_vram_gb = 8\n'
                          ).min_vram_gb == 8


@pytest.mark.parametrize(("literal", "bps"), [("0", 0), ("1", 10_000), ("0.2", 2000),
                                              ("0.0001", 1), ("0.9999", 9999), ("0.5", 5000),
                                              ("1.0", 10_000), ("-0.0", 0)])  # fmt: skip
def test_designer_share_converts_exactly(literal: str, bps: int) -> None:
    text = set_field(MINIMAL, "rewards.designer_share", literal)
    assert parse_job_toml(text).designer_share_bps == bps


def test_floats_accept_toml_integers_and_specs_reject_bad_values_in_code() -> None:
    assert parse_job_toml(set_field(MINIMAL, "train.outer_lr", "1")).outer_lr == 1.0
    with pytest.raises(LocalProtocolError, match=r"train\.lr"):
        spec(lr=0.0)
    with pytest.raises(LocalProtocolError, match="unknown"):
        spec(learning_rate=0.1)
    with pytest.raises(LocalProtocolError):
        dataclasses.replace(spec(), lr=1)  # an int is not a float in a spec
    with pytest.raises(LocalProtocolError):
        dataclasses.replace(spec(), designer_share_bps=10_001)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(valid_specs())
def test_valid_specs_round_trip_through_toml_and_wire(s: JobSpec) -> None:
    assert parse_job_toml(write_toml(s.to_toml_dict())) == s
    assert spec_from_toml_dict(s.to_toml_dict()) == s
    assert JobSpec.from_dict(msgpack.unpackb(packb(s.to_dict()))) == s


def test_train_split() -> None:
    s = spec(heldout_fraction=0.05)
    assert s.train_split(1000) == 950
    assert s.train_split(1001) == 951  # floor(50.05) = 50 held out
    assert s.train_split(20) == 19
    for total in (0, 1, 19):
        with pytest.raises(LocalProtocolError):
            s.train_split(total)


# --- the signed job ----------------------------------------------------------------------------


def test_job_round_trip_and_id_is_the_body_hash() -> None:
    job, envelope = open_job(JOB)
    assert job == Job(spec(), C, NOW) and envelope.signer == C
    assert hashlib.sha256(envelope.body).digest() == JOB_ID
    # Anyone can re-encode an envelope (here: bin32 headers); the id does not move.
    pk, sig = envelope.public_key, envelope.signature
    body = envelope.body
    wide = (b"\x95\x01" + packb(DOMAIN_JOB) + b"\xc6" + len(pk).to_bytes(4, "big") + pk
            + b"\xc6" + len(sig).to_bytes(4, "big") + sig
            + b"\xc6" + len(body).to_bytes(4, "big") + body)  # fmt: skip
    assert wide != JOB and open_job(wide)[0] == job and job_id(wide) == JOB_ID


def test_job_signer_must_be_its_coordinator() -> None:
    with pytest.raises(LocalProtocolError):
        seal_job(X_KEY, Job(spec(), C, NOW))
    body = packb(Job(spec(), C, NOW).to_dict())
    assert reason(open_job, forge(body, X_KEY, DOMAIN_JOB)) == "signer-mismatch"
    assert reason(open_job, forge(body, C_KEY, DOMAIN_RECEIPT)) == "wrong-domain"
    assert reason(open_job, RESULT) == "wrong-domain"


def test_job_body_errors_name_the_field() -> None:
    d = Job(spec(), C, NOW).to_dict()
    cases = [
        ({"v": 2}, "unknown-version"), ({"v": True}, "unknown-version"),
        ({"type": "receipt"}, "wrong-type"), ({"extra": 1}, "malformed"),
        ({"coordinator": "nope"}, "bad-peer-id"), ({"submitted_ms": -1}, "malformed"),
        ({"spec": {**d["spec"], "lr": 3}}, "malformed"),
        ({"spec": {**d["spec"], "rounds": 0}}, "malformed"),
        ({"spec": {k: v for k, v in d["spec"].items() if k != "seed"}}, "malformed"),
    ]  # fmt: skip
    for change, expected in cases:
        with pytest.raises(RemoteProtocolError) as exc_info:
            open_job(forge(packb({**d, **change}), C_KEY, DOMAIN_JOB))
        assert exc_info.value.reason == expected, change
    with pytest.raises(RemoteProtocolError, match=r"spec: .*train\.rounds"):
        open_job(forge(packb({**d, "spec": {**d["spec"], "rounds": 0}}), C_KEY, DOMAIN_JOB))


# --- task messages -----------------------------------------------------------------------------


def test_messages_round_trip() -> None:
    a = assign()
    assert TaskAssign.decode(a.encode()) == a and decode_message(a.encode()) == a
    assert a.job_id == JOB_ID and a.job_record == open_job(JOB)[0]
    plain = assign(round=0, update_version=None, update_parent=None)
    assert "update_version" not in msgpack.unpackb(plain.encode())
    assert TaskAssign.decode(plain.encode()) == plain
    for reply in (TaskReply("r1-t0", True), TaskReply("r1-t0", False, "busy"),
                  TaskReply("", False, "bad assignment")):
        assert TaskReply.decode(reply.encode()) == reply == decode_message(reply.encode())
    assert open_task_result(RESULT) == result()
    progress = TaskProgress("r1-t0", 5, 50, 3.25, 2560, 1200)
    assert TaskProgress.decode(progress.encode()) == progress == decode_message(progress.encode())
    for verdict in (Verdict("r1-t0", True, "", RECEIPT), Verdict("r1-t0", False, "copy")):
        assert Verdict.decode(verdict.encode()) == verdict == decode_message(verdict.encode())


def test_assign_is_checked_against_its_job() -> None:
    cases: list[tuple[dict[str, Any], str]] = [
        ({"dataset_version": BASE}, "assign-mismatch"),
        ({"round": 3}, "assign-mismatch"),  # the job has 3 rounds: 0, 1, 2
        ({"round": 0, "base_version": DELTA, "update_version": None, "update_parent": None},
         "assign-mismatch"),
        ({"round": 0}, "assign-mismatch"),  # round 0 has no outer update
        ({"update_version": None}, "malformed"),
        ({"update_parent": BASE}, "malformed"),
        ({"job": job_bytes(key=X_KEY)[:-1]}, "malformed"),
        ({"job": forge(packb(Job(spec(), C, NOW).to_dict()), X_KEY, DOMAIN_JOB)},
         "signer-mismatch"),
        ({"lr": 1}, "malformed"), ({"lr": math.nan}, "malformed"),
        ({"slice_len": 0}, "malformed"), ({"task_id": "a b"}, "malformed"),
        ({"task_id": "x" * 65}, "malformed"), ({"worker": "12D3KooW"}, "bad-peer-id"),
        ({"seq_len": 65537}, "malformed"), ({"batch_size": True}, "malformed"),
    ]  # fmt: skip
    good = assign().to_dict()
    for change, expected in cases:
        with pytest.raises(LocalProtocolError):
            assign(**change)
        d = {**good, **{k: v for k, v in change.items() if v is not None}}
        for k, v in change.items():
            if v is None:
                d.pop(k)
        assert reason(TaskAssign.decode, packb(d)) == expected, change


def test_check_assign_and_check_result() -> None:
    a = assign()
    assert check_assign(a, me=W, sender=C, now_ms=NOW, dataset_bytes=1_000_000) == a.job_record
    assert reason(check_assign, a, me=X, sender=C, now_ms=NOW) == "wrong-peer"
    assert reason(check_assign, a, me=W, sender=X, now_ms=NOW) == "wrong-peer"
    assert reason(check_assign, a, me=W, sender=C, now_ms=a.deadline_ms) == "expired"
    # 1040 bytes hold out floor(52.0) = 52: the train split is 988 < 1000.
    assert reason(check_assign, a, me=W, sender=C, now_ms=NOW, dataset_bytes=1040) == "bad-slice"
    assert reason(check_assign, a, me=W, sender=C, now_ms=NOW, dataset_bytes=1) == "bad-slice"
    check_result(result(), a)
    for change in ({"worker": X}, {"task_id": "r1-t1"}, {"round": 2}, {"job_id": DELTA},
                   {"tokens": 5121}, {"tokens": 0}):  # tokens: the assignment's, 10 * 8 * 64
        assert reason(check_result, result(**change), a) == "result-mismatch", change
    sized = assign(inner_steps=25)  # a task sized to a fast worker: 2.5x the tokens
    check_result(result(tokens=25 * 8 * 64), sized)
    assert reason(check_result, result(), sized) == "result-mismatch"


def test_reply_and_verdict_rules() -> None:
    with pytest.raises(LocalProtocolError):
        TaskReply("r1-t0", True, "but why")
    with pytest.raises(LocalProtocolError):
        TaskReply("", True)
    with pytest.raises(LocalProtocolError):
        TaskReply("r1-t0", False, "x" * (MAX_REASON_CHARS + 1))
    with pytest.raises(LocalProtocolError):
        TaskReply("r1-t0", False, "\x1b[31mred")
    refusal = TaskReply.refuse("r1-t0", "\x1b[31m" + "y" * 1000)
    assert refusal.reason.startswith("?[31my") and len(refusal.reason) == MAX_REASON_CHARS
    assert safe_reason("fine\u202e") == "fine?"
    assert Verdict.reject("r1-t0", "\n").reason == "?"
    with pytest.raises(LocalProtocolError):
        Verdict("r1-t0", True, "")  # accepted without a receipt
    with pytest.raises(LocalProtocolError):
        Verdict("r1-t0", False, "no", RECEIPT)
    with pytest.raises(LocalProtocolError):
        Verdict("r1-t9", True, "", RECEIPT)  # the receipt is for r1-t0
    d = Verdict("r1-t0", True, "", RECEIPT).to_dict()
    assert reason(Verdict.decode, packb({**d, "receipt": RESULT})) == "wrong-domain"
    assert reason(Verdict.decode, packb({**d, "task_id": "r1-t9"})) == "result-mismatch"
    assert reason(Verdict.decode, packb({**d, "accepted": 1})) == "malformed"


def test_decode_dispatch_and_wrong_types() -> None:
    reply = TaskReply("r1-t0", True).encode()
    assert reason(Verdict.decode, reply) == "wrong-type"
    assert reason(decode_message, packb({"type": "nope", "v": 1})) == "wrong-type"
    assert reason(decode_message, packb([1, 2])) == "wrong-type"
    assert reason(decode_message, RESULT) == "wrong-type"  # an envelope is not a message
    assert reason(TaskReply.decode, packb({"type": "task-reply", "v": 2})) == "unknown-version"
    assert reason(TaskReply.decode, "text") == "malformed"  # type: ignore[arg-type]


# --- results and receipts ----------------------------------------------------------------------


def test_result_signer_must_be_its_worker() -> None:
    with pytest.raises(LocalProtocolError):
        seal_task_result(X_KEY, result())
    body = packb(result().to_dict())
    assert reason(open_task_result, forge(body, X_KEY, DOMAIN_TASK_RESULT)) == "signer-mismatch"
    assert reason(open_task_result, forge(body, W_KEY, DOMAIN_JOB)) == "wrong-domain"
    bad = {**result().to_dict(), "first_loss": math.inf}
    assert reason(open_task_result, forge(packb(bad), W_KEY, DOMAIN_TASK_RESULT)) == "malformed"
    bad = {**result().to_dict(), "tokens": 1.0}
    assert reason(open_task_result, forge(packb(bad), W_KEY, DOMAIN_TASK_RESULT)) == "malformed"


def test_receipt_round_trip_and_both_signatures() -> None:
    r = open_receipt(RECEIPT)
    assert (r.worker, r.coordinator, r.job_id, r.delta_version, r.tokens, r.verdict) == (
        W, C, JOB_ID, DELTA, 5120, "accepted")
    assert r.metrics == METRICS and r.task_result == result() and r.result == RESULT
    assert list(msgpack.unpackb(open_receipt(RECEIPT).encode())["metrics"]) == sorted(METRICS)
    body = open_receipt(RECEIPT).encode()
    assert receipt_id(RECEIPT) == hashlib.sha256(body).digest()
    assert seal_receipt(C_KEY, r) == RECEIPT  # Ed25519 is deterministic
    with pytest.raises(LocalProtocolError):
        seal_receipt(W_KEY, r)


def test_forged_receipts_are_rejected_by_name() -> None:
    # signed by someone other than the coordinator it names
    assert reason(open_receipt, forge(receipt_body(), X_KEY, DOMAIN_RECEIPT)) == "signer-mismatch"
    # X signs a result naming W: the inner signature check fails
    inner = forge(packb(result().to_dict()), X_KEY, DOMAIN_TASK_RESULT)
    with pytest.raises(RemoteProtocolError, match=r"result: signed by") as exc_info:
        open_receipt(forge(receipt_body(result=inner), C_KEY, DOMAIN_RECEIPT))
    assert exc_info.value.reason == "signer-mismatch"
    # X's own valid result, wrapped in a receipt that credits W
    xs = seal_task_result(X_KEY, result(worker=X))
    assert reason(open_receipt, forge(receipt_body(result=xs), C_KEY, DOMAIN_RECEIPT)) == (
        "result-mismatch")
    # a result with a flipped signature byte
    flipped = RESULT[:-70] + bytes([RESULT[-70] ^ 1]) + RESULT[-69:]
    assert reason(open_receipt, forge(receipt_body(result=flipped), C_KEY, DOMAIN_RECEIPT)) in (
        "bad-signature", "malformed")
    assert reason(open_receipt, forge(receipt_body(result=JOB), C_KEY, DOMAIN_RECEIPT)) == (
        "wrong-domain")
    for name, value in (("job_id", DELTA), ("round", 2), ("task_id", "r1-t1"), ("worker", X),
                        ("delta_version", BASE), ("tokens", 5121)):  # fmt: skip
        with pytest.raises(RemoteProtocolError, match=name) as exc_info:
            open_receipt(forge(receipt_body(**{name: value}), C_KEY, DOMAIN_RECEIPT))
        assert exc_info.value.reason == "result-mismatch"
    for change in ({"verdict": "rejected"}, {"metrics": {"Bad": 1.0}},
                   {"metrics": {"gain": 1}}, {"metrics": {f"m{i}": 0.0 for i in range(17)}},
                   {"issued_ms": -1}, {"coordinator": 7}):  # fmt: skip
        body = receipt_body(**change)
        assert reason(open_receipt, forge(body, C_KEY, DOMAIN_RECEIPT)) in (
            "malformed", "bad-peer-id"), change


def test_maximal_messages_fit_their_caps() -> None:
    big = spec(name="\U0001f600" * MAX_JOB_NAME, seed=2**63 - 1, reward_pool=2**63 - 1,
               rounds=10_000, lr=math.pi / 10, outer_lr=math.e, heldout_tolerance=-math.pi)
    jb = job_bytes(big)
    assert len(jb) <= MAX_JOB_BYTES
    a = assign(job=jb, round=9_999, task_id="t" * 64, slice_start=2**62, slice_len=2**62 - 1,
               seed=2**63 - 1, inner_steps=10**6, batch_size=4096, seq_len=65536,
               lr=math.pi, deadline_ms=2**63 - 1)
    assert len(a.encode()) <= MAX_ASSIGN_BYTES
    r = result(job_id=job_id(jb), round=9_999, task_id="t" * 64, first_loss=math.pi * 1e5,
               last_loss=math.pi, tokens=2**63 - 1, wall_ms=2**63 - 1)
    rb = seal_task_result(W_KEY, r)
    assert len(rb) <= MAX_RESULT_BYTES
    metrics = {f"m{i:02d}" + "x" * 28: -math.pi * 1e5 for i in range(MAX_METRICS)}
    rec = issue_receipt(C_KEY, rb, metrics=metrics, issued_ms=2**63 - 1)
    assert len(rec) <= MAX_RECEIPT_BYTES and open_receipt(rec).metrics == metrics
    v = Verdict("t" * 64, True, "", rec)
    assert len(v.encode()) <= MAX_VERDICT_BYTES
    longest = "\U0001f600" * MAX_REASON_CHARS  # the caps count bytes, reasons characters
    assert len(Verdict("t" * 64, False, longest).encode()) <= MAX_VERDICT_BYTES
    assert len(TaskReply("t" * 64, False, longest).encode()) <= MAX_REPLY_BYTES


# --- every decoder against corrupted bytes -----------------------------------------------------

SEALED = {
    "job": (JOB, open_job, MAX_JOB_BYTES),
    "result": (RESULT, open_task_result, MAX_RESULT_BYTES),
    "worker-frame": (RESULT, decode_worker_frame, MAX_RESULT_BYTES),
    "receipt": (RECEIPT, open_receipt, MAX_RECEIPT_BYTES),
}
UNSEALED = {
    "assign": (assign().encode(), TaskAssign.decode, MAX_ASSIGN_BYTES),
    "reply": (TaskReply("r1-t0", False, "busy").encode(), TaskReply.decode, MAX_REPLY_BYTES),
    "progress": (TaskProgress("r1-t0", 5, 50, 3.25, 2560, 1200).encode(), TaskProgress.decode,
                 MAX_PROGRESS_BYTES),
    "verdict": (Verdict("r1-t0", True, "", RECEIPT).encode(), Verdict.decode,
                MAX_VERDICT_BYTES),
    "any": (Verdict("r1-t0", False, "no").encode(), decode_message, MAX_VERDICT_BYTES),
}


def _judge(name: str, data: bytes, original: bytes) -> None:
    """A changed input is rejected (RemoteProtocolError only), or, for unsealed
    messages, decodes to a different message."""
    table = SEALED if name in SEALED else UNSEALED
    _, decode, _ = table[name]
    try:
        got = decode(data)
    except RemoteProtocolError:
        return
    assert name in UNSEALED, f"{name}: a changed signed record was accepted"
    assert got != decode(original), f"{name}: a change went undetected"


@pytest.mark.parametrize("name", [*SEALED, *UNSEALED])
def test_every_flipped_byte_truncation_and_garbage_is_rejected(name: str) -> None:
    data, decode, cap = {**SEALED, **UNSEALED}[name]
    for i in range(len(data)):
        _judge(name, data[:i] + bytes([data[i] ^ 0x41]) + data[i + 1:], data)
    for n in range(len(data)):
        with pytest.raises(RemoteProtocolError):
            decode(data[:n])
    for tail in (b"\x00", b"\xc0", data):
        with pytest.raises(RemoteProtocolError):
            decode(data + tail)
    assert reason(decode, b"\x00" * (cap + 1)) == "oversized"
    assert reason(decode, b"\xc1") == "malformed"


@settings(max_examples=150, deadline=None)
@given(st.sampled_from(sorted([*SEALED, *UNSEALED])), st.data())
def test_random_byte_changes_never_crash(name: str, data: st.DataObject) -> None:
    original = {**SEALED, **UNSEALED}[name][0]
    i = data.draw(st.integers(0, len(original) - 1))
    value = data.draw(st.integers(0, 255).filter(lambda b: b != original[i]))
    _judge(name, original[:i] + bytes([value]) + original[i + 1:], original)


SCALARS = (st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats()
           | st.text(max_size=8) | st.binary(max_size=40))
VALUES = st.recursive(SCALARS, lambda kids: st.lists(kids, max_size=4)
                      | st.dictionaries(st.text(max_size=12), kids, max_size=6), max_leaves=20)


@settings(max_examples=60, deadline=None)
@given(VALUES, st.sampled_from(["task-assign", "task-reply", "verdict", "job", "receipt",
                                "task-progress"]))
def test_arbitrary_maps_never_crash(value: Any, tag: str) -> None:
    if isinstance(value, dict):
        value = {"type": tag, "v": 1, **value}
    for decode in (TaskAssign.decode, TaskReply.decode, Verdict.decode, decode_message,
                   TaskProgress.decode, decode_worker_frame):
        with contextlib.suppress(RemoteProtocolError):
            decode(packb(value))
    for domain, opener in ((DOMAIN_JOB, open_job), (DOMAIN_RECEIPT, open_receipt),
                           (DOMAIN_TASK_RESULT, open_task_result)):  # fmt: skip
        with contextlib.suppress(RemoteProtocolError):
            opener(forge(packb(value), C_KEY, domain))


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 9_999), st.integers(0, 2**62), st.integers(1, 2**62 - 1),
       st.floats(1e-9, 10.0), st.booleans(), st.text(alphabet="abc-_.:019", min_size=1,
                                                      max_size=64))
def test_assign_round_trip_property(round_: int, start: int, length: int, lr: float,
                                    update: bool, task_id: str) -> None:
    s = spec(rounds=10_000)
    jb = job_bytes(s)
    base = BASE if round_ == 0 else DELTA
    a = assign(job=jb, round=round_, task_id=task_id, base_version=base, slice_start=start,
               slice_len=length, lr=lr, update_version=UPD if update and round_ else None,
               update_parent=PARENT if update and round_ else None)
    assert TaskAssign.decode(a.encode()) == a


def test_worker_frames_are_progress_or_the_sealed_result() -> None:
    progress = TaskProgress("t" * 64, 10**6, 10**6, 1e6, 2**63 - 1, 2**63 - 1)
    assert len(progress.encode()) <= MAX_PROGRESS_BYTES  # the largest fits its cap
    assert decode_worker_frame(progress.encode()) == progress
    assert decode_worker_frame(RESULT) == result()
    # A progress message is never taken as a result, nor a forged "result" as progress.
    with pytest.raises(RemoteProtocolError):
        open_task_result(progress.encode())
    for bad in (dict(step=51), dict(steps=0), dict(loss=-1.0), dict(loss=float("nan")),
                dict(tokens=-1), dict(task_id="")):
        fields_ = {"task_id": "r1-t0", "step": 5, "steps": 50, "loss": 3.0, "tokens": 1,
                   "wall_ms": 1, **bad}
        with pytest.raises(LocalProtocolError):
            TaskProgress(**fields_)  # type: ignore[arg-type]
        with pytest.raises(RemoteProtocolError):
            decode_worker_frame(packb({"type": "task-progress", "v": 1, **fields_}))


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 10**6).flatmap(lambda n: st.tuples(st.integers(0, n), st.just(n))),
       st.floats(0, 1e6), st.integers(0, 2**63 - 1), st.integers(0, 2**63 - 1))
def test_progress_round_trip_property(step_steps: tuple[int, int], loss: float, tokens: int,
                                      wall_ms: int) -> None:
    p = TaskProgress("r1-t0", step_steps[0], step_steps[1], loss, tokens, wall_ms)
    assert decode_worker_frame(p.encode()) == p == TaskProgress.decode(p.encode())


# --- specs and the sans-IO rule ----------------------------------------------------------------


def test_specs_name_every_field_domain_and_cap() -> None:
    text = (ROOT / "specs/jobs.md").read_text()
    for f in FIELDS:
        row = next((ln for ln in text.splitlines() if ln.startswith(f"| `{f.path}`")), None)
        assert row is not None, f"specs/jobs.md has no row for {f.path}"
        default = "required" if f.required else toml_value(f.default)
        assert f"`{default}`" in row or (f.required and "required" in row), (f.path, row)
    for section in SECTIONS:
        assert f"[{section}]" in text
    assert f"({len(FIELDS)} keys)" in text  # the spec on the wire: one key per field
    records = (ROOT / "specs/records.md").read_text()
    for domain in (DOMAIN_JOB, DOMAIN_TASK_RESULT, DOMAIN_RECEIPT):
        assert domain in DOMAINS and f"`{domain}`" in records and f"`{domain}`" in text
    for name, value in (("MAX_JOB_BYTES", MAX_JOB_BYTES), ("MAX_RESULT_BYTES", MAX_RESULT_BYTES),
                        ("MAX_RECEIPT_BYTES", MAX_RECEIPT_BYTES),
                        ("MAX_ASSIGN_BYTES", MAX_ASSIGN_BYTES),
                        ("MAX_VERDICT_BYTES", MAX_VERDICT_BYTES),
                        ("MAX_REPLY_BYTES", MAX_REPLY_BYTES),
                        ("MAX_PROGRESS_BYTES", MAX_PROGRESS_BYTES)):  # fmt: skip
        assert re.search(rf"`{name}`\s*\|[^|]*\|\s*`?{value}`?", text), name


def test_importing_jobs_and_feed_does_not_import_trio() -> None:
    check = ("import sys, protocol.jobs, protocol.feed, protocol.jobspec\n"
             "bad = sorted({m.split('.')[0] for m in sys.modules} & "
             "{'trio', 'libp2p', 'aiosqlite', 'torch', 'asyncio'})\n"
             "assert not bad, bad\n")
    result = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True,
                            timeout=60, cwd=ROOT)
    assert result.returncode == 0, result.stderr


def test_receipt_dataclass_fields_match_the_wire() -> None:
    d = msgpack.unpackb(open_receipt(RECEIPT).encode())
    assert list(d)[:2] == ["type", "v"]
    assert set(d) - {"type", "v"} == {f.name for f in dataclasses.fields(Receipt)}
