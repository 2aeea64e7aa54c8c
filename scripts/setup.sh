# Sourced by scripts/demo.sh and scripts/test.sh: create .venv and install the project.
# torch is installed first and pinned: a bare torch requirement would pull a multi-GB
# CUDA build, while 2.13.0 (CPU) installs from the local wheel cache in seconds.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    echo "== creating .venv"
    "$PYTHON" -m venv .venv
fi
stamp=.venv/.iollm-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    # pip's own lines, one per package it collects, are the progress of a set-up that
    # takes a minute or two; the rest of its chatter is left out.
    progress() { grep --line-buffered -E "^(Collecting|Successfully installed)" \
        | cut -c1-100 | sed -u 's/^/   /' || true; }
    echo "== installing torch==2.13.0 (CPU)"
    .venv/bin/python -m pip install --disable-pip-version-check torch==2.13.0 2>&1 | progress || true
    echo "== installing iollm (editable, with test extras) and its dependencies"
    .venv/bin/python -m pip install --disable-pip-version-check -e '.[dev]' 2>&1 | progress || true
    .venv/bin/python -c "import torch, libp2p, node, protocol" || {
        echo "setup failed: the imports above did not work" >&2; exit 1; }
    touch "$stamp"
fi
# System packages some tests need, installed as root when missing (elsewhere those tests
# say they were skipped): Debian's chromium for the dashboard's browser tests (Playwright
# downloads no browser here), iptables for the NAT of the namespace testnet (--nat).
missing=""
[ -x /usr/bin/chromium ] || missing="$missing chromium"
command -v iptables >/dev/null || [ -x /usr/sbin/iptables ] || missing="$missing iptables"
if [ -n "$missing" ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "== installing$missing (apt) for the browser and NAT tests"
    { apt-get update -qq \
        && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing; } >/dev/null 2>&1 \
        || echo "warning: could not install$missing; the tests needing them will fail" >&2
fi
export PATH="$PWD/.venv/bin:$PATH"
