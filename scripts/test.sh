#!/usr/bin/env bash
# Set up (if needed), check types and lint, then run the default test suite and the chaos
# cases (below). Extra arguments go to pytest instead, e.g. `bash scripts/test.sh -m slow`
# for the long runs.
# Tests run in IOLLM_TEST_WORKERS processes (pytest-xdist; default 2, one per core of the
# CI machine): most of the suite's time is multi-node tests waiting on the network, so a
# single process leaves a core idle. IOLLM_TEST_WORKERS=0 runs them in this process.
source "$(dirname "$0")/setup.sh"
echo "== ruff check"
python -m ruff check --quiet .
echo "== mypy (strict on protocol/, default on node/; pyproject.toml [tool.mypy])"
python -m mypy --no-error-summary
echo "== pytest"
workers=${IOLLM_TEST_WORKERS:-2}
pytest_run() {
    if [ "$workers" = 0 ]; then
        python -m pytest -p no:cacheprovider "$@"
    else
        python -m pytest -p no:cacheprovider -n "$workers" --dist worksteal "$@"
    fi
}
if [ $# -gt 0 ]; then
    pytest_run "$@"
    exit
fi
# Without arguments (CI): the default suite, then the chaos cases on the namespace
# testnet (marker "chaos": a worker cut off mid-task, a job and a fetch over lossy
# 100 ms links, a node behind NAT; minutes each, root only: elsewhere they skip).
# IOLLM_CHAOS=0 leaves them out.
pytest_run
if [ "${IOLLM_CHAOS:-1}" != 0 ]; then
    # One at a time: each brings up a testnet (and its relay) of its own, and the
    # throughput and timing they check need the machine's cores to themselves.
    echo "== pytest -m chaos (the namespace testnet, one test at a time; IOLLM_CHAOS=0 skips)"
    workers=0 pytest_run -m chaos
fi
