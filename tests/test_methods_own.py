"""The own methods (NoLA, GLoRA, EigenLoRA): life cycle on a tiny model and a tiny ViT, and the papers' formulas."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from harness.errors import ConfigError
from harness.methods import AdapterSite, MethodContext, get_method
from harness.methods.eigenlora import EigenLoRALinear
from harness.methods.glora import GLoRALinear, LayerForm, form_choices, form_params
from tiny_models import SITE, Tiny

D = 16


VIT_SITE = AdapterSite(targets=("qkv", "attn.proj", "fc1", "fc2"), head=("head",))
LAYERS = [(f"blocks.{i}.{n}", din, dout) for i in range(2) for n, din, dout in (("fc1", D, 2 * D), ("fc2", 2 * D, D))]


def make_base(seed: int = 0) -> Tiny:
    torch.manual_seed(seed)
    return Tiny()


def make_vit(seed: int = 0) -> nn.Module:
    import timm

    torch.manual_seed(seed)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2,
                             num_classes=5)


def data(n: int = 64):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, D, generator=g), torch.randn(n, 3, generator=g)


def train(method, model, x, y, loss_fn, steps: int, lr: float) -> list[float]:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    losses = []
    model.train()
    for step in range(steps):
        loss = loss_fn(model(x), y)
        extra = method.extra_loss(model)
        (loss + extra if extra is not None else loss).backward()
        opt.step()
        method.on_step(model, step, MethodContext(total_steps=steps))
        opt.zero_grad()
        losses.append(float(loss.detach()))
    return losses


def random_lora_file(path: Path, layers, rank: int, seed: int, d_scale: float = 1.0, std: float = 1.0) -> None:
    """A LoRA adapter in peft's saved key format, with random (non-zero) A and B."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, din, dout in layers:
        state[f"base_model.model.{name}.lora_A.weight"] = std * torch.randn(rank, int(din * d_scale), generator=g)
        state[f"base_model.model.{name}.lora_B.weight"] = std * torch.randn(int(dout * d_scale), rank, generator=g)
    save_file(state, str(path))


@pytest.fixture(scope="module")
def bank_dir(tmp_path_factory) -> Path:
    """Three LoRA adapters (rank 2) of the Tiny model as plain safetensors files."""
    folder = tmp_path_factory.mktemp("bank")
    for i in range(3):
        random_lora_file(folder / f"task{i}.safetensors", LAYERS, rank=2, seed=10 + i)
    return folder


def settings_for(name: str, bank: Path | None) -> dict:
    # a short search: every candidate costs one validation pass
    return {"nola": {"k": 64, "l": 64}, "glora": {"ranks": [4, 2], "search_generations": 2, "search_population": 10,
                                                  "search_mutations": 4, "search_crossovers": 4},
            "eigenlora": {"k": 3, "r": 2, "bank_dir": str(bank) if bank else None}}[name]


def expected_count(name: str, model: nn.Module, settings: dict, layers) -> int:
    if name == "nola":
        return len(layers) * (settings["k"] + settings["l"])
    if name == "eigenlora":
        return len(layers) * 2 * settings["k"] * settings["r"]
    forms = {n: m.form for n, m in model.named_modules() if isinstance(m, GLoRALinear)}
    return sum(form_params(forms[n], din, dout) for n, din, dout in layers)


def lifecycle(name: str, make, site: AdapterSite, x, y, loss_fn, layers, tmp: Path, bank: Path | None,
              steps: int, lr: float) -> None:
    method = get_method(name)
    settings = method.resolve_settings(settings_for(name, bank))
    ctx = MethodContext(validate=lambda m: -float(loss_fn(m(x), y)))
    model = method.wrap(make(), site, settings, ctx)
    losses = train(method, model, x, y, loss_fn, steps, lr)
    assert losses[-1] < losses[0], f"{name}: loss did not fall {losses[0]:.4f} -> {losses[-1]:.4f}"
    model = method.finalize(model, site, settings, ctx)
    own, head = method.count(model, site)
    assert own == expected_count(name, model, settings, layers)
    assert head == sum(p.numel() for n, p in model.named_parameters() if site.is_head_param(n))
    model.eval()
    with torch.no_grad():
        out = model(x)
    method.save(model, site, settings, tmp / "adapter")
    reloaded = method.load(make(), site, settings, tmp / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), out, atol=1e-6, rtol=1e-6)
    assert method.count(reloaded, site) == (own, head)
    merged = method.merge(reloaded).eval()
    assert all(type(m) in (nn.Linear,) for n, m in merged.named_modules() if site.is_target(n))
    # W' rounds differently in the two paths (op order), which the net amplifies with its random weights;
    # the tolerance follows the outputs' scale (a wrong merge is off by O(1) of it), not the machine's kernels
    with torch.no_grad():
        torch.testing.assert_close(merged(x), out, atol=2e-5 * float(out.abs().max()), rtol=1e-5)


@pytest.mark.parametrize("name", ["nola", "glora", "eigenlora"])
def test_lifecycle_tiny(name, tmp_path, bank_dir):
    x, y = data()
    lifecycle(name, make_base, SITE, x, y, nn.functional.mse_loss, LAYERS, tmp_path, bank_dir, steps=30, lr=1e-2)


@pytest.mark.parametrize("name", ["nola", "glora", "eigenlora"])
def test_lifecycle_tiny_vit(name, tmp_path):
    vit = make_vit()
    layers = [(n, m.in_features, m.out_features) for n, m in VIT_SITE.target_linears(vit)]
    assert len(layers) == 8
    bank = None
    if name == "eigenlora":
        bank = tmp_path / "bank"
        bank.mkdir()
        for i in range(2):
            # LoRA-sized entries: a ViT's weights are about 0.02, its trained LoRAs' products similar
            random_lora_file(bank / f"t{i}.safetensors", layers, rank=2, seed=i, std=0.1)
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 5, (8,), generator=g)
    lifecycle(name, make_vit, VIT_SITE, x, y, nn.functional.cross_entropy, layers, tmp_path, bank, steps=8, lr=1e-2)


# --- NoLA ------------------------------------------------------------------------------------------

def test_nola_vit_b_mlp_count_is_49152():
    """ViT-B's MLPs (12 blocks, fc1 768->3072, fc2 3072->768) with k = l = 1024: 24 x 2048 = 49,152."""

    class MLPOnly(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList(nn.ModuleDict({"fc1": nn.Linear(768, 3072, device="meta"),
                                                       "fc2": nn.Linear(3072, 768, device="meta")})
                                        for _ in range(12))
            self.head = nn.Linear(768, 10, device="meta")

    method = get_method("nola")
    model = method.wrap(MLPOnly(), SITE, method.resolve_settings({}), MethodContext())
    assert method.count(model, SITE) == (49_152, 7_690)


def test_nola_bases_from_seed_and_sharing():
    method = get_method("nola")
    shared = method.wrap(make_base(), SITE, method.resolve_settings({"k": 8, "l": 8}), MethodContext())
    again = method.wrap(make_base(), SITE, method.resolve_settings({"k": 8, "l": 8}), MethodContext())
    own = method.wrap(make_base(), SITE, method.resolve_settings({"k": 8, "l": 8, "shared_bases": False}),
                      MethodContext())
    f1 = [m for n, m in shared.named_modules() if n.endswith("fc1")]
    assert torch.equal(f1[0].bases_a, f1[1].bases_a)  # the authors' choice: same shape, same bases
    assert torch.equal(f1[0].bases_a, [m for n, m in again.named_modules() if n.endswith("fc1")][0].bases_a)
    g1 = [m for n, m in own.named_modules() if n.endswith("fc1")]
    assert not torch.equal(g1[0].bases_a, g1[1].bases_a)
    # Delta W = (1/r) (sum alpha_i A_i)(sum beta_j B_j), transposed to d_out x d_in; coefficients start at 1/k.
    m = f1[0]
    assert torch.allclose(m.nola_alpha, torch.full((8,), 1 / 8))
    expected = (m.bases_a.mean(0) @ m.bases_b.mean(0)).T
    torch.testing.assert_close(m.delta_weight(), expected)
    # bases are not saved: the state holds only coefficients and the base
    assert not any("bases" in k for k in shared.state_dict())


# --- GLoRA -----------------------------------------------------------------------------------------

def test_glora_has_432_forms_per_layer():
    def n_forms(ranks):
        c = form_choices(ranks)
        return len(c["A"]) * len(c["B"]) * len(c["C"]) * len(c["D"]) * len(c["E"])

    assert n_forms((4,)) == 4 * 4 * 3 * 3 * 3 == 432  # the paper's count: one LoRA rank per form
    assert n_forms((8, 4)) == 5 * 5 * 4 * 3 * 3  # each extra rank is one more LoRA choice for A, B and C


def _randomise(model: nn.Module) -> None:
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad and not SITE.is_head_param(n):
                p.copy_(torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("form,bias", [
    (LayerForm(A="lora2", B="vector", C="lora4", D="scalar", E="vector"), True),
    (LayerForm(A="scalar", B="lora4", C="vector", D="vector", E="scalar"), True),
    (LayerForm(A="vector", B="scalar", C="none", D="none", E="vector"), False),
])
def test_glora_merge_matches_formula(form, bias):
    """W' = W0 + W0 * A + B, b' = b0 + b0 * D + E + W0 @ C, computed by hand from the storage."""
    method = get_method("glora")
    base = make_base()
    if not bias:
        base.blocks[0].fc1 = nn.Linear(D, 2 * D, bias=False)
    model = method.wrap(base, SITE, method.resolve_settings({"ranks": [4, 2], "subnet": form.text()}),
                        MethodContext())
    _randomise(model)
    layer = model.blocks[0].fc1
    w0, b0 = layer.base.weight.detach().clone(), layer.base.bias
    Ad, Au, Bd, Bu, Cd, Cu, Dv, Ev = (getattr(layer, t).detach().clone()
                                      for t in ("A_d", "A_u", "B_d", "B_u", "C_d", "C_u", "D", "E"))

    def mat(f, d, u):
        if f.startswith("lora"):
            r1 = int(f[4:])
            return d[:, :r1] @ u[:r1]
        return {"vector": d[:, 0:1], "scalar": d[0, 0], "none": torch.zeros(())}[f]

    def vec(f, v):
        return {"vector": v, "scalar": v[0], "none": torch.zeros(())}[f]

    w_expected = w0 + w0 * mat(form.A, Ad, Au) + mat(form.B, Bd, Bu)
    b0v = b0.detach() if b0 is not None else torch.zeros(2 * D)
    b_expected = (b0v + b0v * vec(form.D, Dv) + vec(form.E, Ev)
                  + (w0 @ (mat(form.C, Cd, Cu) if form.C != "none" else torch.zeros(D, 1))).squeeze(-1))
    x = data()[0]
    model.eval()
    with torch.no_grad():
        out = model(x)
    merged = method.merge(model)
    torch.testing.assert_close(merged.blocks[0].fc1.weight, w_expected)
    torch.testing.assert_close(merged.blocks[0].fc1.bias, b_expected)
    # W' rounds differently in the two paths (op order), which the net amplifies with its random weights;
    # the tolerance follows the outputs' scale (a wrong merge is off by O(1) of it), not the machine's kernels
    with torch.no_grad():
        torch.testing.assert_close(merged(x), out, atol=2e-5 * float(out.abs().max()), rtol=1e-5)


def test_glora_count_is_the_subnet_formula():
    method = get_method("glora")
    form = LayerForm(A="lora4", B="vector", C="lora2", D="scalar", E="none")
    model = method.wrap(make_base(), SITE, method.resolve_settings({"ranks": [4, 2], "subnet": form.text()}),
                        MethodContext())
    # per layer: A 4 (d_in + d_out), B d_out, C 2 (d_in + 1), D 1, E 0
    want = sum(4 * (i + o) + o + 2 * (i + 1) + 1 for _, i, o in LAYERS)
    assert method.count(model, SITE)[0] == want
    # unfixed: the largest form, which is exactly the supernet storage
    sup = method.wrap(make_base(), SITE, method.resolve_settings({"ranks": [4, 2]}), MethodContext())
    storage = sum(p.numel() for n, p in sup.named_parameters() if p.requires_grad and not SITE.is_head_param(n))
    assert method.count(sup, SITE)[0] == storage


def test_glora_search_beats_random_within_budget():
    """A toy validation score (how many choices match a hidden subnet) under a parameter budget."""
    method = get_method("glora")
    settings = method.resolve_settings({"ranks": [4, 2], "param_budget_min": 300, "param_budget_max": 900})
    model = method.wrap(make_base(), SITE, settings, MethodContext(seed=0))
    layers = [m for m in model.modules() if isinstance(m, GLoRALinear)]
    rng = random.Random(7)
    hidden = [m.random_form(rng) for m in layers]
    counts: list[int] = []

    def score(m: nn.Module) -> float:
        counts.append(method.count(m, SITE)[0])
        return float(sum(getattr(l.form, t) == getattr(h, t) for l, h in zip(layers, hidden) for t in "ABCDE"))

    model = method.finalize(model, SITE, settings, MethodContext(validate=score, seed=0))
    assert all(300 <= c <= 900 for c in counts)
    chosen = [m.form for m in layers]
    best = score(model)
    randoms = []
    for _ in range(200):
        for m in layers:
            m.form = m.random_form(rng)
        randoms.append(score(model))
    for m, f in zip(layers, chosen):
        m.form = f
    assert best > max(randoms)
    assert 300 <= method.count(model, SITE)[0] <= 900
    info = method.describe(model)
    assert info["search"]["best_score"] == best and info["search"]["scored"] > 50


def test_glora_search_needs_a_scorer_or_falls_back():
    method = get_method("glora")
    settings = method.resolve_settings({"ranks": [2]})
    model = method.wrap(make_base(), SITE, settings, MethodContext())
    with pytest.raises(ConfigError, match="validation scorer"):
        method.finalize(model, SITE, settings, MethodContext())
    no_search = method.resolve_settings({"ranks": [2], "search": False})
    model = method.finalize(model, SITE, no_search, MethodContext())
    assert all(m.form == LayerForm("lora2", "lora2", "lora2", "vector", "vector")
               for m in model.modules() if isinstance(m, GLoRALinear))
    tight = method.resolve_settings({"ranks": [2], "param_budget_min": 10**6})
    with pytest.raises(ConfigError, match="no subnet fits the parameter budget"):  # at wrap, before training
        method.wrap(make_base(), SITE, tight, MethodContext())
    with pytest.raises(ConfigError, match="valid forms"):
        method.wrap(make_base(), SITE, method.resolve_settings({"ranks": [2], "subnet": "A=lora8,B=none,C=none,"
                                                                "D=none,E=none"}), MethodContext())


def test_glora_samples_forms_in_training_only():
    method = get_method("glora")
    model = method.wrap(make_base(), SITE, method.resolve_settings({"ranks": [4, 2]}), MethodContext())
    layer = model.blocks[0].fc1
    layer.train()
    x = torch.randn(4, layer.in_features)
    drawn = set()
    for _ in range(50):
        layer(x)
        drawn.add(layer.active_form())
    assert len(drawn) > 10
    layer.eval()
    assert layer.active_form() == LayerForm("lora4", "lora4", "lora4", "vector", "vector")


def test_glora_builds_its_weight_once_per_inference_form(monkeypatch):
    """In inference (eval, no grad: rollouts and the search's scoring) a layer builds W' and b' once for
    its form and weights; a new form, an in-place weight update or training builds them again, and every
    output equals the uncached forward's."""
    method = get_method("glora")
    model = method.wrap(make_base(), SITE, method.resolve_settings({"ranks": [4, 2]}), MethodContext())
    layer = model.blocks[0].fc1
    with torch.no_grad():
        for t in layer.adapter_tensors:
            getattr(layer, t).normal_(0, 0.1)
    builds = []
    real = GLoRALinear.effective_coded
    monkeypatch.setattr(GLoRALinear, "effective_coded", lambda self, code: builds.append(1) or real(self, code))
    x = torch.randn(4, layer.in_features)

    def reference() -> torch.Tensor:
        weight, bias = real(layer, layer._code)
        return torch.nn.functional.linear(x, weight, bias)

    layer.eval()
    with torch.no_grad():
        first = [layer(x) for _ in range(5)]
        assert len(builds) == 1 and all(torch.equal(y, reference()) for y in first)
        layer.form = LayerForm("lora2", "scalar", "none", "vector", "none")  # the search's next candidate
        assert torch.equal(layer(x), reference()) and not torch.equal(layer(x), first[0])
        assert len(builds) == 2
        layer.E.add_(0.5)  # an optimizer step between evaluations
        assert torch.equal(layer(x), reference()) and len(builds) == 3
    y = layer(x)  # grad enabled: built for autograd every time
    assert y.requires_grad and len(builds) == 4
    layer.train()
    layer.eval()
    with torch.no_grad():
        layer(x)
    assert len(builds) == 5  # train() dropped the cache


# --- EigenLoRA -------------------------------------------------------------------------------------

def _write_bank(folder: Path, n: int, rank: int, seed: int) -> list[dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    adapters = []
    for i in range(n):
        ad, state = {}, {}
        for name, din, dout in LAYERS:
            a, b = torch.randn(rank, din, generator=g), torch.randn(dout, rank, generator=g)
            ad[name] = (a, b)
            state[f"base_model.model.{name}.lora_A.weight"] = a
            state[f"base_model.model.{name}.lora_B.weight"] = b
        save_file(state, str(folder / f"a{i}.safetensors"))
        adapters.append(ad)
    return adapters


@pytest.mark.parametrize("keep_mean", [True, False])
def test_eigenlora_reconstructs_an_adapter_in_the_span(tmp_path, keep_mean):
    """alpha^T = (W - mean) E^T recovers an adapter lying in the bank's subspace exactly.

    With the mean kept, the subspace is mean + span(E): affine combinations of the bank's rows (weights
    summing to 1). Without it (the authors' code), span(E) of the centred rows: weights summing to 0.
    """
    n, rank = 4, 2
    bank = _write_bank(tmp_path / "bank", n, rank, seed=5)
    g = torch.Generator().manual_seed(9)
    state, deltas = {}, {}
    for name, _, _ in LAYERS:
        rows_a = torch.cat([ad[name][0] for ad in bank])  # (n rank) x d_in
        cols_b = torch.cat([ad[name][1].T for ad in bank])  # (n rank) x d_out
        ca, cb = torch.rand(3, n * rank, generator=g), torch.rand(3, n * rank, generator=g)
        target = 1.0 if keep_mean else 0.0
        ca = ca - ca.mean(1, keepdim=True) + target / (n * rank)
        cb = cb - cb.mean(1, keepdim=True) + target / (n * rank)
        a, b = ca @ rows_a, (cb @ cols_b).T  # a new rank-3 LoRA inside the subspace
        state[f"base_model.model.{name}.lora_A.weight"] = a.contiguous()
        state[f"base_model.model.{name}.lora_B.weight"] = b.contiguous()
        deltas[name] = b @ a
    save_file(state, str(tmp_path / "new.safetensors"))
    method = get_method("eigenlora")
    settings = method.resolve_settings({"mode": "reconstruct", "k": n * rank - 1, "keep_mean": keep_mean,
                                        "bank_dir": str(tmp_path / "bank"),
                                        "reconstruct_from": str(tmp_path / "new.safetensors")})
    model = method.wrap(make_base(), SITE, settings, MethodContext())
    assert method.count(model, SITE)[0] == 0  # coefficients fixed: only the head trains
    for name, module in model.named_modules():
        if isinstance(module, EigenLoRALinear):
            torch.testing.assert_close(module.delta_weight(), deltas[name], atol=1e-4, rtol=1e-4)
            assert module.alpha_a.shape == (n * rank - 1, 3)


def test_eigenlora_reads_peft_folders_and_folds_the_scale(tmp_path):
    """A bank of adapters saved by the `lora` method (peft save_pretrained, alpha = 2r): reconstructing one
    of them gives peft's own delta weight (merged weight minus base weight)."""
    lora = get_method("lora")
    lora_settings = lora.resolve_settings({"r": 2, "alpha": 4})
    folders, peft_deltas = [], None
    for i in range(3):
        model = lora.wrap(make_base(), SITE, lora_settings, MethodContext())
        g = torch.Generator().manual_seed(20 + i)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_" in n:
                    p.copy_(torch.randn(p.shape, generator=g))
        lora.save(model, SITE, lora_settings, tmp_path / f"lora{i}")
        folders.append(str(tmp_path / f"lora{i}"))
        if i == 1:
            merged = lora.merge(model)
            base = make_base()
            peft_deltas = {n: merged.get_submodule(n).weight.detach() - base.get_submodule(n).weight
                           for n, _, _ in LAYERS}
    method = get_method("eigenlora")
    settings = method.resolve_settings({"mode": "reconstruct", "k": 5, "reconstruct_from": folders[1]})
    model = method.wrap(make_base(), SITE, settings, MethodContext(adapter_bank=folders))
    for name, module in model.named_modules():
        if isinstance(module, EigenLoRALinear):
            torch.testing.assert_close(module.delta_weight(), peft_deltas[name], atol=1e-4, rtol=1e-4)


def test_eigenlora_counts_k_and_extends_small_banks(bank_dir):
    method = get_method("eigenlora")
    # bank: 3 adapters x rank 2 = 6 rows, 5 centred components; K = 8 needs 3 random orthogonal ones
    model = method.wrap(make_base(), SITE, method.resolve_settings({"k": 8, "r": 2, "bank_dir": str(bank_dir)}),
                        MethodContext())
    assert method.count(model, SITE)[0] == len(LAYERS) * 2 * 8 * 2
    for m in model.modules():
        if isinstance(m, EigenLoRALinear):
            for e in (m.e_a, m.e_b):
                torch.testing.assert_close(e @ e.T, torch.eye(8), atol=1e-5, rtol=0)
    assert method.describe(model)["random_components"] == len(LAYERS) * 2 * 3
    # K by explained variance: the same K for every module, at least the threshold everywhere
    model = method.wrap(make_base(), SITE, method.resolve_settings({"variance": 0.6, "bank_dir": str(bank_dir)}),
                        MethodContext())
    info = method.describe(model)
    assert info["explained_min"] >= 0.6 and method.count(model, SITE)[0] == len(LAYERS) * 2 * info["K"]
    # zero-shot: random frozen coefficients, only the head trains
    model = method.wrap(make_base(), SITE, method.resolve_settings({"mode": "zero-shot", "bank_dir": str(bank_dir)}),
                        MethodContext())
    assert method.count(model, SITE) == (0, D * 3 + 3)


def test_eigenlora_bad_banks(tmp_path, bank_dir):
    method = get_method("eigenlora")
    with pytest.raises(ConfigError, match="bank is empty.*`lora` trials"):
        method.wrap(make_base(), SITE, method.resolve_settings({}), MethodContext(adapter_bank=[]))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="bank is empty"):
        method.wrap(make_base(), SITE, method.resolve_settings({"bank_dir": str(tmp_path / "empty")}),
                    MethodContext())
    # a bank trained on another backbone (width 8 instead of 16)
    other = tmp_path / "other"
    other.mkdir()
    random_lora_file(other / "x.safetensors", LAYERS, rank=2, seed=1, d_scale=0.5)
    with pytest.raises(ConfigError, match=r"blocks\.0\.fc1.*16x8.*32x16"):
        method.wrap(make_base(), SITE, method.resolve_settings({"bank_dir": str(other)}), MethodContext())
    with pytest.raises(ConfigError, match="r=3 is larger than the bank allows"):
        method.wrap(make_base(), SITE, method.resolve_settings({"r": 3, "bank_dir": str(bank_dir)}), MethodContext())
    with pytest.raises(ConfigError, match="no adapter of the bank adapts module"):
        method.wrap(make_base(), AdapterSite(targets=("fc1", "fc2", "head"), head=()),
                    method.resolve_settings({"bank_dir": str(bank_dir)}), MethodContext())
    with pytest.raises(ConfigError, match="valid values"):
        method.resolve_settings({"mode": "zeroshot"})


# --- the shared linear-adapter base ----------------------------------------------------------------

@pytest.mark.parametrize("name", ["nola", "glora", "eigenlora"])
def test_declared_tensors_are_what_is_saved(name, tmp_path, bank_dir):
    """Each layer class declares its saved tensors; a save writes exactly those (and the head), and the
    declaration covers every persistent tensor a layer holds besides its frozen base."""
    from safetensors import safe_open

    method = get_method(name)
    settings = method.resolve_settings(settings_for(name, bank_dir))
    model = method.wrap(make_base(), SITE, settings, MethodContext())
    declared = method.layer_class.adapter_tensors
    layers = [n for n, m in model.named_modules() if isinstance(m, method.layer_class)]
    assert layers == [n for n, _, _ in LAYERS]
    for n in layers:
        persistent = {k for k in model.get_submodule(n).state_dict() if not k.startswith("base.")}
        assert persistent == set(declared)
    method.save(model, SITE, settings, tmp_path)
    with safe_open(str(tmp_path / method.state_file), framework="pt") as f:
        saved = set(f.keys())
    heads = {f"head::{n}" for n, _ in model.named_parameters() if SITE.is_head_param(n)}
    assert saved == {f"{n}.{t}" for n in layers for t in declared} | heads


@pytest.mark.parametrize("name,key", [("nola", "r"), ("nola", "k"), ("nola", "l"), ("glora", "search_population"),
                                      ("eigenlora", "k"), ("eigenlora", "r"), ("lora", "r"), ("vera", "r")])
def test_zero_counts_are_rejected_naming_the_key(name, key):
    with pytest.raises(ConfigError, match=rf"method '{name}': setting '{key}'=0: must be >= 1"):
        get_method(name).resolve_settings({key: 0})


def test_nola_bases_are_the_seeded_draws_stored_once_in_the_forward_layout():
    """The bases are the seed's uniform draws (A's then B's from one stream, as the authors' code), held by
    every same-shape layer in one shared storage laid out for the forward (no copy per layer)."""
    import math

    method = get_method("nola")
    model = method.wrap(make_base(), SITE, method.resolve_settings({"k": 8, "l": 6, "r": 2}), MethodContext())
    layers = [m for n, m in model.named_modules() if n.endswith("fc1")]
    d_in, d_out = layers[0].in_features, layers[0].out_features
    gen = torch.Generator().manual_seed(0)
    bound_a, bound_b = 1 / math.sqrt(d_in * 2), 1 / math.sqrt(2 * d_out)
    a = torch.rand(8, d_in, 2, generator=gen) * (2 * bound_a) - bound_a
    b = torch.rand(6, 2, d_out, generator=gen) * (2 * bound_b) - bound_b
    torch.testing.assert_close(layers[0].bases_a, a)
    torch.testing.assert_close(layers[0].bases_b, b)
    assert layers[0].bases_a_t.data_ptr() == layers[1].bases_a_t.data_ptr()
    assert layers[0].bases_b_t.data_ptr() == layers[1].bases_b_t.data_ptr()
