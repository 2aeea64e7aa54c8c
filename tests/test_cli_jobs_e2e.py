"""Training end to end through the CLI: a testnet of real daemon processes, the built-in
model and corpus published, bad job files refused with the field named, a job run to
the end, its receipts listed on the coordinator and on a worker."""

from __future__ import annotations

import json
import re
from pathlib import Path

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
