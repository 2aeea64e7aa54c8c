"""Capability records: what a node offers (its environment probe), signed and expiring.

See specs/capability.md. This module is pure: it validates and decides, given ``now``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class GpuInfo:
    name: str
    total_memory_bytes: int
    free_memory_bytes: int
    compute_capability: str  # "8.0"; "" where unknown


@dataclass(frozen=True)
class EnvReport:
    """Result of the environment probe (``iollm env``), the body of a capability record."""

    os: str
    python: str
    torch: str  # "" when torch is not importable
    cuda: str  # "" when no CUDA runtime
    gpus: tuple[GpuInfo, ...]
    cpu_cores: int
    ram_bytes: int
    disk_free_bytes: int
    tflops: float  # measured matmul throughput
    tflops_dtype: str  # "fp32" on CPU, "bf16" on GPU
    tflops_device: str  # "cpu" or "cuda"

    def to_dict(self) -> dict[str, Any]:
        raise NotImplementedError  # filled in with the record codec

    @property
    def total_gpu_memory_bytes(self) -> int:
        return sum(g.total_memory_bytes for g in self.gpus)

    @property
    def max_gpu_memory_bytes(self) -> int:
        return max((g.total_memory_bytes for g in self.gpus), default=0)
