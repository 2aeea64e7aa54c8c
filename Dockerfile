# One image for every iollm container (docker-compose.yml): the CLI and the daemon.
#
#   docker build -t iollm .                                      # CPU torch (default)
#   docker build -t iollm:cuda \
#       --build-arg BASE_IMAGE=nvidia/cuda:12.4.1-cudnn-runtime-ubuntu24.04 \
#       --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu124 .
#
# The install is scripts/setup.sh, the same steps as a fresh checkout (README, "Two
# commands"): a virtual environment, torch 2.13.0 first, then the project. TORCH_INDEX is
# where pip finds that torch: the CPU build by default, a CUDA build with a CUDA base.
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu

# fastecdsa (a py-libp2p dependency) compiles against libgmp (README, "Two commands");
# a base image without Python 3.11+ (the CUDA ones) gets its distribution's.
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential python3-dev libgmp-dev \
    && if ! command -v python3 >/dev/null || ! python3 -m venv --help >/dev/null 2>&1; then \
           apt-get install -y --no-install-recommends python3 python3-venv; fi \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/iollm
COPY pyproject.toml README.md ./
COPY protocol protocol
COPY node node
COPY bootstrap bootstrap
COPY scripts scripts
RUN PIP_EXTRA_INDEX_URL=${TORCH_INDEX} PIP_NO_CACHE_DIR=1 bash scripts/setup.sh

ENV PATH=/opt/iollm/.venv/bin:$PATH \
    IOLLM_HOME=/iollm/node
EXPOSE 4001
CMD ["iollm", "--help"]
