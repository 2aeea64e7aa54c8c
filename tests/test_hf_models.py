"""Hugging Face models as job models (node/ml/hf.py, tokens.py, models.py): tokenizers,
the token cache, memory-mapped weights, bad model directories refused with a message,
and a tiny Llama through every taskproc op, its result loaded by transformers."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import save

from node.jobs import taskproc
from node.ml import hf, models, tokens, trainer

TEXT = ("def add(a, b):\n    return a + b\n\n" * 200
        + "class Point:\n    x: int = 0\n    y: int = 0  # é ü 中\n" * 200).encode()


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "text.txt"
    path.write_bytes(TEXT)
    return path


def op(req: dict[str, Any]) -> dict[str, Any]:
    code, answer = taskproc.answer(json.dumps(req).encode())
    assert code == 0, answer
    return answer


def fails(req: dict[str, Any]) -> str:
    code, answer = taskproc.answer(json.dumps(req).encode())
    assert code == 1 and not answer["ok"], answer
    return str(answer["error"])


def test_byte_tokenizer_ids_are_the_bytes_and_decode_back() -> None:
    tok = tokens.byte_tokenizer()
    text = "héllo\n\tworld 中"
    ids = tok.encode(text, add_special_tokens=False).ids
    assert ids == list(text.encode())
    assert tok.decode(ids) == text
    assert tok.get_vocab_size(with_added_tokens=True) == 257
    assert tok.token_to_id(tokens.EOT) == 256


def test_bpe_is_trained_on_the_data_and_round_trips(data: Path) -> None:
    tok = tokens.train_bpe([data], 300)
    # At most what was asked: this repetitive text runs out of pairs to merge first.
    assert 257 < tok.get_vocab_size(with_added_tokens=True) <= 300
    text = TEXT.decode()[:500]
    ids = tok.encode(text, add_special_tokens=False).ids
    assert len(ids) < len(text.encode()) / 2  # repeated code compresses
    assert tok.decode(ids) == text
    with pytest.raises(ValueError, match="vocab_size"):
        tokens.train_bpe([data], 100)


def test_tokens_are_cached_per_dataset_and_tokenizer(tmp_path: Path, data: Path) -> None:
    byte_dir, bpe_dir = tmp_path / "byte", tmp_path / "bpe"
    tokens.save_tokenizer(tokens.byte_tokenizer(), byte_dir, 256)
    tokens.save_tokenizer(tokens.train_bpe([data], 300), bpe_dir, 256)
    cache = tmp_path / "cache"
    a = tokens.tokenized(byte_dir / tokens.TOKENIZER_FILE, [data], cache)
    assert a.dtype == np.uint16 and bytes(np.asarray(a, dtype=np.uint8)) == TEXT
    assert len(list(cache.iterdir())) == 1
    # Cached: the same file is mapped again, not rewritten.
    (path,) = cache.iterdir()
    mtime = path.stat().st_mtime_ns
    assert np.array_equal(tokens.tokenized(byte_dir / tokens.TOKENIZER_FILE, [data], cache), a)
    assert path.stat().st_mtime_ns == mtime
    # Another tokenizer, or other data, is another key: never a stale file.
    b = tokens.tokenized(bpe_dir / tokens.TOKENIZER_FILE, [data], cache)
    assert len(b) < len(a) and len(list(cache.iterdir())) == 2
    other = tmp_path / "other.txt"
    other.write_bytes(TEXT[::-1])
    assert tokens.cache_key(bpe_dir / tokens.TOKENIZER_FILE, [other]) != \
        tokens.cache_key(bpe_dir / tokens.TOKENIZER_FILE, [data])
    # Two files: an end-of-text token between them.
    two = tokens.tokenized(byte_dir / tokens.TOKENIZER_FILE, [data, data], cache)
    assert len(two) == 2 * len(TEXT) + 1 and int(two[len(TEXT)]) == 256


def test_mmap_safetensors_matches_and_refuses_bad_files(tmp_path: Path) -> None:
    state = {"a": torch.randn(3, 4), "b": torch.arange(5, dtype=torch.float32),
             "h": torch.randn(2, 2).to(torch.bfloat16), "z": torch.zeros(0, 3)}
    path = tmp_path / "w.safetensors"
    path.write_bytes(save(state))
    got = hf.mmap_safetensors(path)
    assert sorted(got) == sorted(state)
    for k, v in state.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v)
    got["a"].add_(1.0)  # a private map: the file is never written
    assert torch.equal(hf.mmap_safetensors(path)["a"], state["a"])
    raw = path.read_bytes()
    (hlen,) = struct.unpack("<Q", raw[:8])
    bad: dict[str, bytes] = {
        "short": raw[:4],
        "header longer": struct.pack("<Q", len(raw)) + raw[8:],
        "not json": raw[:8] + b"{" * hlen + raw[8 + hlen:],
        "truncated data": raw[:-8],
    }
    header = json.loads(raw[8:8 + hlen])
    header["a"]["data_offsets"][1] += 4  # offsets that disagree with the shape
    h2 = json.dumps(header).encode()
    bad["offsets"] = struct.pack("<Q", len(h2)) + h2 + raw[8 + hlen:]
    for why, blob in bad.items():
        path.write_bytes(blob)
        with pytest.raises(ValueError):
            hf.mmap_safetensors(path)
        assert why


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory, data: Path) -> Path:
    out = tmp_path_factory.mktemp("llama") / "m0"
    answer = op({"op": "init", "arch": "llama", "size": "tiny", "tokenizer": "bpe",
                 "vocab_size": 300, "data_files": [str(data)], "seed": 3, "out_dir": str(out)})
    assert 257 < answer["vocab_size"] <= 300 and answer["params"] > 10_000
    return out


def test_init_writes_a_hugging_face_layout(llama: Path, tmp_path: Path, data: Path) -> None:
    names = sorted(p.name for p in llama.iterdir())
    assert names == ["config.json", "model.safetensors", "tokenizer.json",
                     "tokenizer_config.json"]
    cfg = json.loads((llama / "config.json").read_text())
    tok = json.loads((llama / "tokenizer.json").read_text())
    assert cfg["model_type"] == "llama"
    assert cfg["vocab_size"] == len(tok["model"]["vocab"]) + len(tok["added_tokens"]) - 1
    # The same seed gives the same bytes (a version id any peer can rebuild).
    again = tmp_path / "again"
    op({"op": "init", "arch": "llama", "size": "tiny", "tokenizer": "bpe", "vocab_size": 300,
        "data_files": [str(data)], "seed": 3, "out_dir": str(again)})
    for name in names:
        assert (again / name).read_bytes() == (llama / name).read_bytes(), name


@pytest.mark.parametrize("arch", ["qwen2", "mistral", "gpt2"])
def test_other_architectures_init_and_train(tmp_path: Path, data: Path, arch: str) -> None:
    out = tmp_path / "m"
    op({"op": "init", "arch": arch, "size": "tiny", "out_dir": str(out)})
    config, state = models.load_model(out)
    assert isinstance(config, hf.HFConfig) and config.json["model_type"] == arch
    res = trainer.train_task(config, state, np.frombuffer(TEXT, dtype=np.uint8), 0, 4000, 1,
                             3, 2, 32, 1e-3)
    assert sorted(res.delta) == sorted(state)
    assert res.last_loss < res.first_loss + 0.5


def test_bad_model_directories_are_refused_with_a_message(tmp_path: Path, llama: Path,
                                                         data: Path) -> None:
    def copy(name: str) -> Path:
        d = tmp_path / name
        d.mkdir()
        for p in llama.iterdir():
            (d / p.name).write_bytes(p.read_bytes())
        return d

    d = copy("vit")  # an image model: no causal LM head
    (d / "config.json").write_text(json.dumps({"model_type": "vit"}))
    with pytest.raises(ValueError, match="not a causal LM"):
        models.load_model(d)
    d = copy("unknown")
    (d / "config.json").write_text(json.dumps({"model_type": "no-such-model"}))
    with pytest.raises(ValueError, match="not a causal LM"):
        models.load_model(d)
    d = copy("missing")
    _, state = hf.load_model(llama)
    name = sorted(state)[1]
    (d / "model.safetensors").write_bytes(save({k: v.clone() for k, v in state.items()
                                                if k != name}))
    with pytest.raises(ValueError, match=f"lack tensor '{name}'"):
        models.load_model(d)
    d = copy("extra")
    (d / "model.safetensors").write_bytes(save({**{k: v.clone() for k, v in state.items()},
                                                "evil": torch.zeros(2)}))
    with pytest.raises(ValueError, match="unexpected tensor 'evil'"):
        models.load_model(d)
    d = copy("shape")
    (d / "model.safetensors").write_bytes(save({k: (v[:1].clone() if k == name else v.clone())
                                                for k, v in state.items()}))
    with pytest.raises(ValueError, match="has shape"):
        models.load_model(d)
    d = copy("noweights")
    (d / "model.safetensors").unlink()
    assert "no .safetensors weights" in fails({"op": "apply", "model_dir": str(d),
                                                "update": str(d / "x"),
                                                "out_model_dir": str(tmp_path / "o")})
    train = {"op": "train", "data_files": [str(data)], "slice_start": 0,
             "slice_len": 2000, "seed": 0, "steps": 1, "batch_size": 1, "seq_len": 16,
             "lr": 1e-3, "out_dir": str(tmp_path / "o")}
    d = copy("notok")
    (d / "tokenizer.json").unlink()
    assert "needs a tokenizer.json" in fails({**train, "model_dir": str(d)})
    small = hf.HFConfig.from_json(hf.make_config("llama", "tiny", 100, 0))
    d = tmp_path / "bigtok"  # a byte tokenizer (257 ids) on a model of 100 tokens
    models.save_model(d, small, hf.init_state(small, 0), tokens.byte_tokenizer())
    assert "257 tokens, more than the model's vocab_size 100" in fails(
        {**train, "model_dir": str(d)})
    (d / "tokenizer.json").write_text("{not a tokenizer")
    assert "unreadable tokenizer" in fails({**train, "model_dir": str(d)})
    assert "arch 'bert'" in fails({"op": "init", "arch": "bert", "size": "tiny",
                                    "out_dir": str(tmp_path / "o")})
    assert "size '1b'" in fails({"op": "init", "arch": "llama", "size": "1b",
                                  "out_dir": str(tmp_path / "o")})


def test_a_bf16_sharded_checkpoint_loads_as_fp32(tmp_path: Path, llama: Path) -> None:
    """A checkpoint as the hub ships them: bf16, in two shards with an index, the tied
    head saved twice."""
    _, state = hf.load_model(llama)
    names = sorted(state)
    d = tmp_path / "hub"
    d.mkdir()
    for f in ("config.json", "tokenizer.json"):
        (d / f).write_bytes((llama / f).read_bytes())
    half = {k: state[k].to(torch.bfloat16) for k in names}
    half["lm_head.weight"] = half["model.embed_tokens.weight"].clone()
    keys = sorted(half)
    (d / "model-00001-of-00002.safetensors").write_bytes(save({k: half[k] for k in keys[:5]}))
    (d / "model-00002-of-00002.safetensors").write_bytes(save({k: half[k] for k in keys[5:]}))
    (d / "model.safetensors.index.json").write_text("{}")
    _, got = models.load_model(d)
    assert sorted(got) == names and all(got[k].dtype == torch.float32 for k in names)
    assert torch.equal(got[names[0]], state[names[0]].to(torch.bfloat16).float())
    # A version written from it is one fp32 file, without the index.
    models.write_version(tmp_path / "new", d, got)
    assert sorted(p.name for p in (tmp_path / "new").iterdir()) == [
        "config.json", "model.safetensors", "tokenizer.json"]


@pytest.mark.timeout(100)
def test_tiny_llama_through_every_op_then_transformers_generates(
        tmp_path: Path, llama: Path, data: Path) -> None:
    """train (x2), check with a re-execution, outer, apply (same bytes), and the new
    version loads in transformers.AutoModelForCausalLM and generates text."""
    files = [str(data)]
    cache = str(tmp_path / "tokens")
    half = len(TEXT) // 2
    fields = {"slice_len": half - 2000, "steps": 8, "batch_size": 4, "seq_len": 32,
              "lr": 3e-3}
    deltas = []
    for i, start in enumerate((0, half)):
        tr = {"slice_start": start, "seed": 10 + i, **fields}
        out = op({"op": "train", "model_dir": str(llama), "data_files": files,
                  "token_cache": cache, "out_dir": str(tmp_path / f"o{i}"), **tr})
        assert out["last_loss"] < out["first_loss"]
        assert out["tokens"] == 8 * 4 * 32
        deltas.append({"id": f"t{i}", "path": out["delta"], **tr})
    # One dataset, one tokenizer: tokenized once.
    assert len(list(Path(cache).iterdir())) == 1
    checked = op({"op": "check", "model_dir": str(llama), "data_files": files,
                  "token_cache": cache, "heldout_fraction": 0.05, "eval_batches": 2,
                  "batch_size": 4, "seq_len": 32, "seed": 0, "deltas": deltas,
                  "reexec": [{"id": "t0", "train": {k: v for k, v in deltas[0].items()
                                                    if k not in ("id", "path")}}]})
    res = checked["results"]
    assert res["t0"]["reexec_diff"] == 0.0 and res["t0"]["reexec_match"] is True
    assert {r["verdict"] for r in res.values()} == {"accept"}, res
    outer = op({"op": "outer", "model_dir": str(llama), "deltas": [d["path"] for d in deltas],
                "momentum": None, "outer_lr": 0.7, "outer_momentum": 0.9,
                "out_model_dir": str(tmp_path / "m1"), "out_update": str(tmp_path / "u"),
                "out_momentum": str(tmp_path / "mom"), "data_files": files,
                "token_cache": cache, "heldout_fraction": 0.05, "eval_batches": 2,
                "seq_len": 32})
    assert outer["heldout_loss"] < res["t0"]["heldout_base"]
    applied = op({"op": "apply", "model_dir": str(llama), "update": str(tmp_path / "u"),
                  "out_model_dir": str(tmp_path / "m1b")})
    assert applied["sha256"] == outer["sha256"]
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json",
                 "model.safetensors"):
        assert (tmp_path / "m1" / name).read_bytes() == (tmp_path / "m1b" / name).read_bytes()
    assert_generates(tmp_path / "m1")


def assert_generates(model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    _, state = models.load_model(model_dir)
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), state[name]), name  # the very weights trained
    ids = tok("def add(", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=12, do_sample=False,
                         pad_token_id=tok.eos_token_id)
    assert out.shape[1] > ids.shape[1]
    text = tok.decode(out[0])
    assert text.startswith("def add(") and len(text) > len("def add(")
