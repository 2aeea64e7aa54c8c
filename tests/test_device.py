"""Device choice, precision and the automatic micro-batch (node/ml/device.py), and
gradient accumulation in the trainer: a job's result does not depend on the micro-batch."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from node.jobs import taskproc
from node.ml import device, gpt, trainer

HAS_CUDA = torch.cuda.is_available()


def test_choose_names_what_is_missing() -> None:
    got = device.choose("auto")
    assert got == ("cuda" if HAS_CUDA else got)
    if not HAS_CUDA:
        assert got in ("cpu", "mps")
        with pytest.raises(ValueError, match="CUDA is not available"):
            device.choose("cuda")
    assert device.choose("cpu") == "cpu"
    with pytest.raises(ValueError, match="one of auto, cpu, cuda, mps"):
        device.choose("tpu")


def test_precision_is_fp32_on_the_cpu_and_kernels_as_the_device_wants() -> None:
    p = device.precision("cpu")
    assert p.dtype is None and not p.scaler and p.name == "fp32"
    assert device.adamw_kwargs("cpu") == {"foreach": False}
    assert device.adamw_kwargs("cuda:0") == {"fused": True}
    if HAS_CUDA:
        assert device.precision("cuda").name in ("bf16", "fp16")


def test_search_halves_until_it_fits() -> None:
    tried: list[int] = []

    def fits(m: int) -> bool:
        tried.append(m)
        return m <= 5

    assert device.search_micro_batch(32, fits) == 4
    assert tried == [32, 16, 8, 4]
    with pytest.raises(ValueError, match="not even a micro-batch of 1"):
        device.search_micro_batch(8, lambda m: False)


def test_micro_batch_backs_off_on_oom_once_then_uses_the_cache(tmp_path: Path) -> None:
    """The trial raises what torch raises when a card runs out of memory above 6
    sequences; the search runs once per (model, device) and is cached on disk."""
    calls: list[int] = []

    def trial(m: int) -> None:
        calls.append(m)
        if m > 6:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")

    assert device.micro_batch("model-a", "mps", 64, 128, trial, tmp_path) == 4
    assert calls == [64, 32, 16, 8, 4]
    assert device.micro_batch("model-a", "mps", 64, 128, trial, tmp_path) == 4
    assert device.micro_batch("model-a", "mps", 2, 128, trial, tmp_path) == 2
    assert len(calls) == 5  # cached
    assert device.micro_batch("model-b", "mps", 8, 128, trial, tmp_path) == 4  # another key
    # An error that is not out-of-memory is a bug, not a reason to shrink.
    def broken(m: int) -> None:
        raise RuntimeError("shape mismatch")

    with pytest.raises(RuntimeError, match="shape mismatch"):
        device.micro_batch("model-c", "mps", 8, 128, broken, tmp_path)
    # The CPU takes the whole batch without trying (no OOM exception there to catch).
    assert device.micro_batch("model-d", "cpu", 8, 128, broken, tmp_path) == 8
    # A corrupt cache file is searched again.
    for f in tmp_path.glob("*.json"):
        f.write_text("{not json")
    assert device.micro_batch("model-a", "mps", 64, 128, trial, tmp_path) == 4
    assert json.loads(next(tmp_path.glob("*.json")).read_text())["micro_batch"] in (4,)


def _train(micro: int | None) -> trainer.TaskOutput:
    config = gpt.SIZES["tiny"]
    state = gpt.init_state(config, 0)
    data = np.frombuffer(bytes(range(256)) * 200, dtype=np.uint8)
    return trainer.train_task(config, state, data, 0, len(data), 7, 2, 8, 16, 3e-3,
                              micro_batch=micro)


def test_accumulated_micro_batches_give_the_batchs_step() -> None:
    whole, default, parts = _train(8), _train(None), _train(2)
    assert whole.micro_batch == default.micro_batch == 8 and parts.micro_batch == 2
    for k in whole.delta:  # the CPU default is the whole batch, bit for bit
        assert torch.equal(whole.delta[k], default.delta[k]), k
    # Four micro-batches of 2: the same windows and step; only the summation order of
    # the gradient changes.
    assert trainer.reexec_diff(whole.delta, parts.delta) < 1e-4
    assert abs(whole.first_loss - parts.first_loss) < 1e-5
    with pytest.raises(ValueError, match="micro_batch 9"):
        _train(9)


def test_train_answer_reports_device_precision_micro_batch_and_peak_memory(
        tmp_path: Path) -> None:
    gpt.save_model(tmp_path / "m", gpt.SIZES["tiny"], gpt.init_state(gpt.SIZES["tiny"], 0))
    (tmp_path / "d.txt").write_bytes(bytes(range(256)) * 100)
    code, ans = taskproc.answer(json.dumps({
        "op": "train", "model_dir": str(tmp_path / "m"), "data_files": [str(tmp_path / "d.txt")],
        "slice_start": 0, "slice_len": 20000, "seed": 1, "steps": 2, "batch_size": 4,
        "seq_len": 32, "lr": 1e-3, "micro_batch": 2, "out_dir": str(tmp_path / "o")}).encode())
    assert code == 0, ans
    assert ans["device"] == "cpu" and ans["precision"] == "fp32" and ans["micro_batch"] == 2
    assert ans["peak_rss_bytes"] > 50 << 20
    code, ans = taskproc.answer(json.dumps({
        "op": "train", "model_dir": str(tmp_path / "m"), "data_files": [str(tmp_path / "d.txt")],
        "slice_start": 0, "slice_len": 20000, "seed": 1, "steps": 2, "batch_size": 4,
        "seq_len": 32, "lr": 1e-3, "micro_batch": 0, "out_dir": str(tmp_path / "o")}).encode())
    assert code == 1 and "micro_batch" in ans["error"]


@pytest.mark.skipif(HAS_CUDA, reason="the check runs for real on a CUDA machine")
def test_gpu_check_says_there_is_no_cuda_and_measures_nothing(
        capsys: pytest.CaptureFixture[str]) -> None:
    from bench import gpu_check

    assert gpu_check.main([]) == 2
    out = capsys.readouterr()
    assert "no CUDA device" in out.err and out.out == ""


def test_gpu_check_flops_and_peaks() -> None:
    from bench.gpu_check import flops_per_token, peak_tflops

    assert peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert peak_tflops("Some Future Card") is None
    assert flops_per_token(100, 2, 8, 16) == 600 + 12 * 2 * 8 * 16
