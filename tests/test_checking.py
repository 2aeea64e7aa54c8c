"""protocol/checking.py: the verdict rules on a delta's measurements (no torch needed)."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocol import checking

METRICS = ("heldout_gain", "own_gain", "other_gain", "max_cosine_earlier", "rel_norm",
           "reexec_diff")


def test_judge_rules_and_overrides() -> None:
    ok = {"heldout_gain": 0.01, "own_gain": 0.2, "other_gain": 0.05, "max_cosine_earlier": 0.5,
          "rel_norm": 0.2, "reexec_match": None}
    assert checking.judge(ok) == ("accept", "ok")
    assert checking.judge({**ok, "heldout_gain": -1.1})[0] == "reject"
    assert checking.judge({**ok, "heldout_gain": -1.1}, {"min_heldout_gain": -2})[0] == "accept"
    assert checking.judge({**ok, "heldout_gain": math.nan})[0] == "reject"
    assert checking.judge({**ok, "other_gain": 0.71})[0] == "reject"  # 0.2 - 0.71 < -0.5
    assert checking.judge({**ok, "other_gain": 0.69})[0] == "accept"
    assert checking.judge({**ok, "other_gain": None}) == ("accept", "ok")  # lone delta
    assert checking.judge({**ok, "max_cosine_earlier": 0.99})[0] == "reject"
    assert checking.judge({**ok, "reexec_match": True, "reexec_diff": 0.0}) == ("accept", "ok")
    with pytest.raises(ValueError, match="unknown threshold"):
        checking.judge(ok, {"max_cosin": 0.5})


@given(st.dictionaries(st.sampled_from(METRICS),
                       st.none() | st.floats(allow_nan=True, allow_infinity=True)),
       st.none() | st.booleans())
def test_any_metrics_get_a_verdict(metrics: dict[str, float | None],
                                   reexec_match: bool | None) -> None:
    verdict, reason = checking.judge({**metrics, "reexec_match": reexec_match})
    assert verdict in ("accept", "reject") and reason
    if any(v is not None and not math.isfinite(v) for k, v in metrics.items()
           if k in ("heldout_gain", "own_gain", "other_gain")):
        assert verdict == "reject"
    if reexec_match is False:
        assert verdict == "reject"


@pytest.mark.parametrize("bad", [{"min_own_gain": math.inf}, {"max_cosine": True},
                                 {"reexec_tol": "0.1"}])
def test_bad_overrides_are_refused(bad: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        checking.judge_thresholds(bad)  # type: ignore[arg-type]
