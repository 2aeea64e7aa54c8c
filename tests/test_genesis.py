"""protocol.genesis: TOML and msgpack round trips, defaults, and every bad field named."""

from __future__ import annotations

from pathlib import Path

import pytest
from nacl.signing import SigningKey

from protocol.genesis import (
    DEFAULT_BLOCK_BYTES,
    MAX_BLOCK_BYTES,
    Genesis,
    GenesisError,
    RewardParams,
    Timeouts,
    Validator,
    make_genesis,
    parse_genesis,
)
from protocol.peerid import peer_id_from_public_key

PEERS = [peer_id_from_public_key(bytes(SigningKey(bytes([i]) * 32).verify_key))
         for i in range(1, 6)]
EXAMPLE = Path(__file__).resolve().parent.parent / "bootstrap" / "genesis.example.toml"


def minimal(validators: str = "", top: str = "") -> str:
    body = validators or "".join(f'\n[[validators]]\npeer_id = "{p}"\npower = {i + 1}\n'
                                 for i, p in enumerate(PEERS[:4]))
    return f'chain_id = "c"\ngenesis_time_ms = 5\n{top}{body}'


def test_minimal_file_gets_the_defaults_and_sorted_validators() -> None:
    g = parse_genesis(minimal())
    assert g.max_block_bytes == DEFAULT_BLOCK_BYTES < MAX_BLOCK_BYTES
    assert g.timeouts == Timeouts(1000, 500, 500, 500) and g.rewards == RewardParams()
    assert [v.peer_id for v in g.validators] == sorted(PEERS[:4])
    assert g.powers == {p: i + 1 for i, p in enumerate(PEERS[:4])}
    assert g.allocations == ()


def test_round_trips_toml_and_encoding() -> None:
    g = make_genesis("iollm-test.1", PEERS[:4], 1234, allocations={PEERS[4]: 99},
                     breakthrough_margin_micro=12_345, quality_ref_micro=1,
                     propose_ms=300, block_interval_ms=700)
    assert parse_genesis(g.to_toml()) == g
    assert Genesis.decode(g.encode()) == g
    assert g.id == Genesis.decode(g.encode()).id and len(g.id) == 32
    assert make_genesis("iollm-test.1", PEERS[:4], 1235).id != \
        make_genesis("iollm-test.1", PEERS[:4], 1234).id
    assert all(v.power == 10 for v in g.validators)


def test_losses_in_nats_become_exact_micro_nats() -> None:
    text = minimal() + "\n[rewards]\nbreakthrough_margin = 0.01\nquality_ref = 0.123456\n"
    r = parse_genesis(text).rewards
    assert (r.breakthrough_margin_micro, r.quality_ref_micro) == (10_000, 123_456)
    assert parse_genesis(minimal() + "\n[rewards]\nbreakthrough_margin = 0\n") \
        .rewards.breakthrough_margin_micro == 0


def test_the_example_file_parses_with_four_validators() -> None:
    g = parse_genesis(EXAMPLE.read_text())
    assert len(g.validators) == 4
    assert parse_genesis(g.to_toml()) == g


V = '\n[[validators]]\npeer_id = "{}"\npower = {}\n'


@pytest.mark.parametrize(("text", "field"), [
    ("chain_id = ", "toml"),
    ('genesis_time_ms = 5\n' + V.format(PEERS[0], 1), "chain_id"),
    ('chain_id = "c"\n' + V.format(PEERS[0], 1), "genesis_time_ms"),
    ('chain_id = "c"\ngenesis_time_ms = 5\n', "validators"),
    ('chain_id = "c"\ngenesis_time_ms = 5\nvalidators = []\n', "validators"),
    ('chain_id = "c d"\ngenesis_time_ms = 5\n' + V.format(PEERS[0], 1), "chain_id"),
    ('chain_id = "c"\ngenesis_time_ms = -1\n' + V.format(PEERS[0], 1), "genesis_time_ms"),
    ('chain_id = "c"\ngenesis_time_ms = 1.5\n' + V.format(PEERS[0], 1), "genesis_time_ms"),
    ('chain_id = "c"\ngenesis_time_ms = 5\nextra = 1\n' + V.format(PEERS[0], 1), "extra"),
    (minimal(V.format(PEERS[0], 1) + V.format(PEERS[1], 0)), "validators[1].power"),
    (minimal(V.format(PEERS[0], 1) + V.format(PEERS[1], 2**32 + 1)), "validators[1].power"),
    (minimal(V.format(PEERS[0], 1) + V.format(PEERS[1], "true")), "validators[1].power"),
    (minimal(V.format(PEERS[0], 1) + V.format("QmNotAPeer", 1)), "validators[1].peer_id"),
    (minimal(V.format(PEERS[0], 1) + V.format(PEERS[0], 1)), "validators[1].peer_id"),
    (minimal(V.format(PEERS[0], 1) + '\n[[validators]]\npeer_id = "x"\n'),
     "validators[1].power"),
    (minimal(V.format(PEERS[0], 1) + '\n[[validators]]\npeer_id = "x"\nweight = 1\n'),
     "validators[1].weight"),
    (minimal(top="max_block_bytes = 1048576\n"), "max_block_bytes"),
    (minimal(top="block_interval_ms = 0\n"), "block_interval_ms"),
    (minimal() + "\n[timeouts]\npropose_ms = 0\n", "timeouts.propose_ms"),
    (minimal() + "\n[timeouts]\nvote_ms = 5\n", "timeouts.vote_ms"),
    (minimal() + "\n[rewards]\nemission_per_block = -1\n", "rewards.emission_per_block"),
    (minimal() + "\n[rewards]\nbreakthrough_reward = 2e3\n", "rewards.breakthrough_reward"),
    (minimal() + "\n[rewards]\nbreakthrough_margin = 0.0000001\n",
     "rewards.breakthrough_margin"),
    (minimal() + "\n[rewards]\nbreakthrough_margin = -0.1\n", "rewards.breakthrough_margin"),
    (minimal() + '\n[rewards]\nquality_ref = "0.1"\n', "rewards.quality_ref"),
    (minimal() + "\n[rewards]\nquality_ref = 0\n", "rewards.quality_ref"),
    (minimal() + "\n[rewards]\nbonus = 1\n", "rewards.bonus"),
    (minimal() + f'\n[[allocations]]\npeer_id = "{PEERS[0]}"\namount = 0\n',
     "allocations[0].amount"),
    (minimal() + '\n[[allocations]]\npeer_id = "nope"\namount = 3\n', "allocations[0].peer_id"),
    (minimal() + f'\n[[allocations]]\npeer_id = "{PEERS[0]}"\namount = 3\n'
                 f'\n[[allocations]]\npeer_id = "{PEERS[0]}"\namount = 4\n',
     "allocations[1].peer_id"),
    (minimal(top="timeouts = 5\n"), "timeouts"),
])  # fmt: skip
def test_every_bad_field_is_named(text: str, field: str) -> None:
    with pytest.raises(GenesisError) as exc:
        parse_genesis(text)
    assert exc.value.field == field, str(exc.value)
    assert str(exc.value).startswith(f"{field}: ")
    assert isinstance(exc.value, ValueError)


def test_code_built_values_are_checked_too() -> None:
    with pytest.raises(GenesisError, match="power"):
        Validator(PEERS[0], 0)
    unsorted = tuple(sorted((Validator(p, 1) for p in PEERS[:2]), key=lambda v: v.peer_id,
                            reverse=True))
    with pytest.raises(GenesisError, match=r"validators\[1\]\.peer_id"):
        Genesis("c", 1, unsorted)
    with pytest.raises(GenesisError, match="validators"):
        Genesis("c", 1, ())
    with pytest.raises(GenesisError, match="unknown field"):
        make_genesis("c", PEERS[:1], 1, emission=5)
    with pytest.raises(GenesisError, match="duplicate"):
        make_genesis("c", [PEERS[0], PEERS[0]], 1)
    with pytest.raises(GenesisError):
        Genesis.decode(b"\x00")
