"""node/api/server.py: a real server on 127.0.0.1 port 0, real clients in threads."""

from __future__ import annotations

import errno
import http.client
import logging
import os
import socket
import stat
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any

import prometheus_client
import pytest
import trio

from node.agent.planner import PlannerError
from node.api.server import (
    MAX_BODY_BYTES,
    ApiClientError,
    ApiError,
    Gated,
    Request,
    Routes,
    api_request,
    generate_token,
    read_token_file,
    serve_api,
    write_token_file,
)
from node.chain.service import ChainBusy, ChainError
from node.jobs.coordinator import JobError, UnknownJob
from node.smip.store import NotInStore, QuotaExceeded
from protocol.errors import RemoteProtocolError

TOKEN = generate_token()
DEADLINE_S = 30


async def status(request: Request) -> Any:
    return {"ok": True, "query": request.query}


async def echo(request: Request) -> Any:
    return request.body


async def boom(request: Request) -> Any:
    raise RuntimeError("secret-detail /home/alice/key")


async def teapot(request: Request) -> Any:
    raise ApiError(418, "short and stout")


async def hang(request: Request) -> Any:
    await trio.sleep_forever()


SERVICE_ERRORS: dict[str, Exception] = {
    "/busy": ChainBusy("the chain cannot finalize more in time", retry_after_s=3),
    "/missing": UnknownJob("no job known here starts with 'abcdefgh'"),
    "/conflict": ChainError("this home follows another chain"),
    "/bad-spec": JobError("rounds: expected 1..1000"),
    "/forged": RemoteProtocolError("bad-signature", "the signature does not verify"),
    "/quota": QuotaExceeded(needed=2, quota=1, pinned=1, in_progress=0, held=1),
    "/no-shard": NotInStore("no shard 00ff"),
    "/planner": PlannerError("the planner's answer holds no text"),
}


async def service_error(request: Request) -> Any:
    raise SERVICE_ERRORS[request.path]


ROUTES: Routes = {
    ("GET", "/hang"): hang,
    ("GET", "/status"): status,
    ("POST", "/echo"): echo,
    ("PUT", "/echo"): echo,
    ("GET", "/boom"): boom,
    ("GET", "/teapot"): teapot,
    **{("GET", path): service_error for path in SERVICE_ERRORS},
    ("POST", "/gated"): Gated(echo, lambda: GATE_ERRORS and _raise(GATE_ERRORS[0])),
}
GATE_ERRORS: list[Exception] = []  # what /gated's gate raises, when set


def _raise(exc: Exception) -> None:
    raise exc


def run_with_server(
    body: Callable[[int], Awaitable[None]],
    *,
    registry: prometheus_client.CollectorRegistry | None = None,
    **serve_kwargs: Any,
) -> None:
    """Start serve_api on port 0, run body(port), stop the server; all under a deadline."""
    registry = registry or prometheus_client.CollectorRegistry()

    async def main() -> None:
        with trio.fail_after(DEADLINE_S):
            async with trio.open_nursery() as nursery:
                port = await nursery.start(
                    partial(serve_api, ROUTES, TOKEN, registry, **serve_kwargs)
                )
                await body(port)
                nursery.cancel_scope.cancel()

    trio.run(main)


async def call(port: int, method: str, path: str, body: Any = None, token: str = TOKEN) -> Any:
    return await trio.to_thread.run_sync(
        partial(api_request, f"http://127.0.0.1:{port}", token, method, path, body, timeout=10)
    )


async def call_error(port: int, method: str, path: str, body: Any = None, **kw: Any) -> Any:
    with pytest.raises(ApiClientError) as info:
        await call(port, method, path, body, **kw)
    return info.value


def _raw(
    port: int, method: str, path: str, headers: dict[str, str], body: Any
) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers)
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


async def raw(
    port: int, method: str, path: str, *, headers: dict[str, str] | None = None, body: Any = None
) -> tuple[int, dict[str, str], bytes]:
    """One request with exactly these headers (no token unless given)."""
    return await trio.to_thread.run_sync(_raw, port, method, path, headers or {}, body)


AUTH = {"Authorization": f"Bearer {TOKEN}"}


def test_ok_with_token() -> None:
    async def body(port: int) -> None:
        assert await call(port, "GET", "/status?a=1&b=x%20y") == {
            "ok": True,
            "query": {"a": "1", "b": "x y"},
        }
        payload = {"list": [1, 2.5, None, "é"], "nested": {"t": True}}
        assert await call(port, "POST", "/echo", payload) == payload
        assert await call(port, "POST", "/echo") is None  # no body -> handler sees None

    run_with_server(body)


def test_unauthorized_without_or_with_wrong_token() -> None:
    async def body(port: int) -> None:
        for path in ("/status", "/metrics", "/no-such-path"):
            code, headers, data = await raw(port, "GET", path)
            assert code == 401
            assert headers["www-authenticate"] == "Bearer"
            assert data == b'{"error":"missing or bad bearer token"}'
        for token in ("wrong", TOKEN[:-1], TOKEN + "x", ""):
            error = await call_error(port, "GET", "/status", token=token)
            assert (error.status, error.message) == (401, "missing or bad bearer token")
        code, _, _ = await raw(port, "GET", "/status", headers={"Authorization": TOKEN})
        assert code == 401  # the scheme is required
        code, _, _ = await raw(
            port, "GET", "/status", headers={"Authorization": f"bearer  {TOKEN}"}
        )
        assert code == 200  # scheme is case-insensitive

    run_with_server(body)


def test_not_found_and_method_not_allowed() -> None:
    async def body(port: int) -> None:
        error = await call_error(port, "GET", "/nope")
        assert error.status == 404
        code, headers, _ = await raw(port, "DELETE", "/echo", headers=AUTH)
        assert code == 405
        assert headers["allow"] == "POST, PUT"
        code, headers, _ = await raw(port, "POST", "/metrics", headers=AUTH)
        assert (code, headers["allow"]) == (405, "GET")

    run_with_server(body)


def test_bad_json_body() -> None:
    async def body(port: int) -> None:
        for bad in (b"{not json", b"\xff\xfe\x00garbage", b'{"a": 1} trailing'):
            code, _, data = await raw(port, "POST", "/echo", headers=AUTH, body=bad)
            assert code == 400, bad
            assert b"invalid JSON body" in data

    run_with_server(body)


def test_oversize_body() -> None:
    async def body(port: int) -> None:
        error = await call_error(port, "POST", "/echo", "x" * MAX_BODY_BYTES)
        assert error.status == 413
        # Chunked: no length up front, cut off while reading.
        chunks = iter([b"[" + b"1," * 1000] * 600 + [b"1]"])
        code, headers, _ = await raw(port, "POST", "/echo", headers=AUTH, body=chunks)
        assert code == 413
        assert headers["connection"] == "close"
        # Just under the limit is fine.
        payload = "x" * (MAX_BODY_BYTES - 10)
        assert await call(port, "PUT", "/echo", payload) == payload

    run_with_server(body)


def test_handler_errors(caplog: pytest.LogCaptureFixture) -> None:
    async def body(port: int) -> None:
        with caplog.at_level(logging.ERROR, logger="node.api.server"):
            error = await call_error(port, "GET", "/boom")
        assert (error.status, error.message) == (500, "internal error")
        assert "secret" not in str(error)
        error = await call_error(port, "GET", "/teapot")
        assert (error.status, error.message) == (418, "short and stout")
        assert str(error) == "short and stout"  # what is wrong, not "(HTTP 418)"
        assert await call(port, "GET", "/status") == {"ok": True, "query": {}}  # still up

    run_with_server(body)
    assert "secret-detail" in caplog.text  # the traceback is logged, not sent
    assert "RuntimeError" in caplog.text


def test_service_errors_map_to_their_status_in_one_place() -> None:
    """Handlers let a service's error through; the server answers its kind's status
    (node/errors.py) and its message, and 400 for input that does not check."""
    expected = {"/busy": 503, "/missing": 404, "/conflict": 409, "/bad-spec": 400,
                "/forged": 400, "/quota": 409, "/no-shard": 404, "/planner": 400}

    async def body(port: int) -> None:
        for path, status in expected.items():
            error = await call_error(port, "GET", path)
            assert (error.status, error.message) == (status, str(SERVICE_ERRORS[path])), path
        # A busy service says when to come back, where it can tell.
        status_code, headers, _ = await raw(port, "GET", "/busy", headers=AUTH)
        assert (status_code, headers.get("retry-after")) == (503, "3")
        _, headers, _ = await raw(port, "GET", "/missing", headers=AUTH)
        assert "retry-after" not in headers

    run_with_server(body)


def test_metrics_from_the_given_registry() -> None:
    registry = prometheus_client.CollectorRegistry()
    counter = prometheus_client.Counter(
        "iollm_test_things", "Things counted by the test.", registry=registry
    )
    counter.inc(3)

    async def body(port: int) -> None:
        code, headers, data = await raw(port, "GET", "/metrics", headers=AUTH)
        assert code == 200
        assert headers["content-type"] == prometheus_client.CONTENT_TYPE_LATEST
        assert b"iollm_test_things_total 3.0" in data
        text = await call(port, "GET", "/metrics")
        assert "iollm_test_things_total 3.0" in text
        assert "python_gc" not in text  # not the global registry

    run_with_server(body, registry=registry)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.10", "10.0.0.1", "example.com"])
def test_non_loopback_host_is_refused(host: str) -> None:
    async def main() -> None:
        with trio.fail_after(DEADLINE_S), pytest.raises(ValueError, match="loopback"):
            await serve_api(ROUTES, TOKEN, prometheus_client.CollectorRegistry(), host=host)

    trio.run(main)


def test_port_in_use_is_a_clear_oserror() -> None:
    async def body(port: int) -> None:
        with pytest.raises(OSError) as info:
            await serve_api(ROUTES, TOKEN, prometheus_client.CollectorRegistry(), port=port)
        assert info.value.errno == errno.EADDRINUSE

    run_with_server(body)


def test_stalled_client_is_dropped_without_blocking_others() -> None:
    timeout = 1.0
    order: list[str] = []

    async def body(port: int) -> None:
        stalled = trio.Event()

        async def staller() -> None:
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            await stream.send_all(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Len")
            stalled.set()
            t0 = trio.current_time()
            try:
                data = await stream.receive_some()
            except trio.BrokenResourceError:
                data = b""
            assert data == b""  # closed, no response for a request never completed
            assert trio.current_time() - t0 >= timeout * 0.9
            order.append("staller dropped")
            await stream.aclose()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(staller)
            await stalled.wait()
            assert (await call(port, "GET", "/status"))["ok"]
            order.append("other served")

    run_with_server(body, request_timeout=timeout)
    assert order == ["other served", "staller dropped"]


def test_connection_slots_are_released() -> None:
    """With one slot, a staller delays the next client only until it is dropped."""

    async def body(port: int) -> None:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        await stream.send_all(b"GET /status HTTP/1.1\r\n")
        assert (await call(port, "GET", "/status"))["ok"]
        assert (await call(port, "GET", "/status"))["ok"]
        await stream.aclose()

    run_with_server(body, request_timeout=0.5, max_connections=1)


def test_keep_alive_and_connection_close() -> None:
    def two_on_one_connection(port: int) -> list[int]:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        statuses = []
        for _ in range(2):
            conn.request("GET", "/status", headers=AUTH)
            response = conn.getresponse()
            response.read()
            statuses.append(response.status)
            assert response.getheader("Connection") is None  # kept alive
        sock = conn.sock
        conn.close()
        assert sock is not None  # the same socket served both
        return statuses

    async def read_until_eof(stream: trio.SocketStream) -> bytes:
        data = b""
        while chunk := await stream.receive_some():
            data += chunk
        return data

    async def body(port: int) -> None:
        assert await trio.to_thread.run_sync(two_on_one_connection, port) == [200, 200]
        # Pipelined requests, the second asking to close: both answered, then EOF.
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        request = f"GET /status HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
        await stream.send_all((request + "\r\n" + request + "Connection: close\r\n\r\n").encode())
        data = await read_until_eof(stream)
        assert data.count(b"HTTP/1.1 200 ") == 2
        assert data.lower().count(b"connection: close") == 1
        await stream.aclose()
        # An idle keep-alive connection is closed after idle_timeout.
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        await stream.send_all((request + "\r\n").encode())
        data = await read_until_eof(stream)
        assert data.startswith(b"HTTP/1.1 200 ")
        await stream.aclose()

    run_with_server(body, idle_timeout=0.3)


def test_header_too_large_is_431() -> None:
    async def body(port: int) -> None:
        code, _, _ = await raw(port, "GET", "/status", headers={**AUTH, "X-Big": "a" * 20_000})
        assert code == 431

    run_with_server(body)


def test_client_reports_unreachable_node() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound but not listening: connections are refused
        with pytest.raises(ApiClientError) as info:
            api_request(f"http://127.0.0.1:{port}", TOKEN, "GET", "/status", timeout=5)
    assert info.value.status == 0
    assert "is it running? (iollm node start)" in str(info.value)


def test_client_reports_a_node_that_does_not_answer() -> None:
    async def body(port: int) -> None:
        request = partial(api_request, f"http://127.0.0.1:{port}", TOKEN, "GET", "/hang")
        with pytest.raises(ApiClientError) as info:
            await trio.to_thread.run_sync(partial(request, timeout=0.3))
        assert info.value.status == 0
        assert "did not answer GET /hang within 0.3 s" in str(info.value)

    run_with_server(body)


def test_routes_cannot_shadow_metrics() -> None:
    async def main() -> None:
        with trio.fail_after(DEADLINE_S), pytest.raises(ValueError, match="/metrics"):
            await serve_api(
                {("GET", "/metrics"): status}, TOKEN, prometheus_client.CollectorRegistry()
            )

    trio.run(main)


def test_token_file_mode_0600_and_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "api.token"
    old_umask = os.umask(0)  # even a permissive umask must not widen the mode
    try:
        token = write_token_file(path)
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert read_token_file(path) == token
    assert len(token) >= 40
    # Rewriting replaces it atomically, same mode, no temporary files left behind.
    assert write_token_file(path, "fixed-token") == "fixed-token"
    assert read_token_file(path) == "fixed-token"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["api.token"]
    with pytest.raises(ValueError):
        write_token_file(tmp_path / "bad.token", "has space")
    with pytest.raises(FileNotFoundError):
        read_token_file(tmp_path / "missing.token")


def test_a_gate_refuses_on_the_head_before_the_body_is_read() -> None:
    """A gated route's NodeError answers the request before its body is read: status,
    Retry-After and a closed connection, even for a body that would not parse; with the
    gate open the handler sees the body as usual."""
    big = b'{"pad": "' + b"x" * (900 * 1024) + b'"'  # over 900 KiB, and not even JSON

    async def body(port: int) -> None:
        assert await call(port, "POST", "/gated", {"a": 1}) == {"a": 1}
        GATE_ERRORS.append(ChainBusy("the chain cannot finalize more in time",
                                     retry_after_s=4))
        try:
            status_code, headers, answer = await raw(
                port, "POST", "/gated", body=big,
                headers={**AUTH, "Content-Type": "application/json"})
        finally:
            GATE_ERRORS.clear()
        assert status_code == 503, answer
        assert headers.get("retry-after") == "4" and headers.get("connection") == "close"
        assert b"finalize more in time" in answer  # not a JSON error about the body
        assert await call(port, "POST", "/gated", {"b": 2}) == {"b": 2}

    run_with_server(body)
