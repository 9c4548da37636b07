"""Protocol fidelity: slices of the fused qkv Linear, one alpha rule for the LoRA family, the vision
presets and the parameter counts the papers print (issue 10, findings 1, 4, 7, 8)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from harness.errors import ConfigError
from harness.methods import AdapterSite, MethodContext, get_method
from harness.targets import SplitQKV, check_targets, prepare_model


class FusedAttention(nn.Module):
    """q, k, v in one Linear, as timm and agents/dt.py hold them."""

    def __init__(self, d: int = 12, heads: int = 3):
        super().__init__()
        self.heads, self.qkv, self.proj = heads, nn.Linear(d, 3 * d), nn.Linear(d, d)

    def qkv_out(self, x):
        return self.qkv(x).chunk(3, dim=-1)

    def forward(self, x):
        q, k, v = self.qkv_out(x)
        B, L, C = x.shape
        q, k, v = (t.view(B, L, self.heads, C // self.heads).transpose(1, 2) for t in (q, k, v))
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return self.proj(y.transpose(1, 2).reshape(B, L, C))


class UnfusedAttention(FusedAttention):
    """The reference: three separate Linears q, k, v (as the papers' ViT code has them)."""

    def __init__(self, fused: FusedAttention):
        super().__init__(fused.proj.in_features, fused.heads)
        del self.qkv
        d = fused.proj.in_features
        self.q, self.k, self.v = (nn.Linear(d, d) for _ in range(3))
        with torch.no_grad():
            for i, lin in enumerate((self.q, self.k, self.v)):
                lin.weight.copy_(fused.qkv.weight[i * d:(i + 1) * d])
                lin.bias.copy_(fused.qkv.bias[i * d:(i + 1) * d])
        self.proj.load_state_dict(fused.proj.state_dict())

    def qkv_out(self, x):
        return self.q(x), self.k(x), self.v(x)


class Net(nn.Module):
    def __init__(self, attn_cls=FusedAttention, depth: int = 2, d: int = 12):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Module() for _ in range(depth))
        for b in self.blocks:
            b.attn = attn_cls() if attn_cls is FusedAttention else attn_cls
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        for b in self.blocks:
            x = x + b.attn(x)
        return self.head(x.mean(1))


def _pair() -> tuple[Net, Net]:
    torch.manual_seed(0)
    fused = Net()
    ref = copy.deepcopy(fused)
    for b in ref.blocks:
        b.attn = UnfusedAttention(b.attn)
    return fused, ref


def test_split_layer_equals_fused_in_outputs_and_gradients():
    torch.manual_seed(0)
    fused = nn.Linear(12, 36)
    split = SplitQKV(copy.deepcopy(fused))
    x = torch.randn(4, 5, 12, requires_grad=True)
    a, b = fused(x), split(x)
    torch.testing.assert_close(a, b)
    g = torch.randn_like(a)
    (gx_f,) = torch.autograd.grad(a, x, g)
    (gx_s,) = torch.autograd.grad(b, x, g)
    torch.testing.assert_close(gx_f, gx_s)
    fused.zero_grad()
    fused(x).backward(g)
    split(x).backward(g)
    torch.testing.assert_close(fused.weight.grad, torch.cat([split.q.weight.grad, split.k.weight.grad,
                                                              split.v.weight.grad]))


@pytest.mark.parametrize("method, settings", [("lora", {"r": 2, "alpha": 2}), ("nola", {})])
def test_adapting_q_and_v_slices_equals_the_unfused_reference(method, settings):
    """peft's LoRA and our NoLA on the slices q, v of the fused layer give the outputs and gradients of the
    same method on a model with separate q, k, v Linears."""
    fused, ref = _pair()
    m = get_method(method)
    s = m.resolve_settings(settings)
    head = ("head",)
    split = prepare_model(fused, ("qkv.q", "qkv.v"), head)
    assert split == ["blocks.0.attn.qkv", "blocks.1.attn.qkv"]
    a = m.wrap(fused, AdapterSite(("qkv.q", "qkv.v"), head), s, MethodContext())
    b = m.wrap(ref, AdapterSite(("attn.q", "attn.v"), head), s, MethodContext())
    # the same adapter tensors in both (random, so the adapter path is not zero)
    torch.manual_seed(1)
    ref_state = {n: t for n, t in b.state_dict().items()}
    with torch.no_grad():
        for n, t in a.state_dict().items():
            twin = n.replace("attn.qkv.", "attn.")
            assert twin in ref_state, n
            if t.dtype.is_floating_point and any(k in n for k in ("lora_", "nola_")):
                t.copy_(torch.randn_like(t))
                ref_state[twin].copy_(t)
    own_a = [n for n, p in a.named_parameters() if p.requires_grad]
    own_b = [n for n, p in b.named_parameters() if p.requires_grad]
    assert [n.replace("attn.qkv.", "attn.") for n in own_a] == own_b
    assert m.count(a, AdapterSite(("qkv.q", "qkv.v"), head)) == m.count(b, AdapterSite(("attn.q", "attn.v"), head))
    x = torch.randn(3, 5, 12)
    ya, yb = a(x), b(x)
    torch.testing.assert_close(ya, yb)
    ya.square().sum().backward()
    yb.square().sum().backward()
    grads_b = dict(b.named_parameters())
    for n, p in a.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, grads_b[n.replace("attn.qkv.", "attn.")].grad)
    # merge keeps the outputs
    torch.testing.assert_close(m.merge(a)(x), ya.detach(), atol=1e-5, rtol=1e-5)


def test_saved_adapter_loads_on_a_base_split_the_same_way(tmp_path):
    fused, _ = _pair()
    base = copy.deepcopy(fused)
    lora = get_method("lora")
    s = lora.resolve_settings({"r": 2, "alpha": 2})
    site = AdapterSite(("qkv.q", "qkv.v"), ("head",))
    prepare_model(fused, site.targets, site.head)
    a = lora.wrap(fused, site, s, MethodContext())
    with torch.no_grad():
        for n, p in a.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn_like(p))
    lora.save(a, site, s, tmp_path)
    prepare_model(base, site.targets, site.head)
    b = lora.load(base, site, s, tmp_path)
    x = torch.randn(2, 5, 12)
    torch.testing.assert_close(a(x), b(x))


def test_targets_errors_name_the_valid_choices():
    with pytest.raises(ConfigError, match=r"'qkv\.x' names no Linear.*qkv\.q, qkv\.k, qkv\.v"):
        check_targets(Net(), ("qkv.x",), ("head",))
    with pytest.raises(ConfigError, match="both the fused layer 'qkv' and its slice 'qkv.v'"):
        check_targets(Net(), ("qkv", "qkv.v"), ("head",))
    untouched = Net()
    assert prepare_model(untouched, ("qkv", "proj"), ("head",)) == []  # no slice named: the fused layer stays
    assert isinstance(untouched.blocks[0].attn.qkv, nn.Linear)


def test_decision_transformer_splits_too():
    from agents.dt import DTConfig, DecisionTransformer

    torch.manual_seed(0)
    dt = DecisionTransformer(DTConfig(n_layer=1, n_head=2, n_embd=16, context=3)).eval()
    ref = copy.deepcopy(dt)
    assert prepare_model(dt, ("attn.qkv.q", "attn.qkv.v"), ("action_head",)) == ["blocks.0.attn.qkv"]
    T = 3
    x = torch.randn(2, 4 * T, 16)
    torch.testing.assert_close(dt.blocks[0].attn(x, None), ref.blocks[0].attn(x, None))


# --- finding 4: one alpha rule for the LoRA family ----------------------------------------------------

FAMILY = ("lora", "dora", "pissa", "olora", "adalora", "eva", "eva-dora")


def test_alpha_rule_is_applied_and_recorded_across_the_family():
    from harness.study_rules import describe, prepare
    from vision.track import VisionSettings

    ts = VisionSettings(alpha_rule=1, adapter_targets=["qkv.q", "qkv.v"])
    assert ts.alpha_rule == "1"
    for name in FAMILY:
        m = get_method(name)
        assert m.alpha_family, name
        s = m.resolve_settings({"r": 4})
        _, wrap_settings = prepare(m, s, ts, Net(), AdapterSite(("qkv",), ("head",)))
        assert wrap_settings["alpha"] == 1.0, name
        cfg = m.peft_config(wrap_settings, AdapterSite(("qkv.q",), ("head",)), MethodContext())
        assert cfg.lora_alpha == 1.0, name
        assert describe(m, s, ts).alpha_rule == "alpha=1"
        assert describe(m, s, ts).targets == "qkv.q,qkv.v"
    r_rule = VisionSettings(alpha_rule="r", adapter_targets=["qkv.v"])
    _, filled = prepare(get_method("eva"), get_method("eva").resolve_settings({"r": 8}), r_rule, Net(),
                        AdapterSite(("qkv",), ("head",)))
    assert filled["alpha"] == 8.0  # EVA no longer runs at its own alpha = 1 beside LoRA at alpha = r
    explicit = get_method("lora").resolve_settings({"r": 4, "alpha": 16})
    assert describe(get_method("lora"), explicit, ts).alpha_rule == "alpha=16 (set)"
    for name in ("full", "linear", "vera", "randlora", "nola", "glora", "eigenlora"):
        assert describe(get_method(name), get_method(name).resolve_settings({}), ts).alpha_rule == ""
    assert describe(get_method("full"), {}, ts).targets == ""


def test_wrapped_scale_follows_the_rule():
    from harness.study_rules import prepare
    from vision.track import VisionSettings

    for rule, scale in (("1", 1 / 4), ("r", 1.0), ("2r", 2.0)):
        model = Net()
        m = get_method("dora")
        site, s = prepare(m, m.resolve_settings({"r": 4}), VisionSettings(alpha_rule=rule,
                                                                            adapter_targets=["qkv.v"]),
                          model, AdapterSite(("qkv",), ("head",)))
        wrapped = m.wrap(model, site, s, MethodContext())
        scales = {mod.scaling["default"] for mod in wrapped.modules() if hasattr(mod, "scaling")
                  and isinstance(getattr(mod, "scaling"), dict) and "default" in mod.scaling}
        assert scales == {scale}, rule


def test_bad_alpha_rule_is_refused_before_compute():
    from vision.track import VisionTrack

    with pytest.raises(ConfigError, match="alpha_rule"):
        VisionTrack().settings({"alpha_rule": "sqrt"})


# --- finding 7: presets ----------------------------------------------------------------------------

def test_vtab_sweep_uses_the_paper_presets():
    import yaml

    doc = yaml.safe_load(open("sweeps/vtab1k.yaml"))["studies"][0]  # the main study; GLoRA's is apart
    s = doc["settings"]
    assert s["backbone"] == "vit_base_patch16_224.orig_in21k" and s["normalization"] == "imagenet"
    assert s["adapter_targets"] == ["qkv.q", "qkv.v"] and str(s["alpha_rule"]) == "1"
    methods = doc["methods"]
    assert sorted(methods["eva"]["rho"]) == [1.0, 2.0] and sorted(methods["eva-dora"]["rho"]) == [1.0, 2.0]
    assert methods["eigenlora"]["weight_decay"] == [0.1]
    assert methods["nola"]["targets"] == ["fc1,fc2"]
    assert get_method("randlora").resolve_settings({})["alpha"] == 10.0  # RandLoRA Table 8: 10/r


def test_normalization_preset_is_applied_and_labelled(tmp_path):
    from safetensors.torch import save_file

    from vision import backbones

    tiny = {"patch_size": 4, "embed_dim": 24, "depth": 1, "num_heads": 2}
    model = backbones.create("vit_tiny_patch16_224", 3, 16, 0.0, tiny)
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    own = backbones.build_backbone("vit_base_patch16_224.orig_in21k", 3, str(path), 16, 0.0, tiny)
    assert own.mean == (0.5, 0.5, 0.5) and own.describe().endswith("norm inception]")
    noah = backbones.build_backbone("vit_base_patch16_224.orig_in21k", 3, str(path), 16, 0.0, tiny,
                                    normalization="imagenet")
    assert noah.mean == backbones.IMAGENET_MEAN and noah.std == backbones.IMAGENET_STD
    assert noah.describe().endswith("norm imagenet]")
    with pytest.raises(ConfigError, match="normalization"):
        backbones.build_backbone("vit_tiny_patch16_224", 3, "random", 16, 0.0, tiny, normalization="zca")


def test_summary_parameters_are_the_mean_over_groups():
    import pandas as pd

    from harness.leaderboard import summarise

    table = pd.DataFrame([
        dict(method="m", backbone="b", task=t, group=g, top1_mean=acc, top1_se=0.0, trainable_params=p,
             data_source="real")
        for t, g, acc, p in (("a", "natural", 0.5, 100), ("b", "natural", 0.5, 100), ("c", "natural", 0.5, 100),
                             ("d", "structured", 0.9, 400))])
    row = summarise(table, "top1", {"natural": ["a", "b", "c"], "structured": ["d"]}).iloc[0]
    assert row["average_top1"] == pytest.approx(0.7)
    assert row["trainable_params"] == pytest.approx(250.0)  # (100 + 400) / 2, not (3*100 + 400) / 4


# --- findings 1 and 8: counts on ViT-B/16 as the papers print them -------------------------------------

@pytest.fixture(scope="module")
def vit_b_counts():
    from harness.counting import count_methods

    rows = count_methods("vision", "vit_base_patch16_224", methods=["lora", "eigenlora"],
                         sets=["adapter_targets=[qkv.q,qkv.v]", "r=8"])
    return {r.method: r for r in rows}


def test_lora_r8_on_q_and_v_of_vit_b16_counts_294912(vit_b_counts):
    row = vit_b_counts["lora"]
    assert row.trainable_params == 294_912  # GLoRA Table 1 lists LoRA at 0.29M
    assert row.targets == "qkv.q,qkv.v"
    assert row.head_params == 768 * row.classes + row.classes


def test_eigenlora_counts_2kr_per_module(vit_b_counts):
    row = vit_b_counts["eigenlora"]
    settings = json.loads(row.settings)
    k, r = settings["k"], settings["r"]
    assert row.trainable_params == 24 * 2 * k * r  # 12 blocks x (q, v)


def test_methods_count_json_cli(capsys):
    from harness.cli import main

    code = main(["methods", "--count", "--backbone", "vit_tiny_patch16_224", "--json",
                 "--set", "adapter_targets=[qkv.q,qkv.v]", "--set", "r=2", "--set", "img_size=32",
                 "--set", "model_kwargs={patch_size: 8, depth: 2}", "--methods", "lora,nola,linear"])
    assert code == 0
    rows = json.loads(capsys.readouterr().out)
    by = {r["method"]: r for r in rows}
    assert set(by) == {"lora", "nola", "linear"}
    # vit_tiny: width 192, 2 blocks, q and v adapted: LoRA r=2 is 2 * 2 * (2 * 192 * 2)
    assert by["lora"]["trainable_params"] == 2 * 2 * 2 * 192 * 2
    assert by["linear"]["trainable_params"] == 0 and by["linear"]["targets"] == ""
    assert by["nola"]["trainable_params"] == 2 * 2 * (1024 + 1024)
    assert all(r["head_params"] > 0 for r in rows)


def test_methods_count_refuses_bad_input_before_compute(capsys):
    from harness.cli import main

    assert main(["methods", "--count", "--backbone", "vit_nope", "--json"]) == 2
    assert "unknown backbone" in capsys.readouterr().err
    assert main(["methods", "--count", "--backbone", "vit_tiny_patch16_224", "--set", "nonsense=1"]) == 2
    assert "nonsense" in capsys.readouterr().err
