"""Training end to end through the CLI: a testnet of real daemon processes, the built-in
model and corpus published, bad job files refused with the field named, a job run to
the end, its receipts listed on the coordinator and on a worker."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests import netutil

HEX64 = re.compile(r"[0-9a-f]{64}")


def iollm(*args: str, timeout: float = 60, check: bool = True):  # type: ignore[no-untyped-def]
    return netutil.iollm(*args, timeout=timeout, check=check)


def job_file(path: Path, base: str, data: str, **train: int) -> Path:
    rows = "".join(f"{k} = {v}\n" for k, v in train.items())
    path.write_text(f'name = "e2e"\nbase_model = "{base}"\ndataset = "{data}"\n'
                    f"[train]\n{rows}batch_size = 8\nseq_len = 64\n"
                    f"[checks]\nreexec_fraction = 0.5\n[timeouts]\ntask_s = 120\n")
    return path


@pytest.mark.timeout(400)
def test_init_stdlib_submit_status_receipts(tmp_path: Path) -> None:
    net = tmp_path / "net"
    iollm("testnet", "up", "--nodes", "2", "--dir", str(net), "--timeout", "60", timeout=90)
    coordinator, worker = net / "node-1", net / "node-2"
    home = ("--home", str(coordinator))
    try:
        init = iollm("model", "init", "--size", "tiny", "--name", "gpt-e2e", *home, timeout=120)
        base = init.stdout.strip()
        assert HEX64.fullmatch(base), init.stdout
        assert re.search(r"published model 'gpt-e2e' \(\d{6} parameters\)", init.stderr)
        corpus = iollm("dataset", "stdlib", *home, timeout=120)
        data = corpus.stdout.strip()
        assert HEX64.fullmatch(data) and "python-stdlib" in corpus.stderr

        # Refused before anything runs, with the field named.
        bad = iollm("job", "submit", str(job_file(tmp_path / "bad.toml", base, data,
                                                  workers_per_round=2, inner_steps=20)),
                    *home, check=False)
        assert bad.returncode == 1 and "train.rounds: missing" in bad.stderr, bad.stderr
        wrong = iollm("job", "submit", str(job_file(tmp_path / "wrong.toml", base, data,
                                                    rounds=0, workers_per_round=2,
                                                    inner_steps=20)), *home, check=False)
        assert wrong.returncode == 1 and "train.rounds" in wrong.stderr, wrong.stderr
        unknown = iollm("job", "submit", str(job_file(tmp_path / "unknown.toml", "ab" * 32,
                                                      data, rounds=1, workers_per_round=2,
                                                      inner_steps=20)), *home, check=False)
        assert unknown.returncode == 1 and "base_model: version abab" in unknown.stderr
        long = job_file(tmp_path / "long.toml", base, data, rounds=1, workers_per_round=2,
                        inner_steps=20)
        long.write_text(long.read_text().replace("seq_len = 64", "seq_len = 4096"))
        too_long = iollm("job", "submit", str(long), *home, check=False)
        assert too_long.returncode == 1 and "train.seq_len: 4096" in too_long.stderr

        good = job_file(tmp_path / "job.toml", base, data, rounds=1, workers_per_round=2,
                        inner_steps=20)
        submitted = iollm("job", "submit", str(good), "--wait", *home, timeout=240)
        job = submitted.stdout.strip()
        assert HEX64.fullmatch(job), submitted.stdout
        assert "status      done, round 1 of 1" in submitted.stderr, submitted.stderr

        status = json.loads(iollm("job", "status", job[:10], "--json", *home).stdout)
        assert status["status"] == "done" and status["rounds"][0]["accepted"] == 2, status
        (rnd,) = status["rounds"]
        assert rnd["heldout_after"] < rnd["heldout_before"]
        listed = iollm("job", "list", *home).stdout
        assert job[:12] in listed and "done" in listed

        issued = json.loads(iollm("receipts", "--job", job[:10], "--json", *home).stdout)
        assert len(issued) == 2 and {r["verdict"] for r in issued} == {"accepted"}
        earned = json.loads(iollm("receipts", "--json", "--home", str(worker)).stdout)
        peer = json.loads((worker / "node.json").read_text())["peer_id"]
        assert earned and {r["worker"] for r in earned} == {peer}, earned
        table = iollm("receipts", "--home", str(worker)).stdout
        assert earned[0]["receipt"][:12] in table and "accepted" in table
    finally:
        iollm("testnet", "down", "--dir", str(net), check=False)


@pytest.mark.slow  # about a minute: `bash scripts/test.sh -m slow`
@pytest.mark.timeout(500)
def test_a_coordinator_killed_mid_job_resumes_it_after_restart(tmp_path: Path) -> None:
    """The coordinator is SIGKILLed once round 0 is recorded; started again, it resumes the
    job at round 1 and finishes it, on top of the version round 0 published."""
    net = tmp_path / "net"
    iollm("testnet", "up", "--nodes", "2", "--dir", str(net), "--timeout", "60", timeout=90)
    coordinator = net / "node-1"
    home = ("--home", str(coordinator))
    restarted = None
    try:
        base = iollm("model", "init", *home, timeout=120).stdout.strip()
        data = iollm("dataset", "stdlib", *home, timeout=120).stdout.strip()
        spec = job_file(tmp_path / "job.toml", base, data, rounds=2, workers_per_round=2,
                        inner_steps=20)
        job = iollm("job", "submit", str(spec), *home).stdout.strip()
        deadline = time.monotonic() + 120
        while True:  # polling another process's progress, with a deadline
            status = json.loads(iollm("job", "status", job, "--json", *home).stdout)
            if status["rounds"]:
                break
            assert time.monotonic() < deadline, status
            time.sleep(0.5)
        assert status["status"] == "running" and status["round"] == 1
        first = status["rounds"][0]["version"]
        pid = json.loads((coordinator / "node.json").read_text())["pid"]
        os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)  # a child of `testnet up` here only if run in-process
        log = (tmp_path / "restart.log").open("w")
        restarted = subprocess.Popen([sys.executable, "-m", "node.cli", "node", "start", *home],
                                     stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 180
        while True:
            done = iollm("job", "status", job, "--json", *home, check=False)
            if done.returncode == 0:
                status = json.loads(done.stdout)
                if status["status"] != "running":
                    break
            assert time.monotonic() < deadline, done.stdout + done.stderr
            time.sleep(0.5)
        assert status["status"] == "done", status
        assert [r["round"] for r in status["rounds"]] == [0, 1]
        assert status["rounds"][1]["base"] == first, status
        assert status["rounds"][1]["accepted"] >= 1, json.dumps(status["rounds"][1])
        receipts = json.loads(iollm("receipts", "--job", job, "--json", *home).stdout)
        assert len({(r["round"], r["task"]) for r in receipts}) == len(receipts)  # once each
    finally:
        if restarted is not None:
            restarted.terminate()
            restarted.wait(timeout=30)
        iollm("testnet", "down", "--dir", str(net), check=False)
