"""Training end to end through the CLI: a testnet of real daemon processes, the built-in
model and corpus published, bad job files refused with the field named, a job run to
the end, its receipts listed on the coordinator and on a worker; then the chain: the
job's records final, the balances they earned, blocks listed, two homes replayed to one
state root, revenue split, and bad genesis files refused."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
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


@pytest.mark.timeout(460)
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
        # Followed as it ran: the round under way (each task's line as its state
        # changed), then the round's summary (its wall time, not the tasks' sum) and
        # each task's verdict.
        err = submitted.stderr
        assert "round 1/1  training" in err and " 2/2 accepted " in err, err
        assert "slowest of 2 parallel tasks" in err and f"job {job[:12]} done" in err, err
        assert "(HTTP" not in err

        status = json.loads(iollm("job", "status", job[:10], "--json", *home).stdout)
        assert status["status"] == "done" and status["rounds"][0]["accepted"] == 2, status
        (rnd,) = status["rounds"]
        assert rnd["heldout_after"] < rnd["heldout_before"]
        # The job's deltas and outer update are hidden from `model list` unless --all; the
        # version the round made is the latest of its lineage (its base is not).
        models = iollm("model", "list", *home)
        assert "delta " not in models.stdout and "update r1" not in models.stdout
        assert "3 job-internal deltas and updates hidden" in models.stderr, models.stderr
        rows = {ln[:12]: ln for ln in models.stdout.splitlines()[1:]}
        assert "  *  " in rows[status["base"][:12]] and "  *  " not in rows[base[:12]], rows
        everything = iollm("model", "list", "--all", *home).stdout
        internal = [ln for ln in everything.splitlines() if " delta " in ln]
        assert len(internal) == 2 and "update r1" in everything, everything
        assert all(ln.split()[1] == "delta" for ln in internal)  # named "delta <job> <task>"
        listed = iollm("job", "list", *home).stdout
        assert job[:12] in listed and "done" in listed

        issued = json.loads(iollm("receipts", "--job", job[:10], "--json", *home).stdout)
        assert len(issued) == 2 and {r["verdict"] for r in issued} == {"accepted"}
        earned = json.loads(iollm("receipts", "--json", "--home", str(worker)).stdout)
        peer = json.loads((worker / "node.json").read_text())["peer_id"]
        assert earned and {r["worker"] for r in earned} == {peer}, earned
        table = iollm("receipts", "--home", str(worker)).stdout
        assert earned[0]["receipt"][:12] in table and "accepted" in table
        check_ledger(tmp_path, net, job, {r["worker"] for r in issued}, base)
        stop_leaves_no_process(net)
    finally:
        iollm("testnet", "down", "--dir", str(net), check=False)


def stop_leaves_no_process(net: Path) -> None:
    """Both daemons ran torch work in children of a warm parent (node/jobs/warmchild.py);
    the worker killed with SIGKILL and the coordinator stopped with SIGTERM (what
    ``testnet down`` sends), nothing either of them started outlives it."""
    nodes = json.loads((net / "testnet.json").read_text())["nodes"]
    daemons = {n["name"]: psutil.Process(n["pid"]) for n in nodes}
    spawned = [c for d in daemons.values() for c in d.children(recursive=True)]
    for name in ("node-1", "node-2"):  # the coordinator and the worker (not bootstrap)
        d = daemons[name]
        assert any("multiprocessing.forkserver" in " ".join(c.cmdline())
                   for c in d.children()), d
    daemons["node-2"].kill()
    iollm("testnet", "down", "--dir", str(net))
    _, alive = psutil.wait_procs(spawned, timeout=30)
    assert not alive, [(p.pid, p.cmdline()) for p in alive]


def balances(home: Path) -> dict[str, int]:
    """Every account of the ledger, as the node at ``home`` holds it."""
    rows = json.loads(iollm("ledger", "balance", "--all", "--json", "--home", str(home)).stdout)
    return {r["peer"]: r["balance"] for r in rows}


def verified(home: Path) -> dict[str, Any]:
    """``iollm ledger verify --json``: the home's chain replayed from genesis."""
    return json.loads(iollm("ledger", "verify", "--json", "--home", str(home)).stdout)


def check_ledger(tmp_path: Path, net: Path, job: str, workers: set[str], base: str) -> None:
    """The chain after the job (testnet up: the first 3 nodes validate; node-1 is the
    coordinator, so the job's designer)."""
    coordinator = net / "node-1"
    home = ("--home", str(coordinator))
    names = {n["name"]: n["peer_id"] for n in json.loads((net / "testnet.json").read_text())
             ["nodes"]}
    designer = names["node-1"]
    waited = iollm("ledger", "wait", "--job", job[:10], "--timeout", "90", *home, timeout=120)
    assert re.search(r"registered in block \d+; 2 of 2 receipts and 1 of 1 round records "
                     r"final", waited.stdout), waited.stdout + waited.stderr
    # Every worker and the designer earned; the balances sum to the supply.
    earned = balances(coordinator)
    assert workers and all(earned.get(w, 0) > 0 for w in workers), (workers, earned)
    assert earned.get(designer, 0) > 0, earned
    table = iollm("ledger", "balance", "--all", *home).stdout
    total = re.search(r"^\s*(\d+)  total of (\d+) accounts at height \d+ \(supply (\d+):",
                      table, re.M)
    assert total, table
    assert int(total[1]) == int(total[3]) == sum(earned.values()), table
    assert int(total[2]) == len(earned) and designer in table
    # Each account beside its node's name ([node] name, from its capability record).
    line = next(ln for ln in table.splitlines() if designer in ln)
    assert line.endswith(f"{designer}  node-1"), table
    one = iollm("ledger", "balance", "--home", str(net / "node-2"), "--json").stdout
    assert json.loads(one)["balance"] == earned.get(names["node-2"], 0)
    not_a_peer = iollm("ledger", "balance", "alice", "--home", str(net / "node-2"), check=False)
    assert not_a_peer.returncode == 1
    assert "'alice' is not a peer id" in not_a_peer.stderr, not_a_peer.stderr
    # Blocks: final, signed by all 3 validators (more than 2/3 of 30), the receipts in.
    blocks = json.loads(iollm("ledger", "blocks", "--limit", "1000", "--json", *home).stdout)
    assert [b["height"] for b in blocks] == list(range(blocks[0]["height"], 0, -1))
    assert sum(b["kinds"].get("receipt", 0) for b in blocks) == 2, blocks
    assert sum(b["kinds"].get("round", 0) for b in blocks) == 1
    assert sum(b["kinds"].get("job", 0) for b in blocks) == 1
    assert all(b["signatures"] == 3 for b in blocks)
    listing = iollm("ledger", "blocks", "--limit", "5", *home).stdout
    # (a quick job may be final within fewer than 5 blocks; more may come meanwhile)
    assert min(5, len(blocks)) <= len(listing.splitlines()) <= 5 and "signatures" in listing
    assert "receipt" in iollm("ledger", "blocks", "--limit", "1000", *home).stdout
    status = iollm("ledger", "status", *home).stdout
    assert "chain iollm-testnet" in status and status.count("  validator ") == 3, status
    # Two homes replayed from genesis, here, beside their running nodes: one state root
    # at one height (blocks keep coming, empty, so try until both read the same height).
    deadline = time.monotonic() + 60
    while True:
        a, b = verified(coordinator), verified(net / "node-2")
        if a["height"] == b["height"]:
            break
        assert time.monotonic() < deadline, (a, b)
    assert a["state_root"] == b["state_root"] and a["block"] == b["block"], (a, b)
    assert a["totals"]["supply"] == sum(earned.values())  # nothing minted after the job
    text = iollm("ledger", "verify", "--home", str(net / "bootstrap")).stdout
    assert re.search(r"chain iollm-testnet: \d+ blocks verified", text), text
    # Revenue of the job's final version: split along its lineage, exactly the amount.
    final = json.loads(iollm("job", "status", job, "--json", *home).stdout)["base"]
    assert final != base
    first = json.loads(iollm("revenue", "record", final[:12], "1000", "--wait", "--json",
                             *home, timeout=90).stdout)
    after = balances(coordinator)
    moved = {p: after.get(p, 0) - earned.get(p, 0) for p in after}
    assert sum(moved.values()) == 1000 and min(moved.values()) >= 0, moved
    assert moved[designer] >= 200 and all(moved.get(w, 0) > 0 for w in workers), moved
    # The same record again is a new record (the next nonce), not a replay.
    second = json.loads(iollm("revenue", "record", final, "1000", "--wait", "--json", *home,
                              timeout=90).stdout)
    assert (first["nonce"], second["nonce"]) == (1, 2) and first["tx"] != second["tx"]
    again = balances(coordinator)
    assert {p: again[p] - after.get(p, 0) for p in again} == moved
    # Models the ledger cannot pay: refused at once, naming the model, holding no nonce.
    for model, why in (("abababab", "no known version starts with abababab"),
                       ("ab" * 32, "no round record on the chain produced abababababababab"),
                       (base, f"no round record on the chain produced {base[:16]}")):
        bad = iollm("revenue", "record", model, "10", *home, check=False)
        assert bad.returncode == 1 and why in bad.stderr, (model, bad.stderr)
    third = json.loads(iollm("revenue", "record", final, "1", "--json", *home).stdout)
    assert third["nonce"] == 3
    # A genesis file that is not one, and one of another chain: refused before the node
    # starts anything (no probe, no listening), naming the field or the chain.
    fresh = tmp_path / "fresh"
    iollm("init", "--home", str(fresh))
    garbage = tmp_path / "garbage.toml"
    for text, field in (("chain_id = 'x'\ngenesis_time_ms = 0\n[[validators]]\n"
                         f"peer_id = '{designer}'\npower = 0\n", "validators[0].power"),
                        ("not = toml = at all", "toml"),
                        ("chain_id = 'x'\ngenesis_time_ms = 0\ncolour = 'red'\n", "colour")):
        garbage.write_text(text)
        t0 = time.monotonic()
        bad = iollm("node", "start", "--home", str(fresh), "--genesis", str(garbage),
                    check=False, timeout=30)
        assert bad.returncode == 1 and field in bad.stderr, (text, bad.stderr)
        assert time.monotonic() - t0 < 15
    assert not (fresh / "genesis.toml").exists() and not (fresh / "node.json").exists()
    from protocol.genesis import make_genesis

    other = tmp_path / "other.toml"
    other.write_text(make_genesis("another-chain", [designer], 0).to_toml())
    # node-2 runs: its home is refused before anything else (one daemon per home).
    busy = iollm("node", "start", "--home", str(net / "node-2"), "--genesis", str(other),
                 check=False, timeout=30)
    assert busy.returncode == 1 and "a daemon is already running on" in busy.stderr, busy.stderr
    # A stopped home that follows the testnet's chain refuses another genesis.
    stopped = tmp_path / "node-2-copy"
    stopped.mkdir()
    for name in ("node.key", "config.toml", "api.token", "genesis.toml"):
        shutil.copy2(net / "node-2" / name, stopped / name)
    refused = iollm("node", "start", "--home", str(stopped), "--genesis", str(other),
                    check=False, timeout=30)
    assert refused.returncode == 1, refused.stderr
    assert "follows chain 'iollm-testnet'" in refused.stderr and "another-chain" in \
        refused.stderr, refused.stderr


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
