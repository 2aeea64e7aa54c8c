"""Helpers for multi-node tests: real py-libp2p hosts on 127.0.0.1 in one trio process."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from pathlib import Path

import trio

from node.config import DiscoverySection
from protocol.capability import EnvReport, GpuInfo
from tests.cluster import Cluster, local_cluster

GIB = 2**30


class FakeClock:
    """Injected wall clock in ms; tests move it instead of sleeping."""

    def __init__(self) -> None:
        self.now_ms = int(time.time() * 1000)

    def __call__(self) -> int:
        return self.now_ms

    def advance(self, seconds: float) -> None:
        self.now_ms += int(seconds * 1000)


def make_env(gpu_gib: Sequence[int] = (), tflops: float = 1.0) -> EnvReport:
    gpus = tuple(GpuInfo(f"Test GPU {g}GB", g * GIB, g * GIB, "8.0") for g in gpu_gib)
    return EnvReport(os="Linux-test", python="3.11.7", torch="2.13.0", cuda="12.4" if gpus else "",
                     gpus=gpus, cpu_cores=2, ram_bytes=24 * GIB, disk_free_bytes=100 * GIB,
                     tflops=tflops, tflops_dtype="bf16" if gpus else "fp32",
                     tflops_device="cuda" if gpus else "cpu")


def node_cluster(
    tmp_path: Path, envs: Sequence[EnvReport], clock: FakeClock, *,
    config: DiscoverySection | None = None, start: int | None = None,
) -> AbstractAsyncContextManager[Cluster]:
    """A local cluster with test defaults: no refresh during a test, 5 s query deadline,
    failed publish steps retried after 2 s. Only the first ``start`` nodes start."""
    config = config or DiscoverySection(refresh_interval_s=3600, record_ttl_s=7200,
                                        query_timeout_s=5, retry_interval_s=2)
    return local_cluster(tmp_path, envs, clock, config, start=start)


async def wait_until(predicate, timeout: float, interval: float = 0.05) -> None:  # type: ignore[no-untyped-def]
    """Poll an async predicate until true; fail after ``timeout``. Used for convergence of
    eventually-consistent network state (DHT replication), never as a fixed sleep."""
    with trio.fail_after(timeout):
        while not await predicate():
            await trio.sleep(interval)


def iollm(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run the CLI as a user would, in a child process; AssertionError (with its output)
    when ``check`` and it fails."""
    proc = subprocess.run([sys.executable, "-m", "node.cli", *args], capture_output=True,
                          text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"iollm {' '.join(args)} failed ({proc.returncode}):\n"
                             f"{proc.stdout}\n{proc.stderr}")
    return proc
