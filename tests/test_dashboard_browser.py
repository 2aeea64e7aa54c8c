"""The dashboard in a real browser against a real testnet: headless Chromium (Debian's
``chromium`` package, driven by Playwright) logs in through the one-time link from
``iollm dashboard``, sees every node, submits a job through the form (a bad spec first:
errors by field), watches the job's loss chart gain points while it runs, follows a
model's lineage in the version DAG and reads the chain; and is refused without the
session cookie or with a forged CSRF token.

One testnet (2 nodes, simulated GPUs) and one browser serve every test of this module,
which run in order; should pytest-xdist split the module, each worker gets its own, and a
test whose prerequisites ran elsewhere (the login, the job) does them itself.
Screenshots of each page go to ``$IOLLM_ARTIFACTS`` (default: the test's tmp dir) as
``dashboard-<page>.png``.

Chromium: ``scripts/setup.sh`` installs it where it can (as root); elsewhere these tests
are skipped, saying so. No browser is ever downloaded.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from node.api.server import api_request, read_token_file
from tests import netutil

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
HEX64 = re.compile(r"[0-9a-f]{64}")
WAIT_MS = 20_000  # a page element the next poll should show
JOB_WAIT_MS = 240_000  # a round of a tiny job on a loaded 2-core machine (~30 s idle)

try:
    from playwright.sync_api import BrowserContext, Page, expect, sync_playwright
except ImportError:  # pragma: no cover - CI installs it (the dev extra)
    sync_playwright = None  # type: ignore[assignment]


def _need_browser() -> None:
    missing = [what for what, ok in (("the playwright package", sync_playwright is not None),
                                     (CHROMIUM, os.path.exists(CHROMIUM))) if not ok]
    if not missing:
        return
    why = f"{' and '.join(missing)} missing (scripts/setup.sh installs them as root)"
    if os.geteuid() == 0:  # CI runs as root, where set-up can install them: never skip
        pytest.fail(f"browser tests cannot run: {why}")
    pytest.skip(f"browser tests skipped: {why}")


def iollm(*args: str, timeout: float = 120) -> str:
    return netutil.iollm(*args, timeout=timeout).stdout.strip()


def job_spec(base: str, data: str, *, rounds: str = "1") -> str:
    """A job of one round, one worker, two inner steps: one point more on the chart."""
    return (f'name = "dash-job"\nbase_model = "{base}"\ndataset = "{data}"\n'
            f"[train]\nrounds = {rounds}\nworkers_per_round = 1\ninner_steps = 2\n"
            f"batch_size = 4\nseq_len = 32\n[checks]\nreexec_fraction = 0.0\neval_batches = 1\n"
            f"[timeouts]\ntask_s = 120\n")


class Net:
    def __init__(self, root: Path, artifacts: Path) -> None:
        self.root = root
        self.artifacts = artifacts
        self.coordinator = root / "bootstrap"
        self.homes = [root / "bootstrap", root / "node-1"]
        self.peers = [json.loads((h / "node.json").read_text())["peer_id"] for h in self.homes]
        self.api = json.loads((self.coordinator / "node.json").read_text())["api"]
        self.base = ""
        self.data = ""
        self.job = ""
        self.logged_in = False

    def get(self, path: str) -> Any:
        token = read_token_file(self.coordinator / "api.token")
        return api_request(self.api, token, "GET", path, timeout=20)

    def finished_job(self) -> str:
        """The job the browser submitted, once done. A test that needs it but runs where
        the job test did not (pytest-xdist may split this module) submits it itself."""
        token = read_token_file(self.coordinator / "api.token")
        if not self.job:
            self.job = api_request(self.api, token, "POST", "/v1/jobs/submit",
                                   {"spec": job_spec(self.base, self.data)}, timeout=30)["job"]
        deadline = time.monotonic() + JOB_WAIT_MS / 1000
        while (status := self.get(f"/v1/jobs/status?id={self.job}"))["status"] != "done":
            assert status["status"] == "running", f"{status}\n{self.logs()}"
            assert time.monotonic() < deadline, f"job not done in time\n{self.logs()}"
            time.sleep(0.5)  # polling the coordinator's API, bounded by the deadline
        return self.job

    def logs(self, lines: int = 25) -> str:
        return "\n".join(f"-- {h.name}:\n" + "\n".join(
            (h / "daemon.log").read_text(errors="replace").splitlines()[-lines:])
            for h in self.homes)

    def login_link(self) -> str:
        out = json.loads(iollm("dashboard", "--json", "--home", str(self.coordinator)))
        assert out["url"].startswith(f"{self.api}/dashboard/login?code="), out
        return str(out["url"])

    def open(self, page: Page, where: str) -> None:
        """Show a page of the dashboard, logging in first if this browser has not (the
        tests that log in ran in another pytest-xdist worker)."""
        if not self.logged_in:
            page.goto(self.login_link())
            self.logged_in = True
        page.goto(f"{self.api}/dashboard#/{where}")

    def shot(self, page: Page, name: str) -> None:
        page.screenshot(path=str(self.artifacts / f"dashboard-{name}.png"), full_page=True)


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Net]:
    _need_browser()
    root = tmp_path_factory.mktemp("dash") / "net"
    artifacts = Path(os.environ.get("IOLLM_ARTIFACTS") or root.parent / "artifacts")
    artifacts.mkdir(parents=True, exist_ok=True)
    # The tiny model's files are built by the daemon's own child process while the
    # testnet starts (each takes most of the set-up time), then published.
    model_dir = root.parent / "model"
    build_log = root.parent / "model-build.log"
    build = subprocess.Popen([sys.executable, "-m", "node.jobs.taskproc"],
                             stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                             stderr=build_log.open("w"), text=True)
    assert build.stdin is not None
    build.stdin.write(json.dumps({"op": "init", "arch": "gpt", "size": "tiny", "seed": 0,
                                  "out_dir": str(model_dir)}))
    build.stdin.close()
    try:
        iollm("testnet", "up", "--nodes", "1", "--simulate-gpus", "--dir", str(root),
              "--timeout", "120", timeout=180)
        assert build.wait(timeout=120) == 0, build_log.read_text()[-2000:]
        n = Net(root, artifacts)
        home = ("--home", str(n.coordinator))
        # The corpus: this Python's own sources, a few hundred KB (enough to split into
        # training and held-out text).
        corpus = root.parent / "corpus.txt"
        stdlib = Path(json.__file__).parent.parent
        corpus.write_text("".join(p.read_text(errors="replace")
                                  for p in sorted(stdlib.glob("[a-d]*.py"))[:40]))
        n.base = iollm("model", "publish", str(model_dir), "--name", "gpt-dash", *home)
        n.data = iollm("dataset", "publish", str(corpus), "--name", "corpus", *home)
        assert HEX64.fullmatch(n.base) and HEX64.fullmatch(n.data), (n.base, n.data)
        yield n
    finally:
        if build.poll() is None:
            build.kill()
            build.wait()
        netutil.iollm("testnet", "down", "--dir", str(root), check=False, timeout=60)


@pytest.fixture(scope="module")
def context(net: Net) -> Iterator[BrowserContext]:
    profile = tempfile.mkdtemp(prefix="iollm-chromium-")
    # trio_asyncio (imported with the node's modules) installs its own event loop policy;
    # Playwright's sync API needs a plain asyncio loop: this thread gets the default one.
    asyncio.set_event_loop_policy(asyncio.DefaultEventLoopPolicy())
    try:
        with sync_playwright() as pw:
            ctx = pw.chromium.launch_persistent_context(
                profile, executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS,
                viewport={"width": 1280, "height": 860})
            ctx.set_default_timeout(WAIT_MS)
            try:
                yield ctx
            finally:
                ctx.close()
    finally:
        asyncio.set_event_loop_policy(None)
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture(scope="module")
def page(context: BrowserContext) -> Page:
    return context.pages[0] if context.pages else context.new_page()


def _http(net: Net, method: str, path: str, headers: dict[str, str] | None = None,
          body: Any = None) -> http.client.HTTPResponse:
    url = urlsplit(net.api)
    conn = http.client.HTTPConnection(url.hostname or "", url.port, timeout=20)
    data = None if body is None else json.dumps(body).encode()
    conn.request(method, path, body=data, headers=headers or {})
    response = conn.getresponse()
    response.read()
    conn.close()
    return response


def _cookies(response: http.client.HTTPResponse) -> dict[str, str]:
    out = {}
    for header in response.headers.get_all("Set-Cookie") or []:
        name, _, rest = header.partition("=")
        out[name] = rest
    return out


@pytest.mark.timeout(240)
def test_refused_without_session_or_with_forged_csrf(net: Net, page: Page) -> None:
    # Without the cookie: the page and the API are closed, in the browser too.
    assert _http(net, "GET", "/dashboard").status == 401
    assert _http(net, "GET", "/v1/status", {"Cookie": "iollm_session_x=forged"}).status == 401
    assert page.goto(f"{net.api}/dashboard").status == 401  # type: ignore[union-attr]

    link = urlsplit(net.login_link())
    login = f"{link.path}?{link.query}"
    first = _http(net, "GET", login)
    assert first.status == 303 and first.getheader("Location") == "/dashboard"
    cookies = _cookies(first)
    session = next(v for k, v in cookies.items() if k.startswith("iollm_session_"))
    csrf = next(v for k, v in cookies.items() if k.startswith("iollm_csrf_"))
    assert "HttpOnly" in session and "SameSite=Strict" in session
    assert "HttpOnly" not in csrf and "SameSite=Strict" in csrf
    name = next(k for k in cookies if k.startswith("iollm_session_"))
    cookie = f"{name}={session.split(';')[0]}"
    token = csrf.split(";")[0]
    assert _http(net, "GET", login).status == 401  # the link works once
    assert _http(net, "GET", "/dashboard", {"Cookie": cookie}).status == 200
    # A state-changing request on the session needs its CSRF token.
    bad_spec = {"spec": 'name = "x"'}
    near = token[:-1] + ("1" if token.endswith("0") else "0")  # one digit off
    for headers in ({}, {"X-CSRF-Token": "forged"}, {"X-CSRF-Token": near}):
        refused = _http(net, "POST", "/v1/jobs/submit", {"Cookie": cookie, **headers}, bad_spec)
        assert refused.status == 401, headers
    taken = _http(net, "POST", "/v1/jobs/submit", {"Cookie": cookie, "X-CSRF-Token": token},
                  bad_spec)
    assert taken.status == 400  # in, and the spec's own error


@pytest.mark.timeout(120)
def test_login_through_the_link_and_see_every_node(net: Net, page: Page) -> None:
    printed = netutil.iollm("dashboard", "--home", str(net.coordinator)).stdout.splitlines()
    assert printed[0].startswith(f"{net.api}/dashboard/login?code=") and "once" in printed[1]
    page.goto(printed[0])
    net.logged_in = True
    assert urlsplit(page.url).path == "/dashboard"
    expect(page.locator("#identity")).to_contain_text(net.peers[0])
    expect(page.locator("#balance")).to_be_visible()
    net.shot(page, "node-start")
    # The page's own script, with its CSRF token, is let in; a forged token is not.
    statuses = page.evaluate("""async () => {
        const post = (token) => fetch('/v1/jobs/submit', {method: 'POST',
            headers: {'Content-Type': 'application/json', 'X-CSRF-Token': token},
            body: JSON.stringify({spec: 'name = "x"'})}).then((r) => r.status);
        return [await post(csrfToken()), await post('forged')];
    }""")
    assert statuses == [400, 401]

    page.click("nav a[data-page=network]")
    rows = page.locator("#nodes tr[data-peer]")
    expect(rows).to_have_count(len(net.peers))
    for peer in net.peers:
        expect(page.locator(f'#nodes tr[data-peer="{peer}"]')).to_be_visible()
    expect(page.locator("#nodes")).to_contain_text("H100")
    net.shot(page, "network")
    page.fill("#f-vram", "60")  # only the simulated H100 has that much
    page.locator("#f-vram").dispatch_event("change")
    expect(rows).to_have_count(1)
    page.fill("#f-vram", "")
    page.locator("#f-vram").dispatch_event("change")
    expect(rows).to_have_count(len(net.peers))


@pytest.mark.timeout(400)
def test_submit_a_job_and_watch_its_chart_gain_points(net: Net, page: Page) -> None:
    net.open(page, "jobs")
    page.fill("#spec", job_spec(net.base, net.data, rounds="0"))
    page.click("#submit-form button")
    error = page.locator("#submit-errors li[data-field='train.rounds']")
    expect(error).to_be_visible()
    net.shot(page, "jobs-error")

    page.fill("#spec", job_spec(net.base, net.data, rounds="1"))
    page.click("#submit-form button")
    page.wait_for_url(re.compile(r".*#/jobs/[0-9a-f]{64}$"))
    net.job = page.url.rsplit("/", 1)[1]
    chart = page.locator("#loss-chart")
    expect(chart).to_have_attribute("data-points", "0")  # round 1 still running
    # Round 1 ends: the base's held-out loss and round 1's, without a reload.
    try:
        expect(chart).to_have_attribute("data-points", "2", timeout=JOB_WAIT_MS)
    except AssertionError as exc:
        status = net.get(f"/v1/jobs/status?id={net.job}")
        raise AssertionError(f"{exc}\njob: {json.dumps(status)[:1500]}\n{net.logs()}") from None
    expect(page.locator("#job-tasks")).to_contain_text("accepted")
    expect(page.locator("#job-summary")).to_contain_text("done")
    expect(page.locator("#loss-chart canvas")).to_be_visible()
    net.shot(page, "jobs")


@pytest.mark.timeout(120)
def test_follow_a_models_lineage(net: Net, page: Page) -> None:
    final = net.get(f"/v1/jobs/status?id={net.finished_job()}")["rounds"][-1]["version"]
    net.open(page, f"models/{final}")
    path = page.locator("#lineage-path")
    # Round 1's version, then the base model it came from.
    steps = path.locator("a.lineage-step")
    expect(steps).to_have_count(2)
    expect(steps.last).to_have_attribute("data-version", net.base)
    expect(page.locator("#lineage canvas").first).to_be_visible()
    net.shot(page, "models")
    steps.last.click()  # follow it one step back: the base, which has no parent
    expect(page.locator(f'#versions tr.selected[data-version="{net.base}"]')).to_be_visible()
    expect(steps).to_have_count(1)


@pytest.mark.timeout(120)
def test_chain_page_and_reward_split(net: Net, page: Page) -> None:
    final = net.get(f"/v1/jobs/status?id={net.finished_job()}")["rounds"][-1]["version"]
    iollm("ledger", "wait", "--job", net.job, "--home", str(net.coordinator), timeout=90)
    net.open(page, "chain")
    expect(page.locator("#height")).not_to_have_text("0")
    expect(page.locator("#validators tbody tr")).to_have_count(2)
    page.fill("#split-model", final[:16])
    page.fill("#split-amount", "1000")
    page.click("#split-form button")
    expect(page.locator("#split tbody tr").first).to_be_visible()
    units = [int(t) for t in page.locator("#split tbody tr td:last-child").all_inner_texts()]
    assert sum(units) == 1000
    net.shot(page, "chain")
    page.click("nav a[data-page=node]")  # the coordinator earned its share of the job
    expect(page.locator("#balance")).not_to_have_text("0")
    expect(page.locator("#wallet tbody tr")).to_have_count(1)  # the job's one receipt
    net.shot(page, "node")


@pytest.mark.timeout(60)
def test_metrics_table_matches_the_nodes_and_the_grafana_panels(net: Net) -> None:
    root = Path(__file__).resolve().parent.parent
    documented = set(re.findall(r"^\| `(iollm_\w+)` \|", (root / "README.md").read_text(),
                                re.MULTILINE))
    exposed: set[str] = set()
    for home in net.homes:
        token = read_token_file(home / "api.token")
        api = json.loads((home / "node.json").read_text())["api"]
        text = api_request(api, token, "GET", "/metrics", timeout=20)
        exposed |= {n for n in re.findall(r"^# HELP (iollm_\w+) ", text, re.MULTILINE)
                    if not n.endswith("_created")}
    assert documented == exposed, (documented - exposed, exposed - documented)
    # The job's worker counted its task.
    net.finished_job()
    worker = json.loads((net.homes[1] / "node.json").read_text())["api"]
    metrics = api_request(worker, read_token_file(net.homes[1] / "api.token"), "GET",
                          "/metrics", timeout=20)
    assert 'iollm_worker_tasks_total{outcome="finished"} 1.0' in metrics, metrics[-3000:]
    grafana = json.loads((root / "bootstrap/monitoring/grafana-dashboard.json").read_text())
    used = {re.sub(r"_(bucket|count|sum)$", "", name)
            for panel in grafana["panels"] for target in panel["targets"]
            for name in re.findall(r"iollm_\w+", target["expr"])}
    assert used and used <= exposed, used - exposed
