"""How the daemon ends: one clear line for errors that must stop it (node/cli/app.py)."""

from __future__ import annotations

import errno
import logging
import sqlite3
from pathlib import Path

import pytest
import trio

from node.cli.app import fatal_reason
from node.identity import IdentityError
from tests.netutil import iollm


def _raised_in_nursery(exc: BaseException) -> BaseException:
    """``exc`` as the daemon's nursery tree delivers it: wrapped in exception groups, with
    a sibling service cancelled beside it."""

    async def failing() -> None:
        raise exc

    async def main() -> None:
        async with trio.open_nursery() as outer:
            outer.start_soon(trio.sleep_forever)
            async with trio.open_nursery() as inner:
                inner.start_soon(failing)

    try:
        trio.run(main)
    except BaseException as caught:
        return caught
    raise AssertionError("the nursery did not raise")


def test_a_failing_disk_is_one_line() -> None:
    wrapped = _raised_in_nursery(OSError(errno.EIO, "Input/output error", "/home/x/state.db"))
    assert isinstance(wrapped, BaseExceptionGroup)
    assert fatal_reason(wrapped) == ("the node stopped: [Errno 5] Input/output error: "
                                     "'/home/x/state.db'")
    database = _raised_in_nursery(sqlite3.OperationalError("disk I/O error"))
    assert fatal_reason(database) == ("the node stopped: its state database failed: "
                                      "disk I/O error")


def test_a_user_error_is_stated_as_it_is() -> None:
    wrapped = _raised_in_nursery(IdentityError("node.key: not an Ed25519 key"))
    assert fatal_reason(wrapped) == "node.key: not an Ed25519 key"


def test_a_bug_logs_its_traceback_then_one_line(caplog: pytest.LogCaptureFixture) -> None:
    wrapped = _raised_in_nursery(KeyError("lost"))
    with caplog.at_level(logging.ERROR, logger="node"):
        line = fatal_reason(wrapped)
    assert line.startswith("the node stopped on an unexpected error: KeyError: 'lost'")
    assert "\n" not in line
    assert caplog.records[-1].exc_info is not None  # the traceback, for the report


def test_an_unreadable_key_exits_with_one_line(tmp_path: Path) -> None:
    home = tmp_path / "home"
    iollm("init", "--home", str(home))
    (home / "node.key").write_bytes(b"\x00garbage")
    proc = iollm("node", "start", "--home", str(home), "--listen", "/ip4/127.0.0.1/tcp/0",
                 check=False, timeout=60)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("iollm: error:")]
    assert len(errors) == 1 and "node.key" in errors[0], proc.stderr


def test_the_systemd_unit_starts_a_real_command() -> None:
    """bootstrap/iollm.service: restarted on failure, and its ExecStart parses with the
    CLI's own parser as ``node start`` (a renamed flag would break every install)."""
    import configparser
    import shlex

    from node.cli.app import build_parser

    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read(Path(__file__).parent.parent / "bootstrap" / "iollm.service")
    service = unit["Service"]
    assert service["Restart"] == "on-failure"
    argv = shlex.split(service["ExecStart"])
    assert Path(argv[0]).name == "iollm"
    args = build_parser().parse_args(argv[1:])
    assert (args.command, args.node_command) == ("node", "start")
    assert args.home == "/var/lib/iollm" and args.home in service["ReadWritePaths"]
