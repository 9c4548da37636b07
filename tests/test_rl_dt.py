"""RL track: the Decision Transformer (shapes, causality, padding, learning, PEFT) and the training loop."""

from __future__ import annotations

import pytest
import torch

from harness.errors import NonFiniteLossError


def tiny_cfg(**kw):
    from agents.dt import DTConfig

    return DTConfig(**{"n_layer": 2, "n_head": 2, "n_embd": 32, "context": 6, "dropout": 0.0, **kw})


def batch(B=4, K=6, seed=0, pad=None):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(B, K, dtype=torch.bool)
    if pad:
        mask[0, :pad] = False
    return {"states": torch.randn(B, K, 39, generator=g), "actions": torch.rand(B, K, 4, generator=g) * 2 - 1,
            "returns_to_go": torch.rand(B, K, 1, generator=g), "rewards": torch.rand(B, K, 1, generator=g),
            "timesteps": torch.arange(K).repeat(B, 1), "attention_mask": mask}


def test_shapes_and_site():
    from agents.dt import SITE, DecisionTransformer, forward_batch

    m = DecisionTransformer(tiny_cfg()).eval()
    out = forward_batch(m, batch())
    assert out.shape == (4, 6, 4) and out.abs().max() <= 1
    names = [n for n, _ in SITE.target_linears(m)]
    assert "blocks.0.attn.qkv" in names and "blocks.1.mlp.fc2" in names and len(names) == 8
    assert not any(n.startswith("embed") for n in names)
    assert SITE.is_head_param("action_head.weight")


def test_paper_scale_size():
    from agents.dt import DTConfig, DecisionTransformer

    n = DecisionTransformer(DTConfig()).num_params()
    assert 12e6 < n < 16e6  # "about 12-16M parameters"


def test_causal_action_independent_of_future():
    from agents.dt import DecisionTransformer, forward_batch

    torch.manual_seed(0)  # the weights: a fixed draw
    m = DecisionTransformer(tiny_cfg()).eval()
    b = batch()
    out = forward_batch(m, b)
    b2 = {k: v.clone() for k, v in b.items()}
    t = 3
    b2["states"][:, t + 1:] += 5.0
    b2["returns_to_go"][:, t + 1:] += 5.0
    b2["actions"][:, t:] += 5.0  # a_t itself comes after the R_t token
    b2["rewards"][:, t:] += 5.0
    out2 = forward_batch(m, b2)
    assert torch.allclose(out[:, : t + 1], out2[:, : t + 1], atol=1e-5)
    assert not torch.allclose(out[:, t + 1:], out2[:, t + 1:], atol=1e-3)
    b3 = {k: v.clone() for k, v in b.items()}
    b3["states"][:, t] += 5.0  # s_t is seen by R_t
    # at initialisation the action moves by only ~1e-4 (small weights); unseen tokens move it by exactly 0
    assert not torch.allclose(forward_batch(m, b3)[:, t], out[:, t], atol=1e-6)


def test_padding_is_ignored():
    from agents.dt import DecisionTransformer, forward_batch

    m = DecisionTransformer(tiny_cfg()).eval()
    b = batch(pad=2)
    out = forward_batch(m, b)
    b2 = {k: v.clone() for k, v in b.items()}
    b2["states"][0, :2] = 100.0
    out2 = forward_batch(m, b2)
    assert torch.isfinite(out).all()
    assert torch.allclose(out[0, 2:], out2[0, 2:], atol=1e-5)


def test_loss_decreases_and_nonfinite_raises(tmp_path):
    from agents.dt import DecisionTransformer, batch_loss, batch_to_device
    from harness.training import LoopConfig, load_checkpoint, train

    cpu = torch.device("cpu")
    torch.manual_seed(0)
    m = DecisionTransformer(tiny_cfg())
    fixed = batch_to_device({k: v.numpy() for k, v in batch(B=8, pad=2).items()}, cpu)
    losses = []
    stats = train(m, batch_loss, lambda: fixed,
                  LoopConfig(steps=60, lr=3e-3, warmup=10, report_every=5, checkpoint=tmp_path / "ck.pt"),
                  cpu, report=lambda r: losses.append(r["loss"]))
    assert losses[-1] < 0.5 * losses[0] and stats.final_loss == losses[-1]
    assert load_checkpoint(tmp_path / "ck.pt", m) == 60
    # Resuming a finished run does no more updates.
    again = train(m, batch_loss, lambda: fixed, LoopConfig(steps=60, lr=3e-3, checkpoint=tmp_path / "ck.pt"), cpu)
    assert again.resumed_from == 60
    # A garbage partial checkpoint is discarded with a warning naming it, and training starts over.
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.warns(UserWarning, match=r"bad\.pt is unreadable"):
        fresh = train(m, batch_loss, lambda: fixed, LoopConfig(steps=3, lr=3e-3, checkpoint=tmp_path / "bad.pt"), cpu)
    assert fresh.resumed_from == 0 and load_checkpoint(tmp_path / "bad.pt", m) == 3
    bad = dict(fixed)
    bad["actions"] = fixed["actions"].clone()
    bad["actions"][0, -1, 0] = float("nan")
    with pytest.raises(NonFiniteLossError):
        train(DecisionTransformer(tiny_cfg()), batch_loss, lambda: bad, LoopConfig(steps=5, lr=1e-4), cpu)
    with pytest.raises(NonFiniteLossError):
        train(DecisionTransformer(tiny_cfg()), batch_loss, lambda: fixed, LoopConfig(steps=20, lr=1e30), cpu)


def test_works_through_peft():
    from peft import LoraConfig, get_peft_model

    from agents.dt import SITE, DecisionTransformer, batch_loss, forward_batch

    m = DecisionTransformer(tiny_cfg()).eval()
    ref = forward_batch(m, batch())
    pm = get_peft_model(m, LoraConfig(r=2, target_modules=list(SITE.targets)))
    assert torch.allclose(forward_batch(pm, batch()), ref, atol=1e-6)  # LoRA starts as the identity
    batch_loss(pm, batch()).backward()
    assert all(p.grad is not None for n, p in pm.named_parameters() if p.requires_grad)


def _masked_reference(model, b):
    """The DT's forward as it was before the rotation: a boolean causal + padding mask in every block."""
    from agents.dt import TOKENS_PER_STEP, token_attention_mask

    x = model.embed(b["states"], b["actions"], b["returns_to_go"], b["rewards"], b["timesteps"])
    mask = token_attention_mask(b["attention_mask"], x.shape[1])
    for block in model.blocks:
        x = block(x, mask)
    return torch.tanh(model.action_head(model.norm_f(x)[:, 1::TOKENS_PER_STEP]))


def test_rotated_padding_equals_the_padding_mask_on_real_steps():
    """Left-padded windows through the causal flag (rotated) give the loss, the real steps' actions and
    every gradient of the boolean-mask attention, in float32."""
    from agents.dt import DecisionTransformer, batch_loss, dt_loss, forward_batch

    torch.manual_seed(0)
    model = DecisionTransformer(tiny_cfg()).train()  # dropout 0: both paths are deterministic
    b = batch(B=5)
    b["attention_mask"][0, :4] = False  # windows padded by 4, 1, 0, 5 and 2 steps
    b["attention_mask"][1, :1] = False
    b["attention_mask"][3, :5] = False
    b["attention_mask"][4, :2] = False
    for k in ("states", "actions", "returns_to_go", "rewards"):
        b[k] = b[k] * b["attention_mask"].unsqueeze(-1)
    real = b["attention_mask"]

    def grads(loss):
        model.zero_grad()
        loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    out, ref = forward_batch(model, b), _masked_reference(model, b)
    torch.testing.assert_close(out[real], ref[real], atol=1e-6, rtol=1e-5)
    g_new = grads(batch_loss(model, b))
    g_ref = grads(dt_loss(_masked_reference(model, b), b["actions"], real))
    for n in g_ref:
        torch.testing.assert_close(g_new[n], g_ref[n], atol=1e-6, rtol=1e-4, msg=n)
    assert any(g.abs().sum() > 0 for g in g_ref.values())


def test_layer_tokens_are_the_real_steps_inside_the_blocks():
    """EVA's layer inputs: exactly the real tokens, whatever order the blocks see them in."""
    from agents.dt import DecisionTransformer, TOKENS_PER_STEP, layer_tokens

    model = DecisionTransformer(tiny_cfg()).eval()
    b = batch(B=3, pad=4)
    seen = []
    handle = model.blocks[0].attn.qkv.register_forward_hook(lambda m, i, o: seen.append(layer_tokens(i, b)))
    with torch.no_grad():
        from agents.dt import forward_batch

        forward_batch(model, b)
    handle.remove()
    x = model.embed(b["states"], b["actions"], b["returns_to_go"], b["rewards"], b["timesteps"])
    expected = model.blocks[0].ln1(x)[b["attention_mask"].repeat_interleave(TOKENS_PER_STEP, dim=1)]
    assert seen[0].shape == expected.shape == (3 * 6 * 4 - 4 * 4, 32)
    # the same rows, up to order
    torch.testing.assert_close(seen[0].sort(0).values, expected.detach().sort(0).values)


def test_bench_methods_runs_on_the_dt():
    """`bench methods --set model=dt` on a tiny DT: every listed method timed against full fine-tuning in
    the same run, no method failing; ViT-only settings refused before any compute."""
    from harness.bench_methods import bench_methods
    from harness.errors import ConfigError

    methods = ["full", "lora", "adalora", "randlora", "glora", "eigenlora", "eva"]
    out = bench_methods({"model": "dt", "tiny": True, "methods": methods, "steps": 2, "warmup": 1, "batch_size": 4})
    assert list(out["methods"]) == methods and out["config"]["model"] == "dt"
    for name, row in out["methods"].items():
        assert "error" not in row, (name, row)
        assert row["ms_per_step"] > 0 and row["samples_per_s"] > 0 and row["time_vs_full"] > 0, name
    assert out["methods"]["full"]["time_vs_full"] == 1.0
    assert 0 < out["methods"]["eigenlora"]["trainable_params"] < out["methods"]["lora"]["trainable_params"]
    with pytest.raises(ConfigError, match="img_size"):
        bench_methods({"model": "dt", "img_size": 32})


def test_padded_update_compiles_once():
    """The rotation keeps the padded update one graph: no graph break and no recompile when the padding
    of the windows changes (it is data on the device, never read back)."""
    from torch._dynamo.testing import CompileCounter

    from agents.dt import DecisionTransformer, batch_loss

    torch._dynamo.reset()
    model = DecisionTransformer(tiny_cfg()).train()
    counter = CompileCounter()
    loss_fn = torch.compile(batch_loss, backend=counter)
    for pad in (None, 2, 5):
        loss_fn(model, batch(pad=pad)).backward()
    assert counter.frame_count == 1, counter.frame_count
    torch._dynamo.reset()


def test_glora_search_scores_windows_under_the_trials_autocast(monkeypatch):
    """The search's validation forward runs under the autocast the trial trains and rolls out under (bf16 on a
    GPU: an fp32 forward there cost each candidate several training steps), in eval mode, and scores minus the
    mean action MSE over the windows."""
    import contextlib

    import agents.track as rl_track
    from agents.dt import DecisionTransformer, batch_loss

    entered = []

    @contextlib.contextmanager
    def recording(device):
        entered.append(torch.device(device))
        yield

    monkeypatch.setattr(rl_track, "autocast", recording)
    torch.manual_seed(0)
    m = DecisionTransformer(tiny_cfg(dropout=0.3)).train()
    windows = [batch(seed=1), batch(seed=2, pad=3)]
    score = rl_track.window_score(m, windows, torch.device("cpu"))
    assert entered == [torch.device("cpu")]
    assert m.training  # the mode is restored
    with torch.no_grad():
        expected = -sum(float(batch_loss(m.eval(), b)) for b in windows) / len(windows)
    assert score == pytest.approx(expected, rel=1e-12)  # eval mode: dropout off, so the same numbers


def test_bf16_residual_stream_under_autocast_only():
    """``residual_dtype="bfloat16"`` carries the blocks' stream in bf16 under bf16 autocast, forward and
    gradients, and stays close to the fp32 stream with the same weights; without autocast it is the fp32 model
    exactly, since fp32 weights cannot take a bf16 stream."""
    from agents.dt import DecisionTransformer, forward_batch

    torch.manual_seed(0)
    fp32 = DecisionTransformer(tiny_cfg()).eval()
    bf16 = DecisionTransformer(tiny_cfg(residual_dtype="bfloat16")).eval()
    bf16.load_state_dict(fp32.state_dict())
    b = batch(pad=2)
    seen: dict[str, list] = {"in": [], "grad": []}
    bf16.blocks[1].register_forward_pre_hook(lambda mod, args: seen["in"].append(args[0].dtype))
    bf16.blocks[1].register_full_backward_hook(lambda mod, gin, gout: seen["grad"].append(gout[0].dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want, got = forward_batch(fp32, b), forward_batch(bf16, b)
    got.float().sum().backward()
    assert seen == {"in": [torch.bfloat16], "grad": [torch.bfloat16]}
    assert not torch.equal(got, want)  # the stream's rounding shows
    assert torch.allclose(got.float(), want.float(), atol=2e-2)
    seen["in"].clear()
    with torch.no_grad():
        assert torch.equal(forward_batch(bf16, b), forward_batch(fp32, b))
    assert seen["in"] == [torch.float32]


def test_residual_dtype_keeps_old_keys_and_is_checked():
    """The default fp32 stream leaves the settings dict (a base's cache key and file metadata) as it was
    before the setting existed; bf16 changes it; a bad name is refused with the valid ones."""
    from agents.dt import DTConfig
    from harness.errors import ConfigError

    plain = DTConfig().to_dict()
    assert "residual_dtype" not in plain and DTConfig(**plain) == DTConfig()
    bf16 = DTConfig(residual_dtype="bfloat16")
    assert bf16.to_dict() == {**plain, "residual_dtype": "bfloat16"} and DTConfig(**bf16.to_dict()) == bf16
    assert "residual=bfloat16" in bf16.describe() and "residual" not in DTConfig().describe()
    with pytest.raises(ConfigError, match="float32, bfloat16"):
        DTConfig(residual_dtype="float16")


def test_bench_methods_dt_fields():
    """``bench methods --set dt={...}`` times a DT with those fields (here the bf16 stream, no dropout) and
    gives full fine-tuning's TFLOP/s from the model's FLOPs; an unknown field, a wrong type and ``dt`` without
    ``model=dt`` are refused before any model is built."""
    from agents.dt import flops_per_step
    from harness.bench_methods import bench_methods, dt_config
    from harness.errors import ConfigError

    given = {"residual_dtype": "bfloat16", "dropout": 0.0}
    out = bench_methods({"model": "dt", "tiny": True, "methods": ["full", "lora"], "steps": 2, "warmup": 1,
                         "batch_size": 4, "dt": given})
    cfg = dt_config({"tiny": True, "dt": given})
    assert cfg.residual_dtype == "bfloat16" and cfg.dropout == 0.0 and cfg.n_embd == 32
    assert out["config"]["dt"] == given and out["full_flops_per_step"] == flops_per_step(cfg, 4)
    full = out["methods"]["full"]
    assert full["tflops_per_s"] == round(flops_per_step(cfg, 4) / full["ms_per_step"] / 1e9, 1)
    assert "tflops_per_s" not in out["methods"]["lora"]
    with pytest.raises(ConfigError, match="no field 'width'.*n_embd"):
        bench_methods({"model": "dt", "dt": {"width": 64}})
    with pytest.raises(ConfigError, match="'dt'="):
        bench_methods({"model": "dt", "dt": {"dropout": "high"}})
    with pytest.raises(ConfigError, match="add model=dt"):
        bench_methods({"dt": {"dropout": 0.0}})
