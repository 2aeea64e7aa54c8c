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
import re
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from protocol.chainwire import MAX_SYNC_LIMIT
from protocol.smip import MAX_INFLIGHT_PER_PEER, MAX_INFLIGHT_TOTAL

CONFIG_FILE = "config.toml"
TOKEN_FILE = "api.token"
STATE_DB = "state.db"
RUNTIME_FILE = "node.json"

DEFAULT_CONFIG_TOML = """\
# iollm node configuration. Every key is optional; the value shown is the default.

[node]
# A name for this node, shown beside its peer id (peers, balances); carried in its signed
# capability record. At most 64 printable characters; "" for none.
name = ""
# Multiaddrs to listen on (TCP only). Port 0 picks a free port.
listen = ["/ip4/0.0.0.0/tcp/4001"]
# Bootstrap peers, full multiaddrs ending in /p2p/<peer id>.
bootstrap = []
# Optional file with more bootstrap peers, one multiaddr a line (bootstrap/README.md).
bootstrap_file = ""

[api]
# The local JSON API and /metrics; always bound to 127.0.0.1. 0 picks a free port.
port = 7780
# A request must arrive whole within request_timeout_s of its first byte; a keep-alive
# connection waits idle_timeout_s for its next request. Seconds.
request_timeout_s = 10.0
idle_timeout_s = 60.0
# Clients served at once; more wait in the kernel's accept backlog.
max_connections = 64
# Publish and fetch operations started through the API: a finished one is shown for
# keep_finished_s seconds after it ended, at most max_finished of them.
keep_finished_s = 3600.0
max_finished = 256

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
# by later queries for unresponsive_for_s. Seconds.
rpc_timeout_s = 3
unresponsive_for_s = 60
# A request within a query still unanswered after this many seconds gives up its place
# among the requests in flight: the next peer is asked at once, and a late answer still
# counts. Sooner when the node's measured DHT round times say the request is late
# (specs/capability.md, "Lookup walk"). Seconds.
hedge_after_s = 0.5
# A publish step that failed (the DHT put, a class provide) is tried again after this
# many seconds, then after twice as long each time (15, 30, 60 s), publish_retries times
# in all, rather than only at the next refresh. Seconds.
retry_interval_s = 15
publish_retries = 3
# The record is re-announced on gossip at these seconds after joining, before the steady
# gossip_interval_s (the mesh takes a few heartbeats to form).
gossip_startup_s = [1.0, 2.0, 5.0]
# Records this node lacks are pulled from a peer at these seconds after joining, then every
# sync_interval_s seconds from one random connected peer.
sync_startup_s = [0.0, 5.0, 15.0, 30.0, 60.0]
sync_interval_s = 300
# Sync answers written at once; further requests wait within their deadline.
sync_serve_concurrency = 4
# Record lookups running at once within one class query.
fetch_concurrency = 16
# Valid copies of a record that end a DHT lookup (the newest is taken); or this many
# seconds after the first valid copy came in, whichever is sooner.
value_quorum = 3
value_grace_s = 0.3
# Providers taken from one GET_PROVIDERS answer; the rest are ignored.
max_providers = 1000
# Most recently seen peers redialled at start (a restarted node rejoins without bootstrap).
known_peers_redial = 16

[probe]
# Length of the matmul benchmark in the environment probe, in seconds.
bench_seconds = 0.5
# A start within this many seconds of a probe of the same machine, boot, interpreter and
# filesystem reuses its report (kept in ~/.cache/iollm, or $XDG_CACHE_HOME/iollm) instead
# of probing again: each probe imports torch in a child process. 0 probes at every start.
reuse_s = 600.0
# TEST ONLY: pretend to have these GPUs, e.g.
# fake_gpus = [{name = "NVIDIA A100-SXM4-40GB", memory_gb = 40, compute_capability = "8.0",
#               tflops = 250}]   # tflops: the simulated bf16 matmul TFLOP/s
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
# "auto" (CUDA, ROCm included, when present, else Apple's MPS, else CPU), "cpu", "cuda"
# or "mps".
device = "auto"
# One slot per device: a task trains on each at once, e.g. ["cuda:0", "cuda:1"] (the
# coordinator gives a node one slot per GPU its capability record lists). Empty: up to
# max_tasks tasks on `device`.
devices = []
# Run the model through torch.compile (slower start, faster steps on a GPU).
compile = false
# TEST ONLY: misbehave on purpose, to test the coordinator's checks: "" (honest),
# "random", "zero", "copy", "copy-noise", "wrong-slice"; "slow" (honest, half speed).
adversary = ""

[smip]
# Sharing models and datasets (specs/smip.md): this node's schedule and limits.
# A version this node starts to provide is announced on gossip at these seconds after.
announce_repeats_s = [1.0, 2.0, 5.0]
# After joining, peers are asked for the versions they hold at these seconds, this many
# peers each time.
list_startup_s = [2.0, 10.0, 30.0]
list_peers = 3
# Requests served at once: from one peer, and in all (more are refused as busy).
serve_per_peer = 8
serve_total = 64
# A fetch asks the DHT for more providers of a shard after waiting this long, in seconds.
more_providers_after_s = 0.5
# A stream to a provider that cannot be opened for want of a connection is dialled again
# after open_retry_s seconds, open_tries times in all.
open_tries = 2
open_retry_s = 0.5
# Chunks received and not yet verified and written, for a whole fetch: the memory they
# hold (8 chunks: 8 MiB at the usual 1 MiB chunk). Page-cache writes stall for ms at a
# time under dirty-page throttling, so several must overlap.
writes_in_flight = 8

[chain]
# Timeouts, retries and limits of this node's chain services (specs/consensus.md). The
# rules every node must agree on (block times, sizes) are in the genesis, not here.
# A validator announces its head on gossip at least this often, in seconds (and at each
# final block it proposed); a validator waits this long for a block that a head one block
# ahead names before it takes it by sync.
head_every_s = 2.0
# Blocks asked for in one block-sync request, and its deadline in seconds.
sync_batch = 32
sync_timeout_s = 30.0
# Deadline to connect and open a chain stream to a peer, in seconds.
open_timeout_s = 30.0
# A validator repeats its votes of the current height this often, in seconds.
rebroadcast_s = 1.0
# With an empty mempool a validator waits up to this long before a height, in seconds.
empty_block_s = 5.0
# Consensus messages waiting for the machine, and kept for the next height.
inbox = 1024
max_future_messages = 256
# Consensus messages waiting for one validator's direct stream (a full queue skips it).
direct_queue = 64
# Tx batches (256 KiB each) waiting for one validator's txs stream (full: gossiped instead).
direct_tx_queue = 8
# A write on a validator stream must finish within this; a failed stream is opened again
# after direct_retry_s; one that brings nothing for direct_idle_timeout_s is dropped.
direct_write_timeout_s = 10.0
direct_retry_s = 1.0
direct_idle_timeout_s = 600.0
# A validator dials the validators it is not connected to this often, in seconds.
connect_every_s = 5.0
# A consensus frame begun must be complete within frame_body_base_s plus its size at
# frame_body_min_bytes_per_s (bytes a second): a partial frame is held in memory until
# then. Never less than direct_write_timeout_s, or a slow but honest write is cut.
frame_body_base_s = 10.0
frame_body_min_bytes_per_s = 262144
# Submitted txs wait this long (s) to share a gossip message.
tx_flush_s = 0.05
# This node's txs not final after resubmit_s seconds are gossiped again, at most
# resubmit_max of them a pass.
resubmit_s = 10.0
resubmit_max = 2000
# Tx ids whose signatures this node verified, and tx id -> final height entries kept for
# waiters (memory: about 200 bytes each).
checked_cache = 100000
recent_final = 200000
# Blocks between ledger snapshots (a restart replays the rest), and blocks read at once
# when the ledger is rebuilt.
snapshot_every = 50
load_batch = 32

[jobs]
# Timeouts and retries of training jobs (specs/jobs.md), seconds unless said.
# Coordinator: an offer (dial, send the assignment, get the reply) must be answered
# within offer_timeout_s; a stream that breaks before the reply is opened again after
# offer_retry_s, offer_tries times in all.
offer_timeout_s = 20.0
offer_tries = 2
offer_retry_s = 1.0
# A task is offered at most max_attempts times a round; a worker's busy refusal does not
# count as an attempt: the task is offered again after busy_retry_s, up to max_busy times.
max_attempts = 3
busy_retry_s = 2.0
max_busy = 60
# A round waits worker_grace_s for its workers_per_round workers, then starts with those
# it has; it looks for new workers every worker_poll_s; a round without any worker for
# no_worker_timeout_s fails the job.
worker_grace_s = 15.0
worker_poll_s = 2.0
no_worker_timeout_s = 600.0
# A round in which no task completed is run again after empty_round_pause_s, at most
# empty_round_retries times; then the job fails.
empty_round_retries = 3
empty_round_pause_s = 10.0
# Deadlines: writing a verdict, fetching a worker's delta, checking a round's results
# and computing the outer step (each in a child process).
verdict_write_timeout_s = 30.0
fetch_delta_timeout_s = 300.0
check_timeout_s = 3600.0
outer_timeout_s = 3600.0
# Deadline of building what the API publishes fresh (`iollm model init`, `iollm dataset
# stdlib`), in a child process.
build_timeout_s = 600.0
# A fetch that failed (its providers busy or slow) is tried again after these delays.
fetch_retries_s = [1.0, 3.0, 9.0]
# Worker: deadlines for the assignment frame once a stream opens, for writing the reply,
# the result, a progress report; how long it waits for the verdict (the coordinator
# checks the whole round first).
assign_timeout_s = 10.0
reply_timeout_s = 10.0
result_write_timeout_s = 30.0
progress_write_timeout_s = 10.0
verdict_timeout_s = 3600.0
# Progress reports at most this often; training may run this long past the task's
# deadline before its child process is stopped.
progress_every_s = 2.0
train_timeout_slack_s = 60.0

[p2p]
# Limits of the host (node/p2p/guard.py). Inbound streams open at once, from one peer and
# in all; more are reset unread (counted in /metrics, not held against the peer).
max_streams_per_peer = 64
max_streams = 1024
# What inbound streams may hold in partial frames and unread data, from one peer and in
# all, in bytes (each stream reserves its protocol's largest frame plus the receive
# window); a stream beyond is reset unread.
peer_buffer_bytes = 16777216
buffer_bytes = 268435456
# Connections at once.
max_connections = 1000

[relay]
# Behind NAT (README "Behind NAT"). "auto": AutoNAT asks connected peers to dial this node
# back; "public" or "private" skip the question. A private node reserves a slot on up to
# max_relays relays (those listed in relays, else connected peers that offer the service)
# and advertises its relayed addresses (/p2p-circuit) instead of its own.
reachability = "auto"
relays = []
max_relays = 2
# Dial-back answers that must agree before reachability changes (the AutoNAT spec says
# more than three; a small testnet may have fewer public peers).
autonat_confirmations = 2
# Serve as a circuit relay (relay v2 hop) for nodes behind NAT; for public nodes. Limits:
# slots held at once, circuits per slot, bytes and seconds per circuit, slot lifetime.
service = false
max_reservations = 64
max_circuits = 16
max_circuit_bytes = 1073741824
max_circuit_duration_s = 3600
reservation_ttl_s = 3600
# Deadlines of one AutoNAT question, one reservation, one dial through a relay, seconds.
autonat_query_timeout_s = 10.0
reserve_timeout_s = 10.0
relay_dial_timeout_s = 15.0
# Reachability and reservations are checked every check_interval_s seconds while unknown
# or none is held, every settled_interval_s once settled; known reachability is asked
# again every recheck_reachability_s (each answer costs every asked peer a dial-back).
check_interval_s = 2.0
settled_interval_s = 30.0
recheck_reachability_s = 300.0

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
    name: str = ""
    listen: list[str] = field(default_factory=lambda: ["/ip4/0.0.0.0/tcp/4001"])
    bootstrap: list[str] = field(default_factory=list)
    bootstrap_file: str = ""


@dataclass(frozen=True)
class ApiSection:
    port: int = 7780
    request_timeout_s: float = 10.0
    idle_timeout_s: float = 60.0
    max_connections: int = 64
    keep_finished_s: float = 3600.0
    max_finished: int = 256


@dataclass(frozen=True)
class DiscoverySection:
    refresh_interval_s: float = 600.0
    record_ttl_s: float = 1800.0
    gossip_interval_s: float = 60.0
    query_timeout_s: float = 10.0
    rpc_timeout_s: float = 3.0
    unresponsive_for_s: float = 60.0
    hedge_after_s: float = 0.5
    retry_interval_s: float = 15.0
    publish_retries: int = 3
    gossip_startup_s: list[float] = field(default_factory=lambda: [1.0, 2.0, 5.0])
    sync_startup_s: list[float] = field(default_factory=lambda: [0.0, 5.0, 15.0, 30.0, 60.0])
    sync_interval_s: float = 300.0
    sync_serve_concurrency: int = 4
    fetch_concurrency: int = 16
    value_quorum: int = 3
    value_grace_s: float = 0.3
    max_providers: int = 1000
    known_peers_redial: int = 16


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


WORKER_DEVICES = ("auto", "cpu", "cuda", "mps")
WORKER_SLOT_DEVICE = re.compile(r"cpu|mps|cuda(:[0-9]{1,2})?")
ADVERSARIES = ("", "random", "zero", "copy", "copy-noise", "wrong-slice", "slow")


@dataclass(frozen=True)
class WorkerSection:
    enabled: bool = True
    max_tasks: int = 1
    threads: int = 1
    device: str = "auto"
    compile: bool = False
    adversary: str = ""
    # One worker slot per entry: a task runs on each at once ("cuda:0", "cuda:1", ...;
    # "cpu" entries for CPU slots). Empty: max_tasks slots on `device`.
    devices: list[str] = field(default_factory=list)

    @property
    def slots(self) -> int:
        return len(self.devices) if self.devices else self.max_tasks


@dataclass(frozen=True)
class P2PSection:
    """The host's limits; node/p2p/options.py's P2POptions, which the daemon builds from
    it (the same fields: tests/test_config.py checks; node.p2p is not imported here, as
    it loads libp2p, which CLI commands that only read the config do without)."""

    max_streams_per_peer: int = 64
    max_streams: int = 1024
    peer_buffer_bytes: int = 16 << 20
    buffer_bytes: int = 256 << 20
    max_connections: int = 1000


REACHABILITY = ("auto", "public", "private")


@dataclass(frozen=True)
class RelaySection:
    reachability: str = "auto"
    relays: list[str] = field(default_factory=list)
    max_relays: int = 2
    autonat_confirmations: int = 2
    service: bool = False
    max_reservations: int = 64
    max_circuits: int = 16
    max_circuit_bytes: int = 1 << 30
    max_circuit_duration_s: int = 3600
    reservation_ttl_s: int = 3600
    autonat_query_timeout_s: float = 10.0
    reserve_timeout_s: float = 10.0
    relay_dial_timeout_s: float = 15.0
    check_interval_s: float = 2.0
    settled_interval_s: float = 30.0
    recheck_reachability_s: float = 300.0


@dataclass(frozen=True)
class SmipSection:
    """SMIP's schedule (seconds) and limits; documented in DEFAULT_CONFIG_TOML above."""

    announce_repeats_s: list[float] = field(default_factory=lambda: [1.0, 2.0, 5.0])
    list_startup_s: list[float] = field(default_factory=lambda: [2.0, 10.0, 30.0])
    list_peers: int = 3
    serve_per_peer: int = MAX_INFLIGHT_PER_PEER
    serve_total: int = MAX_INFLIGHT_TOTAL
    more_providers_after_s: float = 0.5
    open_tries: int = 2
    open_retry_s: float = 0.5
    writes_in_flight: int = 8


@dataclass(frozen=True)
class ChainSection:
    """The chain services' timeouts (seconds), retries and limits; documented in
    DEFAULT_CONFIG_TOML above."""

    head_every_s: float = 2.0
    sync_batch: int = 32
    sync_timeout_s: float = 30.0
    open_timeout_s: float = 30.0
    rebroadcast_s: float = 1.0
    empty_block_s: float = 5.0
    inbox: int = 1024
    max_future_messages: int = 256
    direct_queue: int = 64
    direct_tx_queue: int = 8
    direct_write_timeout_s: float = 10.0
    direct_retry_s: float = 1.0
    direct_idle_timeout_s: float = 600.0
    connect_every_s: float = 5.0
    frame_body_base_s: float = 10.0
    frame_body_min_bytes_per_s: int = 256 * 1024
    tx_flush_s: float = 0.05
    resubmit_s: float = 10.0
    resubmit_max: int = 2000
    checked_cache: int = 100_000
    recent_final: int = 200_000
    snapshot_every: int = 50
    load_batch: int = 32


@dataclass(frozen=True)
class JobsSection:
    """The jobs services' timeouts (seconds) and retries, coordinator's and worker's;
    documented in DEFAULT_CONFIG_TOML above."""

    offer_timeout_s: float = 20.0
    offer_tries: int = 2
    offer_retry_s: float = 1.0
    max_attempts: int = 3
    busy_retry_s: float = 2.0
    max_busy: int = 60
    worker_grace_s: float = 15.0
    worker_poll_s: float = 2.0
    no_worker_timeout_s: float = 600.0
    empty_round_retries: int = 3
    empty_round_pause_s: float = 10.0
    verdict_write_timeout_s: float = 30.0
    fetch_delta_timeout_s: float = 300.0
    check_timeout_s: float = 3600.0
    outer_timeout_s: float = 3600.0
    build_timeout_s: float = 600.0
    fetch_retries_s: list[float] = field(default_factory=lambda: [1.0, 3.0, 9.0])
    assign_timeout_s: float = 10.0
    reply_timeout_s: float = 10.0
    result_write_timeout_s: float = 30.0
    progress_write_timeout_s: float = 10.0
    verdict_timeout_s: float = 3600.0
    progress_every_s: float = 2.0
    train_timeout_slack_s: float = 60.0


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
    smip: SmipSection = field(default_factory=SmipSection)
    chain: ChainSection = field(default_factory=ChainSection)
    jobs: JobsSection = field(default_factory=JobsSection)
    p2p: P2PSection = field(default_factory=P2PSection)
    relay: RelaySection = field(default_factory=RelaySection)
    agent: AgentSection = field(default_factory=AgentSection)


_SECTIONS: dict[str, type] = {
    "node": NodeSection,
    "api": ApiSection,
    "discovery": DiscoverySection,
    "probe": ProbeSection,
    "store": StoreSection,
    "worker": WorkerSection,
    "smip": SmipSection,
    "chain": ChainSection,
    "jobs": JobsSection,
    "p2p": P2PSection,
    "relay": RelaySection,
    "agent": AgentSection,
}


def default_home() -> Path:
    return Path(os.environ.get("IOLLM_HOME") or Path.home() / ".iollm")


# The bound of every tunable (seconds, counts, bytes): none is sane beyond it, and inf (a
# timer that never fires: txs never gossiped) would only hide a typo.
_TUNABLE_MAX = 1e9
# The sections whose every number is such a tunable (positive, at most _TUNABLE_MAX), but
# for the keys named here (checked on their own); and their lists of seconds (schedules).
_TUNABLE_SECTIONS = ("api", "discovery", "smip", "chain", "jobs", "p2p")
_NOT_TUNABLES = frozenset({("api", "port")})
_SCHEDULES = (("smip", "announce_repeats_s"), ("smip", "list_startup_s"),
              ("discovery", "gossip_startup_s"), ("discovery", "sync_startup_s"),
              ("jobs", "fetch_retries_s"))


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
    if config.node.name:
        from protocol.capability import check_node_name  # nacl: not for every CLI start
        from protocol.errors import ProtocolError

        try:
            check_node_name(config.node.name)
        except ProtocolError as exc:
            raise ConfigError(f"{source}: node.{exc}") from None
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
    if len(w.devices) > 64 or not all(isinstance(d, str) and WORKER_SLOT_DEVICE.fullmatch(d)
                                      for d in w.devices):
        raise ConfigError(f"{source}: worker.devices must be at most 64 of \"cpu\", "
                          f"\"mps\", \"cuda\" or \"cuda:N\", got {w.devices!r}")
    if w.adversary not in ADVERSARIES:
        raise ConfigError(f"{source}: worker.adversary must be one of "
                          f"{', '.join(repr(a) for a in ADVERSARIES)}, got {w.adversary!r}")
    for section, name in _SCHEDULES:
        times = getattr(getattr(config, section), name)
        if not all(isinstance(t, (int, float)) and not isinstance(t, bool) and 0 <= t < 86_400
                   for t in times) or list(times) != sorted(times):
            raise ConfigError(f"{source}: {section}.{name} must be seconds in [0, 86400), "
                              "ascending")
    for section in _TUNABLE_SECTIONS:
        for f in fields(getattr(config, section)):
            value = getattr(getattr(config, section), f.name)
            if (section, f.name) in _NOT_TUNABLES:
                continue
            if not isinstance(value, list) and not 0 < value <= _TUNABLE_MAX:
                raise ConfigError(f"{source}: {section}.{f.name} must be positive and at most "
                                  f"{_TUNABLE_MAX:g}, got {value}")
    c = config.chain
    if c.sync_batch > MAX_SYNC_LIMIT:
        raise ConfigError(f"{source}: chain.sync_batch must be at most {MAX_SYNC_LIMIT} "
                          f"(what one sync request may ask for), got {c.sync_batch}")
    if c.frame_body_base_s < c.direct_write_timeout_s:
        raise ConfigError(f"{source}: chain.frame_body_base_s must be at least "
                          "chain.direct_write_timeout_s (a slow honest write would be cut)")
    r = config.relay
    if r.reachability not in REACHABILITY:
        raise ConfigError(f"{source}: relay.reachability must be one of {', '.join(REACHABILITY)}, "
                          f"got {r.reachability!r}")
    if not (0 <= r.max_relays <= 8 and 1 <= r.autonat_confirmations <= 16):
        raise ConfigError(f"{source}: relay.max_relays must be in [0, 8] and "
                          f"relay.autonat_confirmations in [1, 16]")
    if min(r.max_reservations, r.max_circuits, r.max_circuit_bytes, r.max_circuit_duration_s,
           r.reservation_ttl_s) <= 0:
        raise ConfigError(f"{source}: relay limits must be positive")
    for name in ("autonat_query_timeout_s", "reserve_timeout_s", "relay_dial_timeout_s",
                 "check_interval_s", "settled_interval_s", "recheck_reachability_s"):
        if not 0 < getattr(r, name) <= _TUNABLE_MAX:
            raise ConfigError(f"{source}: relay.{name} must be positive and at most "
                              f"{_TUNABLE_MAX:g}, got {getattr(r, name)}")
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
