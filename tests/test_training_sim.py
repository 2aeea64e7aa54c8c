"""bench/training_sim.py: the in-process rounds the training benchmark tunes recipes with.

Its re-execution branch runs for about 1% of tasks, so a full benchmark run is the first
to reach it (it once failed there after 40 minutes): here every task is re-executed.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from bench.training_sim import Recipe, run_simulated_network
from node.ml import gpt, models


@pytest.mark.timeout(120)
def test_every_task_reexecuted_matches_and_rounds_apply() -> None:
    config = gpt.GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=32)
    recipe = dataclasses.replace(Recipe(), seq_len=16, workers=2, steps=4, inner_steps=2,
                                 batch=2, reexec_fraction=1.0, check_windows=2, check_batch=2)
    text = b"def f(x):\n    return x + 1\n" * 400
    tokens = np.frombuffer(text, dtype=np.uint8)
    train_len = len(tokens) * 9 // 10
    base = models.init_state(config, 0)
    seen: list[int] = []
    net = run_simulated_network(recipe, config, base, tokens, train_len,
                                (train_len, len(tokens) - train_len),
                                lambda rnd, state: seen.append(rnd))
    assert seen == [0, 1]
    assert net.tasks == 4 and net.reexec_count == 4
    assert [rd["reexec_match"] for rd in net.rounds] == [[True, True], [True, True]]
    assert net.bytes_sent_per_worker > 0 and net.bytes_received_per_worker > 0
    if net.rejected < net.tasks:  # an accepted delta moved the model
        assert any(not (net.state[k] == base[k]).all() for k in base)
