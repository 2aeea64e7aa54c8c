#!/usr/bin/env bash
# Set up (if needed) and run the default test suite. Extra arguments go to pytest,
# e.g. `bash scripts/test.sh -m slow` for the long runs.
source "$(dirname "$0")/setup.sh"
exec python -m pytest -p no:cacheprovider "$@"
