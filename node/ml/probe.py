"""Environment probe: what this machine offers (``iollm env``, the body of a capability record).

The probe reads the OS, Python and torch versions, the CUDA runtime, every GPU visible to
torch, CPU cores, RAM and free disk, and runs a short, time-bounded matmul benchmark
(fp32 on the CPU, bf16 on the first GPU where CUDA is present). The result is a
:class:`protocol.capability.EnvReport`, which the discovery service signs and announces.

torch is imported lazily inside :func:`probe_environment`: importing it costs one to several
seconds, the daemon must start fast, and the probe must still work (without a benchmark)
on a machine where torch is missing or broken.

The daemon runs the probe in a child process (:func:`probe_in_subprocess`, which runs
``iollm env --json``): importing torch costs a process about 190 MiB of resident memory,
which the daemon, whose work is moving and checking bytes, would otherwise keep for life.

Public API::

    probe_environment(disk_path, *, bench_seconds=0.5, fake_gpus=None) -> EnvReport
    await probe_in_subprocess(disk_path, *, bench_seconds, fake_gpus) -> EnvReport
    parse_fake_gpus(value) -> tuple[GpuInfo, ...]      # config ``[probe] fake_gpus``
    format_env(report) -> str                           # ``iollm env``
    env_to_json(report) -> dict                         # ``iollm env --json``
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import platform
import re
import shutil
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import psutil
import trio

from protocol.capability import EnvReport, GpuInfo
from protocol.errors import RemoteProtocolError

__all__ = [
    "ProbeError",
    "env_to_json",
    "format_env",
    "parse_fake_gpus",
    "probe_environment",
    "probe_in_subprocess",
]

log = logging.getLogger(__name__)

GIB = 2**30

# Benchmark sizing. One matmul should take "a few ms": long enough that the per-iteration
# clock read (and, on a GPU, the device sync) costs about 1 % of it, short enough that the
# bound "bench_seconds plus one matmul" stays tight. Starting small, n doubles (8x the
# work) while one matmul takes less than _TARGET_MATMUL_SECONDS, or while doubling still
# raised the throughput by _PLATEAU_GAIN, so that a fixed per-call cost is not mistaken
# for work. Each size is timed a few times and the fastest counts: on a CPU shared with a
# busy process, OpenMP threads often wait for a descheduled peer (seen on a 2-vCPU box:
# ~16 ms stalls on matmuls that take 0.1 ms otherwise), and one unlucky timing would stop
# the sizing at a matrix too small to measure anything but that wait.
# n stops growing where the next size (8x the time) would take more than a quarter of the
# budget, so the measurement keeps several repetitions.
_TARGET_MATMUL_SECONDS = 1e-3
_PLATEAU_GAIN = 1.25
_SIZING_SAMPLES = 3  # timings per size while sizing; the fastest counts
# CPU: 128 -> 2048 (2048^2 fp32 x 3 matrices = 48 MiB).
_CPU_START_N, _CPU_MAX_N = 128, 2048
# GPU: 1024 -> 8192 (8192^2 bf16 x 3 = 384 MiB, modest on a GPU that may be shared;
# one 8192 bf16 matmul is ~1.1 TFLOP, ~1.5 ms on an H100).
_GPU_START_N, _GPU_MAX_N = 1024, 8192

_CC_RE = re.compile(r"^\d+\.\d+$")
_FAKE_GPU_FIELDS = ("name", "memory_gb", "compute_capability", "tflops")
SIMULATED_DEVICE = "simulated"  # tflops_device of a report whose GPUs are fake_gpus


def _check_bench_seconds(bench_seconds: float) -> None:
    if bench_seconds < 0 or math.isnan(bench_seconds):
        raise ValueError(f"bench_seconds must be >= 0, got {bench_seconds!r}")


def probe_environment(
    disk_path: str | os.PathLike[str],
    *,
    bench_seconds: float = 0.5,
    fake_gpus: Sequence[GpuInfo] | None = None,
) -> EnvReport:
    """Probe this machine and return an :class:`EnvReport`.

    Args:
        disk_path: a path on the filesystem whose free space is reported (the node home).
            If it does not exist yet, its nearest existing ancestor is measured: that is
            the filesystem it will be created on.
        bench_seconds: wall-clock budget of the matmul benchmark. The benchmark (sizing
            and warm-up included) starts no matmul after the budget, so it runs at most
            ``bench_seconds`` plus one matmul (a few ms; the sizing keeps one matmul under
            about a quarter of the budget). Short budgets pick smaller matrices and so may
            read lower. ``0`` skips the benchmark (``tflops`` 0.0); negative is an error.
        fake_gpus: test-only override (config ``[probe] fake_gpus``, see
            :func:`parse_fake_gpus`): replaces the GPU list. The CUDA version and the
            benchmark still describe the real machine.

    Behaviour without torch (not importable, or its import fails): ``torch`` and ``cuda``
    are ``""``, no GPU is listed (unless faked) and there is **no benchmark**:
    ``tflops`` is 0.0 with dtype "fp32", device "cpu". A pure-Python matmul would
    measure the interpreter, not the hardware, and would understate it by orders of
    magnitude; 0.0 says "not measured", and a node without torch cannot train anyway.

    CPU threads: the benchmark leaves torch's default intra-op thread count
    (``torch.get_num_threads()``, normally the physical cores or ``OMP_NUM_THREADS``),
    the same setting training runs with, so the figure predicts training throughput.
    """
    _check_bench_seconds(bench_seconds)

    torch = _import_torch()
    cuda_ok = torch is not None and _cuda_available(torch)

    # GPUs are listed before the benchmark runs, so that their free memory does not
    # count the benchmark's own buffers.
    gpus: tuple[GpuInfo, ...] = _probe_gpus(torch) if torch is not None and cuda_ok else ()
    if fake_gpus is not None:
        gpus = tuple(fake_gpus)
        if not all(isinstance(g, GpuInfo) for g in gpus):
            raise TypeError("fake_gpus must hold GpuInfo values (see parse_fake_gpus)")

    tflops, dtype, device = 0.0, "fp32", "cpu"
    if torch is not None and bench_seconds > 0:
        tflops, dtype, device = _benchmark(torch, use_cuda=cuda_ok, seconds=bench_seconds)

    return EnvReport(
        os=f"{platform.system()}-{platform.release()} {platform.machine()}",
        python=platform.python_version(),
        torch=str(torch.__version__) if torch is not None else "",
        # torch.version.cuda is None on ROCm builds, where torch.cuda still drives the GPUs.
        cuda=(torch.version.cuda or "") if torch is not None and cuda_ok else "",
        gpus=gpus,
        cpu_cores=_cpu_cores(),
        ram_bytes=int(psutil.virtual_memory().total),
        disk_free_bytes=_disk_free(disk_path),
        tflops=tflops,
        tflops_dtype=dtype,
        tflops_device=device,
    )


def parse_fake_gpus(value: Any) -> tuple[GpuInfo, ...]:
    """Turn config ``[probe] fake_gpus`` entries into :class:`GpuInfo` values.

    Each entry is a table such as
    ``{name = "NVIDIA A100-SXM4-40GB", memory_gb = 40, compute_capability = "8.0"}``:
    ``name`` (non-empty string) and ``memory_gb`` (positive number, GiB) are required;
    ``compute_capability`` ("major.minor") is optional and defaults to "" (unknown).
    Total and free memory are both ``memory_gb * 2**30`` bytes. Unknown keys are
    rejected so that a misspelt field is not silently ignored.

    Raises:
        ValueError: naming the entry (``fake_gpus[i]``) and the field at fault.
    """
    if isinstance(value, str | bytes) or not isinstance(value, Sequence):
        raise ValueError(f"probe.fake_gpus must be a list of tables, got {type(value).__name__}")
    gpus = []
    for i, entry in enumerate(value):
        where = f"probe.fake_gpus[{i}]"
        if not isinstance(entry, Mapping):
            raise ValueError(f"{where} must be a table, got {type(entry).__name__}")
        unknown = sorted(str(k) for k in entry if k not in _FAKE_GPU_FIELDS)
        if unknown:
            raise ValueError(
                f"{where}: unknown field(s) {', '.join(map(repr, unknown))}; "
                f"allowed: {', '.join(_FAKE_GPU_FIELDS)}"
            )

        name = _require(entry, "name", where)
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"{where}: field 'name' must be a non-empty string, got {name!r}")

        mem = _require(entry, "memory_gb", where)
        # bool is an int subclass: `memory_gb = true` is a typo, not 1 GiB.
        if isinstance(mem, bool) or not isinstance(mem, int | float):
            raise ValueError(
                f"{where}: field 'memory_gb' must be a number (GiB), "
                f"got {type(mem).__name__} {mem!r}"
            )
        if not math.isfinite(mem) or mem <= 0:
            raise ValueError(f"{where}: field 'memory_gb' must be positive, got {mem!r}")

        tf = entry.get("tflops", 1.0)
        if isinstance(tf, bool) or not isinstance(tf, int | float) or not math.isfinite(tf) \
                or tf <= 0:
            raise ValueError(f"{where}: field 'tflops' must be a positive number (bf16 "
                             f"TFLOP/s), got {tf!r}")

        cc = entry.get("compute_capability", "")
        if not isinstance(cc, str) or (cc and not _CC_RE.match(cc)):
            raise ValueError(
                f"{where}: field 'compute_capability' must be a string like \"8.0\", got {cc!r}"
            )

        size = int(mem * GIB)
        gpus.append(GpuInfo(name, size, size, cc))
    return tuple(gpus)


def fake_gpus_tflops(value: Any) -> float | None:
    """The simulated throughput of config ``[probe] fake_gpus`` (checked by
    :func:`parse_fake_gpus` first): the largest ``tflops`` of an entry, or None when no
    entry gives one. A record carries one figure, its fastest device's."""
    given = [float(e["tflops"]) for e in value if isinstance(e, Mapping) and "tflops" in e]
    return max(given) if given else None


def format_env(report: EnvReport) -> str:
    """Render a report as the aligned key/value table that ``iollm env`` prints."""
    if report.tflops > 0:
        tflops = f"{report.tflops:.3f} ({report.tflops_dtype} matmul, {report.tflops_device})"
    elif not report.torch:
        tflops = "not measured (no benchmark without torch)"
    else:
        tflops = "not measured"

    rows: list[tuple[str, str]] = [
        ("OS", report.os),
        ("Python", report.python),
        ("torch", report.torch or "not installed"),
        ("CUDA", report.cuda or "none"),
        ("CPU cores", str(report.cpu_cores)),
        ("RAM", _gib(report.ram_bytes)),
        ("Disk free", _gib(report.disk_free_bytes)),
        ("GPUs", str(len(report.gpus)) if report.gpus else "none (CPU only)"),
    ]
    # Keys are right-aligned so every value starts in the same column.
    width = max(len(key) for key, _ in [*rows, ("TFLOP/s", "")])
    lines = [f"{key:>{width}}: {val}" for key, val in rows]

    if report.gpus:
        name_w = max(len(g.name) for g in report.gpus)
        idx_w = len(str(len(report.gpus) - 1)) + 2  # "[i]"
        for i, g in enumerate(report.gpus):
            lines.append(
                f"{'':>{width}}  {f'[{i}]':<{idx_w}} {g.name:<{name_w}}  "
                f"{_gib(g.total_memory_bytes)} total, {_gib(g.free_memory_bytes)} free, "
                f"compute {g.compute_capability or 'unknown'}"
            )
    lines.append(f"{'TFLOP/s':>{width}}: {tflops}")
    return "\n".join(lines)


def env_to_json(report: EnvReport) -> dict[str, Any]:
    """Plain-JSON form of a report for ``iollm env --json``.

    Keys are the :class:`EnvReport` field names; ``gpus`` is a list of objects keyed by the
    :class:`GpuInfo` field names; byte counts are ints, versions strings ("" when absent).
    """
    return {
        "os": report.os,
        "python": report.python,
        "torch": report.torch,
        "cuda": report.cuda,
        "gpus": [
            {
                "name": g.name,
                "total_memory_bytes": int(g.total_memory_bytes),
                "free_memory_bytes": int(g.free_memory_bytes),
                "compute_capability": g.compute_capability,
            }
            for g in report.gpus
        ],
        "cpu_cores": int(report.cpu_cores),
        "ram_bytes": int(report.ram_bytes),
        "disk_free_bytes": int(report.disk_free_bytes),
        "tflops": float(report.tflops),
        "tflops_dtype": report.tflops_dtype,
        "tflops_device": report.tflops_device,
    }


class ProbeError(Exception):
    """The probe's child process failed or answered nonsense (the message says how)."""


# Importing torch can take tens of seconds on a cold disk; the benchmark adds its budget.
PROBE_START_TIMEOUT_S = 120.0


def _probe_cache_key(disk_path: str | os.PathLike[str], bench_seconds: float) -> str:
    """What a cached report is valid for: this boot of this machine, this interpreter (and
    so this torch), the benchmark's length, and the filesystem whose free space it read."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:  # not Linux: the cache is keyed on the interpreter alone
        boot = "no-boot-id"
    device = os.stat(disk_path).st_dev
    return f"{boot}|{sys.executable}|{bench_seconds!r}|{device}"


def _read_cached(cache: Path, key: str, max_age_s: float) -> EnvReport | None:
    try:
        entry = json.loads(cache.read_text())
        if entry["key"] != key or not 0 <= time.time() - entry["time"] <= max_age_s:
            return None
        return EnvReport.from_dict(entry["report"])
    except (OSError, ValueError, KeyError, TypeError, RemoteProtocolError):
        return None  # absent, stale or damaged: probe again


def _write_cached(cache: Path, key: str, report: EnvReport) -> None:
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f"{cache.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"key": key, "time": time.time(),
                                   "report": env_to_json(report)}))
        os.replace(tmp, cache)
    except OSError as exc:  # a read-only cache directory costs only the next start's time
        log.debug("probe cache %s not written: %s", cache, exc)


async def probe_in_subprocess(
    disk_path: str | os.PathLike[str],
    *,
    bench_seconds: float = 0.5,
    fake_gpus: Sequence[GpuInfo] | None = None,
    fake_tflops: float | None = None,
    cache: Path | None = None,
    cache_max_age_s: float = 600.0,
) -> EnvReport:
    """:func:`probe_environment` run by a child process (``iollm env --json``), so that
    torch is never imported here. ``fake_gpus`` replaces the child's GPU list, as in
    :func:`probe_environment`. ProbeError when the child fails, stalls or answers with
    something that is not a report.

    With ``cache`` (a directory), a report that the same machine, boot and interpreter
    made for the same benchmark length and filesystem within ``cache_max_age_s`` is used
    instead of a new probe (each probe imports torch in a child: seconds of CPU at every
    daemon start), and a new report is kept there."""
    _check_bench_seconds(bench_seconds)
    key = _probe_cache_key(disk_path, bench_seconds) if cache is not None else ""
    if cache is not None:
        cache = cache / f"probe-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"
        cached = _read_cached(cache, key, cache_max_age_s)
        if cached is not None:
            log.info("environment probe reused from %s", cache)
            return _with_fake_gpus(cached, fake_gpus, fake_tflops)
    cmd = [sys.executable, "-m", "node.cli", "env", "--json", "--home", os.fspath(disk_path),
           "--bench-seconds", repr(float(bench_seconds))]
    try:
        with trio.fail_after(PROBE_START_TIMEOUT_S + bench_seconds):
            proc = await trio.run_process(cmd, capture_stdout=True, capture_stderr=True,
                                          check=False)
    except trio.TooSlowError:
        raise ProbeError(f"the environment probe did not finish within "
                         f"{PROBE_START_TIMEOUT_S + bench_seconds:.0f} s") from None
    except OSError as exc:  # the interpreter cannot be started
        raise ProbeError(f"the environment probe could not start: {exc}") from None
    if proc.returncode != 0:
        lines = proc.stderr.decode(errors="replace").strip().splitlines()
        raise ProbeError(f"the environment probe failed (exit {proc.returncode}): "
                         f"{lines[-1] if lines else 'no message'}")
    try:
        report = EnvReport.from_dict(json.loads(proc.stdout))
    except (ValueError, RemoteProtocolError) as exc:
        raise ProbeError(f"the environment probe printed no valid report: {exc}") from None
    if cache is not None:
        _write_cached(cache, key, report)
    return _with_fake_gpus(report, fake_gpus, fake_tflops)


def _with_fake_gpus(report: EnvReport, fake_gpus: Sequence[GpuInfo] | None,
                    fake_tflops: float | None) -> EnvReport:
    """The report with simulated GPUs, saying so: ``tflops_device`` "simulated", and the
    simulated bf16 figure where the config gives one (the machine's own benchmark
    otherwise: a CPU's figure beside an "H100" would make ``--min-tflops`` meaningless)."""
    if fake_gpus is None:
        return report
    if fake_tflops is None:
        return dataclasses.replace(report, gpus=tuple(fake_gpus),
                                   tflops_device=SIMULATED_DEVICE)
    return dataclasses.replace(report, gpus=tuple(fake_gpus), tflops=float(fake_tflops),
                               tflops_dtype="bf16", tflops_device=SIMULATED_DEVICE)


def _require(entry: Mapping[str, Any], field: str, where: str) -> Any:
    if field not in entry:
        raise ValueError(f"{where}: missing required field {field!r}")
    return entry[field]


def _gib(n_bytes: int) -> str:
    return f"{n_bytes / GIB:.1f} GiB"


# --- probes -----------------------------------------------------------------------------


def _import_torch() -> ModuleType | None:
    """Import torch, or return None where it is missing or broken."""
    try:
        import torch
    except ImportError:
        return None
    except OSError as e:  # a torch whose native libraries fail to load
        log.warning("torch is installed but failed to load: %s", e)
        return None
    return torch


def _cuda_available(torch: ModuleType) -> bool:
    try:
        return bool(torch.cuda.is_available())
    except Exception as e:  # a broken driver must not take the probe down with it
        log.warning("torch.cuda.is_available() failed: %s", e)
        return False


def _probe_gpus(torch: ModuleType) -> tuple[GpuInfo, ...]:
    """Every GPU torch.cuda sees. Creates a CUDA context on each (a few hundred MiB of
    device memory each, which the free figure already excludes); the daemon will use them
    anyway."""
    gpus = []
    for i in range(torch.cuda.device_count()):
        try:
            props = torch.cuda.get_device_properties(i)
            free, total = torch.cuda.mem_get_info(i)
            major, minor = torch.cuda.get_device_capability(i)
        except RuntimeError as e:  # a GPU in a bad state is not offered; the rest still are
            log.warning("skipping GPU %d, it failed to answer: %s", i, e)
            continue
        gpus.append(GpuInfo(str(props.name), int(total), int(free), f"{major}.{minor}"))
    return tuple(gpus)


def _cpu_cores() -> int:
    """Logical CPUs this process may run on.

    ``len(os.sched_getaffinity(0))`` where the OS has it (Linux): it honours taskset and
    container cpusets, so a container pinned to 4 CPUs of a 64-CPU host says 4, which is
    what training threads can actually use; ``os.cpu_count()`` would say 64. Elsewhere
    (macOS, Windows) ``os.cpu_count()``. Neither sees a cgroup CPU *quota*
    (``docker --cpus``) without a cpuset.
    """
    if hasattr(os, "sched_getaffinity"):
        try:
            return max(1, len(os.sched_getaffinity(0)))
        except OSError:
            pass
    return max(1, os.cpu_count() or 1)


def _disk_free(path: str | os.PathLike[str]) -> int:
    p = Path(path).expanduser().absolute()
    # The node home may not exist before `iollm init`: measure the filesystem it will be on.
    while not p.exists() and p != p.parent:
        p = p.parent
    return int(shutil.disk_usage(p).free)


# --- benchmark --------------------------------------------------------------------------


def _benchmark(torch: ModuleType, *, use_cuda: bool, seconds: float) -> tuple[float, str, str]:
    """Return (TFLOP/s, dtype, device): bf16 on cuda:0 where CUDA works, else fp32 on CPU.

    One deadline covers everything, so a GPU that fails half-way (out of memory on a
    shared card) falls back to the CPU within the same budget.
    """
    deadline = time.perf_counter() + seconds
    if use_cuda:
        cuda0 = torch.device("cuda", 0)
        try:
            tflops = _bench_matmul(torch, cuda0, torch.bfloat16, deadline, _GPU_START_N, _GPU_MAX_N)
        except RuntimeError as e:  # includes torch.cuda.OutOfMemoryError
            log.warning("GPU benchmark failed, measuring the CPU instead: %s", e)
        else:
            return tflops, "bf16", "cuda"
        finally:
            # Hand the benchmark's cached blocks back, so that the daemon does not hold
            # them for its whole life and other processes' free memory is not understated.
            try:
                torch.cuda.empty_cache()
            except RuntimeError as e:
                log.warning("torch.cuda.empty_cache() failed: %s", e)
    log.debug("CPU benchmark with torch's default %d threads", torch.get_num_threads())
    tflops = _bench_matmul(
        torch, torch.device("cpu"), torch.float32, deadline, _CPU_START_N, _CPU_MAX_N
    )
    return tflops, "fp32", "cpu"


def _bench_matmul(
    torch: ModuleType,
    device: Any,
    dtype: Any,
    deadline: float,
    start_n: int,
    max_n: int,
) -> float:
    """Square matmuls until ``deadline``; TFLOP/s = 2 n^3 reps / elapsed / 1e12.

    The deadline is checked before every matmul, so none starts after it and the run ends
    at most one matmul (plus an allocation) past it. The one exception is a budget so
    short that no matmul has been timed at the chosen size yet: then exactly one more
    runs, to have a figure.

    On CUDA every clock read is preceded by a synchronize, because kernel launches are
    asynchronous and the clock would otherwise time the launch, not the work: that is a
    device sync point, costing ~10 us a matmul (about 1 % at the sizes chosen).
    """
    is_cuda = device.type == "cuda"

    def sync() -> None:
        if is_cuda:
            torch.cuda.synchronize(device)  # device sync point, see docstring

    def timed_once(a: Any, b: Any, c: Any) -> float:
        t0 = time.perf_counter()
        torch.mm(a, b, out=c)
        sync()
        return time.perf_counter() - t0

    def alloc(n: int) -> tuple[Any, Any, Any]:
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        c = torch.empty(n, n, device=device, dtype=dtype)
        sync()
        return a, b, c

    def before_deadline() -> bool:
        return time.perf_counter() < deadline

    with torch.no_grad():
        # Sizing. Each size gets a warm-up matmul first: the very first one pays for
        # thread-pool start-up, kernel selection (cuBLAS heuristics, oneDNN primitives) and
        # page faults, and a new shape may pay for kernel selection again.
        budget = deadline - time.perf_counter()
        n = start_n
        a, b, c = alloc(n)
        t_at_n: float | None = None  # a post-warm-up timing at the current n
        prev_rate = 0.0  # n^3 / s at the previous size
        if before_deadline():
            timed_once(a, b, c)
        while before_deadline():
            # Best of a few: a single timing may have caught a scheduler stall.
            t_at_n = timed_once(a, b, c)
            for _ in range(_SIZING_SAMPLES - 1):
                if not before_deadline():
                    break
                t_at_n = min(t_at_n, timed_once(a, b, c))
            rate = n**3 / t_at_n
            still_gaining = t_at_n < _TARGET_MATMUL_SECONDS or rate >= _PLATEAU_GAIN * prev_rate
            next_fits = 8 * t_at_n <= budget / 4
            log.debug("sizing n=%d: %.2f ms", n, t_at_n * 1e3)
            if not (still_gaining and next_fits) or n >= max_n or not before_deadline():
                break
            prev_rate = rate
            n *= 2
            a, b, c = alloc(n)
            t_at_n = None
            if before_deadline():
                timed_once(a, b, c)  # warm-up at the new size

        # Measurement: the loop reads the clock after each matmul's sync.
        reps = 0
        t0 = now = time.perf_counter()
        while now < deadline:
            torch.mm(a, b, out=c)
            sync()
            reps += 1
            now = time.perf_counter()
        if reps:
            elapsed = now - t0
        else:  # sizing used the whole budget: fall back on its last timing
            elapsed = t_at_n if t_at_n is not None else timed_once(a, b, c)
            reps = 1
    log.debug("matmul benchmark on %s: n=%d, %d reps in %.3f s", device, n, reps, elapsed)
    return 2.0 * n**3 * reps / elapsed / 1e12
