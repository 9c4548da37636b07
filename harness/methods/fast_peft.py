"""Fast forwards for peft's adapter layers, with peft's modules, parameters and save format kept.

:func:`enable` re-classes every peft LoRA (also PiSSA, OLoRA, EVA, DoRA, EVA+DoRA), AdaLoRA and VeRA
Linear to a subclass that differs in ``forward`` only, so ``state_dict`` keys, ``save_pretrained``, merging
and every ``isinstance`` check of peft stay as they were; :func:`disable` restores peft's own forward.
A forward takes the fast path only in the plain training/evaluation case (one active adapter, not merged,
no adapter dropout in training, an ``nn.Linear`` base); anything else falls back to peft's forward.

- LoRA family, AdaLoRA, VeRA: ``low_rank.low_rank_linear`` with the method's scalings folded into
  its factors (LoRA: ``B`` times ``scaling``; AdaLoRA: ``A * E`` and ``B`` times ``scaling / ranknum``;
  VeRA: the shared bases scaled by ``lambda_d`` and ``lambda_b``), so nothing scales the activations.
  VeRA's update is merged into the weight instead where its rank and the step's token count make that
  cheaper (``merge_pays``, which prices the merge's fp32 product at its GPU rate: the papers' r=256 merges
  on the DT's 512-wide layers, not on most of ViT-B's).
- DoRA: the column-normalised weight ``m / ||W + s B A||_c (W + s B A)`` (norm detached, DoRA section 4.3,
  as peft does) in one ``F.linear``; peft instead keeps the base output and the LoRA output and mixes
  them element-wise, which holds several activation-sized tensors per layer for the backward.

- RandLoRA: its update is a product of scaled shared bases of rank ``n r`` >= min(d_in, d_out) (full
  rank by design), so the low-rank form would cost more than the base matmul; it is merged instead
  (``F.linear(x, W + s B A, b)`` with ``W + s B A`` one addmm; the scaled bases computed once per forward
  as peft's ``get_scaled_bases`` computes them, in plain autograd ops where peft's ``UniqueBaseGrad`` runs
  a Python backward, minus its per-forward device moves), which costs what full fine-tuning's forward and
  weight gradient cost.
"""

from __future__ import annotations

from typing import Sequence

import torch
from peft.tuners.adalora.layer import SVDLinear
from peft.tuners.lora import layer as lora_layer
from peft.tuners.lora.variants import DoraLinearVariant
from peft.tuners.randlora.layer import Linear as RandLoraLinear, UniqueBaseGrad
from peft.tuners.vera.layer import Linear as VeraLinear
from torch import nn
from torch.nn import functional as F

from harness.methods.grouped_operands import GroupedOperands, GroupsOperands
from harness.methods.low_rank import frozen_cast, low_rank_linear


def _fast_adapter(layer, args: tuple, kwargs: dict, names, dropouts) -> str | None:
    """The adapter whose fast forward applies to this call, or None where peft's forward must run: extra
    forward arguments, adapters disabled or merged, not exactly one active adapter of ``names``, a base
    that is not a plain ``nn.Linear``, or adapter dropout active in training (``dropouts``: per adapter)."""
    if args or kwargs or layer.disable_adapters or layer.merged:
        return None
    active = layer.active_adapters
    if len(active) != 1 or active[0] not in names:
        return None
    if type(layer.get_base_layer()) is not nn.Linear or getattr(layer, "fan_in_fan_out", False):
        return None
    dropout = dropouts[active[0]]
    if layer.training and not isinstance(dropout, nn.Identity) and getattr(dropout, "p", 1.0) != 0.0:
        return None
    return active[0]


class FastLoraLinear(lora_layer.Linear):
    """peft's LoRA Linear (and its PiSSA/OLoRA/EVA initialisations and DoRA variant), fast forward."""

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        name = _fast_adapter(self, args, kwargs, self.lora_A.keys(), self.lora_dropout)
        if name is None or self.lora_B[name].bias is not None:
            return super().forward(x, *args, **kwargs)
        base = self.get_base_layer()
        a, b, scale = self.lora_A[name].weight, self.lora_B[name].weight, self.scaling[name]
        variant = self.lora_variant.get(name)
        if variant is None:
            return low_rank_linear(x, base.weight, base.bias, a, b, scale)
        if type(variant) is DoraLinearVariant:
            return self._dora(x, base, a, b, scale, self.lora_magnitude_vector[name].weight)
        return super().forward(x, *args, **kwargs)

    @staticmethod
    def _dora(x, base: nn.Linear, a, b, scale: float, magnitude) -> torch.Tensor:
        # the scale applied by the add (one dispatch, where a multiply, a cast and an add were three)
        weight = torch.add(base.weight, b @ a, alpha=scale)
        if weight.dtype != base.weight.dtype:
            weight = weight.to(base.weight.dtype)
        # the norm is a constant of the backward (DoRA section 4.3): computed on a detached copy
        norm = torch.linalg.norm(weight.detach(), dim=1)
        return F.linear(x, (magnitude / norm).unsqueeze(1) * weight, frozen_cast(base.bias))


class FastSVDLinear(SVDLinear, GroupsOperands):
    """peft's AdaLoRA layer, fast forward: ``B diag(E) A`` scaled by ``scaling / ranknum``; eager, the
    factors of same-shape layers are built together (:mod:`harness.methods.grouped_operands`)."""

    # Set by AdaLoRA's orthogonality penalty on the layers it covers (``PenaltyWithForward``): a grouped
    # training forward then keeps its group's stacked P (``lora_A``) and Q (``lora_B``) in ``_stacks`` for
    # the penalty, which takes them. Each P and Q then reaches the loss through one stack, where a second
    # stack of its own cost the backward one select and one gradient accumulation per matrix.
    share_stacks: bool = False
    # (P matrices, Q matrices, stacked P, stacked Q) of this layer's group, on the group's first layer
    _stacks: tuple | None = None

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        factors = self.take_operands()  # taken first: never left for a later call
        name = _fast_adapter(self, args, kwargs, self.lora_A.keys(), self.lora_dropout)
        if name is None:
            return super().forward(x, *args, **kwargs)
        base = self.get_base_layer()
        if factors is not None and factors[0] == name:
            a, b = factors[1:]
        else:
            a = self.lora_A[name] * self.lora_E[name]
            b = self.lora_B[name] * (self.scaling[name] / (self.ranknum[name] + 1e-5))
        return low_rank_linear(x, base.weight, base.bias, a, b)

    def group_key(self) -> tuple | None:
        name = _fast_adapter(self, (), {}, self.lora_A.keys(), self.lora_dropout)
        if name is None:
            return None
        a = self.lora_A[name]
        return name, tuple(a.shape), tuple(self.lora_B[name].shape), self.scaling[name], a.dtype, a.device

    @classmethod
    def group_operands(cls, layers: Sequence["FastSVDLinear"]) -> list[tuple]:
        """(adapter, A * E, B * scaling / ranknum) of every layer, as the forward's products of the layers'
        stacked tensors (element-wise: the same values)."""
        name = next(iter(layers[0].active_adapters))

        def stacked(kind: str) -> torch.Tensor:
            return torch.stack([getattr(layer, kind)[name] for layer in layers])

        p, q = stacked("lora_A"), stacked("lora_B")
        if layers[0].share_stacks and torch.is_grad_enabled():
            layers[0]._stacks = ([layer.lora_A[name] for layer in layers], [layer.lora_B[name] for layer in layers],
                                 p, q)
        a = (p * stacked("lora_E")).unbind(0)
        scale = (layers[0].scaling[name] / (stacked("ranknum") + 1e-5)).unsqueeze(-1)
        b = (q * scale).unbind(0)
        return [(name, a_i, b_i) for a_i, b_i in zip(a, b)]

    @classmethod
    def before_groups(cls, layers: Sequence["FastSVDLinear"]) -> None:
        for layer in layers:  # nothing kept from an earlier forward whose penalty did not take it
            layer._stacks = None


# Whether VeRA's fast forward merges its update into the weight: None where :func:`merge_pays` says so,
# True/False always/never. ``bench methods --set vera_merge=...`` sets it for a GPU A/B.
VERA_MERGE: bool | None = None

# What one multiply-add of the merged forms' fp32 product costs in bf16 multiply-adds, on a GPU under bf16
# autocast without TF32 (an H200: about 990 dense bf16 TFLOP/s against 67 fp32). The product is kept in
# fp32 for accuracy (RandLoRA's comment below), so on a GPU it runs at a fifteenth of the rate FLOP
# counts assume.
FP32_PRODUCT_COST = 15.0


def merge_pays(rank: int, d_in: int, d_out: int, tokens: int | None = None, product_cost: float = 1.0) -> bool:
    """Whether merging a rank-``rank`` update into the weight costs less per step than applying it to the
    activations of ``tokens`` tokens. The activation path adds ``rank (d_in + d_out)`` multiply-adds per
    token in the forward and twice that in the backward; the merged weight adds its weight gradient,
    ``d_in d_out`` per token, and the merge itself, ``rank d_in d_out`` in the forward and twice that in
    the backward, each weighted by ``product_cost`` (:data:`FP32_PRODUCT_COST` where that product runs in
    fp32 beside bf16 matmuls). ``tokens`` None: the merge's own product is left out (many tokens).

    ViT-B/16 at batch 64 (12,608 tokens, r=256): merged on the 768x768 projection only, low-rank on qkv
    and the MLP; the paper DT at batch 128 (25,600 tokens, width 512): merged everywhere."""
    per_token = 3 * rank * (d_in + d_out) > d_in * d_out
    if tokens is None or not per_token:
        return per_token
    return 3 * rank * (d_in + d_out) * tokens > d_in * d_out * tokens + product_cost * 3 * rank * d_in * d_out


class FastVeraLinear(VeraLinear):
    """peft's VeRA layer, fast forward: the shared frozen bases scaled by the trained vectors, applied to
    the activations, or merged into the weight where its rank (256 in the papers) makes that cheaper
    (:func:`merge_pays`: on the DT's 512-wide layers VeRA's low-rank path cost 1.6x full fine-tuning)."""

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        name = _fast_adapter(self, args, kwargs, self.vera_lambda_d.keys(), self.vera_dropout)
        if name is None:
            return super().forward(x, *args, **kwargs)
        base = self.get_base_layer()
        shared_a, shared_b = self.vera_A[name], self.vera_B[name]
        # the shared bases sliced only where they are larger than this layer (a slice is a dispatch)
        if shared_a.shape[1] != self.in_features:
            shared_a = shared_a[:, : self.in_features]
        if shared_b.shape[0] != self.out_features:
            shared_b = shared_b[: self.out_features, :]
        a = self.vera_lambda_d[name].unsqueeze(1) * shared_a
        b = self.vera_lambda_b[name].unsqueeze(1) * shared_b
        if VERA_MERGE is None:
            fp32_beside_bf16 = a.dtype == torch.float32 and x.is_cuda and torch.is_autocast_enabled("cuda")
            merge = merge_pays(a.shape[0], self.in_features, self.out_features, x.numel() // x.shape[-1],
                               FP32_PRODUCT_COST if fp32_beside_bf16 else 1.0)
        else:
            merge = VERA_MERGE
        if merge:
            # the product in the adapter's dtype, autocast off, as RandLoRA's merged path (accuracy)
            with torch.autocast(x.device.type, enabled=False):
                if b.dtype == base.weight.dtype:
                    weight = torch.addmm(base.weight, b, a)
                else:
                    weight = base.weight + (b @ a).to(base.weight.dtype)
            return F.linear(x, weight, frozen_cast(base.bias))
        return low_rank_linear(x, base.weight, base.bias, a, b)


# Whether RandLoRA's fast forward scales its bases in plain autograd ops (True) or through peft's
# ``UniqueBaseGrad`` (False: the same arithmetic, a Python backward with two einsums per layer).
# ``bench methods --set randlora_scales=peft`` sets it for a GPU A/B.
PLAIN_RANDLORA_SCALES = True


class FastRandLoraLinear(RandLoraLinear):
    """peft's RandLoRA layer, fast forward: the update merged into the weight for the one matmul."""

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        name = _fast_adapter(self, args, kwargs, self.randlora_lambda.keys(), self.randlora_dropout)
        if name is None:
            return super().forward(x, *args, **kwargs)
        base = self.get_base_layer()
        # peft's forward is x -> F.linear(F.linear(x, first), second) * scaling: Delta W = second @ first
        # In the adapter's dtype, autocast off: in bf16 the product's rounding tripled the error of lambda's
        # and gamma's gradients against peft's own bf16 path (tests/test_fast_paths.py). Its cost is one
        # weight-sized GEMM of inner size n r ~ min(d_in, d_out) per layer, forward and backward.
        with torch.autocast(x.device.type, enabled=False):
            first, second = self._scaled_bases(name, x.device)
            if first.dtype == base.weight.dtype:  # W + s (second @ first) in one addmm
                weight = torch.addmm(base.weight, second, first, alpha=self.scaling[name])
            else:
                weight = base.weight + ((second @ first) * self.scaling[name]).to(base.weight.dtype)
        return F.linear(x, weight, frozen_cast(base.bias))

    def _scaled_bases(self, name: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """peft's ``get_scaled_bases`` (the same slices, the same products, the same order) without its
        per-forward ``.to(device)`` of four tensors already there: each was a dispatch of its own. Where
        peft casts (bf16/fp16 bases on the CPU) or a tensor is elsewhere, peft's own runs."""
        a, b = self.randlora_A[name], self.randlora_B[name]
        lam, gamma = self.randlora_lambda[name], self.randlora_gamma[name]
        if (b.dtype in (torch.float16, torch.bfloat16) and device.type == "cpu") or not (
                a.device == b.device == lam.device == gamma.device == device):
            return self.get_scaled_bases(name, device=device)
        small, large = min(self.out_features, self.in_features), max(self.out_features, self.in_features)
        update_b = b[:large, : self.num_bases, :].flatten(start_dim=1)
        # lambda (r x n) and gamma (n x small) scale the one base row A (r x 1 x small) as peft's
        # UniqueBaseGrad does, in plain autograd ops: its backward is the same arithmetic (a product and a
        # sum per scale), without the two three-operand einsums its Python backward runs per layer
        if PLAIN_RANDLORA_SCALES:
            update_a = (lam.unsqueeze(-1) * a[:, : self.num_bases, :small] * gamma).flatten(end_dim=1)
        else:
            update_a = UniqueBaseGrad.apply(a[:, : self.num_bases, :small], lam, gamma).flatten(end_dim=1)
        if small == self.in_features:
            return update_a, update_b
        return update_b.T, update_a.T


_FAST: dict[type, type] = {lora_layer.Linear: FastLoraLinear, SVDLinear: FastSVDLinear, VeraLinear: FastVeraLinear,
                           RandLoraLinear: FastRandLoraLinear}
_PEFT: dict[type, type] = {fast: slow for slow, fast in _FAST.items()}


def enable(model: nn.Module) -> int:
    """Give every supported peft layer of ``model`` its fast forward, and ``model`` the pre-hook of those
    that group their operands (once); returns how many layers were switched."""
    count, kinds = 0, set()
    for module in model.modules():
        fast = _FAST.get(type(module))
        if fast is not None:
            module.__class__ = fast
            count += 1
            kinds.add(fast)
    hooked = {hook.kind for hook in model._forward_pre_hooks.values() if isinstance(hook, GroupedOperands)}
    for kind in sorted(kinds - hooked, key=lambda k: k.__name__):
        if issubclass(kind, GroupsOperands) and kind.groups_operands():
            model.register_forward_pre_hook(GroupedOperands(kind))
    return count


def disable(model: nn.Module) -> int:
    """Restore peft's own forward on every layer :func:`enable` switched; returns how many."""
    count = 0
    for module in model.modules():
        slow = _PEFT.get(type(module))
        if slow is not None:
            module.__class__ = slow
            count += 1
    return count
