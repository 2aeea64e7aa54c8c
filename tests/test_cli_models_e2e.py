"""SMIP end to end through the CLI and the API: a testnet of real daemon processes."""

from __future__ import annotations

import filecmp
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from node.api.models import resolve_version
from node.api.server import ApiError
from node.smip.types import VersionInfo
from tests import netutil

ROOT = Path(__file__).resolve().parent.parent
MAKE_DATA = ROOT / "scripts" / "make_demo_data.py"
HEX64 = re.compile(r"[0-9a-f]{64}")


def iollm(*args: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess[str]:
    return netutil.iollm(*args, timeout=timeout, check=check)  # a tighter default bound



def start_iollm(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "node.cli", *args], text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def finish(proc: subprocess.Popen[str], timeout: float = 60) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def make_model(out: Path, *extra: str) -> None:
    subprocess.run([sys.executable, str(MAKE_DATA), "model", str(out), "--mib", "1.5",
                    "--shards", "3", *extra], check=True, timeout=60)


def api(home: Path, method: str, path: str, body: Any = None, *, token: str | None = None
        ) -> tuple[int, Any]:
    base = json.loads((home / "node.json").read_text())["api"]
    token = (home / "api.token").read_text().strip() if token is None else token
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(base + path, data=data, method=method,
                                     headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def wait_listed(home: Path, version: str, timeout: float = 20) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        listed = json.loads(iollm("model", "list", "--json", "--home", str(home)).stdout)
        found = [v for v in listed if v["version"] == version]
        if found:
            return dict(found[0])
        time.sleep(0.3)  # the announcement travels by gossip; polled with a deadline
    raise AssertionError(f"{version} not listed on {home} within {timeout} s")


def test_publish_list_fetch_show_and_errors(tmp_path: Path) -> None:
    net = tmp_path / "net"
    iollm("testnet", "up", "--nodes", "3", "--dir", str(net), "--timeout", "60", timeout=90)
    homes = [net / f"node-{i}" for i in (1, 2, 3)]
    try:
        # A full id nobody provides: the fetch fails after one DHT lookup; it
        # runs while the rest of the test does.
        nowhere = start_iollm("model", "fetch", "ab" * 32, "--home", str(homes[2]))

        model = tmp_path / "tiny"
        make_model(model)
        published = iollm("model", "publish", str(model), "--name", "tiny",
                          "--home", str(homes[0]))
        version = published.stdout.strip()
        assert HEX64.fullmatch(version), published.stdout
        assert f"published model 'tiny': version {version}" in published.stderr
        assert "publish done:" in published.stderr  # progress ends with the summary

        listed = wait_listed(homes[1], version)
        assert (listed["name"], listed["kind"], listed["state"]) == ("tiny", "model",
                                                                     "announced")
        human = iollm("model", "list", "--home", str(homes[1])).stdout
        assert version[:12] in human and "tiny" in human
        assert "no datasets known" in iollm("dataset", "list", "--home", str(homes[1])).stdout

        # Two nodes fetch at once, by a prefix of the id.
        outs = [tmp_path / "out-2", tmp_path / "out-3"]
        wait_listed(homes[2], version)
        fetches = [start_iollm("model", "fetch", version[:10], "--out", str(out),
                               "--home", str(home))
                   for out, home in zip(outs, homes[1:], strict=True)]
        for proc, out in zip(fetches, outs, strict=True):
            code, stdout, stderr = finish(proc)
            assert code == 0, stderr
            assert f"fetched model 'tiny' {version[:12]}" in stdout and str(out) in stdout
            files = sorted(p.name for p in model.iterdir())
            assert sorted(p.name for p in out.iterdir()) == files
            same, _, _ = filecmp.cmpfiles(model, out, files, shallow=False)
            assert same == files  # byte for byte
        assert wait_listed(homes[2], version)["state"] == "complete"

        # A child changing one of three weight shards, published on node-2 (which holds
        # the parent), shown there: lineage as a chain, one new shard.
        child_dir = tmp_path / "tiny-v2"
        make_model(child_dir, "--bump", "1")
        child = iollm("model", "publish", str(child_dir), "--name", "tiny-v2", "--parent",
                      version[:12], "--home", str(homes[1])).stdout.strip()
        shown = iollm("model", "show", child[:8], "--home", str(homes[1])).stdout
        assert f"version    {child}" in shown
        assert f"  {child[:12]}  'tiny-v2'" in shown
        assert f"    └─ {version[:12]}  'tiny'" in shown
        assert f"shards     4, 1 new against its first parent {version[:12]}" in shown
        assert re.search(r"model-00002-of-00003\.safetensors +\S+ KiB +new +held", shown)
        for shared in ("config.json", "model-00001-of-00003", "model-00003-of-00003"):
            assert re.search(rf"{re.escape(shared)}\S* +\S+ \S+ +shared +held", shown), shared
        as_json = json.loads(iollm("model", "show", child, "--json",
                                   "--home", str(homes[1])).stdout)
        assert as_json["parents"] == [version]
        assert as_json["new_shards"] == ["model-00002-of-00003.safetensors"]

        # Clear one-line errors, non-zero exit, no traceback.
        weights = tmp_path / "weights.npy"
        weights.write_bytes(b"\x93NUMPY" + bytes(100))
        bad = iollm("model", "publish", str(weights), "--name", "x", "--home", str(homes[0]),
                    check=False)
        assert bad.returncode == 1
        error = bad.stderr.strip().splitlines()[-1]
        assert error.startswith("iollm: error: ") and "safetensors" in error, bad.stderr
        assert "Traceback" not in bad.stderr
        # The other kind: refused by name, on a node that fetched it and on its publisher.
        for home in (homes[1], homes[0]):
            wrong = iollm("dataset", "fetch", version[:12], "--home", str(home), check=False)
            assert wrong.returncode == 1, wrong.stdout
            assert "is a model, not a dataset: use `iollm model fetch`" in wrong.stderr, \
                wrong.stderr
        unknown = iollm("model", "fetch", "deadbeef00", "--home", str(homes[2]), check=False)
        assert unknown.returncode == 1
        assert "no known version starts with deadbeef00" in unknown.stderr
        code, _, stderr = finish(nowhere)
        assert code == 1 and "iollm: error: no provider" in stderr, stderr
        assert "Traceback" not in stderr

        api_errors(homes[0])
    finally:
        iollm("testnet", "down", "--dir", str(net))
    for home in [net / "bootstrap", *homes]:
        assert "Traceback" not in (home / "daemon.log").read_text()


def api_errors(home: Path) -> None:
    """The new routes refuse a missing token, bad bodies (naming the field), unknown ids."""
    for method, path in (("POST", "/v1/models/publish"), ("POST", "/v1/models/fetch"),
                         ("GET", "/v1/ops?id=x"), ("GET", "/v1/models"),
                         ("GET", "/v1/models/show?version=" + "ab" * 32)):
        assert api(home, method, path, {} if method == "POST" else None, token="wrong")[0] == 401

    publish = {"path": "/tmp/x", "kind": "model", "name": "x"}
    for body, field in [
        ([1, 2], "the body must be a JSON object"),
        ({"kind": "model", "name": "x"}, "path: missing"),
        ({**publish, "path": 3}, "path: expected a non-empty string"),
        ({**publish, "kind": "weights"}, "kind: expected"),
        ({**publish, "name": ""}, "name: expected a non-empty string"),
        ({**publish, "parents": "ab12cd34"}, "parents: expected a list"),
        ({**publish, "parents": ["xyz"]}, "parents: expected a version id"),
        ({**publish, "parent": []}, "parent: unknown field"),
    ]:
        code, answer = api(home, "POST", "/v1/models/publish", body)
        assert (code, answer["error"][:len(field)]) == (400, field), answer
    for body, field in [
        ({}, "version: missing"),
        ({"version": 5}, "version: expected a non-empty string"),
        ({"version": "abc"}, "version: expected a version id"),
        ({"version": "ab" * 32, "out": 7}, "out: expected a non-empty string"),
    ]:
        code, answer = api(home, "POST", "/v1/models/fetch", body)
        assert (code, answer["error"][:len(field)]) == (400, field), answer
    assert api(home, "POST", "/v1/models/fetch", {"version": "0123456789"})[0] == 404
    assert api(home, "GET", "/v1/ops")[0] == 400
    code, answer = api(home, "GET", "/v1/ops?id=0000000000000000")
    assert code == 404 and "no operation" in answer["error"]
    assert api(home, "GET", "/v1/models?kind=weights")[0] == 400
    assert api(home, "GET", "/v1/models/show")[0] == 400
    assert api(home, "GET", "/v1/models/show?version=" + "0" * 64)[0] == 404
    assert api(home, "GET", "/v1/models/show?version=00000000")[0] == 404


class Known:
    """Stands in for Models where only its list of versions matters."""

    def __init__(self, *versions: str) -> None:
        self.infos = [VersionInfo(v, "model", "m", 0, "p", "complete", 1, 1, [])
                      for v in versions]

    def list_versions(self, kind: str | None = None) -> list[VersionInfo]:
        return self.infos


def test_resolve_version_by_prefix() -> None:
    a, b = "abcdef01" + "0" * 56, "abcdef02" + "1" * 56
    models: Any = Known(a, b)
    assert resolve_version(models, "ABCDEF01") == a
    assert resolve_version(models, b[:20]) == b
    assert resolve_version(models, "f" * 64) == "f" * 64  # a full id: fetch may find it
    for text, status, message in [("abcdef0", 400, "version: expected a version id"),
                                  ("abcdef0z", 400, "version: expected a version id"),
                                  ("abcdef", 400, "version: expected"),
                                  ("abcdef0", 400, "version: expected"),
                                  ("abcdef00", 404, "no known version starts with abcdef00")]:
        with pytest.raises(ApiError) as info:
            resolve_version(models, text)
        assert (info.value.status, info.value.message[:len(message)]) == (status, message)
    ambiguous: Any = Known(a, "abcdef01" + "f" * 56)
    with pytest.raises(ApiError) as info:
        resolve_version(ambiguous, "abcdef01", "parents")
    assert info.value.status == 400
    assert info.value.message.startswith("parents: abcdef01 is ambiguous: 2 known versions")


def metric(home: Path, name: str) -> float:
    """One unlabelled sample of the node's Prometheus /metrics."""
    base = json.loads((home / "node.json").read_text())["api"]
    token = (home / "api.token").read_text().strip()
    request = urllib.request.Request(base + "/metrics",
                                     headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        text = response.read().decode()
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


def test_fetch_resumes_after_the_daemon_is_killed(tmp_path: Path) -> None:
    """SIGKILL the fetching daemon mid-fetch, start it again: the fetch resumes and takes
    from the network only what was not verified on disk before the kill."""
    net = tmp_path / "net"
    iollm("testnet", "up", "--nodes", "2", "--dir", str(net), "--timeout", "60", timeout=90)
    home1, home2 = net / "node-1", net / "node-2"
    restarted: subprocess.Popen[bytes] | None = None
    try:
        model = tmp_path / "big"
        subprocess.run([sys.executable, str(MAKE_DATA), "model", str(model), "--mib", "96",
                        "--shards", "4"], check=True, timeout=120)
        total = sum(p.stat().st_size for p in model.iterdir())
        version = iollm("model", "publish", str(model), "--name", "big",
                        "--home", str(home1), timeout=120).stdout.strip()
        wait_listed(home2, version)

        _, started = api(home2, "POST", "/v1/models/fetch", {"version": version})
        deadline = time.monotonic() + 60
        while True:  # kill as soon as verified chunks are on disk, long before the end
            _, op = api(home2, "GET", f"/v1/ops?id={started['op']}")
            assert op["state"] == "running", op
            if op["phase"] == "chunks" and op["done_bytes"] > 0:
                break
            assert time.monotonic() < deadline, op
            time.sleep(0.002)  # polling another process, with a deadline
        state = json.loads((net / "testnet.json").read_text())
        entry = next(n for n in state["nodes"] if n["name"] == "node-2")
        os.kill(entry["pid"], signal.SIGKILL)
        verified_before = op["done_bytes"]  # a lower bound: more may have landed since
        assert 0 < verified_before < total

        bootstrap = next(n for n in state["nodes"] if n["name"] == "bootstrap")["addrs"][0]
        (home2 / "node.json").unlink()
        with open(home2 / "daemon.log", "ab") as daemon_log:
            restarted = subprocess.Popen(
                [sys.executable, "-m", "node.cli", "node", "start", "--home", str(home2),
                 "--bootstrap", bootstrap], stdout=daemon_log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True)
        entry["pid"] = restarted.pid  # so that `testnet down` stops it
        (net / "testnet.json").write_text(json.dumps(state))
        deadline = time.monotonic() + 60
        while not (home2 / "node.json").exists():
            assert restarted.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)  # waiting for another process, with a deadline

        listed = json.loads(iollm("model", "list", "--json", "--home", str(home2)).stdout)
        assert [v["state"] for v in listed if v["version"] == version] == ["partial"]
        out = tmp_path / "out"
        done = iollm("model", "fetch", version[:12], "--out", str(out), "--home", str(home2),
                     timeout=120)
        assert "fetched model 'big'" in done.stdout
        files = sorted(p.name for p in model.iterdir())
        same, _, _ = filecmp.cmpfiles(model, out, files, shallow=False)
        assert same == files
        again = metric(home2, "iollm_smip_fetched_bytes_total")
        assert 0 < again <= total - verified_before, (again, total, verified_before)
    finally:
        iollm("testnet", "down", "--dir", str(net))
        if restarted is not None and restarted.poll() is None:
            restarted.kill()
