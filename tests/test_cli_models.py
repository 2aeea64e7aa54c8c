"""node/cli/models.py without a node: parsing, the progress view, the show format."""

from __future__ import annotations

import argparse
import io
from typing import Any

import pytest

from node.cli.app import build_parser
from node.cli.models import ProgressView, format_show, version_arg

V1, V2, V3 = "1a" * 32, "2b" * 32, "3c" * 32


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def op(phase: str, done: int, total: int, detail: str = "") -> dict[str, Any]:
    return {"phase": phase, "done_bytes": done, "total_bytes": total, "detail": detail}


def test_version_arg_accepts_ids_and_prefixes() -> None:
    assert version_arg(V1) == V1
    assert version_arg("ABCDEF01") == "abcdef01"
    for bad in ("abcdef0", "xyz12345", V1 + "0", "", "12345678 9"):
        with pytest.raises(argparse.ArgumentTypeError, match="not a version id"):
            version_arg(bad)


def test_parser() -> None:
    parser = build_parser()
    args = parser.parse_args(["model", "publish", "dir", "--name", "tiny", "--parent",
                              V1[:8], "--parent", V2])
    assert (args.kind, args.path, args.name, args.parent) == ("model", "dir", "tiny",
                                                              [V1[:8], V2])
    args = parser.parse_args(["dataset", "publish", "corpus.txt"])
    assert (args.kind, args.name, args.parent) == ("dataset", None, None)
    args = parser.parse_args(["dataset", "fetch", V3, "--out", "x", "--json"])
    assert (args.kind, args.version, args.out, args.json) == ("dataset", V3, "x", True)
    args = parser.parse_args(["model", "list"])
    assert args.func.__name__ == "cmd_list"
    with pytest.raises(SystemExit):
        parser.parse_args(["model", "publish", "dir"])  # a model needs --name


def test_progress_on_a_terminal_is_one_redrawn_bar_with_rate() -> None:
    out, clock = io.StringIO(), FakeClock()
    view = ProgressView(out, "fetch", tty=True, clock=clock)
    view.update(op("manifest", 0, 0))
    for i in range(1, 5):
        clock.now += 1.0
        view.update(op("chunks", i * 2 * 2**20, 20 * 2**20, "3 providers"))
    view.close()
    frames = out.getvalue().split("\r\033[K")
    assert frames[0] == "" and frames[1] == "fetch manifest"
    assert frames[-1] == ("fetch chunks  [##########..............]   40%  8.0/20.0 MiB  "
                          "2.0 MiB/s  3 providers\n")
    assert frames[2].startswith("fetch chunks  [##")  # new phase: no rate yet
    assert "0.0 MiB/s" in frames[2]


def test_progress_without_a_terminal_is_a_line_per_phase_and_every_few_seconds() -> None:
    out, clock = io.StringIO(), FakeClock()
    view = ProgressView(out, "publish", tty=False, clock=clock)
    view.update(op("hashing", 0, 100 * 2**20))
    for _ in range(20):
        clock.now += 0.5
        view.update(op("hashing", 50 * 2**20, 100 * 2**20))
    view.update(op("providing", 0, 0, "2 of 3 keys"))
    view.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 4  # start of hashing, after 5 s, after 10 s, providing
    assert lines[0] == "publish hashing    0%  0.0/100.0 MiB  0.0 MiB/s"
    assert lines[1] == "publish hashing   50%  50.0/100.0 MiB  0.0 MiB/s"  # stalled
    assert lines[-1] == "publish providing  2 of 3 keys"
    assert "\r" not in out.getvalue()


SHOW: dict[str, Any] = {
    "version": V3, "kind": "model", "name": "tiny-v3", "created_ms": 1_800_000_000_000,
    "publisher": "12D3KooWA4Xop1JaT3MHxwYMkCepYsv4iPVopMXwCz5iHYdBfeSB", "state": "complete",
    "size": 3 * 2**20, "providers": 2, "parents": [V2], "config": {"d_model": 256},
    "shards": [{"path": "a.safetensors", "size": 2**20, "chunk_size": 65536, "root": "00" * 32,
                "held": True},
               {"path": "b.safetensors", "size": 2 * 2**20, "chunk_size": 65536,
                "root": "11" * 32, "held": False}],
    "lineage": [{"version": V3, "name": "tiny-v3", "created_ms": 1_800_000_000_000,
                 "known": True},
                {"version": V2, "name": "tiny-v2", "created_ms": 1_799_000_000_000,
                 "known": True},
                {"version": V1, "name": None, "created_ms": None, "known": False}],
    "new_shards": ["b.safetensors"],
}


def test_show_prints_the_lineage_as_a_chain_and_new_shards() -> None:
    text = format_show(SHOW)
    assert text.splitlines()[0] == "model 'tiny-v3'"
    assert f"version    {V3}" in text
    assert f"  {V3[:12]}  'tiny-v3'  2027-01-15 08:00:00 UTC" in text
    assert f"    └─ {V2[:12]}  'tiny-v2'" in text
    assert f"      └─ {V1[:12]}  (manifest not held here)" in text
    assert f"shards     2, 1 new against its first parent {V2[:12]}" in text
    assert "  a.safetensors     1.0 MiB  shared  held" in text
    assert "  b.safetensors     2.0 MiB  new     not held" in text
    orphan = format_show({**SHOW, "parents": [], "lineage": SHOW["lineage"][:1],
                          "new_shards": ["a.safetensors", "b.safetensors"]})
    assert "shards     2 (no parent)" in orphan
    assert "└─" not in orphan


def test_progress_ends_with_the_average_rate_of_the_whole_operation() -> None:
    out = io.StringIO()
    view = ProgressView(out, "fetch", tty=False, clock=FakeClock())
    view.update({**op("done", 30 * 2**20, 30 * 2**20, "2 providers"), "state": "done",
                 "started_ms": 1_000, "ended_ms": 4_000})
    assert out.getvalue() == "fetch done: 30.0 MiB in 3.0 s (10.0 MiB/s)  2 providers\n"


def test_show_without_the_manifest_or_without_the_parent() -> None:
    announced = format_show({**SHOW, "state": "announced", "size": 0, "config": None,
                             "shards": [], "lineage": [], "new_shards": []})
    assert announced.endswith("(its manifest is not held here: fetch it to see lineage and "
                              "shards)")
    orphaned = format_show({**SHOW, "lineage": [SHOW["lineage"][0], {**SHOW["lineage"][1],
                                                                     "known": False}]})
    assert f"shards     2 (its first parent {V2[:12]} is not held here to compare)" in orphaned
    assert "shared" not in orphaned and " new " not in orphaned
