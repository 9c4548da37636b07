"""The low-rank update of an adapted Linear in the fewest activation-sized operations.

Adapters written as modules (peft's ``lora_A``/``lora_B`` then ``* scaling``; VeRA's ``lambda_b *
F.linear(lambda_d * F.linear(x, A), B)``) scale the activations: every scaling is an element-wise pass
over an activation-sized tensor in the forward and again in the backward, and it keeps that tensor for
the backward. Folding the scalings into the small factors first leaves ``x W^T + bias + (x a^T) b^T``:
two matmuls and one add beyond the base layer, in plain autograd (the backward stays in C++, which keeps
an eager step from being bound by Python, and torch.compile fuses the add into its neighbours).

Merging the update into the weight for the forward (``F.linear(x, W + b a, bias)``, as DoRA's fast path
must) trades those passes for the weight-gradient GEMM; measured on ViT-B it was not faster for LoRA
(BENCHMARKS.md), so the low-rank form stays.

A hand-written autograd function that added the update inside the base matmul's epilogue was measured
and dropped: its Python backward made eager steps slower and compiled ones opaque (BENCHMARKS.md). Eager,
the update is now added by an in-place ``addmm_`` on the base output (plain autograd: the GEMM adds into
its output, where a separate add read and wrote an activation-sized tensor once more), and a frozen base
weight's autocast copy is kept between steps (:func:`frozen_cast`). Compiled, the plain sum stays: inductor
fuses the add, and the measured graphs stay as they were.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F
from torch.utils.weak import WeakIdKeyDictionary


# On CUDA a rank that is not a multiple of this is padded with zero rows of ``a`` and zero columns of
# ``b`` up to the next multiple (0 or 1: never). cuBLAS runs bf16 GEMMs whose rank-sized dimension (the
# output of ``x a^T``, the inner size of ``(x a^T) b^T``, and their backward) is not a multiple of 8
# elements with narrower loads than the aligned ones; AdaLoRA's initial rank r + 4 = 12 and EVA's
# redistributed ranks hit this (both read slower than LoRA r=8 on the H200, BENCHMARKS.md, issue 21). The
# zeros add exact zeros to every sum and the padding's gradient is dropped by the slice's backward, so
# outputs and gradients are those of the unpadded product (tests/test_fast_paths.py); only the GEMMs'
# rounding order may differ. Off: measured on an H100 (BENCHMARKS.md, 2026-12-05), AdaLoRA's eager ViT-B
# step read 1.25x full fine-tuning padded against 1.23x unpadded (``bench methods --set rank_align=8``).
RANK_ALIGN = 0


def padded_rank(rank: int, align: int) -> int:
    """``rank`` rounded up to a multiple of ``align``; rank 1 (a matrix-vector product) and ``align`` <= 1
    stay as they are."""
    if align <= 1 or rank <= 1 or rank % align == 0:
        return rank
    return rank + align - rank % align


# Eager forwards add the low-rank product by an in-place addmm_ and keep frozen weights' autocast casts
# between steps (True), or take the plain sum with autocast's own casts (False: the code before, for a GPU
# A/B: ``bench methods --set eager_in_place=false``). Compiled forwards take the plain sum either way.
EAGER_IN_PLACE = True

# frozen tensor -> ((device, dtype, storage, version), its cast): see frozen_cast
_FROZEN_CASTS: WeakIdKeyDictionary = WeakIdKeyDictionary()


def frozen_cast(t: torch.Tensor | None) -> torch.Tensor | None:
    """``t`` as autocast would cast it for a matmul, kept between eager forwards where ``t`` is frozen.

    Autocast caches its casts only within one autocast region and only for tensors that require grad, so
    every eager step copied each frozen base weight and bias to bf16 again: a weight-sized copy and four
    dispatches per adapted layer, 96 a step on ViT-B. The copy made here is reused while ``t``'s storage
    and version are the same (an in-place change, a merge, a load or a move makes a new one). It holds no
    graph (``t`` requires no grad) and costs no peak memory: the step's backward keeps each cast anyway.
    ``t`` itself is returned where it requires grad, autocast is off, it is not fp32, under torch.compile
    (inductor fuses the casts) or in inference mode (whose tensors a later training step could not save)."""
    if (t is None or not EAGER_IN_PLACE or t.requires_grad or t.dtype != torch.float32 or torch.compiler.is_compiling()
            or torch.is_inference_mode_enabled() or not torch.is_autocast_enabled(t.device.type)):
        return t
    dtype = torch.get_autocast_dtype(t.device.type)
    key = (t.device, dtype, t.data_ptr(), t._version)
    cached = _FROZEN_CASTS.get(t)
    if cached is None or cached[0] != key:
        cached = _FROZEN_CASTS[t] = (key, t.detach().to(dtype))
    return cached[1]


def _eager(x: torch.Tensor) -> bool:
    """Whether the eager form (:func:`_add_product_in_place`) applies: on (:data:`EAGER_IN_PLACE`), not
    compiling, a batch of rows."""
    return EAGER_IN_PLACE and x.dim() >= 2 and not torch.compiler.is_compiling()


def _add_product_in_place(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, a: torch.Tensor,
                          up: torch.Tensor) -> torch.Tensor:
    """``x W^T + bias + (x a^T) up`` with ``up`` (r x out), eager: the GEMM of ``(x a^T) up`` adds into the
    base output in place, where a separate add was one kernel more and one more activation-sized pass."""
    weight, bias = frozen_cast(weight), frozen_cast(bias)
    flat = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    out = F.linear(flat, weight, bias)  # 2-d: addmm's own output, not a view (in place on a view costs a copy)
    h = F.linear(flat, a)
    if up.dtype != out.dtype:  # addmm_ is not autocast's: its operands take the output's dtype here
        up = up.to(out.dtype)
    out = out.addmm_(h, up)
    return out if x.dim() == 2 else out.view(*x.shape[:-1], out.shape[-1])


def low_rank_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, a: torch.Tensor,
                    b: torch.Tensor, scale: float | torch.Tensor = 1.0, align: int | None = None) -> torch.Tensor:
    """``x W^T + bias + scale (x a^T) b^T`` for ``weight`` (out x in), ``a`` (r x in) and ``b`` (out x r).

    ``a`` and ``b`` may be parameters or tensors computed from them (VeRA's scaled bases, AdaLoRA's
    ``A * E``); ``scale`` is folded into ``b`` (out x r), never applied to the activations. ``align``:
    pad the rank to a multiple of it (None: :data:`RANK_ALIGN` on CUDA, no padding elsewhere).
    """
    if not (isinstance(scale, (int, float)) and scale == 1):
        b = b * scale
    rank = a.shape[0]
    target = padded_rank(rank, (RANK_ALIGN if x.is_cuda else 0) if align is None else align)
    if target != rank:
        a = F.pad(a, (0, 0, 0, target - rank))
        b = F.pad(b, (0, target - rank))
    if _eager(x):
        return _add_product_in_place(x, weight, bias, a, b.t())
    return F.linear(x, frozen_cast(weight), frozen_cast(bias)) + F.linear(F.linear(x, a), b)


def low_rank_linear_t(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, a: torch.Tensor,
                      b_t: torch.Tensor) -> torch.Tensor:
    """:func:`low_rank_linear` (scale 1) for an up factor given transposed, ``b_t`` (r x out), as a method
    that builds it in that layout has it (EigenLoRA's ``alpha_b^T E_B + mean_B``): ``(x a^T) b_t`` as one
    matmul, where ``F.linear`` would take ``b_t.T`` (a transpose forward and a permute backward, both
    dispatches). Where the rank is padded (:data:`RANK_ALIGN`), :func:`low_rank_linear` runs instead."""
    rank = a.shape[0]
    if padded_rank(rank, RANK_ALIGN if x.is_cuda else 0) != rank:
        return low_rank_linear(x, weight, bias, a, b_t.T)
    if _eager(x):
        return _add_product_in_place(x, weight, bias, a, b_t)
    return F.linear(x, frozen_cast(weight), frozen_cast(bias)) + F.linear(x, a) @ b_t
