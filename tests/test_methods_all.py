"""Every registered method on the real tiny DT and a tiny timm ViT: the loss falls, the trainable count
equals the method's formula, save -> load gives identical outputs, and merge equals unmerged."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from harness.methods import AdapterSite, MethodContext, get_method, method_names

SETTINGS = {
    "lora": {"r": 2}, "dora": {"r": 2}, "pissa": {"r": 2}, "olora": {"r": 2}, "adalora": {"r": 2},
    "eva": {"r": 2, "rho": 2.0}, "eva-dora": {"r": 2, "rho": 2.0}, "vera": {"r": 16}, "randlora": {"r": 8},
    "nola": {"k": 16, "l": 16}, "glora": {"ranks": [2], "subnet": "largest"}, "eigenlora": {"k": 2, "r": 1},
}
LR = {"full": 1e-3, "linear": 1e-2, "vera": 3e-2, "randlora": 3e-3, "eigenlora": 3e-2, "nola": 1e-2}


def dt_setup():
    from agents.dt import SITE, DecisionTransformer, DTConfig, batch_loss, forward_batch

    torch.manual_seed(0)
    model = DecisionTransformer(DTConfig(n_layer=1, n_head=2, n_embd=32, context=4, dropout=0.0))
    g = torch.Generator().manual_seed(1)
    B, K = 8, 4
    mask = torch.ones(B, K)
    mask[:2, :1] = 0  # some left padding, as the sampler makes
    batch = {"states": torch.randn(B, K, 39, generator=g), "actions": torch.rand(B, K, 4, generator=g) * 2 - 1,
             "returns_to_go": torch.rand(B, K, 1, generator=g), "rewards": torch.rand(B, K, 1, generator=g),
             "timesteps": torch.arange(K).repeat(B, 1), "attention_mask": mask}
    return model, SITE, batch, batch_loss, forward_batch


def vit_setup():
    import timm

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2,
                              num_classes=5, drop_path_rate=0.0)
    site = AdapterSite(targets=("qkv", "attn.proj", "fc1", "fc2"), head=("head",))
    g = torch.Generator().manual_seed(1)
    batch = (torch.randn(8, 3, 32, 32, generator=g), torch.arange(8) % 5)

    def loss_fn(m, b):
        return nn.functional.cross_entropy(m(b[0]), b[1])

    return model, site, batch, loss_fn, lambda m, b: m(b[0])


SETUPS = {"dt": dt_setup, "vit": vit_setup}


def linears(model, site):
    return [(m.in_features, m.out_features) for _, m in site.target_linears(model)]


def formula(name: str, settings: dict, shapes, total: int, head: int, described: dict) -> int:
    """Trainable parameters as the papers count them (head excluded), from the layer shapes alone."""
    s = settings
    if name == "full":
        return total - head
    if name == "linear":
        return 0
    if name in ("lora", "pissa", "olora"):
        return sum(s["r"] * (i + o) for i, o in shapes)
    if name == "dora":
        return sum(s["r"] * (i + o) + o for i, o in shapes)
    if name == "adalora":
        r0 = s["r"] + s["init_r_extra"]
        return sum(r0 * (i + o + 1) for i, o in shapes)
    if name in ("eva", "eva-dora"):
        ranks = list(described["rank_per_layer"].values())
        assert len(ranks) == len(shapes) and sum(ranks) == s["r"] * len(shapes)  # the budget is kept
        dora = name == "eva-dora"
        return sum(r * (i + o) + (o if dora and r else 0) for r, (i, o) in zip(ranks, shapes))
    if name == "vera":
        return sum(s["r"] + o for i, o in shapes)
    if name == "randlora":
        return sum(s["r"] * math.ceil(min(i, o) / s["r"]) + math.ceil(min(i, o) / s["r"]) * min(i, o)
                   for i, o in shapes)
    if name == "nola":
        return len(shapes) * (s["k"] + s["l"])
    if name == "glora":  # largest subnet: A, B LoRA r(d_in + d_out), C LoRA r(d_in + 1), D and E vectors
        r = max(s["ranks"])
        return sum(2 * r * (i + o) + r * (i + 1) + 2 * o for i, o in shapes)
    if name == "eigenlora":
        return len(shapes) * 2 * s["k"] * s["r"]
    raise AssertionError(f"no formula for {name}")


def make_bank(setup, folder) -> list[str]:
    lora = get_method("lora")
    paths = []
    for i in range(3):
        model, site, *_ = setup()
        settings = lora.resolve_settings({"r": 2})
        wrapped = lora.wrap(model, site, settings, MethodContext())
        with torch.no_grad():
            for n, p in wrapped.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.05, generator=torch.Generator().manual_seed(i))
        lora.save(wrapped, site, settings, folder / f"a{i}")
        paths.append(str(folder / f"a{i}"))
    return paths


@pytest.mark.parametrize("track", ["dt", "vit"])
@pytest.mark.parametrize("name", method_names())
def test_method_on_real_models(name, track, tmp_path):
    setup = SETUPS[track]
    method = get_method(name)
    settings = method.resolve_settings(SETTINGS.get(name, {}))
    model, site, batch, loss_fn, forward = setup()
    shapes = linears(model, site)
    total = sum(p.numel() for p in model.parameters())
    head = sum(p.numel() for n, p in model.named_parameters() if site.is_head_param(n))
    bank = make_bank(setup, tmp_path / "bank") if "lora" in method.builds_on else []
    ctx = MethodContext(total_steps=30, init_batches=lambda: [batch] * 4, forward_fn=forward,
                        validate=lambda m: -float(loss_fn(m, batch)), adapter_bank=bank)
    model = method.wrap(model, site, settings, ctx)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR.get(name, 1e-2),
                            weight_decay=0.0)
    losses = []
    for step in range(30):
        loss = loss_fn(model, batch)
        extra = method.extra_loss(model)
        (loss + extra if extra is not None else loss).backward()
        opt.step()
        method.on_step(model, step, ctx)
        opt.zero_grad()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0], f"{name} on {track}: loss {losses[0]:.4f} -> {losses[-1]:.4f}"
    model = method.finalize(model, site, settings, ctx).eval()
    own, head_count = method.count(model, site)
    assert head_count == head
    assert own == formula(name, settings, shapes, total, head, method.describe(model))

    with torch.no_grad():
        out = forward(model, batch)
    method.save(model, site, settings, tmp_path / "saved")
    fresh, *_ = setup()
    reloaded = method.load(fresh, site, settings, tmp_path / "saved", ctx).eval()
    with torch.no_grad():
        torch.testing.assert_close(forward(reloaded, batch), out, atol=1e-5, rtol=1e-5)
        merged = method.merge(reloaded).eval()
        torch.testing.assert_close(forward(merged, batch), out, atol=1e-4, rtol=1e-4)
    assert not any(p.requires_grad is False and "lora" in n for n, p in merged.named_parameters())
