"""``bench share`` on a CPU: real Ray Tune trials (one, then two at once) of a small DT's update loop."""

from __future__ import annotations

import pytest

from agents.bench_share import bench_share
from harness.errors import ConfigError


def test_bench_share_runs_each_trial_count_through_tune():
    result = bench_share({"trials": [2], "steps": 5, "warmup": 2, "n_layer": 1, "n_embd": 16, "n_head": 2,
                          "compile": False, "batch_size": 4})
    runs = {r["trials"]: r for r in result["runs"]}
    assert set(runs) == {1, 2}  # N = 1 is always measured: the ratios are to it
    assert len(runs[2]["per_trial_updates_per_s"]) == 2 and all(v > 0 for v in runs[2]["per_trial_updates_per_s"])
    assert runs[1]["aggregate_over_alone"] == 1.0
    assert runs[2]["aggregate_over_alone"] == pytest.approx(
        runs[2]["aggregate_updates_per_s"] / runs[1]["aggregate_updates_per_s"], rel=1e-2)


def test_bench_share_refuses_bad_settings_before_starting_ray():
    with pytest.raises(ConfigError, match="trials"):
        bench_share({"trials": [0]})
    with pytest.raises(ConfigError, match="stepz"):
        bench_share({"stepz": 5})
    with pytest.raises(ConfigError, match="compile_mode"):
        bench_share({"compile_mode": "fast"})
