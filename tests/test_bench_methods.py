"""``bench methods``' profile of a step by phase, and its settings for the GPU experiments of issue 21."""

from __future__ import annotations

import pytest

from harness.bench_methods import KERNEL_KINDS, PHASES, bench_methods, kernel_kind
from harness.errors import ConfigError
from harness.methods import low_rank

KINDS = [k for k, _ in KERNEL_KINDS] + ["other"]

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
    # where the time went, by kind: a DT step's matrix products and attention are found among its calls
    for phases in (full, ada):
        kinds = phases["time_by_kind_ms"]
        assert kinds.get("matmul", 0) > 0 and kinds.get("attention", 0) > 0 and set(kinds) <= set(KINDS)
        assert phases["kernel_ms"] == pytest.approx(sum(kinds.values()), abs=0.01)
        top = phases["top_kernels"]
        assert top and [t["ms"] for t in top] == sorted((t["ms"] for t in top), reverse=True)
        assert all(t["kind"] == kernel_kind(t["name"]) for t in top)


def test_kernel_kinds_from_cuda_kernel_and_aten_names():
    assert kernel_kind("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64") == "matmul"
    assert kernel_kind("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NTN") == "matmul"
    assert kernel_kind("aten::addmm") == "matmul"
    assert kernel_kind("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128>>") == "attention"
    assert kernel_kind("aten::_scaled_dot_product_flash_attention_for_cpu") == "attention"
    assert kernel_kind("triton_per_fused_native_layer_norm_0") == "fused"
    assert kernel_kind("aten::native_layer_norm") == "other"


def test_compile_mode_needs_compile():
    with pytest.raises(ConfigError, match="compile_mode"):
        bench_methods({**TINY_DT, "methods": ["full"], "compile_mode": "reduce-overhead"})
    with pytest.raises(ConfigError, match="compile_mode"):
        bench_methods({**TINY_DT, "methods": ["full"], "compile": True, "compile_mode": "fast"})


def test_rounds_time_every_method_in_each_round_and_report_median_and_spread():
    """Five timed steps in three rounds (2, 2, 1 steps): every method is timed once per round, its median
    lies within its spread, and full fine-tuning's own ratio is 1 in every round."""
    out = bench_methods({**TINY_DT, "methods": ["full", "lora", "vera"], "steps": 5, "rounds": 3})
    assert out["config"]["rounds"] == 3
    for name, row in out["methods"].items():
        assert len(row["ms_per_round"]) == 3, name
        assert row["ms_per_step_min"] <= row["ms_per_step"] <= row["ms_per_step_max"], row
        assert row["ms_per_step_min"] == pytest.approx(min(row["ms_per_round"]), abs=0.01)
        assert row["ms_per_step_max"] == pytest.approx(max(row["ms_per_round"]), abs=0.01)
        assert row["time_vs_full_min"] <= row["time_vs_full"] <= row["time_vs_full_max"], row
        assert row["time_vs_lora_min"] <= row["time_vs_lora"] <= row["time_vs_lora_max"], row
        assert row["trainable_params"] >= 0 and row["samples_per_s"] > 0
    full = out["methods"]["full"]
    assert full["time_vs_full"] == full["time_vs_full_min"] == full["time_vs_full_max"] == 1.0
    ratios = [m / f for m, f in zip(out["methods"]["vera"]["ms_per_round"], full["ms_per_round"])]
    assert out["methods"]["vera"]["time_vs_full"] == pytest.approx(sorted(ratios)[1], abs=2e-3)


@pytest.mark.parametrize("rounds, match", [(0, "rounds"), (-2, "rounds"), ("many", "rounds"), (3, "more than 'steps'=2")])
def test_bad_rounds_rejected_before_any_compute(rounds, match):
    # an unknown method beside the bad value: the rounds are checked first, before any model is built
    with pytest.raises(ConfigError, match=match):
        bench_methods({**TINY_DT, "methods": ["full", "no-such-method"], "rounds": rounds})


def test_each_methods_compiled_step_is_its_own_frame_and_a_graph_break_fails_loudly():
    """Two methods' steps compiled from one function: through own_frame each compiles once, so a second
    call of both needs no recompile (dynamo's fail_on_recompile stance would raise); through the shared
    function the second method's call is a recompile. A step that graph-breaks is refused."""
    import torch

    from harness.bench_methods import _dynamo_counts, check_compiled
    from harness.training import own_frame

    class Step:
        def __init__(self, k: float):
            self.k = k

        def loss(self, x):  # one code object for every instance, as Trainer._loss
            return (x * self.k).sum()

    x = torch.ones(3)
    torch._dynamo.reset()
    own = [torch.compile(own_frame(Step(k).loss, f"m{i}")) for i, k in enumerate((2.0, 3.0))]
    before = _dynamo_counts()
    assert [float(f(x)) for f in own] == [6.0, 9.0]
    check_compiled("m", before, _dynamo_counts())
    with torch.compiler.set_stance("fail_on_recompile"):
        assert [float(f(x)) for f in own] == [6.0, 9.0]
    torch._dynamo.reset()
    shared = [torch.compile(Step(k).loss) for k in (2.0, 3.0)]
    shared[0](x)
    with torch.compiler.set_stance("fail_on_recompile"), pytest.raises(RuntimeError, match="recompile"):
        shared[1](x)

    def breaks(x):
        y = x * 2
        torch._dynamo.graph_break()
        return y.sum()

    torch._dynamo.reset()
    before = _dynamo_counts()
    torch.compile(own_frame(breaks, "broken"))(x)
    with pytest.raises(RuntimeError, match="graph-broke"):
        check_compiled("broken", before, _dynamo_counts())
    torch._dynamo.reset()


def test_vera_merge_switches_veras_forward_for_the_run_only():
    """The tiny DT's 32-wide layers at VeRA's r=256 merge by default; vera_merge=false takes the low-rank
    path, which dispatches other forward ops; the module's rule is back after the run."""
    from harness.methods import fast_peft

    calls = {}
    for merge in (True, False):
        out = bench_methods({**TINY_DT, "methods": ["vera"], "profile": True, "profile_steps": 1,
                             "vera_merge": merge})
        assert out["config"]["vera_merge"] is merge and fast_peft.VERA_MERGE is None
        calls[merge] = out["methods"]["vera"]["phases"]["aten_calls"]["forward"]
    assert calls[True] != calls[False]


def test_matmul_precision_applies_to_the_run_only():
    import torch

    out = bench_methods({**TINY_DT, "methods": ["randlora"], "matmul_precision": "high"})
    assert out["config"]["matmul_precision"] == "high" and "ms_per_step" in out["methods"]["randlora"]
    assert torch.get_float32_matmul_precision() == "highest"
    with pytest.raises(ConfigError, match="matmul_precision"):
        bench_methods({**TINY_DT, "methods": ["full"], "matmul_precision": "medium"})


def test_sdpa_backends_pick_the_attention_kernel_for_the_run_only():
    """On the CPU the DT's attention (with dropout) runs SDPA's math path; limited to the memory-efficient
    kernel, which the CPU lacks, its step fails with torch's "no viable backend" (the choice reaches the
    model's attention), and the next run, without the setting, trains again."""

    def run(**extra):
        out = bench_methods({**TINY_DT, "methods": ["full"], "profile": True, "profile_steps": 1,
                             "profile_top": 500, **extra})
        return out["methods"]["full"]

    default = run()
    assert "aten::_scaled_dot_product_attention_math" in {t["name"] for t in default["phases"]["top_kernels"]}
    assert "no viable backend" in run(sdpa_backends=["efficient"])["error"].lower()
    assert "ms_per_step" in run(sdpa_backends=["math"]) and "ms_per_step" in run()
    with pytest.raises(ConfigError, match="sdpa_backends"):
        bench_methods({**TINY_DT, "methods": ["full"], "sdpa_backends": ["triton"]})


def test_inductor_settings_are_checked_before_compute_and_apply_to_the_run_only():
    import torch._inductor.config as inductor_config

    from harness.bench_methods import kernel_choices

    with pytest.raises(ConfigError, match="mix_order_reductio'.*similar"):
        bench_methods({**TINY_DT, "methods": ["full"], "compile": True,
                       "inductor": {"triton.mix_order_reductio": False}})
    with pytest.raises(ConfigError, match="takes a bool"):
        bench_methods({**TINY_DT, "methods": ["full"], "compile": True,
                       "inductor": {"triton.mix_order_reduction": "no"}})
    with pytest.raises(ConfigError, match="compile=true"):
        bench_methods({**TINY_DT, "methods": ["full"], "inductor": {"triton.mix_order_reduction": False}})
    before = inductor_config.triton.mix_order_reduction
    with kernel_choices({"triton.mix_order_reduction": not before}, None):
        assert inductor_config.triton.mix_order_reduction is (not before)
    assert inductor_config.triton.mix_order_reduction is before


def test_grouped_and_randlora_scales_switch_the_before_paths_for_the_run_only():
    """``grouped=false``, ``randlora_scales=peft`` and ``eager_in_place=false`` measure the code before
    issue 21's eager changes (each layer its own operands; peft's UniqueBaseGrad; LoRA's product added by
    a separate add), which dispatch other calls per step (on the tiny
    DT's pairs of layers about as many: the saving grows with the layers of a shape, tested in
    test_grouped_operands.py); the modules' defaults are back after the run."""
    from harness.methods import fast_peft, grouped_operands, low_rank

    calls = {}
    for before in (False, True):
        switches = {"grouped": False, "randlora_scales": "peft", "eager_in_place": False} if before else {}
        out = bench_methods({**TINY_DT, "methods": ["lora", "nola", "randlora"], "profile": True,
                             "profile_steps": 1, **switches})
        assert out["config"]["grouped"] is not before and out["config"]["eager_in_place"] is not before
        assert grouped_operands.GROUPED_EAGER and fast_peft.PLAIN_RANDLORA_SCALES and low_rank.EAGER_IN_PLACE
        calls[before] = {m: sum(r["phases"]["aten_calls"].values()) for m, r in out["methods"].items()}
    assert calls[False]["nola"] != calls[True]["nola"]
    assert calls[False]["randlora"] != calls[True]["randlora"]
    assert calls[False]["lora"] != calls[True]["lora"]
