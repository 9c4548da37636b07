"""The PEFT-backed methods on a tiny model: loss falls, counts match the formulas, save/load and merge hold."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from harness.errors import ConfigError
from harness.methods import MethodContext, fast_peft, get_method
from tiny_models import SITE, Tiny

PEFT_METHODS = ["lora", "dora", "pissa", "olora", "adalora", "eva", "eva-dora", "vera", "randlora"]




def make_base(seed: int = 0) -> Tiny:
    torch.manual_seed(seed)
    return Tiny()


def data(n: int = 64):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 16, generator=g)
    y = torch.randn(n, 3, generator=g)
    return x, y


def ctx_for(total: int = 40) -> MethodContext:
    x, _ = data()
    return MethodContext(total_steps=total, init_batches=lambda: [x[i:i + 16] for i in range(0, 64, 16)],
                         forward_fn=lambda m, b: m(b))


def train(method, model, steps: int = 40, lr: float = 1e-2) -> list[float]:
    x, y = data()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    losses = []
    ctx = ctx_for(steps)
    for step in range(steps):
        loss = nn.functional.mse_loss(model(x), y)
        extra = method.extra_loss(model)
        total = loss + extra if extra is not None else loss
        total.backward()
        opt.step()
        method.on_step(model, step, ctx)
        opt.zero_grad()
        losses.append(float(loss.detach()))
    return losses


@pytest.mark.parametrize("name", PEFT_METHODS)
def test_peft_method_lifecycle(name, tmp_path):
    method = get_method(name)
    settings = method.resolve_settings({"r": 4} if name != "vera" else {"r": 8})
    model = method.wrap(make_base(), SITE, settings, ctx_for())
    before = model(data()[0]).detach()
    lr = {"vera": 3e-2, "randlora": 1e-3}.get(name, 1e-2)
    losses = train(method, model, lr=lr)
    assert losses[-1] < losses[0], f"{name}: loss did not fall {losses[0]:.4f} -> {losses[-1]:.4f}"
    own, head = method.count(model, SITE)
    assert head == 16 * 3 + 3
    assert own > 0
    model.eval()
    x = data()[0]
    out = model(x).detach()
    assert not torch.allclose(out, before)
    method.save(model, SITE, settings, tmp_path / "adapter")
    reloaded = method.load(make_base(), SITE, settings, tmp_path / "adapter").eval()
    torch.testing.assert_close(reloaded(x), out, atol=1e-5, rtol=1e-5)
    merged = method.merge(reloaded).eval()
    assert not any("lora" in n for n, _ in merged.named_modules())
    torch.testing.assert_close(merged(x), out, atol=1e-4, rtol=1e-4)


def test_lora_count_matches_formula():
    method = get_method("lora")
    model = method.wrap(make_base(), SITE, method.resolve_settings({"r": 4}), MethodContext())
    # two blocks, fc1 16->32 and fc2 32->16: r * (d_in + d_out) each
    assert method.count(model, SITE)[0] == 2 * (4 * (16 + 32) + 4 * (32 + 16))


def test_dora_adds_magnitude_vectors():
    lora = get_method("lora")
    dora = get_method("dora")
    n_lora = lora.count(lora.wrap(make_base(), SITE, lora.resolve_settings({"r": 4}), MethodContext()), SITE)[0]
    n_dora = dora.count(dora.wrap(make_base(), SITE, dora.resolve_settings({"r": 4}), MethodContext()), SITE)[0]
    assert n_dora - n_lora == 2 * (32 + 16)  # one magnitude per output feature of each adapted layer


def test_full_and_linear_counts():
    full, linear = get_method("full"), get_method("linear")
    n_all = sum(p.numel() for p in make_base().parameters())
    own, head = full.count(full.wrap(make_base(), SITE, {}, MethodContext()), SITE)
    assert own + head == n_all and head == 51
    assert linear.count(linear.wrap(make_base(), SITE, {}, MethodContext()), SITE) == (0, 51)


def test_eva_reports_rank_distribution():
    method = get_method("eva")
    model = method.wrap(make_base(), SITE, method.resolve_settings({"r": 4, "rho": 2.0}), ctx_for())
    ranks = method.describe(model)["rank_per_layer"]
    assert ranks and all(0 <= r <= 8 for r in ranks.values())
    assert sum(ranks.values()) <= 4 * 4  # the total budget: r per layer on average


def test_bad_settings_fail_before_training():
    with pytest.raises(ConfigError, match="unknown setting.*'rank'.*valid"):
        get_method("lora").resolve_settings({"rank": 4})
    with pytest.raises(ConfigError, match="rank r=64 is larger than layer"):
        m = get_method("lora")
        m.wrap(make_base(), SITE, m.resolve_settings({"r": 64}), MethodContext())
    with pytest.raises(ConfigError, match="unknown method 'lorra'.*did you mean 'lora'"):
        get_method("lorra")
    with pytest.raises(ConfigError, match="'r'='eight': expected an integer"):
        get_method("lora").resolve_settings({"r": "eight"})


@pytest.mark.parametrize("name", PEFT_METHODS)
def test_no_input_casts_match_peft_outputs_and_gradients(name):
    """The harness turns off peft's input casts (a bf16 copy cast to fp32 and straight back under
    autocast) except where they change the numbers (DoRA, RandLoRA); under bf16 autocast outputs and
    gradients equal peft's own path, casts on."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    method = get_method(name)
    # the built-ins that declare themselves pure matmuls run without peft's casts; the rest keep them
    assert method.input_casts == (name in ("dora", "eva-dora", "randlora"))
    x, y = data()
    results = []
    for casts in (True, method.input_casts):  # peft's own path, then the harness's
        settings = method.resolve_settings({"r": 4} if name == "randlora" else {})  # the tiny layers are 16 wide
        model = method.wrap(make_base(), SITE, settings, ctx_for())
        with torch.no_grad():  # non-zero adapters, the same in both runs
            g = torch.Generator().manual_seed(3)
            for n, p in sorted(model.named_parameters()):
                if p.requires_grad:
                    p.add_(0.05 * torch.randn(p.shape, generator=g))
        fast_peft.disable(model)  # the casts matter on peft's forward (fallbacks, RandLoRA)
        layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
        assert layers and all(m.cast_input_dtype_enabled == method.input_casts for m in layers)  # wrap's choice
        for m in layers:
            m.cast_input_dtype_enabled = casts
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
        nn.functional.mse_loss(out.float(), y).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        results.append((out.detach(), grads))
    (out_peft, g_peft), (out_ours, g_ours) = results
    assert torch.equal(out_peft, out_ours)
    assert g_peft.keys() == g_ours.keys() and all(torch.allclose(g_peft[k], g_ours[k], atol=1e-6) for k in g_peft)
