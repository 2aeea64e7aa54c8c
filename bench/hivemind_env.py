"""A virtual environment holding hivemind, the baseline that bench/discovery.py compares with.

hivemind 1.1.12 is installed from the package registry as its manylinux wheel, which ships
the go-libp2p daemon `p2pd` prebuilt (hivemind/hivemind_cli/p2pd): nothing is downloaded or
compiled at install time, so this works on a machine that reaches only package registries.
torch==2.13.0 goes in first: hivemind requires torch, and a bare `torch` requirement would
pull a multi-GB CUDA build, while this pinned version is a local CPU wheel.

The environment is made once and kept: a marker file is written only after every step has
succeeded and been checked, so an interrupted install is redone on the next call.

    python bench/hivemind_env.py [bench/.venv-hivemind]
"""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HIVEMIND_VERSION = "1.1.12"
TORCH_VERSION = "2.13.0"
# psutil lets the worker read the memory of its p2pd children; without it the worker reads
# /proc, so it is installed for convenience, not by necessity.
EXTRA_PACKAGES = ("psutil",)
MARKER_NAME = ".iollm-hivemind-ok"
# pip of a fresh venv, torch from local disk, hivemind and ~30 small deps from the registry.
INSTALL_TIMEOUT_S = 1800.0


class HivemindEnvError(RuntimeError):
    """The hivemind environment could not be created or does not work."""


def _log(msg: str) -> None:
    print(f"[hivemind-env] {msg}", file=sys.stderr, flush=True)


def _venv_python(path: Path) -> Path:
    return path / "bin" / "python"


def _run(cmd: list[str], what: str, timeout_s: float) -> str:
    """Run `cmd`, echoing its output to stderr (stdout stays free for the caller's results).

    Returns the output; raises HivemindEnvError with the output's tail when it fails.
    """
    _log(f"{what}: {' '.join(cmd)}")
    t0 = time.monotonic()
    tail: collections.deque[str] = collections.deque(maxlen=40)
    lines: list[str] = []
    try:
        proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            env={**os.environ, "PIP_PROGRESS_BAR": "off", "PYTHONUNBUFFERED": "1"},
        )
    except OSError as exc:
        raise HivemindEnvError(f"{what} failed to start: {exc}") from exc
    assert proc.stdout is not None
    deadline = t0 + timeout_s
    for line in proc.stdout:
        line = line.rstrip("\n")
        lines.append(line)
        tail.append(line)
        print(f"  {line}", file=sys.stderr, flush=True)
        if time.monotonic() > deadline:
            proc.kill()
            break
    try:
        rc = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        proc.kill()
        rc = proc.wait()
    if time.monotonic() > deadline:
        raise HivemindEnvError(f"{what} took longer than {timeout_s:.0f} s and was stopped")
    if rc != 0:
        raise HivemindEnvError(f"{what} failed (exit {rc}); last output:\n" + "\n".join(tail))
    _log(f"{what}: done in {time.monotonic() - t0:.1f} s")
    return "\n".join(lines)


def _check(python: Path) -> dict[str, str]:
    """Import hivemind in the venv and find its p2pd; return versions and the p2pd path."""
    probe = (
        "import json, os, hivemind, torch;"
        "p = os.path.join(os.path.dirname(hivemind.__file__), 'hivemind_cli', 'p2pd');"
        "print(json.dumps({'hivemind': hivemind.__version__, 'torch': torch.__version__,"
        " 'p2pd': p, 'p2pd_ok': os.path.isfile(p) and os.access(p, os.X_OK)}))"
    )
    out = _run([str(python), "-c", probe], "checking hivemind", timeout_s=300.0)
    try:
        info = json.loads(out.strip().splitlines()[-1])
    except (ValueError, IndexError) as exc:
        raise HivemindEnvError(f"could not read the check's answer: {out!r}") from exc
    if info["hivemind"] != HIVEMIND_VERSION:
        raise HivemindEnvError(f"venv has hivemind {info['hivemind']}, expected {HIVEMIND_VERSION}")
    if not info["p2pd_ok"]:
        raise HivemindEnvError(
            f"hivemind is installed but its go-libp2p daemon is missing or not executable "
            f"at {info['p2pd']}; the wheel for this platform should ship it"
        )
    return {k: str(v) for k, v in info.items()}


def ensure_hivemind_venv(path: Path) -> Path:
    """Make sure `path` is a venv with hivemind 1.1.12 installed and working.

    Creates it when missing, installs torch==2.13.0 then hivemind==1.1.12 (and psutil),
    checks that hivemind imports and that its p2pd binary is present, and writes a marker
    file. Later calls return at once while the marker and the venv's python exist.
    Progress goes to stderr. Returns the venv's python executable (not resolved, so that
    running it uses the venv). Raises HivemindEnvError when any step fails.
    """
    path = Path(path).absolute()
    python = _venv_python(path)
    marker = path / MARKER_NAME
    if marker.is_file() and python.exists():
        return python

    t0 = time.monotonic()
    _log(f"preparing hivemind {HIVEMIND_VERSION} venv at {path}")
    if not python.exists():
        if path.exists() and any(path.iterdir()) and not (path / "pyvenv.cfg").exists():
            raise HivemindEnvError(
                f"{path} exists, is not empty and is not a venv; not touching it"
            )
        # `--clear` empties a venv left half-made by an earlier interrupted attempt.
        _run(
            [sys.executable, "-m", "venv", "--clear", str(path)],
            "creating venv",
            timeout_s=300.0,
        )
        if not python.exists():
            raise HivemindEnvError(f"python -m venv did not create {python}")
    marker.unlink(missing_ok=True)
    pip = [str(python), "-m", "pip", "install", "--disable-pip-version-check"]
    _run([*pip, f"torch=={TORCH_VERSION}"], f"installing torch {TORCH_VERSION}", INSTALL_TIMEOUT_S)
    _run(
        [*pip, f"hivemind=={HIVEMIND_VERSION}", f"torch=={TORCH_VERSION}", *EXTRA_PACKAGES],
        f"installing hivemind {HIVEMIND_VERSION}",
        INSTALL_TIMEOUT_S,
    )
    info = _check(python)
    marker.write_text(json.dumps(info, sort_keys=True) + "\n")
    _log(
        f"ready in {time.monotonic() - t0:.0f} s: hivemind {info['hivemind']}, "
        f"torch {info['torch']}, p2pd at {info['p2pd']}"
    )
    return python


def main(argv: list[str]) -> int:
    target = Path(argv[1]) if len(argv) > 1 else Path(__file__).parent / ".venv-hivemind"
    try:
        python = ensure_hivemind_venv(target)
    except HivemindEnvError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(python)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
