"""``bench methods``' profile of a step by phase, and its settings for the GPU experiments of issue 21."""

from __future__ import annotations

import pytest

from harness.bench_methods import PHASES, bench_methods
from harness.errors import ConfigError
from harness.methods import low_rank

TINY_DT = {"model": "dt", "tiny": True, "steps": 2, "warmup": 1, "batch_size": 4}


def test_profile_splits_a_step_into_phases_and_finds_each_methods_own_work():
    """Full fine-tuning has no extra loss and no per-step hook; AdaLoRA's orthogonality penalty and rank
    allocator show up in exactly those phases, and its adapters add calls to the forward."""
    default = low_rank.RANK_ALIGN
    out = bench_methods({**TINY_DT, "methods": ["full", "adalora"], "profile": True, "profile_steps": 2,
                         "rank_align": 8})
    full, ada = out["methods"]["full"]["phases"], out["methods"]["adalora"]["phases"]
    for phases in (full, ada):
        assert set(phases["ms"]) == set(PHASES) and set(phases["aten_calls"]) == set(PHASES)
        assert all(v >= 0 for v in phases["ms"].values())
        assert phases["aten_calls"]["forward"] > 0 and phases["aten_calls"]["backward"] > 0
    assert full["aten_calls"]["extra_loss"] == 0 and full["aten_calls"]["on_step"] == 0
    assert ada["aten_calls"]["extra_loss"] > 0 and ada["aten_calls"]["on_step"] > 0
    assert ada["aten_calls"]["forward"] > full["aten_calls"]["forward"]
    assert out["config"]["rank_align"] == 8 and low_rank.RANK_ALIGN == default  # the module's value is restored


def test_compile_mode_needs_compile():
    with pytest.raises(ConfigError, match="compile_mode"):
        bench_methods({**TINY_DT, "methods": ["full"], "compile_mode": "reduce-overhead"})
    with pytest.raises(ConfigError, match="compile_mode"):
        bench_methods({**TINY_DT, "methods": ["full"], "compile": True, "compile_mode": "fast"})
