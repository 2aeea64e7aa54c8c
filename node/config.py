"""The node home and its ``config.toml``: documented defaults, validated on load.

Home layout (``~/.iollm``, ``$IOLLM_HOME`` or ``--home``)::

    node.key     Ed25519 identity, mode 0600          (node/identity.py)
    api.token    bearer token of the local API, 0600  (node/api/server.py)
    config.toml  this module
    state.db     SQLite state, WAL                    (node/storage.py)
    store/       content-addressed shards of models and datasets (node/smip/store.py;
                 ``[store] dir`` puts it elsewhere)
    node.json    written while the daemon runs: pid, peer id, addresses, API url
"""

from __future__ import annotations

import math
import os
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

CONFIG_FILE = "config.toml"
TOKEN_FILE = "api.token"
STATE_DB = "state.db"
RUNTIME_FILE = "node.json"

DEFAULT_CONFIG_TOML = """\
# iollm node configuration. Every key is optional; the value shown is the default.

[node]
# Multiaddrs to listen on (TCP only). Port 0 picks a free port.
listen = ["/ip4/0.0.0.0/tcp/4001"]
# Bootstrap peers, full multiaddrs ending in /p2p/<peer id>.
bootstrap = []
# Optional file with more bootstrap peers, one multiaddr a line (bootstrap/README.md).
bootstrap_file = ""

[api]
# The local JSON API and /metrics; always bound to 127.0.0.1. 0 picks a free port.
port = 7780

[discovery]
# How often the capability record is re-signed and re-published, in seconds.
refresh_interval_s = 600
# How long a published capability record stays valid, in seconds (> refresh interval).
record_ttl_s = 1800
# How often the current record is re-announced on gossip, in seconds (keeps every
# node's replica fresh, so most queries are answered locally).
gossip_interval_s = 60
# Deadline for one network query (DHT lookup, record fetch), in seconds.
query_timeout_s = 10
# Deadline for one request to one peer within a query; a peer that misses it is skipped
# by later queries for a minute. Seconds.
rpc_timeout_s = 3
# A publish step that failed (the DHT put, a class provide) is tried again after this
# many seconds, then after twice and four times as long, rather than only at the next
# refresh. Seconds.
retry_interval_s = 15

[probe]
# Length of the matmul benchmark in the environment probe, in seconds.
bench_seconds = 0.5
# A start within this many seconds of a probe of the same machine, boot, interpreter and
# filesystem reuses its report (kept in ~/.cache/iollm, or $XDG_CACHE_HOME/iollm) instead
# of probing again: each probe imports torch in a child process. 0 probes at every start.
reuse_s = 600.0
# TEST ONLY: pretend to have these GPUs, e.g.
# fake_gpus = [{name = "NVIDIA A100-SXM4-40GB", memory_gb = 40, compute_capability = "8.0"}]
fake_gpus = []

[store]
# Disk quota of the content store (shards of models and datasets), in GiB (> 0). Shards
# that are not pinned are evicted least recently used first to stay under it.
quota_gb = 50
# Directory of the content store; "" means <home>/store. A relative path is taken
# relative to the node home.
dir = ""

[worker]
# Take training micro-tasks of other nodes' jobs (specs/jobs.md).
enabled = true
# Micro-tasks trained at once; an assignment beyond this is refused.
max_tasks = 1
# Torch threads per task (each task trains in a child process).
threads = 1
# "auto" (CUDA when present, else CPU), "cpu" or "cuda".
device = "auto"
# TEST ONLY: misbehave on purpose, to test the coordinator's checks: "" (honest),
# "random", "zero", "copy", "copy-noise", "wrong-slice".
adversary = ""

[agent]
# Optional planner for `iollm agent run --goal` and `--plan` (specs/agent.md): an
# OpenAI-compatible chat endpoint, e.g. "http://127.0.0.1:8000/v1". "" (the default):
# the built-in sentence parser only. Its answers are checked like a goal file.
llm_url = ""
llm_model = ""
# The environment variable holding the endpoint's API key (never stored here).
llm_key_env = "IOLLM_LLM_KEY"
# Seconds to wait for one answer.
llm_timeout_s = 60.0
"""


class ConfigError(Exception):
    """config.toml is unreadable or a value is wrong; the message names the key."""


@dataclass(frozen=True)
class NodeSection:
    listen: list[str] = field(default_factory=lambda: ["/ip4/0.0.0.0/tcp/4001"])
    bootstrap: list[str] = field(default_factory=list)
    bootstrap_file: str = ""


@dataclass(frozen=True)
class ApiSection:
    port: int = 7780


@dataclass(frozen=True)
class DiscoverySection:
    refresh_interval_s: float = 600.0
    record_ttl_s: float = 1800.0
    gossip_interval_s: float = 60.0
    query_timeout_s: float = 10.0
    rpc_timeout_s: float = 3.0
    retry_interval_s: float = 15.0


@dataclass(frozen=True)
class ProbeSection:
    bench_seconds: float = 0.5
    reuse_s: float = 600.0
    fake_gpus: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class StoreSection:
    quota_gb: float = 50.0
    dir: str = ""

    @property
    def quota_bytes(self) -> int:
        return int(self.quota_gb * 2**30)

    def directory(self, home: Path) -> Path:
        """``dir``, relative to `home` unless absolute; ``<home>/store`` when empty."""
        return home / (Path(self.dir).expanduser() if self.dir else "store")


WORKER_DEVICES = ("auto", "cpu", "cuda")
ADVERSARIES = ("", "random", "zero", "copy", "copy-noise", "wrong-slice")


@dataclass(frozen=True)
class WorkerSection:
    enabled: bool = True
    max_tasks: int = 1
    threads: int = 1
    device: str = "auto"
    adversary: str = ""


@dataclass(frozen=True)
class AgentSection:
    llm_url: str = ""
    llm_model: str = ""
    llm_key_env: str = "IOLLM_LLM_KEY"
    llm_timeout_s: float = 60.0


@dataclass(frozen=True)
class Config:
    node: NodeSection = field(default_factory=NodeSection)
    api: ApiSection = field(default_factory=ApiSection)
    discovery: DiscoverySection = field(default_factory=DiscoverySection)
    probe: ProbeSection = field(default_factory=ProbeSection)
    store: StoreSection = field(default_factory=StoreSection)
    worker: WorkerSection = field(default_factory=WorkerSection)
    agent: AgentSection = field(default_factory=AgentSection)


_SECTIONS: dict[str, type] = {
    "node": NodeSection,
    "api": ApiSection,
    "discovery": DiscoverySection,
    "probe": ProbeSection,
    "store": StoreSection,
    "worker": WorkerSection,
    "agent": AgentSection,
}


def default_home() -> Path:
    return Path(os.environ.get("IOLLM_HOME") or Path.home() / ".iollm")


def _check_value(where: str, value: Any, default: Any) -> Any:
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, str):
        ok = isinstance(value, str)
    elif isinstance(default, list):
        ok = isinstance(value, list)
    else:  # pragma: no cover - every default above is one of these types
        ok = True
    if not ok:
        raise ConfigError(f"{where}: expected {type(default).__name__}, got {value!r}")
    return value


def parse_config(data: dict[str, Any], source: str = CONFIG_FILE) -> Config:
    sections: dict[str, Any] = {}
    for name, value in data.items():
        cls = _SECTIONS.get(name)
        if cls is None:
            raise ConfigError(f"{source}: unknown section [{name}]")
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: [{name}] must be a table")
        defaults = cls()
        known = {f.name for f in fields(cls)}
        kwargs = {}
        for key, item in value.items():
            if key not in known:
                raise ConfigError(f"{source}: unknown key {name}.{key}")
            kwargs[key] = _check_value(f"{source}: {name}.{key}", item, getattr(defaults, key))
        sections[name] = cls(**kwargs)
    config = Config(**sections)
    d = config.discovery
    if min(d.refresh_interval_s, d.gossip_interval_s, d.query_timeout_s, d.rpc_timeout_s,
           d.retry_interval_s) <= 0:
        raise ConfigError(f"{source}: discovery intervals must be positive")
    if d.record_ttl_s <= d.refresh_interval_s:
        raise ConfigError(
            f"{source}: discovery.record_ttl_s ({d.record_ttl_s}) must exceed "
            f"discovery.refresh_interval_s ({d.refresh_interval_s}), or records lapse"
        )
    if not 1 <= d.record_ttl_s <= 86400:
        raise ConfigError(f"{source}: discovery.record_ttl_s must be between 1 and 86400 (24 h)")
    if not 0 <= config.api.port <= 65535:
        raise ConfigError(f"{source}: api.port {config.api.port} is not a TCP port")
    if not 0 < config.probe.bench_seconds <= 60:
        raise ConfigError(f"{source}: probe.bench_seconds must be in (0, 60]")
    if not 0 <= config.probe.reuse_s <= 86_400:
        raise ConfigError(f"{source}: probe.reuse_s must be in [0, 86400]")
    if not (math.isfinite(config.store.quota_gb) and 0 < config.store.quota_gb < 2**33):
        raise ConfigError(f"{source}: store.quota_gb must be a number of GiB in (0, 2**33), "
                          f"got {config.store.quota_gb}")
    w = config.worker
    if not 0 <= w.max_tasks <= 64:
        raise ConfigError(f"{source}: worker.max_tasks must be in [0, 64], got {w.max_tasks}")
    if not 1 <= w.threads <= 256:
        raise ConfigError(f"{source}: worker.threads must be in [1, 256], got {w.threads}")
    if w.device not in WORKER_DEVICES:
        raise ConfigError(f"{source}: worker.device must be one of {', '.join(WORKER_DEVICES)}, "
                          f"got {w.device!r}")
    if w.adversary not in ADVERSARIES:
        raise ConfigError(f"{source}: worker.adversary must be one of "
                          f"{', '.join(repr(a) for a in ADVERSARIES)}, got {w.adversary!r}")
    a = config.agent
    if a.llm_url and not a.llm_url.startswith(("http://", "https://")):
        raise ConfigError(f"{source}: agent.llm_url must start with http:// or https://, "
                          f"got {a.llm_url!r}")
    if not 0 < a.llm_timeout_s <= 3600:
        raise ConfigError(f"{source}: agent.llm_timeout_s must be in (0, 3600]")
    return config


def load_config(home: Path) -> Config:
    path = home / CONFIG_FILE
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"no {path}: run `iollm init --home {home}` first") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    return parse_config(data, str(path))


def read_bootstrap_file(path: Path) -> list[str]:
    """One multiaddr a line; blank lines and ``#`` comments ignored (bootstrap/README.md)."""
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise ConfigError(f"cannot read bootstrap file {path}: {exc.strerror}") from None
    return [s for line in lines if (s := line.split("#", 1)[0].strip())]


def cache_dir() -> Path:
    """Where a node keeps what it may recompute (the probe's report): machine-wide."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "iollm"
