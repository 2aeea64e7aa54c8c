"""The browser dashboard: one page served by the daemon's local API, with its sessions.

    POST /v1/dashboard/login   (bearer)          -> {"code", "path"}: a one-time login link
    GET  /dashboard/login?code=CODE  (public)    -> 303 to /dashboard, sets the session cookie
    GET  /dashboard                              -> the page (a single-page app)
    GET  /dashboard/static/NAME                  -> its scripts, styles and vendored libraries
    GET  /v1/dashboard/node                      -> resource use and the worker's counters
    GET  /v1/dashboard/split?model=&amount=      -> who a revenue record would pay, how much
    GET  /v1/dashboard/ops                       -> the operations (publish, fetch) kept now

Login. The browser never sees the bearer token: ``iollm dashboard`` asks the node for a
login code (with the token), and prints or opens ``/dashboard/login?code=...``. The code
works once, within `LOGIN_TTL_MS`; redeeming it sets two cookies: the session (HttpOnly,
so no script reads it; SameSite=Strict, so no other site's page sends it) and its CSRF
token (readable by the page's script, which echoes it in ``X-CSRF-Token`` on every request
that changes state: a forged request from elsewhere cannot know it). The server
(node/api/server.py) lets a request in with the bearer token or with `Sessions.allows`.

The page reads the same JSON routes as the CLI (``/v1/...``) and polls them every few
seconds: polling rather than server-sent events because the API server answers each
request whole (h11, one response per request, with a request timeout), and a poll of a
loopback JSON route costs the node far less than a held stream per open tab.

Cookies are kept per host, not per port, and a testnet runs many nodes on 127.0.0.1: the
cookie names carry a digest of the node's token, so logging into one node leaves the
others' sessions alone.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import shutil
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import psutil

from node.api.ops import Operations
from node.api.server import ApiError, Public, Reply, Request, Routes
from node.chain.service import Chain
from node.jobs.worker import Worker

__all__ = ["LOGIN_TTL_MS", "SESSION_TTL_MS", "Sessions", "dashboard_routes"]

LOGIN_PATH = "/dashboard/login"
PAGE_PATH = "/dashboard"
STATIC_PREFIX = "/dashboard/static/"
LOGIN_TTL_MS = 5 * 60 * 1000  # a login link is for the browser at hand, not for later
SESSION_TTL_MS = 12 * 60 * 60 * 1000  # then `iollm dashboard` again
MAX_SESSIONS = 32  # the oldest session goes first beyond this (a tab per login)
MAX_LOGINS = 16  # unredeemed codes kept; the oldest goes first
MAX_SPLIT_AMOUNT = 10**15  # a preview, but within what a revenue record may carry
CSRF_HEADER = b"x-csrf-token"
SAFE_METHODS = ("GET", "HEAD")

# The page runs only its own scripts; it is never framed, and sends no referrer (its
# login URL held a code, though used up by then).
PAGE_HEADERS = (
    ("Content-Security-Policy", "default-src 'self'; img-src 'self' data:; "
                                "style-src 'self' 'unsafe-inline'; frame-ancestors 'none'"),
    ("X-Frame-Options", "DENY"),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
)
CONTENT_TYPES = {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8",
                 ".html": "text/html; charset=utf-8", ".txt": "text/plain; charset=utf-8",
                 ".svg": "image/svg+xml"}


@dataclass
class _Session:
    csrf: str
    expires_ms: int


class Sessions:
    """Login codes and browser sessions of one node, in memory (a restart logs out).

    Time and randomness are injected: `clock_ms` and `token_bytes` (secrets.token_bytes).
    """

    def __init__(self, api_token: str, clock_ms: Callable[[], int], *,
                 token_bytes: Callable[[int], bytes] = secrets.token_bytes) -> None:
        tag = hashlib.sha256(b"iollm dashboard cookie\0" + api_token.encode()).hexdigest()[:12]
        self.cookie_name = f"iollm_session_{tag}"
        self.csrf_cookie_name = f"iollm_csrf_{tag}"
        self.clock_ms = clock_ms
        self.token_bytes = token_bytes
        self._logins: OrderedDict[str, int] = OrderedDict()  # code -> expiry
        self._sessions: OrderedDict[str, _Session] = OrderedDict()  # session id -> session

    def _secret(self) -> str:
        return self.token_bytes(32).hex()

    def new_login(self) -> str:
        """A fresh one-time login code."""
        self._prune()
        code = self._secret()
        self._logins[code] = self.clock_ms() + LOGIN_TTL_MS
        while len(self._logins) > MAX_LOGINS:
            self._logins.popitem(last=False)
        return code

    def redeem(self, code: str) -> tuple[str, str] | None:
        """(session id, CSRF token) for a valid unused code, which is then used up."""
        self._prune()
        # Compared in constant time, like the bearer token (the set is tiny).
        match = next((c for c in self._logins if hmac.compare_digest(c, code)), None)
        if match is None:
            return None
        del self._logins[match]
        session, csrf = self._secret(), self._secret()
        self._sessions[session] = _Session(csrf, self.clock_ms() + SESSION_TTL_MS)
        while len(self._sessions) > MAX_SESSIONS:
            self._sessions.popitem(last=False)
        return session, csrf

    def allows(self, method: str, headers: Sequence[tuple[bytes, bytes]]) -> bool:
        """Whether the request's session cookie is valid and, unless `method` is safe
        (GET, HEAD), its ``X-CSRF-Token`` header matches the session's token."""
        self._prune()
        session_id = _cookie(headers, self.cookie_name)
        if session_id is None:
            return False
        session = self._sessions.get(session_id)
        if session is None:
            return False
        if method in SAFE_METHODS:
            return True
        sent = next((v for k, v in headers if k == CSRF_HEADER), b"")
        return hmac.compare_digest(sent.strip(), session.csrf.encode())

    def refusal(self, path: str) -> Reply | None:
        """The page itself, refused, says how to log in; everything else answers JSON."""
        if path.rstrip("/") != PAGE_PATH:
            return None
        return _html(401, "Log in with iollm dashboard",
                     "This browser has no session with this node (or it ended). Run "
                     "<code>iollm dashboard</code> on the node's machine and open the link "
                     "it prints.")

    def set_cookies(self, session: str, csrf: str) -> list[tuple[str, str]]:
        age = SESSION_TTL_MS // 1000
        return [("Set-Cookie", f"{self.cookie_name}={session}; Path=/; Max-Age={age}; "
                               "HttpOnly; SameSite=Strict"),
                ("Set-Cookie", f"{self.csrf_cookie_name}={csrf}; Path=/; Max-Age={age}; "
                               "SameSite=Strict")]

    def _prune(self) -> None:
        now = self.clock_ms()
        for code in [c for c, exp in self._logins.items() if exp <= now]:
            del self._logins[code]
        for sid in [s for s, sess in self._sessions.items() if sess.expires_ms <= now]:
            del self._sessions[sid]


def _cookie(headers: Sequence[tuple[bytes, bytes]], name: str) -> str | None:
    """The value of cookie `name`. Written out rather than http.cookies.SimpleCookie:
    that parser stops at the first cookie it finds malformed, and on 127.0.0.1 the
    browser sends every local app's cookies along with ours."""
    for key, value in headers:
        if key != b"cookie":
            continue
        for part in value.decode("latin-1").split(";"):
            k, sep, v = part.strip().partition("=")
            if sep and k == name and v:
                return v
    return None


def _html(status: int, title: str, text: str) -> Reply:
    page = (f"<!doctype html><meta charset=utf-8><title>{title}</title>"
            f"<link rel=stylesheet href={STATIC_PREFIX}dashboard.css>"
            f"<main class=notice><h1>{title}</h1><p>{text}</p></main>")
    return Reply(status, page.encode(), CONTENT_TYPES[".html"], PAGE_HEADERS)


def _static_files() -> dict[str, Reply]:
    """Every file under node/api/static (package data), read once."""
    root = resources.files("node.api") / "static"
    out: dict[str, Reply] = {}

    def walk(folder: Any, prefix: str) -> None:
        for entry in folder.iterdir():
            if entry.is_dir():
                walk(entry, f"{prefix}{entry.name}/")
            elif not entry.name.startswith("."):
                ctype = CONTENT_TYPES.get(Path(entry.name).suffix, "application/octet-stream")
                out[f"{prefix}{entry.name}"] = Reply(200, entry.read_bytes(), ctype,
                                                     PAGE_HEADERS)

    walk(root, "")
    return out


def dashboard_routes(sessions: Sessions, home: Path, *, ops: Operations | None = None,
                     worker: Worker | None = None, chain: Chain | None = None,
                     resolve_model: Callable[[Any], str] | None = None) -> Routes:
    """The dashboard's routes. `worker` (node/jobs/worker.py), when this node trains,
    gives the counters of the tasks it runs; `home` the disk it fills; `chain` and
    `resolve_model` (a version id or prefix to its full id) the reward split; `ops` the
    transfers under way."""
    files = _static_files()
    index_file = files.pop("index.html")
    # The page's script finds its CSRF cookie by this name (other nodes' are beside it).
    page = Reply(200, index_file.body.replace(b"__CSRF_COOKIE__",
                                              sessions.csrf_cookie_name.encode()),
                 index_file.content_type, index_file.headers)
    process = psutil.Process()
    process.cpu_percent(None)  # the first call only starts the measurement

    async def login_code(_: Request) -> Any:
        code = sessions.new_login()
        return {"code": code, "path": f"{LOGIN_PATH}?code={code}",
                "expires_s": LOGIN_TTL_MS // 1000}

    async def login(request: Request) -> Any:
        got = sessions.redeem(request.query.get("code", ""))
        if got is None:
            return _html(401, "Login link used or expired",
                         "Each link from <code>iollm dashboard</code> works once, for a few "
                         "minutes. Run <code>iollm dashboard</code> again for a new one.")
        return Reply(303, b"", CONTENT_TYPES[".html"],
                     (("Location", PAGE_PATH), *sessions.set_cookies(*got)))

    async def index(_: Request) -> Any:
        return page

    async def node(_: Request) -> Any:
        with process.oneshot():
            mem = process.memory_info()
            resources_now = {"cpu_percent": process.cpu_percent(None), "rss_bytes": mem.rss,
                             "threads": process.num_threads(),
                             "open_files": len(process.open_files())}
        disk = shutil.disk_usage(home)
        out: dict[str, Any] = {
            "process": resources_now,
            "system": {"cpu_percent": psutil.cpu_percent(None),
                       "memory_percent": psutil.virtual_memory().percent,
                       "load": list(psutil.getloadavg())},
            "disk": {"home": str(home), "free_bytes": disk.free, "total_bytes": disk.total},
            "worker": None}
        if worker is not None:
            s = worker.stats
            out["worker"] = {"busy": worker.busy, "accepted": s.accepted, "refused": s.refused,
                             "finished": s.finished, "failed": s.failed,
                             "train_s": round(s.train_s, 1)}
        return out

    async def split(request: Request) -> Any:
        if chain is None or resolve_model is None:
            raise ApiError(409, "this node follows no chain")
        model = resolve_model(request.query.get("model"))
        raw = request.query.get("amount", "")
        if not raw.isdigit() or not 1 <= int(raw) <= MAX_SPLIT_AMOUNT:
            raise ApiError(400, f"amount: expected a whole number of units in "
                                f"[1, {MAX_SPLIT_AMOUNT}], got {raw[:40]!r}")
        led = chain.ledger
        pay = led.revenue_split(bytes.fromhex(model), int(raw))
        top = led.version_entry(bytes.fromhex(model))
        if pay is None or top is None:
            raise ApiError(404, f"model: no round record on the chain produced {model[:16]}, "
                                "so a revenue record for it has no lineage to pay")
        job = led.job(top.job_id)
        assert job is not None  # a round record's job is registered before it
        rows = [{"peer": peer, "units": units,
                 "role": "designer (coordinator)" if peer == job.coordinator else "worker"}
                for peer, units in sorted(pay.items(), key=lambda kv: (-kv[1], kv[0]))]
        return {"model": model, "amount": int(raw), "designer_share_bps":
                job.designer_share_bps, "lineage": len(led.lineage(bytes.fromhex(model))),
                "pay": rows}

    async def operations(_: Request) -> Any:
        return [] if ops is None else ops.listing()

    routes: Routes = {
        ("POST", "/v1/dashboard/login"): login_code,
        ("GET", LOGIN_PATH): Public(login),
        ("GET", PAGE_PATH): index,
        ("GET", PAGE_PATH + "/"): index,
        ("GET", "/v1/dashboard/node"): node,
        ("GET", "/v1/dashboard/split"): split,
        ("GET", "/v1/dashboard/ops"): operations,
    }
    # The assets are public: the same for everyone and shipped in the package, and the
    # page that says a login link is used up needs its style sheet.
    for name, reply in files.items():
        routes[("GET", STATIC_PREFIX + name)] = Public(_serve(reply))
    return routes


def _serve(reply: Reply) -> Callable[[Request], Awaitable[Any]]:
    async def handler(_: Request) -> Any:
        return reply

    return handler
