"""The methods whose reference implementation is ``peft``: LoRA, DoRA, PiSSA, OLoRA, AdaLoRA, EVA,
EVA+DoRA, VeRA and RandLoRA.

Each wraps the track's model with ``peft.get_peft_model`` on the site's target Linears, then unfreezes
the task head (trained by every method, saved beside the adapter in ``head.safetensors``). Saving uses
``save_pretrained``; PiSSA and OLoRA, which overwrite the base weights, are saved as the equivalent
plain LoRA of rank 2r on the untouched base, so a reload needs nothing but the original base.
"""

from __future__ import annotations

import shutil
import tempfile
import weakref
from pathlib import Path
from typing import Any

import torch
from torch import nn

from harness.errors import ConfigError
from harness.methods.eva_init import fast_input_keys
from harness.methods.base import (AdapterSite, Method, MethodContext, Setting, check_rank, head_state,
                                  load_head_state, method_state, unfreeze_head, write_settings)
from harness.scaling import ALPHA_RULES, DEFAULT_ALPHA_RULE

# method_state keys
_INIT_DIR = "initial_adapter_dir"  # PiSSA/OLoRA: the untrained adapter a save converts against
_ORTH_WEIGHT = "adalora_orth_reg_weight"
_IMPORTANCE_EVERY = "adalora_importance_every"
_ORTH_GROUPS = "adalora_orth_groups"  # the P and Q matrices grouped by shape, found once per model
_ADALORA_PARAMS = "adalora_named_params"  # (names, params) the allocator scores, found once per model
_FINAL_MASKS = "adalora_final_masks"  # (rank_pattern it was built from, E params, 0/1 masks)
_PENALTY = "adalora_penalty"  # the PenaltyWithForward hook (the last training forward's penalty)


def _ready(model: nn.Module, site: AdapterSite, input_casts: bool) -> nn.Module:
    """The last steps of every wrap and load: the head trains, the adapted layers get the harness's fast
    forward (``fast_peft``; peft's own where it has none), and peft's input casts are off where that
    changes nothing.

    peft casts each adapter's input to the adapter weights' dtype (fp32) before the adapter's matmul;
    under bf16 autocast that matmul casts it straight back to bf16, so for a method whose adapter path is
    matmuls only the cast merely copies every targeted layer's activations twice per step (much of
    LoRA's overhead over full fine-tuning on a GPU); tests check outputs and gradients are unchanged.
    DoRA's and RandLoRA's element-wise terms do run in the input's dtype: they keep the casts.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    from harness.methods import fast_peft  # heavy: harness.methods.fast_peft imports peft

    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            module.cast_input_dtype_enabled = input_casts
    fast_peft.enable(model)
    unfreeze_head(model, site)
    return model


class PeftMethod(Method):
    """Shared life cycle of the PEFT-backed methods; subclasses build the config."""

    def peft_config(self, settings: dict[str, Any], site: AdapterSite, ctx: MethodContext):
        raise NotImplementedError(f"{type(self).__name__} is abstract: a PEFT method subclass implements peft_config()")

    def wrap(self, model: nn.Module, site: AdapterSite, settings: dict[str, Any], ctx: MethodContext) -> nn.Module:
        from peft import get_peft_model

        self.check_fit(model, site, settings)
        peft_model = get_peft_model(model, self.peft_config(settings, site, ctx))
        self.after_wrap(peft_model, settings, ctx)
        return self.ready(peft_model, site)

    def ready(self, peft_model: nn.Module, site: AdapterSite) -> nn.Module:
        """The last steps of every wrap and load (the head trains, the fast forward, peft's input casts as
        :attr:`pure_matmul` says): a method that builds its peft model in a ``wrap`` of its own ends with it."""
        return _ready(peft_model, site, self.input_casts)

    rank_limited = True
    # peft casts each adapter's input to the adapter's dtype; a method whose adapter path is matmuls only
    # declares pure_matmul = True and runs without the casts (see _ready). The default keeps peft's casts,
    # so a new method behaves as in peft until a test shows the casts change nothing for it.
    pure_matmul = False

    @property
    def input_casts(self) -> bool:
        return not self.pure_matmul

    def check_fit(self, model: nn.Module, site: AdapterSite, settings: dict[str, Any]) -> None:
        super().check_fit(model, site, settings)  # fails clearly when no target matches
        if "r" in settings and self.rank_limited:
            check_rank(model, site, int(settings["r"]), self.name)

    def after_wrap(self, model: nn.Module, settings: dict[str, Any], ctx: MethodContext) -> None:
        """Hook for initialisations that need the wrapped model (EVA, the PiSSA save anchor)."""

    def save(self, model: nn.Module, site: AdapterSite, settings: dict[str, Any], folder: Path) -> None:
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        init_dir = method_state(model).get(_INIT_DIR)
        if init_dir:
            model.save_pretrained(str(folder), path_initial_model_for_weight_conversion=init_dir)
        else:
            model.save_pretrained(str(folder))
        save_file(head_state(model, site), str(folder / "head.safetensors"))
        write_settings(folder, self.name, settings)

    def load(self, model: nn.Module, site: AdapterSite, settings: dict[str, Any], folder: Path,
             ctx: MethodContext | None = None) -> nn.Module:
        from peft import PeftModel
        from safetensors.torch import load_file

        folder = Path(folder)
        if not (folder / "adapter_config.json").is_file():
            raise ConfigError(f"{folder}: no adapter_config.json; not a saved {self.name!r} adapter")
        loaded = PeftModel.from_pretrained(model, str(folder), is_trainable=True)
        _ready(loaded, site, self.input_casts)
        load_head_state(loaded, site, load_file(str(folder / "head.safetensors")))
        return loaded

    def merge(self, model: nn.Module) -> nn.Module:
        return model.merge_and_unload()


def _alpha(settings: dict[str, Any]) -> float:
    """The study's alpha rule has filled ``alpha`` (harness/scaling.py) for trials; a direct call without
    it gets the rule's default."""
    return settings["alpha"] if settings["alpha"] is not None else ALPHA_RULES[DEFAULT_ALPHA_RULE](int(settings["r"]))


def _lora_kwargs(settings: dict[str, Any], site: AdapterSite) -> dict[str, Any]:
    r = int(settings["r"])
    alpha = _alpha(settings)
    return dict(r=r, lora_alpha=alpha, lora_dropout=settings["dropout"], target_modules=list(site.targets),
                exclude_modules=list(site.head), use_rslora=settings.get("rslora", False), bias="none")


LORA_SETTINGS: dict[str, Setting] = {
    "r": Setting(8, "rank", kind=int, ge=1),
    "alpha": Setting(None, "scale numerator (update scaled by alpha/r); None: the study's alpha_rule "
                           "(one rule for the whole LoRA family)", kind=(float, int, type(None))),
    "dropout": Setting(0.0, "dropout on the adapter input (0 keeps the fast path)", ge=0),
    "rslora": Setting(False, "rank-stabilised scaling alpha/sqrt(r)"),
}


class LoRA(PeftMethod):
    name = "lora"
    summary = "LoRA (Hu et al. 2021) through peft: Delta W = B A, rank r, B starts at 0"
    settings = dict(LORA_SETTINGS)
    init: Any = True
    dora = False
    alpha_family = True

    @property
    def pure_matmul(self) -> bool:  # type: ignore[override]
        return not self.dora  # DoRA's magnitude terms run in the input's dtype: they keep peft's casts

    def init_weights(self, settings: dict[str, Any]) -> Any:
        return self.init

    def peft_config(self, settings, site, ctx):
        from peft import LoraConfig

        return LoraConfig(**_lora_kwargs(settings, site), init_lora_weights=self.init_weights(settings),
                          use_dora=self.dora)


class DoRA(LoRA):
    name = "dora"
    summary = "DoRA (Liu et al. 2024) through peft: LoRA direction plus a trained magnitude per output"
    dora = True


class _BaseRewritingLoRA(LoRA):
    """PiSSA and OLoRA overwrite the base weight; keep the untrained adapter so saves convert cleanly."""

    def after_wrap(self, model, settings, ctx):
        init_dir = tempfile.mkdtemp(prefix=f"harness-{self.name}-init-")
        cfg = model.peft_config["default"]
        chosen = cfg.init_lora_weights
        cfg.init_lora_weights = True  # peft's documented way to store the initial adapter for conversion
        try:
            model.save_pretrained(init_dir)
        finally:
            cfg.init_lora_weights = chosen
        method_state(model)[_INIT_DIR] = init_dir
        weakref.finalize(model, shutil.rmtree, init_dir, True)  # the folder lives as long as the model

    def load(self, model, site, settings, folder, ctx=None):
        # The saved adapter is a plain LoRA (rank 2r) on the untouched base: load it as such.
        return LoRA.load(self, model, site, settings, folder, ctx)


class PiSSA(_BaseRewritingLoRA):
    name = "pissa"
    summary = "PiSSA (Meng et al. 2024) through peft: A, B from the top-r singular vectors of W"
    settings = {**LORA_SETTINGS, "niter": Setting(None, "None: exact SVD; K: randomised SVD with K iterations",
                                                  kind=(int, type(None)), ge=0)}

    def init_weights(self, settings):
        return "pissa" if settings["niter"] is None else f"pissa_niter_{int(settings['niter'])}"


class OLoRA(_BaseRewritingLoRA):
    name = "olora"
    summary = "OLoRA (Buyukakyuz 2024) through peft: A, B from a QR decomposition of W"
    init = "olora"


class AdaLoRA(PeftMethod):
    pure_matmul = True  # P diag(E) Q: matmuls only (tests/test_methods_peft.py checks it without the casts)
    name = "adalora"
    summary = "AdaLoRA (Zhang et al. 2023) through peft: SVD-form adapters, rank budget reallocated during training"
    settings = {
        "r": Setting(8, "target average rank after pruning", kind=int, ge=1),
        "init_r_extra": Setting(4, "ranks start at r + this (EVA's protocol: r + 4)", kind=int, ge=0),
        "alpha": Setting(None, "scale numerator; None: the study's alpha_rule", kind=(float, int, type(None))),
        "dropout": Setting(0.0, "adapter dropout", ge=0),
        "tinit": Setting(0.1, "share of the steps before pruning starts", ge=0),
        "tfinal": Setting(0.2, "share of the steps at the end with the budget fixed", ge=0),
        "delta_t": Setting(10, "steps between budget reallocations", kind=int, ge=1),
        "orth_reg_weight": Setting(0.5, "weight of the orthogonality penalty on P and Q", ge=0),
        "importance_every": Setting(1, "steps between updates of the sensitivity averages that rank the "
                                       "triplets (1: every step, as peft and the paper; k > 1 smooths over every "
                                       "k-th step's sensitivity, fewer passes over the adapters)", kind=int, ge=1),
    }

    alpha_family = True

    def peft_config(self, settings, site, ctx):
        from peft import AdaLoraConfig

        total = max(int(ctx.total_steps), 1)
        tinit, tfinal = int(settings["tinit"] * total), int(settings["tfinal"] * total)
        if tinit >= total - tfinal:  # peft requires tinit < total - tfinal; tiny budgets get a short schedule
            tinit, tfinal = 0, 0
        r = int(settings["r"])
        return AdaLoraConfig(init_r=r + int(settings["init_r_extra"]), target_r=r,
                             lora_alpha=_alpha(settings),
                             lora_dropout=settings["dropout"], tinit=tinit, tfinal=tfinal,
                             deltaT=int(settings["delta_t"]), total_step=total,
                             orth_reg_weight=settings["orth_reg_weight"], target_modules=list(site.targets),
                             exclude_modules=list(site.head))

    def check_fit(self, model, site, settings):
        site.target_linears(model)
        check_rank(model, site, int(settings["r"]) + int(settings["init_r_extra"]), self.name,
                   what="initial rank r + init_r_extra")

    def wrap(self, model, site, settings, ctx):
        from peft.tuners.adalora.layer import SVDLinear

        wrapped = super().wrap(model, site, settings, ctx)
        state = method_state(wrapped)
        state[_ORTH_WEIGHT] = float(settings["orth_reg_weight"])
        state[_IMPORTANCE_EVERY] = int(settings["importance_every"])
        if state[_ORTH_WEIGHT] > 0 and _orth_groups(wrapped):
            layers = [m for m in wrapped.modules() if isinstance(m, SVDLinear)]
            hook = state[_PENALTY] = PenaltyWithForward(state[_ORTH_WEIGHT], _orth_groups(wrapped), layers)
            wrapped.register_forward_hook(hook)
        return wrapped

    def on_step(self, model, step, ctx):
        adalora_update_and_allocate(model, step, method_state(model).get(_IMPORTANCE_EVERY, 1))

    def extra_loss(self, model):
        # peft adds this penalty only when the model output has `.loss`, which neither track's model has.
        state = method_state(model)
        weight = state.get(_ORTH_WEIGHT, 0.0)
        if weight <= 0:
            return None
        hook = state.get(_PENALTY)
        if hook is not None and hook.value is not None:  # the training forward's
            stashed, hook.value = hook.value, None
            return stashed
        penalty = orthogonality_penalty(model)
        return None if penalty is None else weight * penalty

    def describe(self, model):
        ranks = {}
        for name, module in model.named_modules():
            mask = getattr(module, "ranknum", None)
            lora_e = getattr(module, "lora_E", None)
            if mask is not None and lora_e is not None and "default" in lora_e:
                ranks[name] = int((lora_e["default"].detach() != 0).sum())
        return {"rank_per_layer": ranks}


def orthogonality_penalty(model: nn.Module) -> torch.Tensor | None:
    """AdaLoRA's ``mean ||P P^T - I||_F`` over every trainable P (``lora_A``, r x in) and Q (``lora_B``,
    out x r, as ``Q^T Q``), the value peft adds to ``outputs.loss``.

    peft computes it with a Python loop over the matrices (several small kernels each, every step). Here
    the matrices of one shape are stacked and done in one batched product and one norm per shape, so the
    cost does not grow with the number of adapted layers.
    """
    groups = _orth_groups(model)
    return _grouped_penalty(groups) if groups else None


def _grouped_penalty(groups: list[tuple[str, list[nn.Parameter]]]) -> torch.Tensor:
    return _penalty_of_stacks([(kind, torch.stack(ps)) for kind, ps in groups])


def _penalty_of_stacks(stacks: list[tuple[str, torch.Tensor]]) -> torch.Tensor:
    """The penalty of stacked P (kind "A", ``(G, r, in)``) and Q (kind "B", ``(G, out, r)``) matrices: the
    mean over every matrix, so it does not depend on how the matrices are grouped."""
    norms = []
    for kind, stacked in stacks:
        gram = stacked @ stacked.mT if kind == "A" else stacked.mT @ stacked  # (G, r, r)
        eye = torch.eye(gram.shape[-1], device=gram.device, dtype=gram.dtype)
        norms.append(torch.linalg.matrix_norm(gram - eye, ord="fro"))
    return torch.cat(norms).mean()


def _orth_groups(model: nn.Module) -> list[tuple[str, list[nn.Parameter]]]:
    """The trainable P (``lora_A``) and Q (``lora_B``) matrices grouped by kind and shape, found once."""
    state = method_state(model)
    groups = state.get(_ORTH_GROUPS)
    if groups is None:
        by_shape: dict[tuple, list[nn.Parameter]] = {}
        for name, p in model.named_parameters():
            if not p.requires_grad or ("lora_A" not in name and "lora_B" not in name) or p.numel() == 0:
                continue
            by_shape.setdefault(("A" if "lora_A" in name else "B", tuple(p.shape)), []).append(p)
        groups = state[_ORTH_GROUPS] = [(kind, ps) for (kind, _), ps in by_shape.items()]
    return groups


class PenaltyWithForward:
    """Forward hook of a wrapped AdaLoRA model: a training forward also computes the weighted penalty
    (``value``), which :meth:`AdaLoRA.extra_loss` then hands to the loop (and clears).

    Same value, same gradients as computing it after the forward (the parameters do not change in
    between), and in fp32 as before (autocast off here). Inside the forward it is part of the trainer's
    compiled graph (``compile: true``): its products and norms fuse there, and its gradients are summed
    with the forward's inside the compiled backward, where, computed eagerly after the forward, it cost
    some hundred small kernel launches per step on ViT-B (the penalty, its backward, and one gradient
    accumulation per P and Q). What the traced hook reads lives on this object, not in the model's
    method state, which the allocator changes during training: a compiled forward would recompile then.


    An eager forward whose layers built their factors in groups (``FastSVDLinear.group_operands``) left
    their stacked P and Q on ``layers``: the penalty is computed from those where they hold exactly its
    matrices, so each matrix is stacked once per step (``FastSVDLinear.share_stacks``).
    """

    def __init__(self, weight: float, groups: list[tuple[str, list[nn.Parameter]]], layers: list[nn.Module] = ()):
        self.weight, self.groups = weight, groups
        self.value: torch.Tensor | None = None
        self.layers = list(layers)
        self._matrices = frozenset(id(p) for _, ps in groups for p in ps)
        for layer in self.layers:
            layer.share_stacks = True

    def __call__(self, model: nn.Module, args: Any, output: Any) -> None:
        stacks = None if torch.compiler.is_compiling() else self._take_stacks()
        if not (model.training and torch.is_grad_enabled()):
            return
        with torch.autocast(self.groups[0][1][0].device.type, enabled=False):
            penalty = _penalty_of_stacks(stacks) if stacks else _grouped_penalty(self.groups)
            self.value = self.weight * penalty

    def _take_stacks(self) -> list[tuple[str, torch.Tensor]] | None:
        """The stacks the forward's layer groups kept (taken: the layers keep none), or None unless they
        hold each of this penalty's matrices exactly once."""
        stacks, seen, count = [], set(), 0
        for layer in self.layers:
            kept = getattr(layer, "_stacks", None)
            if kept is None:
                continue
            layer._stacks = None
            ps, qs, p, q = kept
            stacks += [("A", p), ("B", q)]
            seen.update(map(id, ps), map(id, qs))
            count += len(ps) + len(qs)
        return stacks if count == len(seen) and seen == self._matrices else None


def adalora_update_and_allocate(model: nn.Module, step: int, importance_every: int = 1) -> None:
    """peft's ``AdaLoraModel.update_and_allocate(step)`` with its per-step work batched.

    The same schedule as peft (budget from ``tinit``/``tfinal``/``total_step``, triplets masked to the
    budget every ``deltaT`` steps by peft's own ``mask_to_budget``, the final mask at ``total - tfinal``),
    with two differences in how, not what: the sensitivity averages (|p * grad| smoothed by beta1, its
    deviation by beta2) are updated with a handful of ``torch._foreach`` ops over all adapter tensors
    instead of eight kernels per tensor, and the final phase's rank pattern is turned into device masks
    once instead of a host list copied to the device per layer per step. ``importance_every`` > 1 updates
    the averages only on every k-th step (a semantic change: the averages then see one step in k).
    """
    base = model.base_model
    cfg = base.peft_config[base.trainable_adapter_name]
    alloc = base.rankallocator
    final = cfg.total_step - cfg.tfinal
    state = method_state(model)
    if step < final:
        if step % importance_every == 0:
            _update_importance(alloc, base.model, state)
        budget, mask_now = alloc.budget_schedule(step)
        if mask_now:
            pattern = _mask_to_budget(alloc, base.model, budget)
            if pattern:
                cfg.rank_pattern = pattern
    elif step == final:
        # at this step peft's allocator skips the sensitivity update and masks to the final budget
        budget, _ = alloc.budget_schedule(step)
        cfg.rank_pattern = _mask_to_budget(alloc, base.model, budget)
        alloc.reset_ipt()
    elif cfg.rank_pattern:
        cached = state.get(_FINAL_MASKS)
        if cached is None or cached[0] is not cfg.rank_pattern:
            cached = state[_FINAL_MASKS] = (cfg.rank_pattern, *_final_masks(base.model, alloc, cfg.rank_pattern))
        with torch.no_grad():
            torch._foreach_mul_(cached[1], cached[2])


def _mask_to_budget(alloc, inner: nn.Module, budget: int) -> dict[str, list[bool]]:
    """peft's ``RankAllocator.mask_to_budget`` in batched ops, with one device-to-host copy.

    The same scores as peft's: each triplet's ``E score + (mean of A's row scores + mean of B's column
    scores)``, every element score ``exp_avg_ipt * exp_avg_unc`` (peft's ``_element_score``, here one
    foreach product over all adapter tensors); the means over same-shape layers' stacked scores (the same
    reduction per row as peft's per-layer means); the same threshold (``kthvalue``, compared as a tensor
    of the scores' dtype where peft compares with its ``.item()``: the same value) and the same in-place
    masking. peft dispatched some eight operations per layer and waited for the device once per layer (and
    once more for the threshold): 838 top-level calls per masking on ViT's 48 layers against 143 here
    (BENCHMARKS.md, CPU count).
    """
    adapter = alloc.adapter_name
    e_params = [(n, p) for n, p in inner.named_parameters() if f"lora_E.{adapter}" in n]
    if not e_params:
        return {}
    kinds = [[n.replace("lora_E", kind) for n, _ in e_params] for kind in ("lora_A", "lora_B", "lora_E")]
    names = [n for names in kinds for n in names]
    scores = torch._foreach_mul([alloc.exp_avg_ipt[n] for n in names], [alloc.exp_avg_unc[n] for n in names])
    count = len(e_params)
    a_scores, b_scores, e_scores = scores[:count], scores[count:2 * count], scores[2 * count:]
    groups: dict[tuple, list[int]] = {}
    for i, (a, b) in enumerate(zip(a_scores, b_scores)):
        groups.setdefault((tuple(a.shape), tuple(b.shape)), []).append(i)
    triplet: list[torch.Tensor] = [torch.empty(0)] * count
    for members in groups.values():
        mean_a = torch.stack([a_scores[i] for i in members]).mean(dim=2)  # (G, r): peft's mean over A's rows
        mean_b = torch.stack([b_scores[i] for i in members]).mean(dim=1)  # over B's columns
        e = torch.stack([e_scores[i] for i in members]).view(len(members), -1)
        for i, row in zip(members, (e + (mean_a + mean_b)).unbind(0)):
            triplet[i] = row
    all_score = torch.cat(triplet)
    threshold = torch.kthvalue(all_score, k=alloc.init_bgt - budget)[0]
    with torch.no_grad():
        pruned = all_score <= threshold
        for (_, p), layer_pruned in zip(e_params, pruned.split([t.numel() for t in triplet])):
            p.masked_fill_(layer_pruned.view(-1, 1), 0.0)
    flags = (~pruned).tolist()
    pattern, start = {}, 0
    for (n, _), t in zip(e_params, triplet):
        pattern[n] = flags[start:start + t.numel()]
        start += t.numel()
    return pattern


def _update_importance(alloc, inner: nn.Module, state: dict[str, Any]) -> None:
    """``RankAllocator.update_ipt`` in foreach ops; the same arithmetic, the same dictionaries."""
    found = state.get(_ADALORA_PARAMS)
    if found is None:
        found = state[_ADALORA_PARAMS] = tuple(zip(*[(n, p) for n, p in inner.named_parameters()
                                                     if "lora_" in n and alloc.adapter_name in n]))
    names, params = found
    for n, p in zip(names, params):
        if n not in alloc.ipt:
            alloc.ipt[n] = torch.zeros_like(p)
            alloc.exp_avg_ipt[n] = torch.zeros_like(p)
            alloc.exp_avg_unc[n] = torch.zeros_like(p)
    with torch.no_grad():
        ipt = torch._foreach_mul(list(params), [p.grad for p in params])
        torch._foreach_abs_(ipt)
        avg = [alloc.exp_avg_ipt[n] for n in names]
        unc = [alloc.exp_avg_unc[n] for n in names]
        torch._foreach_mul_(avg, alloc.beta1)
        torch._foreach_add_(avg, ipt, alpha=1 - alloc.beta1)
        deviation = torch._foreach_sub(ipt, avg)
        torch._foreach_abs_(deviation)
        torch._foreach_mul_(unc, alloc.beta2)
        torch._foreach_add_(unc, deviation, alpha=1 - alloc.beta2)
    for n, t in zip(names, ipt):
        alloc.ipt[n] = t


def _final_masks(inner: nn.Module, alloc, pattern: dict[str, list[bool]]) -> tuple[list, list]:
    """The E vectors and their 0/1 masks (as peft's ``mask_using_rank_pattern`` reads the pattern)."""
    truncated = alloc.adapter_name not in next(iter(pattern))
    params, masks = [], []
    for n, p in inner.named_parameters():
        if f"lora_E.{alloc.adapter_name}" in n:
            key = n.replace(f".{alloc.adapter_name}", "") if truncated else n
            params.append(p)
            masks.append(torch.tensor(pattern[key], dtype=p.dtype, device=p.device).unsqueeze(-1))
    return params, masks


class EVA(LoRA):
    name = "eva"
    summary = ("EVA (Paischer et al. 2024) through peft: A from the SVD of the trial's own activations, "
               "ranks redistributed by explained variance")
    settings = {
        **LORA_SETTINGS,
        "rho": Setting(2.0, "a layer may get up to rho * r ranks (1: uniform ranks)", ge=1),
        "tau": Setting(0.99, "convergence threshold of the incremental PCA (cosine similarity)"),
        "whiten": Setting(False, "whiten A (suggested for vision)"),
        "init_batches": Setting(16, "minibatches of the trial's data offered to the initialisation", kind=int,
                                ge=1),
    }
    init = "eva"

    def peft_config(self, settings, site, ctx):
        from peft import EvaConfig, LoraConfig

        return LoraConfig(**_lora_kwargs(settings, site), init_lora_weights="eva", use_dora=self.dora,
                          eva_config=EvaConfig(rho=float(settings["rho"]), tau=float(settings["tau"]),
                                               whiten=bool(settings["whiten"])))

    def wrap(self, model, site, settings, ctx):
        from peft import get_peft_model

        self.check_fit(model, site, settings)
        if ctx.init_batches is None or ctx.forward_fn is None:
            raise ConfigError("method 'eva' needs the trial's training batches for its initialisation "
                              "(MethodContext.init_batches and forward_fn); this track did not provide them")
        peft_model = get_peft_model(model, self.peft_config(settings, site, ctx), low_cpu_mem_usage=True)
        self._initialise(peft_model, settings, ctx)
        return _ready(peft_model, site, self.input_casts)

    def _initialise(self, model, settings, ctx: MethodContext) -> None:
        from peft import initialize_lora_eva_weights

        batches = []
        for i, batch in enumerate(ctx.init_batches()):
            if i >= int(settings["init_batches"]):
                break
            batches.append(batch)
        if not batches:
            raise ConfigError("method 'eva': the trial offered no training batches for the initialisation")
        user_fn = ctx.layer_inputs_fn

        def layer_inputs(layer_input, model_input, layer_name):
            x = layer_input[0] if isinstance(layer_input, (tuple, list)) else layer_input
            if user_fn is not None:
                return user_fn(x, model_input)
            return x.reshape(-1, x.shape[-1])

        was_training = model.training
        model.eval()  # dropout off while the activations are collected
        with fast_input_keys():
            initialize_lora_eva_weights(model, dataloader=batches, forward_fn=ctx.forward_fn,
                                        prepare_model_inputs_fn=None, prepare_layer_inputs_fn=layer_inputs,
                                        show_progress_bar=False)
        model.train(was_training)

    def describe(self, model):
        ranks = {}
        for name, module in model.named_modules():
            r = getattr(module, "r", None)
            if isinstance(r, dict) and "default" in r and hasattr(module, "lora_A"):
                ranks[name.removeprefix("base_model.model.")] = int(r["default"])
        return {"rank_per_layer": ranks, "rho": model.peft_config["default"].eva_config.rho}

    def load(self, model, site, settings, folder, ctx=None):
        from peft import LoraConfig, PeftModel
        from safetensors.torch import load_file

        # The saved config says init "eva"; ranks are in its rank_pattern, so load as plain LoRA weights.
        cfg = LoraConfig.from_pretrained(str(folder))
        cfg.init_lora_weights = True
        cfg.eva_config = None
        loaded = PeftModel.from_pretrained(model, str(folder), config=cfg, is_trainable=True)
        _ready(loaded, site, self.input_casts)
        load_head_state(loaded, site, load_file(str(Path(folder) / "head.safetensors")))
        return loaded


class EVADoRA(EVA):
    name = "eva-dora"
    summary = "EVA initialisation with DoRA's magnitude vectors"
    dora = True


class VeRA(PeftMethod):
    pure_matmul = True  # scaled frozen projections: matmuls only (checked as AdaLoRA's)
    name = "vera"
    summary = "VeRA (Kopiczko et al. 2024) through peft: one frozen random A/B pair shared by all layers, trained scaling vectors"
    default_lr = 1e-2
    rank_limited = False  # the shared projections are sliced; r may exceed a layer's width
    settings = {
        "r": Setting(256, "rank of the shared random projections", kind=int, ge=1),
        "d_initial": Setting(0.1, "initial value of the d scaling vector"),
        "dropout": Setting(0.0, "adapter dropout", ge=0),
        "prng_key": Setting(0, "seed of the shared projections", kind=int),
    }

    def peft_config(self, settings, site, ctx):
        from peft import VeraConfig

        return VeraConfig(r=int(settings["r"]), d_initial=settings["d_initial"], vera_dropout=settings["dropout"],
                          projection_prng_key=int(settings["prng_key"]), save_projection=True,
                          target_modules=list(site.targets))


class RandLoRA(PeftMethod):
    pure_matmul = False  # its scaled bases multiply in the input's dtype: peft's casts stay
    name = "randlora"
    summary = "RandLoRA (Albert et al. 2025) through peft: full-rank update from frozen random rank-r bases, trained scalings"
    rank_limited = True
    settings = {
        "r": Setting(32, "rank of each random basis (lower r: more bases, more parameters)", kind=int, ge=1),
        "alpha": Setting(10.0, "scale numerator, update scaled by alpha/r: 10, the paper's scaling coefficient "
                               "10/r for vision (RandLoRA Table 8); peft's own default is 20 r",
                         kind=(float, int)),
        "dropout": Setting(0.0, "adapter dropout", ge=0),
        "prng_key": Setting(0, "seed of the random bases", kind=int),
    }

    def peft_config(self, settings, site, ctx):
        from peft import RandLoraConfig

        # save_projection=False: peft 0.21.x writes the shared bases once per layer (issue #3709); they are
        # regenerated from prng_key on load instead.
        r = int(settings["r"])
        return RandLoraConfig(r=r, randlora_alpha=settings["alpha"],
                              randlora_dropout=settings["dropout"], projection_prng_key=int(settings["prng_key"]),
                              save_projection=False, target_modules=list(site.targets))
