#!/usr/bin/env bash
# The GPU check, for a machine with an NVIDIA GPU (bench/gpu_check.py says what it runs):
# the probe, the bf16 path, the automatic micro-batch, a short training task of a ~125M
# Llama on CUDA (tokens per second and MFU), and CPU-vs-GPU loss parity on the tiny Llama.
#
#   bash scripts/gpu-check.sh [--steps N] [--compile] [--json OUT]
#
# It needs a CUDA build of torch in .venv: scripts/setup.sh installs the CPU build, so on a
# GPU machine first run
#   .venv/bin/python -m pip install --force-reinstall torch==2.13.0 \
#       --index-url https://download.pytorch.org/whl/cu128
# Without a CUDA device it says so in one line and exits 2 (nothing is measured).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/setup.sh
if ! command -v nvidia-smi >/dev/null 2>&1; then
    echo "gpu-check: nvidia-smi not found: this machine has no NVIDIA driver" >&2
    exit 2
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >&2 || true
exec .venv/bin/python bench/gpu_check.py "$@"
