"""The client side of the local API: `api_request` and the token file reader.

Standard library only, on purpose: every ``iollm`` command that talks to a running node
imports this, and a CLI call should cost well under 0.3 s before it does anything
(trio, h11 and prometheus_client, which the server needs, cost about half a second to
import). tests/test_cli_startup.py checks that no daemon-side module comes in with it.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

__all__ = ["ApiClientError", "api_request", "read_token_file"]

JSON_TYPE = "application/json"


class ApiClientError(Exception):
    """A non-2xx answer (`status`, the server's error message), or status 0: no answer.

    ``str()`` is the message alone: the server's message says what is wrong with the
    request, and the HTTP status only says how it travelled (`status` keeps it for code).
    """

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message

    def __str__(self) -> str:
        return self.message


def read_token_file(path: str | os.PathLike[str]) -> str:
    """The token in `path`. FileNotFoundError if the node never started in that home."""
    token = Path(path).read_text(encoding="ascii").strip()
    if not token:
        raise ValueError(f"API token file {os.fspath(path)} is empty")
    return token


def _no_message(status: int, reason: str, method: str, path: str) -> str:
    """What a non-2xx answer without the server's own message means to a user."""
    if status == 401:
        return "the node refused the API token (is this the token of that node's home?)"
    if status == 404:
        return (f"the node has no {path.split('?')[0]} (is it an older iollm than this "
                f"command?)")
    return f"the node could not {method} {path.split('?')[0]}: {reason or 'error'}"


def api_request(
    base_url: str,
    token: str,
    method: str,
    path: str,
    body: Any = None,
    timeout: float = 30.0,
) -> Any:
    """Call the node's API: `body` (if not None) is sent as JSON; returns the decoded JSON
    answer (text for non-JSON answers such as ``/metrics``).

    Raises ApiClientError(status, server's message) on a non-2xx answer, and
    ApiClientError(0, ...) when the node cannot be reached or does not answer in time.
    No proxies.
    """
    url = urlsplit(base_url)
    if url.scheme != "http" or not url.hostname:
        raise ValueError(f"API base URL must look like http://127.0.0.1:PORT, not {base_url!r}")
    headers = {"Authorization": f"Bearer {token}", "Accept": JSON_TYPE}
    data = None
    if body is not None:
        data = json.dumps(body, separators=(",", ":")).encode("utf-8")
        headers["Content-Type"] = JSON_TYPE
    conn = http.client.HTTPConnection(url.hostname, url.port or 80, timeout=timeout)
    try:
        try:
            conn.connect()
        except OSError:  # refused, unreachable, timed out, unknown host
            raise ApiClientError(
                0, f"cannot reach the node at {base_url}: is it running? (iollm node start)"
            ) from None
        try:
            conn.request(method, path, body=data, headers=headers)
            response = conn.getresponse()
            raw = response.read()
        except TimeoutError:
            raise ApiClientError(
                0, f"the node at {base_url} did not answer {method} {path} within {timeout:g} s"
            ) from None
        except (OSError, http.client.HTTPException) as exc:
            raise ApiClientError(
                0, f"connection to the node at {base_url} failed during {method} {path}: {exc}"
            ) from None
    finally:
        conn.close()
    content_type = response.getheader("Content-Type", "")
    is_json = content_type.split(";")[0].strip() == JSON_TYPE
    if 200 <= response.status < 300:
        if not is_json:
            return raw.decode("utf-8", errors="replace")
        return json.loads(raw) if raw else None
    message = ""
    if is_json:
        with contextlib.suppress(ValueError):
            decoded = json.loads(raw)
            if isinstance(decoded, dict) and isinstance(decoded.get("error"), str):
                message = decoded["error"]
    raise ApiClientError(response.status, message
                         or _no_message(response.status, response.reason, method, path))
