"""Memory: weights memory-mapped and released once the model holds its copy
(node/ml/weights.py), datasets of several files read in windows (corpus.Concat), and the
trainer's delta made one tensor at a time, and a version applied and written one tensor
at a time."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
from safetensors.torch import save

from node.ml import corpus, gpt, heap, trainer
from node.ml.weights import mmap_safetensors

MB = 1 << 20


def rss() -> int:
    return int(psutil.Process().memory_info().rss)


def test_mapped_weights_cost_memory_only_while_read(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    path.write_bytes(save({"w": torch.ones(16 * MB // 4 * 4)}))  # 64 MiB
    before = rss()
    state = mmap_safetensors(path)
    assert rss() - before < 8 * MB  # mapped, not read
    assert float(state["w"].sum()) == 16 * MB  # read: the pages are resident now
    touched = rss()
    assert touched - before > 48 * MB
    state.release()
    assert touched - rss() > 48 * MB  # gone from this process
    assert float(state["w"][-5:].sum()) == 5.0  # and read again from the file


def test_datasets_of_several_files_are_indexed_not_loaded(tmp_path: Path) -> None:
    parts = [bytes([i]) * n for i, n in enumerate((5, 0, 7, 3))]
    for i, p in enumerate(parts):
        (tmp_path / f"{i}").write_bytes(p)
    data = corpus.load_tokens([tmp_path / f"{i}" for i in range(4)])
    whole = np.frombuffer(b"".join(parts), dtype=np.uint8)
    assert isinstance(data, corpus.Concat) and len(data) == len(whole) == 15
    idx = np.array([[0, 4, 5, 11], [12, 14, 6, 1]])
    assert np.array_equal(data[idx], whole[idx])
    assert np.array_equal(data[3:13], whole[3:13]) and bytes(data) == b"".join(parts)
    with pytest.raises(IndexError):
        data[np.array([15])]
    # The trainer reads its windows through it exactly as from one file.
    config = gpt.GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8)
    state = gpt.init_state(config, 0)
    (tmp_path / "big0").write_bytes(bytes(range(256)) * 4)
    (tmp_path / "big1").write_bytes(bytes(range(255, -1, -1)) * 4)
    many = corpus.load_tokens([tmp_path / "big0", tmp_path / "big1"])
    one = np.frombuffer((tmp_path / "big0").read_bytes() + (tmp_path / "big1").read_bytes(),
                        dtype=np.uint8)
    a = trainer.train_task(config, state, many, 0, len(one), 3, 2, 4, 8, 1e-3)
    b = trainer.train_task(config, state, one, 0, len(one), 3, 2, 4, 8, 1e-3)
    assert all(torch.equal(a.delta[k], b.delta[k]) for k in a.delta)


def test_versions_are_written_and_applied_without_whole_copies(tmp_path: Path) -> None:
    """gpt.write_state gives state_bytes' exact file without building it in memory, and
    apply_update over a mapped base drops the base's pages as it goes (the coordinator's
    and every worker's rebuild of a version)."""
    odd = {"b.w": torch.randn(3, 5), "a": torch.randn(7), "e": torch.zeros(0),
           "t": torch.randn(2, 3, 4).transpose(0, 1)}
    sha = gpt.write_state(tmp_path / "odd.safetensors", odd)
    assert (tmp_path / "odd.safetensors").read_bytes() == gpt.state_bytes(odd)
    assert sha == hashlib.sha256(gpt.state_bytes(odd)).hexdigest()
    base = {f"w{i}": torch.randn(1024, 1024) for i in range(16)}  # 64 MiB
    gpt.write_state(tmp_path / "base.safetensors", base)
    update = trainer.quantize_int8({k: torch.full_like(v, 0.01) for k, v in base.items()})
    mapped = mmap_safetensors(tmp_path / "base.safetensors")
    before = rss()
    new = trainer.apply_update(mapped, update)
    heap.trim()  # freed temporaries (the training child's heap setting returns them at once)
    assert rss() - before < 64 * MB + 24 * MB  # the result, not the base's pages beside it
    want = trainer.apply_update(base, update)
    assert all(torch.equal(new[k], want[k]) for k in base)
