"""node/config.py: the documented defaults parse to the dataclass defaults; bad values are
refused with the key named. (Discovery keys are also checked against the spec in
tests/test_capability.py.)"""

from __future__ import annotations

import dataclasses
import re
import tomllib
from pathlib import Path

import pytest

from node.config import (
    DEFAULT_CONFIG_TOML,
    Config,
    ConfigError,
    StoreSection,
    load_config,
    parse_config,
)


def test_default_config_toml_is_the_dataclass_defaults() -> None:
    assert parse_config(tomllib.loads(DEFAULT_CONFIG_TOML)) == Config()
    assert parse_config({}) == Config()
    documented = tomllib.loads(DEFAULT_CONFIG_TOML)
    for section in dataclasses.fields(Config):
        keys = {f.name for f in dataclasses.fields(getattr(Config(), section.name))}
        assert set(documented[section.name]) == keys, section.name


def test_store_section_values() -> None:
    store = parse_config({"store": {"quota_gb": 2, "dir": "/data/iollm"}}).store
    assert store == StoreSection(quota_gb=2.0, dir="/data/iollm")
    assert isinstance(store.quota_gb, float)
    assert store.quota_bytes == 2 * 2**30
    assert parse_config({"store": {"quota_gb": 0.5}}).store.quota_bytes == 2**29


def test_store_directory(tmp_path: Path) -> None:
    home = tmp_path / "home"
    assert StoreSection().directory(home) == home / "store"
    assert StoreSection(dir="shards").directory(home) == home / "shards"
    assert StoreSection(dir=str(tmp_path / "big")).directory(home) == tmp_path / "big"
    assert StoreSection(dir="~/s").directory(home) == Path.home() / "s"


@pytest.mark.parametrize(
    ("table", "expected"),
    [
        ({"quota_gb": 0}, "store.quota_gb must be a number of GiB in (0, 2**33), got 0.0"),
        ({"quota_gb": -1.5}, "store.quota_gb must be"),
        ({"quota_gb": float("inf")}, "store.quota_gb must be"),
        ({"quota_gb": float("nan")}, "store.quota_gb must be"),
        ({"quota_gb": 2**33}, "store.quota_gb must be"),
        ({"quota_gb": "50"}, "store.quota_gb: expected float, got '50'"),
        ({"quota_gb": True}, "store.quota_gb: expected float"),
        ({"dir": 3}, "store.dir: expected str, got 3"),
        ({"path": "/x"}, "unknown key store.path"),
    ],
)
def test_bad_store_values_name_the_key(table: dict[str, object], expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"store": table}, "cfg.toml")
    assert str(info.value).startswith("cfg.toml: ")
    assert expected in str(info.value)


def test_store_section_from_a_file(tmp_path: Path) -> None:
    (tmp_path / "config.toml").write_text("[store]\nquota_gb = 1.25\ndir = 'blobs'\n")
    assert load_config(tmp_path).store == StoreSection(quota_gb=1.25, dir="blobs")
    (tmp_path / "config.toml").write_text("[store]\nquota_gb = -inf\n")
    with pytest.raises(ConfigError, match=r"config\.toml: store\.quota_gb must be"):
        load_config(tmp_path)


@pytest.mark.parametrize(
    ("table", "expected"),
    [
        ({"sync_timeout_s": 0}, "chain.sync_timeout_s must be positive"),
        ({"resubmit_s": -1}, "chain.resubmit_s must be positive"),
        ({"rebroadcast_s": float("nan")}, "chain.rebroadcast_s must be positive"),
        ({"inbox": 0}, "chain.inbox must be positive"),
        ({"inbox": 1.5}, "chain.inbox: expected int, got 1.5"),
        ({"frame_body_base_s": 1.0}, "chain.frame_body_base_s must be at least"),
        ({"block_interval_ms": 100}, "unknown key chain.block_interval_ms"),
    ],
)
def test_bad_chain_values_name_the_key(table: dict[str, object], expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"chain": table}, "cfg.toml")
    assert expected in str(info.value)


def test_chain_section_values() -> None:
    chain = parse_config({"chain": {"resubmit_s": 2, "sync_batch": 8}}).chain
    assert (chain.resubmit_s, chain.sync_batch, chain.inbox) == (2.0, 8, 1024)
    assert isinstance(chain.resubmit_s, float)


@pytest.mark.parametrize(
    ("table", "expected"),
    [
        ({"announce_repeats_s": [5.0, 1.0]}, "smip.announce_repeats_s must be seconds"),
        ({"list_startup_s": [-1.0]}, "smip.list_startup_s must be seconds"),
        ({"list_startup_s": ["soon"]}, "smip.list_startup_s must be seconds"),
        ({"list_startup_s": 2.0}, "smip.list_startup_s: expected list"),
        ({"serve_total": 0}, "smip.serve_total must be positive"),
        ({"open_retry_s": -0.5}, "smip.open_retry_s must be positive"),
    ],
)
def test_bad_smip_values_name_the_key(table: dict[str, object], expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"smip": table}, "cfg.toml")
    assert expected in str(info.value)


def test_tunables_are_finite_and_sync_batches_fit_a_request() -> None:
    for section, key in (("chain", "tx_flush_s"), ("smip", "open_retry_s")):
        expected = re.escape(f"{section}.{key} must be positive and at most")
        with pytest.raises(ConfigError, match=expected):
            parse_config({section: {key: float("inf")}})
    with pytest.raises(ConfigError, match=re.escape("chain.sync_batch must be at most 1024")):
        parse_config({"chain": {"sync_batch": 2000}})
    assert parse_config({"chain": {"sync_batch": 1024}}).chain.sync_batch == 1024


@pytest.mark.parametrize(
    ("section", "table", "expected"),
    [
        ("discovery", {"value_quorum": 0}, "discovery.value_quorum must be positive"),
        ("discovery", {"sync_interval_s": float("inf")}, "discovery.sync_interval_s must be"),
        ("discovery", {"sync_startup_s": [5.0, 0.0]}, "discovery.sync_startup_s must be seconds"),
        ("discovery", {"fetch_concurrency": 2.5}, "discovery.fetch_concurrency: expected int"),
        ("jobs", {"offer_timeout_s": 0}, "jobs.offer_timeout_s must be positive"),
        ("jobs", {"worker_grace_s": float("nan")}, "jobs.worker_grace_s must be positive"),
        ("jobs", {"fetch_retries_s": [-1.0]}, "jobs.fetch_retries_s must be seconds"),
        ("jobs", {"offer_tries": True}, "jobs.offer_tries: expected int"),
        ("jobs", {"offer_timeout": 5}, "unknown key jobs.offer_timeout"),
        ("p2p", {"max_streams_per_peer": 0}, "p2p.max_streams_per_peer must be positive"),
        ("p2p", {"buffer_bytes": 2**40}, "p2p.buffer_bytes must be positive and at most"),
        ("relay", {"reserve_timeout_s": 0}, "relay.reserve_timeout_s must be positive"),
        ("relay", {"recheck_reachability_s": float("inf")}, "relay.recheck_reachability_s"),
    ],
)
def test_bad_tunables_name_the_key(section: str, table: dict[str, object],
                                   expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({section: table}, "cfg.toml")
    assert str(info.value).startswith("cfg.toml: ")
    assert expected in str(info.value)
    assert "\n" not in str(info.value)


def test_tunables_reach_their_sections() -> None:
    config = parse_config({"jobs": {"worker_grace_s": 1, "fetch_retries_s": [0.5]},
                           "discovery": {"value_quorum": 5, "gossip_startup_s": [0.1]},
                           "p2p": {"max_streams_per_peer": 8}})
    assert (config.jobs.worker_grace_s, config.jobs.fetch_retries_s) == (1.0, [0.5])
    assert isinstance(config.jobs.worker_grace_s, float)
    assert (config.discovery.value_quorum, config.discovery.gossip_startup_s) == (5, [0.1])
    assert config.p2p.max_streams_per_peer == 8 and config.p2p.max_streams == 1024


def test_p2p_and_relay_sections_are_the_p2p_options() -> None:
    """[p2p] and [relay] are node/p2p's P2POptions and NatOptions, field for field with
    the same defaults: the daemon builds those from these (config.py cannot import them
    without loading libp2p, which the CLI's light commands do without)."""
    from node.p2p.nat import NatOptions
    from node.p2p.options import P2POptions

    for section, options in ((Config().p2p, P2POptions()), (Config().relay, NatOptions())):
        mine = dataclasses.asdict(section)
        theirs = dataclasses.asdict(options)
        theirs = {k: list(v) if isinstance(v, tuple) else v for k, v in theirs.items()}
        assert mine == theirs, type(options).__name__


def test_api_section_defaults_are_the_servers() -> None:
    from node.api import ops, server

    api = Config().api
    assert (api.request_timeout_s, api.idle_timeout_s, api.max_connections) == (
        server.DEFAULT_REQUEST_TIMEOUT_S, server.DEFAULT_IDLE_TIMEOUT_S,
        server.DEFAULT_MAX_CONNECTIONS)
    assert (int(api.keep_finished_s * 1000), api.max_finished) == (
        ops.KEEP_FINISHED_MS, ops.MAX_FINISHED)
    with pytest.raises(ConfigError, match=r"api\.max_connections must be positive"):
        parse_config({"api": {"max_connections": 0}})
    assert parse_config({"api": {"port": 0}}).api.port == 0
