"""The daemon's local control API: JSON over HTTP/1.1 on a loopback address.

Server: h11 (sans-IO HTTP) over trio TCP streams, one task per connection, keep-alive,
timeouts as cancel scopes at the IO edge. Handlers are plain async functions in a route
table keyed by ``(method, path)``; a handler returns a JSON-able value (sent as 200) or
raises `ApiError`. Every request, ``/metrics`` included, needs
``Authorization: Bearer <token>``; the token lives in a 0600 file in the node home (like a
cookie file), written by `write_token_file` and read by the CLI with `read_token_file`.
Two exceptions, both for the browser dashboard (node/api/dashboard.py): a `Public` route
(its one-time login link) checks its caller itself, and a `SessionAuth` given to
`serve_api` may let a request in on a session cookie instead; a handler may answer a
`Reply` (a page, a script) instead of JSON.

Prometheus scrapes ``/metrics`` with the same token (``authorization`` defaults to the
Bearer type)::

    scrape_configs:
      - job_name: iollm
        authorization:
          credentials_file: /home/me/.iollm/api.token
        static_configs: [{targets: ["127.0.0.1:8765"]}]

Client: `api_request` in node/api/client.py, synchronous and standard-library only, so
that the CLI starts without loading trio (re-exported here).

Errors at start: a non-loopback ``host`` raises ValueError; a port already in use raises
OSError with ``errno == errno.EADDRINUSE`` (from trio.open_tcp_listeners), which the
daemon turns into one line.
"""

from __future__ import annotations

import contextlib
import hmac
import ipaddress
import json
import logging
import os
import secrets
from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import parse_qs, unquote, urlsplit

import h11
import prometheus_client
import trio

from node.api.client import ApiClientError, api_request, read_token_file
from node.errors import Busy, NodeError
from protocol.errors import ProtocolError

__all__ = [
    "DEFAULT_IDLE_TIMEOUT_S",
    "DEFAULT_MAX_CONNECTIONS",
    "DEFAULT_REQUEST_TIMEOUT_S",
    "MAX_BODY_BYTES",
    "METRICS_PATH",
    "ApiClientError",
    "ApiError",
    "Gated",
    "Handler",
    "Public",
    "Reply",
    "Request",
    "Routes",
    "SessionAuth",
    "api_request",
    "generate_token",
    "read_token_file",
    "serve_api",
    "write_token_file",
]

log = logging.getLogger(__name__)

METRICS_PATH = "/metrics"
MAX_BODY_BYTES = 1 << 20  # 1 MiB: control messages only, bulk data goes peer to peer
MAX_HEAD_BYTES = 16 * 1024  # request line + headers; h11 answers 431 beyond
RECEIVE_CHUNK = 64 * 1024
DEFAULT_REQUEST_TIMEOUT_S = 10.0  # from the first byte of a request to its last
DEFAULT_IDLE_TIMEOUT_S = 60.0  # a keep-alive connection waiting for its next request
DEFAULT_MAX_CONNECTIONS = 64  # further clients wait in the kernel's accept backlog
CLOSE_LINGER_S = 2.0  # after an early response: drain what the client still sends

JSON_TYPE = "application/json"
AUTH_ERROR = "missing or bad bearer token"


@dataclass(frozen=True)
class Request:
    """One API request as a handler sees it."""

    method: str  # upper case, e.g. "GET"
    path: str  # percent-decoded, without the query
    query: dict[str, str]  # last value wins for repeated names
    body: Any  # the decoded JSON body, or None when there was no body


Handler = Callable[[Request], Awaitable[Any]]
Routes = dict[tuple[str, str], Handler]  # (method, path) -> handler; exact path match


@dataclass(frozen=True)
class Gated:
    """A handler behind a gate that the server runs on the request's head, before it
    reads the body: a NodeError from ``gate`` is the answer (and the connection closes,
    its body unread). For load the node cannot take, refusing must cost less than
    taking: a refused megabyte is not parsed (only drained before the close)."""

    handler: Handler
    gate: Callable[[], None]

    async def __call__(self, request: Request) -> Any:
        return await self.handler(request)


@dataclass(frozen=True)
class Public:
    """A handler served without the bearer token or a session: it checks its caller
    itself (the dashboard's one-time login link, node/api/dashboard.py)."""

    handler: Handler

    async def __call__(self, request: Request) -> Any:
        return await self.handler(request)


@dataclass(frozen=True)
class Reply:
    """What a handler returns for an answer that is not JSON (a page, a script, a
    redirect): sent as it is."""

    status: int
    body: bytes
    content_type: str
    headers: tuple[tuple[str, str], ...] = ()


class SessionAuth(Protocol):
    """A second way in besides the bearer token: the browser's session cookie (and, for
    a request that changes state, its CSRF token). Decides from the request's head."""

    def allows(self, method: str, headers: Sequence[tuple[bytes, bytes]]) -> bool: ...

    def refusal(self, path: str) -> Reply | None:
        """What a browser is shown at `path` when it is let in neither way (None: the
        usual JSON 401)."""


class ApiError(NodeError):
    """Raised by a handler to answer `status` with ``{"error": message}``: what is wrong
    with the request itself (a missing field, a bad parameter). A service's own errors
    are NodeErrors with their status already (node/errors.py)."""

    def __init__(self, status: int, message: str) -> None:
        if not 400 <= status <= 599:
            raise ValueError(f"ApiError status must be 4xx or 5xx, not {status}")
        super().__init__(message)
        self.status = status
        self.message = message


# -- token file --------------------------------------------------------------------------


def generate_token() -> str:
    return secrets.token_urlsafe(32)


def write_token_file(path: str | os.PathLike[str], token: str | None = None) -> str:
    """Atomically (re)place the token file at `path` with mode 0600; return the token.

    The bytes go to a fresh temporary file created 0600 with O_EXCL in the same directory,
    then renamed over `path`: no reader ever sees a partial or world-readable token.
    """
    token = generate_token() if token is None else token
    _check_token(token)
    target = Path(path)
    tmp = target.with_name(f".{target.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.fchmod(fd, 0o600)  # the umask may have taken bits away; set it exactly
        os.write(fd, (token + "\n").encode("ascii"))
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    try:
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return token


def _check_token(token: str) -> None:
    if not token or not token.isascii() or any(c.isspace() for c in token):
        raise ValueError("the API token must be non-empty printable ASCII without spaces")


# -- server ------------------------------------------------------------------------------


@dataclass
class _Response:
    status: int
    body: bytes
    content_type: str = JSON_TYPE
    headers: list[tuple[str, str]] = field(default_factory=list)
    close: bool = False  # close the connection after sending


def _json_response(status: int, value: Any, **kwargs: Any) -> _Response:
    body = json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return _Response(status, body.encode("utf-8"), **kwargs)


def _error(status: int, message: str, **kwargs: Any) -> _Response:
    return _json_response(status, {"error": message}, **kwargs)


def _route_path(target: str) -> str:
    """The path a route is found by: percent-decoded, without the query."""
    return unquote(urlsplit(target).path)


def _node_error(exc: NodeError) -> _Response:
    """Every status of the node's errors is chosen here (node/errors.py)."""
    if isinstance(exc, Busy) and exc.retry_after_s is not None:
        return _error(exc.status, str(exc), headers=[("Retry-After", str(exc.retry_after_s))])
    return _error(exc.status, str(exc))


@dataclass
class _Server:
    routes: Routes
    token: bytes
    registry: prometheus_client.CollectorRegistry
    request_timeout: float
    idle_timeout: float
    sessions: SessionAuth | None = None

    # -- decisions (no IO) -----------------------------------------------------------

    def check_head(self, request: h11.Request) -> _Response | None:
        """An early answer decided from the head alone (before reading any body)."""
        # h11 enforces MAX_HEAD_BYTES only on a head that arrives in several reads.
        head_size = len(request.target) + sum(len(k) + len(v) + 4 for k, v in request.headers)
        if head_size > MAX_HEAD_BYTES:
            return _error(431, "request head too large", close=True)
        method = request.method.decode("ascii").upper()
        path = _route_path(request.target.decode("ascii", errors="replace"))
        route = self.routes.get((method, path))
        if not isinstance(route, Public) and not self._authorized(method, request.headers):
            page = self.sessions.refusal(path) if self.sessions is not None else None
            if page is not None:
                return _Response(401, page.body, page.content_type, list(page.headers),
                                 close=True)
            return _error(401, AUTH_ERROR, headers=[("WWW-Authenticate", "Bearer")], close=True)
        length = next((v for k, v in request.headers if k == b"content-length"), None)
        if length is not None and int(length) > MAX_BODY_BYTES:  # h11 checked it is a number
            return _body_too_large()
        if isinstance(route, Gated):
            try:
                route.gate()
            except NodeError as exc:
                response = _node_error(exc)
                response.close = True
                return response
        return None

    def _authorized(self, method: str, headers: Sequence[tuple[bytes, bytes]]) -> bool:
        auth = next((v for k, v in headers if k == b"authorization"), b"")
        scheme, _, credentials = auth.strip().partition(b" ")
        if scheme.lower() == b"bearer" and hmac.compare_digest(credentials.strip(), self.token):
            return True
        return self.sessions is not None and self.sessions.allows(method, headers)

    async def dispatch(self, method: str, target: str, body: bytes) -> _Response:
        url = urlsplit(target)
        path = _route_path(target)
        if path == METRICS_PATH:
            if method != "GET":
                return _error(405, "method not allowed", headers=[("Allow", "GET")])
            # Collecting runs every collector in this task: cheap for counters and gauges.
            return _Response(
                200,
                prometheus_client.generate_latest(self.registry),
                content_type=prometheus_client.CONTENT_TYPE_LATEST,
            )
        handler = self.routes.get((method, path))
        if handler is None:
            allowed = sorted(m for (m, p) in self.routes if p == path)
            if not allowed:
                return _error(404, f"no such path: {path}")
            return _error(405, "method not allowed", headers=[("Allow", ", ".join(allowed))])
        try:
            value = json.loads(body) if body else None
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            return _error(400, f"invalid JSON body: {exc}")
        query = {k: v[-1] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
        try:
            answer = await handler(Request(method, path, query, value))
            if isinstance(answer, Reply):
                return _Response(answer.status, answer.body, answer.content_type,
                                 list(answer.headers))
            return _json_response(200, answer)
        except NodeError as exc:
            return _node_error(exc)
        except ProtocolError as exc:  # input that does not check
            return _error(400, str(exc))
        except Exception:
            # The traceback stays in the log: it may name files, keys or peers.
            log.exception("API handler for %s %s failed", method, path)
            return _error(500, "internal error")

    # -- IO --------------------------------------------------------------------------

    async def serve_connection(self, stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_BYTES)
        responded = False
        try:
            while True:
                if responded and not await _wait_for_next_request(stream, conn, self.idle_timeout):
                    return  # keep-alive connection idle too long, or closed by the client
                with trio.move_on_after(self.request_timeout) as receiving:
                    received = await self._receive_request(stream, conn)
                if receiving.cancelled_caught:
                    log.debug("API client too slow to send its request: dropped")
                    return
                if received is None:
                    return  # clean close between requests
                if isinstance(received, _Response):
                    response = received
                else:
                    response = await self.dispatch(*received)
                with trio.move_on_after(self.request_timeout) as sending:
                    await _send_response(stream, conn, response)
                if sending.cancelled_caught:
                    log.debug("API client too slow to read its response: dropped")
                    return
                responded = True
                if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                    await _linger_and_close(stream)
                    return
                conn.start_next_cycle()
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            log.debug("API client went away: %r", exc)
        except Exception:
            log.exception("API connection failed")
        finally:
            await stream.aclose()

    async def _receive_request(
        self, stream: trio.SocketStream, conn: h11.Connection
    ) -> tuple[str, str, bytes] | _Response | None:
        """(method, target, body), an early response, or None if the client closed."""
        try:
            head = await _next_event(stream, conn)
            if isinstance(head, h11.ConnectionClosed):
                return None
            assert isinstance(head, h11.Request), head
            early = self.check_head(head)
            if early is not None:
                return early
            body = bytearray()
            while True:
                event = await _next_event(stream, conn)
                if isinstance(event, h11.EndOfMessage):
                    break
                if isinstance(event, h11.ConnectionClosed):
                    return None  # gave up half-way through its body
                assert isinstance(event, h11.Data), event
                body += event.data
                if len(body) > MAX_BODY_BYTES:  # chunked bodies have no length up front
                    return _body_too_large()
        except h11.RemoteProtocolError as exc:
            if conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
                raise
            return _error(exc.error_status_hint, f"bad HTTP request: {exc}", close=True)
        method = head.method.decode("ascii").upper()
        return method, head.target.decode("ascii", errors="replace"), bytes(body)


def _body_too_large() -> _Response:
    return _error(413, f"request body over {MAX_BODY_BYTES} bytes", close=True)


async def _next_event(stream: trio.SocketStream, conn: h11.Connection) -> Any:
    """The next h11 event, reading from `stream` as needed (no timeout of its own)."""
    while True:
        event = conn.next_event()
        if event is not h11.NEED_DATA:
            return event
        if conn.they_are_waiting_for_100_continue:
            await stream.send_all(conn.send(h11.InformationalResponse(status_code=100, headers=[])))
        conn.receive_data(await stream.receive_some(RECEIVE_CHUNK))


async def _wait_for_next_request(
    stream: trio.SocketStream, conn: h11.Connection, idle_timeout: float
) -> bool:
    """On a keep-alive connection, wait up to `idle_timeout` for the next request to start.

    False if the client closed or stayed silent; the request itself then gets the full
    request timeout from its first byte.
    """
    if conn.trailing_data[0]:
        return True  # pipelined: already buffered
    with trio.move_on_after(idle_timeout):
        data = await stream.receive_some(RECEIVE_CHUNK)
        conn.receive_data(data)
        return bool(data)
    log.debug("API keep-alive connection idle for %g s: closed", idle_timeout)
    return False


async def _send_response(
    stream: trio.SocketStream, conn: h11.Connection, response: _Response
) -> None:
    headers = [
        ("Content-Type", response.content_type),
        ("Content-Length", str(len(response.body))),
        ("Cache-Control", "no-store"),
        *response.headers,
    ]
    if response.close:
        headers.append(("Connection", "close"))  # h11 then moves to MUST_CLOSE
    try:
        reason = HTTPStatus(response.status).phrase.encode("ascii")
    except ValueError:
        reason = b""
    data = conn.send(h11.Response(status_code=response.status, headers=headers, reason=reason))
    data += conn.send(h11.Data(data=response.body))
    data += conn.send(h11.EndOfMessage())
    await stream.send_all(data)


async def _linger_and_close(stream: trio.SocketStream) -> None:
    """Close after a response, without losing it.

    Closing a socket with unread input makes the kernel send a reset, which can destroy
    the response before the client reads it (e.g. a 413 while the client still uploads).
    So: half-close, then read and discard until the client closes, for a bounded time.
    """
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        await stream.send_eof()
        with trio.move_on_after(CLOSE_LINGER_S):
            while await stream.receive_some(RECEIVE_CHUNK):
                pass


def _check_loopback(host: str) -> str:
    if host == "localhost":
        return "127.0.0.1"  # one address, so port 0 means one port
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"API host must be a loopback IP address, not {host!r}") from None
    if not address.is_loopback:
        raise ValueError(
            f"API host {host} is not a loopback address: the control API is local-only"
        )
    return host


async def serve_api(
    routes: Routes,
    token: str,
    registry: prometheus_client.CollectorRegistry,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    request_timeout: float = DEFAULT_REQUEST_TIMEOUT_S,
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT_S,
    max_connections: int = DEFAULT_MAX_CONNECTIONS,
    sessions: SessionAuth | None = None,
    task_status: Any = trio.TASK_STATUS_IGNORED,  # trio.TaskStatus[int]
) -> None:
    """Serve the API until cancelled; ``task_status.started(port)`` once listening.

    ``port = await nursery.start(serve_api, routes, token, registry)``. Raises ValueError
    for a non-loopback `host` or a ``/metrics`` route (that path is built in), and
    OSError (errno EADDRINUSE) if `port` is taken. `sessions`, when given, lets a
    request in on a browser session instead of the bearer token (the dashboard).
    """
    _check_token(token)
    host = _check_loopback(host)
    for method, path in routes:
        if path == METRICS_PATH:
            raise ValueError(f"{method} {path}: {METRICS_PATH} is served by serve_api itself")
    server = _Server(
        routes=dict(routes),
        token=token.encode("ascii"),
        registry=registry,
        request_timeout=request_timeout,
        idle_timeout=idle_timeout,
        sessions=sessions,
    )
    listeners = await trio.open_tcp_listeners(port, host=host)
    slots = trio.Semaphore(max_connections)

    async def handle(stream: trio.SocketStream) -> None:
        try:
            await server.serve_connection(stream)
        finally:
            slots.release()

    async def accept_loop(listener: trio.SocketListener, nursery: trio.Nursery) -> None:
        while True:
            await slots.acquire()  # at the limit, stop accepting until a slot frees
            try:
                stream = await listener.accept()
            except BaseException:
                slots.release()
                raise
            nursery.start_soon(handle, stream)

    try:
        async with trio.open_nursery() as nursery:
            for listener in listeners:
                nursery.start_soon(accept_loop, listener, nursery)
            actual_port = listeners[0].socket.getsockname()[1]
            log.info("API listening on http://%s:%d", host, actual_port)
            task_status.started(actual_port)
    finally:
        with trio.CancelScope(shield=True):
            for listener in listeners:
                await listener.aclose()


def body_fields(request: Request, required: Collection[str],
                optional: Collection[str] = ()) -> dict[str, Any]:
    """The request's JSON object, with every required field and no unknown one (400
    naming the first missing or unknown field otherwise)."""
    body = request.body
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object")
    if missing := sorted(set(required) - body.keys()):
        raise ApiError(400, f"{missing[0]}: missing")
    if unknown := sorted(body.keys() - set(required) - set(optional)):
        raise ApiError(400, f"{unknown[0]}: unknown field")
    return body


def text_field(value: Any, name: str) -> str:
    if not isinstance(value, str) or not value:
        raise ApiError(400, f"{name}: expected a non-empty string, got {json.dumps(value)[:60]}")
    return value
