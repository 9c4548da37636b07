"""EigenLoRA / EigenLoRAx (Kaushik et al. 2025): principal components of a bank of LoRA adapters, with
trainable coefficients.

Bank: N LoRA adapters of the same base model: the setting ``bank_dir`` (a named folder), else
``ctx.adapter_bank``. In a sweep the driver fills it by a stated rule: for every other task of the same
study, one adapter of the study's own ``lora`` trials of the same stage, the one with the settings that
stage chose for that task (the final stage: the leaderboard row's), lowest seed (``harness/driver.py``
``lora_bank``). Outside a sweep (``python -m harness run``) the cache gives one ``lora`` adapter of the same
base per other task (``harness.adapter_store.find_bank``). Every trial records the bank's manifest (each
adapter's path, task, seed and settings) in its record's ``extra.method.bank``. For each adapted module and separately for the A
side (rows of length d_in) and the B side (columns of B, length d_out): stack the rows of every adapter
(R = sum of the ranks) into R x n, centre, SVD, keep the top K right singular vectors E (K x n).

Model: trainable coefficients alpha_A, alpha_B (each K x r), E frozen,

    A' = alpha_A^T E_A + 1 mu_A^T   (r x d_in)        B' = (alpha_B^T E_B + 1 mu_B^T)^T   (d_out x r)
    h  = W0 x + b0 + B' A' x

Choices:
- The mean. The authors' code centres only to find E and never adds the mean back. Here the mean is kept
  (``keep_mean=True``, the default) and added back to every row, so the model's adapters form the affine
  subspace mu + span(E) of the bank: an adapter whose rows are affine combinations of the bank's rows is
  reconstructed exactly, and the bank's "average adapter" is reachable with zero coefficients.
  ``keep_mean=False`` follows their code (mu = 0 in the formula above; the stored mean is zero).
- K: fixed (``k``), or the smallest K whose cumulative explained variance (squared singular values)
  reaches ``variance`` in every module and side (the appendix's 50-80%); the same K for all layers.
- EigenLoRAx: where the bank yields fewer than K components (too few adapters, or directions with
  numerically zero singular value), E is extended with random vectors orthogonalised against it (QR).
- Scaling: peft saves B and A without ``lora_alpha / r``; when the folder has ``adapter_config.json`` the
  scale is folded into B, so the bank holds the delta weights the adapters actually applied.
- Initialisation: coefficients uniform in (-0.5, 0.5) (a non-zero update at step 0, "random inside the
  subspace"), from a generator seeded with the trial's seed.
- Modes: "train" (coefficients train); "zero-shot" (random coefficients, frozen: only the head trains);
  "reconstruct" (coefficients fixed to the analytical projection alpha^T = (W - mu) E^T of the adapter in
  ``reconstruct_from``; r is then that adapter's rank).
- The paper trains coefficients with lr 1e-2 (``default_lr``) and weight decay 0.1 (set it in the sweep:
  ``weight_decay: 0.1``); its LoRA baselines use 1e-4.
- A saved EigenLoRA keeps E, the mean and the coefficients, so it loads without the bank.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from harness.adapter_store import bank_manifest
from harness.errors import ConfigError
from harness.methods.base import AdapterSite, MethodContext, Setting, check_rank, method_state
from harness.methods.low_rank import low_rank_linear_t
from harness.methods.adapted_layers import AdaptedLinear, LayerBuilder, LinearAdapterMethod, target_layers

_INFO_FILE = "eigenlora.json"
_INFO_KEY = "eigenlora"  # method_state key of what describe() reports (K, bank size, explained variance)
_PEFT_FILE = "adapter_model.safetensors"
# peft's saved keys: base_model.model.<module path>.lora_A.weight (an adapter name may follow lora_A
# in unsaved state dicts: lora_A.default.weight).
_LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<side>[AB])(?:\.[\w-]+)?\.weight$")
_ZERO_TOL = 1e-5  # singular values below this share of the largest are treated as zero


@dataclass
class LoRAFactors:
    """One module's LoRA update Delta W = b @ a, with any scale already folded into b."""

    a: torch.Tensor  # r x d_in
    b: torch.Tensor  # d_out x r


@dataclass
class BankAdapter:
    """One adapter of the bank: its LoRA factors by module path (as named in the base model)."""

    source: str
    modules: dict[str, LoRAFactors]


@dataclass
class Components:
    """The principal components of one side (A or B) of one module."""

    e: torch.Tensor  # K x n, orthonormal rows
    mean: torch.Tensor  # n (zero when the mean is not kept)
    from_bank: int  # rows of e taken from the bank; the rest are EigenLoRAx random orthogonal vectors
    explained: float  # share of the bank's variance the bank's rows of e explain


def _peft_scale(folder: Path, rank: int) -> float:
    """lora_alpha / r (or / sqrt(r) with rsLoRA) from the folder's adapter_config.json; 1 without one."""
    cfg_path = folder / "adapter_config.json"
    if not cfg_path.is_file():
        return 1.0
    cfg = json.loads(cfg_path.read_text())
    alpha = float(cfg.get("lora_alpha", rank))
    return alpha / math.sqrt(rank) if cfg.get("use_rslora") else alpha / rank


def read_lora_file(path: Path, scale_from: Path | None = None) -> dict[str, LoRAFactors]:
    """The LoRA factors in one safetensors file, by module path; {} when it holds none."""
    from safetensors.torch import load_file

    sides: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in load_file(str(path)).items():
        m = _LORA_KEY.match(key)
        if m:
            sides.setdefault(m["module"], {})[m["side"]] = t.to(torch.float64)
    out: dict[str, LoRAFactors] = {}
    for module, ab in sides.items():
        if set(ab) != {"A", "B"}:
            raise ConfigError(f"{path}: module {module!r} has lora_{next(iter(ab))} but not its partner")
        a, b = ab["A"], ab["B"]
        if a.shape[0] != b.shape[1]:
            raise ConfigError(f"{path}: module {module!r} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}; "
                              "their ranks differ")
        scale = _peft_scale(scale_from, a.shape[0]) if scale_from is not None else 1.0
        out[module] = LoRAFactors(a=a, b=b * scale)
    return out


def read_adapters(path: Path) -> list[BankAdapter]:
    """The adapters at ``path``: a peft folder (adapter_model.safetensors), one .safetensors file, or a
    folder of them (each file one adapter; subfolders read the same way). Files without LoRA keys
    (``head.safetensors``) are skipped."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"method 'eigenlora': adapter path {str(path)!r} does not exist")
    if path.is_file():
        found = read_lora_file(path)
        return [BankAdapter(str(path), found)] if found else []
    if (path / _PEFT_FILE).is_file():
        found = read_lora_file(path / _PEFT_FILE, scale_from=path)
        return [BankAdapter(str(path), found)] if found else []
    out: list[BankAdapter] = []
    for child in sorted(path.iterdir()):
        if child.is_dir() or child.suffix == ".safetensors":
            out.extend(read_adapters(child))
    return out


def principal_components(rows: torch.Tensor, keep_mean: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(V: right singular vectors with non-zero singular value, s: those values, mean) of the centred rows."""
    rows = rows.to(torch.float64)
    mean = rows.mean(dim=0)
    _, s, vh = torch.linalg.svd(rows - mean, full_matrices=False)
    keep = s > _ZERO_TOL * s.max() if s.numel() and s.max() > 0 else torch.zeros_like(s, dtype=torch.bool)
    return vh[keep], s[keep], (mean if keep_mean else torch.zeros_like(mean))


def extend_orthogonal(e: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """EigenLoRAx: ``e`` (m x n, orthonormal rows) extended to k rows with random orthonormal vectors."""
    m, n = e.shape
    if m >= k:
        return e[:k]
    g = torch.randn(k - m, n, generator=generator, dtype=torch.float64)
    for _ in range(2):  # project out twice: classical Gram-Schmidt loses orthogonality once
        g = g - (g @ e.T) @ e
    q, _ = torch.linalg.qr(g.T)
    return torch.cat([e, q.T], dim=0)


def choose_k(spectra: list[torch.Tensor], variance: float) -> int:
    """The smallest K whose cumulative explained variance reaches ``variance`` in every spectrum."""
    k = 1
    for s in spectra:
        if s.numel() == 0:
            continue
        share = torch.cumsum(s ** 2, 0) / (s ** 2).sum()
        k = max(k, int((share < variance - 1e-12).sum()) + 1)
    return k


class EigenLoRALinear(AdaptedLinear):
    """A frozen Linear plus B' A' from frozen components (``e_a``, ``e_b``, means) and coefficients."""

    # Components and means too: a saved EigenLoRA loads without the bank.
    adapter_tensors = ("e_a", "e_b", "mean_a", "mean_b", "alpha_a", "alpha_b")

    def __init__(self, base: nn.Linear, e_a: torch.Tensor, e_b: torch.Tensor, mean_a: torch.Tensor,
                 mean_b: torch.Tensor, alpha_a: torch.Tensor, alpha_b: torch.Tensor, trainable: bool):
        super().__init__(base)
        kw = dict(dtype=base.weight.dtype, device=base.weight.device)
        self.register_buffer("e_a", e_a.to(**kw))  # K x d_in
        self.register_buffer("e_b", e_b.to(**kw))  # K x d_out
        self.register_buffer("mean_a", mean_a.to(**kw))
        self.register_buffer("mean_b", mean_b.to(**kw))
        self.alpha_a = nn.Parameter(alpha_a.to(**kw), requires_grad=trainable)  # K x r
        self.alpha_b = nn.Parameter(alpha_b.to(**kw), requires_grad=trainable)  # K x r

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A': r x d_in, B': d_out x r)."""
        a, b_t = self.factors_t()
        return a, b_t.T

    def factors_t(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A': r x d_in, B'^T: r x d_out), each one ``addmm`` (the mean added in the product's epilogue).

        In the components' dtype with autocast off, as NoLA's factors: under bf16 autocast each product
        would first copy its coefficients and components to bf16 and the mean's add would promote the
        result back to fp32, five kernels per factor in the forward where this is one; the factors are
        small (r x d), so fp32 costs nothing and rounds less than bf16 did."""
        with torch.autocast(self.e_a.device.type, enabled=False):
            a = torch.addmm(self.mean_a, self.alpha_a.T, self.e_a)
            b_t = torch.addmm(self.mean_b, self.alpha_b.T, self.e_b)
        return a, b_t

    def group_key(self) -> tuple | None:
        return (tuple(self.e_a.shape), tuple(self.e_b.shape), tuple(self.alpha_a.shape), self.e_a.dtype,
                self.e_a.device)

    @classmethod
    def group_operands(cls, layers: Sequence["EigenLoRALinear"]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Every layer's ``factors_t`` as two batched products (``baddbmm``: the means added in their
        epilogue) over the layers' stacked components and coefficients, in the same fp32 arithmetic."""
        def stacked(name: str) -> torch.Tensor:
            return torch.stack([getattr(layer, name) for layer in layers])

        with torch.autocast(layers[0].e_a.device.type, enabled=False):
            a = torch.baddbmm(stacked("mean_a").unsqueeze(1), stacked("alpha_a").mT, stacked("e_a"))
            b_t = torch.baddbmm(stacked("mean_b").unsqueeze(1), stacked("alpha_b").mT, stacked("e_b"))
        return list(zip(a.unbind(0), b_t.unbind(0)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        factors = self.take_operands()
        a, b_t = factors if factors is not None else self.factors_t()
        return low_rank_linear_t(x, self.base.weight, self.base.bias, a, b_t)

    def delta_weight(self) -> torch.Tensor:
        a, b = self.factors()
        return b @ a

    def merged_weight_bias(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.base.weight + self.delta_weight(), self.base.bias

    def extra_repr(self) -> str:
        return f"K={self.e_a.shape[0]}, r={self.alpha_a.shape[1]}, trainable={self.alpha_a.requires_grad}"


def _match_module(name: str, bank_modules: set[str]) -> str | None:
    """The bank's module path for the model's module ``name``: exact, else a unique dotted-suffix match."""
    if name in bank_modules:
        return name
    hits = [m for m in bank_modules if m.endswith("." + name) or name.endswith("." + m)]
    return hits[0] if len(hits) == 1 else None


class EigenLoRA(LinearAdapterMethod):
    name = "eigenlora"
    summary = ("EigenLoRA(x) (Kaushik et al. 2025): top-K principal components per layer of a bank of LoRA "
               "adapters, frozen; trains K x r coefficients for each of A and B; zero-shot and analytical "
               "reconstruction variants")
    builds_on = ("lora",)
    layer_class = EigenLoRALinear
    default_lr = 1e-2  # the paper's coefficients; its weight decay is 0.1 (set weight_decay in the sweep)
    settings = {
        "k": Setting(2, "principal components per module and side (ignored when 'variance' is set)", kind=int,
                     ge=1),
        "variance": Setting(None, "choose K as the smallest giving this cumulative explained variance in every "
                                  "module (e.g. 0.5-0.8); None: use k", kind=(float, type(None)), gt=0),
        "r": Setting(1, "coefficient dimension (A' is r x d_in); at most the bank's largest LoRA rank",
                     kind=int, ge=1),
        "mode": Setting("train", "train: coefficients train; zero-shot: random frozen coefficients, only the head "
                                 "trains; reconstruct: coefficients fixed to the projection of 'reconstruct_from'",
                        choices=("train", "zero-shot", "reconstruct")),
        "keep_mean": Setting(True, "add the bank's mean back (adapters live in mean + span(E)); False: the "
                                   "authors' code (centre only to find E)"),
        "bank_dir": Setting(None, "a folder of LoRA adapters (.safetensors files or peft folders); replaces the "
                                  "bank the sweep picks (one final LoRA adapter per other task of the study)",
                            kind=(str, type(None))),
        "reconstruct_from": Setting(None, "mode 'reconstruct': the LoRA adapter (peft folder or .safetensors) "
                                          "to reconstruct", kind=(str, type(None))),
    }

    # --- bank -------------------------------------------------------------------------------------
    def load_bank(self, settings: dict[str, Any], ctx: MethodContext) -> list[BankAdapter]:
        sources = [settings["bank_dir"]] if settings["bank_dir"] else list(ctx.adapter_bank)
        bank = [a for src in sources for a in read_adapters(Path(src))]
        if not bank:
            where = (f"bank_dir={settings['bank_dir']!r} holds" if settings["bank_dir"]
                     else f"the sweep found {len(sources)} adapter folder(s) and they hold")
            raise ConfigError(f"method 'eigenlora': the adapter bank is empty ({where} no LoRA adapters). Run "
                              "`lora` trials on the other tasks of this backbone first (their saved adapters form "
                              "the bank), or pass bank_dir=<folder of LoRA .safetensors files or peft folders>")
        return bank

    def _bank_rows(self, bank: list[BankAdapter], name: str, layer: nn.Linear) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(A rows: R x d_in, B rows: R x d_out, largest rank) of module ``name`` over the bank."""
        a_rows, b_rows, max_rank = [], [], 0
        for adapter in bank:
            key = _match_module(name, set(adapter.modules))
            if key is None:
                continue
            f = adapter.modules[key]
            if f.a.shape[1] != layer.in_features or f.b.shape[0] != layer.out_features:
                raise ConfigError(
                    f"method 'eigenlora': bank adapter {adapter.source} has module {name!r} with lora_B x lora_A "
                    f"{tuple(f.b.shape)} x {tuple(f.a.shape)}, i.e. {f.b.shape[0]}x{f.a.shape[1]}, but the model's "
                    f"layer is {layer.out_features}x{layer.in_features}; was the bank trained on another backbone?")
            a_rows.append(f.a)
            b_rows.append(f.b.T)
            max_rank = max(max_rank, f.a.shape[0])
        if not a_rows:
            some = sorted(set().union(*(a.modules for a in bank)))[:4]
            raise ConfigError(f"method 'eigenlora': no adapter of the bank adapts module {name!r} (the bank's "
                              f"adapters cover e.g. {some}); train the bank's LoRAs on the same targets")
        return torch.cat(a_rows), torch.cat(b_rows), max_rank

    # --- life cycle ---------------------------------------------------------------------------------
    def check_fit(self, model: nn.Module, site: AdapterSite, settings: dict[str, Any]) -> None:
        super().check_fit(model, site, settings)
        for key in ("bank_dir", "reconstruct_from"):  # folders named in a sweep must exist before it starts
            if settings[key] and not Path(settings[key]).expanduser().exists():
                raise ConfigError(f"method 'eigenlora' setting {key!r}={settings[key]!r}: no such file or folder")

    def layer_factory(self, model: nn.Module, site: AdapterSite, settings: dict[str, Any],
                      ctx: MethodContext) -> LayerBuilder:
        mode = settings["mode"]
        r = int(settings["r"])
        variance = settings["variance"]
        if variance is not None and variance > 1:
            raise ConfigError(f"method 'eigenlora' setting 'variance'={variance!r}: a share in (0, 1], e.g. 0.6")
        if mode == "reconstruct" and not settings["reconstruct_from"]:
            raise ConfigError("method 'eigenlora' mode 'reconstruct' needs reconstruct_from=<LoRA adapter folder>")
        layers = target_layers(model, site)
        bank = self.load_bank(settings, ctx)

        # Principal components of every module and side, before choosing K (which is shared by all).
        spectra, raw = [], {}
        for name, layer in layers:
            a_rows, b_rows, max_rank = self._bank_rows(bank, name, layer)
            if mode != "reconstruct" and r > max_rank:
                raise ConfigError(f"method 'eigenlora': r={r} is larger than the bank allows at module {name!r} "
                                  f"(its LoRAs have rank at most {max_rank}); use r <= {max_rank}")
            pa, pb = (principal_components(a_rows, settings["keep_mean"]),
                      principal_components(b_rows, settings["keep_mean"]))
            raw[name] = (pa, pb)
            spectra += [pa[1], pb[1]]
        k = choose_k(spectra, variance) if variance is not None else int(settings["k"])
        check_rank(model, site, k, self.name, what="number of components K")

        gen = torch.Generator(device="cpu").manual_seed(int(ctx.seed))
        target = read_adapters(Path(settings["reconstruct_from"])) if mode == "reconstruct" else []
        if mode == "reconstruct" and len(target) != 1:
            raise ConfigError(f"method 'eigenlora': reconstruct_from={settings['reconstruct_from']!r} holds "
                              f"{len(target)} LoRA adapters; give exactly one")

        info = {"K": k, "bank_size": len(bank), "mode": mode, "random_components": 0, "explained_min": 1.0,
                "bank_from": f"bank_dir={settings['bank_dir']}" if settings["bank_dir"] else "trials",
                "bank": bank_manifest([a.source for a in bank])}
        # Every layer is built before the model changes, so a bad reconstruct_from leaves it untouched.
        built: dict[str, EigenLoRALinear] = {}
        for name, layer in layers:
            comps = []
            for vh, s, mean in raw[name]:
                total = float((s ** 2).sum()) or 1.0
                e = extend_orthogonal(vh[:k], k, gen)
                comps.append(Components(e=e, mean=mean, from_bank=min(k, vh.shape[0]),
                                        explained=float((s[:k] ** 2).sum()) / total))
                info["random_components"] += k - comps[-1].from_bank
                info["explained_min"] = min(info["explained_min"], comps[-1].explained)
            ca, cb = comps
            if mode == "reconstruct":
                key = _match_module(name, set(target[0].modules))
                if key is None:
                    raise ConfigError(f"method 'eigenlora': reconstruct_from has no LoRA for module {name!r}")
                f = target[0].modules[key]
                if f.a.shape[1] != layer.in_features or f.b.shape[0] != layer.out_features:
                    raise ConfigError(f"method 'eigenlora': reconstruct_from module {name!r} is "
                                      f"{f.b.shape[0]}x{f.a.shape[1]}, the model's layer "
                                      f"{layer.out_features}x{layer.in_features}")
                # alpha^T = (W - mean) E^T, for A's rows and B's columns
                alpha_a = ((f.a - ca.mean) @ ca.e.T).T
                alpha_b = ((f.b.T - cb.mean) @ cb.e.T).T
            else:
                alpha_a = torch.rand(k, r, generator=gen, dtype=torch.float64) - 0.5
                alpha_b = torch.rand(k, r, generator=gen, dtype=torch.float64) - 0.5
            built[name] = EigenLoRALinear(layer, ca.e, cb.e, ca.mean, cb.mean, alpha_a, alpha_b,
                                          trainable=(mode == "train"))
        method_state(model)[_INFO_KEY] = info
        return lambda name, _linear: built[name]

    def describe(self, model: nn.Module) -> dict[str, Any]:
        info = dict(method_state(model).get(_INFO_KEY, {}))
        info["modules"] = len(self.layers(model))
        return info

    def save_extra(self, model: nn.Module, folder: Path) -> None:
        (folder / _INFO_FILE).write_text(json.dumps(self.describe(model), indent=1))

    def rebuild(self, model: nn.Module, site: AdapterSite, settings: dict[str, Any], folder: Path,
                ctx: MethodContext) -> nn.Module:
        """The layers from the saved components, means and coefficients: a load needs no bank."""
        from safetensors import safe_open

        path = folder / self.state_file
        if not path.is_file():
            raise ConfigError(f"{folder}: no {self.state_file}; not a saved 'eigenlora' adapter")
        with safe_open(str(path), framework="pt") as f:
            saved = {k: f.get_tensor(k) for k in f.keys() if not k.startswith("head::")}
        for name, _ in target_layers(model, site):
            if any(f"{name}.{t}" not in saved for t in EigenLoRALinear.adapter_tensors):
                raise ConfigError(f"{folder}: the saved adapter has no tensors for module {name!r}")

        def build(name: str, linear: nn.Linear) -> EigenLoRALinear:
            # adapter_tensors lists the tensors in the constructor's argument order
            tensors = (saved[f"{name}.{t}"] for t in EigenLoRALinear.adapter_tensors)
            return EigenLoRALinear(linear, *tensors, trainable=(settings["mode"] == "train"))

        return self.adapt(model, site, build)

    def load_extra(self, model: nn.Module, folder: Path) -> None:
        info_path = folder / _INFO_FILE
        if info_path.is_file():
            method_state(model)[_INFO_KEY] = json.loads(info_path.read_text())
