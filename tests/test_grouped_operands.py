"""Issue 21 (eager steps): same-shape adapted layers prepare their operands together (GroupedOperands).

Grouped and per-layer eager forwards must give the same outputs and gradients, GLoRA's drawn forms
included (on the CPU the grouped draw yields the per-layer draws' numbers); the grouped path must run,
with fewer dispatches; operands are handed out once, so a layer called on its own computes its own."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from harness.bench_methods import top_level_aten_call
from harness.methods import MethodContext, get_method, grouped_operands
from harness.methods.adapted_layers import AdaptedLinear
from harness.methods.grouped_operands import GroupsOperands
from test_methods_own import random_lora_file
from tiny_models import SITE, Tiny

SETTINGS = {"nola": {"k": 64, "l": 64, "r": 2}, "glora": {"ranks": [4, 2]}, "eigenlora": {"k": 2, "r": 2},
            "adalora": {"r": 4}}


def _wrapped(name: str, tmp_path, seed: int = 0, depth: int = 3) -> nn.Module:
    """``name`` on the tests' MLP of ``depth`` blocks (its fc1 and its fc2 layers each a group of ``depth``),
    with trained-looking adapters. Not a ViT: its LayerNorms cancel any update that shifts all of a
    layer's outputs alike (GLoRA's scalar forms), so a wrong such term would go unseen."""
    method = get_method(name)
    torch.manual_seed(seed)
    model = Tiny(depth=depth)
    settings = dict(SETTINGS[name])
    if name == "eigenlora":
        layers = [(n, m.in_features, m.out_features) for n, m in SITE.target_linears(model)]
        bank = tmp_path / "bank"
        bank.mkdir(exist_ok=True)
        for i in range(3):
            random_lora_file(bank / f"t{i}.safetensors", layers, rank=2, seed=i, std=0.1)
        settings["bank_dir"] = str(bank)
    model = method.wrap(model, SITE, method.resolve_settings(settings), MethodContext(seed=seed, total_steps=10))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # trained-looking adapters: every term of the update non-zero
        for _, p in sorted(model.named_parameters()):
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


def _step(model: nn.Module, grouped: bool, monkeypatch, train: bool = True):
    monkeypatch.setattr(grouped_operands, "GROUPED_EAGER", grouped)
    model.train(train)
    model.zero_grad()
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(5))
    torch.manual_seed(7)  # GLoRA's draws
    out = model(x)
    out.square().mean().backward()
    forms = [m.active_form() for m in model.modules() if hasattr(m, "active_form")]
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, forms


# fixed GLoRA forms that between them take every choice of every tensor, one per layer in turn
FORMS = ["A=scalar,B=lora2,C=vector,D=scalar,E=vector", "A=vector,B=scalar,C=lora4,D=vector,E=scalar",
         "A=lora2,B=vector,C=none,D=none,E=vector", "A=none,B=lora4,C=lora2,D=scalar,E=none",
         "A=lora4,B=none,C=vector,D=vector,E=scalar"]


@pytest.mark.parametrize("name", ["nola", "eigenlora", "glora", "glora-fixed", "glora-batched-weights",
                                  "glora-fixed-batched-weights", "adalora"])
@pytest.mark.parametrize("train", [True, False])
def test_grouped_operands_match_each_layers_own(name, train, tmp_path, monkeypatch):
    """glora-fixed: every layer a fixed form of its own (every choice of every tensor taken), where drawn
    forms may miss some; -batched-weights: GLoRA's W' built for the whole group as well, as on CUDA."""
    from harness.methods.glora import GLoRALinear, LayerForm, form_choices

    if "batched-weights" in name:
        monkeypatch.setattr(GLoRALinear, "BATCHED_WEIGHTS", True)
    fixed = "fixed" in name
    name = name.split("-")[0] if name.startswith("glora") else name
    calls = []
    kind = type(next(m for m in _wrapped(name, tmp_path).modules() if isinstance(m, GroupsOperands)))
    assert kind.groups_operands()
    real = kind.group_operands.__func__
    monkeypatch.setattr(kind, "group_operands", classmethod(lambda cls, layers: calls.append(len(layers))
                                                           or real(cls, layers)))
    def model() -> nn.Module:
        wrapped = _wrapped(name, tmp_path)
        if fixed:
            layers = [m for m in wrapped.modules() if isinstance(m, GLoRALinear)]
            for i, layer in enumerate(layers):
                layer.form = LayerForm.parse(FORMS[i % len(FORMS)], form_choices(layer.ranks))
        return wrapped

    out_1, grads_1, forms_1 = _step(model(), False, monkeypatch, train)
    assert not calls
    out_g, grads_g, forms_g = _step(model(), True, monkeypatch, train)
    assert calls == [3, 3]  # fc1 and fc2 of the three blocks
    assert forms_g == forms_1
    if name == "glora" and (train or fixed):
        assert len(set(forms_g)) > 1  # drawn or fixed, per layer
    torch.testing.assert_close(out_g, out_1, rtol=1e-4, atol=1e-5 * float(out_1.abs().max()))
    assert grads_g.keys() == grads_1.keys() and len(grads_g) > 8
    # fp32 sums in another order: relative to each gradient's norm, or to the largest where that is
    # larger: the gradient of a scalar form (GLoRA's B_d[0, 0]) sums a whole weight-sized gradient, which
    # nearly cancels, so its rounding is that of the large terms (a wrong term is off by O(1) of them)
    floor = max(float(g.norm()) for g in grads_1.values())
    for k in grads_1:
        assert float((grads_g[k] - grads_1[k]).norm()) <= 1e-4 * max(float(grads_1[k].norm()), floor), k


def test_operands_are_handed_out_once(tmp_path, monkeypatch):
    """A layer called on its own after a whole-model forward computes its own operands: what the pre-hook
    prepared for that forward was consumed by it."""
    monkeypatch.setattr(grouped_operands, "GROUPED_EAGER", True)
    model = _wrapped("nola", tmp_path)
    layer = model.blocks[0].fc1
    model(torch.randn(2, 16))
    assert all(m._operands is None for m in model.modules() if isinstance(m, AdaptedLinear))
    seen = []
    real = type(layer).factors_t
    monkeypatch.setattr(type(layer), "factors_t", lambda self: seen.append(self) or real(self))
    layer(torch.randn(5, layer.in_features))
    assert seen == [layer]


def test_grouping_saves_dispatches(tmp_path, monkeypatch):
    """What the grouping is for: fewer top-level aten calls per training step (the eager step's host cost),
    the more so the more layers share a shape (eight here; twelve on ViT-B)."""
    from torch.profiler import ProfilerActivity, profile

    def calls(grouped: bool) -> int:
        monkeypatch.setattr(grouped_operands, "GROUPED_EAGER", grouped)
        model = _wrapped("glora", tmp_path, depth=8).train()
        x = torch.randn(2, 16)
        model(x).sum().backward()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            model(x).sum().backward()
        return sum(map(top_level_aten_call, prof.events()))

    grouped, alone = calls(True), calls(False)
    assert grouped < 0.8 * alone, (grouped, alone)


def test_glora_batched_weights_under_autocast(tmp_path, monkeypatch):
    """Under bf16 autocast a group's W' is cast once for the group (as each layer's F.linear would cast
    it): the outputs and gradients are those of the per-layer forward, to bf16's rounding."""
    from harness.methods.glora import GLoRALinear

    monkeypatch.setattr(GLoRALinear, "BATCHED_WEIGHTS", True)

    def run(grouped: bool):
        monkeypatch.setattr(grouped_operands, "GROUPED_EAGER", grouped)
        model = _wrapped("glora", tmp_path).train()
        x = torch.randn(8, 16, generator=torch.Generator().manual_seed(5))
        torch.manual_seed(7)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
        out.float().square().mean().backward()
        return out.detach().float(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    (out_1, grads_1), (out_g, grads_g) = run(False), run(True)
    assert out_g.dtype == out_1.dtype
    assert float((out_g - out_1).norm()) <= 1e-2 * float(out_1.norm())
    floor = max(float(g.norm()) for g in grads_1.values())
    for k in grads_1:
        assert float((grads_g[k] - grads_1[k]).norm()) <= 1e-2 * max(float(grads_1[k].norm()), floor), k


@pytest.mark.parametrize("case", ["shared", "one-disabled"])
def test_adalora_penalty_takes_the_groups_stacks(case, tmp_path, monkeypatch):
    """A grouped training forward keeps its groups' stacked P and Q for AdaLoRA's orthogonality penalty,
    which takes them (nothing stays on the layers); loss and gradients are those of the per-layer forward
    with the penalty's own stacks. one-disabled: a layer with its adapter off (peft's forward) is in no
    group's stack, so the penalty stacks its own matrices."""
    from harness.methods import peft_methods

    method = get_method("adalora")
    used = []
    real = peft_methods._grouped_penalty
    monkeypatch.setattr(peft_methods, "_grouped_penalty", lambda groups: used.append("own") or real(groups))

    def run(grouped: bool):
        monkeypatch.setattr(grouped_operands, "GROUPED_EAGER", grouped)
        model = _wrapped("adalora", tmp_path).train()
        if case == "one-disabled":
            next(m for m in model.modules() if hasattr(m, "lora_E"))._disable_adapters = True
        model.zero_grad()
        x = torch.randn(8, 16, generator=torch.Generator().manual_seed(5))
        loss = model(x).square().mean() + method.extra_loss(model)
        assert all(getattr(m, "_stacks", None) is None for m in model.modules())
        loss.backward()
        with torch.no_grad():  # an evaluation forward keeps nothing either
            model(x)
        assert all(getattr(m, "_stacks", None) is None for m in model.modules())
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    loss_1, grads_1 = run(False)
    assert used == ["own"]
    used.clear()
    loss_g, grads_g = run(True)
    assert used == ([] if case == "shared" else ["own"])
    torch.testing.assert_close(loss_g, loss_1, rtol=1e-5, atol=1e-6)
    assert grads_g.keys() == grads_1.keys() and len(grads_g) > 8
    for k in grads_1:
        torch.testing.assert_close(grads_g[k], grads_1[k], rtol=1e-4, atol=1e-6, msg=k)
