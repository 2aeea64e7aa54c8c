"""What a new user reads from ``iollm`` (issue 20): error lines, the job progress view,
the model list, simulated GPUs. Pure formatting, no node; the e2e tests run the same
code against a testnet."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from node.api.client import ApiClientError
from node.cli.common import explain_api_error
from node.cli.jobview import JobWatch, format_status, round_summary
from node.cli.models import latest_of_lineage
from protocol.checking import judge, passed_checks
from protocol.jobs import (
    delta_version_name,
    job_version_role,
    round_version_name,
    update_version_name,
)


def test_api_errors_say_what_is_wrong_not_the_transport() -> None:
    home = Path("/h")
    said = explain_api_error(ApiClientError(400, "train.rounds: expected an integer >= 1"),
                             home, "/v1/jobs/submit")
    assert said == "train.rounds: expected an integer >= 1"
    token = explain_api_error(ApiClientError(401, "missing or bad bearer token"), home,
                              "/v1/status")
    assert "/h/api.token" in token and "HTTP" not in token
    old = explain_api_error(ApiClientError(404, "no such path: /v1/new"), home, "/v1/new?x=1")
    assert old == "the running node has no /v1/new: it runs an older iollm than this command"
    missing = explain_api_error(ApiClientError(404, "no version abcdef12 known"), home,
                                "/v1/models/show")
    assert missing == "no version abcdef12 known"
    bug = explain_api_error(ApiClientError(500, "internal error"), home, "/v1/peers")
    assert "log has the traceback" in bug
    for status in (400, 404, 409, 503):
        assert "HTTP" not in str(ApiClientError(status, "x"))


# -- the job view ------------------------------------------------------------------------

SPEC = {"rounds": 2, "workers_per_round": 2, "inner_steps": 50, "batch_size": 8, "seq_len": 64,
        "lr": 3e-3, "outer_lr": 0.7, "outer_momentum": 0.9}
W1, W2 = "12D3KooW" + "A" * 44, "12D3KooW" + "B" * 44
ROSE = ["work done: delta norm 0.01 of the base's >= 0.001",
        "held-out loss rose 0.0500, tolerated up to 1 (checks.heldout_tolerance): one slice "
        "can be atypical, and the round merges every accepted delta",
        "trained on its slice: loss fell 0.2000 on its own windows >= 0.01"]


def finished_round() -> dict[str, Any]:
    return {"round": 0, "started_ms": 1_000, "ended_ms": 21_000, "heldout_before": 3.2,
            "heldout_after": 3.0, "version": "cd" * 32, "accepted": 2, "check_s": 2.5,
            "train_s": 30.0,
            "tasks": [
                {"task": "r0-t0", "worker": W1, "verdict": "accepted", "reason": "",
                 "first_loss": 3.4, "last_loss": 2.9, "tokens": 25600, "wall_ms": 15_000,
                 "metrics": {"heldout_gain": 0.02}, "checks": ["x"]},
                {"task": "r0-t1", "worker": W2, "verdict": "accepted", "reason": "",
                 "first_loss": 3.4, "last_loss": 3.0, "tokens": 25600, "wall_ms": 15_000,
                 "metrics": {"heldout_gain": -0.05}, "checks": ROSE}]}


def status(rounds: list[dict[str, Any]], live: dict[str, Any] | None,
           state: str = "running") -> dict[str, Any]:
    s = {"job": "ab" * 32, "name": "j", "coordinator": W1, "submitted_ms": 0, "spec": SPEC,
         "coordinated_here": True, "status": state, "error": "", "round": len(rounds),
         "rounds": rounds, "base": "cd" * 32}
    if live is not None:
        s["live"] = live
    return s


def live(step: int | None, state: str = "training") -> dict[str, Any]:
    t0: dict[str, Any] = {"task": "r1-t0", "worker": W1, "state": state, "steps": 50}
    if step is not None:
        t0.update(step=step, loss=2.5, tokens=step * 512, wall_ms=step * 100)
    return {"round": 1, "phase": "training", "started_ms": 30_000,
            "tasks": [t0, {"task": "r1-t1", "worker": W2, "state": "offered", "steps": 50}]}


def test_round_times_do_not_add_parallel_tasks() -> None:
    line = round_summary(finished_round(), 2)
    # Two tasks of 15 s in parallel: the round took 20 s, not 30.
    assert "20.0 s, slowest of 2 parallel tasks 15.0 s, checking 2.5 s" in line
    assert "30.0" not in line and "2/2 accepted" in line and "3.2000 -> 3.0000" in line


def test_an_accepted_task_whose_heldout_loss_rose_says_why() -> None:
    text = format_status(status([finished_round()], None, "done"))
    lines = text.splitlines()
    t1 = next(i for i, ln in enumerate(lines) if "r0-t1" in ln)
    assert "accepted" in lines[t1] and "1.7k tok/s" in lines[t1]
    assert "held-out loss rose 0.0500, tolerated up to 1" in lines[t1 + 1]
    assert "trained on its slice" in lines[t1 + 1]
    # The task whose held-out loss fell shows its checks only when asked.
    assert not any("passed: x" in ln for ln in lines)
    assert "passed: x" in format_status(status([finished_round()], None, "done"), checks=True)


def test_watch_on_a_terminal_redraws_one_line_per_task_in_place() -> None:
    out = io.StringIO()
    view = JobWatch(out, tty=True, wall_ms=lambda: 42_000)
    view.update(status([finished_round()], live(None)))
    first = out.getvalue()
    assert first.count("round 1/2") == 1 and "round 2/2  training  12 s" in first
    view.update(status([finished_round()], live(25)))
    second = out.getvalue()[len(first):]
    # Up three lines (header and two tasks), cleared, redrawn; the round summary stays.
    assert second.startswith("\033[3F\033[J") and "round 1/2" not in second
    assert "[########........]  step 25/50  loss 2.500  5.1k tok/s" in second
    view.close(status([finished_round()] * 2, None, "done"))
    assert out.getvalue().endswith(f"\033[3F\033[Jjob {'ab' * 6} done; version {'cd' * 6}\n")


def test_watch_without_a_terminal_prints_changes_only() -> None:
    out = io.StringIO()
    now = [0.0]
    view = JobWatch(out, tty=False, clock=lambda: now[0])
    for step in (None, 5, 10):
        view.update(status([], live(step)))
        now[0] += 1
    text = out.getvalue()
    assert "\033" not in text
    # The header once, each task once as it changed; no line per poll.
    assert text.count("round 2/2  training") == 1 and text.count("r1-t1") == 1
    assert text.count("r1-t0") == 1
    now[0] += 20  # a training task's line again after PLAIN_EVERY_S
    view.update(status([], live(40)))
    assert "step 40/50" in out.getvalue()


def test_passed_checks_follow_the_rule() -> None:
    metrics = {"heldout_gain": -0.3, "own_gain": 0.2, "other_gain": 0.1, "rel_norm": 0.02,
               "max_cosine_earlier": 0.4, "reexec_match": None}
    assert judge(metrics) == ("accept", "ok")
    said = passed_checks(metrics)
    assert any("held-out loss rose 0.3000, tolerated up to 1" in c for c in said)
    assert any("not a copy: cosine 0.40" in c for c in said)
    assert not any("re-executed" in c for c in said)
    # Past the tolerance it is rejected, not explained.
    assert judge({**metrics, "heldout_gain": -1.5})[0] == "reject"
    # A job's own tolerance is the one stated.
    assert judge(metrics, {"min_heldout_gain": -0.2})[0] == "reject"
    assert any("tolerated up to 0.5" in c
               for c in passed_checks(metrics, {"min_heldout_gain": -0.5}))


# -- model list ------------------------------------------------------------------------


def test_job_internal_versions_are_told_by_name() -> None:
    job = bytes.fromhex("ab" * 32)
    assert job_version_role(delta_version_name(job, "r0-t1")) == "delta"
    assert job_version_role(update_version_name("stdlib-tiny", 0)) == "update"
    for model in (round_version_name("stdlib-tiny", 0), "gpt-tiny", "delta", "my update",
                  "delta abababababab", "update r1"):
        assert job_version_role(model) is None, model


def test_latest_of_each_lineage() -> None:
    versions = [{"version": "base", "parents": []}, {"version": "r1", "parents": ["base"]},
                {"version": "r2", "parents": ["r1"]}, {"version": "other", "parents": []},
                {"version": "fork", "parents": ["r1"]}]
    assert latest_of_lineage(versions) == {"r2", "other", "fork"}


def test_the_status_shows_each_workers_fit_and_who_was_left_out() -> None:
    rnd = finished_round()
    rnd["workers"] = {W1: {"tokens_per_s": 1706.7, "overhead_s": 2.5,
                           "fit_tokens_per_s": 2000.0, "claimed_tflops": 1000.0},
                      W2: {"tokens_per_s": None, "overhead_s": None,
                           "fit_tokens_per_s": None, "claimed_tflops": None}}
    rnd["left_out"] = [W2]
    lines = format_status(status([rnd], None, "done")).splitlines()
    w1 = next(ln for ln in lines if "tokens/s measured" in ln and "1707" in ln)
    assert "(fit: 2.5 s a task + 2000 tokens/s), 1000 TFLOP/s claimed" in w1
    assert any("? tokens/s measured, ? TFLOP/s claimed" in ln for ln in lines)
    assert any(ln.strip().startswith("left out (fixed cost beyond the round):")
               for ln in lines)
