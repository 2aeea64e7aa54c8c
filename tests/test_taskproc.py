"""``python -m node.jobs.taskproc``: a child process, one JSON request on stdin, one JSON
answer as the last stdout line. A 34k-parameter GPT and a few steps: each fresh child
costs about 2 s, nearly all of it importing torch. The fixture's training children are
fresh (the path a node falls back to); every other request goes through ``run_taskproc``
as the daemon sends it, to children forked from the warm parent
(node/jobs/warmchild.py), which must give the same bytes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import trio

from node.jobs.taskrun import run_taskproc

ROOT = Path(__file__).resolve().parent.parent
CONFIG = {"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 32}
SLICE = 100_000


def start(req: Any) -> subprocess.Popen[bytes]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    data = req if isinstance(req, bytes) else json.dumps(req).encode()
    proc = subprocess.Popen([sys.executable, "-m", "node.jobs.taskproc"], cwd=ROOT, env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    assert proc.stdin is not None
    proc.stdin.write(data)
    proc.stdin.close()
    return proc


def finish(proc: subprocess.Popen[bytes]) -> tuple[int, dict[str, Any], str]:
    assert proc.stdout is not None and proc.stderr is not None
    out, err = proc.stdout.read(), proc.stderr.read()
    rc = proc.wait(timeout=60)
    answer = json.loads(out.decode().strip().splitlines()[-1])
    return rc, answer, err.decode()


def run(*reqs: dict[str, Any]) -> list[dict[str, Any]]:
    """The answers of warm children running ``reqs`` at once (TaskProcError on a failure)."""
    answers: list[dict[str, Any]] = [{} for _ in reqs]

    async def one(i: int) -> None:
        answers[i] = await run_taskproc(reqs[i], timeout_s=60, what=reqs[i]["op"])

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            for i in range(len(reqs)):
                nursery.start_soon(one, i)

    trio.run(main)
    return answers


def train_req(job: Path, w: int, out: str) -> dict[str, Any]:
    return {"op": "train", "model_dir": str(job / "m0"), "data_files": [str(job / "c.txt")],
            "slice_start": w * 3 * SLICE, "slice_len": SLICE, "seed": w, "steps": 20,
            "batch_size": 8, "seq_len": 32, "lr": 3e-3, "device": "cpu", "threads": 1,
            "out_dir": str(job / out)}


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A corpus and a fresh model (warm children, at once), and two workers' deltas from
    fresh ``python -m node.jobs.taskproc`` processes (at once)."""
    d = tmp_path_factory.mktemp("job")
    run({"op": "corpus", "out": str(d / "c.txt")},
        {"op": "init", "arch": "gpt", "config": CONFIG, "seed": 0, "out_dir": str(d / "m0")})
    procs = [start(train_req(d, w, f"t{w}")) for w in range(2)]
    for p in procs:
        rc, answer, err = finish(p)
        assert rc == 0 and answer["ok"], (answer, err)
        assert answer["tokens"] == 20 * 8 * 32 and answer["device"] == "cpu"
        assert answer["last_loss"] < answer["first_loss"]
        assert "train: step 20/20" in err  # progress on stderr
    return d


def test_init_and_corpus(job: Path) -> None:
    assert 8e6 < (job / "c.txt").stat().st_size < 30e6
    cfg = json.loads((job / "m0" / "config.json").read_text())
    assert cfg["architecture"] == "gpt" and cfg["n_embd"] == 32
    (again,) = run({"op": "init", "arch": "gpt", "config": CONFIG, "seed": 0,
                 "out_dir": str(job / "m0b")})
    assert again["params"] == 34_688
    for name in ("config.json", "model.safetensors"):
        assert (job / "m0" / name).read_bytes() == (job / "m0b" / name).read_bytes()


def test_train_is_deterministic(job: Path) -> None:
    (answer,) = run(train_req(job, 0, "t0again"))
    assert answer["delta"] == str(job / "t0again" / "delta.safetensors")
    assert answer["delta_bytes"] == (job / "t0again" / "delta.safetensors").stat().st_size
    assert ((job / "t0" / "delta.safetensors").read_bytes()
            == (job / "t0again" / "delta.safetensors").read_bytes())


def test_check(job: Path) -> None:
    (job / "garbage.safetensors").write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{}")
    deltas = [{"id": f"w{w}", "path": str(job / f"t{w}" / "delta.safetensors"),
               "slice_start": w * 3 * SLICE, "slice_len": SLICE, "seed": w, "steps": 20,
               "batch_size": 8, "seq_len": 32} for w in range(2)]
    deltas.append({**deltas[0], "id": "bad", "path": str(job / "garbage.safetensors")})
    train = train_req(job, 1, "unused")
    (answer,) = run({"op": "check", "model_dir": str(job / "m0"),
                  "data_files": [str(job / "c.txt")], "heldout_fraction": 0.05,
                  "eval_batches": 1, "batch_size": 32, "seq_len": 32, "seed": 0,
                  "window_seed": 987654321, "deltas": deltas,
                  "reexec": [{"id": "w1", "train": train}],
                  # From scratch, 20 steps: the slice signal is weak (see Thresholds).
                  "thresholds": {"min_own_excess": -1.0}, "threads": 1})
    res = answer["results"]
    assert list(res) == ["w0", "w1", "bad"]
    for w in ("w0", "w1"):
        m = res[w]
        assert m["heldout_gain"] > 0.5 and m["heldout_new"] < m["heldout_base"]
        assert m["own_gain"] > 0.5 and m["other_with"] in ("w0", "w1")
        assert m["verdict"] == "accept", m
    assert res["w0"]["reexec_match"] is None and res["w0"]["max_cosine_earlier"] is None
    assert res["w1"]["reexec_match"] is True and res["w1"]["reexec_diff"] == 0.0
    assert res["w1"]["max_cosine_earlier_with"] == "w0"
    assert res["bad"]["verdict"] == "reject" and "unreadable" in res["bad"]["reason"]
    assert answer["thresholds"]["min_own_excess"] == -1.0
    assert answer["check_wall_s"] > 0 and answer["reexec_wall_s"] > 0


def test_outer_then_apply_rebuilds_identical_bytes(job: Path) -> None:
    deltas = [str(job / f"t{w}" / "delta.safetensors") for w in range(2)]
    common = {"op": "outer", "deltas": deltas, "outer_lr": 0.7, "outer_momentum": 0.9,
              "aggregate": "trimmed", "data_files": [str(job / "c.txt")],
              "heldout_fraction": 0.05, "eval_batches": 1}
    (first,) = run({**common, "model_dir": str(job / "m0"), "momentum": None,
                 "out_model_dir": str(job / "m1"), "out_update": str(job / "u1.safetensors"),
                 "out_momentum": str(job / "mom1.safetensors")})
    assert 0 < first["heldout_loss"] < 5.0 and first["n_deltas"] == 2
    # Round two starts from m1 with round one's momentum and quantization residual.
    answer, applied = run(
        {**common, "model_dir": str(job / "m1"), "aggregate": "clip",
         "momentum": str(job / "mom1.safetensors"), "out_model_dir": str(job / "m2"),
         "out_update": str(job / "u2.safetensors"),
         "out_momentum": str(job / "mom2.safetensors")},
        {"op": "apply", "model_dir": str(job / "m0"), "update": str(job / "u1.safetensors"),
         "out_model_dir": str(job / "w1")})
    assert applied["sha256"] == first["sha256"]
    for name in ("config.json", "model.safetensors"):
        assert (job / "m1" / name).read_bytes() == (job / "w1" / name).read_bytes()
    (applied2,) = run({"op": "apply", "model_dir": str(job / "w1"),
                    "update": str(job / "u2.safetensors"), "out_model_dir": str(job / "w2")})
    assert applied2["sha256"] == answer["sha256"]
    assert (job / "m2" / "model.safetensors").read_bytes() == (
        job / "w2" / "model.safetensors").read_bytes()


def test_errors(job: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # The process contract (exit code 1, the error as the last stdout line) in-process
    # through the child's main (the fixture's children run it as processes), then the
    # cases through answer(), which main calls.
    from node.jobs import taskproc

    assert taskproc.main(b"{not json") == 1
    answer = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert answer == {"ok": False, "error": answer["error"]}
    assert "not JSON" in answer["error"]

    bad_slice = {**train_req(job, 0, "never"), "slice_start": 12_000_000_000}
    cases = [
        ({"op": "fly"}, "unknown op 'fly'"),
        ({**train_req(job, 0, "never"), "model_dir": "relative/dir"}, "not absolute"),
        ({k: v for k, v in train_req(job, 0, "never").items() if k != "lr"}, "missing field 'lr'"),
        ({**train_req(job, 0, "never"), "steps": "many"}, "expected int"),
        (bad_slice, "outside the data"),
        ({"op": "apply", "model_dir": str(job / "nope"), "update": str(job / "u.safetensors"),
          "out_model_dir": str(job / "never")}, "no such file"),
        ({"op": "check", "model_dir": str(job / "m0"), "data_files": [str(job / "c.txt")],
          "heldout_fraction": 0.05, "eval_batches": 1, "batch_size": 4, "seq_len": 32,
          "seed": 0, "deltas": [], "thresholds": {"max_cosin": 1}}, "unknown threshold"),
    ]
    for req, message in cases:
        code, obj = taskproc.answer(json.dumps(req).encode())
        assert code == 1 and obj["ok"] is False and message in obj["error"], obj
    assert not (job / "never").exists()  # nothing written for a failed request
