"""Environment probe (node/ml/probe.py): the real probe on this machine, the fake-GPU override
and its config parser, the human and JSON renderings, and the probe without torch or with
a (simulated) CUDA torch."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
import types
from pathlib import Path
from typing import Any

import pytest
import torch
import trio

from node.cli.testnet import SIMULATED_GPUS
from node.ml.probe import (
    ProbeError,
    env_to_json,
    fake_gpus_tflops,
    format_env,
    parse_fake_gpus,
    probe_environment,
    probe_in_subprocess,
)
from protocol.capability import EnvReport, GpuInfo

GIB = 2**30

A100 = {"name": "NVIDIA A100-SXM4-40GB", "memory_gb": 40, "compute_capability": "8.0"}
RTX = {"name": "NVIDIA GeForce RTX 4090", "memory_gb": 24, "compute_capability": "8.9"}


@pytest.fixture(scope="module")
def real_report(tmp_path_factory: pytest.TempPathFactory) -> EnvReport:
    return probe_environment(tmp_path_factory.mktemp("home"), bench_seconds=0.2)


def _report(**overrides: Any) -> EnvReport:
    fields: dict[str, Any] = {
        "os": "Linux-6.1.0 x86_64",
        "python": "3.11.9",
        "torch": "2.13.0",
        "cuda": "12.4",
        "gpus": parse_fake_gpus([A100, RTX]),
        "cpu_cores": 32,
        "ram_bytes": 256 * GIB,
        "disk_free_bytes": 1500 * GIB,
        "tflops": 612.25,
        "tflops_dtype": "bf16",
        "tflops_device": "cuda",
    }
    fields.update(overrides)
    return EnvReport(**fields)


# --- the real probe --------------------------------------------------------------------


def test_real_probe_is_sane(real_report: EnvReport) -> None:
    r = real_report
    assert r.cpu_cores >= 1
    assert r.ram_bytes > 0
    assert r.disk_free_bytes > 0
    assert r.torch == torch.__version__
    assert r.python == ".".join(map(str, sys.version_info[:3]))
    assert r.os.strip()
    assert r.tflops > 0 and math.isfinite(r.tflops)
    if torch.cuda.is_available():  # pragma: no cover - CPU CI
        assert (r.tflops_dtype, r.tflops_device) == ("bf16", "cuda")
        assert r.cuda == torch.version.cuda and len(r.gpus) == torch.cuda.device_count()
    else:
        assert (r.tflops_dtype, r.tflops_device) == ("fp32", "cpu")
        assert r.cuda == "" and r.gpus == ()


def test_bench_seconds_bounds_run_time(tmp_path: Path) -> None:
    t0 = time.perf_counter()
    r = probe_environment(tmp_path, bench_seconds=0.2)
    elapsed = time.perf_counter() - t0
    assert r.tflops > 0
    assert elapsed < 2.0


def test_zero_budget_skips_benchmark_and_negative_is_an_error(tmp_path: Path) -> None:
    t0 = time.perf_counter()
    r = probe_environment(tmp_path, bench_seconds=0)
    assert time.perf_counter() - t0 < 1.0
    assert r.tflops == 0.0
    assert "not measured" in format_env(r)
    with pytest.raises(ValueError, match="bench_seconds"):
        probe_environment(tmp_path, bench_seconds=-1)


def test_disk_path_not_yet_created_measures_its_filesystem(tmp_path: Path) -> None:
    r = probe_environment(tmp_path / "not" / "yet", bench_seconds=0)
    assert r.disk_free_bytes > 0


# --- fake GPUs ---------------------------------------------------------------------------


def test_fake_gpus_replace_the_gpu_list(tmp_path: Path) -> None:
    fake = parse_fake_gpus([A100, RTX])
    real = probe_environment(tmp_path, bench_seconds=0)
    r = probe_environment(tmp_path, bench_seconds=0, fake_gpus=fake)
    assert r.gpus == fake
    assert r.cuda == real.cuda  # the CUDA runtime stays what it is
    assert r.total_gpu_memory_bytes == 64 * GIB
    assert probe_environment(tmp_path, bench_seconds=0, fake_gpus=[]).gpus == ()


def test_parse_fake_gpus() -> None:
    a100, rtx = parse_fake_gpus([A100, RTX])
    assert a100 == GpuInfo("NVIDIA A100-SXM4-40GB", 40 * GIB, 40 * GIB, "8.0")
    assert rtx.total_memory_bytes == rtx.free_memory_bytes == 24 * GIB
    (half,) = parse_fake_gpus([{"name": "small", "memory_gb": 1.5}])
    assert half == GpuInfo("small", 3 * GIB // 2, 3 * GIB // 2, "")
    assert parse_fake_gpus([]) == ()
    assert parse_fake_gpus([{**A100, "tflops": 220}]) == (a100,)


def test_simulated_tflops_is_the_fastest_entry() -> None:
    assert fake_gpus_tflops([A100, RTX]) is None
    assert fake_gpus_tflops([{**A100, "tflops": 220}, {**RTX, "tflops": 115.5}]) == 220.0
    assert fake_gpus_tflops([RTX, {**A100, "tflops": 3}]) == 3.0


def test_the_testnet_simulates_plausible_gpus() -> None:
    # Each simulated card claims a bf16 rate within its real peak, and the order of the
    # cards is the order of their real speed, so --min-tflops picks what it should.
    peaks = {"H100": 989, "A100": 312, "4090": 165, "3060": 25.6}
    rates = {}
    for gpus in SIMULATED_GPUS:
        assert parse_fake_gpus(gpus) is not None
        for g in gpus:
            card = next(k for k in peaks if k in g["name"])
            assert 0.5 * peaks[card] <= g["tflops"] <= peaks[card], g
            rates[card] = g["tflops"]
    assert sorted(rates, key=rates.__getitem__) == ["3060", "4090", "A100", "H100"]


@pytest.mark.parametrize(
    ("entry", "field"),
    [
        ({"memory_gb": 40}, "name"),
        ({"name": "x"}, "memory_gb"),
        ({"name": "x", "memory_gb": -4}, "memory_gb"),
        ({"name": "x", "memory_gb": 0}, "memory_gb"),
        ({"name": "x", "memory_gb": "40"}, "memory_gb"),
        ({"name": "x", "memory_gb": True}, "memory_gb"),
        ({"name": "x", "memory_gb": float("nan")}, "memory_gb"),
        ({"name": 3, "memory_gb": 40}, "name"),
        ({"name": "", "memory_gb": 40}, "name"),
        ({"name": "x", "memory_gb": 40, "compute_capability": 8.0}, "compute_capability"),
        ({"name": "x", "memory_gb": 40, "compute_capability": "sm80"}, "compute_capability"),
        ({"name": "x", "memory_gib": 40}, "memory_gib"),  # a typo is not ignored
        ({"name": "x", "memory_gb": 40, "tflops": 0}, "tflops"),
        ({"name": "x", "memory_gb": 40, "tflops": "fast"}, "tflops"),
        ({"name": "x", "memory_gb": 40, "tflops": float("inf")}, "tflops"),
    ],
)
def test_parse_fake_gpus_rejects_bad_entries(entry: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError) as exc:
        parse_fake_gpus([A100, entry])
    msg = str(exc.value)
    assert "fake_gpus[1]" in msg  # which entry
    assert repr(field) in msg or f"'{field}'" in msg  # which field


@pytest.mark.parametrize("value", ["A100", {"name": "x", "memory_gb": 1}, None, ["A100"]])
def test_parse_fake_gpus_rejects_non_tables(value: Any) -> None:
    with pytest.raises(ValueError, match="fake_gpus"):
        parse_fake_gpus(value)


# --- renderings --------------------------------------------------------------------------


def test_format_env_shows_every_field_and_gpu() -> None:
    r = _report()
    text = format_env(r)
    for needle in [
        "Linux-6.1.0 x86_64",
        "3.11.9",
        "2.13.0",
        "12.4",
        "32",
        "256.0 GiB",
        "1500.0 GiB",
        "612.250",
        "bf16",
        "cuda",
        "[0] NVIDIA A100-SXM4-40GB",
        "[1] NVIDIA GeForce RTX 4090",
        "40.0 GiB total, 40.0 GiB free",
        "24.0 GiB total, 24.0 GiB free",
        "8.0",
        "8.9",
    ]:
        assert needle in text, needle
    # Key/value lines share one colon column; GPU lines are indented under the values.
    key_lines = [line for line in text.splitlines() if ": " in line]
    assert len(key_lines) == 9
    assert len({line.index(": ") for line in key_lines}) == 1
    gpu_lines = [line for line in text.splitlines() if "GiB total" in line]
    assert len(gpu_lines) == 2


def test_format_env_cpu_only() -> None:
    text = format_env(
        _report(gpus=(), cuda="", tflops=0.0123, tflops_dtype="fp32", tflops_device="cpu")
    )
    assert "GPUs: none (CPU only)" in text
    assert "CUDA: none" in text
    assert "0.012 (fp32 matmul, cpu)" in text


def test_env_to_json_is_plain_json_and_complete() -> None:
    r = _report()
    d = env_to_json(r)
    back = json.loads(json.dumps(d))
    assert back == d
    assert set(d) == set(EnvReport.__dataclass_fields__)
    assert len(d["gpus"]) == 2
    assert d["gpus"][0] == {
        "name": "NVIDIA A100-SXM4-40GB",
        "total_memory_bytes": 40 * GIB,
        "free_memory_bytes": 40 * GIB,
        "compute_capability": "8.0",
    }
    assert isinstance(d["ram_bytes"], int) and isinstance(d["disk_free_bytes"], int)
    # Nothing is lost: the JSON rebuilds the same report.
    rebuilt = EnvReport(**{**back, "gpus": tuple(GpuInfo(**g) for g in back["gpus"])})
    assert rebuilt == r


def test_env_to_json_of_real_report(real_report: EnvReport) -> None:
    d = json.loads(json.dumps(env_to_json(real_report)))
    assert d["torch"] == torch.__version__ and d["tflops"] > 0


# --- without torch, and with a simulated CUDA torch --------------------------------------


def test_probe_without_torch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
    r = probe_environment(tmp_path, bench_seconds=0.2)
    assert (r.torch, r.cuda, r.gpus) == ("", "", ())
    # No benchmark without torch: 0.0 means "not measured".
    assert (r.tflops, r.tflops_dtype, r.tflops_device) == (0.0, "fp32", "cpu")
    assert r.cpu_cores >= 1 and r.ram_bytes > 0 and r.disk_free_bytes > 0
    assert "no benchmark without torch" in format_env(r)
    fake = parse_fake_gpus([A100])
    assert probe_environment(tmp_path, bench_seconds=0, fake_gpus=fake).gpus == fake


class _FakeCudaTorch(types.ModuleType):
    """Real torch on the CPU, dressed as a CUDA build with two GPUs. Tensors asked for on
    "cuda" are made on the CPU; synchronize calls are counted; mm can be made to fail."""

    def __init__(self, *, oom: bool = False) -> None:
        super().__init__("torch")
        self.__version__ = "2.99.0+cu124"
        self.version = types.SimpleNamespace(cuda="12.4")
        self.device = torch.device
        self.no_grad = torch.no_grad
        self.bfloat16, self.float32 = torch.bfloat16, torch.float32
        self.get_num_threads = torch.get_num_threads
        self.syncs = 0
        self.emptied = 0
        self.oom = oom
        self.on_cuda = False
        props = [
            types.SimpleNamespace(name="NVIDIA H100 80GB HBM3"),
            types.SimpleNamespace(name="NVIDIA A100-SXM4-40GB"),
        ]

        def synchronize(device: Any = None) -> None:
            self.syncs += 1

        def empty_cache() -> None:
            self.emptied += 1

        self.cuda = types.SimpleNamespace(
            is_available=lambda: True,
            device_count=lambda: 2,
            get_device_properties=lambda i: props[i],
            mem_get_info=lambda i: ((70 - 30 * i) * GIB, (80 - 40 * i) * GIB),
            get_device_capability=lambda i: (9, 0) if i == 0 else (8, 0),
            synchronize=synchronize,
            empty_cache=empty_cache,
        )

    # Tensors are fp32 whatever the dtype asked: bf16 matmul on a CPU without bf16 units
    # takes seconds; the test is about the control flow, not the figure.
    def randn(self, *shape: int, device: Any, dtype: Any) -> torch.Tensor:
        self.on_cuda = torch.device(device).type == "cuda"
        return torch.randn(*shape)

    def empty(self, *shape: int, device: Any, dtype: Any) -> torch.Tensor:
        return torch.empty(*shape)

    def mm(self, a: torch.Tensor, b: torch.Tensor, *, out: torch.Tensor) -> torch.Tensor:
        if self.oom and self.on_cuda:
            raise RuntimeError("CUDA out of memory. Tried to allocate 128.00 MiB")
        return torch.mm(a, b, out=out)


def test_probe_lists_cuda_gpus(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = _FakeCudaTorch()
    monkeypatch.setitem(sys.modules, "torch", fake)
    r = probe_environment(tmp_path, bench_seconds=0)
    assert (r.torch, r.cuda) == ("2.99.0+cu124", "12.4")
    assert r.gpus == (
        GpuInfo("NVIDIA H100 80GB HBM3", 80 * GIB, 70 * GIB, "9.0"),
        GpuInfo("NVIDIA A100-SXM4-40GB", 40 * GIB, 40 * GIB, "8.0"),
    )
    # fake_gpus replaces even real GPUs, and CUDA stays.
    r2 = probe_environment(tmp_path, bench_seconds=0, fake_gpus=parse_fake_gpus([RTX]))
    assert r2.cuda == "12.4" and [g.name for g in r2.gpus] == [RTX["name"]]


def test_gpu_benchmark_is_bf16_and_syncs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = _FakeCudaTorch()
    monkeypatch.setitem(sys.modules, "torch", fake)
    r = probe_environment(tmp_path, bench_seconds=0.2)
    assert (r.tflops_dtype, r.tflops_device) == ("bf16", "cuda")
    assert r.tflops > 0
    assert fake.syncs >= 2  # the clock is only read after a device sync
    assert fake.emptied == 1  # the benchmark's cached blocks are handed back


def test_gpu_benchmark_failure_falls_back_to_cpu(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    fake = _FakeCudaTorch(oom=True)
    monkeypatch.setitem(sys.modules, "torch", fake)
    t0 = time.perf_counter()
    r = probe_environment(tmp_path, bench_seconds=0.2)
    assert time.perf_counter() - t0 < 2.0
    assert (r.tflops_dtype, r.tflops_device) == ("fp32", "cpu") and r.tflops > 0
    assert len(r.gpus) == 2  # the GPUs are still listed
    assert "GPU benchmark failed" in caplog.text


def test_importing_the_probe_does_not_import_torch() -> None:
    # The daemon must start fast: torch is imported only when the probe runs.
    code = "import sys, node.ml.probe; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=30)


def test_fake_gpus_must_be_parsed(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="parse_fake_gpus"):
        probe_environment(tmp_path, bench_seconds=0, fake_gpus=[A100])  # type: ignore[list-item]


def test_probe_in_subprocess_matches_the_in_process_probe(tmp_path: Path) -> None:
    fake = parse_fake_gpus([A100, RTX])
    child = trio.run(lambda: probe_in_subprocess(tmp_path, bench_seconds=0.1))
    here = probe_environment(tmp_path, bench_seconds=0)
    assert (child.os, child.python, child.torch, child.cpu_cores, child.ram_bytes) == \
        (here.os, here.python, here.torch, here.cpu_cores, here.ram_bytes)
    assert child.tflops > 0 and child.tflops_device == "cpu"
    faked = trio.run(lambda: probe_in_subprocess(tmp_path, bench_seconds=0, fake_gpus=fake,
                                                 fake_tflops=220.0))
    # Simulated GPUs say so, with the configured figure rather than this CPU's.
    assert faked.gpus == fake and faked.tflops == 220.0
    assert (faked.tflops_dtype, faked.tflops_device) == ("bf16", "simulated")


def test_probe_in_subprocess_failures_are_one_line_errors(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    garbage = tmp_path / "garbage-python"
    garbage.write_text("#!/bin/sh\necho '{\"os\": 1}'\n")
    garbage.chmod(0o755)
    failing = tmp_path / "failing-python"
    failing.write_text("#!/bin/sh\necho 'something broke' >&2\nexit 3\n")
    failing.chmod(0o755)
    for executable, message in [(garbage, "printed no valid report"),
                                (failing, r"failed \(exit 3\): something broke")]:
        monkeypatch.setattr(sys, "executable", str(executable))
        with pytest.raises(ProbeError, match=message):
            trio.run(lambda: probe_in_subprocess(tmp_path, bench_seconds=0))
    with pytest.raises(ValueError):
        trio.run(lambda: probe_in_subprocess(tmp_path, bench_seconds=-1))


def test_a_recent_probe_is_reused_and_a_stale_or_other_one_is_not(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """probe_in_subprocess(cache=DIR): the first call probes (a child process) and keeps
    the report; the next, within the age limit, reuses it without a child; an older
    report, or one for another benchmark length, is probed anew."""
    import node.ml.probe as probe_module

    cache = tmp_path / "cache"
    first = trio.run(lambda: probe_in_subprocess(tmp_path, bench_seconds=0, cache=cache))
    [kept] = list(cache.iterdir())
    # From now on every child process fails to start: only a reuse can answer.
    children: list[object] = []

    async def no_child(command: object, **_: object) -> None:
        children.append(command)
        raise FileNotFoundError("no interpreter")

    monkeypatch.setattr(probe_module.trio, "run_process", no_child)
    again = trio.run(lambda: probe_in_subprocess(tmp_path, bench_seconds=0, cache=cache))
    assert again == first and children == []
    fake = parse_fake_gpus([{"name": "Fake", "memory_gb": 8}])
    faked = trio.run(lambda: probe_in_subprocess(tmp_path, bench_seconds=0, cache=cache,
                                                 fake_gpus=fake))
    assert faked.gpus == fake and faked.cpu_cores == first.cpu_cores
    for other in ({"bench_seconds": 0.1}, {"bench_seconds": 0, "cache_max_age_s": -1}):
        with pytest.raises(ProbeError, match="could not start"):  # a new probe was tried
            trio.run(lambda o=other: probe_in_subprocess(tmp_path, cache=cache, **o))
    kept.write_text("{damaged")
    with pytest.raises(ProbeError, match="could not start"):
        trio.run(lambda: probe_in_subprocess(tmp_path, bench_seconds=0, cache=cache))
    assert len(children) == 3
