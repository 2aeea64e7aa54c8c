"""node/api/dashboard.py without a browser: the sessions (login codes, cookies, CSRF) with
an injected clock, and the real API server on 127.0.0.1 letting the dashboard in on a
session and nothing else in without the token."""

from __future__ import annotations

import http.client
import json
import random
from functools import partial
from pathlib import Path
from typing import Any

import prometheus_client
import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from node.api.dashboard import LOGIN_TTL_MS, SESSION_TTL_MS, Sessions, dashboard_routes
from node.api.server import Request, Routes, generate_token, serve_api

TOKEN = generate_token()


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000

    def __call__(self) -> int:
        return self.now


def sessions(clock: Clock | None = None, seed: int = 0) -> Sessions:
    rng = random.Random(seed)
    return Sessions(TOKEN, clock or Clock(), token_bytes=rng.randbytes)


def cookie_headers(s: Sessions, session: str, csrf: str | None = None,
                   extra: str = "") -> list[tuple[bytes, bytes]]:
    headers = [(b"cookie", f"{extra}{s.cookie_name}={session}".encode())]
    if csrf is not None:
        headers.append((b"x-csrf-token", csrf.encode()))
    return headers


def test_a_login_code_works_once_and_expires() -> None:
    clock = Clock()
    s = sessions(clock)
    code = s.new_login()
    got = s.redeem(code)
    assert got is not None
    assert s.redeem(code) is None  # used up
    late = s.new_login()
    clock.now += LOGIN_TTL_MS
    assert s.redeem(late) is None  # expired
    assert s.redeem("") is None and s.redeem("00" * 32) is None


def test_a_session_lets_reads_in_and_writes_only_with_its_csrf_token() -> None:
    clock = Clock()
    s = sessions(clock)
    got = s.redeem(s.new_login())
    assert got is not None
    session, csrf = got
    assert s.allows("GET", cookie_headers(s, session))
    assert not s.allows("POST", cookie_headers(s, session))  # no token
    assert not s.allows("POST", cookie_headers(s, session, "forged"))
    assert not s.allows("POST", cookie_headers(s, session, csrf[:-1]))
    assert s.allows("POST", cookie_headers(s, session, csrf))
    # Another session's token is no good for this one.
    other = s.redeem(s.new_login())
    assert other is not None
    assert not s.allows("POST", cookie_headers(s, session, other[1]))
    # The cookie among other local apps' cookies (some malformed) still counts.
    assert s.allows("GET", cookie_headers(s, session, extra='junk; a="b; c=; ;'))
    assert not s.allows("GET", [(b"cookie", b"iollm_session_0=" + session.encode())])
    assert not s.allows("GET", [])
    clock.now += SESSION_TTL_MS
    assert not s.allows("GET", cookie_headers(s, session))  # expired


def test_cookie_names_differ_per_node() -> None:
    a, b = Sessions(TOKEN, Clock()), Sessions(generate_token(), Clock())
    assert a.cookie_name != b.cookie_name and a.csrf_cookie_name != b.csrf_cookie_name
    assert TOKEN[:8] not in a.cookie_name


def test_the_oldest_sessions_and_codes_go_first() -> None:
    s = sessions()
    first = s.redeem(s.new_login())
    assert first is not None
    for _ in range(40):
        assert s.redeem(s.new_login()) is not None
    assert not s.allows("GET", cookie_headers(s, first[0]))
    codes = [s.new_login() for _ in range(20)]
    assert s.redeem(codes[0]) is None and s.redeem(codes[-1]) is not None


@given(st.lists(st.tuples(st.sampled_from([b"cookie", b"x-csrf-token", b"authorization"]),
                          st.binary(max_size=200)), max_size=6),
       st.sampled_from(["GET", "POST", "PUT"]))
def test_no_header_lets_a_stranger_in(headers: list[tuple[bytes, bytes]], method: str) -> None:
    s = sessions()
    s.redeem(s.new_login())  # a session exists; a stranger does not know its id
    assert not s.allows(method, headers)


# -- through the real server ----------------------------------------------------------


async def status(_: Request) -> Any:
    return {"ok": True}


def _request(port: int, method: str, path: str, headers: dict[str, str] | None = None,
             body: Any = None) -> tuple[int, dict[str, list[str]], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path, None if body is None else json.dumps(body).encode(),
                     headers or {})
        r = conn.getresponse()
        got: dict[str, list[str]] = {}
        for k, v in r.getheaders():
            got.setdefault(k.lower(), []).append(v)
        return r.status, got, r.read()
    finally:
        conn.close()


@pytest.mark.timeout(30)
def test_the_server_admits_the_token_or_a_session_and_nothing_else(tmp_path: Path) -> None:
    clock = Clock()
    s = sessions(clock)
    routes: Routes = {("GET", "/v1/status"): status, ("POST", "/v1/echo"): status,
                      **dashboard_routes(s, tmp_path)}

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            port = await nursery.start(partial(
                serve_api, routes, TOKEN, prometheus_client.CollectorRegistry(),
                sessions=s))
            await trio.to_thread.run_sync(check, port)
            nursery.cancel_scope.cancel()

    def check(port: int) -> None:
        bearer = {"Authorization": f"Bearer {TOKEN}"}
        st_, headers, body = _request(port, "GET", "/dashboard")
        assert st_ == 401 and b"iollm dashboard" in body  # a page saying how to log in
        assert headers["content-type"][0].startswith("text/html")
        assert _request(port, "GET", "/v1/status")[0] == 401
        assert _request(port, "GET", "/metrics")[0] == 401
        assert _request(port, "POST", "/v1/dashboard/login", body={})[0] == 401
        # The assets are public; the page is not.
        st_, headers, body = _request(port, "GET", "/dashboard/static/vendor/uPlot.iife.min.js")
        assert st_ == 200 and headers["content-type"][0].startswith("text/javascript")
        assert b"uPlot" in body
        assert _request(port, "GET", "/dashboard/static/nope.js")[0] == 401  # unknown: no route

        st_, _, body = _request(port, "POST", "/v1/dashboard/login", bearer, {})
        assert st_ == 200
        path = json.loads(body)["path"]
        st_, headers, _ = _request(port, "GET", path)
        assert st_ == 303 and headers["location"] == ["/dashboard"]
        set_cookies = headers["set-cookie"]
        session_cookie = next(c for c in set_cookies if c.startswith(s.cookie_name + "="))
        csrf_cookie = next(c for c in set_cookies if c.startswith(s.csrf_cookie_name + "="))
        assert "HttpOnly" in session_cookie and "SameSite=Strict" in session_cookie
        assert "HttpOnly" not in csrf_cookie and "SameSite=Strict" in csrf_cookie
        cookie = {"Cookie": session_cookie.split(";")[0]}
        csrf = csrf_cookie.split(";")[0].split("=", 1)[1]
        assert _request(port, "GET", path)[0] == 401  # the link works once

        st_, headers, body = _request(port, "GET", "/dashboard", cookie)
        assert st_ == 200 and s.csrf_cookie_name.encode() in body
        assert "frame-ancestors 'none'" in headers["content-security-policy"][0]
        assert _request(port, "GET", "/v1/status", cookie)[0] == 200
        assert _request(port, "POST", "/v1/echo", cookie, {})[0] == 401
        assert _request(port, "POST", "/v1/echo", {**cookie, "X-CSRF-Token": "x" * 64},
                        {})[0] == 401
        assert _request(port, "POST", "/v1/echo", {**cookie, "X-CSRF-Token": csrf}, {})[0] == 200
        node = json.loads(_request(port, "GET", "/v1/dashboard/node", cookie)[2])
        assert node["process"]["rss_bytes"] > 0 and node["worker"] is None
        assert _request(port, "GET", "/v1/dashboard/split?model=ab&amount=1", cookie)[0] == 409
        clock.now += SESSION_TTL_MS
        assert _request(port, "GET", "/v1/status", cookie)[0] == 401

    trio.run(main)


def test_operations_are_listed_newest_first_while_kept() -> None:
    from node.api.ops import Operations

    clock = Clock()
    ops = Operations(clock, rng=random.Random(1), keep_finished_ms=1000)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            gate = trio.Event()

            async def slow(progress: Any) -> Any:
                progress.phase, progress.total_bytes = "fetching", 10
                await gate.wait()
                return {"ok": True}

            first = ops.start(nursery, "fetch", slow)
            clock.now += 1
            second = ops.start(nursery, "publish", slow)
            await trio.testing.wait_all_tasks_blocked()
            listed = ops.listing()
            assert [o["id"] for o in listed] == [second, first]
            assert listed[0]["phase"] == "fetching" and listed[0]["state"] == "running"
            gate.set()
        assert {o["state"] for o in ops.listing()} == {"done"}
        clock.now += 1001  # kept 1000 ms after it ended
        assert ops.listing() == []

    trio.run(main)
