"""The low-rank update of an adapted Linear in the fewest activation-sized operations.

Adapters written as modules (peft's ``lora_A``/``lora_B`` then ``* scaling``; VeRA's ``lambda_b *
F.linear(lambda_d * F.linear(x, A), B)``) scale the activations: every scaling is an element-wise pass
over an activation-sized tensor in the forward and again in the backward, and it keeps that tensor for
the backward. Folding the scalings into the small factors first leaves ``x W^T + bias + (x a^T) b^T``:
two matmuls and one add beyond the base layer, in plain autograd (the backward stays in C++, which keeps
an eager step from being bound by Python, and torch.compile fuses the add into its neighbours).

On a GPU the same update can instead be merged for the forward, ``F.linear(x, W + b a, bias)``: that pays
the weight-gradient GEMM full fine-tuning pays, but no extra pass over the activations. Which is cheaper
depends on the layer: the GEMM grows with ``in * out``, the passes with ``in + out``. A GPU's matmul
throughput is a few hundred times its memory bandwidth in bytes, so layers of ViT-B's and the paper DT's
widths (``in * out / (in + out)`` of 384-614) are cheaper merged and LLM-width layers (2048 at 4096 x
4096) are not; on a CPU, bound by arithmetic, the low-rank form always is.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

# Layers with in*out/(in+out) below this take the merged form on a GPU (see the module's docstring).
MERGE_BELOW = 1024


def merges_on(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether :func:`low_rank_linear` merges the update for this input and layer by default."""
    out_f, in_f = weight.shape
    return x.is_cuda and in_f * out_f / (in_f + out_f) < MERGE_BELOW


def low_rank_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, a: torch.Tensor,
                    b: torch.Tensor, scale: float | torch.Tensor = 1.0, merged: bool | None = None) -> torch.Tensor:
    """``x W^T + bias + scale (x a^T) b^T`` for ``weight`` (out x in), ``a`` (r x in) and ``b`` (out x r).

    ``a`` and ``b`` may be parameters or tensors computed from them (VeRA's scaled bases, AdaLoRA's
    ``A * E``); ``scale`` is folded into ``b`` (out x r), never applied to the activations. ``merged``
    (default: :func:`merges_on`) computes the same as one Linear of weight ``W + scale b a``.
    """
    if not (isinstance(scale, (int, float)) and scale == 1):
        b = b * scale
    if merged if merged is not None else merges_on(x, weight):
        return F.linear(x, weight + (b @ a).to(weight.dtype), bias)
    return F.linear(x, weight, bias) + F.linear(F.linear(x, a), b)
