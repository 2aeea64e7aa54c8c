#!/usr/bin/env bash
# Set up (if needed), check types and lint, then run the default test suite. Extra
# arguments go to pytest, e.g. `bash scripts/test.sh -m slow` for the long runs.
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
if [ "$workers" = 0 ]; then
    exec python -m pytest -p no:cacheprovider "$@"
fi
exec python -m pytest -p no:cacheprovider -n "$workers" --dist worksteal "$@"
