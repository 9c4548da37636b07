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
and dropped: its Python backward made eager steps slower and compiled ones opaque (BENCHMARKS.md).
"""

from __future__ import annotations

import torch
from torch.nn import functional as F


# On CUDA a rank that is not a multiple of this is padded with zero rows of ``a`` and zero columns of
# ``b`` up to the next multiple (0 or 1: never). cuBLAS runs bf16 GEMMs whose rank-sized dimension (the
# output of ``x a^T``, the inner size of ``(x a^T) b^T``, and their backward) is not a multiple of 8
# elements with narrower loads than the aligned ones; AdaLoRA's initial rank r + 4 = 12 and EVA's
# redistributed ranks hit this (both read slower than LoRA r=8 on the H200, BENCHMARKS.md, issue 21). The
# zeros add exact zeros to every sum and the padding's gradient is dropped by the slice's backward, so
# outputs and gradients are those of the unpadded product (tests/test_fast_paths.py); only the GEMMs'
# rounding order may differ. Off until a GPU measures it: ``bench methods --set rank_align=8`` against
# the default in one run.
RANK_ALIGN = 0


def padded_rank(rank: int, align: int) -> int:
    """``rank`` rounded up to a multiple of ``align``; rank 1 (a matrix-vector product) and ``align`` <= 1
    stay as they are."""
    if align <= 1 or rank <= 1 or rank % align == 0:
        return rank
    return rank + align - rank % align


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
    return F.linear(x, weight, bias) + F.linear(F.linear(x, a), b)


def low_rank_linear_t(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, a: torch.Tensor,
                      b_t: torch.Tensor) -> torch.Tensor:
    """:func:`low_rank_linear` (scale 1) for an up factor given transposed, ``b_t`` (r x out), as a method
    that builds it in that layout has it (EigenLoRA's ``alpha_b^T E_B + mean_B``): ``(x a^T) b_t`` as one
    matmul, where ``F.linear`` would take ``b_t.T`` (a transpose forward and a permute backward, both
    dispatches). Where the rank is padded (:data:`RANK_ALIGN`), :func:`low_rank_linear` runs instead."""
    rank = a.shape[0]
    if padded_rank(rank, RANK_ALIGN if x.is_cuda else 0) != rank:
        return low_rank_linear(x, weight, bias, a, b_t.T)
    return F.linear(x, weight, bias) + F.linear(x, a) @ b_t
