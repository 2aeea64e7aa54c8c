"""A job that continues another (train.first_round > 0) starts from that job's final outer
momentum when this coordinator ran it (node/jobs/coordinator.py, specs/jobs.md
"Continuing a job")."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from node.jobs.coordinator import inherit_momentum

V1, V2 = "11" * 32, "22" * 32


def states(tmp_path: Path) -> dict[str, dict[str, Any]]:
    done = tmp_path / "done-momentum.safetensors"
    done.write_bytes(b"momentum of the job that made V1")
    return {
        "old": {"status": "done", "base": V1, "momentum": str(done)},
        "failed": {"status": "failed", "base": V2, "momentum": str(done)},
        "running": {"status": "running", "base": V2, "momentum": str(done)},
        "new": {"status": "running", "base": V1, "momentum": None},
        "other": {"status": "running", "base": V2, "momentum": None},
    }


def test_a_continuation_gets_a_copy_of_the_finished_jobs_final_momentum(tmp_path: Path
                                                                        ) -> None:
    st = states(tmp_path)
    job_dir = tmp_path / "new"
    job_dir.mkdir()
    got = inherit_momentum(st, "new", job_dir)
    assert got is not None and Path(got).parent == job_dir
    assert Path(got).read_bytes() == b"momentum of the job that made V1"
    # A copy: the new job's rounds delete their momentum files as they go, the finished
    # job's stays for any other continuation of it.
    Path(got).unlink()
    assert Path(st["old"]["momentum"]).is_file()


def test_no_momentum_from_a_job_that_failed_is_running_or_lost_its_file(tmp_path: Path
                                                                        ) -> None:
    st = states(tmp_path)
    job_dir = tmp_path / "other"
    job_dir.mkdir()
    assert inherit_momentum(st, "other", job_dir) is None  # V2's makers: failed, running
    Path(st["old"]["momentum"]).unlink()
    assert inherit_momentum(st, "new", job_dir) is None
    assert list(job_dir.iterdir()) == []
