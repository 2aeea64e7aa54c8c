#!/usr/bin/env bash
# Set up (if needed), check types and lint, then run the default test suite. Extra
# arguments go to pytest, e.g. `bash scripts/test.sh -m slow` for the long runs.
source "$(dirname "$0")/setup.sh"
echo "== ruff check"
python -m ruff check --quiet .
echo "== mypy (strict on protocol/, default on node/; pyproject.toml [tool.mypy])"
python -m mypy --no-error-summary
echo "== pytest"
exec python -m pytest -p no:cacheprovider "$@"
