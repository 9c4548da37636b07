"""Issue 21 (eager steps): same-shape adapted layers prepare their operands together (GroupedOperands).

Grouped and per-layer eager forwards must give the same outputs and gradients, GLoRA's drawn forms
included (on the CPU the grouped draw yields the per-layer draws' numbers); the grouped path must run,
with fewer dispatches; operands are handed out once, so a layer called on its own computes its own."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from harness.methods import MethodContext, adapted_layers, get_method
from harness.methods.adapted_layers import AdaptedLinear
from test_methods_own import VIT_SITE, make_vit, random_lora_file

SETTINGS = {"nola": {"k": 64, "l": 64, "r": 2}, "glora": {"ranks": [4, 2]}, "eigenlora": {"k": 2, "r": 2}}


def _wrapped(name: str, tmp_path, seed: int = 0, depth: int = 2) -> nn.Module:
    import timm

    method = get_method(name)
    torch.manual_seed(seed)
    vit = make_vit(seed) if depth == 2 else timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32,
                                                              patch_size=8, depth=depth, num_classes=5)
    settings = dict(SETTINGS[name])
    if name == "eigenlora":
        layers = [(n, m.in_features, m.out_features) for n, m in VIT_SITE.target_linears(vit)]
        bank = tmp_path / "bank"
        bank.mkdir(exist_ok=True)
        for i in range(3):
            random_lora_file(bank / f"t{i}.safetensors", layers, rank=2, seed=i, std=0.1)
        settings["bank_dir"] = str(bank)
    model = method.wrap(vit, VIT_SITE, method.resolve_settings(settings), MethodContext(seed=seed))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # trained-looking adapters: every term of the update non-zero
        for _, p in sorted(model.named_parameters()):
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


def _step(model: nn.Module, grouped: bool, monkeypatch, train: bool = True):
    monkeypatch.setattr(adapted_layers, "GROUPED_EAGER", grouped)
    model.train(train)
    model.zero_grad()
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    torch.manual_seed(7)  # GLoRA's draws
    out = model(x)
    out.square().mean().backward()
    forms = [m.active_form() for m in model.modules() if hasattr(m, "active_form")]
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, forms


@pytest.mark.parametrize("name", ["nola", "eigenlora", "glora"])
@pytest.mark.parametrize("train", [True, False])
def test_grouped_operands_match_each_layers_own(name, train, tmp_path, monkeypatch):
    calls = []
    kind = type(next(m for m in _wrapped(name, tmp_path).modules() if isinstance(m, AdaptedLinear)))
    real = kind.group_operands.__func__
    monkeypatch.setattr(kind, "group_operands", classmethod(lambda cls, layers: calls.append(len(layers))
                                                           or real(cls, layers)))
    out_1, grads_1, forms_1 = _step(_wrapped(name, tmp_path), False, monkeypatch, train)
    assert not calls
    out_g, grads_g, forms_g = _step(_wrapped(name, tmp_path), True, monkeypatch, train)
    # ViT-Tiny with depth 2: qkv, proj, fc1 and fc2 each form a group of two
    assert calls == [2, 2, 2, 2]
    assert forms_g == forms_1
    if name == "glora" and train:
        assert len(set(forms_g)) > 1  # the forms were drawn, per layer
    torch.testing.assert_close(out_g, out_1, rtol=1e-5, atol=1e-6)
    assert grads_g.keys() == grads_1.keys() and len(grads_g) > 8
    for k in grads_1:
        torch.testing.assert_close(grads_g[k], grads_1[k], rtol=1e-4, atol=1e-6 * float(grads_1[k].abs().max()))


def test_operands_are_handed_out_once(tmp_path, monkeypatch):
    """A layer called on its own after a whole-model forward computes its own operands: what the pre-hook
    prepared for that forward was consumed by it."""
    monkeypatch.setattr(adapted_layers, "GROUPED_EAGER", True)
    model = _wrapped("nola", tmp_path)
    layer = model.blocks[0].mlp.fc1
    model(torch.randn(2, 3, 32, 32))
    assert all(m._operands is None for m in model.modules() if isinstance(m, AdaptedLinear))
    seen = []
    real = type(layer).factors_t
    monkeypatch.setattr(type(layer), "factors_t", lambda self: seen.append(self) or real(self))
    layer(torch.randn(5, layer.in_features))
    assert seen == [layer]


def test_grouping_saves_dispatches(tmp_path, monkeypatch):
    """What the grouping is for: fewer top-level aten calls per training step (the eager step's host cost),
    the more so the more layers share a shape (six here; twelve on ViT-B)."""
    from torch.profiler import ProfilerActivity, profile

    def calls(grouped: bool) -> int:
        monkeypatch.setattr(adapted_layers, "GROUPED_EAGER", grouped)
        model = _wrapped("glora", tmp_path, depth=6).train()
        x = torch.randn(2, 3, 32, 32)
        model(x).sum().backward()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            model(x).sum().backward()
        return sum(1 for e in prof.events() if e.name.startswith("aten::")
                   and not (e.cpu_parent is not None and e.cpu_parent.name.startswith("aten::")))

    grouped, alone = calls(True), calls(False)
    assert grouped < 0.8 * alone, (grouped, alone)
