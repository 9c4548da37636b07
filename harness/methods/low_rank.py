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


def low_rank_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, a: torch.Tensor,
                    b: torch.Tensor, scale: float | torch.Tensor = 1.0) -> torch.Tensor:
    """``x W^T + bias + scale (x a^T) b^T`` for ``weight`` (out x in), ``a`` (r x in) and ``b`` (out x r).

    ``a`` and ``b`` may be parameters or tensors computed from them (VeRA's scaled bases, AdaLoRA's
    ``A * E``); ``scale`` is folded into ``b`` (out x r), never applied to the activations.
    """
    if not (isinstance(scale, (int, float)) and scale == 1):
        b = b * scale
    return F.linear(x, weight, bias) + F.linear(F.linear(x, a), b)
