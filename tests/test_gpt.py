"""node/ml/gpt.py (the byte-level GPT, its files) and node/ml/corpus.py (the stdlib corpus)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from node.ml import corpus, gpt

torch.set_num_threads(1)

SMALL = gpt.GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=32)


@pytest.mark.parametrize("config", [*gpt.SIZES.values(), SMALL,
                                    gpt.GPTConfig(n_layer=1, n_head=1, n_embd=8, bias=False)])
def test_expected_shapes_match_the_module(config: gpt.GPTConfig) -> None:
    model = gpt.GPT(config)
    assert gpt.expected_shapes(config) == {k: tuple(p.shape)
                                          for k, p in model.named_parameters()}


def test_sizes() -> None:
    tiny = gpt.n_params(gpt.init_state(gpt.SIZES["tiny"], 0))
    small = gpt.n_params(gpt.init_state(gpt.SIZES["small"], 0))
    assert tiny == 842_496  # the embedding is tied: one copy, counted once
    assert 3_000_000 < small < 6_000_000


def test_init_is_deterministic() -> None:
    a, b = gpt.init_state(SMALL, 3), gpt.init_state(SMALL, 3)
    c = gpt.init_state(SMALL, 4)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["wte.weight"], c["wte.weight"])
    assert "lm_head.weight" not in a  # tied with wte


def test_forward_loss_at_init_is_uniform() -> None:
    model = gpt.build(SMALL, gpt.init_state(SMALL, 0))
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randint(0, 256, (2, 4, 32), generator=gen)
    logits, loss = model(x, y)
    assert logits.shape == (4, 32, 256)  # (B, T, vocab)
    assert loss is not None and abs(float(loss.detach()) - math.log(256)) < 0.1
    with pytest.raises(ValueError, match="longer than block_size"):
        model(torch.zeros(1, 33, dtype=torch.long))


def test_save_is_deterministic_and_loads_back(tmp_path: Path) -> None:
    state = gpt.init_state(SMALL, 1)
    gpt.save_model(tmp_path / "a", SMALL, state)
    gpt.save_model(tmp_path / "b", SMALL, {k: v.clone() for k, v in reversed(state.items())})
    for name in (gpt.CONFIG_FILE, gpt.WEIGHTS_FILE):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    cfg = json.loads((tmp_path / "a" / gpt.CONFIG_FILE).read_text())
    assert cfg["architecture"] == "gpt" and list(cfg) == sorted(cfg)
    config, loaded = gpt.load_model(tmp_path / "a")
    assert config == SMALL
    assert all(torch.equal(loaded[k], state[k]) for k in state)
    assert not list(tmp_path.glob("*/.*tmp*"))  # no temporary files left behind


def test_load_errors(tmp_path: Path) -> None:
    state = gpt.init_state(SMALL, 0)
    d = tmp_path / "m"
    with pytest.raises(ValueError, match="no such file"):
        gpt.load_model(d)
    gpt.save_model(d, SMALL, state)
    cfg = d / gpt.CONFIG_FILE
    good = cfg.read_bytes()

    cfg.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        gpt.load_model(d)
    cfg.write_text(json.dumps({**json.loads(good), "architecture": "llama"}))
    with pytest.raises(ValueError, match="architecture"):
        gpt.load_model(d)
    cfg.write_text(json.dumps({**json.loads(good), "n_kv_head": 2}))
    with pytest.raises(ValueError, match="unknown field 'n_kv_head'"):
        gpt.load_model(d)
    cfg.write_text(json.dumps({**json.loads(good), "n_head": 3}))
    with pytest.raises(ValueError, match="multiple of n_head"):
        gpt.load_model(d)
    cfg.write_bytes(good)

    w = d / gpt.WEIGHTS_FILE
    save_file({k: v for k, v in state.items() if k != "ln_f.weight"}, str(w))
    with pytest.raises(ValueError, match=r"lack tensor 'ln_f\.weight'"):
        gpt.load_model(d)
    save_file({**state, "lm_head.weight": state["wte.weight"].clone()}, str(w))
    with pytest.raises(ValueError, match=r"unexpected tensor 'lm_head\.weight'"):
        gpt.load_model(d)
    save_file({**state, "wpe.weight": torch.zeros(16, 32)}, str(w))
    with pytest.raises(ValueError, match=r"'wpe.weight' has shape \[16, 32\]"):
        gpt.load_model(d)
    save_file({**state, "wpe.weight": state["wpe.weight"].half()}, str(w))
    with pytest.raises(ValueError, match="float16"):
        gpt.load_model(d)
    w.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00garbage!")
    with pytest.raises(ValueError, match="unreadable safetensors"):
        gpt.load_model(d)


# --------------------------------------------------------------------------- corpus


def test_stdlib_corpus_is_deterministic(tmp_path: Path) -> None:
    s1 = corpus.build_stdlib_corpus(tmp_path / "a.txt")
    s2 = corpus.build_stdlib_corpus(tmp_path / "b.txt")
    assert s1 == s2
    assert (tmp_path / "a.txt").read_bytes() == (tmp_path / "b.txt").read_bytes()
    assert 8e6 <= s1.bytes <= 30e6, s1
    assert s1.files > 300
    data = (tmp_path / "a.txt").read_bytes()
    assert data.count(corpus.SEPARATOR) == s1.files - 1
    # A seeded shuffle: not in sorted order (abc.py would then come before zipfile.py).
    files = corpus.stdlib_files(s1.stdlib)
    assert files == sorted(files)
    assert not any("site-packages" in f or "/test/" in f"/{f}" for f in files)


def test_load_tokens_and_split(tmp_path: Path) -> None:
    (tmp_path / "a").write_bytes(b"hello ")
    (tmp_path / "b").write_bytes(b"world")
    one = corpus.load_tokens(tmp_path / "a")
    assert isinstance(one, np.memmap) and bytes(one) == b"hello "
    both = corpus.load_tokens([tmp_path / "a", tmp_path / "b"])
    assert bytes(both) == b"hello world"
    t = corpus.as_torch(both)
    assert t.dtype == torch.uint8 and t.tolist() == list(b"hello world")
    assert corpus.split(1000, 0.05) == (950, 950)
    assert corpus.split(11, 0.5) == (5, 5) or corpus.split(11, 0.5) == (6, 6)
    with pytest.raises(ValueError):
        corpus.split(1000, 0.0)
