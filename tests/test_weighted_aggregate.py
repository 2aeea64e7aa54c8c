"""The outer step's aggregate weighted by the tokens behind each delta (node/ml/trainer.py,
specs/jobs.md "Heterogeneous workers")."""

from __future__ import annotations

import pytest
import torch

from node.ml import trainer


def deltas(n: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [{"w": torch.randn(5, 7, generator=g), "b": torch.randn(7, generator=g)}
            for _ in range(n)]


def test_weights_are_a_weighted_mean_and_equal_weights_change_no_bit() -> None:
    two = deltas(2)
    agg = trainer.robust_aggregate(two, weights=[3.0, 1.0])
    for k in agg:
        assert torch.allclose(agg[k], 0.75 * two[0][k] + 0.25 * two[1][k], atol=1e-6)
    four = deltas(4, 1)
    plain = trainer.robust_aggregate(four)
    for w in ([1.0] * 4, [0.25] * 4):
        same = trainer.robust_aggregate(four, weights=w)
        assert all(torch.equal(same[k], plain[k]) for k in plain)  # bit for bit


def test_trimming_counts_deltas_not_weight_so_a_heavy_bad_delta_is_still_bounded() -> None:
    honest = deltas(4, 2)
    bad = {k: v * 1e6 for k, v in deltas(1, 99)[0].items()}
    for method in ("trimmed", "clip"):
        agg = trainer.robust_aggregate([*honest, bad], method=method,
                                       weights=[1.0, 1.0, 1.0, 1.0, 40.0])
        for k in agg:
            st = torch.stack([h[k] for h in honest])
            if method == "trimmed":  # within the honest range at every coordinate
                assert (agg[k] >= st.min(0).values - 1e-6).all()
                assert (agg[k] <= st.max(0).values + 1e-6).all()
            else:  # bounded, whatever the scale: far from what the bad delta pulls to
                assert agg[k].abs().max() < 100


def test_kept_values_are_weighted_by_their_own_delta() -> None:
    # One coordinate, four deltas: 0, 1, 3, 100. Trimming drops 0 and 100 (one each side
    # of four); 1 and 3 with their weights 1 and 2 give (1 + 6) / 3.
    ds = [{"x": torch.tensor([float(v)])} for v in (3, 0, 100, 1)]
    agg = trainer.robust_aggregate(ds, weights=[2.0, 5.0, 9.0, 1.0])
    assert agg["x"].item() == pytest.approx(7 / 3)


def test_bad_weights_are_refused() -> None:
    for bad in ([1.0], [1.0, 0.0], [1.0, float("nan")]):
        with pytest.raises(ValueError, match="weights"):
            trainer.robust_aggregate(deltas(2), weights=bad)
