"""What every command group of ``iollm`` shares: the one-line error, the node home, the
API call to the running node, argument types and the formats of times and peer ids.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from node.config import RUNTIME_FILE, TOKEN_FILE, default_home

SHORT = 12  # hex digits of a version shown in tables (SMIP's short form)


class CliError(Exception):
    """A user-facing failure: printed as one line, exit code 1."""


def home_of(args: argparse.Namespace) -> Path:
    """The node home, absolute: a daemon started on a relative one (``--home
    testnet/node-1``, ``IOLLM_HOME=testnet/node-1``) hands paths under it to child
    processes, which take absolute paths only."""
    return (Path(args.home).expanduser() if args.home else default_home()).absolute()


def call_node(args: argparse.Namespace, path: str, method: str = "GET", body: Any = None) -> Any:
    """Call the running node's API; any failure becomes a one-line CliError."""
    from node.api.client import ApiClientError, api_request, read_token_file

    home = home_of(args)
    runtime = home / RUNTIME_FILE
    try:
        info = json.loads(runtime.read_text())
        base = info["api"]
    except FileNotFoundError:
        raise CliError(f"no node is running with home {home} (start one: iollm node start)"
                       ) from None
    except (ValueError, KeyError):
        raise CliError(f"{runtime} is damaged; restart the node") from None
    try:
        token = read_token_file(home / TOKEN_FILE)
    except OSError as exc:
        raise CliError(f"cannot read the API token: {exc}") from None
    try:
        if netns := info.get("netns"):  # a host of a namespace testnet (node/testnet)
            from node.testnet.netns import run_in_netns

            return run_in_netns(netns, api_request, base, token, method, path, body,
                                args.timeout)
        return api_request(base, token, method, path, body, timeout=args.timeout)
    except ApiClientError as exc:
        raise CliError(explain_api_error(exc, home, path)) from None
    except OSError as exc:  # the namespace is gone, or we may not enter it (not root)
        raise CliError(f"cannot reach the node in namespace {info.get('netns')}: {exc}"
                       ) from None


def explain_api_error(exc: Any, home: Path, path: str) -> str:
    """The line a user reads for a failed API call: the node's own message says what was
    wrong with the request; where it can only name the transport, say what it means."""
    route = path.split("?")[0]
    if exc.status == 401:
        return (f"the node refused the API token in {home / TOKEN_FILE} (was the home "
                f"initialised again after the node started? restart the node)")
    if exc.status == 404 and exc.message.startswith("no such path"):
        return f"the running node has no {route}: it runs an older iollm than this command"
    if exc.status == 500:
        return (f"the node failed on {route} (a bug: its log has the traceback; please "
                f"report it)")
    return str(exc)


def int_arg(lo: int, hi: int, what: str) -> Callable[[str], int]:
    """An argparse ``type``: a whole number in [lo, hi], else an error naming ``what``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = lo - 1
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
        return value

    return parse


def nonnegative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a non-negative number")
    return value


def when(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def named(row: dict[str, Any] | None, width: int = 0) -> str:
    """A node's name (its capability record's, as the API gives it) and two spaces, to
    follow its peer id; padded to ``width``; "" when it has none."""
    name = (row or {}).get("name") or ""
    return f"{name:<{width}}  " if name or width else ""


def short_peer(peer_id: str) -> str:
    return peer_id if len(peer_id) <= 20 else f"{peer_id[:10]}…{peer_id[-6:]}"
